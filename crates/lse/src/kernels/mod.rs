//! Row kernels, apart from the public API: a read pass that folds a row into its
//! [`RowState`](crate::RowState), then a write pass that produces outputs from that state.
//!
//! [`scalar`] is the reference that the vector kernel is tested against. It widens every
//! element to `f64`, where the differences `x − m` of `f32`, `f16` and `bf16` inputs are exact,
//! and rounds each result once into the output dtype. [`vector`] is the one vector body, written
//! over an instruction set of [`simd`] (AVX-512, AVX2, NEON, or the portable one that every
//! target has); this file names no instruction set.
//!
//! Which family runs is chosen from the CPU's features ([`Kernel::Auto`]); [`set_kernel`] pins
//! one, for tests that compare the paths and for benchmarks that measure them.

use std::sync::atomic::{AtomicU8, Ordering};

use rayon::prelude::*;

use crate::element::Element;
use crate::state::{CompensatedSum, RowState};
use scalar::LogitMap;
pub(crate) use scalar::RowScan;

pub(crate) mod row_plan;
pub(crate) mod scalar;
pub(crate) mod simd;
pub(crate) mod vector;

pub use simd::Kernel;
use simd::VectorIsa;

/// The requested family's index in [`Kernel::ALL`] ([`Kernel::Auto`]: 0).
static REQUESTED: AtomicU8 = AtomicU8::new(0);

/// Pins the kernel family for the whole process (default [`Kernel::Auto`]).
///
/// Requesting a family this CPU lacks ([`Kernel::is_supported`]) runs the widest one it has
/// instead; [`active_kernel`] says what runs. Results differ between families only by the rounding of
/// intermediate values (both meet the same accuracy bounds); for one family they are bitwise
/// identical whatever the number of threads.
pub fn set_kernel(kernel: Kernel) {
    let code = Kernel::ALL.iter().position(|&k| k == kernel).unwrap_or(0);
    REQUESTED.store(code as u8, Ordering::Relaxed);
}

/// The kernel family that runs now: [`Kernel::Scalar`] or a vector family this CPU supports.
pub fn active_kernel() -> Kernel {
    let requested = match Kernel::ALL[usize::from(REQUESTED.load(Ordering::Relaxed))] {
        Kernel::Auto => from_environment().unwrap_or(Kernel::Auto),
        pinned => pinned,
    };
    match requested {
        Kernel::Scalar => Kernel::Scalar,
        Kernel::Auto => widest(),
        k if k.is_supported() => k,
        _ => widest(),
    }
}

/// The widest vector family this CPU supports.
fn widest() -> Kernel {
    Kernel::WIDEST_FIRST
        .into_iter()
        .find(|k| k.is_supported())
        .unwrap_or(Kernel::Portable)
}

/// The family the `LSE_KERNEL` environment variable names (`scalar`, `portable`, `avx2`,
/// `avx512`, `neon`), read once: what [`Kernel::Auto`] runs when it is set, so that one test
/// binary can be run on each family (as PyTorch's `ATEN_CPU_CAPABILITY`).
fn from_environment() -> Option<Kernel> {
    static CHOICE: std::sync::OnceLock<Option<Kernel>> = std::sync::OnceLock::new();
    *CHOICE.get_or_init(|| {
        let name = std::env::var("LSE_KERNEL").ok()?;
        Kernel::ALL.into_iter().find(|k| k.name() == name)
    })
}

/// The instruction set the vector kernel runs in (the vector entry points are reached only
/// while [`active_kernel`] is a vector family).
pub(crate) fn vector_isa() -> VectorIsa {
    simd::isa_of(active_kernel()).unwrap_or(VectorIsa::Portable(simd::portable::Portable::new()))
}

/// Elements per piece of a long row. A row longer than this is read as a sequence of such
/// pieces whose states are folded in order, and written piece by piece; the pieces run on
/// rayon's threads. The split depends only on the row's length, so results are bitwise the same
/// for any number of threads. A multiple of the vector kernels' block.
pub(crate) const CHUNK: usize = 32 * 1024;

fn fast() -> bool {
    active_kernel() != Kernel::Scalar
}

/// The read pass over one row with the active kernel.
pub(crate) fn scan<E: Element>(row: &[E]) -> RowScan {
    scan_by(row, LogitMap::Identity, fast(), true, false)
}

