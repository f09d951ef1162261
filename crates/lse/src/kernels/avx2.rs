//! x86-64 AVX2 + FMA (+ F16C) kernels for all four dtypes.
//!
//! Every kernel works on eight elements per step through the [`Vector`] trait: `f32`, `f16` and
//! `bf16` are widened into one `f32x8` (`bf16` by a 16-bit shift, `f16` by F16C), `f64` is held
//! as two `f64x4` — never a whole-row copy. The read pass works on blocks of [`BLOCK`] elements
//! that stay in L1: a max sweep, then an exp sweep over the same block, folded into the row's
//! [`RowState`] with the §1 merge — one pass over memory, no per-lane rescaling, and the same
//! result for any split of the row into whole blocks.
//!
//! Accuracy comes from three choices. `x − m` is split exactly by TwoSum, so the exp's argument
//! carries no rounding error of the subtraction; the exp rounds once (for `f32` lanes its result
//! is scaled by 2^64 so that terms down to `e^-128` stay normal: within 0.6 ulp of `f32`; for
//! `f64` rows within about 0.5 ulp of `f64`); and sums are accumulated in `f64` (compensated for
//! `f64` rows), excluding the block's maxima (counted apart) so that `s'` keeps its digits when
//! it is tiny. Every output is formed in `f64` and rounded once to its dtype (for `f16`/`bf16`
//! through `f32`, an error of at most 2^-13 ulp of those).
//!
//! Two things keep the arithmetic, not the memory, the limit: the exp sweep prefetches the
//! block after next, so the max sweep finds it in cache; and for `f32` rows up to
//! [`MAX_CACHED_LEN`] the read pass leaves its exp terms in the output row, so that the write
//! pass of softmax and of the plain cross-entropy gradient is one multiply per element.

use core::arch::x86_64::*;

use half::{bf16, f16};

use super::scalar::{
    ClassMasses, FastWrite, LogitMap, RowScan, EXPM1_POLY_F64, LN2_HI, LN2_LO, SOFTCAP_FLOOR,
};
use super::{BlockMaxima, MassesPass, MAX_CACHED_LEN};
use crate::element::{DType, Element};
use crate::state::{CompensatedSum, RowState};

/// Elements per read-pass block: 8 KiB of `f32`, well inside L1 between its two sweeps.
pub(crate) const BLOCK: usize = 2048;

/// `P(r) ≈ (e^r − 1 − r)/r²` on `|r| ≤ ln2/2`: a degree-4 Chebyshev fit, so that
/// `q = r + r²·P(r)` is within 1.1e-8 of `e^r − 1` relative to `e^r` (0.17 ulp of `f32`).
const EXPM1_POLY: [f32; 5] = [
    0.5,
    0.166_665_77,
    0.041_666_465,
    0.008_363_185,
    0.001_393_366,
];

/// Eight row elements in the registers the kernels compute on, with the operations they need.
/// Masks are vectors of the same type whose lanes are all ones or all zeros.
pub(crate) trait Vector: Copy {
    /// Per-lane counters of mask lanes.
    type Tally: Copy;
    /// True when the exp sweep's sums carry a compensation term (`f64` rows: their terms have
    /// no spare precision for a plain `f64` sum to hide its rounding in).
    const COMPENSATED: bool;
    /// A bound on the relative error of `c · exp(x − m)` formed from this vector's exp and a
    /// state `S` summed from it: the exp's own error plus that of `S` inside `c`.
    const EXP_ERROR: f64;
    /// Every lane `v` (an element value, so exact in the lanes' type).
    unsafe fn splat(v: f64) -> Self;
    unsafe fn max(self, other: Self) -> Self;
    unsafe fn min(self, other: Self) -> Self;
    /// `self == other` (false for NaN).
    unsafe fn eq(self, other: Self) -> Self;
    /// `!(self ≤ bound)`: above `bound`, or NaN.
    unsafe fn nan_or_above(self, bound: Self) -> Self;
    unsafe fn or(self, other: Self) -> Self;
    /// `other` where `mask`, else `self`.
    unsafe fn select(self, other: Self, mask: Self) -> Self;
    /// True when some lane of the mask is set.
    unsafe fn any(self) -> bool;
    unsafe fn reduce_max(self) -> f64;
    unsafe fn reduce_min(self) -> f64;
    /// The lanes as `f64` (exact): elements 0..4, 4..8.
    unsafe fn widen(self) -> (__m256d, __m256d);
    /// Lanes that are not `−inf`, as `f64` masks.
    unsafe fn live(self) -> (__m256d, __m256d);
    /// The factor [`Vector::exp_shifted`] scales its results by, so that they stay normal
    /// numbers of the lanes' type: callers multiply by its inverse, exactly, in `f64`.
    const EXP_SCALE: f64;
    /// `exp(x − m) · EXP_SCALE` for `x ≤ m`, in the same lanes; exactly 0 where `exp(x − m)`
    /// is far below anything the row's dtype can show (so for `x = −inf`) and, with
    /// `ZERO_TIES`, where `x = m`.
    unsafe fn exp_shifted<const ZERO_TIES: bool>(self, m: Self, neg_m: Self) -> Self;
    unsafe fn tally_zero() -> Self::Tally;
    unsafe fn tally(t: Self::Tally, mask: Self) -> Self::Tally;
    unsafe fn tally_total(t: Self::Tally) -> usize;
}

/// Storage types whose rows the kernels read and write eight elements at a time.
pub(crate) trait Lanes: Element {
    type V: Vector;
    /// Loads 8 elements at `p`.
    unsafe fn load8(p: *const Self) -> Self::V;
    /// Stores 8 results given as `f64` (`lo`: elements 0..4, `hi`: 4..8), rounded to `Self`.
    unsafe fn store8(p: *mut Self, lo: __m256d, hi: __m256d);
    /// True for the half types, whose outputs are rounded through `f32` anyway: a product
    /// formed in `f32` (2^-24 relative) moves them by at most 2^-16 of their ulp.
    const HALF: bool = false;
    /// Stores 8 `f32` results, rounded to `Self` (half types only).
    unsafe fn store8_f32(_p: *mut Self, _v: __m256) {
        unreachable!("only half types store from f32 lanes")
    }
    /// True when the read pass can leave each `exp(x − m_b)` (an `f32` lane) in an `f32`
    /// buffer for the write pass to rescale ([`Lanes::store_exp`]): the `f32` lanes of `f32`,
    /// `f16` and `bf16` rows, whose cached terms keep every output within the §3 bounds. For
    /// `f64` rows the cache would add a rounding the plain write pass does not have.
    const CACHES: bool = false;
    /// Stores the first `n` of 8 exp terms with `EXP_SCALE` where `ties` (the terms a
    /// `ZERO_TIES` exp left out of the sum).
    unsafe fn store_exp(_p: *mut f32, _n: usize, _e: Self::V, _ties: Self::V) {
        unreachable!("only rows whose Lanes::CACHES holds are cached")
    }
}

/// Rounds two `f64x4` to one `f32x8` (round to nearest even).
#[inline(always)]
unsafe fn narrow(lo: __m256d, hi: __m256d) -> __m256 {
    _mm256_set_m128(_mm256_cvtpd_ps(hi), _mm256_cvtpd_ps(lo))
}

/// [`Lanes::store_exp`] of `f32` lanes.
#[inline(always)]
unsafe fn store_exp_f32(p: *mut f32, n: usize, e: __m256, ties: __m256) {
    let v = _mm256_blendv_ps(e, _mm256_set1_ps(F32_EXP_SCALE as f32), ties);
    if n == 8 {
        _mm256_storeu_ps(p, v);
    } else {
        let mut buf = [0f32; 8];
        _mm256_storeu_ps(buf.as_mut_ptr(), v);
        core::ptr::copy_nonoverlapping(buf.as_ptr(), p, n);
    }
}

/// `f32` lanes of the `f32` buffer at `p`.
#[inline(always)]
unsafe fn load_cached(p: *const f32, n: usize) -> __m256 {
    if n == 8 {
        _mm256_loadu_ps(p)
    } else {
        let mut buf = [0f32; 8];
        core::ptr::copy_nonoverlapping(p, buf.as_mut_ptr(), n);
        _mm256_loadu_ps(buf.as_ptr())
    }
}

impl Lanes for f32 {
    type V = __m256;
    const CACHES: bool = true;
    #[inline(always)]
    unsafe fn load8(p: *const Self) -> __m256 {
        _mm256_loadu_ps(p)
    }
    #[inline(always)]
    unsafe fn store8(p: *mut Self, lo: __m256d, hi: __m256d) {
        _mm256_storeu_ps(p, narrow(lo, hi));
    }
    #[inline(always)]
    unsafe fn store_exp(p: *mut f32, n: usize, e: __m256, ties: __m256) {
        store_exp_f32(p, n, e, ties);
    }
}

impl Lanes for f16 {
    type V = __m256;
    const CACHES: bool = true;
    #[inline(always)]
    unsafe fn store_exp(p: *mut f32, n: usize, e: __m256, ties: __m256) {
        store_exp_f32(p, n, e, ties);
    }
    #[inline(always)]
    unsafe fn load8(p: *const Self) -> __m256 {
        _mm256_cvtph_ps(_mm_loadu_si128(p.cast()))
    }
    #[inline(always)]
    unsafe fn store8(p: *mut Self, lo: __m256d, hi: __m256d) {
        Self::store8_f32(p, narrow(lo, hi));
    }
    const HALF: bool = true;
    #[inline(always)]
    unsafe fn store8_f32(p: *mut Self, v: __m256) {
        let halves = _mm256_cvtps_ph::<_MM_FROUND_TO_NEAREST_INT>(v);
        _mm_storeu_si128(p.cast(), halves);
    }
}

impl Lanes for bf16 {
    type V = __m256;
    const CACHES: bool = true;
    #[inline(always)]
    unsafe fn store_exp(p: *mut f32, n: usize, e: __m256, ties: __m256) {
        store_exp_f32(p, n, e, ties);
    }
    #[inline(always)]
    unsafe fn load8(p: *const Self) -> __m256 {
        let wide = _mm256_cvtepu16_epi32(_mm_loadu_si128(p.cast()));
        _mm256_castsi256_ps(_mm256_slli_epi32::<16>(wide))
    }
    #[inline(always)]
    unsafe fn store8(p: *mut Self, lo: __m256d, hi: __m256d) {
        Self::store8_f32(p, narrow(lo, hi));
    }
    const HALF: bool = true;
    #[inline(always)]
    unsafe fn store8_f32(p: *mut Self, v: __m256) {
        // Round to nearest even on the upper 16 bits. Outputs here are never NaN.
        let bits = _mm256_castps_si256(v);
        let odd = _mm256_and_si256(_mm256_srli_epi32::<16>(bits), _mm256_set1_epi32(1));
        let rounded = _mm256_add_epi32(bits, _mm256_add_epi32(odd, _mm256_set1_epi32(0x7fff)));
        let top = _mm256_srli_epi32::<16>(rounded);
        let packed = _mm_packus_epi32(
            _mm256_castsi256_si128(top),
            _mm256_extracti128_si256::<1>(top),
        );
        _mm_storeu_si128(p.cast(), packed);
    }
}

