//! The vector kernels for all four dtypes, written once over an instruction set ([`Isa`]).
//!
//! Every kernel works on one step of `I::LANES` elements (AVX2, NEON, portable: 8; AVX-512: 16):
//! `f32`, `f16` and `bf16` are widened into the instruction set's `f32` vector (`bf16` by a
//! 16-bit shift, `f16` by its conversion instruction), `f64` is held as a pair of its `f64` vectors — never a
//! whole-row copy. The read pass works on blocks of [`BLOCK`] elements that stay in L1: a max
//! sweep, then an exp sweep over the same block, folded into the row's [`RowState`] with the §1
//! merge — one pass over memory, no per-lane rescaling, and the same result for any split of
//! the row into whole blocks.
//!
//! Accuracy comes from three choices. `x − m` is split exactly by TwoSum, so the exp's argument
//! carries no rounding error of the subtraction; the exp rounds once (for `f32` lanes its result
//! is scaled by 2^64 so that terms down to `e^-128` stay normal: within 0.6 ulp of `f32`; for
//! `f64` rows within about 0.5 ulp of `f64`); and sums are accumulated in `f64` (compensated for
//! `f64` rows), excluding the block's maxima (counted apart) so that `s'` keeps its digits when
//! it is tiny. Every output is formed in `f64` and rounded once to its dtype (for `f16`/`bf16`
//! through `f32`, an error of at most 2^-13 ulp of those).
//!
//! Two things keep the arithmetic, not the memory, the limit: the exp sweep prefetches the
//! block after next (where the instruction set has a prefetch), so the max sweep finds it in cache; and for `f32` rows up to
//! [`MAX_CACHED_LEN`] the read pass leaves its exp terms in the output row, so that the write
//! pass of softmax and of the plain cross-entropy gradient is one multiply per element.
//!
//! Each entry point runs its body under the `#[target_feature]` entry of the active
//! instruction set ([`on_isa!`]), compiled once per storage type ([`Entries`]); everything
//! below is `#[inline(always)]`.
//!
//! The lane operations are safe functions (the instruction set's token, `isa` below, made the
//! vectors); `unsafe` is left to the loads and stores through raw pointers, each block saying
//! why its memory is there.
#![deny(unsafe_op_in_unsafe_fn)]

use half::{bf16, f16};

use super::row_plan::{ClassMasses, FastWrite};
use super::scalar::{LogitMap, RowScan};
use super::simd::math::{scale_logits, softcap, Step, SweepLanes, F32_EXP_SCALE};
use super::simd::{on_isa, Float, Isa, Mask, MAX_LANES};
use super::{BlockMaxima, MassesPass, MAX_CACHED_LEN};
use crate::element::{DType, Element};
use crate::state::{CompensatedSum, RowState};

/// Elements per read-pass block: 8 KiB of `f32`, well inside L1 between its two sweeps.
pub(crate) const BLOCK: usize = 2048;

/// Storage types whose rows the kernels read and write one step at a time.
pub(crate) trait Lanes: Element {
    type V<I: Isa>: Step<I>;
    /// Loads one step at `p`.
    unsafe fn load<I: Isa>(isa: I, p: *const Self) -> Self::V<I>;
    /// Stores one step of results given as `f64`, rounded to `Self`.
    unsafe fn store<I: Isa>(p: *mut Self, v: I::Wide);
    /// True for the half types, whose outputs are rounded through `f32` anyway: a product
    /// formed in `f32` (2^-24 relative) moves them by at most 2^-16 of their ulp.
    const HALF: bool = false;
    /// Stores one step of `f32` results, rounded to `Self` (not for `f64`).
    unsafe fn store_f32<I: Isa>(_p: *mut Self, _v: I::F32) {
        unreachable!("f64 rows store from f64 lanes")
    }
    /// True when the read pass can leave each `exp(x − m_b)` (an `f32` lane) in an `f32`
    /// buffer for the write pass to rescale ([`Step::store_exp`]): the `f32` lanes of `f32`,
    /// `f16` and `bf16` rows, whose cached terms keep every output within the §3 bounds. For
    /// `f64` rows the cache would add a rounding the plain write pass does not have.
    const CACHES: bool = false;
}

impl Lanes for f32 {
    type V<I: Isa> = I::F32;
    const CACHES: bool = true;
    #[inline(always)]
    unsafe fn store_f32<I: Isa>(p: *mut Self, v: I::F32) {
        // SAFETY (here and in the other `Lanes` methods): `p` holds a step, the caller's promise.
        unsafe { v.store(p) }
    }
    #[inline(always)]
    unsafe fn load<I: Isa>(isa: I, p: *const Self) -> I::F32 {
        unsafe { I::F32::load(isa, p) }
    }
    #[inline(always)]
    unsafe fn store<I: Isa>(p: *mut Self, v: I::Wide) {
        unsafe { I::narrow(v).store(p) }
    }
}

/// [`Lanes`] of a half type, converted by the instruction set's `$load` and `$store`.
macro_rules! half_lanes {
    ($t:ty, $load:ident, $store:ident) => {
        impl Lanes for $t {
            type V<I: Isa> = I::F32;
            const CACHES: bool = true;
            const HALF: bool = true;
            #[inline(always)]
            unsafe fn load<I: Isa>(isa: I, p: *const Self) -> I::F32 {
                unsafe { isa.$load(p) }
            }
            #[inline(always)]
            unsafe fn store<I: Isa>(p: *mut Self, v: I::Wide) {
                unsafe { I::$store(p, I::narrow(v)) }
            }
            #[inline(always)]
            unsafe fn store_f32<I: Isa>(p: *mut Self, v: I::F32) {
                unsafe { I::$store(p, v) }
            }
        }
    };
}
half_lanes!(f16, load_f16, store_f16);
half_lanes!(bf16, load_bf16, store_bf16);

impl Lanes for f64 {
    type V<I: Isa> = I::Wide;
    #[inline(always)]
    unsafe fn load<I: Isa>(isa: I, p: *const Self) -> I::Wide {
        unsafe { I::Wide::load(isa, p) }
    }
    #[inline(always)]
    unsafe fn store<I: Isa>(p: *mut Self, v: I::Wide) {
        unsafe { v.store(p) }
    }
}

/// Stores the first `n` of one step of `f32` results at `p`, rounded to `E`.
#[inline(always)]
pub(crate) unsafe fn store_f32_first<I: Isa, E: Lanes>(p: *mut E, n: usize, v: I::F32) {
    // SAFETY: `p` holds `n` elements (the caller's promise), `buf` a step.
    unsafe {
        if n == I::LANES {
            E::store_f32::<I>(p, v);
        } else {
            let mut buf = [<E as Element>::zero(); MAX_LANES];
            E::store_f32::<I>(buf.as_mut_ptr(), v);
            core::ptr::copy_nonoverlapping(buf.as_ptr(), p, n);
        }
    }
}

/// The map a pass applies to each logit, in the lanes `W` it computes in.
trait LaneMap<I: Isa, W: Step<I>>: Copy {
    /// What [`Self::times_slope`] needs (nothing for the identity).
    type Slope: Copy;
    /// How far the map may move the argument of `exp(y − m)`, relative to the exp's own error
    /// terms: the absolute error of `y − m`.
    fn argument_error(self) -> f64;
    /// The map of a row's maximum: the map is increasing, so it is the maximum of the mapped row.
    fn map_max(self, max: f64) -> f64;
    /// The mapped lanes, and what the gradient is multiplied by there.
    fn apply(self, x: W) -> (W, Self::Slope);
    fn times_slope(slope: Self::Slope, g: I::Wide) -> I::Wide;
    /// What the read pass caches for the write pass of a plain row, from the exp terms `e`
    /// (0 at ties with the block max): the term, and the lanes whose term is 1.
    fn cache_term(slope: Self::Slope, e: W, ties: W::Mask) -> (W, W::Mask);
    /// Stores the first `n` slopes as `f32` (maps with a slope only).
    unsafe fn store_slope(_slope: Self::Slope, _p: *mut f32, _n: usize) {
        unreachable!("only a map with a slope stores it")
    }
}

