//! The kernels, written once in CubeCL: the same source compiles to SPIR-V/WGSL (wgpu: Vulkan,
//! Metal, DX12, WebGPU), CUDA and ROCm.
//!
//! Every buffer is `u32` words and every value is read and written through its bit pattern:
//! shader compilers may assume that no float is NaN or infinite (WGSL says so), so a mask
//! (`-inf`), a NaN or a `+inf` is recognised by its bits and written as bits, never produced by
//! float arithmetic and never compared as a float. 16-bit dtypes hold two elements per word
//! (element `2k` in the low half), and their conversions are integer code with round-to-nearest-
//! even, the same on every device (a shader's own `f32 → f16` conversion may round either way).
//!
//! A row is read by one cube (workgroup): each unit keeps the online state `(m, s')` of the
//! columns `unit, unit + CUBE_DIM, …`, then the units' states are merged pairwise in a fixed tree
//! in shared memory, so the result is the same bits on every run. Arithmetic is `f32`.

use cubecl::prelude::*;

/// `DType` codes of the storage (comptime).
pub(crate) const F32: u32 = 0;
pub(crate) const F16: u32 = 1;
pub(crate) const BF16: u32 = 2;

/// Units per cube; a power of two (the merge tree halves it).
pub(crate) const CUBE_UNITS: u32 = 256;

/// Row-stat words per row, written by the scan kernels and read by the write kernels.
pub(crate) const STAT_WORDS: usize = 8;
// Word offsets in a row's stats.
const S_MAX: usize = 0;
const S_REST: usize = 1;
const S_LIVE: usize = 2;
const S_FAULT: usize = 3;
const S_COLUMN: usize = 4;
// Cross-entropy only: `A`, the live weight and the smoothing share.
const S_MASS: usize = 5;
const S_LIVE_WEIGHT: usize = 6;
const S_SHARE: usize = 7;

/// Fault codes in a row's stats (`S_FAULT`).
pub(crate) const FAULT_NONE: u32 = 0;
/// NaN or `+inf` at column `S_COLUMN`.
pub(crate) const FAULT_NON_FINITE: u32 = 1;
/// Target mass on a masked class (column `S_COLUMN`).
pub(crate) const FAULT_MASKED_TARGET: u32 = 2;
/// A class target outside `0..classes` (its value in `S_COLUMN`).
pub(crate) const FAULT_TARGET_RANGE: u32 = 3;
/// An ignored row (cross-entropy): loss 0, gradient 0.
pub(crate) const FAULT_IGNORED: u32 = 4;

/// A class target that is the ignore index (the host maps the ignore index to this).
pub(crate) const IGNORED_TARGET: u32 = u32::MAX;
/// No column.
const NO_COLUMN: u32 = u32::MAX;

const POS_INF_BITS: u32 = 0x7f80_0000;
const NEG_INF_BITS: u32 = 0xff80_0000;
const NAN_BITS: u32 = 0x7fc0_0000;
const ABS_MASK: u32 = 0x7fff_ffff;
/// `ln 2` rounded to `f32`, and split as `LN2_HI + LN2_LO` with 9 trailing zero bits in
/// `LN2_HI` (from bits: a float literal may be printed into a shader with fewer digits).
const LN2_BITS: u32 = 0x3f31_7218;
const LN2_HI_BITS: u32 = 0x3f31_7200;
const LN2_LO_BITS: u32 = 0x35bf_be8e;
const F32_MAX: f32 = f32::MAX;
const LOG2_E: f32 = core::f32::consts::LOG2_E;
const SQRT_2: f32 = core::f32::consts::SQRT_2;
/// Below this, `exp` of an `f32` difference is 0: clamping keeps `x − m` finite for the shader
/// (two finite extremes may differ by more than `f32::MAX`).
const EXP_FLOOR: f32 = -200.0;

// ---------------------------------------------------------------------------------------------
// Storage: bits in, bits out.

/// The `f32` bits of element `i` of a buffer of `dtype`.
#[cube]
pub(crate) fn load_bits(buf: &[u32], i: usize, #[comptime] dtype: u32) -> u32 {
    if comptime![dtype == F32] {
        buf[i]
    } else {
        let half = (buf[i / 2] >> (((i % 2) as u32) * 16)) & 0xffff;
        if comptime![dtype == F16] {
            f16_to_f32_bits(half)
        } else {
            half << 16
        }
    }
}

/// `f16` bits to `f32` bits, exactly.
#[cube]
fn f16_to_f32_bits(h: u32) -> u32 {
    let sign = (h & 0x8000) << 16;
    let exponent = (h >> 10) & 0x1f;
    let mantissa = h & 0x3ff;
    let mut bits = sign;
    if exponent == 31 {
        bits = sign | POS_INF_BITS | (mantissa << 13);
    } else if exponent == 0 {
        if mantissa != 0 {
            // Subnormal: mantissa · 2^-24, exact in f32.
            let value = f32::cast_from(mantissa) * 5.960_464_5e-8;
            bits = sign | f32::to_bits(value);
        }
    } else {
        bits = sign | ((exponent + 112) << 23) | (mantissa << 13);
    }
    bits
}

