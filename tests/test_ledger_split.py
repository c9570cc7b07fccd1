"""The ledger split (decay + drive + breaking = the measured change of every charge, per step and
group, docs/theory.md §5.5), the paper's form applied to an adaptive optimizer's update, and the
live equilibrium columns (§5.6), on real tracked runs: SGD, SGD + momentum (and nesterov), Adam
(coupled decay), AdamW and Adam(decoupled_weight_decay=True), on a BatchNorm net and a plain MLP.
"""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
import torch
import torch.nn as nn

import neural_mechanics as nm
from neural_mechanics import _native
from neural_mechanics.equilibrium import EQUILIBRIUM_TOLERANCE, equilibrium_reached
from neural_mechanics.run import ADDED_COLUMNS, COLUMNS, GroupInfo, Run

from helpers import bn_mlp, digits, train_steps

X, Y = digits(flatten=True)
STEPS = 30

OPTIMIZERS = {
    "sgd": lambda p: torch.optim.SGD(p, lr=0.05, weight_decay=5e-3),
    "sgd_momentum": lambda p: torch.optim.SGD(p, lr=0.05, momentum=0.9, dampening=0.2, weight_decay=5e-3),
    "sgd_nesterov": lambda p: torch.optim.SGD(p, lr=0.05, momentum=0.9, nesterov=True, weight_decay=5e-3),
    "adam": lambda p: torch.optim.Adam(p, lr=3e-3, weight_decay=1e-2),
    "adamw": lambda p: torch.optim.AdamW(p, lr=3e-3, betas=(0.8, 0.99), weight_decay=0.1),
}


def plain_mlp() -> nn.Sequential:
    torch.manual_seed(2)
    return nn.Sequential(nn.Linear(64, 24), nn.ReLU(), nn.Linear(24, 16), nn.ReLU(), nn.Linear(16, 10))


def tracked(model: nn.Module, make_opt, dtype: torch.dtype = torch.float32, steps: int = STEPS) -> Run:
    model = model.to(dtype)
    opt = make_opt(model.parameters())
    with nm.track(model, opt) as tracker:
        train_steps(model, opt, X.to(dtype), Y, steps)
    return tracker.run


@pytest.fixture(scope="module")
def runs() -> dict[tuple[str, str, str], Run]:
    out = {}
    for name, make in OPTIMIZERS.items():
        out[(name, "bn", "float64")] = tracked(bn_mlp(), make, torch.float64)
        out[(name, "mlp", "float32")] = tracked(plain_mlp(), make)
    out[("sgd_momentum", "bn", "float32")] = tracked(bn_mlp(), OPTIMIZERS["sgd_momentum"])
    out[("adamw", "bn", "float32")] = tracked(bn_mlp(), OPTIMIZERS["adamw"])
    return out


def split_error(run: Run) -> float:
    """max over steps and groups of |decay + drive + breaking − (measured_{n+1} − measured_n)|,
    relative to the group's largest magnitude over the run."""
    measured = run.array("measured")
    split = run.array("decay") + run.array("drive") + run.array("breaking")
    assert np.isfinite(split[:-1]).all() and np.isnan(split[-1]).all()  # the final row has no step
    scale = np.nanmax(np.abs(run.array("magnitude")), axis=0)
    return float(np.max(np.abs(split[:-1] - np.diff(measured, axis=0)) / scale))


@pytest.mark.parametrize("name", list(OPTIMIZERS))
def test_the_split_adds_up_to_the_measured_change(runs, name):
    # float64 training: the split is the change to float64 rounding, for every optimizer
    assert split_error(runs[(name, "bn", "float64")]) <= 1e-12
    # float32 training: SGD's split, and Adam's on the fused route (tracking/adam_path.py), are
    # derived before the step, so θ_{n+1}'s float32 rounding shows (as in the exact ledger,
    # ≤ 1e-5); a snapshot's measured update d = θ_n − θ_{n+1} is itself a float32 difference,
    # exact but where it rounds (below)
    assert split_error(runs[(name, "mlp", "float32")]) <= 1e-6


