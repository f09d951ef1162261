"""The guards that keep a training run alive, from Python (``lse::guard`` underneath).

* :class:`LogitMonitor` — per-batch logit statistics (as dicts, and as JSON lines) and warnings
  while the logits drift toward the point where a naive softmax overflows.
* :class:`FiniteGuard` — fail-fast NaN/inf checks of named tensors on a schedule; a failure is
  an ``lse.GuardError`` naming the tensor, batch, row, column and value.
* :func:`triage` — which tensor of a step went non-finite first, and the likely cause; the
  report as a dict and as its text.
* :class:`LossScaler` — dynamic loss scaling with ``torch.amp.GradScaler``'s rules, unscaling
  and checking gradients in one pass, with ``state_dict()`` / ``load_state_dict()``.

Arrays may be NumPy arrays or CPU torch tensors (any of lse's four dtypes); a 2-D array is read
as rows × columns, anything else as one row per leading index over its last axis.
"""

from __future__ import annotations

import json
from collections.abc import Iterable
from typing import Optional

from . import _lse
from ._arrays import _flat
from ._errors import OptionError
from ._stats import LogitStats, _decode, _encode

__all__ = ["LogitStats", "LogitMonitor", "FiniteGuard", "TriageReport", "triage", "LossScaler"]

def _config(native_class, given: dict, what: str) -> dict:
    """The core library's default configuration of ``native_class`` updated by ``given``."""
    config = json.loads(native_class.default_config_json())
    unknown = set(given) - set(config)
    if unknown:
        raise OptionError(f"{what} has no option {sorted(unknown)}; options: {sorted(config)}")
    config.update(given)
    return config


class LogitMonitor:
    """A history of per-batch :class:`LogitStats` that warns when ``max |x|`` passes
    ``warn_fraction`` of the watched dtype's naive-exp overflow point (11.09 for f16) or when
    its least-squares trend over ``trend_window`` steps reaches it within ``trend_horizon``
    steps."""

    def __init__(self, watch: Optional[str] = None, **config):
        """``watch`` (f16, bf16, f32, f64), ``warn_fraction``, ``trend_window``,
        ``trend_horizon``, ``capacity``, ``reminder_interval``, ``clear_after``:
        ``lse::guard::MonitorConfig``, whose defaults apply (watch f16, 0.75, 8 steps, 50 steps,
        10000 entries, a reminder at most every 500 steps, cleared after 10 quiet steps)."""
        merged = _config(_lse.LogitMonitor, config, "LogitMonitor")
        if watch is not None:
            merged["watch"] = watch
        self._native = _lse.LogitMonitor(**merged)
        self._config = merged

    def state_dict(self) -> dict:
        """The history (``{"version", "history"}``), to save with a checkpoint."""
        return _decode(self._native.state_json())

    def load_state_dict(self, state: dict) -> None:
        """Restores a :meth:`state_dict` (this monitor's configuration is kept).

        Raises:
            StateError: a state of another format version, or not a monitor state.
        """
        self._native.load_state_json(_encode(state))

    def record(self, step: int, stats) -> list[str]:
        """Records step ``step``: ``stats`` is a :class:`LogitStats` or the logits themselves.
        Returns the step's monitor events as text: a warning that starts, a reminder while it
        holds, a note when it clears (see :meth:`history` for them as dicts)."""
        if not isinstance(stats, LogitStats):
            stats = LogitStats.of(stats)
        return [text for text, _ in self._native.record(int(step), stats._native)]

    def history(self) -> list[dict]:
        """Every recorded step, oldest first: ``{"step", "stats", "warnings"}`` dicts."""
        return [_decode(line) for line in self.json_lines().splitlines()]

    def json_lines(self) -> str:
        """The history as JSON lines, one step a line (non-finite numbers as "NaN"/"inf")."""
        return self._native.json_lines()

    def write_json_lines(self, path) -> None:
        """Writes :meth:`json_lines` to the file ``path``."""
        with open(path, "w", encoding="utf-8") as f:
            f.write(self.json_lines())


class FiniteGuard:
    """Fail-fast finiteness checks: every tensor of the first ``first`` batches, then of every
    ``every``-th batch (``schedule="always"`` or ``"never"`` instead).

    ``check`` raises ``lse.GuardError`` (an ``lse.LseError``) with ``tensor``, ``role``,
    ``dtype``, ``batch``, ``row``, ``column`` and ``value``. For ``role="logits"`` -inf is a mask,
    not a fault.
    """

    def __init__(self, first: int = 100, every: int = 100, *, schedule: str = "first_then_every"):
        self._native = _lse.FiniteGuard(schedule=schedule, first=first, every=every)

    def begin_batch(self, batch: int) -> None:
        """Starts batch ``batch`` (0-based): decides whether its checks read anything."""
        self._native.begin_batch(int(batch))

    @property
    def batch(self) -> int:
        return self._native.batch

    @property
    def is_active(self) -> bool:
        """Whether the current batch is checked."""
        return self._native.is_active

    @property
    def tensors_checked(self) -> int:
        return self._native.tensors_checked

    def check(self, name: str, tensor, role: str = "other") -> None:
        """Checks ``tensor`` (NumPy or CPU torch; rows on the last axis); roles: input, logits,
        probabilities, loss, gradient, other."""
        if not self._native.is_active:
            return
        flat, columns = _flat(tensor, name)
        self._native.check(name, role, flat, columns)

    def check_loss(self, name: str, value: float) -> None:
        """Checks a scalar loss."""
        self._native.check_loss(name, float(value))


