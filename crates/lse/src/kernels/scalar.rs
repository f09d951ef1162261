//! The scalar reference kernels.

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
        match self {
            LogitMap::Softcap(cap) if x > f64::NEG_INFINITY => cap * (x / cap).tanh(),
            _ => x,
        }
    }

    /// `d apply(x) / dx`: `1 − tanh²(x / cap) = 1 / cosh²(x / cap)`, written without the
    /// cancellation of `1 − t²` when `t` is near 1.
    #[inline]
    pub(crate) fn slope(self, x: f64) -> f64 {
        match self {
            LogitMap::Identity => 1.0,
            LogitMap::Softcap(cap) => {
                let c = (x / cap).cosh();
                1.0 / (c * c)
            }
        }
    }
}

/// What the read pass learns about one row.
#[derive(Clone, Copy, Debug)]
pub(crate) struct RowScan {
    /// Max and sum-excluding-max of the mapped finite elements.
    pub(crate) state: RowState,
    /// First column holding NaN or `+inf`, if any.
    pub(crate) first_non_finite: Option<usize>,
    /// Number of `-inf` elements (masked classes).
    pub(crate) masked: usize,
}

/// Sees every raw element of a row during the read pass (statistics for the logit monitor),
/// told by the pass which kind each is, so it adds no classification of its own.
/// `()` observes nothing and compiles away.
pub(crate) trait RowObserver {
    /// A finite element.
    fn finite(&mut self, x: f64);
    /// A `-inf` element.
    fn masked(&mut self);
    /// A NaN or `+inf` element.
    fn non_finite(&mut self, x: f64);
}

impl RowObserver for () {
    #[inline(always)]
    fn finite(&mut self, _: f64) {}
    #[inline(always)]
    fn masked(&mut self) {}
    #[inline(always)]
    fn non_finite(&mut self, _: f64) {}
}

/// The online read pass: one sweep over the row.
#[inline]
pub(crate) fn scan_row<E: Element>(row: &[E], map: LogitMap) -> RowScan {
    scan_row_observed(row, map, &mut ())
}

