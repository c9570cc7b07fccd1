"""Verdicts per layer (neural_mechanics.verdicts), the one "no gradient" rule of verify and the
tracker, and what a run says about optimizers whose exact column is bookkeeping."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

import neural_mechanics as nm
from neural_mechanics import _native, plots, verdicts
from neural_mechanics.run import COLUMNS, STEP_COLUMNS, GroupInfo, Run

from helpers import bn_mlp, digits

X, Y = digits(flatten=True)


def synthetic(residuals: dict[tuple[str, str], float | None], *, optimizer="SGD", normalizer="BatchNorm", steps=20, exact_kind="", paper=True) -> Run:
    """A run with one layer per key (symmetry, layer) of four groups whose residual is the value
    at every step (None: no gradient), the other columns random."""
    keys = list(residuals)
    sym = np.array([k[0] for k in keys for _ in range(4)], dtype=object)
    info = GroupInfo(
        symmetry=sym,
        layer=np.array([k[1] for k in keys for _ in range(4)], dtype=object),
        index=np.tile(np.arange(4), len(keys)),
        label=np.array([f"g{i}" for i in range(4 * len(keys))], dtype=object),
        size=np.full(4 * len(keys), 3),
        normalizer=np.where(sym == "scale", normalizer, "").astype(object),
    )
    run = Run(groups=info, optimizer=optimizer, exact_kind=exact_kind)
    rng = np.random.default_rng(0)
    res = np.array([np.nan if v is None else v for v in residuals.values() for _ in range(4)])
    for n in range(steps):
        values = {c: rng.normal(size=len(info)) for c in STEP_COLUMNS}
        values["residual"] = res * rng.uniform(0.5, 1.5, size=len(info))
        if not paper:
            values["paper"] = np.full(len(info), np.nan)
        run.append(n, 0.05 * n, dict(values, lr=0.05, momentum=0.9, dampening=0.0, weight_decay=5e-4))
    return run


def verdict_of(run: Run) -> dict[str, str]:
    s = run.summary()
    return dict(zip(s.symmetry + " " + s.layer, s.verdict))


def test_each_verdict_and_its_threshold():
    run = synthetic({
        ("translation", "head"): 3e-5,  # rounding of a cancelling gradient: ok below 1e-4
        ("translation", "fc"): 3e-2,
        ("scale", "conv1"): 5e-6,  # above float32 rounding: BatchNorm's ε
        ("scale", "conv2"): 3e-7,
        ("scale", "conv3"): 0.2,
        ("rescale", "bn1"): 4e-8,
        ("rescale", "bn2"): 5e-5,  # a rescale group has no ε to blame
        ("translation", "conv1"): None,
    })
    assert verdict_of(run) == {
        "translation head": "ok", "translation fc": "violated", "scale conv1": "broken by BatchNorm ε", "scale conv2": "ok",
        "scale conv3": "violated", "rescale bn1": "ok", "rescale bn2": "violated", "translation conv1": "no gradient",
    }
    assert "≤ 0.0001" in verdicts.layer_verdict(run, "translation", "head").reason
    v = verdicts.layer_verdict(run, "scale", "conv1")
    assert v.verdict == "broken by BatchNorm ε" and f"{verdicts.ROUNDING:g}" in v.reason and f"{verdicts.EPS_MAX:g}" in v.reason
    assert "nothing to test" in verdicts.layer_verdict(run, "translation", "conv1").reason
    # a scale group that no normaliser makes (weight_norm, declared) is held to the plain bound
    plain = synthetic({("scale", "wn"): 5e-6}, normalizer="")
    assert verdict_of(plain) == {"scale wn": "ok"}


def test_a_single_slip_past_no_gradient_is_the_only_way_to_violated_and_partial_gradients_are_said():
    run = synthetic({("translation", "b"): None})
    residual = run._mem.cols["residual"]
    residual[3, 0] = 1.0  # one row of one single-entry group: what the old rule let through
    assert verdict_of(run) == {"translation b": "violated"}
    run = synthetic({("scale", "c"): 2e-6})
    run._mem.cols["residual"][:, 1] = np.nan
    assert "1 of 4 groups never had a gradient" in verdicts.layer_verdict(run, "scale", "c").reason


def test_bookkeeping_only_for_other_optimizers_unless_a_paper_prediction_exists():
    run = synthetic({("rescale", "0"): 4e-8, ("scale", "1"): 0.3}, optimizer="Adam", exact_kind="bookkeeping", paper=False)
    v = verdict_of(run)
    assert v == {"rescale 0": "bookkeeping only", "scale 1": "violated"}
    assert "no theory is tested" in verdicts.layer_verdict(run, "rescale", "0").reason
    assert (run.summary().regime == "n/a").all()
    # a run of an optimizer the beyond-SGD work gives a paper column: the symmetry verdict stands
    with_paper = synthetic({("rescale", "0"): 4e-8}, optimizer="Adam", exact_kind="bookkeeping", paper=True)
    assert verdict_of(with_paper) == {"rescale 0": "ok"}
    # runs saved before exact_kind existed: judged by the optimizer's name
    assert verdicts.exact_is_bookkeeping(synthetic({("rescale", "0"): 1e-8}, optimizer="AdamW"))
    assert not verdicts.exact_is_bookkeeping(synthetic({("rescale", "0"): 1e-8}))


def test_skip_reasons_are_counted_and_read_as_sentences():
    assert verdicts.skip_category("no scale or rescale group: a residual add (or a sum with another tensor) is not homogeneous per unit") == "residual add"
    assert verdicts.skip_category("read by embedding: no symmetry pattern applies") == "no symmetry pattern"
    assert verdicts.skip_category("something new: details") == "something new"
    assert verdicts.as_sentence("no scale/rescale: a; no bias translation: b") == "No scale/rescale: a. No bias translation: b."
    coverage = {"parameters": 3, "entries": 1000, "uncovered": {"a.weight": [10, "frozen (requires_grad=False)"], "b.bias": [5, "x; y"]}}
    line = verdicts.coverage_line(12, 2, coverage)
    assert line == "12 groups in 2 layers; 2 parameters (1.5% of weights) not covered: frozen (1), x (1)"
    assert verdicts.coverage_line(1, 1, {"parameters": 2, "entries": 9, "uncovered": {}}).endswith("every trainable parameter is covered (2 parameters)")


# -- one "no gradient" rule -----------------------------------------------------------------------
def bn_conv():
    torch.manual_seed(0)
    return nn.Sequential(nn.Conv2d(1, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU(), nn.Conv2d(8, 8, 3, padding=1), nn.BatchNorm2d(8),
                         nn.ReLU(), nn.Flatten(), nn.Linear(8 * 8 * 8, 10))


def test_tracker_and_verify_agree_on_no_gradient():
    x, y = nm.load_digits()
    x, y = x[:64], y[:64]
    model = bn_conv()
    sym = nm.find_symmetries(model, x)
    df = nm.verify(model, F.cross_entropy, (x, y), symmetries=sym)
    opt = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9)
    with nm.track(model, opt, sym) as tracker:
        loss = F.cross_entropy(model(x), y)
        opt.zero_grad()
        loss.backward()
        opt.step()
    row0 = tracker.run.array("residual")[0]
    assert list(np.isnan(row0)) == list(df.status == "no gradient")
    biases = (df.symmetry == "translation") & df.layer.isin(["0", "3"])  # the conv biases before BatchNorm
    assert biases.sum() == 16 and (df.status[biases] == "no gradient").all()
    finite = df.status != "no gradient"
    # the residuals themselves are rounding-level numbers, summed in a different order
    assert np.abs(row0[finite.to_numpy()] - df.residual[finite].to_numpy()).max() < 1e-6


def test_a_rounding_level_bias_gradient_is_no_gradient():
    """The vgg_bn conv1 case: a bias entry whose |ĝ|² is 5e-16 while its conv's is 3e-5 (from the
    demo's 1,500-step run) has no gradient under the layer rule (the old rule, relative to the
    model's mean entry, scored it as a violated group)."""
    plan = {
        "part_row_starts": np.arange(3, dtype=np.int64), "part_rows": np.arange(2, dtype=np.int64), "part_sign": np.ones(2),
        "part_column": np.arange(2, dtype=np.int64), "part_size": np.array([144.0, 1.0]), "column_group": np.arange(2, dtype=np.int64),
        "column_param_group": np.zeros(2, dtype=np.int64), "group_kind": np.array([1, 0], dtype=np.int64),
        "group_size": np.array([144.0, 1.0]), "group_layer": np.zeros(2, dtype=np.int64), "extra_rows": np.array([1], dtype=np.int64), "rows": 2,
    }  # fmt: skip
    core = _native.TrackerCore(plan, sgd=True, every=1)
    # per row: Σθ, Σθ², Σĝ, Σĝ², Σθĝ (the kernel's order)
    rows = np.array([[0.1, 0.4, 0.0, 2.65e-5, 1e-9], [0.01, 1e-4, 2.27e-8, 5.17e-16, 0.0]])
    out = np.full((len(COLUMNS), 2), np.nan)
    core.step_sgd(0, rows, None, [(0.05, 0.9, 0.0, 5e-4, False)], out)
    residual = out[list(COLUMNS).index("residual")]
    assert np.isfinite(residual[0]) and np.isnan(residual[1])
    # the same bias with a real gradient, 1e-9 of its layer's, is scored
    rows[1, 2:4] = 2.27e-7, 2.65e-14
    core2 = _native.TrackerCore(plan, sgd=True, every=1)
    core2.step_sgd(0, rows, None, [(0.05, 0.9, 0.0, 5e-4, False)], out)
    assert np.isfinite(out[list(COLUMNS).index("residual"), 1])


