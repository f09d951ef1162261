//! x86-64 AVX2 + FMA (+ F16C) kernels for `f32`, `f16` and `bf16` rows.
//!
//! Eight elements are widened to `f32` lanes per step (`bf16` by a 16-bit shift, `f16` by
//! F16C), never a whole-row copy. The read pass works on blocks of [`BLOCK`] elements that stay
//! in L1: a max sweep, then an exp sweep over the same block, folded into the row's
//! [`RowState`] with the §1 merge — one pass over memory, no per-lane rescaling, and the same
//! result for any split of the row into whole blocks.
//!
//! Accuracy comes from three choices. `x − m` is split exactly by TwoSum, so the exp's argument
//! carries no rounding error of the subtraction; the exp returns `2^k · (1 + q)` with `q` in
//! `f32` and `1 + q` formed in `f64`, so each term has a relative error of about 0.3 ulp of
//! `f32`; and sums are accumulated in `f64`, excluding the block's maxima (counted apart) so
//! that `s'` keeps its digits when it is tiny. Every output is formed in `f64` and rounded once
//! to `f32` (then once more to `f16`/`bf16`, an error of at most 2^-13 ulp of those).

use core::arch::x86_64::*;

use half::{bf16, f16};

use super::scalar::RowScan;
use crate::element::{DType, Element};
use crate::state::RowState;

/// Elements per read-pass block: 4 KiB of `f32`, well inside L1 between its two sweeps.
pub(crate) const BLOCK: usize = 1024;

/// Below this, `exp(x − m)` is treated as exactly 0: even 2^31 such terms stay below half of
/// `f32`'s smallest subnormal, so no `f32`/`f16`/`bf16` output can see them.
const EXP_FLOOR: f32 = -128.0;

/// `P(r) ≈ (e^r − 1 − r)/r²` on `|r| ≤ ln2/2`: a degree-4 Chebyshev fit, so that
/// `q = r + r²·P(r)` is within 1.1e-8 of `e^r − 1` relative to `e^r` (0.17 ulp of `f32`).
const EXPM1_POLY: [f32; 5] = [
    0.5,
    0.166_665_77,
    0.041_666_465,
    0.008_363_185,
    0.001_393_366,
];

/// Storage types whose rows the kernels read and write through `f32` lanes.
pub(crate) trait Lanes: Element {
    /// Loads 8 elements at `p`, widened to `f32`.
    unsafe fn load8(p: *const Self) -> __m256;
    /// Stores 8 results given as `f64` (`lo`: elements 0..4, `hi`: 4..8), rounded to `Self`.
    unsafe fn store8(p: *mut Self, lo: __m256d, hi: __m256d);
}

/// Rounds two `f64x4` to one `f32x8` (round to nearest even).
#[inline(always)]
unsafe fn narrow(lo: __m256d, hi: __m256d) -> __m256 {
    _mm256_set_m128(_mm256_cvtpd_ps(hi), _mm256_cvtpd_ps(lo))
}

impl Lanes for f32 {
    #[inline(always)]
    unsafe fn load8(p: *const Self) -> __m256 {
        _mm256_loadu_ps(p)
    }
    #[inline(always)]
    unsafe fn store8(p: *mut Self, lo: __m256d, hi: __m256d) {
        _mm256_storeu_ps(p, narrow(lo, hi));
    }
}

impl Lanes for f16 {
    #[inline(always)]
    unsafe fn load8(p: *const Self) -> __m256 {
        _mm256_cvtph_ps(_mm_loadu_si128(p.cast()))
    }
    #[inline(always)]
    unsafe fn store8(p: *mut Self, lo: __m256d, hi: __m256d) {
        let halves = _mm256_cvtps_ph::<_MM_FROUND_TO_NEAREST_INT>(narrow(lo, hi));
        _mm_storeu_si128(p.cast(), halves);
    }
}

