//! The owning options the burn operations carry across burn's dispatch boundary (which needs
//! `'static` arguments), and their view as `lse`'s borrowing options.

pub use lse::{EmptyMean, NonFinite, Reduction};

/// Options of [`cross_entropy`](crate::cross_entropy): those of
/// [`lse::CrossEntropyOptions`], owning their class weights.
///
/// With `q` the (smoothed) target distribution, `w` the class weights and `x` the
/// (soft-capped) logits, the loss of a non-ignored row is `Σ_c w_c q_c (lse(x) − x_c) +
/// z · lse(x)²`: burn's `CrossEntropyLoss` (and PyTorch's) when `z = 0` and there is no cap.
#[derive(Clone, Debug, PartialEq)]
pub struct CrossEntropyOptions {
    /// Rows whose target equals this value contribute 0 to the loss, nothing to the mean's
    /// denominator, and a zero gradient, whatever their logits hold. Default `Some(-100)`.
    pub ignore_index: Option<i64>,
    /// Per-class weights (`classes` finite values).
    pub weights: Option<Vec<f64>>,
    /// Label smoothing `ε` in `[0, 1]`.
    pub label_smoothing: f64,
    /// z-loss coefficient `z ≥ 0` (PaLM uses 1e-4): adds `z · lse²` per non-ignored row.
    pub z_loss: f64,
    /// Soft-capping: logits become `cap · tanh(x / cap)` first (`cap > 0`).
    pub softcap: Option<f64>,
    /// How the row losses are combined: [`Reduction::None`] gives one loss per row.
    pub reduction: Reduction,
    /// NaN and `+inf` logits (and target mass on `-inf` logits): an [`Error`](crate::Error)
    /// naming the row, column and value (default), or NaN in the affected rows only.
    pub non_finite: NonFinite,
    /// What a mean over zero non-ignored rows returns (default: loss 0, gradient 0).
    pub empty_mean: EmptyMean,
}

impl Default for CrossEntropyOptions {
    fn default() -> Self {
        let core = lse::CrossEntropyOptions::default();
        Self {
            ignore_index: core.ignore_index,
            weights: None,
            label_smoothing: core.label_smoothing,
            z_loss: core.z_loss,
            softcap: core.softcap,
            reduction: core.reduction,
            non_finite: core.non_finite,
            empty_mean: core.empty_mean,
        }
    }
}

impl CrossEntropyOptions {
    /// The same options as `lse`'s, borrowing the weights.
    pub fn as_lse(&self) -> lse::CrossEntropyOptions<'_> {
        lse::CrossEntropyOptions {
            ignore_index: self.ignore_index,
            weights: self.weights.as_deref(),
            label_smoothing: self.label_smoothing,
            z_loss: self.z_loss,
            softcap: self.softcap,
            reduction: self.reduction,
            non_finite: self.non_finite,
            empty_mean: self.empty_mean,
            ..lse::CrossEntropyOptions::default()
        }
    }
}

/// Options of [`linear_cross_entropy`](crate::linear_cross_entropy): the cross-entropy's and
/// the working memory.
#[derive(Clone, Debug, PartialEq)]
pub struct LinearCrossEntropyOptions {
    /// What [`cross_entropy`](crate::cross_entropy) would do with the logits `H·Wᵀ + b`.
    pub cross_entropy: CrossEntropyOptions,
    /// Bytes of working memory for a chunk's logits (see
    /// [`lse::LinearCrossEntropyOptions::budget_bytes`]); it bounds the peak extra memory, never
    /// the rows × classes logits. Default [`DEFAULT_BUDGET_BYTES`].
    pub budget_bytes: usize,
}

/// lse-burn's default working memory for the linear loss: 64 MiB, a quarter of `lse`'s. At
/// 8192 × 1024 × 32000 `f32` on burn-flex (2-core AMD EPYC) it keeps the peak extra memory of
/// forward + backward at 252 MiB (the gradients' 157 MiB included), 0.084 of burn's matmul +
/// `CrossEntropyLoss` (3001 MiB), for about 5 % more time than 256 MiB (398 MiB): see
/// docs/burn.md.
pub const DEFAULT_BUDGET_BYTES: usize = 64 << 20;

impl Default for LinearCrossEntropyOptions {
    fn default() -> Self {
        Self {
            cross_entropy: CrossEntropyOptions::default(),
            budget_bytes: DEFAULT_BUDGET_BYTES,
        }
    }
}
