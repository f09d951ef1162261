//! `softmax` and `log_softmax`, forward and backward.

use rayon::prelude::*;

use super::{expect_len, non_finite_logit, par_rows, row_count, rows_per_task, NonFinite};
use crate::element::Element;
use crate::error::Result;
use crate::kernels;

/// Read pass then write pass over every row: `row_passes` writes a row's outputs, or returns
/// the column of its first NaN or `+inf` (leaving the outputs unspecified).
fn forward<E: Element>(
    logits: &[E],
    classes: usize,
    out: &mut [E],
    policy: NonFinite,
    row_passes: fn(&[E], &mut [E]) -> core::result::Result<(), usize>,
) -> Result<()> {
    row_count("logits", logits.len(), classes)?;
    expect_len("output", logits.len(), out.len())?;
    par_rows(logits, classes, out, classes, |r, row, out_row| {
        match (row_passes(row, out_row), policy) {
            (Ok(()), _) => {}
            (Err(_), NonFinite::Propagate) => out_row.fill(E::from_f64(f64::NAN)),
            (Err(c), NonFinite::Error) => return Err(non_finite_logit(r, c, row[c])),
        }
        Ok(())
    })
}

/// Writes `softmax(x)_i = exp(x_i − m) / Σ_j exp(x_j − m)` of every row of `logits`
/// (`rows × classes`, row-major) into `out` (same shape and dtype).
///
/// Computed in `f64` and rounded once. `-inf` logits get probability 0; a fully masked row gives
/// all zeros. NaN and `+inf` are errors; see [`softmax_with`] to propagate them.
///
/// ```
/// let logits = [1000.0f32, 1.0, -1000.0];
/// let mut p = [0.0f32; 3];
/// lse::softmax(&logits, 3, &mut p)?;
/// assert_eq!(p, [1.0, 0.0, 0.0]); // naive exp(1000) is inf, and inf/inf is NaN
/// # Ok::<(), lse::LseError>(())
/// ```
///
/// # Errors
/// [`LseError::EmptyClasses`](crate::LseError::EmptyClasses),
/// [`LseError::RaggedRows`](crate::LseError::RaggedRows) and
/// [`LseError::LengthMismatch`](crate::LseError::LengthMismatch) for shapes;
/// [`LseError::NonFinite`](crate::LseError::NonFinite) for the first NaN or `+inf` logit. On error
/// `logits` is unchanged and `out` is unspecified.
///
/// # Panics
/// Never.
pub fn softmax<E: Element>(logits: &[E], classes: usize, out: &mut [E]) -> Result<()> {
    softmax_with(logits, classes, out, NonFinite::Error)
}

/// [`softmax`] with an explicit policy for NaN and `+inf` logits.
///
/// # Errors
/// As [`softmax`]; under [`NonFinite::Propagate`] an affected row becomes NaN instead.
///
/// # Panics
/// Never.
pub fn softmax_with<E: Element>(
    logits: &[E],
    classes: usize,
    out: &mut [E],
    policy: NonFinite,
) -> Result<()> {
    forward(logits, classes, out, policy, kernels::softmax_row)
}

/// Writes `log_softmax(x)_i = (x_i − m) − log1p(Σ_{j≠k} exp(x_j − m))` of every row into `out`.
///
/// Both terms are ≤ 0, so nothing cancels: the max entry keeps full relative accuracy
/// (`log_softmax([30, 0])[0] = −9.36e-14`, not 0). `-inf` logits give `-inf`; an exact result
/// below the dtype's range saturates to `-MAX`, so finite input always gives finite output.
///
/// # Errors
/// As [`softmax`].
///
/// # Panics
/// Never.
pub fn log_softmax<E: Element>(logits: &[E], classes: usize, out: &mut [E]) -> Result<()> {
    log_softmax_with(logits, classes, out, NonFinite::Error)
}

/// [`log_softmax`] with an explicit policy for NaN and `+inf` logits.
///
/// # Errors
/// As [`softmax_with`].
///
/// # Panics
/// Never.
pub fn log_softmax_with<E: Element>(
    logits: &[E],
    classes: usize,
    out: &mut [E],
    policy: NonFinite,
) -> Result<()> {
    forward(logits, classes, out, policy, kernels::log_softmax_row)
}

/// Checks the shapes of a backward call and runs `row_fn` on every row.
fn backward<E: Element>(
    output: &[E],
    grad_output: &[E],
    classes: usize,
    grad_input: &mut [E],
    row_fn: fn(&[E], &[E], &mut [E]),
) -> Result<()> {
    row_count("forward output", output.len(), classes)?;
    expect_len("output gradient", output.len(), grad_output.len())?;
    expect_len("input gradient", output.len(), grad_input.len())?;
    let task = rows_per_task(classes) * classes;
    output
        .par_chunks(task)
        .zip(grad_output.par_chunks(task))
        .zip(grad_input.par_chunks_mut(task))
        .for_each(|((y, dy), dx)| {
            let rows = y
                .chunks_exact(classes)
                .zip(dy.chunks_exact(classes))
                .zip(dx.chunks_exact_mut(classes));
            for ((y, dy), dx) in rows {
                row_fn(y, dy, dx);
            }
        });
    Ok(())
}

/// The gradient of [`softmax`]: given its output `y` and the gradient `dy` of a loss with respect
/// to `y`, writes `dx_i = y_i · (dy_i − Σ_j y_j dy_j)` into `dx`.
///
/// Non-finite values in `y` or `dy` propagate into `dx` (the forward pass is where logits are
/// checked).
///
/// # Errors
/// [`LseError::EmptyClasses`](crate::LseError::EmptyClasses),
/// [`LseError::RaggedRows`](crate::LseError::RaggedRows) or
/// [`LseError::LengthMismatch`](crate::LseError::LengthMismatch) when the three buffers are not
/// all `rows × classes`.
///
/// # Panics
/// Never.
pub fn softmax_backward<E: Element>(y: &[E], dy: &[E], classes: usize, dx: &mut [E]) -> Result<()> {
    backward(y, dy, classes, dx, kernels::softmax_backward)
}

/// The gradient of [`log_softmax`]: given its output `y` and `dy`, writes
/// `dx_i = dy_i − exp(y_i) · Σ_j dy_j` into `dx`. Masked entries (`y_i = -inf`) get `dy_i`.
///
/// # Errors
/// As [`softmax_backward`].
///
/// # Panics
/// Never.
pub fn log_softmax_backward<E: Element>(
    y: &[E],
    dy: &[E],
    classes: usize,
    dx: &mut [E],
) -> Result<()> {
    backward(y, dy, classes, dx, kernels::log_softmax_backward)
}