# -- optimizers whose exact column is bookkeeping ---------------------------------------------------
@pytest.fixture(scope="module")
def adam_run():
    model = bn_mlp()
    opt = torch.optim.Adam(model.parameters(), lr=1e-3, betas=(0.8, 0.99))
    g = torch.Generator().manual_seed(0)
    with nm.track(model, opt) as tracker:
        for _ in range(8):
            idx = torch.randint(0, len(X), (32,), generator=g)
            loss = F.cross_entropy(model(X[idx]), Y[idx])
            opt.zero_grad()
            loss.backward()
            opt.step()
    return tracker.run


def test_adam_shows_its_betas_and_no_momentum(adam_run, tmp_path):
    run = adam_run
    assert run.exact_kind == "bookkeeping"
    assert np.isnan(run.array("momentum")).all() and np.isnan(run.array("dampening")).all()
    assert np.isfinite(run.array("weight_decay")[:-1]).all()
    assert run.hyperparameters[0]["betas"] == [0.8, 0.99]
    assert "betas (0.8, 0.99)" in run.describe_optimizer()
    back = nm.load_run(run.save(tmp_path / "adam.nmrun"))
    assert back.describe_optimizer() == run.describe_optimizer() and np.isnan(back.array("momentum")).all()
    s = run.summary()
    # the paper's form applied to Adam's update is a prediction: the symmetry verdicts stand
    assert np.isfinite(run.array("paper")[:-1]).all()
    assert set(s.verdict) <= {"ok", "broken by BatchNorm ε", "no gradient", "violated"} and "ok" in set(s.verdict)
    assert all(n.startswith("the paper's form applied to the optimizer's update (Adam, coupled") for n in s.note if n)


