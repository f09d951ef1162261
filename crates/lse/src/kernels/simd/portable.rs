//! The portable instruction set: lanes as plain arrays (`[f32; 8]`, `[f64; 4]`), every
//! operation a loop over them that the compiler vectorises for whatever the target has (SSE2
//! on x86-64's baseline, NEON, RISC-V V, wasm SIMD128) — the role of pulp's `Scalar` and
//! rten-simd's `GenericIsa`. It needs no `#[target_feature]` entry and no detection, so the one
//! kernel body runs on every target; masks are integer lanes of all ones or all zeros, as AVX2's.
//!
//! Fused multiply-adds: `f64` lanes use `f64::mul_add` (an instruction where the target has
//! one, else the C library's exact `fma`, as the scalar kernel). `f32` lanes use it where the
//! target has the instruction; elsewhere (x86-64's baseline, wasm) they form `a·b + c` in
//! `f64`, where `a·b` is exact, and round that to `f32`: within 2^-29 of the fused result,
//! well inside the exp's 0.6 ulp.

use half::{bf16, f16};

use super::{Float, Isa, Mask, Pair};

/// The portable instruction set's token: every CPU runs it, so anyone may make one.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) struct Portable(());

impl Portable {
    pub(crate) const fn new() -> Self {
        Portable(())
    }
}

/// Eight `f32` lanes.
#[derive(Clone, Copy)]
#[repr(transparent)]
pub(crate) struct F32x8([f32; 8]);

/// Four `f64` lanes.
#[derive(Clone, Copy)]
#[repr(transparent)]
pub(crate) struct F64x4([f64; 4]);

/// Lanes of all ones (set) or all zeros, `N` of `U`.
#[derive(Clone, Copy)]
#[repr(transparent)]
pub(crate) struct Lanes<U, const N: usize>([U; N]);

/// True when `f32::mul_add` is one instruction on this target (not a library call).
const F32_FMA_INSTRUCTION: bool = cfg!(any(
    target_arch = "aarch64",
    target_arch = "riscv64",
    target_feature = "fma"
));

/// `a·b + c` rounded once to `f32` where the target fuses it, else through `f64`.
#[inline(always)]
fn fma_f32(a: f32, b: f32, c: f32) -> f32 {
    if F32_FMA_INSTRUCTION {
        a.mul_add(b, c)
    } else {
        (f64::from(a) * f64::from(b) + f64::from(c)) as f32
    }
}

#[inline(always)]
fn fma_f64(a: f64, b: f64, c: f64) -> f64 {
    a.mul_add(b, c)
}

/// Lane-wise `f` of one, two or three arrays.
#[inline(always)]
fn map<T: Copy, R, const N: usize>(a: [T; N], f: impl Fn(T) -> R) -> [R; N] {
    core::array::from_fn(|i| f(a[i]))
}

#[inline(always)]
fn zip<T: Copy, R, const N: usize>(a: [T; N], b: [T; N], f: impl Fn(T, T) -> R) -> [R; N] {
    core::array::from_fn(|i| f(a[i], b[i]))
}

#[inline(always)]
fn zip3<T: Copy, const N: usize>(
    a: [T; N],
    b: [T; N],
    c: [T; N],
    f: impl Fn(T, T, T) -> T,
) -> [T; N] {
    core::array::from_fn(|i| f(a[i], b[i], c[i]))
}

/// [`Mask`] for integer lanes `$u` of all ones or all zeros, `$n` of them.
macro_rules! lanes_mask {
    ($u:ty, $n:literal) => {
        impl Mask for Lanes<$u, $n> {
            type Count = [$u; $n];
            type Token = Portable;
            #[inline(always)]
            fn none(_: Portable) -> Self {
                Lanes([0; $n])
            }
            #[inline(always)]
            fn or(self, o: Self) -> Self {
                Lanes(zip(self.0, o.0, |a, b| a | b))
            }
            #[inline(always)]
            fn and(self, o: Self) -> Self {
                Lanes(zip(self.0, o.0, |a, b| a & b))
            }
            #[inline(always)]
            fn not(self) -> Self {
                Lanes(map(self.0, |a| !a))
            }
            #[inline(always)]
            fn any(self) -> bool {
                self.0.iter().fold(0, |acc, &a| acc | a) != 0
            }
            #[inline(always)]
            fn count_zero(_: Portable) -> [$u; $n] {
                [0; $n]
            }
            #[inline(always)]
            fn count(self, c: [$u; $n]) -> [$u; $n] {
                zip(c, self.0, |c, m| c + (m & 1))
            }
            #[inline(always)]
            fn total(c: [$u; $n]) -> usize {
                c.iter().map(|&c| c as usize).sum()
            }
        }
    };
}
lanes_mask!(u32, 8);
lanes_mask!(u64, 4);

