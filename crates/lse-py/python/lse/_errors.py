"""The exceptions of ``lse``: one family, ``LseError``, subclassing ``ValueError``.

Every error of the core library arrives as one of these, with the position it names:
``row``, ``column`` and ``value`` (``None`` where the error has no such part).
"""

from __future__ import annotations

__all__ = [
    "LseError",
    "NonFiniteError",
    "TargetError",
    "ShapeError",
    "OptionError",
    "DTypeError",
    "EmptyMeanError",
    "GuardError",
    "DeviceError",
    "StateError",
]


class LseError(ValueError):
    """Base class of every error ``lse`` raises about its input.

    Attributes:
        row: the row (sample) the error names, or ``None``.
        column: the column (class) the error names, or ``None``.
        value: the offending value (a logit, a target, a weight), or ``None``.
    """

    def __init__(self, message: str, *, row=None, column=None, value=None, **details):
        super().__init__(message)
        self.row = row
        self.column = column
        self.value = value
        for key, item in details.items():
            setattr(self, key, item)


class NonFiniteError(LseError):
    """A NaN or +inf logit (or incoming gradient) under ``nonfinite="error"``."""


# The classes below also derive from the builtin exception PyTorch raises for the same input
# (IndexError for a target out of range, RuntimeError for a bad option or shape), so that code
# written against torch.nn.functional.cross_entropy catches what lse.torch raises.


class TargetError(LseError, IndexError):
    """A class target out of range, a non-finite probability target, or target mass on a
    masked (-inf) logit. Also an ``IndexError``, as PyTorch's "Target 5 is out of bounds"."""


class ShapeError(LseError, RuntimeError):
    """Buffers whose shapes do not fit (an empty class axis, a length mismatch). Also a
    ``RuntimeError``, as PyTorch's shape errors."""


class OptionError(LseError, RuntimeError):
    """An invalid option: label smoothing outside [0, 1], a non-finite weight, a bad scaler
    configuration, ... Also a ``RuntimeError``, as PyTorch's option errors."""


class DTypeError(LseError, TypeError, RuntimeError):
    """A tensor of a dtype lse does not take, or tensors that must share a dtype and do not.
    Also a ``TypeError``, and a ``RuntimeError`` as PyTorch's dtype errors."""


class EmptyMeanError(LseError):
    """A mean over zero counted rows under ``empty_mean="error"``."""


class GuardError(LseError):
    """A ``FiniteGuard`` check found NaN or inf. Also carries ``tensor``, ``role``, ``dtype``
    and ``batch``."""


class DeviceError(LseError):
    """A tensor that is not on the CPU (lse's kernels run on the CPU only)."""


class StateError(LseError):
    """A saved guard state that cannot be restored (another format version, a scale outside
    the configuration's bounds)."""
