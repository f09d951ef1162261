//! A dynamic loss scaler for mixed-precision training.

use core::fmt;

use serde::{Deserialize, Serialize};

use crate::element::Element;
use crate::guard::state::{check_version, StateError, STATE_VERSION};
use crate::guard::tensor::{check_shape, NonFiniteValue, Role, TensorShapeError};

/// The settings of a [`LossScaler`]. `Default` gives PyTorch's values plus the bounds of
/// Apex/Megatron (see each field).
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(default)]
pub struct LossScalerConfig {
    /// The first scale (default `65536 = 2^16`, as PyTorch).
    pub init_scale: f64,
    /// The factor applied after `growth_interval` consecutive clean steps (default 2); must be
    /// finite and `> 1`.
    pub growth_factor: f64,
    /// The factor applied on backing off (default 0.5); must be in `(0, 1)`.
    pub backoff_factor: f64,
    /// Consecutive clean steps before the scale grows (default 2000); at least 1.
    pub growth_interval: u32,
    /// Consecutive overflowing steps before the scale backs off (default 1: every overflow, as
    /// PyTorch); at least 1. Once backing off, every further consecutive overflow backs off again;
    /// a clean step resets the count.
    pub hysteresis: u32,
    /// The smallest scale (default 1, as Megatron-LM and DeepSpeed: PyTorch has no floor, and a
    /// gradient that is NaN at every step drives its scale to 0).
    pub min_scale: f64,
    /// The largest scale (default `2^24`, Apex's `max_loss_scale`; PyTorch has no ceiling).
    pub max_scale: f64,
}

impl Default for LossScalerConfig {
    fn default() -> Self {
        LossScalerConfig {
            init_scale: 65536.0,
            growth_factor: 2.0,
            backoff_factor: 0.5,
            growth_interval: 2000,
            hysteresis: 1,
            min_scale: 1.0,
            max_scale: 16_777_216.0,
        }
    }
}

/// An invalid [`LossScalerConfig`].
#[derive(Clone, Debug, PartialEq, thiserror::Error)]
#[non_exhaustive]
pub enum ScalerConfigError {
    /// A scale (`init_scale`, `min_scale` or `max_scale`) that is not finite and positive, or
    /// whose inverse `1/scale` is not finite.
    #[error("loss scaler {field} = {value} is invalid: a scale must be finite, > 0 and have a finite inverse")]
    BadScale {
        /// The field's name.
        field: &'static str,
        /// The value given.
        value: f64,
    },
    /// A growth factor that is not finite and `> 1`.
    #[error("loss scaler growth_factor = {value} is invalid: it must be finite and > 1")]
    BadGrowthFactor {
        /// The value given.
        value: f64,
    },
    /// A backoff factor outside `(0, 1)`.
    #[error("loss scaler backoff_factor = {value} is invalid: it must be in (0, 1)")]
    BadBackoffFactor {
        /// The value given.
        value: f64,
    },
    /// `growth_interval = 0`.
    #[error("loss scaler growth_interval = 0 is invalid: it must be at least 1")]
    ZeroGrowthInterval,
    /// `hysteresis = 0`.
    #[error("loss scaler hysteresis = 0 is invalid: it must be at least 1")]
    ZeroHysteresis,
    /// `min_scale > max_scale`.
    #[error("loss scaler min_scale = {min} is above max_scale = {max}")]
    MinAboveMax {
        /// The floor given.
        min: f64,
        /// The ceiling given.
        max: f64,
    },
    /// `init_scale` outside `[min_scale, max_scale]`.
    #[error("loss scaler init_scale = {init} is outside [min_scale, max_scale] = [{min}, {max}]")]
    InitialOutOfBounds {
        /// The first scale given.
        init: f64,
        /// The floor.
        min: f64,
        /// The ceiling.
        max: f64,
    },
}

