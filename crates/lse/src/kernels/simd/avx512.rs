//! x86-64 AVX-512 (F, BW, DQ, VL): `f32x16` steps, `f64` as two `f64x8`, `k` registers as
//! masks. `Avx512<true>` narrows `bf16` with the AVX512-BF16 instruction.

use core::arch::x86_64::*;

use half::{bf16, f16};

use super::{x86_float_ops, Float, Isa, Mask, Pair, Vector};

/// AVX-512 F/BW/DQ/VL, with the AVX512-BF16 conversion when `BF16`: the token, made only by
/// [`Avx512::detect`].
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) struct Avx512<const BF16: bool>(());

/// Sixteen `f32` lanes.
type F32x16<const B: bool> = Vector<__m512, Avx512<B>>;
/// Eight `f64` lanes.
type F64x8<const B: bool> = Vector<__m512d, Avx512<B>>;

/// `(AVX-512 F/BW/DQ/VL and what AVX2 has, AVX512-BF16)` on this CPU. Detected once.
fn detected() -> (bool, bool) {
    static DETECTED: std::sync::OnceLock<(bool, bool)> = std::sync::OnceLock::new();
    *DETECTED.get_or_init(|| {
        let avx512 = super::avx2::Avx2::detect().is_some()
            && is_x86_feature_detected!("popcnt")
            && is_x86_feature_detected!("avx512f")
            && is_x86_feature_detected!("avx512bw")
            && is_x86_feature_detected!("avx512dq")
            && is_x86_feature_detected!("avx512vl");
        (avx512, avx512 && is_x86_feature_detected!("avx512bf16"))
    })
}

impl<const BF16: bool> Avx512<BF16> {
    /// The token, when this CPU has AVX-512 F/BW/DQ/VL (and what AVX2 has), and with `BF16`
    /// the AVX512-BF16 conversion too.
    pub(crate) fn detect() -> Option<Self> {
        let (avx512, bf16) = detected();
        (avx512 && (bf16 || !BF16)).then_some(Avx512(()))
    }

    /// Runs `f` with the features enabled (`f` and all it calls are `#[inline(always)]`).
    #[inline(always)]
    pub(crate) fn run<R>(self, f: impl FnOnce() -> R) -> R {
        // SAFETY: `self` exists, so detection found the features (with `BF16`, AVX512-BF16).
        unsafe {
            if BF16 {
                enabled_bf16(f)
            } else {
                enabled(f)
            }
        }
    }
}

/// [`Avx512::run`]'s `#[target_feature]` entry.
///
/// # Safety
/// The CPU has AVX-512 F/BW/DQ/VL and what AVX2 has.
#[target_feature(enable = "avx512f,avx512bw,avx512dq,avx512vl,avx2,fma,f16c,popcnt")]
unsafe fn enabled<R>(f: impl FnOnce() -> R) -> R {
    f()
}

/// [`enabled`] with AVX512-BF16 too.
///
/// # Safety
/// The CPU has those features.
#[target_feature(enable = "avx512f,avx512bw,avx512dq,avx512vl,avx512bf16,avx2,fma,f16c,popcnt")]
unsafe fn enabled_bf16<R>(f: impl FnOnce() -> R) -> R {
    f()
}

/// [`Mask`] of a `k` register: one bit per lane (plain integer operations, no intrinsics).
#[rustfmt::skip]
macro_rules! kmask {
    ($t:ty) => {
        impl<const B: bool> Mask for Vector<$t, Avx512<B>> {
            type Count = usize;
            type Token = Avx512<B>;
            #[inline(always)] fn none(_: Avx512<B>) -> Self { Vector::wrap(0) }
            #[inline(always)] fn or(self, o: Self) -> Self { Vector::wrap(self.0 | o.0) }
            #[inline(always)] fn and(self, o: Self) -> Self { Vector::wrap(self.0 & o.0) }
            #[inline(always)] fn not(self) -> Self { Vector::wrap(!self.0) }
            #[inline(always)] fn any(self) -> bool { self.0 != 0 }
            #[inline(always)] fn count_zero(_: Avx512<B>) -> usize { 0 }
            #[inline(always)] fn count(self, c: usize) -> usize { c + self.0.count_ones() as usize }
            #[inline(always)] fn total(c: usize) -> usize { c }
        }
    };
}
kmask!(u8);
kmask!(u16);

