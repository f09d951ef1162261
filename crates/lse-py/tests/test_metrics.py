"""What a training loop logs beside the loss, from the loss's own call: each row's argmax, the
token accuracy and the z-loss term, through the NumPy API, ``lse.torch.cross_entropy`` and
``lse.torch.linear_cross_entropy`` (lse's Rust path and the chunked float64 path), against
``np.argmax``/``torch.argmax`` and a long-double logsumexp."""

import numpy as np
import pytest
from hypothesis import given
from hypothesis import strategies as st

import lse
from conftest import DTYPES, logits, ref_logsumexp, stat_dtype

torch = pytest.importorskip("torch")
import torch.nn.functional as F  # noqa: E402

import lse.torch as lt  # noqa: E402


def _targets(x, rng, ignore_every=4):
    """Class targets on finite logits: half on the row's argmax, the rest elsewhere; every
    ``ignore_every``-th row ignored."""
    rows, classes = x.shape
    wide = x.astype(np.float64)
    t = np.argmax(wide, axis=1)
    for r in range(rows):
        live = np.flatnonzero(np.isfinite(wide[r]))
        if r % 2 and len(live) > 1:
            t[r] = rng.choice(live[live != t[r]])
        if r % ignore_every == ignore_every - 1:
            t[r] = -100
    return t.astype(np.int64)


@given(data=st.data(), dtype=st.sampled_from(DTYPES))
def test_numpy_metrics_on_extreme_logits(data, dtype):
    x = data.draw(logits(dtype, rows=(1, 9), classes=(1, 600)))
    wide = x.astype(np.float64)
    if not np.all(np.any(np.isfinite(wide), axis=1)):
        return  # a fully masked row has no valid class target
    rng = np.random.default_rng(data.draw(st.integers(0, 2**31)))
    t = _targets(x, rng)
    z = 1e-4
    result = lse.cross_entropy(x, t, metrics=True, z_loss=z, reduction="sum")
    want = np.where(t == -100, -1, np.argmax(wide, axis=1))
    np.testing.assert_array_equal(result.argmax, want)
    counted = t != -100
    correct = int(np.sum(want[counted] == t[counted]))
    assert result.correct == correct
    assert result.accuracy == (correct / counted.sum() if counted.any() else 0.0)
    lse_rows = ref_logsumexp(x)[counted]
    z_ref = float(np.sum(z * lse_rows.astype(np.longdouble) ** 2))
    u = np.finfo(stat_dtype(dtype)).eps
    if np.isfinite(z_ref) and z_ref < np.finfo(stat_dtype(dtype)).max / 2:
        assert abs(float(result.z_loss) - z_ref) <= 8 * u * z_ref + 1e-300
    # The loss is the cross-entropy plus that term.
    plain = lse.cross_entropy(x, t, reduction="sum")
    if np.isfinite(float(result.loss)) and float(result.loss) < np.finfo(stat_dtype(dtype)).max / 2:
        total = float(plain) + float(result.z_loss)
        assert abs(float(result.loss) - total) <= 4 * u * abs(float(result.loss)) + 1e-300


def test_numpy_metrics_need_nothing_else():
    x = np.array([[1.0, 3.0, 3.0], [0.0, -1.0, -np.inf]], np.float32)
    t = np.array([2, 0])
    result = lse.cross_entropy(x, t, metrics=True)
    np.testing.assert_array_equal(result.argmax, [1, 0])  # the first of the tied maxima
    assert (result.correct, result.accuracy, float(result.z_loss)) == (1, 0.5, 0.0)
    assert result.grad is None
    soft = lse.cross_entropy(x[:1], np.array([[0.2, 0.3, 0.5]], np.float32), metrics=True)
    assert soft.correct is None and soft.accuracy is None
    np.testing.assert_array_equal(soft.argmax, [1])
    # Without metrics: the loss alone, as before.
    assert np.ndim(lse.cross_entropy(x, t)) == 0


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float64], ids=str)
@pytest.mark.parametrize("layout", ["NC", "NCd", "C"])
def test_torch_cross_entropy_returns(dtype, layout):
    gen = torch.Generator().manual_seed(5)
    shape = {"NC": (12, 300), "NCd": (4, 300, 3), "C": (300,)}[layout]
    x = (torch.randn(shape, generator=gen, dtype=torch.float64) * 4).to(dtype).requires_grad_()
    predicted = x.detach().argmax(dim=0 if layout == "C" else 1)
    t = predicted.clone()
    if layout != "C":
        flat = t.view(-1)
        flat[::2] = (flat[::2] + 7) % 300  # off target
        flat[1::5] = -100  # ignored
    out = lt.cross_entropy(x, t, z_loss=1e-3, return_z_loss=True,
                           return_token_accuracy=True, return_argmax=True)
    assert isinstance(out, lt.CrossEntropyOutput)
    plain = F.cross_entropy(x.double(), t)
    counted = t != -100
    want_argmax = torch.where(counted, predicted, -1)
    assert torch.equal(out.argmax, want_argmax)
    accuracy = (predicted[counted] == t[counted]).double().mean()
    assert out.token_accuracy.dtype == torch.float32
    assert abs(float(out.token_accuracy) - float(accuracy)) < 1e-7
    rows_lse = torch.logsumexp(x.double(), dim=0 if layout == "C" else 1)[counted]
    z_ref = 1e-3 * float((rows_lse**2).sum()) / float(counted.sum())
    tol = 1e-12 if dtype == torch.float64 else 1e-2 if dtype == torch.bfloat16 else 1e-6
    assert abs(float(out.z_loss) - z_ref) <= tol * z_ref
    assert abs(float(out.loss) - (float(plain) + z_ref)) <= tol * float(out.loss) + 1e-12
    # The loss still carries its gradient; the extras are detached.
    out.loss.backward()
    assert x.grad is not None and torch.all(torch.isfinite(x.grad))
    assert not out.z_loss.requires_grad and not out.token_accuracy.requires_grad


