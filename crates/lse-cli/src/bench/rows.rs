//! The row ops' benchmark (every op but the fused linear loss): the plan of cases, their
//! buffers, the timed calls and the report.

use std::fmt::Write as _;

use indicatif::{ProgressBar, ProgressStyle};
use lse::{CrossEntropyOptions, DType, Element, GradOutput, Targets};
use serde::Serialize;

use crate::dtype::{dispatch, PerDType};
use crate::error::{CliError, Result};
use crate::format::wrap;

use super::args::{Args, KernelChoice, Op, OpChoice, Shape};
use super::inputs::{class_weights, normal_vec, soft_targets, targets, LOGIT_SCALE};
use super::timing::{best_and_median, copy_bandwidth, par_copy, timed, COPY_PASSES};
/// The largest share of the machine's memory a case's buffers may take.
const MEMORY_SHARE: f64 = 0.75;

/// The machine the benchmark ran on.
#[derive(Clone, Debug, Serialize)]
pub struct Machine {
    /// The CPU model (`model name` in `/proc/cpuinfo`, or `unknown`).
    pub cpu: String,
    /// Logical CPUs available to this process.
    pub cores: usize,
}

/// The timing of one case.
#[derive(Clone, Debug, Serialize)]
pub struct CaseResult {
    /// The op's name.
    pub op: &'static str,
    /// The dtype's name.
    pub dtype: &'static str,
    /// Rows of the logits.
    pub rows: usize,
    /// Classes per row.
    pub classes: usize,
    /// Threads of the pool the case ran in.
    pub threads: usize,
    /// The fastest timed call, in seconds.
    pub best_s: f64,
    /// The median timed call, in seconds.
    pub median_s: f64,
    /// `rows · classes / best_s / 10⁹`.
    pub gelem_s: f64,
    /// The op's bytes-moved model over `best_s`, in 10⁹ bytes per second.
    pub gbs: f64,
    /// `gbs / copy_gbs`.
    pub bandwidth_fraction: f64,
}

/// The whole report (the `--json` document).
#[derive(Clone, Debug, Serialize)]
pub struct Report {
    /// The machine.
    pub machine: Machine,
    /// Threads of the pool every timing ran in.
    pub threads: usize,
    /// The kernel family that ran (`avx512`, `avx2`, `neon`, `portable` or `scalar`).
    pub kernel: &'static str,
    /// The cross-entropy options every cross-entropy case ran with (`default` for none).
    pub ce_options: String,
    /// The copy bandwidth, bytes read + bytes written, in 10⁹ bytes per second.
    pub copy_gbs: f64,
    /// One entry per case: dtype, then shape, then op, in the order given.
    pub results: Vec<CaseResult>,
}

/// What a run does: the arguments, deduplicated and expanded.
struct Plan {
    /// The ops, in the order given.
    ops: Vec<Op>,
    /// The dtypes, in the order given.
    dtypes: Vec<DType>,
    /// The shapes, in the order given.
    shapes: Vec<Shape>,
    /// Threads of the rayon pool.
    threads: usize,
    /// Timed runs per case.
    repeats: usize,
    /// Bytes of the copy-bandwidth buffer.
    copy_bytes: usize,
    /// What the cross-entropy ops run with.
    ce: CeSetup,
}

/// The cross-entropy options of a run.
#[derive(Clone, Copy, Debug, Default)]
struct CeSetup {
    label_smoothing: f64,
    z_loss: f64,
    softcap: Option<f64>,
    class_weights: bool,
    soft_targets: bool,
    argmax: bool,
    logit_scale: f64,
}

