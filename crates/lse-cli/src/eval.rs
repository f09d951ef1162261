//! `lse eval` (being written).

use crate::error::{CliError, Result};

/// Arguments of `lse eval`.
#[derive(Debug, clap::Args)]
pub struct Args {}

/// Runs `lse eval`, appending its report to `out`; returns the exit status.
pub fn run(_args: &Args, _out: &mut String) -> Result<u8> {
    Err(CliError::usage("lse eval is not available yet"))
}
