"""lse.torch against torch.nn.functional, opcheck and gradcheck in f64, zero-copy views."""

import pytest
from hypothesis import given
from hypothesis import strategies as st

torch = pytest.importorskip("torch")
import torch.nn.functional as F  # noqa: E402
from torch.library import opcheck  # noqa: E402

import lse  # noqa: E402
import lse.torch as lt  # noqa: E402
from conftest import spy_pointer  # noqa: E402

TOL = {torch.float64: 1e-12, torch.float32: 2e-6}


def assert_close(a, b, dtype):
    torch.testing.assert_close(a, b, rtol=TOL[dtype], atol=TOL[dtype])


def loss_and_grad(fn, x, *args, **kwargs):
    x = x.detach().clone().requires_grad_()
    loss = fn(x, *args, **kwargs)
    loss.backward(torch.ones_like(loss) if loss.dim() else None)
    return loss.detach(), x.grad


OPTIONS = [
    {},
    {"reduction": "sum"},
    {"reduction": "none"},
    {"label_smoothing": 0.15},
    {"weight": True},
    {"ignore_index": 2},
    {"weight": True, "label_smoothing": 0.1, "ignore_index": 0},
    {"weight": True, "reduction": "none", "label_smoothing": 0.05},
]


def options(spec, classes, dtype, gen):
    opts = dict(spec)
    if opts.get("weight"):
        opts["weight"] = torch.rand(classes, generator=gen, dtype=dtype) + 0.25
    return opts


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32], ids=str)
@pytest.mark.parametrize("spec", OPTIONS, ids=repr)
@pytest.mark.parametrize("layout", ["NC", "NCd", "C"])
def test_matches_f_cross_entropy(dtype, spec, layout):
    gen = torch.Generator().manual_seed(0)
    classes = 7
    shape = {"NC": (12, classes), "NCd": (3, classes, 4), "C": (classes,)}[layout]
    x = torch.randn(shape, generator=gen, dtype=dtype) * 4
    t_shape = shape[:1] + shape[2:] if layout != "C" else ()
    t = torch.randint(0, classes, t_shape, generator=gen)
    opts = options(spec, classes, dtype, gen)
    if layout == "C" and opts.get("ignore_index") == int(t):
        opts["ignore_index"] = -100
    ref = loss_and_grad(F.cross_entropy, x, t, **opts)
    got = loss_and_grad(lt.cross_entropy, x, t, **opts)
    assert got[0].shape == ref[0].shape and got[0].dtype == ref[0].dtype  # f32/f64 as PyTorch
    assert_close(got[0], ref[0], dtype)
    assert_close(got[1], ref[1], dtype)


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32], ids=str)
@pytest.mark.parametrize("spec", [{}, {"label_smoothing": 0.2}, {"weight": True}, {"reduction": "none"}], ids=repr)
def test_probability_targets_match(dtype, spec):
    gen = torch.Generator().manual_seed(1)
    x = torch.randn(3, 5, 2, generator=gen, dtype=dtype) * 3
    q = torch.rand(3, 5, 2, generator=gen, dtype=dtype).softmax(1)
    opts = options(spec, 5, dtype, gen)
    ref = loss_and_grad(F.cross_entropy, x, q, **opts)
    got = loss_and_grad(lt.cross_entropy, x, q, **opts)
    assert_close(got[0], ref[0], dtype)
    assert_close(got[1], ref[1], dtype)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=str)
def test_half_types_against_f64(dtype):
    # PyTorch's own half-type CE accumulates in the half type; compare both to the f64 truth of
    # the same (rounded) logits: lse's loss is within one ulp of the dtype, its gradient too.
    gen = torch.Generator().manual_seed(2)
    x = (torch.randn(64, 1000, generator=gen) * 5).to(dtype)
    t = torch.randint(0, 1000, (64,), generator=gen)
    assert lt.cross_entropy(x, t).dtype == dtype  # PyTorch's result dtype by default
    loss, grad = loss_and_grad(lt.cross_entropy, x, t, label_smoothing=0.1, loss_dtype=torch.float32)
    ref_loss, ref_grad = loss_and_grad(F.cross_entropy, x.double(), t, label_smoothing=0.1)
    assert loss.dtype == torch.float32 and grad.dtype == dtype  # the f32 statistic, when asked
    assert abs(loss.double() - ref_loss) <= 2 * torch.finfo(torch.float32).eps * abs(ref_loss)
    eps = torch.finfo(dtype).eps
    err = (grad.double() - ref_grad).abs()
    assert torch.all(err <= eps * ref_grad.abs() + torch.finfo(dtype).tiny * 64)


