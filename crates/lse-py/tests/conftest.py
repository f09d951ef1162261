"""Shared helpers of the lse Python tests: an independent long-double reference, ulp
measures per dtype, and hypothesis strategies for logits of every dtype."""

import os

import ml_dtypes
import numpy as np
from hypothesis import HealthCheck, settings
from hypothesis import strategies as st

if os.environ.get("LSE_REQUIRE_TORCH"):
    import torch  # noqa: F401  (CI: the torch tests must run, not be skipped)

settings.register_profile(
    "ci",
    max_examples=int(os.environ.get("LSE_HYPOTHESIS_EXAMPLES", "60")),
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow],
)
settings.load_profile("ci")

BF16 = np.dtype(ml_dtypes.bfloat16)
DTYPES = [np.dtype(np.float64), np.dtype(np.float32), np.dtype(np.float16), BF16]
# (mantissa bits, smallest normal exponent, largest finite value)
FORMAT = {
    np.dtype(np.float64): (52, -1022, float(np.finfo(np.float64).max)),
    np.dtype(np.float32): (23, -126, float(np.finfo(np.float32).max)),
    np.dtype(np.float16): (10, -14, 65504.0),
    BF16: (7, -126, float(ml_dtypes.finfo(ml_dtypes.bfloat16).max)),
}


def stat_dtype(dtype):
    return np.dtype(np.float64) if dtype == np.float64 else np.dtype(np.float32)


def ulp(reference, dtype):
    """The spacing of ``dtype`` at each |reference| (the smallest normal's below it)."""
    bits, emin, _ = FORMAT[np.dtype(dtype)]
    r = np.abs(np.asarray(reference, dtype=np.longdouble))
    r = np.where(np.isfinite(r), r, 0)
    with np.errstate(divide="ignore"):
        e = np.floor(np.log2(np.where(r > 0, r, 1)))
    e = np.maximum(np.where(r > 0, e, emin), emin)
    return np.ldexp(np.longdouble(1), (e - bits).astype(int))


def ulps(result, reference, dtype):
    """|result − reference| in ulps of ``dtype`` at the reference, elementwise (equal infinities
    count as 0)."""
    res = np.asarray(result).astype(np.longdouble)
    ref = np.asarray(reference, dtype=np.longdouble)
    same = (res == ref) | (np.isnan(res) & np.isnan(ref))
    with np.errstate(invalid="ignore"):
        err = np.where(same, 0, np.abs(res - ref))
    return np.where(same, 0, err / ulp(ref, dtype))


# ---- the reference: textbook formulas in long double, max-shifted ------------------------------


def _shifted(x, axis):
    """(x − m, log1p(s')) in long double, s' = Σ_{i≠k} exp(x_i − m) without the max term:
    the form that keeps the digits of a confident row (x − lse would cancel)."""
    x = np.moveaxis(np.asarray(x).astype(np.longdouble), axis, -1)
    m = np.max(x, axis=-1, keepdims=True)
    m = np.where(np.isfinite(m), m, 0)
    d = x - m
    e = np.exp(d)
    k = np.argmax(x, axis=-1)[..., None]
    np.put_along_axis(e, k, 0, axis=-1)
    return d, np.log1p(np.sum(e, axis=-1, keepdims=True)), m


def ref_logsumexp(x, axis=-1):
    d, l1p, m = _shifted(x, axis)
    masked = np.all(np.isneginf(d), axis=-1, keepdims=True)
    return np.squeeze(np.where(masked, -np.inf, m + l1p), -1)


def ref_log_softmax(x, axis=-1):
    d, l1p, _ = _shifted(x, axis)
    return np.moveaxis(d - l1p, -1, axis)


def ref_softmax(x, axis=-1):
    x = np.asarray(x).astype(np.longdouble)
    m = np.max(x, axis=axis, keepdims=True)
    m = np.where(np.isfinite(m), m, 0)
    e = np.exp(x - m)
    s = np.sum(e, axis=axis, keepdims=True)
    return np.where(s > 0, e / np.where(s > 0, s, 1), 0)


