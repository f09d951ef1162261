//! `softmax`, `log_softmax` and `logsumexp` over a chosen dimension, with backward.

use candle_core::backend::BackendStorage;
use candle_core::shape::Dim;
use candle_core::{
    CpuStorage, CudaStorage, CustomOp1, CustomOp2, DType, Layout, MetalStorage, Result, Shape,
    Tensor, WithDType,
};
use lse::{Element, NonFinite};

use crate::common::{
    contiguous_slice, dispatch_float, ensure_cpu, from_rows, lse_error, op_error, rows_classes,
    to_rows, unsupported_device_message,
};

/// Moves `dim` of `xs` last, flattens the rest into rows, applies `f` to the `rows × classes`
/// tensor and restores the layout: the same shape as `xs` when `keep_classes`, else the shape of
/// `xs` without `dim`.
fn over_dim<D: Dim>(
    op: &'static str,
    xs: &Tensor,
    dim: D,
    keep_classes: bool,
    f: impl FnOnce(&Tensor) -> Result<Tensor>,
) -> Result<Tensor> {
    ensure_cpu(op, xs)?;
    if xs.rank() == 0 {
        return Err(op_error(
            op,
            "the input must have at least one dimension, got a scalar",
        ));
    }
    let dim = dim.to_index(xs.shape(), op)?;
    let (x, outer) = to_rows(xs, dim)?;
    let y = f(&x)?;
    if keep_classes {
        from_rows(&y, dim, &outer)
    } else if y.dims() == outer.as_slice() {
        Ok(y)
    } else {
        y.reshape(outer)
    }
}

/// `softmax(x)_i = exp(x_i − m) / Σ_j exp(x_j − m)` over dimension `dim`, recorded for
/// backpropagation (`dx = y ⊙ (dy − Σ_j y_j dy_j)`, by [`lse::softmax_backward`]).
///
/// Same dtype and shape as `xs` (`f32`, `f64`, `f16`, `bf16`; computed in `f64` and rounded
/// once). `-inf` entries get probability 0 and a fully masked slice gives all zeros (candle's
/// composed softmax gives NaN there). Unlike `candle_nn::ops::softmax_last_dim`, this op has a
/// backward pass.
///
/// ```
/// use candle_core::{Device, Tensor, D};
/// let x = Tensor::new(&[[1000.0f32, 1.0, -1000.0]], &Device::Cpu)?;
/// let p = lse_candle::softmax(&x, D::Minus1)?;
/// assert_eq!(p.to_vec2::<f32>()?, [[1.0, 0.0, 0.0]]);
/// # Ok::<(), candle_core::Error>(())
/// ```
///
/// # Errors
/// A NaN or `+inf` entry (see [`softmax_with`] to propagate instead), with the core library's
/// message naming row and column; an input not on the CPU, of an unsupported dtype, of rank 0,
/// or an empty `dim`; `dim` out of range.
///
/// # Panics
/// Never.
pub fn softmax<D: Dim>(xs: &Tensor, dim: D) -> Result<Tensor> {
    softmax_with(xs, dim, NonFinite::Error)
}

/// [`softmax`] with an explicit policy for NaN and `+inf` entries.
///
/// # Errors
/// As [`softmax`]; under [`NonFinite::Propagate`] an affected slice becomes NaN instead.
///
/// # Panics
/// Never.
pub fn softmax_with<D: Dim>(xs: &Tensor, dim: D, policy: NonFinite) -> Result<Tensor> {
    over_dim("softmax", xs, dim, true, |x| {
        x.apply_op1(SoftmaxOp {
            kind: Kind::Softmax,
            policy,
        })
    })
}

/// `log_softmax(x)_i = (x_i − m) − log1p(Σ_{j≠k} exp(x_j − m))` over dimension `dim`, recorded
/// for backpropagation (`dx = dy − exp(y) Σ_j dy_j`, by [`lse::log_softmax_backward`]).
///
/// Same dtype and shape as `xs`. `-inf` entries give `-inf` (their gradient is `dy`), a fully
/// masked slice gives all `-inf` (candle's composed log-softmax gives NaN there), and finite
/// input always gives finite output.
///
/// # Errors
/// As [`softmax`].
///
/// # Panics
/// Never.
pub fn log_softmax<D: Dim>(xs: &Tensor, dim: D) -> Result<Tensor> {
    log_softmax_with(xs, dim, NonFinite::Error)
}

/// [`log_softmax`] with an explicit policy for NaN and `+inf` entries.
///
/// # Errors
/// As [`softmax_with`].
///
/// # Panics
/// Never.
pub fn log_softmax_with<D: Dim>(xs: &Tensor, dim: D, policy: NonFinite) -> Result<Tensor> {
    over_dim("log_softmax", xs, dim, true, |x| {
        x.apply_op1(SoftmaxOp {
            kind: Kind::LogSoftmax,
            policy,
        })
    })
}

