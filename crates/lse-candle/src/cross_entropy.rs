//! Cross-entropy as a candle op: forward and gradient from one fused `lse` pass.

use std::sync::OnceLock;

use candle_core::backend::BackendStorage;
use candle_core::{
    CpuStorage, CustomOp2, CustomOp3, DType, Device, Layout, Result, Shape, Tensor, WithDType,
};
use lse::{Element, GradOutput, LseError, NonFinite, Reduction, Targets};

use crate::common::{
    class_targets, contiguous_slice, cpu_only, dispatch_float, ensure_cpu, grad_count_error,
    lse_error, op_error, rows_classes, to_rows, unsupported_dtype, zeroed_buffer,
};
use crate::metrics::{collect, record, CrossEntropyMetrics, MetricsCell};
use crate::options::CrossEntropyOptions;

const OP: &str = "cross_entropy";

/// Softmax cross-entropy of `logits` against `targets`, recorded for backpropagation.
///
/// - `logits`: a float tensor (`f32`, `f64`, `f16`, `bf16`) of any rank ≥ 1 with the classes on
///   [`CrossEntropyOptions::class_dim`] (default: the last dimension). The other dimensions are
///   flattened into rows.
/// - `targets`: either class indices — an integer tensor (`i64`, `u32`, `u8`, `i32`, `i16`) with
///   the logits' shape minus the class dimension — or target probabilities — a float tensor of
///   the logits' shape (converted to the logits' dtype when it differs; rows need not sum to 1;
///   no ignore index).
///
/// Returns the loss in the statistics dtype of the core library: `f32` for `f32`, `f16` and
/// `bf16` logits, `f64` for `f64` logits. A scalar for [`Reduction::Mean`] and
/// [`Reduction::Sum`]; for [`Reduction::None`] one loss per row in the logits' shape without the
/// class dimension (0 for ignored rows).
///
/// The loss is computed as `(m − x_y) + log1p(Σ_{j≠k} exp(x_j − m))`: finite logits give a
/// finite loss and a finite gradient in every dtype (no `exp` overflow at f16 logits above
/// 11.1, no f16 overflow of the batch sum: the loss is accumulated in f64 and returned in f32).
///
/// Non-contiguous tensors (and a class dimension that is not last) are copied into a contiguous
/// `rows × classes` layout first; that copy is recorded and costs one pass over the logits.
///
/// # Backward
/// `loss.backward()` gives `∂loss/∂logits` in the logits' dtype, computed by
/// [`lse::cross_entropy_with_grad`]. With [`CrossEntropyOptions::cache_gradient`] (the default)
/// the gradient is computed in the forward pass and kept inside the op until the loss tensor
/// (and every tensor derived from it) is dropped; the backward pass returns it as is when the
/// incoming gradient is 1 (a plain `loss.backward()`), and otherwise scales each row by the
/// incoming gradient in `f64` and rounds again (at most one extra rounding). Without it, the
/// backward pass runs the fused kernel a second time with the exact incoming gradient
/// ([`GradOutput::PerRow`] for [`Reduction::None`]).
///
/// With probability targets that are themselves tracked, `∂loss/∂targets =
/// g · (1 − ε) · w_c · (lse(x) − x_c)` (with `g` the incoming gradient, divided by the row count
/// for the mean) is returned too, computed with an extra log-softmax pass in `f32` (`f64` for
/// `f64`). It is `+inf` at `-inf` (masked) logits, as the derivative is. Class-index targets get
/// no gradient.
///
/// # Errors
/// Every error of [`lse::cross_entropy_with_grad`] (target out of range, NaN or `+inf` logits
/// under [`NonFinite::Error`], bad weights or options, …) as a [`candle_core::Error::Msg`]
/// holding `lse-candle cross_entropy: ` and the core library's message. Also: tensors not on the
/// CPU (no silent fallback), logits of rank 0 or of an unsupported dtype, a `class_dim` out of
/// range, targets of the wrong shape or dtype. The backward pass fails on a NaN or infinite
/// incoming gradient under [`NonFinite::Error`].
///
/// # Panics
/// Never.
pub fn cross_entropy(
    logits: &Tensor,
    targets: &Tensor,
    options: &CrossEntropyOptions,
) -> Result<Tensor> {
    Ok(cross_entropy_op(logits, targets, options, None)?.0)
}