/// The read pass without the element tally (`−inf` count, finite minimum) that only the loss
/// and the logit statistics need: the row's state, or the column of its first NaN or `+inf`.
pub(crate) fn scan_state<E: Element>(row: &[E]) -> Result<RowState, usize> {
    let scan = scan_by(row, LogitMap::Identity, fast(), false, false);
    match scan.first_non_finite {
        None => Ok(scan.state),
        Some(column) => Err(column),
    }
}

/// [`scan`] of the mapped row, whose vector exp sweep runs in `f64` lanes: the state of a row
/// whose outputs cancel (probability targets), good to about 2^-50 instead of 2^-24, or of a
/// soft-capped row (its map is computed in those lanes).
pub(crate) fn scan_wide<E: Element>(row: &[E], map: LogitMap) -> RowScan {
    scan_by(row, map, fast(), true, true)
}

fn scan_by<E: Element>(row: &[E], map: LogitMap, vector: bool, tally: bool, wide: bool) -> RowScan {
    let piece = |part: &[E]| {
        if vector {
            if let Some(scan) = vector::scan(part, tally, wide, map) {
                return scan;
            }
        }
        scalar::scan_row(part, map)
    };
    if row.len() <= CHUNK {
        return piece(row);
    }
    let parts: Vec<RowScan> = row.par_chunks(CHUNK).map(piece).collect();
    parts
        .into_iter()
        .enumerate()
        .fold(RowScan::EMPTY, |acc, (i, p)| acc.then(p, i * CHUNK))
}

/// The longest row whose read pass caches its exp terms: one piece of a long row.
pub(crate) const MAX_CACHED_LEN: usize = CHUNK;

/// The maxima of a row's read-pass blocks, kept for a write pass that rescales the exp terms
/// the read pass cached (rows of at most [`MAX_CACHED_LEN`] elements): block `b`'s terms are
/// `exp(x − m_b)` and become `c · exp(x − m)` by one factor `c · exp(m_b − m)` per block.
///
/// A scan that sums distances ([`scan_caching_smoothed`]) also keeps, per block, the count of
/// live (finite) elements and `Σ_live (m_b − y_i)`.
#[derive(Clone, Debug)]
pub(crate) struct BlockMaxima {
    count: usize,
    max: [f64; MAX_CACHED_LEN / VECTOR_BLOCK],
    /// `(Σ_live (m_b − y_i), live count)` per block.
    distance: [(f64, f64); MAX_CACHED_LEN / VECTOR_BLOCK],
}

/// The vector read pass's block length (the scalar kernel has no blocks).
const VECTOR_BLOCK: usize = vector::BLOCK;

impl BlockMaxima {
    pub(crate) const fn new() -> Self {
        Self {
            count: 0,
            max: [f64::NEG_INFINITY; MAX_CACHED_LEN / VECTOR_BLOCK],
            distance: [(0.0, 0.0); MAX_CACHED_LEN / VECTOR_BLOCK],
        }
    }

    fn clear(&mut self) {
        self.count = 0;
    }

    fn push(&mut self, max: f64, distance: (f64, f64)) {
        self.max[self.count] = max;
        self.distance[self.count] = distance;
        self.count += 1;
    }

    /// `Σ_live (max − y_i)` from the blocks' sums, in block order (a scan that summed them).
    pub(crate) fn distance(&self, max: f64) -> f64 {
        let blocks = self.max[..self.count].iter().zip(&self.distance);
        blocks
            .filter(|(_, &(_, live))| live > 0.0)
            .map(|(&m_b, &(sum, live))| sum + live * (max - m_b))
            .sum()
    }

    /// `(m_b, c · exp(m_b − m))` for each block `b` in order (factor 0 for a fully masked
    /// block).
    fn factors(&self, max: f64, c: f64) -> impl Iterator<Item = (f64, f64)> + '_ {
        self.max[..self.count]
            .iter()
            .map(move |&m_b| (m_b, c * crate::state::exp_difference(m_b, max)))
    }
}

/// True when the read pass over a row of `E` with `len` elements, with the active kernel, can
/// leave its exp terms in an output row for the write pass to rescale ([`scan_caching`]).
pub(crate) fn caches<E: Element>(len: usize) -> bool {
    fast() && vector::caches::<E>(len)
}

