"""``logit_scale`` (a temperature's ``1/T``, applied inside the kernel) against PyTorch on the
scaled logits, in float64 (values, gradients, gradcheck) and float32, for the cross-entropy and
the linear cross-entropy (lse's Rust path and the chunked path)."""

import numpy as np
import pytest

import lse

torch = pytest.importorskip("torch")
import torch.nn.functional as F  # noqa: E402

import lse.torch as lt  # noqa: E402


@pytest.mark.parametrize("scale", [0.5, 1 / 3, 2.0, 30.0])
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32], ids=str)
def test_cross_entropy_of_the_scaled_logits(scale, dtype):
    gen = torch.Generator().manual_seed(7)
    x = (torch.randn(9, 300, generator=gen, dtype=torch.float64) * 3).to(dtype).requires_grad_()
    t = torch.randint(0, 300, (9,), generator=gen)
    t[2] = -100
    opts = dict(label_smoothing=0.1)
    got = lt.cross_entropy(x, t, logit_scale=scale, **opts)
    got.backward()
    xr = x.detach().double().requires_grad_()
    want = F.cross_entropy(xr * scale, t, **opts)
    want.backward()
    tol = 1e-13 if dtype == torch.float64 else 2e-6
    assert abs(float(got) - float(want)) <= tol * abs(float(want))
    torch.testing.assert_close(x.grad.double(), xr.grad, rtol=tol, atol=tol * float(xr.grad.abs().max()))


def test_cross_entropy_gradcheck_with_a_scale():
    gen = torch.Generator().manual_seed(8)
    x = torch.randn(4, 7, generator=gen, dtype=torch.float64, requires_grad=True)
    t = torch.randint(0, 7, (4,), generator=gen)
    assert torch.autograd.gradcheck(lambda x: lt.cross_entropy(x, t, logit_scale=0.37, z_loss=1e-3), (x,))


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32], ids=str)
def test_linear_cross_entropy_of_the_scaled_logits(dtype):
    gen = torch.Generator().manual_seed(9)
    h = torch.randn(21, 16, generator=gen, dtype=torch.float64).to(dtype).requires_grad_()
    w = (torch.randn(200, 16, generator=gen, dtype=torch.float64) * 0.5).to(dtype).requires_grad_()
    t = torch.randint(0, 200, (21,), generator=gen)
    got = lt.linear_cross_entropy(h, w, t, logit_scale=0.25, budget_bytes=4 * 200 * 8)
    got.backward()
    hr, wr = (v.detach().double().requires_grad_() for v in (h, w))
    want = F.cross_entropy(F.linear(hr, wr) * 0.25, t)
    want.backward()
    tol = 1e-12 if dtype == torch.float64 else 1e-5
    assert abs(float(got) - float(want)) <= tol * float(want)
    for g, r in ((h.grad, hr.grad), (w.grad, wr.grad)):
        torch.testing.assert_close(g.double(), r, rtol=tol, atol=tol * float(r.abs().max()))


def test_numpy_scale_and_its_domain():
    x = np.array([[1.0, 2.0, -np.inf]], np.float32)
    got = lse.cross_entropy(x, np.array([1]), logit_scale=2.0, grad=True)
    p = np.exp([2.0, 4.0]) / np.exp([2.0, 4.0]).sum()
    assert abs(float(got.loss) + np.log(p[1])) < 1e-6
    np.testing.assert_allclose(got.grad[0, :2], 2.0 * (p - [0, 1]), rtol=1e-6)
    assert got.grad[0, 2] == 0.0
    for bad in (0.0, -1.0, float("nan")):
        with pytest.raises(lse.OptionError):
            lse.cross_entropy(x, np.array([1]), logit_scale=bad)
