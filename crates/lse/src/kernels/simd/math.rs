//! The exp and soft-cap arithmetic every instruction set shares, written once over
//! [`Float`]: the `f32`-lane and `f64`-lane exps of a step ([`Step`]), the Cody–Waite pieces
//! they are built from, and the soft-cap map. None of it names the kernel body
//! ([`super::super::vector`]), which is written over these. All of it is safe but the store:
//! its constants are splat with the token of the vectors it was given.

use super::{Float, Isa, Mask, MAX_LANES};

/// `s = 2|x|/cap` is held at or below this: `exp(−745.2)` rounds to 0.
pub(crate) const SOFTCAP_FLOOR: f64 = 745.2;

/// `ln 2` in two parts for Cody–Waite reduction (fdlibm's): `k · LN2_HI` is exact for
/// `|k| < 2^21`.
pub(crate) const LN2_HI: f64 = f64::from_bits(0x3fe6_2e42_fee0_0000); // 32 significant bits
/// `ln 2 − LN2_HI`.
pub(crate) const LN2_LO: f64 = f64::from_bits(0x3dea_39ef_3579_3c76);

/// `(e^r − 1 − r)/r² = Σ_j r^j/(j+2)!` to degree 11: the truncation error on `|r| ≤ ln2/2` is
/// below 5e-18 relative to `e^r` (0.04 ulp of `f64`).
pub(crate) const EXPM1_POLY_F64: [f64; 12] = [
    1.0 / 2.0,
    1.0 / 6.0,
    1.0 / 24.0,
    1.0 / 120.0,
    1.0 / 720.0,
    1.0 / 5040.0,
    1.0 / 40320.0,
    1.0 / 362_880.0,
    1.0 / 3_628_800.0,
    1.0 / 39_916_800.0,
    1.0 / 479_001_600.0,
    1.0 / 6_227_020_800.0,
];

/// `P(r) ≈ (e^r − 1 − r)/r²` on `|r| ≤ ln2/2`: a degree-4 Chebyshev fit, so that
/// `q = r + r²·P(r)` is within 1.1e-8 of `e^r − 1` relative to `e^r` (0.17 ulp of `f32`).
const EXPM1_POLY: [f32; 5] = [
    0.5,
    0.166_665_77,
    0.041_666_465,
    0.008_363_185,
    0.001_393_366,
];

/// log2 of the scale of the `f32`-lane exp's results.
const F32_EXP_SCALE_LOG2: i32 = 64;
/// 2^64.
pub(crate) const F32_EXP_SCALE: f64 = 18_446_744_073_709_551_616.0;

/// The lanes one step of a row is computed in: the instruction set's `f32` vector, or its
/// `f64` pair.
pub(crate) trait Step<I: Isa>: Float<Token = I> {
    /// True when the exp sweep's sums carry a compensation term (`f64` rows: their terms have
    /// no spare precision for a plain `f64` sum to hide its rounding in).
    const COMPENSATED: bool;
    /// A bound on the relative error of `c · exp(x − m)` formed from this vector's exp and a
    /// state `S` summed from it: the exp's own error plus that of `S` inside `c`.
    const EXP_ERROR: f64;
    /// The factor [`Step::exp_shifted`] scales its results by, so that they stay normal
    /// numbers of the lanes' type: callers multiply by its inverse, exactly, in `f64`.
    const EXP_SCALE: f64;
    /// The lanes as `f64` (exact).
    fn widen(self) -> I::Wide;
    /// `exp(x − m) · EXP_SCALE` for `x ≤ m`, in the same lanes; exactly 0 where `exp(x − m)`
    /// is far below anything the row's dtype can show (so for `x = −inf`) and, with
    /// `ZERO_TIES`, where `x = m`.
    fn exp_shifted<const ZERO_TIES: bool>(self, m: Self, neg_m: Self) -> Self;
    /// Stores the first `n` exp terms as `f32` with `EXP_SCALE` where `ties` (the terms a
    /// `ZERO_TIES` exp left out of the sum): what a cached row's write pass rescales.
    ///
    /// # Safety
    /// `p` is valid for writing `n ≤ LANES` values.
    unsafe fn store_exp(p: *mut f32, n: usize, e: Self, ties: Self::Mask);
}