/// Logits as given.
#[derive(Clone, Copy)]
struct Unmapped;

impl<I: Isa, W: Step<I>> LaneMap<I, W> for Unmapped {
    type Slope = ();
    fn argument_error(self) -> f64 {
        0.0
    }
    fn map_max(self, max: f64) -> f64 {
        max
    }
    #[inline(always)]
    fn apply(self, x: W) -> (W, ()) {
        (x, ())
    }
    #[inline(always)]
    fn times_slope((): (), g: I::Wide) -> I::Wide {
        g
    }
    #[inline(always)]
    fn cache_term((): (), e: W, ties: W::Mask) -> (W, W::Mask) {
        (e, ties)
    }
}

/// Scaled logits ([`LogitMap::Scaled`]), in `f64` lanes: the scaled logit, rounded once, is
/// the logit the contract speaks of (no argument error), and the slope is the scale.
#[derive(Clone, Copy)]
struct Scaled {
    scale: f64,
}

impl<I: Isa> LaneMap<I, I::Wide> for Scaled {
    type Slope = I::Wide;
    fn argument_error(self) -> f64 {
        0.0
    }
    fn map_max(self, max: f64) -> f64 {
        LogitMap::Scaled(self.scale).apply(max)
    }
    #[inline(always)]
    fn apply(self, x: I::Wide) -> (I::Wide, I::Wide) {
        let isa = x.token();
        let scale = I::Wide::splat(isa, self.scale);
        // A masked logit has no slope (as a soft-capped one): nothing of it reaches the gradient.
        let masked = x.eq(I::Wide::splat(isa, f64::NEG_INFINITY));
        (scale_logits(x, scale), scale.zero_where(masked))
    }
    #[inline(always)]
    fn times_slope(slope: I::Wide, g: I::Wide) -> I::Wide {
        slope.mul(g)
    }
    #[inline(always)]
    fn cache_term(slope: I::Wide, e: I::Wide, ties: Mask64<I>) -> (I::Wide, Mask64<I>) {
        Capped::cache_term(slope, e, ties)
    }
    #[inline(always)]
    unsafe fn store_slope(slope: I::Wide, p: *mut f32, n: usize) {
        // SAFETY: the caller's promise.
        unsafe { <Capped as LaneMap<I, I::Wide>>::store_slope(slope, p, n) }
    }
}

/// Soft-capped logits ([`LogitMap::Softcap`]) of the scaled logits, in `f64` lanes.
#[derive(Clone, Copy)]
struct Capped {
    cap: f64,
    scale: f64,
}

impl<I: Isa> LaneMap<I, I::Wide> for Capped {
    type Slope = I::Wide;
    fn argument_error(self) -> f64 {
        // About 3 ulp of |y| ≤ cap, for y and for m.
        6.0 * self.cap * f64::EPSILON / 2.0
    }
    fn map_max(self, max: f64) -> f64 {
        LogitMap::of(self.scale, Some(self.cap)).apply(max)
    }
    #[inline(always)]
    fn apply(self, x: I::Wide) -> (I::Wide, I::Wide) {
        let isa = x.token();
        let scale = I::Wide::splat(isa, self.scale);
        let (y, slope) = softcap(
            scale_logits(x, scale),
            I::Wide::splat(isa, self.cap),
            I::Wide::splat(isa, 2.0 / self.cap),
        );
        (y, slope.mul(scale))
    }
    #[inline(always)]
    fn times_slope(slope: I::Wide, g: I::Wide) -> I::Wide {
        slope.mul(g)
    }
    /// `slope · exp(y − m_b)`: the write pass's rescaling then gives the gradient with its slope.
    #[inline(always)]
    fn cache_term(slope: I::Wide, e: I::Wide, ties: Mask64<I>) -> (I::Wide, Mask64<I>) {
        let isa = e.token();
        let e = e.select(I::Wide::splat(isa, 1.0), ties);
        (slope.mul(e), Mask::none(isa))
    }
    #[inline(always)]
    unsafe fn store_slope(slope: I::Wide, p: *mut f32, n: usize) {
        // SAFETY: `p` holds `n` values (the caller's promise).
        unsafe { store_first::<I, f32>(p, n, slope) }
    }
}

type Mask64<I> = <<I as Isa>::Wide as Float>::Mask;

/// Per-lane sums of exp terms in `f64`, with a per-lane TwoSum carry for lanes `W` whose
/// [`Step::COMPENSATED`] says so.
#[derive(Clone, Copy)]
struct LaneSums<I: Isa, W> {
    sum: I::Wide,
    carry: I::Wide,
    lanes: core::marker::PhantomData<W>,
}

impl<I: Isa, W: Step<I>> LaneSums<I, W> {
    #[inline(always)]
    fn new(isa: I) -> Self {
        let zero = I::Wide::splat(isa, 0.0);
        Self {
            sum: zero,
            carry: zero,
            lanes: core::marker::PhantomData,
        }
    }

    #[inline(always)]
    fn add(&mut self, term: I::Wide) {
        let sum = self.sum.add(term);
        if W::COMPENSATED {
            let virtual_term = sum.sub(self.sum);
            let err = self
                .sum
                .sub(sum.sub(virtual_term))
                .add(term.sub(virtual_term));
            self.carry = self.carry.add(err);
        }
        self.sum = sum;
    }

    /// The lanes' total divided by `W::EXP_SCALE` (exactly), plus `extra` (an exact small
    /// integer).
    #[inline(always)]
    fn total(&self, extra: f64) -> CompensatedSum {
        let mut total = CompensatedSum::ZERO;
        let unscale = 1.0 / W::EXP_SCALE;
        if W::COMPENSATED {
            let mut lanes = [0.0; 2 * MAX_LANES];
            // SAFETY: `lanes` holds two steps.
            unsafe {
                self.sum.store(lanes.as_mut_ptr());
                self.carry.store(lanes.as_mut_ptr().add(I::LANES));
            }
            lanes[..2 * I::LANES]
                .iter()
                .for_each(|&v| total.add(v * unscale));
            total.add(extra);
        } else {
            total.add(self.sum.reduce_sum() * unscale + extra);
        }
        total
    }
}

/// The step of `n` elements at `p`, padded with `fill` when `n` is short of `I::LANES`.
#[inline(always)]
unsafe fn load_step<I: Isa, E: Lanes>(isa: I, p: *const E, n: usize, fill: E) -> E::V<I> {
    // SAFETY: `p` holds `n` elements (the caller's promise), `buf` a step.
    unsafe {
        if n == I::LANES {
            E::load(isa, p)
        } else {
            let mut buf = [fill; MAX_LANES];
            core::ptr::copy_nonoverlapping(p, buf.as_mut_ptr(), n);
            E::load(isa, buf.as_ptr())
        }
    }
}

