//! An arbitrary-precision oracle for the softmax family, independent of the library's f64 code.
//!
//! Every quantity is computed with `astro-float` at [`PREC`] = 192 bits (about 1e-58 relative per
//! operation), from the exact input values widened to f64, so the reference is exact to far better
//! than the 1e-30 relative that an f64 ulp needs. The library's own formulas are *not* reused:
//! the row is reduced by its max (astro-float's exponent is finite, so `exp(1e30)` would be
//! Inf), and the quantities that would cancel are written as sums of non-negative terms.
//!
//! For a row `x` with max `m` at index `k`, `d_i = m − x_i ≥ 0` and `e_i = exp(−d_i) ≤ 1`:
//! `s' = Σ_{i≠k} e_i`, `S = 1 + s'`, `L = log1p(s')`, and
//! `lse = m + L`, `log_softmax_i = −d_i − L`, `softmax_i = e_i / S`.
//!
//! The error helpers measure what docs/numerics.md asks: ulps of the output dtype at the exact value
//! (spacing of subnormals below the smallest normal), with an absolute error below the dtype's
//! smallest normal number counted as 0, and Higham's normwise measure for probability outputs.

use std::cell::RefCell;
use std::sync::OnceLock;

use astro_float::{BigFloat, Consts, RoundingMode, Sign};
use lse::DType;

/// Working precision in bits. 192 costs about the same as 128 in astro-float (both fit a few
/// words) and leaves room for the cancellations the oracle cannot write away (see `ExactRow::ce`).
pub const PREC: usize = 192;
const RM: RoundingMode = RoundingMode::ToEven;

/// Exponential terms `exp(−d)` with `d` above this are taken as 0: they are below
/// `e^-1e6`, far under every dtype's smallest subnormal (f64: `e^-745`) and under `2^-PREC` of
/// any sum they join (which is ≥ 1).
const EXP_CUTOFF: f64 = 1.0e6;

thread_local! {
    // astro-float caches constants (π, ln 2, e) per `Consts`; one per thread avoids locking.
    static CONSTS: RefCell<Consts> = RefCell::new(Consts::new().expect("astro-float constants"));
}

fn with_consts<T>(f: impl FnOnce(&mut Consts) -> T) -> T {
    CONSTS.with(|c| f(&mut c.borrow_mut()))
}

/// The exact value of `x` (every f64 is exact at [`PREC`] bits); `-inf` maps to `-inf`.
pub fn big(x: f64) -> BigFloat {
    BigFloat::from_f64(x, PREC)
}

/// `a + b` at [`PREC`] bits.
pub fn add(a: &BigFloat, b: &BigFloat) -> BigFloat {
    a.add(b, PREC, RM)
}
/// `a − b` at [`PREC`] bits.
pub fn sub(a: &BigFloat, b: &BigFloat) -> BigFloat {
    a.sub(b, PREC, RM)
}
/// `a · b` at [`PREC`] bits.
pub fn mul(a: &BigFloat, b: &BigFloat) -> BigFloat {
    a.mul(b, PREC, RM)
}
/// `a / b` at [`PREC`] bits.
pub fn div(a: &BigFloat, b: &BigFloat) -> BigFloat {
    a.div(b, PREC, RM)
}
fn zero() -> BigFloat {
    big(0.0)
}
fn one() -> BigFloat {
    big(1.0)
}

/// astro-float's own `exp` (about 14 µs at 192 bits): the reference for [`exp_neg`].
pub fn exp_reference(x: &BigFloat) -> BigFloat {
    with_consts(|cc| x.exp(PREC, RM, cc))
}

/// astro-float's own `ln`.
pub fn ln(x: &BigFloat) -> BigFloat {
    with_consts(|cc| x.ln(PREC, RM, cc))
}

/// `x` rounded to the nearest f64 (for display and for choosing reduction steps; errors are
/// measured in [`BigFloat`], not through this). Out-of-range values go to ±inf or ±0.
pub fn to_f64(x: &BigFloat) -> f64 {
    if x.is_nan() {
        return f64::NAN;
    }
    if x.is_inf_pos() {
        return f64::INFINITY;
    }
    if x.is_inf_neg() {
        return f64::NEG_INFINITY;
    }
    if x.is_zero() {
        return 0.0;
    }
    let (words, _, sign, exponent, _) = x.as_raw_parts().expect("finite");
    // The mantissa is little-endian words with the top bit of the last word set, and the value
    // is 0.m · 2^exponent, so the top word `w` stands for w · 2^(exponent − 64).
    let top = words[words.len() - 1];
    let next = if words.len() > 1 {
        words[words.len() - 2]
    } else {
        0
    };
    let head = (top >> 11 << 11) as f64; // the top 53 bits: exact
    let tail = (top & 0x7ff) as f64 + next as f64 * 2f64.powi(-64);
    let v = ldexp(head + tail, i64::from(exponent) - 64);
    if sign == Sign::Neg {
        -v
    } else {
        v
    }
}

