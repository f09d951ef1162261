"""PyTorch ops of ``lse`` with autograd: ``torch.library.custom_op``s with ``register_fake``
(shape inference for ``torch.compile`` and meta tensors) and ``register_autograd``.

* :func:`cross_entropy` — ``F.cross_entropy``'s signature and semantics, plus ``z_loss`` and
  ``softcap``; the loss and its gradient come from one fused pass in the forward, and the
  backward only hands the gradient over (or scales it by a ``grad_output`` other than 1).
* :func:`softmax`, :func:`log_softmax`, :func:`logsumexp`, each with its backward.
* :class:`CrossEntropyLoss` — an ``nn.Module`` drop-in for ``torch.nn.CrossEntropyLoss``.

CPU tensors of float32, float16, bfloat16 (and float64, for gradcheck). Tensors are handed to
the kernels as NumPy views, without a copy when C-contiguous (bfloat16 through an int16 view,
since NumPy has no native bfloat16); outputs are allocated by NumPy (which asks the kernel for
transparent huge pages, so a fresh 0.5 GB gradient costs far fewer page faults than a
``torch.empty``) and handed to torch with ``torch.from_numpy``. A tensor on another device is a
``lse.DeviceError`` naming the device. Softmax, log-softmax and gradients come back in the
input's dtype; losses and logsumexp, as in the core library, in float32 for float16/bfloat16
input (float64 for float64): an f16 loss of 7e4 is finite here, where PyTorch's f16 loss is inf.
"""

from __future__ import annotations

import os
import sys
from typing import Optional

import ml_dtypes
import numpy as np
import torch
from torch import Tensor

from . import _numpy
from ._errors import DeviceError, ShapeError

__all__ = ["cross_entropy", "softmax", "log_softmax", "logsumexp", "CrossEntropyLoss", "empty_cache"]

_NUMPY_DTYPES = {
    torch.float64: np.dtype(np.float64),
    torch.float32: np.dtype(np.float32),
    torch.float16: np.dtype(np.float16),
    torch.bfloat16: np.dtype(ml_dtypes.bfloat16),
}


def _check_device(t: Tensor, op: str, what: str = "input") -> None:
    if t.device.type != "cpu":
        raise DeviceError(
            f"lse.torch.{op}: {what} is on {t.device}; lse's kernels run on the CPU only "
            f"(move it with .cpu(), or use PyTorch's own op on {t.device.type})"
        )


def _as_numpy(t: Tensor, what: str = "tensor") -> np.ndarray:
    """A NumPy view of the CPU tensor ``t`` (no copy; bfloat16 through int16)."""
    _check_device(t, "guard", what)
    t = t.detach()
    if t.dtype == torch.bfloat16:
        return t.view(torch.int16).numpy().view(ml_dtypes.bfloat16)
    if t.dtype not in _NUMPY_DTYPES:
        if t.dtype.is_floating_point or t.dtype.is_complex:
            raise TypeError(f"{what} has dtype {t.dtype}; lse handles float64, float32, float16, bfloat16")
        return t.numpy()  # integer targets
    return t.numpy()


def _as_torch(a: np.ndarray) -> Tensor:
    """The NumPy array ``a`` as a tensor sharing its memory (bfloat16 through int16)."""
    if a.dtype == _NUMPY_DTYPES[torch.bfloat16]:
        return torch.from_numpy(a.view(np.int16)).view(torch.bfloat16)
    return torch.from_numpy(a)


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
    return _as_torch(_cache.get(tuple(shape), _NUMPY_DTYPES[dtype]))


def _scalar(value, dtype: torch.dtype) -> Tensor:
    return torch.tensor(float(value), dtype=dtype)


# ---------------------------------------------------------------------------------------------
# softmax, log_softmax and their backward


def _row_op(kernel, x: Tensor, dim: int) -> Tensor:
    """``kernel`` (an lse NumPy row op) over ``dim`` of ``x`` into a new tensor."""
    _check_device(x, kernel.__name__)
    out = _empty(x.shape, x.dtype)
    kernel(_as_numpy(x), axis=dim, out=_as_numpy(out))
    return out


