"""PyTorch ops of ``lse`` with autograd: ``torch.library.custom_op``s with ``register_fake``
(shape inference for ``torch.compile`` and meta tensors) and ``register_autograd``.

* :func:`cross_entropy` / :class:`CrossEntropyLoss` — drop-ins for ``F.cross_entropy`` /
  ``nn.CrossEntropyLoss`` (same signature, result dtype, semantics and errors; gradients for
  the input and for probability targets), plus ``z_loss``, ``softcap``, ``nonfinite``,
  ``empty_mean``, ``loss_dtype``; the loss and its gradients come from one fused pass in the
  forward, and the backward only hands them over (or scales them by a ``grad_output`` other
  than 1).
* :func:`linear_cross_entropy` / :class:`LinearCrossEntropyLoss` — ``F.linear_cross_entropy`` /
  ``nn.LinearCrossEntropyLoss`` without the logits, with lse's options and a memory budget.
* :func:`softmax`, :func:`log_softmax`, :func:`logsumexp`, each with its backward.

CPU tensors of float32, float16, bfloat16 and float64. Tensors are handed to the kernels as
NumPy views, without a copy when C-contiguous (bfloat16 through an int16 view, since NumPy has
no native bfloat16); outputs are allocated by NumPy (which asks the kernel for transparent huge
pages, so a fresh 0.5 GB gradient costs far fewer page faults than a ``torch.empty``) and handed
to torch with ``torch.from_numpy``. A tensor on another device is a ``lse.DeviceError`` naming
the device. Softmax, log-softmax, gradients and (as PyTorch) losses come back in the input's
dtype; the kernels compute losses and logsumexp in float32 for float16/bfloat16 input (float64
for float64), which ``loss_dtype=torch.float32`` keeps: an f16 loss of 7e4 is finite there.
"""

from __future__ import annotations

import os
import sys
from typing import NamedTuple, Optional

import numpy as np
import torch
from torch import Tensor

from . import _lse, _numpy
from ._errors import DTypeError, OptionError, ShapeError
from ._tensors import NUMPY_DTYPES, as_numpy, as_torch, check_device

__all__ = [
    "CrossEntropyOutput",
    "cross_entropy",
    "linear_cross_entropy",
    "softmax",
    "log_softmax",
    "logsumexp",
    "CrossEntropyLoss",
    "LinearCrossEntropyLoss",
    "empty_cache",
]

def _stat_dtype(dtype: torch.dtype) -> torch.dtype:
    """The dtype of losses and logsumexp: float64 for float64, else float32."""
    return torch.float64 if dtype == torch.float64 else torch.float32


class _BufferCache:
    """Output buffers kept for reuse, like PyTorch's CUDA caching allocator.

    A training step asks for the same gradient shape every time; a fresh 0.5 GB buffer costs
    more in page faults than the fused kernel that fills it (4096 × 32000 f32 on the test
    machine: ~85 ms of faults against ~90 ms of kernel, one thread). A cached array is handed out
    again only when no tensor refers to it any more (its reference count is the cache's own),
    and every op here overwrites all of its output. At most ``limit`` bytes are kept
    (``LSE_TORCH_CACHE_BYTES``, default 2 GiB; 0 turns the cache off); :func:`empty_cache`
    drops them.
    """

    def __init__(self, limit: int):
        self.limit = limit
        self.buffers: dict = {}
        # The reference count of an array that only the cache holds, as this interpreter
        # counts it in the loop below (measured, not assumed: interpreters differ).
        for probe in [np.empty(0)]:
            self.idle_refs = sys.getrefcount(probe)

    def get(self, shape: tuple, dtype: np.dtype) -> np.ndarray:
        key = (shape, dtype)
        for array in self.buffers.get(key, ()):
            if sys.getrefcount(array) <= self.idle_refs:
                return array
        array = np.empty(shape, dtype)
        if array.nbytes + self.nbytes() <= self.limit:
            self.buffers.setdefault(key, []).append(array)
        return array

    def nbytes(self) -> int:
        return sum(a.nbytes for bucket in self.buffers.values() for a in bucket)

    def clear(self) -> None:
        self.buffers.clear()


_cache = _BufferCache(int(os.environ.get("LSE_TORCH_CACHE_BYTES", 2 << 30)))


def empty_cache() -> None:
    """Releases the output buffers ``lse.torch`` keeps for reuse (those still in use by a tensor
    stay alive until the tensor goes)."""
    _cache.clear()


def _empty(shape, dtype: torch.dtype) -> Tensor:
    return as_torch(_cache.get(tuple(shape), NUMPY_DTYPES[dtype]))


def _scalar(value, dtype: torch.dtype) -> Tensor:
    return torch.tensor(float(value), dtype=dtype)


# ---------------------------------------------------------------------------------------------
# softmax, log_softmax and their backward


def _row_op(kernel, x: Tensor, dim: int) -> Tensor:
    """``kernel`` (an lse NumPy row op) over ``dim`` of ``x`` into a new tensor."""
    check_device(x, kernel.__name__)
    out = _empty(x.shape, x.dtype)
    kernel(as_numpy(x), axis=dim, out=as_numpy(out))
    return out


def _row_backward(kernel, y: Tensor, dy: Tensor, dim: int) -> Tensor:
    out = _empty(y.shape, y.dtype)
    kernel(as_numpy(y), as_numpy(dy.to(y.dtype).contiguous()), axis=dim, out=as_numpy(out))
    return out


