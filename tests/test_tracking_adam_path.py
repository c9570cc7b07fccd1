"""torch.optim.Adam / AdamW: the update computed before the step (tracking/adam_path.py) gives the
rows the snapshot route gives (θ_n copied, θ_n − θ_{n+1} measured after the step), for every flag.

In float64 the two agree to float64 rounding (both see the same update); in float32 the snapshot's
d = θ_n − θ_{n+1} carries the rounding of θ_{n+1} (relative to |θ|, not |d|), so they agree to a
few 1e-6 of each column's scale and the fused route is the more accurate of the two.
"""

import inspect

import numpy as np
import pytest
import torch
import torch.nn as nn

import neural_mechanics as nm
from neural_mechanics import _native
from neural_mechanics.errors import DTypeError, InvalidArgumentError, ShapeError
from neural_mechanics.tracking.adam_path import AdamPath
from neural_mechanics.tracking.paths import UpdatePath

from helpers import acceptance_net, bn_mlp, digits, train_steps

X, Y = digits()
XF = X.flatten(1)  # bn_mlp's input
HAS_DECOUPLED = "decoupled_weight_decay" in inspect.signature(torch.optim.Adam).parameters
KINDS = ["adam", "adamw"] + (["adam-decoupled"] if HAS_DECOUPLED else [])
IMPLS = {"single": {"foreach": False}, "foreach": {"foreach": True}, "fused": {"fused": True}}


def optimizer(kind: str, params, **kw) -> torch.optim.Optimizer:
    if kind == "adamw":
        return torch.optim.AdamW(params, **({"lr": 2e-3, "weight_decay": 0.05} | kw))
    extra = {"decoupled_weight_decay": True} if kind == "adam-decoupled" else {}
    return torch.optim.Adam(params, **({"lr": 2e-3, "weight_decay": 0.01} | extra | kw))


def tracked(fused_route: bool, kind: str, dtype=torch.float64, steps=6, every=1, conv=False, channels_last=False, loop=None, **kw):
    """A run of an MLP with all three symmetries (``conv``: the acceptance network, a conv net)
    under ``kind``, through the fused route or the snapshot route."""
    torch.manual_seed(3)
    model = (acceptance_net() if conv else bn_mlp()).to(dtype)
    if channels_last:
        model = model.to(memory_format=torch.channels_last)
    x = (X if conv else XF).to(dtype)
    opt = optimizer(kind, model.parameters(), **kw)
    tracker = nm.track(model, opt, nm.find_symmetries(model, x[:4]), every=every)
    assert isinstance(tracker._path, AdamPath)
    tracker._path.fused = fused_route
    with tracker:
        (loop or train_steps)(model, opt, x, Y, steps)
    return tracker.run


def assert_same_rows(a, b, rtol):
    """Every float column of the two runs' rows (and final charges) agree within ``rtol`` of
    that column's largest magnitude."""
    da, db = a.to_pandas(), b.to_pandas()
    assert len(da) == len(db) and len(da) > 0
    checked = 0
    for c in da.columns:
        if da[c].dtype.kind != "f":
            continue
        x, y = da[c].to_numpy(), db[c].to_numpy()
        np.testing.assert_array_equal(np.isfinite(x), np.isfinite(y), err_msg=c)
        finite = np.isfinite(y)
        if finite.any():
            scale = max(np.abs(y[finite]).max(), 1e-300)
            assert np.abs(x[finite] - y[finite]).max() <= rtol * scale, c
            checked += 1
    assert checked >= 5  # measured, exact, update_sq, update_sum, grad_sq at least
    for k, v in a.final.items():
        if isinstance(v, np.ndarray):
            np.testing.assert_allclose(v, b.final[k], rtol=rtol, atol=rtol * np.abs(b.final[k]).max(), err_msg=k)


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("impl", list(IMPLS))
@pytest.mark.parametrize("amsgrad", [False, True], ids=["", "amsgrad"])
@pytest.mark.parametrize("maximize", [False, True], ids=["", "maximize"])
def test_every_flag_gives_the_snapshot_rows(kind, impl, amsgrad, maximize):
    kw = IMPLS[impl] | {"amsgrad": amsgrad, "maximize": maximize}
    fused, snapshot = tracked(True, kind, **kw), tracked(False, kind, **kw)
    assert_same_rows(fused, snapshot, 1e-9)
    assert not [n for n in fused.notes if "snapshot" in n]  # every step took the fused route


