"""The NumPy functions of ``lse``.

Every function takes the class axis as ``axis`` (default the last). The kernels read a
row-major ``rows × classes`` buffer: an array that is C-contiguous with the class axis last is
read in place (no copy, the GIL released while the kernel runs); any other layout is first
copied into a contiguous buffer with ``np.ascontiguousarray`` (one copy, documented here and
in the README). Outputs are allocated, or written into ``out=``: an ``out`` that is
C-contiguous with the class axis last (or, for logsumexp, any C-contiguous array of the right
shape) is written in place; any other ``out`` receives a copy of the result.

Dtypes: float64, float32, float16 and ``ml_dtypes.bfloat16``. Softmax, log-softmax and
gradients come back in the input's dtype; logsumexp and the cross-entropy loss in float32
(float64 for float64 input).
"""

from __future__ import annotations

from typing import NamedTuple, Optional

import numpy as np

from . import _lse
from ._arrays import BFLOAT16, _logits
from ._errors import EmptyMeanError, OptionError, ShapeError, TargetError
from ._stats import LogitStats

__all__ = [
    "logsumexp",
    "softmax",
    "log_softmax",
    "softmax_backward",
    "log_softmax_backward",
    "cross_entropy",
    "CrossEntropyResult",
    "stat_dtype",
]


def stat_dtype(dtype) -> np.dtype:
    """The dtype of per-row statistics (logsumexp, loss) for logits of ``dtype``."""
    return np.dtype(np.float64) if np.dtype(dtype) == np.float64 else np.dtype(np.float32)


def _axis(x: np.ndarray, axis: int) -> int:
    if not -x.ndim <= axis < x.ndim:
        raise np.exceptions.AxisError(axis, x.ndim)
    return axis % x.ndim


def _rows(x: np.ndarray, axis: int) -> np.ndarray:
    """``x`` with the class axis last, C-contiguous: a view when it already is, else a copy."""
    return np.ascontiguousarray(np.moveaxis(x, axis, -1))


def _policy(nonfinite: str) -> bool:
    if nonfinite not in ("error", "propagate"):
        raise OptionError(f"nonfinite must be 'error' or 'propagate', not {nonfinite!r}")
    return nonfinite == "propagate"


def _check_out(out, shape, dtype, what="out") -> None:
    if out is None:
        return
    if not isinstance(out, np.ndarray):
        raise TypeError(f"{what} must be a NumPy array")
    if out.dtype != dtype:
        raise TypeError(f"{what} has dtype {out.dtype}, expected {dtype}")
    if out.shape != tuple(shape):
        raise ShapeError(f"{what} has shape {out.shape}, expected {tuple(shape)}")
    if not out.flags.writeable:
        raise ValueError(f"{what} is read-only")


def _buffer(out, direct: bool, shape, dtype, *inputs) -> np.ndarray:
    """Where the kernel writes: ``out`` itself when the result lands there as it is (``direct``:
    same layout), ``out`` is C-contiguous and overlaps none of the ``inputs``, else a new
    C-contiguous array."""
    if (out is not None and direct and out.flags.c_contiguous
            and not any(np.may_share_memory(out, i) for i in inputs)):
        return out.reshape(shape)
    return np.empty(shape, dtype)


def _deliver(buf, out, axis):
    """The result (``buf`` with its class axis moved back to ``axis``), copied into ``out`` unless
    the kernel wrote there already."""
    result = np.moveaxis(buf, -1, axis)
    if out is None:
        return result
    if not np.shares_memory(buf, out):
        np.copyto(out, result)
    return out


def logsumexp(x, axis: int = -1, *, keepdims: bool = False, out=None, nonfinite: str = "error"):
    """``log Σ exp(x)`` over ``axis``, overflow-free: ``m + log1p(Σ_{i≠k} exp(x_i − m))``.

    Returns float32 (float64 for float64 input). A row of only -inf gives -inf.

    Raises:
        NonFiniteError: a NaN or +inf under ``nonfinite="error"`` (``row``, ``column``,
            ``value`` name it; ``row`` is the flat index over the non-class axes).
        ShapeError: an empty class axis.
    """
    x = _logits(x)
    axis = _axis(x, axis)
    rows = _rows(x, axis)
    dtype = stat_dtype(x.dtype)
    shape = x.shape[:axis] + (1,) + x.shape[axis + 1:] if keepdims else rows.shape[:-1]
    _check_out(out, shape, dtype)
    buf = _buffer(out, True, rows.shape[:-1], dtype, rows)
    _lse.logsumexp(rows.reshape(-1), rows.shape[-1], buf.reshape(-1), _policy(nonfinite))
    if out is None:
        return buf.reshape(shape)
    if not np.shares_memory(buf, out):
        np.copyto(out, buf.reshape(shape))
    return out


