//! [`CrossEntropyMetrics`]: what a loss call reports beside the loss, filled by the op's own
//! forward pass.

use std::sync::{Arc, OnceLock};

use candle_core::{Device, Result, Shape, Tensor};

use crate::common::op_error;

/// What [`cross_entropy_with_metrics`](crate::cross_entropy_with_metrics) and
/// [`linear_cross_entropy_with_metrics`](crate::linear_cross_entropy_with_metrics) report beside
/// the loss, from the same call: the logits are read once.
#[derive(Clone, Debug)]
pub struct CrossEntropyMetrics {
    /// The z-loss term's share of the loss (`z · lse²` of the counted rows, reduced as the loss
    /// is: summed for [`Reduction::None`](crate::Reduction::None)); 0 without z-loss.
    pub z_loss: f64,
    /// Each row's argmax as an `i64` tensor of the loss's row shape (the logits' shape without
    /// the class dimension): the first column holding the row's largest logit (as
    /// `Tensor::argmax` finds it; soft-capping leaves it unchanged), `-1` for ignored rows.
    pub argmax: Tensor,
    /// With class targets: the number of counted rows whose argmax is their target.
    pub correct_rows: Option<usize>,
    /// The rows that were not ignored.
    pub counted_rows: usize,
}

impl CrossEntropyMetrics {
    /// The token accuracy, `correct_rows / counted_rows` (`None` for probability targets or
    /// when no row was counted).
    pub fn accuracy(&self) -> Option<f64> {
        let correct = self.correct_rows?;
        (self.counted_rows > 0).then(|| correct as f64 / self.counted_rows as f64)
    }
}

/// The values an op's forward pass leaves for its caller.
#[derive(Debug)]
pub(crate) struct Found {
    z_loss: f64,
    argmax: Vec<i64>,
    correct_rows: Option<usize>,
    counted_rows: usize,
}

/// Where an op's forward pass puts them: shared by the op (which candle keeps in the graph) and
/// the function that built it.
pub(crate) type MetricsCell = Arc<OnceLock<Found>>;

/// Moves the metrics out of a core-library result into `cell` (when there is one).
pub(crate) fn record<S: Into<f64> + Copy>(
    cell: Option<&MetricsCell>,
    out: &mut lse::CrossEntropyOutput<S>,
) {
    if let Some(cell) = cell {
        // An op instance runs its forward once; a second `set` could only repeat it.
        let _ = cell.set(Found {
            z_loss: out.z_loss.into(),
            argmax: out.row_argmax.take().unwrap_or_default(),
            correct_rows: out.correct_rows,
            counted_rows: out.counted_rows,
        });
    }
}

/// The metrics of a finished forward pass, the argmax in `shape`.
pub(crate) fn collect(op: &str, cell: &MetricsCell, shape: Shape) -> Result<CrossEntropyMetrics> {
    let found = cell
        .get()
        .ok_or_else(|| op_error(op, "internal error: the forward pass left no metrics"))?;
    Ok(CrossEntropyMetrics {
        z_loss: found.z_loss,
        argmax: Tensor::from_slice(&found.argmax, shape, &Device::Cpu)?,
        correct_rows: found.correct_rows,
        counted_rows: found.counted_rows,
    })
}
