//! `lse._lse`: the native half of the `lse` Python package.
//!
//! Every function here takes flat, C-contiguous NumPy arrays (a row-major `rows × classes`
//! buffer and the class count) of one of lse's four dtypes, borrows them without copying, and
//! runs the kernel with the GIL released. Axes, shapes, output allocation and the `out=` checks
//! live in the pure-Python layer (`python/lse/`), which hands this module its buffers as
//! `reshape(-1)` views.

use numpy::{PyArray1, PyArrayMethods, PyReadonlyArray1, PyUntypedArray, PyUntypedArrayMethods};
use pyo3::exceptions::{PyTypeError, PyValueError};
use pyo3::prelude::*;
use pyo3::types::PyDict;

mod guard;

use lse::{
    bf16, f16, CrossEntropyOptions, Element, EmptyMean, GradOutput, LseError, NonFinite, Reduction,
    Targets,
};

/// An lse dtype that NumPy knows (`bf16` through `ml_dtypes`), whose statistics dtype it knows
/// too.
pub(crate) trait PyElement: Element<Stat = Self::PyStat> + numpy::Element {
    /// `E::Stat`, seen as a NumPy element.
    type PyStat: lse::Stat + numpy::Element;
}
impl PyElement for f64 {
    type PyStat = f64;
}
impl PyElement for f32 {
    type PyStat = f32;
}
impl PyElement for f16 {
    type PyStat = f32;
}
impl PyElement for bf16 {
    type PyStat = f32;
}

/// Calls `$f::<E>($array, args…)` with `E` the element type of the 1-D array `$array`, or
/// raises `TypeError` for a dtype lse does not handle. `bf16` is tried last: its NumPy dtype
/// is `ml_dtypes.bfloat16`, which the Python layer imports before any call.
macro_rules! by_dtype {
    ($array:expr, $f:ident ( $($arg:expr),* $(,)? )) => {{
        let any: &Bound<'_, PyAny> = $array;
        if let Ok(a) = any.cast::<PyArray1<f64>>() {
            $f::<f64>(a, $($arg),*)
        } else if let Ok(a) = any.cast::<PyArray1<f32>>() {
            $f::<f32>(a, $($arg),*)
        } else if let Ok(a) = any.cast::<PyArray1<f16>>() {
            $f::<f16>(a, $($arg),*)
        } else if let Ok(a) = any.cast::<PyArray1<bf16>>() {
            $f::<bf16>(a, $($arg),*)
        } else {
            Err(unsupported(any))
        }
    }};
}

/// An array that another argument of the same call is writing (an `out=` that overlaps an
/// input): the kernels need separate buffers.
pub(crate) fn borrowed(e: numpy::BorrowError) -> PyErr {
    PyValueError::new_err(format!(
        "an output array overlaps an input of the same call ({e}); pass separate arrays"
    ))
}

fn unsupported(any: &Bound<'_, PyAny>) -> PyErr {
    match any.cast::<PyUntypedArray>() {
        Ok(a) => PyTypeError::new_err(format!(
            "lse handles float64, float32, float16 and bfloat16 arrays, not {} ({}-D)",
            a.dtype(),
            a.ndim()
        )),
        Err(_) => PyTypeError::new_err("expected a 1-D NumPy array"),
    }
}

/// The output array `out` as a 1-D array of `T` (the Python layer allocated or checked it).
fn output<'a, 'py, T: numpy::Element>(
    out: &'a Bound<'py, PyAny>,
    what: &str,
) -> PyResult<&'a Bound<'py, PyArray1<T>>> {
    out.cast::<PyArray1<T>>().map_err(|_| {
        PyTypeError::new_err(format!(
            "{what} must be a 1-D {} array",
            std::any::type_name::<T>()
        ))
    })
}

