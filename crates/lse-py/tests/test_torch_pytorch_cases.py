"""lse.torch.cross_entropy / CrossEntropyLoss on the inputs of PyTorch's own cross-entropy tests.

The inputs are those of PyTorch 2.x's ``sample_inputs_cross_entropy`` (the OpInfo of
``nn.functional.cross_entropy``), ``module_inputs_torch_nn_CrossEntropyLoss`` (the ModuleInfo)
and the ``test_cross_entropy_*`` cases of ``test/test_nn.py``, re-created here with
``torch.testing.make_tensor`` (so class weights and probability targets take negative values,
as there). The reference is ``torch.nn.functional.cross_entropy`` itself, compared with
``torch.testing.assert_close`` at its default tolerances for the dtype; gradients with respect
to the input and to probability targets are compared too, and gradcheck'd in float64.
"""

import itertools
import random

import pytest

torch = pytest.importorskip("torch")
import torch.nn.functional as F  # noqa: E402
from torch.testing import make_tensor  # noqa: E402

import lse  # noqa: E402
import lse.torch as lt  # noqa: E402


def _run(fn, input, target, kwargs):
    """Loss and the gradients of ``(loss * upstream).sum()`` w.r.t. every tensor that requires
    grad (input, and probability targets)."""
    input = input.detach().clone().requires_grad_(input.requires_grad)
    target = target.detach().clone().requires_grad_(target.requires_grad)
    loss = fn(input, target, **kwargs)
    leaves = [t for t in (input, target) if t.requires_grad]
    if not leaves:
        return loss, []
    upstream = torch.linspace(0.5, 1.5, loss.numel(), dtype=loss.dtype).reshape(loss.shape)
    grads = torch.autograd.grad((loss * upstream).sum(), leaves)
    return loss.detach(), list(grads)


def _wide(value):
    return value.double() if isinstance(value, torch.Tensor) and value.dtype.is_floating_point else value


def _check_against_torch(input, target, kwargs, module=False):
    """lse against PyTorch at the dtype's default tolerance. The reference is PyTorch in float64,
    rounded to the dtype: with weights and targets of mixed signs PyTorch's own float32 sums
    cancel (a ModuleInfo sample's float32 loss is off by 2.5e-4 where lse's is off by 8e-7 from
    float64), and that error is PyTorch's, not the definition's."""
    dtype = input.dtype
    if module:
        ours = lt.CrossEntropyLoss(**kwargs)
        theirs = torch.nn.CrossEntropyLoss(**{k: _wide(v) for k, v in kwargs.items()})
        got = _run(lambda i, t: ours(i, t), input, target, {})
        want = _run(lambda i, t: theirs(i, t), _wide(input), _wide(target), {})
    else:
        got = _run(lt.cross_entropy, input, target, kwargs)
        want = _run(F.cross_entropy, _wide(input), _wide(target), {k: _wide(v) for k, v in kwargs.items()})
    assert got[0].dtype == dtype and got[0].shape == want[0].shape
    torch.testing.assert_close(got[0], want[0].to(dtype))
    assert len(got[1]) == len(want[1])
    for g, w in zip(got[1], want[1], strict=True):
        torch.testing.assert_close(g, w.to(g.dtype))


# --- the OpInfo samples of nn.functional.cross_entropy -----------------------------------------


def opinfo_samples(dtype, requires_grad=True, seed=0):
    """``sample_inputs_cross_entropy`` of PyTorch's common_methods_invocations."""
    torch.manual_seed(seed)
    random.seed(seed)
    batch_size, num_classes = shape = (2, 3)
    reductions = ("mean", "sum", "none")
    input_shape_and_kwargs = [
        (shape, {}),
        ((*shape, 1), {}),
        ((*shape, 1, 2), {}),
        ((*shape, 1, 2, 3), {}),
        *[(shape, dict(reduction=reduction)) for reduction in reductions],
        *[
            (shape, {"weight": make_tensor((num_classes,), device="cpu", dtype=dtype), "reduction": reduction})
            for reduction in reductions
        ],
        (shape, dict(ignore_index=1)),
    ]
    for (input_shape, kwargs), probabilities in itertools.product(input_shape_and_kwargs, (False, True)):
        input = make_tensor(input_shape, device="cpu", dtype=dtype, requires_grad=requires_grad)
        if probabilities:
            if "ignore_index" in kwargs:
                continue
            target = make_tensor(input_shape, low=0, high=1, device="cpu", dtype=dtype, requires_grad=requires_grad)
        else:
            target = make_tensor(
                (batch_size, *input_shape[2:]), low=0, high=num_classes, device="cpu", dtype=torch.long
            )
            if "ignore_index" in kwargs and torch.all(target == kwargs["ignore_index"]):
                target[0] = random.sample(sorted(set(range(num_classes)) - {kwargs["ignore_index"]}), 1)[0]
        for label_smoothing in (0.0, 0.5):
            yield input, target, dict(**kwargs, label_smoothing=label_smoothing)


