"""The NumPy API against a long-double reference, on extreme logits of every dtype."""

import ml_dtypes
import numpy as np
import pytest
from hypothesis import given
from hypothesis import strategies as st

import lse
from conftest import (
    BF16,
    DTYPES,
    logits,
    ref_cross_entropy,
    ref_log_softmax,
    ref_logsumexp,
    ref_softmax,
    spy_pointer,
    stat_dtype,
    ulp,
    ulps,
)

# The targets of docs/numerics.md: f32 outputs ≤ 2 ulp (log domain elementwise, probability domain normwise),
# every f16/bf16 output ≤ 1 ulp elementwise; f64 held to 3 ulp.
LOG_BOUND = {np.float64: 3, np.float32: 2, np.float16: 1, BF16: 1}
PROB_BOUND = LOG_BOUND


def finite_rows(x):
    return ~np.any(np.isnan(x) | (x == np.inf), axis=-1)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@given(data=st.data())
def test_finite_in_finite_out(dtype, data):
    # f64 logits at several scales, and (None) over the whole range up to the dtype's max.
    scale = data.draw(st.sampled_from([1e-3, 1.0, 1e4, 1e300, None])) if dtype == np.float64 else None
    x = data.draw(logits(dtype, scale=scale))
    assert np.all(np.isfinite(lse.softmax(x).astype(np.float64)))
    ls = lse.log_softmax(x).astype(np.float64)
    assert np.all(np.isfinite(ls) | (np.isneginf(ls) & np.isneginf(x.astype(np.float64))))
    out = lse.logsumexp(x)
    all_masked = np.all(np.isneginf(x.astype(np.float64)), axis=1)
    assert np.all(np.isfinite(out) | all_masked)
    # Targets on unmasked classes: the loss and its gradient are finite.
    xf = x.astype(np.float64)
    target = np.where(all_masked, -100, np.argmax(np.where(np.isfinite(xf), 0, -1), axis=1))
    result = lse.cross_entropy(x, target, grad=True, label_smoothing=0.1, z_loss=1e-4)
    assert np.isfinite(result.loss)
    assert np.all(np.isfinite(result.grad.astype(np.float64)))


def test_f64_cross_entropy_gradient_near_max_is_finite():
    # Found by the hypothesis test above: TwoSum's intermediate overflowed (fixed in lse::state).
    x = np.array([[3e307, np.finfo(np.float64).max]])
    grad = lse.cross_entropy(x, np.array([0]), grad=True).grad
    np.testing.assert_array_equal(grad, [[-1.0, 1.0]])


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@given(data=st.data())
def test_agrees_with_long_double_reference(dtype, data):
    x = data.draw(logits(dtype, scale=data.draw(st.sampled_from([1e-3, 1.0, 10.0, 1e3]))))
    bound = LOG_BOUND[dtype.type if dtype != BF16 else BF16]
    # log_softmax, elementwise, in the input's dtype
    got, ref = lse.log_softmax(x), ref_log_softmax(x)
    assert got.dtype == x.dtype
    assert np.max(ulps(got, ref, dtype)) <= bound
    # softmax: normwise for f32/f64 (ulps of the row's largest value), elementwise for halves
    got, ref = lse.softmax(x), ref_softmax(x)
    if dtype in (np.float16, BF16):
        assert np.max(ulps(got, ref, dtype)) <= bound
    else:
        err = np.abs(got.astype(np.longdouble) - ref)
        row_ulp = ulp(np.max(np.abs(ref), axis=1, keepdims=True), dtype)
        assert np.max(err / row_ulp) <= bound
    # logsumexp in the statistics dtype; f64's bound scales with m + log1p(s')'s condition number
    got, ref = lse.logsumexp(x), ref_logsumexp(x)
    sdtype = stat_dtype(dtype)
    assert got.dtype == sdtype
    err = ulps(got, ref, sdtype)
    if dtype == np.float64:
        m = np.max(x, axis=1).astype(np.longdouble)
        with np.errstate(invalid="ignore", divide="ignore"):
            kappa = np.where(np.isfinite(m), (np.abs(m) + np.abs(ref - m)) / np.abs(ref), 1)
        assert np.all(err <= 2 * np.maximum(kappa, 1))
    else:
        assert np.max(err) <= 2


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize(
    "options",
    [
        {},
        {"label_smoothing": 0.1},
        {"weight": "random"},
        {"z_loss": 1e-3},
        {"softcap": 15.0},
        {"reduction": "sum"},
        {"reduction": "none"},
        {"label_smoothing": 0.05, "weight": "random", "z_loss": 1e-3, "reduction": "none"},
    ],
    ids=repr,
)
def test_cross_entropy_options_against_reference(dtype, options):
    rng = np.random.default_rng(7)
    rows, classes = 16, 37
    x = (rng.standard_normal((rows, classes)) * 4).astype(dtype)
    target = rng.integers(0, classes, rows)
    target[3] = -100  # an ignored row
    opts = dict(options)
    if opts.get("weight") == "random":
        opts["weight"] = rng.uniform(0.25, 4, classes)
    loss, grad, *_ = lse.cross_entropy(x, target, grad=True, **opts)
    ref_loss, ref_grad = ref_cross_entropy(x, target, **opts)
    sdtype = stat_dtype(dtype)
    tol_loss = 4 if dtype == np.float64 else 2  # f64: options' own conditioning
    assert np.max(ulps(np.asarray(loss), ref_loss, sdtype)) <= tol_loss
    # The gradient normwise: ulps of the largest |gradient| (f64 3, f32 2, halves 1 elementwise).
    if dtype in (np.float16, BF16):
        assert np.max(ulps(grad, ref_grad, dtype)) <= 1
    else:
        err = np.abs(grad.astype(np.longdouble) - ref_grad)
        assert np.max(err / ulp(np.max(np.abs(ref_grad)), dtype)) <= (3 if dtype == np.float64 else 2)
    assert np.all(grad[3].astype(np.float64) == 0)