@torch.library.custom_op("lse::softmax", mutates_args=())
def _softmax(x: Tensor, dim: int) -> Tensor:
    return _row_op(_numpy.softmax, x, dim)


@torch.library.custom_op("lse::log_softmax", mutates_args=())
def _log_softmax(x: Tensor, dim: int) -> Tensor:
    return _row_op(_numpy.log_softmax, x, dim)


@torch.library.custom_op("lse::softmax_backward", mutates_args=())
def _softmax_backward(y: Tensor, dy: Tensor, dim: int) -> Tensor:
    return _row_backward(_numpy.softmax_backward, y, dy, dim)


@torch.library.custom_op("lse::log_softmax_backward", mutates_args=())
def _log_softmax_backward(y: Tensor, dy: Tensor, dim: int) -> Tensor:
    return _row_backward(_numpy.log_softmax_backward, y, dy, dim)


for _op in (_softmax, _log_softmax):
    _op.register_fake(lambda x, dim: torch.empty_like(x))
for _op in (_softmax_backward, _log_softmax_backward):
    _op.register_fake(lambda y, dy, dim: torch.empty_like(y))


def _save_output(ctx, inputs, output):
    ctx.save_for_backward(output)
    ctx.dim = inputs[1]


_softmax.register_autograd(
    lambda ctx, g: (_softmax_backward(ctx.saved_tensors[0], g, ctx.dim), None),
    setup_context=_save_output,
)
_log_softmax.register_autograd(
    lambda ctx, g: (_log_softmax_backward(ctx.saved_tensors[0], g, ctx.dim), None),
    setup_context=_save_output,
)


# ---------------------------------------------------------------------------------------------
# logsumexp


@torch.library.custom_op("lse::logsumexp", mutates_args=())
def _logsumexp(x: Tensor, dim: int, keepdim: bool) -> Tensor:
    check_device(x, "logsumexp")
    result = _numpy.logsumexp(as_numpy(x), axis=dim, keepdims=keepdim)
    return as_torch(np.ascontiguousarray(result))


@_logsumexp.register_fake
def _(x, dim, keepdim):
    shape = list(x.shape)
    d = dim % x.dim()
    if keepdim:
        shape[d] = 1
    else:
        del shape[d]
    return x.new_empty(shape, dtype=_stat_dtype(x.dtype))


def _logsumexp_setup(ctx, inputs, output):
    x, dim, keepdim = inputs
    ctx.save_for_backward(x)
    ctx.dim, ctx.keepdim = dim, keepdim


def _logsumexp_backward(ctx, g):
    (x,) = ctx.saved_tensors
    d = ctx.dim % x.dim()
    g = g if ctx.keepdim else g.unsqueeze(d)
    # ∂ lse/∂x = softmax(x): 0 on masked entries and on fully masked rows (never exp(-inf + inf)).
    return (g * _softmax(x, d)).to(x.dtype), None, None


_logsumexp.register_autograd(_logsumexp_backward, setup_context=_logsumexp_setup)


# ---------------------------------------------------------------------------------------------
# cross-entropy


class CrossEntropyOutput(NamedTuple):
    """What :func:`cross_entropy` and :func:`linear_cross_entropy` return when asked for more
    than the loss (``return_z_loss``, ``return_token_accuracy``, ``return_argmax``); the fields
    not asked for are ``None``. All but ``loss`` are detached: they are for logging."""

    loss: Tensor
    """The loss, as the call returns it otherwise."""
    z_loss: Optional[Tensor] = None
    """The z-loss term's share of ``loss`` (``z · lse²`` of the counted rows, reduced as the
    loss: summed for ``reduction="none"``), in the loss's dtype: ``loss - z_loss`` is the
    cross-entropy alone."""
    token_accuracy: Optional[Tensor] = None
    """The fraction of counted rows (not ignored) whose argmax is their class target, a
    float32 scalar (0 with no counted row; NaN under ``empty_mean="nan"``)."""
    argmax: Optional[Tensor] = None
    """Each row's argmax (int64, the target's shape; -1 for ignored rows): the first column
    holding the row's largest logit, as ``torch.argmax`` (soft-capping does not change it)."""


def _finish(loss, z_term, argmax, correct, *, dtype, batch_shape, empty_mean,
            return_z_loss, return_token_accuracy, return_argmax):
    """The public result: the loss alone, or a :class:`CrossEntropyOutput`. ``argmax`` is -1
    exactly on the ignored rows, so it also counts the rows the accuracy is over."""
    if not (return_z_loss or return_token_accuracy or return_argmax):
        return loss
    accuracy = None
    if return_token_accuracy:
        if correct < 0:
            raise OptionError("return_token_accuracy needs class targets (probabilities have none)")
        empty = float("nan") if empty_mean == "nan" else 0.0
        counted = int((argmax >= 0).sum())
        accuracy = torch.tensor(int(correct) / counted if counted else empty, dtype=torch.float32)
    return CrossEntropyOutput(
        loss,
        z_term.to(dtype) if return_z_loss else None,
        accuracy,
        argmax.reshape(batch_shape) if return_argmax else None,
    )