impl CeSetup {
    /// The options, with the buffers' weights.
    fn options<'w>(&self, weights: &'w [f64]) -> CrossEntropyOptions<'w> {
        CrossEntropyOptions {
            label_smoothing: self.label_smoothing,
            z_loss: self.z_loss,
            softcap: self.softcap,
            weights: self.class_weights.then_some(weights),
            keep_row_argmax: self.argmax,
            logit_scale: self.logit_scale,
            ..CrossEntropyOptions::default()
        }
    }

    /// `smoothing=0.1,weights,...`, or `default`.
    fn describe(&self) -> String {
        let mut parts = Vec::new();
        if self.label_smoothing != 0.0 {
            parts.push(format!("label_smoothing={}", self.label_smoothing));
        }
        if self.z_loss != 0.0 {
            parts.push(format!("z_loss={}", self.z_loss));
        }
        if let Some(cap) = self.softcap {
            parts.push(format!("softcap={cap}"));
        }
        if self.class_weights {
            parts.push("class_weights".to_owned());
        }
        if self.argmax {
            parts.push("argmax".to_owned());
        }
        if self.logit_scale != 1.0 {
            parts.push(format!("logit_scale={}", self.logit_scale));
        }
        if self.soft_targets {
            parts.push("soft_targets".to_owned());
        }
        if parts.is_empty() {
            "default".to_owned()
        } else {
            parts.join(",")
        }
    }
}

/// `items` without repeats, in first-seen order.
fn dedup<T: PartialEq>(items: impl IntoIterator<Item = T>) -> Vec<T> {
    let mut out = Vec::new();
    for item in items {
        if !out.contains(&item) {
            out.push(item);
        }
    }
    out
}

impl Plan {
    /// The plan of `args` on a machine with `cores` available cores.
    fn new(args: &Args, cores: usize) -> Self {
        let ops = dedup(args.op.iter().flat_map(|choice| match choice {
            OpChoice::All => Op::ALL.to_vec(),
            OpChoice::One(op) => vec![*op],
            OpChoice::LinearCrossEntropy => vec![],
        }));
        Plan {
            ops,
            dtypes: dedup(args.dtype.iter().flat_map(|d| d.dtypes())),
            shapes: dedup(args.shape.iter().copied()),
            threads: args.threads.unwrap_or(cores),
            repeats: args.repeats,
            copy_bytes: args.copy_mib << 20,
            ce: CeSetup {
                label_smoothing: args.label_smoothing,
                z_loss: args.z_loss,
                softcap: args.softcap,
                class_weights: args.class_weights,
                soft_targets: args.soft_targets,
                argmax: args.argmax,
                logit_scale: args.logit_scale,
            },
        }
    }

    /// The bytes of the buffers alive while the cases of `dtype` and `shape` run.
    fn case_bytes(&self, dtype: DType, shape: Shape) -> usize {
        let b = elem_size(dtype);
        let n = shape.elements();
        let any = |f: fn(Op) -> bool| usize::from(self.ops.iter().any(|&op| f(op)));
        let buffers = 1 // logits
            + any(Op::needs_out)
            + 2 * any(Op::is_backward)
            + any(|op| op == Op::CrossEntropyInPlace)
            // Probability targets, and the logits they are the softmax of while being built.
            + 2 * usize::from(self.ce.soft_targets) * any(Op::is_cross_entropy);
        // Targets (i64), per-row statistics (at most 8 bytes), class weights (f64).
        let weights = usize::from(self.ce.class_weights) * shape.classes * 8;
        buffers * n * b + shape.rows * 16 + weights
    }

    /// Refuses a plan whose buffers would take more than [`MEMORY_SHARE`] of `mem_total` bytes.
    fn check_memory(&self, mem_total: Option<u64>) -> Result<()> {
        let Some(total) = mem_total else {
            return Ok(());
        };
        let limit = total as f64 * MEMORY_SHARE;
        let refuse = |what: String, bytes: usize, hint: &str| {
            CliError::usage(format!(
                "{what} needs {} of buffers, more than {:.0}% of this machine's {} of memory \
                 (MemTotal in /proc/meminfo): {hint}",
                human_bytes(bytes as f64),
                MEMORY_SHARE * 100.0,
                human_bytes(total as f64),
            ))
        };
        let copy = 2 * self.copy_bytes;
        if copy as f64 > limit {
            return Err(refuse(
                "the copy-bandwidth measurement".to_owned(),
                copy,
                "choose a smaller --copy-mib",
            ));
        }
        for &dtype in &self.dtypes {
            for &shape in &self.shapes {
                let bytes = self.case_bytes(dtype, shape);
                if bytes as f64 > limit {
                    return Err(refuse(
                        format!("shape {shape} in {dtype}"),
                        bytes,
                        "choose a smaller --shape or fewer ops",
                    ));
                }
            }
        }
        Ok(())
    }
}