def test_probability_targets_and_class_axis():
    rng = np.random.default_rng(3)
    x = rng.standard_normal((3, 5, 4)) * 3  # classes on axis 1, as PyTorch's N × C × d
    q = rng.random((3, 5, 4))
    q /= q.sum(axis=1, keepdims=True)
    loss, grad, *_ = lse.cross_entropy(x, q, axis=1, grad=True, reduction="sum")
    rows = np.moveaxis(x, 1, -1).reshape(-1, 5)
    ref_loss, ref_grad = ref_cross_entropy(rows, np.moveaxis(q, 1, -1).reshape(-1, 5), reduction="sum")
    assert abs(loss - ref_loss) <= 1e-12 * abs(ref_loss)
    ref_grad = np.moveaxis(ref_grad.reshape(3, 4, 5), -1, 1)
    assert np.max(np.abs(grad - ref_grad)) <= 1e-15


def test_gradient_matches_finite_differences_f64():
    rng = np.random.default_rng(11)
    x = rng.standard_normal((4, 6)) * 2
    target = np.array([0, 5, -100, 2])
    opts = dict(weight=rng.uniform(0.5, 2, 6), label_smoothing=0.1, z_loss=1e-2, softcap=3.0)
    _, grad, *_ = lse.cross_entropy(x, target, grad=True, **opts)
    h = 1e-6
    numeric = np.zeros_like(x)
    for i in np.ndindex(*x.shape):
        xp, xm = x.copy(), x.copy()
        xp[i] += h
        xm[i] -= h
        numeric[i] = (lse.cross_entropy(xp, target, **opts) - lse.cross_entropy(xm, target, **opts)) / (2 * h)
    assert np.max(np.abs(grad - numeric)) < 1e-8


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_backward_ops_against_reference(dtype):
    rng = np.random.default_rng(5)
    x = (rng.standard_normal((6, 9)) * 3).astype(dtype)
    dy = rng.standard_normal((6, 9)).astype(dtype)
    y = lse.softmax(x)
    y64, dy64 = y.astype(np.longdouble), dy.astype(np.longdouble)
    ref = y64 * (dy64 - np.sum(y64 * dy64, axis=1, keepdims=True))
    got = lse.softmax_backward(y, dy)
    scale = ulp(np.max(np.abs(ref)), dtype) * (4 if dtype in (np.float16, BF16) else 4)
    assert np.max(np.abs(got.astype(np.longdouble) - ref)) <= scale
    z = lse.log_softmax(x)
    z64 = z.astype(np.longdouble)
    ref = dy64 - np.exp(z64) * np.sum(dy64, axis=1, keepdims=True)
    got = lse.log_softmax_backward(z, dy)
    assert np.max(np.abs(got.astype(np.longdouble) - ref)) <= ulp(np.max(np.abs(ref)), dtype) * 4


