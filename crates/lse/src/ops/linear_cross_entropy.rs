//! Fused linear cross-entropy: the loss of the logits `H·Wᵀ + b` and its gradients with respect
//! to `H`, `W` and `b`, formed a chunk of rows at a time so that the `rows × classes` logits never
//! exist.
//!
//! Per chunk: gather the chunk's counted rows of `H` (ignored rows are dropped before any
//! product) into the working dtype `A` (`E::Stat`: `f32` for `f32`/`f16`/`bf16`, `f64` for
//! `f64`), form their logits with one matrix product, run the cross-entropy over them with the
//! row kernels (the gradient written over the logits), then `dH_c = G·W`, `dW += Gᵀ·H_c` and
//! `db += Σ_rows G`. `dW` and `db` accumulate in `A`/`f64` over all chunks and are rounded once
//! into the caller's dtype; each row of `dH` is written once.

use rayon::prelude::*;

use super::cross_entropy::{ChunkedCrossEntropy, CrossEntropyOptions, CrossEntropyOutput};
use super::{expect_len, row_count, NonFinite};
use crate::element::{Element, Stat};
use crate::error::{LseError, Result};
use crate::matmul::{product, MatMut, MatRef};
use crate::{GradOutput, Targets};

/// The default working-memory budget of a linear cross-entropy call: 256 MiB (about 500 rows of
/// a 131072-class vocabulary, 2000 of a 32000-class one).
pub const DEFAULT_LINEAR_BUDGET_BYTES: usize = 256 << 20;

/// The classifier head of a linear cross-entropy: logits are `hidden · weightᵀ + bias`.
#[derive(Clone, Copy, Debug)]
pub struct LinearHead<'a, E> {
    /// `W`, `classes × dim`, row-major (as a language-model head is stored).
    pub weight: &'a [E],
    /// `b`, one value per class.
    pub bias: Option<&'a [E]>,
    /// The number of classes `V` (rows of `weight`).
    pub classes: usize,
}

/// Where [`linear_cross_entropy_with_grad`] writes the gradients (same shapes and dtype as
/// what they are the gradients of).
#[derive(Debug)]
pub struct LinearGradients<'a, E> {
    /// `∂/∂H`, `rows × dim`.
    pub hidden: &'a mut [E],
    /// `∂/∂W`, `classes × dim`.
    pub weight: &'a mut [E],
    /// `∂/∂b`, `classes` values; computed only when given (with or without a bias).
    pub bias: Option<&'a mut [E]>,
}

/// Options of a linear cross-entropy: the cross-entropy's own, and the working memory.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct LinearCrossEntropyOptions<'a> {
    /// Every field means what it means for [`cross_entropy_with_grad`](crate::cross_entropy_with_grad)
    /// on the logits `H·Wᵀ + b`. Under [`NonFinite::Error`] a NaN or infinite value in `H` (a
    /// counted row), `W` or `b` is an error too, named by where it is.
    pub cross_entropy: CrossEntropyOptions<'a>,
    /// Bytes of working memory for the chunk's logits and hidden rows in the working dtype
    /// (`f32`; `f64` for `f64`), and for `f16`/`bf16` a block of the weight and the chunk's
    /// probability targets widened to `f32`: sets how many rows a chunk has. Default
    /// [`DEFAULT_LINEAR_BUDGET_BYTES`]. Peak extra memory is this plus `O(rows + classes)`, plus a
    /// `classes × dim` `f32` accumulator of `dW` when the weight is `f16`/`bf16`, plus the matrix
    /// crate's packing buffers (a few MiB, independent of the shapes' product).
    pub budget_bytes: usize,
}

impl Default for LinearCrossEntropyOptions<'_> {
    fn default() -> Self {
        Self {
            cross_entropy: CrossEntropyOptions::default(),
            budget_bytes: DEFAULT_LINEAR_BUDGET_BYTES,
        }
    }
}