/// `bytes` with a binary unit (`1.5 GiB`).
fn human_bytes(bytes: f64) -> String {
    let units = ["B", "KiB", "MiB", "GiB", "TiB", "PiB", "EiB"];
    let mut value = bytes;
    let mut unit = 0;
    while value >= 1024.0 && unit + 1 < units.len() {
        value /= 1024.0;
        unit += 1;
    }
    if unit == 0 {
        format!("{value:.0} B")
    } else if value.fract() == 0.0 {
        format!("{value:.0} {}", units[unit])
    } else {
        format!("{value:.1} {}", units[unit])
    }
}

/// The size of one element of `dtype`, in bytes.
const fn elem_size(dtype: DType) -> usize {
    match dtype {
        DType::F64 => 8,
        DType::F32 => 4,
        DType::F16 | DType::BF16 => 2,
    }
}

/// The CPU model named by `/proc/cpuinfo`, or `unknown`.
fn cpu_model() -> String {
    std::fs::read_to_string("/proc/cpuinfo")
        .ok()
        .and_then(|text| {
            text.lines().find_map(|line| {
                let (key, value) = line.split_once(':')?;
                (key.trim() == "model name" && !value.trim().is_empty())
                    .then(|| value.trim().to_owned())
            })
        })
        .unwrap_or_else(|| "unknown".to_owned())
}

/// The machine's memory in bytes (`MemTotal` in `/proc/meminfo`), if readable.
fn mem_total() -> Option<u64> {
    let text = std::fs::read_to_string("/proc/meminfo").ok()?;
    let line = text.lines().find(|l| l.starts_with("MemTotal:"))?;
    let mut fields = line["MemTotal:".len()..].split_whitespace();
    let value: u64 = fields.next()?.parse().ok()?;
    let scale = match fields.next() {
        Some("kB") => 1024,
        None => 1,
        Some(_) => return None,
    };
    value.checked_mul(scale)
}

/// The cases of one dtype and one shape, run generically over the element type by [`dispatch`].
struct DTypeCases<'a> {
    /// What to run.
    plan: &'a Plan,
    /// The shape of this group of cases.
    shape: Shape,
    /// The copy bandwidth the fractions are relative to.
    copy_gbs: f64,
    /// Where progress goes.
    progress: &'a ProgressBar,
}

/// The buffers of one dtype and shape, built once outside the timed region.
struct Buffers<E: Element> {
    /// The logits, `rows × classes`; never modified.
    logits: Vec<E>,
    /// One class target per row.
    targets: Vec<i64>,
    /// Probability targets, `rows × classes` (empty without `--soft-targets`).
    soft: Vec<E>,
    /// Class weights, one per class (empty without `--class-weights`).
    weights: Vec<f64>,
    /// Per-row statistics (logsumexp).
    stats: Vec<E::Stat>,
    /// The output of the ops that write one (empty when no selected op does).
    out: Vec<E>,
    /// The forward output the backward ops read (empty without them).
    y: Vec<E>,
    /// The incoming gradient of the backward ops (empty without them).
    dy: Vec<E>,
    /// The logits the in-place cross-entropy overwrites (empty without it).
    work: Vec<E>,
}

impl<'a> PerDType for DTypeCases<'a> {
    type Output = Result<Vec<CaseResult>>;

