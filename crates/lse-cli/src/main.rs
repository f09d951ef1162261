//! `lse`: see where naive softmax breaks and the stable one does not.
//!
//! One module per subcommand; each returns its report as text or a [`CliError`], which `main`
//! prints as one line on stderr with exit status 2.

mod audit;
mod bench;
mod demo;
mod dtype;
mod error;
mod eval;
mod explain;
mod format;
mod input;
mod rows;

use std::ffi::OsString;
use std::io::{self, Write};
use std::process::ExitCode;

use clap::{CommandFactory, Parser, Subcommand};

use crate::error::{CliError, Result};

/// Overflow-proof softmax, log_softmax, logsumexp and cross-entropy, shown next to the textbook
/// formulas that overflow
#[derive(Debug, Parser)]
#[command(name = "lse", version, propagate_version = true, max_term_width = 100)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

/// The subcommands: one module each.
// `eval`'s arguments are the largest; one value is parsed per process, so boxing buys nothing.
#[allow(clippy::large_enum_variant)]
#[derive(Debug, Subcommand)]
enum Command {
    /// Show, number by number, where naive softmax breaks and the stable one does not
    #[command(long_about = explain::LONG_ABOUT, after_help = explain::AFTER_HELP)]
    Explain(explain::Args),
    /// Train a small classifier twice, naive softmax vs lse, and watch the naive run die
    Demo(demo::Args),
    /// Check a logits dump (.npy, .safetensors) for values that break a naive softmax
    Audit(audit::Args),
    /// Apply a stable op to a dumped tensor and write the result as .npy
    Eval(eval::Args),
    /// Time the ops on chosen shapes, dtypes and threads against this machine's copy bandwidth
    Bench(bench::Args),
}

impl Command {
    /// Runs the command, appending its report to `out`; returns the exit status (0, or 1 when
    /// a command reports findings, such as `audit` finding non-finite values).
    fn run(&self, out: &mut String) -> Result<u8> {
        match self {
            Command::Explain(args) => explain::run(args, out).map(|()| 0),
            Command::Demo(args) => demo::run(args, out),
            Command::Audit(args) => audit::run(args, out),
            Command::Eval(args) => eval::run(args, out),
            Command::Bench(args) => bench::run(args, out),
        }
    }
}

/// The exit status of every error.
const FAILURE: u8 = 2;

fn main() -> ExitCode {
    let cli = match Cli::try_parse_from(hoist_options(&Cli::command(), std::env::args_os())) {
        Ok(cli) => cli,
        Err(e) if !e.use_stderr() => {
            // --help and --version: print as clap does.
            let _ = e.print();
            return ExitCode::SUCCESS;
        }
        Err(e) if e.kind() == clap::error::ErrorKind::DisplayHelpOnMissingArgumentOrSubcommand => {
            let _ = e.print();
            return ExitCode::from(FAILURE);
        }
        Err(e) => {
            // Usage errors on one line: clap's first paragraph ("error: invalid value 'f8' for
            // ...", or "error: the following required arguments were not provided: <INPUT>").
            let text = e.to_string();
            let paragraph: Vec<&str> = text
                .lines()
                .skip_while(|l| l.trim().is_empty())
                .take_while(|l| !l.trim().is_empty())
                .map(str::trim)
                .collect();
            let line = if paragraph.is_empty() {
                "error".to_owned()
            } else {
                paragraph.join(" ")
            };
            eprintln!("{line}");
            return ExitCode::from(FAILURE);
        }
    };
    let mut out = String::new();
    match cli
        .command
        .run(&mut out)
        .and_then(|status| write_stdout(&out).map(|()| status))
    {
        Ok(status) => ExitCode::from(status),
        Err(e) => {
            eprintln!("error: {e}");
            ExitCode::from(FAILURE)
        }
    }
}

/// The command line with the options of the subcommand moved in front of its positional
/// arguments, so that `lse explain -1000,1 --dtype f16` parses as `lse explain --dtype f16
/// -1000,1`.
///
/// Rows of logits may start with `-`, so their positional argument accepts hyphen values; clap then
/// takes every later argument, `--dtype` included, as one more row. Options (and their values) are
/// recognised here from the subcommand's own definition; a token that reads as a row of numbers
/// (`-1000,1`, `-inf`) is never an option, and nothing after `--` moves.
fn hoist_options(cli: &clap::Command, args: impl IntoIterator<Item = OsString>) -> Vec<OsString> {
    let mut cli = cli.clone();
    cli.build();
    let args: Vec<OsString> = args.into_iter().collect();
    let Some((at, sub)) = args.iter().enumerate().skip(1).find_map(|(i, a)| {
        let name = a.to_str()?;
        (!name.starts_with('-'))
            .then(|| cli.find_subcommand(name))
            .flatten()
            .map(|sub| (i, sub))
    }) else {
        return args;
    };
    let mut hoisted = args[..=at].to_vec();
    let mut rest = Vec::new();
    let mut tail = args[at + 1..].iter().cloned();
    while let Some(arg) = tail.next() {
        if arg == "--" {
            rest.push(arg);
            rest.extend(tail.by_ref());
            break;
        }
        match arg.to_str().and_then(|s| option_takes_next(sub, s)) {
            Some(Hoist::Alone) => hoisted.push(arg),
            Some(Hoist::WithNext) => {
                hoisted.push(arg);
                hoisted.extend(tail.next());
            }
            Some(Hoist::Split(flag, value)) => hoisted.extend([flag.into(), value.into()]),
            None => rest.push(arg),
        }
    }
    hoisted.extend(rest);
    hoisted
}