impl LossScalerConfig {
    /// Checks every field.
    ///
    /// # Errors
    /// The first problem found, as a [`ScalerConfigError`] that names the field and its value:
    /// a scale that is non-finite, `≤ 0` or has no finite inverse; `growth_factor ≤ 1` or
    /// non-finite; `backoff_factor` outside `(0, 1)`; `growth_interval = 0`; `hysteresis = 0`;
    /// `min_scale > max_scale`; `init_scale` outside the bounds.
    ///
    /// # Panics
    /// Never.
    pub fn validate(&self) -> Result<(), ScalerConfigError> {
        for (field, value) in [
            ("init_scale", self.init_scale),
            ("min_scale", self.min_scale),
            ("max_scale", self.max_scale),
        ] {
            if !(value.is_finite() && value > 0.0 && value.recip().is_finite()) {
                return Err(ScalerConfigError::BadScale { field, value });
            }
        }
        if !(self.growth_factor.is_finite() && self.growth_factor > 1.0) {
            return Err(ScalerConfigError::BadGrowthFactor {
                value: self.growth_factor,
            });
        }
        if !(self.backoff_factor > 0.0 && self.backoff_factor < 1.0) {
            return Err(ScalerConfigError::BadBackoffFactor {
                value: self.backoff_factor,
            });
        }
        if self.growth_interval == 0 {
            return Err(ScalerConfigError::ZeroGrowthInterval);
        }
        if self.hysteresis == 0 {
            return Err(ScalerConfigError::ZeroHysteresis);
        }
        if self.min_scale > self.max_scale {
            return Err(ScalerConfigError::MinAboveMax {
                min: self.min_scale,
                max: self.max_scale,
            });
        }
        if !(self.min_scale..=self.max_scale).contains(&self.init_scale) {
            return Err(ScalerConfigError::InitialOutOfBounds {
                init: self.init_scale,
                min: self.min_scale,
                max: self.max_scale,
            });
        }
        Ok(())
    }
}

/// How the scale moved at the end of a step.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum ScaleChange {
    /// The next step uses the same scale.
    Unchanged,
    /// The scale grew (after `growth_interval` clean steps).
    Grew,
    /// The scale backed off (after an overflow, `hysteresis` in a row).
    BackedOff,
}

/// A bound of the scale.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum ScaleBound {
    /// `min_scale`.
    Min,
    /// `max_scale`.
    Max,
}

/// What one [`LossScaler`] step did. `Display` gives one line for a log; `Serialize` gives the
/// same fields as JSON (a non-finite overflow value as `"NaN"`, `"inf"` or `"-inf"`).
#[derive(Clone, Debug, PartialEq, Serialize)]
pub struct StepReport {
    /// The index of the step (0 for the first [`LossScaler::update`]).
    pub step: u64,
    /// The scale the loss of this step was multiplied by.
    pub scale: f64,
    /// Whether the optimizer step must be skipped (some gradient was non-finite).
    pub skipped: bool,
    /// The scale of the next step.
    pub next_scale: f64,
    /// How the scale moved.
    pub change: ScaleChange,
    /// The bound that stopped a growth or a backoff short (the scale is now at it), if any.
    pub clamped: Option<ScaleBound>,
    /// The first non-finite gradient entry (in the order the gradients were unscaled), with its
    /// unscaled value; `None` on a clean step.
    pub overflow: Option<NonFiniteValue>,
    /// Consecutive overflowing steps, this one included (0 after a clean step).
    pub overflow_streak: u32,
    /// Consecutive clean steps since the last overflow or growth, after this step.
    pub clean_steps: u32,
}

impl fmt::Display for StepReport {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "step {}: scale {}, ", self.step, self.scale)?;
        match &self.overflow {
            Some(o) => write!(
                f,
                "step skipped: gradient `{}` ({}) is non-finite, {} at row {}, column {}",
                o.tensor, o.dtype, o.value, o.row, o.column
            )?,
            None => f.write_str("gradients finite")?,
        }
        write!(f, "; next scale {}", self.next_scale)?;
        let bound = match self.clamped {
            Some(ScaleBound::Min) => ", held at min_scale",
            Some(ScaleBound::Max) => ", held at max_scale",
            None => "",
        };
        match self.change {
            ScaleChange::Grew => write!(f, " (grew{bound})"),
            ScaleChange::BackedOff => write!(f, " (backed off{bound})"),
            ScaleChange::Unchanged if self.clamped.is_some() => write!(f, " (unchanged{bound})"),
            ScaleChange::Unchanged if self.skipped => write!(
                f,
                " (unchanged: overflow {} in a row, hysteresis not yet reached)",
                self.overflow_streak
            ),
            ScaleChange::Unchanged => Ok(()),
        }
    }
}

