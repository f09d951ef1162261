//! The instruction sets behind one interface, and their registry.
//!
//! [`Float`] vectors of `f32` or `f64` lanes with their [`Mask`]s, and an [`Isa`] that names its
//! `f32` vector, its `f64` pair of the same element count, and the conversions between them and
//! `f16`/`bf16` memory. The kernel body ([`super::vector`]) is written once over these; each
//! instruction set implements them with its intrinsics, every method `#[inline(always)]`, so
//! that under the one `#[target_feature]` entry per instruction set no intrinsic is left as a
//! call. [`portable`] implements them over plain arrays, for every target.
//!
//! The registry: [`Kernel`] names the families, [`VectorIsa`] the instruction sets this build
//! has, [`isa_of`] detects them on this CPU, and [`on_isa!`] runs a body under the active one.

use half::{bf16, f16};

use super::vector::{Step, SweepLanes};

#[cfg(target_arch = "x86_64")]
pub(crate) mod avx2;
#[cfg(target_arch = "x86_64")]
pub(crate) mod avx512;
pub(crate) mod portable;

/// A family of row kernels.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
#[non_exhaustive]
pub enum Kernel {
    /// The fastest kernel this CPU supports (the default), or the family the `LSE_KERNEL`
    /// environment variable names (`scalar`, `portable`, `avx2`, `avx512`, `neon`) when it is
    /// set.
    Auto,
    /// The scalar reference: every element widened to `f64`, each result rounded once.
    Scalar,
    /// The vector kernel over plain arrays that the compiler vectorises: every target.
    Portable,
    /// x86-64 AVX2 + FMA + F16C, selected only where the CPU has them.
    Avx2,
    /// x86-64 AVX-512 F/BW/DQ/VL (with AVX2, FMA, F16C; and the AVX512-BF16 conversion where
    /// the CPU has it), selected only where the CPU has them.
    Avx512,
    /// aarch64 NEON (Advanced SIMD), selected only where the CPU has it.
    Neon,
}

impl Kernel {
    /// Every family, [`Kernel::Auto`] first.
    pub const ALL: [Kernel; 6] = [
        Kernel::Auto,
        Kernel::Scalar,
        Kernel::Portable,
        Kernel::Avx2,
        Kernel::Avx512,
        Kernel::Neon,
    ];

    /// The vector families, the one [`Kernel::Auto`] prefers first.
    pub(crate) const WIDEST_FIRST: [Kernel; 4] =
        [Kernel::Avx512, Kernel::Avx2, Kernel::Neon, Kernel::Portable];

    /// The lower-case name (`auto`, `scalar`, `portable`, `avx2`, `avx512`, `neon`).
    pub fn name(self) -> &'static str {
        match self {
            Kernel::Auto => "auto",
            Kernel::Scalar => "scalar",
            Kernel::Portable => "portable",
            Kernel::Avx2 => "avx2",
            Kernel::Avx512 => "avx512",
            Kernel::Neon => "neon",
        }
    }

    /// True when this CPU runs the family ([`Kernel::Auto`], [`Kernel::Scalar`] and
    /// [`Kernel::Portable`] always).
    pub fn is_supported(self) -> bool {
        matches!(self, Kernel::Auto | Kernel::Scalar) || isa_of(self).is_some()
    }

    /// The families this CPU runs, without [`Kernel::Auto`]: the scalar reference first.
    pub fn supported() -> Vec<Kernel> {
        Kernel::ALL[1..]
            .iter()
            .copied()
            .filter(|k| k.is_supported())
            .collect()
    }
}

/// The instruction sets of this build that the vector kernel runs in.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum VectorIsa {
    Portable,
    #[cfg(target_arch = "x86_64")]
    Avx2,
    #[cfg(target_arch = "x86_64")]
    Avx512,
    /// AVX-512 with the AVX512-BF16 conversion.
    #[cfg(target_arch = "x86_64")]
    Avx512Bf16,
}