def _rowwise(kernel, x, axis, out, nonfinite):
    x = _logits(x)
    axis = _axis(x, axis)
    rows = _rows(x, axis)
    _check_out(out, x.shape, x.dtype)
    buf = _buffer(out, axis == x.ndim - 1, rows.shape, x.dtype, rows)
    kernel(rows.reshape(-1), rows.shape[-1], buf.reshape(-1), _policy(nonfinite))
    return _deliver(buf, out, axis)


def softmax(x, axis: int = -1, *, out=None, nonfinite: str = "error"):
    """``exp(x_i − m) / Σ_j exp(x_j − m)`` over ``axis``, in the input's dtype (computed in
    f32/f64 and rounded once). Masked (-inf) entries get 0; a fully masked row is all 0.

    Raises:
        NonFiniteError: a NaN or +inf under ``nonfinite="error"``.
        ShapeError: an empty class axis, an ``out`` of the wrong shape.
    """
    return _rowwise(_lse.softmax, x, axis, out, nonfinite)


def log_softmax(x, axis: int = -1, *, out=None, nonfinite: str = "error"):
    """``(x_i − m) − log1p(Σ_{j≠k} exp(x_j − m))`` over ``axis``, in the input's dtype.
    Masked (-inf) entries stay -inf.

    Raises:
        NonFiniteError: a NaN or +inf under ``nonfinite="error"``.
        ShapeError: an empty class axis, an ``out`` of the wrong shape.
    """
    return _rowwise(_lse.log_softmax, x, axis, out, nonfinite)


def _backward(kernel, y, dy, axis, out):
    y = _logits(y, "y")
    dy = _logits(dy, "dy")
    if y.shape != dy.shape or y.dtype != dy.dtype:
        raise ShapeError(
            f"y ({y.shape}, {y.dtype}) and dy ({dy.shape}, {dy.dtype}) must have one shape and dtype"
        )
    axis = _axis(y, axis)
    ys, dys = _rows(y, axis), _rows(dy, axis)
    _check_out(out, y.shape, y.dtype)
    buf = _buffer(out, axis == y.ndim - 1, ys.shape, y.dtype, ys, dys)
    kernel(ys.reshape(-1), dys.reshape(-1), ys.shape[-1], buf.reshape(-1))
    return _deliver(buf, out, axis)


def softmax_backward(y, dy, axis: int = -1, *, out=None):
    """The gradient of :func:`softmax` from its output ``y`` and the incoming gradient ``dy``:
    ``dx_i = y_i · (dy_i − Σ_j y_j dy_j)``."""
    return _backward(_lse.softmax_backward, y, dy, axis, out)


def log_softmax_backward(y, dy, axis: int = -1, *, out=None):
    """The gradient of :func:`log_softmax` from its output ``y`` and the incoming gradient
    ``dy``: ``dx_i = dy_i − exp(y_i) · Σ_j dy_j``."""
    return _backward(_lse.log_softmax_backward, y, dy, axis, out)


class CrossEntropyResult(NamedTuple):
    """What :func:`cross_entropy` returns when asked for more than the loss."""

    loss: object
    """The reduced loss (a float32/float64 scalar), or per-row losses with ``reduction="none"``."""
    grad: Optional[np.ndarray]
    """``∂(grad_output · loss)/∂logits`` (``grad=True``), in the logits' dtype and shape."""
    denominator: float
    """What the mean divides by (summed target weight of the counted rows)."""
    stats: object
    """The ``lse.guard.LogitStats`` of the logits (``stats=True``), from the same read pass."""
    target_grad: Optional[np.ndarray] = None
    """``∂(grad_output · loss)/∂target`` for probability targets (``target_grad=True``), in the
    logits' dtype and shape."""
    z_loss: object = None
    """The z-loss term's share of ``loss`` (``z · lse²`` of the counted rows, reduced as the loss;
    summed for ``reduction="none"``), in the loss's dtype; 0 without ``z_loss``."""
    argmax: Optional[np.ndarray] = None
    """Each row's argmax (``metrics=True``): int64 in the target's batch shape, the first
    column holding the row's largest logit (as ``np.argmax``; the first NaN of a propagated
    row), -1 for ignored rows."""
    correct: Optional[int] = None
    """How many counted rows have their class target as argmax (``metrics=True``, class
    targets)."""
    accuracy: Optional[float] = None
    """``correct`` over the counted rows: the token accuracy (0 when no row is counted)."""