@torch.library.custom_op("lse::cross_entropy", mutates_args=())
def _cross_entropy(
    input: Tensor,
    target: Tensor,
    weight: Optional[Tensor],
    ignore_index: int,
    reduction: str,
    label_smoothing: float,
    z_loss: float,
    softcap: Optional[float],
    logit_scale: float,
    nonfinite: str,
    empty_mean: str,
    compute_grad: bool,
    compute_target_grad: bool,
    metrics: bool,
) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor, Tensor]:
    """``input`` rows × classes; class targets (int64, rows) or probabilities (rows × classes,
    the input's dtype). Returns the loss (float32, float64 for float64 input; per row for
    "none"), with ``compute_grad`` the gradient of the loss (grad_output = 1) with respect to
    ``input`` and with ``compute_target_grad`` the one with respect to the probability targets,
    both in the input's dtype (else empty tensors); then, with ``metrics``, each row's argmax
    (int64) and the number of rows on target (int64, -1 for probability targets), and the
    z-loss term (the loss's dtype, a scalar)."""
    check_device(input, "cross_entropy")
    check_device(target, "cross_entropy", "target")
    grad_buffer = _empty(input.shape, input.dtype) if compute_grad else None
    target_buffer = _empty(input.shape, input.dtype) if compute_target_grad else None
    result = _numpy.cross_entropy(
        as_numpy(input),
        as_numpy(target, "target"),
        weight=None if weight is None else as_numpy(weight.to(torch.float64), "weight"),
        ignore_index=ignore_index,
        reduction=reduction,
        label_smoothing=label_smoothing,
        z_loss=z_loss,
        softcap=softcap,
        logit_scale=logit_scale,
        nonfinite=nonfinite,
        empty_mean=empty_mean,
        grad=compute_grad,
        out_grad=None if grad_buffer is None else as_numpy(grad_buffer),
        target_grad=compute_target_grad,
        out_target_grad=None if target_buffer is None else as_numpy(target_buffer),
        metrics=metrics,
    )
    asked = compute_grad or compute_target_grad or metrics
    loss = result.loss if asked else result
    if reduction == "none":
        loss = as_torch(np.ascontiguousarray(loss))
    else:
        loss = _scalar(loss, _stat_dtype(input.dtype))
    grad = grad_buffer if compute_grad else input.new_empty(0)
    target_grad = target_buffer if compute_target_grad else input.new_empty(0)
    z_term = result.z_loss if asked else 0.0
    argmax, correct = torch.empty(0, dtype=torch.int64), torch.tensor(-1)
    if metrics:
        argmax = as_torch(np.ascontiguousarray(result.argmax, dtype=np.int64))
        correct = torch.tensor(-1 if result.correct is None else result.correct)
    return loss, grad, target_grad, argmax, correct, _scalar(z_term, _stat_dtype(input.dtype))


@_cross_entropy.register_fake
def _(input, target, weight, ignore_index, reduction, label_smoothing, z_loss, softcap,
      logit_scale, nonfinite, empty_mean, compute_grad, compute_target_grad, metrics):
    shape = input.shape[:1] if reduction == "none" else ()
    loss = input.new_empty(shape, dtype=_stat_dtype(input.dtype))
    grad = torch.empty_like(input) if compute_grad else input.new_empty(0)
    target_grad = torch.empty_like(input) if compute_target_grad else input.new_empty(0)
    argmax = input.new_empty(input.shape[:1] if metrics else (0,), dtype=torch.int64)
    correct = input.new_empty((), dtype=torch.int64)
    return loss, grad, target_grad, argmax, correct, input.new_empty((), dtype=_stat_dtype(input.dtype))


def _cross_entropy_setup(ctx, inputs, output):
    _, grad, target_grad, argmax, correct, z_term = output
    # Kept as attributes, not with save_for_backward: the backward hands them over and drops
    # them, so that autograd's AccumulateGrad can take one as `input.grad` without a copy (a
    # saved tensor would keep a second reference and force a 0.5 GB clone at 4096 × 32000 f32).
    # They are non-differentiable (no grad_fn), so this makes no reference cycle.
    ctx.grads = (grad if inputs[11] else None, target_grad if inputs[12] else None)
    # The gradient outputs get no incoming gradient: leave them None rather than materialised
    # zeros.
    ctx.set_materialize_grads(False)
    ctx.reduction = inputs[4]
    # The inputs too (references, not copies), for a backward that finds no fused gradient: a
    # forward run without it, or a second backward through the graph (retain_graph=True).
    input, target, weight = inputs[:3]
    ctx.save_for_backward(input, target, weight)
    ctx.options = inputs[3:11]
    ctx.mark_non_differentiable(grad, target_grad, argmax, correct, z_term)


def _is_one(g: Tensor) -> bool:
    """Whether ``g`` is a real (not traced) scalar 1: then the saved gradient is handed over as
    it is, without another pass over it."""
    traced = (
        type(g) is not torch.Tensor  # FakeTensor, FunctionalTensor, ...
        or torch._is_functional_tensor(g)
        or torch.compiler.is_compiling()
    )
    return not traced and g.dim() == 0 and g.item() == 1.0


def _cross_entropy_backward(ctx, grad_loss, *_grads_of_the_other_outputs):
    none = (None,) * 14
    if grad_loss is None:  # nothing flows back through the loss
        return none
    wanted = ctx.needs_input_grad[:2]
    grads = ctx.grads
    ctx.grads = (None, None)  # handed over once; a second backward recomputes them
    if any(w and (g is None or g.numel() == 0) for w, g in zip(wanted, grads, strict=True)):
        input, target, weight = ctx.saved_tensors
        _, *grads, _, _, _ = _cross_entropy(
            input, target, weight, *ctx.options, wanted[0], wanted[1], False
        )

    def scaled(grad):
        if ctx.reduction == "none":
            return grad * grad_loss.to(grad.dtype).unsqueeze(-1)
        if _is_one(grad_loss):
            return grad
        return grad * grad_loss.to(grad.dtype)

    grad_input = scaled(grads[0]) if wanted[0] else None
    grad_target = scaled(grads[1]) if wanted[1] else None
    return (grad_input, grad_target) + none[2:]