/// Stores the first `n` of one step of results at `p`.
#[inline(always)]
pub(crate) unsafe fn store_first<I: Isa, E: Lanes>(p: *mut E, n: usize, v: I::Wide) {
    // SAFETY: `p` holds `n` elements (the caller's promise), `buf` a step.
    unsafe {
        if n == I::LANES {
            E::store::<I>(p, v);
        } else {
            let mut buf = [<E as Element>::zero(); MAX_LANES];
            E::store::<I>(buf.as_mut_ptr(), v);
            core::ptr::copy_nonoverlapping(buf.as_ptr(), p, n);
        }
    }
}

fn neg_inf<E: Element>() -> E {
    E::from_f64(f64::NEG_INFINITY)
}

/// Lanes that are not `−inf`.
#[inline(always)]
fn live<I: Isa>(x: I::Wide) -> Mask64<I> {
    x.ne(I::Wide::splat(x.token(), f64::NEG_INFINITY))
}

/// Runs `$body` with `$x` bound to each step of `$row` (`&[$e]`), the last one padded with
/// `$fill`, `$at` the step's offset in the row and `$n` how many of its lanes are row elements.
/// A macro, not a closure: closures do not inherit `#[target_feature]`, and their intrinsics
/// would become calls.
macro_rules! for_each_step {
    ($i:ty, $isa:expr, $e:ty, $row:expr, $fill:expr, |$x:ident, $at:ident, $n:ident| $body:block) => {{
        let row: &[$e] = $row;
        let mut $at = 0;
        while $at < row.len() {
            let $n = (row.len() - $at).min(<$i>::LANES);
            // SAFETY: the `$n` elements from `$at` are in the row.
            let $x = unsafe { load_step::<$i, $e>($isa, row.as_ptr().add($at), $n, $fill) };
            $body
            $at += <$i>::LANES;
        }
    }};
}

/// Evaluates `$body` (one step of `f64` lanes) for each step `$v` read at `$x` and stores it at
/// `$out`, `$len` elements (the tail padded with `−inf`). `$x` and `$out` may be the same
/// memory: every step is read before it is written.
macro_rules! map_steps {
    ($i:ty, $isa:expr, $e:ty, $x:expr, $out:expr, $len:expr, |$v:ident| $body:block) => {{
        let (x, out, len): (*const $e, *mut $e, usize) = ($x, $out, $len);
        let mut at = 0;
        while at < len {
            let n = (len - at).min(<$i>::LANES);
            // SAFETY: `x` and `out` hold `len` elements (what the macro's user vouches for).
            let $v = unsafe { load_step::<$i, $e>($isa, x.add(at), n, neg_inf::<$e>()) };
            let result = $body;
            // SAFETY: as above.
            unsafe { store_first::<$i, $e>(out.add(at), n, result) };
            at += <$i>::LANES;
        }
    }};
}

/// Where the read pass leaves what the write pass reuses, and what it gathers.
struct ScanSink {
    /// Count `−inf` elements and track the finite minimum (the loss and the logit statistics
    /// need them; logsumexp and softmax do not).
    tally: bool,
    /// Block maxima (rows of at most [`MAX_CACHED_LEN`]).
    maxima: Option<*mut BlockMaxima>,
    /// With `maxima`: an output row of the same length that receives each block's
    /// `exp(x − m_b)` (1 at `x = m_b`, 0 in fully masked blocks).
    cache: Option<*mut f32>,
    /// With `maxima`: a row of the same length that receives each mapped logit's slope.
    slopes: Option<*mut f32>,
    /// With `maxima`: sum each block's `Σ_live (m_b − y_i)` and count its live elements.
    distances: bool,
}

/// The read pass over a row; `None` when it holds NaN or `+inf` (the scalar kernel then finds
/// the first one and applies the caller's policy).
#[inline(always)]
unsafe fn scan_impl<I: Isa, E: Lanes, W: SweepLanes<I, E::V<I>>, M: LaneMap<I, W>>(
    isa: I,
    row: &[E],
    sink: ScanSink,
    map: M,
) -> Option<RowScan> {
    let mut state = RowState::EMPTY;
    let mut masked = 0;
    let (mut min, mut max) = (f64::INFINITY, f64::NEG_INFINITY);
    let inf = E::V::<I>::splat(isa, f64::INFINITY);
    let minus_inf = E::V::<I>::splat(isa, f64::NEG_INFINITY);
    for block in row.chunks(BLOCK) {
        // Sweep 1: max (and with the tally: min of finite elements, −inf count). NaN and
        // `+inf` need no test of their own: `+inf` is the block max, and a NaN makes the max
        // or the exp sweep's sum NaN — except in a block of only −inf and NaN.
        let (mut hi, mut lo) = (minus_inf, inf);
        let mut masked_lanes = <<E::V<I> as Float>::Mask as Mask>::count_zero(isa);
        for_each_step!(I, isa, E, block, neg_inf::<E>(), |x, _at, _n| {
            hi = hi.max(x);
            if sink.tally {
                let is_masked = x.eq(minus_inf);
                lo = lo.min(x.select(inf, is_masked));
                masked_lanes = is_masked.count(masked_lanes);
            }
        });
        let block_max = hi.reduce_max();
        let no_finite = block_max == f64::NEG_INFINITY;
        if block_max == f64::INFINITY
            || block_max.is_nan()
            || (no_finite && block.iter().any(|x| x.to_f64().is_nan()))
        {
            return None;
        }
        if sink.tally {
            masked += <<E::V<I> as Float>::Mask as Mask>::total(masked_lanes)
                - (I::LANES - block.len() % I::LANES) % I::LANES;
            min = min.min(lo.reduce_min());
        }
        let mapped_max = map.map_max(block_max);
        // SAFETY (the sink's buffers here and below): the caller's promise, that they hold the
        // row and `maxima` is valid; `block` is in `row`.
        let at = |buf: Option<*mut f32>| {
            buf.map(|b| unsafe { b.add(block.as_ptr().offset_from(row.as_ptr()) as usize) })
        };
        let (cache, slopes) = (at(sink.cache), at(sink.slopes));
        if no_finite {
            for buf in [cache, slopes].into_iter().flatten() {
                unsafe { core::ptr::write_bytes(buf, 0, block.len()) };
            }
            if let Some(maxima) = sink.maxima {
                unsafe { (*maxima).push(mapped_max, (0.0, 0.0)) };
            }
            continue;
        }
        max = max.max(block_max);
        // Sweep 2 (from L1): Σ exp(y − m_b) over the mapped elements below the mapped max.
        let (m, neg_m) = (W::splat(isa, mapped_max), W::splat(isa, -mapped_max));
        let mut sums = LaneSums::<I, W>::new(isa);
        let mut ties = <W::Mask as Mask>::count_zero(isa);
        let zero = I::Wide::splat(isa, 0.0);
        let (mut distance, mut live) = (zero, <W::Mask as Mask>::count_zero(isa));
        // The max sweep waits on memory, the exp sweep on arithmetic: fetching the next block
        // during this one overlaps the two (a prefetch never faults, even past the row's end).
        let next = block.as_ptr().wrapping_add(2 * BLOCK).cast::<i8>();
        for_each_step!(I, isa, E, block, neg_inf::<E>(), |x, at, n| {
            isa.prefetch(next.wrapping_add(at * size_of::<E>()));
            let (y, slope) = map.apply(W::from_row(x));
            let e = y.exp_shifted::<true>(m, neg_m);
            sums.add(e.widen());
            let is_tie = y.eq(m);
            ties = is_tie.count(ties);
            if let Some(cache) = cache {
                let (term, is_one) = M::cache_term(slope, e, is_tie);
                unsafe { W::store_exp(cache.add(at), n, term, is_one) };
            }
            if let Some(slopes) = slopes {
                unsafe { M::store_slope(slope, slopes.add(at), n) };
            }
            if sink.distances {
                let is_live = y.ne(W::splat(isa, f64::NEG_INFINITY));
                distance = distance.add(m.sub(y).keep(is_live).widen());
                live = is_live.count(live);
            }
        });
        if let Some(maxima) = sink.maxima {
            let live = <W::Mask as Mask>::total(live) as f64;
            unsafe { (*maxima).push(mapped_max, (distance.reduce_sum(), live)) };
        }
        let rest = sums.total((<W::Mask as Mask>::total(ties) - 1) as f64);
        if rest.value().is_nan() {
            return None; // a NaN element
        }
        state = state.merge(RowState::from_parts(mapped_max, rest));
    }
    Some(RowScan {
        state,
        first_non_finite: None,
        masked,
        finite_min: min,
        finite_max: max,
        nan: 0,
        pos_inf: 0,
    })
}

