//! The plan of one cross-entropy row: what the row does ([`RowPlan`], decided by one table from
//! its [`RowFacts`], the CE columns of docs/contract.md), and the numbers its passes need
//! ([`CeRow`]). A whole row read here and a split row finished from its merged partials
//! ([`crate::sharded`]) are planned by the same table.

use super::scalar::{add_distance, LogitMap, RowScan};
use crate::element::Element;
use crate::error::LseError;
use crate::state::{exp_difference, saturate, CompensatedSum, RowState};

/// What a (non-ignored) row's targets and read pass say about it, as far as the contract cares.
/// An ignored row is decided before anything is read: 0, whatever its logits hold.
#[derive(Clone, Copy, Debug, PartialEq)]
pub(crate) struct RowFacts {
    /// A target the row cannot be scored against: the first non-finite probability, or (split
    /// vocabulary) a target class that no shard held.
    pub(crate) bad_target: Option<RowFault>,
    /// The first NaN or `+inf` logit: its column and value.
    pub(crate) non_finite: Option<(usize, f64)>,
    /// The first class with target mass whose logit is `-inf`.
    pub(crate) masked_target: Option<usize>,
    /// Every logit is `-inf`.
    pub(crate) fully_masked: bool,
    /// [`crate::NonFinite::Propagate`]: the row's faults become its outputs instead of errors.
    pub(crate) propagate: bool,
}

/// What a row that is not an error does.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum RowPlan {
    /// The loss from `(m, s')` and the gradient `p − q`: finite logits, some `-inf` ones too.
    Loss,
    /// Every logit `-inf` and no target mass on them: loss 0, gradient 0.
    Masked,
    /// Target mass on a `-inf` logit, propagated: loss `+inf`, the gradient of the live classes.
    InfiniteLoss,
    /// NaN or `+inf` in the logits, propagated: loss, lse and gradient all NaN.
    Nan,
}

impl RowPlan {
    /// The CE loss and gradient columns of docs/contract.md, one arm per row of the table;
    /// a row's target first (a bad target is an error whatever the logits hold), then NaN and
    /// `+inf`, then target mass on `-inf`:
    ///
    /// | target    | NaN, `+inf` | mass on -inf | all `-inf` | `Error`            | `Propagate`  |
    /// |-----------|-------------|--------------|------------|--------------------|--------------|
    /// | fault `f` |             |              |            | `f`                | `f`          |
    /// | none      | `(c, v)`    |              |            | `NonFinite {c, v}` | Nan          |
    /// | none      | none        | class `k`    |            | `MaskedTarget {k}` | InfiniteLoss |
    /// | none      | none        | none         | yes        | Masked             | Masked       |
    /// | none      | none        | none         | no         | Loss               | Loss         |
    pub(crate) fn of(facts: RowFacts) -> Result<Self, RowFault> {
        use RowPlan::{InfiniteLoss, Loss, Masked, Nan};
        match (
            facts.bad_target,
            facts.non_finite,
            facts.masked_target,
            facts.fully_masked,
            facts.propagate,
        ) {
            // "target out of range" (of a split row: uncovered), and probability targets that
            // are not finite.
            (Some(fault), ..) => Err(fault),
            // "NaN anywhere" and "+inf anywhere": the error names the first, or a NaN row.
            (None, Some((column, value)), .., false) => Err(RowFault::NonFinite { column, value }),
            (None, Some(_), .., true) => Ok(Nan),
            // "all −inf", and any target mass on a −inf logit: `MaskedTarget`, or `+inf`.
            (None, None, Some(class), _, false) => Err(RowFault::MaskedTarget { class }),
            (None, None, Some(_), _, true) => Ok(InfiniteLoss),
            // "all −inf" with no target mass there (a zero weight, ε = 1): nothing to learn.
            (None, None, None, true, _) => Ok(Masked),
            // "all finite" and "some −inf, rest finite".
            (None, None, None, false, _) => Ok(Loss),
        }
    }
}

/// `ε / K`, the smoothing mass of each of a row's `live` classes (none when there are none).
fn smoothing_share(smoothing: f64, live: u64) -> f64 {
    if live > 0 {
        smoothing / live as f64
    } else {
        0.0
    }
}

/// True when target mass `kept_mass` (after smoothing takes its share) sits on a masked class:
/// an infinite loss.
#[inline]
pub(crate) fn mass_on_masked(logit: f64, kept_mass: f64) -> bool {
    logit == f64::NEG_INFINITY && kept_mass != 0.0
}

