//! aarch64 NEON (Advanced SIMD): `f32` steps of two `float32x4_t` (8 lanes, as AVX2), `f64`
//! as four `float64x2_t`; masks are the compare results (`uint32x4_t`, `uint64x2_t`), lanes all
//! ones or all zeros.
//!
//! `f16` goes through the conversion instructions `FCVTL`/`FCVTN` (base ARMv8 Advanced SIMD,
//! rounding to nearest even), written as inline assembly: Rust's `vcvt_f32_f16` and
//! `vcvt_f16_f32` need the unstable `f16` type. `bf16` is a 16-bit shift, narrowed with the same
//! integer rounding as the x86 sets.

use core::arch::aarch64::*;
use core::arch::asm;

use half::{bf16, f16};

use super::{Float, Isa, Mask, Pair};

/// NEON.
#[derive(Clone, Copy)]
pub(crate) struct Neon;

/// True when this CPU has NEON.
pub(crate) fn detect() -> bool {
    std::arch::is_aarch64_feature_detected!("neon")
}

/// Runs `f` with NEON enabled (`f` and all it calls are `#[inline(always)]`).
///
/// # Safety
/// The CPU has NEON.
#[target_feature(enable = "neon")]
pub(crate) unsafe fn run<R>(f: impl FnOnce() -> R) -> R {
    f()
}

#[rustfmt::skip]
impl Mask for uint32x4_t {
    type Count = uint32x4_t;
    #[inline(always)] unsafe fn none() -> Self { vdupq_n_u32(0) }
    #[inline(always)] unsafe fn or(self, o: Self) -> Self { vorrq_u32(self, o) }
    #[inline(always)] unsafe fn and(self, o: Self) -> Self { vandq_u32(self, o) }
    #[inline(always)] unsafe fn not(self) -> Self { vmvnq_u32(self) }
    #[inline(always)] unsafe fn any(self) -> bool { vmaxvq_u32(self) != 0 }
    #[inline(always)] unsafe fn count_zero() -> Self { vdupq_n_u32(0) }
    /// Set lanes are −1 as integers.
    #[inline(always)] unsafe fn count(self, c: Self) -> Self { vsubq_u32(c, self) }
    #[inline(always)] unsafe fn total(c: Self) -> usize { vaddvq_u32(c) as usize }
}

#[rustfmt::skip]
impl Mask for uint64x2_t {
    type Count = uint64x2_t;
    #[inline(always)] unsafe fn none() -> Self { vdupq_n_u64(0) }
    #[inline(always)] unsafe fn or(self, o: Self) -> Self { vorrq_u64(self, o) }
    #[inline(always)] unsafe fn and(self, o: Self) -> Self { vandq_u64(self, o) }
    #[inline(always)] unsafe fn not(self) -> Self { veorq_u64(self, vdupq_n_u64(u64::MAX)) }
    #[inline(always)]
    unsafe fn any(self) -> bool { vmaxvq_u32(vreinterpretq_u32_u64(self)) != 0 }
    #[inline(always)] unsafe fn count_zero() -> Self { vdupq_n_u64(0) }
    #[inline(always)] unsafe fn count(self, c: Self) -> Self { vsubq_u64(c, self) }
    #[inline(always)] unsafe fn total(c: Self) -> usize { vaddvq_u64(c) as usize }
}

