//! A running history of [`LogitStats`] with early-warning rules.

use std::collections::VecDeque;
use std::fmt;
use std::io::{self, Write};

use serde::{Deserialize, Serialize};

use super::state::{check_version, StateError, STATE_VERSION};
use super::stats::f64_or_nan;
use super::LogitStats;
use crate::element::DType;
use crate::error::{LseError, Result};

/// When a [`LogitMonitor`] warns.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(default)]
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
    /// While a condition holds, remind of it when at least this many steps have passed since it
    /// was last reported (a [`MonitorEvent::Reminder`]); 0 never reminds. Default 500.
    pub reminder_interval: u64,
    /// A condition clears once it has not held for this many steps (at least 1: 1 clears at
    /// the first step without it). Default 10, so that a value hovering around a threshold is
    /// not reported as starting and clearing over and over.
    pub clear_after: u64,
}

impl Default for MonitorConfig {
    fn default() -> Self {
        Self {
            watch: DType::F16,
            warn_fraction: 0.75,
            trend_window: 8,
            trend_horizon: 50.0,
            capacity: 10_000,
            reminder_interval: 500,
            clear_after: 10,
        }
    }
}

impl MonitorConfig {
    /// Checks every field.
    ///
    /// # Errors
    /// [`LseError::BadOption`] for a `warn_fraction` or `trend_horizon` that is not finite and
    /// positive, or a zero `capacity` or `clear_after`.
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
        positive("clear_after", self.clear_after as f64)?;
        Ok(())
    }
}

/// The condition a [`MonitorWarning`] reports.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum WarningKind {
    /// [`MonitorWarning::NonFinite`].
    NonFinite,
    /// [`MonitorWarning::NearOverflow`].
    NearOverflow,
    /// [`MonitorWarning::Trend`].
    Trend,
}

impl WarningKind {
    /// Every kind, in the order a step's events are reported.
    pub const ALL: [WarningKind; 3] = [
        WarningKind::NonFinite,
        WarningKind::NearOverflow,
        WarningKind::Trend,
    ];
}

impl fmt::Display for WarningKind {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            WarningKind::NonFinite => "non-finite logits",
            WarningKind::NearOverflow => "near overflow",
            WarningKind::Trend => "overflow trend",
        })
    }
}

/// A condition a [`LogitMonitor`] found at one step; the monitor reports it through
/// [`MonitorEvent`]s.
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

impl MonitorWarning {
    /// The condition.
    pub fn kind(&self) -> WarningKind {
        match self {
            MonitorWarning::NonFinite { .. } => WarningKind::NonFinite,
            MonitorWarning::NearOverflow { .. } => WarningKind::NearOverflow,
            MonitorWarning::Trend { .. } => WarningKind::Trend,
        }
    }

    /// The step of the batch.
    pub fn step(&self) -> u64 {
        match self {
            MonitorWarning::NonFinite { step, .. }
            | MonitorWarning::NearOverflow { step, .. }
            | MonitorWarning::Trend { step, .. } => *step,
        }
    }
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

/// What a [`LogitMonitor`] says at a step: conditions are reported when they change, not at
/// every step they hold. `Display` gives one line for a log (a start reads exactly as its
/// [`MonitorWarning`]).
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(tag = "event", rename_all = "snake_case")]
pub enum MonitorEvent {
    /// The condition of `warning` holds at this step and did not at the step before.
    Started {
        /// The condition, with this step's figures.
        warning: MonitorWarning,
    },
    /// The condition of `warning` still holds, and was last reported at least
    /// [`MonitorConfig::reminder_interval`] steps ago.
    Reminder {
        /// The condition, with this step's figures.
        warning: MonitorWarning,
        /// The step where it started.
        since: u64,
    },
    /// A condition that held has not held for [`MonitorConfig::clear_after`] steps.
    Cleared {
        /// The condition.
        kind: WarningKind,
        /// This step.
        step: u64,
        /// The step where it started.
        since: u64,
        /// The last step where it held.
        last_seen: u64,
        /// This batch's largest finite `|x|`.
        #[serde(deserialize_with = "f64_or_nan")]
        max_abs: f64,
    },
}

impl MonitorEvent {
    /// The step the event is reported at.
    pub fn step(&self) -> u64 {
        match self {
            MonitorEvent::Started { warning } | MonitorEvent::Reminder { warning, .. } => {
                warning.step()
            }
            MonitorEvent::Cleared { step, .. } => *step,
        }
    }

    /// The condition the event is about.
    pub fn kind(&self) -> WarningKind {
        match self {
            MonitorEvent::Started { warning } | MonitorEvent::Reminder { warning, .. } => {
                warning.kind()
            }
            MonitorEvent::Cleared { kind, .. } => *kind,
        }
    }

    /// The warning a start or a reminder carries; `None` for a clearing.
    pub fn warning(&self) -> Option<&MonitorWarning> {
        match self {
            MonitorEvent::Started { warning } | MonitorEvent::Reminder { warning, .. } => {
                Some(warning)
            }
            MonitorEvent::Cleared { .. } => None,
        }
    }
}

impl fmt::Display for MonitorEvent {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            MonitorEvent::Started { warning } => write!(f, "{warning}"),
            MonitorEvent::Reminder { warning, since } => {
                write!(f, "{warning} (still, since step {since})")
            }
            MonitorEvent::Cleared {
                kind,
                step,
                since,
                last_seen,
                max_abs,
            } => write!(
                f,
                "step {step}: cleared: {kind} (held from step {since} to step {last_seen}); max \
                 |logit| = {max_abs:.4}"
            ),
        }
    }
}