/// A per-thread `f32` row that holds the exp terms of an `f16`/`bf16` row between its two
/// passes; taken from the thread and given back on drop, so that it is allocated once per
/// thread, not per call.
pub(crate) struct Scratch {
    buf: Vec<f32>,
    len: usize,
}

thread_local! {
    static SCRATCH: std::cell::Cell<Vec<f32>> = const { std::cell::Cell::new(Vec::new()) };
}

impl Scratch {
    fn take(len: usize) -> Self {
        let mut buf = SCRATCH.take();
        if buf.len() < len {
            buf.resize(len, 0.0);
        }
        Self { buf, len }
    }

    fn as_slice(&self) -> &[f32] {
        &self.buf[..self.len]
    }
}

impl Drop for Scratch {
    fn drop(&mut self) {
        SCRATCH.set(std::mem::take(&mut self.buf));
    }
}

/// The `f32` buffer a cached row keeps its exp terms in: `out` itself for an `f32` row, else
/// `scratch` (taken on first use). Pass the same `scratch` to [`rescale`].
pub(crate) fn cache_buffer<'a, E: Element>(
    out: &'a mut [E],
    scratch: &'a mut Option<Scratch>,
) -> &'a mut [f32] {
    if E::DTYPE == crate::DType::F32 {
        // SAFETY: `Element` is sealed and its DType F32 names exactly `f32`.
        return unsafe { core::slice::from_raw_parts_mut(out.as_mut_ptr().cast(), out.len()) };
    }
    scratch_buffer(out.len(), scratch)
}

/// A per-thread `f32` buffer of `len` elements for a row's exp terms (`scratch`, taken on first
/// use): for a row whose own output cannot hold them — `f16`/`bf16`, or the in-place loss, whose
/// logits must survive until the row is known to be good. Pass the same `scratch` to
/// [`rescale`].
pub(crate) fn scratch_buffer(len: usize, scratch: &mut Option<Scratch>) -> &mut [f32] {
    let scratch = scratch.get_or_insert_with(|| Scratch::take(len));
    &mut scratch.buf[..len]
}

/// The read pass, recording the block maxima and, with `cache`, leaving each block's exp terms
/// there. When the row holds NaN or `+inf` the scan is the scalar kernel's (naming the first
/// one) and neither `maxima` nor `cache` means anything.
///
/// # Panics
/// Unless [`caches`] holds for the row, and `cache` (if any) is as long as the row.
///
/// Without `tally` the scan's `masked` and `finite_min` are not gathered (left at 0 and
/// `+inf`): only the cross-entropy's smoothing and class weights, and the logit statistics,
/// read them.
pub(crate) fn scan_caching<E: Element>(
    row: &[E],
    cache: Option<&mut [f32]>,
    maxima: &mut BlockMaxima,
    map: LogitMap,
    tally: bool,
) -> RowScan {
    if let Some(scan) = vector::scan_caching(row, (cache, None), maxima, map, (tally, false)) {
        return scan;
    }
    scalar::scan_row(row, map)
}

/// [`scan_caching`] of a soft-capped row whose write pass also subtracts a smoothing mass
/// ([`rescale_smoothed`]): `caches` (the terms, then the slopes) receive each block's
/// `slope · exp(y − m_b)` and each `slope`, and `maxima` the blocks' distance sums (see
/// [`BlockMaxima::distance`]), so that neither the loss nor the write pass maps a logit again.
///
/// # Panics
/// As [`scan_caching`], and unless `map` has a slope (is not the identity).
pub(crate) fn scan_caching_smoothed<E: Element>(
    row: &[E],
    caches: Option<(&mut [f32], &mut [f32])>,
    maxima: &mut BlockMaxima,
    map: LogitMap,
    tally: bool,
) -> RowScan {
    assert_ne!(map, LogitMap::Identity);
    let (cache, slopes) = caches.unzip();
    if let Some(scan) = vector::scan_caching(row, (cache, slopes), maxima, map, (tally, true)) {
        return scan;
    }
    scalar::scan_row(row, map)
}

/// The write pass of a cached row: each block's terms times `c · exp(m_b − m)`, from the
/// buffer [`cache_buffer`] gave (`scratch` as passed to it) into `out`.
///
/// # Panics
/// Unless that buffer was filled by [`scan_caching`] with `maxima`.
pub(crate) fn rescale<E: Element>(
    out: &mut [E],
    scratch: Option<&Scratch>,
    maxima: &BlockMaxima,
    max: f64,
    c: f64,
) {
    vector::rescale(
        out,
        scratch.map(Scratch::as_slice),
        None,
        maxima,
        (max, c, 0.0),
    );
}

