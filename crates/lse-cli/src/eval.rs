//! `lse eval`: apply one stable op of the library to a dumped tensor and write the result as
//! `.npy` — bit for bit what the library returns.

use crate::error::Result;

mod args;
mod linear;
mod rows;

pub use args::Args;
use args::Op;

/// Runs `lse eval`: reads the input, applies the op, writes the outputs and appends a summary to
/// `out`; returns the exit status 0.
///
/// # Errors
/// Unreadable or malformed files, targets or weights that do not fit the logits, bad arguments,
/// and the library's errors (NaN or +inf logits under `--non-finite error`, bad options).
/// Nothing is written when any error occurs before the outputs are complete.
pub fn run(args: &Args, out: &mut String) -> Result<u8> {
    args.check()?;
    if args.op == Op::LinearCrossEntropy {
        return linear::run(args, out);
    }
    if args.op != Op::CrossEntropy {
        return rows::run_per_row(args, out);
    }
    rows::run_cross_entropy(args, out)
}
