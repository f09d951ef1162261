//! The scalar reference kernels.

use super::simd::math::softcap;
use crate::element::Element;
use crate::state::{exact_difference, exp_difference, saturate, CompensatedSum, RowState};

/// A map applied to every logit before normalisation.
#[derive(Clone, Copy, Debug, PartialEq)]
pub(crate) enum LogitMap {
    /// Logits as given.
    Identity,
    /// `cap · tanh(x / cap)` (Gemma-style soft-capping). `-inf` stays `-inf`, so masks survive.
    Softcap(f64),
}

impl LogitMap {
    #[inline]
    pub(crate) fn apply(self, x: f64) -> f64 {
        self.with_slope(x).0
    }

    /// `d apply(x) / dx`: `1 − tanh²(x / cap)`.
    #[inline]
    pub(crate) fn slope(self, x: f64) -> f64 {
        self.with_slope(x).1
    }

    /// The mapped logit and the map's slope there: [`softcap`] with `f64` as a one-lane
    /// vector, the function the vector kernels run in `f64` lanes, so that both map a logit to
    /// the same bits (a row's mapped max, found by one, is then exactly the mapped logit the
    /// other compares with).
    #[inline]
    pub(crate) fn with_slope(self, x: f64) -> (f64, f64) {
        match self {
            LogitMap::Identity => (x, 1.0),
            LogitMap::Softcap(cap) => softcap(x, cap, 2.0 / cap),
        }
    }
}

/// What the read pass learns about one row (or a run of whole blocks of it).
#[derive(Clone, Copy, Debug)]
pub(crate) struct RowScan {
    /// Max and sum-excluding-max of the mapped finite elements.
    pub(crate) state: RowState,
    /// First column holding NaN or `+inf`, if any.
    pub(crate) first_non_finite: Option<usize>,
    /// Number of `-inf` elements (masked classes).
    pub(crate) masked: usize,
    /// Smallest finite raw element (`+inf` when there is none).
    pub(crate) finite_min: f64,
    /// Largest finite raw element (`-inf` when there is none).
    pub(crate) finite_max: f64,
    /// NaN elements.
    pub(crate) nan: usize,
    /// `+inf` elements.
    pub(crate) pos_inf: usize,
}

impl RowScan {
    /// The scan of nothing.
    pub(crate) const EMPTY: Self = Self {
        state: RowState::EMPTY,
        first_non_finite: None,
        masked: 0,
        finite_min: f64::INFINITY,
        finite_max: f64::NEG_INFINITY,
        nan: 0,
        pos_inf: 0,
    };

    /// Appends the scan of the next part of the row, which starts at column `offset`.
    #[must_use]
    pub(crate) fn then(self, next: RowScan, offset: usize) -> RowScan {
        RowScan {
            state: self.state.merge(next.state),
            first_non_finite: self
                .first_non_finite
                .or(next.first_non_finite.map(|c| c + offset)),
            masked: self.masked + next.masked,
            finite_min: self.finite_min.min(next.finite_min),
            finite_max: self.finite_max.max(next.finite_max),
            nan: self.nan + next.nan,
            pos_inf: self.pos_inf + next.pos_inf,
        }
    }
}

/// The online read pass: one sweep over the row, with `map` applied to the finite elements
/// (the extremes and counts are of the raw elements).
#[inline]
pub(crate) fn scan_row<E: Element>(row: &[E], map: LogitMap) -> RowScan {
    let mut scan = RowScan::EMPTY;
    for (column, &x) in row.iter().enumerate() {
        let x = x.to_f64();
        if x == f64::NEG_INFINITY {
            scan.masked += 1;
        } else if x < f64::INFINITY {
            // Plain compare-and-select: `x` is finite, f64::min's NaN handling only costs time.
            scan.finite_min = if x < scan.finite_min {
                x
            } else {
                scan.finite_min
            };
            scan.finite_max = if x > scan.finite_max {
                x
            } else {
                scan.finite_max
            };
            scan.state.push(map.apply(x));
        } else {
            // `x < inf` is false for NaN and +inf alike.
            if x.is_nan() {
                scan.nan += 1;
            } else {
                scan.pos_inf += 1;
            }
            scan.first_non_finite.get_or_insert(column);
        }
    }
    scan
}

