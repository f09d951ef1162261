//! # lse-candle — overflow-proof cross-entropy and softmax for [candle](candle_core), with backward
//!
//! `candle_nn::loss::cross_entropy` is `log_softmax` followed by a gather: it materialises the
//! log-probabilities, sums the batch's losses in the logits' dtype (an `f16` batch whose losses
//! add up past 65504 reports `inf`), and has no ignore index, class weights, label smoothing or
//! z-loss; candle's fused `softmax_last_dim` has no backward pass. This crate wraps the fused
//! kernels of [`lse`] as candle ops recorded for backpropagation:
//!
//! ```
//! use candle_core::{Device, Tensor, Var};
//! use lse_candle::{cross_entropy, CrossEntropyOptions};
//!
//! let logits = Var::new(&[[1000.0f32, 1.0, -1000.0], [2.0, 1.0, 0.1]], &Device::Cpu)?;
//! let targets = Tensor::new(&[0i64, 2], &Device::Cpu)?;
//! let opts = CrossEntropyOptions { label_smoothing: 0.1, ..Default::default() };
//! let loss = cross_entropy(&logits, &targets, &opts)?; // f32 scalar, finite
//! let grads = loss.backward()?; // ∂loss/∂logits from the same fused pass
//! # let g = grads.get(&logits).expect("logits are a variable");
//! # assert!(loss.to_scalar::<f32>()?.is_finite());
//! # assert!(g.flatten_all()?.to_vec1::<f32>()?.iter().all(|v| v.is_finite()));
//! # Ok::<(), candle_core::Error>(())
//! ```
//!
//! - [`cross_entropy`] with every option of [`lse::CrossEntropyOptions`] (ignore index, class
//!   weights, label smoothing, z-loss, soft-capping, reductions none / sum / mean, probability
//!   targets, the NaN policy) through the owning [`CrossEntropyOptions`], plus a class dimension
//!   anywhere in a tensor of any rank.
//! - [`linear_cross_entropy`]: the loss of `hidden · weightᵀ + bias` with backward for all
//!   three, a chunk of rows at a time, never holding the `rows × classes` logits.
//! - [`softmax`], [`log_softmax`] and [`logsumexp`] over any dimension, with backward.
//!
//! Logits may be `f32`, `f64`, `f16` or `bf16`; everything is computed in `f64` and rounded once.
//! Losses and logsumexp come back in `f32` (`f64` for `f64` input), gradients, softmax and
//! log-softmax in the input's dtype.
//!
//! ## Memory
//!
//! By default [`cross_entropy`] computes the gradient in its forward pass (one read of the
//! logits, one write of the gradient) and keeps it inside the recorded op, so `backward` costs
//! nothing but handing it over. The price is one logits-sized buffer that lives from the forward
//! pass until the loss tensor (and everything computed from it) is dropped: drop the loss right
//! after `backward` and it is freed. During `backward` candle adds the returned gradient into
//! a fresh zero tensor of its own (its gradient store always does), so the peak is the logits,
//! the cached gradient and candle's accumulated copy; an incoming gradient other than 1 (a
//! scaled loss, per-row weights for [`Reduction::None`]) costs one more logits-sized buffer for
//! the scaled rows. candle's composed `log_softmax` + `nll` keeps a
//! logits-sized tensor alive as well (the log-probabilities, plus the exponentials) and writes
//! several more in its backward pass. With [`CrossEntropyOptions::cache_gradient`] `= false` the
//! forward pass only reads the logits and the backward pass runs the fused kernel again with
//! the exact incoming gradient: nothing is kept between the passes, at the price of reading the
//! logits twice. The forward pass skips the gradient when the logits are not
//! tracked (inference, `detach`), whatever the option says.
//!
//! ## Devices
//!
//! The kernels run on the CPU. A tensor on CUDA or Metal is an error that names the op and the
//! device (no silent copy to the host and back); move the tensors with
//! `.to_device(&Device::Cpu)` first.
//!
//! ## Errors
//!
//! Errors of the core library (a target out of range, a NaN logit under the default
//! [`NonFinite::Error`] policy, bad weights…) come back as [`candle_core::Error::Msg`] with the
//! text `lse-candle <op>: ` followed by the [`lse::LseError`] message unchanged, which names the
//! row, column and value.

mod common;
mod cross_entropy;
mod linear_cross_entropy;
mod metrics;
mod options;
mod softmax;

pub use cross_entropy::{cross_entropy, cross_entropy_with_metrics};
pub use linear_cross_entropy::{linear_cross_entropy, linear_cross_entropy_with_metrics};
pub use lse::{EmptyMean, NonFinite, Reduction};
pub use metrics::CrossEntropyMetrics;
pub use options::CrossEntropyOptions;
pub use softmax::{
    log_softmax, log_softmax_with, logsumexp, logsumexp_with, softmax, softmax_with,
};