impl Lanes for f64 {
    type V = F64x8;
    #[inline(always)]
    unsafe fn load8(p: *const Self) -> F64x8 {
        F64x8 {
            lo: _mm256_loadu_pd(p),
            hi: _mm256_loadu_pd(p.add(4)),
        }
    }
    #[inline(always)]
    unsafe fn store8(p: *mut Self, lo: __m256d, hi: __m256d) {
        _mm256_storeu_pd(p, lo);
        _mm256_storeu_pd(p.add(4), hi);
    }
}

/// The lanes an exp sweep computes in, from a row's vector `V`: `V` itself, or `f64`
/// ([`F64x8`]) for rows whose outputs need the `f64` exp's accuracy (an `f32` lane's exp is
/// within 0.6 ulp of `f32`; a gradient that cancels needs more).
pub(crate) trait SweepLanes<V: Vector>: Vector {
    unsafe fn from_row(v: V) -> Self;
    /// [`Lanes::store_exp`] (only sweeps in the row's own lanes cache their terms).
    unsafe fn store_exp<E: Lanes<V = V>>(p: *mut f32, n: usize, e: Self, ties: Self);
}

impl<V: Vector> SweepLanes<V> for V {
    #[inline(always)]
    unsafe fn from_row(v: V) -> Self {
        v
    }
    #[inline(always)]
    unsafe fn store_exp<E: Lanes<V = V>>(p: *mut f32, n: usize, e: Self, ties: Self) {
        E::store_exp(p, n, e, ties);
    }
}

impl SweepLanes<__m256> for F64x8 {
    #[inline(always)]
    unsafe fn from_row(v: __m256) -> Self {
        let (lo, hi) = v.widen();
        F64x8 { lo, hi }
    }
    #[inline(always)]
    unsafe fn store_exp<E: Lanes<V = __m256>>(p: *mut f32, n: usize, e: Self, ties: Self) {
        let scale = _mm256_set1_pd(F32_EXP_SCALE);
        let one = _mm256_set1_pd(1.0);
        let lo = _mm256_mul_pd(_mm256_blendv_pd(e.lo, one, ties.lo), scale);
        let hi = _mm256_mul_pd(_mm256_blendv_pd(e.hi, one, ties.hi), scale);
        store_first(p, n, lo, hi);
    }
}

/// Folds the 8 lanes of an `f32x8` with a packed and a scalar `min`/`max` intrinsic (a macro:
/// the intrinsics must be inlined into the caller's target features).
macro_rules! reduce_f32x8 {
    ($v:expr, $packed:ident, $scalar:ident) => {{
        let v: __m256 = $v;
        let m = $packed(_mm256_castps256_ps128(v), _mm256_extractf128_ps::<1>(v));
        let m = $packed(m, _mm_movehl_ps(m, m));
        let m = $scalar(m, _mm_shuffle_ps::<1>(m, m));
        f64::from(_mm_cvtss_f32(m))
    }};
}

/// `f32x8` lanes: `f32` rows, and `f16`/`bf16` rows widened exactly.
impl Vector for __m256 {
    type Tally = __m256i;
    const COMPENSATED: bool = false;
    // 0.6 ulp of f32 for the exp, as much for S, and the f64 products: 2.4·2^-24 < 2^-22.5.
    const EXP_ERROR: f64 = 1.7e-7;
    const EXP_SCALE: f64 = F32_EXP_SCALE;

    #[inline(always)]
    unsafe fn splat(v: f64) -> Self {
        _mm256_set1_ps(v as f32)
    }
    #[inline(always)]
    unsafe fn max(self, other: Self) -> Self {
        _mm256_max_ps(self, other)
    }
    #[inline(always)]
    unsafe fn min(self, other: Self) -> Self {
        _mm256_min_ps(self, other)
    }
    #[inline(always)]
    unsafe fn eq(self, other: Self) -> Self {
        _mm256_cmp_ps::<_CMP_EQ_OQ>(self, other)
    }
    #[inline(always)]
    unsafe fn nan_or_above(self, bound: Self) -> Self {
        _mm256_cmp_ps::<_CMP_NLE_UQ>(self, bound)
    }
    #[inline(always)]
    unsafe fn or(self, other: Self) -> Self {
        _mm256_or_ps(self, other)
    }
    #[inline(always)]
    unsafe fn select(self, other: Self, mask: Self) -> Self {
        _mm256_blendv_ps(self, other, mask)
    }
    #[inline(always)]
    unsafe fn any(self) -> bool {
        _mm256_movemask_ps(self) != 0
    }
    #[inline(always)]
    unsafe fn reduce_max(self) -> f64 {
        reduce_f32x8!(self, _mm_max_ps, _mm_max_ss)
    }
    #[inline(always)]
    unsafe fn reduce_min(self) -> f64 {
        reduce_f32x8!(self, _mm_min_ps, _mm_min_ss)
    }
    #[inline(always)]
    unsafe fn widen(self) -> (__m256d, __m256d) {
        (
            _mm256_cvtps_pd(_mm256_castps256_ps128(self)),
            _mm256_cvtps_pd(_mm256_extractf128_ps::<1>(self)),
        )
    }
    #[inline(always)]
    unsafe fn live(self) -> (__m256d, __m256d) {
        let mask = _mm256_cmp_ps::<_CMP_NEQ_OQ>(self, _mm256_set1_ps(f32::NEG_INFINITY));
        let (lo, hi) = mask.widen();
        // A widened all-ones f32 lane is a NaN: that is the mask in f64 lanes.
        (
            _mm256_cmp_pd::<_CMP_UNORD_Q>(lo, lo),
            _mm256_cmp_pd::<_CMP_UNORD_Q>(hi, hi),
        )
    }

    /// `x − m = s + err` exactly (TwoSum); `s = k·ln2 + r` with Cody–Waite's two-part `ln 2`
    /// (`k·LN2_HI` is exact for |k| < 2^15), `k` rounded by adding 1.5·2^23 (whose low
    /// mantissa bits then hold it), `|r| ≤ ln2/2`; `q = e^r − 1 = r + r²·P(r)` with
    /// [`EXPM1_POLY`]; the result `(1 + q)·2^(k+64)` by one fused multiply-add, so it rounds
    /// once: within 2^-24 + 1.1e-8 of `e^{x−m}·2^64` relative (0.6 ulp of `f32`). The 2^64
    /// keeps every result down to `e^-128` a normal `f32` (a tiny loss is a sum of such
    /// terms); below −128 the result is 0: even 2^31 such terms stay below half of `f32`'s
    /// smallest subnormal (there `2^(k+64)`, built from its bits, would not be a number; those
    /// lanes are masked last).
    #[inline(always)]
    unsafe fn exp_shifted<const ZERO_TIES: bool>(self, m: Self, neg_m: Self) -> Self {
        const LOG2E: f32 = std::f32::consts::LOG2_E;
        const LN2_HI: f32 = 0.693_359_4; // 355/512: 9 significant bits
        const LN2_LO: f32 = -2.121_944_4e-4; // ln 2 − LN2_HI
        const ROUNDER: f32 = 12_582_912.0; // 1.5·2^23
        const FLOOR: f32 = -128.0;
        let x = self;
        let s = _mm256_add_ps(x, neg_m);
        let floor = _mm256_set1_ps(FLOOR);
        let mut zero = _mm256_cmp_ps::<_CMP_LT_OQ>(s, floor);
        if ZERO_TIES {
            zero = _mm256_or_ps(zero, _mm256_cmp_ps::<_CMP_EQ_OQ>(x, m));
        }
        let rounded = _mm256_fmadd_ps(s, _mm256_set1_ps(LOG2E), _mm256_set1_ps(ROUNDER));
        let k = _mm256_sub_ps(rounded, _mm256_set1_ps(ROUNDER));
        let r = _mm256_fmadd_ps(k, _mm256_set1_ps(-LN2_HI), s);
        let r = _mm256_fmadd_ps(k, _mm256_set1_ps(-LN2_LO), r);
        // The subtraction's rounding error, which matters for f16 and bf16 too: their
        // logsumexp and loss are f32, and `x − m` of a logit far below a large max rounds in f32.
        let s_virtual = _mm256_sub_ps(s, x);
        let err = _mm256_add_ps(
            _mm256_sub_ps(x, _mm256_sub_ps(s, s_virtual)),
            _mm256_sub_ps(neg_m, s_virtual),
        );
        let r = _mm256_add_ps(r, err);
        let mut p = _mm256_set1_ps(EXPM1_POLY[4]);
        for c in [EXPM1_POLY[3], EXPM1_POLY[2], EXPM1_POLY[1], EXPM1_POLY[0]] {
            p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(c));
        }
        let q = _mm256_fmadd_ps(_mm256_mul_ps(r, r), p, r);
        // 2^(k+64): the bits of `rounded` are those of ROUNDER plus k.
        let bias = 127 + F32_EXP_SCALE_LOG2 - ROUNDER.to_bits() as i32;
        let scale = _mm256_castsi256_ps(_mm256_slli_epi32::<23>(_mm256_add_epi32(
            _mm256_castps_si256(rounded),
            _mm256_set1_epi32(bias),
        )));
        // The zeroed lanes may hold anything here (x = −inf gives inf − inf; a k below the
        // floor wraps the exponent bits): masked to +0 last.
        _mm256_andnot_ps(zero, _mm256_fmadd_ps(q, scale, scale))
    }

    #[inline(always)]
    unsafe fn tally_zero() -> __m256i {
        _mm256_setzero_si256()
    }
    #[inline(always)]
    unsafe fn tally(t: __m256i, mask: Self) -> __m256i {
        _mm256_sub_epi32(t, _mm256_castps_si256(mask))
    }
    #[inline(always)]
    unsafe fn tally_total(t: __m256i) -> usize {
        let mut lanes = [0i32; 8];
        _mm256_storeu_si256(lanes.as_mut_ptr().cast(), t);
        lanes.iter().map(|&c| c as usize).sum()
    }
}

/// log2 of the scale of the `f32`-lane exp's results.
const F32_EXP_SCALE_LOG2: i32 = 64;
/// 2^64.
const F32_EXP_SCALE: f64 = 18_446_744_073_709_551_616.0;

