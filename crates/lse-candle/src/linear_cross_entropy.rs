//! The fused linear cross-entropy as a candle op: the loss of `hidden · weightᵀ + bias` and its
//! gradients for hidden, weight and bias, never holding the `rows × classes` logits.

use std::sync::OnceLock;

use candle_core::backend::BackendStorage;
use candle_core::{CpuStorage, CustomOp3, DType, Device, Layout, Result, Shape, Tensor, WithDType};
use lse::{
    Element, GradOutput, LinearCrossEntropyOptions, LinearGradients, LinearHead, Reduction, Targets,
};

use crate::common::{
    contiguous_slice, cpu_only, ensure_cpu, lse_error, op_error, unsupported_dtype, zeroed_buffer,
};
use crate::metrics::{collect, record, CrossEntropyMetrics, MetricsCell};
use crate::options::CrossEntropyOptions;

const OP: &str = "linear_cross_entropy";

/// The cross-entropy of the logits `hidden · weightᵀ + bias` against class `targets`, recorded
/// for backpropagation, computed by [`lse::linear_cross_entropy_with_grad`] a chunk of rows at
/// a time (default working memory, [`lse::DEFAULT_LINEAR_BUDGET_BYTES`]).
///
/// - `hidden`: `rows × dim`, `f32`, `f16` or `bf16`.
/// - `weight`: `classes × dim` (as a language-model head stores it), same dtype; `bias`:
///   `classes`, same dtype.
/// - `targets`: `rows` class indices of an integer dtype.
///
/// Every option of [`CrossEntropyOptions`] but `class_dim` (the classes are the rows of
/// `weight`) applies as it does to [`cross_entropy`](crate::cross_entropy) on those logits.
/// Returns the loss in `f32`: a scalar, or one per row with [`Reduction::None`].
///
/// # Backward
/// Gradients for `hidden`, `weight` and `bias` in their dtype. Nothing `rows × classes` is kept
/// between the passes. For a scalar reduction the forward pass (when any input is tracked and
/// [`CrossEntropyOptions::cache_gradient`] holds) forms the three gradients and the backward
/// pass scales them by the incoming gradient (one more rounding unless it is 1); for
/// [`Reduction::None`], or without `cache_gradient`, the backward pass runs the fused call
/// again with the exact incoming gradient.
///
/// # Errors
/// The core library's errors (shapes, a target out of range, NaN in an input or a logit under
/// [`lse::NonFinite::Error`], bad options) as `lse-candle linear_cross_entropy: …`; tensors
/// not on the CPU; dtypes other than `f32`, `f16`, `bf16` or that differ between the inputs;
/// inputs that are not 2-D (`bias`: 1-D); a `class_dim` other than the default.
///
/// # Panics
/// Never.
pub fn linear_cross_entropy(
    hidden: &Tensor,
    weight: &Tensor,
    bias: Option<&Tensor>,
    targets: &Tensor,
    options: &CrossEntropyOptions,
) -> Result<Tensor> {
    linear_op(hidden, weight, bias, targets, options, None)
}

/// [`linear_cross_entropy`] and, from the same call, the z-loss term, each row's argmax (a
/// `rows` tensor) and the token accuracy ([`CrossEntropyMetrics`]), taken from each chunk's
/// logits while they are formed anyway.
///
/// # Errors
/// As [`linear_cross_entropy`].
///
/// # Panics
/// Never.
pub fn linear_cross_entropy_with_metrics(
    hidden: &Tensor,
    weight: &Tensor,
    bias: Option<&Tensor>,
    targets: &Tensor,
    options: &CrossEntropyOptions,
) -> Result<(Tensor, CrossEntropyMetrics)> {
    let cell = MetricsCell::default();
    let loss = linear_op(hidden, weight, bias, targets, options, Some(cell.clone()))?;
    let rows = targets.dims1()?;
    Ok((loss, collect(OP, &cell, rows.into())?))
}

