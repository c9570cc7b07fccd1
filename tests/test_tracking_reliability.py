"""Issue 17, parts 2, 3, 6 and 8: a monitor never kills or changes training, the ledger follows
PyTorch's kept momentum buffer, awkward-but-legal loops work, and a run resumes exactly.

Each test first reproduces the finding (what an untracked twin does), then asserts the fix.
"""

from __future__ import annotations

import copy
import errno
import os
import subprocess
import sys
import textwrap

import numpy as np
import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

import neural_mechanics as nm
from neural_mechanics.errors import InvalidArgumentError, NonFiniteError

X = torch.randn(64, 8, generator=torch.Generator().manual_seed(0))
Y = torch.randint(0, 4, (64,), generator=torch.Generator().manual_seed(1))


def mlp(seed: int = 0, dtype: torch.dtype = torch.float32) -> nn.Module:
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(8, 16), nn.BatchNorm1d(16), nn.ReLU(), nn.Linear(16, 16), nn.ReLU(), nn.Linear(16, 4)).to(dtype)


def batch(step: int, dtype: torch.dtype = torch.float32) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(1000 + step)
    idx = torch.randint(0, len(X), (32,), generator=g)
    return X[idx].to(dtype), Y[idx]


def backward(model: nn.Module, opt: torch.optim.Optimizer, step: int) -> None:
    dtype = next(model.parameters()).dtype
    x, y = batch(step, dtype)
    opt.zero_grad()
    F.cross_entropy(model(x).float(), y).backward()


def twins(make_opt, seed: int = 0):
    """(model, optimizer) twice, identical: one tracked, one not."""
    pairs = []
    for _ in range(2):
        m = mlp(seed)
        pairs.append((m, make_opt(m)))
    return pairs


def same_parameters(a: nn.Module, b: nn.Module) -> bool:
    return all(torch.equal(p, q) or (p.isnan() == q.isnan()).all() and torch.equal(p.nan_to_num(), q.nan_to_num()) for p, q in zip(a.parameters(), b.parameters()))


def exact_error(run: nm.Run) -> float:
    err = run.errors("exact")
    return float(np.nanmax(err)) if np.isfinite(err).any() else float("nan")


SGD = lambda m: torch.optim.SGD(m.parameters(), lr=0.05, momentum=0.9, weight_decay=5e-4)  # noqa: E731
ADAM = lambda m: torch.optim.Adam(m.parameters(), lr=1e-3)  # noqa: E731


# -- part 2: the monitor never kills or changes training ------------------------------------------
def test_on_error_is_validated():
    m = mlp()
    with pytest.raises(InvalidArgumentError, match="on_error"):
        nm.track(m, SGD(m), on_error="ignore")


@pytest.mark.parametrize("make_opt", [SGD, ADAM], ids=["sgd", "adam"])
@pytest.mark.parametrize("bad", [float("nan"), float("inf")], ids=["nan", "inf"])
def test_a_non_finite_gradient_is_noted_and_the_step_goes_ahead_untouched(make_opt, bad):
    (m, opt), (twin, twin_opt) = twins(make_opt)
    tracker = nm.track(m, opt)
    for step in range(6):
        for model, o in ((m, opt), (twin, twin_opt)):
            backward(model, o, step)
            if step == 3:
                model[0].weight.grad[0, 0] = bad
            o.step()  # the tracked one must not raise
        assert same_parameters(m, twin), f"step {step}: the tracked training differs from the untracked twin"
    tracker.close()
    run = tracker.run
    assert sorted(set(run.step_index[:-1].tolist())) == list(range(6))
    notes = [n for n in run.notes if n.startswith("step 3: non-finite sums")]
    assert notes, run.notes
    assert "restart" in notes[0] and "[non-finite now: 0.weight" in notes[0], notes[0]
    rows = run.step_index == 3
    assert not np.isfinite(run.array("grad_sq")[rows]).all()
    assert np.isnan(run.array("exact")[rows]).all() and np.isnan(run.array("paper")[rows]).all()