@pytest.mark.parametrize("seed", range(4))
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32], ids=str)
def test_opinfo_samples_match_f_cross_entropy(dtype, seed):
    for input, target, kwargs in opinfo_samples(dtype, seed=seed):
        _check_against_torch(input, target, kwargs)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=str)
def test_opinfo_samples_half_types(dtype):
    # PyTorch's own half-type CE rounds its intermediates to the half type; lse rounds once.
    # Both are held to the dtype's default tolerance against PyTorch in float64 (the same
    # rounded inputs), and lse's loss and gradient come back in the half type as PyTorch's.
    for input, target, kwargs in opinfo_samples(dtype, seed=11):
        got = _run(lt.cross_entropy, input, target, kwargs)
        wide = {k: (v.double() if isinstance(v, torch.Tensor) else v) for k, v in kwargs.items()}
        t = target.double() if target.dtype.is_floating_point else target
        want = _run(F.cross_entropy, input.double(), t.requires_grad_(target.requires_grad), wide)
        assert got[0].dtype == dtype
        torch.testing.assert_close(got[0], want[0].to(dtype))
        for g, w in zip(got[1], want[1], strict=True):
            assert g.dtype == dtype
            torch.testing.assert_close(g, w.to(dtype))


def test_opinfo_samples_gradcheck_f64():
    for input, target, kwargs in opinfo_samples(torch.float64, seed=3):
        inputs = (input.detach().requires_grad_(),)
        if target.dtype.is_floating_point:
            inputs += (target.detach().requires_grad_(),)
            fn = lambda i, t: lt.cross_entropy(i, t, **kwargs)  # noqa: E731
        else:
            fn = lambda i: lt.cross_entropy(i, target, **kwargs)  # noqa: E731
        assert torch.autograd.gradcheck(fn, inputs), kwargs


# --- the ModuleInfo samples of nn.CrossEntropyLoss ---------------------------------------------


def module_samples(dtype, seed=0):
    """``module_inputs_torch_nn_CrossEntropyLoss`` of PyTorch's common_modules: reductions,
    weights (make_tensor: negative values too), label smoothing, probability targets (softmax'd
    and raw), ignore_index, N-d and no-batch inputs."""
    torch.manual_seed(seed)
    N, C = 5, 3
    make_target = lambda shape, high=C: torch.randint(0, high, shape)  # noqa: E731
    make_weight = lambda: make_tensor((C,), device="cpu", dtype=dtype)  # noqa: E731
    cases = []
    for reduction, ls in itertools.product(("mean", "sum", "none"), (0.0, 0.15)):
        kw = dict(reduction=reduction, label_smoothing=ls)
        cases += [
            (kw, (N, C), make_target((N,))),
            (dict(kw, weight=make_weight()), (N, C), make_target((N,))),
            (kw, (N, C, 4), make_target((N, 4))),
            (dict(kw, weight=make_weight()), (N, C, 4, 2), make_target((N, 4, 2))),
            (dict(kw, ignore_index=1), (N, C, 2), make_target((N, 2))),
            (dict(kw, weight=make_weight(), ignore_index=0), (N, C), make_target((N,))),
            (kw, (N, C), make_tensor((N, C), device="cpu", dtype=dtype).softmax(1)),
            (dict(kw, weight=make_weight()), (N, C, 3), make_tensor((N, C, 3), device="cpu", dtype=dtype)),
            (kw, (C,), make_target(())),  # no batch dimension
            (dict(kw, weight=make_weight()), (C,), make_tensor((C,), device="cpu", dtype=dtype).softmax(0)),
        ]
    for kwargs, input_shape, target in cases:
        input = make_tensor(input_shape, device="cpu", dtype=dtype, requires_grad=True)
        if target.dtype.is_floating_point:
            target = target.detach().requires_grad_()
        yield input, target, kwargs


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32], ids=str)
def test_module_samples_match_cross_entropy_loss(dtype):
    for input, target, kwargs in module_samples(dtype):
        _check_against_torch(input, target, kwargs, module=True)