/// `v · 2^k` without intermediate overflow or underflow.
fn ldexp(mut v: f64, mut k: i64) -> f64 {
    if k > 2200 {
        return v * f64::INFINITY;
    }
    if k < -2200 {
        return v * 0.0;
    }
    while k > 1000 {
        v *= 2f64.powi(1000);
        k -= 1000;
    }
    while k < -1000 {
        v *= 2f64.powi(-1000);
        k += 1000;
    }
    v * 2f64.powi(k as i32)
}

/// `2^k` exactly.
fn pow2(k: i64) -> BigFloat {
    let mut p = one();
    // 1.0 has exponent 1 in astro-float's 0.m · 2^e convention.
    p.set_exponent((k + 1) as i32);
    p
}

// ---------------------------------------------------------------------------------------------
// exp(−d) for d ≥ 0, about ten times faster than astro-float's `exp`
// ---------------------------------------------------------------------------------------------

/// Table resolution: `r = d − k·ln 2 ∈ [0, ln 2)` is split as `j/TABLE_STEPS + r'`.
const TABLE_STEPS: f64 = 4096.0;
/// Taylor terms for `exp(−r')` with `|r'| ≤ 2^-13`: the first omitted term is
/// `(2^-13)^13 / 13! ≈ 2^-201.5`, below the working precision.
const TAYLOR_TERMS: usize = 12;

struct ExpTable {
    ln2: BigFloat,
    /// `exp(−j / TABLE_STEPS)`, from astro-float's `exp`.
    steps: Vec<BigFloat>,
    /// `(−1)^n / n!`.
    taylor: Vec<BigFloat>,
}

fn exp_table() -> &'static ExpTable {
    static TABLE: OnceLock<ExpTable> = OnceLock::new();
    TABLE.get_or_init(|| {
        let ln2 = ln(&big(2.0));
        let len = (std::f64::consts::LN_2 * TABLE_STEPS) as usize + 2;
        let steps = (0..len)
            .map(|j| exp_reference(&big(-(j as f64) / TABLE_STEPS)))
            .collect();
        let mut taylor = vec![one()];
        for n in 1..=TAYLOR_TERMS {
            let prev: &BigFloat = &taylor[n - 1];
            taylor.push(div(&prev.neg(), &big(n as f64)));
        }
        ExpTable { ln2, steps, taylor }
    })
}

/// `exp(−d)` for `d ≥ 0` at [`PREC`] bits: `2^-k · exp(−j/4096) · exp(−r')` with the last
/// factor from a short Taylor series (relative error about 2^-185: a few roundings of 2^-192).
/// Tested against astro-float's `exp` in `tests/accuracy.rs`.
pub fn exp_neg(d: &BigFloat) -> BigFloat {
    debug_assert!(!d.is_negative() || d.is_zero(), "exp_neg needs d >= 0");
    if d.is_zero() {
        return one();
    }
    let approx = to_f64(d);
    if approx > EXP_CUTOFF {
        return zero();
    }
    let table = exp_table();
    let k = (approx / std::f64::consts::LN_2).floor();
    let r = sub(d, &mul(&big(k), &table.ln2));
    // `r` is within a rounding of [0, ln 2); `j` may land one step off at the ends, which only
    // moves |r'| a hair past 2^-13.
    let j = (to_f64(&r) * TABLE_STEPS)
        .round()
        .clamp(0.0, (table.steps.len() - 1) as f64);
    let r_small = sub(&r, &big(j / TABLE_STEPS));
    let mut series = table.taylor[TAYLOR_TERMS].clone();
    for n in (0..TAYLOR_TERMS).rev() {
        series = add(&mul(&series, &r_small), &table.taylor[n]);
    }
    let mut v = mul(&series, &table.steps[j as usize]);
    let e = v.exponent().expect("finite") as i64 - k as i64;
    v.set_exponent(e as i32);
    v
}