/// The target of one cross-entropy row.
#[derive(Clone, Copy, Debug)]
pub(crate) enum RowTarget<'t, E> {
    /// A class index (already checked to be in range).
    Class(usize),
    /// A row of probabilities (checked here, row by row).
    Probabilities(&'t [E]),
}

/// The per-call constants of a cross-entropy row pass.
#[derive(Clone, Copy, Debug)]
pub(crate) struct CeConfig<'w> {
    pub(crate) weights: Option<&'w [f64]>,
    /// Sum of all class weights (or the class count when unweighted).
    pub(crate) weight_total: f64,
    /// The largest class weight (1 when unweighted).
    pub(crate) weight_max: f64,
    pub(crate) smoothing: f64,
    pub(crate) z_loss: f64,
    pub(crate) map: LogitMap,
    pub(crate) propagate_non_finite: bool,
}

/// Why a cross-entropy row cannot be computed ([`Self::in_row`] adds the row index).
#[derive(Clone, Copy, Debug, PartialEq)]
pub(crate) enum RowFault {
    NonFinite {
        column: usize,
        value: f64,
    },
    MaskedTarget {
        class: usize,
    },
    BadProbability {
        column: usize,
        value: f64,
    },
    /// A split row whose target class no shard held.
    UncoveredTarget {
        class: usize,
    },
}

impl RowFault {
    /// The error of row `row`.
    pub(crate) fn in_row(self, row: usize) -> LseError {
        match self {
            RowFault::NonFinite { column, value } => LseError::NonFinite {
                what: "logit",
                row,
                column,
                value,
            },
            RowFault::MaskedTarget { class } => LseError::MaskedTarget { row, class },
            RowFault::BadProbability { column, value } => {
                LseError::BadProbability { row, column, value }
            }
            RowFault::UncoveredTarget { class } => LseError::UncoveredTarget { row, class },
        }
    }
}

/// The two factors a gradient row is multiplied by.
///
/// They are kept apart because they are treated differently at the dtype's edge: the gradient of
/// the loss itself (with the reduction's `1/denominator`) is a finite quantity and saturates at
/// the dtype's `MAX`, while an overflow caused by the caller's incoming gradient (a loss scale) is
/// kept as `±inf` — that overflow is exactly what a dynamic loss scaler looks for.
#[derive(Clone, Copy, Debug, PartialEq)]
pub(crate) struct GradScale {
    /// `1/denominator` for a mean, 1 otherwise (0 for an empty mean).
    pub(crate) reduction: f64,
    /// The caller's incoming gradient for this row.
    pub(crate) caller: f64,
}

/// Loss and logsumexp of one row, in `f64`.
#[derive(Clone, Copy, Debug, PartialEq)]
pub(crate) struct RowValues {
    pub(crate) loss: f64,
    pub(crate) lse: f64,
    /// The z-loss term `z · lse²` that `loss` includes.
    pub(crate) z_term: f64,
    /// The row's argmax, when the caller asked for it (set by the op, not by the plan).
    pub(crate) argmax: Option<usize>,
}

/// Everything the write pass of one cross-entropy row needs, found by the read pass.
///
/// With `a_c = w_c · q_c` the weighted target mass on class `c` (`q` the smoothed target
/// distribution) and `A = Σ_c a_c`, the row loss is
/// `Σ_c a_c · (m − x_c) + A · log1p(s') + z · lse²` and its gradient
/// `slope(x_i) · ((A + 2 z lse) · p_i − a_i)`.
///
/// The gradient is evaluated as `((A − a_i)·e_i − a_i·(S − e_i)) / S + 2 z lse · e_i / S` with
/// `e_i = exp(x_i − m)` and `S = 1 + s'`: `A − a_i` (the target mass on the other classes) and
/// `S − e_i` (the softmax mass of the other classes, `s'` itself at the max) are formed without
/// subtracting nearly equal numbers, so `p_y − 1` keeps its digits when `p_y` rounds to 1.
#[derive(Clone, Copy, Debug)]
pub(crate) struct CeRow<'t, 'w, E> {
    config: CeConfig<'w>,
    target: RowTarget<'t, E>,
    max: f64,
    denominator: f64,
    log1p_sum: f64,
    lse: f64,
    /// `ε / K`, the smoothing mass of each live (finite-logit) class; 0 for a fully masked row.
    smoothing_share: f64,
    /// `Σ_c w_c q_c` before smoothing (`w_y` for a class target), with its rounding error:
    /// `A − a_c` of a class holding nearly all the mass needs the digits below `A`'s.
    kept_mass: CompensatedSum,
    /// The largest target probability (1 for a class target).
    probability_max: f64,
    /// `Σ_c w_c` over live classes.
    live_weight: f64,
    /// `s'`.
    rest: f64,
    /// `a_y · (m − x_y)` for a class target without smoothing (the whole distance term).
    target_distance: CompensatedSum,
    /// What the row does.
    plan: RowPlan,
}