impl Lanes for bf16 {
    #[inline(always)]
    unsafe fn load8(p: *const Self) -> __m256 {
        let wide = _mm256_cvtepu16_epi32(_mm_loadu_si128(p.cast()));
        _mm256_castsi256_ps(_mm256_slli_epi32::<16>(wide))
    }
    #[inline(always)]
    unsafe fn store8(p: *mut Self, lo: __m256d, hi: __m256d) {
        // Round to nearest even on the upper 16 bits. Outputs here are never NaN.
        let bits = _mm256_castps_si256(narrow(lo, hi));
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

/// `exp(x − m)` for `x ≤ m` in 8 lanes, returned as two `f64x4`; exactly 0 where
/// `x − m < EXP_FLOOR` (so `x = −inf` too) and, with `ZERO_TIES`, where `x = m`.
///
/// `x − m = s + err` exactly (TwoSum); `s = k·ln2 + r` with Cody–Waite's
/// two-part `ln 2` (`k·LN2_HI` is exact for |k| < 2^15), `|r| ≤ ln2/2`; `q = e^r − 1 =
/// r + r²·P(r)` with [`EXPM1_POLY`]; the result `(1 + q)·2^k` is formed in `f64`, where neither
/// the `1 + q` nor a subnormal-range `2^k` rounds. Clamping `s` at the floor first keeps `k`
/// in range (the lanes below it are zeroed anyway).
#[inline(always)]
unsafe fn exp_shifted<const ZERO_TIES: bool>(
    x: __m256,
    m: __m256,
    neg_m: __m256,
) -> (__m256d, __m256d) {
    const LOG2E: f32 = std::f32::consts::LOG2_E;
    const LN2_HI: f32 = 0.693_359_4; // 355/512: 9 significant bits
    const LN2_LO: f32 = -2.121_944_4e-4; // ln 2 − LN2_HI
    let s = _mm256_add_ps(x, neg_m);
    let floor = _mm256_set1_ps(EXP_FLOOR);
    let mut zero = _mm256_cmp_ps::<_CMP_LT_OQ>(s, floor);
    if ZERO_TIES {
        zero = _mm256_or_ps(zero, _mm256_cmp_ps::<_CMP_EQ_OQ>(x, m));
    }
    let s = _mm256_max_ps(s, floor);
    let k = _mm256_round_ps::<{ _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC }>(_mm256_mul_ps(
        s,
        _mm256_set1_ps(LOG2E),
    ));
    let r = _mm256_fmadd_ps(k, _mm256_set1_ps(-LN2_HI), s);
    let r = _mm256_fmadd_ps(k, _mm256_set1_ps(-LN2_LO), r);
    // The subtraction's rounding error, which matters for f16 and bf16 too: their logsumexp
    // and loss are f32, and `x − m` of a logit far below a large max rounds in f32.
    let s_virtual = _mm256_sub_ps(s, x);
    let err = _mm256_add_ps(
        _mm256_sub_ps(x, _mm256_sub_ps(s, s_virtual)),
        _mm256_sub_ps(neg_m, s_virtual),
    );
    let r = _mm256_add_ps(r, err);
    let mut p = _mm256_set1_ps(EXPM1_POLY[4]);
    for c in [EXPM1_POLY[3], EXPM1_POLY[2], EXPM1_POLY[1], EXPM1_POLY[0]] {
        p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(c));
    }
    let q = _mm256_fmadd_ps(_mm256_mul_ps(r, r), p, r);
    // 1 + q = 0 in the zeroed lanes (their r may be NaN: x = −inf gives inf − inf).
    let q = _mm256_blendv_ps(q, _mm256_set1_ps(-1.0), zero);
    let k = _mm256_cvtps_epi32(k);
    let (scale_lo, scale_hi) = (
        power_of_two(_mm256_castsi256_si128(k)),
        power_of_two(_mm256_extracti128_si256::<1>(k)),
    );
    let (q_lo, q_hi) = widen(q);
    (
        _mm256_fmadd_pd(q_lo, scale_lo, scale_lo),
        _mm256_fmadd_pd(q_hi, scale_hi, scale_hi),
    )
}

/// `2^k` as `f64` for four `i32` exponents in the normal range.
#[inline(always)]
unsafe fn power_of_two(k: __m128i) -> __m256d {
    let biased = _mm256_add_epi64(_mm256_cvtepi32_epi64(k), _mm256_set1_epi64x(1023));
    _mm256_castsi256_pd(_mm256_slli_epi64::<52>(biased))
}

/// `f32x8` → two `f64x4` (exact).
#[inline(always)]
unsafe fn widen(v: __m256) -> (__m256d, __m256d) {
    (
        _mm256_cvtps_pd(_mm256_castps256_ps128(v)),
        _mm256_cvtps_pd(_mm256_extractf128_ps::<1>(v)),
    )
}

#[inline(always)]
unsafe fn horizontal_max(v: __m256) -> f32 {
    let m = _mm_max_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps::<1>(v));
    let m = _mm_max_ps(m, _mm_movehl_ps(m, m));
    let m = _mm_max_ss(m, _mm_shuffle_ps::<1>(m, m));
    _mm_cvtss_f32(m)
}