/// The lanes an exp sweep computes in, from a row's vector `V`: `V` itself, or `f64` lanes
/// for rows whose outputs need the `f64` exp's accuracy (an `f32` lane's exp is within 0.6 ulp
/// of `f32`; a gradient that cancels needs more).
pub(crate) trait SweepLanes<I: Isa, V>: Step<I> {
    fn from_row(v: V) -> Self;
}

impl<I: Isa, V: Step<I>> SweepLanes<I, V> for V {
    #[inline(always)]
    fn from_row(v: V) -> Self {
        v
    }
}

/// [`Step`] for an instruction set's `$f32` vector and its pair of `$f64` vectors.
#[rustfmt::skip]
macro_rules! steps {
    ([$($generics:tt)*] $isa:ty, $f32:ty, $f64:ty) => {
        impl<$($generics)*> $crate::kernels::simd::math::Step<$isa> for $f32 {
            const COMPENSATED: bool = false;
            // 0.6 ulp of f32 for the exp, as much for S, and the f64 products: 2.4·2^-24.
            const EXP_ERROR: f64 = 1.7e-7;
            const EXP_SCALE: f64 = $crate::kernels::simd::math::F32_EXP_SCALE;
            #[inline(always)]
            fn widen(self) -> Pair<$f64> { <$isa as Isa>::widen(self) }
            #[inline(always)]
            fn exp_shifted<const Z: bool>(self, m: Self, neg_m: Self) -> Self {
                $crate::kernels::simd::math::exp_f32::<Self, Z>(self, m, neg_m)
            }
            #[inline(always)]
            unsafe fn store_exp(p: *mut f32, n: usize, e: Self, ties: Self::Mask) {
                let scale = Self::splat(e.token(), $crate::kernels::simd::math::F32_EXP_SCALE);
                $crate::kernels::simd::math::store_f32_lanes::<$isa>(p, n, e.select(scale, ties));
            }
        }
        impl<$($generics)*> $crate::kernels::simd::math::Step<$isa> for Pair<$f64> {
            const COMPENSATED: bool = true;
            // About 0.5 ulp of f64 each for the exp and for the compensated S, and the products.
            const EXP_ERROR: f64 = 4.5e-16;
            const EXP_SCALE: f64 = 1.0;
            #[inline(always)] fn widen(self) -> Self { self }
            #[inline(always)]
            fn exp_shifted<const Z: bool>(self, m: Self, neg_m: Self) -> Self {
                $crate::kernels::simd::math::exp_f64::<Self, Z>(self, m, neg_m)
            }
            #[inline(always)]
            unsafe fn store_exp(p: *mut f32, n: usize, e: Self, ties: Self::Mask) {
                let scale = Self::splat(e.token(), $crate::kernels::simd::math::F32_EXP_SCALE);
                let v = e.select(Self::splat(e.token(), 1.0), ties).mul(scale);
                $crate::kernels::simd::math::store_f32_lanes::<$isa>(p, n, <$isa as Isa>::narrow(v));
            }
        }
        impl<$($generics)*> $crate::kernels::simd::math::SweepLanes<$isa, $f32> for Pair<$f64> {
            #[inline(always)] fn from_row(v: $f32) -> Self { <$isa as Isa>::widen(v) }
        }
    };
}
pub(crate) use steps;