/// `f32` bits to `f16` bits, rounded to nearest even; NaN stays NaN, overflow is `±inf`.
#[cube]
fn f32_to_f16_bits(x: u32) -> u32 {
    let sign = (x >> 16) & 0x8000;
    let a = x & ABS_MASK;
    let mut h = sign;
    if a > POS_INF_BITS {
        h = sign | 0x7e00;
    } else if a >= 0x477f_f000 {
        // |x| ≥ 65520 rounds to infinity.
        h = sign | 0x7c00;
    } else if a >= 0x3880_0000 {
        // Normal: rebias the exponent (127 → 15) and round 13 bits away.
        let r = a - 0x3800_0000;
        h = sign | ((r + 0xfff + ((r >> 13) & 1)) >> 13);
    } else if a >= 0x3300_0000 {
        // Subnormal f16: the 24-bit significand shifted right by 126 − e (14..=24), to nearest even.
        let e = a >> 23;
        let significand = (a & 0x7f_ffff) | 0x80_0000;
        let shift = 126 - e;
        let rounded =
            (significand + (1u32 << (shift - 1)) - 1 + ((significand >> shift) & 1)) >> shift;
        h = sign | rounded;
    }
    h
}

/// `f32` bits to `bf16` bits, rounded to nearest even; NaN stays NaN.
#[cube]
fn f32_to_bf16_bits(x: u32) -> u32 {
    let mut h = (x >> 16) | 0x40;
    if (x & ABS_MASK) <= POS_INF_BITS {
        h = (x + 0x7fff + ((x >> 16) & 1)) >> 16;
    }
    h
}

/// `f32` bits in the storage's format (the low 16 bits for 16-bit dtypes).
#[cube]
fn encode(bits: u32, #[comptime] dtype: u32) -> u32 {
    let mut out = bits;
    if comptime![dtype == F16] {
        out = f32_to_f16_bits(bits);
    } else if comptime![dtype == BF16] {
        out = f32_to_bf16_bits(bits);
    }
    out
}

/// Whether `f32` bits are NaN or `+inf` (what the error policy rejects).
#[cube]
fn is_bad(bits: u32) -> bool {
    (bits & ABS_MASK) > POS_INF_BITS || bits == POS_INF_BITS
}

/// The dtype's largest finite value, as `f32`.
#[cube]
fn dtype_max(#[comptime] dtype: u32) -> f32 {
    let mut max = F32_MAX.runtime();
    if comptime![dtype == F16] {
        max = 65504.0;
    } else if comptime![dtype == BF16] {
        max = 3.389_531_4e38;
    }
    max
}

// ---------------------------------------------------------------------------------------------
// Arithmetic.

/// `exp(x)` from `+`, `×` and bit operations only: a shader's own `exp` may be far from
/// correctly rounded (llvmpipe's is 67 ulps off at `|x| = 72`, see docs/gpu.md), so the kernels
/// carry theirs. `x = k ln2 + r` with one `f32` constant for `ln 2`: shader compilers reassociate
/// float arithmetic (Mesa turned a Cody–Waite `(x − k·hi) − k·lo` into `x − (k·hi + k·lo)`:
/// 67 ulps), so nothing here relies on a rounding error surviving; the constant's own error
/// costs `|k| · 2e-9` relative (≤ 3 ulps at `|x| = 100`). Then a degree-7 Taylor polynomial on
/// `|r| ≤ ln2/2` (truncation below 0.1 ulp), and `2^k` applied in two normal halves so that
/// subnormal results and overflow come out of the multiplications.
#[cube]
#[allow(clippy::manual_clamp)]
pub(crate) fn accurate_exp(x: f32) -> f32 {
    // exp(−104) is 0 in f32; exp(89) overflows: nothing outside needs a finer k.
    let clamped = f32::min(f32::max(x, -104.0f32), 89.0f32);
    let k = f32::floor(clamped * LOG2_E + 0.5f32);
    // `k · LN2_HI` is exact (|k| < 2^8) and so is `x − k · LN2_HI` (Sterbenz). The rest of
    // `k ln2` is applied as the factor `exp(−k · LN2_LO) ≈ 1 + d (1 + d/2)`, `|d| ≤ 1.5e-4`: a
    // compiler that reassociates float sums (Mesa turned `(x − k·hi) − k·lo` into
    // `x − (k·hi + k·lo)`: 67 ulps) finds no sum of them to regroup.
    let r = clamped - k * f32::from_bits(LN2_HI_BITS);
    let d = -k * f32::from_bits(LN2_LO_BITS);
    let correction = 1.0f32 + d * (1.0f32 + 0.5f32 * d);
    let p = 1.0f32
        + r * (1.0f32
            + r * (0.5f32
                + r * (0.166_666_67_f32
                    + r * (0.041_666_668_f32
                        + r * (0.008_333_334_f32
                            + r * (0.001_388_889_f32 + r * 0.000_198_412_7_f32))))));
    let scale = i32::cast_from(k);
    let half = scale / 2;
    let first = f32::from_bits(u32::cast_from(half + 127) << 23);
    let second = f32::from_bits(u32::cast_from(scale - half + 127) << 23);
    p * correction * first * second
}

/// `2 atanh(t) = 2t (1 + t²/3 + t⁴/5 + t⁶/7 + t⁸/9) = ln((1 + t)/(1 − t))` for `|t| ≤ 0.172`
/// (truncation below 0.01 ulp).
#[cube]
fn twice_atanh(t: f32) -> f32 {
    let t2 = t * t;
    2.0f32
        * t
        * (1.0f32
            + t2 * (0.333_333_34_f32
                + t2 * (0.2f32 + t2 * (0.142_857_15_f32 + t2 * 0.111_111_11_f32))))
}

