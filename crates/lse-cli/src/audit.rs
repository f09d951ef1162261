//! `lse audit` (being written).

use crate::error::{CliError, Result};

/// Arguments of `lse audit`.
#[derive(Debug, clap::Args)]
pub struct Args {}

/// Runs `lse audit`, appending its report to `out`; returns the exit status.
pub fn run(_args: &Args, _out: &mut String) -> Result<u8> {
    Err(CliError::usage("lse audit is not available yet"))
}
