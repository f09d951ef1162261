//! The online row state `(m, s')` of docs/numerics.md and its associative merge: the algebra every
//! kernel, thread split and vocabulary shard shares.
//!
//! For a row `x` with maximum `m` (attained at some index `k`), the state keeps
//! `s' = Σ_{i≠k} exp(x_i − m)`. Every term is at most 1, so nothing overflows, and
//! `logsumexp = m + log1p(s')` keeps its accuracy when `s'` is tiny (a confident row).

/// Error-free sum: `a + b == hi + lo` exactly (Knuth's TwoSum).
#[inline]
pub(crate) fn two_sum(a: f64, b: f64) -> (f64, f64) {
    let hi = a + b;
    let b_virtual = hi - a;
    let lo = (a - (hi - b_virtual)) + (b - b_virtual);
    (hi, lo)
}

/// `a − b` as an unevaluated sum `hi + lo`, exact unless the difference overflows, in which case
/// `hi` is `±inf` and `lo` is 0. Both operands must be finite.
///
/// TwoSum's own intermediate `hi − a` can overflow while `hi` is finite (`3e307 − f64::MAX`:
/// `hi = −1.5e308`, `hi − a` rounds past `−MAX`), which makes `lo` NaN. There `|hi| > MAX/2`, so
/// `hi` alone is the correctly rounded difference and `exp(hi)` is 0: `lo` is dropped.
#[inline]
pub(crate) fn exact_difference(a: f64, b: f64) -> (f64, f64) {
    let (hi, lo) = two_sum(a, -b);
    if hi.is_finite() && lo.is_finite() {
        (hi, lo)
    } else {
        (hi, 0.0)
    }
}

/// `exp(a − b)` for finite `b` and `a ≤ b` (or `a = −inf`), with the rounding error of the
/// subtraction folded back in: `exp(hi + lo) ≈ exp(hi)·(1 + lo)`.
///
/// The correction matters for `f64` input, where `a − b` may round; for narrower types widened to
/// `f64` the difference is exact and `lo` is 0.
#[inline]
pub(crate) fn exp_difference(a: f64, b: f64) -> f64 {
    if a == f64::NEG_INFINITY {
        return 0.0;
    }
    let (hi, lo) = exact_difference(a, b);
    let e = hi.exp();
    e + e * lo
}

/// Clamp to the finite range, leaving NaN alone: for intermediate results whose exact value is
/// finite but may overflow `f64` (z-loss of an `f64` logit near `f64::MAX`).
#[inline]
pub(crate) fn saturate(v: f64) -> f64 {
    v.clamp(-f64::MAX, f64::MAX)
}

/// A Neumaier-compensated running sum: the error stays at a few ulps of the result for any
/// number of terms, instead of growing with the count.
#[derive(Clone, Copy, Debug, Default, PartialEq)]
pub struct CompensatedSum {
    sum: f64,
    carry: f64,
}

impl CompensatedSum {
    /// The empty sum.
    pub const ZERO: Self = Self {
        sum: 0.0,
        carry: 0.0,
    };

    /// Adds one term.
    #[inline]
    pub fn add(&mut self, term: f64) {
        let (hi, lo) = two_sum(self.sum, term);
        self.sum = hi;
        if hi.is_finite() {
            // On overflow TwoSum's error term is NaN; the sum is ±inf either way.
            self.carry += lo;
        }
    }

    /// Adds another compensated sum.
    #[inline]
    pub fn add_sum(&mut self, other: CompensatedSum) {
        self.add(other.sum);
        self.carry += other.carry;
    }

    /// The sum, rounded once.
    #[inline]
    pub fn value(self) -> f64 {
        self.sum + self.carry
    }

    /// The rounded sum and the error it carries, for a copy that travels (vocabulary shards).
    #[inline]
    pub(crate) fn parts(self) -> (f64, f64) {
        (self.sum, self.carry)
    }

    /// The sum [`Self::parts`] returned.
    #[inline]
    pub(crate) fn from_parts(sum: f64, carry: f64) -> Self {
        Self { sum, carry }
    }

