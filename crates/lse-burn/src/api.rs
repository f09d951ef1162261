//! The public functions: checks on the host, the operation through burn's dispatch (and so its
//! autodiff), and the error policy on the small outputs.

use burn::backend::Dispatch;
use burn::tensor::{Int, Tensor};
use lse::{GradOutput, LseError, NonFinite, Targets};

use crate::host::{Floats, HostElement, OnFloats};
use crate::options::{CrossEntropyOptions, LinearCrossEntropyOptions};
use crate::{Error, LseBackend};

type Result<T> = std::result::Result<T, Error>;

/// The shape `[rows, classes]` of a 2-D tensor.
fn rows_classes(x: &Tensor<2>) -> (usize, usize) {
    let [rows, classes] = x.dims();
    (rows, classes)
}

/// `x` with dimension `dim` moved last and the others flattened into rows, and how to undo it.
fn to_rows<const D: usize>(
    op: &'static str,
    x: Tensor<D>,
    dim: usize,
) -> Result<(Tensor<2>, [usize; D])> {
    if dim >= D {
        return Err(Error::BadDim { op, dim, rank: D });
    }
    let x = x.swap_dims(dim, D - 1);
    let dims = x.dims();
    let classes = dims[D - 1];
    if classes == 0 {
        return Err(LseError::EmptyClasses.into());
    }
    let rows = dims[..D - 1].iter().product();
    Ok((x.reshape([rows, classes]), dims))
}

/// The inverse of [`to_rows`] for an output with `last` values per row.
fn from_rows<const D: usize>(
    y: Tensor<2>,
    mut dims: [usize; D],
    dim: usize,
    last: usize,
) -> Tensor<D> {
    dims[D - 1] = last;
    y.reshape(dims).swap_dims(dim, D - 1)
}

/// Under [`NonFinite::Error`]: when `values` (a few per row) hold a NaN or infinity, runs
/// `check` on the host values of `x` to name the row, column and value; `check` decides
/// whether it is an error (a masked row's `-inf`, for one, is not).
fn check_finite<O>(values: Tensor<1>, x: &Tensor<2>, check: O) -> Result<()>
where
    O: OnFloats<Out = lse::Result<()>>,
{
    let finite = values.into_data().iter::<f64>().all(f64::is_finite);
    if finite {
        return Ok(());
    }
    Floats::from_data(x.clone().into_data())
        .run(check)
        .map_err(Error::from)
}

/// `logsumexp` along `dim` (kept, of size 1): `f32` values (`f64` for `f64` input), recorded for
/// backpropagation (`∂/∂x = softmax(x)`).
///
/// # Errors
/// [`Error::BadDim`]; [`LseError::EmptyClasses`]; under [`NonFinite::Error`] a NaN or `+inf`
/// in `x` ([`LseError::NonFinite`], with its row of the flattened `rows × classes` view).
///
/// # Panics
/// When the backend does (a device that fails to read back).
pub fn logsumexp<const D: usize>(
    x: Tensor<D>,
    dim: usize,
    non_finite: NonFinite,
) -> Result<Tensor<D>> {
    let (rows, dims) = to_rows("logsumexp", x, dim)?;
    let out = Tensor::<1>::from_dispatch(Dispatch::lse_logsumexp(rows.clone().into_dispatch()));
    if non_finite == NonFinite::Error {
        check_finite(out.clone(), &rows, LogsumexpCheck(rows_classes(&rows).1))?;
    }
    Ok(from_rows(
        out.reshape([rows_classes(&rows).0, 1]),
        dims,
        dim,
        1,
    ))
}

/// `softmax` along `dim`, in `x`'s dtype, recorded for backpropagation.
///
/// # Errors
/// As [`logsumexp`]. Under [`NonFinite::Error`] the check is one more read of `x` (its row
/// logsumexp), and a synchronisation on a device; [`NonFinite::Propagate`] costs neither.
///
/// # Panics
/// As [`logsumexp`].
pub fn softmax<const D: usize>(
    x: Tensor<D>,
    dim: usize,
    non_finite: NonFinite,
) -> Result<Tensor<D>> {
    softmax_family("softmax", x, dim, non_finite, false)
}

/// `log_softmax` along `dim`, in `x`'s dtype, recorded for backpropagation.
///
/// # Errors
/// As [`softmax`].
///
/// # Panics
/// As [`logsumexp`].
pub fn log_softmax<const D: usize>(
    x: Tensor<D>,
    dim: usize,
    non_finite: NonFinite,
) -> Result<Tensor<D>> {
    softmax_family("log_softmax", x, dim, non_finite, true)
}