def test_module_samples_gradcheck_f64():
    for input, target, kwargs in module_samples(torch.float64, seed=1):
        module = lt.CrossEntropyLoss(**kwargs)
        if target.dtype.is_floating_point:
            assert torch.autograd.gradcheck(module, (input, target)), kwargs
        else:
            assert torch.autograd.gradcheck(lambda i: module(i, target), (input,)), kwargs


# --- test_nn.py's test_cross_entropy_* cases ---------------------------------------------------


def test_cross_entropy_loss_precision():
    # test_cross_entropy_loss_precision (#55657): float32 and float64 agree (smaller shape).
    inputf = torch.randn(16, 2, 64, 64, dtype=torch.float)
    target = torch.randint(2, (16, 64, 64), dtype=torch.long)
    outf = lt.CrossEntropyLoss()(inputf, target)
    outd = lt.CrossEntropyLoss()(inputf.double(), target)
    torch.testing.assert_close(outf, outd, check_dtype=False)


def test_cross_entropy_loss_zero_div():
    # test_cross_entropy_loss_zero_div (#73165): an empty class dimension is no error.
    input_1, input_2 = torch.rand([5, 0]), torch.rand([5, 0])
    out = lt.CrossEntropyLoss()(input_1, input_2)
    assert out.item() == 0.0  # PyTorch: NaN (its mean divides by 0 classes); see the README
    torch.testing.assert_close(lt.cross_entropy(input_1, input_2, reduction="none"), torch.zeros(5))
    with pytest.raises(IndexError):  # no class exists: PyTorch's "Target 0 is out of bounds"
        lt.cross_entropy(torch.rand(5, 0), torch.zeros(5, dtype=torch.long))


@pytest.mark.parametrize("shape", [(0, 3), (0, 3, 2), (2, 3, 0), (0, 0)])
def test_zero_size_batch(shape):
    x = torch.randn(shape, requires_grad=True)
    t = torch.zeros(shape[:1] + shape[2:], dtype=torch.long)
    for reduction in ("sum", "none"):
        _check_against_torch(x, t, dict(reduction=reduction))
    assert lt.cross_entropy(x, t).item() == 0.0  # PyTorch: NaN (0/0)
    assert lt.cross_entropy(x, t, empty_mean="nan").isnan()
    q = torch.rand(shape, requires_grad=True)
    for reduction in ("sum", "none"):
        _check_against_torch(x, q, dict(reduction=reduction))


@pytest.mark.parametrize("reduction", ["none", "mean", "sum"])
def test_cross_entropy_loss_prob_target_all_reductions(reduction):
    # test_cross_entropy_loss_prob_target_all_reductions, against PyTorch's reference formula.
    for k in range(5):
        N, C = 5, 4
        other_dims = [torch.randint(2, 5, size=(1,)).item() for _ in range(k)]
        input = torch.randn(N, C, *other_dims, dtype=torch.float64, requires_grad=True)
        target = torch.randn(N, C, *other_dims, dtype=torch.float64, requires_grad=True)
        weight = torch.randn(C, dtype=torch.float64).abs()
        _check_against_torch(input, target, dict(weight=weight, reduction=reduction))
        w = weight.view(1, C, *([1] * k))
        reference = -(F.log_softmax(input, 1) * target * w).sum(1)
        reference = {"none": reference, "sum": reference.sum(), "mean": reference.mean()}[reduction]
        torch.testing.assert_close(lt.cross_entropy(input, target, weight, reduction=reduction), reference)


def test_cross_entropy_loss_unit_weights():
    # test_cross_entropy_loss_prob_target_unit_weights / _index_target_unit_weights
    for k, reduction in itertools.product(range(4), ("none", "mean", "sum")):
        N, C = 5, 4
        other = [3] * k
        x = torch.randn(N, C, *other)
        for target in (torch.randn(N, C, *other), torch.randint(0, C, (N, *other))):
            a = lt.cross_entropy(x, target, torch.ones(C), reduction=reduction)
            torch.testing.assert_close(a, lt.cross_entropy(x, target, reduction=reduction))
            torch.testing.assert_close(a, F.cross_entropy(x, target, reduction=reduction))