/// `ln(u)` for finite `u ≥ 1` from `+`, `×`, `/` and bit operations (see [`accurate_exp`]):
/// `u = 2^e f` with `f ∈ [√½, √2)`, `ln f = 2 atanh((f − 1)/(f + 1))`.
#[cube]
fn accurate_ln(u: f32) -> f32 {
    let bits = f32::to_bits(u);
    let mut e = f32::cast_from(i32::cast_from(bits >> 23) - 127);
    let mut f = f32::from_bits((bits & 0x7f_ffff) | 0x3f80_0000);
    if f > SQRT_2 {
        f *= 0.5f32;
        e += 1.0f32;
    }
    e * f32::from_bits(LN2_BITS) + twice_atanh((f - 1.0f32) / (f + 1.0f32))
}

/// `exp(a − b)` for finite `a`, `b`. The difference is rounded once: its error, up to
/// `|a − b| · 2^-24` relative in the result, is not added back, since a two-sum's correction does
/// not survive a compiler that reassociates float arithmetic (Mesa's does).
#[cube]
fn exp_difference(a: f32, b: f32) -> f32 {
    accurate_exp(max(a - b, EXP_FLOOR))
}

/// `ln(1 + s)` for `s ≥ 0`, keeping the digits of a small `s` without relying on a rounding
/// error surviving the shader compiler: `2 atanh(s / (2 + s))` below `√2 − 1`, `ln(1 + s)` above
/// (where rounding `1 + s` costs at most an ulp of the result).
#[cube]
fn log1p(s: f32) -> f32 {
    if s < 0.414_213_57_f32 {
        twice_atanh(s / (2.0f32 + s))
    } else {
        accurate_ln(1.0f32 + s)
    }
}

/// Soft-capping `cap · tanh(x / cap)` and its slope `1 − tanh²`, for finite `x` and `cap > 0`.
/// With `v = exp(−2|x|/cap)`: `tanh = (1 − v)/(1 + v)` and `1 − tanh² = 4v/(1 + v)²`; below
/// `|x|/cap = 1/4` the odd series keeps tanh's relative digits that `1 − v` would lose.
#[derive(CubeType, Clone, Copy)]
struct Capped {
    value: f32,
    slope: f32,
}

#[cube]
fn softcap(x: f32, cap: f32) -> Capped {
    let a = f32::abs(x) / cap;
    let v = accurate_exp(a * -2.0f32);
    let mut t = (1.0f32 - v) / (1.0f32 + v);
    if a < 0.25f32 {
        let a2 = a * a;
        // a − a³/3 + 2a⁵/15 − 17a⁷/315 + 62a⁹/2835: the next term is below f32's rounding.
        t = a
            * (1.0f32
                - a2 * (0.333_333_34f32
                    - a2 * (0.133_333_33f32 - a2 * (0.053_968_254f32 - a2 * 0.021_869_49f32))));
    }
    let mut mapped = cap * t;
    if x < 0.0f32 {
        mapped = -mapped;
    }
    let w = 1.0f32 + v;
    Capped {
        value: mapped,
        slope: 4.0f32 * v / (w * w),
    }
}

/// The online state of (part of) a row: max `m`, `s' = Σ_{i≠k} exp(x_i − m)` and the number of
/// live (finite) elements.
#[derive(CubeType, Clone, Copy)]
struct State {
    max: f32,
    rest: f32,
    live: u32,
}

/// The merge of two row states: the larger max keeps its `s'`, the other side's `1 + s'` is
/// scaled onto it. An empty side (`live = 0`) is the identity.
#[cube]
fn merge(a: State, b: State) -> State {
    let mut top = a.max;
    let mut rest = a.rest;
    if a.live == 0 {
        top = b.max;
        rest = b.rest;
    } else if b.live != 0 {
        if b.max > a.max {
            top = b.max;
            rest = b.rest + (a.rest + 1.0) * accurate_exp(max(a.max - b.max, EXP_FLOOR));
        } else {
            rest = a.rest + (b.rest + 1.0) * accurate_exp(max(b.max - a.max, EXP_FLOOR));
        }
    }
    State {
        max: top,
        rest,
        live: a.live + b.live,
    }
}

/// Saturates a finite-by-contract `f32` result at `±f32::MAX` (an overflow in `f32` of a value
/// whose `f64` reference is finite).
#[cube]
fn saturate(v: f32) -> f32 {
    max(min(v, F32_MAX), -F32_MAX)
}

/// The cube's row: cubes are laid out in x then y (x is limited to 65535 on some APIs).
#[cube]
fn cube_row() -> usize {
    (CUBE_POS_Y * CUBE_COUNT_X + CUBE_POS_X) as usize
}

/// The element of the unit: units in x, cubes in x then y.
#[cube]
fn unit_index() -> usize {
    cube_row() * (CUBE_DIM_X as usize) + (UNIT_POS_X as usize)
}

// ---------------------------------------------------------------------------------------------
// The read pass: one cube per row.

/// What one cube learns of its row: the merged `(m, s', live)`, the first NaN/`+inf` column,
/// and (for the loss) `Σ` over live classes of `w_c` and `w_c (m − x_c)`. Every unit gets the
/// same values.
#[derive(CubeType)]
struct RowScan {
    max: f32,
    rest: f32,
    live: u32,
    bad_column: u32,
}

