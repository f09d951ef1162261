//! `lse eval --op linear_cross_entropy`: the fused linear cross-entropy of hidden states
//! (INPUT or `--hidden`, `N × D`) through a classifier head (`--weight`, `V × D`; `--bias`, `V`) against class
//! targets, with its gradients, written as `.npy` — bit for bit what the library returns.

use std::fmt::Write as _;
use std::path::Path;

use lse::{
    DType, Element, GradOutput, LinearCrossEntropyOptions, LinearGradients, LinearHead,
    DEFAULT_LINEAR_BUDGET_BYTES,
};
use lse_io::npy::{self, Bf16Descr};
use lse_io::{shape_string, FloatElement, Format, NpyElement, TensorData};

use super::args::{Args, ReductionArg};
use crate::error::{CliError, Result};
use crate::format::shortest;
use crate::input::{self, file_error, ClassLayout, IgnoreIndex, Pick};

/// A float tensor read from a file.
struct Loaded {
    shape: Vec<usize>,
    data: TensorData,
    bf16: Bf16Descr,
}

fn load(path: &Path, tensor: Option<&str>, void_as_bf16: bool) -> Result<Loaded> {
    let pick = tensor.map_or(Pick::OnlyFloat, Pick::Named);
    let loaded = input::logits(path, pick, void_as_bf16)?;
    let Some((_, tensor)) = loaded.into_iter().next() else {
        return Err(file_error(path, "no tensor was read"));
    };
    let bf16 = match tensor.format {
        Format::Npy => Bf16Descr::of_descr(&tensor.stored_as).unwrap_or_default(),
        Format::Safetensors => Bf16Descr::Void,
    };
    Ok(Loaded {
        shape: tensor.shape,
        data: tensor.data,
        bf16,
    })
}

/// The `[rows, cols]` of a 2-D tensor (a 1-D one when `cols` is `None`).
fn matrix(path: &Path, shape: &[usize], what: &str) -> Result<[usize; 2]> {
    match shape {
        [r, c] => Ok([*r, *c]),
        _ => Err(file_error(
            path,
            format!(
                "{what} must be 2-D, but its shape is {}",
                shape_string(shape)
            ),
        )),
    }
}

/// Runs `lse eval --op linear_cross_entropy`.
///
/// # Errors
/// Missing or conflicting flags, unreadable or malformed files, shapes or dtypes that do not
/// match, and the library's errors. Nothing is written when any error occurs before the outputs
/// are complete.
pub fn run(args: &Args, out: &mut String) -> Result<u8> {
    let usage = |m: &str| Err(CliError::usage(m.to_owned()));
    let Some(weight_path) = &args.weight else {
        return usage("--op linear_cross_entropy needs --weight FILE (the head, classes x hidden)");
    };
    let Some(targets_path) = &args.targets else {
        return usage(
            "--op linear_cross_entropy needs --targets FILE (class indices, one per row)",
        );
    };
    if args.grad.is_some() {
        return usage("--op linear_cross_entropy writes --grad-hidden, --grad-weight and --grad-bias, not --grad");
    }
    if args.axis != -1 && args.axis != 1 {
        return usage("--op linear_cross_entropy takes hidden states N x D (the hidden axis last)");
    }
    let hidden = load(args.input(), args.tensor.as_deref(), args.void_as_bf16)?;
    let weight = load(weight_path, None, args.void_as_bf16)?;
    let bias = match &args.bias {
        Some(path) => Some(load(path, None, args.void_as_bf16)?),
        None => None,
    };
    let [rows, dim] = matrix(args.input(), &hidden.shape, "the hidden states")?;
    let [classes, weight_dim] = matrix(weight_path, &weight.shape, "the weight")?;
    if weight_dim != dim {
        return Err(file_error(
            weight_path,
            format!("the weight is {classes} x {weight_dim}, but the hidden size is {dim}"),
        ));
    }
    if let (Some(path), Some(b)) = (&args.bias, &bias) {
        if b.shape != [classes] {
            return Err(file_error(
                path,
                format!(
                    "the bias has shape {}, expected ({classes},)",
                    shape_string(&b.shape)
                ),
            ));
        }
    }
    let ignore = args.ignore_index.unwrap_or(IgnoreIndex(Some(-100)));
    let layout = ClassLayout {
        shape: vec![rows, classes],
        axis: 1,
        rows,
        classes,
    };
    let targets = input::targets(targets_path, &layout, ignore)?;
    let weights = match &args.weights {
        Some(path) => Some(input::weights(path, classes, args.void_as_bf16)?),
        None => None,
    };
    let dtype = hidden.data.dtype();
    let job = Job {
        args,
        rows,
        dim,
        classes,
        targets: &targets,
        weights: weights.as_deref(),
        ignore: ignore.0,
        bf16: hidden.bf16,
    };
    let outputs = match dtype {
        Some(DType::F32) => job.run::<f32>(hidden, weight, bias)?,
        Some(DType::F16) => job.run::<lse::f16>(hidden, weight, bias)?,
        Some(DType::BF16) => job.run::<lse::bf16>(hidden, weight, bias)?,
        _ => {
            return Err(file_error(
                args.input(),
                "the linear cross-entropy takes f32, f16 or bf16 hidden states",
            ))
        }
    };
    let _ = writeln!(
        out,
        "linear_cross_entropy of {} ({}, {rows} x {dim}) through {} ({classes} x {dim})",
        args.input().display(),
        dtype.map_or("?", DType::name),
        weight_path.display()
    );
    let _ = writeln!(out, "  {}", outputs.loss_line);
    for (path, bytes, what) in &outputs.files {
        input::write(path, bytes)?;
        let _ = writeln!(out, "  wrote {}: {what}", path.display());
    }
    Ok(0)
}