/// The cross-entropy loss of the logits `hidden · weightᵀ + bias` against `targets`, without
/// ever holding all of them: `hidden` is `rows × dim` row-major, `rows` the number of targets
/// (class indices, or rows of `classes` probabilities), `dim = weight.len() / classes`.
///
/// The result is that of [`cross_entropy`](crate::cross_entropy) on those logits formed in the
/// working dtype — `f32` for `f32`, `f16` and `bf16` inputs (widened exactly), `f64` for `f64` —
/// by one matrix product per chunk, with the loss, per-row values and statistics in that dtype.
/// Rows whose class target is the ignore index cost nothing. Probability targets are read a
/// chunk of rows at a time (for `f16`/`bf16`, widened to `f32` within the budget).
///
/// ```
/// use lse::{linear_cross_entropy, LinearCrossEntropyOptions, LinearHead, Targets};
/// let hidden = [1.0f32, 0.0, /* row 1 */ 0.0, 2.0];
/// let weight = [1.0f32, 0.0, /* class 1 */ 0.0, 1.0, /* class 2 */ -1.0, -1.0];
/// let head = LinearHead { weight: &weight, bias: None, classes: 3 };
/// let out = linear_cross_entropy(&hidden, head, Targets::Classes(&[0, 1]),
///                                &LinearCrossEntropyOptions::default())?;
/// // Row 0's logits are [1, 0, -1], row 1's [0, 2, -2].
/// let ce = |x: [f64; 3], y: usize| x.iter().map(|v| v.exp()).sum::<f64>().ln() - x[y];
/// let expected = (ce([1.0, 0.0, -1.0], 0) + ce([0.0, 2.0, -2.0], 1)) / 2.0;
/// assert!((f64::from(out.loss) - expected).abs() < 1e-6);
/// # Ok::<(), lse::LseError>(())
/// ```
///
/// # Errors
/// Shapes: [`LseError::EmptyClasses`], [`LseError::RaggedRows`] (`weight` or the probability
/// targets not a whole number of class rows), [`LseError::LengthMismatch`] (`hidden`, `bias`).
/// [`LseError::BudgetTooSmall`]
/// when the budget cannot hold one row. Everything [`cross_entropy`](crate::cross_entropy)
/// returns for the options and targets, and [`LseError::NonFinite`] naming `"hidden"`,
/// `"weight"`, `"bias"` (row, column, value) or a `"logit"` that the product made infinite,
/// under [`NonFinite::Error`]. No input is modified.
///
/// # Panics
/// Never.
pub fn linear_cross_entropy<E: Element>(
    hidden: &[E],
    head: LinearHead<'_, E>,
    targets: Targets<'_, E>,
    options: &LinearCrossEntropyOptions<'_>,
) -> Result<CrossEntropyOutput<E::Stat>> {
    fused(hidden, head, targets, options, GradOutput::default(), None)
}

/// [`linear_cross_entropy`] and its gradients: writes `∂(g · loss)/∂H`, `∂/∂W` and (when asked
/// for) `∂/∂b` into `grads`, where `g` is `grad_output` (a scalar, or one value per row with
/// [`Reduction::None`](crate::Reduction::None)).
///
/// The logits' gradient is [`cross_entropy_with_grad`](crate::cross_entropy_with_grad)'s on the
/// logits in the working dtype, kept in it; `dW` and `db` are summed over all chunks in the
/// working dtype (`db` in `f64`) and rounded once into `E`; rows of `dH` are rounded once,
/// ignored rows are 0. Results are bitwise the same for any number of threads at a given
/// `budget_bytes`. (The gradient with respect to probability targets is that of the logits'
/// loss, `−w_c·(lse − x_c)` per target value, and needs the logits: not computed here.)
///
/// ```
/// use lse::{linear_cross_entropy_with_grad, GradOutput, LinearCrossEntropyOptions,
///           LinearGradients, LinearHead, Targets};
/// let (hidden, weight, bias) = ([0.5f32, -1.0], [1.0f32, 2.0, -1.0, 0.0, 0.0, 1.0], [0.0f32; 3]);
/// let head = LinearHead { weight: &weight, bias: Some(&bias), classes: 3 };
/// let (mut dh, mut dw, mut db) = ([0.0f32; 2], [0.0f32; 6], [0.0f32; 3]);
/// let grads = LinearGradients { hidden: &mut dh, weight: &mut dw, bias: Some(&mut db) };
/// let out = linear_cross_entropy_with_grad(&hidden, head, Targets::Classes(&[2]),
///                                          &LinearCrossEntropyOptions::default(),
///                                          GradOutput::Scalar(1.0), grads)?;
/// assert!(out.loss > 0.0 && db[2] < 0.0 && db.iter().sum::<f32>().abs() < 1e-6);
/// # Ok::<(), lse::LseError>(())
/// ```
///
/// # Errors
/// As [`linear_cross_entropy`], and [`LseError::LengthMismatch`] for a gradient buffer of the
/// wrong length, [`LseError::PerRowGradient`] for [`GradOutput::PerRow`] without
/// [`Reduction::None`](crate::Reduction::None), [`LseError::NonFinite`] for a non-finite
/// `grad_output` under [`NonFinite::Error`]. On error no input is modified and the gradient
/// buffers are unspecified.
///
/// # Panics
/// Never.
pub fn linear_cross_entropy_with_grad<E: Element>(
    hidden: &[E],
    head: LinearHead<'_, E>,
    targets: Targets<'_, E>,
    options: &LinearCrossEntropyOptions<'_>,
    grad_output: GradOutput<'_, E::Stat>,
    grads: LinearGradients<'_, E>,
) -> Result<CrossEntropyOutput<E::Stat>> {
    fused(hidden, head, targets, options, grad_output, Some(grads))
}