/// The saved state of a [`LossScaler`] (format version 1, see [`crate::guard`]'s state section):
/// everything that, with the configuration, decides its next steps.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct ScalerState {
    /// The format version, [`STATE_VERSION`].
    pub version: u32,
    /// The scale of the next step.
    pub scale: f64,
    /// The index of the next step ([`LossScaler::step_index`]).
    pub step: u64,
    /// Consecutive clean steps since the last overflow or growth ([`LossScaler::clean_steps`]).
    pub clean_steps: u32,
    /// Consecutive overflowing steps up to now ([`LossScaler::overflow_streak`]).
    pub overflow_streak: u32,
}

/// A dynamic loss scaler for mixed-precision training.
///
/// Small gradients underflow to zero in `f16`; multiplying the loss by a large scale `S` before
/// the backward pass lifts every gradient by `S`, and dividing by `S` before the optimizer step
/// undoes it. Too large a scale overflows the scaled gradients to `inf`: the scaler then skips
/// that optimizer step and lowers the scale. It has the semantics of PyTorch's
/// `torch.amp.GradScaler`:
///
/// - the scale starts at `init_scale` (2^16);
/// - a step whose gradients contain NaN or `±inf` after unscaling is *skipped*, the scale is
///   multiplied by `backoff_factor` (0.5) and the count of clean steps restarts from 0;
/// - after `growth_interval` (2000) consecutive clean steps the scale is multiplied by
///   `growth_factor` (2) and the count restarts.
///
/// On top of that: the scale is clamped to `[min_scale, max_scale]`; with `hysteresis = H > 1` the
/// scale backs off only once `H` consecutive steps have overflowed (every overflowing step is
/// still skipped); and every step returns a [`StepReport`] that says what happened and why.
///
/// Gradients are unscaled and checked in one pass per tensor by an [`Unscaler`]; its docs say
/// what the gradients of a skipped step hold.
///
/// ```
/// use lse::guard::LossScaler;
/// use lse::f16;
///
/// let mut scaler = LossScaler::default();
/// # let loss = 0.5;
/// let scaled_loss = scaler.scale_loss(loss); // backpropagate this one
/// # let mut grad_w = vec![f16::from_f32(3.0); 6];
/// # let mut grad_b = vec![f16::from_f32(1.0); 3];
/// let mut unscale = scaler.unscaler();
/// unscale.apply("w", &mut grad_w, 3)?; // unscales and checks in one pass
/// unscale.apply("b", &mut grad_b, 3)?;
/// let report = unscale.finish();
/// if !report.skipped {
///     // optimizer.step(&grads)
/// }
/// # Ok::<(), lse::guard::TensorShapeError>(())
/// ```
#[derive(Clone, Debug, PartialEq)]
pub struct LossScaler {
    config: LossScalerConfig,
    scale: f64,
    step: u64,
    clean_steps: u32,
    overflow_streak: u32,
}

impl Default for LossScaler {
    /// A scaler with [`LossScalerConfig::default`].
    fn default() -> Self {
        let config = LossScalerConfig::default();
        LossScaler {
            scale: config.init_scale,
            config,
            step: 0,
            clean_steps: 0,
            overflow_streak: 0,
        }
    }
}

impl LossScaler {
    /// A scaler with `config`, starting at `config.init_scale`.
    ///
    /// # Errors
    /// The [`ScalerConfigError`] of [`LossScalerConfig::validate`].
    ///
    /// # Panics
    /// Never.
    pub fn new(config: LossScalerConfig) -> Result<Self, ScalerConfigError> {
        config.validate()?;
        Ok(LossScaler {
            scale: config.init_scale,
            config,
            step: 0,
            clean_steps: 0,
            overflow_streak: 0,
        })
    }

    /// The configuration.
    pub fn config(&self) -> &LossScalerConfig {
        &self.config
    }

    /// The state to checkpoint: with the configuration, [`LossScaler::from_state`] rebuilds a
    /// scaler that goes on exactly as this one would (the role of PyTorch's
    /// `GradScaler.state_dict`).
    pub fn state(&self) -> ScalerState {
        ScalerState {
            version: STATE_VERSION,
            scale: self.scale,
            step: self.step,
            clean_steps: self.clean_steps,
            overflow_streak: self.overflow_streak,
        }
    }

