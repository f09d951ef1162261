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

use super::{Float, Isa, Mask, Pair, Vector};

/// NEON: the token, made only by [`Neon::detect`].
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) struct Neon(());

type F32x4 = Vector<float32x4_t, Neon>;
type F64x2 = Vector<float64x2_t, Neon>;
/// A compare's mask of four `f32` lanes, and the per-lane counts of set lanes.
type M32x4 = Vector<uint32x4_t, Neon>;
/// A compare's mask of two `f64` lanes, and the per-lane counts of set lanes.
type M64x2 = Vector<uint64x2_t, Neon>;

impl Neon {
    /// The token, when this CPU has NEON.
    pub(crate) fn detect() -> Option<Self> {
        std::arch::is_aarch64_feature_detected!("neon").then_some(Neon(()))
    }

    /// Runs `f` with NEON enabled (`f` and all it calls are `#[inline(always)]`).
    #[inline(always)]
    pub(crate) fn run<R>(self, f: impl FnOnce() -> R) -> R {
        // SAFETY: `self` exists, so detection found NEON.
        unsafe { enabled(f) }
    }
}

/// [`Neon::run`]'s `#[target_feature]` entry.
///
/// # Safety
/// The CPU has NEON.
#[target_feature(enable = "neon")]
unsafe fn enabled<R>(f: impl FnOnce() -> R) -> R {
    f()
}

// Every `unsafe` block below calls NEON intrinsics on vectors of the set (or with its token):
// they exist, so the CPU has NEON.

#[rustfmt::skip]
impl Mask for M32x4 {
    type Count = M32x4;
    type Token = Neon;
    #[inline(always)] fn none(_: Neon) -> Self { Vector::wrap(unsafe { vdupq_n_u32(0) }) }
    #[inline(always)] fn or(self, o: Self) -> Self { Vector::wrap(unsafe { vorrq_u32(self.0, o.0) }) }
    #[inline(always)] fn and(self, o: Self) -> Self { Vector::wrap(unsafe { vandq_u32(self.0, o.0) }) }
    #[inline(always)] fn not(self) -> Self { Vector::wrap(unsafe { vmvnq_u32(self.0) }) }
    #[inline(always)] fn any(self) -> bool { unsafe { vmaxvq_u32(self.0) != 0 } }
    #[inline(always)] fn count_zero(_: Neon) -> Self { Vector::wrap(unsafe { vdupq_n_u32(0) }) }
    /// Set lanes are −1 as integers.
    #[inline(always)] fn count(self, c: Self) -> Self { Vector::wrap(unsafe { vsubq_u32(c.0, self.0) }) }
    #[inline(always)] fn total(c: Self) -> usize { unsafe { vaddvq_u32(c.0) as usize } }
}

#[rustfmt::skip]
impl Mask for M64x2 {
    type Count = M64x2;
    type Token = Neon;
    #[inline(always)] fn none(_: Neon) -> Self { Vector::wrap(unsafe { vdupq_n_u64(0) }) }
    #[inline(always)] fn or(self, o: Self) -> Self { Vector::wrap(unsafe { vorrq_u64(self.0, o.0) }) }
    #[inline(always)] fn and(self, o: Self) -> Self { Vector::wrap(unsafe { vandq_u64(self.0, o.0) }) }
    #[inline(always)]
    fn not(self) -> Self { Vector::wrap(unsafe { veorq_u64(self.0, vdupq_n_u64(u64::MAX)) }) }
    #[inline(always)]
    fn any(self) -> bool { unsafe { vmaxvq_u32(vreinterpretq_u32_u64(self.0)) != 0 } }
    #[inline(always)] fn count_zero(_: Neon) -> Self { Vector::wrap(unsafe { vdupq_n_u64(0) }) }
    #[inline(always)] fn count(self, c: Self) -> Self { Vector::wrap(unsafe { vsubq_u64(c.0, self.0) }) }
    #[inline(always)] fn total(c: Self) -> usize { unsafe { vaddvq_u64(c.0) as usize } }
}