/// `softmax_i = exp(x_i − m) / S` (row not fully masked).
#[inline(always)]
fn softmax_impl<I: Isa, E: Lanes>(isa: I, x: &[E], max: f64, denominator: f64, out: &mut [E]) {
    assert!(out.len() >= x.len());
    let (m, neg_m) = (E::V::<I>::splat(isa, max), E::V::<I>::splat(isa, -max));
    let inv = I::Wide::splat(isa, 1.0 / denominator / E::V::<I>::EXP_SCALE);
    map_steps!(I, isa, E, x.as_ptr(), out.as_mut_ptr(), x.len(), |v| {
        v.exp_shifted::<false>(m, neg_m).widen().mul(inv)
    });
}

/// Multiplies each block of cached exp terms (`len` `f32` at `cache`) by its factor (in `f64`,
/// rounded once) into `out`: the write pass of a cached row. `cache` may be `out` itself.
/// With `slopes` (not null), also subtracts `b · slope_i`.
#[inline(always)]
unsafe fn rescale_impl<I: Isa, E: Lanes>(
    isa: I,
    (cache, slopes): (*const f32, *const f32),
    out: *mut E,
    len: usize,
    maxima: &BlockMaxima,
    (max, c, b): (f64, f64, f64),
) {
    // One block's steps in lanes `$t` from the cache's `f32` lanes, stored by `$store`.
    macro_rules! block {
        ($t:ty, $from:expr, $store:ident, $range:expr, $factor:expr) => {{
            let (factor, zero) = (<$t>::splat(isa, $factor), <$t>::splat(isa, 0.0));
            let neg_b = <$t>::splat(isa, -b);
            for i in $range.clone().step_by(I::LANES) {
                let (n, mut shift) = (($range.end - i).min(I::LANES), zero);
                // SAFETY (the three blocks): `cache`, `out` and `slopes` (when not null) hold
                // `len` elements, the caller's promise; `i + n ≤ len`.
                if !slopes.is_null() {
                    let slope = unsafe { load_step::<I, f32>(isa, slopes.add(i), n, 0.0) };
                    shift = $from(slope).mul_add(neg_b, zero);
                }
                // `e·f + shift`, `shift` never −0: a zero result is +0 whatever the signs.
                let term = $from(unsafe { load_step::<I, f32>(isa, cache.add(i), n, 0.0) });
                let result = term.mul_add(factor, shift);
                unsafe { $store::<I, E>(out.add(i), n, result) };
            }
        }};
    }
    let c = c / F32_EXP_SCALE;
    for (block, (_, factor)) in maxima.factors(max, c).enumerate() {
        let range = block * BLOCK..len.min(block * BLOCK + BLOCK);
        // Half-type outputs take the product in f32 when the factor is a normal f32 (a
        // smaller one would lose results the half type's range still holds).
        if E::HALF && (factor.abs() >= f64::from(f32::MIN_POSITIVE) && factor.abs() <= 1.0) {
            block!(
                I::F32,
                core::convert::identity,
                store_f32_first,
                range,
                factor
            );
        } else {
            block!(I::Wide, I::widen, store_first, range, factor);
        }
    }
}

/// `log_softmax_i = (x_i − m) − log1p(s')`, saturating finite results at `−MAX`, `−inf` kept.
#[inline(always)]
fn log_softmax_impl<I: Isa, E: Lanes>(isa: I, x: &[E], max: f64, log1p_sum: f64, out: &mut [E]) {
    assert!(out.len() >= x.len());
    let (m, l) = (I::Wide::splat(isa, max), I::Wide::splat(isa, log1p_sum));
    let floor = I::Wide::splat(isa, -E::MAX.to_f64());
    let minus_inf = I::Wide::splat(isa, f64::NEG_INFINITY);
    map_steps!(I, isa, E, x.as_ptr(), out.as_mut_ptr(), x.len(), |v| {
        let x = v.widen();
        let y = x.sub(m).sub(l).max(floor);
        y.select(minus_inf, x.eq(minus_inf))
    });
}

/// The cross-entropy gradient `g_i = c · exp(x_i − m) − b` on live classes and `+0` on masked
/// ones; `x` and `g` may be the same memory (the in-place loss). With `SWEEP`, also returns
/// `Σ_live (m − x_i)` (every term ≥ 0), else 0.
#[inline(always)]
unsafe fn ce_grad_impl<I: Isa, E: Lanes, const SWEEP: bool>(
    isa: I,
    x: *const E,
    g: *mut E,
    len: usize,
    (max, c, b): (f64, f64, f64),
) -> f64 {
    let (m, neg_m) = (E::V::<I>::splat(isa, max), E::V::<I>::splat(isa, -max));
    let c = I::Wide::splat(isa, c / E::V::<I>::EXP_SCALE);
    let (b, one) = (I::Wide::splat(isa, b), I::Wide::splat(isa, 1.0));
    let (mut sum, m_wide) = (I::Wide::splat(isa, 0.0), I::Wide::splat(isa, max));
    map_steps!(I, isa, E, x, g, len, |v| {
        let e = v.exp_shifted::<false>(m, neg_m).widen();
        let live = live::<I>(v.widen());
        if SWEEP {
            sum = sum.add(distance::<I>(m_wide, v.widen(), live, one));
        }
        // Masked lanes are +0 whatever the signs of `c` and `b`.
        c.mul_sub(e, b).keep(live)
    });
    sum.reduce_sum()
}

/// `u_i (m − x_i)` on live lanes with `u_i > 0`, else 0: a term of `Σ_live u_i (m − x_i)`
/// (every term ≥ 0; an `f64` row's `m − x_i` may be `+inf`, which a zero mass must not turn
/// into NaN).
#[inline(always)]
fn distance<I: Isa>(m: I::Wide, x: I::Wide, live: Mask64<I>, u: I::Wide) -> I::Wide {
    // Any non-zero mass counts: negative class weights and targets are PyTorch's too.
    let zero = I::Wide::splat(u.token(), 0.0);
    let counted = live.and(u.gt(zero).or(u.lt(zero)));
    u.mul(m.sub(x)).keep(counted)
}

/// The per-class target masses `u_i = w_i · (share + keep · q_i)` of [`ClassMasses`], one step
/// at a time (null pointers: no weights, no probability targets).
#[derive(Clone, Copy)]
struct MassLanes<I: Isa, E> {
    weights: *const f64,
    probabilities: *const E,
    share: I::Wide,
    keep: I::Wide,
}