/// [`Float`] for the array vector `$t` of `$n` `$s` lanes (`$u`: their bits, `$i`: signed
/// bits), its fused multiply-add `$fma`; `$bits` mantissa bits, `2^$bits` is `$big`.
macro_rules! portable_float {
    ($t:ident, $s:ty, $u:ty, $i:ty, $n:literal, $fma:ident, $bits:literal, $big:expr) => {
        impl $t {
            /// Lanes where `f` holds.
            #[inline(always)]
            fn test(self, o: Self, f: impl Fn($s, $s) -> bool) -> Lanes<$u, $n> {
                Lanes(zip(self.0, o.0, |a, b| if f(a, b) { <$u>::MAX } else { 0 }))
            }

            #[inline(always)]
            fn bits(self, f: impl Fn($u) -> $u) -> Self {
                $t(map(self.0, |a| <$s>::from_bits(f(a.to_bits()))))
            }
        }

        impl Float for $t {
            type Scalar = $s;
            type Token = Portable;
            type Mask = Lanes<$u, $n>;
            const LANES: usize = $n;
            #[inline(always)]
            fn token(self) -> Portable {
                Portable(())
            }
            #[inline(always)]
            fn splat(_: Portable, v: f64) -> Self {
                $t([v as $s; $n])
            }
            #[inline(always)]
            unsafe fn load(_: Portable, p: *const $s) -> Self {
                $t(p.cast::<[$s; $n]>().read_unaligned())
            }
            #[inline(always)]
            unsafe fn store(self, p: *mut $s) {
                p.cast::<[$s; $n]>().write_unaligned(self.0);
            }
            #[inline(always)]
            fn add(self, o: Self) -> Self {
                $t(zip(self.0, o.0, |a, b| a + b))
            }
            #[inline(always)]
            fn sub(self, o: Self) -> Self {
                $t(zip(self.0, o.0, |a, b| a - b))
            }
            #[inline(always)]
            fn mul(self, o: Self) -> Self {
                $t(zip(self.0, o.0, |a, b| a * b))
            }
            #[inline(always)]
            fn div(self, o: Self) -> Self {
                $t(zip(self.0, o.0, |a, b| a / b))
            }
            /// `o` unless `self < o`: NaN in `o` is kept.
            #[inline(always)]
            fn min(self, o: Self) -> Self {
                $t(zip(self.0, o.0, |a, b| if a < b { a } else { b }))
            }
            /// `o` unless `self > o`: NaN in `o` is kept.
            #[inline(always)]
            fn max(self, o: Self) -> Self {
                $t(zip(self.0, o.0, |a, b| if a > b { a } else { b }))
            }
            #[inline(always)]
            fn mul_add(self, b: Self, c: Self) -> Self {
                $t(zip3(self.0, b.0, c.0, $fma))
            }
            #[inline(always)]
            fn mul_sub(self, b: Self, c: Self) -> Self {
                $t(zip3(self.0, b.0, c.0, |a, b, c| $fma(a, b, -c)))
            }
            #[inline(always)]
            fn neg_mul_add(self, b: Self, c: Self) -> Self {
                $t(zip3(self.0, b.0, c.0, |a, b, c| $fma(-a, b, c)))
            }
            /// Adding and subtracting `2^bits` rounds `|x| < 2^bits` to an integer, ties to
            /// even; larger magnitudes (and NaN) are integers already.
            #[inline(always)]
            fn round(self) -> Self {
                let big: $s = $big;
                $t(map(self.0, |x| {
                    let r = ((x.abs() + big) - big).copysign(x);
                    if x.abs() < big {
                        r
                    } else {
                        x
                    }
                }))
            }
            #[inline(always)]
            fn floor(self) -> Self {
                let r = self.round();
                $t(zip(r.0, self.0, |r, x| if r > x { r - 1.0 } else { r }))
            }
            #[inline(always)]
            fn abs(self) -> Self {
                self.bits(|b| b & !((1 as $u) << (<$u>::BITS - 1)))
            }
            #[inline(always)]
            fn neg(self) -> Self {
                self.bits(|b| b ^ ((1 as $u) << (<$u>::BITS - 1)))
            }
            #[inline(always)]
            fn copysign(self, sign: Self) -> Self {
                $t(zip(self.0, sign.0, <$s>::copysign))
            }
            #[inline(always)]
            fn eq(self, o: Self) -> Self::Mask {
                self.test(o, |a, b| a == b)
            }
            /// Ordered: `a != b` would hold for NaN.
            #[allow(clippy::double_comparisons)]
            #[inline(always)]
            fn ne(self, o: Self) -> Self::Mask {
                self.test(o, |a, b| a < b || a > b)
            }
            #[inline(always)]
            fn lt(self, o: Self) -> Self::Mask {
                self.test(o, |a, b| a < b)
            }
            #[inline(always)]
            fn gt(self, o: Self) -> Self::Mask {
                self.test(o, |a, b| a > b)
            }
            #[inline(always)]
            fn ge(self, o: Self) -> Self::Mask {
                self.test(o, |a, b| a >= b)
            }
            /// Unordered: `a > b` would not hold for NaN.
            #[allow(clippy::neg_cmp_op_on_partial_ord)]
            #[inline(always)]
            fn nan_or_above(self, o: Self) -> Self::Mask {
                self.test(o, |a, b| !(a <= b))
            }
            #[inline(always)]
            fn select(self, other: Self, mask: Self::Mask) -> Self {
                let (a, b) = (self.0, other.0);
                $t(core::array::from_fn(|i| {
                    <$s>::from_bits(a[i].to_bits() & !mask.0[i] | b[i].to_bits() & mask.0[i])
                }))
            }
            #[inline(always)]
            fn keep(self, mask: Self::Mask) -> Self {
                $t(core::array::from_fn(|i| <$s>::from_bits(self.0[i].to_bits() & mask.0[i])))
            }
            #[inline(always)]
            fn zero_where(self, mask: Self::Mask) -> Self {
                $t(core::array::from_fn(|i| <$s>::from_bits(self.0[i].to_bits() & !mask.0[i])))
            }
            #[inline(always)]
            fn reduce_max(self) -> f64 {
                self.0[1..].iter().fold(self.0[0], |m, &x| if m > x { m } else { x }).into()
            }
            #[inline(always)]
            fn reduce_min(self) -> f64 {
                self.0[1..].iter().fold(self.0[0], |m, &x| if m < x { m } else { x }).into()
            }
            #[inline(always)]
            fn reduce_sum(self) -> f64 {
                self.0[1..].iter().fold(self.0[0], |s, &x| s + x).into()
            }
            #[inline(always)]
            fn exponent(self, bias: i32) -> Self {
                self.bits(|b| ((b as $i).wrapping_add(bias as $i) as $u) << $bits)
            }
        }
    };
}
portable_float!(F32x8, f32, u32, i32, 8, fma_f32, 23, 8_388_608.0);
portable_float!(
    F64x4,
    f64,
    u64,
    i64,
    4,
    fma_f64,
    52,
    4_503_599_627_370_496.0
);