impl<'t, 'w, E: Element> CeRow<'t, 'w, E> {
    /// Completes the read pass over `row` (its `scan`, from either kernel) with its targets.
    pub(crate) fn new(
        row: &[E],
        scan: &RowScan,
        target: RowTarget<'t, E>,
        config: CeConfig<'w>,
    ) -> Result<Self, RowFault> {
        let mut plan = Self::of_state(config, target, &scan.state);
        let live = row.len() - scan.masked;
        let keep = 1.0 - config.smoothing;
        plan.smoothing_share = smoothing_share(config.smoothing, live as u64);
        // Σ_c w_c over live classes, for the smoothing part of A.
        let live_weight = match (config.weights, scan.masked) {
            (_, 0) => config.weight_total,
            (None, _) => live as f64,
            (Some(w), _) => {
                let mut sum = CompensatedSum::ZERO;
                for (&x, &wc) in row.iter().zip(w) {
                    if x.to_f64() > f64::NEG_INFINITY {
                        sum.add(wc);
                    }
                }
                sum.value()
            }
        };
        let weight = |c: usize| config.weights.map_or(1.0, |w| w[c]);
        let (mut bad_target, mut masked_target) = (None, None);
        let kept_mass = match target {
            RowTarget::Class(y) => {
                let mapped = config.map.apply(row[y].to_f64());
                if mass_on_masked(mapped, keep * weight(y)) {
                    masked_target = Some(y);
                }
                let mut distance = CompensatedSum::ZERO;
                add_distance(&mut distance, keep * weight(y), plan.max, mapped);
                plan.target_distance = distance;
                let mut kept = CompensatedSum::ZERO;
                kept.add(weight(y));
                kept
            }
            RowTarget::Probabilities(q) => {
                // With no masked class and every probability valid, the vector kernel sums the
                // masses; otherwise this loop finds the first bad probability and any mass on
                // a masked class.
                let vector = (scan.masked == 0)
                    .then(|| super::probability_mass(q, config.weights))
                    .flatten();
                let (kept, peak) = if let Some(found) = vector {
                    found
                } else {
                    let (mut sum, mut peak) = (CompensatedSum::ZERO, 0.0_f64);
                    for (c, (&qc, &x)) in q.iter().zip(row).enumerate() {
                        let qc = qc.to_f64();
                        if !qc.is_finite() {
                            bad_target = Some(RowFault::BadProbability {
                                column: c,
                                value: qc,
                            });
                            break;
                        }
                        let mass = weight(c) * qc;
                        if mass_on_masked(x.to_f64(), keep * mass) {
                            masked_target.get_or_insert(c);
                        }
                        sum.add(mass);
                        peak = peak.max(qc.abs());
                    }
                    (sum, peak)
                };
                plan.probability_max = peak;
                kept
            }
        };
        plan.kept_mass = kept_mass;
        plan.live_weight = live_weight;
        plan.plan = RowPlan::of(RowFacts {
            bad_target,
            non_finite: scan.first_non_finite.map(|c| (c, row[c].to_f64())),
            masked_target,
            fully_masked: scan.state.is_fully_masked(),
            propagate: config.propagate_non_finite,
        })?;
        Ok(plan)
    }

    /// The plan of a row of `state`, before its targets are looked at.
    fn of_state(config: CeConfig<'w>, target: RowTarget<'t, E>, state: &RowState) -> Self {
        CeRow {
            config,
            target,
            max: state.max(),
            denominator: state.denominator(),
            log1p_sum: state.log1p_sum(),
            lse: state.logsumexp(),
            smoothing_share: 0.0,
            kept_mass: CompensatedSum::ZERO,
            probability_max: 1.0,
            live_weight: 0.0,
            rest: state.sum_excluding_max(),
            target_distance: CompensatedSum::ZERO,
            plan: RowPlan::Loss,
        }
    }