/// `x − m − log1p(s')` without cancellation; a finite result below `−f64::MAX` saturates.
#[inline]
pub(crate) fn log_prob(x: f64, max: f64, log1p_sum: f64) -> f64 {
    if x == f64::NEG_INFINITY {
        return f64::NEG_INFINITY;
    }
    let (hi, lo) = exact_difference(x, max);
    saturate(hi + (lo - log1p_sum))
}

/// Softmax write pass. A fully masked row gives all zeros.
pub(crate) fn softmax_row<E: Element>(row: &[E], state: &RowState, out: &mut [E]) {
    let (max, denominator) = (state.max(), state.denominator());
    if state.is_fully_masked() {
        out.fill(E::zero());
        return;
    }
    for (o, &x) in out.iter_mut().zip(row) {
        *o = E::from_f64(exp_difference(x.to_f64(), max) / denominator);
    }
}

/// Log-softmax write pass. A fully masked row gives all `-inf`.
pub(crate) fn log_softmax_row<E: Element>(row: &[E], state: &RowState, out: &mut [E]) {
    let (max, log1p_sum) = (state.max(), state.log1p_sum());
    for (o, &x) in out.iter_mut().zip(row) {
        *o = E::from_f64_saturating(log_prob(x.to_f64(), max, log1p_sum));
    }
}

/// `Σ_j y_j dy_j` (`weighted`: softmax backward) or `Σ_j dy_j` (log-softmax backward), as a
/// compensated sum.
pub(crate) fn backward_dot<E: Element>(y: &[E], dy: &[E], weighted: bool) -> f64 {
    let mut dot = CompensatedSum::ZERO;
    for (&yj, &dyj) in y.iter().zip(dy) {
        dot.add(if weighted {
            yj.to_f64() * dyj.to_f64()
        } else {
            dyj.to_f64()
        });
    }
    dot.value()
}

/// `dx_i = y_i · (dy_i − dot)` for `y = softmax(x)`, `dot = Σ_j y_j dy_j`.
pub(crate) fn softmax_backward_row<E: Element>(y: &[E], dy: &[E], dot: f64, dx: &mut [E]) {
    for ((o, &yi), &dyi) in dx.iter_mut().zip(y).zip(dy) {
        *o = E::from_f64(yi.to_f64() * (dyi.to_f64() - dot));
    }
}

/// `dx_i = dy_i − exp(y_i) · total` for `y = log_softmax(x)`, `total = Σ_j dy_j`.
pub(crate) fn log_softmax_backward_row<E: Element>(y: &[E], dy: &[E], total: f64, dx: &mut [E]) {
    for ((o, &yi), &dyi) in dx.iter_mut().zip(y).zip(dy) {
        *o = E::from_f64(dyi.to_f64() - yi.to_f64().exp() * total);
    }
}