impl Isa for Portable {
    const LANES: usize = 8;
    type F32 = F32x8;
    type Wide = Pair<F64x4>;
    #[inline(always)]
    fn widen(v: F32x8) -> Pair<F64x4> {
        let [a, b, c, d, e, f, g, h] = v.0.map(f64::from);
        Pair::new(F64x4([a, b, c, d]), F64x4([e, f, g, h]))
    }
    /// `as` rounds to nearest even.
    #[inline(always)]
    fn narrow(v: Pair<F64x4>) -> F32x8 {
        let (lo, hi) = (v.lo.0, v.hi.0);
        F32x8(core::array::from_fn(
            |i| if i < 4 { lo[i] } else { hi[i - 4] } as f32,
        ))
    }
    #[inline(always)]
    unsafe fn load_f16(self, p: *const f16) -> F32x8 {
        F32x8(p.cast::<[f16; 8]>().read_unaligned().map(f16::to_f32))
    }
    #[inline(always)]
    unsafe fn store_f16(p: *mut f16, v: F32x8) {
        p.cast::<[f16; 8]>().write_unaligned(v.0.map(f16::from_f32));
    }
    #[inline(always)]
    unsafe fn load_bf16(self, p: *const bf16) -> F32x8 {
        let bits = p.cast::<[u16; 8]>().read_unaligned();
        F32x8(bits.map(|b| f32::from_bits(u32::from(b) << 16)))
    }
    /// Round to nearest even on the upper 16 bits, as the x86 sets' integer path.
    #[inline(always)]
    unsafe fn store_bf16(p: *mut bf16, v: F32x8) {
        let top = v.0.map(|x| {
            let bits = x.to_bits();
            (bits.wrapping_add(((bits >> 16) & 1) + 0x7fff) >> 16) as u16
        });
        p.cast::<[u16; 8]>().write_unaligned(top);
    }
}

super::math::steps!([] Portable, F32x8, F64x4);