#[inline(always)]
unsafe fn horizontal_min(v: __m256) -> f32 {
    let m = _mm_min_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps::<1>(v));
    let m = _mm_min_ps(m, _mm_movehl_ps(m, m));
    let m = _mm_min_ss(m, _mm_shuffle_ps::<1>(m, m));
    _mm_cvtss_f32(m)
}

#[inline(always)]
unsafe fn horizontal_sum(v: __m256d) -> f64 {
    let s = _mm_add_pd(_mm256_castpd256_pd128(v), _mm256_extractf128_pd::<1>(v));
    _mm_cvtsd_f64(_mm_add_sd(s, _mm_unpackhi_pd(s, s)))
}

#[inline(always)]
unsafe fn horizontal_count(v: __m256i) -> usize {
    let mut lanes = [0i32; 8];
    _mm256_storeu_si256(lanes.as_mut_ptr().cast(), v);
    lanes.iter().map(|&c| c as usize).sum()
}

/// The last `len % 8` elements of a row, copied into a full vector padded with `fill`.
#[inline(always)]
fn padded<E: Element>(tail: &[E], fill: E) -> [E; 8] {
    let mut buf = [fill; 8];
    buf[..tail.len()].copy_from_slice(tail);
    buf
}

fn neg_inf<E: Element>() -> E {
    E::from_f64(f64::NEG_INFINITY)
}

/// Runs `$body` with `$x` bound to each vector of `$row` (`&[$e]`), the last one padded with
/// `−inf`. A macro, not a closure: closures do not inherit `#[target_feature]`, and their
/// intrinsics would become calls.
macro_rules! for_each_vector {
    ($e:ty, $row:expr, |$x:ident| $body:block) => {{
        let row: &[$e] = $row;
        let (body, tail) = row.split_at(row.len() / 8 * 8);
        for v in body.chunks_exact(8) {
            let $x = <$e as Lanes>::load8(v.as_ptr());
            $body
        }
        if !tail.is_empty() {
            let buf = padded(tail, neg_inf::<$e>());
            let $x = <$e as Lanes>::load8(buf.as_ptr());
            $body
        }
    }};
}

/// Evaluates `$body` (two `f64x4`) for each vector `$v` read at `$x` and stores it at `$out`,
/// `$len` elements (the tail padded with `−inf`). `$x` and `$out` may be the same memory: every
/// vector is read before it is written.
macro_rules! map_vectors {
    ($e:ty, $x:expr, $out:expr, $len:expr, |$v:ident| $body:block) => {{
        let (x, out, len): (*const $e, *mut $e, usize) = ($x, $out, $len);
        let body = len / 8 * 8;
        let mut i = 0;
        while i < body {
            let $v = <$e as Lanes>::load8(x.add(i));
            let (lo, hi) = $body;
            <$e as Lanes>::store8(out.add(i), lo, hi);
            i += 8;
        }
        let tail = len - body;
        if tail > 0 {
            let buf = padded(core::slice::from_raw_parts(x.add(body), tail), neg_inf::<$e>());
            let mut result = [<$e as Element>::zero(); 8];
            let $v = <$e as Lanes>::load8(buf.as_ptr());
            let (lo, hi) = $body;
            <$e as Lanes>::store8(result.as_mut_ptr(), lo, hi);
            core::ptr::copy_nonoverlapping(result.as_ptr(), out.add(body), tail);
        }
    }};
}