@pytest.mark.parametrize("kind", KINDS)
def test_float32_agrees_within_the_snapshots_rounding(kind):
    kw = {"amsgrad": True, "conv": True}
    fused, snapshot = tracked(True, kind, torch.float32, **kw), tracked(False, kind, torch.float32, **kw)
    assert_same_rows(fused, snapshot, 3e-5)
    assert fused.exact_kind == "bookkeeping" and np.nanmax(fused.errors("exact")) <= 1e-5


def test_tensor_lr_a_schedule_and_every_k():
    def with_schedule(model, opt, x, y, steps):
        train_steps(model, opt, x, y, steps, scheduler=torch.optim.lr_scheduler.StepLR(opt, 2, gamma=0.5))

    # A fresh lr tensor per run (a scheduler fills a tensor lr in place), in float64: torch
    # rounds lr / (1 − β1^t) to the lr tensor's dtype, a float32 lr would differ by that rounding.
    lr = lambda: torch.tensor(3e-3, dtype=torch.float64)  # noqa: E731
    runs = [tracked(route, "adamw", lr=lr(), foreach=False, loop=with_schedule) for route in (True, False)]
    assert_same_rows(*runs, 1e-9)
    assert runs[0].to_pandas()["lr"].nunique() == 3  # 3e-3 halved every 2 of the 6 steps
    assert_same_rows(tracked(True, "adam", steps=9, every=3), tracked(False, "adam", steps=9, every=3), 1e-9)


def test_non_contiguous_parameters():
    kw = {"conv": True, "channels_last": True, "steps": 3}
    fused, snapshot = tracked(True, "adamw", torch.float32, **kw), tracked(False, "adamw", torch.float32, **kw)
    assert_same_rows(fused, snapshot, 3e-5)


def test_a_parameter_without_a_gradient_is_not_moved():
    """Adam skips a parameter whose .grad is None (its state unchanged): d = 0 there, as measured."""

    def drop_one_grad(model, opt, x, y, steps):
        g = torch.Generator().manual_seed(0)
        for n in range(steps):
            opt.zero_grad()
            idx = torch.randint(0, len(x), (32,), generator=g)
            nn.functional.cross_entropy(model(x[idx]), y[idx]).backward()
            if n % 2:
                model[-1].bias.grad = None
            opt.step()

    fused, snapshot = tracked(True, "adamw", loop=drop_one_grad), tracked(False, "adamw", loop=drop_one_grad)
    assert_same_rows(fused, snapshot, 1e-9)
    assert any("had no gradient" in n for n in fused.notes)


def test_steps_it_cannot_stand_for_take_the_snapshot():
    """A GradScaler's still-scaled gradients (fused Adam unscales inside the step): snapshot, noted."""

    def scaled(model, opt, x, y, steps):
        opt.grad_scale, opt.found_inf = torch.tensor(1.0), torch.tensor(0.0)
        train_steps(model, opt, x, y, steps)

    fused, snapshot = tracked(True, "adamw", loop=scaled, fused=True), tracked(False, "adamw", loop=scaled, fused=True)
    assert_same_rows(fused, snapshot, 1e-12)
    assert [n for n in fused.notes if "GradScaler" in n and "snapshot" in n]


def test_which_path_an_optimizer_takes():
    model = acceptance_net()
    sym = nm.find_symmetries(model, X[:4])

    class MyAdam(torch.optim.Adam):
        pass

    cases = [
        (torch.optim.AdamW(model.parameters()), "auto", AdamPath),
        (torch.optim.Adam(model.parameters()), "rust", AdamPath),
        (MyAdam(model.parameters()), "auto", UpdatePath),  # a subclass may change the update
        (torch.optim.RMSprop(model.parameters()), "auto", UpdatePath),
        (torch.optim.AdamW(model.parameters()), "torch-sync", UpdatePath),  # the device reducer
    ]
    for opt, reducer, path in cases:
        with nm.track(model, opt, sym, reducer=reducer) as tracker:
            assert type(tracker._path) is path, (type(opt).__name__, reducer)