/// [`Float`] for the vector `$t` of `$s` lanes with the mask `$m`; `$q` the intrinsics' lane
/// suffix (`f32`), `$u`/`$i` the unsigned and signed integer suffixes of that width, `$bits`
/// the mantissa bits.
#[rustfmt::skip]
macro_rules! neon_float {
    ($t:ty, $s:ty, $m:ty, $q:ident, $u:ident, $i:ident, $bits:literal) => { pastey::paste! {
        impl Float for $t {
            type Scalar = $s;
            type Token = Neon;
            type Mask = $m;
            const LANES: usize = 16 / size_of::<$s>();
            #[inline(always)] fn token(self) -> Neon { Neon(()) }
            #[inline(always)] fn splat(_: Neon, v: f64) -> Self { Vector::wrap(unsafe { [<vdupq_n_ $q>](v as $s) }) }
            #[inline(always)] unsafe fn load(_: Neon, p: *const $s) -> Self { Vector::wrap([<vld1q_ $q>](p)) }
            #[inline(always)] unsafe fn store(self, p: *mut $s) { [<vst1q_ $q>](p, self.0) }
            #[inline(always)] fn add(self, o: Self) -> Self { Vector::wrap(unsafe { [<vaddq_ $q>](self.0, o.0) }) }
            #[inline(always)] fn sub(self, o: Self) -> Self { Vector::wrap(unsafe { [<vsubq_ $q>](self.0, o.0) }) }
            #[inline(always)] fn mul(self, o: Self) -> Self { Vector::wrap(unsafe { [<vmulq_ $q>](self.0, o.0) }) }
            #[inline(always)] fn div(self, o: Self) -> Self { Vector::wrap(unsafe { [<vdivq_ $q>](self.0, o.0) }) }
            /// NaN when either operand is NaN.
            #[inline(always)] fn min(self, o: Self) -> Self { Vector::wrap(unsafe { [<vminq_ $q>](self.0, o.0) }) }
            #[inline(always)] fn max(self, o: Self) -> Self { Vector::wrap(unsafe { [<vmaxq_ $q>](self.0, o.0) }) }
            #[inline(always)]
            fn mul_add(self, b: Self, c: Self) -> Self { Vector::wrap(unsafe { [<vfmaq_ $q>](c.0, self.0, b.0) }) }
            #[inline(always)]
            fn mul_sub(self, b: Self, c: Self) -> Self { Vector::wrap(unsafe { [<vfmaq_ $q>]([<vnegq_ $q>](c.0), self.0, b.0) }) }
            #[inline(always)]
            fn neg_mul_add(self, b: Self, c: Self) -> Self { Vector::wrap(unsafe { [<vfmsq_ $q>](c.0, self.0, b.0) }) }
            #[inline(always)] fn round(self) -> Self { Vector::wrap(unsafe { [<vrndnq_ $q>](self.0) }) }
            #[inline(always)] fn floor(self) -> Self { Vector::wrap(unsafe { [<vrndmq_ $q>](self.0) }) }
            #[inline(always)] fn abs(self) -> Self { Vector::wrap(unsafe { [<vabsq_ $q>](self.0) }) }
            #[inline(always)] fn neg(self) -> Self { Vector::wrap(unsafe { [<vnegq_ $q>](self.0) }) }
            #[inline(always)]
            fn copysign(self, sign: Self) -> Self {
                Vector::wrap(unsafe {
                    let bit = [<vreinterpretq_ $u _ $q>]([<vdupq_n_ $q>](-0.0));
                    [<vbslq_ $q>](bit, sign.0, self.0)
                })
            }
            #[inline(always)] fn eq(self, o: Self) -> $m { Vector::wrap(unsafe { [<vceqq_ $q>](self.0, o.0) }) }
            #[inline(always)]
            fn ne(self, o: Self) -> $m {
                Vector::wrap(unsafe { [<vorrq_ $u>]([<vcltq_ $q>](self.0, o.0), [<vcgtq_ $q>](self.0, o.0)) })
            }
            #[inline(always)] fn lt(self, o: Self) -> $m { Vector::wrap(unsafe { [<vcltq_ $q>](self.0, o.0) }) }
            #[inline(always)] fn gt(self, o: Self) -> $m { Vector::wrap(unsafe { [<vcgtq_ $q>](self.0, o.0) }) }
            #[inline(always)] fn ge(self, o: Self) -> $m { Vector::wrap(unsafe { [<vcgeq_ $q>](self.0, o.0) }) }
            #[inline(always)]
            fn nan_or_above(self, o: Self) -> $m {
                let at_most: $m = Vector::wrap(unsafe { [<vcleq_ $q>](self.0, o.0) });
                Mask::not(at_most)
            }
            #[inline(always)]
            fn select(self, other: Self, mask: $m) -> Self { Vector::wrap(unsafe { [<vbslq_ $q>](mask.0, other.0, self.0) }) }
            #[inline(always)]
            fn keep(self, mask: $m) -> Self {
                Vector::wrap(unsafe {
                    [<vreinterpretq_ $q _ $u>]([<vandq_ $u>]([<vreinterpretq_ $u _ $q>](self.0), mask.0))
                })
            }
            #[inline(always)]
            fn zero_where(self, mask: $m) -> Self {
                Vector::wrap(unsafe {
                    [<vreinterpretq_ $q _ $u>]([<vbicq_ $u>]([<vreinterpretq_ $u _ $q>](self.0), mask.0))
                })
            }
            #[inline(always)] fn reduce_max(self) -> f64 { unsafe { [<vmaxvq_ $q>](self.0) }.into() }
            #[inline(always)] fn reduce_min(self) -> f64 { unsafe { [<vminvq_ $q>](self.0) }.into() }
            #[inline(always)] fn reduce_sum(self) -> f64 { unsafe { [<vaddvq_ $q>](self.0) }.into() }
            #[inline(always)]
            fn exponent(self, bias: i32) -> Self {
                Vector::wrap(unsafe {
                    let biased = [<vaddq_ $i>]([<vreinterpretq_ $i _ $q>](self.0), [<vdupq_n_ $i>](bias.into()));
                    [<vreinterpretq_ $q _ $i>]([<vshlq_n_ $i>]::<$bits>(biased))
                })
            }
        }
    }};
}
neon_float!(F32x4, f32, M32x4, f32, u32, s32, 23);
neon_float!(F64x2, f64, M64x2, f64, u64, s64, 52);