def test_ops_match_torch():
    gen = torch.Generator().manual_seed(3)
    x = torch.randn(4, 6, 5, generator=gen, dtype=torch.float64) * 10
    for dim in (0, 1, 2, -1):
        assert_close(lt.softmax(x, dim), torch.softmax(x, dim), torch.float64)
        assert_close(lt.log_softmax(x, dim), F.log_softmax(x, dim), torch.float64)
        for keepdim in (False, True):
            assert_close(lt.logsumexp(x, dim, keepdim), torch.logsumexp(x, dim, keepdim), torch.float64)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16], ids=str)
@given(scale=st.sampled_from([1e-3, 1.0, 1e2, 1e4]), seed=st.integers(0, 2**31 - 1))
def test_extreme_logits_finite_in_finite_out(dtype, scale, seed):
    gen = torch.Generator().manual_seed(seed)
    top = torch.finfo(dtype).max
    x = (torch.randn(4, 33, generator=gen, dtype=torch.float64) * scale).clamp(-top, top)
    x[:, 0] = top  # a class at the dtype's largest value: a naive exp overflows here
    x = x.to(dtype).requires_grad_()
    t = torch.randint(0, 33, (4,), generator=gen)
    loss = lt.cross_entropy(x, t, label_smoothing=0.1, loss_dtype=torch.float32)
    loss.backward()
    assert torch.isfinite(loss) and torch.all(torch.isfinite(x.grad))
    for op in (lt.softmax, lt.log_softmax, lt.logsumexp):
        assert torch.all(torch.isfinite(op(x.detach(), -1)))


def test_opcheck_every_op():
    gen = torch.Generator().manual_seed(4)
    for dtype in (torch.float64, torch.float32, torch.bfloat16):
        x = torch.randn(5, 7, generator=gen).to(dtype).requires_grad_()
        t = torch.randint(0, 7, (5,), generator=gen)
        q = torch.rand(5, 7, generator=gen).softmax(-1).to(dtype)
        w = torch.rand(7, generator=gen, dtype=torch.float64) + 0.5
        ce = torch.ops.lse.cross_entropy.default
        qg = q.detach().requires_grad_()
        for args in [
            (x, t, None, -100, "mean", 0.0, 0.0, None, 1.0, "error", "zero", True, False, False),
            (x, t, w, 3, "none", 0.1, 1e-3, 10.0, 0.5, "error", "zero", True, False, True),
            (x, q, None, -100, "sum", 0.0, 0.0, None, 2.0, "error", "zero", True, False, True),
            (x, qg, -w, -100, "mean", 0.2, 0.0, None, 1.0, "propagate", "zero", True, True, False),
            (x, t, None, -100, "mean", 0.0, 0.0, None, 1.0, "error", "nan", False, False, True),
        ]:
            opcheck(ce, args)
        opcheck(torch.ops.lse.softmax.default, (x, 1))
        opcheck(torch.ops.lse.log_softmax.default, (x, 0))
        opcheck(torch.ops.lse.logsumexp.default, (x, 1, True))
        y = torch.ops.lse.softmax(x.detach(), 1)
        opcheck(torch.ops.lse.softmax_backward.default, (y, torch.randn_like(y), 1))
        opcheck(torch.ops.lse.log_softmax_backward.default, (y.log(), torch.randn_like(y), 1))


@pytest.mark.parametrize(
    "opts",
    [{}, {"reduction": "sum"}, {"reduction": "none"}, {"label_smoothing": 0.1}, {"z_loss": 1e-2},
     {"softcap": 2.0}, {"weight": True, "ignore_index": 1, "label_smoothing": 0.05}],
    ids=repr,
)
def test_gradcheck_cross_entropy_f64(opts):
    gen = torch.Generator().manual_seed(5)
    x = (torch.randn(4, 6, generator=gen, dtype=torch.float64) * 2).requires_grad_()
    t = torch.tensor([0, 1, 5, 2])
    opts = options(opts, 6, torch.float64, gen)
    assert torch.autograd.gradcheck(lambda a: lt.cross_entropy(a, t, **opts), (x,))