/// Eight `f64` lanes as two `f64x4`.
#[derive(Clone, Copy)]
pub(crate) struct F64x8 {
    lo: __m256d,
    hi: __m256d,
}

/// Applies a two-operand `f64x4` intrinsic to both halves (a macro, not a closure: closures do
/// not inherit `#[target_feature]`).
macro_rules! both_halves {
    ($f:expr, $a:expr, $b:expr) => {{
        let (a, b): (F64x8, F64x8) = ($a, $b);
        F64x8 {
            lo: $f(a.lo, b.lo),
            hi: $f(a.hi, b.hi),
        }
    }};
}

impl Vector for F64x8 {
    type Tally = (__m256i, __m256i);
    const COMPENSATED: bool = true;
    // About 0.5 ulp of f64 each for the exp and for the compensated S, and the products.
    const EXP_ERROR: f64 = 4.5e-16;
    const EXP_SCALE: f64 = 1.0;

    #[inline(always)]
    unsafe fn splat(v: f64) -> Self {
        let v = _mm256_set1_pd(v);
        Self { lo: v, hi: v }
    }
    #[inline(always)]
    unsafe fn max(self, other: Self) -> Self {
        both_halves!(_mm256_max_pd, self, other)
    }
    #[inline(always)]
    unsafe fn min(self, other: Self) -> Self {
        both_halves!(_mm256_min_pd, self, other)
    }
    #[inline(always)]
    unsafe fn eq(self, other: Self) -> Self {
        both_halves!(_mm256_cmp_pd::<_CMP_EQ_OQ>, self, other)
    }
    #[inline(always)]
    unsafe fn nan_or_above(self, bound: Self) -> Self {
        both_halves!(_mm256_cmp_pd::<_CMP_NLE_UQ>, self, bound)
    }
    #[inline(always)]
    unsafe fn or(self, other: Self) -> Self {
        both_halves!(_mm256_or_pd, self, other)
    }
    #[inline(always)]
    unsafe fn select(self, other: Self, mask: Self) -> Self {
        Self {
            lo: _mm256_blendv_pd(self.lo, other.lo, mask.lo),
            hi: _mm256_blendv_pd(self.hi, other.hi, mask.hi),
        }
    }
    #[inline(always)]
    unsafe fn any(self) -> bool {
        _mm256_movemask_pd(_mm256_or_pd(self.lo, self.hi)) != 0
    }
    #[inline(always)]
    unsafe fn reduce_max(self) -> f64 {
        let v = _mm256_max_pd(self.lo, self.hi);
        let m = _mm_max_pd(_mm256_castpd256_pd128(v), _mm256_extractf128_pd::<1>(v));
        _mm_cvtsd_f64(_mm_max_sd(m, _mm_unpackhi_pd(m, m)))
    }
    #[inline(always)]
    unsafe fn reduce_min(self) -> f64 {
        let v = _mm256_min_pd(self.lo, self.hi);
        let m = _mm_min_pd(_mm256_castpd256_pd128(v), _mm256_extractf128_pd::<1>(v));
        _mm_cvtsd_f64(_mm_min_sd(m, _mm_unpackhi_pd(m, m)))
    }
    #[inline(always)]
    unsafe fn widen(self) -> (__m256d, __m256d) {
        (self.lo, self.hi)
    }
    #[inline(always)]
    unsafe fn live(self) -> (__m256d, __m256d) {
        let minus_inf = _mm256_set1_pd(f64::NEG_INFINITY);
        (
            _mm256_cmp_pd::<_CMP_NEQ_OQ>(self.lo, minus_inf),
            _mm256_cmp_pd::<_CMP_NEQ_OQ>(self.hi, minus_inf),
        )
    }
    #[inline(always)]
    unsafe fn exp_shifted<const ZERO_TIES: bool>(self, m: Self, neg_m: Self) -> Self {
        F64x8 {
            lo: exp_shifted_f64::<ZERO_TIES>(self.lo, m.lo, neg_m.lo),
            hi: exp_shifted_f64::<ZERO_TIES>(self.hi, m.hi, neg_m.hi),
        }
    }
    #[inline(always)]
    unsafe fn tally_zero() -> Self::Tally {
        (_mm256_setzero_si256(), _mm256_setzero_si256())
    }
    #[inline(always)]
    unsafe fn tally(t: Self::Tally, mask: Self) -> Self::Tally {
        (
            _mm256_sub_epi64(t.0, _mm256_castpd_si256(mask.lo)),
            _mm256_sub_epi64(t.1, _mm256_castpd_si256(mask.hi)),
        )
    }
    #[inline(always)]
    unsafe fn tally_total(t: Self::Tally) -> usize {
        let mut lanes = [0i64; 8];
        _mm256_storeu_si256(lanes.as_mut_ptr().cast(), t.0);
        _mm256_storeu_si256(lanes.as_mut_ptr().add(4).cast(), t.1);
        lanes.iter().map(|&c| c as usize).sum()
    }
}

/// `exp(x − m)` in four `f64` lanes, the `f64` counterpart of the `f32`-lane exp: TwoSum of
/// `x − m`; Cody–Waite with fdlibm's two-part `ln 2` (`k·LN2_HI` exact for |k| < 2^21);
/// `q = r + r²·P(r)` with [`EXPM1_POLY_F64`]; `(1 + q)·2^k` as `((1 + q)·2^k₁)·2^k₂` with
/// `k₁ + k₂ = k`, both halves normal powers of two: the fused multiply-add rounds once (within
/// about 0.5 ulp) and the second product is exact unless the result is subnormal, where it
/// rounds to the subnormal grid — as `exp` does. Below `ln 2^-1075` the result is 0.
#[inline(always)]
unsafe fn exp_shifted_f64<const ZERO_TIES: bool>(
    x: __m256d,
    m: __m256d,
    neg_m: __m256d,
) -> __m256d {
    let s = _mm256_add_pd(x, neg_m);
    let floor = _mm256_set1_pd(-745.2);
    let mut zero = _mm256_cmp_pd::<_CMP_LT_OQ>(s, floor);
    if ZERO_TIES {
        zero = _mm256_or_pd(zero, _mm256_cmp_pd::<_CMP_EQ_OQ>(x, m));
    }
    let s = _mm256_max_pd(s, floor);
    let (k, r) = reduce_by_ln2_f64(s);
    let s_virtual = _mm256_sub_pd(s, x);
    let err = _mm256_add_pd(
        _mm256_sub_pd(x, _mm256_sub_pd(s, s_virtual)),
        _mm256_sub_pd(neg_m, s_virtual),
    );
    let q = expm1_reduced_f64(_mm256_add_pd(r, err));
    let q = _mm256_blendv_pd(q, _mm256_set1_pd(-1.0), zero);
    one_plus_times_power_of_two_f64(q, k)
}

/// `s = k·ln 2 + r` with `k` integral and `|r| ≤ ln2/2` (Cody–Waite with fdlibm's two-part
/// `ln 2`: `k·LN2_HI` is exact for |k| < 2^21).
#[inline(always)]
unsafe fn reduce_by_ln2_f64(s: __m256d) -> (__m256d, __m256d) {
    let k = _mm256_round_pd::<{ _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC }>(_mm256_mul_pd(
        s,
        _mm256_set1_pd(std::f64::consts::LOG2_E),
    ));
    let r = _mm256_fmadd_pd(k, _mm256_set1_pd(-LN2_HI), s);
    (k, _mm256_fmadd_pd(k, _mm256_set1_pd(-LN2_LO), r))
}

/// `(1 + q)·2^k` for integral `k ≥ −1075`, as `((1 + q)·2^k₁)·2^k₂` with `k₁ + k₂ = k` both in
/// the normal range: the fused multiply-add rounds once and the second product is exact unless
/// the result is subnormal.
#[inline(always)]
unsafe fn one_plus_times_power_of_two_f64(q: __m256d, k: __m256d) -> __m256d {
    let k1 = _mm256_floor_pd(_mm256_mul_pd(k, _mm256_set1_pd(0.5)));
    let scale1 = power_of_two_f64(k1);
    _mm256_mul_pd(
        _mm256_fmadd_pd(q, scale1, scale1),
        power_of_two_f64(_mm256_sub_pd(k, k1)),
    )
}

/// `e^r − 1 = r + r²·P(r)` for `|r| ≤ ln2/2`, with [`EXPM1_POLY_F64`] by Horner's rule.
#[inline(always)]
unsafe fn expm1_reduced_f64(r: __m256d) -> __m256d {
    let mut p = _mm256_set1_pd(EXPM1_POLY_F64[11]);
    for &c in EXPM1_POLY_F64[..11].iter().rev() {
        p = _mm256_fmadd_pd(p, r, _mm256_set1_pd(c));
    }
    _mm256_fmadd_pd(_mm256_mul_pd(r, r), p, r)
}

/// Soft-capping `cap · tanh(x/cap)` of four `f64` lanes and its slope `1 − tanh²`: the
/// operations of [`LogitMap::with_slope`] step for step (see there), so that the scalar and
/// the vector kernel map a logit to the same bits. `−inf` stays `−inf` (slope 0), NaN stays NaN.
#[inline(always)]
unsafe fn softcap_f64(x: __m256d, cap: __m256d, two_over_cap: __m256d) -> (__m256d, __m256d) {
    let sign = _mm256_set1_pd(-0.0);
    // `min` returns its second operand when one is NaN: NaN goes on.
    let s = _mm256_min_pd(
        _mm256_set1_pd(SOFTCAP_FLOOR),
        _mm256_mul_pd(_mm256_andnot_pd(sign, x), two_over_cap),
    );
    let (k, r) = reduce_by_ln2_f64(_mm256_xor_pd(s, sign));
    let q = expm1_reduced_f64(r);
    let v = one_plus_times_power_of_two_f64(q, k);
    let p = power_of_two_f64(_mm256_max_pd(k, _mm256_set1_pd(-60.0)));
    let u = _mm256_fmadd_pd(q, p, _mm256_sub_pd(p, _mm256_set1_pd(1.0)));
    let one = _mm256_set1_pd(1.0);
    let reciprocal = _mm256_div_pd(one, _mm256_add_pd(one, v));
    let t = _mm256_mul_pd(_mm256_xor_pd(u, sign), reciprocal);
    let magnitude = _mm256_andnot_pd(sign, _mm256_mul_pd(cap, t));
    let y = _mm256_or_pd(magnitude, _mm256_and_pd(sign, x));
    let slope = _mm256_mul_pd(
        _mm256_mul_pd(_mm256_mul_pd(_mm256_set1_pd(4.0), v), reciprocal),
        reciprocal,
    );
    let minus_inf = _mm256_set1_pd(f64::NEG_INFINITY);
    let masked = _mm256_cmp_pd::<_CMP_EQ_OQ>(x, minus_inf);
    (
        _mm256_blendv_pd(y, minus_inf, masked),
        _mm256_andnot_pd(masked, slope),
    )
}