/// Scans row `row` of `x` (mapped by the soft-cap when `cap > 0`) and merges across the cube.
#[cube]
fn scan_row(
    x: &[u32],
    row: usize,
    classes: usize,
    cap: f32,
    #[comptime] dtype: u32,
    #[comptime] units: u32,
) -> RowScan {
    let unit = UNIT_POS_X as usize;
    let mut top = 0.0f32;
    let mut rest = 0.0f32;
    let mut live = 0u32;
    let mut bad = NO_COLUMN.runtime();
    for c in range_stepped(unit, classes, units as usize) {
        let bits = load_bits(x, row * classes + c, dtype);
        if (bits & ABS_MASK) < POS_INF_BITS {
            let mut v = f32::from_bits(bits);
            if cap > 0.0 {
                v = softcap(v, cap).value;
            }
            let merged = merge(
                State {
                    max: top,
                    rest,
                    live,
                },
                State {
                    max: v,
                    rest: 0.0,
                    live: 1,
                },
            );
            top = merged.max;
            rest = merged.rest;
            live = merged.live;
        } else if bits != NEG_INF_BITS && bad == NO_COLUMN {
            bad = c as u32;
        }
    }
    let mut maxima = Shared::<[f32]>::new_slice(units as usize);
    let mut rests = Shared::<[f32]>::new_slice(units as usize);
    let mut lives = Shared::<[u32]>::new_slice(units as usize);
    let mut bads = Shared::<[u32]>::new_slice(units as usize);
    maxima[unit] = top;
    rests[unit] = rest;
    lives[unit] = live;
    bads[unit] = bad;
    sync_cube();
    // The tree, unrolled: its strides are comptime (halving `units`).
    #[unroll]
    for level in 0..comptime![units.trailing_zeros()] {
        let stride = comptime![(units >> (level + 1)) as usize];
        if unit < stride {
            let merged = merge(
                State {
                    max: maxima[unit],
                    rest: rests[unit],
                    live: lives[unit],
                },
                State {
                    max: maxima[unit + stride],
                    rest: rests[unit + stride],
                    live: lives[unit + stride],
                },
            );
            maxima[unit] = merged.max;
            rests[unit] = merged.rest;
            lives[unit] = merged.live;
            bads[unit] = min(bads[unit], bads[unit + stride]);
        }
        sync_cube();
    }
    let scan = RowScan {
        max: maxima[0],
        rest: rests[0],
        live: lives[0],
        bad_column: bads[0],
    };
    sync_cube();
    scan
}

/// The sum of `value` over the cube (fixed tree: the same bits every run). Every unit gets it.
#[cube]
fn cube_sum(value: f32, #[comptime] units: u32) -> f32 {
    let unit = UNIT_POS_X as usize;
    let mut sums = Shared::<[f32]>::new_slice(units as usize);
    sums[unit] = value;
    sync_cube();
    // The tree, unrolled: its strides are comptime (halving `units`).
    #[unroll]
    for level in 0..comptime![units.trailing_zeros()] {
        let stride = comptime![(units >> (level + 1)) as usize];
        if unit < stride {
            sums[unit] += sums[unit + stride];
        }
        sync_cube();
    }
    let total = sums[0];
    sync_cube();
    total
}

/// `m + log1p(s')` as bits: `-inf` for a fully masked row, saturated at `f32::MAX`.
#[cube]
fn lse_bits(max: f32, rest: f32, live: u32) -> u32 {
    let mut bits = NEG_INF_BITS.runtime();
    if live > 0 {
        bits = f32::to_bits(saturate(max + log1p(rest)));
    }
    bits
}

/// Read pass of logsumexp, softmax and log_softmax: per row, the stats and the logsumexp
/// (NaN bits for a row holding NaN or `+inf`; the host turns those into errors or keeps them).
#[cube(launch)]
pub(crate) fn row_stats(
    x: &[u32],
    stats: &mut [u32],
    lse: &mut [u32],
    rows: usize,
    classes: usize,
    #[comptime] dtype: u32,
    #[comptime] units: u32,
) {
    let row = cube_row();
    if row < rows {
        let scan = scan_row(x, row, classes, 0.0, dtype, units);
        if UNIT_POS_X == 0 {
            let at = row * STAT_WORDS;
            stats[at + S_MAX] = f32::to_bits(scan.max);
            stats[at + S_REST] = f32::to_bits(scan.rest);
            stats[at + S_LIVE] = scan.live;
            stats[at + S_COLUMN] = scan.bad_column;
            if scan.bad_column != NO_COLUMN {
                stats[at + S_FAULT] = FAULT_NON_FINITE;
                lse[row] = NAN_BITS;
            } else {
                stats[at + S_FAULT] = FAULT_NONE;
                lse[row] = lse_bits(scan.max, scan.rest, scan.live);
            }
        }
    }
}

/// Which normalisation [`normalize`] writes.
pub(crate) const SOFTMAX: u32 = 0;
pub(crate) const LOG_SOFTMAX: u32 = 1;

/// The `f32` bits of `softmax` or `log_softmax` of the element with bits `bits` in a row with
/// stats at `at`.
#[cube]
fn normalized(stats: &[u32], at: usize, bits: u32, #[comptime] op: u32) -> u32 {
    let max = f32::from_bits(stats[at + S_MAX]);
    let rest = f32::from_bits(stats[at + S_REST]);
    let mut out = 0u32;
    if stats[at + S_FAULT] != FAULT_NONE {
        out = NAN_BITS;
    } else if comptime![op == SOFTMAX] {
        // Masked elements (and every element of a fully masked row) are 0.
        if bits != NEG_INF_BITS {
            out = f32::to_bits(exp_difference(f32::from_bits(bits), max) / (1.0 + rest));
        }
    } else if bits == NEG_INF_BITS {
        out = NEG_INF_BITS;
    } else {
        // Both terms are ≤ 0: no cancellation, one rounding of `x − m` (see `exp_difference`).
        out = f32::to_bits(saturate((f32::from_bits(bits) - max) - log1p(rest)));
    }
    out
}

