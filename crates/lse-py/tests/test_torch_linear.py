"""lse.torch.linear_cross_entropy / LinearCrossEntropyLoss against F.linear + F.cross_entropy
(in float64), opcheck, gradcheck in float64, torch.compile tracing, and its peak memory."""

import gc
import itertools

import pytest

torch = pytest.importorskip("torch")
import torch.nn.functional as F  # noqa: E402
from torch.library import opcheck  # noqa: E402

import lse  # noqa: E402
import lse.torch as lt  # noqa: E402


def _head(dtype, rows=37, dim=16, classes=50, seed=0, bias=True):
    gen = torch.Generator().manual_seed(seed)
    h = torch.randn(rows, dim, generator=gen, dtype=torch.float64).to(dtype).requires_grad_()
    w = (torch.randn(classes, dim, generator=gen, dtype=torch.float64) * 0.3).to(dtype).requires_grad_()
    b = torch.randn(classes, generator=gen, dtype=torch.float64).to(dtype).requires_grad_() if bias else None
    t = torch.randint(0, classes, (rows,), generator=gen)
    t[3] = -100
    return h, w, b, t


def _reference(h, w, b, t, weight=None, reduction="mean", ignore_index=-100, label_smoothing=0.0,
               z_loss=0.0, softcap=None):
    """The definition, in PyTorch ops: logits, soft-cap, cross-entropy, z-loss over counted rows."""
    logits = F.linear(h, w, b)
    if softcap is not None:
        logits = softcap * torch.tanh(logits / softcap)
    kw = dict(weight=weight, label_smoothing=label_smoothing)
    if not t.dtype.is_floating_point:
        kw["ignore_index"] = ignore_index
    rows = F.cross_entropy(logits, t, reduction="none", **kw)
    counted = torch.ones_like(rows) if t.dtype.is_floating_point else (t != ignore_index).to(rows.dtype)
    rows = rows + z_loss * torch.logsumexp(logits, -1).pow(2) * counted
    if reduction == "none":
        return rows
    if reduction == "sum":
        return rows.sum()
    if t.dtype.is_floating_point:
        return rows.mean()
    denominator = counted.sum() if weight is None else (weight[t.clamp(min=0)] * counted).sum()
    return rows.sum() / denominator


def _loss_and_grads(fn, h, w, b, t, **kw):
    leaves = [x for x in (h, w, b) if x is not None]
    loss = fn(h, w, t, linear_bias=b, **kw) if fn is lt.linear_cross_entropy else fn(h, w, b, t, **kw)
    upstream = torch.linspace(0.5, 1.5, loss.numel(), dtype=loss.dtype).reshape(loss.shape)
    return loss.detach(), torch.autograd.grad((loss * upstream).sum(), leaves)


OPTIONS = [
    {},
    {"reduction": "sum"},
    {"reduction": "none"},
    {"label_smoothing": 0.2},
    {"weight": True},
    {"weight": True, "label_smoothing": 0.1, "reduction": "none"},
    {"ignore_index": 7},
    {"z_loss": 1e-2},
    {"softcap": 3.0},
    {"weight": True, "label_smoothing": 0.05, "z_loss": 1e-3, "softcap": 5.0},
]


def _options(spec, classes, dtype):
    opts = dict(spec)
    if opts.get("weight"):
        gen = torch.Generator().manual_seed(9)
        opts["weight"] = torch.randn(classes, generator=gen, dtype=dtype)  # negative too
    return opts


