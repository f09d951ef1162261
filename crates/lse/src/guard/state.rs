//! Saved state of the stateful guards (the format is documented in [`crate::guard`]).

use super::ScalerConfigError;
use crate::error::LseError;

/// The format version this build writes and reads.
pub const STATE_VERSION: u32 = 1;

/// A saved state that cannot be restored.
#[derive(Clone, Debug, PartialEq, thiserror::Error)]
#[non_exhaustive]
pub enum StateError {
    /// The state was written in a format this build does not read.
    #[error("guard state has version {found}; this build reads version {supported}")]
    UnsupportedVersion {
        /// The state's `version`.
        found: u32,
        /// [`STATE_VERSION`].
        supported: u32,
    },
    /// A saved loss scale that is not finite and positive, or lies outside the configuration's
    /// `[min_scale, max_scale]`.
    #[error(
        "loss scaler state has scale = {scale}, outside [min_scale, max_scale] = [{min}, {max}] \
         of the configuration (a scale must also be finite, > 0 and have a finite inverse)"
    )]
    ScaleOutOfBounds {
        /// The saved scale.
        scale: f64,
        /// The configuration's floor.
        min: f64,
        /// The configuration's ceiling.
        max: f64,
    },
    /// The loss scaler configuration passed to `from_state` is invalid.
    #[error(transparent)]
    ScalerConfig(#[from] ScalerConfigError),
    /// The monitor configuration passed to `from_state` is invalid.
    #[error(transparent)]
    MonitorConfig(#[from] LseError),
}

/// Checks a saved state's version.
pub(super) fn check_version(found: u32) -> Result<(), StateError> {
    if found == STATE_VERSION {
        Ok(())
    } else {
        Err(StateError::UnsupportedVersion {
            found,
            supported: STATE_VERSION,
        })
    }
}