/// [`cross_entropy`] and, from the same call, the z-loss term, each row's argmax and the token
/// accuracy ([`CrossEntropyMetrics`]; the argmax in the loss's row shape). The argmax is taken
/// while each row is in cache from the loss's read pass, before anything is written over it.
///
/// ```
/// use candle_core::{Device, Tensor};
/// use lse_candle::{cross_entropy_with_metrics, CrossEntropyOptions};
/// let logits = Tensor::new(&[[2.0f32, 1.0, 0.0], [0.0, 0.5, 3.0]], &Device::Cpu)?;
/// let targets = Tensor::new(&[0i64, 1], &Device::Cpu)?;
/// let (loss, metrics) = cross_entropy_with_metrics(&logits, &targets, &Default::default())?;
/// assert_eq!(metrics.argmax.to_vec1::<i64>()?, [0, 2]);
/// assert_eq!(metrics.accuracy(), Some(0.5));
/// # let _ = loss;
/// # Ok::<(), candle_core::Error>(())
/// ```
///
/// # Errors
/// As [`cross_entropy`].
///
/// # Panics
/// Never.
pub fn cross_entropy_with_metrics(
    logits: &Tensor,
    targets: &Tensor,
    options: &CrossEntropyOptions,
) -> Result<(Tensor, CrossEntropyMetrics)> {
    let cell = MetricsCell::default();
    let (loss, rows_shape) = cross_entropy_op(logits, targets, options, Some(cell.clone()))?;
    Ok((loss, collect(OP, &cell, rows_shape.into())?))
}

/// The recorded op and the shape of its rows (the logits' shape without the class dimension).
fn cross_entropy_op(
    logits: &Tensor,
    targets: &Tensor,
    options: &CrossEntropyOptions,
    metrics: Option<MetricsCell>,
) -> Result<(Tensor, Vec<usize>)> {
    ensure_cpu(OP, logits)?;
    ensure_cpu(OP, targets)?;
    if logits.rank() == 0 {
        return Err(op_error(
            OP,
            "logits must have at least one dimension (the classes), got a scalar",
        ));
    }
    if !matches!(
        logits.dtype(),
        DType::F32 | DType::F64 | DType::F16 | DType::BF16
    ) {
        return Err(unsupported_dtype(OP, "logits", logits.dtype()));
    }
    let class_dim = options.resolve_class_dim(logits.rank())?;
    let (x, outer) = to_rows(logits, class_dim)?;
    let t = if targets.dtype().is_float() {
        if targets.dims() != logits.dims() {
            return Err(op_error(
                OP,
                format!(
                    "probability targets have shape {:?}, expected the logits' shape {:?}",
                    targets.dims(),
                    logits.dims()
                ),
            ));
        }
        to_rows(&targets.to_dtype(logits.dtype())?, class_dim)?.0
    } else {
        if targets.dims() != outer.as_slice() {
            return Err(op_error(
                OP,
                format!(
                    "class-index targets have shape {:?}, expected the logits' shape without \
                     the class dimension, {outer:?}",
                    targets.dims()
                ),
            ));
        }
        targets.flatten_all()?.contiguous()?
    };
    let op = CrossEntropyOp {
        keep_grad: options.cache_gradient && x.track_op(),
        options: options.clone(),
        cache: OnceLock::new(),
        metrics,
    };
    let loss = x.apply_op2(&t, op)?;
    let loss = match options.reduction {
        Reduction::None if loss.dims() != outer.as_slice() => loss.reshape(outer.clone())?,
        _ => loss,
    };
    Ok((loss, outer))
}

/// The recorded op: `(rows × classes logits, targets) → loss`.
struct CrossEntropyOp {
    options: CrossEntropyOptions,
    /// Compute the gradient in the forward pass and cache it.
    keep_grad: bool,
    /// `∂loss/∂logits` for an incoming gradient of 1 (per row for [`Reduction::None`]).
    cache: OnceLock<Tensor>,
    /// Where the forward pass leaves the metrics, when the caller asked for them.
    metrics: Option<MetricsCell>,
}

