//! `softmax`, `log_softmax` and `logsumexp` over a chosen dimension, with backward.

use candle_core::backend::BackendStorage;
use candle_core::shape::Dim;
use candle_core::{
    CpuStorage, CustomOp1, CustomOp2, DType, Layout, Result, Shape, Tensor, WithDType,
};
use lse::{Element, NonFinite};

use crate::common::{
    contiguous_slice, cpu_only, dispatch_float, ensure_cpu, from_rows, grad_count_error, lse_error,
    op_error, rows_classes, to_rows, zeroed_buffer,
};

/// Moves `dim` of `xs` last, flattens the rest into rows, applies the recorded op `kind` to the
/// `rows × classes` tensor and restores the layout: the same shape as `xs` for softmax and
/// log-softmax, the shape of `xs` without `dim` for logsumexp.
fn over_dim<D: Dim>(kind: Kind, xs: &Tensor, dim: D, policy: NonFinite) -> Result<Tensor> {
    let op = kind.op();
    ensure_cpu(op, xs)?;
    if xs.rank() == 0 {
        return Err(op_error(
            op,
            "the input must have at least one dimension, got a scalar",
        ));
    }
    let dim = dim.to_index(xs.shape(), op)?;
    let (x, outer) = to_rows(xs, dim)?;
    let y = x.apply_op1(RowOp { kind, policy })?;
    if kind != Kind::Logsumexp {
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
    over_dim(Kind::Softmax, xs, dim, policy)
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
    over_dim(Kind::LogSoftmax, xs, dim, policy)
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
    over_dim(Kind::Logsumexp, xs, dim, policy)
}

/// The member of the family an op computes.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Kind {
    Softmax,
    LogSoftmax,
    Logsumexp,
}

impl Kind {
    /// The name in error messages.
    fn op(self) -> &'static str {
        match self {
            Kind::Softmax => "softmax",
            Kind::LogSoftmax => "log_softmax",
            Kind::Logsumexp => "logsumexp",
        }
    }
}

/// The recorded op on `rows × classes`: softmax and log-softmax keep the shape and dtype,
/// logsumexp gives one statistic per row (`rows × classes → rows`).
struct RowOp {
    kind: Kind,
    policy: NonFinite,
}

fn row_forward<E>(
    kind: Kind,
    policy: NonFinite,
    s: &CpuStorage,
    l: &Layout,
) -> Result<(CpuStorage, Shape)>
where
    E: Element + WithDType,
    E::Stat: WithDType,
{
    let op = kind.op();
    let (rows, classes) = rows_classes(op, l)?;
    let x = contiguous_slice::<E>(op, "input", s, l)?;
    if kind == Kind::Logsumexp {
        let mut out = vec![<E::Stat as Element>::zero(); rows];
        lse::logsumexp_with(x, classes, &mut out, policy).map_err(|e| lse_error(op, e))?;
        return Ok((E::Stat::to_cpu_storage_owned(out), Shape::from(rows)));
    }
    let mut out = zeroed_buffer::<E>(x.len());
    if kind == Kind::Softmax {
        lse::softmax_with(x, classes, &mut out, policy)
    } else {
        lse::log_softmax_with(x, classes, &mut out, policy)
    }
    .map_err(|e| lse_error(op, e))?;
    Ok((E::to_cpu_storage_owned(out), l.shape().clone()))
}

/// [`row_forward`] for the dtype of `s`; an unsupported dtype is reported for `op`.
fn forward_cpu(
    op: &str,
    kind: Kind,
    policy: NonFinite,
    s: &CpuStorage,
    l: &Layout,
) -> Result<(CpuStorage, Shape)> {
    dispatch_float!(op, "inputs", s.dtype(), row_forward(kind, policy, s, l))
}

impl CustomOp1 for RowOp {
    fn name(&self) -> &'static str {
        match self.kind {
            Kind::Softmax => "lse-softmax",
            Kind::LogSoftmax => "lse-log-softmax",
            Kind::Logsumexp => "lse-logsumexp",
        }
    }

    fn cpu_fwd(&self, s: &CpuStorage, l: &Layout) -> Result<(CpuStorage, Shape)> {
        forward_cpu(self.kind.op(), self.kind, self.policy, s, l)
    }

    cpu_only!(|this| this.kind.op(), _x);

    fn bwd(&self, x: &Tensor, y: &Tensor, dy: &Tensor) -> Result<Option<Tensor>> {
        // Softmax and log-softmax differentiate from their output, with the incoming gradient in
        // its dtype; logsumexp from its input, with the incoming gradient in f64.
        let (from, grad_dtype) = match self.kind {
            Kind::Softmax | Kind::LogSoftmax => (y, y.dtype()),
            Kind::Logsumexp => (x, DType::F64),
        };
        let dy = dy.to_dtype(grad_dtype)?.contiguous()?;
        Ok(Some(from.apply_op2_no_bwd(&dy, &RowBackward(self.kind))?))
    }
}

/// The backward of [`RowOp`]: `(y, dy) → dx` for softmax and log-softmax, `(x, g) →
/// softmax(x) · g` per row for logsumexp.
struct RowBackward(Kind);

fn row_backward<E: Element + WithDType>(
    kind: Kind,
    (s1, l1): (&CpuStorage, &Layout),
    (s2, l2): (&CpuStorage, &Layout),
) -> Result<(CpuStorage, Shape)> {
    let op = kind.op();
    let (rows, classes) = rows_classes(op, l1)?;
    let dx = if kind == Kind::Logsumexp {
        let x = contiguous_slice::<E>(op, "input", s1, l1)?;
        let g = contiguous_slice::<f64>(op, "output gradient", s2, l2)?;
        logsumexp_backward(x, g, rows, classes)?
    } else {
        let y = contiguous_slice::<E>(op, "forward output", s1, l1)?;
        let dy = contiguous_slice::<E>(op, "output gradient", s2, l2)?;
        let mut dx = zeroed_buffer::<E>(y.len());
        if kind == Kind::Softmax {
            lse::softmax_backward(y, dy, classes, &mut dx)
        } else {
            lse::log_softmax_backward(y, dy, classes, &mut dx)
        }
        .map_err(|e| lse_error(op, e))?;
        dx
    };
    Ok((E::to_cpu_storage_owned(dx), l1.shape().clone()))
}

/// `softmax(x) · g` per row, in `f64` and rounded once.
fn logsumexp_backward<E: Element>(
    x: &[E],
    g: &[f64],
    rows: usize,
    classes: usize,
) -> Result<Vec<E>> {
    let op = Kind::Logsumexp.op();
    if g.len() != rows {
        return Err(grad_count_error(op, g.len(), rows));
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
            .map_err(|e| lse_error(op, e))?;
        dx.extend(p.iter().map(|&pi| <E as Element>::from_f64(pi * gr)));
    }
    Ok(dx)
}

impl CustomOp2 for RowBackward {
    fn name(&self) -> &'static str {
        match self.0 {
            Kind::Softmax => "lse-softmax-backward",
            Kind::LogSoftmax => "lse-log-softmax-backward",
            Kind::Logsumexp => "lse-logsumexp-backward",
        }
    }

    fn cpu_fwd(
        &self,
        s1: &CpuStorage,
        l1: &Layout,
        s2: &CpuStorage,
        l2: &Layout,
    ) -> Result<(CpuStorage, Shape)> {
        let what = if self.0 == Kind::Logsumexp {
            "inputs"
        } else {
            "gradients"
        };
        dispatch_float!(
            self.0.op(),
            what,
            s1.dtype(),
            row_backward(self.0, (s1, l1), (s2, l2))
        )
    }
}