fn linear_op(
    hidden: &Tensor,
    weight: &Tensor,
    bias: Option<&Tensor>,
    targets: &Tensor,
    options: &CrossEntropyOptions,
    metrics: Option<MetricsCell>,
) -> Result<Tensor> {
    for t in [hidden, weight, targets].into_iter().chain(bias) {
        ensure_cpu(OP, t)?;
    }
    let dtype = hidden.dtype();
    if !matches!(dtype, DType::F32 | DType::F16 | DType::BF16) {
        return Err(unsupported_dtype(OP, "hidden states", dtype));
    }
    for (what, t) in [("weight", Some(weight)), ("bias", bias)] {
        if let Some(t) = t {
            if t.dtype() != dtype {
                return Err(op_error(
                    OP,
                    format!(
                        "{what} has dtype {}, the hidden states {}",
                        t.dtype().as_str(),
                        dtype.as_str()
                    ),
                ));
            }
        }
    }
    if options.class_dim != -1 && options.class_dim != 1 {
        return Err(op_error(
            OP,
            "the classes are the rows of the weight: leave class_dim at -1",
        ));
    }
    let (rows, dim) = hidden.dims2()?;
    let (classes, weight_dim) = weight.dims2()?;
    if weight_dim != dim {
        return Err(op_error(
            OP,
            format!("weight is {classes} x {weight_dim}, but the hidden size is {dim}"),
        ));
    }
    if targets.dtype().is_float() || targets.dims() != [rows] {
        return Err(op_error(
            OP,
            format!(
                "targets must be {rows} integer class indices, got {:?} of {}",
                targets.dims(),
                targets.dtype().as_str()
            ),
        ));
    }
    let bias = match bias {
        Some(b) if b.dims() != [classes] => {
            return Err(op_error(
                OP,
                format!("bias has shape {:?}, expected [{classes}]", b.dims()),
            ))
        }
        Some(b) => b.contiguous()?,
        // A zero bias adds exactly nothing to the f32 logits; it is not tracked.
        None => Tensor::zeros(classes, dtype, &Device::Cpu)?,
    };
    let tracked = hidden.track_op() || weight.track_op() || bias.track_op();
    let op = LinearOp {
        targets: targets.to_dtype(DType::I64)?.to_vec1()?,
        keep_grad: tracked && options.cache_gradient && options.reduction != Reduction::None,
        options: options.clone(),
        cache: OnceLock::new(),
        metrics,
    };
    hidden
        .contiguous()?
        .apply_op3(&weight.contiguous()?, &bias, op)
}

/// The recorded op: `(hidden, weight, bias) → loss`.
struct LinearOp {
    targets: Vec<i64>,
    options: CrossEntropyOptions,
    /// Form the gradients in the forward pass and cache them.
    keep_grad: bool,
    /// `(dH, dW, db)` for an incoming gradient of 1.
    cache: OnceLock<[Tensor; 3]>,
    /// Where the forward pass leaves the metrics, when the caller asked for them.
    metrics: Option<MetricsCell>,
}

/// The inputs' slices and shapes.
struct Inputs<'a, E> {
    hidden: &'a [E],
    weight: &'a [E],
    bias: &'a [E],
    dims: [usize; 3],
}

impl LinearOp {
    /// Runs the fused call; with `grad_output`, also returns `(dH, dW, db)` as tensors.
    fn call<E>(
        &self,
        x: &Inputs<'_, E>,
        grad_output: Option<GradOutput<'_, f32>>,
    ) -> Result<(lse::CrossEntropyOutput<f32>, Option<[Tensor; 3]>)>
    where
        E: Element<Stat = f32> + WithDType,
    {
        // The metrics of the forward pass only (`cache` unset: a backward recomputing).
        let keep_row_argmax = self.metrics.as_ref().is_some_and(|m| m.get().is_none());
        let options = LinearCrossEntropyOptions {
            cross_entropy: lse::CrossEntropyOptions {
                keep_row_argmax,
                ..self.options.to_lse()
            },
            ..Default::default()
        };
        let [rows, dim, classes] = x.dims;
        let head = LinearHead {
            weight: x.weight,
            bias: Some(x.bias),
            classes,
        };
        let Some(grad_output) = grad_output else {
            let out = lse::linear_cross_entropy(
                x.hidden,
                head,
                Targets::Classes(&self.targets),
                &options,
            )
            .map_err(|e| lse_error(OP, e))?;
            return Ok((out, None));
        };
        let mut dh = zeroed_buffer::<E>(x.hidden.len());
        let mut dw = zeroed_buffer::<E>(x.weight.len());
        let mut db = zeroed_buffer::<E>(classes);
        let grads = LinearGradients {
            hidden: &mut dh,
            weight: &mut dw,
            bias: Some(&mut db),
        };
        let out = lse::linear_cross_entropy_with_grad(
            x.hidden,
            head,
            Targets::Classes(&self.targets),
            &options,
            grad_output,
            grads,
        )
        .map_err(|e| lse_error(OP, e))?;
        let cpu = &Device::Cpu;
        let grads = [
            Tensor::from_vec(dh, (rows, dim), cpu)?,
            Tensor::from_vec(dw, (classes, dim), cpu)?,
            Tensor::from_vec(db, classes, cpu)?,
        ];
        Ok((out, Some(grads)))
    }