/// A condition that holds, as a [`LogitMonitor`] tracks it between steps.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct ActiveWarning {
    /// The condition.
    pub kind: WarningKind,
    /// The step where it started.
    pub since: u64,
    /// The step where it was last reported (its start or its last reminder).
    pub last_reported: u64,
    /// The last step where it held.
    pub last_seen: u64,
}

/// One recorded step.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct MonitorEntry {
    /// The training step.
    pub step: u64,
    /// The batch's statistics.
    pub stats: LogitStats,
    /// The conditions that hold at this step (reported or not).
    pub warnings: Vec<MonitorWarning>,
    /// What the monitor reported at this step ([`LogitMonitor::record`]'s answer).
    #[serde(default)]
    pub events: Vec<MonitorEvent>,
}

/// The saved state of a [`LogitMonitor`] (format version 1, see [`crate::guard`]'s state
/// section): its history, which the trend rule reads, and the conditions that hold.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct MonitorState {
    /// The format version, [`STATE_VERSION`].
    pub version: u32,
    /// The recorded steps, oldest first ([`LogitMonitor::history`]).
    pub history: Vec<MonitorEntry>,
    /// The conditions that hold after the last recorded step, at most one per kind.
    pub active: Vec<ActiveWarning>,
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
    active: Vec<ActiveWarning>,
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
            active: Vec::new(),
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
            active: self.active.clone(),
        }
    }

    /// A monitor with `config` that resumes from `state` (saved by [`LogitMonitor::state`]).
    /// When the history holds more than `config.capacity` entries, the newest are kept.
    ///
    /// # Errors
    /// [`StateError::UnsupportedVersion`] for a version other than [`STATE_VERSION`];
    /// [`StateError::MonitorConfig`] for an invalid `config` (the errors of
    /// [`LogitMonitor::new`]); [`StateError::DuplicateActiveWarning`] for a kind listed twice
    /// in `state.active`.
    ///
    /// # Panics
    /// Never.
    pub fn from_state(config: MonitorConfig, state: &MonitorState) -> Result<Self, StateError> {
        check_version(state.version)?;
        config.validate()?;
        for (i, a) in state.active.iter().enumerate() {
            if state.active[..i].iter().any(|b| b.kind == a.kind) {
                return Err(StateError::DuplicateActiveWarning { kind: a.kind });
            }
        }
        let skip = state.history.len().saturating_sub(config.capacity);
        Ok(Self {
            history: state.history[skip..].iter().cloned().collect(),
            active: state.active.clone(),
            config,
        })
    }

    /// Records the statistics of step `step` and returns what the monitor reports: a
    /// [`MonitorEvent::Started`] when a condition starts to hold, a [`MonitorEvent::Reminder`] at
    /// most every [`MonitorConfig::reminder_interval`] steps while it holds, a
    /// [`MonitorEvent::Cleared`] once it has not held for [`MonitorConfig::clear_after`] steps
    /// (a condition that comes back before that simply goes on); nothing at the steps in between.
    ///
    /// The trend rule is not evaluated while `max |x|` is past the warn fraction (the
    /// near-overflow warning says more): an active trend condition neither clears nor reminds
    /// then.
    pub fn record(&mut self, step: u64, stats: LogitStats) -> &[MonitorEvent] {
        let warnings = self.warnings_for(step, &stats);
        let events = self.transitions(step, stats.max_abs, &warnings);
        if self.history.len() == self.config.capacity {
            self.history.pop_front();
        }
        self.history.push_back(MonitorEntry {
            step,
            stats,
            warnings,
            events,
        });
        self.history
            .back()
            .map_or(&[][..], |entry| entry.events.as_slice())
    }

    /// Compares the conditions of this step with those that held before, updates them and
    /// returns the events.
    fn transitions(
        &mut self,
        step: u64,
        max_abs: f64,
        warnings: &[MonitorWarning],
    ) -> Vec<MonitorEvent> {
        let near_overflow = warnings
            .iter()
            .any(|w| w.kind() == WarningKind::NearOverflow);
        let interval = self.config.reminder_interval;
        let mut events = Vec::new();
        for kind in WarningKind::ALL {
            let now = warnings.iter().find(|w| w.kind() == kind);
            let held = self.active.iter().position(|a| a.kind == kind);
            match (held, now) {
                (None, Some(warning)) => {
                    self.active.push(ActiveWarning {
                        kind,
                        since: step,
                        last_reported: step,
                        last_seen: step,
                    });
                    events.push(MonitorEvent::Started {
                        warning: warning.clone(),
                    });
                }
                (Some(i), Some(warning)) => {
                    let active = &mut self.active[i];
                    active.last_seen = step;
                    if interval > 0 && step >= active.last_reported.saturating_add(interval) {
                        active.last_reported = step;
                        events.push(MonitorEvent::Reminder {
                            warning: warning.clone(),
                            since: active.since,
                        });
                    }
                }
                (Some(_), None) if kind == WarningKind::Trend && near_overflow => {}
                (Some(i), None) => {
                    let active = self.active[i];
                    if step >= active.last_seen.saturating_add(self.config.clear_after) {
                        self.active.remove(i);
                        events.push(MonitorEvent::Cleared {
                            kind,
                            step,
                            since: active.since,
                            last_seen: active.last_seen,
                            max_abs,
                        });
                    }
                }
                (None, None) => {}
            }
        }
        events
    }

    /// The conditions that hold after the last recorded step.
    pub fn active(&self) -> &[ActiveWarning] {
        &self.active
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
