//! x86-64 AVX2 + FMA + F16C: `f32x8` steps, `f64` as two `f64x4`; masks are vectors whose
//! lanes are all ones or all zeros.

use core::arch::x86_64::*;

use half::{bf16, f16};

use super::{x86_float_ops, Float, Isa, Mask, Pair};

/// AVX2 + FMA + F16C.
#[derive(Clone, Copy)]
pub(crate) struct Avx2;

/// True when this CPU has AVX2, FMA and F16C.
pub(crate) fn detect() -> bool {
    is_x86_feature_detected!("avx2")
        && is_x86_feature_detected!("fma")
        && is_x86_feature_detected!("f16c")
}

/// Runs `f` with AVX2, FMA and F16C enabled (`f` and all it calls are `#[inline(always)]`).
///
/// # Safety
/// The CPU has AVX2, FMA and F16C.
#[target_feature(enable = "avx2,fma,f16c")]
pub(crate) unsafe fn run<R>(f: impl FnOnce() -> R) -> R {
    f()
}

/// Folds the 8 lanes of an `f32x8` with a packed and a scalar intrinsic.
macro_rules! reduce_ps {
    ($v:expr, $packed:ident, $scalar:ident) => {{
        let v: __m256 = $v;
        let m = $packed(_mm256_castps256_ps128(v), _mm256_extractf128_ps::<1>(v));
        let m = $packed(m, _mm_movehl_ps(m, m));
        let m = $scalar(m, _mm_shuffle_ps::<1>(m, m));
        f64::from(_mm_cvtss_f32(m))
    }};
}

/// Folds the 4 lanes of an `f64x4` with a packed and a scalar intrinsic.
macro_rules! reduce_pd {
    ($v:expr, $packed:ident, $scalar:ident) => {{
        let v: __m256d = $v;
        let m = $packed(_mm256_castpd256_pd128(v), _mm256_extractf128_pd::<1>(v));
        _mm_cvtsd_f64($scalar(m, _mm_unpackhi_pd(m, m)))
    }};
}

/// [`Float`] for the vector `$t` of `$s` lanes (`$p`: `ps`/`pd`, `$ss`: its scalar form), and
/// [`Mask`] for it as a compare result: lanes all ones or all zeros, `$i`/`$l` integer lanes.
#[rustfmt::skip]
macro_rules! avx2_float {
    ($t:ty, $s:ty, $p:ident, $ss:ident, $i:ident, $l:ty, $set1i:ident, $bits:literal) => {
        paste::paste! {
        impl Mask for $t {
            type Count = __m256i;
            #[inline(always)] unsafe fn none() -> Self { [<_mm256_setzero_ $p>]() }
            #[inline(always)] unsafe fn or(self, o: Self) -> Self { [<_mm256_or_ $p>](self, o) }
            #[inline(always)] unsafe fn and(self, o: Self) -> Self { [<_mm256_and_ $p>](self, o) }
            #[inline(always)]
            unsafe fn not(self) -> Self { [<_mm256_xor_ $p>](self, [<_mm256_castsi256_ $p>]($set1i(-1))) }
            #[inline(always)] unsafe fn any(self) -> bool { [<_mm256_movemask_ $p>](self) != 0 }
            #[inline(always)] unsafe fn count_zero() -> __m256i { _mm256_setzero_si256() }
            /// Set lanes are −1 as integers.
            #[inline(always)]
            unsafe fn count(self, c: __m256i) -> __m256i { [<_mm256_sub_ $i>](c, [<_mm256_cast $p _si256>](self)) }
            #[inline(always)]
            unsafe fn total(c: __m256i) -> usize {
                let mut lanes = [0 as $l; 32 / size_of::<$l>()];
                _mm256_storeu_si256(lanes.as_mut_ptr().cast(), c);
                lanes.iter().map(|&c| c as usize).sum()
            }
        }

        impl Float for $t {
            type Scalar = $s;
            type Mask = $t;
            const LANES: usize = 32 / size_of::<$s>();
            x86_float_ops!($s, _mm256, $p, $i, $set1i, si256, $bits, [<_mm256_round_ $p>],
                [<_mm256_cmp_ $p>]);
            #[inline(always)]
            unsafe fn select(self, other: Self, mask: Self) -> Self { [<_mm256_blendv_ $p>](self, other, mask) }
            #[inline(always)] unsafe fn keep(self, mask: Self) -> Self { [<_mm256_and_ $p>](mask, self) }
            #[inline(always)]
            unsafe fn zero_where(self, mask: Self) -> Self { [<_mm256_andnot_ $p>](mask, self) }
            #[inline(always)]
            unsafe fn reduce_max(self) -> f64 { [<reduce_ $p>]!(self, [<_mm_max_ $p>], [<_mm_max_ $ss>]) }
            #[inline(always)]
            unsafe fn reduce_min(self) -> f64 { [<reduce_ $p>]!(self, [<_mm_min_ $p>], [<_mm_min_ $ss>]) }
            #[inline(always)]
            unsafe fn reduce_sum(self) -> f64 { [<reduce_ $p>]!(self, [<_mm_add_ $p>], [<_mm_add_ $ss>]) }
        }
        }
    };
}
avx2_float!(__m256, f32, ps, ss, epi32, i32, _mm256_set1_epi32, 23);
avx2_float!(__m256d, f64, pd, sd, epi64, i64, _mm256_set1_epi64x, 52);

#[rustfmt::skip]
impl Isa for Avx2 {
    const LANES: usize = 8;
    type F32 = __m256;
    type Wide = Pair<__m256d>;
    #[inline(always)]
    unsafe fn prefetch(p: *const i8) { _mm_prefetch::<_MM_HINT_T0>(p) }
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