_cross_entropy.register_autograd(_cross_entropy_backward, setup_context=_cross_entropy_setup)

_REDUCTIONS = ("mean", "sum", "none")


def _legacy_reduction(size_average, reduce, reduction: str) -> str:
    """PyTorch's deprecated ``size_average``/``reduce`` pair, as PyTorch reads it."""
    if size_average is None and reduce is None:
        return reduction
    from torch.nn import _reduction

    return _reduction.legacy_get_string(size_average, reduce)


def cross_entropy(
    input: Tensor,
    target: Tensor,
    weight: Optional[Tensor] = None,
    size_average: Optional[bool] = None,
    ignore_index: int = -100,
    reduce: Optional[bool] = None,
    reduction: str = "mean",
    label_smoothing: float = 0.0,
    *,
    z_loss: float = 0.0,
    softcap: Optional[float] = None,
    nonfinite: str = "error",
    empty_mean: str = "zero",
    loss_dtype: Optional[torch.dtype] = None,
    logit_scale: float = 1.0,
    return_z_loss: bool = False,
    return_token_accuracy: bool = False,
    return_argmax: bool = False,
):
    """``torch.nn.functional.cross_entropy`` computed by lse: the same signature, semantics,
    result dtype and errors (class-index or probability targets, class dim 1 for ``(N, C, d1,
    …)`` input, a ``(C)`` input without batch, ``weight`` (any finite values, as PyTorch),
    ``ignore_index``, ``reduction``, ``label_smoothing``, zero-size dimensions), gradients with
    respect to the input and to probability targets that require grad, plus:

    * ``z_loss``: adds ``z · lse²`` per counted row; ``softcap``: logits become
      ``cap · tanh(x / cap)``;
    * ``nonfinite``: ``"error"`` (default: NaN/+inf logits raise ``lse.NonFiniteError`` naming
      row, column and value) or ``"propagate"``;
    * ``empty_mean``: what a mean over nothing is, ``"zero"`` (default), ``"nan"`` (PyTorch's
      0/0) or ``"error"``;
    * ``loss_dtype``: the loss's dtype; default the input's (as PyTorch); ``torch.float32``
      keeps the float32 loss lse computes for float16/bfloat16 input (finite where a float16
      loss would overflow).
    * ``logit_scale``: every logit is multiplied by it first, inside the kernel (a temperature
      ``T`` is ``logit_scale=1/T``; no pass over the logits of its own): the loss of
      ``logit_scale · input``, the gradient with respect to ``input``;
    * ``return_z_loss``, ``return_token_accuracy``, ``return_argmax``: return a
      :class:`CrossEntropyOutput` (loss, z-loss term, token accuracy, each row's argmax) instead
      of the loss alone, all from the same call (as Liger's ``return_z_loss`` and
      ``return_token_accuracy``): the argmax is taken while each row is in cache from the
      loss's read pass.

    The loss and the gradients come from one fused pass; they are computed in the forward when
    something requires grad (and grad mode is on) and handed over by the backward.

    Where lse differs from PyTorch on purpose (every case is one where PyTorch's result is not
    finite; see the README's table):

    =============================================  ======================  ==================
    input                                          PyTorch                 lse.torch
    =============================================  ======================  ==================
    mean over no counted row (all ignored, [0,C])  NaN                     0 (``empty_mean``)
    ``[N, 0]`` input with probability targets      NaN (mean)              0 (``empty_mean``)
    NaN or +inf logit                              NaN loss                ``NonFiniteError``
    target mass on a -inf logit                    inf / NaN               ``TargetError``
    -inf logit with zero target mass               NaN (probabilities)     finite, grad 0
    label smoothing with -inf logits               inf                     ε spread over the
                                                                           finite classes
    int32 class targets                            ``RuntimeError``        accepted
    =============================================  ======================  ==================

    Raises:
        DeviceError: a tensor not on the CPU (naming its device).
        ShapeError (also ``ValueError``/``RuntimeError``): shapes that do not fit.
        TargetError (also ``IndexError``): a class target out of range; a non-finite
            probability target.
        OptionError (also ``RuntimeError``): an option out of its domain, ``ignore_index`` ≥ 0
            with probability targets.
        NonFiniteError, EmptyMeanError: see ``nonfinite`` and ``empty_mean``.
    """
    check_device(input, "cross_entropy")
    check_device(target, "cross_entropy", "target")
    if weight is not None:
        check_device(weight, "cross_entropy", "weight")
    reduction = _legacy_reduction(size_average, reduce, reduction)
    if reduction not in _REDUCTIONS:
        raise ValueError(f"{reduction} is not a valid value for reduction")
    if not 0.0 <= label_smoothing <= 1.0:
        raise OptionError(
            f"label_smoothing must be between 0.0 and 1.0. Got: {label_smoothing}",
            value=float(label_smoothing),
        )
    if input.dim() == 0:
        raise ShapeError("input is a scalar: it needs a class dimension (1-D (C) at least)")
    if not (input.dtype.is_floating_point and input.dtype in NUMPY_DTYPES):
        raise DTypeError(f"input has dtype {input.dtype}; lse handles float64, float32, float16, bfloat16")
    probabilities = target.dtype.is_floating_point
    # PyTorch's layout: (C), (N, C) or (N, C, d1, ...); the kernel wants rows × classes.
    unbatched = input.dim() == 1
    x = input.unsqueeze(0) if unbatched else input
    classes = x.shape[1]
    if probabilities:
        if target.shape != input.shape:
            raise ShapeError(
                f"probability targets have shape {tuple(target.shape)}, expected the input's "
                f"{tuple(input.shape)}"
            )
        if ignore_index >= 0:
            raise OptionError(
                "ignore_index is not supported for floating point target (probability targets "
                f"have no ignore index; got ignore_index={ignore_index})",
                value=float(ignore_index),
            )
    else:
        if target.dtype == torch.bool or target.dtype.is_complex:
            raise DTypeError(f"target has dtype {target.dtype}: expected class indices or probabilities")
        expected = input.shape[:0] if unbatched else input.shape[:1] + input.shape[2:]
        if target.shape != expected:
            if not unbatched and target.dim() >= 1 and target.shape[0] != input.shape[0]:
                raise ShapeError(
                    f"Expected input batch_size ({input.shape[0]}) to match target batch_size "
                    f"({target.shape[0]})."
                )
            raise ShapeError(
                f"class targets have shape {tuple(target.shape)}, expected {tuple(expected)} "
                f"(the input's {tuple(input.shape)} without its class dimension)"
            )
    if weight is not None and (weight.dim() != 1 or weight.shape[0] != classes):
        raise ShapeError(
            f"weight tensor should be defined either for all {classes} classes or no classes "
            f"but got weight tensor of shape: {list(weight.shape)}"
        )
    t = target.unsqueeze(0) if unbatched else target
    spatial = x.shape[2:]
    if x.dim() > 2:
        x = x.movedim(1, -1)
        if probabilities:
            t = t.movedim(1, -1)
    rows = x.shape[:-1].numel()
    x = x.reshape(rows, classes).contiguous()
    t = t.reshape(rows, classes).to(x.dtype) if probabilities else t.reshape(rows).to(torch.int64)
    grad_on = torch.is_grad_enabled()
    compute_grad = grad_on and input.requires_grad
    compute_target_grad = grad_on and probabilities and target.requires_grad
    metrics = return_token_accuracy or return_argmax
    loss, _, _, argmax, correct, z_term = _cross_entropy(
        x, t.contiguous(), weight, int(ignore_index), reduction, float(label_smoothing),
        float(z_loss), None if softcap is None else float(softcap), float(logit_scale),
        nonfinite, empty_mean, compute_grad, compute_target_grad, metrics,
    )
    batch_shape = () if unbatched else (input.shape[0], *spatial)
    if reduction == "none":
        loss = loss.reshape(batch_shape)
    dtype = input.dtype if loss_dtype is None else loss_dtype
    return _finish(
        loss.to(dtype), z_term, argmax, int(correct), dtype=dtype,
        batch_shape=batch_shape, empty_mean=empty_mean, return_z_loss=return_z_loss,
        return_token_accuracy=return_token_accuracy, return_argmax=return_argmax,
    )