/// The write pass of a row read by [`scan_caching_smoothed`]: `out_i ← c · exp(m_b − m) ·
/// term_i − b · slope_i` (`+0` where both are 0), from the buffers [`smoothed_buffers`] gave.
///
/// # Panics
/// Unless those buffers were filled by [`scan_caching_smoothed`] with `maxima`.
pub(crate) fn rescale_smoothed<E: Element>(
    out: &mut [E],
    scratch: Option<&Scratch>,
    maxima: &BlockMaxima,
    (max, c, b): (f64, f64, f64),
) {
    let len = out.len();
    let (cache, slopes) = match scratch.map(Scratch::as_slice) {
        Some(s) if s.len() == 2 * len => (Some(&s[..len]), &s[len..]),
        Some(s) => (None, s),
        None => unreachable!("the slopes are in the scratch row"),
    };
    vector::rescale(out, cache, Some(slopes), maxima, (max, c, b));
}

/// The term and slope buffers of [`scan_caching_smoothed`] for a row of `len` elements: the
/// terms in `out` itself for an `f32` gradient row (`out` given), else in `scratch` before the
/// slopes.
pub(crate) fn smoothed_buffers<'a, E: Element>(
    len: usize,
    out: Option<&'a mut [E]>,
    scratch: &'a mut Option<Scratch>,
) -> (&'a mut [f32], &'a mut [f32]) {
    match out {
        Some(out) if E::DTYPE == crate::DType::F32 => {
            assert_eq!(out.len(), len);
            // SAFETY: `Element` is sealed and its DType F32 names exactly `f32`.
            let terms = unsafe { core::slice::from_raw_parts_mut(out.as_mut_ptr().cast(), len) };
            (terms, scratch_buffer(len, scratch))
        }
        _ => scratch_buffer(2 * len, scratch).split_at_mut(len),
    }
}

/// Softmax of one row, both passes; `Err` with the column of the row's first NaN or `+inf`
/// (then `out` holds anything). Rows that [`caches`] serves are written once by the read pass
/// and rescaled in cache by the write pass.
pub(crate) fn softmax_row<E: Element>(row: &[E], out: &mut [E]) -> Result<(), usize> {
    if !caches::<E>(row.len()) {
        let state = scan_state(row)?;
        softmax(row, &state, out);
        return Ok(());
    }
    let mut maxima = BlockMaxima::new();
    let mut scratch = None;
    let scan = scan_caching(
        row,
        Some(cache_buffer(out, &mut scratch)),
        &mut maxima,
        LogitMap::Identity,
        false,
    );
    if let Some(column) = scan.first_non_finite {
        return Err(column);
    }
    let state = &scan.state;
    if state.is_fully_masked() {
        out.fill(E::zero());
    } else {
        rescale(
            out,
            scratch.as_ref(),
            &maxima,
            state.max(),
            1.0 / state.denominator(),
        );
    }
    Ok(())
}

/// Log-softmax of one row, both passes (as [`softmax_row`]; no cache: the write pass needs no
/// exp).
pub(crate) fn log_softmax_row<E: Element>(row: &[E], out: &mut [E]) -> Result<(), usize> {
    let state = scan_state(row)?;
    log_softmax(row, &state, out);
    Ok(())
}

/// True when `m + log1p(s')` does not amplify the error of `s'`: `log1p(s') ≤ 2·|lse|`. The
/// vector kernel's `s'` is good to a fraction of an `f32` ulp, which is enough for every output
/// except a logsumexp that cancels (a negative max near `−log1p(s')`).
pub(crate) fn lse_well_conditioned(state: &RowState) -> bool {
    let lse = state.logsumexp();
    state.log1p_sum() <= 2.0 * lse.abs() || state.is_fully_masked()
}

/// The row's logsumexp from its scan (no NaN/`+inf`), rescanned with the scalar kernel when the
/// vector kernel's state would lose digits to cancellation.
pub(crate) fn logsumexp<E: Element>(row: &[E], state: &RowState) -> f64 {
    if !fast() || lse_well_conditioned(state) {
        state.logsumexp()
    } else {
        scan_exact(row, LogitMap::Identity).state.logsumexp()
    }
}