class TriageReport:
    """What :func:`triage` found: ``as_dict()`` (the core library's JSON as a dict), ``text``
    (and ``str()``) for people, ``healthy``."""

    def __init__(self, json_text: str, text: str):
        self.json = json_text
        self.text = text

    def as_dict(self) -> dict:
        return _decode(self.json)

    @property
    def healthy(self) -> bool:
        """No tensor held a non-finite value."""
        return self.as_dict().get("first_non_finite") is None

    @property
    def cause(self) -> Optional[str]:
        return self.as_dict().get("cause")

    def __str__(self) -> str:
        return self.text

    def __repr__(self) -> str:
        return f"TriageReport({self.as_dict()!r})"


def triage(tensors: Iterable) -> TriageReport:
    """Triage of one training step: ``tensors`` in forward/backward order, each
    ``(name, role, array)`` (roles: input, logits, probabilities, loss, gradient, other).
    Reports the first tensor that went non-finite, the top logits of the offending row and the
    likely cause (bad input data, logits beyond their dtype's range, the naive-softmax
    signature, an exploding gradient)."""
    items = []
    for name, role, array in tensors:
        flat, columns = _flat(array, name)
        items.append((str(name), str(role), flat, columns))
    return TriageReport(*_lse.triage(items))




class LossScaler:
    """Dynamic loss scaling with ``torch.amp.GradScaler``'s rules (2^16 initial scale, ×2 after
    2000 clean steps, ×0.5 and skip the step on overflow) plus minimum/maximum scale and
    optional hysteresis. ``unscale`` unscales every gradient in place (the product in f64,
    rounded once) and checks it for NaN/inf in the same pass."""

    def __init__(self, **config):
        """``init_scale``, ``growth_factor``, ``backoff_factor``, ``growth_interval``,
        ``hysteresis``, ``min_scale``, ``max_scale``: ``lse::guard::LossScalerConfig``, whose
        defaults apply (2^16, 2, 0.5, 2000, 1, 1, 2^24).

        Raises:
            OptionError: an invalid configuration (a factor that does not grow or shrink, ...).
        """
        self._config = _config(_lse.LossScaler, config, "LossScaler")
        self._native = _lse.LossScaler(**self._config)

    @property
    def config(self) -> dict:
        return dict(self._config)

    def state_dict(self) -> dict:
        """``{"version", "scale", "step", "clean_steps", "overflow_streak"}``: with the
        configuration, everything that decides the next steps (as ``GradScaler.state_dict``)."""
        return _decode(self._native.state_json())

    def load_state_dict(self, state: dict) -> None:
        """Restores a :meth:`state_dict`; the configuration stays this scaler's.

        Raises:
            StateError: another format version, or a scale outside [min_scale, max_scale].
        """
        self._native.load_state_json(_encode(state))

    @property
    def scale(self) -> float:
        """Multiply this step's loss by it."""
        return self._native.scale

    @property
    def step_index(self) -> int:
        return self._native.step_index

    @property
    def clean_steps(self) -> int:
        return self._native.clean_steps

    @property
    def overflow_streak(self) -> int:
        return self._native.overflow_streak

    def scale_loss(self, loss):
        """``loss * scale`` (works for floats and tensors)."""
        return loss * self.scale

    def unscale(self, grads) -> dict:
        """Unscales the gradients in place and updates the scale. ``grads``: a dict name → array,
        or an iterable of arrays or ``(name, array)`` pairs (NumPy arrays or CPU torch tensors,
        C-contiguous). Returns the step report: ``skipped`` (skip the optimizer step),
        ``scale``, ``next_scale``, ``change``, ``overflow`` (tensor, row, column, value of the
        first non-finite entry, or None), ..."""
        if isinstance(grads, dict):
            pairs = list(grads.items())
        else:
            pairs = [g if isinstance(g, tuple) else (f"grad[{i}]", g) for i, g in enumerate(grads)]
        items = []
        for name, g in pairs:
            flat, columns = _flat(g, str(name), writable=True)
            items.append((str(name), flat, columns))
        json_text, _text = self._native.unscale(items)
        return _decode(json_text)