def test_the_split_in_float32_with_batchnorm(runs):
    assert split_error(runs[("sgd_momentum", "bn", "float32")]) <= 1e-5
    assert split_error(runs[("adamw", "bn", "float32")]) <= 1e-5


def test_the_split_of_a_measured_update_is_exact_in_float32(monkeypatch):
    from neural_mechanics.tracking.adam_path import AdamPath

    monkeypatch.setattr(AdamPath, "fused", False)  # the snapshot route: d measured after the step
    assert split_error(tracked(plain_mlp(), OPTIMIZERS["adamw"])) <= 1e-9
    assert split_error(tracked(bn_mlp(), OPTIMIZERS["adamw"])) <= 1e-9


def test_what_each_term_is(runs):
    sym = lambda run: run.groups.symmetry  # noqa: E731
    # plain SGD: decay ((1−ηλ)² − 1)x, drive η²|ĝ|² (the paper's drive), breaking −2η(1−ηλ)⟨θ, ĝ⟩
    run = runs[("sgd", "bn", "float64")]
    scale = sym(run) == "scale"
    lr, wd, x = run.array("lr")[:-1], run.array("weight_decay")[:-1], run.array("measured")[:-1]
    np.testing.assert_allclose(run.array("decay")[:-1, scale], (((1 - lr * wd) ** 2 - 1) * x)[:, scale], rtol=1e-12)
    quad = sym(run) != "translation"
    np.testing.assert_allclose(run.array("drive")[:-1, quad], (lr**2 * run.array("grad_sq")[:-1])[:, quad], rtol=1e-12)
    np.testing.assert_allclose(run.array("breaking")[:-1, scale], (-2 * lr * (1 - lr * wd) * run.array("flux")[:-1])[:, scale], rtol=1e-12)
    assert (run.array("drive")[:-1, sym(run) == "translation"] == 0).all()
    # AdamW: decoupled decay taken out; Adam's coupled decay stays inside the update
    adamw, adam = runs[("adamw", "bn", "float64")], runs[("adam", "bn", "float64")]
    lr, wd, x = adamw.array("lr")[:-1], adamw.array("weight_decay")[:-1], adamw.array("measured")[:-1]
    quad = sym(adamw) != "translation"
    np.testing.assert_allclose(adamw.array("decay")[:-1, quad], (((1 - lr * wd) ** 2 - 1) * x)[:, quad], rtol=1e-12)
    assert (adam.array("decay")[:-1] == 0).all() and (adam.array("weight_decay")[:-1] > 0).all()
    # under Adam the preconditioner breaks the scale symmetry: the breaking term is not small
    s = sym(adamw) == "scale"
    assert np.median(np.abs(adamw.array("breaking")[:-1, s]) / np.abs(adamw.array("drive")[:-1, s])) > 1e-2


def test_adam_with_decoupled_weight_decay_is_read_as_adamw():
    def run_of(make):
        return tracked(bn_mlp(), make, torch.float64, steps=5)

    adamw = run_of(lambda p: torch.optim.AdamW(p, lr=3e-3, weight_decay=0.1))
    decoupled = run_of(lambda p: torch.optim.Adam(p, lr=3e-3, weight_decay=0.1, decoupled_weight_decay=True))
    for c in ("measured", "decay", "drive", "breaking", "paper", "angular_update_eq"):
        np.testing.assert_allclose(decoupled.array(c), adamw.array(c), rtol=1e-12, equal_nan=True)
    assert np.isfinite(adamw.array("angular_update_eq")[:-1, adamw.groups.symmetry == "scale"]).all()