/// Raises the `lse._errors` class `class` with `message` and keyword attributes.
pub(crate) fn raise(
    py: Python<'_>,
    class: &str,
    message: String,
    attributes: &[(&str, Py<PyAny>)],
) -> PyErr {
    let build = || -> PyResult<PyErr> {
        let cls = py.import("lse._errors")?.getattr(class)?;
        let kwargs = PyDict::new(py);
        for (key, value) in attributes {
            kwargs.set_item(key, value)?;
        }
        Ok(PyErr::from_value(
            cls.call((message.clone(),), Some(&kwargs))?,
        ))
    };
    build().unwrap_or_else(|e| e)
}

/// An [`LseError`] as the `lse.LseError` subclass for its kind, carrying `row`, `column` and
/// `value` where the error names them (`None` otherwise).
pub(crate) fn lse_error(py: Python<'_>, error: LseError) -> PyErr {
    let message = error.to_string();
    let num = |v: usize| v.into_pyobject(py).map(|o| o.into_any().unbind());
    let float = |v: f64| v.into_pyobject(py).map(|o| o.into_any().unbind());
    let (class, row, column, value) = match error {
        LseError::NonFinite {
            row, column, value, ..
        } => ("NonFiniteError", Some(row), Some(column), Some(value)),
        LseError::TargetOutOfRange { row, value, .. } => {
            ("TargetError", Some(row), None, Some(value as f64))
        }
        LseError::MaskedTarget { row, class } => ("TargetError", Some(row), Some(class), None),
        LseError::BadProbability { row, column, value } => {
            ("TargetError", Some(row), Some(column), Some(value))
        }
        LseError::BadWeight { class, value } => ("OptionError", None, Some(class), Some(value)),
        LseError::BadOption { value, .. } => ("OptionError", None, None, Some(value)),
        LseError::PerRowGradient { .. } => ("OptionError", None, None, None),
        LseError::EmptyMean { .. } => ("EmptyMeanError", None, None, None),
        _ => ("ShapeError", None, None, None),
    };
    let attrs = (|| -> PyResult<Vec<(&str, Py<PyAny>)>> {
        let none = || py.None();
        Ok(vec![
            ("row", row.map(num).transpose()?.unwrap_or_else(none)),
            ("column", column.map(num).transpose()?.unwrap_or_else(none)),
            ("value", value.map(float).transpose()?.unwrap_or_else(none)),
        ])
    })();
    match attrs {
        Ok(attrs) => raise(py, class, message, &attrs),
        Err(e) => e,
    }
}

fn policy(propagate: bool) -> NonFinite {
    if propagate {
        NonFinite::Propagate
    } else {
        NonFinite::Error
    }
}

/// Per-row logsumexp of `x` into `out` (the statistics dtype: `f64` for `f64`, else `f32`).
#[pyfunction]
fn logsumexp(
    py: Python<'_>,
    x: &Bound<'_, PyAny>,
    classes: usize,
    out: &Bound<'_, PyAny>,
    propagate: bool,
) -> PyResult<()> {
    fn run<E: PyElement>(
        x: &Bound<'_, PyArray1<E>>,
        classes: usize,
        out: &Bound<'_, PyAny>,
        propagate: bool,
    ) -> PyResult<()> {
        let py = x.py();
        let x = x.try_readonly().map_err(borrowed)?;
        let mut out = output::<E::PyStat>(out, "out")?
            .try_readwrite()
            .map_err(borrowed)?;
        let (xs, os) = (x.as_slice()?, out.as_slice_mut()?);
        py.detach(|| lse::logsumexp_with(xs, classes, os, policy(propagate)))
            .map_err(|e| lse_error(py, e))
    }
    let _ = py;
    by_dtype!(x, run(classes, out, propagate))
}

/// Which row op [`row_op`] runs.
#[derive(Clone, Copy)]
enum RowOp {
    Softmax,
    LogSoftmax,
}

