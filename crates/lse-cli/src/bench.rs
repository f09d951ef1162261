//! `lse bench`: time the library's ops on chosen shapes, dtypes and thread counts, and compare
//! their throughput with this machine's copy bandwidth, measured in the same run.
//!
//! Every case runs one untimed warm-up and `--repeats` timed calls inside a rayon pool of
//! `--threads` threads; inputs (logits, targets, `y`, `dy`) and outputs are built once per
//! (dtype, shape) outside the timed region. Throughput is reported as elements per second and as
//! GB/s under a bytes-moved model (the bytes each op must read and write per element, see
//! [`Op::bytes_per_element`]), and as a fraction of the copy bandwidth: the rate at which the
//! same threads copy a `--copy-mib` buffer of bytes into another, counting bytes read plus bytes
//! written.

use std::fmt::Write as _;
use std::hint::black_box;
use std::time::Instant;

use indicatif::{ProgressBar, ProgressStyle};
use lse::{CrossEntropyOptions, DType, Element, GradOutput, Targets};
use rayon::prelude::*;
use serde::Serialize;

use crate::dtype::{dispatch, parse_selection, PerDType};
use crate::error::{CliError, Result};
use crate::format::wrap;

/// The long help of `lse bench`, after the options.
pub const AFTER_LONG_HELP: &str = "\
What it measures:
  Each case (op x dtype x shape) runs 1 untimed warm-up and --repeats timed calls; the report
  gives the best and the median time. Logits are N(0, 1) * 3 from a fixed seed, class targets
  uniform in 0..classes, dy N(0, 1), and y the softmax (log_softmax) of the logits for
  softmax_backward (log_softmax_backward); all are built once per dtype and shape, outside the
  timed region, as are the output buffers. cross_entropy_in_place gets its logits back from a
  pristine copy before each call, outside the timed region. Every timing runs inside a rayon
  pool of --threads threads (the library parallelises over rows with rayon).

  Gelem/s = rows * classes / best time. GB/s (10^9 bytes per second) counts the bytes each op
  must move per element, b being the element size (8 f64, 4 f32, 2 f16 and bf16):
    logsumexp, cross_entropy                          read b
    softmax, log_softmax, cross_entropy_grad,
    cross_entropy_in_place                            read b + write b
    softmax_backward, log_softmax_backward            read 2b + write b
  (class targets and per-row outputs are not counted; --soft-targets adds a read of b to the
  cross-entropy ops).

  'of copy' (bandwidth_fraction in JSON) is that GB/s divided by the copy bandwidth of this
  machine, measured in the same run with the same threads: a 512 MiB buffer of bytes copied
  into another in parallel chunks (copy_from_slice), best of 5 copies after a warm-up,
  counting bytes read + bytes written (2 x 512 MiB per copy). A memory-bound op near 100% runs
  at the speed of a plain copy.

Ops: logsumexp, softmax, log_softmax, softmax_backward, log_softmax_backward, cross_entropy
(loss only, lse::cross_entropy), cross_entropy_grad (loss and gradient,
lse::cross_entropy_with_grad), cross_entropy_in_place (lse::cross_entropy_in_place), or all.