/// The map a pass applies to each logit, in the lanes `W` it computes in.
trait LaneMap<W: Vector>: Copy {
    /// What [`Self::times_slope`] needs (nothing for the identity).
    type Slope: Copy;
    /// How far the map may move the argument of `exp(y − m)`, relative to the exp's own error
    /// terms: the absolute error of `y − m`.
    fn argument_error(self) -> f64;
    /// The map of a row's maximum: the map is increasing, so it is the maximum of the mapped row.
    fn map_max(self, max: f64) -> f64;
    /// The mapped lanes, and what the gradient is multiplied by there.
    unsafe fn apply(self, x: W) -> (W, Self::Slope);
    unsafe fn times_slope(slope: Self::Slope, g: (__m256d, __m256d)) -> (__m256d, __m256d);
    /// What the read pass caches for the write pass of a plain row, from the exp terms `e`
    /// (0 at ties with the block max): the term, and the lanes whose term is 1.
    unsafe fn cache_term(slope: Self::Slope, e: W, ties: W) -> (W, W);
}

/// Logits as given.
#[derive(Clone, Copy)]
struct Unmapped;

impl<W: Vector> LaneMap<W> for Unmapped {
    type Slope = ();
    fn argument_error(self) -> f64 {
        0.0
    }
    fn map_max(self, max: f64) -> f64 {
        max
    }
    #[inline(always)]
    unsafe fn apply(self, x: W) -> (W, ()) {
        (x, ())
    }
    #[inline(always)]
    unsafe fn times_slope((): (), g: (__m256d, __m256d)) -> (__m256d, __m256d) {
        g
    }
    #[inline(always)]
    unsafe fn cache_term((): (), e: W, ties: W) -> (W, W) {
        (e, ties)
    }
}

/// Soft-capped logits ([`LogitMap::Softcap`]), in `f64` lanes.
#[derive(Clone, Copy)]
struct Capped {
    cap: f64,
}

impl LaneMap<F64x8> for Capped {
    type Slope = F64x8;
    fn argument_error(self) -> f64 {
        // About 3 ulp of |y| ≤ cap, for y and for m.
        6.0 * self.cap * f64::EPSILON / 2.0
    }
    fn map_max(self, max: f64) -> f64 {
        LogitMap::Softcap(self.cap).apply(max)
    }
    #[inline(always)]
    unsafe fn apply(self, x: F64x8) -> (F64x8, F64x8) {
        let (cap, two_over_cap) = (_mm256_set1_pd(self.cap), _mm256_set1_pd(2.0 / self.cap));
        let (lo, lo_slope) = softcap_f64(x.lo, cap, two_over_cap);
        let (hi, hi_slope) = softcap_f64(x.hi, cap, two_over_cap);
        (
            F64x8 { lo, hi },
            F64x8 {
                lo: lo_slope,
                hi: hi_slope,
            },
        )
    }
    #[inline(always)]
    unsafe fn times_slope(slope: F64x8, g: (__m256d, __m256d)) -> (__m256d, __m256d) {
        (_mm256_mul_pd(slope.lo, g.0), _mm256_mul_pd(slope.hi, g.1))
    }
    /// `slope · exp(y − m_b)`: the write pass's rescaling then gives the gradient with its slope.
    #[inline(always)]
    unsafe fn cache_term(slope: F64x8, e: F64x8, ties: F64x8) -> (F64x8, F64x8) {
        let e = e.select(F64x8::splat(1.0), ties);
        let (lo, hi) = Self::times_slope(slope, (e.lo, e.hi));
        (F64x8 { lo, hi }, F64x8::splat(0.0))
    }
}

/// `2^k` for four integral `f64` exponents in the normal range: `k + 1.5·2^52 + 1023` is exact
/// and its low mantissa bits are the biased exponent.
#[inline(always)]
unsafe fn power_of_two_f64(k: __m256d) -> __m256d {
    const EXPONENT_MAGIC: f64 = 6_755_399_441_055_744.0 + 1023.0;
    let biased = _mm256_castpd_si256(_mm256_add_pd(k, _mm256_set1_pd(EXPONENT_MAGIC)));
    _mm256_castsi256_pd(_mm256_slli_epi64::<52>(biased))
}

#[inline(always)]
unsafe fn horizontal_sum(v: __m256d) -> f64 {
    let s = _mm_add_pd(_mm256_castpd256_pd128(v), _mm256_extractf128_pd::<1>(v));
    _mm_cvtsd_f64(_mm_add_sd(s, _mm_unpackhi_pd(s, s)))
}

/// Per-lane sums of exp terms in `f64`, with a per-lane TwoSum carry for vectors whose
/// [`Vector::COMPENSATED`] says so.
#[derive(Clone, Copy)]
struct LaneSums<V> {
    sum: [__m256d; 2],
    carry: [__m256d; 2],
    vector: core::marker::PhantomData<V>,
}

impl<V: Vector> LaneSums<V> {
    #[inline(always)]
    unsafe fn new() -> Self {
        let zero = _mm256_setzero_pd();
        Self {
            sum: [zero; 2],
            carry: [zero; 2],
            vector: core::marker::PhantomData,
        }
    }

    #[inline(always)]
    unsafe fn add(&mut self, terms: (__m256d, __m256d)) {
        for (i, term) in [terms.0, terms.1].into_iter().enumerate() {
            let sum = _mm256_add_pd(self.sum[i], term);
            if V::COMPENSATED {
                let virtual_term = _mm256_sub_pd(sum, self.sum[i]);
                let err = _mm256_add_pd(
                    _mm256_sub_pd(self.sum[i], _mm256_sub_pd(sum, virtual_term)),
                    _mm256_sub_pd(term, virtual_term),
                );
                self.carry[i] = _mm256_add_pd(self.carry[i], err);
            }
            self.sum[i] = sum;
        }
    }

    /// The eight lanes' total divided by `V::EXP_SCALE` (exactly), plus `extra` (an exact
    /// small integer).
    #[inline(always)]
    unsafe fn total(&self, extra: f64) -> CompensatedSum {
        let mut total = CompensatedSum::ZERO;
        let unscale = 1.0 / V::EXP_SCALE;
        if V::COMPENSATED {
            let mut lanes = [0.0; 16];
            for (i, v) in self.sum.iter().chain(&self.carry).enumerate() {
                _mm256_storeu_pd(lanes.as_mut_ptr().add(4 * i), *v);
            }
            lanes.iter().for_each(|&v| total.add(v * unscale));
            total.add(extra);
        } else {
            let sum = horizontal_sum(_mm256_add_pd(self.sum[0], self.sum[1]));
            total.add(sum * unscale + extra);
        }
        total
    }
}

/// The last `len % 8` elements of a row, copied into a full vector padded with `fill`.
#[inline(always)]
fn padded<E: Element>(tail: &[E], fill: E) -> [E; 8] {
    let mut buf = [fill; 8];
    buf[..tail.len()].copy_from_slice(tail);
    buf
}

fn neg_inf<E: Element>() -> E {
    E::from_f64(f64::NEG_INFINITY)
}

/// Runs `$body` with `$x` bound to each vector of `$row` (`&[$e]`), the last one padded with
/// `−inf`. A macro, not a closure: closures do not inherit `#[target_feature]`, and their
/// intrinsics would become calls.
/// With `|$x, $at, $n|`, also binds the vector's offset in the row and how many of its lanes
/// are row elements (8, or fewer in the tail).
macro_rules! for_each_vector {
    ($e:ty, $row:expr, |$x:ident| $body:block) => {
        for_each_vector!($e, $row, |$x, _at, _n| $body)
    };
    ($e:ty, $row:expr, |$x:ident, $at:ident, $n:ident| $body:block) => {{
        let row: &[$e] = $row;
        let (body, tail) = row.split_at(row.len() / 8 * 8);
        for (i, v) in body.chunks_exact(8).enumerate() {
            let ($x, $at, $n) = (<$e as Lanes>::load8(v.as_ptr()), 8 * i, 8);
            $body
        }
        if !tail.is_empty() {
            let buf = padded(tail, neg_inf::<$e>());
            let ($x, $at, $n) = (<$e as Lanes>::load8(buf.as_ptr()), body.len(), tail.len());
            $body
        }
    }};
}

/// Evaluates `$body` (two `f64x4`) for each vector `$v` read at `$x` and stores it at `$out`,
/// `$len` elements (the tail padded with `−inf`). `$x` and `$out` may be the same memory: every
/// vector is read before it is written.
macro_rules! map_vectors {
    ($e:ty, $x:expr, $out:expr, $len:expr, |$v:ident| $body:block) => {{
        let (x, out, len): (*const $e, *mut $e, usize) = ($x, $out, $len);
        let body = len / 8 * 8;
        let mut i = 0;
        while i < body {
            let $v = <$e as Lanes>::load8(x.add(i));
            let (lo, hi) = $body;
            <$e as Lanes>::store8(out.add(i), lo, hi);
            i += 8;
        }
        let tail = len - body;
        if tail > 0 {
            let buf = padded(core::slice::from_raw_parts(x.add(body), tail), neg_inf::<$e>());
            let mut result = [<$e as Element>::zero(); 8];
            let $v = <$e as Lanes>::load8(buf.as_ptr());
            let (lo, hi) = $body;
            <$e as Lanes>::store8(result.as_mut_ptr(), lo, hi);
            core::ptr::copy_nonoverlapping(result.as_ptr(), out.add(body), tail);
        }
    }};
}

/// Where the read pass leaves what the write pass reuses, and what it gathers.
struct ScanSink {
    /// Count `−inf` elements and track the finite minimum (the loss and the logit statistics
    /// need them; logsumexp and softmax do not).
    tally: bool,
    /// Block maxima (rows of at most [`MAX_CACHED_LEN`]).
    maxima: Option<*mut BlockMaxima>,
    /// With `maxima`: an output row of the same length that receives each block's
    /// `exp(x − m_b)` (1 at `x = m_b`, 0 in fully masked blocks).
    cache: Option<*mut f32>,
}

impl ScanSink {
    const TALLY: Self = Self {
        tally: true,
        maxima: None,
        cache: None,
    };
}