/// The first column holding the row's largest value, as `torch.argmax` picks it: the first
/// NaN if there is one, else the first of equal maxima (column 0 of an all `-inf` row). `scan`
/// is the row's read pass: its first NaN or `+inf` column, and, for unmapped logits, the max
/// itself, so that a finite row is only searched for a known value.
pub(crate) fn argmax<E: Element>(row: &[E], scan: &RowScan, map: LogitMap) -> usize {
    if let Some(c) = scan.first_non_finite {
        // A NaN at or after the first non-finite value wins; else that value is the first +inf.
        let nan = row[c..].iter().position(|x| x.to_f64().is_nan());
        return nan.map_or(c, |i| c + i);
    }
    // Blocks are compared whole in the row's own dtype (branch-free reductions, which
    // vectorise), then the one block holding the max is searched.
    const BLOCK: usize = 256;
    let max = match map {
        // The read pass's max: a logit of the row, so exact in its dtype.
        LogitMap::Identity => E::from_f64(scan.state.max()),
        // The read pass's max is of the mapped logits; the maps are monotone, but their ties
        // (rounding, saturation) are not the raw logits' ties.
        LogitMap::Scaled(_) | LogitMap::Softcap { .. } => {
            let larger = |m: E, x: E| if x > m { x } else { m };
            let lowest = E::from_f64(f64::NEG_INFINITY);
            row.chunks(BLOCK)
                .map(|block| block.iter().copied().fold(lowest, larger))
                .fold(lowest, larger)
        }
    };
    let holds_max = |block: &[E]| block.iter().fold(false, |hit, &x| hit | (x == max));
    let Some(b) = row.chunks(BLOCK).position(holds_max) else {
        return 0; // an empty row
    };
    let block = &row[b * BLOCK..row.len().min((b + 1) * BLOCK)];
    b * BLOCK + block.iter().position(|&x| x == max).unwrap_or(0)
}

/// True when the read passes run the vector kernel — and then the vector write passes serve
/// the row too.
pub(crate) fn vector_scan() -> bool {
    fast()
}

/// The scalar rescan used when a vector scan's logsumexp is ill-conditioned.
pub(crate) fn scan_exact<E: Element>(row: &[E], map: LogitMap) -> RowScan {
    scan_by(row, map, false, true, false)
}

/// Runs `f` on matching pieces of `x` and `out` (in parallel for a long row).
fn by_pieces<E: Element>(x: &[E], out: &mut [E], f: impl Fn(&[E], &mut [E]) + Sync) {
    if x.len() <= CHUNK {
        f(x, out);
    } else {
        x.par_chunks(CHUNK)
            .zip(out.par_chunks_mut(CHUNK))
            .for_each(|(x, o)| f(x, o));
    }
}

/// Softmax write pass for one row with its state.
pub(crate) fn softmax<E: Element>(row: &[E], state: &RowState, out: &mut [E]) {
    if state.is_fully_masked() {
        out.fill(E::zero());
        return;
    }
    let vector = fast();
    by_pieces(row, out, |x, o| {
        if vector {
            return vector::softmax(x, state.max(), state.denominator(), o);
        }
        scalar::softmax_row(x, state, o);
    });
}

/// Log-softmax write pass for one row with its state.
pub(crate) fn log_softmax<E: Element>(row: &[E], state: &RowState, out: &mut [E]) {
    if state.is_fully_masked() {
        out.fill(E::from_f64(f64::NEG_INFINITY));
        return;
    }
    let vector = fast();
    by_pieces(row, out, |x, o| {
        if vector {
            return vector::log_softmax(x, state.max(), state.log1p_sum(), o);
        }
        scalar::log_softmax_row(x, state, o);
    });
}

/// The backward ops' row reduction (`Σ y·dy` when `weighted`, else `Σ dy`), by pieces of a
/// long row on rayon's threads summed in piece order.
fn backward_dot<E: Element>(y: &[E], dy: &[E], weighted: bool) -> f64 {
    let vector = fast();
    let piece = |(y, dy): (&[E], &[E])| {
        if vector {
            return vector::backward_dot(y, dy, weighted);
        }
        scalar::backward_dot(y, dy, weighted)
    };
    if y.len() <= CHUNK {
        return piece((y, dy));
    }
    in_order_sum(y.par_chunks(CHUNK).zip(dy.par_chunks(CHUNK)).map(piece))
}

