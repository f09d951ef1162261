//! `lse audit`: check a dump of logits for the values that break a naive softmax — NaN, `±inf`,
//! rows whose max overflows `exp` in a narrow dtype or underflows every `exp` to 0 — with the
//! logsumexp, z-loss and (given targets) cross-entropy statistics of the stable ops.

use std::cell::{Cell, RefCell};
use std::fmt::Write as _;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use indicatif::{ProgressBar, ProgressStyle};
use lse::guard::{Headroom, LogitStats, LogitStatsAccumulator};
use lse::{
    bf16, f16, CompensatedSum, CrossEntropyOptions, DType, Element, NonFinite, Reduction, Targets,
};
use lse_io::stream::TensorInfo;
use lse_io::{shape_string, FloatElement, Format};
use serde::Serialize;

use crate::error::{CliError, Result};
use crate::format::shortest;
use crate::input::{self, parse_ignore_index, ClassLayout, IgnoreIndex, Opened, Pick, RowChunks};

/// The description of `lse audit`, shown by `--help` after the options.
macro_rules! description {
    () => {
        "\
Check a dump of logits (.npy or .safetensors) for the values that break a naive softmax.

The logits are rows of classes: the class axis is the last one unless --axis says otherwise
(a non-last class axis is moved last by a copy). A .safetensors file is audited tensor by
tensor: the one named by --tensor, or else every float tensor (F64, F32, F16, BF16; other
tensors are listed as skipped). Supported element types: f64, f32, f16 and bf16. bf16 is not
a NumPy type: a .npy file holds it with the descr 'bfloat16' (read as bf16), or with the
2-byte void descr '<V2' that np.save writes for ml_dtypes.bfloat16, read as bf16 only with
--void-as-bf16 (other 2-byte data looks the same).

For each tensor the report gives its shape and dtype; the smallest and largest finite logit;
how many logits are NaN, +inf and -inf; how many rows a naive softmax, exp(x) / sum exp(x),
would break in f16, bf16 and f32:
  overflow   the row max is above ln(MAX) of the dtype (f16 11.09, bf16 and f32 88.72), so
             exp(max) is inf and the softmax inf/inf = NaN;
  underflow  the row max is below ln(smallest subnormal / 2) (f16 -17.33, bf16 -92.88,
             f32 -103.97), so every exp(x) rounds to 0 and the softmax is 0/0 = NaN
(rows holding NaN or +inf, and fully masked rows of -inf only, are counted apart); the headroom
ln(MAX) - max per dtype; the per-row logsumexp (lse::logsumexp_with) and z = lse^2 (what a
z-loss penalises). With --targets (a .npy of integer class indices, one per row, in the order
of the rows once the class axis is last): the cross-entropy of the stable op per row (mean,
max), the rows ignored (target = --ignore-index) and the accuracy of argmax against the target.
Rows are counted from 0.

Exit status: 0 when the logits are clean, 1 when any logit is NaN or +inf (with --deny-neg-inf:
or -inf; by default -inf is a mask, counted but not a failure), 2 on any error (unreadable or
malformed file, targets out of range or of the wrong length, bad arguments), with a one-line
message on stderr. --json prints one JSON object instead of the report: {\"file\", \"format\",
\"tensors\": [{\"name\", \"shape\", \"dtype\", \"stored_as\", \"class_axis\", \"rows\", \"classes\",
\"min\", \"max\", \"max_abs\", \"nan\", \"pos_inf\", \"neg_inf\", \"rows_with_nan_or_inf\",
\"rows_fully_masked\", \"naive_softmax\": [{\"dtype\", \"overflow_above\", \"underflow_below\",
\"overflow_rows\", \"underflow_rows\"}], \"headroom\", \"lse\", \"cross_entropy\"}], \"skipped\",
\"non_finite\", \"exit_status\"}; a value that does not exist (the max of no finite logit) is null.

Several files, or a directory (its .npy and .safetensors files, by name: a folder of per-step
dumps), give one line per file and the totals; a file that cannot be audited is reported on its
line. Exit status: 2 when any file failed, else 1 when any holds NaN or +inf, else 0. --json
prints {\"files\": [the object above per file, or {\"file\", \"error\"}], \"totals\": {\"files\",
\"failed\", \"tensors\", \"rows\", \"nan\", \"pos_inf\", \"neg_inf\", \"files_non_finite\"},
\"exit_status\"}.

Files are read 16 MiB at a time, so memory follows that chunk, not the file (a .npy in Fortran
order, or a class axis other than the last with huge trailing axes, is read in larger pieces).
A file that shrinks while it is read is an error, not a crash. A progress bar is drawn on stderr
when the audit takes more than a second and stderr is a terminal."
    };
}

/// The examples of `lse audit`.
macro_rules! examples {
    () => {
        "\
Examples:
  lse audit logits.npy                          shape, dtype, non-finite counts, naive breakage
  lse audit dump.safetensors                    every float tensor of the file
  lse audit dump.safetensors --tensor logits --targets labels.npy
  lse audit logits.npy --axis 1 --json          classes on axis 1 (N, C, T), JSON output
  lse audit logits.npy && echo clean            exit status 1 on NaN or +inf
  lse audit dumps/                              one line per file of the folder, and totals"
    };
}

/// What `lse audit -h` shows after the options: the examples.
pub const AFTER_HELP: &str = examples!();

/// What `lse audit --help` shows after the options: the description, then the examples.
pub const AFTER_LONG_HELP: &str = concat!("Description:\n", description!(), "\n\n", examples!());

/// Arguments of `lse audit`.
#[derive(Debug, clap::Args)]
#[command(after_help = AFTER_HELP, after_long_help = AFTER_LONG_HELP)]
pub struct Args {
    /// The logits: .npy or .safetensors files, or directories of them
    #[arg(value_name = "FILE", required = true, num_args = 1..)]
    pub files: Vec<PathBuf>,

    /// The tensor of a .safetensors file to audit (default: every float tensor)
    #[arg(long, value_name = "NAME")]
    pub tensor: Option<String>,

    /// The class axis; negative counts from the end
    #[arg(
        long,
        value_name = "N",
        default_value_t = -1,
        allow_negative_numbers = true
    )]
    pub axis: i64,

    /// Class indices (.npy of integers, one per row): adds cross-entropy statistics and accuracy
    #[arg(long, value_name = "FILE")]
    pub targets: Option<PathBuf>,

    /// The target value of rows to leave out of the cross-entropy statistics, or 'none'
    #[arg(
        long,
        value_name = "N",
        default_value = "-100",
        allow_negative_numbers = true,
        value_parser = parse_ignore_index
    )]
    pub ignore_index: IgnoreIndex,

    /// Read a .npy with the 2-byte void descr '<V2' (np.save of ml_dtypes.bfloat16) as bf16
    #[arg(long)]
    pub void_as_bf16: bool,

    /// Exit with status 1 on -inf logits too (by default -inf is a mask, not a failure)
    #[arg(long)]
    pub deny_neg_inf: bool,

    /// Print one JSON object instead of the report
    #[arg(long)]
    pub json: bool,

    /// Bytes of the file read and checked at a time (tests use small chunks)
    #[arg(long, value_name = "BYTES", default_value_t = CHUNK_BYTES, hide = true)]
    pub chunk_bytes: usize,
}

