//! A running history of [`LogitStats`] with early-warning rules.

use std::collections::VecDeque;
use std::fmt;
use std::io::{self, Write};

use serde::{Deserialize, Serialize};

use super::state::{check_version, StateError, STATE_VERSION};
use super::LogitStats;
use crate::element::DType;
use crate::error::{LseError, Result};

/// When a [`LogitMonitor`] warns.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct MonitorConfig {
    /// The dtype whose naive-`exp` overflow point (`ln MAX`) warnings are measured against.
    /// Default `f16` (11.09), the tightest: a run safe there is safe everywhere.
    pub watch: DType,
    /// Warn when `max |x|` passes this fraction of the watched threshold. Default 0.75.
    pub warn_fraction: f64,
    /// Steps (this one included) over which the growth of `max |x|` is fitted by least squares;
    /// below 2 disables the trend rule. Default 8.
    pub trend_window: usize,
    /// Warn when the fitted trend reaches the threshold within this many steps. Default 50.
    pub trend_horizon: f64,
    /// History entries kept (oldest dropped first). Default 10 000.
    pub capacity: usize,
}

impl Default for MonitorConfig {
    fn default() -> Self {
        Self {
            watch: DType::F16,
            warn_fraction: 0.75,
            trend_window: 8,
            trend_horizon: 50.0,
            capacity: 10_000,
        }
    }
}

impl MonitorConfig {
    /// Checks every field.
    ///
    /// # Errors
    /// [`LseError::BadOption`] for a `warn_fraction` or `trend_horizon` that is not finite and
    /// positive, or a zero `capacity`.
    ///
    /// # Panics
    /// Never.
    pub fn validate(&self) -> Result<()> {
        let positive = |name, value: f64| {
            if value.is_finite() && value > 0.0 {
                Ok(())
            } else {
                Err(LseError::BadOption {
                    name,
                    value,
                    expected: "finite and > 0",
                })
            }
        };
        positive("warn_fraction", self.warn_fraction)?;
        positive("trend_horizon", self.trend_horizon)?;
        positive("capacity", self.capacity as f64)?;
        Ok(())
    }
}

/// A warning raised by [`LogitMonitor::record`].
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(tag = "kind", rename_all = "snake_case")]
pub enum MonitorWarning {
    /// The logits hold NaN or `+inf`.
    NonFinite {
        /// Step of the batch.
        step: u64,
        /// NaN count.
        nan: u64,
        /// `+inf` count.
        pos_inf: u64,
    },
    /// `max |x|` passed `warn_fraction` of the watched dtype's overflow threshold.
    NearOverflow {
        /// Step of the batch.
        step: u64,
        /// The batch's largest finite `|x|`.
        max_abs: f64,
        /// `ln MAX` of the watched dtype.
        threshold: f64,
        /// The watched dtype.
        dtype: DType,
    },
    /// `max |x|` is growing fast enough to pass the threshold within the horizon.
    Trend {
        /// Step of the batch.
        step: u64,
        /// The batch's largest finite `|x|`.
        max_abs: f64,
        /// Least-squares growth of `max |x|` per step over the window.
        growth_per_step: f64,
        /// Steps until the trend reaches the threshold.
        steps_to_overflow: f64,
        /// The watched dtype.
        dtype: DType,
    },
}

impl fmt::Display for MonitorWarning {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            MonitorWarning::NonFinite { step, nan, pos_inf } => write!(
                f,
                "step {step}: logits hold {nan} NaN and {pos_inf} +inf values"
            ),
            MonitorWarning::NearOverflow {
                step,
                max_abs,
                threshold,
                dtype,
            } => write!(
                f,
                "step {step}: max |logit| = {max_abs:.4} is {:.0}% of the {dtype} naive-exp \
                 overflow point {threshold:.2}",
                100.0 * max_abs / threshold
            ),
            MonitorWarning::Trend {
                step,
                max_abs,
                growth_per_step,
                steps_to_overflow,
                dtype,
            } => write!(
                f,
                "step {step}: max |logit| = {max_abs:.4} grows {growth_per_step:.4}/step and \
                 reaches the {dtype} naive-exp overflow point in ~{steps_to_overflow:.0} steps"
            ),
        }
    }
}

/// One recorded step.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct MonitorEntry {
    /// The training step.
    pub step: u64,
    /// The batch's statistics.
    pub stats: LogitStats,
    /// What the monitor warned about at this step.
    pub warnings: Vec<MonitorWarning>,
}

/// The saved state of a [`LogitMonitor`] (format version 1, see [`crate::guard`]'s state
/// section): its history, which the trend rule reads.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct MonitorState {
    /// The format version, [`STATE_VERSION`].
    pub version: u32,
    /// The recorded steps, oldest first ([`LogitMonitor::history`]).
    pub history: Vec<MonitorEntry>,
}

/// A running history of per-batch [`LogitStats`] that warns while a run drifts toward the point
/// where a naive softmax overflows, before any loss is `inf`.
///
/// ```
/// use lse::guard::{LogitMonitor, LogitStats, MonitorConfig};
/// let mut monitor = LogitMonitor::new(MonitorConfig::default())?;
/// let logits = [9.5f32, 0.0, -2.0];
/// let warnings = monitor.record(1, LogitStats::of(&logits, 3)?);
/// assert!(!warnings.is_empty()); // 9.5 is 86% of f16's 11.09
/// # Ok::<(), lse::LseError>(())
/// ```
#[derive(Clone, Debug)]
pub struct LogitMonitor {
    config: MonitorConfig,
    history: VecDeque<MonitorEntry>,
}