/// [`Float`] for the vector `$t` of `$s` lanes (`$p`: `ps`/`pd`, `$i`: integer lanes) with the
/// `k` register `$m` as its mask.
///
/// Every `unsafe` block calls AVX-512 intrinsics on vectors of the set (or with its token):
/// they exist, so the CPU has AVX-512.
#[rustfmt::skip]
macro_rules! avx512_float {
    ($t:ident, $s:ty, $m:ty, $p:ident, $i:ident, $bits:literal) => { pastey::paste! {
        impl<const B: bool> Float for $t<B> {
            type Scalar = $s;
            type Token = Avx512<B>;
            type Mask = Vector<$m, Avx512<B>>;
            const LANES: usize = 64 / size_of::<$s>();
            x86_float_ops!($s, _mm512, $p, $i, [<_mm512_set1_ $i>], si512, $bits,
                [<_mm512_roundscale_ $p>], [<_mm512_cmp_ $p _mask>], Avx512(()));
            #[inline(always)]
            fn select(self, other: Self, mask: Self::Mask) -> Self { Vector::wrap(unsafe { [<_mm512_mask_blend_ $p>](mask.0, self.0, other.0) }) }
            #[inline(always)]
            fn keep(self, mask: Self::Mask) -> Self { Vector::wrap(unsafe { [<_mm512_maskz_mov_ $p>](mask.0, self.0) }) }
            #[inline(always)]
            fn zero_where(self, mask: Self::Mask) -> Self { Vector::wrap(unsafe { [<_mm512_maskz_mov_ $p>](!mask.0, self.0) }) }
            #[inline(always)] fn reduce_max(self) -> f64 { unsafe { [<_mm512_reduce_max_ $p>](self.0) }.into() }
            #[inline(always)] fn reduce_min(self) -> f64 { unsafe { [<_mm512_reduce_min_ $p>](self.0) }.into() }
            #[inline(always)] fn reduce_sum(self) -> f64 { unsafe { [<_mm512_reduce_add_ $p>](self.0) }.into() }
        }
    }};
}
avx512_float!(F32x16, f32, u16, ps, epi32, 23);
avx512_float!(F64x8, f64, u8, pd, epi64, 52);

/// The conversions' `unsafe` blocks: the vectors given, or `self`, prove the CPU has the set.
#[rustfmt::skip]
impl<const BF16: bool> Isa for Avx512<BF16> {
    const LANES: usize = 16;
    type F32 = F32x16<BF16>;
    type Wide = Pair<F64x8<BF16>>;
    #[inline(always)]
    fn prefetch(self, p: *const i8) {
        // SAFETY: `self` proves the set; a prefetch never faults.
        unsafe { _mm_prefetch::<_MM_HINT_T0>(p) }
    }
    #[inline(always)]
    fn widen(v: F32x16<BF16>) -> Pair<F64x8<BF16>> {
        // SAFETY: `v` proves the set.
        unsafe {
            Pair::new(
                Vector::wrap(_mm512_cvtps_pd(_mm512_castps512_ps256(v.0))),
                Vector::wrap(_mm512_cvtps_pd(_mm512_extractf32x8_ps::<1>(v.0))),
            )
        }
    }
    #[inline(always)]
    fn narrow(v: Pair<F64x8<BF16>>) -> F32x16<BF16> {
        // SAFETY: `v` proves the set.
        Vector::wrap(unsafe {
            let lo = _mm512_castps256_ps512(_mm512_cvtpd_ps(v.lo.0));
            _mm512_insertf32x8::<1>(lo, _mm512_cvtpd_ps(v.hi.0))
        })
    }
    #[inline(always)]
    unsafe fn load_f16(self, p: *const f16) -> F32x16<BF16> {
        Vector::wrap(_mm512_cvtph_ps(_mm256_loadu_si256(p.cast())))
    }
    #[inline(always)]
    unsafe fn store_f16(p: *mut f16, v: F32x16<BF16>) {
        let halves = _mm512_cvtps_ph::<{ _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC }>(v.0);
        _mm256_storeu_si256(p.cast(), halves);
    }
    #[inline(always)]
    unsafe fn load_bf16(self, p: *const bf16) -> F32x16<BF16> {
        let wide = _mm512_cvtepu16_epi32(_mm256_loadu_si256(p.cast()));
        Vector::wrap(_mm512_castsi512_ps(_mm512_slli_epi32::<16>(wide)))
    }
    #[inline(always)]
    unsafe fn store_bf16(p: *mut bf16, v: F32x16<BF16>) {
        let v = v.0;
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

super::math::steps!([const BF16: bool] Avx512<BF16>, F32x16<BF16>, F64x8<BF16>);