def cross_entropy(
    logits,
    target,
    *,
    axis: int = -1,
    weight=None,
    ignore_index: Optional[int] = -100,
    reduction: str = "mean",
    label_smoothing: float = 0.0,
    z_loss: float = 0.0,
    softcap: Optional[float] = None,
    nonfinite: str = "error",
    empty_mean: str = "zero",
    grad: bool = False,
    grad_output=1.0,
    out_grad=None,
    stats: bool = False,
    target_grad: bool = False,
    out_target_grad=None,
    metrics: bool = False,
    logit_scale: float = 1.0,
):
    """Softmax cross-entropy from raw logits, ``(m − x_y) + log1p(s')`` per row, optionally
    fused with its gradient (one read pass and one write pass).

    Args:
        logits: float64/float32/float16/bfloat16, classes on ``axis`` (default last).
        target: integer class indices of the logits' shape without the class axis (``ignore_index``
            marks padding), or probabilities of the logits' full shape (converted to their dtype;
            any finite values, as PyTorch).
        weight: per-class weights (``classes`` finite values; negative and zero too, as PyTorch).
        reduction: ``"mean"`` (divided by the summed weight of counted rows, as PyTorch; by the
            row count for probability targets), ``"sum"`` or ``"none"``.
        label_smoothing, z_loss, softcap: as ``lse::CrossEntropyOptions`` (z-loss adds
            ``z · lse²`` per row, soft-capping maps logits to ``cap · tanh(x / cap)``).
        nonfinite: ``"error"`` (NaN/+inf raise ``NonFiniteError``) or ``"propagate"``.
        empty_mean: what a mean over no counted row is: ``"zero"``, ``"nan"`` or ``"error"``.
        grad: also compute ``∂(grad_output · loss)/∂logits``.
        grad_output: the incoming gradient: a scalar, or (``reduction="none"``) one per row.
        out_grad: where to write the gradient (else a new array).
        stats: also return the logits' ``LogitStats`` (for a ``LogitMonitor``).
        target_grad: also compute ``∂(grad_output · loss)/∂target`` (probability targets):
            ``(1 − ε) · w_c · (lse − x_c)`` per row, times the mean's ``1/rows``.
        out_target_grad: where to write it (else a new array).
        logit_scale: every logit is multiplied by this first, inside the kernel (a temperature
            ``T`` is ``1/T``): the loss is that of ``logit_scale · x`` and the gradient is with
            respect to ``x``.
        metrics: also return each row's argmax, the token accuracy and the z-loss term
            (``argmax``, ``correct``, ``accuracy``, ``z_loss`` of the result), from the same
            call: the argmax is taken while each row is in cache from its read pass.

    An empty class axis (``[N, 0]`` logits) gives zero losses with probability targets (and a
    ``TargetError`` for any counted class target, as no class exists); zero rows give an empty
    mean (see ``empty_mean``).

    Returns:
        The loss (float32 scalar, float64 for float64 logits; per-row array for
        ``reduction="none"``), or a :class:`CrossEntropyResult` when ``grad``, ``stats``,
        ``target_grad`` or ``metrics``.

    Raises:
        NonFiniteError, TargetError, OptionError, ShapeError, EmptyMeanError: ``lse.LseError``
        subclasses (``ValueError``) naming row, column and value where they apply.
    """
    logits = _logits(logits, "logits")
    axis = _axis(logits, axis)
    rows = _rows(logits, axis)
    classes = rows.shape[-1]
    batch = rows.shape[:-1]
    target = np.asarray(target)
    if np.issubdtype(target.dtype, np.integer):
        expected = logits.shape[:axis] + logits.shape[axis + 1:]
        if target.shape != expected:
            raise ShapeError(f"class targets have shape {target.shape}, expected {expected}")
        targets = np.ascontiguousarray(target, dtype=np.int64).reshape(-1)
    elif np.issubdtype(target.dtype, np.floating) or target.dtype == BFLOAT16:
        if target.shape != logits.shape:
            raise ShapeError(
                f"probability targets have shape {target.shape}, expected the logits' {logits.shape}"
            )
        targets = _rows(target.astype(logits.dtype, copy=False), axis).reshape(-1)
    else:
        raise TypeError(f"target has dtype {target.dtype}: expected integers or probabilities")
    weights = None
    if weight is not None:
        weights = np.ascontiguousarray(weight, dtype=np.float64).reshape(-1)
        if weights.size != classes:
            raise ShapeError(f"weight has {weights.size} values for {classes} classes")
    probabilities = not np.issubdtype(targets.dtype, np.integer)
    if target_grad and not probabilities:
        raise OptionError("target_grad needs probability targets (class indices have no gradient)")
    if probabilities and ignore_index is not None and ignore_index >= 0:
        raise OptionError(
            "ignore_index is not supported for probability targets (they have no ignore index; "
            f"got ignore_index={ignore_index})",
            value=float(ignore_index),
        )
    sdtype = stat_dtype(logits.dtype)
    if classes == 0:
        if metrics:
            raise ShapeError("an argmax needs at least one class")
        return _no_classes(
            logits, targets, batch, sdtype, ignore_index, reduction, label_smoothing, empty_mean,
            grad, out_grad, stats, target_grad, out_target_grad,
        )
    if np.ndim(grad_output) == 0:
        g_out = float(grad_output)
    else:
        g_out = np.ascontiguousarray(grad_output, dtype=sdtype).reshape(-1)
    grad_buf = None
    if grad:
        _check_out(out_grad, logits.shape, logits.dtype, "out_grad")
        grad_buf = _buffer(out_grad, axis == logits.ndim - 1, rows.shape, logits.dtype, rows, targets)
    target_buf = None
    if target_grad:
        _check_out(out_target_grad, logits.shape, logits.dtype, "out_target_grad")
        inputs = (rows, targets) if grad_buf is None else (rows, targets, grad_buf)
        target_buf = _buffer(out_target_grad, axis == logits.ndim - 1, rows.shape, logits.dtype, *inputs)
    loss, denominator, row_loss, logit_stats, (z_term, argmax, correct) = _lse.cross_entropy(
        rows.reshape(-1),
        classes,
        targets,
        weights=weights,
        ignore_index=None if ignore_index is None else int(ignore_index),
        reduction=reduction,
        label_smoothing=float(label_smoothing),
        z_loss=float(z_loss),
        softcap=None if softcap is None else float(softcap),
        propagate=_policy(nonfinite),
        empty_mean=empty_mean,
        keep_row_loss=False,
        keep_logit_stats=bool(stats),
        grad=None if grad_buf is None else grad_buf.reshape(-1),
        grad_output=g_out,
        target_grad=None if target_buf is None else target_buf.reshape(-1),
        keep_row_argmax=bool(metrics),
        logit_scale=float(logit_scale),
    )
    value = row_loss.reshape(batch) if reduction == "none" else sdtype.type(loss)
    if not (grad or stats or target_grad or metrics):
        return value
    grad_result = None if grad_buf is None else _deliver(grad_buf, out_grad, axis)
    target_result = None if target_buf is None else _deliver(target_buf, out_target_grad, axis)
    if logit_stats is not None:
        logit_stats = LogitStats._wrap(logit_stats)
    accuracy = None
    if correct is not None:
        counted = targets.size if ignore_index is None else np.count_nonzero(targets != ignore_index)
        accuracy = correct / counted if counted else 0.0
    return CrossEntropyResult(
        value, grad_result, denominator, logit_stats, target_result, sdtype.type(z_term),
        None if argmax is None else argmax.reshape(batch), correct, accuracy,
    )


