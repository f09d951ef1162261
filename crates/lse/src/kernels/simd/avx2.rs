//! x86-64 AVX2 + FMA + F16C: `f32x8` steps, `f64` as two `f64x4`; masks are vectors whose
//! lanes are all ones or all zeros.

use core::arch::x86_64::*;

use half::{bf16, f16};

use super::{x86_float_ops, Float, Isa, Mask, Pair};

/// AVX2 + FMA + F16C.
#[derive(Clone, Copy)]
pub(crate) struct Avx2;

/// Runs `f` with AVX2, FMA and F16C enabled (`f` and all it calls are `#[inline(always)]`).
///
/// # Safety
/// The CPU has AVX2, FMA and F16C.
#[target_feature(enable = "avx2,fma,f16c")]
pub(crate) unsafe fn run<R>(f: impl FnOnce() -> R) -> R {
    f()
}

/// [`Mask`] of a vector type `$t` whose lanes are all ones or all zeros, with `$lanes` integer
/// lanes of its width.
#[rustfmt::skip]
macro_rules! vector_mask {
    ($t:ty, $lanes:ty, $zero:ident, $or:ident, $and:ident, $xor:ident, $movemask:ident,
     $from_bits:ident, $to_bits:ident, $set1:ident, $sub:ident) => {
        impl Mask for $t {
            type Count = __m256i;
            #[inline(always)] unsafe fn none() -> Self { $zero() }
            #[inline(always)] unsafe fn or(self, o: Self) -> Self { $or(self, o) }
            #[inline(always)] unsafe fn and(self, o: Self) -> Self { $and(self, o) }
            #[inline(always)] unsafe fn not(self) -> Self { $xor(self, $from_bits($set1(-1))) }
            #[inline(always)] unsafe fn any(self) -> bool { $movemask(self) != 0 }
            #[inline(always)] unsafe fn count_zero() -> __m256i { _mm256_setzero_si256() }
            /// Set lanes are −1 as integers.
            #[inline(always)]
            unsafe fn count(self, c: __m256i) -> __m256i { $sub(c, $to_bits(self)) }
            #[inline(always)]
            unsafe fn total(c: __m256i) -> usize {
                let mut lanes = [0 as $lanes; 32 / size_of::<$lanes>()];
                _mm256_storeu_si256(lanes.as_mut_ptr().cast(), c);
                lanes.iter().map(|&c| c as usize).sum()
            }
        }
    };
}
vector_mask!(
    __m256,
    i32,
    _mm256_setzero_ps,
    _mm256_or_ps,
    _mm256_and_ps,
    _mm256_xor_ps,
    _mm256_movemask_ps,
    _mm256_castsi256_ps,
    _mm256_castps_si256,
    _mm256_set1_epi32,
    _mm256_sub_epi32
);
vector_mask!(
    __m256d,
    i64,
    _mm256_setzero_pd,
    _mm256_or_pd,
    _mm256_and_pd,
    _mm256_xor_pd,
    _mm256_movemask_pd,
    _mm256_castsi256_pd,
    _mm256_castpd_si256,
    _mm256_set1_epi64x,
    _mm256_sub_epi64
);

/// Folds the 8 lanes of an `f32x8` with a packed and a scalar intrinsic.
macro_rules! reduce_f32x8 {
    ($v:expr, $packed:ident, $scalar:ident) => {{
        let v: __m256 = $v;
        let m = $packed(_mm256_castps256_ps128(v), _mm256_extractf128_ps::<1>(v));
        let m = $packed(m, _mm_movehl_ps(m, m));
        let m = $scalar(m, _mm_shuffle_ps::<1>(m, m));
        f64::from(_mm_cvtss_f32(m))
    }};
}

/// Folds the 4 lanes of an `f64x4` with a packed and a scalar intrinsic.
macro_rules! reduce_f64x4 {
    ($v:expr, $packed:ident, $scalar:ident) => {{
        let v: __m256d = $v;
        let m = $packed(_mm256_castpd256_pd128(v), _mm256_extractf128_pd::<1>(v));
        _mm_cvtsd_f64($scalar(m, _mm_unpackhi_pd(m, m)))
    }};
}

