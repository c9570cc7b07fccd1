"""Plot API: Figures with labelled axes and the expected lines; pyplot's global state untouched."""

from __future__ import annotations

import matplotlib
import numpy as np
import pytest
import torch

from neural_mechanics import data_sources, equilibrium, models, plots, report
from neural_mechanics.errors import InvalidArgumentError, UnknownColumnError


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
        assert ax.get_xlabel() == plots.TIME_LABEL
    fig = run.plot("scale", "conv2", groups=None, x="step")
    assert len(fig.axes[0].lines) == 3 * 16 + 1 and fig.axes[0].get_xlabel() == "step"
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
    assert len(left.lines) == 2 * 4 + 1
    assert len(right.collections) == 3  # one scatter per scale layer
    table = report.equilibrium_table(run)
    assert len(table) == 64 and (table["predicted_norm_sq"] > 0).all()
    assert np.allclose(table["ratio"], table["final_norm_sq"] / table["predicted_norm_sq"])
    fig = plots.plot_effective_lr(run, groups=3)
    _axes_labelled(fig)
    assert len(fig.axes[0].lines) == 2 * 3 + 1
    assert report.equilibrium_table(runs["vgg"]).empty


def test_exact_dynamics_figure(runs):
    panels = report.exact_dynamics_panels(runs)
    assert [(sym, r is runs["vgg"]) for r, sym, _ in panels] == [("translation", False), ("scale", False), ("rescale", True)]
    fig = plots.plot_exact_dynamics(panels, groups=3)
    assert len(fig.axes) == 3
    assert [len(ax.lines) for ax in fig.axes] == [3 * 3 + 1] * 3
    assert all(ax.get_xlabel() and ax.get_ylabel() for ax in fig.axes)


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
