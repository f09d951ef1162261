//! # lse-burn — overflow-proof cross-entropy and softmax for [burn], with backward
//!
//! burn's `CrossEntropyLoss` is composed of generic tensor ops: a mean only, padding tokens
//! given as a list, no z-loss or soft-capping, no fused gradient and no fused linear loss. This
//! crate adds `lse`'s kernels to burn as a backend extension ([`LseBackend`]), recorded for
//! burn's autodiff with their own backward passes:
//!
//! ```
//! use burn::backend::Autodiff;
//! use burn::tensor::{Device, Int, Tensor};
//! use lse_burn::{cross_entropy, CrossEntropyOptions};
//!
//! let device = Device::flex().autodiff();
//! let logits = Tensor::<2>::from_floats([[1000.0, 1.0, -1000.0], [2.0, 1.0, 0.1]], &device)
//!     .require_grad();
//! let targets = Tensor::<1, Int>::from_ints([0, 2], &device);
//! let opts = CrossEntropyOptions { label_smoothing: 0.1, ..Default::default() };
//! let loss = cross_entropy(logits.clone(), targets, &opts)?; // finite, where exp(1000) is not
//! let grads = loss.backward();
//! let grad = logits.grad(&grads).expect("logits are tracked");
//! # assert!(loss.into_scalar::<f32>().is_finite());
//! # assert!(grad.into_data().iter::<f32>().all(f32::is_finite));
//! # Ok::<(), lse_burn::Error>(())
//! ```
//!
//! - [`cross_entropy`]: every option of [`lse::CrossEntropyOptions`] (ignore index, class
//!   weights, label smoothing, z-loss, soft-capping, reductions none / sum / mean, the NaN
//!   policy), the loss in `f32` (`f64` for `f64` logits), the gradient computed in the forward
//!   pass when the logits are tracked and scaled in the backward pass.
//! - [`linear_cross_entropy`]: the loss of `hidden · weightᵀ + bias` with the gradients of all
//!   three, a chunk of rows at a time within a memory budget, never the rows × classes logits.
//! - [`softmax`], [`log_softmax`] and [`logsumexp`] over any dimension, with backward.
//!
//! ## Backends
//!
//! burn routes a tensor to one of its backends at run time. On the CPU backends (burn-flex,
//! burn-ndarray) the operations run `lse`'s kernels (AVX-512, AVX2, NEON, portable) on the
//! tensors' own memory: no copy when the tensor is contiguous, row-major. On burn's CubeCL
//! backend (wgpu, CUDA, ROCm) they run lse-gpu's kernels on burn's own buffers (the linear loss
//! in chunks of rows, with burn's matmul). Every other backend takes [`LseBackend`]'s default
//! methods, composed of its own tensor operations in the stable form. `f64` on CubeCL reads back
//! to the host. docs/burn.md has the table.
//!
//! ## Errors
//!
//! Shapes, options and targets are checked before anything runs; the targets (one integer per
//! row) are read to the host for that. Under [`NonFinite::Error`] the loss (or the row
//! logsumexp) is read back to see whether a row is NaN or infinite, and if one is, the call is
//! repeated on the host to name the row, column and value: [`Error::Input`] holds `lse`'s error.

// burn 0.22 deprecates burn-ndarray in favour of burn-flex; its users are still served.
#![allow(deprecated)]

mod api;
mod autodiff;
mod backends;
mod composed;
mod error;
mod host;
mod options;

pub use api::{cross_entropy, linear_cross_entropy, log_softmax, logsumexp, softmax};
pub use error::Error;
pub use options::{
    CrossEntropyOptions, EmptyMean, LinearCrossEntropyOptions, NonFinite, Reduction,
    DEFAULT_BUDGET_BYTES,
};

use burn::backend::backend_extension;
use burn::backend::tensor::{FloatTensor, IntTensor};

pub use backends::HostBacked;
pub use host::ReadBack;
#[doc(hidden)]
pub use host::{Floats, HostRead};

/// `lse`'s operations as a burn backend extension. The tensors are 2-D, `rows × classes`
/// (the public functions move the class dimension last and flatten the rest), and the inputs
/// are checked by the public functions; the methods run under
/// [`NonFinite::Propagate`].
///
/// The default methods work on any backend: on the CPU backends ([`HostBacked::KERNELS_ON_HOST`])
/// `lse`'s kernels run on the tensors' own memory; elsewhere the operations are composed of the
/// backend's own tensor operations in the stable form, on its device (the linear loss in chunks
/// of rows over the backend's own cross-entropy). burn's CubeCL backend overrides them with
/// lse-gpu's kernels. The autodiff backend records each forward method with its backward pass.
#[backend_extension(Autodiff, Flex, NdArray, Cube: cfg(any(feature = "wgpu", feature = "cuda")))]
pub trait LseBackend: HostBacked {
    /// `logsumexp` of each row: `rows` values, `f32` (`f64` for `f64` input).
    fn lse_logsumexp(x: FloatTensor<Self>) -> FloatTensor<Self> {
        if Self::KERNELS_ON_HOST {
            host::logsumexp::<Self, Self::Read>(x)
        } else {
            composed::logsumexp::<Self>(x)
        }
    }

