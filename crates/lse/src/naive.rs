//! The textbook formulas, kept on purpose: `exp(x) / Σ exp(x)` evaluated in the input dtype, one
//! rounding per operation, exactly as a hand-written training loop would. They overflow to `inf`,
//! underflow to 0 and produce NaN on logits the stable ops handle; [`lse explain`] and the tests
//! use them to show where and why.
//!
//! Nothing here checks for non-finite values: producing them is the point.
//!
//! [`lse explain`]: https://docs.rs/lse-cli

use crate::element::Element;
use crate::error::Result;
use crate::ops::{expect_len, row_count};

/// `f(a)` evaluated in `f64` and rounded to `E`: one operation in `E`'s arithmetic.
#[inline]
fn op<E: Element>(value: f64) -> E {
    E::from_f64(value)
}

/// `exp(x)` in the dtype `E`: `inf` once `x` passes [`DType::exp_overflow_threshold`]
/// (11.09 for `f16`).
///
/// [`DType::exp_overflow_threshold`]: crate::DType::exp_overflow_threshold
pub fn exp<E: Element>(x: E) -> E {
    op(x.to_f64().exp())
}

/// `Σ_j exp(x_j)` of one row, accumulated left to right in `E`.
fn sum_exp<E: Element>(row: &[E]) -> E {
    row.iter()
        .fold(E::zero(), |acc, &x| op(acc.to_f64() + exp(x).to_f64()))
}

/// Naive `softmax`: `exp(x_i) / Σ_j exp(x_j)` in `E`, no max shift.
///
/// # Errors
/// Shape errors only (as [`crate::softmax`]).
///
/// # Panics
/// Never.
pub fn softmax<E: Element>(logits: &[E], classes: usize, out: &mut [E]) -> Result<()> {
    row_count("logits", logits.len(), classes)?;
    expect_len("output", logits.len(), out.len())?;
    for (row, out_row) in logits
        .chunks_exact(classes)
        .zip(out.chunks_exact_mut(classes))
    {
        let sum = sum_exp(row).to_f64();
        for (o, &x) in out_row.iter_mut().zip(row) {
            *o = op(exp(x).to_f64() / sum);
        }
    }
    Ok(())
}

/// Naive `logsumexp`: `ln(Σ_j exp(x_j))` in `E`.
///
/// # Errors
/// Shape errors only.
///
/// # Panics
/// Never.
pub fn logsumexp<E: Element>(logits: &[E], classes: usize, out: &mut [E]) -> Result<()> {
    let rows = row_count("logits", logits.len(), classes)?;
    expect_len("logsumexp output", rows, out.len())?;
    for (row, o) in logits.chunks_exact(classes).zip(out) {
        *o = op(sum_exp(row).to_f64().ln());
    }
    Ok(())
}

/// Naive `log_softmax`: `ln(softmax(x)_i)` in `E` (`-inf` where the naive softmax underflows).
///
/// # Errors
/// Shape errors only.
///
/// # Panics
/// Never.
pub fn log_softmax<E: Element>(logits: &[E], classes: usize, out: &mut [E]) -> Result<()> {
    softmax(logits, classes, out)?;
    out.iter_mut().for_each(|o| *o = op(o.to_f64().ln()));
    Ok(())
}

/// Naive per-row cross-entropy `−ln(softmax(x)_y)` in `E`, and its gradient
/// `softmax(x) − onehot(y)` (unreduced: one loss and one gradient row per row).
///
/// # Errors
/// Shape errors, and [`LseError::TargetOutOfRange`](crate::LseError::TargetOutOfRange) for a
/// target outside `0..classes`.
///
/// # Panics
/// Never.
pub fn cross_entropy<E: Element>(
    logits: &[E],
    classes: usize,
    targets: &[i64],
    losses: &mut [E],
    grad: &mut [E],
) -> Result<()> {
    let rows = row_count("logits", logits.len(), classes)?;
    expect_len("targets", rows, targets.len())?;
    expect_len("losses", rows, losses.len())?;
    softmax(logits, classes, grad)?;
    for (r, (&t, loss)) in targets.iter().zip(losses).enumerate() {
        let y = usize::try_from(t).ok().filter(|&y| y < classes).ok_or(
            crate::LseError::TargetOutOfRange {
                row: r,
                value: t,
                classes,
            },
        )?;
        let p = &mut grad[r * classes + y];
        *loss = op(-p.to_f64().ln());
        *p = op(p.to_f64() - 1.0);
    }
    Ok(())
}
