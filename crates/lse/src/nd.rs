//! `ndarray` entry points (feature `ndarray`): the same operations on `ArrayView2` (rows ×
//! classes). Any memory layout is accepted; a non-standard-layout input is copied into a
//! row-major buffer first, and a non-standard-layout output is written through one.

use std::borrow::Cow;

use ndarray::{Array1, ArrayView2, ArrayViewMut2};

use crate::{
    CrossEntropyOptions, CrossEntropyOutput, Element, GradOutput, LseError, Result, Targets,
};

/// The elements of `x` in row-major order, borrowed when they already are.
fn row_major<'a, E: Element>(x: &'a ArrayView2<'_, E>) -> Cow<'a, [E]> {
    match x.as_slice() {
        Some(s) => Cow::Borrowed(s),
        None => Cow::Owned(x.iter().copied().collect()),
    }
}

/// Runs `f(input, classes, output)` on row-major buffers and writes the output into `out`.
fn map_rows<E: Element, R>(
    x: ArrayView2<'_, E>,
    mut out: ArrayViewMut2<'_, E>,
    f: impl FnOnce(&[E], usize, &mut [E]) -> Result<R>,
) -> Result<R> {
    let (rows, classes) = x.dim();
    if out.dim() != x.dim() {
        let (r, c) = out.dim();
        return Err(LseError::ShapeMismatch {
            what: "output",
            expected: [rows, classes],
            actual: [r, c],
        });
    }
    let input = row_major(&x);
    if let Some(o) = out.as_slice_mut() {
        return f(&input, classes, o);
    }
    let mut buffer = vec![E::zero(); rows * classes];
    let result = f(&input, classes, &mut buffer)?;
    out.iter_mut().zip(buffer).for_each(|(o, v)| *o = v);
    Ok(result)
}

/// [`crate::logsumexp`] of every row.
///
/// # Errors
/// As [`crate::logsumexp`].
///
/// # Panics
/// Never.
pub fn logsumexp<E: Element>(x: ArrayView2<'_, E>) -> Result<Array1<E::Stat>> {
    let mut out = vec![E::Stat::zero(); x.nrows()];
    crate::logsumexp(&row_major(&x), x.ncols(), &mut out)?;
    Ok(Array1::from(out))
}

/// [`crate::softmax`] of every row into `out` (same shape).
///
/// # Errors
/// [`LseError::ShapeMismatch`] when `out` has another shape; otherwise as [`crate::softmax`].
///
/// # Panics
/// Never.
pub fn softmax<E: Element>(x: ArrayView2<'_, E>, out: ArrayViewMut2<'_, E>) -> Result<()> {
    map_rows(x, out, crate::softmax)
}

/// [`crate::log_softmax`] of every row into `out` (same shape).
///
/// # Errors
/// As [`softmax`].
///
/// # Panics
/// Never.
pub fn log_softmax<E: Element>(x: ArrayView2<'_, E>, out: ArrayViewMut2<'_, E>) -> Result<()> {
    map_rows(x, out, crate::log_softmax)
}

/// [`crate::cross_entropy`] of `x`.
///
/// # Errors
/// As [`crate::cross_entropy`].
///
/// # Panics
/// Never.
pub fn cross_entropy<E: Element>(
    x: ArrayView2<'_, E>,
    targets: Targets<'_, E>,
    options: &CrossEntropyOptions<'_>,
) -> Result<CrossEntropyOutput<E::Stat>> {
    crate::cross_entropy(&row_major(&x), x.ncols(), targets, options)
}

/// [`crate::cross_entropy_with_grad`] of `x`, the gradient written into `grad` (same shape).
///
/// # Errors
/// [`LseError::ShapeMismatch`] when `grad` has another shape; otherwise as
/// [`crate::cross_entropy_with_grad`].
///
/// # Panics
/// Never.
pub fn cross_entropy_with_grad<E: Element>(
    x: ArrayView2<'_, E>,
    targets: Targets<'_, E>,
    options: &CrossEntropyOptions<'_>,
    grad_output: GradOutput<'_, E::Stat>,
    grad: ArrayViewMut2<'_, E>,
) -> Result<CrossEntropyOutput<E::Stat>> {
    map_rows(x, grad, |input, classes, g| {
        crate::cross_entropy_with_grad(input, classes, targets, options, grad_output, g)
    })
}
