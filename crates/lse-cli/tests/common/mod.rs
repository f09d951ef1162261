//! Helpers shared by the end-to-end tests: the binary, a scratch directory per test, fixture
//! writers and the runs that check exit status and stderr.

// Each test crate uses its own subset of these helpers.
#![allow(dead_code)]

use std::path::{Path, PathBuf};

use assert_cmd::Command;
use lse_io::npy::{encode, Bf16Descr};
use lse_io::NpyElement;

/// The `lse` binary under test.
pub fn lse() -> Command {
    Command::new(env!("CARGO_BIN_EXE_lse"))
}

/// A fresh, empty directory for one test of the test file `group`.
pub fn dir(group: &str, test: &str) -> PathBuf {
    let d = Path::new(env!("CARGO_TARGET_TMPDIR"))
        .join(group)
        .join(test);
    let _ = std::fs::remove_dir_all(&d);
    std::fs::create_dir_all(&d).unwrap();
    d
}

/// A path as a command-line argument.
pub fn s(p: &Path) -> &str {
    p.to_str().unwrap()
}

/// Writes a `.npy` file with the crate's own writer; returns its path.
pub fn write_npy<E: NpyElement>(
    path: &Path,
    shape: &[usize],
    data: &[E],
    style: Bf16Descr,
) -> PathBuf {
    std::fs::write(path, encode(shape, data, style).unwrap()).unwrap();
    path.to_path_buf()
}

/// A safetensors file from a header text and data bytes.
pub fn safetensors_file(header: &str, data: &[u8]) -> Vec<u8> {
    let mut out = (header.len() as u64).to_le_bytes().to_vec();
    out.extend_from_slice(header.as_bytes());
    out.extend_from_slice(data);
    out
}

/// Runs `lse ARGS`, expecting success with nothing on stderr; returns stdout.
pub fn run_ok(args: &[&str]) -> String {
    let out = lse().args(args).assert().success().get_output().clone();
    assert!(
        out.stderr.is_empty(),
        "{args:?}: stderr {:?}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8(out.stdout).expect("utf-8 output")
}

/// Runs `lse ARGS`, expecting exit status 2, nothing on stdout and one line on stderr that
/// starts with `error`; returns that line.
pub fn run_err(args: &[&str]) -> String {
    let out = lse()
        .args(args)
        .assert()
        .code(2)
        .stdout("")
        .get_output()
        .clone();
    let err = String::from_utf8(out.stderr).unwrap();
    assert_eq!(err.lines().count(), 1, "{args:?}: {err}");
    assert!(err.starts_with("error"), "{args:?}: {err}");
    err
}

/// `lse SUBCOMMAND --help`, expecting success; returns stdout.
pub fn help(subcommand: &str) -> String {
    let out = lse()
        .args([subcommand, "--help"])
        .assert()
        .success()
        .get_output()
        .clone();
    String::from_utf8(out.stdout).unwrap()
}