def test_cross_entropy_loss_one_hot_target():
    # test_cross_entropy_loss_one_hot_target: an index target and its one-hot probabilities.
    for k in range(4):
        N, C = 5, 4
        other_dims = [2] * k
        weight = torch.randn(C).abs()
        for reduction, w in itertools.product(["none", "sum"], [None, weight]):
            m = lt.CrossEntropyLoss(weight=w, reduction=reduction)
            input = torch.randn(N, C, *other_dims, requires_grad=True)
            target = torch.randint(0, C, (N, *other_dims))
            one_hot = F.one_hot(target, num_classes=C).to(input.dtype)
            one_hot = one_hot.permute(0, -1, *range(1, one_hot.dim() - 1))
            torch.testing.assert_close(m(input, target), m(input, one_hot))


def test_cross_entropy_label_smoothing_errors():
    N, C = 3, 4
    input_args = [
        (torch.randn((N, C)), torch.arange(0, C)[:N]),
        (torch.randn((N, C)), torch.randn(N, C)),
    ]
    for input_arg in input_args:
        loss = lt.CrossEntropyLoss(label_smoothing=1.2)
        with pytest.raises(RuntimeError, match=r"label_smoothing must be between 0\.0"):
            loss(*input_arg)


def test_cross_entropy_label_smoothing_consistent_index_target_and_probs():
    N, C = 10, 4
    ks, reductions = range(5), ["none", "mean", "sum"]
    label_smoothings = [0.05, 0.15]
    for k, reduction, ls in itertools.product(ks, reductions, label_smoothings):
        other_dims = [torch.randint(2, 5, size=(1,)).item() for _ in range(k)]
        input = torch.randn(N, C, *other_dims, requires_grad=True)
        target = torch.randint(0, C, (N, *other_dims))
        # construct target probablity that should have the same result as label_smoothing
        target_proba = F.one_hot(target, num_classes=C)
        target_proba = target_proba.permute(0, -1, *range(1, target_proba.dim() - 1))
        target_mask = target_proba == 1
        target_proba = target_proba.to(dtype=input.dtype)
        target_proba.masked_fill_(target_mask, 1 - ls + ls / C)
        target_proba.masked_fill_(~target_mask, ls / C)
        loss = lt.CrossEntropyLoss(reduction=reduction)
        output_with_prob = loss(input, target_proba)
        loss = lt.CrossEntropyLoss(reduction=reduction, label_smoothing=ls)
        output_with_index = loss(input, target)
        torch.testing.assert_close(output_with_prob, output_with_index, rtol=1e-07, atol=1e-05)


def test_cross_entropy_label_smoothing_with_probs():
    N, C = 10, 4
    for k, reduction, ls in itertools.product(range(5), ["none", "mean", "sum"], [0.05, 0.15]):
        other_dims = [torch.randint(2, 5, size=(1,)).item() for _ in range(k)]
        input = torch.randn(N, C, *other_dims, requires_grad=True)
        target = F.log_softmax(torch.randn(N, C, *other_dims), dim=1)
        # Compare label smoothing through the loss with a manually smoothed target.
        loss = lt.CrossEntropyLoss(reduction=reduction, label_smoothing=ls)
        output_with_smoothing = loss(input, target)
        target_with_smoothing = target * (1 - ls) + ls / C
        loss = lt.CrossEntropyLoss(reduction=reduction)
        output_with_manual_smoothing = loss(input, target_with_smoothing)
        torch.testing.assert_close(output_with_smoothing, output_with_manual_smoothing)
        _check_against_torch(input, target.requires_grad_(), dict(reduction=reduction, label_smoothing=ls))


def test_cross_entropy_label_smoothing_weight_ignore_indices():
    reductions = ["none", "sum", "mean"]
    label_smoothings = [0.05, 0.15]
    wgt = torch.tensor([0.3, 0.6])
    inp1 = torch.tensor([[0.3, 0.4], [1, 2]])
    inp2 = torch.tensor([[0.3, 0.6], [1, 2]])
    targ_default_ignore_index = torch.tensor([-100, 1])
    targ_negative_ignore_index = torch.tensor([-2, 1])
    targ_positive_ignore_index = torch.tensor([2, 1])
    for reduction, label_smoothing, weight in itertools.product(reductions, label_smoothings, (None, wgt)):

        def check_equal(loss, inp_targ_1, inp_targ_2):
            inp1, targ1 = inp_targ_1
            inp2, targ2 = inp_targ_2
            l1, l2 = loss(inp1, targ1), loss(inp2, targ2)
            torch.testing.assert_close(l1, l2)

        for ignore_index, targ in [(-100, targ_default_ignore_index), (-2, targ_negative_ignore_index),
                                   (2, targ_positive_ignore_index)]:
            kw = dict(reduction=reduction, label_smoothing=label_smoothing, weight=weight, ignore_index=ignore_index)
            loss = lt.CrossEntropyLoss(**kw)
            check_equal(loss, (inp1, targ), (inp2, targ))
            if reduction != "none":
                # the mean's denominator counts no ignored row
                check_equal(loss, (inp1, targ), (inp2[1:], targ[1:]))
            _check_against_torch(inp1.requires_grad_(), targ, kw)