/// The read pass over a row; `None` when it holds NaN or `+inf` (the scalar kernel then finds
/// the first one and applies the caller's policy).
#[inline(always)]
unsafe fn scan_impl<E: Lanes>(row: &[E]) -> Option<RowScan> {
    let mut state = RowState::EMPTY;
    let mut masked = 0;
    let (mut min, mut max) = (f32::INFINITY, f32::NEG_INFINITY);
    let inf = _mm256_set1_ps(f32::INFINITY);
    let minus_inf = _mm256_set1_ps(f32::NEG_INFINITY);
    for block in row.chunks(BLOCK) {
        // Sweep 1: max, min of finite elements, −inf count, NaN/+inf flag.
        let (mut hi, mut lo, mut bad) = (minus_inf, inf, _mm256_setzero_ps());
        let mut masked_lanes = _mm256_setzero_si256();
        for_each_vector!(E, block, |x| {
            hi = _mm256_max_ps(hi, x);
            let is_masked = _mm256_cmp_ps::<_CMP_EQ_OQ>(x, minus_inf);
            lo = _mm256_min_ps(lo, _mm256_blendv_ps(x, inf, is_masked));
            bad = _mm256_or_ps(bad, _mm256_cmp_ps::<_CMP_NLT_UQ>(x, inf));
            masked_lanes = _mm256_sub_epi32(masked_lanes, _mm256_castps_si256(is_masked));
        });
        if _mm256_movemask_ps(bad) != 0 {
            return None;
        }
        masked += horizontal_count(masked_lanes) - (8 - block.len() % 8) % 8;
        min = min.min(horizontal_min(lo));
        let block_max = horizontal_max(hi);
        if block_max == f32::NEG_INFINITY {
            continue;
        }
        max = max.max(block_max);
        // Sweep 2 (from L1): Σ exp(x − m_b) over the elements below the block max.
        let m = _mm256_set1_ps(block_max);
        let neg_m = _mm256_set1_ps(-block_max);
        let (mut sum_lo, mut sum_hi) = (_mm256_setzero_pd(), _mm256_setzero_pd());
        let mut ties = _mm256_setzero_si256();
        for_each_vector!(E, block, |x| {
            let (e_lo, e_hi) = exp_shifted::<true>(x, m, neg_m);
            sum_lo = _mm256_add_pd(sum_lo, e_lo);
            sum_hi = _mm256_add_pd(sum_hi, e_hi);
            ties = _mm256_sub_epi32(ties, _mm256_castps_si256(_mm256_cmp_ps::<_CMP_EQ_OQ>(x, m)));
        });
        let rest =
            horizontal_sum(_mm256_add_pd(sum_lo, sum_hi)) + (horizontal_count(ties) - 1) as f64;
        state = state.merge(RowState::from_parts(f64::from(block_max), rest));
    }
    Some(RowScan {
        state,
        first_non_finite: None,
        masked,
        finite_min: f64::from(min),
        finite_max: f64::from(max),
        nan: 0,
        pos_inf: 0,
    })
}

/// `softmax_i = exp(x_i − m) / S` (row not fully masked).
#[inline(always)]
unsafe fn softmax_impl<E: Lanes>(x: &[E], max: f32, denominator: f64, out: &mut [E]) {
    let (m, neg_m) = (_mm256_set1_ps(max), _mm256_set1_ps(-max));
    let inv = _mm256_set1_pd(1.0 / denominator);
    map_vectors!(E, x.as_ptr(), out.as_mut_ptr(), x.len(), |v| {
        let (lo, hi) = exp_shifted::<false>(v, m, neg_m);
        (_mm256_mul_pd(lo, inv), _mm256_mul_pd(hi, inv))
    });
}

/// `log_softmax_i = (x_i − m) − log1p(s')`, saturating finite results at `−MAX`, `−inf` kept.
#[inline(always)]
unsafe fn log_softmax_impl<E: Lanes>(x: &[E], max: f32, log1p_sum: f64, out: &mut [E]) {
    let (m, l) = (_mm256_set1_pd(f64::from(max)), _mm256_set1_pd(log1p_sum));
    let floor = _mm256_set1_pd(-E::MAX.to_f64());
    let minus_inf = _mm256_set1_pd(f64::NEG_INFINITY);
    map_vectors!(E, x.as_ptr(), out.as_mut_ptr(), x.len(), |v| {
        let (lo, hi) = widen(v);
        (
            log_prob(lo, m, l, floor, minus_inf),
            log_prob(hi, m, l, floor, minus_inf),
        )
    });
}

/// `max((x − m) − l, floor)`, `−inf` where `x` is.
#[inline(always)]
unsafe fn log_prob(
    x: __m256d,
    m: __m256d,
    l: __m256d,
    floor: __m256d,
    minus_inf: __m256d,
) -> __m256d {
    let v = _mm256_max_pd(_mm256_sub_pd(_mm256_sub_pd(x, m), l), floor);
    _mm256_blendv_pd(v, minus_inf, _mm256_cmp_pd::<_CMP_EQ_OQ>(x, minus_inf))
}