    /// The plan of a row whose read pass ran elsewhere, in pieces (the shards of a split
    /// vocabulary), from what the merged pieces know: the row's `state`; its `target` in this
    /// piece — a class's column (`usize::MAX` when another piece holds it) or this piece's
    /// columns of the probabilities (empty for a plan of the loss alone); the whole row's
    /// `kept_mass` `Σ_c w_c q_c` (`w_y` for a class) and largest `|q_c|`, its live
    /// (finite-logit) class count and weight, and its `plan` (from the same table,
    /// [`RowPlan::of`]). `config.weights` are this piece's; the gradient of its columns is then
    /// [`Self::write_gradient`]'s.
    #[allow(clippy::too_many_arguments)]
    pub(crate) fn from_merged(
        config: CeConfig<'w>,
        state: RowState,
        target: RowTarget<'t, E>,
        kept_mass: CompensatedSum,
        probability_max: f64,
        live: u64,
        live_weight: f64,
        plan: RowPlan,
    ) -> Self {
        let mut row = Self::of_state(config, target, &state);
        row.smoothing_share = smoothing_share(config.smoothing, live);
        row.kept_mass = kept_mass;
        row.probability_max = probability_max;
        row.live_weight = live_weight;
        row.plan = plan;
        row
    }

    /// `ε / K`, the smoothing mass of each live class.
    pub(crate) fn smoothing_share(&self) -> f64 {
        self.smoothing_share
    }

    /// Calls `write(c, dloss/dx_c · scale)` for every class of `logits` (NaN for a
    /// [`RowPlan::Nan`] row): the gradient half of [`Self::finish`]. `logits` yields the row's
    /// raw logits in order (read once, so the gradient may be written over them).
    pub(crate) fn write_gradient(
        &self,
        logits: impl Iterator<Item = E>,
        scale: GradScale,
        mut write: impl FnMut(usize, E),
    ) {
        let dtype_max = E::MAX.to_f64();
        for (c, x) in logits.enumerate() {
            let g = if self.plan == RowPlan::Nan {
                f64::NAN
            } else {
                self.gradient(c, x.to_f64(), scale, dtype_max)
            };
            write(c, E::from_f64(g));
        }
    }

    /// True when the loss needs a sweep over every class (smoothing or probability targets);
    /// otherwise only the target class contributes.
    fn loss_needs_every_class(&self) -> bool {
        self.smoothing_share > 0.0 || matches!(self.target, RowTarget::Probabilities(_))
    }

    /// `a_c`, the weighted target mass on class `c` whose mapped logit is `mapped`.
    #[inline]
    fn target_mass(&self, c: usize, mapped: f64) -> f64 {
        if mapped == f64::NEG_INFINITY {
            return 0.0; // masked: any positive mass there was caught by `new`
        }
        let q = match self.target {
            RowTarget::Class(y) => f64::from(u8::from(c == y)),
            RowTarget::Probabilities(q) => q[c].to_f64(),
        };
        let w = self.config.weights.map_or(1.0, |w| w[c]);
        w * ((1.0 - self.config.smoothing) * q + self.smoothing_share)
    }

    /// `A = Σ_c a_c`, the row's whole weighted, smoothed target mass.
    #[inline]
    fn target_total(&self) -> f64 {
        (1.0 - self.config.smoothing) * self.kept_mass.value()
            + self.smoothing_share * self.live_weight
    }

    /// `A − a_c`: the weighted target mass on every class but `c` (live `c`), formed as a sum of
    /// its parts rather than by subtracting `a_c` from `A`.
    #[inline]
    fn other_mass(&self, c: usize) -> f64 {
        let w = self.config.weights.map_or(1.0, |w| w[c]);
        let kept_elsewhere = match self.target {
            RowTarget::Class(y) if c == y => 0.0,
            RowTarget::Class(_) => self.kept_mass.value(),
            RowTarget::Probabilities(q) => {
                // A − w·q_c with the product's rounding error: exact up to the last rounding.
                let mass = w * q[c].to_f64();
                let mut rest = self.kept_mass;
                rest.add(-mass);
                rest.add(-w.mul_add(q[c].to_f64(), -mass));
                rest.value()
            }
        };
        (1.0 - self.config.smoothing) * kept_elsewhere
            + self.smoothing_share * (self.live_weight - w)
    }

    /// `∂(scale · loss)/∂x_c` for class `c` with raw logit `raw` (not a [`RowPlan::Nan`] row).
    ///
    /// The gradient of the loss itself (with the reduction's factor) saturates at the dtype's
    /// `MAX`; the caller's factor is applied last and may overflow to `±inf`.
    #[inline]
    fn gradient(&self, c: usize, raw: f64, scale: GradScale, dtype_max: f64) -> f64 {
        let mapped = self.config.map.apply(raw);
        if self.denominator == 0.0 || mapped == f64::NEG_INFINITY {
            return 0.0;
        }
        let mass = self.target_mass(c, mapped);
        let e = exp_difference(mapped, self.max);
        // S − e_i: s' at the max (e_i = 1), else 1 + (s' − e_i) ≥ 1.
        let others = if e == 1.0 {
            self.rest
        } else {
            1.0 + (self.rest - e)
        };
        let s = self.denominator;
        let ce = (self.other_mass(c) * e - mass * others) / s;
        // lse·p is formed first so that no inf·0 can occur.
        let z = saturate(2.0 * self.config.z_loss * (self.lse * (e / s)));
        let of_loss = saturate(scale.reduction * saturate(self.config.map.slope(raw) * (ce + z)));
        scale.caller * of_loss.clamp(-dtype_max, dtype_max)
    }