/// Clamps finite `f32` bits to the dtype's range (the saturating write of log_softmax).
#[cube]
fn saturate_to_dtype(bits: u32, #[comptime] dtype: u32) -> u32 {
    let mut out = bits;
    if (bits & ABS_MASK) < POS_INF_BITS {
        let limit = dtype_max(dtype);
        out = f32::to_bits(max(min(f32::from_bits(bits), limit), -limit));
    }
    out
}

/// Write pass of softmax / log_softmax: one unit per output word.
#[cube(launch)]
pub(crate) fn normalize(
    x: &[u32],
    stats: &[u32],
    out: &mut [u32],
    elements: usize,
    classes: usize,
    #[comptime] dtype: u32,
    #[comptime] op: u32,
) {
    let word = unit_index();
    if word < out.len() {
        if comptime![dtype == F32] {
            let at = (word / classes) * STAT_WORDS;
            out[word] = normalized(stats, at, x[word], op);
        } else {
            let mut packed = 0u32;
            for half in 0..2u32 {
                let i = word * 2 + half as usize;
                if i < elements {
                    let at = (i / classes) * STAT_WORDS;
                    let mut bits = normalized(stats, at, load_bits(x, i, dtype), op);
                    if comptime![op == LOG_SOFTMAX] {
                        bits = saturate_to_dtype(bits, dtype);
                    }
                    packed |= encode(bits, dtype) << (half * 16);
                }
            }
            out[word] = packed;
        }
    }
}

/// Read pass of the backward: per row `Σ y·dy` (softmax) or `Σ dy` (log_softmax).
#[cube(launch)]
pub(crate) fn backward_dot(
    y: &[u32],
    dy: &[u32],
    dots: &mut [f32],
    rows: usize,
    classes: usize,
    #[comptime] dtype: u32,
    #[comptime] op: u32,
    #[comptime] units: u32,
) {
    let row = cube_row();
    if row < rows {
        let mut sum = 0.0f32;
        for c in range_stepped(UNIT_POS_X as usize, classes, units as usize) {
            let i = row * classes + c;
            let g = f32::from_bits(load_bits(dy, i, dtype));
            if comptime![op == SOFTMAX] {
                sum += f32::from_bits(load_bits(y, i, dtype)) * g;
            } else {
                sum += g;
            }
        }
        let total = cube_sum(sum, units);
        if UNIT_POS_X == 0 {
            dots[row] = total;
        }
    }
}

/// `dx` of one element: `y (dy − dot)` (softmax) or `dy − exp(y) Σdy` (log_softmax).
#[cube]
fn backward_value(y: f32, dy: f32, dot: f32, #[comptime] op: u32) -> f32 {
    if comptime![op == SOFTMAX] {
        y * (dy - dot)
    } else {
        dy - accurate_exp(y) * dot
    }
}

/// Write pass of the backward: one unit per output word.
#[cube(launch)]
pub(crate) fn backward(
    y: &[u32],
    dy: &[u32],
    dots: &[f32],
    dx: &mut [u32],
    elements: usize,
    classes: usize,
    #[comptime] dtype: u32,
    #[comptime] op: u32,
) {
    let word = unit_index();
    if word < dx.len() {
        let mut packed = 0u32;
        let per_word = comptime![if dtype == F32 { 1u32 } else { 2u32 }];
        for half in 0..per_word {
            let i = word * (per_word as usize) + half as usize;
            if i < elements {
                let yi = f32::from_bits(load_bits(y, i, dtype));
                let dyi = f32::from_bits(load_bits(dy, i, dtype));
                let v = backward_value(yi, dyi, dots[i / classes], op);
                packed |= encode(f32::to_bits(v), dtype) << (half * 16);
            }
        }
        dx[word] = packed;
    }
}

// ---------------------------------------------------------------------------------------------
// Cross-entropy over class targets.

/// Options of a cross-entropy launch (host values, as `f32`).
#[derive(CubeType, CubeLaunch, Clone, Copy)]
pub(crate) struct CeParams {
    /// Label smoothing `ε`.
    pub(crate) smoothing: f32,
    /// z-loss coefficient.
    pub(crate) z_loss: f32,
    /// Soft-cap (0: none).
    pub(crate) cap: f32,
    /// 1: class weights are given.
    pub(crate) weighted: u32,
}

/// Read pass of the cross-entropy: per row its loss and logsumexp (bits), and the stats its
/// gradient needs. One cube per row.
///
/// The row loss is `(1−ε) w_y (m − x_y) + (ε/K) Σ_live w_c (m − x_c) + A log1p(s') + z lse²`
/// with `A = (1−ε) w_y + (ε/K) Σ_live w_c`: the log1p form, never `lse − x_y`.
#[cube(launch)]
#[allow(clippy::too_many_arguments)]
pub(crate) fn ce_stats(
    x: &[u32],
    targets: &[u32],
    weights: &[f32],
    stats: &mut [u32],
    row_loss: &mut [u32],
    row_lse: &mut [u32],
    rows: usize,
    classes: usize,
    params: CeParams,
    #[comptime] dtype: u32,
    #[comptime] units: u32,
) {
    let row = cube_row();
    if row < rows {
        let at = row * STAT_WORDS;
        let target = targets[row];
        if target == IGNORED_TARGET {
            if UNIT_POS_X == 0 {
                stats[at + S_FAULT] = FAULT_IGNORED;
                row_loss[row] = 0;
                row_lse[row] = NAN_BITS;
            }
        } else if target as usize >= classes {
            if UNIT_POS_X == 0 {
                stats[at + S_FAULT] = FAULT_TARGET_RANGE;
                stats[at + S_COLUMN] = target;
                row_loss[row] = NAN_BITS;
                row_lse[row] = NAN_BITS;
            }
        } else {
            ce_row(
                x,
                weights,
                stats,
                row_loss,
                row_lse,
                row,
                target as usize,
                classes,
                params,
                dtype,
                units,
            );
        }
    }
}