def test_after_a_non_finite_step_the_theories_restart_and_stay_exact():
    """A loop that rolls back after a NaN (reloads the weights): the ledger restarts from the
    measured charges and is exact again; the paper's closed form keeps predicting."""
    m = mlp()
    opt = SGD(m)
    good = None
    with nm.track(m, opt) as tracker:
        for step in range(40):
            backward(m, opt, step)
            if step == 10:
                good = (copy.deepcopy(m.state_dict()), copy.deepcopy(opt.state_dict()))
                m[3].weight.grad[0, 0] = float("nan")
            opt.step()
            if step == 10:  # the NaN went into the weights: roll back, as a careful loop does
                m.load_state_dict(good[0])
                opt.load_state_dict(good[1])
    run = tracker.run
    steps = run.step_index
    assert any(n.startswith("step 10: non-finite") for n in run.notes), run.notes
    assert any(n.startswith("step 11: paper and exact restart") for n in run.notes), run.notes
    after = steps > 11
    exact = run.errors("exact")[after]
    assert np.isfinite(exact).all() and exact.max() < 1e-5, exact.max()
    assert np.isfinite(run.array("paper")[after][:, run.groups.symmetry == "scale"]).all()


@pytest.mark.parametrize("on_error", ["note", "raise"])
def test_a_non_finite_step_seen_a_step_late_keeps_clock_and_rows_in_step(on_error):
    """The delayed reducer (reducer="torch": the device path, here on the CPU) reads a step's
    sums at the next step: a NaN there is noted (or raised, once the step has been taken into
    account) with the clock and the rows in step with training."""
    (m, opt), (twin, twin_opt) = twins(SGD)
    tracker = nm.track(m, opt, reducer="torch", on_error=on_error)
    raised = []
    for step in range(8):
        for model, o in ((m, opt), (twin, twin_opt)):
            backward(model, o, step)
            if step == 3:
                model[0].weight.grad[0, 0] = float("inf")  # θ becomes non-finite from here on
            try:
                o.step()
            except NonFiniteError:
                raised.append(step)
                o.step()  # the loop retries
    if on_error == "raise":
        with pytest.raises(NonFiniteError):
            tracker.close()  # the last step's sums are read at close
        assert raised == [4, 5, 6, 7]  # each seen at the next step, before that step's update
    else:
        tracker.close()
        assert same_parameters(m, twin) and not raised
    run = tracker.run
    assert run.step_index[:8].tolist() == list(range(8)), "a step recorded twice or lost"
    np.testing.assert_allclose(tracker._path.core.time, 8 * 0.05, rtol=1e-12)  # the clock counted every step once


def test_on_error_raise_refuses_the_step_before_the_update_and_a_retry_is_recorded_once():
    m = mlp()
    opt = SGD(m)
    with nm.track(m, opt, on_error="raise") as tracker:
        for step in range(12):
            backward(m, opt, step)
            if step == 5:
                before = [p.detach().clone() for p in m.parameters()]
                m[0].weight.grad[1, 1] = float("nan")
                with pytest.raises(NonFiniteError, match="step 5"):
                    opt.step()
                assert all(torch.equal(p, q) for p, q in zip(m.parameters(), before)), "the refused step moved the weights"
                backward(m, opt, 100)  # the loop catches it and retries with another batch
            opt.step()
    run = tracker.run
    steps = run.step_index[:-1]
    assert steps.tolist() == list(range(12)), "a step recorded twice or lost"
    assert exact_error(run) < 1e-5
    assert not any("non-finite" in n for n in run.notes)


def test_a_retried_step_after_an_optimizer_error_is_recorded_once(monkeypatch):
    m = mlp()
    opt = SGD(m)
    calls = {"n": 0}

    def sgd_foreach(*args, **kwargs):
        calls["n"] += 1
        if calls["n"] == 4:
            raise RuntimeError("out of memory (simulated) inside the update")
        return real(*args, **kwargs)

    import torch.optim.sgd as sgd_module

    real = sgd_module.sgd
    monkeypatch.setattr(sgd_module, "sgd", sgd_foreach)
    with nm.track(m, opt) as tracker:
        for step in range(10):
            backward(m, opt, step)
            try:
                opt.step()
            except RuntimeError:
                opt.step()
    run = tracker.run
    assert calls["n"] == 11
    assert run.step_index[:-1].tolist() == list(range(10)), "the failed attempt was recorded as well"
    assert exact_error(run) < 1e-5