/// What a chunk holds per row and per call besides its logits and hidden rows.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) struct ChunkLayout {
    /// Bytes of one element of the working dtype (`f32` or `f64`).
    pub(crate) work_bytes: usize,
    /// A `dH` row per chunk row.
    pub(crate) gradient: bool,
    /// The weight is not in the working dtype: it is widened a block of classes at a time.
    pub(crate) widened_weight: bool,
    /// Probability targets not in the working dtype: each chunk's rows are widened.
    pub(crate) widened_targets: bool,
}

impl ChunkLayout {
    /// The layout of a call on `E` with the given targets.
    pub(crate) fn of<E: Element>(gradient: bool, probabilities: bool) -> Self {
        let widened = E::DTYPE != E::Stat::DTYPE;
        Self {
            work_bytes: core::mem::size_of::<E::Stat>(),
            gradient,
            widened_weight: widened,
            widened_targets: widened && probabilities,
        }
    }
}

/// How a call's rows and classes are cut to fit the budget.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
struct Plan {
    dim: usize,
    classes: usize,
    /// Counted rows per chunk.
    chunk_rows: usize,
    /// Classes per block of a widened weight (all of them when it is not widened).
    block_classes: usize,
}

impl Plan {
    /// The largest chunk that fits `budget` bytes: per row, its logits and hidden row (and its
    /// `dH` row with a gradient, its widened probability targets); for a widened weight, a
    /// block of at most a quarter of the budget (at least one class).
    ///
    /// The chunk is sized for rows of `planned` classes, of which the call holds `classes`
    /// (all of them, or one shard's): every shard of a split head then cuts the same chunks as
    /// the one-process call, within its budget.
    fn new(
        budget: usize,
        dim: usize,
        (classes, planned): (usize, usize),
        layout: ChunkLayout,
    ) -> Result<Self> {
        let elem = layout.work_bytes;
        let per_row_values = planned * if layout.widened_targets { 2 } else { 1 }
            + dim * if layout.gradient { 2 } else { 1 };
        let row_bytes = elem * per_row_values;
        let block = |classes: usize| {
            if !layout.widened_weight || dim == 0 {
                classes
            } else {
                (budget / 4 / (elem * dim)).clamp(1, classes.max(1))
            }
        };
        let block_bytes = if layout.widened_weight {
            elem * dim * block(planned)
        } else {
            0
        };
        let chunk_rows = budget.saturating_sub(block_bytes) / row_bytes.max(1);
        if chunk_rows == 0 {
            let one_class = if layout.widened_weight { elem * dim } else { 0 };
            return Err(LseError::BudgetTooSmall {
                budget,
                minimum: row_bytes + one_class,
            });
        }
        Ok(Self {
            dim,
            classes,
            chunk_rows,
            block_classes: block(classes).min(classes),
        })
    }