/// The read pass over a row; `None` when it holds NaN or `+inf` (the scalar kernel then finds
/// the first one and applies the caller's policy).
#[inline(always)]
unsafe fn scan_impl<E: Lanes, W: SweepLanes<E::V>, M: LaneMap<W>>(
    row: &[E],
    sink: ScanSink,
    map: M,
) -> Option<RowScan> {
    let mut state = RowState::EMPTY;
    let mut masked = 0;
    let (mut min, mut max) = (f64::INFINITY, f64::NEG_INFINITY);
    let inf = E::V::splat(f64::INFINITY);
    let minus_inf = E::V::splat(f64::NEG_INFINITY);
    for block in row.chunks(BLOCK) {
        // Sweep 1: max (and with the tally: min of finite elements, −inf count). NaN and
        // `+inf` need no test of their own: `+inf` is the block max, and a NaN makes the max
        // or the exp sweep's sum NaN — except in a block of only −inf and NaN.
        let (mut hi, mut lo) = (minus_inf, inf);
        let mut masked_lanes = E::V::tally_zero();
        if sink.tally {
            for_each_vector!(E, block, |x| {
                hi = hi.max(x);
                let is_masked = x.eq(minus_inf);
                lo = lo.min(x.select(inf, is_masked));
                masked_lanes = E::V::tally(masked_lanes, is_masked);
            });
        } else {
            for_each_vector!(E, block, |x| {
                hi = hi.max(x);
            });
        }
        let block_max = hi.reduce_max();
        let no_finite = block_max == f64::NEG_INFINITY;
        if block_max == f64::INFINITY
            || block_max.is_nan()
            || (no_finite && block.iter().any(|x| x.to_f64().is_nan()))
        {
            return None;
        }
        if sink.tally {
            masked += E::V::tally_total(masked_lanes) - (8 - block.len() % 8) % 8;
            min = min.min(lo.reduce_min());
        }
        let mapped_max = map.map_max(block_max);
        if let Some(maxima) = sink.maxima {
            let maxima = &mut *maxima;
            maxima.push(mapped_max);
        }
        let cache = sink
            .cache
            .map(|c| c.add(block.as_ptr().offset_from(row.as_ptr()) as usize));
        if no_finite {
            if let Some(cache) = cache {
                core::ptr::write_bytes(cache, 0, block.len());
            }
            continue;
        }
        max = max.max(block_max);
        // Sweep 2 (from L1): Σ exp(y − m_b) over the mapped elements below the mapped max.
        let (m, neg_m) = (W::splat(mapped_max), W::splat(-mapped_max));
        let mut sums = LaneSums::<W>::new();
        let mut ties = W::tally_zero();
        // The max sweep waits on memory, the exp sweep on arithmetic: fetching the next block
        // during this one overlaps the two (a prefetch never faults, even past the row's end).
        let next = block.as_ptr().wrapping_add(2 * BLOCK).cast::<i8>();
        for_each_vector!(E, block, |x, at, n| {
            _mm_prefetch::<_MM_HINT_T0>(next.wrapping_add(at * size_of::<E>()));
            let (y, slope) = map.apply(W::from_row(x));
            let e = y.exp_shifted::<true>(m, neg_m);
            sums.add(e.widen());
            let is_tie = y.eq(m);
            ties = W::tally(ties, is_tie);
            if let Some(cache) = cache {
                let (term, is_one) = M::cache_term(slope, e, is_tie);
                W::store_exp::<E>(cache.add(at), n, term, is_one);
            }
        });
        let rest = sums.total((W::tally_total(ties) - 1) as f64);
        if rest.value().is_nan() {
            return None; // a NaN element
        }
        state = state.merge(RowState::from_parts(mapped_max, rest));
    }
    Some(RowScan {
        state,
        first_non_finite: None,
        masked,
        finite_min: min,
        finite_max: max,
        nan: 0,
        pos_inf: 0,
    })
}

/// `softmax_i = exp(x_i − m) / S` (row not fully masked).
#[inline(always)]
unsafe fn softmax_impl<E: Lanes>(x: &[E], max: f64, denominator: f64, out: &mut [E]) {
    let (m, neg_m) = (E::V::splat(max), E::V::splat(-max));
    let inv = _mm256_set1_pd(1.0 / denominator / E::V::EXP_SCALE);
    map_vectors!(E, x.as_ptr(), out.as_mut_ptr(), x.len(), |v| {
        let (lo, hi) = v.exp_shifted::<false>(m, neg_m).widen();
        (_mm256_mul_pd(lo, inv), _mm256_mul_pd(hi, inv))
    });
}

/// Multiplies each block of cached exp terms (`len` `f32` at `cache`) by its factor (in `f64`,
/// rounded once) into `out`: the write pass of a cached row. `cache` may be `out` itself.
#[inline(always)]
unsafe fn rescale_impl<E: Lanes>(
    cache: *const f32,
    out: *mut E,
    len: usize,
    maxima: &BlockMaxima,
    max: f64,
    c: f64,
) {
    let c = c / F32_EXP_SCALE;
    let zero = _mm256_setzero_pd();
    for (b, (_, factor)) in maxima.factors(max, c).enumerate() {
        let start = b * BLOCK;
        let end = len.min(start + BLOCK);
        let mut i = start;
        // Half-type outputs take the product in f32 when the factor is a normal f32 (a
        // smaller one would lose results the half type's range still holds).
        if E::HALF && (factor.abs() >= f64::from(f32::MIN_POSITIVE) && factor.abs() <= 1.0) {
            let (factor, zero) = (_mm256_set1_ps(factor as f32), _mm256_setzero_ps());
            while i < end {
                let n = (end - i).min(8);
                let v = _mm256_fmadd_ps(load_cached(cache.add(i), n), factor, zero);
                if n == 8 {
                    E::store8_f32(out.add(i), v);
                } else {
                    let mut buf = [<E as Element>::zero(); 8];
                    E::store8_f32(buf.as_mut_ptr(), v);
                    core::ptr::copy_nonoverlapping(buf.as_ptr(), out.add(i), n);
                }
                i += 8;
            }
            continue;
        }
        let factor = _mm256_set1_pd(factor);
        while i < end {
            let n = (end - i).min(8);
            let (lo, hi) = load_cached(cache.add(i), n).widen();
            // `e·f + 0`: a zero term gives +0 whatever the factor's sign.
            let (lo, hi) = (
                _mm256_fmadd_pd(lo, factor, zero),
                _mm256_fmadd_pd(hi, factor, zero),
            );
            store_first(out.add(i), n, lo, hi);
            i += 8;
        }
    }
}

/// `log_softmax_i = (x_i − m) − log1p(s')`, saturating finite results at `−MAX`, `−inf` kept.
#[inline(always)]
unsafe fn log_softmax_impl<E: Lanes>(x: &[E], max: f64, log1p_sum: f64, out: &mut [E]) {
    let (m, l) = (_mm256_set1_pd(max), _mm256_set1_pd(log1p_sum));
    let floor = _mm256_set1_pd(-E::MAX.to_f64());
    let minus_inf = _mm256_set1_pd(f64::NEG_INFINITY);
    map_vectors!(E, x.as_ptr(), out.as_mut_ptr(), x.len(), |v| {
        let (lo, hi) = v.widen();
        (
            log_prob(lo, m, l, floor, minus_inf),
            log_prob(hi, m, l, floor, minus_inf),
        )
    });
}

/// `max((x − m) − l, floor)`, `−inf` where `x` is.
#[inline(always)]
unsafe fn log_prob(
    x: __m256d,
    m: __m256d,
    l: __m256d,
    floor: __m256d,
    minus_inf: __m256d,
) -> __m256d {
    let v = _mm256_max_pd(_mm256_sub_pd(_mm256_sub_pd(x, m), l), floor);
    _mm256_blendv_pd(v, minus_inf, _mm256_cmp_pd::<_CMP_EQ_OQ>(x, minus_inf))
}

/// The cross-entropy gradient `g_i = c · exp(x_i − m) − b` on live classes and `+0` on masked
/// ones; `x` and `g` may be the same memory (the in-place loss). With `SWEEP`,
/// also returns `Σ_live (m − x_i)` (every term ≥ 0), else 0.
#[inline(always)]
unsafe fn ce_grad_impl<E: Lanes, const SWEEP: bool>(
    x: *const E,
    g: *mut E,
    len: usize,
    max: f64,
    c: f64,
    b: f64,
) -> f64 {
    let (m, neg_m) = (E::V::splat(max), E::V::splat(-max));
    let (c, b) = (_mm256_set1_pd(c / E::V::EXP_SCALE), _mm256_set1_pd(b));
    let mut distance = Distance::new(max);
    map_vectors!(E, x, g, len, |v| {
        let (e_lo, e_hi) = v.exp_shifted::<false>(m, neg_m).widen();
        let (live_lo, live_hi) = v.live();
        if SWEEP {
            distance.add(v, live_lo, live_hi);
        }
        // Masked lanes are +0 whatever the signs of `c` and `b`.
        (
            _mm256_and_pd(live_lo, _mm256_fmsub_pd(c, e_lo, b)),
            _mm256_and_pd(live_hi, _mm256_fmsub_pd(c, e_hi, b)),
        )
    });
    distance.total()
}

/// `Σ_live (m − x_i)` in `f64` (every term ≥ 0; exact for `f32`/`f16`/`bf16` rows).
struct Distance {
    m: __m256d,
    lo: __m256d,
    hi: __m256d,
}

impl Distance {
    #[inline(always)]
    unsafe fn new(max: f64) -> Self {
        Self {
            m: _mm256_set1_pd(max),
            lo: _mm256_setzero_pd(),
            hi: _mm256_setzero_pd(),
        }
    }

    #[inline(always)]
    unsafe fn add<V: Vector>(&mut self, v: V, live_lo: __m256d, live_hi: __m256d) {
        let (x_lo, x_hi) = v.widen();
        self.lo = _mm256_add_pd(self.lo, _mm256_and_pd(live_lo, _mm256_sub_pd(self.m, x_lo)));
        self.hi = _mm256_add_pd(self.hi, _mm256_and_pd(live_hi, _mm256_sub_pd(self.m, x_hi)));
    }

    /// Adds `u_i (m − x_i)` on live lanes with `u_i > 0` (an `f64` row's `m − x_i` may be
    /// `+inf`, which a zero mass must not turn into NaN).
    #[inline(always)]
    unsafe fn add_weighted<V: Vector>(
        &mut self,
        v: V,
        live: (__m256d, __m256d),
        u: (__m256d, __m256d),
    ) {
        let (x_lo, x_hi) = v.widen();
        self.lo = _mm256_add_pd(self.lo, weighted_distance(self.m, x_lo, u.0, live.0));
        self.hi = _mm256_add_pd(self.hi, weighted_distance(self.m, x_hi, u.1, live.1));
    }

    #[inline(always)]
    unsafe fn total(&self) -> f64 {
        horizontal_sum(_mm256_add_pd(self.lo, self.hi))
    }
}

