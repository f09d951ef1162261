//! Fused linear cross-entropy: the loss of the logits `H·Wᵀ + b` and its gradients with respect
//! to `H`, `W` and `b`, formed a chunk of rows at a time so that the `rows × classes` logits never
//! exist.
//!
//! Per chunk: gather the chunk's counted rows of `H` (ignored rows are dropped before any
//! product) into `f32`, form their logits with one matrix product, run the cross-entropy over
//! them with the row kernels (the gradient written over the logits), then `dH_c = G·W`,
//! `dW += Gᵀ·H_c` and `db += Σ_rows G`. `dW` and `db` accumulate in `f32`/`f64` over all chunks
//! and are rounded once into the caller's dtype; each row of `dH` is written once.

use std::borrow::Cow;

use rayon::prelude::*;

use super::cross_entropy::{ChunkedCrossEntropy, CrossEntropyOptions, CrossEntropyOutput};
use super::{expect_len, row_count, NonFinite};
use crate::element::{DType, Element};
use crate::error::{LseError, Result};
use crate::matmul::{product, MatMut, MatRef};
use crate::GradOutput;

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
    /// on the logits `H·Wᵀ + b` with class targets. Under [`NonFinite::Error`] a NaN or infinite
    /// value in `H` (a counted row), `W` or `b` is an error too, named by where it is.
    pub cross_entropy: CrossEntropyOptions<'a>,
    /// Bytes of working memory for the chunk's `f32` logits and hidden rows (and, for a `f16`/
    /// `bf16` weight, a block of it in `f32`): sets how many rows a chunk has. Default
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

/// The cross-entropy loss of the logits `hidden · weightᵀ + bias` against class `targets`,
/// without ever holding all of them: `hidden` is `rows × dim` row-major with
/// `rows = targets.len()` and `dim = weight.len() / classes`.
///
/// The result is that of [`cross_entropy`](crate::cross_entropy) on those logits formed in `f32`
/// (one `f32` matrix product per chunk; `f16`/`bf16` inputs are widened exactly), with the loss,
/// per-row values and statistics in `f32`. Rows whose target is the ignore index cost nothing.
///
/// ```
/// use lse::{linear_cross_entropy, LinearCrossEntropyOptions, LinearHead};
/// let hidden = [1.0f32, 0.0, /* row 1 */ 0.0, 2.0];
/// let weight = [1.0f32, 0.0, /* class 1 */ 0.0, 1.0, /* class 2 */ -1.0, -1.0];
/// let head = LinearHead { weight: &weight, bias: None, classes: 3 };
/// let out = linear_cross_entropy(&hidden, head, &[0, 1], &LinearCrossEntropyOptions::default())?;
/// // Row 0's logits are [1, 0, -1], row 1's [0, 2, -2].
/// let ce = |x: [f64; 3], y: usize| x.iter().map(|v| v.exp()).sum::<f64>().ln() - x[y];
/// let expected = (ce([1.0, 0.0, -1.0], 0) + ce([0.0, 2.0, -2.0], 1)) / 2.0;
/// assert!((f64::from(out.loss) - expected).abs() < 1e-6);
/// # Ok::<(), lse::LseError>(())
/// ```
///
/// # Errors
/// Shapes: [`LseError::EmptyClasses`], [`LseError::RaggedRows`] (`weight` not a whole number of
/// class rows), [`LseError::LengthMismatch`] (`hidden`, `bias`). [`LseError::BudgetTooSmall`]
/// when the budget cannot hold one row. Everything [`cross_entropy`](crate::cross_entropy)
/// returns for the options and targets, and [`LseError::NonFinite`] naming `"hidden"`,
/// `"weight"`, `"bias"` (row, column, value) or a `"logit"` that the product made infinite,
/// under [`NonFinite::Error`]. No input is modified.
///
/// # Panics
/// Never.
pub fn linear_cross_entropy<E: Element<Stat = f32>>(
    hidden: &[E],
    head: LinearHead<'_, E>,
    targets: &[i64],
    options: &LinearCrossEntropyOptions<'_>,
) -> Result<CrossEntropyOutput<f32>> {
    fused(hidden, head, targets, options, GradOutput::default(), None)
}