/// The weight of class `c` (1 when unweighted).
#[cube]
fn class_weight(weights: &[f32], c: usize, weighted: u32) -> f32 {
    let mut w = 1.0f32;
    if weighted == 1 {
        w = weights[c];
    }
    w
}

/// [`ce_stats`] of one non-ignored row whose target `y` is in range.
#[cube]
#[allow(clippy::too_many_arguments)]
fn ce_row(
    x: &[u32],
    weights: &[f32],
    stats: &mut [u32],
    row_loss: &mut [u32],
    row_lse: &mut [u32],
    row: usize,
    y: usize,
    classes: usize,
    params: CeParams,
    #[comptime] dtype: u32,
    #[comptime] units: u32,
) {
    let at = row * STAT_WORDS;
    let scan = scan_row(x, row, classes, params.cap, dtype, units);
    let keep = 1.0 - params.smoothing;
    // Σ_live w_c and Σ_live w_c (m − x_c): the smoothing part of the loss (a second sweep).
    let mut live_weight = f32::cast_from(scan.live);
    let mut spread = 0.0f32;
    if params.smoothing > 0.0 && scan.live > 0 {
        let mut weight_part = 0.0f32;
        let mut distance_part = 0.0f32;
        for c in range_stepped(UNIT_POS_X as usize, classes, units as usize) {
            let bits = load_bits(x, row * classes + c, dtype);
            if (bits & ABS_MASK) < POS_INF_BITS {
                let mut v = f32::from_bits(bits);
                if params.cap > 0.0 {
                    v = softcap(v, params.cap).value;
                }
                let w = class_weight(weights, c, params.weighted);
                weight_part += w;
                if w > 0.0 {
                    distance_part += saturate(w * saturate(scan.max - v));
                }
            }
        }
        let weight_total = cube_sum(weight_part, units);
        spread = cube_sum(distance_part, units);
        if params.weighted == 1 {
            live_weight = weight_total;
        }
    }
    if UNIT_POS_X == 0 {
        let share = select(
            scan.live > 0,
            params.smoothing / f32::cast_from(scan.live),
            0.0,
        );
        let w_y = class_weight(weights, y, params.weighted);
        let kept = keep * w_y;
        let y_bits = load_bits(x, row * classes + y, dtype);
        let mut fault = FAULT_NONE.runtime();
        let mut column = NO_COLUMN.runtime();
        let mut loss_bits = 0u32;
        let mut lse_out = lse_bits(scan.max, scan.rest, scan.live);
        if scan.bad_column != NO_COLUMN {
            // Poisoned (propagate) or an error: NaN either way; the host decides.
            fault = FAULT_NON_FINITE;
            column = scan.bad_column;
            loss_bits = NAN_BITS;
            lse_out = NAN_BITS;
        } else if y_bits == NEG_INF_BITS && kept > 0.0 {
            fault = FAULT_MASKED_TARGET;
            column = y as u32;
            loss_bits = POS_INF_BITS;
        } else if scan.live > 0 {
            let mut loss = 0.0f32;
            if kept > 0.0 {
                let mut x_y = f32::from_bits(y_bits);
                if params.cap > 0.0 {
                    x_y = softcap(x_y, params.cap).value;
                }
                loss = saturate(kept * saturate(scan.max - x_y));
            }
            loss = saturate(loss + share * spread);
            let mass = kept + share * live_weight;
            loss = saturate(loss + mass * log1p(scan.rest));
            if params.z_loss > 0.0 {
                let lse = f32::from_bits(lse_out);
                loss = saturate(loss + saturate(params.z_loss * saturate(lse * lse)));
            }
            loss_bits = f32::to_bits(loss);
        }
        stats[at + S_MAX] = f32::to_bits(scan.max);
        stats[at + S_REST] = f32::to_bits(scan.rest);
        stats[at + S_LIVE] = scan.live;
        stats[at + S_FAULT] = fault;
        stats[at + S_COLUMN] = column;
        stats[at + S_MASS] = f32::to_bits(kept + share * live_weight);
        stats[at + S_LIVE_WEIGHT] = f32::to_bits(live_weight);
        stats[at + S_SHARE] = f32::to_bits(share);
        row_loss[row] = loss_bits;
        row_lse[row] = lse_out;
    }
}