/// `log1p(s)` for `s ≥ 0`: a series when `s` is tiny (so `1 + s` is never rounded), else `ln`.
pub fn log1p(s: &BigFloat) -> BigFloat {
    if s.is_zero() {
        return zero();
    }
    if to_f64(s) < 2f64.powi(-24) {
        // s − s²/2 + s³/3 − …; with s < 2^-24, nine terms reach 2^-216 relative.
        let mut sum = zero();
        let mut power = s.clone();
        for n in 1..=9 {
            let term = div(&power, &big(n as f64));
            sum = if n % 2 == 1 {
                add(&sum, &term)
            } else {
                sub(&sum, &term)
            };
            power = mul(&power, s);
        }
        sum
    } else {
        ln(&add(&one(), s))
    }
}

// ---------------------------------------------------------------------------------------------
// The exact row
// ---------------------------------------------------------------------------------------------

/// The options of one cross-entropy row (soft-capping is part of [`ExactRow`] itself).
#[derive(Clone, Copy, Debug)]
pub struct CeSpec<'a> {
    /// The class target; `None` is an ignored row (loss 0, gradient 0) unless `probabilities`.
    pub target: Option<usize>,
    /// Probability targets (0 on masked classes), in place of `target` when given.
    pub probabilities: Option<&'a [f64]>,
    /// Label smoothing ε.
    pub label_smoothing: f64,
    /// Class weights.
    pub weights: Option<&'a [f64]>,
    /// z-loss coefficient.
    pub z_loss: f64,
}

impl Default for CeSpec<'_> {
    fn default() -> Self {
        Self {
            target: None,
            probabilities: None,
            label_smoothing: 0.0,
            weights: None,
            z_loss: 0.0,
        }
    }
}

/// Exact loss and gradient of one cross-entropy row.
#[derive(Clone, Debug)]
pub struct ExactCe {
    /// The row's loss.
    pub loss: BigFloat,
    /// Its gradient with respect to the (raw) logits.
    pub grad: Vec<BigFloat>,
}

/// Everything exact about one row of logits (after the optional soft-cap map).
pub struct ExactRow {
    /// Index of the first maximum; `None` for a fully masked row.
    argmax: Option<usize>,
    /// `m`, the (mapped) row max.
    max: BigFloat,
    /// `d_i = m − x_i ≥ 0`; `None` where `x_i = −inf`.
    delta: Vec<Option<BigFloat>>,
    /// `e_i = exp(−d_i)` (0 where masked).
    exps: Vec<BigFloat>,
    /// Soft-cap slopes `1 − tanh²(x_i/cap)`; `None` without soft-capping.
    slope: Option<Vec<BigFloat>>,
    /// `s' = Σ_{i≠k} e_i`.
    rest: BigFloat,
    /// `S = 1 + s'`.
    total: BigFloat,
    /// `L = log1p(s')`.
    log1p: BigFloat,
}

impl ExactRow {
    /// The exact row of `logits` (finite or `-inf`; the values of the input dtype, widened).
    pub fn new(logits: &[f64]) -> Self {
        let argmax = argmax(logits);
        let max = argmax.map_or(big(f64::NEG_INFINITY), |k| big(logits[k]));
        let delta = logits
            .iter()
            .map(|&x| (x != f64::NEG_INFINITY).then(|| sub(&max, &big(x))))
            .collect();
        Self::from_deltas(argmax, max, delta, None)
    }

    /// The exact row of `cap · tanh(logits / cap)` (Gemma-style soft-capping), with the slopes
    /// `1 − tanh²(x/cap)` for the gradient. `tanh` and the slope both come from
    /// `u = exp(−2|x|/cap)`: `tanh = (1 − u)/(1 + u)`, `1 − tanh² = 4u/(1 + u)²`, so neither
    /// `1 − tanh²` nor a huge `cosh` is ever formed.
    pub fn with_softcap(logits: &[f64], cap: f64) -> Self {
        assert!(cap > 0.0 && cap.is_finite());
        let argmax = argmax(logits); // tanh is increasing: the max stays where it is
        let capb = big(cap);
        let mut mapped = Vec::with_capacity(logits.len());
        let mut slope = Vec::with_capacity(logits.len());
        for &x in logits {
            if x == f64::NEG_INFINITY {
                mapped.push(None);
                slope.push(zero());
                continue;
            }
            let a = div(&big(x), &capb);
            let u = exp_neg(&mul(&big(2.0), &a.abs()));
            let one_plus_u = add(&one(), &u);
            let mut t = div(&sub(&one(), &u), &one_plus_u);
            if x < 0.0 {
                t = t.neg();
            }
            mapped.push(Some(mul(&capb, &t)));
            slope.push(div(&mul(&big(4.0), &u), &mul(&one_plus_u, &one_plus_u)));
        }
        let max = argmax.map_or(big(f64::NEG_INFINITY), |k| {
            mapped[k].clone().expect("max is finite")
        });
        let delta = mapped
            .iter()
            .map(|y| {
                y.as_ref().map(|y| {
                    let d = sub(&max, y);
                    // tanh rounds monotonically up to 2^-PREC; never let d go below 0.
                    if d.is_negative() {
                        zero()
                    } else {
                        d
                    }
                })
            })
            .collect();
        Self::from_deltas(argmax, max, delta, Some(slope))
    }