    /// A scaler with `config` that resumes from `state` (saved by [`LossScaler::state`]): its
    /// next step uses `state.scale` and counts on from `state.step`, `state.clean_steps` and
    /// `state.overflow_streak`. With a `growth_interval` or `hysteresis` smaller than the saved
    /// counts, the next clean step grows (next overflow backs off) at once.
    ///
    /// # Errors
    /// [`StateError::UnsupportedVersion`] for a version other than [`STATE_VERSION`];
    /// [`StateError::ScalerConfig`] for an invalid `config` ([`LossScalerConfig::validate`]);
    /// [`StateError::ScaleOutOfBounds`] for a saved scale that is not finite and positive (with
    /// a finite inverse) or lies outside `[config.min_scale, config.max_scale]`.
    ///
    /// # Panics
    /// Never.
    pub fn from_state(config: LossScalerConfig, state: &ScalerState) -> Result<Self, StateError> {
        check_version(state.version)?;
        config.validate()?;
        let scale = state.scale;
        let usable = scale.is_finite() && scale > 0.0 && scale.recip().is_finite();
        if !(usable && (config.min_scale..=config.max_scale).contains(&scale)) {
            return Err(StateError::ScaleOutOfBounds {
                scale,
                min: config.min_scale,
                max: config.max_scale,
            });
        }
        Ok(LossScaler {
            config,
            scale,
            step: state.step,
            clean_steps: state.clean_steps,
            overflow_streak: state.overflow_streak,
        })
    }

    /// The current scale: multiply this step's loss by it.
    pub fn scale(&self) -> f64 {
        self.scale
    }

    /// `loss · scale`: the loss to backpropagate. (A product that overflows gives `inf` gradients,
    /// which the next [`LossScaler::update`] treats as an overflow, as it should.)
    pub fn scale_loss(&self, loss: f64) -> f64 {
        loss * self.scale
    }

    /// The index of the next step (the number of steps recorded so far).
    pub fn step_index(&self) -> u64 {
        self.step
    }

    /// Consecutive clean steps since the last overflow or growth.
    pub fn clean_steps(&self) -> u32 {
        self.clean_steps
    }

    /// Consecutive overflowing steps up to now (0 after a clean step).
    pub fn overflow_streak(&self) -> u32 {
        self.overflow_streak
    }

    /// Starts unscaling this step's gradients: pass each gradient to [`Unscaler::apply`], then
    /// call [`Unscaler::finish`] to update the scale and learn whether to skip the step.
    ///
    /// The unscaler borrows the scaler, so the scale cannot change while gradients are being
    /// unscaled. Dropping it without `finish` records nothing (the gradients already passed to
    /// `apply` stay unscaled).
    pub fn unscaler(&mut self) -> Unscaler<'_> {
        Unscaler {
            inv_scale: self.scale.recip(),
            scaler: self,
            first_overflow: None,
        }
    }

    /// Records one step whose gradients were checked elsewhere: `overflow` is the first
    /// non-finite gradient entry found, or `None` for a clean step. Updates the scale by the
    /// rules of [`LossScaler`] and returns the step's report.
    ///
    /// [`Unscaler::finish`] calls this; use it directly only when the gradients are unscaled and
    /// checked by other code.
    pub fn update(&mut self, overflow: Option<NonFiniteValue>) -> StepReport {
        let scale = self.scale;
        let cfg = &self.config;
        let (change, clamped) = if overflow.is_some() {
            self.clean_steps = 0;
            self.overflow_streak = self.overflow_streak.saturating_add(1);
            if self.overflow_streak >= cfg.hysteresis {
                let wanted = scale * cfg.backoff_factor;
                self.scale = wanted.max(cfg.min_scale);
                let change = if self.scale < scale {
                    ScaleChange::BackedOff
                } else {
                    ScaleChange::Unchanged
                };
                (change, (self.scale > wanted).then_some(ScaleBound::Min))
            } else {
                (ScaleChange::Unchanged, None)
            }
        } else {
            self.overflow_streak = 0;
            self.clean_steps += 1;
            if self.clean_steps >= cfg.growth_interval {
                self.clean_steps = 0;
                let wanted = scale * cfg.growth_factor;
                self.scale = wanted.min(cfg.max_scale);
                let change = if self.scale > scale {
                    ScaleChange::Grew
                } else {
                    ScaleChange::Unchanged
                };
                (change, (self.scale < wanted).then_some(ScaleBound::Max))
            } else {
                (ScaleChange::Unchanged, None)
            }
        };
        let report = StepReport {
            step: self.step,
            scale,
            skipped: overflow.is_some(),
            next_scale: self.scale,
            change,
            clamped,
            overflow,
            overflow_streak: self.overflow_streak,
            clean_steps: self.clean_steps,
        };
        self.step += 1;
        report
    }
}

