//! `lse-gpu eval`: `lse eval`'s four ops on a GPU, with its arguments, its inputs (`.npy` /
//! `.safetensors` through `lse-io`) and its outputs (`.npy`, the same dtypes, shapes and bf16
//! descrs), so the two can be compared file to file.
//!
//! Differences: the whole tensor is read at once (no `--chunk-bytes`), f64 logits are refused
//! (the kernels store f32, f16 and bf16), and `--op linear_cross_entropy` is not offered.

use std::fmt::Write as _;
use std::path::{Path, PathBuf};

use half::{bf16, f16};
use lse::{CrossEntropyOptions, DType, GradOutput, NonFinite, Reduction};
use lse_gpu::{Gpu, GpuElement};
use lse_io::layout::{move_axis_to_last, move_last_to_axis, without_axis};
use lse_io::npy::{self, Bf16Descr, ReadOptions};
use lse_io::stream::{OpenError, TensorFile, TensorInfo};
use lse_io::{shape_string, FloatElement, Format, TensorData};

pub(crate) const USAGE: &str =
    "lse-gpu eval --op logsumexp|softmax|log_softmax|cross_entropy INPUT --out OUT.npy [--device N]
               [--tensor NAME] [--axis N] [--void-as-bf16] [--non-finite error|propagate]
               [--targets FILE] [--ignore-index N|none] [--label-smoothing EPS] [--z-loss Z]
               [--softcap CAP] [--reduction none|sum|mean] [--weights FILE] [--grad OUT.npy]";

/// Why `lse-gpu eval` stopped: a usage error (exit status 2 with the usage) or any other.
#[derive(Debug)]
pub(crate) struct EvalError(pub(crate) String);

type Result<T> = std::result::Result<T, EvalError>;

fn fail<T>(message: impl Into<String>) -> Result<T> {
    Err(EvalError(message.into()))
}

fn file_error(path: &Path, message: impl std::fmt::Display) -> EvalError {
    EvalError(format!("{}: {message}", path.display()))
}

/// The four ops of `lse eval` that run on the GPU.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Op {
    Logsumexp,
    Softmax,
    LogSoftmax,
    CrossEntropy,
}

impl Op {
    fn parse(s: &str) -> Result<Self> {
        Ok(match s {
            "logsumexp" => Op::Logsumexp,
            "softmax" => Op::Softmax,
            "log_softmax" | "log-softmax" => Op::LogSoftmax,
            "cross_entropy" | "cross-entropy" => Op::CrossEntropy,
            "linear_cross_entropy" | "linear-cross-entropy" => {
                return fail("--op linear_cross_entropy does not run on the GPU (use lse eval)")
            }
            other => return fail(format!("unknown --op {other:?}\nusage: {USAGE}")),
        })
    }

    fn name(self) -> &'static str {
        match self {
            Op::Logsumexp => "logsumexp",
            Op::Softmax => "softmax",
            Op::LogSoftmax => "log_softmax",
            Op::CrossEntropy => "cross_entropy",
        }
    }
}

/// `lse eval`'s arguments (those of the four ops), and `--device`.
#[derive(Debug, Default)]
struct Args {
    op: Option<Op>,
    input: Option<PathBuf>,
    out: Option<PathBuf>,
    tensor: Option<String>,
    axis: i64,
    void_as_bf16: bool,
    propagate: bool,
    targets: Option<PathBuf>,
    ignore_index: Option<Option<i64>>,
    label_smoothing: Option<f64>,
    z_loss: Option<f64>,
    softcap: Option<f64>,
    reduction: Option<Reduction>,
    weights: Option<PathBuf>,
    grad: Option<PathBuf>,
    device: usize,
}

fn number<T: std::str::FromStr>(flag: &str, value: &str) -> Result<T> {
    value
        .parse()
        .map_err(|_| EvalError(format!("{flag}: {value:?} is not a valid value")))
}