/// The cross-entropy gradient `g_i = c · exp(x_i − m) − b_i`, with `b_i = b` on live classes
/// and 0 on masked ones; `x` and `g` may be the same memory (the in-place loss). With `SWEEP`,
/// also returns `Σ_live (m − x_i)` (every term ≥ 0, exact in `f64`), else 0.
#[inline(always)]
unsafe fn ce_grad_impl<E: Lanes, const SWEEP: bool>(
    x: *const E,
    g: *mut E,
    len: usize,
    max: f32,
    c: f64,
    b: f64,
) -> f64 {
    let (m, neg_m) = (_mm256_set1_ps(max), _mm256_set1_ps(-max));
    let (c, b) = (_mm256_set1_pd(c), _mm256_set1_pd(b));
    let minus_inf = _mm256_set1_ps(f32::NEG_INFINITY);
    let mut distance = Distance::new(max);
    map_vectors!(E, x, g, len, |v| {
        let (e_lo, e_hi) = exp_shifted::<false>(v, m, neg_m);
        let (live_lo, live_hi) = live_mask(v, minus_inf);
        if SWEEP {
            distance.add(v, live_lo, live_hi);
        }
        (
            _mm256_fmsub_pd(c, e_lo, _mm256_and_pd(b, live_lo)),
            _mm256_fmsub_pd(c, e_hi, _mm256_and_pd(b, live_hi)),
        )
    });
    distance.total()
}

/// Lanes of `v` that are not `−inf`, as two `f64x4` masks.
#[inline(always)]
unsafe fn live_mask(v: __m256, minus_inf: __m256) -> (__m256d, __m256d) {
    let (lo, hi) = widen(_mm256_cmp_ps::<_CMP_NEQ_OQ>(v, minus_inf));
    // A widened all-ones f32 lane is a NaN: that is the mask in f64 lanes.
    (
        _mm256_cmp_pd::<_CMP_UNORD_Q>(lo, lo),
        _mm256_cmp_pd::<_CMP_UNORD_Q>(hi, hi),
    )
}

/// `Σ_live (m − x_i)` in `f64` (every term ≥ 0 and exact).
struct Distance {
    m: __m256d,
    lo: __m256d,
    hi: __m256d,
}

impl Distance {
    #[inline(always)]
    unsafe fn new(max: f32) -> Self {
        Self {
            m: _mm256_set1_pd(f64::from(max)),
            lo: _mm256_setzero_pd(),
            hi: _mm256_setzero_pd(),
        }
    }

    #[inline(always)]
    unsafe fn add(&mut self, v: __m256, live_lo: __m256d, live_hi: __m256d) {
        let (x_lo, x_hi) = widen(v);
        self.lo = _mm256_add_pd(self.lo, _mm256_and_pd(live_lo, _mm256_sub_pd(self.m, x_lo)));
        self.hi = _mm256_add_pd(self.hi, _mm256_and_pd(live_hi, _mm256_sub_pd(self.m, x_hi)));
    }

    #[inline(always)]
    unsafe fn total(&self) -> f64 {
        horizontal_sum(_mm256_add_pd(self.lo, self.hi))
    }
}

/// [`Distance`] over a row on its own (a loss-only call with smoothing).
#[inline(always)]
unsafe fn live_distance_impl<E: Lanes>(x: &[E], max: f32) -> f64 {
    let minus_inf = _mm256_set1_ps(f32::NEG_INFINITY);
    let mut distance = Distance::new(max);
    for_each_vector!(E, x, |v| {
        let (live_lo, live_hi) = live_mask(v, minus_inf);
        distance.add(v, live_lo, live_hi);
    });
    distance.total()
}

/// `Σ_j y_j dy_j` (softmax backward) or `Σ_j dy_j` (log-softmax backward), in `f64`.
#[inline(always)]
unsafe fn dot_impl<E: Lanes>(y: &[E], dy: &[E], weighted: bool) -> f64 {
    let (mut acc_lo, mut acc_hi) = (_mm256_setzero_pd(), _mm256_setzero_pd());
    let body = y.len() / 8 * 8;
    let mut i = 0;
    while i < body {
        let (d_lo, d_hi) = widen(E::load8(dy.as_ptr().add(i)));
        if weighted {
            let (y_lo, y_hi) = widen(E::load8(y.as_ptr().add(i)));
            acc_lo = _mm256_fmadd_pd(y_lo, d_lo, acc_lo);
            acc_hi = _mm256_fmadd_pd(y_hi, d_hi, acc_hi);
        } else {
            acc_lo = _mm256_add_pd(acc_lo, d_lo);
            acc_hi = _mm256_add_pd(acc_hi, d_hi);
        }
        i += 8;
    }
    let mut total = horizontal_sum(_mm256_add_pd(acc_lo, acc_hi));
    for j in body..y.len() {
        let d = dy[j].to_f64();
        total += if weighted { y[j].to_f64() * d } else { d };
    }
    total
}