def test_axis_and_layouts_agree():
    rng = np.random.default_rng(1)
    x = (rng.standard_normal((5, 7, 3)) * 10).astype(np.float32)
    for axis in (0, 1, 2, -1):
        moved = np.ascontiguousarray(np.moveaxis(x, axis, -1))
        assert np.array_equal(np.moveaxis(lse.softmax(x, axis=axis), axis, -1), lse.softmax(moved))
        assert np.array_equal(lse.logsumexp(x, axis=axis), lse.logsumexp(moved))
        assert lse.logsumexp(x, axis=axis, keepdims=True).shape == tuple(
            1 if d == axis % 3 else n for d, n in enumerate(x.shape))
    fortran = np.asfortranarray(x)
    assert np.array_equal(lse.log_softmax(fortran), lse.log_softmax(x))


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_zero_copy_for_c_contiguous_input(monkeypatch, dtype):
    x = np.random.default_rng(0).standard_normal((8, 16)).astype(dtype)
    ptr = x.__array_interface__["data"][0]
    for name, call in [
        ("softmax", lambda a: lse.softmax(a)),
        ("log_softmax", lambda a: lse.log_softmax(a)),
        ("logsumexp", lambda a: lse.logsumexp(a)),
        ("cross_entropy", lambda a: lse.cross_entropy(a, np.zeros(8, np.int64), grad=True)),
    ]:
        seen = spy_pointer(monkeypatch, name)
        call(x)
        assert seen == [ptr], name  # the kernel read x itself
        seen.clear()
        call(np.asfortranarray(x))
        assert seen and seen[0] != ptr  # another layout is copied first (documented)


def test_out_is_written_in_place():
    x = np.random.default_rng(0).standard_normal((4, 5)).astype(np.float32)
    out = np.empty_like(x)
    assert lse.softmax(x, out=out) is out
    assert np.array_equal(out, lse.softmax(x))
    stats = np.empty(4, np.float32)
    assert lse.logsumexp(x, out=stats) is stats
    g = np.empty_like(x)
    res = lse.cross_entropy(x, np.array([0, 1, 2, 3]), grad=True, out_grad=g)
    assert res.grad is g
    # out overlapping the input: the result is still right (computed aside, then copied)
    y = x.copy()
    lse.softmax(y, out=y)
    assert np.array_equal(y, lse.softmax(x))
    with pytest.raises(TypeError):
        lse.softmax(x, out=np.empty((4, 5), np.float64))
    with pytest.raises(lse.ShapeError):
        lse.softmax(x, out=np.empty((5, 4), np.float32))


def test_errors_name_row_column_value_and_leave_input_unchanged():
    x = np.array([[1.0, 2.0, 3.0], [4.0, np.nan, 6.0]], np.float32)
    before = x.copy()
    with pytest.raises(lse.NonFiniteError) as info:
        lse.softmax(x)
    e = info.value
    assert isinstance(e, ValueError) and isinstance(e, lse.LseError)
    assert (e.row, e.column) == (1, 1) and np.isnan(e.value)
    np.testing.assert_array_equal(x, before)
    with pytest.raises(lse.NonFiniteError) as info:
        lse.cross_entropy(np.array([[1.0, np.inf]]), np.array([0]))
    assert (info.value.row, info.value.column, info.value.value) == (0, 1, np.inf)
    with pytest.raises(lse.TargetError) as info:
        lse.cross_entropy(np.zeros((2, 3)), np.array([0, 3]))
    assert (info.value.row, info.value.value) == (1, 3)
    with pytest.raises(lse.TargetError) as info:
        lse.cross_entropy(np.array([[0.0, -np.inf]]), np.array([1]))
    assert (info.value.row, info.value.column) == (0, 1)
    with pytest.raises(lse.OptionError):
        lse.cross_entropy(np.zeros((2, 3)), np.array([0, 1]), label_smoothing=2.0)
    with pytest.raises(lse.EmptyMeanError):
        lse.cross_entropy(np.zeros((2, 3)), np.array([-100, -100]), empty_mean="error")
    with pytest.raises(lse.ShapeError):
        lse.softmax(np.zeros((2, 0)))
    with pytest.raises(TypeError):
        lse.softmax(np.zeros((2, 3), np.int32))
    # propagate: only the bad row is NaN
    out = lse.softmax(x, nonfinite="propagate")
    assert np.all(np.isnan(out[1])) and np.all(np.isfinite(out[0]))


def test_bfloat16_through_ml_dtypes():
    x = np.array([[100.0, 1.0, -100.0]], ml_dtypes.bfloat16)
    y = lse.softmax(x)
    assert y.dtype == ml_dtypes.bfloat16
    assert float(y[0, 0]) == 1.0 and float(y[0, 2]) == 0.0
    assert lse.logsumexp(x).dtype == np.float32