    /// The row's loss and logsumexp from `distance = Σ_c a_c (m − x_c)`.
    pub(crate) fn values(&self, distance: f64) -> RowValues {
        let z_term = saturate(self.config.z_loss * saturate(self.lse * self.lse));
        let (loss, z_term) = match self.plan {
            RowPlan::Loss => (
                saturate(distance + self.target_total() * self.log1p_sum + z_term),
                z_term,
            ),
            RowPlan::Masked => (0.0, 0.0),
            RowPlan::InfiniteLoss => (f64::INFINITY, z_term),
            RowPlan::Nan => (f64::NAN, f64::NAN),
        };
        RowValues {
            loss,
            lse: if self.plan == RowPlan::Nan {
                f64::NAN
            } else {
                self.lse
            },
            z_term,
            argmax: None,
        }
    }

    /// The row's maximum (of the mapped logits).
    pub(crate) fn max(&self) -> f64 {
        self.max
    }

    /// True when the vectorised passes serve this row: nothing non-finite, not fully masked.
    fn vector_eligible(&self) -> bool {
        self.plan == RowPlan::Loss
    }

    /// True when a loss-only call takes its distance term from the vector kernel (the same
    /// sweep as the fused write pass, so both give the same bits).
    pub(crate) fn fast_loss_applies(&self) -> bool {
        self.vector_eligible() && self.loss_needs_every_class()
    }

    /// True when this row's gradient cancels so that it needs the scalar kernel's `s'` (and
    /// the scalar write pass): smoothing whose share of a class (times its weight) is larger
    /// than every gradient the row is known to have — the max class (`e = 1`, unweighted
    /// only) and the target — where `c·e_i − share·w_i` loses the vector exp's digits.
    /// Probability targets are checked by the write pass itself ([`FastWrite::verify`]). A
    /// soft-capped row's write pass may take its terms and slopes from `f32` caches: the same
    /// test, with the target's gradient alone (the max class's slope is not known here).
    pub(crate) fn needs_exact_state(&self, row: &[E]) -> bool {
        match self.target {
            RowTarget::Class(target) => self.smoothing_cancels(row[target].to_f64()),
            RowTarget::Probabilities(_) => false,
        }
    }

    /// [`Self::needs_exact_state`] of a class-target row whose target logit is `raw` (a plan of
    /// a whole row, whose read pass may have run elsewhere: a split row's merged partial).
    pub(crate) fn smoothing_cancels(&self, raw: f64) -> bool {
        let RowTarget::Class(target) = self.target else {
            return false;
        };
        let share = self.smoothing_share;
        if share == 0.0 || !self.vector_eligible() {
            return false;
        }
        let capped = self.config.map != LogitMap::Identity;
        let unit = GradScale {
            reduction: 1.0,
            caller: 1.0,
        };
        let target_grad = self.gradient(target, raw, unit, f64::MAX).abs();
        let largest = if raw < self.max && self.config.weights.is_none() && !capped {
            target_grad.max((self.per_probability() - share).abs())
        } else {
            target_grad
        };
        largest < share * self.config.weight_max
    }

    /// `(A + 2z·lse) / S`: off the target, `g_i = per_probability · e_i − a_i`.
    fn per_probability(&self) -> f64 {
        (self.target_total() + 2.0 * self.config.z_loss * self.lse) / self.denominator
    }