/// Bytes of a file read at a time: peak memory follows this, not the file's size.
pub const CHUNK_BYTES: usize = 16 << 20;

/// The dtypes whose naive softmax is checked, narrowest first.
const NAIVE_DTYPES: [DType; 3] = [DType::F16, DType::BF16, DType::F32];

/// `ln(smallest subnormal / 2)`: below it `exp(x)` rounds to 0 in `dtype`.
fn underflow_threshold(dtype: DType) -> f64 {
    let bits = match dtype {
        DType::F64 => 1074.0,
        DType::F32 => 149.0,
        DType::F16 => 24.0,
        DType::BF16 => 133.0,
    };
    -(bits + 1.0) * std::f64::consts::LN_2
}

/// The whole report: the JSON object of `--json`.
#[derive(Debug, Serialize)]
struct Report {
    file: String,
    format: Format,
    tensors: Vec<TensorReport>,
    skipped: Vec<Skipped>,
    non_finite: bool,
    exit_status: u8,
}

/// A tensor of a safetensors file that was not audited.
#[derive(Debug, Serialize)]
struct Skipped {
    name: String,
    dtype: String,
}

/// How many rows a naive softmax in one dtype would break.
#[derive(Clone, Copy, Debug, Serialize)]
struct Naive {
    dtype: DType,
    /// `ln(MAX)`.
    overflow_above: f64,
    /// `ln(smallest subnormal / 2)`.
    underflow_below: f64,
    overflow_rows: usize,
    underflow_rows: usize,
}

/// Per-row logsumexp statistics, over rows whose logsumexp is finite.
#[derive(Clone, Copy, Debug, Serialize)]
struct LseSummary {
    rows: usize,
    min: f64,
    mean: f64,
    max: f64,
    max_row: Option<usize>,
    z_mean: f64,
    z_max: f64,
}

/// Cross-entropy statistics against class targets.
#[derive(Clone, Debug, Serialize)]
struct CeSummary {
    targets: String,
    ignore_index: Option<i64>,
    rows_counted: usize,
    rows_ignored: usize,
    rows_non_finite_loss: usize,
    loss_mean: f64,
    loss_max: f64,
    loss_max_row: Option<usize>,
    correct: usize,
    accuracy: f64,
}