/// [`Float`] for the vector `$t` of `$s` lanes with the mask `$m`; `$q` the intrinsics' lane
/// suffix (`f32`), `$u`/`$i` the unsigned and signed integer suffixes of that width, `$bits`
/// the mantissa bits.
#[rustfmt::skip]
macro_rules! neon_float {
    ($t:ty, $s:ty, $m:ty, $q:ident, $u:ident, $i:ident, $bits:literal) => { paste::paste! {
        impl Float for $t {
            type Scalar = $s;
            type Mask = $m;
            const LANES: usize = 16 / size_of::<$s>();
            #[inline(always)] unsafe fn splat(v: f64) -> Self { [<vdupq_n_ $q>](v as $s) }
            #[inline(always)] unsafe fn load(p: *const $s) -> Self { [<vld1q_ $q>](p) }
            #[inline(always)] unsafe fn store(self, p: *mut $s) { [<vst1q_ $q>](p, self) }
            #[inline(always)] unsafe fn add(self, o: Self) -> Self { [<vaddq_ $q>](self, o) }
            #[inline(always)] unsafe fn sub(self, o: Self) -> Self { [<vsubq_ $q>](self, o) }
            #[inline(always)] unsafe fn mul(self, o: Self) -> Self { [<vmulq_ $q>](self, o) }
            #[inline(always)] unsafe fn div(self, o: Self) -> Self { [<vdivq_ $q>](self, o) }
            /// NaN when either operand is NaN.
            #[inline(always)] unsafe fn min(self, o: Self) -> Self { [<vminq_ $q>](self, o) }
            #[inline(always)] unsafe fn max(self, o: Self) -> Self { [<vmaxq_ $q>](self, o) }
            #[inline(always)]
            unsafe fn mul_add(self, b: Self, c: Self) -> Self { [<vfmaq_ $q>](c, self, b) }
            #[inline(always)]
            unsafe fn mul_sub(self, b: Self, c: Self) -> Self { [<vfmaq_ $q>]([<vnegq_ $q>](c), self, b) }
            #[inline(always)]
            unsafe fn neg_mul_add(self, b: Self, c: Self) -> Self { [<vfmsq_ $q>](c, self, b) }
            #[inline(always)] unsafe fn round(self) -> Self { [<vrndnq_ $q>](self) }
            #[inline(always)] unsafe fn floor(self) -> Self { [<vrndmq_ $q>](self) }
            #[inline(always)] unsafe fn abs(self) -> Self { [<vabsq_ $q>](self) }
            #[inline(always)] unsafe fn neg(self) -> Self { [<vnegq_ $q>](self) }
            #[inline(always)]
            unsafe fn copysign(self, sign: Self) -> Self {
                let bit = [<vreinterpretq_ $u _ $q>](Self::splat(-0.0));
                [<vbslq_ $q>](bit, sign, self)
            }
            #[inline(always)] unsafe fn eq(self, o: Self) -> $m { [<vceqq_ $q>](self, o) }
            #[inline(always)]
            unsafe fn ne(self, o: Self) -> $m { [<vorrq_ $u>]([<vcltq_ $q>](self, o), [<vcgtq_ $q>](self, o)) }
            #[inline(always)] unsafe fn lt(self, o: Self) -> $m { [<vcltq_ $q>](self, o) }
            #[inline(always)] unsafe fn gt(self, o: Self) -> $m { [<vcgtq_ $q>](self, o) }
            #[inline(always)] unsafe fn ge(self, o: Self) -> $m { [<vcgeq_ $q>](self, o) }
            #[inline(always)]
            unsafe fn nan_or_above(self, o: Self) -> $m { Mask::not([<vcleq_ $q>](self, o)) }
            #[inline(always)]
            unsafe fn select(self, other: Self, mask: $m) -> Self { [<vbslq_ $q>](mask, other, self) }
            #[inline(always)]
            unsafe fn keep(self, mask: $m) -> Self {
                [<vreinterpretq_ $q _ $u>]([<vandq_ $u>]([<vreinterpretq_ $u _ $q>](self), mask))
            }
            #[inline(always)]
            unsafe fn zero_where(self, mask: $m) -> Self {
                [<vreinterpretq_ $q _ $u>]([<vbicq_ $u>]([<vreinterpretq_ $u _ $q>](self), mask))
            }
            #[inline(always)] unsafe fn reduce_max(self) -> f64 { [<vmaxvq_ $q>](self).into() }
            #[inline(always)] unsafe fn reduce_min(self) -> f64 { [<vminvq_ $q>](self).into() }
            #[inline(always)] unsafe fn reduce_sum(self) -> f64 { [<vaddvq_ $q>](self).into() }
            #[inline(always)]
            unsafe fn exponent(self, bias: i32) -> Self {
                let biased = [<vaddq_ $i>]([<vreinterpretq_ $i _ $q>](self), [<vdupq_n_ $i>](bias.into()));
                [<vreinterpretq_ $q _ $i>]([<vshlq_n_ $i>]::<$bits>(biased))
            }
        }
    }};
}
neon_float!(float32x4_t, f32, uint32x4_t, f32, u32, s32, 23);
neon_float!(float64x2_t, f64, uint64x2_t, f64, u64, s64, 52);