fn row_op<E: PyElement>(
    x: &Bound<'_, PyArray1<E>>,
    classes: usize,
    out: &Bound<'_, PyAny>,
    propagate: bool,
    op: RowOp,
) -> PyResult<()> {
    let py = x.py();
    let x = x.try_readonly().map_err(borrowed)?;
    let mut out = output::<E>(out, "out")?.try_readwrite().map_err(borrowed)?;
    let (xs, os) = (x.as_slice()?, out.as_slice_mut()?);
    let nf = policy(propagate);
    py.detach(|| match op {
        RowOp::Softmax => lse::softmax_with(xs, classes, os, nf),
        RowOp::LogSoftmax => lse::log_softmax_with(xs, classes, os, nf),
    })
    .map_err(|e| lse_error(py, e))
}

/// Row-wise softmax of `x` into `out` (same dtype).
#[pyfunction]
fn softmax(
    x: &Bound<'_, PyAny>,
    classes: usize,
    out: &Bound<'_, PyAny>,
    propagate: bool,
) -> PyResult<()> {
    by_dtype!(x, row_op(classes, out, propagate, RowOp::Softmax))
}

/// Row-wise log-softmax of `x` into `out` (same dtype).
#[pyfunction]
fn log_softmax(
    x: &Bound<'_, PyAny>,
    classes: usize,
    out: &Bound<'_, PyAny>,
    propagate: bool,
) -> PyResult<()> {
    by_dtype!(x, row_op(classes, out, propagate, RowOp::LogSoftmax))
}

fn backward<E: PyElement>(
    y: &Bound<'_, PyArray1<E>>,
    dy: &Bound<'_, PyAny>,
    classes: usize,
    dx: &Bound<'_, PyAny>,
    op: RowOp,
) -> PyResult<()> {
    let py = y.py();
    let y = y.try_readonly().map_err(borrowed)?;
    let dy = output::<E>(dy, "the incoming gradient")?
        .try_readonly()
        .map_err(borrowed)?;
    let mut dx = output::<E>(dx, "out")?.try_readwrite().map_err(borrowed)?;
    let (ys, dys, dxs) = (y.as_slice()?, dy.as_slice()?, dx.as_slice_mut()?);
    py.detach(|| match op {
        RowOp::Softmax => lse::softmax_backward(ys, dys, classes, dxs),
        RowOp::LogSoftmax => lse::log_softmax_backward(ys, dys, classes, dxs),
    })
    .map_err(|e| lse_error(py, e))
}

/// The gradient of softmax from its output `y` and the incoming gradient `dy`, into `dx`.
#[pyfunction]
fn softmax_backward(
    y: &Bound<'_, PyAny>,
    dy: &Bound<'_, PyAny>,
    classes: usize,
    dx: &Bound<'_, PyAny>,
) -> PyResult<()> {
    by_dtype!(y, backward(dy, classes, dx, RowOp::Softmax))
}

/// The gradient of log-softmax from its output `y` and the incoming gradient `dy`, into `dx`.
#[pyfunction]
fn log_softmax_backward(
    y: &Bound<'_, PyAny>,
    dy: &Bound<'_, PyAny>,
    classes: usize,
    dx: &Bound<'_, PyAny>,
) -> PyResult<()> {
    by_dtype!(y, backward(dy, classes, dx, RowOp::LogSoftmax))
}

/// The cross-entropy options as the Python layer passes them (already validated for names).
struct CeArgs<'a, 'py> {
    targets: &'a Bound<'py, PyAny>,
    weights: Option<&'a [f64]>,
    options: CrossEntropyOptions<'a>,
    grad: Option<&'a Bound<'py, PyAny>>,
    /// Where `∂(grad_output · loss)/∂targets` goes (probability targets only).
    target_grad: Option<&'a Bound<'py, PyAny>>,
    grad_output: &'a Bound<'py, PyAny>,
}

/// What a cross-entropy call hands back to Python: the loss, the mean's denominator, the
/// per-row losses (with `reduction="none"` or when asked), the logit statistics, and the
/// [`Metrics`].
type CeResult = (
    f64,
    f64,
    Option<Py<PyAny>>,
    Option<guard::LogitStats>,
    Metrics,
);