impl Args {
    fn parse(raw: &[String]) -> Result<Self> {
        let mut args = Args {
            axis: -1,
            ..Args::default()
        };
        let mut i = 0;
        while i < raw.len() {
            let arg = raw[i].as_str();
            i += 1;
            if !arg.starts_with("--") {
                if args.input.replace(PathBuf::from(arg)).is_some() {
                    return fail(format!("a second INPUT {arg:?}\nusage: {USAGE}"));
                }
                continue;
            }
            let (flag, inline) = match arg.split_once('=') {
                Some((f, v)) => (f, Some(v.to_owned())),
                None => (arg, None),
            };
            if flag == "--void-as-bf16" {
                args.void_as_bf16 = true;
                continue;
            }
            let value = match inline {
                Some(v) => v,
                None => {
                    let Some(v) = raw.get(i) else {
                        return fail(format!("{flag} needs a value\nusage: {USAGE}"));
                    };
                    i += 1;
                    v.clone()
                }
            };
            let path = || Some(PathBuf::from(&value));
            match flag {
                "--op" => args.op = Some(Op::parse(&value)?),
                "--out" => args.out = path(),
                "--tensor" => args.tensor = Some(value.clone()),
                "--axis" => args.axis = number(flag, &value)?,
                "--device" => args.device = number(flag, &value)?,
                "--non-finite" => {
                    args.propagate = match value.as_str() {
                        "error" => false,
                        "propagate" => true,
                        _ => return fail(format!("--non-finite: {value:?}: error or propagate")),
                    }
                }
                "--targets" => args.targets = path(),
                "--ignore-index" => {
                    args.ignore_index = Some(if value == "none" {
                        None
                    } else {
                        Some(number(flag, &value)?)
                    });
                }
                "--label-smoothing" => args.label_smoothing = Some(number(flag, &value)?),
                "--z-loss" => args.z_loss = Some(number(flag, &value)?),
                "--softcap" => args.softcap = Some(number(flag, &value)?),
                "--reduction" => {
                    args.reduction = Some(match value.as_str() {
                        "none" => Reduction::None,
                        "sum" => Reduction::Sum,
                        "mean" => Reduction::Mean,
                        _ => return fail(format!("--reduction: {value:?}: none, sum or mean")),
                    });
                }
                "--weights" => args.weights = path(),
                "--grad" => args.grad = path(),
                _ => return fail(format!("unknown option {flag}\nusage: {USAGE}")),
            }
        }
        args.check()?;
        Ok(args)
    }

    /// `lse eval`'s own checks of the flags.
    fn check(&self) -> Result<()> {
        let Some(op) = self.op else {
            return fail(format!("--op is required\nusage: {USAGE}"));
        };
        if self.input.is_none() || self.out.is_none() {
            return fail(format!("INPUT and --out are required\nusage: {USAGE}"));
        }
        let ce_flags = [
            ("--targets", self.targets.is_some()),
            ("--ignore-index", self.ignore_index.is_some()),
            ("--label-smoothing", self.label_smoothing.is_some()),
            ("--z-loss", self.z_loss.is_some()),
            ("--softcap", self.softcap.is_some()),
            ("--reduction", self.reduction.is_some()),
            ("--weights", self.weights.is_some()),
            ("--grad", self.grad.is_some()),
        ];
        if op != Op::CrossEntropy {
            if let Some((flag, _)) = ce_flags.iter().find(|(_, given)| *given) {
                return fail(format!(
                    "{flag} applies to --op cross_entropy only, not to --op {}",
                    op.name()
                ));
            }
        } else if self.targets.is_none() {
            return fail(
                "--op cross_entropy needs --targets FILE (a .npy of class indices, one per row)",
            );
        }
        if self.grad.is_some() && self.grad == self.out {
            return fail("--grad and --out name the same file; give two paths");
        }
        Ok(())
    }
}

/// The logits as read: the tensor, its shape and how a bf16 output is described.
struct Logits {
    data: TensorData,
    /// The shape as read (empty for a 0-d array).
    shape: Vec<usize>,
    bf16: Bf16Descr,
    name: Option<String>,
}

/// Reads the logits tensor of `path` whole, as `lse eval` picks it.
fn read_logits(path: &Path, tensor: Option<&str>, void_as_bf16: bool) -> Result<Logits> {
    let Some(format) = Format::from_path(path) else {
        return Err(file_error(path, "not a .npy or .safetensors file"));
    };
    if let (Format::Npy, Some(name)) = (format, tensor) {
        return fail(format!(
            "--tensor {name:?}: a .npy file holds one unnamed array; --tensor is for .safetensors files"
        ));
    }
    let file =
        TensorFile::open(path, format, ReadOptions { void_as_bf16 }).map_err(|e| match e {
            OpenError::Format(e) => file_error(path, e),
            OpenError::Io(e) => file_error(path, format!("cannot read: {e}")),
        })?;
    let is_float = |t: &TensorInfo| t.encoding.as_ref().is_ok_and(|e| e.dtype().is_some());
    let info: &TensorInfo = match tensor {
        Some(name) => file
            .tensors
            .iter()
            .find(|t| t.name.as_deref() == Some(name))
            .ok_or_else(|| file_error(path, format!("no tensor named {name:?}")))?,
        None => {
            let floats: Vec<&TensorInfo> = file.tensors.iter().filter(|t| is_float(t)).collect();
            match floats.as_slice() {
                [only] => only,
                [] => return Err(file_error(path, "no float tensor to use as logits")),
                _ => {
                    return fail(format!(
                        "{} holds {} float tensors; choose one with --tensor",
                        path.display(),
                        floats.len()
                    ))
                }
            }
        }
    };
    if !is_float(info) {
        return Err(file_error(
            path,
            format!(
                "logits must be floats (f64, f32, f16, bf16), but the elements are {:?}",
                info.stored_as
            ),
        ));
    }
    let mut buf = Vec::new();
    let data = file
        .read(info, 0, info.len(), &mut buf)
        .map_err(|e| file_error(path, e))?;
    let data = if info.fortran_order {
        npy::reorder(data, &info.shape).map_err(|e| file_error(path, e))?
    } else {
        data
    };
    Ok(Logits {
        data,
        shape: info.shape.clone(),
        bf16: match format {
            Format::Npy => Bf16Descr::of_descr(&info.stored_as).unwrap_or_default(),
            Format::Safetensors => Bf16Descr::Void,
        },
        name: info.name.clone(),
    })
}