@pytest.mark.parametrize("budget", [1 << 30, 2 * 50 * 8 * 5], ids=["one-chunk", "chunks-of-5"])
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32], ids=str)
@pytest.mark.parametrize("spec", OPTIONS, ids=repr)
def test_matches_linear_then_cross_entropy(spec, dtype, budget):
    h, w, b, t = _head(dtype)
    opts = _options(spec, 50, dtype)
    if opts.get("ignore_index") is not None:
        t[t == -100] = opts["ignore_index"]
    got = _loss_and_grads(lt.linear_cross_entropy, h, w, b, t, budget_bytes=budget, **opts)
    wide = [x.detach().double().requires_grad_() for x in (h, w, b)]
    wide_opts = {k: (v.double() if torch.is_tensor(v) else v) for k, v in opts.items()}
    ref = _loss_and_grads(_reference, *wide, t, **wide_opts)
    assert got[0].dtype == dtype
    torch.testing.assert_close(got[0], ref[0].to(dtype))
    for g, r in zip(got[1], ref[1], strict=True):
        torch.testing.assert_close(g, r.to(dtype))


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=str)
def test_half_types(dtype):
    h, w, b, t = _head(dtype)
    got = _loss_and_grads(lt.linear_cross_entropy, h, w, b, t, label_smoothing=0.1)
    wide = [x.detach().double().requires_grad_() for x in (h, w, b)]
    ref = _loss_and_grads(_reference, *wide, t, label_smoothing=0.1)
    assert got[0].dtype == dtype and all(g.dtype == dtype for g in got[1])
    torch.testing.assert_close(got[0], ref[0].to(dtype))
    for g, r in zip(got[1], ref[1], strict=True):
        torch.testing.assert_close(g, r.to(dtype))


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32, torch.bfloat16], ids=str)
def test_probability_targets(dtype):
    h, w, b, _ = _head(dtype)
    q = torch.randn(37, 50, dtype=dtype).softmax(-1)
    # (bfloat16 per-row losses would meet a bfloat16-rounded upstream gradient, the reference an
    # exact one: not the same function.)
    reductions = ("mean", "sum") if dtype == torch.bfloat16 else ("mean", "sum", "none")
    for reduction, ls in itertools.product(reductions, (0.0, 0.3)):
        got = _loss_and_grads(lt.linear_cross_entropy, h, w, b, q, reduction=reduction, label_smoothing=ls,
                              budget_bytes=2 * 50 * 8 * 4)
        wide = [x.detach().double().requires_grad_() for x in (h, w, b)]
        ref = _loss_and_grads(_reference, *wide, q.double(), reduction=reduction, label_smoothing=ls)
        torch.testing.assert_close(got[0], ref[0].to(dtype))
        for g, r in zip(got[1], ref[1], strict=True):
            torch.testing.assert_close(g, r.to(dtype))


def test_matches_torch_linear_cross_entropy_and_its_module():
    h, w, b, t = _head(torch.float64)
    ref = F.linear_cross_entropy(h, w, t, linear_bias=b, label_smoothing=0.1)
    torch.testing.assert_close(lt.linear_cross_entropy(h, w, t, linear_bias=b, label_smoothing=0.1), ref)
    ours = lt.LinearCrossEntropyLoss(16, 50, bias=True, dtype=torch.float64)
    theirs = torch.nn.LinearCrossEntropyLoss(16, 50, bias=True, dtype=torch.float64)
    theirs.load_state_dict(ours.state_dict())
    torch.testing.assert_close(ours(h, t), theirs(h, t))
    x = h.detach()[0]  # no batch dimension
    torch.testing.assert_close(lt.linear_cross_entropy(x, w, t[0]), F.linear_cross_entropy(x, w, t[0]))


def test_gradcheck_f64():
    h, w, b, t = _head(torch.float64, rows=6, dim=4, classes=7)
    t[3] = 2
    for opts in ({}, {"reduction": "none", "label_smoothing": 0.1}, {"z_loss": 1e-2, "softcap": 2.0},
                 {"reduction": "sum", "weight": torch.randn(7, dtype=torch.float64)}):
        fn = lambda h, w, b: lt.linear_cross_entropy(h, w, t, linear_bias=b, budget_bytes=7 * 8 * 2 * 2, **opts)  # noqa: E731
        assert torch.autograd.gradcheck(fn, (h, w, b)), opts


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32, torch.bfloat16], ids=str)
def test_opcheck(dtype):
    h, w, b, t = _head(dtype, rows=9, dim=8, classes=11)
    t[3] = 1
    op = torch.ops.lse.linear_cross_entropy.default
    cw = torch.rand(11, dtype=dtype)
    # 216 bytes: chunks of one float64 row (logits, hidden and dH rows), of two float32 rows.
    for args in [
        (h, w, t, b, None, -100, "mean", 0.0, 0.0, None, 1.0, "error", "zero", 1 << 20, True, None, False),
        (h, w, t, None, cw, 1, "sum", 0.1, 1e-3, 4.0, 0.5, "error", "zero", 216, True, None, True),
        (h, w, t, b, None, -100, "none", 0.0, 0.0, None, 3.0, "error", "zero", 1 << 20, False, None, True),
    ]:
        opcheck(op, args)


def test_torch_compile_traces_it():
    h, w, b, t = _head(torch.float32)

    def step(h, w, b):
        return lt.linear_cross_entropy(h, w, t, linear_bias=b, label_smoothing=0.1) * 2

    compiled = torch.compile(step, backend="aot_eager", fullgraph=True)
    got = compiled(h, w, b)
    grads = torch.autograd.grad(got, (h, w, b))
    want = step(h, w, b)
    torch.testing.assert_close(got, want)
    for g, r in zip(grads, torch.autograd.grad(want, (h, w, b)), strict=True):
        torch.testing.assert_close(g, r)


