//! x86-64 AVX2 + FMA + F16C: `f32x8` steps, `f64` as two `f64x4`; masks are vectors whose
//! lanes are all ones or all zeros.

use core::arch::x86_64::*;

use half::{bf16, f16};

use super::{x86_float_ops, Float, Isa, Mask, Pair, Vector};

/// AVX2 + FMA + F16C: the token, made only by [`Avx2::detect`].
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) struct Avx2(());

/// Eight `f32` lanes (and a compare's mask of them).
type F32x8 = Vector<__m256, Avx2>;
/// Four `f64` lanes (and a compare's mask of them).
type F64x4 = Vector<__m256d, Avx2>;
/// Per-lane counts of set mask lanes.
type Counts = Vector<__m256i, Avx2>;

impl Avx2 {
    /// The token, when this CPU has AVX2, FMA and F16C.
    pub(crate) fn detect() -> Option<Self> {
        let detected = is_x86_feature_detected!("avx2")
            && is_x86_feature_detected!("fma")
            && is_x86_feature_detected!("f16c");
        detected.then_some(Avx2(()))
    }

    /// Runs `f` with AVX2, FMA and F16C enabled (`f` and all it calls are `#[inline(always)]`).
    #[inline(always)]
    pub(crate) fn run<R>(self, f: impl FnOnce() -> R) -> R {
        // SAFETY: `self` exists, so detection found the features.
        unsafe { enabled(f) }
    }
}