    fn from_deltas(
        argmax: Option<usize>,
        max: BigFloat,
        delta: Vec<Option<BigFloat>>,
        slope: Option<Vec<BigFloat>>,
    ) -> Self {
        let exps: Vec<BigFloat> = delta
            .iter()
            .map(|d| d.as_ref().map_or_else(zero, exp_neg))
            .collect();
        let mut rest = zero();
        for (i, e) in exps.iter().enumerate() {
            if Some(i) != argmax && !e.is_zero() {
                rest = add(&rest, e);
            }
        }
        let total = add(&one(), &rest);
        let log1p = log1p(&rest);
        Self {
            argmax,
            max,
            delta,
            exps,
            slope,
            rest,
            total,
            log1p,
        }
    }

    /// The row's length.
    pub fn classes(&self) -> usize {
        self.delta.len()
    }

    /// True when every logit is −inf.
    pub fn is_fully_masked(&self) -> bool {
        self.argmax.is_none()
    }

    /// The (mapped) row max `m` (`-inf` for a fully masked row).
    pub fn max(&self) -> &BigFloat {
        &self.max
    }

    /// `log1p(s')`.
    pub fn log1p_rest(&self) -> &BigFloat {
        &self.log1p
    }

    /// `logsumexp = m + log1p(s')`; `-inf` for a fully masked row.
    pub fn logsumexp(&self) -> BigFloat {
        if self.is_fully_masked() {
            return big(f64::NEG_INFINITY);
        }
        add(&self.max, &self.log1p)
    }

    /// The condition number of `m + log1p(s')`: `(|m| + log1p(s')) / |lse|`. It is 1 when
    /// `m ≥ 0` (no cancellation) and grows as `lse` cancels toward 0 for negative `m`.
    pub fn logsumexp_condition(&self) -> f64 {
        if self.is_fully_masked() {
            return 1.0;
        }
        let lse = self.logsumexp();
        if lse.is_zero() {
            return if self.max.is_zero() {
                1.0
            } else {
                f64::INFINITY
            };
        }
        to_f64(&div(&add(&self.max.abs(), &self.log1p), &lse.abs()))
    }

    /// `log_softmax_i = −d_i − log1p(s')` (both terms ≤ 0: no cancellation); `-inf` if masked.
    pub fn log_softmax(&self, i: usize) -> BigFloat {
        match &self.delta[i] {
            None => big(f64::NEG_INFINITY),
            Some(d) => add(d, &self.log1p).neg(),
        }
    }

    /// `softmax_i = e_i / (1 + s')`; 0 if masked or the row is fully masked.
    pub fn softmax(&self, i: usize) -> BigFloat {
        div(&self.exps[i], &self.total)
    }

    /// `Σ_{j≠i} e_j` without cancellation: `s'` for the max, else `S − e_i ≥ 1`.
    fn sum_without(&self, i: usize) -> BigFloat {
        if Some(i) == self.argmax {
            self.rest.clone()
        } else {
            sub(&self.total, &self.exps[i])
        }
    }