    /// `self · factor` (factor finite and ≥ 0), keeping the product's rounding error.
    #[inline]
    pub(crate) fn scaled(self, factor: f64) -> Self {
        let sum = self.sum * factor;
        let product_error = self.sum.mul_add(factor, -sum);
        Self {
            sum,
            carry: self.carry.mul_add(factor, product_error),
        }
    }
}

/// The online state of one row: its maximum `m` and `s' = Σ_{i≠k} exp(x_i − m)`.
///
/// Fold elements in any order with [`RowState::push`], combine partial states of the same row
/// (SIMD lanes, chunks on different threads, vocabulary shards on different ranks) with
/// [`RowState::merge`]; the merge is associative and [`RowState::EMPTY`] is its identity.
/// `-inf` elements (masks) are ignored; a row of only `-inf` stays at `m = −inf`, and no
/// `−inf − (−inf)` is ever computed. NaN and `+inf` must be filtered out by the caller.
///
/// ```
/// use lse::RowState;
/// let row = [1000.0, 1.0, -1000.0];
/// let mut left = RowState::EMPTY;
/// left.push(row[0]);
/// let mut right = RowState::EMPTY;
/// right.push(row[1]);
/// right.push(row[2]);
/// let lse = left.merge(right).logsumexp();
/// assert_eq!(lse, 1000.0); // naive ln(Σ exp) overflows to inf here
/// ```
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct RowState {
    max: f64,
    rest: CompensatedSum,
}

impl Default for RowState {
    fn default() -> Self {
        Self::EMPTY
    }
}

impl RowState {
    /// The state of an empty (or fully masked) row: `m = −inf`, `s' = 0`.
    pub const EMPTY: Self = Self {
        max: f64::NEG_INFINITY,
        rest: CompensatedSum::ZERO,
    };

    /// A state from its parts: `max` (finite) and `rest = s'`.
    #[inline]
    pub(crate) fn from_parts(max: f64, rest: CompensatedSum) -> Self {
        Self { max, rest }
    }

    /// The maximum and `s'` as the rounded sum and its carried error: the state as plain numbers
    /// (for a vocabulary shard's partial, which must cross process boundaries).
    #[inline]
    pub(crate) fn raw_parts(&self) -> (f64, f64, f64) {
        let (sum, carry) = self.rest.parts();
        (self.max, sum, carry)
    }

    /// The state [`Self::raw_parts`] returned.
    #[inline]
    pub(crate) fn from_raw_parts(max: f64, sum: f64, carry: f64) -> Self {
        Self::from_parts(max, CompensatedSum::from_parts(sum, carry))
    }

    /// Folds one element. `x` must not be NaN or `+inf`; `-inf` is ignored.
    #[inline]
    pub fn push(&mut self, x: f64) {
        debug_assert!(!x.is_nan() && x != f64::INFINITY);
        if x > self.max {
            if self.max > f64::NEG_INFINITY {
                // The old maximum becomes an ordinary term: s' ← (s' + 1)·exp(m − x).
                self.rest = self.total().scaled(exp_difference(self.max, x));
            }
            self.max = x;
        } else if x > f64::NEG_INFINITY {
            self.rest.add(exp_difference(x, self.max));
        }
    }

    /// Combines the states of two disjoint parts of the same row.
    #[inline]
    #[must_use]
    pub fn merge(self, other: RowState) -> RowState {
        let (mut high, low) = if other.max > self.max {
            (other, self)
        } else {
            (self, other)
        };
        if low.max > f64::NEG_INFINITY {
            // Ties land here too: exp(0) = 1 makes the other part's maximum an ordinary term.
            high.rest
                .add_sum(low.total().scaled(exp_difference(low.max, high.max)));
        }
        high
    }

    /// `1 + s'` as a compensated sum.
    #[inline]
    fn total(self) -> CompensatedSum {
        let mut total = self.rest;
        total.add(1.0);
        total
    }

    /// The row maximum `m` (`−inf` for an empty or fully masked row).
    #[inline]
    pub fn max(&self) -> f64 {
        self.max
    }

    /// `s' = Σ_{i≠k} exp(x_i − m)`.
    #[inline]
    pub fn sum_excluding_max(&self) -> f64 {
        self.rest.value()
    }

