"""Type stubs of ``lse._lse``, the native half of the package (``crates/lse-py/src``).

Every array argument is a flat (1-D), C-contiguous NumPy array; ``Float`` arrays are float64,
float32, float16 or ``ml_dtypes.bfloat16`` (one dtype per call), ``Stat`` arrays float64 for
float64 input and float32 otherwise. The Python layer (``lse._numpy``, ``lse.torch``) checks
shapes and allocates outputs; these functions raise ``lse.LseError`` subclasses otherwise.
"""

from typing import Optional, Union

import numpy as np
import numpy.typing as npt

Float = npt.NDArray[np.generic]
Stat = npt.NDArray[np.floating]
Int64 = npt.NDArray[np.int64]
F64 = npt.NDArray[np.float64]

def logsumexp(x: Float, classes: int, out: Stat, propagate: bool) -> None: ...
def softmax(x: Float, classes: int, out: Float, propagate: bool) -> None: ...
def log_softmax(x: Float, classes: int, out: Float, propagate: bool) -> None: ...
def softmax_backward(y: Float, dy: Float, classes: int, dx: Float) -> None: ...
def log_softmax_backward(y: Float, dy: Float, classes: int, dx: Float) -> None: ...
Metrics = tuple[float, Optional[Int64], Optional[int]]
"""(the z-loss term reduced as the loss; with ``keep_row_argmax``, each row's argmax, -1 for
ignored rows, and the number of counted rows on target)."""

def cross_entropy(
    logits: Float,
    classes: int,
    targets: Union[Int64, Float],
    *,
    weights: Optional[F64],
    ignore_index: Optional[int],
    reduction: str,
    label_smoothing: float,
    z_loss: float,
    softcap: Optional[float],
    propagate: bool,
    empty_mean: str,
    keep_row_loss: bool,
    keep_logit_stats: bool,
    grad: Optional[Float],
    grad_output: Union[float, Stat],
    target_grad: Optional[Float] = None,
    keep_row_argmax: bool = False,
    logit_scale: float = 1.0,
) -> tuple[float, float, Optional[Stat], Optional[LogitStats], Metrics]:
    """(loss, the mean's denominator, per-row losses, logit statistics, metrics)."""

def linear_cross_entropy(
    hidden: Float,
    weight: Float,
    classes: int,
    targets: Union[Int64, Float],
    *,
    bias: Optional[Float],
    weights: Optional[F64],
    ignore_index: Optional[int],
    reduction: str,
    label_smoothing: float,
    z_loss: float,
    softcap: Optional[float],
    propagate: bool,
    empty_mean: str,
    budget_bytes: int,
    grad_hidden: Optional[Float],
    grad_weight: Optional[Float],
    grad_bias: Optional[Float],
    grad_output: Optional[Stat],
    keep_row_argmax: bool = False,
    logit_scale: float = 1.0,
) -> tuple[float, float, Optional[Stat], Metrics]:
    """float64, float32, float16 or bfloat16; int64 class targets or probabilities of the
    input's dtype: (loss, the mean's denominator, per-row losses, metrics)."""

def active_kernel() -> str: ...
def triage(tensors: list[tuple[str, str, Float, int]]) -> tuple[str, str]:
    """(report text, report JSON)."""

class LogitStats:
    @staticmethod
    def of(logits: Float, classes: int) -> LogitStats: ...
    def to_json(self) -> str: ...

class LogitMonitor:
    def __init__(
        self,
        *,
        watch: str,
        warn_fraction: float,
        trend_window: int,
        trend_horizon: float,
        capacity: int,
        reminder_interval: int,
        clear_after: int,
    ) -> None: ...
    @staticmethod
    def default_config_json() -> str: ...
    def state_json(self) -> str: ...
    def load_state_json(self, state: str) -> None: ...
    def record(self, step: int, stats: LogitStats) -> list[tuple[str, str]]: ...
    def json_lines(self) -> str: ...

class FiniteGuard:
    def __init__(self, *, schedule: str, first: int, every: int) -> None: ...
    def begin_batch(self, batch: int) -> None: ...
    @property
    def batch(self) -> int: ...
    @property
    def is_active(self) -> bool: ...
    @property
    def tensors_checked(self) -> int: ...
    def check(self, name: str, role_name: str, data: Float, columns: int) -> None: ...
    def check_loss(self, name: str, value: float) -> None: ...

class LossScaler:
    def __init__(
        self,
        *,
        init_scale: float,
        growth_factor: float,
        backoff_factor: float,
        growth_interval: int,
        hysteresis: int,
        min_scale: float,
        max_scale: float,
    ) -> None: ...
    @property
    def scale(self) -> float: ...
    @property
    def step_index(self) -> int: ...
    @property
    def clean_steps(self) -> int: ...
    @property
    def overflow_streak(self) -> int: ...
    @staticmethod
    def default_config_json() -> str: ...
    def config_json(self) -> str: ...
    def state_json(self) -> str: ...
    def load_state_json(self, state: str) -> None: ...
    def unscale(self, grads: list[tuple[str, Float, int]]) -> tuple[str, str]: ...
