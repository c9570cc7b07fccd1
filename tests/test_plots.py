"""Plot API: Figures with labelled axes and the expected lines; pyplot's global state untouched."""

from __future__ import annotations

import matplotlib
import numpy as np
import pytest
import torch

from neural_mechanics import data_sources, equilibrium, models, plots, report
from neural_mechanics.errors import InvalidArgumentError, UnknownColumnError
from neural_mechanics.run import STEP_COLUMNS, GroupInfo, Run


@pytest.fixture(scope="module")
def runs():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # tiny models: one thread is fastest
    source = data_sources.digits()
    recipe = models.Recipe(steps=40)
    out = {name: models.train(name, source, recipe, progress=False).run for name in ("vgg_bn", "vgg")}
    torch.set_num_threads(threads)
    return out


@pytest.fixture(autouse=True)
def untouched_pyplot():
    """No backend change and no figure left in pyplot's registry by any plot function."""
    backend = matplotlib.get_backend()
    import matplotlib.pyplot as plt

    before = plt.get_fignums()
    yield
    assert matplotlib.get_backend() == backend
    assert plt.get_fignums() == before


def _axes_labelled(fig):
    for ax in fig.axes:
        assert ax.get_xlabel() and ax.get_ylabel() and ax.get_title(), ax
        assert ax.get_legend() is not None


def test_plot_charges_lines_and_labels(runs):
    run = runs["vgg_bn"]
    from matplotlib.figure import Figure

    for sym in ("translation", "scale", "rescale"):
        fig = plots.plot_charges(run, sym, groups=5)
        assert isinstance(fig, Figure)
        _axes_labelled(fig)
        ax = fig.axes[0]
        # measured + paper + exact per group, plus one grey line for the lr step
        assert len(ax.lines) == 3 * 5 + 1
        assert ax.get_xlabel() == plots.STEP_LABEL  # steps by default
        # theory lines carry markers, so that they stay visible where they lie on the measurement
        assert sum(line.get_marker() not in ("None", None, "") for line in ax.lines) == 2 * 5
        legend = " ".join(t.get_text() for t in ax.get_legend().get_texts())
        assert "paper closed form (error ≤" in legend and "exact ledger (error ≤" in legend
    fig = run.plot("scale", "conv2", groups=None, x="time")
    assert len(fig.axes[0].lines) == 3 * 16 + 1 and fig.axes[0].get_xlabel() == plots.TIME_LABEL
    assert "conv2 · Conv2d(16→16, 3×3)" in fig.axes[0].get_title() and "before BatchNorm" in fig.axes[0].get_title()
    assert plots.default_layer(run, "translation") == "classifier"
    with pytest.raises(ValueError):
        plots.plot_charges(runs["vgg"], "scale")


def test_plot_into_given_axes(runs):
    from matplotlib.figure import Figure

    fig = Figure()
    ax = fig.add_subplot()
    assert plots.plot_charges(runs["vgg"], "rescale", groups=2, ax=ax, theories=("exact",)) is fig
    assert len(ax.lines) == 2 * 2 + 1


def test_plot_errors(runs):
    fig = runs["vgg_bn"].plot_errors()
    _axes_labelled(fig)
    ax = fig.axes[0]
    assert ax.get_yscale() == "log"
    assert len(ax.lines) == 2 * 3 + 1  # exact and paper per symmetry, lr step
    fig = runs["vgg"].plot_errors()
    assert len(fig.axes[0].lines) == 2 * 2 + 1


def test_plot_residuals(runs):
    run = runs["vgg_bn"]
    fig = run.plot_residuals()
    _axes_labelled(fig)
    ax = fig.axes[0]
    assert ax.get_yscale() == "log"
    # one per (symmetry, layer) with a gradient: 3 scale + 3 rescale + classifier; the biases
    # before BatchNorm have none; plus the float32 reference line
    assert len(ax.lines) == 7 + 1
    assert "no gradient" in " ".join(t.get_text() for t in ax.get_legend().get_texts())