struct Outputs<'a> {
    loss_line: String,
    files: Vec<(&'a Path, Vec<u8>, String)>,
}

struct Job<'a> {
    args: &'a Args,
    rows: usize,
    dim: usize,
    classes: usize,
    targets: &'a [i64],
    weights: Option<&'a [f64]>,
    ignore: Option<i64>,
    bf16: Bf16Descr,
}

impl<'a> Job<'a> {
    fn encode<T: NpyElement>(
        &self,
        shape: &[usize],
        data: &[T],
        role: &str,
    ) -> Result<(Vec<u8>, String)> {
        let bytes = npy::encode(shape, data, self.bf16)
            .map_err(|e| CliError::Other(format!("cannot encode the {role}: {e}")))?;
        Ok((
            bytes,
            format!("{role}, '{}' {}", T::descr(self.bf16), shape_string(shape)),
        ))
    }

    fn run<E: FloatElement + Element<Stat = f32>>(
        &self,
        hidden: Loaded,
        weight: Loaded,
        bias: Option<Loaded>,
    ) -> Result<Outputs<'a>> {
        let same = |data: TensorData, what: &str| {
            E::take(data).map_err(|other| {
                CliError::usage(format!(
                    "the {what} is {}, the hidden states {}: give one dtype",
                    other.dtype().map_or("?", DType::name),
                    E::DTYPE
                ))
            })
        };
        let hidden = same(hidden.data, "hidden states")?;
        let weight = same(weight.data, "weight")?;
        let bias = bias.map(|b| same(b.data, "bias")).transpose()?;
        let args = self.args;
        let reduction = args.reduction.unwrap_or_default();
        let options = LinearCrossEntropyOptions {
            cross_entropy: args.cross_entropy_options(self.ignore, self.weights),
            budget_bytes: args
                .budget_mib
                .map_or(DEFAULT_LINEAR_BUDGET_BYTES, |m| m << 20),
        };
        let head = LinearHead {
            weight: &weight,
            bias: bias.as_deref(),
            classes: self.classes,
        };
        let gradients =
            args.grad_hidden.is_some() || args.grad_weight.is_some() || args.grad_bias.is_some();
        let mut files = Vec::new();
        let result = if gradients {
            let mut dh = vec![E::zero(); hidden.len()];
            let mut dw = vec![E::zero(); weight.len()];
            let mut db = vec![E::zero(); self.classes];
            let grads = LinearGradients {
                hidden: &mut dh,
                weight: &mut dw,
                bias: args.grad_bias.is_some().then_some(&mut db[..]),
            };
            let result = lse::linear_cross_entropy_with_grad(
                &hidden,
                head,
                lse::Targets::Classes(self.targets),
                &options,
                GradOutput::Scalar(1.0),
                grads,
            )?;
            let wanted = [
                (
                    &args.grad_hidden,
                    &dh,
                    vec![self.rows, self.dim],
                    "gradient of the hidden states",
                ),
                (
                    &args.grad_weight,
                    &dw,
                    vec![self.classes, self.dim],
                    "gradient of the weight",
                ),
                (
                    &args.grad_bias,
                    &db,
                    vec![self.classes],
                    "gradient of the bias",
                ),
            ];
            for (path, data, shape, role) in wanted {
                if let Some(path) = path {
                    let (bytes, what) = self.encode(&shape, data, role)?;
                    files.push((path.as_path(), bytes, what));
                }
            }
            result
        } else {
            lse::linear_cross_entropy(&hidden, head, lse::Targets::Classes(self.targets), &options)?
        };
        let how = match reduction {
            ReductionArg::None => "sum of the row losses",
            ReductionArg::Sum => "sum",
            ReductionArg::Mean => "mean",
        };
        let loss_line = format!(
            "loss ({how} over {} counted of {} rows, {} ignored): {}",
            result.counted_rows,
            self.rows,
            self.rows - result.counted_rows,
            shortest(result.loss)
        );
        let (bytes, what) = match (reduction, &result.row_loss) {
            (ReductionArg::None, Some(losses)) => {
                self.encode(&[self.rows], losses, "loss per row")?
            }
            _ => self.encode(&[], &[result.loss], "loss")?,
        };
        files.insert(0, (args.out.as_path(), bytes, what));
        Ok(Outputs { loss_line, files })
    }
}