def test_a_full_disk_while_spilling_is_noted_and_training_goes_on(monkeypatch, tmp_path):
    (m, opt), (twin, twin_opt) = twins(SGD)
    tracker = nm.track(m, opt, spill_dir=tmp_path)
    backward(m, opt, 0)
    opt.step()
    backward(twin, twin_opt, 0)
    twin_opt.step()
    tracker.run.max_rows_in_memory = 2  # spill every other row

    def full(*_a, **_k):
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    monkeypatch.setattr(nm.run._native, "save_run", full)
    for step in range(1, 8):
        for model, o in ((m, opt), (twin, twin_opt)):
            backward(model, o, step)
            o.step()
    assert same_parameters(m, twin)
    monkeypatch.undo()
    tracker.close()
    run = tracker.run
    assert any("spilling rows to disk" in n and "No space left" in n for n in run.notes), run.notes
    assert run.step_index.tolist() == list(range(9)), "rows lost or doubled while the disk was full"
    assert exact_error(run) < 1e-5


def test_an_exception_inside_the_hooks_is_noted_and_the_step_is_untouched(monkeypatch):
    (m, opt), (twin, twin_opt) = twins(SGD)
    tracker = nm.track(m, opt)
    backward(m, opt, 0)
    opt.step()
    backward(twin, twin_opt, 0)
    twin_opt.step()
    reducer = tracker._path.reducer
    real = reducer.reduce_plan
    calls = {"n": 0}

    def boom(*a, **k):
        calls["n"] += 1
        if calls["n"] in (2, 3):
            raise RuntimeError("boom")
        return real(*a, **k)

    monkeypatch.setattr(reducer, "reduce_plan", boom)
    for step in range(1, 8):
        for model, o in ((m, opt), (twin, twin_opt)):
            backward(model, o, step)
            o.step()
        assert same_parameters(m, twin)
    tracker.close()
    run = tracker.run
    noted = [n for n in run.notes if "RuntimeError: boom" in n]
    assert len(noted) == 2 and noted[0].startswith("step 2:"), run.notes  # first, then "the same at 1 more"
    assert run.step_index.tolist() == list(range(9))
    lost = np.isin(run.step_index, [2, 3])
    assert np.isnan(run.array("measured")[lost]).all()
    late = run.step_index > 4
    assert exact_error_rows(run, late) < 1e-5


def exact_error_rows(run: nm.Run, rows: np.ndarray) -> float:
    return float(np.nanmax(run.errors("exact")[rows]))


def test_on_error_raise_keeps_hook_exceptions(monkeypatch):
    m = mlp()
    opt = SGD(m)
    tracker = nm.track(m, opt, on_error="raise")
    backward(m, opt, 0)
    opt.step()
    monkeypatch.setattr(tracker._path.reducer, "reduce_plan", lambda *a, **k: (_ for _ in ()).throw(RuntimeError("boom")))
    backward(m, opt, 1)
    with pytest.raises(RuntimeError, match="boom"):
        opt.step()


def test_a_dtype_change_mid_run_is_noted_and_training_goes_on():
    # (torch's Adam itself refuses bfloat16 parameters with its float32 state: SGD only)
    (m, opt), (twin, twin_opt) = twins(SGD)
    tracker = nm.track(m, opt)
    for step in range(6):
        for model, o in ((m, opt), (twin, twin_opt)):
            if step == 3:
                model.to(torch.bfloat16)
            backward(model, o, step)
            o.step()
        assert same_parameters(m, twin)
    tracker.close()
    run = tracker.run
    assert any(n.startswith("step 3: the tracked parameters changed dtype (float32 → bfloat16)") for n in run.notes), run.notes
    assert any("bfloat16" in n and "rounded" in n for n in run.notes)
    assert np.isfinite(run.array("measured")).all()