#[rustfmt::skip]
impl Isa for Neon {
    const LANES: usize = 8;
    type F32 = Pair<float32x4_t>;
    type Wide = Pair<Pair<float64x2_t>>;
    #[inline(always)]
    unsafe fn widen(v: Pair<float32x4_t>) -> Pair<Pair<float64x2_t>> {
        let widen = |v: float32x4_t| Pair::new(vcvt_f64_f32(vget_low_f32(v)), vcvt_high_f64_f32(v));
        Pair::new(widen(v.lo), widen(v.hi))
    }
    #[inline(always)]
    unsafe fn narrow(v: Pair<Pair<float64x2_t>>) -> Pair<float32x4_t> {
        let narrow = |v: Pair<float64x2_t>| vcvt_high_f32_f64(vcvt_f32_f64(v.lo), v.hi);
        Pair::new(narrow(v.lo), narrow(v.hi))
    }
    #[inline(always)]
    unsafe fn load_f16(p: *const f16) -> Pair<float32x4_t> {
        let halves = vld1q_u16(p.cast());
        let (lo, hi): (float32x4_t, float32x4_t);
        asm!(
            "fcvtl {lo:v}.4s, {h:v}.4h",
            "fcvtl2 {hi:v}.4s, {h:v}.8h",
            h = in(vreg) halves, lo = out(vreg) lo, hi = out(vreg) hi,
            options(pure, nomem, nostack, preserves_flags),
        );
        Pair::new(lo, hi)
    }
    #[inline(always)]
    unsafe fn store_f16(p: *mut f16, v: Pair<float32x4_t>) {
        let halves: uint16x8_t;
        asm!(
            "fcvtn {h:v}.4h, {lo:v}.4s",
            "fcvtn2 {h:v}.8h, {hi:v}.4s",
            lo = in(vreg) v.lo, hi = in(vreg) v.hi, h = out(vreg) halves,
            options(pure, nomem, nostack, preserves_flags),
        );
        vst1q_u16(p.cast(), halves);
    }
    #[inline(always)]
    unsafe fn load_bf16(p: *const bf16) -> Pair<float32x4_t> {
        let halves = vld1q_u16(p.cast());
        let widen = |h: uint16x4_t| vreinterpretq_f32_u32(vshll_n_u16::<16>(h));
        Pair::new(widen(vget_low_u16(halves)), widen(vget_high_u16(halves)))
    }
    #[inline(always)]
    unsafe fn store_bf16(p: *mut bf16, v: Pair<float32x4_t>) {
        // Round to nearest even on the upper 16 bits.
        let top = |v: float32x4_t| {
            let bits = vreinterpretq_u32_f32(v);
            let odd = vandq_u32(vshrq_n_u32::<16>(bits), vdupq_n_u32(1));
            vshrn_n_u32::<16>(vaddq_u32(bits, vaddq_u32(odd, vdupq_n_u32(0x7fff))))
        };
        vst1q_u16(p.cast(), vcombine_u16(top(v.lo), top(v.hi)));
    }
    #[inline(always)]
    unsafe fn prefetch(p: *const i8) {
        asm!("prfm pldl1keep, [{p}]", p = in(reg) p, options(readonly, nostack, preserves_flags));
    }
}

super::super::vector::steps!([] Neon, Pair<float32x4_t>, Pair<float64x2_t>);