def test_gradcheck_row_ops_f64():
    gen = torch.Generator().manual_seed(6)
    x = torch.randn(3, 5, generator=gen, dtype=torch.float64).requires_grad_()
    for dim in (0, 1):
        assert torch.autograd.gradcheck(lambda a: lt.softmax(a, dim), (x,))
        assert torch.autograd.gradcheck(lambda a: lt.log_softmax(a, dim), (x,))
        assert torch.autograd.gradcheck(lambda a: lt.logsumexp(a, dim), (x,))
        assert torch.autograd.gradcheck(lambda a: lt.logsumexp(a, dim, True), (x,))


def test_cross_entropy_loss_module_is_a_drop_in():
    gen = torch.Generator().manual_seed(7)
    w = torch.rand(9, generator=gen) + 0.5
    x = torch.randn(16, 9, generator=gen)
    t = torch.randint(0, 9, (16,), generator=gen)
    ours = lt.CrossEntropyLoss(weight=w, label_smoothing=0.1, ignore_index=3)
    theirs = torch.nn.CrossEntropyLoss(weight=w, label_smoothing=0.1, ignore_index=3)
    a, ga = loss_and_grad(ours, x, t)
    b, gb = loss_and_grad(theirs, x, t)
    assert_close(a, b, torch.float32)
    assert_close(ga, gb, torch.float32)
    assert "weight" in dict(ours.named_buffers())


def test_z_loss_and_softcap_match_their_definition():
    gen = torch.Generator().manual_seed(8)
    x = torch.randn(6, 10, generator=gen, dtype=torch.float64) * 5
    t = torch.randint(0, 10, (6,), generator=gen)

    def reference(a):
        capped = 20.0 * torch.tanh(a / 20.0)
        return F.cross_entropy(capped, t) + 1e-3 * torch.logsumexp(capped, -1).pow(2).mean()

    ref = loss_and_grad(reference, x)
    got = loss_and_grad(lt.cross_entropy, x, t, z_loss=1e-3, softcap=20.0)
    assert_close(got[0], ref[0], torch.float64)
    assert_close(got[1], ref[1], torch.float64)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16], ids=str)
def test_contiguous_tensors_reach_the_kernel_without_a_copy(monkeypatch, dtype):
    x = torch.randn(8, 32).to(dtype)
    t = torch.randint(0, 32, (8,))
    seen = spy_pointer(monkeypatch, "cross_entropy")
    lt.cross_entropy(x.requires_grad_(), t).backward()
    assert seen == [x.data_ptr()]
    seen = spy_pointer(monkeypatch, "softmax")
    lt.softmax(x.detach(), -1)
    assert seen == [x.data_ptr()]


def test_non_cpu_tensor_is_an_error_naming_its_device():
    x = torch.empty(2, 3, device="meta")
    with pytest.raises(lse.DeviceError, match="meta"):
        lt.cross_entropy(x, torch.zeros(2, dtype=torch.long))
    with pytest.raises(lse.DeviceError, match="meta"):
        lt.softmax(x)


def test_errors_are_lse_errors():
    x = torch.tensor([[1.0, float("nan")], [0.0, 1.0]])
    with pytest.raises(lse.NonFiniteError) as info:
        lt.cross_entropy(x, torch.tensor([0, 1]))
    assert (info.value.row, info.value.column) == (0, 1)
    with pytest.raises(lse.TargetError):
        lt.cross_entropy(torch.zeros(2, 3), torch.tensor([0, 3]))


def test_backward_scales_by_a_non_unit_grad_output():
    x = torch.randn(5, 4, dtype=torch.float64)
    t = torch.randint(0, 4, (5,))
    a = x.clone().requires_grad_()
    (3.0 * lt.cross_entropy(a, t)).backward()
    b = x.clone().requires_grad_()
    (3.0 * F.cross_entropy(b, t)).backward()
    assert_close(a.grad, b.grad, torch.float64)


def test_cached_output_buffers_are_reused_only_when_free():
    x = torch.randn(16, 64, requires_grad=True)
    t = torch.randint(0, 64, (16,))
    lt.cross_entropy(x, t).backward()
    first = x.grad
    expected = first.clone()
    y = x.detach().clone().requires_grad_()
    lt.cross_entropy(y, t * 0).backward()  # while x.grad lives, its buffer is not handed out
    assert y.grad.data_ptr() != first.data_ptr()
    torch.testing.assert_close(first, expected, rtol=0, atol=0)  # untouched
    ptr = first.data_ptr()
    del first
    x.grad = None
    z = x.detach().clone().requires_grad_()
    lt.cross_entropy(z, t).backward()  # now free: reused, and fully rewritten
    assert z.grad.data_ptr() == ptr
    torch.testing.assert_close(z.grad, expected, rtol=0, atol=0)
    lt.empty_cache()