/// The per-class target masses `u_i = w_i · (share + keep · q_i)` of [`ClassMasses`], eight at
/// a time (null pointers: no weights, no probability targets).
#[derive(Clone, Copy)]
struct MassLanes<E> {
    weights: *const f64,
    probabilities: *const E,
    share: __m256d,
    keep: __m256d,
}

impl<E: Lanes> MassLanes<E> {
    #[inline(always)]
    unsafe fn new(masses: &ClassMasses<'_, '_, E>) -> Self {
        Self {
            weights: masses.weights.map_or(core::ptr::null(), <[f64]>::as_ptr),
            probabilities: masses
                .probabilities
                .map_or(core::ptr::null(), <[E]>::as_ptr),
            share: _mm256_set1_pd(masses.share),
            keep: _mm256_set1_pd(masses.keep),
        }
    }

    /// The masses of the `n` classes from `at` (the rest of the 8 lanes: `share`).
    #[inline(always)]
    unsafe fn at(&self, at: usize, n: usize) -> (__m256d, __m256d) {
        let (mut lo, mut hi) = (self.share, self.share);
        if !self.probabilities.is_null() {
            let p = self.probabilities.add(at);
            let q = if n == 8 {
                E::load8(p)
            } else {
                E::load8(padded(core::slice::from_raw_parts(p, n), E::zero()).as_ptr())
            };
            let (q_lo, q_hi) = q.widen();
            lo = _mm256_fmadd_pd(self.keep, q_lo, lo);
            hi = _mm256_fmadd_pd(self.keep, q_hi, hi);
        }
        if !self.weights.is_null() {
            let w = self.weights.add(at);
            let (w_lo, w_hi) = if n == 8 {
                (_mm256_loadu_pd(w), _mm256_loadu_pd(w.add(4)))
            } else {
                let buf = padded(core::slice::from_raw_parts(w, n), 0.0);
                (
                    _mm256_loadu_pd(buf.as_ptr()),
                    _mm256_loadu_pd(buf.as_ptr().add(4)),
                )
            };
            lo = _mm256_mul_pd(lo, w_lo);
            hi = _mm256_mul_pd(hi, w_hi);
        }
        (lo, hi)
    }
}

/// How far `g_i = c·e_i − b·u_i` may cancel before the error of `c·e_i` in lanes `W`
/// ([`Vector::EXP_ERROR`]) breaks the DESIGN §3 bound: `(normwise, elementwise)` limits on the
/// ratio of `max |c·e_i|` to `max |g_i|` (`f32`: 2 ulp of the row's largest gradient, of which
/// the final rounding takes half an ulp) and of `|c·e_i|` to `|g_i|` (`f16`, `bf16`: 1 ulp of
/// each gradient, half of it left after rounding). `f64` outputs have no limit: the scalar
/// kernel's own `f64` exp errs as much as the vector one.
///
/// `argument_error` is the error a logit map adds to `x_i − m` (0 without one).
fn cancellation_limits<W: Vector>(dtype: DType, argument_error: f64) -> (f64, f64) {
    let unit = match dtype {
        DType::F64 => return (f64::INFINITY, f64::INFINITY),
        DType::F32 => f64::from(f32::EPSILON) / 2.0,
        DType::F16 => f64::from(f16::EPSILON) / 2.0,
        DType::BF16 => f64::from(bf16::EPSILON) / 2.0,
    };
    let exp_error = W::EXP_ERROR + argument_error;
    if dtype == DType::F32 {
        (1.5 * unit / exp_error, f64::INFINITY)
    } else {
        (f64::INFINITY, 0.5 * unit / exp_error)
    }
}

/// The cross-entropy gradient with per-class masses and a logit map `y = map(x)`,
/// `g_i = slope_i · (c · exp(y_i − m) − b · u_i)` on live classes and `+0` on masked ones,
/// stored at `g` when `STORE` (`x` and `g` may be the same memory); also sums
/// `Σ_live u_i (m − y_i)` and, with `VERIFY`, tests for cancellation. With neither, only the
/// sum (no exp).
#[inline(always)]
unsafe fn ce_grad_masses_impl<
    E: Lanes,
    W: SweepLanes<E::V>,
    M: LaneMap<W>,
    const STORE: bool,
    const VERIFY: bool,
>(
    x: *const E,
    g: *mut E,
    len: usize,
    (max, c, b): (f64, f64, f64),
    masses: MassLanes<E>,
    map: M,
) -> MassesPass {
    let (m, neg_m) = (W::splat(max), W::splat(-max));
    let (c, b) = (_mm256_set1_pd(c / W::EXP_SCALE), _mm256_set1_pd(b));
    let mut distance = Distance::new(max);
    let (normwise, elementwise) = cancellation_limits::<W>(E::DTYPE, map.argument_error());
    let elementwise = _mm256_set1_pd(elementwise);
    let sign = _mm256_set1_pd(-0.0);
    let zero = _mm256_setzero_pd();
    let (mut peak_ce, mut peak_g, mut cancels) = (zero, zero, zero);
    let mut at = 0;
    while at < len {
        let n = (len - at).min(8);
        let v = if n == 8 {
            E::load8(x.add(at))
        } else {
            E::load8(padded(core::slice::from_raw_parts(x.add(at), n), neg_inf::<E>()).as_ptr())
        };
        let live = v.live();
        let u = masses.at(at, n);
        let (y, slope) = map.apply(W::from_row(v));
        distance.add_weighted(y, live, u);
        if STORE || VERIFY {
            let (e_lo, e_hi) = y.exp_shifted::<false>(m, neg_m).widen();
            let (ce_lo, ce_hi) = (_mm256_mul_pd(c, e_lo), _mm256_mul_pd(c, e_hi));
            let (g_lo, g_hi) = (
                _mm256_fnmadd_pd(b, u.0, ce_lo),
                _mm256_fnmadd_pd(b, u.1, ce_hi),
            );
            // The map's slope scales the gradient and what the cancellation test compares.
            let (ce_lo, ce_hi) = M::times_slope(slope, (ce_lo, ce_hi));
            let (g_lo, g_hi) = M::times_slope(slope, (g_lo, g_hi));
            // Masked lanes are +0 whatever the signs of `c` and `b`.
            let (g_lo, g_hi) = (_mm256_and_pd(live.0, g_lo), _mm256_and_pd(live.1, g_hi));
            if VERIFY {
                let (ce_lo, ce_hi) = (_mm256_andnot_pd(sign, ce_lo), _mm256_andnot_pd(sign, ce_hi));
                let (g_lo, g_hi) = (_mm256_andnot_pd(sign, g_lo), _mm256_andnot_pd(sign, g_hi));
                peak_ce = _mm256_max_pd(peak_ce, _mm256_max_pd(ce_lo, ce_hi));
                peak_g = _mm256_max_pd(peak_g, _mm256_max_pd(g_lo, g_hi));
                let far_lo = _mm256_cmp_pd::<_CMP_GT_OQ>(ce_lo, _mm256_mul_pd(elementwise, g_lo));
                let far_hi = _mm256_cmp_pd::<_CMP_GT_OQ>(ce_hi, _mm256_mul_pd(elementwise, g_hi));
                cancels = _mm256_or_pd(cancels, _mm256_or_pd(far_lo, far_hi));
            }
            if STORE {
                store_first(g.add(at), n, g_lo, g_hi);
            }
        }
        at += 8;
    }
    MassesPass {
        distance: distance.total(),
        cancels: VERIFY
            && (_mm256_movemask_pd(cancels) != 0
                || lane_max(peak_ce) > normwise * lane_max(peak_g)),
    }
}

/// The largest of four non-negative lanes.
#[inline(always)]
unsafe fn lane_max(v: __m256d) -> f64 {
    let mut lanes = [0.0; 4];
    _mm256_storeu_pd(lanes.as_mut_ptr(), v);
    lanes.into_iter().fold(0.0, f64::max)
}

/// `u (m − x)` where `live` and `u > 0`, else 0.
#[inline(always)]
unsafe fn weighted_distance(m: __m256d, x: __m256d, u: __m256d, live: __m256d) -> __m256d {
    let counted = _mm256_and_pd(live, _mm256_cmp_pd::<_CMP_GT_OQ>(u, _mm256_setzero_pd()));
    _mm256_and_pd(counted, _mm256_mul_pd(u, _mm256_sub_pd(m, x)))
}

/// [`Distance`] over a row on its own (a loss-only call with smoothing).
#[inline(always)]
unsafe fn live_distance_impl<E: Lanes>(x: &[E], max: f64) -> f64 {
    let mut distance = Distance::new(max);
    for_each_vector!(E, x, |v| {
        let (live_lo, live_hi) = v.live();
        distance.add(v, live_lo, live_hi);
    });
    distance.total()
}

/// Runs `$body` with `$a`, `$b` bound to matching vectors of `$y` and `$dy` (the tails padded
/// with zeros), `$at` the offset and `$n` the number of row elements in the vector.
macro_rules! for_each_pair {
    ($e:ty, $y:expr, $dy:expr, |$a:ident, $b:ident, $at:ident, $n:ident| $body:block) => {{
        let (y, dy): (&[$e], &[$e]) = ($y, $dy);
        let body = y.len() / 8 * 8;
        let mut i = 0;
        while i < body {
            let ($a, $b, $at, $n) = (
                <$e as Lanes>::load8(y.as_ptr().add(i)),
                <$e as Lanes>::load8(dy.as_ptr().add(i)),
                i,
                8,
            );
            $body
            i += 8;
        }
        if body < y.len() {
            let zero = <$e as Element>::zero();
            let (ya, da) = (padded(&y[body..], zero), padded(&dy[body..], zero));
            let ($a, $b, $at, $n) = (
                <$e as Lanes>::load8(ya.as_ptr()),
                <$e as Lanes>::load8(da.as_ptr()),
                body,
                y.len() - body,
            );
            $body
        }
    }};
}

/// Stores the first `n` of 8 results at `p`.
#[inline(always)]
unsafe fn store_first<E: Lanes>(p: *mut E, n: usize, lo: __m256d, hi: __m256d) {
    if n == 8 {
        E::store8(p, lo, hi);
    } else {
        let mut buf = [<E as Element>::zero(); 8];
        E::store8(buf.as_mut_ptr(), lo, hi);
        core::ptr::copy_nonoverlapping(buf.as_ptr(), p, n);
    }
}

