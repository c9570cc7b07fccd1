"""nm.track(..., log_to=...): what TensorBoard and wandb receive, read back with their own readers
(tensorboard's EventAccumulator, wandb's offline transaction log through ``wandb leet inspect``)
and checked against the finished run (tests/integration_reference.py)."""

from __future__ import annotations

import json
import subprocess
import sys
import warnings
from pathlib import Path

import numpy as np
import pytest
import torch

import neural_mechanics as nm
from neural_mechanics.errors import InvalidArgumentError

from helpers import bn_mlp, digits, sgd, train_steps
from integration_reference import expected_scalars

pytest.importorskip("tensorboard")
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator  # noqa: E402
from torch.utils.tensorboard import SummaryWriter  # noqa: E402

STEPS, EVERY = 35, 10
FIGURES = {"charges_translation", "charges_scale", "charges_rescale", "errors", "residuals", "equilibrium"}


def _train(log_to, steps: int = STEPS, **kw):
    x, y = digits(flatten=True)
    model = bn_mlp((16,))
    opt = sgd()(model)
    with nm.track(model, opt, log_to=log_to, log_every=EVERY, **kw) as tracker:
        train_steps(model, opt, x, y, steps)
    return tracker.run


def _events(folder: Path) -> EventAccumulator:
    acc = EventAccumulator(str(folder), size_guidance={"scalars": 0, "images": 0, "tensors": 0, "histograms": 0})
    acc.Reload()
    return acc


@pytest.fixture(scope="module")
def tensorboard_run(tmp_path_factory):
    folder = tmp_path_factory.mktemp("tb")
    writer = SummaryWriter(str(folder))
    run = _train(writer)
    writer.close()
    return run, _events(folder)


def test_tensorboard_scalars_are_the_run(tensorboard_run):
    run, acc = tensorboard_run
    logged: dict[int, dict[str, float]] = {}
    for tag in acc.Tags()["scalars"]:
        assert tag.startswith("neural_mechanics/") and tag.count("/") == 3, tag
        for event in acc.Scalars(tag):
            logged.setdefault(event.step, {})[tag] = event.value
    assert sorted(logged) == [0, 10, 20, 30]  # every log_every steps, nothing in between
    for step, values in logged.items():
        expected = expected_scalars(run, step)
        assert set(values) == set(expected), step
        for tag, value in values.items():  # TensorBoard stores float32
            assert value == pytest.approx(expected[tag], rel=2e-6, abs=1e-12), (step, tag)
    quantities = {tag.rsplit("/", 1)[1] for tag in acc.Tags()["scalars"]}
    assert quantities == {"charge_mean", "charge_std", "error_paper", "error_exact", "residual_max", "norm", "effective_lr", "angular_update"}
    # scale-only quantities only on scale layers
    assert all("/scale/" in t for t in acc.Tags()["scalars"] if t.endswith(("norm", "effective_lr", "angular_update")))


def test_tensorboard_gets_the_summary_and_figures_at_close_and_no_histograms(tensorboard_run):
    run, acc = tensorboard_run
    tags = acc.Tags()
    assert {t.rsplit("/", 1)[1] for t in tags["images"]} == FIGURES
    final = int(run.step_index[-1])
    assert all(acc.Images(t)[0].step == final for t in tags["images"])
    assert any("summary" in t for t in tags["tensors"])  # add_text is a text-plugin tensor
    text = acc.Tensors(next(t for t in tags["tensors"] if "summary" in t))[0].tensor_proto.string_val[0].decode()
    assert "exact_max" in text and "scale" in text
    assert not tags["histograms"]


def test_histograms_only_when_asked(tmp_path):
    writer = SummaryWriter(str(tmp_path))
    run = _train(writer, steps=12, log_histograms=True, log_figures=False)
    writer.close()
    acc = _events(tmp_path)
    hist = acc.Tags()["histograms"]
    assert "neural_mechanics/0/scale/charge" in hist and len(hist) == len(set(zip(run.groups.layer, run.groups.symmetry)))
    assert [h.step for h in acc.Histograms("neural_mechanics/0/scale/charge")] == [0, 10]
    assert acc.Histograms("neural_mechanics/0/scale/charge")[0].histogram_value.num == (run.groups.symmetry == "scale").sum()
    assert not acc.Tags()["images"]


# -- wandb ---------------------------------------------------------------------------------------
@pytest.fixture
def offline_wandb(tmp_path, monkeypatch):
    wandb = pytest.importorskip("wandb")
    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setenv("WANDB_SILENT", "true")
    monkeypatch.setenv("WANDB_DIR", str(tmp_path))
    monkeypatch.setenv("WANDB_CONSOLE", "off")
    return wandb