    /// The constants of the vectorised write pass, when it applies to this row (see
    /// [`Self::vector_eligible`]) and its gradient cannot reach the dtype's edge.
    pub(crate) fn fast_write(&self, row: &[E], scale: GradScale) -> Option<FastWrite<'t, 'w, E>> {
        if !self.vector_eligible() {
            return None;
        }
        let dtype_max = E::MAX.to_f64();
        let (per_probability, share) = (self.per_probability(), self.smoothing_share);
        let masses = self.class_masses();
        let largest_mass = match masses {
            Some(m) => self.config.weight_max * (share + m.keep * self.probability_max),
            None => share,
        };
        let reduction = scale.reduction;
        // The map's slope multiplies the gradient last, with nothing left to saturate it.
        let reach = reduction * self.config.map.max_slope();
        // (Written so that NaN also fails.)
        let bounded = reach * (per_probability.abs() + largest_mass) <= 0.5 * dtype_max;
        if !bounded {
            return None;
        }
        let c = scale.caller * (reduction * per_probability);
        let b = scale.caller * (reduction * if masses.is_some() { 1.0 } else { share });
        if !(c.is_finite() && b.is_finite()) {
            return None;
        }
        let target = match self.target {
            // A piece of a split row that does not hold the target ([`Self::from_merged`]) has
            // none.
            RowTarget::Class(y) => (y < row.len()).then_some(y),
            RowTarget::Probabilities(_) => None,
        };
        let target_grad =
            target.map_or(0.0, |y| self.gradient(y, row[y].to_f64(), scale, dtype_max));
        Some(FastWrite {
            c,
            b,
            max: self.max,
            target,
            target_grad,
            sweep_distance: self.loss_needs_every_class(),
            masses,
            map: self.config.map,
        })
    }

    /// The per-class target masses of the vector passes, when classes differ in theirs: with
    /// probability targets, and with class weights once smoothing gives every class some.
    pub(crate) fn class_masses(&self) -> Option<ClassMasses<'t, 'w, E>> {
        let probabilities = match self.target {
            RowTarget::Class(_) => None,
            RowTarget::Probabilities(q) => Some(q),
        };
        let weighted_smoothing = self.smoothing_share > 0.0 && self.config.weights.is_some();
        (probabilities.is_some() || weighted_smoothing).then_some(ClassMasses {
            weights: self.config.weights,
            probabilities,
            share: self.smoothing_share,
            keep: 1.0 - self.config.smoothing,
        })
    }

    /// The loss after a vectorised write pass that returned its distance sweep when asked
    /// (see [`FastWrite::sweep_distance`]).
    pub(crate) fn fast_loss(&self, swept_distance: f64) -> RowValues {
        let mut distance = self.target_distance;
        if self.loss_needs_every_class() {
            distance.add(if self.class_masses().is_some() {
                swept_distance
            } else {
                self.smoothing_share * swept_distance
            });
        }
        self.values(distance.value())
    }

    /// The write pass: calls `write(c, dloss/dx_c · scale)` for every class when `want_grad`,
    /// and returns the row's loss and logsumexp. `logits` yields the row's raw logits in order
    /// (read once, so the gradient may be written over them).
    pub(crate) fn finish(
        &self,
        logits: impl Iterator<Item = E>,
        scale: GradScale,
        want_grad: bool,
        mut write: impl FnMut(usize, E),
    ) -> RowValues {
        if self.plan == RowPlan::Nan {
            if want_grad {
                logits
                    .enumerate()
                    .for_each(|(c, _)| write(c, E::from_f64(f64::NAN)));
            }
            return self.values(f64::NAN);
        }
        let dtype_max = E::MAX.to_f64();
        // Σ_c a_c (m − x_c): from the sweep below, or from the target class alone.
        let sweep_loss = self.loss_needs_every_class();
        let mut distance = if sweep_loss {
            CompensatedSum::ZERO
        } else {
            self.target_distance
        };
        if want_grad || sweep_loss {
            for (c, x) in logits.enumerate() {
                let raw = x.to_f64();
                if sweep_loss {
                    let mapped = self.config.map.apply(raw);
                    add_distance(&mut distance, self.target_mass(c, mapped), self.max, mapped);
                }
                if want_grad {
                    // No saturation of the product: only the caller's factor can overflow.
                    write(c, E::from_f64(self.gradient(c, raw, scale, dtype_max)));
                }
            }
        }
        self.values(distance.value())
    }
}

/// The vectorised cross-entropy write pass of one row: `g_i = c · exp(x_i − max) − b · u_i` on
/// live classes (`u_i` = 1, or the [`ClassMasses`]), 0 on masked ones, then `target_grad` at
/// `target`.
#[derive(Clone, Copy, Debug)]
pub(crate) struct FastWrite<'t, 'w, E> {
    pub(crate) c: f64,
    pub(crate) b: f64,
    pub(crate) max: f64,
    /// The class target, whose gradient `target_grad` (from the cancellation-free scalar
    /// formula) replaces the vector one; `None` for probability targets.
    pub(crate) target: Option<usize>,
    pub(crate) target_grad: f64,
    /// The loss needs the distance sweep from the pass: `Σ_live (m − x_c)`, or
    /// `Σ_live u_c (m − x_c)` with masses (label smoothing, probability targets).
    pub(crate) sweep_distance: bool,
    /// Per-class target masses, when they differ between classes.
    pub(crate) masses: Option<ClassMasses<'t, 'w, E>>,
    /// The logit map (`x` above stands for the mapped logit; the gradient is multiplied by the
    /// map's slope).
    pub(crate) map: LogitMap,
}