/// Reads a whole `.npy` file.
fn read_npy(path: &Path, void_as_bf16: bool) -> Result<lse_io::Tensor> {
    let bytes = std::fs::read(path).map_err(|e| file_error(path, format!("cannot read: {e}")))?;
    Ok(npy::parse(&bytes, ReadOptions { void_as_bf16 })
        .map_err(|e| file_error(path, e))?
        .tensor)
}

/// Class-index targets, one per row.
fn read_targets(path: &Path, rows: usize) -> Result<Vec<i64>> {
    let tensor = read_npy(path, false)?;
    let TensorData::Int(values) = tensor.data else {
        return Err(file_error(
            path,
            format!(
                "targets must be integer class indices, but the elements are {:?}",
                tensor.stored_as
            ),
        ));
    };
    if values.len() != rows {
        return Err(file_error(
            path,
            format!(
                "{} targets for {rows} rows; give one class index per row",
                values.len()
            ),
        ));
    }
    Ok(values)
}

/// Class weights, one per class.
fn read_weights(path: &Path, classes: usize, void_as_bf16: bool) -> Result<Vec<f64>> {
    let tensor = read_npy(path, void_as_bf16)?;
    let Some(values) = tensor.data.to_f64() else {
        return Err(file_error(path, "class weights must be floats"));
    };
    if values.len() != classes {
        return Err(file_error(
            path,
            format!("{} class weights for {classes} classes", values.len()),
        ));
    }
    Ok(values)
}

/// Writes `bytes` to `path`.
fn write(path: &Path, bytes: &[u8]) -> Result<()> {
    std::fs::write(path, bytes).map_err(|e| file_error(path, format!("cannot write: {e}")))
}

/// Runs `lse-gpu eval` with the arguments after `eval`; returns the summary to print.
///
/// # Errors
/// Bad arguments, unreadable or malformed files, the library's errors (as `lse eval` has them),
/// no such adapter. Nothing is written unless every output was computed.
pub(crate) fn run(raw: &[String]) -> Result<String> {
    let args = Args::parse(raw)?;
    let input = args.input.clone().unwrap_or_default();
    let logits = read_logits(&input, args.tensor.as_deref(), args.void_as_bf16)?;
    let gpu = Gpu::with_adapter(args.device).map_err(|e| EvalError(e.to_string()))?;
    match logits.data.dtype() {
        Some(DType::F32) => eval::<f32>(&args, &gpu, logits),
        Some(DType::F16) => eval::<f16>(&args, &gpu, logits),
        Some(DType::BF16) => eval::<bf16>(&args, &gpu, logits),
        Some(DType::F64) => fail(
            "f64 logits do not run on the GPU (its kernels store f32, f16 and bf16); use lse eval",
        ),
        None => fail("integer tensors are not logits"),
    }
}