    fn run<E: Element>(self) -> Self::Output {
        let Shape { rows, classes, .. } = self.shape;
        let n = self.shape.elements();
        let ops = &self.plan.ops;
        let needs = |f: fn(Op) -> bool| ops.iter().any(|&op| f(op));
        let sized = |wanted: bool| {
            if wanted {
                vec![E::zero(); n]
            } else {
                Vec::new()
            }
        };
        self.progress
            .set_message(format!("{} {}: generating inputs", E::DTYPE, self.shape));
        let backward = needs(Op::is_backward);
        let mut bufs = Buffers::<E> {
            logits: normal_vec(n, 1, LOGIT_SCALE),
            targets: targets(rows, classes),
            soft: if self.plan.ce.soft_targets && needs(Op::is_cross_entropy) {
                soft_targets(rows, classes)
            } else {
                Vec::new()
            },
            weights: if self.plan.ce.class_weights {
                class_weights(classes)
            } else {
                Vec::new()
            },
            stats: vec![E::Stat::zero(); rows],
            out: sized(needs(Op::needs_out)),
            y: sized(backward),
            dy: if backward {
                normal_vec(n, 2, 1.0)
            } else {
                Vec::new()
            },
            work: sized(needs(|op| op == Op::CrossEntropyInPlace)),
        };
        let mut results = Vec::with_capacity(ops.len());
        for &op in ops {
            self.progress
                .set_message(format!("{} {} {}", E::DTYPE, self.shape, op.name()));
            let mut times = Vec::with_capacity(self.plan.repeats);
            // One warm-up, then the timed runs.
            for i in 0..=self.plan.repeats {
                let t = run_once(op, classes, &self.plan.ce, &mut bufs)?;
                if i > 0 {
                    times.push(t);
                }
            }
            let (best_s, median_s) = best_and_median(times);
            let soft = self.plan.ce.soft_targets && op.is_cross_entropy();
            let bytes =
                op.bytes_per_element(elem_size(E::DTYPE)) + usize::from(soft) * elem_size(E::DTYPE);
            let gbs = (n * bytes) as f64 / best_s / 1e9;
            results.push(CaseResult {
                op: op.name(),
                dtype: E::DTYPE.name(),
                rows,
                classes,
                threads: self.plan.threads,
                best_s,
                median_s,
                gelem_s: n as f64 / best_s / 1e9,
                gbs,
                bandwidth_fraction: gbs / self.copy_gbs,
            });
            self.progress.inc(1);
        }
        Ok(results)
    }
}

/// One call of `op`, with whatever it needs prepared outside the timed region; returns the
/// seconds the call took.
fn run_once<E: Element>(op: Op, classes: usize, ce: &CeSetup, b: &mut Buffers<E>) -> Result<f64> {
    let options = ce.options(&b.weights);
    let targets = if ce.soft_targets {
        Targets::Probabilities(&b.soft)
    } else {
        Targets::Classes(&b.targets)
    };
    match op {
        Op::Logsumexp => timed(|| lse::logsumexp(&b.logits, classes, &mut b.stats)),
        Op::Softmax => timed(|| lse::softmax(&b.logits, classes, &mut b.out)),
        Op::LogSoftmax => timed(|| lse::log_softmax(&b.logits, classes, &mut b.out)),
        Op::SoftmaxBackward => {
            lse::softmax(&b.logits, classes, &mut b.y)?;
            timed(|| lse::softmax_backward(&b.y, &b.dy, classes, &mut b.out))
        }
        Op::LogSoftmaxBackward => {
            lse::log_softmax(&b.logits, classes, &mut b.y)?;
            timed(|| lse::log_softmax_backward(&b.y, &b.dy, classes, &mut b.out))
        }
        Op::CrossEntropy => timed(|| lse::cross_entropy(&b.logits, classes, targets, &options)),
        Op::CrossEntropyGrad => timed(|| {
            lse::cross_entropy_with_grad(
                &b.logits,
                classes,
                targets,
                &options,
                GradOutput::default(),
                &mut b.out,
            )
        }),
        Op::CrossEntropyInPlace => {
            par_copy(&mut b.work, &b.logits);
            timed(|| {
                lse::cross_entropy_in_place(
                    &mut b.work,
                    classes,
                    targets,
                    &options,
                    GradOutput::default(),
                )
            })
        }
    }
}