impl<I: Isa, E: Lanes> MassLanes<I, E> {
    #[inline(always)]
    fn new(isa: I, masses: &ClassMasses<'_, '_, E>) -> Self {
        Self {
            weights: masses.weights.map_or(core::ptr::null(), <[f64]>::as_ptr),
            probabilities: masses
                .probabilities
                .map_or(core::ptr::null(), <[E]>::as_ptr),
            share: I::Wide::splat(isa, masses.share),
            keep: I::Wide::splat(isa, masses.keep),
        }
    }

    /// The masses of the `n` classes from `at` (the rest of the lanes: `share`).
    #[inline(always)]
    unsafe fn at(&self, at: usize, n: usize) -> I::Wide {
        let (mut u, isa) = (self.share, self.share.token());
        // SAFETY (both blocks): the `n` classes from `at` are in the row, the caller's promise.
        if !self.probabilities.is_null() {
            let q = unsafe { load_step::<I, E>(isa, self.probabilities.add(at), n, E::zero()) };
            u = self.keep.mul_add(q.widen(), u);
        }
        if !self.weights.is_null() {
            u = u.mul(unsafe { load_step::<I, f64>(isa, self.weights.add(at), n, 0.0) });
        }
        u
    }
}

/// How far `g_i = c·e_i − b·u_i` may cancel before the error of `c·e_i` in lanes `W`
/// ([`Step::EXP_ERROR`]) breaks the bound of docs/numerics.md: `(normwise, elementwise)` limits on the
/// ratio of `max |c·e_i|` to `max |g_i|` (`f32`: 2 ulp of the row's largest gradient, of which
/// the final rounding takes half an ulp) and of `|c·e_i|` to `|g_i|` (`f16`, `bf16`: 1 ulp of
/// each gradient, half of it left after rounding). `f64` outputs have no limit: the scalar
/// kernel's own `f64` exp errs as much as the vector one.
///
/// `argument_error` is the error a logit map adds to `x_i − m` (0 without one).
fn cancellation_limits<I: Isa, W: Step<I>>(dtype: DType, argument_error: f64) -> (f64, f64) {
    let limit = |k: f64, epsilon: f64| k * (epsilon / 2.0) / (W::EXP_ERROR + argument_error);
    match dtype {
        DType::F64 => (f64::INFINITY, f64::INFINITY),
        DType::F32 => (limit(1.5, f32::EPSILON.into()), f64::INFINITY),
        DType::F16 => (f64::INFINITY, limit(0.5, f16::EPSILON.into())),
        DType::BF16 => (f64::INFINITY, limit(0.5, bf16::EPSILON.into())),
    }
}

/// The cross-entropy gradient with per-class masses and a logit map `y = map(x)`,
/// `g_i = slope_i · (c · exp(y_i − m) − b · u_i)` on live classes and `+0` on masked ones,
/// stored at `g` when `store` (`x` and `g` may be the same memory); also sums
/// `Σ_live u_i (m − y_i)` and, with `verify`, tests for cancellation. With neither, only the
/// sum (no exp).
#[inline(always)]
unsafe fn ce_grad_masses_impl<I: Isa, E: Lanes, W: SweepLanes<I, E::V<I>>, M: LaneMap<I, W>>(
    isa: I,
    (x, g, len): (*const E, *mut E, usize),
    (max, c, b): (f64, f64, f64),
    masses: MassLanes<I, E>,
    map: M,
    (store, verify): (bool, bool),
) -> MassesPass {
    let (m, neg_m) = (W::splat(isa, max), W::splat(isa, -max));
    let (c, b) = (
        I::Wide::splat(isa, c / W::EXP_SCALE),
        I::Wide::splat(isa, b),
    );
    let (mut sum, m_wide) = (I::Wide::splat(isa, 0.0), I::Wide::splat(isa, max));
    let (normwise, elementwise) = cancellation_limits::<I, W>(E::DTYPE, map.argument_error());
    let elementwise = I::Wide::splat(isa, elementwise);
    let zero = I::Wide::splat(isa, 0.0);
    let (mut peak_ce, mut peak_g, mut cancels) = (zero, zero, Mask64::<I>::none(isa));
    let mut at = 0;
    while at < len {
        let n = (len - at).min(I::LANES);
        // SAFETY (these two, and the store below): `x`, `g` when `store` and the masses hold
        // `len` elements, the caller's promise; `at + n ≤ len`.
        let v = unsafe { load_step::<I, E>(isa, x.add(at), n, neg_inf::<E>()) };
        let live = live::<I>(v.widen());
        let u = unsafe { masses.at(at, n) };
        let (y, slope) = map.apply(W::from_row(v));
        sum = sum.add(distance::<I>(m_wide, y.widen(), live, u));
        if store || verify {
            let ce = c.mul(y.exp_shifted::<false>(m, neg_m).widen());
            let g_unmasked = b.neg_mul_add(u, ce);
            // The map's slope scales the gradient and what the cancellation test compares.
            let ce = M::times_slope(slope, ce);
            // Masked lanes are +0 whatever the signs of `c` and `b`.
            let grad = M::times_slope(slope, g_unmasked).keep(live);
            if verify {
                let (ce, grad) = (ce.abs(), grad.abs());
                peak_ce = peak_ce.max(ce);
                peak_g = peak_g.max(grad);
                cancels = cancels.or(ce.gt(elementwise.mul(grad)));
            }
            if store {
                unsafe { store_first::<I, E>(g.add(at), n, grad) };
            }
        }
        at += I::LANES;
    }
    MassesPass {
        distance: sum.reduce_sum(),
        cancels: verify && (cancels.any() || peak_ce.reduce_max() > normwise * peak_g.reduce_max()),
    }
}

/// Runs `$body` with `$a`, `$b` bound to matching steps of `$y` and `$dy` (the tails padded
/// with zeros), `$at` the offset and `$n` the number of row elements in the step.
macro_rules! for_each_pair {
    ($i:ty, $isa:expr, $e:ty, $y:expr, $dy:expr, |$a:ident, $b:ident, $at:ident, $n:ident| $body:block) => {{
        let (y, dy): (&[$e], &[$e]) = ($y, $dy);
        assert!(dy.len() >= y.len());
        let mut $at = 0;
        while $at < y.len() {
            let $n = (y.len() - $at).min(<$i>::LANES);
            let zero = <$e as Element>::zero();
            // SAFETY: the `$n` elements from `$at` are in `y`, and `dy` is as long.
            let ($a, $b) = unsafe {
                (
                    load_step::<$i, $e>($isa, y.as_ptr().add($at), $n, zero),
                    load_step::<$i, $e>($isa, dy.as_ptr().add($at), $n, zero),
                )
            };
            $body
            $at += <$i>::LANES;
        }
    }};
}

/// `Σ_j y_j dy_j` (softmax backward) or `Σ_j dy_j` (log-softmax backward), in `f64`.
#[inline(always)]
fn dot_impl<I: Isa, E: Lanes>(isa: I, y: &[E], dy: &[E], weighted: bool) -> f64 {
    let mut acc = I::Wide::splat(isa, 0.0);
    for_each_pair!(I, isa, E, y, dy, |a, b, _at, _n| {
        let (a, b) = (a.widen(), b.widen());
        acc = if weighted {
            a.mul_add(b, acc)
        } else {
            acc.add(b)
        };
    });
    acc.reduce_sum()
}