# ---------------------------------------------------------------------------------------------
# linear cross-entropy

# lse's default working memory for the chunked logits (lse::DEFAULT_LINEAR_BUDGET_BYTES).
DEFAULT_LINEAR_BUDGET_BYTES = 256 << 20


def _linear_no_classes(input, linear_weight, target, linear_bias, ignore_index, reduction,
                       label_smoothing, empty_mean, compute_grad, metrics, stat):
    """A head of no class (the core needs one): the logits are ``[N, 0]``, so lse's rule for
    them (:func:`cross_entropy`'s, through the NumPy layer, which also refuses an argmax of no
    class) gives the loss, and every gradient is 0."""
    logits = np.zeros((input.shape[0], 0), NUMPY_DTYPES[stat])
    value = _numpy.cross_entropy(
        logits, as_numpy(target, "target"), ignore_index=ignore_index, reduction=reduction,
        label_smoothing=label_smoothing, empty_mean=empty_mean, metrics=metrics,
    )
    loss = as_torch(np.ascontiguousarray(value)) if reduction == "none" else _scalar(value, stat)
    zeros = (torch.zeros_like(input), torch.zeros_like(linear_weight),
             input.new_empty(0) if linear_bias is None else torch.zeros_like(linear_bias))
    # (Outputs may not alias one another: three distinct empty tensors.)
    grads = zeros if compute_grad else tuple(input.new_empty(0) for _ in range(3))
    found = (torch.empty(0, dtype=torch.int64), torch.tensor(-1), _scalar(0.0, stat))
    return (loss,) + grads + found


