//! What the operations return instead of panicking.

/// An error of an `lse-burn` operation; no input is modified.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// `lse`'s own error: a shape, an option, a target, or (under
    /// [`NonFinite::Error`](crate::NonFinite::Error)) a NaN or infinite value, named by its
    /// row, column and value.
    #[error(transparent)]
    Input(#[from] lse::LseError),
    /// An operation that has no kernel for this dtype.
    #[error("{op} does not take {dtype:?} tensors: {why}")]
    Unsupported {
        /// The operation.
        op: &'static str,
        /// The dtype it was given.
        dtype: burn::tensor::DType,
        /// What it takes instead.
        why: &'static str,
    },
    /// A dimension index past the tensor's rank.
    #[error("{op}: dimension {dim} is out of range for a tensor of rank {rank}")]
    BadDim {
        /// The operation.
        op: &'static str,
        /// The dimension asked for.
        dim: usize,
        /// The tensor's rank.
        rank: usize,
    },
}