    /// The cross-entropy loss and gradient of this row under `spec`, as the library documents
    /// them: with `q = (1 − ε)·onehot(y) + ε/K` over the `K` live classes, `a_c = w_c q_c` and
    /// `A = Σ a_c`,
    ///
    /// `loss = Σ_c a_c (lse − x_c) + z·lse² = Σ_c a_c d_c + A·log1p(s') + z·lse²`
    /// (non-negative terms only) and
    /// `grad_i = slope_i · ((A + 2z·lse)·p_i − a_i)`
    /// `       = slope_i · (e_i·((A − a_i) + 2z·lse) − a_i·Σ_{j≠i} e_j) / S`,
    /// where `A − a_i = Σ_{c≠i} a_c` and `Σ_{j≠i} e_j` are formed without cancelling `p_y − 1`.
    /// Masked classes get gradient 0; an ignored row (`target: None`) loss 0 and gradient 0.
    pub fn ce(&self, spec: &CeSpec<'_>) -> ExactCe {
        let classes = self.classes();
        let live = self.delta.iter().filter(|d| d.is_some()).count();
        if live == 0 || (spec.target.is_none() && spec.probabilities.is_none()) {
            return ExactCe {
                loss: zero(),
                grad: vec![zero(); classes],
            };
        }
        let target_mass = |c: usize| match (spec.probabilities, spec.target) {
            (Some(q), _) => {
                assert!(
                    q[c] == 0.0 || self.delta[c].is_some(),
                    "the oracle has no finite loss for target mass on a masked class"
                );
                big(q[c])
            }
            (None, Some(y)) => {
                assert!(
                    self.delta[y].is_some(),
                    "the oracle has no finite loss for a target on a masked class"
                );
                if c == y {
                    one()
                } else {
                    zero()
                }
            }
            (None, None) => unreachable!("handled above"),
        };
        let eps = big(spec.label_smoothing);
        let keep = sub(&one(), &eps);
        let share = div(&eps, &big(live as f64));
        let weight = |c: usize| spec.weights.map_or(1.0, |w| w[c]);
        let mass: Vec<BigFloat> = (0..classes)
            .map(|c| {
                if self.delta[c].is_none() {
                    return zero();
                }
                let q = add(&mul(&keep, &target_mass(c)), &share);
                mul(&big(weight(c)), &q)
            })
            .collect();
        let mut total_mass = zero();
        let mut distance = zero();
        for (c, a) in mass.iter().enumerate() {
            if let (false, Some(d)) = (a.is_zero(), &self.delta[c]) {
                total_mass = add(&total_mass, a);
                distance = add(&distance, &mul(a, d));
            }
        }
        let lse = self.logsumexp();
        let z = big(spec.z_loss);
        let mut loss = add(&distance, &mul(&total_mass, &self.log1p));
        if !z.is_zero() {
            loss = add(&loss, &mul(&z, &mul(&lse, &lse)));
        }
        let z_twice_lse = mul(&big(2.0 * spec.z_loss), &lse);
        let grad = (0..classes)
            .map(|i| {
                if self.delta[i].is_none() {
                    return zero();
                }
                // A − a_i: exactly 0 for the target of an unsmoothed one-hot row.
                let others = add(&sub(&total_mass, &mass[i]), &z_twice_lse);
                let pull = mul(&self.exps[i], &others);
                let push = mul(&mass[i], &self.sum_without(i));
                let g = div(&sub(&pull, &push), &self.total);
                match &self.slope {
                    Some(s) => mul(&s[i], &g),
                    None => g,
                }
            })
            .collect();
        ExactCe { loss, grad }
    }
}

/// `torch.argmax` of a row, the reference of lse's `keep_row_argmax`: the first NaN if there is
/// one, else the first of equal maxima (column 0 of an all `-inf` or empty row).
pub fn torch_argmax(row: &[f64]) -> usize {
    if let Some(nan) = row.iter().position(|x| x.is_nan()) {
        return nan;
    }
    let mut best = 0;
    for (i, &x) in row.iter().enumerate() {
        if x > row[best] {
            best = i;
        }
    }
    best
}

/// `logsumexp` of a row of finite logits and `-inf` masks, from the exact row, in `f64`.
pub fn logsumexp_f64(row: &[f64]) -> f64 {
    to_f64(&ExactRow::new(row).logsumexp())
}

/// The index of the first maximum among the finite entries; `None` if all are `-inf`.
fn argmax(logits: &[f64]) -> Option<usize> {
    let mut best: Option<usize> = None;
    for (i, &x) in logits.iter().enumerate() {
        assert!(
            !x.is_nan() && x != f64::INFINITY,
            "the oracle takes finite logits and -inf masks, got {x}"
        );
        if x != f64::NEG_INFINITY && best.is_none_or(|b| x > logits[b]) {
            best = Some(i);
        }
    }
    best
}

// ---------------------------------------------------------------------------------------------
// Error measures (docs/numerics.md)
// ---------------------------------------------------------------------------------------------

/// Significand bits (with the implicit bit) of `dtype`.
pub fn precision_bits(dtype: DType) -> i64 {
    match dtype {
        DType::F64 => 53,
        DType::F32 => 24,
        DType::F16 => 11,
        DType::BF16 => 8,
    }
}