JSON (--json): {\"machine\": {\"cpu\", \"cores\"}, \"threads\", \"kernel\", \"ce_options\", \"copy_gbs\", \"results\":
[{\"op\", \"dtype\", \"rows\", \"classes\", \"threads\", \"best_s\", \"median_s\", \"gelem_s\", \"gbs\",
\"bandwidth_fraction\"}]}.

A case whose buffers would take more than 75% of the machine's memory (MemTotal in
/proc/meminfo) is refused before anything runs (exit status 2), as is a bad --shape.

Examples:
  lse bench                                         the default ops, f32, 4096x32000
  lse bench --op all --dtype f32,bf16 --shape 4096x32000,65536x1000
  lse bench --threads 1 --kernel scalar             one thread, the scalar reference kernel
  lse bench --json > bench.json                     one JSON document";

/// How large the copy buffer is by default, in MiB.
const DEFAULT_COPY_MIB: usize = 512;
/// Timed copies of the copy-bandwidth measurement (the best counts).
const COPY_PASSES: usize = 5;
/// Bytes per chunk of the parallel copies.
const COPY_CHUNK: usize = 1 << 20;
/// Elements per chunk of the parallel random fill (each chunk has its own random stream, so the
/// data does not depend on the thread count).
const FILL_CHUNK: usize = 1 << 16;
/// The largest share of the machine's memory a case's buffers may take.
const MEMORY_SHARE: f64 = 0.75;
/// The seed of the inputs.
const SEED: u64 = 0x6c73_655f_6265_6e63;
/// The standard deviation of the logits.
const LOGIT_SCALE: f64 = 3.0;
/// The shortest time a call is taken to last, so that rates stay finite.
const MIN_SECONDS: f64 = 1e-9;

/// Arguments of `lse bench`.
#[derive(Debug, clap::Args)]
#[command(after_long_help = AFTER_LONG_HELP)]
pub struct Args {
    /// Ops to time, comma-separated: logsumexp, softmax, log_softmax, softmax_backward,
    /// log_softmax_backward, cross_entropy (loss only), cross_entropy_grad (loss and gradient),
    /// cross_entropy_in_place, or all; or linear_cross_entropy alone (with --shape NxDxV: the
    /// fused linear cross-entropy forward + backward beside the matrix crate on its products)
    #[arg(
        long,
        value_name = "OPS",
        value_delimiter = ',',
        value_parser = parse_op,
        default_value = "logsumexp,softmax,log_softmax,cross_entropy_grad",
    )]
    pub op: Vec<OpChoice>,

    /// Dtypes, comma-separated: f64, f32, f16, bf16, or all
    #[arg(
        long,
        short,
        value_name = "DTYPES",
        value_delimiter = ',',
        value_parser = parse_selection,
        default_value = "f32",
    )]
    pub dtype: Vec<crate::dtype::DTypeSelection>,

    /// Shapes ROWSxCLASSES, comma-separated
    #[arg(
        long,
        value_name = "ROWSxCLASSES",
        value_delimiter = ',',
        value_parser = parse_shape,
        default_value = "4096x32000",
    )]
    pub shape: Vec<Shape>,

    /// Threads of the rayon pool every timing (and the copy bandwidth) runs in [default: the
    /// number of available cores]
    #[arg(long, value_name = "N", value_parser = parse_positive)]
    pub threads: Option<usize>,

    /// Kernel family: auto (the fastest this CPU supports), scalar, portable, avx2, avx512 or
    /// neon (a family the CPU lacks falls back to the widest it has; the report names the
    /// kernel that ran)
    #[arg(long, value_name = "KERNEL", value_enum, default_value_t = KernelChoice::Auto)]
    pub kernel: KernelChoice,

    /// Timed runs per case (after one untimed warm-up)
    #[arg(long, value_name = "N", default_value_t = 10, value_parser = parse_positive)]
    pub repeats: usize,

    /// Cross-entropy ops: label smoothing in [0, 1]
    #[arg(long, value_name = "EPS", default_value_t = 0.0)]
    pub label_smoothing: f64,

    /// Cross-entropy ops: z-loss coefficient (>= 0)
    #[arg(long, value_name = "Z", default_value_t = 0.0)]
    pub z_loss: f64,

    /// Cross-entropy ops: soft-cap the logits at CAP (cap * tanh(x / cap))
    #[arg(long, value_name = "CAP")]
    pub softcap: Option<f64>,

    /// Cross-entropy ops: class weights 2^U(-1, 1), fixed seed
    #[arg(long)]
    pub class_weights: bool,

    /// Cross-entropy ops: probability targets (the softmax of N(0, 1) * 3 logits of another
    /// seed) instead of class targets; they are read beside the logits
    #[arg(long)]
    pub soft_targets: bool,

    /// Print one JSON document instead of the table (its fields are listed below)
    #[arg(long)]
    pub json: bool,

    /// Size of the copy-bandwidth buffer in MiB (smaller for quick tests)
    #[arg(long, value_name = "MIB", default_value_t = DEFAULT_COPY_MIB, value_parser = parse_positive, hide = true)]
    pub copy_mib: usize,
}

/// An op of the library that `lse bench` times.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Op {
    /// [`lse::logsumexp`].
    Logsumexp,
    /// [`lse::softmax`].
    Softmax,
    /// [`lse::log_softmax`].
    LogSoftmax,
    /// [`lse::softmax_backward`].
    SoftmaxBackward,
    /// [`lse::log_softmax_backward`].
    LogSoftmaxBackward,
    /// [`lse::cross_entropy`]: the loss only.
    CrossEntropy,
    /// [`lse::cross_entropy_with_grad`]: the loss and its gradient.
    CrossEntropyGrad,
    /// [`lse::cross_entropy_in_place`]: the loss, and the gradient over the logits.
    CrossEntropyInPlace,
}