/// `x − m = s + err` exactly (TwoSum); `s = k·ln2 + r` with Cody–Waite's two-part `ln 2`
/// (`k·LN2_HI` is exact for |k| < 2^15), `k` rounded by adding 1.5·2^23 (whose low mantissa
/// bits then hold it), `|r| ≤ ln2/2`; `q = e^r − 1 = r + r²·P(r)` with [`EXPM1_POLY`]; the
/// result `(1 + q)·2^(k+64)` by one fused multiply-add, so it rounds once: within 2^-24 +
/// 1.1e-8 of `e^{x−m}·2^64` relative (0.6 ulp of `f32`). The 2^64 keeps every result down to
/// `e^-128` a normal `f32` (a tiny loss is a sum of such terms); below −128 the result is 0:
/// even 2^31 such terms stay below half of `f32`'s smallest subnormal (there `2^(k+64)`, built
/// from its bits, would not be a number; those lanes are masked last).
#[inline(always)]
pub(crate) fn exp_f32<F: Float, const ZERO_TIES: bool>(x: F, m: F, neg_m: F) -> F {
    const LOG2E: f32 = std::f32::consts::LOG2_E;
    const LN2_HI: f32 = 0.693_359_4; // 355/512: 9 significant bits
    const LN2_LO: f32 = -2.121_944_4e-4; // ln 2 − LN2_HI
    const ROUNDER: f32 = 12_582_912.0; // 1.5·2^23
    let tok = x.token();
    let s = x.add(neg_m);
    let mut zero = s.lt(F::splat(tok, -128.0));
    if ZERO_TIES {
        zero = zero.or(x.eq(m));
    }
    let rounded = s.mul_add(F::splat(tok, LOG2E.into()), F::splat(tok, ROUNDER.into()));
    let k = rounded.sub(F::splat(tok, ROUNDER.into()));
    let r = k.mul_add(F::splat(tok, (-LN2_HI).into()), s);
    let r = k.mul_add(F::splat(tok, (-LN2_LO).into()), r);
    // The subtraction's rounding error, which matters for f16 and bf16 too: their logsumexp
    // and loss are f32, and `x − m` of a logit far below a large max rounds in f32.
    let s_virtual = s.sub(x);
    let err = x.sub(s.sub(s_virtual)).add(neg_m.sub(s_virtual));
    let r = r.add(err);
    let mut p = F::splat(tok, EXPM1_POLY[4].into());
    for c in [EXPM1_POLY[3], EXPM1_POLY[2], EXPM1_POLY[1], EXPM1_POLY[0]] {
        p = p.mul_add(r, F::splat(tok, c.into()));
    }
    let q = r.mul(r).mul_add(p, r);
    // 2^(k+64): the bits of `rounded` are those of ROUNDER plus k. The zeroed lanes may hold
    // anything here (x = −inf gives inf − inf; a k below the floor wraps the exponent bits):
    // masked to +0 last.
    let scale = rounded.exponent(127 + F32_EXP_SCALE_LOG2 - ROUNDER.to_bits() as i32);
    q.mul_add(scale, scale).zero_where(zero)
}

/// `exp(x − m)` in `f64` lanes, the `f64` counterpart of [`exp_f32`]: TwoSum of `x − m`;
/// Cody–Waite with fdlibm's two-part `ln 2`; `q = r + r²·P(r)` with [`EXPM1_POLY_F64`];
/// `(1 + q)·2^k` as in [`one_plus_times_power_of_two`]: within about 0.5 ulp, rounded to the
/// subnormal grid as `exp` is. Below `ln 2^-1075` the result is 0.
#[inline(always)]
pub(crate) fn exp_f64<F: Float, const ZERO_TIES: bool>(x: F, m: F, neg_m: F) -> F {
    let tok = x.token();
    let s = x.add(neg_m);
    let floor = F::splat(tok, -745.2);
    let mut zero = s.lt(floor);
    if ZERO_TIES {
        zero = zero.or(x.eq(m));
    }
    let s = s.max(floor);
    let (k, r) = reduce_by_ln2(s);
    let s_virtual = s.sub(x);
    let err = x.sub(s.sub(s_virtual)).add(neg_m.sub(s_virtual));
    let q = expm1_reduced(r.add(err));
    one_plus_times_power_of_two(q.select(F::splat(tok, -1.0), zero), k)
}

/// `s = k·ln 2 + r` with `k` integral and `|r| ≤ ln2/2` (Cody–Waite with fdlibm's two-part
/// `ln 2`: `k·LN2_HI` is exact for |k| < 2^21).
#[inline(always)]
fn reduce_by_ln2<F: Float>(s: F) -> (F, F) {
    let tok = s.token();
    let k = s.mul(F::splat(tok, std::f64::consts::LOG2_E)).round();
    let r = k.mul_add(F::splat(tok, -LN2_HI), s);
    (k, k.mul_add(F::splat(tok, -LN2_LO), r))
}

/// `(1 + q)·2^k` for integral `k ≥ −1075`, as `((1 + q)·2^k₁)·2^k₂` with `k₁ + k₂ = k` both in
/// the normal range: the fused multiply-add rounds once and the second product is exact unless
/// the result is subnormal.
#[inline(always)]
fn one_plus_times_power_of_two<F: Float>(q: F, k: F) -> F {
    let tok = q.token();
    let k1 = k.mul(F::splat(tok, 0.5)).floor();
    let scale1 = power_of_two(k1);
    q.mul_add(scale1, scale1).mul(power_of_two(k.sub(k1)))
}

