//! `lse demo` (being written).

use crate::error::{CliError, Result};

/// Arguments of `lse demo`.
#[derive(Debug, clap::Args)]
pub struct Args {}

/// Runs `lse demo`, appending its report to `out`; returns the exit status.
pub fn run(_args: &Args, _out: &mut String) -> Result<u8> {
    Err(CliError::usage("lse demo is not available yet"))
}