impl Op {
    /// Every op, in the order `all` runs them.
    pub const ALL: [Op; 8] = [
        Op::Logsumexp,
        Op::Softmax,
        Op::LogSoftmax,
        Op::SoftmaxBackward,
        Op::LogSoftmaxBackward,
        Op::CrossEntropy,
        Op::CrossEntropyGrad,
        Op::CrossEntropyInPlace,
    ];

    /// The name on the command line and in reports.
    pub const fn name(self) -> &'static str {
        match self {
            Op::Logsumexp => "logsumexp",
            Op::Softmax => "softmax",
            Op::LogSoftmax => "log_softmax",
            Op::SoftmaxBackward => "softmax_backward",
            Op::LogSoftmaxBackward => "log_softmax_backward",
            Op::CrossEntropy => "cross_entropy",
            Op::CrossEntropyGrad => "cross_entropy_grad",
            Op::CrossEntropyInPlace => "cross_entropy_in_place",
        }
    }

    /// The bytes the op must move per element of `elem_size` bytes: what it reads plus what it
    /// writes (targets and per-row outputs not counted).
    pub const fn bytes_per_element(self, elem_size: usize) -> usize {
        let (reads, writes) = match self {
            Op::Logsumexp | Op::CrossEntropy => (1, 0),
            Op::Softmax | Op::LogSoftmax | Op::CrossEntropyGrad | Op::CrossEntropyInPlace => (1, 1),
            Op::SoftmaxBackward | Op::LogSoftmaxBackward => (2, 1),
        };
        (reads + writes) * elem_size
    }

    /// Whether the op is one of the cross-entropy ops (which take the CE options).
    const fn is_cross_entropy(self) -> bool {
        matches!(
            self,
            Op::CrossEntropy | Op::CrossEntropyGrad | Op::CrossEntropyInPlace
        )
    }

    /// Whether the op writes into an output buffer of the logits' shape.
    const fn needs_out(self) -> bool {
        !matches!(
            self,
            Op::Logsumexp | Op::CrossEntropy | Op::CrossEntropyInPlace
        )
    }

    /// Whether the op reads `y` and `dy`.
    const fn is_backward(self) -> bool {
        matches!(self, Op::SoftmaxBackward | Op::LogSoftmaxBackward)
    }
}

/// A value of `--op`: one op or all of them.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum OpChoice {
    /// `all`: every op.
    All,
    /// One op.
    One(Op),
    /// `linear_cross_entropy`: the fused linear cross-entropy, benchmarked on its own
    /// ([`crate::bench_linear`]).
    LinearCrossEntropy,
}

/// The clap value parser of `--op` (one name, any case).
fn parse_op(s: &str) -> Result<OpChoice, String> {
    if s.eq_ignore_ascii_case("all") {
        return Ok(OpChoice::All);
    }
    if s.eq_ignore_ascii_case("linear_cross_entropy") {
        return Ok(OpChoice::LinearCrossEntropy);
    }
    Op::ALL
        .into_iter()
        .find(|op| op.name().eq_ignore_ascii_case(s))
        .map(OpChoice::One)
        .ok_or_else(|| {
            let names: Vec<&str> = Op::ALL.iter().map(|op| op.name()).collect();
            format!(
                "unknown op {s:?}: expected one of {}, all",
                names.join(", ")
            )
        })
}

/// A `rows × classes` shape (`rows × dim × classes` for the linear cross-entropy).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct Shape {
    /// Rows.
    pub rows: usize,
    /// Classes per row.
    pub classes: usize,
    /// The hidden size `D` of `--op linear_cross_entropy` (`NxDxV`).
    pub dim: Option<usize>,
}

impl Shape {
    /// `rows · classes` (checked at parse time not to overflow).
    pub fn elements(self) -> usize {
        self.rows * self.classes
    }
}

impl std::fmt::Display for Shape {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self.dim {
            Some(dim) => write!(f, "{}x{}x{}", self.rows, dim, self.classes),
            None => write!(f, "{}x{}", self.rows, self.classes),
        }
    }
}

