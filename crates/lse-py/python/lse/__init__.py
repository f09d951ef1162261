"""lse: softmax losses that overflow cannot kill, for NumPy and PyTorch.

NumPy functions (float64, float32, float16 and ``ml_dtypes.bfloat16``; any class axis):
:func:`logsumexp`, :func:`softmax`, :func:`log_softmax`, :func:`softmax_backward`,
:func:`log_softmax_backward`, :func:`cross_entropy`. PyTorch ops with autograd live in
``lse.torch`` (imported on demand); the training guards in ``lse.guard``. Every error about the
input is an :class:`LseError` (a ``ValueError``) naming row, column and value.
"""

import ml_dtypes as _ml_dtypes  # registers numpy's "bfloat16" dtype before any kernel call

from . import _lse
from ._errors import (
    DeviceError,
    EmptyMeanError,
    GuardError,
    LseError,
    NonFiniteError,
    OptionError,
    ShapeError,
    StateError,
    TargetError,
)
from ._numpy import (
    CrossEntropyResult,
    cross_entropy,
    log_softmax,
    log_softmax_backward,
    logsumexp,
    softmax,
    softmax_backward,
    stat_dtype,
)
from .guard import FiniteGuard, LogitMonitor, LogitStats, LossScaler, TriageReport, triage

bfloat16 = _ml_dtypes.bfloat16


def active_kernel() -> str:
    """The kernel family lse dispatched to on this CPU: ``"avx2"`` or ``"scalar"``."""
    return _lse.active_kernel()


__all__ = [
    "logsumexp",
    "softmax",
    "log_softmax",
    "softmax_backward",
    "log_softmax_backward",
    "cross_entropy",
    "CrossEntropyResult",
    "stat_dtype",
    "bfloat16",
    "active_kernel",
    "LseError",
    "NonFiniteError",
    "TargetError",
    "ShapeError",
    "OptionError",
    "EmptyMeanError",
    "GuardError",
    "DeviceError",
    "StateError",
    "LogitStats",
    "LogitMonitor",
    "FiniteGuard",
    "TriageReport",
    "triage",
    "LossScaler",
]