/// The audit of one tensor.
#[derive(Clone, Debug, Serialize)]
struct TensorReport {
    name: Option<String>,
    shape: Vec<usize>,
    dtype: DType,
    stored_as: String,
    class_axis: usize,
    rows: usize,
    classes: usize,
    min: f64,
    max: f64,
    max_abs: f64,
    nan: u64,
    pos_inf: u64,
    neg_inf: u64,
    rows_with_nan_or_inf: usize,
    rows_fully_masked: usize,
    naive_softmax: Vec<Naive>,
    headroom: Headroom,
    lse: LseSummary,
    cross_entropy: Option<CeSummary>,
}

/// Runs `lse audit`, appending its report to `out`; returns the exit status: 1 when a logit is
/// NaN or `+inf` (or `-inf` with `--deny-neg-inf`), else 0.
///
/// One file gives the report of that file. Several files, or a directory (its `.npy` and
/// `.safetensors` files, by name), give one line per file and the totals; a file that cannot be
/// audited is reported on its line and makes the exit status 2.
///
/// # Errors
/// Unreadable or malformed files, targets that do not fit the logits, bad arguments (one file);
/// a directory that cannot be listed or holds no tensor file (several).
pub fn run(args: &Args, out: &mut String) -> Result<u8> {
    let files = expand(&args.files)?;
    match (files.as_slice(), args.files.as_slice()) {
        ([file], [given]) if !given.is_dir() => {
            let report = audit_file(args, file)?;
            if args.json {
                push_json(&report, out)?;
            } else {
                render(&report, args.deny_neg_inf, out);
            }
            Ok(report.exit_status)
        }
        _ => audit_many(args, &files, out),
    }
}

/// The files named, directories replaced by their `.npy` and `.safetensors` files (sorted).
fn expand(paths: &[PathBuf]) -> Result<Vec<PathBuf>> {
    let mut files = Vec::new();
    for path in paths {
        if !path.is_dir() {
            files.push(path.clone());
            continue;
        }
        let listing = std::fs::read_dir(path)
            .map_err(|e| input::file_error(path, format!("cannot list the directory: {e}")))?;
        let mut found = Vec::new();
        for entry in listing {
            let entry = entry
                .map_err(|e| input::file_error(path, format!("cannot list the directory: {e}")))?;
            let file = entry.path();
            if file.is_file() && Format::from_path(&file).is_some() {
                found.push(file);
            }
        }
        if found.is_empty() {
            return Err(input::file_error(
                path,
                "the directory holds no .npy or .safetensors file",
            ));
        }
        found.sort();
        files.extend(found);
    }
    Ok(files)
}

fn push_json<T: Serialize>(value: &T, out: &mut String) -> Result<()> {
    let json = serde_json::to_string_pretty(value)
        .map_err(|e| CliError::Other(format!("cannot write the JSON report: {e}")))?;
    out.push_str(&json);
    out.push('\n');
    Ok(())
}

/// The audit of one file.
fn audit_file(args: &Args, path: &Path) -> Result<Report> {
    let pick = match &args.tensor {
        Some(name) => Pick::Named(name),
        None => Pick::AllFloat,
    };
    let opened = input::open_logits(path, pick, args.void_as_bf16)?;
    if args.targets.is_some() && opened.tensors.len() > 1 {
        let names: Vec<String> = opened
            .tensors
            .iter()
            .filter_map(|t| t.name.as_ref().map(|n| format!("{n:?}")))
            .collect();
        return Err(CliError::usage(format!(
            "--targets needs one tensor, but {} holds {} float tensors; choose one with --tensor: {}",
            path.display(),
            names.len(),
            names.join(", ")
        )));
    }
    let total = opened.tensors.iter().map(TensorInfo::byte_len).sum();
    let progress = Progress::new(&path.display().to_string(), total);
    let mut tensors = Vec::new();
    for tensor in &opened.tensors {
        tensors.push(audit_tensor(args, &opened, tensor, &progress)?);
    }
    progress.finish();
    let non_finite = tensors
        .iter()
        .any(|t| t.nan > 0 || t.pos_inf > 0 || (args.deny_neg_inf && t.neg_inf > 0));
    Ok(Report {
        file: path.display().to_string(),
        format: opened.file.format,
        tensors,
        skipped: opened
            .skipped
            .into_iter()
            .map(|(name, dtype)| Skipped { name, dtype })
            .collect(),
        non_finite,
        exit_status: u8::from(non_finite),
    })
}

/// One file of a multi-file audit: its report, or why it has none.
#[derive(Debug, Serialize)]
#[serde(untagged)]
enum FileOutcome {
    Audited(Report),
    Failed { file: String, error: String },
}

/// The sums over the files of a multi-file audit.
#[derive(Debug, Default, Serialize)]
struct Totals {
    files: usize,
    failed: usize,
    tensors: usize,
    rows: usize,
    nan: u64,
    pos_inf: u64,
    neg_inf: u64,
    files_non_finite: usize,
}