/// Adds `mass · (max − mapped)` to `sum`, exactly split; nothing for zero mass or a masked class.
#[inline]
pub(crate) fn add_distance(sum: &mut CompensatedSum, mass: f64, max: f64, mapped: f64) {
    if mass != 0.0 && mapped > f64::NEG_INFINITY {
        let (hi, lo) = exact_difference(max, mapped);
        sum.add(saturate(mass * hi));
        sum.add(mass * lo);
    }
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

/// Why a cross-entropy row cannot be computed (the caller adds the row index).
#[derive(Clone, Copy, Debug, PartialEq)]
pub(crate) enum RowFault {
    NonFinite { column: usize, value: f64 },
    MaskedTarget { class: usize },
    BadProbability { column: usize, value: f64 },
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
    /// The row's logits hold NaN or `+inf` and the policy propagates: every output is NaN.
    poisoned: bool,
    /// Target mass on a masked class under the propagate policy: the loss is `+inf`.
    infinite_loss: bool,
}

impl<'t, 'w, E: Element> CeRow<'t, 'w, E> {
    /// Completes the read pass over `row` (its `scan`, from either kernel) with its targets.
    pub(crate) fn new(
        row: &[E],
        scan: &RowScan,
        target: RowTarget<'t, E>,
        config: CeConfig<'w>,
    ) -> Result<Self, RowFault> {
        let mut plan = CeRow {
            config,
            target,
            max: scan.state.max(),
            denominator: scan.state.denominator(),
            log1p_sum: scan.state.log1p_sum(),
            lse: scan.state.logsumexp(),
            smoothing_share: 0.0,
            kept_mass: CompensatedSum::ZERO,
            probability_max: 1.0,
            live_weight: 0.0,
            rest: scan.state.sum_excluding_max(),
            target_distance: CompensatedSum::ZERO,
            poisoned: false,
            infinite_loss: false,
        };
        let live = row.len() - scan.masked;
        let keep = 1.0 - config.smoothing;
        if live > 0 {
            plan.smoothing_share = config.smoothing / live as f64;
        }
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
        let mut masked_mass_at = None;
        let kept_mass = match target {
            RowTarget::Class(y) => {
                let mapped = config.map.apply(row[y].to_f64());
                if mapped == f64::NEG_INFINITY && keep * weight(y) != 0.0 {
                    masked_mass_at = Some(y);
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
                            return Err(RowFault::BadProbability {
                                column: c,
                                value: qc,
                            });
                        }
                        let mass = weight(c) * qc;
                        if x.to_f64() == f64::NEG_INFINITY && keep * mass != 0.0 {
                            masked_mass_at.get_or_insert(c);
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
        // Targets are checked first: a bad target is an error whatever the row's logits hold.
        if let Some(column) = scan.first_non_finite {
            if !config.propagate_non_finite {
                let value = row[column].to_f64();
                return Err(RowFault::NonFinite { column, value });
            }
            plan.poisoned = true;
            return Ok(plan);
        }
        if let Some(class) = masked_mass_at {
            if !config.propagate_non_finite {
                return Err(RowFault::MaskedTarget { class });
            }
            plan.infinite_loss = true;
        }
        Ok(plan)
    }

    /// The plan of a class-target row whose read pass ran elsewhere, in pieces (the shards of a
    /// split vocabulary), from what the merged pieces know: the row's `state`, the target's
    /// column in this piece (`None` when another piece holds it) and weight, and the live
    /// (finite-logit) class count and weight of the whole row. `config.weights` are this
    /// piece's; the gradient of its columns is then [`Self::write_gradient`]'s.
    #[allow(clippy::too_many_arguments)]
    pub(crate) fn from_merged(
        config: CeConfig<'w>,
        state: RowState,
        target: Option<usize>,
        target_weight: f64,
        live: u64,
        live_weight: f64,
        poisoned: bool,
        infinite_loss: bool,
    ) -> Self {
        let mut kept_mass = CompensatedSum::ZERO;
        kept_mass.add(target_weight);
        CeRow {
            config,
            // No column of this piece equals usize::MAX: every class is "another class".
            target: RowTarget::Class(target.unwrap_or(usize::MAX)),
            max: state.max(),
            denominator: state.denominator(),
            log1p_sum: state.log1p_sum(),
            lse: state.logsumexp(),
            smoothing_share: if live > 0 {
                config.smoothing / live as f64
            } else {
                0.0
            },
            kept_mass,
            probability_max: 1.0,
            live_weight,
            rest: state.sum_excluding_max(),
            target_distance: CompensatedSum::ZERO,
            poisoned,
            infinite_loss,
        }
    }

    /// `ε / K`, the smoothing mass of each live class.
    pub(crate) fn smoothing_share(&self) -> f64 {
        self.smoothing_share
    }

    /// Calls `write(c, dloss/dx_c · scale)` for every class of `logits` (NaN for a poisoned
    /// row): the gradient half of [`Self::finish`]. `logits` yields the row's raw logits in
    /// order (read once, so the gradient may be written over them).
    pub(crate) fn write_gradient(
        &self,
        logits: impl Iterator<Item = E>,
        scale: GradScale,
        mut write: impl FnMut(usize, E),
    ) {
        let dtype_max = E::MAX.to_f64();
        for (c, x) in logits.enumerate() {
            let g = if self.poisoned {
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

    /// `∂(scale · loss)/∂x_c` for class `c` with raw logit `raw` (row not poisoned).
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

    /// The row loss from `distance = Σ_c a_c (m − x_c)`.
    pub(crate) fn loss(&self, distance: f64) -> f64 {
        if self.infinite_loss {
            f64::INFINITY
        } else if self.denominator == 0.0 {
            0.0
        } else {
            let z_term = saturate(self.config.z_loss * saturate(self.lse * self.lse));
            saturate(distance + self.target_total() * self.log1p_sum + z_term)
        }
    }

    /// The row's maximum (of the mapped logits).
    pub(crate) fn max(&self) -> f64 {
        self.max
    }

    /// True when the vectorised passes serve this row: nothing non-finite, not fully masked.
    fn vector_eligible(&self) -> bool {
        !self.poisoned && !self.infinite_loss && self.denominator != 0.0
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
        // (Written so that NaN also fails.)
        let bounded = reduction * (per_probability.abs() + largest_mass) <= 0.5 * dtype_max;
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
        RowValues {
            loss: self.loss(distance.value()),
            lse: self.lse,
        }
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
        if self.poisoned {
            if want_grad {
                logits
                    .enumerate()
                    .for_each(|(c, _)| write(c, E::from_f64(f64::NAN)));
            }
            return RowValues {
                loss: f64::NAN,
                lse: f64::NAN,
            };
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
        RowValues {
            loss: self.loss(distance.value()),
            lse: self.lse,
        }
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
pub(crate) mod tests {
    use super::*;

    /// Logits over every scale, both signs, and the edges of the map.
    pub(crate) fn logits() -> Vec<f64> {
        let mut state = 0x9e37_79b9_7f4a_7c15_u64;
        let mut out = vec![
            0.0,
            -0.0,
            1e-300,
            -5e-324,
            f64::MAX,
            -f64::MAX,
            f64::INFINITY,
        ];
        for _ in 0..20_000 {
            state = state
                .wrapping_mul(6_364_136_223_846_793_005)
                .wrapping_add(1);
            let mantissa = (state >> 11) as f64 / (1u64 << 53) as f64;
            let exponent = ((state >> 3) % 80) as i32 - 40;
            let sign = if state & 1 == 0 { 1.0 } else { -1.0 };
            out.push(sign * mantissa * 2f64.powi(exponent));
        }
        out
    }

    /// Against libm's `tanh` and `cosh` (an independent reference): within a few ulp for the
    /// value, and for the slope within a few ulp plus what rounding `2|x|/cap` to `f64` costs
    /// `exp(−2|x|/cap)` (a relative error of about `2|x|/cap` ulp, in the reference too).
    #[test]
    fn softcap_is_accurate() {
        for cap in [1.0, 30.0] {
            for x in logits() {
                let (y, slope) = LogitMap::Softcap(cap).with_slope(x);
                let exact = cap * (x / cap).tanh();
                assert!(
                    (y - exact).abs() <= 4.0 * f64::EPSILON * exact.abs().max(f64::MIN_POSITIVE),
                    "cap {cap}, x {x:e}: {y:e} vs tanh {exact:e}"
                );
                let c = (x / cap).cosh();
                let exact_slope = 1.0 / (c * c);
                let conditioning = 8.0 + 4.0 * (x / cap).abs();
                assert!(
                    (slope - exact_slope).abs() <= conditioning * f64::EPSILON * exact_slope
                        || exact_slope < 1e-300,
                    "cap {cap}, x {x:e}: slope {slope:e} vs {exact_slope:e}"
                );
            }
        }
    }
}