def wandb_history(run_dir: Path) -> list[dict]:
    """The history rows of an offline run, read by wandb's own reader of its transaction log."""
    log = next(run_dir.glob("run-*.wandb"))
    out = subprocess.run([sys.executable, "-m", "wandb", "leet", "inspect", "--json", str(log)], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr[-2000:]
    records = [json.loads(line) for line in out.stdout.splitlines() if line.startswith("{")]
    return [r["history"]["item"] for r in records if r.get("type") == "history"]


def test_wandb_history_is_the_run(offline_wandb, tmp_path):
    wandb = offline_wandb
    wb = wandb.init(project="neural-mechanics-test", dir=str(tmp_path))
    run = _train("wandb")  # the current wandb.run
    run_dir = Path(wb.dir).parent
    wb.finish()
    history = wandb_history(run_dir)
    scalar_rows = [h for h in history if any(k.endswith("charge_mean") for k in h)]
    assert [h["neural_mechanics/step"] for h in scalar_rows] == [0, 10, 20, 30]
    for h in scalar_rows:
        step = int(h["neural_mechanics/step"])
        expected = expected_scalars(run, step)
        got = {k: v for k, v in h.items() if k.startswith("neural_mechanics/") and k != "neural_mechanics/step"}
        assert set(got) == set(expected), step
        for k, v in got.items():
            assert v == pytest.approx(expected[k], rel=1e-12, abs=1e-300), (step, k)
    # media are history entries flattened as "<key>._type", "<key>.path", ...
    at_close = [h for h in history if any(k.startswith(("neural_mechanics/figures/", "neural_mechanics/summary.")) for k in h)]
    keys = {k.split(".", 1)[0] for h in at_close for k in h if k.startswith("neural_mechanics/")}
    assert "neural_mechanics/summary" in keys and {f"neural_mechanics/figures/{f}" for f in FIGURES} <= keys
    assert all(h["neural_mechanics/step"] == int(run.step_index[-1]) for h in at_close)


def test_a_failing_sink_is_dropped_with_one_note_and_training_goes_on(offline_wandb, tmp_path):
    """A wandb run finished in the middle of training makes every later log call raise: the
    tracker keeps training and keeps logging to the other sink."""
    wandb = offline_wandb
    wb = wandb.init(project="neural-mechanics-test", dir=str(tmp_path / "wb"))
    writer = SummaryWriter(str(tmp_path / "tb"))
    x, y = digits(flatten=True)
    model = bn_mlp((16,))
    opt = sgd()(model)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        with nm.track(model, opt, log_to=[wb, writer], log_every=5, log_figures=False) as tracker:
            train_steps(model, opt, x, y, 8)
            wb.finish()  # from now on wb.log raises wandb's UsageError
            train_steps(model, opt, x, y, 12)
    writer.close()
    run = tracker.run
    notes = [n for n in run.notes if "wandb run" in n]
    assert len(notes) == 1 and "UsageError" in notes[0] and "step 10" in notes[0]
    assert sum("wandb run" in str(w.message) for w in caught) == 1
    assert len(run.step_index) == 21  # every step tracked
    steps = [e.step for e in _events(tmp_path / "tb").Scalars("neural_mechanics/0/scale/charge_mean")]
    assert steps == [0, 5, 10, 15]


def test_log_to_is_checked(offline_wandb):
    model = bn_mlp((8,))
    opt = sgd()(model)
    with pytest.raises(InvalidArgumentError, match="cannot log to"):
        nm.track(model, opt, log_to=object())
    with pytest.raises(InvalidArgumentError, match="unknown destination"):
        nm.track(model, opt, log_to="mlflow")
    with pytest.raises(InvalidArgumentError, match="log_every"):
        nm.track(model, opt, log_to="tensorboard", log_every=0)
    assert offline_wandb.run is None
    with pytest.raises(InvalidArgumentError, match="wandb.init"):
        nm.track(model, opt, log_to="wandb")
    with pytest.raises(InvalidArgumentError, match="empty"):
        nm.track(model, opt, log_to=[])


def test_no_logger_no_observer():
    """Without log_to or live(), nothing is called after a row: the tracked step is what it was."""
    x, y = digits(flatten=True)
    model = bn_mlp((8,))
    opt = sgd()(model)
    with nm.track(model, opt) as tracker:
        train_steps(model, opt, x, y, 2)
        assert tracker._observers is None and tracker._path.on_row is None
    assert np.isfinite(tracker.run.array("measured")).all()
    assert torch.is_tensor(x)