# --- PyTorch's rules in the NumPy API: any finite weights and targets, target gradients,
# --- empty class axes, IEEE's logsumexp of +inf.


def _definition(x, q, w, eps):
    """Σ_c w_c q'_c (lse − x_c) per row in float64, q' = (1 − ε) q + ε / C."""
    x = x.astype(np.float64)
    lse_ = np.log(np.exp(x - x.max(-1, keepdims=True)).sum(-1)) + x.max(-1)
    smoothed = (1 - eps) * q + eps / x.shape[-1]
    return (w * smoothed * (lse_[:, None] - x)).sum(-1)


def test_negative_weights_and_targets_follow_the_definition():
    rng = np.random.default_rng(0)
    x = rng.normal(size=(6, 5)) * 3
    q = rng.normal(size=(6, 5))  # negative values, rows not summing to 1
    w = np.array([2.0, -1.5, 0.0, 0.5, -3.0])
    for eps in (0.0, 0.3):
        want = _definition(x, q, w, eps)
        got = lse.cross_entropy(x, q, weight=w, label_smoothing=eps, reduction="none")
        np.testing.assert_allclose(got, want, rtol=1e-13, atol=1e-13)
        got = lse.cross_entropy(x, q, weight=w, label_smoothing=eps)
        np.testing.assert_allclose(got, want.mean(), rtol=1e-13)
    t = np.array([0, 1, 2, 3, 4, 1])
    got = lse.cross_entropy(x, t, weight=w, label_smoothing=0.2)
    want = _definition(x, np.eye(5)[t], w, 0.2).sum() / w[t].sum()
    np.testing.assert_allclose(got, want, rtol=1e-12)


def test_target_grad_is_the_central_difference():
    rng = np.random.default_rng(1)
    x = rng.normal(size=(4, 6)) * 2
    q = rng.normal(size=(4, 6))
    w = rng.normal(size=6)
    kw = dict(weight=w, label_smoothing=0.1, z_loss=1e-2, softcap=4.0)
    result = lse.cross_entropy(x, q, target_grad=True, grad=True, grad_output=2.0, **kw)
    h = 0.5  # the loss is linear in the targets
    for i in np.ndindex(q.shape):
        up, down = q.copy(), q.copy()
        up[i] += h
        down[i] -= h
        want = 2.0 * (lse.cross_entropy(x, up, **kw) - lse.cross_entropy(x, down, **kw)) / (2 * h)
        assert abs(result.target_grad[i] - want) <= 1e-12 * max(1.0, abs(want))
    with pytest.raises(lse.OptionError):
        lse.cross_entropy(x, np.zeros(4, np.int64), target_grad=True)
    with pytest.raises(lse.OptionError, match="ignore_index"):
        lse.cross_entropy(x, q, ignore_index=2)


def test_empty_class_axis():
    x = np.zeros((5, 0), np.float32)
    assert lse.cross_entropy(x, np.zeros((5, 0), np.float32)) == 0.0
    np.testing.assert_array_equal(
        lse.cross_entropy(x, np.zeros((5, 0), np.float32), reduction="none"), np.zeros(5, np.float32))
    with pytest.raises(lse.TargetError) as info:
        lse.cross_entropy(x, np.array([-100, 0, 1, 2, 3]))
    assert (info.value.row, info.value.value) == (1, 0)
    assert lse.cross_entropy(x, np.full(5, -100)) == 0.0
    assert np.isnan(lse.cross_entropy(x, np.full(5, -100), empty_mean="nan"))
    result = lse.cross_entropy(x, np.zeros((5, 0), np.float32), grad=True, target_grad=True)
    assert result.grad.shape == (5, 0) and result.target_grad.shape == (5, 0)


def test_logsumexp_of_plus_inf_is_plus_inf_under_propagate():
    inf, nan = np.inf, np.nan
    x = np.array([[1.0, inf, 0.0], [inf, -inf, inf], [nan, 1.0, 0.0], [inf, nan, 0.0]], np.float32)
    out = lse.logsumexp(x, nonfinite="propagate")
    assert out[0] == inf and out[1] == inf and np.isnan(out[2]) and np.isnan(out[3])
    with np.errstate(all="ignore"):
        assert np.all(np.logaddexp.reduce(x[:2].astype(np.float64), axis=-1) == inf)  # IEEE's answer