    /// The class blocks `first..end`, in order.
    fn blocks(&self) -> impl Iterator<Item = (usize, usize)> {
        let (block, classes) = (self.block_classes, self.classes);
        (0..classes)
            .step_by(block.max(1))
            .map(move |first| (first, (first + block).min(classes)))
    }
}

/// `x` in the working dtype, when `E` is it.
fn as_work<E: Element>(x: &[E]) -> Option<&[E::Stat]> {
    // SAFETY: `Element` is sealed and no two of its types share a DType, so equal tags name
    // the same type.
    (E::DTYPE == E::Stat::DTYPE)
        .then(|| unsafe { core::slice::from_raw_parts(x.as_ptr().cast(), x.len()) })
}

/// `x` in the working dtype, when `E` is it.
fn as_work_mut<E: Element>(x: &mut [E]) -> Option<&mut [E::Stat]> {
    // SAFETY: as for `as_work`.
    (E::DTYPE == E::Stat::DTYPE)
        .then(|| unsafe { core::slice::from_raw_parts_mut(x.as_mut_ptr().cast(), x.len()) })
}

/// A chunk's rows of the row-major probability targets `values` (`width` per row) in the
/// working dtype, widened into `buffer` when they are not in it. Every row of probability
/// targets counts, so a chunk is the contiguous rows from its first.
pub(crate) fn chunk_targets<'a, E: Element>(
    values: &'a [E],
    rows: &[usize],
    width: usize,
    buffer: &'a mut Vec<E::Stat>,
) -> &'a [E::Stat] {
    let first = rows[0];
    widen_rows(&values[first * width..(first + rows.len()) * width], buffer)
}

/// `x` in the working dtype: itself when it is in it, else widened into `buffer`.
fn widen_rows<'a, E: Element>(x: &'a [E], buffer: &'a mut Vec<E::Stat>) -> &'a [E::Stat] {
    if let Some(x) = as_work(x) {
        return x;
    }
    buffer.resize(x.len(), E::Stat::zero());
    widen(x, buffer);
    buffer
}

/// Elements per rayon task of a conversion.
const CONVERT_PIECE: usize = 1 << 16;

/// `dst[i] = src[i]` widened to `A` (exact: `A` is `E` or wider), on rayon's pool.
fn widen<E: Element, A: Stat>(src: &[E], dst: &mut [A]) {
    dst.par_chunks_mut(CONVERT_PIECE)
        .zip(src.par_chunks(CONVERT_PIECE))
        .for_each(|(d, s)| {
            for (d, s) in d.iter_mut().zip(s) {
                *d = A::from_f64(s.to_f64());
            }
        });
}

/// `dst[i] = src[i]` rounded once to `E`, on rayon's pool.
fn narrow<A: Stat, E: Element>(src: &[A], dst: &mut [E]) {
    dst.par_chunks_mut(CONVERT_PIECE)
        .zip(src.par_chunks(CONVERT_PIECE))
        .for_each(|(d, s)| {
            for (d, &s) in d.iter_mut().zip(s) {
                *d = E::from_f64(s.into());
            }
        });
}

/// The first NaN or infinite value of the row-major `data` (`width` columns), as the error
/// naming `what`, its row and column; only the rows `rows` are looked at (all when `None`).
pub(crate) fn check_finite<E: Element>(
    what: &'static str,
    data: &[E],
    width: usize,
    rows: Option<&[usize]>,
) -> Result<()> {
    let error = |index: usize| LseError::NonFinite {
        what,
        row: index / width,
        column: index % width,
        value: data[index].to_f64(),
    };
    let found = match rows {
        None => data
            .par_chunks(CONVERT_PIECE)
            .enumerate()
            .find_map_first(|(piece, x)| first_non_finite(x).map(|i| piece * CONVERT_PIECE + i)),
        Some(rows) => rows.par_iter().find_map_first(|&r| {
            first_non_finite(&data[r * width..(r + 1) * width]).map(|c| r * width + c)
        }),
    };
    found.map_or(Ok(()), |index| Err(error(index)))
}