@torch.library.custom_op("lse::linear_cross_entropy", mutates_args=())
def _linear_cross_entropy(
    input: Tensor,
    linear_weight: Tensor,
    target: Tensor,
    linear_bias: Optional[Tensor],
    weight: Optional[Tensor],
    ignore_index: int,
    reduction: str,
    label_smoothing: float,
    z_loss: float,
    softcap: Optional[float],
    logit_scale: float,
    nonfinite: str,
    empty_mean: str,
    budget_bytes: int,
    compute_grad: bool,
    grad_output: Optional[Tensor],
    metrics: bool,
) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor]:
    """``input`` (N × D) · ``linear_weight`` (V × D)ᵀ + ``linear_bias`` (V), one dtype, against
    class targets (int64, N) or probabilities (N × V, the input's dtype). Returns the loss
    (float32; float64 for float64 input; per row for "none") and, with ``compute_grad``, the
    gradients of ``grad_output · loss`` (``grad_output``: one per row with "none", else 1) for
    ``input``, ``linear_weight`` and ``linear_bias`` (empty tensors where not computed); then,
    as :func:`_cross_entropy`, the argmax and rows on target (with ``metrics``) and the z-loss
    term."""
    for what, tensor in (("input", input), ("linear_weight", linear_weight), ("target", target),
                         ("linear_bias", linear_bias)):
        if tensor is not None:
            check_device(tensor, "linear_cross_entropy", what)
    stat = _stat_dtype(input.dtype)
    if linear_weight.shape[0] == 0:
        return _linear_no_classes(input, linear_weight, target, linear_bias, ignore_index, reduction,
                                  label_smoothing, empty_mean, compute_grad, metrics, stat)
    dh = _empty(input.shape, input.dtype) if compute_grad else None
    dw = _empty(linear_weight.shape, input.dtype) if compute_grad else None
    db = _empty(linear_bias.shape, input.dtype) if compute_grad and linear_bias is not None else None
    go = None if grad_output is None else as_numpy(grad_output.to(stat).contiguous())
    loss, _, row_loss, found = _lse.linear_cross_entropy(
        as_numpy(input).reshape(-1), as_numpy(linear_weight, "linear_weight").reshape(-1),
        linear_weight.shape[0], as_numpy(target, "target").reshape(-1),
        bias=None if linear_bias is None else as_numpy(linear_bias, "linear_bias").reshape(-1),
        weights=None if weight is None else as_numpy(weight.to(torch.float64), "weight"),
        ignore_index=ignore_index, reduction=reduction, label_smoothing=label_smoothing,
        z_loss=z_loss, softcap=softcap, propagate=_numpy._policy(nonfinite),
        empty_mean=empty_mean, budget_bytes=budget_bytes,
        grad_hidden=None if dh is None else as_numpy(dh).reshape(-1),
        grad_weight=None if dw is None else as_numpy(dw).reshape(-1),
        grad_bias=None if db is None else as_numpy(db).reshape(-1),
        grad_output=go, keep_row_argmax=metrics, logit_scale=logit_scale,
    )
    loss = as_torch(row_loss) if reduction == "none" else _scalar(loss, stat)
    z_term, argmax, correct = found
    def given(t):  # an unused output: a distinct empty tensor (outputs may not alias)
        return input.new_empty(0) if t is None else t

    argmax = as_torch(argmax) if metrics else torch.empty(0, dtype=torch.int64)
    correct = torch.tensor(-1 if correct is None else int(correct))
    return loss, given(dh), given(dw), given(db), argmax, correct, _scalar(z_term, stat)


@_linear_cross_entropy.register_fake
def _(input, linear_weight, target, linear_bias, weight, ignore_index, reduction, label_smoothing,
      z_loss, softcap, logit_scale, nonfinite, empty_mean, budget_bytes, compute_grad, grad_output,
      metrics):
    shape = input.shape[:1] if reduction == "none" else ()
    stat = _stat_dtype(input.dtype)
    loss = input.new_empty(shape, dtype=stat)
    found = (
        input.new_empty(input.shape[:1] if metrics else (0,), dtype=torch.int64),
        input.new_empty((), dtype=torch.int64),
        input.new_empty((), dtype=stat),
    )
    if not compute_grad:
        return (loss, input.new_empty(0), input.new_empty(0), input.new_empty(0)) + found
    db = input.new_empty(0) if linear_bias is None else torch.empty_like(linear_bias)
    return (loss, torch.empty_like(input), torch.empty_like(linear_weight), db) + found


def _linear_setup(ctx, inputs, output):
    _, dh, dw, db, argmax, correct, z_term = output
    compute_grad = inputs[14]
    # Handed over by the backward, as the cross-entropy's gradient (see _cross_entropy_setup).
    ctx.grads = (dh, dw, db) if compute_grad and inputs[6] != "none" else None
    ctx.set_materialize_grads(False)
    ctx.reduction = inputs[6]
    input, linear_weight, target, linear_bias, weight = inputs[:5]
    ctx.save_for_backward(input, linear_weight, target, linear_bias, weight)
    ctx.options = inputs[5:14]
    ctx.mark_non_differentiable(dh, dw, db, argmax, correct, z_term)


def _linear_backward(ctx, grad_loss, *_):
    none = (None,) * 17
    if grad_loss is None:
        return none
    grads, ctx.grads = ctx.grads, None
    if ctx.reduction == "none" or grads is None:
        input, linear_weight, target, linear_bias, weight = ctx.saved_tensors
        per_row = grad_loss if ctx.reduction == "none" else None
        _, *grads, _, _, _ = _linear_cross_entropy(
            input, linear_weight, target, linear_bias, weight, *ctx.options, True, per_row, False
        )
        factor = None if ctx.reduction == "none" else grad_loss
    else:
        factor = grad_loss
    if factor is not None and not _is_one(factor):
        grads = [g * factor.to(g.dtype) for g in grads]
    dh, dw, db = grads
    wanted = ctx.needs_input_grad
    return (dh if wanted[0] else None, dw if wanted[1] else None, None,
            db if wanted[3] else None) + none[4:]


_linear_cross_entropy.register_autograd(_linear_backward, setup_context=_linear_setup)