/// The instruction set the vector family `kernel` runs in on this CPU; `None` for the scalar
/// family, [`Kernel::Auto`], and a family this CPU or this build's target lacks.
pub(crate) fn isa_of(kernel: Kernel) -> Option<VectorIsa> {
    match kernel {
        Kernel::Portable => Some(VectorIsa::Portable),
        #[cfg(target_arch = "x86_64")]
        Kernel::Avx2 => avx2::detect().then_some(VectorIsa::Avx2),
        #[cfg(target_arch = "x86_64")]
        Kernel::Avx512 => avx512::detect().map(|bf16| {
            if bf16 {
                VectorIsa::Avx512Bf16
            } else {
                VectorIsa::Avx512
            }
        }),
        _ => None,
    }
}

/// Runs `$body` with `$i` the instruction set `$isa` (a [`VectorIsa`] that [`isa_of`] gave),
/// under that instruction set's `#[target_feature]` entry.
#[rustfmt::skip]
macro_rules! on_isa {
    ($isa:expr, $i:ident => $body:expr) => {
        match $isa {
            $crate::kernels::simd::VectorIsa::Portable => {
                type $i = $crate::kernels::simd::portable::Portable;
                #[allow(unused_unsafe)]
                unsafe { $body }
            }
            #[cfg(target_arch = "x86_64")]
            $crate::kernels::simd::VectorIsa::Avx2 => {
                type $i = $crate::kernels::simd::avx2::Avx2;
                // SAFETY: `isa_of` detected the instruction set.
                unsafe { $crate::kernels::simd::avx2::run(#[inline(always)] || $body) }
            }
            #[cfg(target_arch = "x86_64")]
            $crate::kernels::simd::VectorIsa::Avx512 => {
                type $i = $crate::kernels::simd::avx512::Avx512<false>;
                // SAFETY: as above.
                unsafe { $crate::kernels::simd::avx512::run(#[inline(always)] || $body) }
            }
            #[cfg(target_arch = "x86_64")]
            $crate::kernels::simd::VectorIsa::Avx512Bf16 => {
                type $i = $crate::kernels::simd::avx512::Avx512<true>;
                // SAFETY: as above.
                unsafe { $crate::kernels::simd::avx512::run_bf16(#[inline(always)] || $body) }
            }
        }
    };
}
pub(crate) use on_isa;

/// The most elements one step of any instruction set covers (AVX-512: 16).
pub(crate) const MAX_LANES: usize = 16;

/// The lanes a compare selected.
pub(crate) trait Mask: Copy {
    /// Per-lane counters of set lanes.
    type Count: Copy;
    unsafe fn none() -> Self;
    unsafe fn or(self, other: Self) -> Self;
    unsafe fn and(self, other: Self) -> Self;
    unsafe fn not(self) -> Self;
    /// True when some lane is set.
    unsafe fn any(self) -> bool;
    unsafe fn count_zero() -> Self::Count;
    /// `count` plus one in each set lane.
    unsafe fn count(self, count: Self::Count) -> Self::Count;
    unsafe fn total(count: Self::Count) -> usize;
}

/// A vector of `f32` or `f64` lanes. `min` and `max` are x86's: the second operand when one is
/// NaN. Reductions combine the lanes in a fixed order, so their bits depend on the instruction
/// set alone.
pub(crate) trait Float: Copy {
    type Scalar: Copy + Default;
    type Mask: Mask;
    const LANES: usize;
    /// Every lane `v` rounded to the lanes' type.
    unsafe fn splat(v: f64) -> Self;
    unsafe fn load(p: *const Self::Scalar) -> Self;
    unsafe fn store(self, p: *mut Self::Scalar);
    unsafe fn add(self, o: Self) -> Self;
    unsafe fn sub(self, o: Self) -> Self;
    unsafe fn mul(self, o: Self) -> Self;
    unsafe fn div(self, o: Self) -> Self;
    unsafe fn min(self, o: Self) -> Self;
    unsafe fn max(self, o: Self) -> Self;
    /// `self · b + c`, rounded once.
    unsafe fn mul_add(self, b: Self, c: Self) -> Self;
    /// `self · b − c`, rounded once.
    unsafe fn mul_sub(self, b: Self, c: Self) -> Self;
    /// `c − self · b`, rounded once.
    unsafe fn neg_mul_add(self, b: Self, c: Self) -> Self;
    /// To the nearest integer, ties to even.
    unsafe fn round(self) -> Self;
    unsafe fn floor(self) -> Self;
    unsafe fn abs(self) -> Self;
    unsafe fn neg(self) -> Self;
    /// `|self|` with the sign of `sign`.
    unsafe fn copysign(self, sign: Self) -> Self;
    unsafe fn eq(self, o: Self) -> Self::Mask;
    /// Ordered `≠`: false for NaN.
    unsafe fn ne(self, o: Self) -> Self::Mask;
    unsafe fn lt(self, o: Self) -> Self::Mask;
    unsafe fn gt(self, o: Self) -> Self::Mask;
    unsafe fn ge(self, o: Self) -> Self::Mask;
    /// `!(self ≤ bound)`: above `bound`, or NaN.
    unsafe fn nan_or_above(self, bound: Self) -> Self::Mask;
    /// `other` where `mask`, else `self`.
    unsafe fn select(self, other: Self, mask: Self::Mask) -> Self;
    /// `self` where `mask`, else `+0`.
    unsafe fn keep(self, mask: Self::Mask) -> Self;
    /// `+0` where `mask`, else `self`.
    unsafe fn zero_where(self, mask: Self::Mask) -> Self;
    unsafe fn reduce_max(self) -> f64;
    unsafe fn reduce_min(self) -> f64;
    unsafe fn reduce_sum(self) -> f64;
    /// The bits of each lane plus `bias`, shifted into the exponent field: `2^k` from lanes
    /// whose low mantissa bits hold the biased exponent `k` (after adding a rounding constant).
    unsafe fn exponent(self, bias: i32) -> Self;
}

/// An instruction set: the vectors one step of a row is computed in.
pub(crate) trait Isa: Copy {
    /// Row elements per step.
    const LANES: usize;
    /// `LANES` `f32` lanes.
    type F32: Float<Scalar = f32> + Step<Self>;
    /// `LANES` `f64` lanes (a [`Pair`] of the instruction set's `f64` vector).
    type Wide: Float<Scalar = f64> + Step<Self> + SweepLanes<Self, Self::F32>;
    /// The lanes as `f64` (exact).
    unsafe fn widen(v: Self::F32) -> Self::Wide;
    /// Rounded to `f32`, to nearest even.
    unsafe fn narrow(v: Self::Wide) -> Self::F32;
    unsafe fn load_f16(p: *const f16) -> Self::F32;
    /// Rounded to `f16`, to nearest even.
    unsafe fn store_f16(p: *mut f16, v: Self::F32);
    unsafe fn load_bf16(p: *const bf16) -> Self::F32;
    /// Rounded to `bf16`, to nearest even (outputs are never NaN).
    unsafe fn store_bf16(p: *mut bf16, v: Self::F32);
    /// Asks for the cache line at `p` (which need not be valid memory: a prefetch never
    /// faults), where the instruction set has a prefetch.
    #[inline(always)]
    unsafe fn prefetch(_p: *const i8) {}
}

/// Two vectors as one of twice the lanes (`lo` first).
#[derive(Clone, Copy)]
pub(crate) struct Pair<T> {
    pub(crate) lo: T,
    pub(crate) hi: T,
}

impl<T> Pair<T> {
    #[inline(always)]
    pub(crate) fn new(lo: T, hi: T) -> Self {
        Pair { lo, hi }
    }
}

/// Methods of a [`Pair`] that apply the same method to both halves (arguments: halves too).
#[rustfmt::skip]
macro_rules! pairwise {
    ($(fn $name:ident($($arg:ident: $t:ty),*) -> $ret:ty;)*) => {$(
        #[inline(always)]
        unsafe fn $name(self, $($arg: $t),*) -> $ret {
            Pair { lo: self.lo.$name($($arg.lo),*), hi: self.hi.$name($($arg.hi),*) }
        }
    )*};
}

impl<M: Mask> Mask for Pair<M> {
    type Count = (M::Count, M::Count);
    pairwise! {
        fn or(o: Self) -> Self; fn and(o: Self) -> Self; fn not() -> Self;
    }
    #[inline(always)]
    unsafe fn none() -> Self {
        Pair::new(M::none(), M::none())
    }
    #[inline(always)]
    unsafe fn any(self) -> bool {
        self.lo.or(self.hi).any()
    }
    #[inline(always)]
    unsafe fn count_zero() -> Self::Count {
        (M::count_zero(), M::count_zero())
    }
    #[inline(always)]
    unsafe fn count(self, c: Self::Count) -> Self::Count {
        (self.lo.count(c.0), self.hi.count(c.1))
    }
    #[inline(always)]
    unsafe fn total(c: Self::Count) -> usize {
        M::total(c.0) + M::total(c.1)
    }
}

impl<T: Float> Float for Pair<T> {
    type Scalar = T::Scalar;
    type Mask = Pair<T::Mask>;
    const LANES: usize = 2 * T::LANES;
    pairwise! {
        fn add(o: Self) -> Self; fn sub(o: Self) -> Self; fn mul(o: Self) -> Self;
        fn div(o: Self) -> Self; fn min(o: Self) -> Self; fn max(o: Self) -> Self;
        fn mul_add(b: Self, c: Self) -> Self; fn mul_sub(b: Self, c: Self) -> Self;
        fn neg_mul_add(b: Self, c: Self) -> Self; fn round() -> Self; fn floor() -> Self;
        fn abs() -> Self; fn neg() -> Self; fn copysign(sign: Self) -> Self;
        fn eq(o: Self) -> Self::Mask; fn ne(o: Self) -> Self::Mask; fn lt(o: Self) -> Self::Mask;
        fn gt(o: Self) -> Self::Mask; fn ge(o: Self) -> Self::Mask;
        fn nan_or_above(o: Self) -> Self::Mask; fn select(o: Self, mask: Self::Mask) -> Self;
        fn keep(mask: Self::Mask) -> Self; fn zero_where(mask: Self::Mask) -> Self;
    }
    #[inline(always)]
    unsafe fn splat(v: f64) -> Self {
        let v = T::splat(v);
        Pair::new(v, v)
    }
    #[inline(always)]
    unsafe fn load(p: *const T::Scalar) -> Self {
        Pair::new(T::load(p), T::load(p.add(T::LANES)))
    }
    #[inline(always)]
    unsafe fn store(self, p: *mut T::Scalar) {
        self.lo.store(p);
        self.hi.store(p.add(T::LANES));
    }
    #[inline(always)]
    unsafe fn reduce_max(self) -> f64 {
        self.lo.max(self.hi).reduce_max()
    }
    #[inline(always)]
    unsafe fn reduce_min(self) -> f64 {
        self.lo.min(self.hi).reduce_min()
    }
    #[inline(always)]
    unsafe fn reduce_sum(self) -> f64 {
        self.lo.add(self.hi).reduce_sum()
    }
    #[inline(always)]
    unsafe fn exponent(self, bias: i32) -> Self {
        Pair::new(self.lo.exponent(bias), self.hi.exponent(bias))
    }
}

/// The [`Float`] methods whose intrinsics have the same shape in every x86 instruction set,
/// their names pasted from `$v` (`_mm256`), the lanes `$p` (`ps`/`pd`), the integer lanes `$i`
/// of that width (`epi32`) with their splat `$set1i`, and the integer vector `$si` (`si256`).
/// `$s` is the scalar type, `$bits` its mantissa bits; `$round`, `$cmp` differ by set.
#[cfg(target_arch = "x86_64")]
#[rustfmt::skip]
macro_rules! x86_float_ops {
    ($s:ty, $v:ident, $p:ident, $i:ident, $set1i:ident, $si:ident, $bits:literal, $round:ident,
     $cmp:ident) => { paste::paste! {
        #[inline(always)] unsafe fn splat(v: f64) -> Self { [<$v _set1_ $p>](v as $s) }
        #[inline(always)] unsafe fn load(p: *const $s) -> Self { [<$v _loadu_ $p>](p) }
        #[inline(always)] unsafe fn store(self, p: *mut $s) { [<$v _storeu_ $p>](p, self) }
        #[inline(always)] unsafe fn add(self, o: Self) -> Self { [<$v _add_ $p>](self, o) }
        #[inline(always)] unsafe fn sub(self, o: Self) -> Self { [<$v _sub_ $p>](self, o) }
        #[inline(always)] unsafe fn mul(self, o: Self) -> Self { [<$v _mul_ $p>](self, o) }
        #[inline(always)] unsafe fn div(self, o: Self) -> Self { [<$v _div_ $p>](self, o) }
        #[inline(always)] unsafe fn min(self, o: Self) -> Self { [<$v _min_ $p>](self, o) }
        #[inline(always)] unsafe fn max(self, o: Self) -> Self { [<$v _max_ $p>](self, o) }
        #[inline(always)]
        unsafe fn mul_add(self, b: Self, c: Self) -> Self { [<$v _fmadd_ $p>](self, b, c) }
        #[inline(always)]
        unsafe fn mul_sub(self, b: Self, c: Self) -> Self { [<$v _fmsub_ $p>](self, b, c) }
        #[inline(always)]
        unsafe fn neg_mul_add(self, b: Self, c: Self) -> Self { [<$v _fnmadd_ $p>](self, b, c) }
        #[inline(always)]
        unsafe fn round(self) -> Self { $round::<{ _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC }>(self) }
        #[inline(always)]
        unsafe fn floor(self) -> Self { $round::<{ _MM_FROUND_TO_NEG_INF | _MM_FROUND_NO_EXC }>(self) }
        #[inline(always)] unsafe fn abs(self) -> Self { [<$v _andnot_ $p>](Self::splat(-0.0), self) }
        #[inline(always)] unsafe fn neg(self) -> Self { [<$v _xor_ $p>](self, Self::splat(-0.0)) }
        #[inline(always)]
        unsafe fn copysign(self, sign: Self) -> Self {
            let bit = Self::splat(-0.0);
            [<$v _or_ $p>]([<$v _andnot_ $p>](bit, self), [<$v _and_ $p>](bit, sign))
        }
        #[inline(always)] unsafe fn eq(self, o: Self) -> Self::Mask { $cmp::<_CMP_EQ_OQ>(self, o) }
        #[inline(always)] unsafe fn ne(self, o: Self) -> Self::Mask { $cmp::<_CMP_NEQ_OQ>(self, o) }
        #[inline(always)] unsafe fn lt(self, o: Self) -> Self::Mask { $cmp::<_CMP_LT_OQ>(self, o) }
        #[inline(always)] unsafe fn gt(self, o: Self) -> Self::Mask { $cmp::<_CMP_GT_OQ>(self, o) }
        #[inline(always)] unsafe fn ge(self, o: Self) -> Self::Mask { $cmp::<_CMP_GE_OQ>(self, o) }
        #[inline(always)]
        unsafe fn nan_or_above(self, o: Self) -> Self::Mask { $cmp::<_CMP_NLE_UQ>(self, o) }
        #[inline(always)]
        unsafe fn exponent(self, bias: i32) -> Self {
            let biased = [<$v _add_ $i>]([<$v _cast $p _ $si>](self), $set1i(bias.into()));
            [<$v _cast $si _ $p>]([<$v _slli_ $i>]::<$bits>(biased))
        }
    }};
}
#[cfg(target_arch = "x86_64")]
use x86_float_ops;