/// [`linear_cross_entropy`] and its gradients: writes `∂(g · loss)/∂H`, `∂/∂W` and (when asked
/// for) `∂/∂b` into `grads`, where `g` is `grad_output` (a scalar, or one value per row with
/// [`Reduction::None`](crate::Reduction::None)).
///
/// The logits' gradient is [`cross_entropy_with_grad`](crate::cross_entropy_with_grad)'s on the
/// `f32` logits, kept in `f32`; `dW` and `db` are summed over all chunks in `f32` (`db` in `f64`)
/// and rounded once into `E`; rows of `dH` are rounded once, ignored rows are 0. Results are
/// bitwise the same for any number of threads at a given `budget_bytes`.
///
/// ```
/// use lse::{linear_cross_entropy_with_grad, GradOutput, LinearCrossEntropyOptions,
///           LinearGradients, LinearHead};
/// let (hidden, weight, bias) = ([0.5f32, -1.0], [1.0f32, 2.0, -1.0, 0.0, 0.0, 1.0], [0.0f32; 3]);
/// let head = LinearHead { weight: &weight, bias: Some(&bias), classes: 3 };
/// let (mut dh, mut dw, mut db) = ([0.0f32; 2], [0.0f32; 6], [0.0f32; 3]);
/// let grads = LinearGradients { hidden: &mut dh, weight: &mut dw, bias: Some(&mut db) };
/// let out = linear_cross_entropy_with_grad(&hidden, head, &[2], &LinearCrossEntropyOptions::default(),
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
pub fn linear_cross_entropy_with_grad<E: Element<Stat = f32>>(
    hidden: &[E],
    head: LinearHead<'_, E>,
    targets: &[i64],
    options: &LinearCrossEntropyOptions<'_>,
    grad_output: GradOutput<'_, f32>,
    grads: LinearGradients<'_, E>,
) -> Result<CrossEntropyOutput<f32>> {
    fused(hidden, head, targets, options, grad_output, Some(grads))
}

/// How a call's rows and classes are cut to fit the budget.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
struct Plan {
    dim: usize,
    classes: usize,
    /// Counted rows per chunk.
    chunk_rows: usize,
    /// Classes per block of a half-type weight widened to `f32` (all of them for `f32`).
    block_classes: usize,
}

