//! The arguments of `lse eval`, their help, and the checks made before anything is read.

use std::path::{Path, PathBuf};

use lse::{CrossEntropyOptions, NonFinite, Reduction};

use crate::error::{CliError, Result};
use crate::input::{parse_ignore_index, IgnoreIndex};

/// The description of `lse eval`, shown by `--help` after the options.
macro_rules! description {
    () => {
        "\
Apply one stable op of the lse library to a dumped tensor and write the result as .npy: bit for
bit what the library returns.

INPUT is a .npy or .safetensors file of logits (f64, f32, f16 or bf16); in a .safetensors file
the tensor is the one named by --tensor, or the only float tensor. The classes are on the last
axis unless --axis says otherwise (a non-last class axis is moved last by a copy, and moved back
in the outputs).

Outputs (--out, and --grad for cross_entropy), little-endian .npy version 1.0:
  logsumexp       one value per row: the input's shape without the class axis; f32 (f64 for
                  f64 input)
  softmax,        the input's shape and dtype ('<f8', '<f4', '<f2'; bf16 as described below)
  log_softmax
  cross_entropy   --reduction none: the per-row losses, the input's shape without the class
                  axis; sum or mean (default): a 0-d array (shape ()), as np.save(loss.item())
                  would write it; f32 (f64 for f64 input). Ignored rows have loss 0.
  --grad          the gradient of the reduced loss with respect to the logits, with incoming
                  gradient 1 (for --reduction none: of the sum of the row losses); the input's
                  shape and dtype. Ignored rows get 0.

bf16 is not a NumPy type. A bf16 output is written the way the input described bf16: descr
'bfloat16' for a .npy input with that descr (loads in NumPy once ml_dtypes is imported), and
the 2-byte void descr '<V2' otherwise (a .npy read with --void-as-bf16, a .safetensors BF16
tensor): what np.save writes for ml_dtypes.bfloat16; np.load(f).view(ml_dtypes.bfloat16) gives
the numbers back.

NaN and +inf logits are an error (naming row and column) unless --non-finite propagate, which
turns the outputs of the affected rows to NaN; -inf is a mask. Targets (.npy of integer class
indices, one per row in the order of the rows once the class axis is last) must be classes or the
ignore index. Any error prints one line on stderr and exits with status 2, writing nothing."
    };
}

/// The examples of `lse eval`.
macro_rules! examples {
    () => {
        "\
Examples:
  lse eval --op softmax logits.npy --out probs.npy
  lse eval --op logsumexp dump.safetensors --tensor logits --out lse.npy
  lse eval --op cross_entropy logits.npy --targets labels.npy --out loss.npy --grad dlogits.npy
  lse eval --op cross_entropy logits.npy --targets labels.npy --reduction none \\
           --label-smoothing 0.1 --z-loss 1e-4 --softcap 30 --weights w.npy --out losses.npy
  lse eval --op linear_cross_entropy --hidden h.npy --weight w.npy --bias b.npy \
           --targets labels.npy --out loss.npy --grad-hidden dh.npy --grad-weight dw.npy"
    };
}

/// What `lse eval -h` shows after the options: the examples.
pub const AFTER_HELP: &str = examples!();

/// What `lse eval --help` shows after the options: the description, then the examples.
pub const AFTER_LONG_HELP: &str = concat!("Description:\n", description!(), "\n\n", examples!());

/// The op to apply.
#[derive(Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum)]
pub enum Op {
    /// One logsumexp per row
    #[value(name = "logsumexp")]
    Logsumexp,
    /// Softmax over the classes
    #[value(name = "softmax")]
    Softmax,
    /// log_softmax over the classes
    #[value(name = "log_softmax", alias = "log-softmax")]
    LogSoftmax,
    /// Softmax cross-entropy against class targets (needs --targets)
    #[value(name = "cross_entropy", alias = "cross-entropy")]
    CrossEntropy,
    /// The fused linear cross-entropy of hidden states INPUT through --weight [--bias] (needs
    /// --targets)
    #[value(name = "linear_cross_entropy", alias = "linear-cross-entropy")]
    LinearCrossEntropy,
}

impl Op {
    pub(super) fn name(self) -> &'static str {
        match self {
            Op::Logsumexp => "logsumexp",
            Op::Softmax => "softmax",
            Op::LogSoftmax => "log_softmax",
            Op::CrossEntropy => "cross_entropy",
            Op::LinearCrossEntropy => "linear_cross_entropy",
        }
    }
}