/// How an option moves to the front.
#[derive(Debug, PartialEq)]
enum Hoist {
    /// A flag, or an option with its value attached by `=`.
    Alone,
    /// An option whose value is the next argument.
    WithNext,
    /// A short option with its value attached (`-df16`), split as `-d f16`: clap would read
    /// `-df16` as a hyphen value of the positional.
    Split(String, String),
}

/// How `token` moves when it is an option of `cmd` (`--dtype`, `--dtype=f16`, `-d`, `-df16`,
/// `--help`); `None` for anything else.
fn option_takes_next(cmd: &clap::Command, token: &str) -> Option<Hoist> {
    let is_row = token.split(',').all(|f| f.trim().parse::<f64>().is_ok());
    if is_row {
        return None;
    }
    let takes_value = |a: &clap::Arg| a.get_action().takes_values();
    if let Some(long) = token.strip_prefix("--") {
        let (name, inline) = long
            .split_once('=')
            .map_or((long, false), |(n, _)| (n, true));
        let arg = cmd.get_arguments().find(|a| a.get_long() == Some(name))?;
        Some(if takes_value(arg) && !inline {
            Hoist::WithNext
        } else {
            Hoist::Alone
        })
    } else {
        let mut shorts = token.strip_prefix('-')?.chars();
        let c = shorts.next()?;
        let arg = cmd.get_arguments().find(|a| a.get_short() == Some(c))?;
        let attached = shorts.as_str();
        Some(match (takes_value(arg), attached.is_empty()) {
            (true, true) => Hoist::WithNext,
            (true, false) => Hoist::Split(format!("-{c}"), attached.to_owned()),
            (false, _) => Hoist::Alone,
        })
    }
}

/// Writes the report; a closed pipe (`lse explain | head`) is not an error.
fn write_stdout(text: &str) -> Result<()> {
    let mut stdout = io::stdout().lock();
    match stdout
        .write_all(text.as_bytes())
        .and_then(|()| stdout.flush())
    {
        Err(e) if e.kind() != io::ErrorKind::BrokenPipe => Err(CliError::from(e)),
        _ => Ok(()),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse(argv: &[&str]) -> Cli {
        let argv = argv.iter().map(OsString::from);
        Cli::try_parse_from(hoist_options(&Cli::command(), argv)).unwrap()
    }

    #[test]
    fn cli_is_well_formed() {
        Cli::command().debug_assert();
    }

    #[test]
    fn negative_rows_parse_before_and_after_options() {
        for argv in [
            &["lse", "explain", "-1000,1", "--dtype", "f16"][..],
            &["lse", "explain", "--dtype", "f16", "-1000,1", "-inf,nan"],
            &["lse", "explain", "-d", "f16", "-1000,1"],
            &["lse", "explain", "-1000,1", "-df16", "-inf,nan"],
            &["lse", "explain", "-1000,1", "--dtype=f16"],
        ] {
            let Command::Explain(args) = parse(argv).command else {
                panic!("{argv:?} is not `explain`");
            };
            assert_eq!(args.logits[0], "-1000,1", "{argv:?}");
            assert_eq!(
                args.dtype,
                dtype::DTypeSelection::One(lse::DType::F16),
                "{argv:?}"
            );
        }
        // After `--` nothing is an option.
        let Command::Explain(args) = parse(&["lse", "explain", "--", "-1,2", "--dtype"]).command
        else {
            panic!("not `explain`");
        };
        assert_eq!(args.logits, ["-1,2", "--dtype"]);
        assert_eq!(args.dtype, dtype::DTypeSelection::All);
    }

    #[test]
    fn hoisting_moves_only_options() {
        let argv = [
            "lse", "explain", "2,1", "-1000,1", "--dtype", "f16", "-inf,3",
        ];
        let hoisted = hoist_options(&Cli::command(), argv.iter().map(OsString::from));
        let want = [
            "lse", "explain", "--dtype", "f16", "2,1", "-1000,1", "-inf,3",
        ];
        assert_eq!(hoisted, want.map(OsString::from));
        let argv = ["lse", "--help"];
        let hoisted = hoist_options(&Cli::command(), argv.iter().map(OsString::from));
        assert_eq!(hoisted, argv.map(OsString::from));
    }
}