def test_adam_figures_name_bookkeeping_and_the_paper_form_on_the_update(adam_run):
    fig = adam_run.plot_errors()
    ax = fig.axes[0]
    assert ax.get_title().startswith("Theory against measurement")
    labels = [t.get_text() for t in ax.get_legend().get_texts() if not t.get_text().startswith("lr step")]
    assert any("bookkeeping" in lab for lab in labels)
    paper = [lab for lab in labels if "paper" in lab]
    assert paper and all("optimizer's update" in lab for lab in paper)
    fig = adam_run.plot("rescale")
    labels = [t.get_text() for t in fig.axes[0].get_legend().get_texts()]
    assert any("optimizer's update" in lab for lab in labels) and any("bookkeeping" in lab for lab in labels)
    assert len(fig.axes[0].lines) == 3 * 8  # measured, paper and exact per group


def test_runs_saved_before_verdicts_still_load(tmp_path):
    """A file without the new metadata (labels, normalizers, coverage, hyperparameters, info)."""
    run = synthetic({("scale", "c"): 5e-6})
    meta = run._meta()
    for key in ("coverage", "hyperparameters", "exact_kind", "info"):
        meta.pop(key)
    for key in ("layer_label", "normalizer"):
        meta["groups"].pop(key)
    steps, time, cols = run._rows()
    path = str(tmp_path / "old.nmrun")
    _native.save_run(path, json.dumps(meta), [("steps", steps), ("time", time)] + [(c, np.ascontiguousarray(cols[c])) for c in COLUMNS])
    old = nm.load_run(path)
    assert old.groups.display("c") == "c" and old.coverage is None and old.exact_kind == ""
    assert verdict_of(old) == {"scale c": "ok"}  # no normaliser on record: the plain bound
    assert plots.plot_charges(old, "scale").axes[0].get_title()
