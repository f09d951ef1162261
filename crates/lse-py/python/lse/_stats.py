"""Logit statistics from the core library, and the JSON it speaks (non-finite numbers as
strings). A leaf module below the NumPy API (``cross_entropy(..., stats=True)``) and the
guards."""

from __future__ import annotations

import json
import math

from . import _lse
from ._arrays import _flat

_NON_FINITE = {"NaN": math.nan, "inf": math.inf, "-inf": -math.inf}


def _decode(text: str):
    """JSON from the core library, with its non-finite numbers ("NaN", "inf", "-inf") as floats."""

    def fix(obj):
        if isinstance(obj, dict):
            return {k: fix(v) for k, v in obj.items()}
        if isinstance(obj, list):
            return [fix(v) for v in obj]
        if isinstance(obj, str) and obj in _NON_FINITE:
            return _NON_FINITE[obj]
        return obj

    return fix(json.loads(text))


def _encode(obj) -> str:
    """The inverse of :func:`_decode`."""

    def fix(o):
        if isinstance(o, dict):
            return {k: fix(v) for k, v in o.items()}
        if isinstance(o, (list, tuple)):
            return [fix(v) for v in o]
        if isinstance(o, float) and not math.isfinite(o):
            return "NaN" if math.isnan(o) else ("inf" if o > 0 else "-inf")
        return o

    return json.dumps(fix(obj))


class LogitStats:
    """Statistics of one batch of logits: max, min, max |x|, NaN/±inf counts, mean and max
    per-row logsumexp, mean z = lse², and the headroom to naive-exp overflow in f16/bf16/f32.

    From ``lse.cross_entropy(..., stats=True)`` (gathered in the loss's own read pass) or
    :meth:`LogitStats.of`.
    """

    __slots__ = ("_native",)

    def __init__(self):
        raise TypeError("use LogitStats.of(logits) or cross_entropy(..., stats=True)")

    @classmethod
    def _wrap(cls, native) -> LogitStats:
        self = object.__new__(cls)
        self._native = native
        return self

    @classmethod
    def of(cls, logits) -> LogitStats:
        """The statistics of ``logits`` (classes on the last axis)."""
        flat, columns = _flat(logits, "logits")
        return cls._wrap(_lse.LogitStats.of(flat, columns))

    def to_dict(self) -> dict:
        """The statistics as a dict (non-finite values as floats)."""
        return _decode(self._native.to_json())

    def __repr__(self) -> str:
        return f"LogitStats({self.to_dict()})"