impl Plan {
    /// The largest chunk that fits `budget` bytes: per row, its `f32` logits and hidden row (and
    /// its `dH` row with a gradient); for a weight that is not `f32`, a block of at most a
    /// quarter of the budget (at least one class) widened to `f32`.
    ///
    /// The chunk is sized for rows of `planned` classes, of which the call holds `classes`
    /// (all of them, or one shard's): every shard of a split head then cuts the same chunks as
    /// the one-process call, within its budget.
    fn new(
        budget: usize,
        dim: usize,
        (classes, planned): (usize, usize),
        gradient: bool,
        f32_weight: bool,
    ) -> Result<Self> {
        const F32: usize = core::mem::size_of::<f32>();
        let row_bytes = F32 * (planned + dim * if gradient { 2 } else { 1 });
        let block = |classes: usize| {
            if f32_weight || dim == 0 {
                classes
            } else {
                (budget / 4 / (F32 * dim)).clamp(1, classes.max(1))
            }
        };
        let block_bytes = if f32_weight {
            0
        } else {
            F32 * dim * block(planned)
        };
        let chunk_rows = budget.saturating_sub(block_bytes) / row_bytes;
        if chunk_rows == 0 {
            let one_class = if f32_weight { 0 } else { F32 * dim };
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

/// `x` as `f32` when `E` is `f32`.
fn as_f32<E: Element>(x: &[E]) -> Option<&[f32]> {
    // SAFETY: `Element` is sealed and its DType F32 names exactly `f32`.
    (E::DTYPE == DType::F32)
        .then(|| unsafe { core::slice::from_raw_parts(x.as_ptr().cast(), x.len()) })
}

/// `x` as `f32` when `E` is `f32`.
fn as_f32_mut<E: Element>(x: &mut [E]) -> Option<&mut [f32]> {
    // SAFETY: as for `as_f32`.
    (E::DTYPE == DType::F32)
        .then(|| unsafe { core::slice::from_raw_parts_mut(x.as_mut_ptr().cast(), x.len()) })
}

/// Elements per rayon task of a conversion.
const CONVERT_PIECE: usize = 1 << 16;

/// `dst[i] = src[i]` widened to `f32` (exact), on rayon's pool.
fn widen<E: Element>(src: &[E], dst: &mut [f32]) {
    dst.par_chunks_mut(CONVERT_PIECE)
        .zip(src.par_chunks(CONVERT_PIECE))
        .for_each(|(d, s)| {
            for (d, s) in d.iter_mut().zip(s) {
                *d = s.to_f64() as f32;
            }
        });
}

/// `dst[i] = src[i]` rounded once to `E`, on rayon's pool.
fn narrow<E: Element>(src: &[f32], dst: &mut [E]) {
    dst.par_chunks_mut(CONVERT_PIECE)
        .zip(src.par_chunks(CONVERT_PIECE))
        .for_each(|(d, s)| {
            for (d, &s) in d.iter_mut().zip(s) {
                *d = E::from_f64(f64::from(s));
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

fn fused<E: Element<Stat = f32>>(
    hidden: &[E],
    head: LinearHead<'_, E>,
    targets: &[i64],
    options: &LinearCrossEntropyOptions<'_>,
    grad_output: GradOutput<'_, f32>,
    grads: Option<LinearGradients<'_, E>>,
) -> Result<CrossEntropyOutput<f32>> {
    let ce_options = &options.cross_entropy;
    let classes = head.classes;
    let mut ce = ChunkedCrossEntropy::<f32>::new(classes, targets, ce_options, grad_output)?;
    let rows = targets.len();
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
    let chunks = Chunks::new(
        options.budget_bytes,
        dim,
        (classes, classes),
        targets,
        ce_options.ignore_index,
        gradient,
        E::DTYPE == DType::F32,
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
    chunks.run(
        hidden,
        head,
        targets,
        ce_options.ignore_index,
        grads,
        |rows_c, x| ce.chunk(rows_c, x, gradient),
    )?;
    Ok(ce.finish())
}

/// How the counted rows of a fused call are cut into chunks, and the plan each chunk runs.
pub(crate) struct Chunks {
    plan: Plan,
    /// The rows whose target is not the ignore index, in order.
    pub(crate) counted: Vec<usize>,
    /// Counted rows per chunk (the last chunk may have fewer).
    rows: usize,
}

impl Chunks {
    /// As many chunks as the budget needs for rows of `planned` classes (of which the call holds
    /// `classes`, see [`Plan::new`]), of equal size (a last chunk of a few rows would run the
    /// products at a poor shape). Depends only on its arguments: every shard of a split head
    /// that is given the same budget, `dim`, `planned`, targets and dtype cuts the same chunks.
    ///
    /// # Errors
    /// [`LseError::BudgetTooSmall`].
    pub(crate) fn new(
        budget: usize,
        dim: usize,
        classes: (usize, usize),
        targets: &[i64],
        ignore_index: Option<i64>,
        gradient: bool,
        f32_weight: bool,
    ) -> Result<Self> {
        let plan = Plan::new(budget, dim, classes, gradient, f32_weight)?;
        let counted: Vec<usize> = (0..targets.len())
            .filter(|&r| Some(targets[r]) != ignore_index)
            .collect();
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

    /// Runs every chunk: gathers its counted rows of `hidden` into `f32`, forms their logits
    /// `H_c·Wᵀ + b` (the head's classes), hands them to `step` (which runs the cross-entropy
    /// over them and, with `grads`, writes their gradient `G` over them), then
    /// `dH_c = G·W`, `dW += Gᵀ·H_c` (in `f32`) and `db += Σ_rows G` (in `f64`). Each row of
    /// `dH` is written once (ignored rows 0); `dW` and `db` are rounded once at the end.
    pub(crate) fn run<E: Element, H: Element, X: From<LseError>>(
        &self,
        hidden: &[E],
        head: LinearHead<'_, E>,
        targets: &[i64],
        ignore_index: Option<i64>,
        mut grads: Option<HeadGradients<'_, H, E>>,
        mut step: impl FnMut(&[usize], &mut [f32]) -> core::result::Result<(), X>,
    ) -> core::result::Result<(), X> {
        let (plan, counted) = (&self.plan, &self.counted);
        let (dim, classes, chunk_rows) = (plan.dim, plan.classes, self.rows);
        let gradient = grads.is_some();
        let mut logits = vec![0.0f32; chunk_rows.min(counted.len()) * classes];
        let mut hidden_chunk = vec![0.0f32; chunk_rows.min(counted.len()) * dim];
        let mut hidden_grad_chunk = vec![
            0.0f32;
            if gradient {
                chunk_rows.min(counted.len()) * dim
            } else {
                0
            }
        ];
        let mut weight = WeightBlocks::new(head.weight, dim);
        let bias: Option<Cow<'_, [f32]>> = head.bias.map(|b| match as_f32(b) {
            Some(b) => Cow::Borrowed(b),
            None => {
                let mut wide = vec![0.0f32; classes];
                widen(b, &mut wide);
                Cow::Owned(wide)
            }
        });
        // dW accumulates in the caller's buffer when it is f32, else in an f32 copy; db in f64.
        let mut weight_grad_acc = Vec::new();
        let mut bias_grad_acc = match &grads {
            Some(HeadGradients { bias: Some(_), .. }) => vec![0.0f64; classes],
            _ => Vec::new(),
        };
        if let Some(g) = &mut grads {
            for (r, row) in g.hidden.chunks_mut(dim.max(1)).enumerate() {
                if Some(targets[r]) == ignore_index {
                    row.fill(H::zero());
                }
            }
            if as_f32(g.weight).is_none() {
                weight_grad_acc = vec![0.0f32; g.weight.len()];
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
            let weight_grad = as_f32_mut(g.weight).unwrap_or(&mut weight_grad_acc[..]);
            if classes == 0 {
                dh.fill(0.0);
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
            let dh: &[f32] = dh;
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
            } else if as_f32(g.weight).is_none() {
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

/// Where [`Chunks::run`] writes the gradients: `dH` in `H` (the caller's dtype, or `f32` for a
/// shard's share that is still to be summed), `dW` and `db` in the head's dtype.
pub(crate) struct HeadGradients<'a, H, E> {
    pub(crate) hidden: &'a mut [H],
    pub(crate) weight: &'a mut [E],
    pub(crate) bias: Option<&'a mut [E]>,
}

/// The weight's rows as `f32`, a block of classes at a time.
struct WeightBlocks<'w, E> {
    weight: &'w [E],
    dim: usize,
    /// A block of a weight that is not `f32`, widened.
    wide: Vec<f32>,
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

    /// Rows `first..end` as `f32`: the weight itself when it is `f32`, else widened (once when
    /// one block holds every class).
    fn rows(&mut self, first: usize, end: usize) -> &[f32] {
        let rows = &self.weight[first * self.dim..end * self.dim];
        if let Some(rows) = as_f32(rows) {
            return rows;
        }
        if self.holds != Some((first, end)) {
            self.wide.resize(rows.len(), 0.0);
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
fn column_sums(x: &[f32], classes: usize, acc: &mut [f64]) {
    acc.par_chunks_mut(SUM_COLUMNS)
        .enumerate()
        .for_each(|(piece, acc)| {
            let first = piece * SUM_COLUMNS;
            for row in x.chunks_exact(classes) {
                for (a, &g) in acc.iter_mut().zip(&row[first..]) {
                    *a += f64::from(g);
                }
            }
        });
}