impl<'t, 'w, E: Element> FastWrite<'t, 'w, E> {
    /// The write pass of the part of the row from column `offset` on (a piece of a long row).
    pub(crate) fn from(&self, offset: usize) -> Self {
        Self {
            masses: self.masses.map(|m| m.from(offset)),
            ..*self
        }
    }

    /// True when the pass must check its own result for cancellation: with probability
    /// targets `c·e_i − b·u_i` may cancel anywhere, and the row cannot tell in advance where.
    pub(crate) fn verify(&self) -> bool {
        self.masses.is_some_and(|m| m.probabilities.is_some())
    }
}

/// The target mass of each class, `u_i = w_i · (share + keep · q_i)`: class weights `w` (1
/// without), probability targets `q` (0 for a class target, whose own mass is written apart).
#[derive(Clone, Copy, Debug)]
pub(crate) struct ClassMasses<'t, 'w, E> {
    pub(crate) weights: Option<&'w [f64]>,
    pub(crate) probabilities: Option<&'t [E]>,
    pub(crate) share: f64,
    pub(crate) keep: f64,
}

impl<'t, 'w, E: Element> ClassMasses<'t, 'w, E> {
    /// Mass 1 on every class: the passes of rows without per-class masses, whose `b` holds
    /// the one mass they share.
    pub(crate) const UNIT: Self = Self {
        weights: None,
        probabilities: None,
        share: 1.0,
        keep: 0.0,
    };

    /// The masses of the classes from `offset` on.
    pub(crate) fn from(&self, offset: usize) -> Self {
        Self {
            weights: self.weights.map(|w| &w[offset..]),
            probabilities: self.probabilities.map(|q| &q[offset..]),
            ..*self
        }
    }
}

#[cfg(test)]
mod tests {
    //! [`RowPlan::of`] against the CE columns of docs/contract.md, row by row, under both
    //! policies: the expectations are the document's, not the table's code.

    use super::*;
    use crate::kernels::scalar::scan_row;

    /// A row with nothing to report: finite logits, finite targets.
    const FINITE: RowFacts = RowFacts {
        bad_target: None,
        non_finite: None,
        masked_target: None,
        fully_masked: false,
        propagate: false,
    };

    /// The plan of `facts` under `NonFinite::Error` and under `NonFinite::Propagate`.
    fn plans(facts: RowFacts) -> [Result<RowPlan, RowFault>; 2] {
        [false, true].map(|propagate| RowPlan::of(RowFacts { propagate, ..facts }))
    }

    #[test]
    fn finite_rows_have_a_loss() {
        // "all finite" and "some −inf, rest finite" (a finite target logit): a loss.
        assert_eq!(plans(FINITE), [Ok(RowPlan::Loss); 2]);
    }

    #[test]
    fn target_mass_on_minus_infinity_is_masked_target_or_infinite() {
        // "all −inf": `MaskedTarget` under Error, +inf under Propagate; so is any target mass on
        // a −inf logit of a row that is not fully masked.
        for fully_masked in [false, true] {
            let facts = RowFacts {
                masked_target: Some(3),
                fully_masked,
                ..FINITE
            };
            assert_eq!(
                plans(facts),
                [
                    Err(RowFault::MaskedTarget { class: 3 }),
                    Ok(RowPlan::InfiniteLoss)
                ]
            );
        }
    }

    #[test]
    fn a_fully_masked_row_without_target_mass_is_zero() {
        // "all −inf" where the target holds no mass (zero weight, ε = 1): loss 0, gradient 0.
        let facts = RowFacts {
            fully_masked: true,
            ..FINITE
        };
        assert_eq!(plans(facts), [Ok(RowPlan::Masked); 2]);
    }