fn eval<E: GpuElement + FloatElement>(args: &Args, gpu: &Gpu, logits: Logits) -> Result<String> {
    let input = args.input.as_deref().unwrap_or(Path::new(""));
    let out_path = args.out.as_deref().unwrap_or(Path::new(""));
    let op = args.op.unwrap_or(Op::Softmax);
    // The layout: a 0-d array is one row of one class.
    let shape = if logits.shape.is_empty() {
        vec![1]
    } else {
        logits.shape.clone()
    };
    let ndim = shape.len() as i64;
    let axis = if args.axis < 0 {
        args.axis + ndim
    } else {
        args.axis
    };
    if !(0..ndim).contains(&axis) {
        return fail(format!(
            "--axis {} is out of range for {} of shape {}",
            args.axis,
            input.display(),
            shape_string(&shape)
        ));
    }
    let axis = axis as usize;
    let classes = shape[axis];
    if classes == 0 {
        return Err(file_error(
            input,
            "the class axis is empty: there are no classes",
        ));
    }
    let values = E::take(logits.data).map_err(|_| EvalError("dtype mismatch".into()))?;
    let rows_data = move_axis_to_last(&values, &shape, axis).map_err(|e| file_error(input, e))?;
    let rows = rows_data.len() / classes;
    let policy = if args.propagate {
        NonFinite::Propagate
    } else {
        NonFinite::Error
    };
    let lib = |e: lse_gpu::Error| EvalError(e.to_string());
    let back = |v: Vec<E>| move_last_to_axis(&v, &shape, axis).map_err(|e| file_error(input, e));
    let encode_err = |e| EvalError(format!("cannot encode the output: {e}"));
    let per_row_shape = without_axis(&shape, axis);
    let mut summary = String::new();
    let source = match &logits.name {
        Some(n) => format!("{}, tensor {n:?}", input.display()),
        None => input.display().to_string(),
    };
    let _ = writeln!(
        summary,
        "{} of {source} ({}, shape {}, class axis {axis}) on {}",
        op.name(),
        E::DTYPE.name(),
        shape_string(&shape),
        gpu.describe()
    );
    let descr = |stat: bool| {
        if stat {
            <f32 as lse_io::NpyElement>::descr(logits.bf16)
        } else {
            <E as lse_io::NpyElement>::descr(logits.bf16)
        }
    };
    match op {
        Op::Logsumexp => {
            let mut out = vec![0.0f32; rows];
            gpu.logsumexp(&rows_data, classes, &mut out, policy)
                .map_err(lib)?;
            write(
                out_path,
                &npy::encode(&per_row_shape, &out, logits.bf16).map_err(encode_err)?,
            )?;
            let _ = writeln!(
                summary,
                "  wrote {}: logsumexp per row, '{}' {}",
                out_path.display(),
                descr(true),
                shape_string(&per_row_shape)
            );
        }
        Op::Softmax | Op::LogSoftmax => {
            let mut out = vec![E::zero(); rows_data.len()];
            if op == Op::Softmax {
                gpu.softmax(&rows_data, classes, &mut out, policy)
            } else {
                gpu.log_softmax(&rows_data, classes, &mut out, policy)
            }
            .map_err(lib)?;
            let out = back(out)?;
            write(
                out_path,
                &npy::encode(&logits.shape, &out, logits.bf16).map_err(encode_err)?,
            )?;
            let _ = writeln!(
                summary,
                "  wrote {}: {}, '{}' {}",
                out_path.display(),
                op.name(),
                descr(false),
                shape_string(&logits.shape)
            );
        }
        Op::CrossEntropy => {
            let targets_path = args.targets.as_deref().unwrap_or(Path::new(""));
            let targets = read_targets(targets_path, rows)?;
            let weights = match &args.weights {
                Some(path) => Some(read_weights(path, classes, args.void_as_bf16)?),
                None => None,
            };
            let reduction = args.reduction.unwrap_or_default();
            let options = CrossEntropyOptions {
                ignore_index: args.ignore_index.unwrap_or(Some(-100)),
                weights: weights.as_deref(),
                label_smoothing: args.label_smoothing.unwrap_or(0.0),
                z_loss: args.z_loss.unwrap_or(0.0),
                softcap: args.softcap,
                reduction,
                non_finite: policy,
                ..CrossEntropyOptions::default()
            };
            let mut grad = args.grad.as_ref().map(|_| vec![E::zero(); rows_data.len()]);
            let result = gpu
                .cross_entropy(
                    &rows_data,
                    classes,
                    &targets,
                    &options,
                    GradOutput::Scalar(1.0),
                    grad.as_deref_mut(),
                )
                .map_err(lib)?;
            let (loss_shape, loss_values, role) = match (reduction, &result.row_loss) {
                (Reduction::None, Some(losses)) => {
                    (per_row_shape.clone(), losses.clone(), "loss per row")
                }
                _ => (Vec::new(), vec![result.loss], "loss"),
            };
            let loss_bytes =
                npy::encode(&loss_shape, &loss_values, logits.bf16).map_err(encode_err)?;
            let grad_bytes = match grad {
                Some(g) => {
                    Some(npy::encode(&logits.shape, &back(g)?, logits.bf16).map_err(encode_err)?)
                }
                None => None,
            };
            write(out_path, &loss_bytes)?;
            let _ = writeln!(
                summary,
                "  loss over {} counted of {rows} rows: {}",
                result.counted_rows, result.loss
            );
            let _ = writeln!(
                summary,
                "  wrote {}: {role}, '{}' {}",
                out_path.display(),
                descr(true),
                shape_string(&loss_shape)
            );
            if let (Some(path), Some(bytes)) = (&args.grad, grad_bytes) {
                write(path, &bytes)?;
                let _ = writeln!(
                    summary,
                    "  wrote {}: gradient, '{}' {}",
                    path.display(),
                    descr(false),
                    shape_string(&logits.shape)
                );
            }
        }
    }
    Ok(summary)
}