/// `log Σ_j exp(x_j)` over dimension `dim` (removed from the shape), as
/// `m + log1p(Σ_{j≠k} exp(x_j − m))`, recorded for backpropagation (`dx = softmax(x) · g`).
///
/// The result is `f32` for `f32`, `f16` and `bf16` input and `f64` for `f64` input (the core
/// library's statistics dtype; convert with `to_dtype` if needed). A fully masked slice gives
/// `-inf` and a zero gradient.
///
/// # Errors
/// As [`softmax`].
///
/// # Panics
/// Never.
pub fn logsumexp<D: Dim>(xs: &Tensor, dim: D) -> Result<Tensor> {
    logsumexp_with(xs, dim, NonFinite::Error)
}

/// [`logsumexp`] with an explicit policy for NaN and `+inf` entries.
///
/// # Errors
/// As [`softmax_with`].
///
/// # Panics
/// Never.
pub fn logsumexp_with<D: Dim>(xs: &Tensor, dim: D, policy: NonFinite) -> Result<Tensor> {
    over_dim("logsumexp", xs, dim, false, |x| {
        x.apply_op1(LogsumexpOp { policy })
    })
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Kind {
    Softmax,
    LogSoftmax,
}

impl Kind {
    fn op(self) -> &'static str {
        match self {
            Kind::Softmax => "softmax",
            Kind::LogSoftmax => "log_softmax",
        }
    }
}

/// The recorded softmax / log-softmax op on `rows × classes`.
struct SoftmaxOp {
    kind: Kind,
    policy: NonFinite,
}

fn softmax_forward<E: Element + WithDType>(
    kind: Kind,
    policy: NonFinite,
    s: &CpuStorage,
    l: &Layout,
) -> Result<(CpuStorage, Shape)> {
    let (_, classes) = rows_classes(kind.op(), l)?;
    let x = contiguous_slice::<E>(kind.op(), "input", s, l)?;
    let mut out = vec![<E as Element>::zero(); x.len()];
    match kind {
        Kind::Softmax => lse::softmax_with(x, classes, &mut out, policy),
        Kind::LogSoftmax => lse::log_softmax_with(x, classes, &mut out, policy),
    }
    .map_err(|e| lse_error(kind.op(), e))?;
    Ok((E::to_cpu_storage_owned(out), l.shape().clone()))
}

impl CustomOp1 for SoftmaxOp {
    fn name(&self) -> &'static str {
        match self.kind {
            Kind::Softmax => "lse-softmax",
            Kind::LogSoftmax => "lse-log-softmax",
        }
    }

    fn cpu_fwd(&self, s: &CpuStorage, l: &Layout) -> Result<(CpuStorage, Shape)> {
        dispatch_float!(
            self.kind.op(),
            "inputs",
            s.dtype(),
            softmax_forward(self.kind, self.policy, s, l)
        )
    }

    fn cuda_fwd(&self, _: &CudaStorage, _: &Layout) -> Result<(CudaStorage, Shape)> {
        Err(candle_core::Error::Msg(unsupported_device_message(
            self.kind.op(),
            "CUDA",
        )))
    }

    fn metal_fwd(&self, _: &MetalStorage, _: &Layout) -> Result<(MetalStorage, Shape)> {
        Err(candle_core::Error::Msg(unsupported_device_message(
            self.kind.op(),
            "Metal",
        )))
    }

    fn bwd(&self, _x: &Tensor, y: &Tensor, dy: &Tensor) -> Result<Option<Tensor>> {
        let dy = dy.to_dtype(y.dtype())?.contiguous()?;
        Ok(Some(y.apply_op2_no_bwd(&dy, &SoftmaxBackward(self.kind))?))
    }
}

/// `(y, dy) → dx` for [`SoftmaxOp`].
struct SoftmaxBackward(Kind);

fn softmax_backward<E: Element + WithDType>(
    kind: Kind,
    (s1, l1): (&CpuStorage, &Layout),
    (s2, l2): (&CpuStorage, &Layout),
) -> Result<(CpuStorage, Shape)> {
    let (_, classes) = rows_classes(kind.op(), l1)?;
    let y = contiguous_slice::<E>(kind.op(), "forward output", s1, l1)?;
    let dy = contiguous_slice::<E>(kind.op(), "output gradient", s2, l2)?;
    let mut dx = vec![<E as Element>::zero(); y.len()];
    match kind {
        Kind::Softmax => lse::softmax_backward(y, dy, classes, &mut dx),
        Kind::LogSoftmax => lse::log_softmax_backward(y, dy, classes, &mut dx),
    }
    .map_err(|e| lse_error(kind.op(), e))?;
    Ok((E::to_cpu_storage_owned(dx), l1.shape().clone()))
}

impl CustomOp2 for SoftmaxBackward {
    fn name(&self) -> &'static str {
        match self.0 {
            Kind::Softmax => "lse-softmax-backward",
            Kind::LogSoftmax => "lse-log-softmax-backward",
        }
    }

    fn cpu_fwd(
        &self,
        s1: &CpuStorage,
        l1: &Layout,
        s2: &CpuStorage,
        l2: &Layout,
    ) -> Result<(CpuStorage, Shape)> {
        dispatch_float!(
            self.0.op(),
            "gradients",
            s1.dtype(),
            softmax_backward(self.0, (s1, l1), (s2, l2))
        )
    }
}

