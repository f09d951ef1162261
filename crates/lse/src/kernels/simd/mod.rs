//! The instruction sets behind one interface, and their registry.
//!
//! [`Float`] vectors of `f32` or `f64` lanes with their [`Mask`]s, and an [`Isa`] that names its
//! `f32` vector, its `f64` pair of the same element count, and the conversions between them and
//! `f16`/`bf16` memory. The kernel body ([`super::vector`]) is written once over these; each
//! instruction set implements them with its intrinsics, every method `#[inline(always)]`, so
//! that under the one `#[target_feature]` entry per instruction set no intrinsic is left as a
//! call. [`portable`] implements them over plain arrays, for every target.
//!
//! Each instruction set is a zero-sized token type that only its detection makes, and its
//! vectors ([`Vector`]) are made only from the token or from other vectors: holding either
//! proves the CPU runs the set, so the lane operations are safe functions. Loads and stores
//! (their pointers) and the `#[target_feature]` entries stay `unsafe`.
//!
//! The registry: [`Kernel`] names the families, [`VectorIsa`] the instruction sets this build
//! has (with their tokens), [`isa_of`] detects them on this CPU, and [`on_isa!`] runs a body
//! under the active one, handing it the token.

use half::{bf16, f16};

use math::{Step, SweepLanes};

#[cfg(target_arch = "x86_64")]
pub(crate) mod avx2;
#[cfg(target_arch = "x86_64")]
pub(crate) mod avx512;
pub(crate) mod math;
#[cfg(target_arch = "aarch64")]
pub(crate) mod neon;
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

/// The instruction sets of this build that the vector kernel runs in, each holding its token:
/// the proof, made only by the set's detection, that this CPU runs it.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum VectorIsa {
    Portable(portable::Portable),
    #[cfg(target_arch = "x86_64")]
    Avx2(avx2::Avx2),
    #[cfg(target_arch = "x86_64")]
    Avx512(avx512::Avx512<false>),
    /// AVX-512 with the AVX512-BF16 conversion.
    #[cfg(target_arch = "x86_64")]
    Avx512Bf16(avx512::Avx512<true>),
    #[cfg(target_arch = "aarch64")]
    Neon(neon::Neon),
}

/// The instruction set the vector family `kernel` runs in on this CPU; `None` for the scalar
/// family, [`Kernel::Auto`], and a family this CPU or this build's target lacks.
pub(crate) fn isa_of(kernel: Kernel) -> Option<VectorIsa> {
    match kernel {
        Kernel::Portable => Some(VectorIsa::Portable(portable::Portable::new())),
        #[cfg(target_arch = "x86_64")]
        Kernel::Avx2 => avx2::Avx2::detect().map(VectorIsa::Avx2),
        #[cfg(target_arch = "x86_64")]
        Kernel::Avx512 => avx512::Avx512::detect()
            .map(VectorIsa::Avx512Bf16)
            .or_else(|| avx512::Avx512::detect().map(VectorIsa::Avx512)),
        #[cfg(target_arch = "aarch64")]
        Kernel::Neon => neon::Neon::detect().map(VectorIsa::Neon),
        _ => None,
    }
}