fn softmax_family<const D: usize>(
    op: &'static str,
    x: Tensor<D>,
    dim: usize,
    non_finite: NonFinite,
    log: bool,
) -> Result<Tensor<D>> {
    let (rows, dims) = to_rows(op, x, dim)?;
    let classes = rows_classes(&rows).1;
    if non_finite == NonFinite::Error {
        let lse = Tensor::<1>::from_dispatch(Dispatch::lse_logsumexp(
            rows.clone().detach().into_dispatch(),
        ));
        check_finite(lse, &rows, LogsumexpCheck(classes))?;
    }
    let y = Tensor::<2>::from_dispatch(Dispatch::lse_softmax(rows.into_dispatch(), log));
    Ok(from_rows(y, dims, dim, classes))
}

/// `lse::logsumexp_with` under the error policy: the exact error, or `Ok` for a row that is
/// not one (all `-inf`).
struct LogsumexpCheck(usize);

impl OnFloats for LogsumexpCheck {
    type Out = lse::Result<()>;
    fn run<E: HostElement>(self, x: &[E]) -> Self::Out {
        let mut out = vec![<E::Stat as lse::Element>::from_f64(0.0); x.len() / self.0];
        lse::logsumexp_with(x, self.0, &mut out, NonFinite::Error)
    }
}

/// The class targets on the host, checked with the options as `lse` checks them (everything
/// but the logits).
fn checked_targets(
    targets: &Tensor<1, Int>,
    rows: usize,
    classes: usize,
    options: &lse::CrossEntropyOptions<'_>,
) -> Result<Vec<i64>> {
    let [len] = targets.dims();
    if len != rows {
        return Err(LseError::LengthMismatch {
            what: "targets",
            expected: rows,
            actual: len,
        }
        .into());
    }
    let values: Vec<i64> = targets
        .clone()
        .into_data()
        .convert::<i64>()
        .into_vec()
        .expect("i64 data");
    lse::ChunkedCrossEntropy::<f32>::new(classes, &values, options, GradOutput::default())?;
    Ok(values)
}

/// The cross-entropy of `logits` (`rows × classes`) against class `targets` (`rows`), with
/// every option of [`lse::CrossEntropyOptions`]: one value (`[1]`), or one per row with
/// [`Reduction::None`](crate::Reduction::None); `f32` (`f64` for `f64` logits). Recorded for
/// backpropagation: when `logits` are tracked the gradient is computed in the same pass as the
/// loss (one read and one write of the logits) and kept until the backward pass scales it by
/// the incoming gradient.
///
/// Other layouts flatten first: `logits.reshape([-1, classes])` for a `batch × seq × classes`
/// tensor and `targets.reshape([-1])`.
///
/// # Errors
/// [`LseError::EmptyClasses`], [`LseError::LengthMismatch`] (targets),
/// [`LseError::BadOption`], [`LseError::BadWeight`], [`LseError::TargetOutOfRange`],
/// [`LseError::EmptyMean`] (with [`EmptyMean::Error`](crate::EmptyMean::Error)); under
/// [`NonFinite::Error`] [`LseError::NonFinite`] (a NaN or `+inf` logit in a counted row) and
/// [`LseError::MaskedTarget`] (target mass on a `-inf` logit). The targets are read to the
/// host for the checks; under [`NonFinite::Error`] so is the loss.
///
/// # Panics
/// When the backend does (a device that fails to read back).
pub fn cross_entropy(
    logits: Tensor<2>,
    targets: Tensor<1, Int>,
    options: &CrossEntropyOptions,
) -> Result<Tensor<1>> {
    let (rows, classes) = rows_classes(&logits);
    if classes == 0 {
        return Err(LseError::EmptyClasses.into());
    }
    let core = options.as_lse();
    let target_values = checked_targets(&targets, rows, classes, &core)?;
    let loss = Tensor::<1>::from_dispatch(Dispatch::lse_cross_entropy(
        logits.clone().into_dispatch(),
        targets.into_dispatch(),
        options.clone(),
    ));
    if options.non_finite == NonFinite::Error {
        let check = CrossEntropyCheck {
            classes,
            targets: &target_values,
            options: core,
        };
        check_finite(loss.clone().detach(), &logits, check)?;
    }
    Ok(loss)
}

/// `lse::cross_entropy` under the caller's policy, for the exact error.
struct CrossEntropyCheck<'a> {
    classes: usize,
    targets: &'a [i64],
    options: lse::CrossEntropyOptions<'a>,
}

