//! x86-64 AVX-512 (F, BW, DQ, VL): `f32x16` steps, `f64` as two `f64x8`, `k` registers as
//! masks. `Avx512<true>` narrows `bf16` with the AVX512-BF16 instruction.

use core::arch::x86_64::*;

use half::{bf16, f16};

use super::{x86_float_ops, Float, Isa, Mask, Pair};

/// AVX-512 F/BW/DQ/VL, with the AVX512-BF16 conversion when `BF16`.
#[derive(Clone, Copy)]
pub(crate) struct Avx512<const BF16: bool>;

/// `Some` when this CPU has AVX-512 F/BW/DQ/VL (and what AVX2 has): `Some(true)` with the
/// AVX512-BF16 conversion. Detected once.
pub(crate) fn detect() -> Option<bool> {
    static DETECTED: std::sync::OnceLock<Option<bool>> = std::sync::OnceLock::new();
    *DETECTED.get_or_init(|| {
        let avx512 = super::avx2::detect()
            && is_x86_feature_detected!("popcnt")
            && is_x86_feature_detected!("avx512f")
            && is_x86_feature_detected!("avx512bw")
            && is_x86_feature_detected!("avx512dq")
            && is_x86_feature_detected!("avx512vl");
        avx512.then(|| is_x86_feature_detected!("avx512bf16"))
    })
}

/// Runs `f` with AVX-512 F/BW/DQ/VL (and what AVX2 has) enabled.
///
/// # Safety
/// The CPU has those features.
#[target_feature(enable = "avx512f,avx512bw,avx512dq,avx512vl,avx2,fma,f16c,popcnt")]
pub(crate) unsafe fn run<R>(f: impl FnOnce() -> R) -> R {
    f()
}

/// [`run`] with AVX512-BF16 too.
///
/// # Safety
/// The CPU has those features.
#[target_feature(enable = "avx512f,avx512bw,avx512dq,avx512vl,avx512bf16,avx2,fma,f16c,popcnt")]
pub(crate) unsafe fn run_bf16<R>(f: impl FnOnce() -> R) -> R {
    f()
}

/// [`Mask`] of a `k` register: one bit per lane.
#[rustfmt::skip]
macro_rules! kmask {
    ($t:ty) => {
        impl Mask for $t {
            type Count = usize;
            #[inline(always)] unsafe fn none() -> Self { 0 }
            #[inline(always)] unsafe fn or(self, o: Self) -> Self { self | o }
            #[inline(always)] unsafe fn and(self, o: Self) -> Self { self & o }
            #[inline(always)] unsafe fn not(self) -> Self { !self }
            #[inline(always)] unsafe fn any(self) -> bool { self != 0 }
            #[inline(always)] unsafe fn count_zero() -> usize { 0 }
            #[inline(always)] unsafe fn count(self, c: usize) -> usize { c + self.count_ones() as usize }
            #[inline(always)] unsafe fn total(c: usize) -> usize { c }
        }
    };
}
kmask!(u8);
kmask!(u16);

/// [`Float`] for the vector `$t` of `$s` lanes (`$p`: `ps`/`pd`, `$i`: integer lanes) with the
/// `k` register `$m` as its mask.
#[rustfmt::skip]
macro_rules! avx512_float {
    ($t:ty, $s:ty, $m:ty, $p:ident, $i:ident, $bits:literal) => { paste::paste! {
        impl Float for $t {
            type Scalar = $s;
            type Mask = $m;
            const LANES: usize = 64 / size_of::<$s>();
            x86_float_ops!($s, _mm512, $p, $i, [<_mm512_set1_ $i>], si512, $bits,
                [<_mm512_roundscale_ $p>], [<_mm512_cmp_ $p _mask>]);
            #[inline(always)]
            unsafe fn select(self, other: Self, mask: $m) -> Self { [<_mm512_mask_blend_ $p>](mask, self, other) }
            #[inline(always)] unsafe fn keep(self, mask: $m) -> Self { [<_mm512_maskz_mov_ $p>](mask, self) }
            #[inline(always)]
            unsafe fn zero_where(self, mask: $m) -> Self { [<_mm512_maskz_mov_ $p>](!mask, self) }
            #[inline(always)] unsafe fn reduce_max(self) -> f64 { [<_mm512_reduce_max_ $p>](self).into() }
            #[inline(always)] unsafe fn reduce_min(self) -> f64 { [<_mm512_reduce_min_ $p>](self).into() }
            #[inline(always)] unsafe fn reduce_sum(self) -> f64 { [<_mm512_reduce_add_ $p>](self).into() }
        }
    }};
}
avx512_float!(__m512, f32, u16, ps, epi32, 23);
avx512_float!(__m512d, f64, u8, pd, epi64, 52);

#[rustfmt::skip]
impl<const BF16: bool> Isa for Avx512<BF16> {
    const LANES: usize = 16;
    type F32 = __m512;
    type Wide = Pair<__m512d>;
    #[inline(always)]
    unsafe fn prefetch(p: *const i8) { _mm_prefetch::<_MM_HINT_T0>(p) }
    #[inline(always)]
    unsafe fn widen(v: __m512) -> Pair<__m512d> {
        Pair::new(
            _mm512_cvtps_pd(_mm512_castps512_ps256(v)),
            _mm512_cvtps_pd(_mm512_extractf32x8_ps::<1>(v)),
        )
    }
    #[inline(always)]
    unsafe fn narrow(v: Pair<__m512d>) -> __m512 {
        let lo = _mm512_castps256_ps512(_mm512_cvtpd_ps(v.lo));
        _mm512_insertf32x8::<1>(lo, _mm512_cvtpd_ps(v.hi))
    }
    #[inline(always)]
    unsafe fn load_f16(p: *const f16) -> __m512 { _mm512_cvtph_ps(_mm256_loadu_si256(p.cast())) }
    #[inline(always)]
    unsafe fn store_f16(p: *mut f16, v: __m512) {
        let halves = _mm512_cvtps_ph::<{ _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC }>(v);
        _mm256_storeu_si256(p.cast(), halves);
    }
    #[inline(always)]
    unsafe fn load_bf16(p: *const bf16) -> __m512 {
        let wide = _mm512_cvtepu16_epi32(_mm256_loadu_si256(p.cast()));
        _mm512_castsi512_ps(_mm512_slli_epi32::<16>(wide))
    }
    #[inline(always)]
    unsafe fn store_bf16(p: *mut bf16, v: __m512) {
        // The instruction reads subnormal inputs as zero: those take the integer rounding.
        if BF16 && _mm512_fpclass_ps_mask::<0x20>(v) == 0 {
            let halves = core::mem::transmute::<__m256bh, __m256i>(_mm512_cvtneps_pbh(v));
            return _mm256_storeu_si256(p.cast(), halves);
        }
        // Round to nearest even on the upper 16 bits.
        let bits = _mm512_castps_si512(v);
        let odd = _mm512_and_si512(_mm512_srli_epi32::<16>(bits), _mm512_set1_epi32(1));
        let rounded = _mm512_add_epi32(bits, _mm512_add_epi32(odd, _mm512_set1_epi32(0x7fff)));
        let top = _mm512_srli_epi32::<16>(rounded);
        _mm256_storeu_si256(p.cast(), _mm512_cvtepi32_epi16(top));
    }
}

super::super::vector::steps!([const BF16: bool] Avx512<BF16>, __m512, __m512d);