/// The clap value parser of `--shape`: `ROWSxCLASSES`, both at least 1, or `ROWSxDIMxCLASSES`
/// (the linear cross-entropy's tokens × hidden size × classes).
fn parse_shape(s: &str) -> Result<Shape, String> {
    let bad = |why: &str| format!("bad shape {s:?}: {why}");
    let parts: Vec<&str> = s.trim().split(['x', 'X']).collect();
    let number = |t: &str, what: &str| {
        t.trim()
            .parse::<usize>()
            .map_err(|_| bad(&format!("{what} {t:?} is not a whole number")))
    };
    let shape = match parts[..] {
        [rows, classes] => Shape {
            rows: number(rows, "rows")?,
            classes: number(classes, "classes")?,
            dim: None,
        },
        [rows, dim, classes] => Shape {
            rows: number(rows, "rows")?,
            classes: number(classes, "classes")?,
            dim: Some(number(dim, "hidden size")?),
        },
        _ => {
            return Err(bad(
                "expected ROWSxCLASSES, like 4096x32000 (or NxDxV, like 4096x1024x32000)",
            ))
        }
    };
    if shape.rows == 0 || shape.classes == 0 || shape.dim == Some(0) {
        return Err(bad("rows, classes and hidden size must all be at least 1"));
    }
    // Room for a copy of the logits in the widest dtype, so that no byte count overflows later.
    match shape.rows.checked_mul(shape.classes) {
        Some(n) if n.checked_mul(64).is_some() => Ok(shape),
        _ => Err(bad("too many elements")),
    }
}

/// The clap value parser of counts that must be at least 1.
fn parse_positive(s: &str) -> Result<usize, String> {
    match s.parse::<usize>() {
        Ok(n) if n >= 1 => Ok(n),
        _ => Err("expected a whole number of at least 1".to_owned()),
    }
}

/// A value of `--kernel`.
#[derive(Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum)]
pub enum KernelChoice {
    /// The fastest kernel this CPU supports.
    Auto,
    /// The scalar reference.
    Scalar,
    /// The vector kernel over plain arrays (every target).
    Portable,
    /// AVX2 + FMA + F16C.
    Avx2,
    /// AVX-512 F/BW/DQ/VL.
    Avx512,
    /// aarch64 NEON.
    Neon,
}

impl KernelChoice {
    /// The library's kernel family.
    fn kernel(self) -> lse::Kernel {
        match self {
            KernelChoice::Auto => lse::Kernel::Auto,
            KernelChoice::Scalar => lse::Kernel::Scalar,
            KernelChoice::Portable => lse::Kernel::Portable,
            KernelChoice::Avx2 => lse::Kernel::Avx2,
            KernelChoice::Avx512 => lse::Kernel::Avx512,
            KernelChoice::Neon => lse::Kernel::Neon,
        }
    }
}

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
}