/// The value of `--reduction`.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, clap::ValueEnum)]
pub enum ReductionArg {
    /// One loss per row
    None,
    /// The sum of the row losses
    Sum,
    /// The (weighted) mean over the rows that are not ignored
    #[default]
    Mean,
}

impl From<ReductionArg> for Reduction {
    fn from(r: ReductionArg) -> Self {
        match r {
            ReductionArg::None => Reduction::None,
            ReductionArg::Sum => Reduction::Sum,
            ReductionArg::Mean => Reduction::Mean,
        }
    }
}

/// The value of `--non-finite`.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, clap::ValueEnum)]
pub enum Policy {
    /// A NaN or +inf logit is an error
    #[default]
    Error,
    /// The outputs of a row holding NaN or +inf become NaN
    Propagate,
}

impl From<Policy> for NonFinite {
    fn from(policy: Policy) -> Self {
        match policy {
            Policy::Error => NonFinite::Error,
            Policy::Propagate => NonFinite::Propagate,
        }
    }
}

const CE_HEADING: &str = "Cross-entropy options (--op cross_entropy, linear_cross_entropy)";
const LINEAR_HEADING: &str =
    "Linear cross-entropy (--op linear_cross_entropy; hidden states N x D as INPUT or --hidden)";

/// Arguments of `lse eval`.
#[derive(Debug, clap::Args)]
#[command(after_help = AFTER_HELP, after_long_help = AFTER_LONG_HELP)]
pub struct Args {
    /// The op to apply
    #[arg(long, value_enum, value_name = "OP")]
    pub op: Op,

    /// The logits: a .npy or .safetensors file (for --op linear_cross_entropy: the hidden
    /// states, or give them as --hidden)
    #[arg(value_name = "INPUT", required_unless_present = "hidden")]
    pub input: Option<PathBuf>,

    /// Where to write the result (.npy)
    #[arg(long, value_name = "OUT.npy")]
    pub out: PathBuf,

    /// The tensor of a .safetensors file (default: its only float tensor)
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

    /// Read a .npy with the 2-byte void descr '<V2' (np.save of ml_dtypes.bfloat16) as bf16
    #[arg(long)]
    pub void_as_bf16: bool,

    /// What NaN and +inf logits do: an error, or NaN outputs for their rows
    #[arg(long, value_enum, value_name = "POLICY", default_value = "error")]
    pub non_finite: Policy,

    /// Class indices (.npy of integers), one per row
    #[arg(long, value_name = "FILE", help_heading = CE_HEADING)]
    pub targets: Option<PathBuf>,

    /// The target value of rows that are ignored, or 'none' [default: -100]
    #[arg(
        long,
        value_name = "N",
        allow_negative_numbers = true,
        value_parser = parse_ignore_index,
        help_heading = CE_HEADING
    )]
    pub ignore_index: Option<IgnoreIndex>,

    /// Label smoothing in [0, 1] [default: 0]
    #[arg(
        long,
        value_name = "EPS",
        allow_negative_numbers = true,
        help_heading = CE_HEADING
    )]
    pub label_smoothing: Option<f64>,

    /// z-loss coefficient >= 0: adds z * lse^2 per row [default: 0]
    #[arg(
        long,
        value_name = "Z",
        allow_negative_numbers = true,
        help_heading = CE_HEADING
    )]
    pub z_loss: Option<f64>,

    /// Soft-cap the logits to cap * tanh(x / cap) first (cap > 0) [default: none]
    #[arg(
        long,
        value_name = "CAP",
        allow_negative_numbers = true,
        help_heading = CE_HEADING
    )]
    pub softcap: Option<f64>,

    /// How the row losses are combined [default: mean]
    #[arg(long, value_enum, value_name = "HOW", help_heading = CE_HEADING)]
    pub reduction: Option<ReductionArg>,

    /// Class weights (.npy of floats, one per class)
    #[arg(long, value_name = "FILE", help_heading = CE_HEADING)]
    pub weights: Option<PathBuf>,

    /// Also write the gradient of the reduced loss with respect to the logits (.npy)
    #[arg(long, value_name = "OUT.npy", help_heading = CE_HEADING)]
    pub grad: Option<PathBuf>,

    /// Bytes of the input read at a time by the per-row ops (tests use small chunks)
    #[arg(long, value_name = "BYTES", default_value_t = crate::audit::CHUNK_BYTES, hide = true)]
    pub chunk_bytes: usize,

    /// The hidden states H, N x D (.npy or .safetensors); the same as giving them as INPUT
    #[arg(long, value_name = "FILE", help_heading = LINEAR_HEADING, conflicts_with = "input")]
    pub hidden: Option<PathBuf>,

    /// The classifier head W, classes x hidden (.npy or .safetensors, the hidden states' dtype)
    #[arg(long, value_name = "FILE", help_heading = LINEAR_HEADING)]
    pub weight: Option<PathBuf>,

    /// The head's bias, one value per class
    #[arg(long, value_name = "FILE", help_heading = LINEAR_HEADING)]
    pub bias: Option<PathBuf>,

    /// Write the gradient of the loss with respect to the hidden states (.npy)
    #[arg(long, value_name = "OUT.npy", help_heading = LINEAR_HEADING)]
    pub grad_hidden: Option<PathBuf>,

    /// Write the gradient with respect to the weight (.npy)
    #[arg(long, value_name = "OUT.npy", help_heading = LINEAR_HEADING)]
    pub grad_weight: Option<PathBuf>,

    /// Write the gradient with respect to the bias (.npy)
    #[arg(long, value_name = "OUT.npy", help_heading = LINEAR_HEADING)]
    pub grad_bias: Option<PathBuf>,

    /// Working memory of the fused call in MiB [default: 256]
    #[arg(long, value_name = "MIB", help_heading = LINEAR_HEADING)]
    pub budget_mib: Option<usize>,
}

