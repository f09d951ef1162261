//! `lse bench`: time the library's ops on chosen shapes, dtypes and thread counts, and compare
//! their throughput with this machine's copy bandwidth, measured in the same run.
//!
//! Every case runs one untimed warm-up and `--repeats` timed calls inside a rayon pool of
//! `--threads` threads; inputs (logits, targets, `y`, `dy`) and outputs are built once per
//! (dtype, shape) outside the timed region. Throughput is reported as elements per second and as
//! GB/s under a bytes-moved model (the bytes each op must read and write per element, see
//! [`args::Op::bytes_per_element`]), and as a fraction of the copy bandwidth: the rate at which the
//! same threads copy a `--copy-mib` buffer of bytes into another, counting bytes read plus bytes
//! written.

use crate::error::{CliError, Result};

mod args;
mod inputs;
mod linear;
mod rows;
mod timing;

pub use args::Args;
use args::OpChoice;

/// Runs `lse bench`, appending the table (or the JSON document) to `out`; returns exit status 0.
///
/// # Errors
/// [`CliError::Usage`] for `--op linear_cross_entropy` beside other ops and for a case whose
/// buffers would not fit the machine's memory; [`CliError::Other`] when the thread pool cannot
/// be built; library errors are passed on.
pub fn run(args: &Args, out: &mut String) -> Result<u8> {
    let cores = std::thread::available_parallelism().map_or(1, usize::from);
    if !args.op.contains(&OpChoice::LinearCrossEntropy) {
        return rows::run(args, cores, out);
    }
    if args.op.len() > 1 {
        return Err(CliError::usage(
            "--op linear_cross_entropy runs alone (its shapes are NxDxV)",
        ));
    }
    linear::run(args, args.threads.unwrap_or(cores), out)
}