    /// `softmax` (`log_softmax` when `log`) of each row, in the input's dtype.
    fn lse_softmax(x: FloatTensor<Self>, log: bool) -> FloatTensor<Self> {
        if Self::KERNELS_ON_HOST {
            host::softmax::<Self, Self::Read>(x, log)
        } else {
            composed::softmax::<Self>(x, log)
        }
    }

    /// The gradient of `softmax` (`log_softmax` when `log`) from its output `y` and the incoming
    /// gradient `dy`.
    fn lse_softmax_backward(
        y: FloatTensor<Self>,
        dy: FloatTensor<Self>,
        log: bool,
    ) -> FloatTensor<Self> {
        if Self::KERNELS_ON_HOST {
            host::softmax_backward::<Self, Self::Read>(y, dy, log)
        } else {
            composed::softmax_backward::<Self>(y, dy, log)
        }
    }

    /// The cross-entropy loss: one value, or one per row with [`Reduction::None`].
    fn lse_cross_entropy(
        logits: FloatTensor<Self>,
        targets: IntTensor<Self>,
        options: CrossEntropyOptions,
    ) -> FloatTensor<Self> {
        if Self::KERNELS_ON_HOST {
            host::cross_entropy::<Self, Self::Read>(logits, targets, &options, false).0
        } else {
            composed::cross_entropy::<Self>(logits, targets, &options, false).0
        }
    }

    /// The cross-entropy loss and `∂loss/∂logits` (for an incoming gradient of 1), from one
    /// read and one write of the logits.
    fn lse_cross_entropy_with_grad(
        logits: FloatTensor<Self>,
        targets: IntTensor<Self>,
        options: CrossEntropyOptions,
    ) -> (FloatTensor<Self>, FloatTensor<Self>) {
        let (loss, grad) = if Self::KERNELS_ON_HOST {
            host::cross_entropy::<Self, Self::Read>(logits, targets, &options, true)
        } else {
            composed::cross_entropy::<Self>(logits, targets, &options, true)
        };
        (loss, grad.expect("asked for"))
    }

    /// The linear cross-entropy loss of `hidden · weightᵀ + bias` (`bias` used when
    /// `has_bias`): one `f32` value, or one per row with [`Reduction::None`].
    fn lse_linear_cross_entropy(
        hidden: FloatTensor<Self>,
        weight: FloatTensor<Self>,
        bias: FloatTensor<Self>,
        has_bias: bool,
        targets: IntTensor<Self>,
        options: LinearCrossEntropyOptions,
    ) -> FloatTensor<Self> {
        if Self::KERNELS_ON_HOST {
            host::linear_cross_entropy::<Self, Self::Read>(
                hidden, weight, bias, has_bias, targets, &options, None,
            )
            .loss
        } else {
            composed::linear_cross_entropy::<Self>(
                hidden, weight, bias, has_bias, targets, &options, None,
            )
            .0
        }
    }

    /// The linear cross-entropy loss and its gradients `(loss, ∂/∂hidden, ∂/∂weight, ∂/∂bias)`
    /// for the incoming gradient `grad_output` (one `f32` value, or one per row with
    /// [`Reduction::None`]).
    fn lse_linear_cross_entropy_with_grad(
        hidden: FloatTensor<Self>,
        weight: FloatTensor<Self>,
        bias: FloatTensor<Self>,
        has_bias: bool,
        targets: IntTensor<Self>,
        options: LinearCrossEntropyOptions,
        grad_output: FloatTensor<Self>,
    ) -> (
        FloatTensor<Self>,
        FloatTensor<Self>,
        FloatTensor<Self>,
        FloatTensor<Self>,
    ) {
        let (loss, grads) = if Self::KERNELS_ON_HOST {
            let grad_output = host::values::<Self, f32>(grad_output);
            let out = host::linear_cross_entropy::<Self, Self::Read>(
                hidden,
                weight,
                bias,
                has_bias,
                targets,
                &options,
                Some(grad_output),
            );
            (out.loss, out.grads)
        } else {
            composed::linear_cross_entropy::<Self>(
                hidden,
                weight,
                bias,
                has_bias,
                targets,
                &options,
                Some(grad_output),
            )
        };
        let [dh, dw, db] = grads.expect("asked for");
        (loss, dh, dw, db)
    }
}
