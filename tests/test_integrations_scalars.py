"""The shared per-layer scalars (integrations/scalars.py): the angular update and the effective
learning rate against the parameters themselves, the tracker's closure path (Lightning's
``optimizer.step(closure)``), and that ``import neural_mechanics`` imports no integration."""

from __future__ import annotations

import subprocess
import sys

import numpy as np
import pytest
import torch
import torch.nn.functional as F

import neural_mechanics as nm
from neural_mechanics.integrations.scalars import LayerIndex, RowWatcher, angular_update, effective_lr

from helpers import bn_mlp, digits, sgd


def _scale_rows(model: torch.nn.Module) -> np.ndarray:
    """θ_A of the scale groups of bn_mlp: row i of the first Linear (weight and bias), float64."""
    lin = model[0]
    return torch.cat([lin.weight, lin.bias[:, None]], dim=1).detach().double().numpy()


@pytest.mark.parametrize("optimizer", ["sgd", "adamw"])
def test_angular_update_and_effective_lr_are_those_of_the_parameters(optimizer):
    x, y = digits(flatten=True)
    model = bn_mlp((16,))
    opt = sgd()(model) if optimizer == "sgd" else torch.optim.AdamW(model.parameters(), lr=3e-3, weight_decay=0.05)
    g = torch.Generator().manual_seed(0)
    thetas = []
    with nm.track(model, opt) as tracker:
        view_rows = []
        tracker.observe(_Collect(view_rows))
        for _ in range(15):
            thetas.append(_scale_rows(model))
            idx = torch.randint(0, len(x), (32,), generator=g)
            opt.zero_grad()
            F.cross_entropy(model(x[idx]), y[idx]).backward()
            opt.step()
    thetas.append(_scale_rows(model))
    run = tracker.run
    scale = np.flatnonzero(run.groups.symmetry == "scale")
    measured = run.array("measured")[:, scale]
    np.testing.assert_allclose(measured, np.array([(t * t).sum(axis=1) for t in thetas]), rtol=1e-6)  # the mapping
    lr, usq = run.array("lr")[:, scale], run.array("update_sq")[:, scale]
    for n in range(15):
        a, b = thetas[n], thetas[n + 1]
        cos = (a * b).sum(1) / np.sqrt((a * a).sum(1) * (b * b).sum(1))
        truth = np.arctan2(np.sqrt(np.clip(1 - cos * cos, 0, None)), cos)
        got = angular_update(measured[n], measured[n + 1], usq[n], lr[n])
        np.testing.assert_allclose(got, truth, rtol=1e-5)  # measured: ≤ 5e-7
        assert (truth > 1e-5).all()  # the steps do turn the channels
    adam = optimizer == "adamw"
    np.testing.assert_allclose(effective_lr(lr, measured, adam), lr / (np.sqrt(measured) if adam else measured))
    # what the watcher reported at each row: the mean over the layer of the same angles
    for step, values in view_rows[1:]:
        expected = angular_update(measured[step - 1], measured[step], usq[step - 1], lr[step - 1]).mean()
        assert values["neural_mechanics/0/scale/angular_update"] == pytest.approx(expected, rel=1e-12)
        assert values["neural_mechanics/0/scale/effective_lr"] == pytest.approx(effective_lr(lr[step], measured[step], adam).mean(), rel=1e-12)


class _Collect:
    """An observer that keeps every row's scalars."""

    name = "collector"

    def __init__(self, out: list):
        self.out = out

    def start(self, run, watcher):
        pass

    def on_row(self, step, watcher):
        self.out.append((step, watcher.scalars()))

    def close(self, run, watcher):
        pass


def test_angular_update_is_stable_at_small_angles():
    rng = np.random.default_rng(0)
    a = rng.standard_normal((5, 100))
    turn = rng.standard_normal((5, 100)) * 1e-7
    b = a + turn
    lr = np.full(5, 0.1)
    usq = (turn * turn).sum(1) / lr**2
    ua = a / np.linalg.norm(a, axis=1, keepdims=True)
    ub = b / np.linalg.norm(b, axis=1, keepdims=True)
    truth = 2 * np.arctan2(np.linalg.norm(ua - ub, axis=1), np.linalg.norm(ua + ub, axis=1))  # Kahan's stable form
    got = angular_update((a * a).sum(1), (b * b).sum(1), usq, lr)
    np.testing.assert_allclose(got, truth, rtol=1e-3)
    assert (got > 0).all()