impl LogitMonitor {
    /// A monitor with `config`.
    ///
    /// # Errors
    /// [`LseError::BadOption`] for a `warn_fraction` or `trend_horizon` that is not finite and
    /// positive, or a zero `capacity`.
    ///
    /// # Panics
    /// Never.
    pub fn new(config: MonitorConfig) -> Result<Self> {
        config.validate()?;
        Ok(Self {
            config,
            history: VecDeque::new(),
        })
    }

    /// The configuration.
    pub fn config(&self) -> &MonitorConfig {
        &self.config
    }

    /// The state to checkpoint: with the configuration, [`LogitMonitor::from_state`] rebuilds a
    /// monitor that warns exactly as this one would.
    pub fn state(&self) -> MonitorState {
        MonitorState {
            version: STATE_VERSION,
            history: self.history.iter().cloned().collect(),
        }
    }

    /// A monitor with `config` that resumes from `state` (saved by [`LogitMonitor::state`]).
    /// When the history holds more than `config.capacity` entries, the newest are kept.
    ///
    /// # Errors
    /// [`StateError::UnsupportedVersion`] for a version other than [`STATE_VERSION`];
    /// [`StateError::MonitorConfig`] for an invalid `config` (the errors of
    /// [`LogitMonitor::new`]).
    ///
    /// # Panics
    /// Never.
    pub fn from_state(config: MonitorConfig, state: &MonitorState) -> Result<Self, StateError> {
        check_version(state.version)?;
        config.validate()?;
        let skip = state.history.len().saturating_sub(config.capacity);
        Ok(Self {
            history: state.history[skip..].iter().cloned().collect(),
            config,
        })
    }

    /// Records the statistics of step `step` and returns the warnings they raise.
    pub fn record(&mut self, step: u64, stats: LogitStats) -> &[MonitorWarning] {
        let warnings = self.warnings_for(step, &stats);
        if self.history.len() == self.config.capacity {
            self.history.pop_front();
        }
        self.history.push_back(MonitorEntry {
            step,
            stats,
            warnings,
        });
        self.history
            .back()
            .map_or(&[][..], |entry| entry.warnings.as_slice())
    }

    fn warnings_for(&self, step: u64, stats: &LogitStats) -> Vec<MonitorWarning> {
        let mut warnings = Vec::new();
        if stats.has_non_finite() {
            warnings.push(MonitorWarning::NonFinite {
                step,
                nan: stats.nan,
                pos_inf: stats.pos_inf,
            });
        }
        let dtype = self.config.watch;
        let threshold = dtype.exp_overflow_threshold();
        let max_abs = stats.max_abs;
        if max_abs > self.config.warn_fraction * threshold {
            warnings.push(MonitorWarning::NearOverflow {
                step,
                max_abs,
                threshold,
                dtype,
            });
        } else if let Some(growth) = self.growth_per_step(step, max_abs) {
            let steps_to_overflow = (threshold - max_abs) / growth;
            if growth > 0.0 && steps_to_overflow <= self.config.trend_horizon {
                warnings.push(MonitorWarning::Trend {
                    step,
                    max_abs,
                    growth_per_step: growth,
                    steps_to_overflow,
                    dtype,
                });
            }
        }
        warnings
    }

    /// Least-squares slope of `max |x|` against the step over the window ending at `(step, now)`.
    fn growth_per_step(&self, step: u64, now: f64) -> Option<f64> {
        let window = self.config.trend_window;
        if window < 2 || self.history.len() + 1 < window {
            return None;
        }
        let points: Vec<(f64, f64)> = self
            .history
            .iter()
            .skip(self.history.len() + 1 - window)
            .map(|e| (e.step as f64, e.stats.max_abs))
            .chain([(step as f64, now)])
            .collect();
        if points.iter().any(|&(_, y)| !y.is_finite()) {
            return None;
        }
        let n = points.len() as f64;
        let mean_x = points.iter().map(|p| p.0).sum::<f64>() / n;
        let mean_y = points.iter().map(|p| p.1).sum::<f64>() / n;
        let sxy: f64 = points.iter().map(|p| (p.0 - mean_x) * (p.1 - mean_y)).sum();
        let sxx: f64 = points.iter().map(|p| (p.0 - mean_x).powi(2)).sum();
        (sxx > 0.0).then(|| sxy / sxx)
    }

    /// The recorded steps, oldest first.
    pub fn history(&self) -> impl Iterator<Item = &MonitorEntry> {
        self.history.iter()
    }

    /// Writes the history as JSON lines, one step per line.
    ///
    /// # Errors
    /// Any I/O error of `out`.
    ///
    /// # Panics
    /// Never.
    pub fn write_json_lines(&self, mut out: impl Write) -> io::Result<()> {
        for entry in &self.history {
            serde_json::to_writer(&mut out, entry).map_err(io::Error::other)?;
            out.write_all(b"\n")?;
        }
        Ok(())
    }
}