def _row_backward(kernel, y: Tensor, dy: Tensor, dim: int) -> Tensor:
    out = _empty(y.shape, y.dtype)
    kernel(_as_numpy(y), _as_numpy(dy.to(y.dtype).contiguous()), axis=dim, out=_as_numpy(out))
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
    _check_device(x, "logsumexp")
    result = _numpy.logsumexp(_as_numpy(x), axis=dim, keepdims=keepdim)
    return _as_torch(np.ascontiguousarray(result))


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
    compute_grad: bool,
) -> tuple[Tensor, Tensor]:
    """``input`` rows × classes; class targets (int64, rows) or probabilities (rows × classes).
    Returns the loss (float32, float64 for float64 input; per row for "none") and, with ``compute_grad``, the gradient
    of the loss (grad_output = 1) in the input's dtype (else an empty tensor)."""
    _check_device(input, "cross_entropy")
    _check_device(target, "cross_entropy", "target")
    grad_buffer = _empty(input.shape, input.dtype) if compute_grad else None
    result = _numpy.cross_entropy(
        _as_numpy(input),
        _as_numpy(target, "target"),
        weight=None if weight is None else _as_numpy(weight.to(torch.float64), "weight"),
        ignore_index=ignore_index,
        reduction=reduction,
        label_smoothing=label_smoothing,
        z_loss=z_loss,
        softcap=softcap,
        grad=compute_grad,
        out_grad=None if grad_buffer is None else _as_numpy(grad_buffer),
    )
    loss = result.loss if compute_grad else result
    if reduction == "none":
        loss = _as_torch(np.ascontiguousarray(loss))
    else:
        loss = _scalar(loss, _stat_dtype(input.dtype))
    grad = grad_buffer if compute_grad else input.new_empty(0)
    return loss, grad


@_cross_entropy.register_fake
def _(input, target, weight, ignore_index, reduction, label_smoothing, z_loss, softcap, compute_grad):
    shape = input.shape[:1] if reduction == "none" else ()
    loss = input.new_empty(shape, dtype=_stat_dtype(input.dtype))
    grad = torch.empty_like(input) if compute_grad else input.new_empty(0)
    return loss, grad


def _cross_entropy_setup(ctx, inputs, output):
    _, grad = output
    # Kept as an attribute, not with save_for_backward: the backward hands it over and drops it,
    # so that autograd's AccumulateGrad can take it as `input.grad` without a copy (a saved
    # tensor would keep a second reference and force a 0.5 GB clone at 4096 × 32000 f32).
    # `grad` is non-differentiable (no grad_fn), so this makes no reference cycle.
    ctx.grad = grad if inputs[8] else None
    # The second output (the gradient) gets no incoming gradient: leave it None rather than a
    # materialised 0.5 GB of zeros.
    ctx.set_materialize_grads(False)
    ctx.reduction = inputs[4]
    # The inputs too (references, not copies), for a backward that finds no fused gradient: a
    # forward run without it, or a second backward through the graph (retain_graph=True).
    input, target, weight = inputs[:3]
    ctx.save_for_backward(input, target, weight)
    ctx.options = inputs[3:8]
    ctx.mark_non_differentiable(grad)


def _is_one(g: Tensor) -> bool:
    """Whether ``g`` is a real (not traced) scalar 1: then the saved gradient is handed over as
    it is, without another pass over it."""
    traced = (
        type(g) is not torch.Tensor  # FakeTensor, FunctionalTensor, ...
        or torch._is_functional_tensor(g)
        or torch.compiler.is_compiling()
    )
    return not traced and g.dim() == 0 and g.item() == 1.0


def _cross_entropy_backward(ctx, grad_loss, _grad_of_grad):
    if grad_loss is None:  # nothing flows back through the loss
        return (None,) * 9
    grad = ctx.grad
    ctx.grad = None  # handed over once; a second backward recomputes it
    if grad is None or grad.numel() == 0:
        input, target, weight = ctx.saved_tensors
        _, grad = _cross_entropy(input, target, weight, *ctx.options, True)
    if ctx.reduction == "none":
        scaled = grad * grad_loss.to(grad.dtype).unsqueeze(-1)
    elif _is_one(grad_loss):
        scaled = grad
    else:
        scaled = grad * grad_loss.to(grad.dtype)
    return scaled, None, None, None, None, None, None, None, None


_cross_entropy.register_autograd(_cross_entropy_backward, setup_context=_cross_entropy_setup)


