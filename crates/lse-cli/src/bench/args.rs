//! The arguments of `lse bench`: ops, shapes, dtypes, threads, kernels.

use crate::dtype::parse_selection;
use crate::error::Result;
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

    /// Cross-entropy ops: also return each row's argmax and the token accuracy
    #[arg(long)]
    pub argmax: bool,

    /// Cross-entropy ops: multiply the logits by S inside the kernel (a temperature's 1/T)
    #[arg(long, value_name = "S", default_value_t = 1.0)]
    pub logit_scale: f64,

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
    pub(super) const fn is_cross_entropy(self) -> bool {
        matches!(
            self,
            Op::CrossEntropy | Op::CrossEntropyGrad | Op::CrossEntropyInPlace
        )
    }

    /// Whether the op writes into an output buffer of the logits' shape.
    pub(super) const fn needs_out(self) -> bool {
        !matches!(
            self,
            Op::Logsumexp | Op::CrossEntropy | Op::CrossEntropyInPlace
        )
    }

    /// Whether the op reads `y` and `dy`.
    pub(super) const fn is_backward(self) -> bool {
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
    /// ([`super::linear`]).
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
    pub(super) fn kernel(self) -> lse::Kernel {
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
}