/// The index of the first NaN or infinite value of `x`: a branch-free sweep first (it
/// vectorizes; an early-exit search does not), the search only when it found one.
fn first_non_finite<E: Element>(x: &[E]) -> Option<usize> {
    let bad = |v: &E| !v.to_f64().is_finite();
    if x.iter().fold(false, |any, v| any | bad(v)) {
        x.iter().position(bad)
    } else {
        None
    }
}

/// The rows a loss counts: those whose class target is not `ignore_index` (every row of
/// probability targets), in order.
pub(crate) fn counted_rows(targets: &[i64], ignore_index: Option<i64>) -> Vec<usize> {
    (0..targets.len())
        .filter(|&r| Some(targets[r]) != ignore_index)
        .collect()
}

fn fused<E: Element>(
    hidden: &[E],
    head: LinearHead<'_, E>,
    targets: Targets<'_, E>,
    options: &LinearCrossEntropyOptions<'_>,
    grad_output: GradOutput<'_, E::Stat>,
    grads: Option<LinearGradients<'_, E>>,
) -> Result<CrossEntropyOutput<E::Stat>> {
    let ce_options = &options.cross_entropy;
    let classes = head.classes;
    let (mut ce, rows, counted) = match targets {
        Targets::Classes(t) => (
            ChunkedCrossEntropy::<E::Stat>::new(classes, t, ce_options, grad_output)?,
            t.len(),
            counted_rows(t, ce_options.ignore_index),
        ),
        Targets::Probabilities(q) => {
            let rows = row_count("probability targets", q.len(), classes)?;
            let ce = ChunkedCrossEntropy::<E::Stat>::with_probabilities_by_chunk(
                classes,
                rows,
                ce_options,
                grad_output,
            )?;
            (ce, rows, (0..rows).collect())
        }
    };
    let dim = row_count("weight", head.weight.len(), classes)?;
    expect_len("hidden", rows.saturating_mul(dim), hidden.len())?;
    if let Some(bias) = head.bias {
        expect_len("bias", classes, bias.len())?;
    }
    if let Some(g) = &grads {
        expect_len("hidden gradient", hidden.len(), g.hidden.len())?;
        expect_len("weight gradient", head.weight.len(), g.weight.len())?;
        if let Some(db) = &g.bias {
            expect_len("bias gradient", classes, db.len())?;
        }
    }
    let gradient = grads.is_some();
    let probabilities = matches!(targets, Targets::Probabilities(_));
    let layout = ChunkLayout::of::<E>(gradient, probabilities);
    let chunks = Chunks::new(
        options.budget_bytes,
        dim,
        (classes, classes),
        counted,
        layout,
    )?;
    if ce_options.non_finite == NonFinite::Error && !chunks.counted.is_empty() {
        check_finite("hidden", hidden, dim, Some(&chunks.counted))?;
        check_finite("weight", head.weight, dim, None)?;
        if let Some(bias) = head.bias {
            check_finite("bias", bias, classes, None)?;
        }
    }
    let grads = grads.map(|g| HeadGradients {
        hidden: g.hidden,
        weight: g.weight,
        bias: g.bias,
    });
    // A chunk's probability rows, widened when they are not in the working dtype.
    let mut wide_targets = Vec::new();
    chunks.run(hidden, head, grads, |rows_c, x| match targets {
        Targets::Classes(_) => ce.chunk(rows_c, x, gradient),
        Targets::Probabilities(q) => {
            let q = chunk_targets(q, rows_c, classes, &mut wide_targets);
            ce.chunk_with_probabilities(rows_c[0], q, x, gradient)
        }
    })?;
    Ok(ce.finish())
}

/// How the counted rows of a fused call are cut into chunks, and the plan each chunk runs.
pub(crate) struct Chunks {
    plan: Plan,
    /// The rows the loss counts, in order; the others' `dH` rows are 0.
    pub(crate) counted: Vec<usize>,
    /// Counted rows per chunk (the last chunk may have fewer).
    rows: usize,
}