/// [`scan_row`], showing every raw element to `observer` in the same sweep.
#[inline]
pub(crate) fn scan_row_observed<E: Element, O: RowObserver>(
    row: &[E],
    map: LogitMap,
    observer: &mut O,
) -> RowScan {
    let mut state = RowState::EMPTY;
    let mut first_non_finite = None;
    let mut masked = 0;
    for (column, &x) in row.iter().enumerate() {
        let x = x.to_f64();
        if x == f64::NEG_INFINITY {
            masked += 1;
            observer.masked();
        } else if x < f64::INFINITY {
            observer.finite(x);
            state.push(map.apply(x));
        } else {
            // `x < inf` is false for NaN and +inf alike.
            observer.non_finite(x);
            first_non_finite.get_or_insert(column);
        }
    }
    RowScan {
        state,
        first_non_finite,
        masked,
    }
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

/// `dx_i = y_i · (dy_i − Σ_j y_j dy_j)` for `y = softmax(x)`.
pub(crate) fn softmax_backward_row<E: Element>(y: &[E], dy: &[E], dx: &mut [E]) {
    let mut dot = CompensatedSum::ZERO;
    for (&yj, &dyj) in y.iter().zip(dy) {
        dot.add(yj.to_f64() * dyj.to_f64());
    }
    let dot = dot.value();
    for ((o, &yi), &dyi) in dx.iter_mut().zip(y).zip(dy) {
        *o = E::from_f64(yi.to_f64() * (dyi.to_f64() - dot));
    }
}

/// `dx_i = dy_i − exp(y_i) · Σ_j dy_j` for `y = log_softmax(x)`.
pub(crate) fn log_softmax_backward_row<E: Element>(y: &[E], dy: &[E], dx: &mut [E]) {
    let mut total = CompensatedSum::ZERO;
    dy.iter().for_each(|&d| total.add(d.to_f64()));
    let total = total.value();
    for ((o, &yi), &dyi) in dx.iter_mut().zip(y).zip(dy) {
        *o = E::from_f64(dyi.to_f64() - yi.to_f64().exp() * total);
    }
}

/// Adds `mass · (max − mapped)` to `sum`, exactly split; nothing for zero mass or a masked class.
#[inline]
fn add_distance(sum: &mut CompensatedSum, mass: f64, max: f64, mapped: f64) {
    if mass > 0.0 && mapped > f64::NEG_INFINITY {
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
    /// `Σ_c w_c q_c` before smoothing (`w_y` for a class target).
    kept_mass: f64,
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
    /// The read pass over `row` (and over its probability targets).
    pub(crate) fn new(
        row: &[E],
        target: RowTarget<'t, E>,
        config: CeConfig<'w>,
        observer: &mut impl RowObserver,
    ) -> Result<Self, RowFault> {
        let scan = scan_row_observed(row, config.map, observer);
        let mut plan = CeRow {
            config,
            target,
            max: scan.state.max(),
            denominator: scan.state.denominator(),
            log1p_sum: scan.state.log1p_sum(),
            lse: scan.state.logsumexp(),
            smoothing_share: 0.0,
            kept_mass: 0.0,
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
                if mapped == f64::NEG_INFINITY && keep * weight(y) > 0.0 {
                    masked_mass_at = Some(y);
                }
                let mut distance = CompensatedSum::ZERO;
                add_distance(&mut distance, keep * weight(y), plan.max, mapped);
                plan.target_distance = distance;
                weight(y)
            }
            RowTarget::Probabilities(q) => {
                let mut sum = CompensatedSum::ZERO;
                for (c, (&qc, &x)) in q.iter().zip(row).enumerate() {
                    let qc = qc.to_f64();
                    if !(qc.is_finite() && qc >= 0.0) {
                        return Err(RowFault::BadProbability {
                            column: c,
                            value: qc,
                        });
                    }
                    let mass = weight(c) * qc;
                    if x.to_f64() == f64::NEG_INFINITY && keep * mass > 0.0 {
                        masked_mass_at.get_or_insert(c);
                    }
                    sum.add(mass);
                }
                sum.value()
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
        (1.0 - self.config.smoothing) * self.kept_mass + self.smoothing_share * self.live_weight
    }

    /// `A − a_c`: the weighted target mass on every class but `c` (live `c`), formed as a sum of
    /// its parts rather than by subtracting `a_c` from `A`.
    #[inline]
    fn other_mass(&self, c: usize) -> f64 {
        let w = self.config.weights.map_or(1.0, |w| w[c]);
        let kept_elsewhere = match self.target {
            RowTarget::Class(y) if c == y => 0.0,
            RowTarget::Class(_) => self.kept_mass,
            RowTarget::Probabilities(q) => self.kept_mass - w * q[c].to_f64(),
        };
        (1.0 - self.config.smoothing) * kept_elsewhere
            + self.smoothing_share * (self.live_weight - w)
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
        let fully_masked = self.denominator == 0.0;
        let z_twice_lse = 2.0 * self.config.z_loss;
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
                let mapped = self.config.map.apply(raw);
                let mass = self.target_mass(c, mapped);
                if sweep_loss {
                    add_distance(&mut distance, mass, self.max, mapped);
                }
                if want_grad {
                    let g = if fully_masked || mapped == f64::NEG_INFINITY {
                        0.0
                    } else {
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
                        let z = saturate(z_twice_lse * (self.lse * (e / s)));
                        let of_loss = saturate(
                            scale.reduction * saturate(self.config.map.slope(raw) * (ce + z)),
                        );
                        scale.caller * of_loss.clamp(-dtype_max, dtype_max)
                    };
                    // No saturation here: only the caller's factor can overflow now.
                    write(c, E::from_f64(g));
                }
            }
        }
        let loss = if self.infinite_loss {
            f64::INFINITY
        } else if fully_masked {
            0.0
        } else {
            let z_term = saturate(self.config.z_loss * saturate(self.lse * self.lse));
            saturate(distance.value() + self.target_total() * self.log1p_sum + z_term)
        };
        RowValues {
            loss,
            lse: self.lse,
        }
    }
}