def test_paper_form_on_the_update_follows_its_closed_form(runs):
    run = runs[("adamw", "bn", "float64")]
    lr, wd, t = run.array("lr")[:-1], run.array("weight_decay")[:-1], run.time_index
    paper, measured = run.array("paper"), run.array("measured")
    assert np.isfinite(paper).all()
    np.testing.assert_allclose(paper[0], measured[0])
    np.testing.assert_allclose(np.diff(t), lr[:, 0], rtol=1e-12)  # t as for SGD: Σ η
    tr = run.groups.symmetry == "translation"
    # translation decays as e^{−λt}
    np.testing.assert_allclose(paper[:, tr], measured[0, tr] * np.exp(-wd[0, tr] * t[:, None]), rtol=1e-12, atol=1e-300)
    # scale and rescale: y' = y + η φ₁(−2λη)(η|u|² − 2λ y), with |u|² = drive / η² from the row
    quad = ~tr
    eta, lam = lr[:, quad], wd[:, quad]
    z = 2 * lam * eta
    phi = -np.expm1(-z) / z
    expected = paper[:-1, quad] + eta * phi * (run.array("drive")[:-1, quad] / eta - 2 * lam * paper[:-1, quad])
    np.testing.assert_allclose(paper[1:, quad], expected, rtol=1e-12)
    assert "the paper's form applied to the optimizer's update" in " ".join(run.summary().note)


def test_angular_columns_are_the_angle_of_the_step(runs):
    for (name, net, _), run in runs.items():
        s = run.groups.symmetry == "scale"
        if net != "bn":
            assert np.isnan(run.array("angular_update")).all() and np.isnan(run.array("effective_lr")).all()
            continue
        x, lr = run.array("measured")[:, s], run.array("lr")[:-1, s]
        # |θ_{n+1} − θ_n|² = η²|u|² (update_sq is |u|², the full update) and the law of cosines
        step_sq = lr**2 * run.array("update_sq")[:-1, s]
        cos = (x[:-1] + x[1:] - step_sq) / (2 * np.sqrt(x[:-1] * x[1:]))
        np.testing.assert_allclose(run.array("angular_update")[:-1, s], np.arccos(np.clip(cos, -1, 1)), rtol=1e-5, atol=1e-9)
        power = 1.0 if name.startswith("sgd") else 0.5  # η/|θ|² for SGD, η/|θ| for Adam-style
        np.testing.assert_allclose(run.array("effective_lr")[:-1, s], lr / x[:-1] ** power, rtol=1e-14)
        assert np.isnan(run.array("angular_update")[:, ~s]).all()


def test_equilibrium_values(runs):
    for (name, net, _), run in runs.items():
        if net != "bn":
            continue
        s = run.groups.symmetry == "scale"
        eq = run.array("angular_update_eq")[:-1, s]
        lr, wd = run.array("lr")[:-1, s], run.array("weight_decay")[:-1, s]
        if name == "adam":  # coupled decay under a preconditioner: no §5.4 prediction
            assert np.isnan(eq).all() and np.isnan(run.array("effective_lr_eq")).all()
            continue
        if name == "adamw":
            expected = np.sqrt(2 * lr * wd * (1 - 0.8) / (1 + 0.8))
            norm_sq = lr * (run.array("drive")[:-1, s] / lr**2) * 1.8 / (2 * wd * 0.2)
            np.testing.assert_allclose(run.array("effective_lr_eq")[:-1, s], lr / np.sqrt(norm_sq), rtol=1e-12)
        else:
            beta = run.array("momentum")[:-1, s]
            d = np.where(beta > 0, run.array("dampening")[:-1, s], 0.0)
            expected = np.sqrt(2 * lr * wd * (1 - d) / (1 + beta))
            unit = run.array("grad_sq")[:-1, s] * run.array("measured")[:-1, s]
            norm_sq = np.sqrt(lr * (1 - d) * unit / (2 * wd * (1 - beta)))
            np.testing.assert_allclose(run.array("effective_lr_eq")[:-1, s], lr / norm_sq, rtol=1e-12)
        np.testing.assert_allclose(eq, expected, rtol=1e-14)


def test_no_equilibrium_without_weight_decay():
    run = tracked(bn_mlp(), lambda p: torch.optim.SGD(p, lr=0.05), steps=3)
    assert np.isnan(run.array("angular_update_eq")).all()
    assert np.isfinite(run.array("angular_update")[:-1, run.groups.symmetry == "scale"]).all()
    row = run.summary().set_index("symmetry").loc["scale"]
    assert row["equilibrium"].startswith("n/a: no equilibrium predicted") and math.isnan(row["equilibrium_step"])


