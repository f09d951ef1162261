//! # lse — softmax, log_softmax, logsumexp and cross-entropy that cannot overflow
//!
//! Naive `exp(x) / Σ exp(x)` overflows to `inf` as soon as a logit passes 88.7 in `f32` (11.1 in
//! `f16`) and turns a training step's loss and gradients into NaN. `lse` computes the whole family
//! from raw logits with the LogSumExp identity: shift by the row max `m`, keep
//! `s' = Σ_{i≠k} exp(x_i − m)` (every term ≤ 1), and use `log1p(s')` so that confident rows keep
//! their digits. Finite input gives finite output, in `f64`, `f32`, [`half::f16`] and
//! [`half::bf16`].
//!
//! ```
//! use lse::{cross_entropy_with_grad, CrossEntropyOptions, GradOutput, Targets};
//!
//! // Two rows of three classes; the first would overflow a naive softmax in any dtype.
//! let logits = [1000.0f32, 1.0, -1000.0, 2.0, 1.0, 0.1];
//! let targets = [0i64, 2];
//! let mut grad = [0.0f32; 6];
//! let out = cross_entropy_with_grad(
//!     &logits, 3, Targets::Classes(&targets), &CrossEntropyOptions::default(),
//!     GradOutput::Scalar(1.0), &mut grad,
//! )?;
//! assert!(out.loss.is_finite() && grad.iter().all(|g| g.is_finite()));
//! # Ok::<(), lse::LseError>(())
//! ```
//!
//! Data is row-major `rows × classes`: a slice plus the class count. Outputs go into
//! caller-provided buffers; statistics (loss, logsumexp) are `f32` for `f32`/`f16`/`bf16` input
//! and `f64` for `f64` input. Bad input is a typed [`LseError`] naming what and where, never a
//! panic, and an input buffer is never modified by a call that fails. The semantics for every kind
//! of input (masks, NaN, ignored rows, empty means) are in `docs/contract.md`.

mod element;
mod error;
pub mod guard;
pub(crate) mod kernels;
mod matmul;
pub mod naive;
#[cfg(feature = "ndarray")]
pub mod nd;
mod ops;
mod state;

pub use element::{DType, Element, ParseDTypeError, Stat};
pub use error::{LseError, Result};
pub use kernels::{active_kernel, set_kernel, Kernel};
pub use ops::cross_entropy::{
    cross_entropy, cross_entropy_in_place, cross_entropy_target_grad, cross_entropy_with_grad,
    ChunkedCrossEntropy, CrossEntropyOptions, CrossEntropyOutput, EmptyMean, GradOutput, Reduction,
    Targets,
};
pub use ops::linear_cross_entropy::{
    linear_cross_entropy, linear_cross_entropy_with_grad, LinearCrossEntropyOptions,
    LinearGradients, LinearHead, DEFAULT_LINEAR_BUDGET_BYTES,
};
pub use ops::logsumexp::{logsumexp, logsumexp_with};
pub use ops::sharded;
pub use ops::softmax::{
    log_softmax, log_softmax_backward, log_softmax_with, softmax, softmax_backward, softmax_with,
};
pub use ops::NonFinite;
pub use state::{CompensatedSum, RowState};

pub use half::{bf16, f16};

/// The README's examples, compiled and run as doc tests.
#[cfg(doctest)]
#[doc = include_str!("../../../README.md")]
struct ReadmeDoctests;

/// The examples of `docs/library.md`, compiled and run as doc tests.
#[cfg(doctest)]
#[doc = include_str!("../../../docs/library.md")]
struct LibraryDocDoctests;