def test_plot_equilibrium_and_effective_lr(runs):
    run = runs["vgg_bn"]
    fig = plots.plot_equilibrium(run, groups=4)
    assert len(fig.axes) == 2
    _axes_labelled(fig)
    left, right = fig.axes
    assert len(left.lines) == 3 * 4 + 1  # measured, §5.4 relaxation, equilibrium per group; lr step
    assert len(right.lines) == 2 * 3 + 2  # two ratios per scale layer, y = 1, lr step
    assert left.get_xlabel() == right.get_xlabel() == plots.STEP_LABEL
    table = report.equilibrium_table(run)
    assert len(table) == 64 and (table["predicted_norm_sq"] > 0).all()
    assert np.allclose(table["ratio_relaxed"], table["final_norm_sq"] / table["relaxed_norm_sq"])
    assert np.allclose(table["ratio"], table["final_norm_sq"] / table["predicted_norm_sq"])
    fig = plots.plot_effective_lr(run, groups=3)
    _axes_labelled(fig)
    assert len(fig.axes[0].lines) == 2 * 3 + 1
    assert report.equilibrium_table(runs["vgg"]).empty


def synthetic(layers, steps=30, lr_drop=None):
    """A run with one layer per (symmetry, layer, group size, labels) entry, in that order, whose
    charges move; ``lr_drop``: the step from which the learning rate is ×0.1."""
    sym, lay, size, label = [], [], [], []
    for s_, l_, n_, labels in layers:
        for lab in labels:
            sym.append(s_)
            lay.append(l_)
            size.append(n_)
            label.append(lab)
    g = len(sym)
    info = GroupInfo(symmetry=np.array(sym, dtype=object), layer=np.array(lay, dtype=object), index=np.arange(g),
                     label=np.array(label, dtype=object), size=np.array(size))
    run = Run(groups=info, optimizer="SGD")
    rng = np.random.default_rng(1)
    for n in range(steps):
        values = {c: rng.normal(size=g) for c in STEP_COLUMNS}
        values["residual"] = np.abs(values["residual"]) * 10.0 ** rng.uniform(-8, -5, size=g)
        values["magnitude"] = np.ones(g)
        values["grad_sq"] = np.abs(values["grad_sq"])
        values["measured"] = values["paper"] = values["exact"] = np.full(g, 0.01 * n) + np.arange(g)
        lr = 0.005 if lr_drop is not None and n >= lr_drop else 0.05
        run.append(n, 0.05 * n, dict(values, lr=lr, momentum=0.9, dampening=0.0, weight_decay=5e-4))
    return run


def test_translation_panel_picks_the_classifier_feeding_the_loss():
    # a post-LN transformer's linear2: translation columns of d_model entries, before LayerNorm,
    # then a head of 10 classes: the head is the panel, and only it is "before softmax"
    run = synthetic([("translation", "enc.linear2", 32, [f"column {j}" for j in range(16)]), ("rescale", "enc.norm2", 40, ["unit 0", "unit 1"]),
                     ("translation", "head", 10, [f"column {j}" for j in range(32)] + ["bias"])])
    assert plots.default_layer(run, "translation") == "head"
    assert "before softmax" in run.plot("translation").axes[0].get_title()
    assert "softmax" not in run.plot("translation", "enc.linear2").axes[0].get_title()
    # no translation layer last: no claim about softmax
    run = synthetic([("translation", "a", 32, ["column 0", "column 1"]), ("rescale", "b", 4, ["unit 0"])])
    assert plots.default_layer(run, "translation") == "a" and "softmax" not in run.plot("translation").axes[0].get_title()


def test_legends_stay_legible_at_29_layers():
    kinds = ["scale"] * 20 + ["rescale"] * 8 + ["translation"]
    run = synthetic([(k, f"layer{i}", 9, ["unit 0", "unit 1"]) for i, k in enumerate(kinds)])
    ax = run.plot_residuals().axes[0]
    texts = [t.get_text() for t in ax.get_legend().get_texts()]
    assert len(texts) <= plots.LEGEND_MAX, texts
    assert {"scale: 19 more layers", "rescale: 7 more layers", "translation: layer28", "float32 ε"} <= set(texts), texts
    assert len(ax.lines) == 29 + 1  # every layer is still drawn, and the float32 line
    right = plots.plot_equilibrium(run).axes[1]  # 20 scale layers
    texts = [t.get_text() for t in right.get_legend().get_texts()]
    assert len(texts) <= plots.LEGEND_MAX and "14 more layers" in texts, texts
    assert len(right.lines) == 2 * 20 + 1