/// [`Avx2::run`]'s `#[target_feature]` entry.
///
/// # Safety
/// The CPU has AVX2, FMA and F16C.
#[target_feature(enable = "avx2,fma,f16c")]
unsafe fn enabled<R>(f: impl FnOnce() -> R) -> R {
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
///
/// Every `unsafe` block calls AVX2 intrinsics on vectors of the set (or with its token): they
/// exist, so the CPU has AVX2.
#[rustfmt::skip]
macro_rules! avx2_float {
    ($t:ty, $s:ty, $p:ident, $ss:ident, $i:ident, $l:ty, $set1i:ident, $bits:literal) => {
        pastey::paste! {
        impl Mask for $t {
            type Count = Counts;
            type Token = Avx2;
            #[inline(always)] fn none(_: Avx2) -> Self { Vector::wrap(unsafe { [<_mm256_setzero_ $p>]() }) }
            #[inline(always)] fn or(self, o: Self) -> Self { Vector::wrap(unsafe { [<_mm256_or_ $p>](self.0, o.0) }) }
            #[inline(always)] fn and(self, o: Self) -> Self { Vector::wrap(unsafe { [<_mm256_and_ $p>](self.0, o.0) }) }
            #[inline(always)]
            fn not(self) -> Self {
                Vector::wrap(unsafe { [<_mm256_xor_ $p>](self.0, [<_mm256_castsi256_ $p>]($set1i(-1))) })
            }
            #[inline(always)] fn any(self) -> bool { unsafe { [<_mm256_movemask_ $p>](self.0) != 0 } }
            #[inline(always)] fn count_zero(_: Avx2) -> Counts { Vector::wrap(unsafe { _mm256_setzero_si256() }) }
            /// Set lanes are −1 as integers.
            #[inline(always)]
            fn count(self, c: Counts) -> Counts {
                Vector::wrap(unsafe { [<_mm256_sub_ $i>](c.0, [<_mm256_cast $p _si256>](self.0)) })
            }
            #[inline(always)]
            fn total(c: Counts) -> usize {
                let mut lanes = [0 as $l; 32 / size_of::<$l>()];
                // SAFETY: `c` exists, so the CPU has AVX; `lanes` holds 32 bytes.
                unsafe { _mm256_storeu_si256(lanes.as_mut_ptr().cast(), c.0) };
                lanes.iter().map(|&c| c as usize).sum()
            }
        }

        impl Float for $t {
            type Scalar = $s;
            type Token = Avx2;
            type Mask = $t;
            const LANES: usize = 32 / size_of::<$s>();
            x86_float_ops!($s, _mm256, $p, $i, $set1i, si256, $bits, [<_mm256_round_ $p>],
                [<_mm256_cmp_ $p>], Avx2(()));
            #[inline(always)]
            fn select(self, other: Self, mask: Self) -> Self { Vector::wrap(unsafe { [<_mm256_blendv_ $p>](self.0, other.0, mask.0) }) }
            #[inline(always)] fn keep(self, mask: Self) -> Self { Vector::wrap(unsafe { [<_mm256_and_ $p>](mask.0, self.0) }) }
            #[inline(always)]
            fn zero_where(self, mask: Self) -> Self { Vector::wrap(unsafe { [<_mm256_andnot_ $p>](mask.0, self.0) }) }
            #[inline(always)]
            fn reduce_max(self) -> f64 { unsafe { [<reduce_ $p>]!(self.0, [<_mm_max_ $p>], [<_mm_max_ $ss>]) } }
            #[inline(always)]
            fn reduce_min(self) -> f64 { unsafe { [<reduce_ $p>]!(self.0, [<_mm_min_ $p>], [<_mm_min_ $ss>]) } }
            #[inline(always)]
            fn reduce_sum(self) -> f64 { unsafe { [<reduce_ $p>]!(self.0, [<_mm_add_ $p>], [<_mm_add_ $ss>]) } }
        }
        }
    };
}
avx2_float!(F32x8, f32, ps, ss, epi32, i32, _mm256_set1_epi32, 23);
avx2_float!(F64x4, f64, pd, sd, epi64, i64, _mm256_set1_epi64x, 52);

/// The conversions' `unsafe` blocks: the vectors given, or `self`, prove the CPU has the set.
#[rustfmt::skip]
impl Isa for Avx2 {
    const LANES: usize = 8;
    type F32 = F32x8;
    type Wide = Pair<F64x4>;
    #[inline(always)]
    fn prefetch(self, p: *const i8) {
        // SAFETY: `self` proves the set; a prefetch never faults.
        unsafe { _mm_prefetch::<_MM_HINT_T0>(p) }
    }
    #[inline(always)]
    fn widen(v: F32x8) -> Pair<F64x4> {
        // SAFETY: `v` proves the set.
        unsafe {
            Pair::new(
                Vector::wrap(_mm256_cvtps_pd(_mm256_castps256_ps128(v.0))),
                Vector::wrap(_mm256_cvtps_pd(_mm256_extractf128_ps::<1>(v.0))),
            )
        }
    }
    #[inline(always)]
    fn narrow(v: Pair<F64x4>) -> F32x8 {
        // SAFETY: `v` proves the set.
        Vector::wrap(unsafe { _mm256_set_m128(_mm256_cvtpd_ps(v.hi.0), _mm256_cvtpd_ps(v.lo.0)) })
    }
    #[inline(always)]
    unsafe fn load_f16(self, p: *const f16) -> F32x8 { Vector::wrap(_mm256_cvtph_ps(_mm_loadu_si128(p.cast()))) }
    #[inline(always)]
    unsafe fn store_f16(p: *mut f16, v: F32x8) {
        _mm_storeu_si128(p.cast(), _mm256_cvtps_ph::<_MM_FROUND_TO_NEAREST_INT>(v.0));
    }
    #[inline(always)]
    unsafe fn load_bf16(self, p: *const bf16) -> F32x8 {
        let wide = _mm256_cvtepu16_epi32(_mm_loadu_si128(p.cast()));
        Vector::wrap(_mm256_castsi256_ps(_mm256_slli_epi32::<16>(wide)))
    }
    #[inline(always)]
    unsafe fn store_bf16(p: *mut bf16, v: F32x8) {
        // Round to nearest even on the upper 16 bits.
        let bits = _mm256_castps_si256(v.0);
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

super::math::steps!([] Avx2, F32x8, F64x4);