/// The progress bar on stderr (drawn only when stderr is a terminal).
fn progress_bar(cases: u64) -> ProgressBar {
    let bar = ProgressBar::new(cases);
    if let Ok(style) =
        ProgressStyle::with_template("{spinner} bench [{bar:20}] {pos}/{len} cases  {msg}")
    {
        bar.set_style(style.progress_chars("=> "));
    }
    bar
}

/// Runs the row ops' cases of `lse bench`, appending the table (or the JSON document) to `out`; returns exit status 0.
///
/// # Errors
/// [`CliError::Usage`] for a case whose buffers would not fit the machine's memory;
/// [`CliError::Other`] when the thread pool cannot be built; library errors are passed on.
pub(super) fn run(args: &Args, cores: usize, out: &mut String) -> Result<u8> {
    if let Some(shape) = args.shape.iter().find(|s| s.dim.is_some()) {
        return Err(CliError::usage(format!(
            "shape '{shape}' has a hidden size: NxDxV shapes are for --op linear_cross_entropy"
        )));
    }
    let plan = Plan::new(args, cores);
    plan.check_memory(mem_total())?;
    let pool = rayon::ThreadPoolBuilder::new()
        .num_threads(plan.threads)
        .build()
        .map_err(|e| CliError::Other(format!("cannot start {} threads: {e}", plan.threads)))?;
    lse::set_kernel(args.kernel.kernel());
    let kernel = lse::active_kernel().name();

    let cases = plan.ops.len() * plan.dtypes.len() * plan.shapes.len();
    let progress = progress_bar(cases as u64);
    let measured = pool.install(|| -> Result<(f64, Vec<CaseResult>)> {
        progress.set_message("measuring the copy bandwidth");
        let copy_gbs = copy_bandwidth(plan.copy_bytes);
        let mut results = Vec::with_capacity(cases);
        for &dtype in &plan.dtypes {
            for &shape in &plan.shapes {
                let job = DTypeCases {
                    plan: &plan,
                    shape,
                    copy_gbs,
                    progress: &progress,
                };
                results.extend(dispatch(dtype, job)?);
            }
        }
        Ok((copy_gbs, results))
    });
    progress.finish_and_clear();
    let (copy_gbs, results) = measured?;

    let report = Report {
        machine: Machine {
            cpu: cpu_model(),
            cores,
        },
        threads: plan.threads,
        kernel,
        ce_options: plan.ce.describe(),
        copy_gbs,
        results,
    };
    if args.json {
        let json = serde_json::to_string_pretty(&report)
            .map_err(|e| CliError::Other(format!("cannot write the JSON report: {e}")))?;
        out.push_str(&json);
        out.push('\n');
    } else {
        render(&report, &plan, args.kernel, out);
    }
    Ok(0)
}

/// Milliseconds with about four significant digits.
fn millis(seconds: f64) -> String {
    let ms = seconds * 1e3;
    match ms {
        m if m >= 100.0 => format!("{m:.1}"),
        m if m >= 10.0 => format!("{m:.2}"),
        m if m >= 1.0 => format!("{m:.3}"),
        m => format!("{m:.4}"),
    }
}

/// A rate with about three significant digits.
fn rate(v: f64) -> String {
    match v {
        v if v >= 100.0 => format!("{v:.0}"),
        v if v >= 10.0 => format!("{v:.1}"),
        v if v >= 1.0 => format!("{v:.2}"),
        v => format!("{v:.3}"),
    }
}

/// A fraction as a percentage: `45%`, `3.2%`.
fn percent(fraction: f64) -> String {
    let p = fraction * 100.0;
    if p >= 10.0 {
        format!("{p:.0}%")
    } else {
        format!("{p:.1}%")
    }
}

