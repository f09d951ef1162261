//! The one error type of the command line: every failure is a value, printed as one line on
//! stderr with exit status 2 (see `main`).

use core::fmt;
use std::io;

/// Everything a subcommand can fail with.
#[derive(Debug)]
pub enum CliError {
    /// The arguments are well-formed for clap but not usable (unparsable number, ragged rows…).
    Usage(String),
    /// The library rejected the input.
    Lse(lse::LseError),
    /// Writing the output failed.
    Io(io::Error),
    /// A file could not be read, parsed or written.
    File {
        /// The file.
        path: std::path::PathBuf,
        /// What is wrong with it.
        message: String,
    },
    /// A tensor file (`.npy`, `.safetensors`) that is malformed or holds something the command
    /// cannot use.
    Format {
        /// The file.
        path: std::path::PathBuf,
        /// What is wrong with it.
        error: lse_io::FormatError,
    },
    /// Anything else a command reports as failed (a plot that cannot be drawn, …).
    Other(String),
}

/// The result of a subcommand.
pub type Result<T, E = CliError> = core::result::Result<T, E>;

impl CliError {
    /// A usage error with the given message.
    pub fn usage(message: impl Into<String>) -> Self {
        CliError::Usage(message.into())
    }
}

impl fmt::Display for CliError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            CliError::Usage(message) => f.write_str(message),
            CliError::Lse(e) => write!(f, "{e}"),
            CliError::Io(e) => write!(f, "cannot write the output: {e}"),
            CliError::File { path, message } => write!(f, "{}: {message}", path.display()),
            CliError::Format { path, error } => write!(f, "{}: {error}", path.display()),
            CliError::Other(message) => f.write_str(message),
        }
    }
}

impl std::error::Error for CliError {}

impl From<lse::LseError> for CliError {
    fn from(e: lse::LseError) -> Self {
        CliError::Lse(e)
    }
}

impl From<io::Error> for CliError {
    fn from(e: io::Error) -> Self {
        CliError::Io(e)
    }
}