/// The JSON object of a multi-file `--json`.
#[derive(Debug, Serialize)]
struct ManyReport {
    files: Vec<FileOutcome>,
    totals: Totals,
    exit_status: u8,
}

fn audit_many(args: &Args, files: &[PathBuf], out: &mut String) -> Result<u8> {
    let mut totals = Totals::default();
    let mut outcomes = Vec::with_capacity(files.len());
    for path in files {
        totals.files += 1;
        match audit_file(args, path) {
            Ok(report) => {
                totals.tensors += report.tensors.len();
                for t in &report.tensors {
                    totals.rows += t.rows;
                    totals.nan += t.nan;
                    totals.pos_inf += t.pos_inf;
                    totals.neg_inf += t.neg_inf;
                }
                totals.files_non_finite += usize::from(report.non_finite);
                outcomes.push(FileOutcome::Audited(report));
            }
            Err(e) => {
                totals.failed += 1;
                outcomes.push(FileOutcome::Failed {
                    file: path.display().to_string(),
                    error: e.to_string(),
                });
            }
        }
    }
    let exit_status = if totals.failed > 0 {
        2
    } else {
        u8::from(totals.files_non_finite > 0)
    };
    let report = ManyReport {
        files: outcomes,
        totals,
        exit_status,
    };
    if args.json {
        push_json(&report, out)?;
    } else {
        render_many(&report, args.deny_neg_inf, out);
    }
    Ok(exit_status)
}

fn render_many(report: &ManyReport, deny_neg_inf: bool, out: &mut String) {
    for outcome in &report.files {
        match outcome {
            FileOutcome::Audited(r) => {
                let (rows, nan, pos, neg) = r.tensors.iter().fold((0, 0, 0, 0), |a, t| {
                    (a.0 + t.rows, a.1 + t.nan, a.2 + t.pos_inf, a.3 + t.neg_inf)
                });
                let verdict = if r.non_finite { "NON-FINITE" } else { "clean" };
                let mut dtypes: Vec<String> =
                    r.tensors.iter().map(|t| t.dtype.to_string()).collect();
                dtypes.dedup();
                let _ = writeln!(
                    out,
                    "{}: {verdict}: {}, {} ({}), NaN {nan}, +inf {pos}, -inf {neg}",
                    r.file,
                    plural(r.tensors.len(), "tensor", "tensors"),
                    plural(rows, "row", "rows"),
                    dtypes.join("/"),
                );
            }
            FileOutcome::Failed { file, error } => {
                let _ = writeln!(out, "{file}: error: {error}");
            }
        }
    }
    let t = &report.totals;
    let neg_note = if deny_neg_inf {
        ""
    } else {
        " (-inf are masks)"
    };
    let _ = writeln!(
        out,
        "\ntotal: {}, {} non-finite, {} failed; {}, {}, NaN {}, +inf {}, -inf {}{neg_note} \
         (exit status {})",
        plural(t.files, "file", "files"),
        t.files_non_finite,
        t.failed,
        plural(t.tensors, "tensor", "tensors"),
        plural(t.rows, "row", "rows"),
        t.nan,
        t.pos_inf,
        t.neg_inf,
        report.exit_status
    );
}

/// A progress bar on stderr for a long audit: shown once the work has taken a second, and only
/// when stderr is a terminal (indicatif draws nothing otherwise).
struct Progress {
    label: String,
    total: u64,
    start: Instant,
    done: Cell<u64>,
    bar: RefCell<Option<ProgressBar>>,
}

impl Progress {
    fn new(label: &str, total: u64) -> Self {
        Self {
            label: label.to_owned(),
            total,
            start: Instant::now(),
            done: Cell::new(0),
            bar: RefCell::new(None),
        }
    }

    fn advance(&self, bytes: u64) {
        self.done.set(self.done.get() + bytes);
        let mut bar = self.bar.borrow_mut();
        if bar.is_none() && self.start.elapsed() >= Duration::from_secs(1) {
            let new = ProgressBar::new(self.total);
            if let Ok(style) = ProgressStyle::with_template(
                "{spinner} {msg} [{bar:30}] {bytes}/{total_bytes} {binary_bytes_per_sec} ({eta})",
            ) {
                new.set_style(style.progress_chars("=> "));
            }
            new.set_message(self.label.clone());
            *bar = Some(new);
        }
        if let Some(bar) = bar.as_ref() {
            bar.set_position(self.done.get());
        }
    }

    fn finish(&self) {
        if let Some(bar) = self.bar.borrow_mut().take() {
            bar.finish_and_clear();
        }
    }
}