/// `dx_i = y_i · (dy_i − dot)`.
#[inline(always)]
fn softmax_backward_impl<I: Isa, E: Lanes>(isa: I, y: &[E], dy: &[E], dot: f64, dx: &mut [E]) {
    assert!(dx.len() >= y.len());
    let dot = I::Wide::splat(isa, dot);
    let out = dx.as_mut_ptr();
    for_each_pair!(I, isa, E, y, dy, |a, b, at, n| {
        let result = a.widen().mul(b.widen().sub(dot));
        // SAFETY: the `n` elements from `at` are in `y`, and `dx` is as long.
        unsafe { store_first::<I, E>(out.add(at), n, result) };
    });
}

/// `dx_i = dy_i − exp(y_i) · total` for log-probabilities `y ≤ 0`; `false` (nothing written)
/// when some `y_i` is positive or NaN, which the scalar kernel handles.
#[inline(always)]
fn log_softmax_backward_impl<I: Isa, E: Lanes>(
    isa: I,
    y: &[E],
    dy: &[E],
    total: f64,
    dx: &mut [E],
) -> bool {
    assert!(dx.len() >= y.len());
    let zero = E::V::<I>::splat(isa, 0.0);
    let mut out_of_range = <<E::V<I> as Float>::Mask as Mask>::none(isa);
    for_each_step!(I, isa, E, y, neg_inf::<E>(), |v, _at, _n| {
        out_of_range = out_of_range.or(v.nan_or_above(zero));
    });
    if out_of_range.any() {
        return false;
    }
    let total = I::Wide::splat(isa, total / E::V::<I>::EXP_SCALE);
    let out = dx.as_mut_ptr();
    for_each_pair!(I, isa, E, y, dy, |v, d, at, n| {
        let e = v.exp_shifted::<false>(zero, zero).widen();
        let result = e.neg_mul_add(total, d.widen());
        // SAFETY: the `n` elements from `at` are in `y`, and `dx` is as long.
        unsafe { store_first::<I, E>(out.add(at), n, result) };
    });
    true
}

/// `(Σ_c w_c q_c, max_c q_c)` over a row of probability targets, or `None` when some `q_c` is
/// not a finite number ≥ 0.
#[inline(always)]
fn probability_mass_impl<I: Isa, E: Lanes>(
    isa: I,
    q: &[E],
    weights: Option<&[f64]>,
) -> Option<(CompensatedSum, f64)> {
    assert!(weights.is_none_or(|w| w.len() >= q.len()));
    let masses = MassLanes::<I, E>::new(
        isa,
        &ClassMasses {
            weights,
            ..ClassMasses::UNIT
        },
    );
    let (zero, inf) = (I::Wide::splat(isa, 0.0), I::Wide::splat(isa, f64::INFINITY));
    let (mut peak, mut invalid) = (zero, Mask64::<I>::none(isa));
    // Compensated lanes whatever the dtype: `A − a_c` keeps the digits below `A`'s.
    let mut sums = LaneSums::<I, I::Wide>::new(isa);
    for_each_step!(I, isa, E, q, E::zero(), |v, at, n| {
        let v = v.widen();
        // Ordered compares: NaN is invalid too.
        invalid = invalid.or(v.ge(zero).and(v.lt(inf)).not());
        peak = peak.max(v);
        // SAFETY: the `n` classes from `at` are in `q`, and the weights are as many.
        let u = unsafe { masses.at(at, n) };
        sums.add(u.mul(v));
    });
    if invalid.any() {
        return None;
    }
    Some((sums.total(0.0), peak.reduce_max()))
}

/// Reinterprets a slice of `E` as the concrete type `T` named by the same [`DType`].
#[inline(always)]
fn cast<E: Element, T: Element>(s: &[E]) -> &[T] {
    debug_assert_eq!(E::DTYPE, T::DTYPE);
    // SAFETY: `Element` is sealed and each DType names exactly one implementing type.
    unsafe { &*(s as *const [E] as *const [T]) }
}

#[inline(always)]
fn cast_mut<E: Element, T: Element>(s: &mut [E]) -> &mut [T] {
    debug_assert_eq!(E::DTYPE, T::DTYPE);
    // SAFETY: as in `cast`.
    unsafe { &mut *(s as *mut [E] as *mut [T]) }
}

/// Runs `$body` with `$l` the concrete storage type of `$e`.
#[rustfmt::skip]
macro_rules! with_lanes {
    ($e:ty, $l:ident => $body:expr) => {
        match <$e as Element>::DTYPE {
            DType::F64 => { type $l = f64; $body }
            DType::F32 => { type $l = f32; $body }
            DType::F16 => { type $l = f16; $body }
            DType::BF16 => { type $l = bf16; $body }
        }
    };
}

/// The entry points for one storage type, each instruction set's body under them.
///
/// Implemented for the four storage types by [`entries!`], not as generic functions: a generic
/// body is compiled again in every crate that calls an op (each test binary, the CLI, the
/// bindings), three instruction sets each; these are compiled once, here.
#[rustfmt::skip]
trait Entries: Lanes {
    fn scan(row: &[Self], sink: ScanSink, map: LogitMap, wide: bool) -> Option<RowScan>;
    /// SAFETY: `cache` and `out` hold `len` elements.
    unsafe fn rescale(caches: (*const f32, *const f32), out: *mut Self, len: usize, maxima: &BlockMaxima, mcb: (f64, f64, f64));
    fn softmax(x: &[Self], max: f64, denominator: f64, out: &mut [Self]);
    fn log_softmax(x: &[Self], max: f64, log1p_sum: f64, out: &mut [Self]);
    /// SAFETY: `io`'s input holds `len` elements, and so does its output when `store`.
    unsafe fn ce_grad(io: (*const Self, *mut Self, usize), w: &FastWrite<'_, '_, Self>, store: bool) -> MassesPass;
    fn probability_mass(q: &[Self], weights: Option<&[f64]>) -> Option<(CompensatedSum, f64)>;
    fn live_distance(x: &[Self], max: f64, masses: Option<&ClassMasses<'_, '_, Self>>, map: LogitMap) -> f64;
    fn backward_dot(y: &[Self], dy: &[Self], weighted: bool) -> f64;
    fn softmax_backward(y: &[Self], dy: &[Self], dot: f64, dx: &mut [Self]);
    fn log_softmax_backward(y: &[Self], dy: &[Self], total: f64, dx: &mut [Self]) -> bool;
}