impl Chunks {
    /// As many chunks of the `counted` rows as the budget needs for rows of `planned` classes
    /// (of which the call holds `classes`, see [`Plan::new`]), of equal size (a last chunk of a
    /// few rows would run the products at a poor shape). Depends only on its arguments: every
    /// shard of a split head that is given the same budget, `dim`, `planned`, counted rows and
    /// layout cuts the same chunks.
    ///
    /// # Errors
    /// [`LseError::BudgetTooSmall`].
    pub(crate) fn new(
        budget: usize,
        dim: usize,
        classes: (usize, usize),
        counted: Vec<usize>,
        layout: ChunkLayout,
    ) -> Result<Self> {
        let plan = Plan::new(budget, dim, classes, layout)?;
        let chunks = counted.len().div_ceil(plan.chunk_rows);
        let rows = counted.len().div_ceil(chunks.max(1)).max(1);
        Ok(Self {
            plan,
            counted,
            rows,
        })
    }

    /// The counted rows of each chunk, in order.
    pub(crate) fn each(&self) -> core::slice::Chunks<'_, usize> {
        self.counted.chunks(self.rows)
    }

    /// Runs every chunk: gathers its counted rows of `hidden` into the working dtype `E::Stat`,
    /// forms their logits `H_c·Wᵀ + b` (the head's classes), hands them to `step` (which runs
    /// the cross-entropy over them and, with `grads`, writes their gradient `G` over them),
    /// then `dH_c = G·W`, `dW += Gᵀ·H_c` (in the working dtype) and `db += Σ_rows G` (in
    /// `f64`). Each row of `dH` is written once (rows not counted 0); `dW` and `db` are rounded
    /// once at the end.
    pub(crate) fn run<E: Element, H: Element, X: From<LseError>>(
        &self,
        hidden: &[E],
        head: LinearHead<'_, E>,
        mut grads: Option<HeadGradients<'_, H, E>>,
        mut step: impl FnMut(&[usize], &mut [E::Stat]) -> core::result::Result<(), X>,
    ) -> core::result::Result<(), X> {
        let (plan, counted) = (&self.plan, &self.counted);
        let (dim, classes, chunk_rows) = (plan.dim, plan.classes, self.rows);
        let zero = E::Stat::zero();
        let gradient = grads.is_some();
        let mut logits = vec![zero; chunk_rows.min(counted.len()) * classes];
        let mut hidden_chunk = vec![zero; chunk_rows.min(counted.len()) * dim];
        let mut hidden_grad_chunk = vec![
            zero;
            if gradient {
                chunk_rows.min(counted.len()) * dim
            } else {
                0
            }
        ];
        let mut weight = WeightBlocks::new(head.weight, dim);
        let mut wide_bias = Vec::new();
        let bias = head.bias.map(|b| widen_rows(b, &mut wide_bias));
        // dW accumulates in the caller's buffer when it is in the working dtype, else in a
        // copy that is; db in f64.
        let mut weight_grad_acc = Vec::new();
        let mut bias_grad_acc = match &grads {
            Some(HeadGradients { bias: Some(_), .. }) => vec![0.0f64; classes],
            _ => Vec::new(),
        };
        if let Some(g) = &mut grads {
            let mut next_counted = counted.iter().peekable();
            for (r, row) in g.hidden.chunks_mut(dim.max(1)).enumerate() {
                if next_counted.next_if_eq(&&r).is_none() {
                    row.fill(H::zero());
                }
            }
            if as_work(g.weight).is_none() {
                weight_grad_acc = vec![zero; g.weight.len()];
            }
        }

        for (chunk, rows_c) in self.each().enumerate() {
            let n = rows_c.len();
            let h = &mut hidden_chunk[..n * dim];
            h.par_chunks_mut(dim.max(1))
                .zip(rows_c.par_iter())
                .for_each(|(dst, &r)| widen(&hidden[r * dim..(r + 1) * dim], dst));
            let x = &mut logits[..n * classes];
            if let Some(b) = &bias {
                x.par_chunks_mut(classes.max(1))
                    .for_each(|row| row.copy_from_slice(b));
            }
            for (first, end) in plan.blocks() {
                let w = weight.rows(first, end);
                product(
                    MatMut::columns(x, n, classes, first, end - first),
                    MatRef::row_major(h, n, dim),
                    MatRef::row_major(w, end - first, dim).t(),
                    bias.is_some(),
                );
            }
            step(rows_c, x)?;
            let Some(g) = &mut grads else { continue };

            // The chunk's logits now hold their gradient G.
            let dh = &mut hidden_grad_chunk[..n * dim];
            let h = &hidden_chunk[..n * dim];
            let weight_grad = as_work_mut(g.weight).unwrap_or(&mut weight_grad_acc[..]);
            if classes == 0 {
                dh.fill(zero);
            }
            for (block, (first, end)) in plan.blocks().enumerate() {
                let w = weight.rows(first, end);
                let g_block = MatRef::columns(x, n, classes, first, end - first);
                product(
                    MatMut::row_major(dh, n, dim),
                    g_block,
                    MatRef::row_major(w, end - first, dim),
                    block > 0,
                );
                product(
                    MatMut::row_major(&mut weight_grad[first * dim..end * dim], end - first, dim),
                    g_block.t(),
                    MatRef::row_major(h, n, dim),
                    chunk > 0,
                );
            }
            if g.bias.is_some() {
                column_sums(x, classes, &mut bias_grad_acc);
            }
            // The chunk's rows are the counted ones of a contiguous range of rows.
            let (low, high) = (rows_c[0], rows_c[n - 1] + 1);
            let dh_range = &mut g.hidden[low * dim..high * dim];
            let dh: &[E::Stat] = dh;
            dh_range
                .par_chunks_mut(dim.max(1))
                .enumerate()
                .for_each(|(i, dst)| {
                    if let Ok(j) = rows_c.binary_search(&(low + i)) {
                        narrow(&dh[j * dim..(j + 1) * dim], dst);
                    }
                });
        }

        if let Some(g) = &mut grads {
            if counted.is_empty() {
                g.weight.fill(E::zero());
            } else if as_work(g.weight).is_none() {
                narrow(&weight_grad_acc, g.weight);
            }
            if let Some(db) = &mut g.bias {
                for (d, &acc) in db.iter_mut().zip(&bias_grad_acc) {
                    *d = E::from_f64(acc);
                }
            }
        }
        Ok(())
    }
}