fn audit_tensor(
    args: &Args,
    opened: &Opened,
    tensor: &TensorInfo,
    progress: &Progress,
) -> Result<TensorReport> {
    let layout = ClassLayout::new(&opened.path, &tensor.shape, args.axis)?;
    let targets = match &args.targets {
        Some(path) => Some(input::targets(path, &layout, args.ignore_index)?),
        None => None,
    };
    let rows = Rows {
        layout: &layout,
        targets: targets.as_deref(),
        ignore: args.ignore_index.0,
    };
    let mut chunks = opened.row_chunks(tensor, &layout, args.chunk_bytes);
    let dtype = tensor.encoding.as_ref().ok().and_then(|e| e.dtype());
    let computed = match dtype {
        Some(DType::F64) => rows.compute::<f64>(&mut chunks, progress)?,
        Some(DType::F32) => rows.compute::<f32>(&mut chunks, progress)?,
        Some(DType::F16) => rows.compute::<f16>(&mut chunks, progress)?,
        Some(DType::BF16) => rows.compute::<bf16>(&mut chunks, progress)?,
        None => {
            return Err(CliError::Other(
                "integer tensors are not logits (rejected when read)".to_owned(),
            ))
        }
    };
    let Computed {
        stats,
        rows_with_nan_or_inf,
        rows_fully_masked,
        naive_softmax,
        lse,
        ce,
    } = computed;
    let cross_entropy = ce.map(|mut ce| {
        ce.targets = args
            .targets
            .as_ref()
            .map(|p| p.display().to_string())
            .unwrap_or_default();
        ce
    });
    Ok(TensorReport {
        name: tensor.name.clone(),
        shape: tensor.shape.clone(),
        dtype: stats.dtype,
        stored_as: tensor.stored_as.clone(),
        class_axis: layout.axis,
        rows: layout.rows,
        classes: layout.classes,
        min: stats.min,
        max: stats.max,
        max_abs: stats.max_abs,
        nan: stats.nan,
        pos_inf: stats.pos_inf,
        neg_inf: stats.neg_inf,
        rows_with_nan_or_inf,
        rows_fully_masked,
        naive_softmax,
        headroom: stats.headroom,
        lse,
        cross_entropy,
    })
}

/// What is computed from the rows of one tensor.
struct Computed {
    stats: LogitStats,
    rows_with_nan_or_inf: usize,
    rows_fully_masked: usize,
    naive_softmax: Vec<Naive>,
    lse: LseSummary,
    ce: Option<CeSummary>,
}

/// The rows of one tensor (class axis last) and what goes with them.
struct Rows<'a> {
    layout: &'a ClassLayout,
    targets: Option<&'a [i64]>,
    ignore: Option<i64>,
}

/// The figures of [`Computed`] gathered a chunk of rows at a time, in row order: every sum is
/// taken in the same order as over the whole tensor at once, so the result does not depend on
/// the chunk size.
struct Tally<E: Element> {
    stats: LogitStatsAccumulator<E>,
    naive: Vec<Naive>,
    bad_rows: usize,
    masked_rows: usize,
    lse: LseSummary,
    ce: Option<(CeSummary, CompensatedSum)>,
    /// Rows tallied so far.
    rows: usize,
}

