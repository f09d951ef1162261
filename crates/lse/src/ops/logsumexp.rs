//! `logsumexp` per row.

use super::{expect_len, non_finite_logit, par_rows, row_count, NonFinite};
use crate::element::Element;
use crate::error::Result;
use crate::kernels;

/// Writes `log Σ_j exp(x_rj)` of every row of `logits` (`rows × classes`, row-major) into `out`,
/// as `m + log1p(Σ_{j≠k} exp(x_rj − m))` with `m` the row max: finite for every finite row.
///
/// The result is `f32` for `f32`, `f16` and `bf16` input and `f64` for `f64` input. A fully masked
/// row (all `-inf`) gives `-inf`. NaN and `+inf` are errors; see [`logsumexp_with`] to propagate
/// them instead.
///
/// ```
/// let logits = [1000.0f32, 1.0, -1000.0, /* row 2 */ 2.0, 1.0, 0.1];
/// let mut lse = [0.0f32; 2];
/// lse::logsumexp(&logits, 3, &mut lse)?;
/// assert_eq!(lse[0], 1000.0);
/// assert!((lse[1] - 2.4170).abs() < 1e-4);
/// # Ok::<(), lse::LseError>(())
/// ```
///
/// # Errors
/// [`LseError::EmptyClasses`](crate::LseError::EmptyClasses) when `classes == 0`,
/// [`LseError::RaggedRows`](crate::LseError::RaggedRows) when `logits.len()` is not a multiple of
/// `classes`, [`LseError::LengthMismatch`](crate::LseError::LengthMismatch) when `out` does not
/// hold one value per row, and [`LseError::NonFinite`](crate::LseError::NonFinite) for the first
/// NaN or `+inf` logit. On error `logits` is unchanged and `out` is unspecified.
///
/// # Panics
/// Never.
pub fn logsumexp<E: Element>(logits: &[E], classes: usize, out: &mut [E::Stat]) -> Result<()> {
    logsumexp_with(logits, classes, out, NonFinite::Error)
}

/// [`logsumexp`] with an explicit policy for NaN and `+inf` logits.
///
/// # Errors
/// As [`logsumexp`]; under [`NonFinite::Propagate`] a row with NaN gives NaN and a row with
/// `+inf` (and no NaN) gives `+inf`, as IEEE arithmetic, SciPy and JAX do, instead of an error.
///
/// # Panics
/// Never.
pub fn logsumexp_with<E: Element>(
    logits: &[E],
    classes: usize,
    out: &mut [E::Stat],
    policy: NonFinite,
) -> Result<()> {
    let rows = row_count("logits", logits.len(), classes)?;
    expect_len("logsumexp output", rows, out.len())?;
    par_rows(logits, classes, out, 1, |r, row, o| {
        o[0] = match (kernels::scan_state(row), policy) {
            (Ok(state), _) => E::Stat::from_f64(kernels::logsumexp(row, &state)),
            // IEEE (and SciPy, JAX): log Σ exp is +inf when some term is +inf and none is NaN.
            (Err(_), NonFinite::Propagate) if row.iter().any(|x| x.to_f64().is_nan()) => {
                E::Stat::from_f64(f64::NAN)
            }
            (Err(_), NonFinite::Propagate) => E::Stat::from_f64(f64::INFINITY),
            (Err(c), NonFinite::Error) => return Err(non_finite_logit(r, c, row[c])),
        };
        Ok(())
    })
}