/// [`Entries`] for each storage type, the bodies written once.
#[rustfmt::skip]
macro_rules! entries {
    ($($l:ty),*) => {$(
        impl Entries for $l {
            fn scan(row: &[Self], sink: ScanSink, map: LogitMap, wide: bool) -> Option<RowScan> {
                // SAFETY: the sink's buffers hold the row (`scan_caching` checked them).
                on_isa!(super::vector_isa(), I, isa => unsafe { match map {
                    LogitMap::Softcap { cap, scale } => scan_impl::<I, Self, <I as Isa>::Wide, _>(isa, row, sink, Capped { cap, scale }),
                    LogitMap::Scaled(scale) => scan_impl::<I, Self, <I as Isa>::Wide, _>(isa, row, sink, Scaled { scale }),
                    LogitMap::Identity if wide => scan_impl::<I, Self, <I as Isa>::Wide, _>(isa, row, sink, Unmapped),
                    LogitMap::Identity => scan_impl::<I, Self, <Self as Lanes>::V<I>, _>(isa, row, sink, Unmapped),
                } })
            }
            unsafe fn rescale(caches: (*const f32, *const f32), out: *mut Self, len: usize, maxima: &BlockMaxima, mcb: (f64, f64, f64)) {
                // SAFETY: the caller's promise.
                on_isa!(super::vector_isa(), I, isa => unsafe { rescale_impl::<I, Self>(isa, caches, out, len, maxima, mcb) })
            }
            fn softmax(x: &[Self], max: f64, denominator: f64, out: &mut [Self]) {
                on_isa!(super::vector_isa(), I, isa => softmax_impl::<I, Self>(isa, x, max, denominator, out))
            }
            fn log_softmax(x: &[Self], max: f64, log1p_sum: f64, out: &mut [Self]) {
                on_isa!(super::vector_isa(), I, isa => log_softmax_impl::<I, Self>(isa, x, max, log1p_sum, out))
            }
            unsafe fn ce_grad(io: (*const Self, *mut Self, usize), w: &FastWrite<'_, '_, Self>, store: bool) -> MassesPass {
                // SAFETY: the caller's promise.
                on_isa!(super::vector_isa(), I, isa => unsafe { ce_grad_raw::<I, Self>(isa, io, w, store) })
            }
            fn probability_mass(q: &[Self], weights: Option<&[f64]>) -> Option<(CompensatedSum, f64)> {
                on_isa!(super::vector_isa(), I, isa => probability_mass_impl::<I, Self>(isa, q, weights))
            }
            fn live_distance(x: &[Self], max: f64, masses: Option<&ClassMasses<'_, '_, Self>>, map: LogitMap) -> f64 {
                let io = (x.as_ptr(), core::ptr::null_mut(), x.len());
                // SAFETY: `io` is `x`; `masses` are as many as `x` (the ops checked).
                on_isa!(super::vector_isa(), I, isa => unsafe { masses_pass::<I, Self>(isa, io, (max, 0.0, 0.0), masses, map, (false, false)) }.distance)
            }
            fn backward_dot(y: &[Self], dy: &[Self], weighted: bool) -> f64 {
                on_isa!(super::vector_isa(), I, isa => dot_impl::<I, Self>(isa, y, dy, weighted))
            }
            fn softmax_backward(y: &[Self], dy: &[Self], dot: f64, dx: &mut [Self]) {
                on_isa!(super::vector_isa(), I, isa => softmax_backward_impl::<I, Self>(isa, y, dy, dot, dx))
            }
            fn log_softmax_backward(y: &[Self], dy: &[Self], total: f64, dx: &mut [Self]) -> bool {
                on_isa!(super::vector_isa(), I, isa => log_softmax_backward_impl::<I, Self>(isa, y, dy, total, dx))
            }
        }
    )*};
}
entries!(f64, f32, f16, bf16);

// The generic entry points: slices are cast to the concrete type their DType names.

/// The read pass; `None` when the row holds NaN or `+inf`. Without `tally` the scan's `masked`
/// and `finite_min` are not gathered (left at 0 and `+inf`).
///
/// With `wide` the exp sweep runs in `f64` lanes (see [`SweepLanes`]); a soft-capped row
/// (`map`) always does, since its map is computed there.
pub(crate) fn scan<E: Element>(
    row: &[E],
    tally: bool,
    wide: bool,
    map: LogitMap,
) -> Option<RowScan> {
    let sink = ScanSink {
        tally,
        maxima: None,
        cache: None,
        slopes: None,
        distances: false,
    };
    with_lanes!(E, L => L::scan(cast(row), sink, map, wide))
}

/// True when rows of `E` with `len` elements can cache their exp terms in an `f32` buffer.
pub(crate) fn caches<E: Element>(len: usize) -> bool {
    len <= MAX_CACHED_LEN && with_lanes!(E, L => <L as Lanes>::CACHES)
}

/// The read pass, also recording the block maxima and, with `cache`, leaving each block's exp
/// terms there, with `slopes` each slope, and with `distances` the blocks' distance sums (see
/// [`super::scan_caching_smoothed`]). `None`: NaN or `+inf`, and the buffers hold anything.
///
/// # Panics
/// Unless [`caches`] holds for the row, and each buffer is as long as the row.
///
/// A soft-capped row (`map`) is read in `f64` lanes and caches `slope · exp(y − m_b)`.
pub(crate) fn scan_caching<E: Element>(
    row: &[E],
    (cache, slopes): (Option<&mut [f32]>, Option<&mut [f32]>),
    maxima: &mut BlockMaxima,
    map: LogitMap,
    (tally, distances): (bool, bool),
) -> Option<RowScan> {
    assert!(caches::<E>(row.len()));
    let buffer = |b: Option<&mut [f32]>| {
        b.map(|b| {
            assert_eq!(b.len(), row.len());
            b.as_mut_ptr()
        })
    };
    maxima.clear();
    let (cache, slopes) = (buffer(cache), buffer(slopes));
    let sink = ScanSink {
        tally,
        maxima: Some(maxima),
        cache,
        slopes,
        distances,
    };
    with_lanes!(E, L => L::scan(cast(row), sink, map, false))
}

/// The write pass of a cached row: `out_i ← c · exp(m_b − m) · cache_i` per block, with the
/// cache in `out` itself when `cache` is `None` (an `f32` row); with `slopes`, minus
/// `b · slope_i`.
///
/// # Panics
/// When the caches' lengths differ from `out`'s, or `cache` is `None` for a row other than
/// `f32`.
pub(crate) fn rescale<E: Element>(
    out: &mut [E],
    cache: Option<&[f32]>,
    slopes: Option<&[f32]>,
    maxima: &BlockMaxima,
    mcb: (f64, f64, f64),
) {
    let len = out.len();
    let ptr = |buf: &[f32]| {
        assert_eq!(buf.len(), len);
        buf.as_ptr()
    };
    let slopes = slopes.map_or(core::ptr::null(), ptr);
    let cache = cache.map_or_else(|| out.as_ptr().cast::<f32>(), ptr);
    assert!(
        E::DTYPE == DType::F32 || cache != out.as_ptr().cast(),
        "only an f32 row caches in itself"
    );
    let out = out.as_mut_ptr();
    // SAFETY: both hold `len` elements.
    with_lanes!(E, L => unsafe { L::rescale((cache, slopes), out.cast(), len, maxima, mcb) });
}

/// Softmax write pass.
pub(crate) fn softmax<E: Element>(x: &[E], max: f64, denominator: f64, out: &mut [E]) {
    with_lanes!(E, L => L::softmax(cast(x), max, denominator, cast_mut(out)));
}

/// Log-softmax write pass.
pub(crate) fn log_softmax<E: Element>(x: &[E], max: f64, log1p_sum: f64, out: &mut [E]) {
    with_lanes!(E, L => L::log_softmax(cast(x), max, log1p_sum, cast_mut(out)));
}

/// The cross-entropy write pass `w` from `x` into `g`, or only its sweep when `g` is `None`
/// (see [`FastWrite`]).
pub(crate) fn ce_grad<E: Element>(
    x: &[E],
    g: Option<&mut [E]>,
    w: &FastWrite<'_, '_, E>,
) -> MassesPass {
    let (len, store) = (x.len(), g.is_some());
    let out = g.map_or(core::ptr::null_mut(), |g| {
        assert_eq!(g.len(), len);
        g.as_mut_ptr()
    });
    let x = x.as_ptr();
    // SAFETY: `x`, and `out` when `store`, hold `len` elements.
    with_lanes!(E, L => unsafe {
        L::ce_grad((x.cast(), out.cast(), len), cast_ref::<E, L, _, _>(w), store)
    })
}