def test_a_corrupted_state_is_a_clear_error():
    """Under on_error="raise" (under "note" the same message goes to run.notes: the reliability
    tests cover that for every hook)."""
    torch.manual_seed(0)
    model = acceptance_net()
    opt = torch.optim.AdamW(model.parameters())
    with nm.track(model, opt, nm.find_symmetries(model, X[:4]), on_error="raise"):
        train_steps(model, opt, X, Y, 1)
        p = model[0].weight
        opt.state[p]["exp_avg"] = opt.state[p]["exp_avg"].double()
        with pytest.raises(DTypeError, match=r"0\.weight: its exp_avg is torch.float64"):
            train_steps(model, opt, X, Y, 1)
        opt.state[p]["exp_avg"] = torch.zeros(3)
        with pytest.raises(ShapeError, match=r"0\.weight: its exp_avg has shape \(3,\)"):
            train_steps(model, opt, X, Y, 1)


def test_a_failure_of_the_fused_reduction_is_a_note_and_training_goes_on(monkeypatch):
    """on_error="note": the step whose update could not be computed is lost (a note, NaN row),
    the optimizer's step is the untracked one, and the theories restart at the next step."""
    torch.manual_seed(0)
    model, twin = acceptance_net(), acceptance_net()
    twin.load_state_dict(model.state_dict())
    opt, twin_opt = torch.optim.AdamW(model.parameters()), torch.optim.AdamW(twin.parameters())
    real = _native.reduce_adam_ptrs
    calls = {"n": 0}

    def flaky(*args):
        calls["n"] += 1
        if calls["n"] == 3:
            raise RuntimeError("injected")
        return real(*args)

    monkeypatch.setattr(_native, "reduce_adam_ptrs", flaky)
    with nm.track(model, opt, nm.find_symmetries(model, X[:4])) as tracker:
        train_steps(model, opt, X, Y, 6)
    train_steps(twin, twin_opt, X, Y, 6)
    for a, b in zip(model.parameters(), twin.parameters()):
        assert torch.equal(a, b)
    run = tracker.run
    assert any("computing Adam's update before the step" in n and "injected" in n for n in run.notes)
    exact = run.array("exact")
    assert np.isnan(exact[2]).all() and np.isfinite(exact[4]).any()


def spec(t: torch.Tensor, g: torch.Tensor, code: int = 0):
    return (t.data_ptr(), g.data_ptr(), 0, 0, 0, t.numel(), code)


CONSTANTS = (1e-3, 0.1, 1e-8, 0.9, 0.999, 0.0, 0.0, False, False)


def test_native_entry_checks_its_input():
    t, g = torch.randn(4, 3), torch.randn(4, 3)
    good = [(spec(t, g), CONSTANTS)]
    main, extra = _native.reduce_adam_ptrs(good, [(0, 0, 12, 1, 4, 3)], [(0, 0, 12, 1, 4, 3)])
    assert main.shape == (4, 8) and extra.shape == (4, 2)
    # first step, m = v = 0: every element moves by lr·(1−β1)/√(1−β2)·c2 = 1e-3·0.1/√0.001·0.1
    step = 1e-3 * 0.1 / np.sqrt(0.001) * 0.1
    np.testing.assert_allclose(main[:, 5], 3 * step**2, rtol=1e-4)  # Σd² per row of three
    np.testing.assert_allclose(main[:, 7], (g.abs().sum(1) * step).double().numpy(), rtol=1e-4)  # Σĝd
    with pytest.raises(InvalidArgumentError, match="no parameter 1"):
        _native.reduce_adam_ptrs(good, [(1, 0, 12, 1, 4, 3)], [])
    with pytest.raises(ShapeError, match="outside parameter 0"):
        _native.reduce_adam_ptrs(good, [(0, 6, 12, 1, 4, 3)], [])
    with pytest.raises(ShapeError, match="does not cover"):
        _native.reduce_adam_ptrs(good, [(0, 0, 12, 1, 4, 2)], [])
    h = t.half()
    with pytest.raises(DTypeError, match="float32 or float64, got float16"):
        _native.reduce_adam_ptrs([(spec(h, h, 2), CONSTANTS)], [], [])
    with pytest.raises(InvalidArgumentError, match="finite"):
        _native.reduce_adam_ptrs([(spec(t, g), (float("nan"),) + CONSTANTS[1:])], [], [])
    m = torch.zeros(12)
    with pytest.raises(InvalidArgumentError, match="together"):
        _native.reduce_adam_ptrs([((t.data_ptr(), g.data_ptr(), m.data_ptr(), 0, 0, 12, 0), CONSTANTS)], [], [])
