"""lse: softmax losses that overflow cannot kill, for NumPy and PyTorch.

NumPy functions (float64, float32, float16 and ``ml_dtypes.bfloat16``; any class axis):
:func:`logsumexp`, :func:`softmax`, :func:`log_softmax`, :func:`softmax_backward`,
:func:`log_softmax_backward`, :func:`cross_entropy`. PyTorch ops with autograd live in
``lse.torch`` (imported on demand); the training guards in ``lse.guard``. Every error about the
input is an :class:`LseError` (a ``ValueError``) naming row, column and value.
"""

import ml_dtypes as _ml_dtypes  # registers numpy's "bfloat16" dtype before any kernel call

from . import _errors, _lse, _numpy, guard
from ._errors import (
    DeviceError,
    DTypeError,
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

try:
    from importlib.metadata import version as _version

    __version__ = _version("lse")
except Exception:  # not installed as a distribution (a source checkout on sys.path)
    __version__ = "unknown"


def active_kernel() -> str:
    """The kernel family lse dispatched to on this CPU: ``"avx2"`` or ``"scalar"``."""
    return _lse.active_kernel()


__all__ = (
    _numpy.__all__
    + _errors.__all__
    + [name for name in guard.__all__ if name != "triage"]
    + ["triage", "bfloat16", "active_kernel"]
)