/// `∂(scale · loss)/∂x_i` of one element, as `f32` bits, from its row's stats.
///
/// `slope(x_i) · ((A − a_i) e_i − a_i (S − e_i)) / S + 2 z lse e_i / S`: `A − a_i` and
/// `S − e_i` are formed from their parts, so `p_y − 1` keeps its digits when `p_y` rounds to 1.
/// With `probabilities` the target mass of class `c` is `w_c ((1 − ε) q_c + ε/K)` (`q` the
/// row's probability targets, `kept[row] = Σ_c w_c q_c`); otherwise the row's class target's.
#[cube]
// `mass` and `other_mass` are set in either comptime branch.
#[allow(clippy::too_many_arguments, unused_assignments)]
fn ce_gradient(
    stats: &[u32],
    targets: &[u32],
    q: &[u32],
    kept: &[f32],
    weights: &[f32],
    caller: &[f32],
    bits: u32,
    i: usize,
    classes: usize,
    reduction: f32,
    smoothing: f32,
    z_loss: f32,
    cap: f32,
    weighted: u32,
    #[comptime] dtype: u32,
    #[comptime] probabilities: bool,
) -> u32 {
    let row = i / classes;
    let c = i % classes;
    let at = row * STAT_WORDS;
    let fault = stats[at + S_FAULT];
    let mut out = 0u32;
    if fault == FAULT_NON_FINITE || fault == FAULT_TARGET_RANGE {
        out = NAN_BITS;
    } else if (fault == FAULT_NONE || fault == FAULT_MASKED_TARGET)
        && stats[at + S_LIVE] > 0
        && bits != NEG_INF_BITS
    {
        // A masked target under the propagate policy: loss +inf, the gradient as usual.
        let max = f32::from_bits(stats[at + S_MAX]);
        let rest = f32::from_bits(stats[at + S_REST]);
        let share = f32::from_bits(stats[at + S_SHARE]);
        let live_weight = f32::from_bits(stats[at + S_LIVE_WEIGHT]);
        let keep = 1.0 - smoothing;
        let mut v = f32::from_bits(bits);
        let mut slope = 1.0f32;
        if cap > 0.0 {
            let capped = softcap(v, cap);
            v = capped.value;
            slope = capped.slope;
        }
        let w = class_weight(weights, c, weighted);
        let mut mass = 0.0f32;
        let mut other_mass = 0.0f32;
        if comptime![probabilities] {
            let q_c = f32::from_bits(load_bits(q, i, dtype));
            let wq = w * q_c;
            mass = w * (keep * q_c + share);
            other_mass = keep * (kept[row] - wq) + share * (live_weight - w);
        } else {
            let y = targets[row] as usize;
            let w_y = class_weight(weights, y, weighted);
            let is_target = c == y;
            mass = w * (select(is_target, keep, 0.0) + share);
            other_mass = select(is_target, 0.0, keep * w_y) + share * (live_weight - w);
        }
        let e = exp_difference(v, max);
        let others = select(v == max, rest, 1.0 + (rest - e));
        let s = 1.0 + rest;
        let ce = (other_mass * e - mass * others) / s;
        let mut z = 0.0f32;
        if z_loss > 0.0 {
            let lse = saturate(max + log1p(rest));
            z = saturate(2.0 * z_loss * (lse * (e / s)));
        }
        let limit = dtype_max(dtype);
        let of_loss = saturate(reduction * saturate(slope * (ce + z)));
        out = f32::to_bits(caller[row] * f32::max(f32::min(of_loss, limit), -limit));
    }
    out
}

/// Write pass of the cross-entropy gradient: one unit per output word. `targets` is read for
/// class targets, `q` and `kept` for probability targets (see [`ce_gradient`]).
#[cube(launch)]
#[allow(clippy::too_many_arguments)]
pub(crate) fn ce_grad(
    x: &[u32],
    stats: &[u32],
    targets: &[u32],
    q: &[u32],
    kept: &[f32],
    weights: &[f32],
    caller: &[f32],
    grad: &mut [u32],
    elements: usize,
    classes: usize,
    reduction: f32,
    params: CeParams,
    #[comptime] dtype: u32,
    #[comptime] probabilities: bool,
) {
    let word = unit_index();
    let smoothing = params.smoothing;
    let z_loss = params.z_loss;
    let cap = params.cap;
    let weighted = params.weighted;
    if word < grad.len() {
        let mut packed = 0u32;
        let per_word = comptime![if dtype == F32 { 1u32 } else { 2u32 }];
        for half in 0..per_word {
            let i = word * (per_word as usize) + half as usize;
            if i < elements {
                let bits = load_bits(x, i, dtype);
                let g = ce_gradient(
                    stats,
                    targets,
                    q,
                    kept,
                    weights,
                    caller,
                    bits,
                    i,
                    classes,
                    reduction,
                    smoothing,
                    z_loss,
                    cap,
                    weighted,
                    dtype,
                    probabilities,
                );
                packed |= encode(g, dtype) << (half * 16);
            }
        }
        grad[word] = packed;
    }
}

// ---------------------------------------------------------------------------------------------
// Cross-entropy over probability targets.

/// The smallest `value` over the cube (a column; [`NO_COLUMN`] for none). Every unit gets it.
#[cube]
fn cube_min(value: u32, #[comptime] units: u32) -> u32 {
    let unit = UNIT_POS_X as usize;
    let mut least = Shared::<[u32]>::new_slice(units as usize);
    least[unit] = value;
    sync_cube();
    #[unroll]
    for level in 0..comptime![units.trailing_zeros()] {
        let stride = comptime![(units >> (level + 1)) as usize];
        if unit < stride {
            least[unit] = min(least[unit], least[unit + stride]);
        }
        sync_cube();
    }
    let found = least[0];
    sync_cube();
    found
}

