//! Training guards: what keeps a run alive around the kernels.
//!
//! - [`LogitStats`] and [`LogitMonitor`]: per-batch logit statistics (gathered inside the fused
//!   cross-entropy with no second read, or stand-alone) and a running history that warns while a
//!   run drifts toward the point where a naive softmax would overflow.
//! - [`FiniteGuard`]: fail-fast finiteness checks on named tensors, on a schedule.
//! - [`triage`]: given the tensors of one step in forward/backward order, which one went
//!   non-finite first and why.
//! - [`LossScaler`]: a dynamic loss scaler for mixed precision (the semantics of
//!   `torch.amp.GradScaler`, plus bounds, hysteresis and a per-step report).

mod finite;
mod monitor;
mod scaler;
mod stats;
mod tensor;
mod triage;

pub use finite::*;
pub use monitor::*;
pub use scaler::*;
pub use stats::*;
pub use tensor::*;
pub use triage::*;
