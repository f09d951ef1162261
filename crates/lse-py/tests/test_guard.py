"""The guards from Python: monitor, finiteness guard, triage, loss scaler and its state."""

import json
import math

import ml_dtypes
import numpy as np
import pytest

import lse


def test_monitor_statistics_warnings_and_json_lines(tmp_path):
    monitor = lse.LogitMonitor("f16", warn_fraction=0.75)
    calm = np.array([[1.0, 0.5, -2.0]], np.float32)
    hot = np.array([[9.5, 0.0, -np.inf], [np.nan, 1.0, 2.0]], np.float32)
    assert monitor.record(0, calm) == []
    warnings = monitor.record(1, lse.LogitStats.of(hot))
    assert any("11.09" in w for w in warnings)  # 9.5 is past 75% of f16's naive-exp limit
    stats = lse.LogitStats.of(hot).to_dict()
    assert (stats["max"], stats["nan"], stats["neg_inf"], stats["rows"]) == (9.5, 1, 1, 2)
    history = monitor.history()
    assert [h["step"] for h in history] == [0, 1]
    kinds = {w["kind"] for w in history[1]["warnings"]}
    assert {"near_overflow", "non_finite"} <= kinds
    path = tmp_path / "monitor.jsonl"
    monitor.write_json_lines(path)
    lines = path.read_text().splitlines()
    assert len(lines) == 2 and json.loads(lines[0])["stats"]["max"] == 1.0


def test_monitor_takes_stats_from_the_fused_loss():
    x = np.array([[20.0, 1.0, -3.0], [2.0, 1.0, 0.0]], np.float32)
    result = lse.cross_entropy(x, np.array([0, 1]), stats=True)
    same = lse.LogitStats.of(x).to_dict()
    assert result.stats.to_dict() == same
    assert lse.LogitMonitor("bf16").record(3, result.stats) == []  # 20 is far below bf16's 88.7


def test_monitor_state_round_trip():
    a = lse.LogitMonitor(trend_window=3)
    for step in range(5):
        a.record(step, np.array([[2.0 * step, 0.0]], np.float32))
    state = a.state_dict()
    b = lse.LogitMonitor(trend_window=3)
    b.load_state_dict(json.loads(json.dumps(state)))
    # Same history, and the same warnings from here on (the trend window is part of the state).
    assert b.history() == a.history()
    nxt = np.array([[10.5, 0.0]], np.float32)
    assert a.record(5, nxt) == b.record(5, nxt)
    with pytest.raises(lse.StateError):
        b.load_state_dict(dict(state, version=99))


@pytest.mark.parametrize("dtype", [np.float32, np.float16, ml_dtypes.bfloat16], ids=str)
def test_finite_guard_names_tensor_batch_row_column_value(dtype):
    guard = lse.FiniteGuard(first=2, every=10)
    grad = np.zeros((3, 4), dtype)
    grad[2, 1] = np.inf
    guard.begin_batch(1)
    with pytest.raises(lse.GuardError) as info:
        guard.check("w.grad", grad, role="gradient")
    e = info.value
    assert isinstance(e, ValueError) and isinstance(e, lse.LseError)
    assert (e.tensor, e.batch, e.row, e.column, e.value) == ("w.grad", 1, 2, 1, math.inf)
    guard.begin_batch(5)  # not scheduled: nothing is read
    guard.check("w.grad", grad, role="gradient")
    masked = np.array([[0.0, -np.inf]], dtype)
    guard.begin_batch(0)
    guard.check("logits", masked, role="logits")  # -inf is a mask for logits
    with pytest.raises(lse.GuardError):
        guard.check("probs", masked, role="probabilities")
    with pytest.raises(lse.GuardError):
        guard.check_loss("loss", float("nan"))