/// The conversions' `unsafe` blocks: the vectors given, or `self`, prove the CPU has NEON.
#[rustfmt::skip]
impl Isa for Neon {
    const LANES: usize = 8;
    type F32 = Pair<F32x4>;
    type Wide = Pair<Pair<F64x2>>;
    #[inline(always)]
    fn widen(v: Pair<F32x4>) -> Pair<Pair<F64x2>> {
        // SAFETY: `v` proves NEON.
        let widen = |v: float32x4_t| unsafe {
            Pair::new(Vector::wrap(vcvt_f64_f32(vget_low_f32(v))), Vector::wrap(vcvt_high_f64_f32(v)))
        };
        Pair::new(widen(v.lo.0), widen(v.hi.0))
    }
    #[inline(always)]
    fn narrow(v: Pair<Pair<F64x2>>) -> Pair<F32x4> {
        // SAFETY: `v` proves NEON.
        let narrow = |v: Pair<F64x2>| Vector::wrap(unsafe { vcvt_high_f32_f64(vcvt_f32_f64(v.lo.0), v.hi.0) });
        Pair::new(narrow(v.lo), narrow(v.hi))
    }
    #[inline(always)]
    unsafe fn load_f16(self, p: *const f16) -> Pair<F32x4> {
        let halves = vld1q_u16(p.cast());
        let (lo, hi): (float32x4_t, float32x4_t);
        asm!(
            "fcvtl {lo:v}.4s, {h:v}.4h",
            "fcvtl2 {hi:v}.4s, {h:v}.8h",
            h = in(vreg) halves, lo = out(vreg) lo, hi = out(vreg) hi,
            options(pure, nomem, nostack, preserves_flags),
        );
        Pair::new(Vector::wrap(lo), Vector::wrap(hi))
    }
    #[inline(always)]
    unsafe fn store_f16(p: *mut f16, v: Pair<F32x4>) {
        let halves: uint16x8_t;
        asm!(
            "fcvtn {h:v}.4h, {lo:v}.4s",
            "fcvtn2 {h:v}.8h, {hi:v}.4s",
            lo = in(vreg) v.lo.0, hi = in(vreg) v.hi.0, h = out(vreg) halves,
            options(pure, nomem, nostack, preserves_flags),
        );
        vst1q_u16(p.cast(), halves);
    }
    #[inline(always)]
    unsafe fn load_bf16(self, p: *const bf16) -> Pair<F32x4> {
        let halves = vld1q_u16(p.cast());
        let widen = |h: uint16x4_t| Vector::wrap(vreinterpretq_f32_u32(vshll_n_u16::<16>(h)));
        Pair::new(widen(vget_low_u16(halves)), widen(vget_high_u16(halves)))
    }
    #[inline(always)]
    unsafe fn store_bf16(p: *mut bf16, v: Pair<F32x4>) {
        // Round to nearest even on the upper 16 bits.
        let top = |v: F32x4| {
            let bits = vreinterpretq_u32_f32(v.0);
            let odd = vandq_u32(vshrq_n_u32::<16>(bits), vdupq_n_u32(1));
            vshrn_n_u32::<16>(vaddq_u32(bits, vaddq_u32(odd, vdupq_n_u32(0x7fff))))
        };
        vst1q_u16(p.cast(), vcombine_u16(top(v.lo), top(v.hi)));
    }
    #[inline(always)]
    fn prefetch(self, p: *const i8) {
        // SAFETY: `self` proves NEON; a prefetch never faults.
        unsafe {
            asm!("prfm pldl1keep, [{p}]", p = in(reg) p, options(readonly, nostack, preserves_flags));
        }
    }
}

super::math::steps!([] Neon, Pair<F32x4>, Pair<F64x2>);