# -- part 3: the ledger follows the buffer PyTorch keeps; low-precision parameters ----------------
def test_momentum_switched_off_and_on_keeps_the_ledger_exact():
    m = mlp()
    opt = SGD(m)
    with nm.track(m, opt) as tracker:
        for step in range(60):
            opt.param_groups[0]["momentum"] = 0.0 if 20 <= step < 40 else 0.9
            backward(m, opt, step)
            opt.step()
            # torch keeps the buffer while momentum is 0 (it neither reads nor writes it)
            assert opt.state[m[0].weight].get("momentum_buffer") is not None
    run = tracker.run
    assert exact_error(run) < 1e-6, exact_error(run)


def test_bfloat16_parameters_get_a_note_with_the_tolerance():
    m = mlp(dtype=torch.bfloat16)
    opt = SGD(m)
    with nm.track(m, opt) as tracker:
        for step in range(200):
            backward(m, opt, step)
            opt.step()
    run = tracker.run
    note = [n for n in run.notes if "bfloat16" in n and "rounded" in n]
    assert note and "1e-03 per step in bfloat16" in note[0], run.notes
    err = exact_error(run)
    assert 1e-3 < err < 1e-3 * 200, err  # bounded by the rounding, as the note says, not float32's 1e-7


# -- part 6: awkward but legitimate ------------------------------------------------------------------
def test_two_trackers_with_discovery_on_one_model_are_independent():
    m = mlp()
    opt = SGD(m)
    a, b = nm.track(m, opt), nm.track(m, opt, every=2)
    for step in range(6):
        backward(m, opt, step)
        opt.step()
    a.close()
    b.close()
    assert a.run.step_index.tolist() == list(range(7))
    assert b.run.step_index.tolist() == [0, 2, 4, 6]
    assert len(a.run.groups) == len(b.run.groups) > 0
    np.testing.assert_array_equal(a.run.array("measured")[::2], b.run.array("measured"))
    assert exact_error(a.run) < 1e-5


def test_lbfgs_closure_runs_the_forward_and_is_tracked():
    torch.manual_seed(0)
    m = nn.Sequential(nn.Linear(8, 16), nn.ReLU(), nn.Linear(16, 4))
    opt = torch.optim.LBFGS(m.parameters(), lr=0.5, max_iter=4)
    x, y = batch(0)

    def closure():
        opt.zero_grad()
        loss = F.cross_entropy(m(x), y)
        loss.backward()
        return loss

    with nm.track(m, opt) as tracker:  # discovery sees the forward inside the closure
        for _ in range(5):
            opt.step(closure)
    run = tracker.run
    assert type(tracker._path).__name__ == "UpdatePath"
    assert run.step_index.tolist() == list(range(6))
    assert run.exact_kind == "bookkeeping"
    assert exact_error(run) < 1e-5
    assert not any("before any forward" in n for n in run.notes)


# -- part 8: resume -----------------------------------------------------------------------------------
def _make(kind: str):
    m = mlp(3)
    if kind == "sgd":
        opt = torch.optim.SGD(m.parameters(), lr=0.05, momentum=0.9, weight_decay=5e-4)
        sched = torch.optim.lr_scheduler.StepLR(opt, step_size=30, gamma=0.5)
    else:
        opt = torch.optim.AdamW(m.parameters(), lr=3e-3, weight_decay=1e-2)
        sched = torch.optim.lr_scheduler.StepLR(opt, step_size=30, gamma=0.5)
    return m, opt, sched


def _train(m, opt, sched, start: int, stop: int) -> None:
    for step in range(start, stop):
        backward(m, opt, step)
        opt.step()
        sched.step()