/// Unscales one step's gradients and checks them for NaN and `±inf` in the same pass; made by
/// [`LossScaler::unscaler`], consumed by [`Unscaler::finish`].
///
/// # The gradients of a skipped step
/// Every slice passed to [`Unscaler::apply`] is unscaled in full, whether or not an overflow was
/// found before or inside it: the overflowing entries stay NaN or `±inf`, the others hold
/// `g / scale`. Nothing is restored to its scaled value. Slices not passed to `apply` are left
/// untouched (still scaled). Either way the gradients of a skipped step are not fit for an
/// optimizer step: zero them and go on with the next batch, as with PyTorch's `GradScaler`.
#[derive(Debug)]
#[must_use = "call finish() to update the scale and learn whether to skip the optimizer step"]
pub struct Unscaler<'s> {
    scaler: &'s mut LossScaler,
    inv_scale: f64,
    first_overflow: Option<NonFiniteValue>,
}

impl Unscaler<'_> {
    /// The scale of this step.
    pub fn scale(&self) -> f64 {
        self.scaler.scale
    }

    /// The inverse scale every element is multiplied by: `1 / scale`, computed in `f64`.
    pub fn inv_scale(&self) -> f64 {
        self.inv_scale
    }

    /// Whether a gradient passed to [`Unscaler::apply`] so far held a non-finite value.
    pub fn found_overflow(&self) -> bool {
        self.first_overflow.is_some()
    }

    /// The first non-finite entry found so far, if any.
    pub fn first_overflow(&self) -> Option<&NonFiniteValue> {
        self.first_overflow.as_ref()
    }

    /// Unscales the gradient `grad` (`rows × columns`, row-major; `columns = grad.len()` for a
    /// 1-D tensor) in place and checks it, in one pass: each element becomes
    /// `E::from_f64(g · (1/scale))` — the product in `f64`, rounded once into `E` — and an element
    /// whose result is NaN or `±inf` marks the step as overflowed. The first such entry over the
    /// whole step (in `apply` order) is kept, with the name `name`, its row and column and its
    /// unscaled value, for the [`StepReport`].
    ///
    /// # Errors
    /// [`TensorShapeError`] when `columns` is 0 or does not divide `grad.len()`; `grad` is then
    /// left as it was.
    ///
    /// # Panics
    /// Never.
    pub fn apply<E: Element>(
        &mut self,
        name: &str,
        grad: &mut [E],
        columns: usize,
    ) -> Result<(), TensorShapeError> {
        check_shape(name, grad.len(), columns)?;
        let inv = self.inv_scale;
        let mut first_bad: Option<(usize, f64)> = None;
        for (i, g) in grad.iter_mut().enumerate() {
            let unscaled = E::from_f64(g.to_f64() * inv);
            *g = unscaled;
            let value = unscaled.to_f64();
            if !value.is_finite() && first_bad.is_none() {
                first_bad = Some((i, value));
            }
        }
        if let (None, Some((index, value))) = (&self.first_overflow, first_bad) {
            self.first_overflow = Some(NonFiniteValue {
                tensor: name.to_owned(),
                role: Role::Gradient,
                dtype: E::DTYPE,
                index,
                row: index / columns,
                column: index % columns,
                value,
            });
        }
        Ok(())
    }

    /// Ends the step: updates the scale ([`LossScaler::update`]) and returns the report. Skip
    /// the optimizer step when [`StepReport::skipped`] is set.
    pub fn finish(self) -> StepReport {
        self.scaler.update(self.first_overflow)
    }
}
