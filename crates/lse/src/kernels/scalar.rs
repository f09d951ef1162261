//! The scalar reference kernels.

use super::simd::math::{scale_logits, softcap};
use crate::element::Element;
use crate::state::{exact_difference, exp_difference, saturate, CompensatedSum, RowState};

/// A map applied to every logit before normalisation.
#[derive(Clone, Copy, Debug, PartialEq)]
pub(crate) enum LogitMap {
    /// Logits as given.
    Identity,
    /// `scale · x` ([`scale_logits`]: rounded once, saturating; a temperature's `1/T`).
    Scaled(f64),
    /// `cap · tanh(y / cap)` of `y = scale · x` (Gemma-style soft-capping, after the scale).
    /// `-inf` stays `-inf`, so masks survive.
    Softcap { cap: f64, scale: f64 },
}

impl LogitMap {
    /// The map of the options `logit_scale` and `softcap`.
    pub(crate) fn of(scale: f64, softcap: Option<f64>) -> Self {
        match softcap {
            Some(cap) => LogitMap::Softcap { cap, scale },
            None if scale == 1.0 => LogitMap::Identity,
            None => LogitMap::Scaled(scale),
        }
    }

    #[inline]
    pub(crate) fn apply(self, x: f64) -> f64 {
        self.with_slope(x).0
    }

    /// The largest slope the map has anywhere: its scale (soft-capping's own slope is ≤ 1).
    pub(crate) fn max_slope(self) -> f64 {
        match self {
            LogitMap::Identity => 1.0,
            LogitMap::Scaled(scale) | LogitMap::Softcap { scale, .. } => scale,
        }
    }

    /// `d apply(x) / dx`: `scale`, times `1 − tanh²(y / cap)` when capped.
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
            // A masked logit has no slope (as a soft-capped one).
            LogitMap::Scaled(_) if x == f64::NEG_INFINITY => (x, 0.0),
            LogitMap::Scaled(scale) => (scale_logits(x, scale), scale),
            LogitMap::Softcap { cap, scale } => {
                let (y, slope) = softcap(scale_logits(x, scale), cap, 2.0 / cap);
                (y, slope * scale)
            }
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
                let (y, slope) = LogitMap::of(1.0, Some(cap)).with_slope(x);
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