/// The z-loss term (reduced as the loss), each row's argmax (int64, `-1` for ignored rows) and
/// the number of counted rows on target, the last two with `keep_row_argmax`.
type Metrics = (f64, Option<Py<PyAny>>, Option<usize>);

fn metrics<S: Into<f64> + Copy>(py: Python<'_>, out: &mut lse::CrossEntropyOutput<S>) -> Metrics {
    let argmax = out
        .row_argmax
        .take()
        .map(|a| PyArray1::from_vec(py, a).into_any().unbind());
    (out.z_loss.into(), argmax, out.correct_rows)
}

/// A targets argument, read: int64 class indices, or anything else as probabilities of `E`.
enum TargetArray<'py, E: numpy::Element> {
    Classes(PyReadonlyArray1<'py, i64>),
    Probabilities(PyReadonlyArray1<'py, E>),
}

impl<'py, E: PyElement> TargetArray<'py, E> {
    /// Reads `targets`; `dtype_of` names the array whose dtype probabilities must have.
    fn read(targets: &Bound<'py, PyAny>, dtype_of: &str) -> PyResult<Self> {
        if let Ok(classes) = targets.cast::<PyArray1<i64>>() {
            return Ok(Self::Classes(classes.try_readonly().map_err(borrowed)?));
        }
        let what = format!("probability targets (same dtype as {dtype_of})");
        Ok(Self::Probabilities(read::<E>(targets, &what)?))
    }

    fn as_targets(&self) -> PyResult<Targets<'_, E>> {
        Ok(match self {
            Self::Classes(t) => Targets::Classes(t.as_slice()?),
            Self::Probabilities(q) => Targets::Probabilities(q.as_slice()?),
        })
    }
}

fn cross_entropy_run<E: PyElement>(
    x: &Bound<'_, PyArray1<E>>,
    classes: usize,
    args: CeArgs<'_, '_>,
) -> PyResult<CeResult> {
    let py = x.py();
    let x = x.try_readonly().map_err(borrowed)?;
    let xs = x.as_slice()?;
    let targets = TargetArray::<E>::read(args.targets, "the logits")?;
    let targets = targets.as_targets()?;
    let per_row = args
        .grad_output
        .cast::<PyArray1<E::PyStat>>()
        .ok()
        .map(|g| g.try_readonly())
        .transpose()
        .map_err(borrowed)?;
    let grad_output = match &per_row {
        Some(g) => GradOutput::PerRow(g.as_slice()?),
        None => GradOutput::Scalar(E::PyStat::from_f64(args.grad_output.extract::<f64>()?)),
    };
    let mut options = args.options;
    options.weights = args.weights;
    let mut grad = match args.grad {
        Some(g) => Some(
            output::<E>(g, "the gradient output")?
                .try_readwrite()
                .map_err(borrowed)?,
        ),
        None => None,
    };
    let mut result = match grad.as_mut() {
        Some(g) => {
            let gs = g.as_slice_mut()?;
            py.detach(|| {
                lse::cross_entropy_with_grad(xs, classes, targets, &options, grad_output, gs)
            })
        }
        None => py.detach(|| lse::cross_entropy(xs, classes, targets, &options)),
    }
    .map_err(|e| lse_error(py, e))?;
    let metrics = metrics(py, &mut result);
    if let Some(out) = args.target_grad {
        let Targets::Probabilities(q) = targets else {
            return Err(PyValueError::new_err(
                "a target gradient needs probability targets (class indices have none)",
            ));
        };
        let mut out = output::<E>(out, "the target gradient output")?
            .try_readwrite()
            .map_err(borrowed)?;
        let os = out.as_slice_mut()?;
        py.detach(|| lse::cross_entropy_target_grad(xs, classes, q, &options, grad_output, os))
            .map_err(|e| lse_error(py, e))?;
    }
    let row_loss = result
        .row_loss
        .map(|r| PyArray1::from_vec(py, r).into_any().unbind());
    Ok((
        result.loss.into(),
        result.denominator,
        row_loss,
        result.logit_stats.map(guard::LogitStats::from),
        metrics,
    ))
}