def test_torch_only_what_is_asked():
    x = torch.randn(6, 9)
    t = torch.randint(0, 9, (6,))
    assert isinstance(lt.cross_entropy(x, t), torch.Tensor)
    out = lt.cross_entropy(x, t, return_token_accuracy=True)
    assert out.z_loss is None and out.argmax is None and out.token_accuracy is not None
    out = lt.CrossEntropyLoss(return_z_loss=True)(x, t)
    assert float(out.z_loss) == 0.0 and out.token_accuracy is None
    # All rows ignored: no accuracy to speak of (0, or NaN when a NaN mean is asked for).
    ignored = torch.full((6,), -100)
    assert float(lt.cross_entropy(x, ignored, return_token_accuracy=True).token_accuracy) == 0.0
    nan = lt.cross_entropy(x, ignored, return_token_accuracy=True, empty_mean="nan")
    assert torch.isnan(nan.token_accuracy)
    q = torch.rand(6, 9).softmax(-1)
    with pytest.raises(lse.OptionError):
        lt.cross_entropy(x, q, return_token_accuracy=True)
    assert torch.equal(lt.cross_entropy(x, q, return_argmax=True).argmax, x.argmax(1))


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float64], ids=str)
def test_torch_linear_returns(dtype):
    """lse's Rust path (float32, bfloat16) and the chunked path (float64), small budgets so that
    the rows come in several chunks."""
    gen = torch.Generator().manual_seed(6)
    rows, dim, classes = 40, 24, 500
    h = torch.randn(rows, dim, generator=gen, dtype=torch.float64).to(dtype).requires_grad_()
    w = torch.randn(classes, dim, generator=gen, dtype=torch.float64).to(dtype).requires_grad_()
    logits = F.linear(h.double(), w.double())
    predicted = logits.argmax(1)
    top2 = logits.topk(2, dim=1).values
    clear = (top2[:, 0] - top2[:, 1]) > 0.05  # rows whose argmax the products cannot flip
    t = predicted.clone()
    t[::3] = (t[::3] + 11) % classes
    t[2::7] = -100
    out = lt.linear_cross_entropy(h, w, t, z_loss=1e-4, budget_bytes=9 * classes * 8,
                                  return_z_loss=True, return_token_accuracy=True,
                                  return_argmax=True)
    counted = t != -100
    assert torch.all(out.argmax[~counted] == -1)
    sure = counted & clear
    assert sure.sum() > rows // 2
    assert torch.equal(out.argmax[sure], predicted[sure])
    accuracy = (out.argmax[counted] == t[counted]).float().mean()
    assert float(out.token_accuracy) == pytest.approx(float(accuracy), abs=1e-7)
    z_ref = 1e-4 * float((torch.logsumexp(logits, 1)[counted] ** 2).sum()) / float(counted.sum())
    tol = 1e-12 if dtype == torch.float64 else 2e-2 if dtype == torch.bfloat16 else 1e-5
    assert abs(float(out.z_loss) - z_ref) <= tol * z_ref
    out.loss.backward()
    assert h.grad is not None and w.grad is not None
    module = lt.LinearCrossEntropyLoss(dim, classes, return_argmax=True, dtype=dtype)
    assert module(h.detach(), t).argmax.shape == (rows,)