impl Args {
    /// The input file: INPUT, or `--hidden` (clap requires exactly one of them).
    pub(crate) fn input(&self) -> &Path {
        self.input
            .as_deref()
            .or(self.hidden.as_deref())
            .unwrap_or(Path::new(""))
    }

    /// The cross-entropy options given, by flag name.
    fn ce_flags(&self) -> Vec<&'static str> {
        let given = [
            ("--targets", self.targets.is_some()),
            ("--ignore-index", self.ignore_index.is_some()),
            ("--label-smoothing", self.label_smoothing.is_some()),
            ("--z-loss", self.z_loss.is_some()),
            ("--softcap", self.softcap.is_some()),
            ("--reduction", self.reduction.is_some()),
            ("--weights", self.weights.is_some()),
            ("--grad", self.grad.is_some()),
        ];
        given
            .into_iter()
            .filter(|&(_, g)| g)
            .map(|(f, _)| f)
            .collect()
    }

    /// The cross-entropy options the flags give.
    pub(crate) fn cross_entropy_options<'w>(
        &self,
        ignore_index: Option<i64>,
        weights: Option<&'w [f64]>,
    ) -> CrossEntropyOptions<'w> {
        CrossEntropyOptions {
            ignore_index,
            weights,
            label_smoothing: self.label_smoothing.unwrap_or(0.0),
            z_loss: self.z_loss.unwrap_or(0.0),
            softcap: self.softcap,
            reduction: self.reduction.unwrap_or_default().into(),
            non_finite: match self.non_finite {
                Policy::Error => NonFinite::Error,
                Policy::Propagate => NonFinite::Propagate,
            },
            ..CrossEntropyOptions::default()
        }
    }

    /// The linear cross-entropy's own flags given, by name.
    fn linear_flags(&self) -> Option<&'static str> {
        [
            ("--hidden", self.hidden.is_some()),
            ("--weight", self.weight.is_some()),
            ("--bias", self.bias.is_some()),
            ("--grad-hidden", self.grad_hidden.is_some()),
            ("--grad-weight", self.grad_weight.is_some()),
            ("--grad-bias", self.grad_bias.is_some()),
            ("--budget-mib", self.budget_mib.is_some()),
        ]
        .into_iter()
        .find(|&(_, given)| given)
        .map(|(flag, _)| flag)
    }

    pub(super) fn check(&self) -> Result<()> {
        if self.op != Op::LinearCrossEntropy {
            if let Some(flag) = self.linear_flags() {
                return Err(CliError::usage(format!(
                    "{flag} applies to --op linear_cross_entropy only, not to --op {}",
                    self.op.name()
                )));
            }
        }
        if self.op == Op::LinearCrossEntropy {
            return Ok(()); // checked by `eval_linear::run`
        }
        if self.op != Op::CrossEntropy {
            if let Some(flag) = self.ce_flags().first() {
                return Err(CliError::usage(format!(
                    "{flag} applies to --op cross_entropy only, not to --op {}",
                    self.op.name()
                )));
            }
        } else if self.targets.is_none() {
            return Err(CliError::usage(
                "--op cross_entropy needs --targets FILE (a .npy of class indices, one per row)",
            ));
        }
        if self.grad.as_ref() == Some(&self.out) {
            return Err(CliError::usage(
                "--grad and --out name the same file; give two paths",
            ));
        }
        Ok(())
    }
}