/// Runs `f` on matching pieces of `y`, `dy` and `dx` (in parallel for a long row).
fn by_piece_pairs<E: Element>(
    y: &[E],
    dy: &[E],
    dx: &mut [E],
    f: impl Fn(&[E], &[E], &mut [E]) + Sync,
) {
    if y.len() <= CHUNK {
        f(y, dy, dx);
    } else {
        y.par_chunks(CHUNK)
            .zip(dy.par_chunks(CHUNK))
            .zip(dx.par_chunks_mut(CHUNK))
            .for_each(|((y, dy), dx)| f(y, dy, dx));
    }
}

/// Softmax backward for one row: `dx_i = y_i · (dy_i − Σ_j y_j dy_j)`.
pub(crate) fn softmax_backward<E: Element>(y: &[E], dy: &[E], dx: &mut [E]) {
    let dot = backward_dot(y, dy, true);
    let vector = fast();
    by_piece_pairs(y, dy, dx, |y, dy, dx| {
        if vector {
            return vector::softmax_backward(y, dy, dot, dx);
        }
        scalar::softmax_backward_row(y, dy, dot, dx);
    });
}

/// Log-softmax backward for one row: `dx_i = dy_i − exp(y_i) · Σ_j dy_j`.
pub(crate) fn log_softmax_backward<E: Element>(y: &[E], dy: &[E], dx: &mut [E]) {
    let total = backward_dot(y, dy, false);
    let vector = fast();
    by_piece_pairs(y, dy, dx, |y, dy, dx| {
        if vector && vector::log_softmax_backward(y, dy, total, dx) {
            return;
        }
        scalar::log_softmax_backward_row(y, dy, total, dx);
    });
}

/// The vectorised cross-entropy write pass `w` (see [`row_plan::FastWrite`]) from `x` into `g`,
/// or only its sweep when `g` is `None`: the distance `Σ_live u_c (m − x_c)` (0 unless asked
/// for) and whether the gradient cancels beyond the vector exp's accuracy (only checked when
/// [`row_plan::FastWrite::verify`]).
///
/// # Panics
/// Unless [`vector_scan`] holds.
pub(crate) fn ce_grad<E: Element>(
    x: &[E],
    g: Option<&mut [E]>,
    w: &row_plan::FastWrite<'_, '_, E>,
) -> MassesPass {
    if x.len() <= CHUNK {
        return vector::ce_grad(x, g, w);
    }
    let one = |i: usize, x: &[E], g: Option<&mut [E]>| vector::ce_grad(x, g, &w.from(i * CHUNK));
    let passes: Vec<MassesPass> = match g {
        Some(g) => x
            .par_chunks(CHUNK)
            .zip(g.par_chunks_mut(CHUNK))
            .enumerate()
            .map(|(i, (x, g))| one(i, x, Some(g)))
            .collect(),
        None => x
            .par_chunks(CHUNK)
            .enumerate()
            .map(|(i, x)| one(i, x, None))
            .collect(),
    };
    MassesPass::fold(passes)
}

/// [`ce_grad`] written over the logits.
///
/// # Panics
/// Unless [`vector_scan`] holds.
pub(crate) fn ce_grad_in_place<E: Element>(
    x: &mut [E],
    w: &row_plan::FastWrite<'_, '_, E>,
) -> MassesPass {
    if x.len() <= CHUNK {
        return vector::ce_grad_in_place(x, w);
    }
    let one = |(i, x): (usize, &mut [E])| vector::ce_grad_in_place(x, &w.from(i * CHUNK));
    MassesPass::fold(x.par_chunks_mut(CHUNK).enumerate().map(one).collect())
}

/// The cross-entropy gradient of one row, or of one piece of a split row, from its plan alone
/// (its state found elsewhere: the merged partials of a split vocabulary), into `g`: the vector
/// write pass ([`ce_grad`], the target's entry from the cancellation-free formula) when `vector`
/// is asked for, a vector kernel runs and [`row_plan::CeRow::fast_write`] serves the row; else the
/// scalar pass. The caller says `vector = false` for rows whose gradient cancels beyond the
/// vector exp's accuracy ([`row_plan::CeRow::smoothing_cancels`]).
pub(crate) fn ce_grad_from_plan<E: Element>(
    x: &[E],
    g: &mut [E],
    plan: &row_plan::CeRow<'_, '_, E>,
    scale: row_plan::GradScale,
    vector: bool,
) {
    if let Some(w) = vector_write(x, plan, scale, vector) {
        ce_grad(x, Some(&mut *g), &w);
        if let Some(target) = w.target {
            g[target] = E::from_f64(w.target_grad);
        }
        return;
    }
    plan.write_gradient(x.iter().copied(), scale, |c, v| g[c] = v);
}