def _no_classes(logits, targets, batch, sdtype, ignore_index, reduction, label_smoothing,
                empty_mean, grad, out_grad, stats, target_grad, out_target_grad):
    """:func:`cross_entropy` of logits with an empty class axis (the core needs a class): every
    row's loss is an empty sum, 0; a counted class target names a class that does not exist."""
    if not 0.0 <= label_smoothing <= 1.0:
        raise OptionError(
            f"option label_smoothing = {label_smoothing} is invalid: in [0, 1]",
            value=float(label_smoothing),
        )
    probabilities = not np.issubdtype(targets.dtype, np.integer)
    counted = targets.size if probabilities else int(np.count_nonzero(targets != ignore_index))
    if not probabilities and counted:
        row = int(np.flatnonzero(targets != ignore_index)[0])
        value = int(targets[row])
        raise TargetError(
            f"target {value} at row {row} is out of range for 0 classes", row=row, value=float(value)
        )
    rows = int(np.prod(batch))
    denominator = float(rows if probabilities else counted)
    if reduction == "none":
        value = np.zeros(batch, sdtype)
    elif reduction == "mean" and denominator == 0.0 and empty_mean != "zero":
        if empty_mean == "error":
            raise EmptyMeanError(f"the mean over {rows} rows has no counted row to divide by")
        value = sdtype.type(np.nan)
    else:
        value = sdtype.type(0.0)
    if not (grad or stats or target_grad):
        return value
    if stats:
        raise ShapeError("logit statistics need at least one class")

    def empty(out):
        if out is not None:
            _check_out(out, logits.shape, logits.dtype)
            return out
        return np.empty(logits.shape, logits.dtype)

    return CrossEntropyResult(
        value,
        empty(out_grad) if grad else None,
        denominator,
        None,
        empty(out_target_grad) if target_grad else None,
        sdtype.type(0.0),
    )