/// A log-softmax with no backward, for gradients computed inside other backward passes.
pub(crate) struct LogSoftmaxNoGrad {
    pub(crate) op: &'static str,
    pub(crate) policy: NonFinite,
}

impl CustomOp1 for LogSoftmaxNoGrad {
    fn name(&self) -> &'static str {
        "lse-log-softmax-no-grad"
    }

    fn cpu_fwd(&self, s: &CpuStorage, l: &Layout) -> Result<(CpuStorage, Shape)> {
        dispatch_float!(
            self.op,
            "inputs",
            s.dtype(),
            softmax_forward(Kind::LogSoftmax, self.policy, s, l)
        )
    }
}

/// The recorded logsumexp op: `rows × classes → rows`.
struct LogsumexpOp {
    policy: NonFinite,
}

const LSE_OP: &str = "logsumexp";

fn logsumexp_forward<E>(
    policy: NonFinite,
    s: &CpuStorage,
    l: &Layout,
) -> Result<(CpuStorage, Shape)>
where
    E: Element + WithDType,
    E::Stat: WithDType,
{
    let (rows, classes) = rows_classes(LSE_OP, l)?;
    let x = contiguous_slice::<E>(LSE_OP, "input", s, l)?;
    let mut out = vec![<E::Stat as Element>::zero(); rows];
    lse::logsumexp_with(x, classes, &mut out, policy).map_err(|e| lse_error(LSE_OP, e))?;
    Ok((E::Stat::to_cpu_storage_owned(out), Shape::from(rows)))
}

impl CustomOp1 for LogsumexpOp {
    fn name(&self) -> &'static str {
        "lse-logsumexp"
    }

    fn cpu_fwd(&self, s: &CpuStorage, l: &Layout) -> Result<(CpuStorage, Shape)> {
        dispatch_float!(
            LSE_OP,
            "inputs",
            s.dtype(),
            logsumexp_forward(self.policy, s, l)
        )
    }

    fn cuda_fwd(&self, _: &CudaStorage, _: &Layout) -> Result<(CudaStorage, Shape)> {
        Err(candle_core::Error::Msg(unsupported_device_message(
            LSE_OP, "CUDA",
        )))
    }

    fn metal_fwd(&self, _: &MetalStorage, _: &Layout) -> Result<(MetalStorage, Shape)> {
        Err(candle_core::Error::Msg(unsupported_device_message(
            LSE_OP, "Metal",
        )))
    }

    fn bwd(&self, x: &Tensor, _lse: &Tensor, g: &Tensor) -> Result<Option<Tensor>> {
        let g = g.to_dtype(DType::F64)?.contiguous()?;
        Ok(Some(x.apply_op2_no_bwd(&g, &LogsumexpBackward)?))
    }
}

/// `(x, g) → softmax(x) · g` per row, in `f64` and rounded once.
struct LogsumexpBackward;

fn logsumexp_backward<E: Element + WithDType>(
    (s1, l1): (&CpuStorage, &Layout),
    (s2, l2): (&CpuStorage, &Layout),
) -> Result<(CpuStorage, Shape)> {
    let (rows, classes) = rows_classes(LSE_OP, l1)?;
    let x = contiguous_slice::<E>(LSE_OP, "input", s1, l1)?;
    let g = contiguous_slice::<f64>(LSE_OP, "output gradient", s2, l2)?;
    if g.len() != rows {
        return Err(op_error(
            LSE_OP,
            format!(
                "internal error: {} output gradients for {rows} rows",
                g.len()
            ),
        ));
    }
    let mut dx = Vec::with_capacity(x.len());
    let mut wide = vec![0.0f64; classes];
    let mut p = vec![0.0f64; classes];
    for (r, &gr) in g.iter().enumerate() {
        for (w, v) in wide.iter_mut().zip(&x[r * classes..(r + 1) * classes]) {
            *w = Element::to_f64(*v);
        }
        // The forward pass applied the NaN policy; here NaN only propagates.
        lse::softmax_with(&wide, classes, &mut p, NonFinite::Propagate)
            .map_err(|e| lse_error(LSE_OP, e))?;
        dx.extend(p.iter().map(|&pi| <E as Element>::from_f64(pi * gr)));
    }
    Ok((E::to_cpu_storage_owned(dx), l1.shape().clone()))
}

impl CustomOp2 for LogsumexpBackward {
    fn name(&self) -> &'static str {
        "lse-logsumexp-backward"
    }

    fn cpu_fwd(
        &self,
        s1: &CpuStorage,
        l1: &Layout,
        s2: &CpuStorage,
        l2: &Layout,
    ) -> Result<(CpuStorage, Shape)> {
        dispatch_float!(
            LSE_OP,
            "inputs",
            s1.dtype(),
            logsumexp_backward((s1, l1), (s2, l2))
        )
    }
}