def cross_entropy(
    input: Tensor,
    target: Tensor,
    weight: Optional[Tensor] = None,
    ignore_index: int = -100,
    reduction: str = "mean",
    label_smoothing: float = 0.0,
    *,
    z_loss: float = 0.0,
    softcap: Optional[float] = None,
) -> Tensor:
    """``torch.nn.functional.cross_entropy`` computed by lse: same signature and semantics
    (class-index or probability targets, class dim 1 for ``N × C × d1 …`` input, ``weight``,
    ``ignore_index``, ``reduction``, ``label_smoothing``), plus ``z_loss`` (adds
    ``z · lse²`` per counted row) and ``softcap`` (logits become ``cap · tanh(x / cap)``).

    The loss and its gradient come from one fused pass; the gradient is computed in the forward
    when ``input`` requires grad (and grad mode is on) and handed over by the backward.

    Differences from PyTorch: the loss of float16/bfloat16 input is float32 (finite where a
    half-type loss would overflow); no gradient flows to probability targets (a ``target`` that
    requires grad is an error rather than a silently missing gradient); NaN/+inf logits raise
    ``lse.NonFiniteError`` (row, column, value) instead of propagating NaN; a mean over no
    counted row is 0 (PyTorch: NaN).

    Raises:
        DeviceError: a tensor not on the CPU (naming its device).
        NonFiniteError, TargetError, OptionError, ShapeError: ``lse.LseError`` subclasses.
    """
    _check_device(input, "cross_entropy")
    _check_device(target, "cross_entropy", "target")
    if weight is not None:
        _check_device(weight, "cross_entropy", "weight")
    if reduction not in ("mean", "sum", "none"):
        raise ValueError(f"{reduction} is not a valid value for reduction")
    if target.dtype.is_floating_point and target.requires_grad and torch.is_grad_enabled():
        raise NotImplementedError(
            "lse.torch.cross_entropy: probability targets that require grad are not supported "
            "(lse computes the gradient of the logits only); pass target.detach()"
        )
    if input.dim() == 0:
        raise ShapeError("input is a scalar: it needs a class dimension")
    # PyTorch's layout: (C), (N, C) or (N, C, d1, ...); the kernel wants rows × classes.
    unbatched = input.dim() == 1
    x = input.unsqueeze(0) if unbatched else input
    probabilities = target.dtype.is_floating_point
    t = target.unsqueeze(0) if unbatched else target
    classes = x.shape[1]
    spatial = x.shape[2:]
    if x.dim() > 2:
        x = x.movedim(1, -1)
        if probabilities:
            t = t.movedim(1, -1)
    x = x.reshape(-1, classes).contiguous()
    t = t.reshape(-1, classes) if probabilities else t.reshape(-1)
    t = t.to(x.dtype).contiguous() if probabilities else t.to(torch.int64).contiguous()
    compute_grad = torch.is_grad_enabled() and input.requires_grad
    loss, _ = _cross_entropy(
        x, t, weight, int(ignore_index), reduction, float(label_smoothing), float(z_loss),
        None if softcap is None else float(softcap), compute_grad,
    )
    if reduction == "none":
        loss = loss.reshape(()) if unbatched else loss.reshape((input.shape[0], *spatial))
    return loss


def softmax(input: Tensor, dim: int = -1) -> Tensor:
    """``torch.softmax(input, dim)`` computed by lse (overflow-free, rounded once)."""
    _check_device(input, "softmax")
    return _softmax(input, dim)


def log_softmax(input: Tensor, dim: int = -1) -> Tensor:
    """``F.log_softmax(input, dim)`` computed by lse (overflow-free, correctly rounded on the
    scalar kernel)."""
    _check_device(input, "log_softmax")
    return _log_softmax(input, dim)


def logsumexp(input: Tensor, dim: int = -1, keepdim: bool = False) -> Tensor:
    """``torch.logsumexp(input, dim, keepdim)`` computed by lse (one dim)."""
    _check_device(input, "logsumexp")
    return _logsumexp(input, dim, keepdim)


class CrossEntropyLoss(torch.nn.Module):
    """A drop-in for ``torch.nn.CrossEntropyLoss`` computed by :func:`cross_entropy`, with
    ``z_loss`` and ``softcap`` on top."""

    def __init__(
        self,
        weight: Optional[Tensor] = None,
        ignore_index: int = -100,
        reduction: str = "mean",
        label_smoothing: float = 0.0,
        *,
        z_loss: float = 0.0,
        softcap: Optional[float] = None,
    ):
        super().__init__()
        self.register_buffer("weight", weight)
        self.ignore_index = ignore_index
        self.reduction = reduction
        self.label_smoothing = label_smoothing
        self.z_loss = z_loss
        self.softcap = softcap

    def forward(self, input: Tensor, target: Tensor) -> Tensor:
        return cross_entropy(
            input, target, self.weight, self.ignore_index, self.reduction, self.label_smoothing,
            z_loss=self.z_loss, softcap=self.softcap,
        )