def linear_cross_entropy(
    input: Tensor,
    linear_weight: Tensor,
    target: Tensor,
    *,
    linear_bias: Optional[Tensor] = None,
    weight: Optional[Tensor] = None,
    reduction: str = "mean",
    ignore_index: Optional[int] = None,
    label_smoothing: float = 0.0,
    z_loss: float = 0.0,
    softcap: Optional[float] = None,
    nonfinite: str = "error",
    empty_mean: str = "zero",
    budget_bytes: Optional[int] = None,
    loss_dtype: Optional[torch.dtype] = None,
    logit_scale: float = 1.0,
    return_z_loss: bool = False,
    return_token_accuracy: bool = False,
    return_argmax: bool = False,
):
    """``torch.nn.functional.linear_cross_entropy`` computed by lse: the cross-entropy of the
    logits ``input @ linear_weight.T + linear_bias`` without ever holding them all, with the
    argument names and order of PyTorch's (``input`` is ``(N, D)`` or ``(D)``,
    ``linear_weight`` ``(C, D)``, ``linear_bias`` ``(C)``, ``weight`` the class weights,
    ``ignore_index`` defaults to -100 for class targets), plus lse's options: ``z_loss``,
    ``softcap``, ``nonfinite``, ``empty_mean``, ``loss_dtype`` (as in :func:`cross_entropy`) and
    ``budget_bytes``, the working memory for a chunk of logits (default 256 MiB): the peak
    extra memory is that plus ``O(N + C)``, plus the gradients themselves (and, for float16/
    bfloat16, a float32 accumulator of ``dW``). ``logit_scale`` (a temperature's ``1/T``)
    scales each chunk's logits inside the kernel. ``return_z_loss``, ``return_token_accuracy``
    and ``return_argmax`` return a :class:`CrossEntropyOutput` as :func:`cross_entropy` does,
    from the logits the call forms anyway.

    Every dtype and both kinds of target run lse's fused Rust path: each chunk's logits formed
    by one matrix product (in float32; in float64 for float64), the cross-entropy and its
    gradient written over them, then ``dH``, ``dW``, ``db``; probability targets are read a
    chunk of rows at a time. Gradients flow to
    ``input``, ``linear_weight`` and ``linear_bias``; a probability ``target`` that requires
    grad is an error here (use :func:`cross_entropy` on the logits). Not supported: the
    K-dimensional ``linear_weight`` ``(C, d1, …, D)``, PyTorch's ``options``.

    Raises:
        The errors of :func:`cross_entropy`, and ``lse.NonFiniteError`` naming "hidden",
        "weight" or "bias" (row, column, value) for a NaN/inf there under ``nonfinite="error"``.
    """
    if input.dim() not in (1, 2):
        raise ShapeError(f"input has shape {tuple(input.shape)}: expected (N, D) or (D)")
    if linear_weight.dim() != 2:
        raise ShapeError(
            f"linear_weight has shape {tuple(linear_weight.shape)}: expected (C, D) (lse has no "
            "K-dimensional head)"
        )
    classes, dim = linear_weight.shape
    if input.shape[-1] != dim:
        raise ShapeError(f"input has {input.shape[-1]} features, linear_weight {dim}")
    if linear_weight.dtype != input.dtype or (linear_bias is not None and linear_bias.dtype != input.dtype):
        raise DTypeError("input, linear_weight and linear_bias must have one dtype")
    if linear_bias is not None and tuple(linear_bias.shape) != (classes,):
        raise ShapeError(f"linear_bias has shape {tuple(linear_bias.shape)}, expected ({classes},)")
    if weight is not None and tuple(weight.shape) != (classes,):
        raise ShapeError(
            f"weight tensor should be defined either for all {classes} classes or no classes "
            f"but got weight tensor of shape: {list(weight.shape)}"
        )
    reduction = _legacy_reduction(None, None, reduction)
    if reduction not in _REDUCTIONS:
        raise ValueError(f"{reduction} is not a valid value for reduction")
    if not 0.0 <= label_smoothing <= 1.0:
        raise OptionError(f"label_smoothing must be between 0.0 and 1.0. Got: {label_smoothing}")
    unbatched = input.dim() == 1
    h = input.unsqueeze(0) if unbatched else input
    probabilities = target.dtype.is_floating_point
    t = target.unsqueeze(0) if unbatched else target
    if probabilities:
        if tuple(t.shape) != (h.shape[0], classes):
            raise ShapeError(f"probability targets have shape {tuple(target.shape)}, expected "
                             f"{(classes,) if unbatched else (h.shape[0], classes)}")
        if ignore_index is not None and ignore_index >= 0:
            raise OptionError("ignore_index is not supported for floating point target")
        if target.requires_grad and torch.is_grad_enabled():
            raise NotImplementedError(
                "lse.torch.linear_cross_entropy: no gradient for probability targets; pass "
                "target.detach(), or use lse.torch.cross_entropy on the logits"
            )
        t = t.to(h.dtype)
    else:
        if tuple(t.shape) != (h.shape[0],):
            raise ShapeError(f"Expected input batch_size ({h.shape[0]}) to match target "
                             f"batch_size ({t.shape[0] if t.dim() else 0}).")
        t = t.to(torch.int64)
    grad_on = torch.is_grad_enabled()
    compute_grad = grad_on and any(
        x is not None and x.requires_grad for x in (input, linear_weight, linear_bias)
    )
    metrics = return_token_accuracy or return_argmax
    loss, _, _, _, argmax, correct, z_term = _linear_cross_entropy(
        h.contiguous(), linear_weight.contiguous(), t.contiguous(),
        None if linear_bias is None else linear_bias.contiguous(), weight,
        -100 if ignore_index is None else int(ignore_index), reduction, float(label_smoothing),
        float(z_loss), None if softcap is None else float(softcap), float(logit_scale),
        nonfinite, empty_mean,
        DEFAULT_LINEAR_BUDGET_BYTES if budget_bytes is None else int(budget_bytes),
        compute_grad, None, metrics,
    )
    if unbatched and reduction == "none":
        loss = loss.reshape(())
    dtype = input.dtype if loss_dtype is None else loss_dtype
    return _finish(
        loss.to(dtype), z_term, argmax, int(correct), dtype=dtype,
        batch_shape=() if unbatched else (h.shape[0],), empty_mean=empty_mean,
        return_z_loss=return_z_loss, return_token_accuracy=return_token_accuracy,
        return_argmax=return_argmax,
    )