/// The table report.
fn render(report: &Report, plan: &Plan, requested: KernelChoice, out: &mut String) {
    let requested = requested.kernel().name();
    let kernel = if requested == "auto" || requested == report.kernel {
        report.kernel.to_owned()
    } else {
        format!("{} (requested {requested})", report.kernel)
    };
    let m = &report.machine;
    let _ = writeln!(out, "lse bench");
    out.push_str(&wrap(
        &format!(
            "CPU: {}, {} cores; {} threads; kernel {kernel}; cross-entropy options: {}",
            m.cpu, m.cores, report.threads, report.ce_options
        ),
        2,
        4,
    ));
    out.push_str(&wrap(
        &format!(
            "Copy bandwidth: {:.1} GB/s ({} u8 buffer copied into another by {} threads, bytes \
             read + bytes written, best of {COPY_PASSES}). 'of copy' is each op's GB/s relative \
             to it.",
            report.copy_gbs,
            human_bytes(plan.copy_bytes as f64),
            report.threads
        ),
        2,
        4,
    ));
    out.push_str(&wrap(
        &format!(
            "Times: best and median of {} runs after 1 warm-up. GB/s counts the bytes each op \
             must move (see lse bench --help).",
            plan.repeats
        ),
        2,
        4,
    ));
    out.push('\n');

    let headers = [
        "op",
        "dtype",
        "rows",
        "classes",
        "best ms",
        "median ms",
        "Gelem/s",
        "GB/s",
        "of copy",
    ];
    let rows: Vec<[String; 9]> = report
        .results
        .iter()
        .map(|r| {
            [
                r.op.to_owned(),
                r.dtype.to_owned(),
                r.rows.to_string(),
                r.classes.to_string(),
                millis(r.best_s),
                millis(r.median_s),
                rate(r.gelem_s),
                rate(r.gbs),
                percent(r.bandwidth_fraction),
            ]
        })
        .collect();
    let widths: Vec<usize> = (0..headers.len())
        .map(|j| {
            rows.iter()
                .map(|r| r[j].len())
                .chain([headers[j].len()])
                .max()
                .unwrap_or(0)
        })
        .collect();
    // The op and dtype columns are text, left-aligned; the numbers are right-aligned.
    let line = |cells: &[&str]| {
        let mut s = String::new();
        for (j, (cell, w)) in cells.iter().zip(&widths).enumerate() {
            s.push_str("  ");
            if j < 2 {
                s.push_str(&format!("{cell:<w$}"));
            } else {
                s.push_str(&format!("{cell:>w$}"));
            }
        }
        s.trim_end().to_owned()
    };
    let _ = writeln!(out, "{}", line(&headers));
    for r in &rows {
        let cells: Vec<&str> = r.iter().map(String::as_str).collect();
        let _ = writeln!(out, "{}", line(&cells));
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn memory_check_refuses_what_does_not_fit() {
        let plan = Plan {
            ops: Op::ALL.to_vec(),
            dtypes: vec![DType::F32],
            shapes: vec![Shape {
                rows: 1000,
                classes: 1000,
                dim: None,
            }],
            threads: 1,
            repeats: 1,
            copy_bytes: 1 << 20,
            ce: CeSetup::default(),
        };
        // logits, out, y, dy and work: 5 buffers of 4 MB, plus targets and statistics.
        let bytes = plan.case_bytes(DType::F32, plan.shapes[0]);
        assert_eq!(bytes, 5 * 4_000_000 + 16_000);
        assert!(plan.check_memory(None).is_ok());
        assert!(plan.check_memory(Some(1 << 40)).is_ok());
        let e = plan.check_memory(Some(16_000_000)).unwrap_err().to_string();
        assert!(e.contains("1000x1000") && e.contains("f32"), "{e}");
    }

    #[test]
    fn human_bytes_units() {
        assert_eq!(human_bytes(512.0), "512 B");
        assert_eq!(human_bytes(f64::from(512u32 << 20)), "512 MiB");
        assert_eq!(percent(0.4567), "46%");
        assert_eq!(percent(0.0321), "3.2%");
        assert_eq!(human_bytes(1.5 * 1024.0 * 1024.0 * 1024.0), "1.5 GiB");
    }
}