/// Runs `$body` with `$i` the type and `$t` the token of the instruction set `$isa` (a
/// [`VectorIsa`] that [`isa_of`] gave), under that instruction set's `#[target_feature]` entry
/// (the token's `run`, safe: the token proves the CPU has the features).
#[rustfmt::skip]
macro_rules! on_isa {
    ($isa:expr, $i:ident, $t:ident => $body:expr) => {
        match $isa {
            $crate::kernels::simd::VectorIsa::Portable($t) => {
                type $i = $crate::kernels::simd::portable::Portable;
                $body
            }
            #[cfg(target_arch = "x86_64")]
            $crate::kernels::simd::VectorIsa::Avx2($t) => {
                type $i = $crate::kernels::simd::avx2::Avx2;
                $t.run(#[inline(always)] || $body)
            }
            #[cfg(target_arch = "x86_64")]
            $crate::kernels::simd::VectorIsa::Avx512($t) => {
                type $i = $crate::kernels::simd::avx512::Avx512<false>;
                $t.run(#[inline(always)] || $body)
            }
            #[cfg(target_arch = "x86_64")]
            $crate::kernels::simd::VectorIsa::Avx512Bf16($t) => {
                type $i = $crate::kernels::simd::avx512::Avx512<true>;
                $t.run(#[inline(always)] || $body)
            }
            #[cfg(target_arch = "aarch64")]
            $crate::kernels::simd::VectorIsa::Neon($t) => {
                type $i = $crate::kernels::simd::neon::Neon;
                $t.run(#[inline(always)] || $body)
            }
        }
    };
}
pub(crate) use on_isa;

/// The most elements one step of any instruction set covers (AVX-512: 16).
pub(crate) const MAX_LANES: usize = 16;

/// A register `R` of the instruction set `I`: made only by `I`'s file, from its token or from
/// another of its vectors, so that holding one proves this CPU runs `I`. That is what makes the
/// lane operations safe functions: each does `unsafe { intrinsic(..) }` on the registers of
/// the vectors it was given. The field is private to this module and the instruction sets'.
/// ([`portable`]'s arrays need no proof: they are made directly.)
#[cfg(any(target_arch = "x86_64", target_arch = "aarch64"))]
#[derive(Clone, Copy)]
#[repr(transparent)]
pub(crate) struct Vector<R, I>(R, core::marker::PhantomData<I>);

#[cfg(any(target_arch = "x86_64", target_arch = "aarch64"))]
impl<R, I> Vector<R, I> {
    /// For the instruction set's file only, and only with its token or a vector of it at hand.
    #[inline(always)]
    fn wrap(raw: R) -> Self {
        Vector(raw, core::marker::PhantomData)
    }
}

/// The lanes a compare selected.
pub(crate) trait Mask: Copy {
    /// Per-lane counters of set lanes.
    type Count: Copy;
    /// What makes one from nothing: the instruction set's token.
    type Token: Copy;
    fn none(t: Self::Token) -> Self;
    fn or(self, other: Self) -> Self;
    fn and(self, other: Self) -> Self;
    fn not(self) -> Self;
    /// True when some lane is set.
    fn any(self) -> bool;
    fn count_zero(t: Self::Token) -> Self::Count;
    /// `count` plus one in each set lane.
    fn count(self, count: Self::Count) -> Self::Count;
    fn total(count: Self::Count) -> usize;
}

/// A vector of `f32` or `f64` lanes. Reductions combine the lanes in a fixed order, so their
/// bits depend on the instruction set alone.
///
/// `min` and `max` of two numbers are the lesser and the greater (either zero when they are
/// `±0`); a lane where `o` is NaN gives NaN (the soft-cap's `FLOOR.min(s)` carries a NaN logit
/// through); a lane where only `self` is NaN may give either operand (x86's `min`/`max` give
/// `o`, NEON's NaN: the read pass finds a NaN element by the block max or by the exp sum,
/// whichever the instruction set leaves NaN).
///
/// Only `load` and `store` are unsafe (their pointers): a vector is made from the instruction
/// set's token ([`Float::splat`], [`Float::load`]) or from other vectors, so every other
/// method runs on a CPU that has the instruction set.
pub(crate) trait Float: Copy {
    type Scalar: Copy + Default;
    /// The instruction set's token (`()` for `f64`, which needs none).
    type Token: Copy;
    type Mask: Mask<Token = Self::Token>;
    const LANES: usize;
    /// The token of the instruction set this vector is of.
    fn token(self) -> Self::Token;
    /// Every lane `v` rounded to the lanes' type.
    fn splat(t: Self::Token, v: f64) -> Self;
    /// # Safety
    /// `p` is valid for reading `LANES` scalars.
    unsafe fn load(t: Self::Token, p: *const Self::Scalar) -> Self;
    /// # Safety
    /// `p` is valid for writing `LANES` scalars.
    unsafe fn store(self, p: *mut Self::Scalar);
    fn add(self, o: Self) -> Self;
    fn sub(self, o: Self) -> Self;
    fn mul(self, o: Self) -> Self;
    fn div(self, o: Self) -> Self;
    fn min(self, o: Self) -> Self;
    fn max(self, o: Self) -> Self;
    /// `self · b + c`, rounded once.
    fn mul_add(self, b: Self, c: Self) -> Self;
    /// `self · b − c`, rounded once.
    fn mul_sub(self, b: Self, c: Self) -> Self;
    /// `c − self · b`, rounded once.
    fn neg_mul_add(self, b: Self, c: Self) -> Self;
    /// To the nearest integer, ties to even.
    fn round(self) -> Self;
    fn floor(self) -> Self;
    fn abs(self) -> Self;
    fn neg(self) -> Self;
    /// `|self|` with the sign of `sign`.
    fn copysign(self, sign: Self) -> Self;
    fn eq(self, o: Self) -> Self::Mask;
    /// Ordered `≠`: false for NaN.
    fn ne(self, o: Self) -> Self::Mask;
    fn lt(self, o: Self) -> Self::Mask;
    fn gt(self, o: Self) -> Self::Mask;
    fn ge(self, o: Self) -> Self::Mask;
    /// `!(self ≤ bound)`: above `bound`, or NaN.
    fn nan_or_above(self, bound: Self) -> Self::Mask;
    /// `other` where `mask`, else `self`.
    fn select(self, other: Self, mask: Self::Mask) -> Self;
    /// `self` where `mask`, else `+0`.
    fn keep(self, mask: Self::Mask) -> Self;
    /// `+0` where `mask`, else `self`.
    fn zero_where(self, mask: Self::Mask) -> Self;
    fn reduce_max(self) -> f64;
    fn reduce_min(self) -> f64;
    fn reduce_sum(self) -> f64;
    /// The bits of each lane plus `bias`, shifted into the exponent field: `2^k` from lanes
    /// whose low mantissa bits hold the biased exponent `k` (after adding a rounding constant).
    fn exponent(self, bias: i32) -> Self;
}

/// An instruction set: the vectors one step of a row is computed in. A value of it is the
/// token its detection hands out (`detect() -> Option<Self>` in its file).
pub(crate) trait Isa: Copy {
    /// Row elements per step.
    const LANES: usize;
    /// `LANES` `f32` lanes.
    type F32: Float<Scalar = f32, Token = Self> + Step<Self>;
    /// `LANES` `f64` lanes (a [`Pair`] of the instruction set's `f64` vector).
    type Wide: Float<Scalar = f64, Token = Self> + Step<Self> + SweepLanes<Self, Self::F32>;
    /// The lanes as `f64` (exact).
    fn widen(v: Self::F32) -> Self::Wide;
    /// Rounded to `f32`, to nearest even.
    fn narrow(v: Self::Wide) -> Self::F32;
    /// # Safety
    /// `p` is valid for reading `LANES` values; the stores and `load_bf16` likewise for their
    /// access.
    unsafe fn load_f16(self, p: *const f16) -> Self::F32;
    /// Rounded to `f16`, to nearest even.
    unsafe fn store_f16(p: *mut f16, v: Self::F32);
    unsafe fn load_bf16(self, p: *const bf16) -> Self::F32;
    /// Rounded to `bf16`, to nearest even (outputs are never NaN).
    unsafe fn store_bf16(p: *mut bf16, v: Self::F32);
    /// Asks for the cache line at `p` (which need not be valid memory: a prefetch never
    /// faults, so this is safe), where the instruction set has a prefetch.
    #[inline(always)]
    fn prefetch(self, _p: *const i8) {}
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
        fn $name(self, $($arg: $t),*) -> $ret {
            Pair { lo: self.lo.$name($($arg.lo),*), hi: self.hi.$name($($arg.hi),*) }
        }
    )*};
}

impl<M: Mask> Mask for Pair<M> {
    type Count = (M::Count, M::Count);
    type Token = M::Token;
    pairwise! {
        fn or(o: Self) -> Self; fn and(o: Self) -> Self; fn not() -> Self;
    }
    #[inline(always)]
    fn none(t: M::Token) -> Self {
        Pair::new(M::none(t), M::none(t))
    }
    #[inline(always)]
    fn any(self) -> bool {
        self.lo.or(self.hi).any()
    }
    #[inline(always)]
    fn count_zero(t: M::Token) -> Self::Count {
        (M::count_zero(t), M::count_zero(t))
    }
    #[inline(always)]
    fn count(self, c: Self::Count) -> Self::Count {
        (self.lo.count(c.0), self.hi.count(c.1))
    }
    #[inline(always)]
    fn total(c: Self::Count) -> usize {
        M::total(c.0) + M::total(c.1)
    }
}

impl<T: Float> Float for Pair<T> {
    type Scalar = T::Scalar;
    type Token = T::Token;
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
    fn token(self) -> T::Token {
        self.lo.token()
    }
    #[inline(always)]
    fn splat(t: T::Token, v: f64) -> Self {
        let v = T::splat(t, v);
        Pair::new(v, v)
    }
    #[inline(always)]
    unsafe fn load(t: T::Token, p: *const T::Scalar) -> Self {
        Pair::new(T::load(t, p), T::load(t, p.add(T::LANES)))
    }
    #[inline(always)]
    unsafe fn store(self, p: *mut T::Scalar) {
        self.lo.store(p);
        self.hi.store(p.add(T::LANES));
    }
    #[inline(always)]
    fn reduce_max(self) -> f64 {
        self.lo.max(self.hi).reduce_max()
    }
    #[inline(always)]
    fn reduce_min(self) -> f64 {
        self.lo.min(self.hi).reduce_min()
    }
    #[inline(always)]
    fn reduce_sum(self) -> f64 {
        self.lo.add(self.hi).reduce_sum()
    }
    #[inline(always)]
    fn exponent(self, bias: i32) -> Self {
        Pair::new(self.lo.exponent(bias), self.hi.exponent(bias))
    }
}

/// The [`Float`] methods whose intrinsics have the same shape in every x86 instruction set,
/// their names pasted from `$v` (`_mm256`), the lanes `$p` (`ps`/`pd`), the integer lanes `$i`
/// of that width (`epi32`) with their splat `$set1i`, and the integer vector `$si` (`si256`).
/// `$s` is the scalar type, `$bits` its mantissa bits; `$round`, `$cmp` differ by set. `$tok`
/// makes the set's token.
///
/// Every `unsafe` block in it calls intrinsics of the set on `self` (or with its token): that
/// value exists, so the CPU has the set (see [`Vector`]).
#[cfg(target_arch = "x86_64")]
#[rustfmt::skip]
macro_rules! x86_float_ops {
    ($s:ty, $v:ident, $p:ident, $i:ident, $set1i:ident, $si:ident, $bits:literal, $round:ident,
     $cmp:ident, $tok:expr) => { pastey::paste! {
        #[inline(always)] fn token(self) -> Self::Token { $tok }
        #[inline(always)] fn splat(_: Self::Token, v: f64) -> Self { Vector::wrap(unsafe { [<$v _set1_ $p>](v as $s) }) }
        #[inline(always)]
        unsafe fn load(_: Self::Token, p: *const $s) -> Self { Vector::wrap([<$v _loadu_ $p>](p)) }
        #[inline(always)] unsafe fn store(self, p: *mut $s) { [<$v _storeu_ $p>](p, self.0) }
        #[inline(always)] fn add(self, o: Self) -> Self { Vector::wrap(unsafe { [<$v _add_ $p>](self.0, o.0) }) }
        #[inline(always)] fn sub(self, o: Self) -> Self { Vector::wrap(unsafe { [<$v _sub_ $p>](self.0, o.0) }) }
        #[inline(always)] fn mul(self, o: Self) -> Self { Vector::wrap(unsafe { [<$v _mul_ $p>](self.0, o.0) }) }
        #[inline(always)] fn div(self, o: Self) -> Self { Vector::wrap(unsafe { [<$v _div_ $p>](self.0, o.0) }) }
        #[inline(always)] fn min(self, o: Self) -> Self { Vector::wrap(unsafe { [<$v _min_ $p>](self.0, o.0) }) }
        #[inline(always)] fn max(self, o: Self) -> Self { Vector::wrap(unsafe { [<$v _max_ $p>](self.0, o.0) }) }
        #[inline(always)]
        fn mul_add(self, b: Self, c: Self) -> Self { Vector::wrap(unsafe { [<$v _fmadd_ $p>](self.0, b.0, c.0) }) }
        #[inline(always)]
        fn mul_sub(self, b: Self, c: Self) -> Self { Vector::wrap(unsafe { [<$v _fmsub_ $p>](self.0, b.0, c.0) }) }
        #[inline(always)]
        fn neg_mul_add(self, b: Self, c: Self) -> Self { Vector::wrap(unsafe { [<$v _fnmadd_ $p>](self.0, b.0, c.0) }) }
        #[inline(always)]
        fn round(self) -> Self { Vector::wrap(unsafe { $round::<{ _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC }>(self.0) }) }
        #[inline(always)]
        fn floor(self) -> Self { Vector::wrap(unsafe { $round::<{ _MM_FROUND_TO_NEG_INF | _MM_FROUND_NO_EXC }>(self.0) }) }
        #[inline(always)]
        fn abs(self) -> Self { Vector::wrap(unsafe { [<$v _andnot_ $p>]([<$v _set1_ $p>](-0.0), self.0) }) }
        #[inline(always)]
        fn neg(self) -> Self { Vector::wrap(unsafe { [<$v _xor_ $p>](self.0, [<$v _set1_ $p>](-0.0)) }) }
        #[inline(always)]
        fn copysign(self, sign: Self) -> Self {
            Vector::wrap(unsafe {
                let bit = [<$v _set1_ $p>](-0.0);
                [<$v _or_ $p>]([<$v _andnot_ $p>](bit, self.0), [<$v _and_ $p>](bit, sign.0))
            })
        }
        #[inline(always)] fn eq(self, o: Self) -> Self::Mask { Vector::wrap(unsafe { $cmp::<_CMP_EQ_OQ>(self.0, o.0) }) }
        #[inline(always)] fn ne(self, o: Self) -> Self::Mask { Vector::wrap(unsafe { $cmp::<_CMP_NEQ_OQ>(self.0, o.0) }) }
        #[inline(always)] fn lt(self, o: Self) -> Self::Mask { Vector::wrap(unsafe { $cmp::<_CMP_LT_OQ>(self.0, o.0) }) }
        #[inline(always)] fn gt(self, o: Self) -> Self::Mask { Vector::wrap(unsafe { $cmp::<_CMP_GT_OQ>(self.0, o.0) }) }
        #[inline(always)] fn ge(self, o: Self) -> Self::Mask { Vector::wrap(unsafe { $cmp::<_CMP_GE_OQ>(self.0, o.0) }) }
        #[inline(always)]
        fn nan_or_above(self, o: Self) -> Self::Mask { Vector::wrap(unsafe { $cmp::<_CMP_NLE_UQ>(self.0, o.0) }) }
        #[inline(always)]
        fn exponent(self, bias: i32) -> Self {
            Vector::wrap(unsafe {
                let biased = [<$v _add_ $i>]([<$v _cast $p _ $si>](self.0), $set1i(bias.into()));
                [<$v _cast $si _ $p>]([<$v _slli_ $i>]::<$bits>(biased))
            })
        }
    }};
}
#[cfg(target_arch = "x86_64")]
use x86_float_ops;

/// One lane: a compare of two `f64`.
#[rustfmt::skip]
impl Mask for bool {
    type Count = usize;
    type Token = ();
    #[inline(always)] fn none((): ()) -> Self { false }
    #[inline(always)] fn or(self, o: Self) -> Self { self | o }
    #[inline(always)] fn and(self, o: Self) -> Self { self & o }
    #[inline(always)] fn not(self) -> Self { !self }
    #[inline(always)] fn any(self) -> bool { self }
    #[inline(always)] fn count_zero((): ()) -> usize { 0 }
    #[inline(always)] fn count(self, c: usize) -> usize { c + usize::from(self) }
    #[inline(always)] fn total(c: usize) -> usize { c }
}

/// `f64` as a one-lane vector, so that the scalar kernel runs the lane functions
/// ([`math::softcap`]) the vector kernels run, to the same bits. Plain arithmetic: its token is
/// `()`.
#[rustfmt::skip]
impl Float for f64 {
    type Scalar = f64;
    type Token = ();
    type Mask = bool;
    const LANES: usize = 1;
    #[inline(always)] fn token(self) {}
    #[inline(always)] fn splat((): (), v: f64) -> Self { v }
    #[inline(always)] unsafe fn load((): (), p: *const f64) -> Self { p.read_unaligned() }
    #[inline(always)] unsafe fn store(self, p: *mut f64) { p.write_unaligned(self) }
    #[inline(always)] fn add(self, o: Self) -> Self { self + o }
    #[inline(always)] fn sub(self, o: Self) -> Self { self - o }
    #[inline(always)] fn mul(self, o: Self) -> Self { self * o }
    #[inline(always)] fn div(self, o: Self) -> Self { self / o }
    #[inline(always)] fn min(self, o: Self) -> Self { if self < o { self } else { o } }
    #[inline(always)] fn max(self, o: Self) -> Self { if self > o { self } else { o } }
    #[inline(always)] fn mul_add(self, b: Self, c: Self) -> Self { f64::mul_add(self, b, c) }
    #[inline(always)] fn mul_sub(self, b: Self, c: Self) -> Self { f64::mul_add(self, b, -c) }
    #[inline(always)] fn neg_mul_add(self, b: Self, c: Self) -> Self { f64::mul_add(-self, b, c) }
    #[inline(always)] fn round(self) -> Self { self.round_ties_even() }
    #[inline(always)] fn floor(self) -> Self { f64::floor(self) }
    #[inline(always)] fn abs(self) -> Self { f64::abs(self) }
    #[inline(always)] fn neg(self) -> Self { -self }
    #[inline(always)] fn copysign(self, sign: Self) -> Self { f64::copysign(self, sign) }
    #[inline(always)] fn eq(self, o: Self) -> bool { self == o }
    #[inline(always)] fn ne(self, o: Self) -> bool { self.partial_cmp(&o).is_some_and(|c| c.is_ne()) }
    #[inline(always)] fn lt(self, o: Self) -> bool { self < o }
    #[inline(always)] fn gt(self, o: Self) -> bool { self > o }
    #[inline(always)] fn ge(self, o: Self) -> bool { self >= o }
    #[inline(always)] fn nan_or_above(self, o: Self) -> bool { self.partial_cmp(&o).is_none_or(|c| c.is_gt()) }
    #[inline(always)] fn select(self, other: Self, mask: bool) -> Self { if mask { other } else { self } }
    #[inline(always)] fn keep(self, mask: bool) -> Self { if mask { self } else { 0.0 } }
    #[inline(always)] fn zero_where(self, mask: bool) -> Self { if mask { 0.0 } else { self } }
    #[inline(always)] fn reduce_max(self) -> f64 { self }
    #[inline(always)] fn reduce_min(self) -> f64 { self }
    #[inline(always)] fn reduce_sum(self) -> f64 { self }
    #[inline(always)]
    fn exponent(self, bias: i32) -> Self {
        f64::from_bits(((self.to_bits() as i64).wrapping_add(bias.into()) as u64) << 52)
    }
}