def test_errors():
    h, w, b, t = _head(torch.float32)
    bad = t.clone()
    bad[4] = 50
    with pytest.raises(lse.TargetError):
        lt.linear_cross_entropy(h, w, bad)
    nan = h.detach().clone()
    nan[2, 5] = float("nan")
    with pytest.raises(lse.NonFiniteError) as info:
        lt.linear_cross_entropy(nan, w, t)
    assert (info.value.row, info.value.column) == (2, 5)
    with pytest.raises(lse.ShapeError):
        lt.linear_cross_entropy(h, w[:, :3], t)
    with pytest.raises(RuntimeError, match="ignore_index is not supported"):
        lt.linear_cross_entropy(h, w, torch.rand(37, 50), ignore_index=1)


def _peak_rss_bytes():
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) * 1024
    raise RuntimeError("no VmHWM")


def _reset_peak_rss():
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")


def _rss_bytes():
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) * 1024
    raise RuntimeError("no VmRSS")


def test_peak_extra_memory_is_the_budget_not_the_logits():
    # 2048 × 8000 f32 logits are 65.5 MB; the budget is 4 MiB. Measured as the process's peak
    # resident set over what it held before, less the gradients themselves (dH, dW, db), which
    # the call must return anyway. The unfused path (F.linear + F.cross_entropy) is the control:
    # its peak must exceed the bound this test holds lse to.
    rows, dim, classes, budget = 2048, 64, 8000, 4 << 20
    gen = torch.Generator().manual_seed(0)
    h = torch.randn(rows, dim, generator=gen, requires_grad=True)
    w = (torch.randn(classes, dim, generator=gen) * 0.1).requires_grad_()
    t = torch.randint(0, classes, (rows,), generator=gen)
    outputs = (rows * dim + classes * dim) * 4
    slack = 16 << 20  # O(rows + classes), the matrix crate's packing buffers, allocator slack

    def peak_extra(fn):
        gc.collect()
        lt.empty_cache()
        try:
            _reset_peak_rss()
        except OSError:
            pytest.skip("this kernel cannot reset the peak RSS (/proc/self/clear_refs)")
        before = _rss_bytes()
        loss = fn()
        grads = torch.autograd.grad(loss, (h, w))
        extra = _peak_rss_bytes() - before
        del loss, grads
        return extra

    ours = peak_extra(lambda: lt.linear_cross_entropy(h, w, t, budget_bytes=budget))
    unfused = peak_extra(lambda: F.cross_entropy(F.linear(h, w), t))
    bound = budget + outputs + slack
    assert ours <= bound, (ours, bound)
    assert unfused > bound, (unfused, bound)  # the control: the logits do not fit the bound


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32, torch.bfloat16], ids=str)
def test_a_head_of_no_class(dtype):
    """``[N, 0]`` logits, as :func:`lse.torch.cross_entropy` treats them: every row's loss is an
    empty sum (0, where PyTorch's mean gives NaN), every gradient 0; a counted class target names
    a class that does not exist (PyTorch's IndexError); all rows ignored is an empty mean."""
    h = torch.randn(3, 4, dtype=torch.float64).to(dtype).requires_grad_()
    w = torch.zeros(0, 4, dtype=dtype, requires_grad=True)
    b = torch.zeros(0, dtype=dtype, requires_grad=True)
    q = torch.zeros(3, 0, dtype=dtype)
    for reduction in ("mean", "sum", "none"):
        loss = lt.linear_cross_entropy(h, w, q, linear_bias=b, reduction=reduction)
        want = lt.cross_entropy(torch.zeros(3, 0, dtype=dtype), q, reduction=reduction)
        torch.testing.assert_close(loss, want)
        h.grad = w.grad = b.grad = None
        loss.sum().backward()
        assert torch.count_nonzero(h.grad) == 0 and w.grad.shape == w.shape and b.grad.shape == b.shape
    with pytest.raises(IndexError):
        lt.linear_cross_entropy(h, w, torch.tensor([0, 1, 2]))
    ignored = torch.full((3,), -100)
    assert float(lt.linear_cross_entropy(h, w, ignored)) == 0.0
    assert lt.linear_cross_entropy(h, w, ignored, empty_mean="nan").isnan()
    with torch.no_grad():  # no gradient asked: the op's three empty gradient outputs
        assert float(lt.linear_cross_entropy(h, w, q)) == 0.0
    with pytest.raises(RuntimeError):  # an argmax of no class, as cross_entropy refuses it
        lt.linear_cross_entropy(h, w, q, return_argmax=True)


def test_dtype_errors_are_pytorchs_class_too():
    """PyTorch raises RuntimeError for mixed dtypes; lse's DTypeError is also that (and a
    TypeError, as lse raised before)."""
    h, w, b, t = _head(torch.float32)
    for call in (lambda: lt.linear_cross_entropy(h, w.double(), t),
                 lambda: lt.cross_entropy(h.to(torch.int32), t)):
        with pytest.raises(RuntimeError):
            call()
        with pytest.raises(lse.DTypeError):
            call()
    with pytest.raises(RuntimeError):
        F.linear_cross_entropy(h, w.double(), t)