/// `log2` of the smallest positive normal number of `dtype`.
pub fn min_normal_exponent(dtype: DType) -> i64 {
    match dtype {
        DType::F64 => -1022,
        DType::F32 | DType::BF16 => -126,
        DType::F16 => -14,
    }
}

/// `exact` clamped to `dtype`'s finite range: the contract saturates results whose exact value
/// is finite but beyond the range (log_softmax of `-MAX` next to `+MAX` is `-MAX`, not `-inf`).
pub fn saturate(exact: &BigFloat, dtype: DType) -> BigFloat {
    let max = big(dtype.max_value());
    if exact.is_inf() || exact.is_nan() {
        return exact.clone();
    }
    if exact > &max {
        max
    } else if exact < &max.neg() {
        max.neg()
    } else {
        exact.clone()
    }
}

/// `log2 ulp(t)` in `dtype`: `2^(⌊log2|t|⌋ − p + 1)` for normal `|t|`, the subnormal spacing
/// `2^(emin − p + 1)` below the smallest normal number (0 included). `t` must be finite.
pub fn ulp_exponent(t: &BigFloat, dtype: DType) -> i64 {
    let p = precision_bits(dtype);
    let emin = min_normal_exponent(dtype);
    if t.is_zero() {
        return emin - p + 1;
    }
    // astro-float: |t| ∈ [2^(e−1), 2^e).
    let floor_log2 = i64::from(t.exponent().expect("finite")) - 1;
    floor_log2.max(emin) - p + 1
}

/// `ulp(t)` in `dtype`, as an f64 (0 if it underflows f64, which no supported dtype does).
pub fn ulp(t: &BigFloat, dtype: DType) -> f64 {
    to_f64(&pow2(ulp_exponent(t, dtype)))
}

/// `err / 2^q` as an f64, or 0 when the absolute error `err` is below `dtype`'s smallest normal
/// number (docs/numerics.md: exp terms below it may be flushed to zero).
fn error_in_ulps(err: BigFloat, dtype: DType, q: i64) -> f64 {
    if err.is_zero() || err < pow2(min_normal_exponent(dtype)) {
        return 0.0;
    }
    let mut scaled = err;
    let e = i64::from(scaled.exponent().expect("finite")) - q;
    scaled.set_exponent(e as i32);
    to_f64(&scaled)
}

/// Elementwise error of `got` (a value of `dtype`, widened) in ulps of `dtype` at the exact
/// value, after saturating the exact value to the dtype's range. Infinite exact values must be
/// matched exactly (error 0, else infinity); a NaN or infinite `got` for a finite exact value is
/// an infinite error.
pub fn ulp_error(got: f64, exact: &BigFloat, dtype: DType) -> f64 {
    assert!(!exact.is_nan(), "oracle produced NaN");
    if exact.is_inf() {
        let same = (exact.is_inf_pos() && got == f64::INFINITY)
            || (exact.is_inf_neg() && got == f64::NEG_INFINITY);
        return if same { 0.0 } else { f64::INFINITY };
    }
    if !got.is_finite() {
        return f64::INFINITY;
    }
    let t = saturate(exact, dtype);
    error_in_ulps(sub(&big(got), &t).abs(), dtype, ulp_exponent(&t, dtype))
}

/// Higham's normwise error of a probability-domain row: `max_i |got_i − exact_i|` in ulps of
/// `max_i |exact_i|` (exact values saturated to the dtype's range), 0 when that absolute error is
/// below the dtype's smallest normal number. Returns the error and the index where it is largest.
pub fn normwise_error(got: &[f64], exact: &[BigFloat], dtype: DType) -> (f64, usize) {
    assert_eq!(got.len(), exact.len());
    if let Some(i) = got.iter().position(|g| !g.is_finite()) {
        return (f64::INFINITY, i);
    }
    let exact: Vec<BigFloat> = exact.iter().map(|e| saturate(e, dtype)).collect();
    let mut largest = zero();
    let mut worst = (zero(), 0);
    for (i, (g, e)) in got.iter().zip(&exact).enumerate() {
        assert!(
            !e.is_nan() && !e.is_inf(),
            "probability-domain values are finite"
        );
        let magnitude = e.abs();
        if magnitude > largest {
            largest = magnitude;
        }
        let err = sub(&big(*g), e).abs();
        if err > worst.0 {
            worst = (err, i);
        }
    }
    let (err, index) = worst;
    (
        error_in_ulps(err, dtype, ulp_exponent(&largest, dtype)),
        index,
    )
}