/// Runs `f` on the targets in `storage` (class indices or probabilities of dtype `E`).
fn with_targets<E, R>(
    storage: &CpuStorage,
    layout: &Layout,
    f: impl FnOnce(Targets<'_, E>) -> lse::Result<R>,
) -> Result<R>
where
    E: Element + WithDType,
{
    let result = if storage.dtype().is_float() {
        f(Targets::Probabilities(contiguous_slice::<E>(
            OP,
            "probability targets",
            storage,
            layout,
        )?))
    } else {
        f(Targets::Classes(&class_targets(OP, storage, layout)?))
    };
    result.map_err(|e| lse_error(OP, e))
}

fn forward<E>(
    op: &CrossEntropyOp,
    s1: &CpuStorage,
    l1: &Layout,
    s2: &CpuStorage,
    l2: &Layout,
) -> Result<(CpuStorage, Shape)>
where
    E: Element + WithDType,
    E::Stat: WithDType,
{
    let (rows, classes) = rows_classes(OP, l1)?;
    let logits = contiguous_slice::<E>(OP, "logits", s1, l1)?;
    let options = lse::CrossEntropyOptions {
        keep_row_argmax: op.metrics.is_some(),
        ..op.options.to_lse()
    };
    let mut grad = op.keep_grad.then(|| zeroed_buffer::<E>(logits.len()));
    let mut out = with_targets::<E, _>(s2, l2, |targets| match grad.as_deref_mut() {
        Some(g) => lse::cross_entropy_with_grad(
            logits,
            classes,
            targets,
            &options,
            GradOutput::default(),
            g,
        ),
        None => lse::cross_entropy(logits, classes, targets, &options),
    })?;
    record(op.metrics.as_ref(), &mut out);
    if let Some(g) = grad {
        // A op instance runs its forward once; a second `set` could only repeat the same value.
        let _ = op
            .cache
            .set(Tensor::from_vec(g, (rows, classes), &Device::Cpu)?);
    }
    match op.options.reduction {
        Reduction::None => {
            let row_loss = out
                .row_loss
                .ok_or_else(|| op_error(OP, "internal error: no per-row losses"))?;
            Ok((E::Stat::to_cpu_storage_owned(row_loss), Shape::from(rows)))
        }
        Reduction::Sum | Reduction::Mean => Ok((
            E::Stat::to_cpu_storage_owned(vec![out.loss]),
            Shape::from(()),
        )),
    }
}

impl CrossEntropyOp {
    /// `∂loss/∂logits` for the incoming gradient `grad_loss` (shape `()` or `(rows,)`).
    fn logits_grad(&self, logits: &Tensor, targets: &Tensor, grad_loss: &Tensor) -> Result<Tensor> {
        let g: Vec<f64> = grad_loss.to_dtype(DType::F64)?.flatten_all()?.to_vec1()?;
        let n = g.len();
        match self.cache.get() {
            Some(cached) if g.iter().all(|&v| v == 1.0) => Ok(cached.clone()),
            Some(cached) => cached.apply_op2_no_bwd(
                &Tensor::from_vec(g, n, &Device::Cpu)?,
                &ScaleRows {
                    policy: self.options.non_finite,
                },
            ),
            None => logits.apply_op3_no_bwd(
                targets,
                &Tensor::from_vec(g, n, &Device::Cpu)?,
                &Recompute {
                    options: &self.options,
                    of: GradOf::Logits,
                },
            ),
        }
    }

    /// `∂loss/∂q = g_r · (1 − ε) · w_c · (lse(x̃_r) − x̃_rc)` for probability targets `q`
    /// ([`lse::cross_entropy_target_grad`]), for the incoming gradient `grad_loss`.
    fn probability_grad(
        &self,
        logits: &Tensor,
        targets: &Tensor,
        grad_loss: &Tensor,
    ) -> Result<Tensor> {
        let g: Vec<f64> = grad_loss.to_dtype(DType::F64)?.flatten_all()?.to_vec1()?;
        let n = g.len();
        logits.apply_op3_no_bwd(
            targets,
            &Tensor::from_vec(g, n, &Device::Cpu)?,
            &Recompute {
                options: &self.options,
                of: GradOf::Targets,
            },
        )
    }
}

impl CustomOp2 for CrossEntropyOp {
    fn name(&self) -> &'static str {
        "lse-cross-entropy"
    }

    fn cpu_fwd(
        &self,
        s1: &CpuStorage,
        l1: &Layout,
        s2: &CpuStorage,
        l2: &Layout,
    ) -> Result<(CpuStorage, Shape)> {
        dispatch_float!(OP, "logits", s1.dtype(), forward(self, s1, l1, s2, l2))
    }

    cpu_only!(|_| OP, _logits, _targets);

    fn bwd(
        &self,
        logits: &Tensor,
        targets: &Tensor,
        _loss: &Tensor,
        grad_loss: &Tensor,
    ) -> Result<(Option<Tensor>, Option<Tensor>)> {
        let d_logits = if logits.track_op() {
            Some(self.logits_grad(logits, targets, grad_loss)?)
        } else {
            None
        };
        let d_targets = if targets.dtype().is_float() && targets.track_op() {
            Some(self.probability_grad(logits, targets, grad_loss)?)
        } else {
            None
        };
        Ok((d_logits, d_targets))
    }
}

/// Multiplies each row of a cached gradient by its incoming gradient (one value: every row).
struct ScaleRows {
    policy: NonFinite,
}

