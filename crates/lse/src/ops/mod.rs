//! The public operations: argument checks, policies and the loop over rows. The arithmetic lives
//! in [`crate::kernels`].

pub(crate) mod cross_entropy;
pub(crate) mod logsumexp;
pub(crate) mod softmax;

use crate::element::Element;
use crate::error::{LseError, Result};

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
    if len % classes != 0 {
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