def synthetic_scale_run(ratio: np.ndarray) -> Run:
    """Two scale groups of one layer whose measured angular update is ``ratio`` times the
    predicted one at each step (the effective lr exactly at its prediction)."""
    info = GroupInfo(symmetry=np.array(["scale"] * 2, dtype=object), layer=np.array(["bn"] * 2, dtype=object),
                     index=np.arange(2), label=np.array(["0", "1"], dtype=object), size=np.full(2, 4))
    run = Run(groups=info, optimizer="SGD", exact_kind="ledger")
    for n, r in enumerate(ratio):
        values = {c: np.ones(2) for c in COLUMNS}
        values.update(angular_update_eq=np.full(2, 0.01), angular_update=np.full(2, 0.01 * r), effective_lr=np.full(2, 0.2),
                      effective_lr_eq=np.full(2, 0.2))
        run.append(10 + n, 0.1 * n, values)
    return run


def test_equilibrium_is_reached_from_the_step_it_stays_within_tolerance():
    # the ratio relaxes to 1 and stays: reached once the trailing window is within tolerance
    n = 200
    ratio = 1 + 2.0 * np.exp(-np.arange(n) / 20)
    text, step = equilibrium_reached(synthetic_scale_run(ratio), "bn", window=5)
    first = int(np.argmax(np.sqrt(np.convolve(ratio**2, np.ones(5) / 5, "valid")) - 1 <= EQUILIBRIUM_TOLERANCE)) + 4
    assert step == 10 + first and text == f"reached (within 10%) at step {10 + first}, after {first} steps"
    # leaving the band again at the end: not reached, with the ratios at the last step
    ratio[-10:] = 1.5
    text, step = equilibrium_reached(synthetic_scale_run(ratio), "bn", window=5)
    assert text.startswith("not reached (within 10%): angular update 1.50×, effective lr 1.00×") and math.isnan(step)
    summary = synthetic_scale_run(np.ones(40)).summary()
    assert summary.equilibrium[0].startswith("reached (within 10%) at step 14") and summary.equilibrium_step[0] == 14


def test_real_run_summary_says_where_each_scale_layer_stands(runs):
    s = runs[("sgd_momentum", "bn", "float32")].summary()
    scale = s[s.symmetry == "scale"]
    assert len(scale) and all(t.startswith(("reached (within 10%)", "not reached (within 10%)")) for t in scale.equilibrium)
    assert (s[s.symmetry != "scale"].equilibrium == "").all()


def test_runs_saved_before_the_new_columns_load_them_as_nan(runs, tmp_path):
    run = runs[("adamw", "mlp", "float32")]
    path = run.save(tmp_path / "new.nmrun")
    meta, arrays = _native.load_run(str(path))
    old = tmp_path / "old.nmrun"
    _native.save_run(str(old), meta, [(k, v) for k, v in arrays if k not in ADDED_COLUMNS])
    back = nm.load_run(old)
    for c in ADDED_COLUMNS:
        assert back.array(c).shape == run.array(c).shape and np.isnan(back.array(c)).all()
    np.testing.assert_array_equal(back.array("measured"), run.array("measured"))
    assert len(back.summary()) == len(run.summary())
    # and a new file keeps every column
    again = nm.load_run(path)
    for c in ADDED_COLUMNS:
        np.testing.assert_array_equal(again.array(c), run.array(c))
    assert json.loads(meta)["kind"] == "neural-mechanics run"


def test_the_forecast_reads_the_recorded_angle_and_effective_lr(runs):
    from neural_mechanics.forecast import observed

    run = runs[("adamw", "bn", "float32")]
    s = run.groups.symmetry == "scale"
    for q in ("angular_update", "effective_lr"):
        np.testing.assert_array_equal(observed(run, q)[:-1, s], run.array(q)[:-1, s])
        assert np.isnan(observed(run, q)[:, ~s]).all()