#[rustfmt::skip]
impl Float for __m256 {
    type Scalar = f32;
    type Mask = __m256;
    const LANES: usize = 8;
    x86_float_ops!(f32, set1: _mm256_set1_ps, load: _mm256_loadu_ps, store: _mm256_storeu_ps,
        add: _mm256_add_ps, sub: _mm256_sub_ps, mul: _mm256_mul_ps, div: _mm256_div_ps,
        min: _mm256_min_ps, max: _mm256_max_ps, fmadd: _mm256_fmadd_ps, fmsub: _mm256_fmsub_ps,
        fnmadd: _mm256_fnmadd_ps, round: _mm256_round_ps, and: _mm256_and_ps,
        andnot: _mm256_andnot_ps, or: _mm256_or_ps, xor: _mm256_xor_ps, cmp: _mm256_cmp_ps);
    #[inline(always)]
    unsafe fn select(self, other: Self, mask: Self) -> Self { _mm256_blendv_ps(self, other, mask) }
    #[inline(always)] unsafe fn keep(self, mask: Self) -> Self { _mm256_and_ps(mask, self) }
    #[inline(always)]
    unsafe fn zero_where(self, mask: Self) -> Self { _mm256_andnot_ps(mask, self) }
    #[inline(always)]
    unsafe fn reduce_max(self) -> f64 { reduce_f32x8!(self, _mm_max_ps, _mm_max_ss) }
    #[inline(always)]
    unsafe fn reduce_min(self) -> f64 { reduce_f32x8!(self, _mm_min_ps, _mm_min_ss) }
    #[inline(always)]
    unsafe fn reduce_sum(self) -> f64 { reduce_f32x8!(self, _mm_add_ps, _mm_add_ss) }
    #[inline(always)]
    unsafe fn exponent(self, bias: i32) -> Self {
        let biased = _mm256_add_epi32(_mm256_castps_si256(self), _mm256_set1_epi32(bias));
        _mm256_castsi256_ps(_mm256_slli_epi32::<23>(biased))
    }
}

#[rustfmt::skip]
impl Float for __m256d {
    type Scalar = f64;
    type Mask = __m256d;
    const LANES: usize = 4;
    x86_float_ops!(f64, set1: _mm256_set1_pd, load: _mm256_loadu_pd, store: _mm256_storeu_pd,
        add: _mm256_add_pd, sub: _mm256_sub_pd, mul: _mm256_mul_pd, div: _mm256_div_pd,
        min: _mm256_min_pd, max: _mm256_max_pd, fmadd: _mm256_fmadd_pd, fmsub: _mm256_fmsub_pd,
        fnmadd: _mm256_fnmadd_pd, round: _mm256_round_pd, and: _mm256_and_pd,
        andnot: _mm256_andnot_pd, or: _mm256_or_pd, xor: _mm256_xor_pd, cmp: _mm256_cmp_pd);
    #[inline(always)]
    unsafe fn select(self, other: Self, mask: Self) -> Self { _mm256_blendv_pd(self, other, mask) }
    #[inline(always)] unsafe fn keep(self, mask: Self) -> Self { _mm256_and_pd(mask, self) }
    #[inline(always)]
    unsafe fn zero_where(self, mask: Self) -> Self { _mm256_andnot_pd(mask, self) }
    #[inline(always)]
    unsafe fn reduce_max(self) -> f64 { reduce_f64x4!(self, _mm_max_pd, _mm_max_sd) }
    #[inline(always)]
    unsafe fn reduce_min(self) -> f64 { reduce_f64x4!(self, _mm_min_pd, _mm_min_sd) }
    #[inline(always)]
    unsafe fn reduce_sum(self) -> f64 { reduce_f64x4!(self, _mm_add_pd, _mm_add_sd) }
    #[inline(always)]
    unsafe fn exponent(self, bias: i32) -> Self {
        let biased = _mm256_add_epi64(_mm256_castpd_si256(self), _mm256_set1_epi64x(bias.into()));
        _mm256_castsi256_pd(_mm256_slli_epi64::<52>(biased))
    }
}

#[rustfmt::skip]
impl Isa for Avx2 {
    const LANES: usize = 8;
    type F32 = __m256;
    type Wide = Pair<__m256d>;
    #[inline(always)]
    unsafe fn widen(v: __m256) -> Pair<__m256d> {
        Pair::new(
            _mm256_cvtps_pd(_mm256_castps256_ps128(v)),
            _mm256_cvtps_pd(_mm256_extractf128_ps::<1>(v)),
        )
    }
    #[inline(always)]
    unsafe fn narrow(v: Pair<__m256d>) -> __m256 {
        _mm256_set_m128(_mm256_cvtpd_ps(v.hi), _mm256_cvtpd_ps(v.lo))
    }
    #[inline(always)]
    unsafe fn load_f16(p: *const f16) -> __m256 { _mm256_cvtph_ps(_mm_loadu_si128(p.cast())) }
    #[inline(always)]
    unsafe fn store_f16(p: *mut f16, v: __m256) {
        _mm_storeu_si128(p.cast(), _mm256_cvtps_ph::<_MM_FROUND_TO_NEAREST_INT>(v));
    }
    #[inline(always)]
    unsafe fn load_bf16(p: *const bf16) -> __m256 {
        let wide = _mm256_cvtepu16_epi32(_mm_loadu_si128(p.cast()));
        _mm256_castsi256_ps(_mm256_slli_epi32::<16>(wide))
    }
    #[inline(always)]
    unsafe fn store_bf16(p: *mut bf16, v: __m256) {
        // Round to nearest even on the upper 16 bits.
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

super::super::vector::steps!([] Avx2, __m256, __m256d);