/// `Σ_j y_j dy_j` (softmax backward) or `Σ_j dy_j` (log-softmax backward), in `f64`.
#[inline(always)]
unsafe fn dot_impl<E: Lanes>(y: &[E], dy: &[E], weighted: bool) -> f64 {
    let (mut acc_lo, mut acc_hi) = (_mm256_setzero_pd(), _mm256_setzero_pd());
    for_each_pair!(E, y, dy, |a, b, _at, _n| {
        let (d_lo, d_hi) = b.widen();
        if weighted {
            let (y_lo, y_hi) = a.widen();
            acc_lo = _mm256_fmadd_pd(y_lo, d_lo, acc_lo);
            acc_hi = _mm256_fmadd_pd(y_hi, d_hi, acc_hi);
        } else {
            acc_lo = _mm256_add_pd(acc_lo, d_lo);
            acc_hi = _mm256_add_pd(acc_hi, d_hi);
        }
    });
    horizontal_sum(_mm256_add_pd(acc_lo, acc_hi))
}

/// `dx_i = y_i · (dy_i − dot)`.
#[inline(always)]
unsafe fn softmax_backward_impl<E: Lanes>(y: &[E], dy: &[E], dot: f64, dx: &mut [E]) {
    let dot = _mm256_set1_pd(dot);
    let out = dx.as_mut_ptr();
    for_each_pair!(E, y, dy, |a, b, at, n| {
        let ((y_lo, y_hi), (d_lo, d_hi)) = (a.widen(), b.widen());
        let lo = _mm256_mul_pd(y_lo, _mm256_sub_pd(d_lo, dot));
        let hi = _mm256_mul_pd(y_hi, _mm256_sub_pd(d_hi, dot));
        store_first(out.add(at), n, lo, hi);
    });
}

/// `dx_i = dy_i − exp(y_i) · total` for log-probabilities `y ≤ 0`; `false` (nothing written)
/// when some `y_i` is positive or NaN, which the scalar kernel handles.
#[inline(always)]
unsafe fn log_softmax_backward_impl<E: Lanes>(y: &[E], dy: &[E], total: f64, dx: &mut [E]) -> bool {
    let zero = E::V::splat(0.0);
    let mut out_of_range = zero.eq(E::V::splat(f64::INFINITY));
    for_each_vector!(E, y, |v| {
        out_of_range = out_of_range.or(v.nan_or_above(zero));
    });
    if out_of_range.any() {
        return false;
    }
    let total = _mm256_set1_pd(total / E::V::EXP_SCALE);
    let out = dx.as_mut_ptr();
    for_each_pair!(E, y, dy, |a, b, at, n| {
        let (e_lo, e_hi) = a.exp_shifted::<false>(zero, zero).widen();
        let (d_lo, d_hi) = b.widen();
        let lo = _mm256_fnmadd_pd(e_lo, total, d_lo);
        let hi = _mm256_fnmadd_pd(e_hi, total, d_hi);
        store_first(out.add(at), n, lo, hi);
    });
    true
}

/// Reinterprets a slice of `E` as the concrete type `T` named by the same [`DType`].
#[inline(always)]
fn cast<E: Element, T: Element>(s: &[E]) -> &[T] {
    debug_assert_eq!(E::DTYPE, T::DTYPE);
    // SAFETY: `Element` is sealed and each DType names exactly one implementing type.
    unsafe { &*(s as *const [E] as *const [T]) }
}

#[inline(always)]
fn cast_mut<E: Element, T: Element>(s: &mut [E]) -> &mut [T] {
    debug_assert_eq!(E::DTYPE, T::DTYPE);
    // SAFETY: as in `cast`.
    unsafe { &mut *(s as *mut [E] as *mut [T]) }
}

/// Runs `$body` with `$l` the concrete storage type of `$e`.
macro_rules! with_lanes {
    ($e:ty, $l:ident => $body:expr) => {
        match <$e as Element>::DTYPE {
            DType::F64 => {
                type $l = f64;
                $body
            }
            DType::F32 => {
                type $l = f32;
                $body
            }
            DType::F16 => {
                type $l = f16;
                $body
            }
            DType::BF16 => {
                type $l = bf16;
                $body
            }
        }
    };
}

// The entry points. SAFETY (all): they are reached only after `active_kernel()` found AVX2,
// FMA and F16C on this CPU; slices are cast to the concrete type their DType names.

/// The read pass; `None` when the row holds NaN or `+inf`. Without `tally` the scan's `masked`
/// and `finite_min` are not gathered (left at 0 and `+inf`).
///
/// With `wide` the exp sweep runs in `f64` lanes (see [`SweepLanes`]); a soft-capped row
/// (`map`) always does, since its map is computed there.
pub(crate) fn scan<E: Element>(
    row: &[E],
    tally: bool,
    wide: bool,
    map: LogitMap,
) -> Option<RowScan> {
    #[target_feature(enable = "avx2,fma,f16c")]
    unsafe fn run<L: Lanes>(row: &[L], tally: bool, wide: bool, map: LogitMap) -> Option<RowScan>
    where
        F64x8: SweepLanes<L::V>,
    {
        let sink = ScanSink {
            tally,
            ..ScanSink::TALLY
        };
        match map {
            LogitMap::Softcap(cap) => scan_impl::<L, F64x8, _>(row, sink, Capped { cap }),
            LogitMap::Identity if wide => scan_impl::<L, F64x8, _>(row, sink, Unmapped),
            LogitMap::Identity => scan_impl::<L, L::V, _>(row, sink, Unmapped),
        }
    }
    with_lanes!(E, L => unsafe { run::<L>(cast(row), tally, wide, map) })
}

/// True when rows of `E` with `len` elements can cache their exp terms in an `f32` buffer.
pub(crate) fn caches<E: Element>(len: usize) -> bool {
    len <= MAX_CACHED_LEN && with_lanes!(E, L => <L as Lanes>::CACHES)
}

/// The read pass, also recording the block maxima and, with `cache`, leaving each block's exp
/// terms there (`None`: NaN or `+inf`, and `cache` holds anything).
///
/// # Panics
/// Unless [`caches`] holds for the row, and `cache` (if any) is as long as the row.
///
/// A soft-capped row (`map`) is read in `f64` lanes and caches `slope · exp(y − m_b)`.
pub(crate) fn scan_caching<E: Element>(
    row: &[E],
    cache: Option<&mut [f32]>,
    maxima: &mut BlockMaxima,
    map: LogitMap,
    tally: bool,
) -> Option<RowScan> {
    #[target_feature(enable = "avx2,fma,f16c")]
    unsafe fn run<L: Lanes>(row: &[L], sink: ScanSink, map: LogitMap) -> Option<RowScan>
    where
        F64x8: SweepLanes<L::V>,
    {
        match map {
            LogitMap::Softcap(cap) => scan_impl::<L, F64x8, _>(row, sink, Capped { cap }),
            LogitMap::Identity => scan_impl::<L, L::V, _>(row, sink, Unmapped),
        }
    }
    assert!(caches::<E>(row.len()));
    assert!(cache.as_ref().is_none_or(|c| c.len() == row.len()));
    maxima.clear();
    let cache = cache.map(|c| c.as_mut_ptr());
    let maxima: *mut BlockMaxima = maxima;
    with_lanes!(E, L => unsafe {
        let sink = ScanSink {
            tally,
            maxima: Some(maxima),
            cache,
        };
        run::<L>(cast(row), sink, map)
    })
}

/// The write pass of a cached row: `out_i ← c · exp(m_b − m) · cache_i` per block, with the
/// cache in `out` itself when `cache` is `None` (an `f32` row).
///
/// # Panics
/// When the cache's length differs from `out`'s, or `cache` is `None` for a row other than
/// `f32`.
pub(crate) fn rescale<E: Element>(
    out: &mut [E],
    cache: Option<&[f32]>,
    maxima: &BlockMaxima,
    max: f64,
    c: f64,
) {
    #[target_feature(enable = "avx2,fma,f16c")]
    unsafe fn run<L: Lanes>(
        cache: *const f32,
        out: &mut [L],
        maxima: &BlockMaxima,
        max: f64,
        c: f64,
    ) {
        rescale_impl(cache, out.as_mut_ptr(), out.len(), maxima, max, c);
    }
    let cache = match cache {
        Some(cache) => {
            assert_eq!(cache.len(), out.len());
            cache.as_ptr()
        }
        None => {
            assert_eq!(E::DTYPE, DType::F32, "only an f32 row caches in itself");
            out.as_ptr().cast::<f32>()
        }
    };
    with_lanes!(E, L => unsafe { run::<L>(cache, cast_mut(out), maxima, max, c) });
}

/// Softmax write pass.
pub(crate) fn softmax<E: Element>(x: &[E], max: f64, denominator: f64, out: &mut [E]) {
    #[target_feature(enable = "avx2,fma,f16c")]
    unsafe fn run<L: Lanes>(x: &[L], max: f64, denominator: f64, out: &mut [L]) {
        softmax_impl(x, max, denominator, out);
    }
    with_lanes!(E, L => unsafe { run::<L>(cast(x), max, denominator, cast_mut(out)) });
}

/// Log-softmax write pass.
pub(crate) fn log_softmax<E: Element>(x: &[E], max: f64, log1p_sum: f64, out: &mut [E]) {
    #[target_feature(enable = "avx2,fma,f16c")]
    unsafe fn run<L: Lanes>(x: &[L], max: f64, log1p_sum: f64, out: &mut [L]) {
        log_softmax_impl(x, max, log1p_sum, out);
    }
    with_lanes!(E, L => unsafe { run::<L>(cast(x), max, log1p_sum, cast_mut(out)) });
}

/// The cross-entropy write pass `w` from `x` into `g`, or only its sweep when `g` is `None`
/// (see [`FastWrite`]).
pub(crate) fn ce_grad<E: Element>(
    x: &[E],
    g: Option<&mut [E]>,
    w: &FastWrite<'_, '_, E>,
) -> MassesPass {
    let (len, store) = (x.len(), g.is_some());
    let out = g.map_or(core::ptr::null_mut(), |g| {
        assert_eq!(g.len(), len);
        g.as_mut_ptr()
    });
    with_lanes!(E, L => unsafe {
        ce_grad_raw::<L>(x.as_ptr().cast(), out.cast(), len, &write_as(w), store)
    })
}

/// [`ce_grad`] written over the logits themselves.
pub(crate) fn ce_grad_in_place<E: Element>(x: &mut [E], w: &FastWrite<'_, '_, E>) -> MassesPass {
    let p = x.as_mut_ptr();
    with_lanes!(E, L => unsafe {
        ce_grad_raw::<L>(p.cast_const().cast(), p.cast(), x.len(), &write_as(w), true)
    })
}

/// `m` for the concrete storage type `L` of `E`.
fn masses_as<'t, 'w, E: Element, L: Element>(m: &ClassMasses<'t, 'w, E>) -> ClassMasses<'t, 'w, L> {
    ClassMasses {
        weights: m.weights,
        probabilities: m.probabilities.map(cast),
        share: m.share,
        keep: m.keep,
    }
}