class LinearCrossEntropyLoss(torch.nn.Module):
    """A drop-in for ``torch.nn.LinearCrossEntropyLoss``: holds the head as ``self.linear`` (a
    ``torch.nn.Linear(in_features, num_classes, bias=bias)``) and computes
    :func:`linear_cross_entropy` with it, with lse's keyword-only options on top."""

    def __init__(
        self,
        in_features: int,
        num_classes: int,
        *,
        bias: bool = False,
        device=None,
        dtype=None,
        reduction: str = "mean",
        weight: Optional[Tensor] = None,
        ignore_index: Optional[int] = None,
        label_smoothing: float = 0.0,
        z_loss: float = 0.0,
        softcap: Optional[float] = None,
        nonfinite: str = "error",
        empty_mean: str = "zero",
        budget_bytes: Optional[int] = None,
        loss_dtype: Optional[torch.dtype] = None,
        logit_scale: float = 1.0,
        return_z_loss: bool = False,
        return_token_accuracy: bool = False,
        return_argmax: bool = False,
    ):
        super().__init__()
        self.in_features, self.num_classes = in_features, num_classes
        self.linear = torch.nn.Linear(in_features, num_classes, bias=bias, device=device, dtype=dtype)
        self.register_buffer("weight", weight)
        self.reduction, self.ignore_index, self.label_smoothing = reduction, ignore_index, label_smoothing
        self.options = dict(z_loss=z_loss, softcap=softcap, nonfinite=nonfinite,
                            empty_mean=empty_mean, budget_bytes=budget_bytes, loss_dtype=loss_dtype,
                            logit_scale=logit_scale, return_z_loss=return_z_loss,
                            return_token_accuracy=return_token_accuracy,
                            return_argmax=return_argmax)

    def forward(self, input: Tensor, target: Tensor):
        return linear_cross_entropy(
            input, self.linear.weight, target, linear_bias=self.linear.bias, weight=self.weight,
            reduction=self.reduction, ignore_index=self.ignore_index,
            label_smoothing=self.label_smoothing, **self.options,
        )


def softmax(input: Tensor, dim: int = -1) -> Tensor:
    """``torch.softmax(input, dim)`` computed by lse (overflow-free, rounded once)."""
    check_device(input, "softmax")
    return _softmax(input, dim)


def log_softmax(input: Tensor, dim: int = -1) -> Tensor:
    """``F.log_softmax(input, dim)`` computed by lse (overflow-free, correctly rounded on the
    scalar kernel)."""
    check_device(input, "log_softmax")
    return _log_softmax(input, dim)


def logsumexp(input: Tensor, dim: int = -1, keepdim: bool = False) -> Tensor:
    """``torch.logsumexp(input, dim, keepdim)`` computed by lse (one dim)."""
    check_device(input, "logsumexp")
    return _logsumexp(input, dim, keepdim)


class CrossEntropyLoss(torch.nn.Module):
    """A drop-in for ``torch.nn.CrossEntropyLoss`` (same arguments, in the same order) computed
    by :func:`cross_entropy`, with lse's keyword-only options on top."""

    def __init__(
        self,
        weight: Optional[Tensor] = None,
        size_average: Optional[bool] = None,
        ignore_index: int = -100,
        reduce: Optional[bool] = None,
        reduction: str = "mean",
        label_smoothing: float = 0.0,
        *,
        z_loss: float = 0.0,
        softcap: Optional[float] = None,
        nonfinite: str = "error",
        empty_mean: str = "zero",
        loss_dtype: Optional[torch.dtype] = None,
        logit_scale: float = 1.0,
        return_z_loss: bool = False,
        return_token_accuracy: bool = False,
        return_argmax: bool = False,
    ):
        super().__init__()
        self.register_buffer("weight", weight)
        self.ignore_index = ignore_index
        self.reduction = _legacy_reduction(size_average, reduce, reduction)
        self.label_smoothing = label_smoothing
        self.z_loss = z_loss
        self.softcap = softcap
        self.nonfinite = nonfinite
        self.empty_mean = empty_mean
        self.loss_dtype = loss_dtype
        self.returns = dict(logit_scale=logit_scale, return_z_loss=return_z_loss,
                            return_token_accuracy=return_token_accuracy,
                            return_argmax=return_argmax)

    def forward(self, input: Tensor, target: Tensor):
        return cross_entropy(
            input, target, self.weight, ignore_index=self.ignore_index,
            reduction=self.reduction, label_smoothing=self.label_smoothing, z_loss=self.z_loss,
            softcap=self.softcap, nonfinite=self.nonfinite, empty_mean=self.empty_mean,
            loss_dtype=self.loss_dtype, **self.returns,
        )