def ref_cross_entropy(x, target, weight=None, ignore_index=-100, reduction="mean",
                      label_smoothing=0.0, z_loss=0.0, softcap=None):
    """PyTorch's definition (plus z-loss and soft-capping) for rows × classes, in long double:
    returns (loss, gradient of the loss)."""
    x = np.asarray(x).astype(np.longdouble)
    rows, classes = x.shape
    w = np.ones(classes, np.longdouble) if weight is None else np.asarray(weight, np.longdouble)
    slope = np.ones_like(x)
    if softcap is not None:
        t = np.tanh(x / softcap)
        x, slope = softcap * t, 1 - t * t
    lse = ref_logsumexp(x)
    p = ref_softmax(x)
    if np.issubdtype(np.asarray(target).dtype, np.integer):
        counted = target != ignore_index
        q = np.zeros_like(x)
        q[np.arange(rows)[counted], target[counted]] = 1
        wrow = np.where(counted, w[np.where(counted, target, 0)], 0)
        denominator = wrow.sum()
    else:
        counted = np.ones(rows, bool)
        q = np.asarray(target).astype(np.longdouble)
        denominator = rows
    # Smoothing spreads ε over the K classes whose logit is finite (all of them without masks,
    # which is PyTorch's ε / C).
    finite = np.isfinite(x)
    k = np.maximum(finite.sum(axis=1, keepdims=True), 1)
    q = (1 - label_smoothing) * q + label_smoothing * finite / k
    q_w = q * w
    with np.errstate(invalid="ignore"):
        terms = np.where(q_w > 0, q_w * (lse[:, None] - x), 0)
    row = np.sum(terms, axis=1) + z_loss * lse**2
    row = np.where(counted, row, 0)
    # d row / d x = (Σ q_w)·p − q_w + 2 z lse p, times the soft-cap slope
    grad = (np.sum(q_w, axis=1, keepdims=True) * p - q_w + 2 * z_loss * lse[:, None] * p) * slope
    grad = np.where(counted[:, None], grad, 0)
    if reduction == "none":
        return row, grad
    if reduction == "sum":
        return row.sum(), grad
    d = denominator if denominator > 0 else 1
    return row.sum() / d, grad / d


# ---- strategies ------------------------------------------------------------------------------


@st.composite
def logits(draw, dtype, scale=None, rows=(1, 4), classes=(1, 40), masks=True):
    """A rows × classes array of ``dtype``: normal logits times a drawn scale (1e-3 … the
    dtype's max: the extremes are the point), some -inf masks."""
    r = draw(st.integers(*rows))
    c = draw(st.integers(*classes))
    seed = draw(st.integers(0, 2**32 - 1))
    rng = np.random.default_rng(seed)
    _, _, top = FORMAT[np.dtype(dtype)]
    if scale is None:
        scale = draw(st.sampled_from([1e-3, 1.0, 10.0, 1e4, top / 4, top]))
    with np.errstate(over="ignore"):
        x = np.clip(rng.standard_normal((r, c)) * scale, -top, top)
    if draw(st.booleans()):  # one class far above the rest
        x[:, rng.integers(c)] = min(top, 30 * scale)
    if masks and c > 1 and draw(st.booleans()):
        x[rng.random((r, c)) < 0.3] = -np.inf
    return x.astype(dtype)


def spy_pointer(monkeypatch, name):
    """Records the data pointer of the first array argument each call of ``lse._lse.<name>``
    receives: the memory the kernel reads."""
    import lse

    seen = []
    real = getattr(lse._lse, name)

    def wrapper(*args, **kwargs):
        seen.append(args[0].__array_interface__["data"][0])
        return real(*args, **kwargs)

    monkeypatch.setattr(lse._lse, name, wrapper)
    return seen
