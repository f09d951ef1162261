//! The public operations: argument checks, policies and the loop over rows. The arithmetic lives
//! in [`crate::kernels`].

pub(crate) mod cross_entropy;
pub(crate) mod linear_cross_entropy;
pub(crate) mod logsumexp;
pub mod sharded;
pub(crate) mod softmax;

use rayon::prelude::*;

use crate::element::Element;
use crate::error::{LseError, Result};

/// Elements of work per rayon task: whole rows, at least this many elements, so that scheduling
/// costs nothing next to the rows themselves.
const TASK_ELEMENTS: usize = 1 << 16;

/// Rows per task for rows of `classes` elements.
pub(crate) fn rows_per_task(classes: usize) -> usize {
    TASK_ELEMENTS.div_ceil(classes.max(1)).max(1)
}

/// Runs `f(r, input_row, output_row)` for every row `r`, on rayon's pool in tasks of whole
/// rows. Every output row depends on its own input row only, so the results are bitwise the
/// same for any number of threads. Returns the error of the smallest failing row; rows of other
/// tasks may have been written by then.
pub(crate) fn par_rows<I: Sync, O: Send>(
    input: &[I],
    in_row: usize,
    out: &mut [O],
    out_row: usize,
    f: impl Fn(usize, &[I], &mut [O]) -> Result<()> + Sync,
) -> Result<()> {
    let per_task = rows_per_task(in_row);
    let results: Vec<Result<()>> = input
        .par_chunks(per_task * in_row)
        .zip(out.par_chunks_mut(per_task * out_row))
        .enumerate()
        .map(|(task, (ins, outs))| {
            let rows = ins.chunks_exact(in_row).zip(outs.chunks_exact_mut(out_row));
            for (i, (x, o)) in rows.enumerate() {
                f(task * per_task + i, x, o)?;
            }
            Ok(())
        })
        .collect();
    results.into_iter().collect()
}

/// What to do with NaN and `+inf` logits (`-inf` is never an error: it is how masks are written).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
pub enum NonFinite {
    /// Return [`LseError::NonFinite`] naming the first offending row, column and value.
    #[default]
    Error,
    /// No check: the outputs of an affected row (and any reduction over it) become NaN; other
    /// rows are unaffected.
    Propagate,
}

/// The number of rows in a row-major buffer of `len` elements with `classes` columns.
pub(crate) fn row_count(what: &'static str, len: usize, classes: usize) -> Result<usize> {
    if classes == 0 {
        return Err(LseError::EmptyClasses);
    }
    if !len.is_multiple_of(classes) {
        return Err(LseError::RaggedRows { what, len, classes });
    }
    Ok(len / classes)
}

/// Checks that `actual == expected`.
pub(crate) fn expect_len(what: &'static str, expected: usize, actual: usize) -> Result<()> {
    if expected == actual {
        Ok(())
    } else {
        Err(LseError::LengthMismatch {
            what,
            expected,
            actual,
        })
    }
}

/// The error for a NaN or `+inf` logit at `(row, column)`.
pub(crate) fn non_finite_logit<E: Element>(row: usize, column: usize, value: E) -> LseError {
    LseError::NonFinite {
        what: "logit",
        row,
        column,
        value: value.to_f64(),
    }
}