    /// `Σ_i exp(x_i − m) = 1 + s'`, the softmax denominator (0 for a fully masked row).
    #[inline]
    pub fn denominator(&self) -> f64 {
        if self.is_fully_masked() {
            0.0
        } else {
            self.total().value()
        }
    }

    /// `log1p(s')`: what the row's log-normaliser adds on top of `m`.
    #[inline]
    pub fn log1p_sum(&self) -> f64 {
        let CompensatedSum { sum, carry } = self.rest;
        // log1p(sum + carry) ≈ log1p(sum) + carry / (1 + sum).
        sum.ln_1p() + carry / (1.0 + sum)
    }

    /// `logsumexp = m + log1p(s')`; `−inf` for an empty or fully masked row.
    #[inline]
    pub fn logsumexp(&self) -> f64 {
        if self.is_fully_masked() {
            f64::NEG_INFINITY
        } else {
            self.max + self.log1p_sum()
        }
    }

    /// True when no finite element has been pushed.
    #[inline]
    pub fn is_fully_masked(&self) -> bool {
        self.max == f64::NEG_INFINITY
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn state_of(xs: &[f64]) -> RowState {
        let mut s = RowState::EMPTY;
        xs.iter().for_each(|&x| s.push(x));
        s
    }

    #[test]
    fn merge_matches_sequential_fold_for_every_split() {
        let xs = [3.0, -1.0, 7.5, 7.5, -30.0, f64::NEG_INFINITY, 2.0, 0.25];
        let whole = state_of(&xs);
        for split in 0..=xs.len() {
            let (a, b) = xs.split_at(split);
            let merged = state_of(a).merge(state_of(b));
            assert_eq!(merged.max(), whole.max());
            let rel = (merged.sum_excluding_max() - whole.sum_excluding_max()).abs()
                / whole.sum_excluding_max();
            assert!(rel < 4.0 * f64::EPSILON, "split {split}: {rel}");
        }
        // The empty state is the identity on both sides.
        assert_eq!(RowState::EMPTY.merge(whole), whole);
        assert_eq!(whole.merge(RowState::EMPTY), whole);
    }

    #[test]
    fn fully_masked_row_stays_empty() {
        let s = state_of(&[f64::NEG_INFINITY; 4]);
        assert!(s.is_fully_masked());
        assert_eq!(s.logsumexp(), f64::NEG_INFINITY);
        assert_eq!(s.denominator(), 0.0);
        assert!(!s.sum_excluding_max().is_nan());
    }

    #[test]
    fn difference_near_minus_max_has_no_nan_error_term() {
        // 3e307 − MAX = −1.4977e308 is finite, but TwoSum's `hi − a` overflows.
        let (hi, lo) = exact_difference(3e307, f64::MAX);
        assert_eq!(hi, 3e307 - f64::MAX);
        assert!(hi.is_finite() && lo == 0.0, "{hi} {lo}");
        assert_eq!(exp_difference(3e307, f64::MAX), 0.0);
        // Where the difference is representable with an error term, it is still kept exactly.
        let (hi, lo) = exact_difference(1.0, 1e-17);
        assert_eq!((hi, lo), (1.0, -1e-17));
    }

    #[test]
    fn tiny_tail_survives_through_log1p() {
        // lse([30, 0]) − 30 = log1p(e^-30) ≈ 9.3576e-14; log(1 + s') would lose most digits.
        let s = state_of(&[30.0, 0.0]);
        let expected = (-30f64).exp().ln_1p();
        assert!((s.log1p_sum() - expected).abs() <= expected * 1e-15);
    }

    #[test]
    fn exact_difference_recovers_the_rounding_error() {
        let (a, b) = (1.0 + f64::EPSILON, -1e-17);
        let (hi, lo) = exact_difference(a, b);
        assert_eq!(hi, 1.0 + f64::EPSILON);
        assert_eq!(lo, 1e-17);
        assert_eq!(
            exact_difference(-f64::MAX, f64::MAX),
            (f64::NEG_INFINITY, 0.0)
        );
    }
}