def test_layer_index_reduces_per_layer_and_symmetry():
    class G:
        layer = np.array(["b", "a", "b", "a", "b"], dtype=object)
        symmetry = np.array(["scale", "scale", "translation", "scale", "scale"], dtype=object)

    idx = LayerIndex.of(G)
    assert idx.keys == [("a", "scale"), ("b", "scale"), ("b", "translation")]
    v = np.array([1.0, 2.0, 10.0, np.nan, 3.0])
    np.testing.assert_allclose(idx.mean(v), [2.0, 2.0, 10.0])
    np.testing.assert_allclose(idx.max(v), [2.0, 3.0, 10.0])
    assert [list(p) for p in idx.split(np.arange(5.0))] == [[1.0, 3.0], [0.0, 4.0], [2.0]]
    np.testing.assert_array_equal(idx.scale, [0, 1, 3, 4])


def test_the_watcher_costs_little_per_row():
    """What every committed row pays once something observes the run: a few numpy calls."""
    import time

    from neural_mechanics.run import COLUMNS, GroupInfo

    n = 10_000
    groups = GroupInfo(
        symmetry=np.array(["scale", "translation"] * (n // 2), dtype=object),
        layer=np.array([f"l{i % 20}" for i in range(n)], dtype=object),
        index=np.arange(n),
        label=np.array([str(i) for i in range(n)], dtype=object),
        size=np.ones(n, dtype=np.int64),
    )
    w = RowWatcher(groups, "SGD")
    row = np.random.default_rng(0).random((len(COLUMNS), n))
    start = time.perf_counter()
    for step in range(200):
        w.update(step, 0.0, row)
    per_row = (time.perf_counter() - start) / 200
    assert per_row < 1e-3, per_row  # ~20-60 µs for 10⁴ groups on this project's CI machine
    assert len(w.scalars()) == 20 * 5 + 10 * 3


def test_closure_style_steps_are_measured_after_the_closure():
    """optimizer.step(closure) (Lightning's way): the tracker measures the gradient the closure
    makes, before the update; the run equals that of the plain loop."""
    x, y = digits(flatten=True)

    def train(style: str):
        model = bn_mlp((16,))
        opt = sgd()(model)
        g = torch.Generator().manual_seed(0)
        with nm.track(model, opt) as tracker:
            for _ in range(10):
                idx = torch.randint(0, len(x), (32,), generator=g)

                def closure(idx=idx):
                    opt.zero_grad()
                    loss = F.cross_entropy(model(x[idx]), y[idx])
                    loss.backward()
                    return loss

                if style == "plain":
                    closure()
                    opt.step()
                elif style == "positional":
                    opt.step(closure)
                else:
                    opt.step(closure=closure)
        return tracker.run

    plain = train("plain")
    for style in ("positional", "keyword"):
        run = train(style)
        for col in ("measured", "exact", "paper", "grad_sq", "flux"):
            np.testing.assert_array_equal(run.array(col), plain.array(col))
    assert plain.summary()["exact_max"].max() < 1e-5


def test_import_neural_mechanics_imports_no_integration():
    code = (
        "import sys, neural_mechanics as nm, neural_mechanics.integrations;"
        "heavy = {'torch', 'tensorboard', 'wandb', 'pytorch_lightning', 'lightning', 'transformers', 'polars', 'pyarrow', 'IPython', 'matplotlib'};"
        "print(sorted(heavy & set(sys.modules)))"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "[]"


def test_a_missing_extra_is_named():
    from neural_mechanics.errors import MissingDependencyError
    from neural_mechanics.integrations import require

    with pytest.raises(MissingDependencyError, match=r"pip install 'neural-mechanics\[dataframes\]'") as info:
        require("polars.no_such_module", "Run.to_polars")
    assert isinstance(info.value, ImportError)