impl Rows<'_> {
    fn compute<E: FloatElement>(
        &self,
        chunks: &mut RowChunks<'_>,
        progress: &Progress,
    ) -> Result<Computed> {
        let classes = self.layout.classes;
        let mut tally = Tally::<E> {
            stats: LogitStatsAccumulator::new(classes)?,
            naive: NAIVE_DTYPES
                .iter()
                .map(|&dtype| Naive {
                    dtype,
                    overflow_above: dtype.exp_overflow_threshold(),
                    underflow_below: underflow_threshold(dtype),
                    overflow_rows: 0,
                    underflow_rows: 0,
                })
                .collect(),
            bad_rows: 0,
            masked_rows: 0,
            lse: LseSummary {
                rows: 0,
                min: f64::NAN,
                mean: f64::NAN,
                max: f64::NAN,
                max_row: None,
                z_mean: f64::NAN,
                z_max: f64::NAN,
            },
            ce: self.targets.map(|_| {
                let summary = CeSummary {
                    targets: String::new(),
                    ignore_index: self.ignore,
                    rows_counted: 0,
                    rows_ignored: 0,
                    rows_non_finite_loss: 0,
                    loss_mean: f64::NAN,
                    loss_max: f64::NAN,
                    loss_max_row: None,
                    correct: 0,
                    accuracy: f64::NAN,
                };
                (summary, CompensatedSum::ZERO)
            }),
            rows: 0,
        };
        let row_bytes = chunks.row_bytes();
        while let Some(data) = chunks.next_chunk::<E>()? {
            self.tally_chunk(&mut tally, &data)?;
            progress.advance(row_bytes * (data.len() / classes) as u64);
        }
        let stats = tally.stats.finish();
        let mut lse = tally.lse;
        lse.mean = stats.lse_mean;
        lse.z_mean = stats.z_mean;
        let ce = tally.ce.map(|(mut ce, sum)| {
            let finite = ce.rows_counted - ce.rows_non_finite_loss;
            if finite > 0 {
                ce.loss_mean = sum.value() / finite as f64;
            }
            if ce.rows_counted > 0 {
                ce.accuracy = ce.correct as f64 / ce.rows_counted as f64;
            }
            ce
        });
        Ok(Computed {
            stats,
            rows_with_nan_or_inf: tally.bad_rows,
            rows_fully_masked: tally.masked_rows,
            naive_softmax: tally.naive,
            lse,
            ce,
        })
    }

    /// Adds the rows `data` (`rows × classes`), which follow the rows tallied so far. The
    /// logit statistics and the rest are gathered on two threads at once, each in row order.
    fn tally_chunk<E: Element>(&self, tally: &mut Tally<E>, data: &[E]) -> Result<()> {
        let Tally {
            stats,
            naive,
            bad_rows,
            masked_rows,
            lse,
            ce,
            rows,
        } = tally;
        let (added, rest) = rayon::join(
            || stats.add(data),
            || self.tally_rows(data, *rows, naive, bad_rows, masked_rows, lse, ce),
        );
        added?;
        rest?;
        *rows += data.len() / self.layout.classes;
        Ok(())
    }

    /// Everything of [`Rows::tally_chunk`] but the logit statistics.
    #[allow(clippy::too_many_arguments)]
    fn tally_rows<E: Element>(
        &self,
        data: &[E],
        first: usize,
        naive: &mut [Naive],
        bad_rows: &mut usize,
        masked_rows: &mut usize,
        lse: &mut LseSummary,
        ce: &mut Option<(CeSummary, CompensatedSum)>,
    ) -> Result<()> {
        let classes = self.layout.classes;
        let rows = data.len() / classes;
        let mut argmax = Vec::with_capacity(rows);
        for row in data.chunks_exact(classes) {
            let (max, bad) = row_max(row);
            // The first non-NaN element equal to the max: the first of the row's largest
            // (every non-NaN element is −inf or more), `None` for a row of NaN.
            argmax.push(first_equal(row, max));
            if bad {
                *bad_rows += 1;
            } else if max == f64::NEG_INFINITY {
                *masked_rows += 1;
            } else {
                for n in naive.iter_mut() {
                    if max > n.overflow_above {
                        n.overflow_rows += 1;
                    } else if max < n.underflow_below {
                        n.underflow_rows += 1;
                    }
                }
            }
        }

        let mut row_lse = vec![E::Stat::zero(); rows];
        lse::logsumexp_with(data, classes, &mut row_lse, NonFinite::Propagate)?;
        for (r, &v) in row_lse.iter().enumerate() {
            let v: f64 = v.into();
            if !v.is_finite() {
                continue;
            }
            lse.rows += 1;
            if lse.max_row.is_none() || v > lse.max {
                lse.max = v;
                lse.max_row = Some(first + r);
            }
            if lse.min.is_nan() || v < lse.min {
                lse.min = v;
            }
            if lse.z_max.is_nan() || v * v > lse.z_max {
                lse.z_max = v * v;
            }
        }

        if let (Some((ce, sum)), Some(targets)) = (ce.as_mut(), self.targets) {
            let targets = &targets[first..first + rows];
            self.cross_entropy(ce, sum, first, data, targets, &argmax)?;
        }
        Ok(())
    }
}

/// The largest non-NaN element of `row` (`−inf` if none), and whether it holds NaN or `+inf`.
/// Branch-free over independent lanes, so that it compiles to vector code (the pass that
/// bounded the audit of half-precision files).
fn row_max<E: Element>(row: &[E]) -> (f64, bool) {
    const LANES: usize = 16;
    let (mut max, mut bad) = ([f64::NEG_INFINITY; LANES], [false; LANES]);
    let mut lanes = row.chunks_exact(LANES);
    for step in &mut lanes {
        for ((m, b), &x) in max.iter_mut().zip(&mut bad).zip(step) {
            let x = x.to_f64();
            // NaN fails the compare: it never becomes the max.
            *b |= x.is_nan() | (x == f64::INFINITY);
            *m = if x > *m { x } else { *m };
        }
    }
    let (mut m, mut b) = (f64::NEG_INFINITY, bad.contains(&true));
    for &x in lanes.remainder() {
        let x = x.to_f64();
        b |= x.is_nan() | (x == f64::INFINITY);
        m = if x > m { x } else { m };
    }
    (max.into_iter().fold(m, |a, x| if x > a { x } else { a }), b)
}

