//! [`CrossEntropyOptions`]: the candle-flavoured, owning twin of [`lse::CrossEntropyOptions`].

use candle_core::{DType, Result, Tensor};
use lse::{EmptyMean, NonFinite, Reduction};

use crate::common::op_error;

/// Options of [`cross_entropy`](crate::cross_entropy): every option of
/// [`lse::CrossEntropyOptions`], owned (the class weights are a `Vec`), plus where the classes
/// are ([`class_dim`](Self::class_dim)) and how the backward pass gets its gradient
/// ([`cache_gradient`](Self::cache_gradient)).
///
/// Build it with struct-update syntax:
///
/// ```
/// use lse_candle::{CrossEntropyOptions, Reduction};
/// let opts = CrossEntropyOptions {
///     label_smoothing: 0.1,
///     z_loss: 1e-4,
///     reduction: Reduction::Sum,
///     ..Default::default()
/// };
/// assert_eq!(opts.to_lse().label_smoothing, 0.1);
/// ```
///
/// With `q` the target distribution (one-hot or the given probabilities), smoothed as
/// `q_c ← (1 − ε)·q_c + ε/K` over the `K` classes whose logit is not `-inf`, `w` the class
/// weights and `x` the (soft-capped) logits, the loss of a non-ignored row is
/// `Σ_c w_c q_c (lse(x) − x_c) + z · lse(x)²`: PyTorch's `CrossEntropyLoss` when `z = 0`.
#[derive(Clone, Debug, PartialEq)]
pub struct CrossEntropyOptions {
    /// The dimension of the logits that holds the classes; negative values count from the end
    /// (`-1`, the default, is the last dimension; `1` is PyTorch's `N × C × d1 × …` layout).
    pub class_dim: isize,
    /// Class-index targets equal to this value are ignored: loss 0, left out of the mean's
    /// denominator, gradient 0 whatever their logits hold (NaN too). Default `Some(-100)`.
    /// Compared after widening the target to `i64`, so `u32` targets can use e.g.
    /// `Some(u32::MAX as i64)`.
    pub ignore_index: Option<i64>,
    /// Per-class weights (`classes` values, finite and ≥ 0). See also
    /// [`with_weight_tensor`](Self::with_weight_tensor).
    pub weights: Option<Vec<f64>>,
    /// Label smoothing `ε` in `[0, 1]`.
    pub label_smoothing: f64,
    /// z-loss coefficient `z ≥ 0` (PaLM uses 1e-4): adds `z · lse²` per non-ignored row.
    pub z_loss: f64,
    /// Soft-capping: logits become `cap · tanh(x / cap)` first (`cap > 0`), after
    /// `logit_scale`.
    pub softcap: Option<f64>,
    /// Every logit is multiplied by this first, inside the kernel (a temperature `T` is
    /// `1/T`): the loss of `logit_scale · x`, the gradient with respect to `x`. Finite and
    /// `> 0`; default 1.
    pub logit_scale: f64,
    /// How the row losses are combined. With [`Reduction::None`] the loss has the logits' shape
    /// without the class dimension.
    pub reduction: Reduction,
    /// What NaN and `+inf` logits (and target mass on `-inf` logits) do: an error (default) or
    /// NaN in the affected rows only.
    pub non_finite: NonFinite,
    /// What a mean over zero non-ignored rows returns (default: loss 0, gradient 0).
    pub empty_mean: EmptyMean,
    /// `true` (default): the forward pass computes the gradient in the same pass and keeps it
    /// until the loss tensor is dropped; the backward pass only scales it. `false`: the forward
    /// pass computes the loss only and the backward pass runs the fused kernel again. See the
    /// crate docs for the memory trade-off.
    pub cache_gradient: bool,
}

impl Default for CrossEntropyOptions {
    fn default() -> Self {
        let core = lse::CrossEntropyOptions::default();
        Self {
            class_dim: -1,
            ignore_index: core.ignore_index,
            weights: None,
            label_smoothing: core.label_smoothing,
            z_loss: core.z_loss,
            softcap: core.softcap,
            logit_scale: core.logit_scale,
            reduction: core.reduction,
            non_finite: core.non_finite,
            empty_mean: core.empty_mean,
            cache_gradient: true,
        }
    }
}

impl CrossEntropyOptions {
    /// The same options as [`lse::CrossEntropyOptions`], borrowing the weights.
    ///
    /// `class_dim` and `cache_gradient` have no counterpart there; the extra outputs of the core
    /// library (`keep_row_loss`, `keep_row_lse`, `keep_logit_stats`) are off.
    ///
    /// # Panics
    /// Never.
    pub fn to_lse(&self) -> lse::CrossEntropyOptions<'_> {
        lse::CrossEntropyOptions {
            ignore_index: self.ignore_index,
            weights: self.weights.as_deref(),
            label_smoothing: self.label_smoothing,
            z_loss: self.z_loss,
            softcap: self.softcap,
            logit_scale: self.logit_scale,
            reduction: self.reduction,
            non_finite: self.non_finite,
            empty_mean: self.empty_mean,
            ..lse::CrossEntropyOptions::default()
        }
    }

    /// These options with the class weights taken from a 1-D float tensor (any float dtype,
    /// any device: the values are copied to the host as `f64`).
    ///
    /// The values themselves are checked by the loss call (finite, ≥ 0, one per class).
    ///
    /// # Errors
    /// When `weights` is not 1-D or not a float tensor, or cannot be read back.
    ///
    /// # Panics
    /// Never.
    pub fn with_weight_tensor(mut self, weights: &Tensor) -> Result<Self> {
        if weights.rank() != 1 || !weights.dtype().is_float() {
            return Err(op_error(
                "cross_entropy",
                format!(
                    "class weights must be a 1-D float tensor, got shape {:?} and dtype {}",
                    weights.dims(),
                    weights.dtype().as_str()
                ),
            ));
        }
        self.weights = Some(weights.to_dtype(DType::F64)?.to_vec1::<f64>()?);
        Ok(self)
    }

    /// The class dimension of a `rank`-dimensional logits tensor, as an index.
    pub(crate) fn resolve_class_dim(&self, rank: usize) -> Result<usize> {
        let r = rank as isize;
        let d = if self.class_dim < 0 {
            self.class_dim + r
        } else {
            self.class_dim
        };
        if (0..r).contains(&d) {
            Ok(d as usize)
        } else {
            Err(op_error(
                "cross_entropy",
                format!(
                    "class_dim {} is out of range for logits of rank {rank}",
                    self.class_dim
                ),
            ))
        }
    }
}