/// Softmax cross-entropy of `logits` (`rows × classes`, flat) against int64 class targets or
/// probability targets of the logits' dtype; with `grad`, the fused gradient
/// `∂(grad_output · loss)/∂logits` is written there, and with `target_grad` (probability
/// targets) `∂(grad_output · loss)/∂targets` there.
#[pyfunction]
#[pyo3(signature = (
    logits, classes, targets, *, weights, ignore_index, reduction, label_smoothing, z_loss,
    softcap, propagate, empty_mean, keep_row_loss, keep_logit_stats, grad, grad_output,
    target_grad=None, keep_row_argmax=false, logit_scale=1.0
))]
#[allow(clippy::too_many_arguments)] // mirrors lse::CrossEntropyOptions one keyword each
fn cross_entropy(
    py: Python<'_>,
    logits: &Bound<'_, PyAny>,
    classes: usize,
    targets: &Bound<'_, PyAny>,
    weights: Option<PyReadonlyArray1<'_, f64>>,
    ignore_index: Option<i64>,
    reduction: &str,
    label_smoothing: f64,
    z_loss: f64,
    softcap: Option<f64>,
    propagate: bool,
    empty_mean: &str,
    keep_row_loss: bool,
    keep_logit_stats: bool,
    grad: Option<&Bound<'_, PyAny>>,
    grad_output: &Bound<'_, PyAny>,
    target_grad: Option<&Bound<'_, PyAny>>,
    keep_row_argmax: bool,
    logit_scale: f64,
) -> PyResult<CeResult> {
    let (reduction, empty_mean) = (parse_reduction(reduction)?, parse_empty_mean(empty_mean)?);
    let weights = weights.as_ref().map(|w| w.as_slice()).transpose()?;
    let args = CeArgs {
        targets,
        weights,
        options: CrossEntropyOptions {
            ignore_index,
            weights: None,
            label_smoothing,
            z_loss,
            softcap,
            logit_scale,
            reduction,
            non_finite: policy(propagate),
            empty_mean,
            keep_row_loss,
            keep_row_lse: false,
            keep_logit_stats,
            keep_row_argmax,
        },
        grad,
        target_grad,
        grad_output,
    };
    let _ = py;
    by_dtype!(logits, cross_entropy_run(classes, args))
}

fn parse_reduction(reduction: &str) -> PyResult<Reduction> {
    match reduction {
        "mean" => Ok(Reduction::Mean),
        "sum" => Ok(Reduction::Sum),
        "none" => Ok(Reduction::None),
        other => Err(PyValueError::new_err(format!(
            "reduction must be 'mean', 'sum' or 'none', not {other:?}"
        ))),
    }
}

fn parse_empty_mean(empty_mean: &str) -> PyResult<EmptyMean> {
    match empty_mean {
        "zero" => Ok(EmptyMean::Zero),
        "nan" => Ok(EmptyMean::Nan),
        "error" => Ok(EmptyMean::Error),
        other => Err(PyValueError::new_err(format!(
            "empty_mean must be 'zero', 'nan' or 'error', not {other:?}"
        ))),
    }
}

/// An array argument that the call writes.
type PyOut<'a, 'py> = &'a Bound<'py, PyAny>;

/// The buffers of a linear cross-entropy call besides the hidden rows.
struct LinearArgs<'a, 'py> {
    weight: &'a Bound<'py, PyAny>,
    classes: usize,
    bias: Option<&'a Bound<'py, PyAny>>,
    /// int64 class targets, or `rows × classes` probabilities of the input's dtype.
    targets: &'a Bound<'py, PyAny>,
    options: lse::LinearCrossEntropyOptions<'a>,
    /// `(dH, dW, db)` outputs, when the gradients are asked for.
    grads: Option<(PyOut<'a, 'py>, PyOut<'a, 'py>, Option<PyOut<'a, 'py>>)>,
    /// A per-row incoming gradient (`reduction="none"`, the loss's dtype), else 1.
    grad_output: Option<&'a Bound<'py, PyAny>>,
}