/// The index of the first element of `row` equal to `max`, found a vector step at a time.
fn first_equal<E: Element>(row: &[E], max: f64) -> Option<usize> {
    const LANES: usize = 16;
    let step = row
        .chunks(LANES)
        .position(|s| s.iter().fold(false, |hit, &x| hit | (x.to_f64() == max)))?;
    let at = step * LANES;
    row[at..]
        .iter()
        .position(|&x| x.to_f64() == max)
        .map(|i| at + i)
}

impl Rows<'_> {
    /// Adds the cross-entropy of the rows `data`, the first of which is row `first`.
    fn cross_entropy<E: Element>(
        &self,
        ce: &mut CeSummary,
        sum: &mut CompensatedSum,
        first: usize,
        data: &[E],
        targets: &[i64],
        argmax: &[Option<usize>],
    ) -> Result<()> {
        let options = CrossEntropyOptions {
            ignore_index: self.ignore,
            reduction: Reduction::None,
            non_finite: NonFinite::Propagate,
            ..CrossEntropyOptions::default()
        };
        let out = lse::cross_entropy(
            data,
            self.layout.classes,
            Targets::Classes(targets),
            &options,
        )?;
        let losses = out.row_loss.unwrap_or_default();
        for (r, (&t, &loss)) in targets.iter().zip(&losses).enumerate() {
            if Some(t) == self.ignore {
                ce.rows_ignored += 1;
                continue;
            }
            ce.rows_counted += 1;
            if argmax[r].is_some_and(|c| Some(c) == usize::try_from(t).ok()) {
                ce.correct += 1;
            }
            let loss: f64 = loss.into();
            if !loss.is_finite() {
                ce.rows_non_finite_loss += 1;
                continue;
            }
            sum.add(loss);
            if ce.loss_max_row.is_none() || loss > ce.loss_max {
                ce.loss_max = loss;
                ce.loss_max_row = Some(first + r);
            }
        }
        Ok(())
    }
}

/// `x` with up to 5 significant digits (`0.41233`, `1.2346e-7`, `12`); `n/a` for NaN.
fn num(x: f64) -> String {
    if x.is_nan() {
        return "n/a".to_owned();
    }
    if x.is_infinite() {
        return if x > 0.0 { "inf" } else { "-inf" }.to_owned();
    }
    if x == 0.0 {
        return "0".to_owned();
    }
    let exp = x.abs().log10().floor() as i32;
    if (-4..6).contains(&exp) {
        let decimals = (4 - exp).max(0) as usize;
        let s = format!("{x:.decimals$}");
        if s.contains('.') {
            s.trim_end_matches('0').trim_end_matches('.').to_owned()
        } else {
            s
        }
    } else {
        let s = format!("{x:.4e}");
        match s.split_once('e') {
            Some((m, e)) if m.contains('.') => {
                format!("{}e{e}", m.trim_end_matches('0').trim_end_matches('.'))
            }
            _ => s,
        }
    }
}

/// A logit of `dtype` printed with the digits its dtype needs.
fn logit(dtype: DType, x: f64) -> String {
    if x.is_nan() {
        return "n/a".to_owned();
    }
    match dtype {
        DType::F64 => shortest(x),
        DType::F32 => shortest(<f32 as Element>::from_f64(x)),
        DType::F16 => shortest(<f16 as Element>::from_f64(x)),
        DType::BF16 => shortest(<bf16 as Element>::from_f64(x)),
    }
}

fn plural(n: usize, one: &str, many: &str) -> String {
    format!("{n} {}", if n == 1 { one } else { many })
}

fn line(out: &mut String, key: &str, value: &str) {
    let _ = writeln!(out, "  {key:<14}{value}");
}

fn render(report: &Report, deny_neg_inf: bool, out: &mut String) {
    for (i, t) in report.tensors.iter().enumerate() {
        if i > 0 {
            out.push('\n');
        }
        match &t.name {
            Some(name) => {
                let _ = writeln!(out, "{}, tensor {name:?}", report.file);
            }
            None => {
                let _ = writeln!(out, "{}", report.file);
            }
        }
        render_tensor(t, out);
    }
    if !report.skipped.is_empty() {
        let skipped: Vec<String> = report
            .skipped
            .iter()
            .map(|s| format!("{:?} ({})", s.name, s.dtype))
            .collect();
        let _ = writeln!(out, "\nskipped (not float): {}", skipped.join(", "));
    }
    let (nan, pos, neg) = report.tensors.iter().fold((0, 0, 0), |(a, b, c), t| {
        (a + t.nan, b + t.pos_inf, c + t.neg_inf)
    });
    let verdict = if report.non_finite {
        let mut found = Vec::new();
        if nan > 0 {
            found.push(format!("{nan} NaN"));
        }
        if pos > 0 {
            found.push(format!("{pos} +inf"));
        }
        if deny_neg_inf && neg > 0 {
            found.push(format!("{neg} -inf"));
        }
        format!("NON-FINITE: {}", found.join(", "))
    } else if neg > 0 {
        "clean (no NaN or +inf; -inf entries are masks)".to_owned()
    } else {
        "clean".to_owned()
    };
    let _ = writeln!(
        out,
        "\nresult: {verdict} (exit status {})",
        report.exit_status
    );
}