fn scale_rows<E: Element + WithDType>(
    policy: NonFinite,
    s1: &CpuStorage,
    l1: &Layout,
    s2: &CpuStorage,
    l2: &Layout,
) -> Result<(CpuStorage, Shape)> {
    let (rows, classes) = rows_classes(OP, l1)?;
    let grad = contiguous_slice::<E>(OP, "cached gradient", s1, l1)?;
    let scale = contiguous_slice::<f64>(OP, "output gradient", s2, l2)?;
    if scale.len() != 1 && scale.len() != rows {
        return Err(grad_count_error(OP, scale.len(), rows));
    }
    let mut out = Vec::with_capacity(grad.len());
    for r in 0..rows {
        let g = scale[if scale.len() == 1 { 0 } else { r }];
        if policy == NonFinite::Error && !g.is_finite() {
            return Err(lse_error(
                OP,
                LseError::NonFinite {
                    what: "output gradient",
                    row: r,
                    column: 0,
                    value: g,
                },
            ));
        }
        // An exact zero (ignored row, masked logit) stays zero whatever `g` is.
        out.extend(grad[r * classes..(r + 1) * classes].iter().map(|&v| {
            if v == <E as Element>::zero() {
                v
            } else {
                <E as Element>::from_f64(Element::to_f64(v) * g)
            }
        }));
    }
    Ok((E::to_cpu_storage_owned(out), l1.shape().clone()))
}

impl CustomOp2 for ScaleRows {
    fn name(&self) -> &'static str {
        "lse-cross-entropy-scale-grad"
    }

    fn cpu_fwd(
        &self,
        s1: &CpuStorage,
        l1: &Layout,
        s2: &CpuStorage,
        l2: &Layout,
    ) -> Result<(CpuStorage, Shape)> {
        dispatch_float!(
            OP,
            "gradients",
            s1.dtype(),
            scale_rows(self.policy, s1, l1, s2, l2)
        )
    }
}

/// Which gradient [`Recompute`] computes.
#[derive(Clone, Copy, PartialEq, Eq)]
enum GradOf {
    Logits,
    /// The probability targets.
    Targets,
}

/// The fused forward again, for a gradient only, with the exact incoming gradient.
struct Recompute<'a> {
    options: &'a CrossEntropyOptions,
    of: GradOf,
}

fn recompute<E>(
    options: &CrossEntropyOptions,
    of: GradOf,
    (s1, l1): (&CpuStorage, &Layout),
    (s2, l2): (&CpuStorage, &Layout),
    (s3, l3): (&CpuStorage, &Layout),
) -> Result<(CpuStorage, Shape)>
where
    E: Element + WithDType,
{
    let (rows, classes) = rows_classes(OP, l1)?;
    let logits = contiguous_slice::<E>(OP, "logits", s1, l1)?;
    let g: Vec<E::Stat> = contiguous_slice::<f64>(OP, "output gradient", s3, l3)?
        .iter()
        .map(|&v| <E::Stat as Element>::from_f64(v))
        .collect();
    let grad_output = match (options.reduction, g.as_slice()) {
        (Reduction::None, _) => GradOutput::PerRow(&g),
        (_, &[g0]) => GradOutput::Scalar(g0),
        (_, _) => {
            return Err(op_error(
                OP,
                format!(
                    "internal error: {} output gradients for a scalar loss",
                    g.len()
                ),
            ))
        }
    };
    let mut grad = zeroed_buffer::<E>(logits.len());
    let lse_options = options.to_lse();
    with_targets::<E, _>(s2, l2, |targets| match (of, targets) {
        (GradOf::Targets, Targets::Probabilities(q)) => {
            lse::cross_entropy_target_grad(logits, classes, q, &lse_options, grad_output, &mut grad)
        }
        (GradOf::Targets, Targets::Classes(_)) => Err(LseError::LengthMismatch {
            what: "probability targets (class indices have no gradient)",
            expected: logits.len(),
            actual: 0,
        }),
        (GradOf::Logits, targets) => lse::cross_entropy_with_grad(
            logits,
            classes,
            targets,
            &lse_options,
            grad_output,
            &mut grad,
        )
        .map(|_| ()),
    })?;
    Ok((E::to_cpu_storage_owned(grad), Shape::from((rows, classes))))
}

impl CustomOp3 for Recompute<'_> {
    fn name(&self) -> &'static str {
        "lse-cross-entropy-grad"
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
        dispatch_float!(
            OP,
            "logits",
            s1.dtype(),
            recompute(self.options, self.of, (s1, l1), (s2, l2), (s3, l3))
        )
    }
}
