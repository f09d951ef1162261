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
//!
//! # Saving and restoring state
//!
//! [`LossScaler::state`](LossScaler::state) and
//! [`LogitMonitor::state`](LogitMonitor::state) return plain values ([`ScalerState`],
//! [`MonitorState`]) that serialize with serde to any format; `from_state` rebuilds the guard from
//! its configuration and such a value, so that a resumed run goes on exactly as if it had not
//! stopped: same scales, same skipped steps, same warnings. The configuration is not part of the
//! state (as with PyTorch's `GradScaler.state_dict`, which holds the scale and growth tracker):
//! the run that resumes passes its own, normally the same.
//!
//! ## Format (version 1)
//! Every state holds a `version` field, [`STATE_VERSION`] when written by this build;
//! `from_state` rejects any other version with [`StateError::UnsupportedVersion`]. As JSON:
//!
//! ```json
//! {"version": 1, "scale": 32768.0, "step": 4000, "clean_steps": 17, "overflow_streak": 0}
//! ```
//!
//! is a [`ScalerState`] (field meanings on the type), and a [`MonitorState`] is
//!
//! ```json
//! {"version": 1, "history": [{"step": 0, "stats": {…}, "warnings": […]}, …]}
//! ```
//!
//! with `history` the monitor's entries oldest first, each as one line of
//! [`LogitMonitor::write_json_lines`](LogitMonitor::write_json_lines). Numbers are `f64`;
//! a format that writes them in full (serde_json writes the shortest decimal that reads back to
//! the same `f64`) restores them bit for bit. serde_json writes a non-finite `f64` as `null`: in
//! [`LogitStats`] `null` reads back as NaN (its figures are NaN when nothing
//! finite was seen).
//!
//! ```
//! use lse::guard::{LossScaler, LossScalerConfig, ScalerState};
//! let mut scaler = LossScaler::default();
//! scaler.update(None); // one clean step
//! let saved = serde_json::to_string(&scaler.state())?; // into the checkpoint
//! // … the run stops, a new process starts …
//! let state: ScalerState = serde_json::from_str(&saved)?;
//! let resumed = LossScaler::from_state(LossScalerConfig::default(), &state)?;
//! assert_eq!(resumed, scaler);
//! # Ok::<(), Box<dyn std::error::Error>>(())
//! ```

mod finite;
mod monitor;
mod scaler;
mod state;
mod stats;
mod tensor;
mod triage;

pub use finite::*;
pub use monitor::*;
pub use scaler::*;
pub use state::*;
pub use stats::*;
pub use tensor::*;
pub use triage::*;