impl OnFloats for CrossEntropyCheck<'_> {
    type Out = lse::Result<()>;
    fn run<E: HostElement>(self, x: &[E]) -> Self::Out {
        lse::cross_entropy(
            x,
            self.classes,
            Targets::Classes(self.targets),
            &self.options,
        )
        .map(drop)
    }
}

/// The cross-entropy of the logits `hidden · weightᵀ + bias` against class `targets`, without
/// ever holding all of them: `hidden` is `rows × dim`, `weight` `classes × dim` (a language
/// model's head as stored), `bias` `classes`. The logits are formed in `f32` a chunk of rows
/// at a time within `options.budget_bytes` (`lse::linear_cross_entropy`); the loss is `f32`.
/// Recorded for backpropagation into all three: for a reduced loss the gradients are computed
/// in the forward pass and scaled in the backward pass; per-row losses
/// ([`Reduction::None`](crate::Reduction::None)) run the fused pass again with the incoming
/// rows.
///
/// # Errors
/// As [`cross_entropy`], and [`LseError::ShapeMismatch`] for a `weight` or `bias` of another
/// width, [`LseError::BudgetTooSmall`], [`Error::Unsupported`] for `f64` (the fused pass forms
/// `f32` logits); under [`NonFinite::Error`], [`LseError::NonFinite`] naming `"hidden"`,
/// `"weight"`, `"bias"` or a `"logit"` the product made infinite.
///
/// # Panics
/// As [`cross_entropy`].
pub fn linear_cross_entropy(
    hidden: Tensor<2>,
    weight: Tensor<2>,
    bias: Option<Tensor<1>>,
    targets: Tensor<1, Int>,
    options: &LinearCrossEntropyOptions,
) -> Result<Tensor<1>> {
    let [rows, dim] = hidden.dims();
    let [classes, weight_dim] = weight.dims();
    if classes == 0 {
        return Err(LseError::EmptyClasses.into());
    }
    if weight_dim != dim {
        return Err(LseError::ShapeMismatch {
            what: "weight",
            expected: [classes, dim],
            actual: [classes, weight_dim],
        }
        .into());
    }
    if let Some(b) = &bias {
        let [len] = b.dims();
        if len != classes {
            return Err(LseError::LengthMismatch {
                what: "bias",
                expected: classes,
                actual: len,
            }
            .into());
        }
    }
    let dtype = hidden.dtype();
    if dtype == burn::tensor::DType::F64 {
        return Err(Error::Unsupported {
            op: "linear_cross_entropy",
            dtype,
            why: "f32, f16 or bf16 (the logits are formed in f32)",
        });
    }
    let core = options.cross_entropy.as_lse();
    let target_values = checked_targets(&targets, rows, classes, &core)?;
    let has_bias = bias.is_some();
    let bias = bias.unwrap_or_else(|| Tensor::<1>::zeros([classes], &hidden.device()).cast(dtype));
    let loss = Tensor::<1>::from_dispatch(Dispatch::lse_linear_cross_entropy(
        hidden.clone().into_dispatch(),
        weight.clone().into_dispatch(),
        bias.clone().into_dispatch(),
        has_bias,
        targets.into_dispatch(),
        options.clone(),
    ));
    if options.cross_entropy.non_finite == NonFinite::Error {
        let finite = loss
            .clone()
            .detach()
            .into_data()
            .iter::<f64>()
            .all(f64::is_finite);
        if !finite {
            linear_check(
                &hidden,
                &weight,
                has_bias.then_some(&bias),
                &target_values,
                options,
            )?;
        }
    }
    Ok(loss)
}

/// `lse::linear_cross_entropy` on the host under the caller's policy, for the exact error.
fn linear_check(
    hidden: &Tensor<2>,
    weight: &Tensor<2>,
    bias: Option<&Tensor<1>>,
    targets: &[i64],
    options: &LinearCrossEntropyOptions,
) -> Result<()> {
    let f32_values = |t: burn::tensor::TensorData| -> Vec<f32> {
        t.convert::<f32>().into_vec().expect("f32 data")
    };
    let h = f32_values(hidden.clone().into_data());
    let w = f32_values(weight.clone().into_data());
    let b = bias.map(|b| f32_values(b.clone().into_data()));
    let head = lse::LinearHead {
        weight: &w,
        bias: b.as_deref(),
        classes: weight.dims()[0],
    };
    let core = lse::LinearCrossEntropyOptions {
        cross_entropy: options.cross_entropy.as_lse(),
        budget_bytes: options.budget_bytes,
    };
    lse::linear_cross_entropy(&h, head, lse::Targets::Classes(targets), &core)?;
    Ok(())
}