impl CeSetup {
    /// The options, with the buffers' weights.
    fn options<'w>(&self, weights: &'w [f64]) -> CrossEntropyOptions<'w> {
        CrossEntropyOptions {
            label_smoothing: self.label_smoothing,
            z_loss: self.z_loss,
            softcap: self.softcap,
            weights: self.class_weights.then_some(weights),
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

/// The splitmix64 generator: a small, fast, well-mixed stream of 64-bit values.
#[derive(Clone, Debug)]
struct SplitMix64(u64);

impl SplitMix64 {
    /// The stream of chunk `chunk` of input `stream` (a different stream per chunk, so that a
    /// parallel fill gives the same data whatever the thread count).
    fn for_chunk(stream: u64, chunk: usize) -> Self {
        let mut mixer = SplitMix64(SEED ^ stream.wrapping_mul(0xD1B5_4A32_D192_ED03));
        let base = mixer.next_u64();
        let mut rng = SplitMix64(base ^ (chunk as u64).wrapping_mul(0x9E37_79B9_7F4A_7C15));
        rng.next_u64();
        rng
    }

    /// The next value of the stream.
    fn next_u64(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9E37_79B9_7F4A_7C15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        z ^ (z >> 31)
    }

    /// Uniform in the open interval (0, 1).
    fn uniform(&mut self) -> f64 {
        ((self.next_u64() >> 11) as f64 + 0.5) * (1.0 / (1u64 << 53) as f64)
    }

    /// Two independent N(0, 1) values (Box–Muller).
    fn normal_pair(&mut self) -> (f64, f64) {
        let r = (-2.0 * self.uniform().ln()).sqrt();
        let theta = std::f64::consts::TAU * self.uniform();
        (r * theta.cos(), r * theta.sin())
    }

    /// Uniform in `0..n` (multiply-shift; the bias is below 2⁻³² for any `n` that fits memory).
    fn below(&mut self, n: usize) -> usize {
        ((u128::from(self.next_u64()) * n as u128) >> 64) as usize
    }
}

/// `len` values N(0, 1) · `scale` of stream `stream`, in parallel chunks.
pub(crate) fn normal_vec<E: Element>(len: usize, stream: u64, scale: f64) -> Vec<E> {
    let mut data = vec![E::zero(); len];
    data.par_chunks_mut(FILL_CHUNK)
        .enumerate()
        .for_each(|(chunk, values)| {
            let mut rng = SplitMix64::for_chunk(stream, chunk);
            for pair in values.chunks_mut(2) {
                let (a, b) = rng.normal_pair();
                pair[0] = E::from_f64(a * scale);
                if let Some(v) = pair.get_mut(1) {
                    *v = E::from_f64(b * scale);
                }
            }
        });
    data
}

/// `rows` class targets uniform in `0..classes`.
/// Probability targets: the softmax of each row of N(0, 1) · [`LOGIT_SCALE`] logits of stream 4.
fn soft_targets<E: Element>(rows: usize, classes: usize) -> Vec<E> {
    let logits = normal_vec::<E>(rows * classes, 4, LOGIT_SCALE);
    let mut soft = vec![E::zero(); rows * classes];
    lse::softmax(&logits, classes, &mut soft).expect("finite logits");
    soft
}

/// Class weights `2^U(−1, 1)` (stream 5).
fn class_weights(classes: usize) -> Vec<f64> {
    let mut rng = SplitMix64::for_chunk(5, 0);
    (0..classes)
        .map(|_| (2.0 * rng.uniform() - 1.0).exp2())
        .collect()
}

pub(crate) fn targets(rows: usize, classes: usize) -> Vec<i64> {
    let mut data = vec![0i64; rows];
    data.par_chunks_mut(FILL_CHUNK)
        .enumerate()
        .for_each(|(chunk, values)| {
            let mut rng = SplitMix64::for_chunk(3, chunk);
            for v in values {
                *v = rng.below(classes) as i64;
            }
        });
    data
}

/// `dst.copy_from_slice(src)` by the threads of the current rayon pool, in chunks of about
/// [`COPY_CHUNK`] bytes.
fn par_copy<T: Copy + Send + Sync>(dst: &mut [T], src: &[T]) {
    let chunk = (COPY_CHUNK / std::mem::size_of::<T>().max(1)).max(1);
    dst.par_chunks_mut(chunk)
        .zip(src.par_chunks(chunk))
        .for_each(|(d, s)| d.copy_from_slice(s));
}

/// The copy bandwidth of the current rayon pool in 10⁹ bytes per second: a buffer of `bytes`
/// bytes copied into another, best of [`COPY_PASSES`] after a warm-up, counting bytes read plus
/// bytes written.
fn copy_bandwidth(bytes: usize) -> f64 {
    let mut src = vec![0u8; bytes];
    // Non-zero data, written so that every page is really mapped.
    src.par_chunks_mut(COPY_CHUNK)
        .enumerate()
        .for_each(|(i, c)| c.fill((i as u8) | 1));
    let mut dst = vec![0u8; bytes];
    par_copy(&mut dst, &src); // warm-up: maps the destination's pages
    let best = (0..COPY_PASSES)
        .map(|_| {
            let start = Instant::now();
            par_copy(&mut dst, &src);
            black_box(&mut dst);
            start.elapsed().as_secs_f64()
        })
        .fold(f64::INFINITY, f64::min);
    2.0 * bytes as f64 / best.max(MIN_SECONDS) / 1e9
}

/// Seconds taken by `call` (its result kept from the optimiser).
fn timed<T>(call: impl FnOnce() -> lse::Result<T>) -> Result<f64> {
    let start = Instant::now();
    let out = call()?;
    let seconds = start.elapsed().as_secs_f64();
    black_box(out);
    Ok(seconds.max(MIN_SECONDS))
}

/// The best and the median of `times` (not empty).
pub(crate) fn best_and_median(mut times: Vec<f64>) -> (f64, f64) {
    times.sort_by(f64::total_cmp);
    let n = times.len();
    let median = if n % 2 == 1 {
        times[n / 2]
    } else {
        (times[n / 2 - 1] + times[n / 2]) / 2.0
    };
    (times[0], median)
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

/// Runs `lse bench`, appending the table (or the JSON document) to `out`; returns exit status 0.
///
/// # Errors
/// [`CliError::Usage`] for a case whose buffers would not fit the machine's memory;
/// [`CliError::Other`] when the thread pool cannot be built; library errors are passed on.
pub fn run(args: &Args, out: &mut String) -> Result<u8> {
    let cores = std::thread::available_parallelism().map_or(1, usize::from);
    if args.op.contains(&OpChoice::LinearCrossEntropy) {
        if args.op.len() > 1 {
            return Err(CliError::usage(
                "--op linear_cross_entropy runs alone (its shapes are NxDxV)",
            ));
        }
        return crate::bench_linear::run(args, args.threads.unwrap_or(cores), out);
    }
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
    fn shapes_parse_and_bad_ones_are_named() {
        assert_eq!(
            parse_shape("4096x32000"),
            Ok(Shape {
                rows: 4096,
                classes: 32000,
                dim: None,
            })
        );
        assert_eq!(parse_shape("2X3").map(|s| s.elements()), Ok(6));
        let linear = parse_shape("4x8x16").unwrap();
        assert_eq!((linear.rows, linear.dim, linear.classes), (4, Some(8), 16));
        assert_eq!(linear.to_string(), "4x8x16");
        for bad in [
            "4096", "0x10", "10x0", "ax3", "3xb", "1x2x3x4", "1x0x3", "", "x", "-1x3",
        ] {
            let e = parse_shape(bad).unwrap_err();
            assert!(e.contains(&format!("{bad:?}")), "{bad}: {e}");
        }
        assert!(parse_shape(&format!("{}x{}", usize::MAX, 2)).is_err());
    }

    #[test]
    fn ops_parse() {
        assert_eq!(parse_op("ALL"), Ok(OpChoice::All));
        for op in Op::ALL {
            assert_eq!(parse_op(op.name()), Ok(OpChoice::One(op)));
        }
        assert!(parse_op("softplus").unwrap_err().contains("softplus"));
    }

    #[test]
    fn bytes_model() {
        assert_eq!(Op::Logsumexp.bytes_per_element(4), 4);
        assert_eq!(Op::CrossEntropy.bytes_per_element(2), 2);
        assert_eq!(Op::Softmax.bytes_per_element(8), 16);
        assert_eq!(Op::CrossEntropyInPlace.bytes_per_element(4), 8);
        assert_eq!(Op::LogSoftmaxBackward.bytes_per_element(2), 6);
    }

    #[test]
    fn median_of_odd_and_even_counts() {
        assert_eq!(best_and_median(vec![3.0, 1.0, 2.0]), (1.0, 2.0));
        assert_eq!(best_and_median(vec![4.0, 1.0, 2.0, 3.0]), (1.0, 2.5));
        assert_eq!(best_and_median(vec![5.0]), (5.0, 5.0));
    }

    #[test]
    fn random_inputs_are_deterministic_and_plausible() {
        let a: Vec<f32> = normal_vec(100_003, 1, LOGIT_SCALE);
        let b: Vec<f32> = rayon::ThreadPoolBuilder::new()
            .num_threads(1)
            .build()
            .unwrap()
            .install(|| normal_vec(100_003, 1, LOGIT_SCALE));
        assert_eq!(a, b);
        let n = a.len() as f64;
        let mean = a.iter().map(|&v| f64::from(v)).sum::<f64>() / n;
        let var = a
            .iter()
            .map(|&v| (f64::from(v) - mean).powi(2))
            .sum::<f64>()
            / n;
        assert!(mean.abs() < 0.05, "{mean}");
        assert!((var.sqrt() - LOGIT_SCALE).abs() < 0.05, "{var}");
        let t = targets(10_000, 7);
        assert!(t.iter().all(|&c| (0..7).contains(&c)));
        assert!((0..7).all(|c| t.contains(&c)));
    }

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