/// `dx_i = y_i · (dy_i − dot)`.
#[inline(always)]
unsafe fn softmax_backward_impl<E: Lanes>(y: &[E], dy: &[E], dx: &mut [E]) {
    let dot_value = dot_impl(y, dy, true);
    let dot = _mm256_set1_pd(dot_value);
    let len = y.len();
    let body = len / 8 * 8;
    let mut i = 0;
    while i < body {
        let (y_lo, y_hi) = widen(E::load8(y.as_ptr().add(i)));
        let (d_lo, d_hi) = widen(E::load8(dy.as_ptr().add(i)));
        let lo = _mm256_mul_pd(y_lo, _mm256_sub_pd(d_lo, dot));
        let hi = _mm256_mul_pd(y_hi, _mm256_sub_pd(d_hi, dot));
        E::store8(dx.as_mut_ptr().add(i), lo, hi);
        i += 8;
    }
    for j in body..len {
        dx[j] = E::from_f64(y[j].to_f64() * (dy[j].to_f64() - dot_value));
    }
}

/// `dx_i = dy_i − exp(y_i) · Σ dy` for log-probabilities `y ≤ 0`; `false` (nothing written)
/// when some `y_i` is positive or NaN, which the scalar kernel handles.
#[inline(always)]
unsafe fn log_softmax_backward_impl<E: Lanes>(y: &[E], dy: &[E], dx: &mut [E]) -> bool {
    let mut out_of_range = _mm256_setzero_ps();
    let zero = _mm256_setzero_ps();
    for_each_vector!(E, y, |v| {
        out_of_range = _mm256_or_ps(out_of_range, _mm256_cmp_ps::<_CMP_NLE_UQ>(v, zero));
    });
    if _mm256_movemask_ps(out_of_range) != 0 {
        return false;
    }
    let total_value = dot_impl(y, dy, false);
    let total = _mm256_set1_pd(total_value);
    let len = y.len();
    let body = len / 8 * 8;
    let mut i = 0;
    while i < body {
        let (e_lo, e_hi) = exp_shifted::<false>(E::load8(y.as_ptr().add(i)), zero, zero);
        let (d_lo, d_hi) = widen(E::load8(dy.as_ptr().add(i)));
        E::store8(
            dx.as_mut_ptr().add(i),
            _mm256_fnmadd_pd(e_lo, total, d_lo),
            _mm256_fnmadd_pd(e_hi, total, d_hi),
        );
        i += 8;
    }
    for j in body..len {
        dx[j] = E::from_f64(dy[j].to_f64() - y[j].to_f64().exp() * total_value);
    }
    true
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

/// Runs `$body` with `$l` the concrete storage type of `$e`; `None` for `f64`, which has no
/// kernel here.
macro_rules! with_lanes {
    ($e:ty, $l:ident => $body:expr) => {
        match <$e as Element>::DTYPE {
            DType::F32 => {
                type $l = f32;
                Some($body)
            }
            DType::F16 => {
                type $l = f16;
                Some($body)
            }
            DType::BF16 => {
                type $l = bf16;
                Some($body)
            }
            DType::F64 => None,
        }
    };
}

// The entry points. SAFETY (all): they are reached only after `active_kernel()` found AVX2,
// FMA and F16C on this CPU; slices are cast to the concrete type their DType names.

/// The read pass; `None` for `f64` or when the row holds NaN or `+inf`.
pub(crate) fn scan<E: Element>(row: &[E]) -> Option<RowScan> {
    #[target_feature(enable = "avx2,fma,f16c")]
    unsafe fn run<L: Lanes>(row: &[L]) -> Option<RowScan> {
        scan_impl(row)
    }
    with_lanes!(E, L => unsafe { run::<L>(cast(row)) }).flatten()
}

/// Softmax write pass; `false` (nothing written) for `f64`.
pub(crate) fn softmax<E: Element>(x: &[E], max: f64, denominator: f64, out: &mut [E]) -> bool {
    #[target_feature(enable = "avx2,fma,f16c")]
    unsafe fn run<L: Lanes>(x: &[L], max: f32, denominator: f64, out: &mut [L]) {
        softmax_impl(x, max, denominator, out);
    }
    with_lanes!(E, L => unsafe { run::<L>(cast(x), max as f32, denominator, cast_mut(out)) })
        .is_some()
}

/// Log-softmax write pass; `false` (nothing written) for `f64`.
pub(crate) fn log_softmax<E: Element>(x: &[E], max: f64, log1p_sum: f64, out: &mut [E]) -> bool {
    #[target_feature(enable = "avx2,fma,f16c")]
    unsafe fn run<L: Lanes>(x: &[L], max: f32, log1p_sum: f64, out: &mut [L]) {
        log_softmax_impl(x, max, log1p_sum, out);
    }
    with_lanes!(E, L => unsafe { run::<L>(cast(x), max as f32, log1p_sum, cast_mut(out)) })
        .is_some()
}

/// Cross-entropy gradient `c · exp(x − m) − b` (b on live classes) into `g`, returning
/// `Σ_live (m − x)` when `sweep` (else 0); `None` for `f64`.
pub(crate) fn ce_grad<E: Element>(
    x: &[E],
    max: f64,
    c: f64,
    b: f64,
    sweep: bool,
    g: &mut [E],
) -> Option<f64> {
    with_lanes!(E, L => unsafe {
        ce_grad_raw::<L>(x.as_ptr().cast(), g.as_mut_ptr().cast(), x.len(), max as f32, c, b, sweep)
    })
}

/// The target-feature entry of both [`ce_grad`] variants (`x` and `g` may be the same memory).
#[target_feature(enable = "avx2,fma,f16c")]
unsafe fn ce_grad_raw<L: Lanes>(
    x: *const L,
    g: *mut L,
    len: usize,
    max: f32,
    c: f64,
    b: f64,
    sweep: bool,
) -> f64 {
    if sweep {
        ce_grad_impl::<L, true>(x, g, len, max, c, b)
    } else {
        ce_grad_impl::<L, false>(x, g, len, max, c, b)
    }
}

/// `Σ_live (m − x)` by the same sweep as [`ce_grad`]; `None` for `f64`.
pub(crate) fn live_distance<E: Element>(x: &[E], max: f64) -> Option<f64> {
    #[target_feature(enable = "avx2,fma,f16c")]
    unsafe fn run<L: Lanes>(x: &[L], max: f32) -> f64 {
        live_distance_impl(x, max)
    }
    with_lanes!(E, L => unsafe { run::<L>(cast(x), max as f32) })
}

/// [`ce_grad`] written over the logits themselves.
pub(crate) fn ce_grad_in_place<E: Element>(
    x: &mut [E],
    max: f64,
    c: f64,
    b: f64,
    sweep: bool,
) -> Option<f64> {
    let p = x.as_mut_ptr();
    with_lanes!(E, L => unsafe {
        ce_grad_raw::<L>(p.cast_const().cast(), p.cast(), x.len(), max as f32, c, b, sweep)
    })
}

/// Softmax backward; `false` (nothing written) for `f64`.
pub(crate) fn softmax_backward<E: Element>(y: &[E], dy: &[E], dx: &mut [E]) -> bool {
    #[target_feature(enable = "avx2,fma,f16c")]
    unsafe fn run<L: Lanes>(y: &[L], dy: &[L], dx: &mut [L]) {
        softmax_backward_impl(y, dy, dx);
    }
    with_lanes!(E, L => unsafe { run::<L>(cast(y), cast(dy), cast_mut(dx)) }).is_some()
}

/// Log-softmax backward; `false` (nothing written) for `f64` or a `y` outside `[−inf, 0]`.
pub(crate) fn log_softmax_backward<E: Element>(y: &[E], dy: &[E], dx: &mut [E]) -> bool {
    #[target_feature(enable = "avx2,fma,f16c")]
    unsafe fn run<L: Lanes>(y: &[L], dy: &[L], dx: &mut [L]) -> bool {
        log_softmax_backward_impl(y, dy, dx)
    }
    with_lanes!(E, L => unsafe { run::<L>(cast(y), cast(dy), cast_mut(dx)) }) == Some(true)
}