fn read<'py, E: numpy::Element>(
    a: &Bound<'py, PyAny>,
    what: &str,
) -> PyResult<numpy::PyReadonlyArray1<'py, E>> {
    output::<E>(a, what)?.try_readonly().map_err(borrowed)
}

fn write<'py, E: numpy::Element>(
    a: &Bound<'py, PyAny>,
    what: &str,
) -> PyResult<numpy::PyReadwriteArray1<'py, E>> {
    output::<E>(a, what)?.try_readwrite().map_err(borrowed)
}

/// What a linear cross-entropy call hands back to Python: the loss, the mean's denominator,
/// the per-row losses (`reduction="none"`) and the [`Metrics`].
type LinearResult = (f64, f64, Option<Py<PyAny>>, Metrics);

fn linear_run<E: PyElement>(
    hidden: &Bound<'_, PyArray1<E>>,
    args: LinearArgs<'_, '_>,
) -> PyResult<LinearResult> {
    let py = hidden.py();
    let h = hidden.try_readonly().map_err(borrowed)?;
    let targets = TargetArray::<E>::read(args.targets, "the input")?;
    let targets = targets.as_targets()?;
    let per_row = args
        .grad_output
        .map(|g| read::<E::PyStat>(g, "the per-row output gradient (the loss's dtype)"))
        .transpose()?;
    let w = read::<E>(args.weight, "the linear weight (the input's dtype)")?;
    let b = args
        .bias
        .map(|b| read::<E>(b, "the linear bias (the input's dtype)"))
        .transpose()?;
    let mut grads = match args.grads {
        Some((dh, dw, db)) => Some((
            write::<E>(dh, "dH")?,
            write::<E>(dw, "dW")?,
            db.map(|db| write::<E>(db, "db")).transpose()?,
        )),
        None => None,
    };
    let head = lse::LinearHead {
        weight: w.as_slice()?,
        bias: b.as_ref().map(|b| b.as_slice()).transpose()?,
        classes: args.classes,
    };
    let hs = h.as_slice()?;
    let grad_output = match &per_row {
        Some(g) => GradOutput::PerRow(g.as_slice()?),
        None => GradOutput::Scalar(E::PyStat::from_f64(1.0)),
    };
    let options = &args.options;
    let mut result = match grads.as_mut() {
        Some((dh, dw, db)) => {
            let grads = lse::LinearGradients {
                hidden: dh.as_slice_mut()?,
                weight: dw.as_slice_mut()?,
                bias: db.as_mut().map(|db| db.as_slice_mut()).transpose()?,
            };
            py.detach(|| {
                lse::linear_cross_entropy_with_grad(hs, head, targets, options, grad_output, grads)
            })
        }
        None => py.detach(|| lse::linear_cross_entropy(hs, head, targets, options)),
    }
    .map_err(|e| lse_error(py, e))?;
    let metrics = metrics(py, &mut result);
    let row_loss = result
        .row_loss
        .map(|r| PyArray1::from_vec(py, r).into_any().unbind());
    Ok((result.loss.into(), result.denominator, row_loss, metrics))
}