    #[test]
    fn nan_and_plus_infinity_are_an_error_or_a_nan_row() {
        // "NaN anywhere" and "+inf anywhere": an error naming the column and value, or a NaN
        // row; before anything the row's −inf logits would say.
        for value in [f64::NAN, f64::INFINITY] {
            for (masked_target, fully_masked) in [(None, false), (Some(0), false), (Some(0), true)]
            {
                let facts = RowFacts {
                    non_finite: Some((7, value)),
                    masked_target,
                    fully_masked,
                    ..FINITE
                };
                let [error, propagated] = plans(facts);
                match error {
                    Err(RowFault::NonFinite {
                        column: 7,
                        value: v,
                    }) => {
                        assert_eq!(v.to_bits(), value.to_bits());
                    }
                    other => panic!("{value}: {other:?}"),
                }
                assert_eq!(propagated, Ok(RowPlan::Nan));
            }
        }
    }

    #[test]
    fn bad_targets_are_errors_whatever_the_logits_hold() {
        // A non-finite probability target, or a split row's target that no shard held: an error
        // under either policy (the policy is about logits), before any logit fault.
        let faults = [
            RowFault::BadProbability {
                column: 2,
                value: f64::INFINITY,
            },
            RowFault::UncoveredTarget { class: 5 },
        ];
        for fault in faults {
            for non_finite in [None, Some((0, f64::NAN))] {
                let facts = RowFacts {
                    bad_target: Some(fault),
                    non_finite,
                    masked_target: Some(1),
                    ..FINITE
                };
                assert_eq!(plans(facts), [Err(fault); 2]);
            }
        }
    }

    #[test]
    fn faults_name_their_row() {
        let cases = [
            (
                RowFault::NonFinite {
                    column: 4,
                    value: f64::INFINITY,
                },
                LseError::NonFinite {
                    what: "logit",
                    row: 9,
                    column: 4,
                    value: f64::INFINITY,
                },
            ),
            (
                RowFault::MaskedTarget { class: 2 },
                LseError::MaskedTarget { row: 9, class: 2 },
            ),
            (
                RowFault::BadProbability {
                    column: 1,
                    value: -f64::INFINITY,
                },
                LseError::BadProbability {
                    row: 9,
                    column: 1,
                    value: -f64::INFINITY,
                },
            ),
            (
                RowFault::UncoveredTarget { class: 6 },
                LseError::UncoveredTarget { row: 9, class: 6 },
            ),
        ];
        for (fault, error) in cases {
            assert_eq!(fault.in_row(9), error);
        }
    }

    /// The facts of whole rows, as [`CeRow::new`] gathers them from a row and its targets.
    #[test]
    fn whole_rows_are_planned_by_the_table() {
        let inf = f64::INFINITY;
        let config = |propagate| CeConfig {
            weights: None,
            weight_total: 3.0,
            weight_max: 1.0,
            smoothing: 0.0,
            z_loss: 0.0,
            map: LogitMap::Identity,
            propagate_non_finite: propagate,
        };
        let plan = |row: [f64; 3], target: RowTarget<'_, f64>, propagate| {
            CeRow::new(
                &row,
                &scan_row(&row, LogitMap::Identity),
                target,
                config(propagate),
            )
            .map(|r| r.plan)
        };
        let class = RowTarget::Class;
        // The first NaN or +inf, in column order.
        assert_eq!(
            plan([1.0, inf, f64::NAN], class(0), false),
            Err(RowFault::NonFinite {
                column: 1,
                value: inf
            })
        );
        assert_eq!(plan([1.0, inf, f64::NAN], class(0), true), Ok(RowPlan::Nan));
        assert_eq!(plan([1.0, -inf, 2.0], class(0), false), Ok(RowPlan::Loss));
        assert_eq!(
            plan([1.0, -inf, 2.0], class(1), false),
            Err(RowFault::MaskedTarget { class: 1 })
        );
        assert_eq!(plan([-inf; 3], class(2), true), Ok(RowPlan::InfiniteLoss));
        // Probability targets: the first non-finite one, whatever the logits hold; the first
        // class with mass on a −inf logit; no mass there is no fault.
        let q = [0.5, inf, f64::NAN];
        assert_eq!(
            plan([f64::NAN, 0.0, 0.0], RowTarget::Probabilities(&q), true),
            Err(RowFault::BadProbability {
                column: 1,
                value: inf
            })
        );
        let q = [0.0, 0.25, 0.75];
        let plan_q = |row| plan(row, RowTarget::Probabilities(&q), false);
        assert_eq!(plan_q([-inf, 0.0, 1.0]), Ok(RowPlan::Loss));
        assert_eq!(
            plan_q([0.0, -inf, -inf]),
            Err(RowFault::MaskedTarget { class: 1 })
        );
        let q = [0.0; 3];
        assert_eq!(
            plan([-inf; 3], RowTarget::Probabilities(&q), false),
            Ok(RowPlan::Masked)
        );
    }
}
