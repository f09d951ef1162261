"""Arrays as the kernels read them: lse's four dtypes, and flat NumPy views of NumPy arrays and
CPU torch tensors. A leaf module: the NumPy API, the statistics and the guards read through it."""

from __future__ import annotations

import ml_dtypes
import numpy as np

from ._errors import ShapeError

BFLOAT16 = np.dtype(ml_dtypes.bfloat16)
DTYPES = (np.dtype(np.float64), np.dtype(np.float32), np.dtype(np.float16), BFLOAT16)


def _logits(x, what: str = "x") -> np.ndarray:
    x = np.asarray(x)
    if x.dtype not in DTYPES:
        raise TypeError(
            f"{what} has dtype {x.dtype}; lse handles float64, float32, float16 and bfloat16"
        )
    if x.ndim == 0:
        raise ShapeError(f"{what} is a scalar: it needs a class axis")
    return x


def _flat(array, what: str, writable: bool = False):
    """``array`` (NumPy or a CPU torch tensor) as a flat C-contiguous NumPy view and its column
    count; torch tensors are viewed without a copy (bfloat16 through int16)."""
    if type(array).__module__.startswith("torch"):
        # Only reached with a tensor in hand: torch is loaded already.
        from ._tensors import as_numpy

        array = as_numpy(array, what)
    array = _logits(array, what)
    if not array.flags.c_contiguous:
        if writable:
            raise ValueError(f"{what} must be C-contiguous to be unscaled in place")
        array = np.ascontiguousarray(array)
    columns = array.shape[-1] if array.ndim else 1
    return array.reshape(-1), max(columns, 1) if array.size else 1