/// Where [`Chunks::run`] writes the gradients: `dH` in `H` (the caller's dtype, or the working
/// dtype for a shard's share that is still to be summed), `dW` and `db` in the head's dtype.
pub(crate) struct HeadGradients<'a, H, E> {
    pub(crate) hidden: &'a mut [H],
    pub(crate) weight: &'a mut [E],
    pub(crate) bias: Option<&'a mut [E]>,
}

/// The weight's rows in the working dtype, a block of classes at a time.
struct WeightBlocks<'w, E: Element> {
    weight: &'w [E],
    dim: usize,
    /// A block of a weight that is not in the working dtype, widened.
    wide: Vec<E::Stat>,
    /// The classes `wide` holds.
    holds: Option<(usize, usize)>,
}

impl<'w, E: Element> WeightBlocks<'w, E> {
    fn new(weight: &'w [E], dim: usize) -> Self {
        Self {
            weight,
            dim,
            wide: Vec::new(),
            holds: None,
        }
    }

    /// Rows `first..end` in the working dtype: the weight itself when it is in it, else
    /// widened (once when one block holds every class).
    fn rows(&mut self, first: usize, end: usize) -> &[E::Stat] {
        let rows = &self.weight[first * self.dim..end * self.dim];
        if let Some(rows) = as_work(rows) {
            return rows;
        }
        if self.holds != Some((first, end)) {
            self.wide.resize(rows.len(), E::Stat::zero());
            widen(rows, &mut self.wide);
            self.holds = Some((first, end));
        }
        &self.wide
    }
}

/// Columns per rayon task of the bias gradient's sums.
const SUM_COLUMNS: usize = 1024;

/// `acc[c] += Σ_r x[r][c]` over the rows of the row-major `x`, each sum in row order (so the
/// same bits for any number of threads).
fn column_sums<A: Stat>(x: &[A], classes: usize, acc: &mut [f64]) {
    acc.par_chunks_mut(SUM_COLUMNS)
        .enumerate()
        .for_each(|(piece, acc)| {
            let first = piece * SUM_COLUMNS;
            for row in x.chunks_exact(classes) {
                for (a, &g) in acc.iter_mut().zip(&row[first..]) {
                    *a += g.into();
                }
            }
        });
}