    fn forward<E>(&self, s: [(&CpuStorage, &Layout); 3]) -> Result<(CpuStorage, Shape)>
    where
        E: Element<Stat = f32> + WithDType,
    {
        let inputs = inputs::<E>(s)?;
        let grad_output = self.keep_grad.then(GradOutput::default);
        let (mut out, grads) = self.call(&inputs, grad_output)?;
        record(self.metrics.as_ref(), &mut out);
        if let Some(grads) = grads {
            // An op instance runs its forward once; a second `set` could only repeat it.
            let _ = self.cache.set(grads);
        }
        match self.options.reduction {
            Reduction::None => {
                let row_loss = out
                    .row_loss
                    .ok_or_else(|| op_error(OP, "internal error: no per-row losses"))?;
                let rows = row_loss.len();
                Ok((f32::to_cpu_storage_owned(row_loss), Shape::from(rows)))
            }
            Reduction::Sum | Reduction::Mean => {
                Ok((f32::to_cpu_storage_owned(vec![out.loss]), Shape::from(())))
            }
        }
    }

    /// The gradients for the incoming gradient `g` (one value, or one per row).
    fn recompute<E>(
        &self,
        hidden: &Tensor,
        weight: &Tensor,
        bias: &Tensor,
        g: &[f32],
    ) -> Result<[Tensor; 3]>
    where
        E: Element<Stat = f32> + WithDType,
    {
        let (hs, hl) = hidden.storage_and_layout();
        let (ws, wl) = weight.storage_and_layout();
        let (bs, bl) = bias.storage_and_layout();
        use candle_core::Storage::Cpu;
        let (Cpu(h), Cpu(w), Cpu(b)) = (&*hs, &*ws, &*bs) else {
            return Err(op_error(OP, "internal error: a tensor left the CPU"));
        };
        let inputs = inputs::<E>([(h, hl), (w, wl), (b, bl)])?;
        let grad_output = match self.options.reduction {
            Reduction::None => GradOutput::PerRow(g),
            _ => GradOutput::Scalar(g[0]),
        };
        let (_, grads) = self.call(&inputs, Some(grad_output))?;
        grads.ok_or_else(|| op_error(OP, "internal error: no gradients"))
    }
}

fn inputs<'a, E: WithDType>(s: [(&'a CpuStorage, &'a Layout); 3]) -> Result<Inputs<'a, E>> {
    let [(hs, hl), (ws, wl), (bs, bl)] = s;
    let (rows, dim) = match *hl.dims() {
        [r, d] => (r, d),
        _ => return Err(op_error(OP, "internal error: hidden is not 2-D")),
    };
    let classes = bl.dims().first().copied().unwrap_or(0);
    Ok(Inputs {
        hidden: contiguous_slice::<E>(OP, "hidden states", hs, hl)?,
        weight: contiguous_slice::<E>(OP, "weight", ws, wl)?,
        bias: contiguous_slice::<E>(OP, "bias", bs, bl)?,
        dims: [rows, dim, classes],
    })
}

/// Calls `$f::<T>` for the half and single float dtypes.
macro_rules! dispatch_linear {
    ($dtype:expr, $self:ident . $f:ident ( $($arg:expr),* )) => {
        match $dtype {
            DType::F32 => $self.$f::<f32>($($arg),*),
            DType::F16 => $self.$f::<lse::f16>($($arg),*),
            DType::BF16 => $self.$f::<lse::bf16>($($arg),*),
            other => Err(unsupported_dtype(OP, "hidden states", other)),
        }
    };
}

impl CustomOp3 for LinearOp {
    fn name(&self) -> &'static str {
        "lse-linear-cross-entropy"
    }

    fn cpu_fwd(
        &self,
        s1: &CpuStorage,
        l1: &Layout,
        s2: &CpuStorage,
        l2: &Layout,
        s3: &CpuStorage,
        l3: &Layout,
    ) -> Result<(CpuStorage, Shape)> {
        dispatch_linear!(s1.dtype(), self.forward([(s1, l1), (s2, l2), (s3, l3)]))
    }

    cpu_only!(|_| OP, _hidden, _weight, _bias);

    fn bwd(
        &self,
        hidden: &Tensor,
        weight: &Tensor,
        bias: &Tensor,
        _loss: &Tensor,
        grad_loss: &Tensor,
    ) -> Result<(Option<Tensor>, Option<Tensor>, Option<Tensor>)> {
        let g: Vec<f32> = grad_loss.to_dtype(DType::F32)?.flatten_all()?.to_vec1()?;
        let [dh, dw, db] = match self.cache.get() {
            Some(cached) if g == [1.0] => cached.clone(),
            Some(cached) => {
                let scale = f64::from(g[0]);
                [
                    (&cached[0] * scale)?,
                    (&cached[1] * scale)?,
                    (&cached[2] * scale)?,
                ]
            }
            None => dispatch_linear!(hidden.dtype(), self.recompute(hidden, weight, bias, &g))?,
        };
        let keep = |t: &Tensor, g: Tensor| t.track_op().then_some(g);
        Ok((keep(hidden, dh), keep(weight, dw), keep(bias, db)))
    }
}