/// `w` for the concrete storage type `L` of `E`.
fn write_as<'t, 'w, E: Element, L: Element>(w: &FastWrite<'t, 'w, E>) -> FastWrite<'t, 'w, L> {
    FastWrite {
        masses: w.masses.as_ref().map(masses_as),
        c: w.c,
        b: w.b,
        max: w.max,
        target: w.target,
        target_grad: w.target_grad,
        sweep_distance: w.sweep_distance,
        map: w.map,
    }
}

/// The target-feature entry of every cross-entropy write pass (`x` and `g` may be the same
/// memory; `g` is not touched unless `store`).
#[target_feature(enable = "avx2,fma,f16c")]
unsafe fn ce_grad_raw<L: Lanes>(
    x: *const L,
    g: *mut L,
    len: usize,
    w: &FastWrite<'_, '_, L>,
    store: bool,
) -> MassesPass
where
    F64x8: SweepLanes<L::V>,
{
    let constants = (w.max, w.c, w.b);
    if w.masses.is_none() && w.map == LogitMap::Identity {
        debug_assert!(store);
        let distance = if w.sweep_distance {
            ce_grad_impl::<L, true>(x, g, len, w.max, w.c, w.b)
        } else {
            ce_grad_impl::<L, false>(x, g, len, w.max, w.c, w.b)
        };
        return MassesPass {
            distance,
            cancels: false,
        };
    }
    let masses = MassLanes::new(w.masses.as_ref().unwrap_or(&ClassMasses::UNIT));
    let (verify, io) = (w.verify(), (x, g, len));
    // Probability targets and soft-capped rows: the exp in f64 lanes, as their read pass
    // ([`scan`] with `wide`).
    match w.map {
        LogitMap::Softcap(cap) => {
            masses_pass::<L, F64x8, _>(io, constants, masses, Capped { cap }, store, verify)
        }
        LogitMap::Identity if verify => {
            masses_pass::<L, F64x8, _>(io, constants, masses, Unmapped, store, verify)
        }
        LogitMap::Identity => {
            debug_assert!(store);
            masses_pass::<L, L::V, _>(io, constants, masses, Unmapped, store, verify)
        }
    }
}

/// [`ce_grad_masses_impl`] with its `STORE` and `VERIFY` chosen at run time.
#[inline(always)]
unsafe fn masses_pass<L: Lanes, W: SweepLanes<L::V>, M: LaneMap<W>>(
    (x, g, len): (*const L, *mut L, usize),
    constants: (f64, f64, f64),
    masses: MassLanes<L>,
    map: M,
    store: bool,
    verify: bool,
) -> MassesPass {
    match (store, verify) {
        (true, true) => {
            ce_grad_masses_impl::<L, W, M, true, true>(x, g, len, constants, masses, map)
        }
        (true, false) => {
            ce_grad_masses_impl::<L, W, M, true, false>(x, g, len, constants, masses, map)
        }
        (false, true) => {
            ce_grad_masses_impl::<L, W, M, false, true>(x, g, len, constants, masses, map)
        }
        (false, false) => {
            ce_grad_masses_impl::<L, W, M, false, false>(x, g, len, constants, masses, map)
        }
    }
}

/// `(Σ_c w_c q_c, max_c q_c)` over a row of probability targets (`w_c` = 1 without weights),
/// or `None` when some `q_c` is not a finite number ≥ 0 (the scalar loop then names it).
pub(crate) fn probability_mass<E: Element>(
    q: &[E],
    weights: Option<&[f64]>,
) -> Option<(CompensatedSum, f64)> {
    #[target_feature(enable = "avx2,fma,f16c")]
    unsafe fn run<L: Lanes>(q: &[L], weights: Option<&[f64]>) -> Option<(CompensatedSum, f64)> {
        let masses = MassLanes::<L>::new(&ClassMasses {
            weights,
            probabilities: None,
            share: 1.0,
            keep: 0.0,
        });
        let (zero, inf) = (_mm256_setzero_pd(), _mm256_set1_pd(f64::INFINITY));
        let all_ones = _mm256_castsi256_pd(_mm256_set1_epi64x(-1));
        let (mut peak, mut invalid) = (zero, zero);
        // Compensated lanes whatever the dtype: `A − a_c` keeps the digits below `A`'s.
        let mut sums = LaneSums::<F64x8>::new();
        let mut at = 0;
        while at < q.len() {
            let n = (q.len() - at).min(8);
            let v = if n == 8 {
                L::load8(q.as_ptr().add(at))
            } else {
                L::load8(padded(&q[at..], L::zero()).as_ptr())
            };
            let (lo, hi) = v.widen();
            // Ordered compares: NaN is invalid too.
            for half in [lo, hi] {
                let ok = _mm256_and_pd(
                    _mm256_cmp_pd::<_CMP_GE_OQ>(half, zero),
                    _mm256_cmp_pd::<_CMP_LT_OQ>(half, inf),
                );
                invalid = _mm256_or_pd(invalid, _mm256_xor_pd(ok, all_ones));
                peak = _mm256_max_pd(peak, half);
            }
            let (w_lo, w_hi) = masses.at(at, n);
            sums.add((_mm256_mul_pd(w_lo, lo), _mm256_mul_pd(w_hi, hi)));
            at += 8;
        }
        if _mm256_movemask_pd(invalid) != 0 {
            return None;
        }
        Some((sums.total(0.0), lane_max(peak)))
    }
    with_lanes!(E, L => unsafe { run::<L>(cast(q), weights) })
}

/// The distance sweep of [`ce_grad`] on its own (a loss-only call): `Σ_live (m − y_i)`, or
/// `Σ_live u_i (m − y_i)` with `masses`, of the mapped logits `y`; the same bits as the write
/// pass's.
pub(crate) fn live_distance<E: Element>(
    x: &[E],
    max: f64,
    masses: Option<&ClassMasses<'_, '_, E>>,
    map: LogitMap,
) -> f64 {
    #[target_feature(enable = "avx2,fma,f16c")]
    unsafe fn run<L: Lanes>(
        x: &[L],
        max: f64,
        masses: Option<&ClassMasses<'_, '_, L>>,
        map: LogitMap,
    ) -> f64
    where
        F64x8: SweepLanes<L::V>,
    {
        let io = (x.as_ptr(), core::ptr::null_mut(), x.len());
        let constants = (max, 0.0, 0.0);
        let lanes = MassLanes::new(masses.unwrap_or(&ClassMasses::UNIT));
        let pass = match (map, masses) {
            (LogitMap::Softcap(cap), _) => {
                masses_pass::<L, F64x8, _>(io, constants, lanes, Capped { cap }, false, false)
            }
            (LogitMap::Identity, None) => return live_distance_impl(x, max),
            (LogitMap::Identity, Some(_)) => {
                masses_pass::<L, L::V, _>(io, constants, lanes, Unmapped, false, false)
            }
        };
        pass.distance
    }
    with_lanes!(E, L => unsafe {
        run::<L>(cast(x), max, masses.map(masses_as).as_ref(), map)
    })
}

/// `Σ_j y_j dy_j` (`weighted`) or `Σ_j dy_j`, in `f64`: the backward ops' row reduction.
pub(crate) fn backward_dot<E: Element>(y: &[E], dy: &[E], weighted: bool) -> f64 {
    #[target_feature(enable = "avx2,fma,f16c")]
    unsafe fn run<L: Lanes>(y: &[L], dy: &[L], weighted: bool) -> f64 {
        dot_impl(y, dy, weighted)
    }
    with_lanes!(E, L => unsafe { run::<L>(cast(y), cast(dy), weighted) })
}

/// Softmax backward's write pass, given the row's `Σ y·dy`.
pub(crate) fn softmax_backward<E: Element>(y: &[E], dy: &[E], dot: f64, dx: &mut [E]) {
    #[target_feature(enable = "avx2,fma,f16c")]
    unsafe fn run<L: Lanes>(y: &[L], dy: &[L], dot: f64, dx: &mut [L]) {
        softmax_backward_impl(y, dy, dot, dx);
    }
    with_lanes!(E, L => unsafe { run::<L>(cast(y), cast(dy), dot, cast_mut(dx)) });
}

/// Log-softmax backward's write pass, given the row's `Σ dy`; `false` (nothing written) for a
/// `y` outside `[−inf, 0]`.
pub(crate) fn log_softmax_backward<E: Element>(
    y: &[E],
    dy: &[E],
    total: f64,
    dx: &mut [E],
) -> bool {
    #[target_feature(enable = "avx2,fma,f16c")]
    unsafe fn run<L: Lanes>(y: &[L], dy: &[L], total: f64, dx: &mut [L]) -> bool {
        log_softmax_backward_impl(y, dy, total, dx)
    }
    with_lanes!(E, L => unsafe { run::<L>(cast(y), cast(dy), total, cast_mut(dx)) })
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The vector soft-cap of `x` (four equal lanes), when this CPU runs the vector kernel.
    fn softcap_lanes(x: f64, cap: f64) -> Option<(f64, f64)> {
        #[target_feature(enable = "avx2,fma")]
        unsafe fn run(x: f64, cap: f64) -> (f64, f64) {
            let (y, slope) = softcap_f64(
                _mm256_set1_pd(x),
                _mm256_set1_pd(cap),
                _mm256_set1_pd(2.0 / cap),
            );
            (_mm256_cvtsd_f64(y), _mm256_cvtsd_f64(slope))
        }
        let fast = is_x86_feature_detected!("avx2") && is_x86_feature_detected!("fma");
        // SAFETY: the features were just detected.
        fast.then(|| unsafe { run(x, cap) })
    }

    /// Logits over every scale, both signs, and the edges of the map.
    fn logits() -> Vec<f64> {
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

    #[test]
    fn softcap_lanes_match_the_scalar_map_bit_for_bit() {
        for cap in [0.1, 1.0, 15.0, 30.0, 50.0, 1e6] {
            for x in logits() {
                let Some((y, slope)) = softcap_lanes(x, cap) else {
                    return;
                };
                let (sy, sslope) = LogitMap::Softcap(cap).with_slope(x);
                assert_eq!(
                    (y.to_bits(), slope.to_bits()),
                    (sy.to_bits(), sslope.to_bits()),
                    "cap {cap}, x {x:e}: vector ({y:e}, {slope:e}) scalar ({sy:e}, {sslope:e})"
                );
            }
        }
        let masked = softcap_lanes(f64::NEG_INFINITY, 30.0);
        assert!(masked.is_none_or(|(y, slope)| y == f64::NEG_INFINITY && slope == 0.0));
        assert!(softcap_lanes(f64::NAN, 30.0).is_none_or(|(y, _)| y.is_nan()));
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