/// [`ce_grad`] written over the logits themselves.
pub(crate) fn ce_grad_in_place<E: Element>(x: &mut [E], w: &FastWrite<'_, '_, E>) -> MassesPass {
    let (p, len) = (x.as_mut_ptr(), x.len());
    // SAFETY: `p` holds `len` elements.
    with_lanes!(E, L => unsafe {
        L::ce_grad((p.cast_const().cast(), p.cast(), len), cast_ref::<E, L, _, _>(w), true)
    })
}

/// `r` for the concrete storage type `L` of `E` (`T` and `U` are one type over `E` and `L`).
#[inline(always)]
fn cast_ref<E: Element, L: Element, T, U>(r: &T) -> &U {
    debug_assert_eq!(E::DTYPE, L::DTYPE);
    debug_assert_eq!(size_of::<T>(), size_of::<U>());
    // SAFETY: as in `cast`: `E` and `L` are the same type.
    unsafe { &*(r as *const T).cast::<U>() }
}

/// Every cross-entropy write pass (`x` and `g` may be the same memory; `g` is not touched
/// unless `store`).
#[inline(always)]
unsafe fn ce_grad_raw<I: Isa, L: Lanes>(
    isa: I,
    io: (*const L, *mut L, usize),
    w: &FastWrite<'_, '_, L>,
    store: bool,
) -> MassesPass
where
    I::Wide: SweepLanes<I, L::V<I>>,
{
    let constants = (w.max, w.c, w.b);
    // SAFETY (the three blocks): `io` as the caller promised; `w`'s masses hold the row.
    if w.masses.is_none() && w.map == LogitMap::Identity {
        debug_assert!(store);
        let (x, g, len) = io;
        let distance = if w.sweep_distance {
            unsafe { ce_grad_impl::<I, L, true>(isa, x, g, len, constants) }
        } else {
            unsafe { ce_grad_impl::<I, L, false>(isa, x, g, len, constants) }
        };
        return MassesPass {
            distance,
            cancels: false,
        };
    }
    unsafe {
        masses_pass::<I, L>(
            isa,
            io,
            constants,
            w.masses.as_ref(),
            w.map,
            (store, w.verify()),
        )
    }
}

/// [`ce_grad_masses_impl`] in the lanes its map and `verify` ask for: probability targets and
/// soft-capped rows with the exp in `f64` lanes, as their read pass ([`scan`] with `wide`).
#[inline(always)]
unsafe fn masses_pass<I: Isa, L: Lanes>(
    isa: I,
    io: (*const L, *mut L, usize),
    constants: (f64, f64, f64),
    masses: Option<&ClassMasses<'_, '_, L>>,
    map: LogitMap,
    flags: (bool, bool),
) -> MassesPass
where
    I::Wide: SweepLanes<I, L::V<I>>,
{
    let masses = MassLanes::new(isa, masses.unwrap_or(&ClassMasses::UNIT));
    // SAFETY: `io` and `masses` as the caller promised.
    unsafe {
        match map {
            LogitMap::Softcap { cap, scale } => {
                let map = Capped { cap, scale };
                ce_grad_masses_impl::<I, L, I::Wide, _>(isa, io, constants, masses, map, flags)
            }
            LogitMap::Scaled(scale) => {
                let map = Scaled { scale };
                ce_grad_masses_impl::<I, L, I::Wide, _>(isa, io, constants, masses, map, flags)
            }
            LogitMap::Identity if flags.1 => {
                ce_grad_masses_impl::<I, L, I::Wide, _>(isa, io, constants, masses, Unmapped, flags)
            }
            LogitMap::Identity => {
                ce_grad_masses_impl::<I, L, L::V<I>, _>(isa, io, constants, masses, Unmapped, flags)
            }
        }
    }
}

/// `(Σ_c w_c q_c, max_c q_c)` over a row of probability targets (`w_c` = 1 without weights),
/// or `None` when some `q_c` is not a finite number ≥ 0 (the scalar loop then names it).
pub(crate) fn probability_mass<E: Element>(
    q: &[E],
    weights: Option<&[f64]>,
) -> Option<(CompensatedSum, f64)> {
    with_lanes!(E, L => L::probability_mass(cast(q), weights))
}

/// The distance sweep of [`ce_grad`] on its own (a loss-only call): `Σ_live (m − y_i)`, or
/// `Σ_live u_i (m − y_i)` with `masses`, of the mapped logits `y`; the same bits as the write
/// pass's.
pub(crate) fn live_distance<E: Element>(
    x: &[E],
    max: f64,
    masses: Option<&ClassMasses<'_, '_, E>>,
    map: LogitMap,
) -> f64 {
    with_lanes!(E, L => L::live_distance(cast(x), max, masses.map(cast_ref::<E, L, _, _>), map))
}

/// `Σ_j y_j dy_j` (`weighted`) or `Σ_j dy_j`, in `f64`: the backward ops' row reduction.
pub(crate) fn backward_dot<E: Element>(y: &[E], dy: &[E], weighted: bool) -> f64 {
    with_lanes!(E, L => L::backward_dot(cast(y), cast(dy), weighted))
}

/// Softmax backward's write pass, given the row's `Σ y·dy`.
pub(crate) fn softmax_backward<E: Element>(y: &[E], dy: &[E], dot: f64, dx: &mut [E]) {
    with_lanes!(E, L => L::softmax_backward(cast(y), cast(dy), dot, cast_mut(dx)));
}

/// Log-softmax backward's write pass, given the row's `Σ dy`; `false` (nothing written) for a
/// `y` outside `[−inf, 0]`.
pub(crate) fn log_softmax_backward<E: Element>(
    y: &[E],
    dy: &[E],
    total: f64,
    dx: &mut [E],
) -> bool {
    with_lanes!(E, L => L::log_softmax_backward(cast(y), cast(dy), total, cast_mut(dx)))
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The vector soft-cap of `x` (equal lanes) in the widest instruction set this CPU has.
    fn softcap_lanes(x: f64, cap: f64) -> Option<(f64, f64)> {
        #[inline(always)]
        fn lane0<I: Isa>(isa: I, x: f64, cap: f64) -> (f64, f64) {
            let splat = |v| <I::Wide as Float>::splat(isa, v);
            let (y, slope) = softcap(splat(x), splat(cap), splat(2.0 / cap));
            (y.reduce_max(), slope.reduce_max())
        }
        let fast = super::super::fast();
        fast.then(|| on_isa!(super::super::vector_isa(), I, isa => lane0::<I>(isa, x, cap)))
    }

    #[test]
    fn softcap_lanes_match_the_scalar_map_bit_for_bit() {
        for cap in [0.1, 1.0, 15.0, 30.0, 50.0, 1e6] {
            for x in super::super::scalar::tests::logits() {
                let Some((y, slope)) = softcap_lanes(x, cap) else {
                    return;
                };
                let (sy, sslope) = LogitMap::of(1.0, Some(cap)).with_slope(x);
                assert_eq!(
                    (y.to_bits(), slope.to_bits()),
                    (sy.to_bits(), sslope.to_bits()),
                    "cap {cap}, x {x:e}: vector ({y:e}, {slope:e}) scalar ({sy:e}, {sslope:e})"
                );
            }
        }
        let masked = softcap_lanes(f64::NEG_INFINITY, 30.0);
        assert!(masked.is_none_or(|(y, slope)| y == f64::NEG_INFINITY && slope == 0.0));
        assert!(softcap_lanes(f64::NAN, 30.0).is_none_or(|(y, _)| y.is_nan()));
    }
}