fn render_tensor(t: &TensorReport, out: &mut String) {
    line(
        out,
        "shape",
        &format!(
            "{}: {} of {} (class axis {})",
            shape_string(&t.shape),
            plural(t.rows, "row", "rows"),
            plural(t.classes, "class", "classes"),
            t.class_axis
        ),
    );
    line(
        out,
        "dtype",
        &format!("{} (stored as {:?})", t.dtype, t.stored_as),
    );
    line(
        out,
        "values",
        &format!(
            "min {}, max {}, max |x| {} (finite logits)",
            logit(t.dtype, t.min),
            logit(t.dtype, t.max),
            logit(t.dtype, t.max_abs)
        ),
    );
    line(
        out,
        "non-finite",
        &format!("NaN {}, +inf {}, -inf {}", t.nan, t.pos_inf, t.neg_inf),
    );
    line(
        out,
        "rows",
        &format!(
            "{} with NaN or +inf, {} fully masked (all -inf)",
            t.rows_with_nan_or_inf, t.rows_fully_masked
        ),
    );
    line(
        out,
        "naive softmax",
        "rows whose exp(x) / sum exp(x) would break, by dtype:",
    );
    for n in &t.naive_softmax {
        line(
            out,
            &format!("  {}", n.dtype),
            &format!(
                "overflow {} (row max > {:.2}), underflow {} (row max < {:.2})",
                n.overflow_rows, n.overflow_above, n.underflow_rows, n.underflow_below
            ),
        );
    }
    let h = &t.headroom;
    line(
        out,
        "headroom",
        &format!(
            "ln(MAX) - max: f16 {}, bf16 {}, f32 {}",
            num(h.f16),
            num(h.bf16),
            num(h.f32)
        ),
    );
    let l = &t.lse;
    let max_row = l.max_row.map(|r| format!(" (row {r})")).unwrap_or_default();
    line(
        out,
        "logsumexp",
        &format!(
            "min {}, mean {}, max {}{max_row}, over {} with a finite lse",
            num(l.min),
            num(l.mean),
            num(l.max),
            plural(l.rows, "row", "rows")
        ),
    );
    line(
        out,
        "z = lse^2",
        &format!("mean {}, max {}", num(l.z_mean), num(l.z_max)),
    );
    if let Some(ce) = &t.cross_entropy {
        let ignore = match ce.ignore_index {
            Some(i) => format!("ignore index {i}"),
            None => "no ignore index".to_owned(),
        };
        line(
            out,
            "cross-entropy",
            &format!("targets {} ({ignore})", ce.targets),
        );
        line(
            out,
            "",
            &format!(
                "rows {} counted, {} ignored, {} with a non-finite loss",
                ce.rows_counted, ce.rows_ignored, ce.rows_non_finite_loss
            ),
        );
        let max_row = ce
            .loss_max_row
            .map(|r| format!(" (row {r})"))
            .unwrap_or_default();
        line(
            out,
            "",
            &format!(
                "loss mean {}, max {}{max_row}",
                num(ce.loss_mean),
                num(ce.loss_max)
            ),
        );
        let accuracy = if ce.accuracy.is_nan() {
            "n/a".to_owned()
        } else {
            format!("{:.2}%", 100.0 * ce.accuracy)
        };
        line(
            out,
            "",
            &format!(
                "accuracy {accuracy} ({} of {} rows: argmax = target)",
                ce.correct, ce.rows_counted
            ),
        );
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn thresholds() {
        // exp just below the threshold rounds to 0, just above it does not.
        for (d, min_sub) in [
            (DType::F16, f64::from(f16::from_bits(1).to_f32())),
            (DType::BF16, f64::from(bf16::from_bits(1).to_f32())),
            (DType::F32, f64::from(f32::from_bits(1))),
        ] {
            let t = underflow_threshold(d);
            assert!(((t - 0.01).exp() / min_sub) < 0.5, "{d}");
            assert!(((t + 0.01).exp() / min_sub) > 0.5, "{d}");
        }
        assert_eq!(format!("{:.2}", underflow_threshold(DType::F16)), "-17.33");
    }

    #[test]
    fn numbers() {
        assert_eq!(num(0.412_345_6), "0.41235");
        assert_eq!(num(12.0), "12");
        assert_eq!(num(-1.5e-7), "-1.5e-7");
        assert_eq!(num(123_456_789.0), "1.2346e8");
        assert_eq!(num(f64::NAN), "n/a");
        assert_eq!(num(f64::NEG_INFINITY), "-inf");
        assert_eq!(logit(DType::F16, 0.0999755859375), "0.1");
    }
}