RESUME_SCRIPT = textwrap.dedent(
    """
    import sys, torch
    sys.path.insert(0, {tests!r})
    import neural_mechanics as nm
    from test_tracking_reliability import _make, _train
    kind, ckpt, out, threads = sys.argv[1:5]
    torch.set_num_threads(int(threads))  # the parent's: float32 kernels sum in a thread-dependent order
    state = torch.load(ckpt, weights_only=True)
    m, opt, sched = _make(kind)
    m.load_state_dict(state["model"]); opt.load_state_dict(state["optimizer"]); sched.load_state_dict(state["scheduler"])
    tracker = nm.track(m, opt)
    tracker.load_state_dict(state["tracker"])
    _train(m, opt, sched, 100, 200)
    tracker.close()
    tracker.run.save(out)
    """
)


@pytest.mark.parametrize("kind", ["sgd", "adamw"])
def test_a_resumed_run_equals_the_uninterrupted_one(kind, tmp_path):
    m, opt, sched = _make(kind)
    with nm.track(m, opt) as whole:
        _train(m, opt, sched, 0, 200)

    m, opt, sched = _make(kind)
    first = nm.track(m, opt)
    _train(m, opt, sched, 0, 100)
    ckpt = tmp_path / "ckpt.pt"
    torch.save({"model": m.state_dict(), "optimizer": opt.state_dict(), "scheduler": sched.state_dict(), "tracker": first.state_dict()}, ckpt)
    out = tmp_path / "resumed.nmrun"
    script = RESUME_SCRIPT.format(tests=os.path.dirname(__file__))
    proc = subprocess.run([sys.executable, "-c", script, kind, str(ckpt), str(out), str(torch.get_num_threads())], capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    resumed = nm.load_run(out)
    a, b = whole.run, resumed
    np.testing.assert_array_equal(a.step_index, b.step_index)
    np.testing.assert_allclose(b.time_index, a.time_index, rtol=0, atol=1e-12)
    for c in nm.run.COLUMNS:
        x, y = a.array(c), b.array(c)
        np.testing.assert_array_equal(np.isnan(x), np.isnan(y), err_msg=c)
        np.testing.assert_allclose(y[~np.isnan(y)], x[~np.isnan(x)], rtol=1e-12, atol=1e-12, err_msg=c)
    assert b.regimes == a.regimes


def test_a_state_of_another_model_or_a_late_call_is_refused():
    m, opt, sched = _make("sgd")
    t = nm.track(m, opt)
    _train(m, opt, sched, 0, 3)
    state = t.state_dict()
    with pytest.raises(InvalidArgumentError, match="before the first optimizer step"):
        t.load_state_dict(state)
    # another model: refused at the first forward, once its groups are known
    torch.manual_seed(0)
    other = nn.Sequential(nn.Linear(8, 32), nn.ReLU(), nn.Linear(32, 4))
    o2 = torch.optim.SGD(other.parameters(), lr=0.1)
    t2 = nm.track(other, o2)
    t2.load_state_dict(state)
    with pytest.raises(InvalidArgumentError, match="another model"):
        other(batch(0)[0])
    # the same model, another optimizer: refused
    m3, _, _ = _make("sgd")
    t3 = nm.track(m3, torch.optim.Adam(m3.parameters()), nm.find_symmetries(m3, batch(0)[0]))
    with pytest.raises(InvalidArgumentError, match="optimizer"):
        t3.load_state_dict(state)
    for bad in (None, {"meta": "{}", "core": {}, "rows": None}, {"meta": "not json", "core": {}, "rows": None}):
        with pytest.raises(InvalidArgumentError):
            t3.load_state_dict(bad)


def test_a_state_without_rows_resumes_the_theories(tmp_path):
    m, opt, sched = _make("sgd")
    first = nm.track(m, opt)
    _train(m, opt, sched, 0, 20)
    state = first.state_dict(rows=False)
    assert state["rows"] is None
    m2, opt2, sched2 = _make("sgd")
    m2.load_state_dict(m.state_dict())
    opt2.load_state_dict(opt.state_dict())
    sched2.load_state_dict(sched.state_dict())
    t = nm.track(m2, opt2)
    t.load_state_dict(state)
    _train(m2, opt2, sched2, 20, 40)
    t.close()
    assert t.run.step_index.tolist() == list(range(20, 41))
    assert exact_error(t.run) < 1e-5
    assert any("without the earlier rows" in n for n in t.run.notes)