/// Read pass of the cross-entropy over probability targets `q` (`rows × classes`, the logits'
/// dtype, every value finite: the host checks them): per row its loss and logsumexp (bits) and
/// the stats its gradient needs. One cube per row. `kept[row] = Σ_c w_c q_c` (host, `f64`).
///
/// With `a_c = w_c ((1−ε) q_c + ε/K)` over the `K` live classes and `A = (1−ε) kept + (ε/K)
/// Σ_live w_c`, the row loss is `Σ_live a_c (m − x_c) + A log1p(s') + z lse²`: the log1p form.
/// Target mass `(1−ε) w_c q_c ≠ 0` on a masked class is [`FAULT_MASKED_TARGET`] (loss `+inf`).
#[cube(launch)]
#[allow(clippy::too_many_arguments)]
pub(crate) fn ce_prob_stats(
    x: &[u32],
    q: &[u32],
    kept: &[f32],
    weights: &[f32],
    stats: &mut [u32],
    row_loss: &mut [u32],
    row_lse: &mut [u32],
    rows: usize,
    classes: usize,
    params: CeParams,
    #[comptime] dtype: u32,
    #[comptime] units: u32,
) {
    let row = cube_row();
    if row < rows {
        let at = row * STAT_WORDS;
        let scan = scan_row(x, row, classes, params.cap, dtype, units);
        let keep = 1.0 - params.smoothing;
        let share = select(
            scan.live > 0,
            params.smoothing / f32::cast_from(scan.live),
            0.0,
        );
        let mut weight_part = 0.0f32;
        let mut distance_part = 0.0f32;
        let mut masked = NO_COLUMN.runtime();
        for c in range_stepped(UNIT_POS_X as usize, classes, units as usize) {
            let i = row * classes + c;
            let bits = load_bits(x, i, dtype);
            let w = class_weight(weights, c, params.weighted);
            let q_c = f32::from_bits(load_bits(q, i, dtype));
            if (bits & ABS_MASK) < POS_INF_BITS {
                let mut v = f32::from_bits(bits);
                if params.cap > 0.0 {
                    v = softcap(v, params.cap).value;
                }
                weight_part += w;
                let a = w * (keep * q_c + share);
                if a != 0.0 {
                    distance_part += saturate(a * saturate(scan.max - v));
                }
            } else if bits == NEG_INF_BITS && keep * (w * q_c) != 0.0 {
                masked = min(masked, c as u32);
            }
        }
        let live_weight = cube_sum(weight_part, units);
        let distance = cube_sum(distance_part, units);
        let masked_column = cube_min(masked, units);
        if UNIT_POS_X == 0 {
            let mass = keep * kept[row] + share * live_weight;
            let mut fault = FAULT_NONE.runtime();
            let mut column = NO_COLUMN.runtime();
            let mut loss_bits = 0u32;
            let mut lse_out = lse_bits(scan.max, scan.rest, scan.live);
            if scan.bad_column != NO_COLUMN {
                fault = FAULT_NON_FINITE;
                column = scan.bad_column;
                loss_bits = NAN_BITS;
                lse_out = NAN_BITS;
            } else if masked_column != NO_COLUMN {
                fault = FAULT_MASKED_TARGET;
                column = masked_column;
                loss_bits = POS_INF_BITS;
            } else if scan.live > 0 {
                let mut loss = saturate(distance + mass * log1p(scan.rest));
                if params.z_loss > 0.0 {
                    let lse = f32::from_bits(lse_out);
                    loss = saturate(loss + saturate(params.z_loss * saturate(lse * lse)));
                }
                loss_bits = f32::to_bits(loss);
            }
            stats[at + S_MAX] = f32::to_bits(scan.max);
            stats[at + S_REST] = f32::to_bits(scan.rest);
            stats[at + S_LIVE] = scan.live;
            stats[at + S_FAULT] = fault;
            stats[at + S_COLUMN] = column;
            stats[at + S_MASS] = f32::to_bits(mass);
            stats[at + S_LIVE_WEIGHT] = f32::to_bits(live_weight);
            stats[at + S_SHARE] = f32::to_bits(share);
            row_loss[row] = loss_bits;
            row_lse[row] = lse_out;
        }
    }
}

// ---------------------------------------------------------------------------------------------
// The control.

/// The naive softmax `exp(x) / Σ exp(x)` in `f32`, one cube per row: it overflows once a logit
/// passes 88.7, so the accuracy tests have something that must fail them.
#[cube(launch)]
pub(crate) fn naive_softmax(
    x: &[u32],
    out: &mut [u32],
    rows: usize,
    classes: usize,
    #[comptime] units: u32,
) {
    let row = cube_row();
    if row < rows {
        let mut sum = 0.0f32;
        for c in range_stepped(UNIT_POS_X as usize, classes, units as usize) {
            sum += f32::exp(f32::from_bits(x[row * classes + c]));
        }
        let total = cube_sum(sum, units);
        for c in range_stepped(UNIT_POS_X as usize, classes, units as usize) {
            let i = row * classes + c;
            out[i] = f32::to_bits(f32::exp(f32::from_bits(x[i])) / total);
        }
    }
}

/// The device's own `exp` and `ln` beside the kernels' ([`accurate_exp`], [`accurate_ln`]), element by element:
/// what docs/gpu.md's accuracy table is measured with.
#[cube(launch)]
pub(crate) fn transcendentals(x: &[f32], out: &mut [f32]) {
    let i = unit_index();
    if i < x.len() {
        let v = x[i];
        out[4 * i] = f32::exp(v);
        out[4 * i + 1] = accurate_exp(v);
        let u = f32::abs(v) + 1.0f32;
        out[4 * i + 2] = f32::ln(u);
        out[4 * i + 3] = accurate_ln(u);
    }
}

/// `y = x`, one unit per word: the copy whose bandwidth the bench compares against.
#[cube(launch)]
pub(crate) fn copy(x: &[u32], y: &mut [u32]) {
    let i = unit_index();
    if i < y.len() {
        y[i] = x[i];
    }
}