/// The vector write pass's parameters for a row planned elsewhere, when a vector kernel runs,
/// `vector` is asked for and [`row_plan::CeRow::fast_write`] serves the row.
fn vector_write<'t, 'w, E: Element>(
    x: &[E],
    plan: &row_plan::CeRow<'t, 'w, E>,
    scale: row_plan::GradScale,
    vector: bool,
) -> Option<row_plan::FastWrite<'t, 'w, E>> {
    if !(vector && fast()) {
        return None;
    }
    // The loss is not this pass's: no distance sweep.
    plan.fast_write(x, scale).map(|w| row_plan::FastWrite {
        sweep_distance: false,
        ..w
    })
}

/// [`ce_grad_from_plan`] written over the logits.
pub(crate) fn ce_grad_from_plan_in_place<E: Element>(
    x: &mut [E],
    plan: &row_plan::CeRow<'_, '_, E>,
    scale: row_plan::GradScale,
    vector: bool,
) {
    if let Some(w) = vector_write(x, plan, scale, vector) {
        ce_grad_in_place(x, &w);
        if let Some(target) = w.target {
            x[target] = E::from_f64(w.target_grad);
        }
        return;
    }
    // Each element is read before it is overwritten.
    let cells = core::cell::Cell::from_mut(x).as_slice_of_cells();
    plan.write_gradient(cells.iter().map(core::cell::Cell::get), scale, |c, v| {
        cells[c].set(v);
    });
}

/// The distance sweep of [`ce_grad`] without the gradient (a loss-only call), the same bits.
///
/// # Panics
/// Unless [`vector_scan`] holds.
pub(crate) fn live_distance<E: Element>(
    x: &[E],
    max: f64,
    masses: Option<&row_plan::ClassMasses<'_, '_, E>>,
    map: LogitMap,
) -> f64 {
    let one = |x: &[E], offset: usize| {
        let masses = masses.map(|m| m.from(offset));
        vector::live_distance(x, max, masses.as_ref(), map)
    };
    if x.len() <= CHUNK {
        return one(x, 0);
    }
    in_order_sum(
        x.par_chunks(CHUNK)
            .enumerate()
            .map(|(i, x)| one(x, i * CHUNK)),
    )
}

/// `(Σ_c w_c q_c, max_c q_c)` of a row of probability targets by the vector kernel; `None`
/// with the scalar kernel or when some `q_c` is not a finite number ≥ 0.
pub(crate) fn probability_mass<E: Element>(
    q: &[E],
    weights: Option<&[f64]>,
) -> Option<(CompensatedSum, f64)> {
    if fast() {
        return vector::probability_mass(q, weights);
    }
    None
}

/// What a vectorised cross-entropy write pass reports besides its writes.
#[derive(Clone, Copy, Debug, Default)]
pub(crate) struct MassesPass {
    /// The distance sweep: `Σ_live (m − x_i)`, or `Σ_live u_i (m − x_i)` with class masses
    /// (0 unless asked for).
    pub(crate) distance: f64,
    /// Some `g_i = c·e_i − b·u_i` cancels too far for the vector exp's error (only checked
    /// when [`row_plan::FastWrite::verify`]).
    pub(crate) cancels: bool,
}

impl MassesPass {
    /// The passes over the pieces of one row, in order.
    fn fold(pieces: Vec<MassesPass>) -> MassesPass {
        MassesPass {
            cancels: pieces.iter().any(|p| p.cancels),
            distance: pieces.iter().map(|p| p.distance).sum(),
        }
    }
}

/// The sum of per-piece values in piece order (rayon's own `sum` splits by thread count, which
/// would change the bits).
fn in_order_sum(parts: impl IndexedParallelIterator<Item = f64>) -> f64 {
    let parts: Vec<f64> = parts.collect();
    parts.into_iter().sum()
}
