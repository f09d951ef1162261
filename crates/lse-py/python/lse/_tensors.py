"""CPU torch tensors as NumPy views and back, without a copy (bfloat16 through int16, since
NumPy has no native bfloat16). A leaf module: the torch ops use it, and the guards when they are
handed a tensor."""

from __future__ import annotations

import ml_dtypes
import numpy as np
import torch
from torch import Tensor

from ._errors import DeviceError

NUMPY_DTYPES = {
    torch.float64: np.dtype(np.float64),
    torch.float32: np.dtype(np.float32),
    torch.float16: np.dtype(np.float16),
    torch.bfloat16: np.dtype(ml_dtypes.bfloat16),
}


def check_device(t: Tensor, op: str, what: str = "input") -> None:
    if t.device.type != "cpu":
        raise DeviceError(
            f"lse.torch.{op}: {what} is on {t.device}; lse's kernels run on the CPU only "
            f"(move it with .cpu(), or use PyTorch's own op on {t.device.type})"
        )


def as_numpy(t: Tensor, what: str = "tensor") -> np.ndarray:
    """A NumPy view of the CPU tensor ``t`` (no copy; bfloat16 through int16)."""
    check_device(t, "guard", what)
    t = t.detach()
    if t.dtype == torch.bfloat16:
        return t.view(torch.int16).numpy().view(ml_dtypes.bfloat16)
    if t.dtype not in NUMPY_DTYPES:
        if t.dtype.is_floating_point or t.dtype.is_complex:
            raise TypeError(f"{what} has dtype {t.dtype}; lse handles float64, float32, float16, bfloat16")
        return t.numpy()  # integer targets
    return t.numpy()


def as_torch(a: np.ndarray) -> Tensor:
    """The NumPy array ``a`` as a tensor sharing its memory (bfloat16 through int16)."""
    if a.dtype == NUMPY_DTYPES[torch.bfloat16]:
        return torch.from_numpy(a.view(np.int16)).view(torch.bfloat16)
    return torch.from_numpy(a)