def test_finite_guard_takes_torch_tensors():
    torch = pytest.importorskip("torch")
    guard = lse.FiniteGuard(schedule="always")
    guard.begin_batch(0)
    t = torch.zeros(2, 3, dtype=torch.bfloat16)
    t[1, 2] = float("nan")
    with pytest.raises(lse.GuardError) as info:
        guard.check("x", t)
    assert (info.value.row, info.value.column) == (1, 2)


def test_triage_report_as_dict_and_text():
    logits = np.array([[2.0, 1.0], [12.0, 11.5]], np.float16)
    probs = np.array([[0.7, 0.3], [np.nan, np.nan]], np.float16)
    report = lse.triage([("logits", "logits", logits), ("probs", "probabilities", probs)])
    d = report.as_dict()
    assert d["first_non_finite"]["tensor"] == "probs"
    assert d["first_non_finite"]["row"] == 1 and math.isnan(d["first_non_finite"]["value"])
    assert report.cause == d["cause"] and report.cause is not None
    assert "probs" in str(report) and not report.healthy
    assert lse.triage([("logits", "logits", logits)]).healthy


def test_loss_scaler_follows_gradscaler_rules():
    scaler = lse.LossScaler(init_scale=1024.0, growth_interval=2)
    clean = np.ones((2, 2), np.float16) * 512
    report = scaler.unscale({"w": clean})
    assert not report["skipped"] and np.all(clean == 0.5)  # unscaled in place
    report = scaler.unscale([clean.copy()])
    assert report["change"] == "grew" and scaler.scale == 2048.0
    bad = np.array([[1.0, np.inf]], np.float32)
    report = scaler.unscale([("b", bad)])
    assert report["skipped"] and scaler.scale == 1024.0
    assert report["overflow"]["tensor"] == "b" and report["overflow"]["column"] == 1
    assert report["overflow"]["value"] == math.inf


def test_loss_scaler_matches_torch_gradscaler_scale_sequence():
    torch = pytest.importorskip("torch")
    pattern = [False, False, True, False, False, False, True, True, False, False]
    ours = lse.LossScaler(init_scale=256.0, growth_interval=3)
    param = torch.nn.Parameter(torch.zeros(3))
    opt = torch.optim.SGD([param], lr=0.0)
    theirs = torch.amp.GradScaler("cpu", init_scale=256.0, growth_interval=3)
    for overflow in pattern:
        value = float("inf") if overflow else 1.0
        g = np.array([[value, 1.0, 2.0]], np.float32) * np.float32(ours.scale)
        ours.unscale({"p": g})
        theirs.scale(torch.tensor(1.0))  # GradScaler sets its scale up lazily
        param.grad = torch.tensor([value, 1.0, 2.0]) * theirs.get_scale()
        theirs.step(opt)
        theirs.update()
        assert ours.scale == theirs.get_scale()


def test_loss_scaler_state_dict_round_trip():
    a = lse.LossScaler(init_scale=64.0, growth_interval=3)
    a.unscale([np.ones(4, np.float32)])
    a.unscale([np.array([np.nan], np.float32)])
    a.unscale([np.ones(4, np.float32)])
    state = a.state_dict()
    assert state["scale"] == 32.0 and state["clean_steps"] == 1 and state["step"] == 3
    b = lse.LossScaler(init_scale=64.0, growth_interval=3)
    b.load_state_dict(json.loads(json.dumps(state)))
    assert b.state_dict() == state
    for _ in range(2):  # both grow on the same step
        ra, rb = a.unscale([np.ones(2, np.float32)]), b.unscale([np.ones(2, np.float32)])
        assert ra == rb
    assert b.scale == 64.0
    with pytest.raises(lse.StateError):
        lse.LossScaler(max_scale=16.0, init_scale=16.0).load_state_dict(state)  # 32 > max
    with pytest.raises(lse.OptionError):
        lse.LossScaler(growth_factor=0.5)
    with pytest.raises(lse.OptionError):
        lse.LossScaler(no_such_option=1)