def test_negative_and_zero_weights_follow_pytorch():
    x = torch.randn(6, 4, dtype=torch.float64, requires_grad=True)
    t = torch.tensor([0, 1, 2, 3, 1, 0])
    for w in (torch.tensor([-1.5, 2.0, 0.0, 0.5]), torch.tensor([0.0, 1.0, 0.0, 3.0])):
        for kw in ({}, {"label_smoothing": 0.3}, {"reduction": "sum"}, {"reduction": "none"}):
            _check_against_torch(x, t, dict(kw, weight=w.double()))
            q = torch.randn(6, 4, dtype=torch.float64, requires_grad=True)  # negative values too
            _check_against_torch(x, q, dict(kw, weight=w.double()))


def test_pytorch_errors():
    x = torch.randn(3, 4)
    with pytest.raises(IndexError):
        lt.cross_entropy(x, torch.tensor([0, 1, 4]))
    with pytest.raises(IndexError):
        lt.cross_entropy(x, torch.tensor([0, 1, -1]))
    with pytest.raises(ValueError, match="batch_size"):
        lt.cross_entropy(x, torch.tensor([0, 1]))
    with pytest.raises(RuntimeError, match="ignore_index is not supported"):
        lt.cross_entropy(x, torch.rand(3, 4), ignore_index=1)
    q = torch.rand(3, 4)  # a negative ignore_index is accepted (and unused) with probabilities
    torch.testing.assert_close(lt.cross_entropy(x, q, ignore_index=-1), F.cross_entropy(x, q, ignore_index=-1))
    with pytest.raises(RuntimeError):
        lt.cross_entropy(x, torch.rand(3, 5))
    with pytest.raises(RuntimeError, match="weight tensor should be defined"):
        lt.cross_entropy(x, torch.tensor([0, 1, 2]), weight=torch.ones(2))
    with pytest.raises(ValueError, match="not a valid value for reduction"):
        lt.cross_entropy(x, torch.tensor([0, 1, 2]), reduction="foo")
    with pytest.raises(RuntimeError):
        lt.cross_entropy(torch.randn(()), torch.tensor(1))
    # Every one of these is an lse error too, naming what it found.
    with pytest.raises(lse.TargetError) as info:
        lt.cross_entropy(x, torch.tensor([0, 1, 4]))
    assert (info.value.row, info.value.value) == (2, 4)


def test_legacy_size_average_and_reduce():
    x, t = torch.randn(4, 3), torch.tensor([0, 2, 1, 1])
    for size_average, reduce in itertools.product((None, True, False), (None, True, False)):
        want = F.cross_entropy(x, t, None, size_average, -100, reduce)
        torch.testing.assert_close(lt.cross_entropy(x, t, None, size_average, -100, reduce), want)
        module = lt.CrossEntropyLoss(size_average=size_average, reduce=reduce)
        torch.testing.assert_close(module(x, t), want)


def test_second_backward_and_non_unit_upstream_for_targets():
    x = torch.randn(4, 5, dtype=torch.float64, requires_grad=True)
    q = torch.randn(4, 5, dtype=torch.float64, requires_grad=True)
    loss = lt.cross_entropy(x, q, label_smoothing=0.2)
    (3 * loss).backward(retain_graph=True)
    first = (x.grad.clone(), q.grad.clone())
    x.grad, q.grad = None, None
    (3 * loss).backward()  # recomputed: the fused gradients were handed over once
    torch.testing.assert_close((x.grad, q.grad), first)
    x2, q2 = x.detach().requires_grad_(), q.detach().requires_grad_()
    (3 * F.cross_entropy(x2, q2, label_smoothing=0.2)).backward()
    torch.testing.assert_close(first, (x2.grad, q2.grad))