def test_one_x_axis_convention_and_the_lr_drop_keeps_its_steps():
    run = synthetic([("scale", "c", 9, ["unit 0", "unit 1"])], steps=40, lr_drop=30)
    for fig in (run.plot("scale"), run.plot_errors(), run.plot_residuals()):
        assert fig.axes[0].get_xlabel() == plots.STEP_LABEL
    ax = run.plot("scale").axes[0]
    lo, hi = ax.get_xlim()
    assert (hi - 30) / (hi - lo) > 0.2  # the last quarter of training keeps its share of the axis
    assert run.plot_errors(x="time").axes[0].get_xlabel() == plots.TIME_LABEL


def test_exact_dynamics_figure(runs):
    panels = report.exact_dynamics_panels(runs)
    assert [(sym, r is runs["vgg"]) for r, sym, _ in panels] == [("translation", False), ("scale", False), ("rescale", True)]
    fig = plots.plot_exact_dynamics(panels, groups=3)
    assert len(fig.axes) == 3
    assert [len(ax.lines) for ax in fig.axes] == [3 * 3 + 1] * 3
    assert all(ax.get_xlabel() and ax.get_ylabel() for ax in fig.axes)


def test_relaxation_follows_the_formula_and_starts_at_the_measured_norm(runs):
    # z = |θ|⁴ relaxes toward η(1−d)|g̃|²/(2λ(1−β)) at the rate 4ηλ(1−d)/(1−β) (docs/theory.md §5.4)
    run = runs["vgg_bn"]
    mask = run.groups.symmetry == "scale"
    relaxed = equilibrium.relaxation_series(run)[:, mask]
    x = run.array("measured")[:, mask]
    assert np.allclose(relaxed[0], x[0])
    lr, wd, beta = run.array("lr")[:-1, 0], run.array("weight_decay")[:-1, 0], run.array("momentum")[:-1, 0]
    unit = (run.array("grad_sq") * run.array("measured"))[:-1][:, mask]
    z = x[0] ** 2
    for n in range(len(lr)):
        rate = 4 * lr[n] * wd[n] / (1 - beta[n])
        z = z * np.exp(-rate) + (1 - np.exp(-rate)) * lr[n] * unit[n] / (2 * wd[n] * (1 - beta[n]))
    assert np.allclose(relaxed[-1], np.sqrt(z), rtol=1e-12)
    assert np.isnan(equilibrium.relaxation_series(runs["vgg"])).all()


def test_equilibrium_prediction_matches_theory_formula(runs):
    # |θ*|⁴ = η(1−d)E|g̃|²/(2λ(1−β)) with E|g̃|² = grad_sq·|θ|² (docs/theory.md §5.4)
    run = runs["vgg_bn"]
    table = report.equilibrium_table(run, window=1.0)
    start, last = report.last_phase(run)
    mask = run.groups.symmetry == "scale"
    unit = (run.array("grad_sq") * run.array("measured"))[start : last + 1][:, mask].mean(0)
    lr, wd, beta = run.array("lr")[last, 0], run.array("weight_decay")[last, 0], run.array("momentum")[last, 0]
    expected = np.sqrt(lr * unit / (2 * wd * (1 - beta)))
    assert np.allclose(table["predicted_norm_sq"], expected, rtol=1e-9)


def test_the_equilibrium_analysis_keeps_its_old_names_in_report(runs):
    for name in ("equilibrium_series", "equilibrium_table", "equilibrium_summary", "grad_sq_unit", "last_phase"):
        assert getattr(report, name) is getattr(equilibrium, name), name
    assert equilibrium.has_equilibrium(runs["vgg_bn"]) and not equilibrium.has_equilibrium(runs["vgg"])
    assert np.isnan(equilibrium.equilibrium_series(runs["vgg"])).all()


def test_bad_arguments_raise_library_errors(runs):
    run = runs["vgg_bn"]
    with pytest.raises(InvalidArgumentError):
        plots.plot_charges(run, "dilation")
    with pytest.raises(InvalidArgumentError):
        plots.plot_errors(run, x="epoch")
    with pytest.raises(InvalidArgumentError):
        plots.pick_groups(run, "scale", "classifier")
    with pytest.raises(InvalidArgumentError):
        plots.plot_exact_dynamics([])
    with pytest.raises(UnknownColumnError) as info:
        run.array("loss")
    assert isinstance(info.value, KeyError)