/// The fused linear cross-entropy of `hidden · weightᵀ + bias` (float64, float32, float16 or
/// bfloat16, one dtype for all three) against int64 class `targets` or `rows × classes`
/// probability targets of that dtype: the loss, the mean's denominator and
/// the per-row losses (`reduction="none"`) and the metrics (z-loss term; with `keep_row_argmax`,
/// each row's argmax and the rows on target); with `grad_hidden` and `grad_weight` (and
/// `grad_bias`), the gradients of `grad_output · loss` are written there.
#[pyfunction]
#[pyo3(signature = (
    hidden, weight, classes, targets, *, bias, weights, ignore_index, reduction, label_smoothing,
    z_loss, softcap, propagate, empty_mean, budget_bytes, grad_hidden, grad_weight, grad_bias,
    grad_output, keep_row_argmax=false, logit_scale=1.0
))]
#[allow(clippy::too_many_arguments)] // mirrors lse::LinearCrossEntropyOptions one keyword each
fn linear_cross_entropy(
    hidden: &Bound<'_, PyAny>,
    weight: &Bound<'_, PyAny>,
    classes: usize,
    targets: &Bound<'_, PyAny>,
    bias: Option<&Bound<'_, PyAny>>,
    weights: Option<PyReadonlyArray1<'_, f64>>,
    ignore_index: Option<i64>,
    reduction: &str,
    label_smoothing: f64,
    z_loss: f64,
    softcap: Option<f64>,
    propagate: bool,
    empty_mean: &str,
    budget_bytes: usize,
    grad_hidden: Option<&Bound<'_, PyAny>>,
    grad_weight: Option<&Bound<'_, PyAny>>,
    grad_bias: Option<&Bound<'_, PyAny>>,
    grad_output: Option<&Bound<'_, PyAny>>,
    keep_row_argmax: bool,
    logit_scale: f64,
) -> PyResult<LinearResult> {
    let weights = weights.as_ref().map(|w| w.as_slice()).transpose()?;
    let grads = match (grad_hidden, grad_weight) {
        (Some(dh), Some(dw)) => Some((dh, dw, grad_bias)),
        (None, None) => None,
        _ => {
            return Err(PyValueError::new_err(
                "grad_hidden and grad_weight go together",
            ))
        }
    };
    let args = LinearArgs {
        weight,
        classes,
        bias,
        targets,
        options: lse::LinearCrossEntropyOptions {
            cross_entropy: CrossEntropyOptions {
                ignore_index,
                weights,
                label_smoothing,
                z_loss,
                softcap,
                logit_scale,
                reduction: parse_reduction(reduction)?,
                non_finite: policy(propagate),
                empty_mean: parse_empty_mean(empty_mean)?,
                keep_row_loss: false,
                keep_row_lse: false,
                keep_logit_stats: false,
                keep_row_argmax,
            },
            budget_bytes,
        },
        grads,
        grad_output,
    };
    if let Ok(h) = hidden.cast::<PyArray1<f64>>() {
        linear_run::<f64>(h, args)
    } else if let Ok(h) = hidden.cast::<PyArray1<f32>>() {
        linear_run::<f32>(h, args)
    } else if let Ok(h) = hidden.cast::<PyArray1<f16>>() {
        linear_run::<f16>(h, args)
    } else if let Ok(h) = hidden.cast::<PyArray1<bf16>>() {
        linear_run::<bf16>(h, args)
    } else {
        Err(unsupported(hidden))
    }
}

/// The kernel family the dispatcher picked for this CPU (`"avx2"` or `"scalar"`).
#[pyfunction]
fn active_kernel() -> String {
    format!("{:?}", lse::active_kernel()).to_lowercase()
}

#[pymodule]
fn _lse(m: &Bound<'_, PyModule>) -> PyResult<()> {
    m.add_function(wrap_pyfunction!(logsumexp, m)?)?;
    m.add_function(wrap_pyfunction!(softmax, m)?)?;
    m.add_function(wrap_pyfunction!(log_softmax, m)?)?;
    m.add_function(wrap_pyfunction!(softmax_backward, m)?)?;
    m.add_function(wrap_pyfunction!(log_softmax_backward, m)?)?;
    m.add_function(wrap_pyfunction!(cross_entropy, m)?)?;
    m.add_function(wrap_pyfunction!(linear_cross_entropy, m)?)?;
    m.add_function(wrap_pyfunction!(active_kernel, m)?)?;
    guard::register(m)?;
    Ok(())
}