/// `e^r − 1 = r + r²·P(r)` for `|r| ≤ ln2/2`, with [`EXPM1_POLY_F64`] by Horner's rule.
#[inline(always)]
fn expm1_reduced<F: Float>(r: F) -> F {
    let tok = r.token();
    let mut p = F::splat(tok, EXPM1_POLY_F64[11]);
    for &c in EXPM1_POLY_F64[..11].iter().rev() {
        p = p.mul_add(r, F::splat(tok, c));
    }
    r.mul(r).mul_add(p, r)
}

/// `2^k` for integral `f64` exponents in the normal range: `k + 1.5·2^52 + 1023` is exact and
/// its low mantissa bits are the biased exponent.
#[inline(always)]
fn power_of_two<F: Float>(k: F) -> F {
    let tok = k.token();
    k.add(F::splat(tok, 6_755_399_441_055_744.0 + 1023.0))
        .exponent(0)
}

/// Soft-capping `cap · tanh(x/cap)` of `f64` lanes and its slope `1 − tanh²`, for the vector
/// kernels and (with `f64` as a one-lane vector) the scalar one: the same bits in both. `−inf`
/// stays `−inf` (slope 0), NaN stays NaN, `+inf` maps to `cap` with slope 0.
///
/// Computed from `v = exp(−2|x|/cap)` and `u = expm1(−2|x|/cap)`, both from one Cody–Waite
/// reduction and [`EXPM1_POLY_F64`]: `tanh(|x|/cap) = −u / (1 + v)` and `1 − tanh² =
/// 4v / (1 + v)²`, so neither `1 − t²` nor an overflowing `cosh` is formed. The mapped value is
/// within about 3 ulp of `cap · tanh(x/cap)`.
#[inline(always)]
pub(crate) fn softcap<F: Float>(x: F, cap: F, two_over_cap: F) -> (F, F) {
    let tok = x.token();
    // `min` is NaN when its second operand is: NaN goes on. exp(−s) is 0 below the floor.
    let s = F::splat(tok, SOFTCAP_FLOOR).min(x.abs().mul(two_over_cap));
    let (k, r) = reduce_by_ln2(s.neg());
    let q = expm1_reduced(r);
    let v = one_plus_times_power_of_two(q, k);
    let p = power_of_two(k.max(F::splat(tok, -60.0)));
    let u = q.mul_add(p, p.sub(F::splat(tok, 1.0)));
    let one = F::splat(tok, 1.0);
    let reciprocal = one.div(one.add(v));
    let t = u.neg().mul(reciprocal);
    let y = cap.mul(t).copysign(x);
    let slope = F::splat(tok, 4.0).mul(v).mul(reciprocal).mul(reciprocal);
    let minus_inf = F::splat(tok, f64::NEG_INFINITY);
    let masked = x.eq(minus_inf);
    (y.select(minus_inf, masked), slope.zero_where(masked))
}

/// Logits times `scale` (a temperature's `1/T`), rounded once: a finite product past the
/// `f64` range saturates at `±f64::MAX` (the logit was finite), and `-inf` stays `-inf`, so
/// masks survive. NaN goes on.
#[inline(always)]
pub(crate) fn scale_logits<F: Float>(x: F, scale: F) -> F {
    let tok = x.token();
    // `min`/`max` return their second operand when it is NaN: NaN goes on.
    let product = F::splat(tok, f64::MAX).min(x.mul(scale));
    let y = F::splat(tok, -f64::MAX).max(product);
    let minus_inf = F::splat(tok, f64::NEG_INFINITY);
    y.select(minus_inf, x.eq(minus_inf))
}

/// Stores the first `n` of one step of `f32` lanes at `p`.
#[inline(always)]
pub(crate) unsafe fn store_f32_lanes<I: Isa>(p: *mut f32, n: usize, v: I::F32) {
    if n == I::LANES {
        v.store(p);
    } else {
        let mut buf = [0.0; MAX_LANES];
        v.store(buf.as_mut_ptr());
        core::ptr::copy_nonoverlapping(buf.as_ptr(), p, n);
    }
}
