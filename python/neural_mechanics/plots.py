"""Paper-style figures of a :class:`~neural_mechanics.Run`; every function returns a Figure.

Figures are made with ``matplotlib.figure.Figure`` directly, never through pyplot: nothing
changes the global backend, no figure lands in pyplot's registry (so none leaks in a long
session), and no function calls ``show()``. In a notebook, display the returned figure (it is
the cell's value, or ``display(fig)``); elsewhere ``fig.savefig("name.png")``. Pass ``ax=`` to
draw into an axes of your own figure instead.

This is the only module of the package that imports matplotlib.

A run is read through its public methods (``array``, ``groups``, ``errors``, ...), duck-typed:
this module never imports ``run``, not even lazily, because ``Run.plot`` and its siblings import
this module at call time. What it draws it takes from ``equilibrium`` (the §5.4 analysis);
``report`` imports this module, never the other way round.
"""

from __future__ import annotations

import textwrap
from typing import Any

import numpy as np

from .equilibrium import equilibrium_series, relaxation_series
from .errors import InvalidArgumentError
from .forecast import QUANTITIES, observed, panel_forecasts
from .verdicts import exact_is_bookkeeping, layer_verdict

# The x axis of every figure: the optimizer step (the default), or on request the model time of
# the closed forms (x="time"), on which a learning-rate drop squeezes the rest of training.
STEP_LABEL = "step"
TIME_LABEL = "time t = Σ η(1−d)"
DEFAULT_X = "step"
# At most this many entries in a legend of layers; past it the least informative layers are
# drawn thin and named together ("scale: 19 more layers").
LEGEND_MAX = 10
# Theory lines carry a marker about this many times along the run, so that a prediction lying
# on the measured line stays visible.
MARKERS_PER_LINE = 12

SYMMETRY_TITLE = {
    "translation": "Translation",
    "scale": "Scale",
    "rescale": "Rescale",
}
CHARGE_LABEL = {
    "translation": "column sum  q = ⟨θ_A, 1⟩",
    "scale": "squared norm  x = |θ_A|²",
    "rescale": "Δ = |θ_in|² − |θ_out|²",
}
CHARGE_WHAT = {
    "translation": "column sums of {layer}",
    "scale": "squared channel norms of {layer}",
    "rescale": "incoming − outgoing squared norms around {layer}",
}
SYMMETRY_COLOR = {"translation": "tab:blue", "scale": "tab:orange", "rescale": "tab:green"}
# Errors are drawn on a log axis; an exact zero (row 0 of every theory) sits at this floor.
LOG_FLOOR = 1e-17


def _new_axes(ax: Any, figsize: tuple[float, float] = (6.4, 4.2)) -> tuple[Any, Any]:
    """(figure, axes): the caller's axes, or a fresh pyplot-free Figure with one axes."""
    if ax is not None:
        return ax.figure, ax
    from matplotlib.figure import Figure

    fig = Figure(figsize=figsize, layout="constrained")
    return fig, fig.add_subplot()


def new_figure(ncols: int = 1, nrows: int = 1, *, width: float = 5.2, height: float = 4.0) -> tuple[Any, Any]:
    """A pyplot-free Figure with a grid of axes (an array, squeezed like plt.subplots)."""
    from matplotlib.figure import Figure

    fig = Figure(figsize=(width * ncols, height * nrows), layout="constrained")
    return fig, fig.subplots(nrows, ncols, squeeze=True)


def _xaxis(run: Any, x: str) -> tuple[np.ndarray, str]:
    if x == "step":
        return run.step_index.astype(float), STEP_LABEL
    if x == "time":
        return run.time_index, TIME_LABEL
    raise InvalidArgumentError(f"x must be 'step' or 'time', got {x!r}")


def layers_of(run: Any, symmetry: str) -> list[str]:
    """The layers carrying ``symmetry`` in ``run``, in the order the tracker found them."""
    g = run.groups
    return list(dict.fromkeys(g.layer[g.symmetry == symmetry]))


def layer_name(run: Any, layer: str) -> str:
    """How figures name a layer: "7 · Linear(32→10)" when the run knows its module."""
    display = getattr(run.groups, "display", None)
    return display(layer) if display is not None else str(layer)


def classifier_layer(run: Any) -> str | None:
    """The translation layer that feeds the loss, if the run shows one: the last layer of the
    run (in the order the groups were found, which follows the data) when it carries
    translation groups, e.g. a classifier's Linear before softmax/cross-entropy; None otherwise."""
    g = run.groups
    if not len(g):
        return None
    last = g.layer[-1]
    return str(last) if ((g.layer == last) & (g.symmetry == "translation")).any() else None


def default_layer(run: Any, symmetry: str) -> str:
    """The layer a figure shows when none is named: for translation the classifier feeding the
    loss (:func:`classifier_layer`), else the last translation layer; otherwise the first
    layer with the symmetry."""
    layers = layers_of(run, symmetry)
    if not layers:
        present = sorted(set(run.groups.symmetry))
        raise InvalidArgumentError(f"the run has no {symmetry!r} groups (it has {present})")
    if symmetry != "translation":
        return layers[0]
    return classifier_layer(run) or layers[-1]


def charge_what(run: Any, symmetry: str, layer: str) -> tuple[str, str]:
    """What a panel of ``layer`` shows, in words, and where the symmetry comes from (empty when
    the run does not show it): ("column sums of 7 · Linear(32→10)", "before softmax")."""
    what = CHARGE_WHAT[symmetry].format(layer=layer_name(run, layer))
    g = run.groups
    mask = (g.symmetry == symmetry) & (g.layer == layer)
    if symmetry == "translation":
        if layer == classifier_layer(run):
            return what, "before softmax"
        labels = [str(x) for x in g.label[mask]]
        if labels and all(lab.startswith("bias") for lab in labels):
            return f"bias sums of {layer_name(run, layer)}", ""
        return what, ""
    if symmetry == "scale":
        norms = [str(n) for n in getattr(g, "normalizer", np.full(len(g), ""))[mask] if n]
        return what, (f"before {norms[0]}" if norms else "")
    return what, ""


def pick_groups(run: Any, symmetry: str, layer: str, groups: int | None = 8) -> np.ndarray:
    """Indices (into run.groups) of at most ``groups`` groups of one layer: those whose charge
    moved most over the run (the most informative to draw), in their original order."""
    g = run.groups
    idx = np.flatnonzero((g.symmetry == symmetry) & (g.layer == layer))
    if not len(idx):
        raise InvalidArgumentError(f"no {symmetry!r} groups in layer {layer!r}; layers with it: {layers_of(run, symmetry)}")
    if groups is None or len(idx) <= groups:
        return idx
    measured = run.array("measured")[:, idx]
    moved = np.nanmax(measured, axis=0) - np.nanmin(measured, axis=0)
    keep = np.sort(np.argsort(-np.nan_to_num(moved, nan=-np.inf), kind="stable")[:groups])
    return idx[keep]


def _lr_changes(run: Any, xs: np.ndarray) -> list[tuple[float, float, float]]:
    """(x, old lr, new lr) wherever the learning rate of the first group changes."""
    lr = run.array("lr")[:, 0]
    out = []
    for i in range(1, len(lr)):
        if np.isfinite(lr[i]) and np.isfinite(lr[i - 1]) and lr[i] != lr[i - 1]:
            out.append((float(xs[i]), float(lr[i - 1]), float(lr[i])))
    return out


def _mark_lr_changes(ax: Any, run: Any, xs: np.ndarray) -> int:
    """A grey vertical line at each learning-rate change, labelled once; returns how many."""
    changes = _lr_changes(run, xs)
    for k, (x, old, new) in enumerate(changes):
        ax.axvline(x, color="0.6", lw=1.0, ls="-", zorder=0, label=f"lr step ({old:g} → {new:g})" if k == 0 else None)
    return len(changes)


def plot_charges(
    run: Any,
    symmetry: str,
    layer: str | None = None,
    groups: int | None = 8,
    ax: Any = None,
    *,
    x: str = DEFAULT_X,
    theories: tuple[str, ...] = ("paper", "exact"),
    title: str | None = None,
    legend: bool = True,
) -> Any:
    """Measured charges (solid) against the paper's closed form (dashed with open circles, same
    colour) and the exact ledger (black dotted with crosses) for one layer; a Figure.

    ``layer``: default :func:`default_layer` (for translation, the classifier feeding the loss);
    ``groups``: the maximum number of groups drawn (those that moved most), None for all; ``x``:
    "step" or "time" (t = Σ η(1−d)). A theory that is NaN throughout (``paper`` for groups in
    param_groups with different hyperparameters) is neither drawn nor in the legend; the legend gives each drawn theory's
    largest error over the groups drawn, and the title the layer's verdict (module
    ``verdicts``). The markers keep a theory visible where it lies on the measured line.
    Lines drawn: 1 per group plus 1 per group and drawn theory, plus one grey line per
    learning-rate change.
    """
    if symmetry not in SYMMETRY_TITLE:
        raise InvalidArgumentError(f"symmetry must be one of {sorted(SYMMETRY_TITLE)}, got {symmetry!r}")
    layer = default_layer(run, symmetry) if layer is None else layer
    idx = pick_groups(run, symmetry, layer, groups)
    fig, ax = _new_axes(ax)
    xs, xlabel = _xaxis(run, x)
    measured = run.array("measured")[:, idx]
    cols = {t: run.array(t)[:, idx] for t in theories}
    drawn = tuple(t for t in theories if np.isfinite(cols[t]).any())
    colors = _colors(len(idx))
    every = max(1, len(xs) // MARKERS_PER_LINE)
    for j in range(len(idx)):
        ax.plot(xs, measured[:, j], color=colors[j], lw=1.6, zorder=2)
        if "paper" in drawn:
            ax.plot(xs, cols["paper"][:, j], color=colors[j], lw=1.1, ls=(0, (4, 2)), marker="o", ms=3.5, mfc="none",
                    markevery=(j % every, every), zorder=3)
        if "exact" in drawn:
            ax.plot(xs, cols["exact"][:, j], color="k", lw=0.8, ls=(0, (1, 2)), marker="x", ms=3,
                    markevery=((j + every // 2) % every, every), zorder=4)
    _mark_lr_changes(ax, run, xs)
    ax.set_xlabel(xlabel)
    ax.set_ylabel(CHARGE_LABEL[symmetry])
    n_all = int(((run.groups.symmetry == symmetry) & (run.groups.layer == layer)).sum())
    shown = f"{len(idx)} of {n_all} groups" if len(idx) < n_all else f"{n_all} groups"
    verdict = layer_verdict(run, symmetry, layer).verdict
    what, where = charge_what(run, symmetry, layer)
    ax.set_title(title or f"{SYMMETRY_TITLE[symmetry]}: {what}\n({'; '.join(x for x in (where, shown, verdict) if x)})", fontsize=10)
    if legend:
        errors = {t: _nan_max(np.abs(cols[t] - measured) / _magnitude(run, idx)) for t in drawn}
        _style_legend(ax, drawn, errors, bookkeeping=exact_is_bookkeeping(run))
    ax.grid(alpha=0.25)
    return fig


def _magnitude(run: Any, idx: np.ndarray) -> np.ndarray:
    scale = np.nanmax(np.abs(run.array("magnitude")[:, idx]), axis=0)
    return np.where(np.isfinite(scale) & (scale > 0), scale, 1.0)


def _nan_max(a: np.ndarray) -> float:
    finite = a[np.isfinite(a)]
    return float(finite.max()) if finite.size else float("nan")


def _colors(n: int) -> list[Any]:
    from matplotlib import colormaps

    cmap = colormaps["viridis"]
    return [cmap(0.9 * k / max(n - 1, 1)) for k in range(n)]


def _theory_name(theory: str, bookkeeping: bool) -> str:
    if theory == "paper":
        # Any optimizer but torch.optim.SGD: the paper's form driven by its update (docs/theory.md §5.5).
        return "paper's form on the optimizer's update" if bookkeeping else "paper closed form"
    return "exact: measured update re-added (bookkeeping)" if bookkeeping else "exact ledger"


def _style_legend(ax: Any, theories: tuple[str, ...], errors: dict[str, float] | None = None, *, bookkeeping: bool = False) -> None:
    """One legend entry per line style (not per group): measured / each drawn theory (with its
    largest error) / lr step."""
    from matplotlib.lines import Line2D

    errors = errors or {}

    def name(t: str) -> str:
        e = errors.get(t, float("nan"))
        return _theory_name(t, bookkeeping) + (f" (error ≤ {e:.0e})" if np.isfinite(e) else "")

    handles = [Line2D([], [], color="0.3", lw=1.6, label="measured")]
    if "paper" in theories:
        handles.append(Line2D([], [], color="0.3", lw=1.1, ls=(0, (4, 2)), marker="o", ms=3.5, mfc="none", label=name("paper")))
    if "exact" in theories:
        handles.append(Line2D([], [], color="k", lw=0.8, ls=(0, (1, 2)), marker="x", ms=3, label=name("exact")))
    existing, labels = ax.get_legend_handles_labels()
    handles += [h for h, lab in zip(existing, labels) if lab.startswith("lr step")]
    ax.legend(handles=handles, fontsize=8, loc="best", framealpha=0.85)


def plot_exact_dynamics(panels: list[tuple[Any, str, str | None]], *, groups: int = 8, x: str = DEFAULT_X, suptitle: str | None = None) -> Any:
    """The paper's "exact dynamics" figure: one panel per ``(run, symmetry, layer)``, measured
    solid, theories dashed/dotted; a Figure."""
    if not panels:
        raise InvalidArgumentError("no panels to draw")
    fig, axes = new_figure(len(panels), 1, width=4.8, height=3.9)
    axes = np.atleast_1d(axes)
    for k, (ax, (run, symmetry, layer)) in enumerate(zip(axes, panels)):
        plot_charges(run, symmetry, layer, groups=groups, ax=ax, x=x, legend=(k == 0))
        first, _, rest = ax.get_title().partition("\n")
        ax.set_title("\n".join(textwrap.wrap(f"({chr(97 + k)}) {first}", 48)) + "\n" + rest, fontsize=9.5)
    if suptitle:
        fig.suptitle(suptitle, fontsize=11)
    return fig


def plot_errors(run: Any, ax: Any = None, *, x: str = DEFAULT_X, title: str | None = None) -> Any:
    """Error of the exact ledger (solid) and of the paper's closed form (dashed) over the steps,
    the maximum over the groups of each symmetry, log scale; a Figure.

    Error = |prediction − measured| / (max over the run of the group's magnitude). Lines drawn:
    one per symmetry and theory that has a value (for optimizers other than SGD ``paper`` is the
    paper's form on their update, docs/theory.md §5.5), plus one grey line per learning-rate
    change. For such optimizers ``exact`` only re-adds the measured update: without a ``paper``
    line the figure then says it is a bookkeeping check, not a test of
    a theory.
    """
    fig, ax = _new_axes(ax)
    xs, xlabel = _xaxis(run, x)
    bookkeeping = exact_is_bookkeeping(run)
    # Row 0 is the common starting point (error 0 by construction): start at row 1 so the log
    # axis spans the errors that mean something.
    xs = xs[1:]
    drawn = set()
    for which, ls in (("exact", "-"), ("paper", (0, (4, 2)))):
        err = run.errors(which)[1:]
        for sym in SYMMETRY_TITLE:
            mask = run.groups.symmetry == sym
            if not mask.any() or not np.isfinite(err[:, mask]).any():
                continue
            drawn.add(which)
            finite = np.where(np.isfinite(err[:, mask]), err[:, mask], -np.inf)
            worst = finite.max(axis=1)
            worst[worst == -np.inf] = np.nan  # a step where no group of the symmetry has an error
            ax.plot(xs, np.maximum(worst, LOG_FLOOR), color=SYMMETRY_COLOR[sym], ls=ls, lw=1.4, label=f"{_theory_name(which, bookkeeping)}, {sym}")
            if getattr(run, "thinned", False):
                _every_step_errors(ax, run, which, sym, x, ls)
    _mark_lr_changes(ax, run, np.concatenate([[np.nan], xs]))
    ax.set_yscale("log")
    ax.set_xlabel(xlabel)
    ax.set_ylabel("max relative error over groups")
    if title is None:
        if bookkeeping and "paper" not in drawn:
            title = (f"Bookkeeping check, not a theory test: {run.optimizer or 'this optimizer'}'s measured update\n"
                     "re-added to the charges agrees to rounding, predicting nothing; worst group per step")
        else:
            title = "Theory against measurement: worst group at each step"
    ax.set_title(title, fontsize=10)
    ax.grid(alpha=0.25, which="major")
    ax.legend(fontsize=8, loc="best", framealpha=0.85)
    return fig


def _every_step_errors(ax: Any, run: Any, which: str, sym: str, x: str, ls: Any) -> None:
    """On a run whose per-group rows were thinned (``max_bytes``): the worst error of every
    recorded step, from the per-layer aggregates (divided by each group's magnitude so far, so at
    least the error of the stored rows; docs/tracking.md, "Storage"), drawn thin behind."""
    steps = run.layer_step_index
    xs = steps.astype(float) if x == "step" else run.layer_time_index
    pairs = run.layers.symmetry == sym
    with _quiet_nan_warnings(), np.errstate(all="ignore"):
        worst = np.nanmax(run.layer_array(f"{which}_error_max")[:, pairs], axis=1)
    ax.plot(xs[1:], np.maximum(worst[1:], LOG_FLOOR), color=SYMMETRY_COLOR[sym], ls=ls, lw=0.6, alpha=0.5, label="_nolegend_")


# Residuals are noisy step to step: long runs are drawn as at most this many bins.
RESIDUAL_BINS = 150


def plot_residuals(run: Any, ax: Any = None, *, x: str = DEFAULT_X, title: str | None = None) -> Any:
    """Gradient-constraint residuals per layer (docs/theory.md §3): the median over the layer's groups
    (line) and the band between its 10th and 90th percentiles, log scale; a Figure.

    ~1e-7 is a symmetry holding to float32 precision; O(1) is no symmetry. Groups with no
    gradient (the rule of §3: NaN in the run's ``residual`` column, e.g. a bias before
    BatchNorm) prove nothing and are left out; layers with nothing left are listed in the
    legend. Runs longer than ``RESIDUAL_BINS`` steps are drawn in bins of consecutive steps.
    One line per (symmetry, layer) with a gradient, plus the float32 reference line. Past
    ``LEGEND_MAX`` layers, the layers with the largest residuals of each symmetry are named and
    the others drawn thin in their symmetry's colour, named together.
    """
    fig, ax = _new_axes(ax, figsize=(7.2, 4.2))
    xs, xlabel = _xaxis(run, x)
    # The last row is the final state, with no step and so no residual.
    xs, res = xs[:-1], run.array("residual")[:-1]
    bins = np.array_split(np.arange(len(xs)), min(len(xs), RESIDUAL_BINS)) if len(xs) else []
    bx = np.array([xs[b].mean() for b in bins])
    keys = list(dict.fromkeys(zip(run.groups.symmetry, run.groups.layer)))
    styles = {"translation": "-", "scale": "--", "rescale": "-."}
    no_gradient, curves = [], []
    for sym, layer in keys:
        mask = (run.groups.symmetry == sym) & (run.groups.layer == layer)
        r = res[:, mask]
        if not np.isfinite(r).any():
            no_gradient.append(f"{sym} {layer_name(run, layer)}")
            continue
        with np.errstate(all="ignore"), _quiet_nan_warnings():
            stats = np.array([np.nanpercentile(r[b], [10, 50, 90]) for b in bins])
            typical = float(np.nanmedian(r))
        curves.append((sym, layer, typical, [np.maximum(stats[:, i], LOG_FLOOR) for i in range(3)]))
    named = _named_curves(curves)
    palette = _colors(len(named))
    others: dict[str, int] = {}
    for sym, layer, _, (lo, med, hi) in curves:
        if (sym, layer) in named:
            color = palette[named.index((sym, layer))]
            ax.plot(bx, med, color=color, ls=styles.get(sym, "-"), lw=1.4, label=f"{sym}: {layer_name(run, layer)}")
            ax.fill_between(bx, lo, hi, color=color, alpha=0.12, lw=0)
        else:
            others[sym] = others.get(sym, 0) + 1  # named together in the legend below
            ax.plot(bx, med, color=SYMMETRY_COLOR[sym], ls=styles.get(sym, "-"), lw=0.7, alpha=0.45, label="_nolegend_")
    ax.axhline(1.2e-7, color="0.5", lw=0.8, ls=":", label="float32 ε")
    ax.set_yscale("log")
    ax.set_xlabel(xlabel)
    ax.set_ylabel("constraint residual |⟨ĝ, generator⟩| / norms")
    binned = f", bins of {len(xs) // len(bins)} steps" if len(bins) and len(xs) > len(bins) else ""
    ax.set_title(title or f"Gradient constraint residuals per layer\n(median over groups, 10–90% band{binned})", fontsize=10)
    ax.grid(alpha=0.25)
    from matplotlib.lines import Line2D

    handles = [h for h, lab in zip(*ax.get_legend_handles_labels()) if not lab.startswith("_")]
    for sym, count in others.items():
        handles.insert(-1, Line2D([], [], color=SYMMETRY_COLOR[sym], ls=styles.get(sym, "-"), lw=0.7, alpha=0.6,
                                  label=f"{sym}: {count} more layer{'s' if count > 1 else ''}"))
    if no_gradient:
        # Listed in the legend (not drawn): layers whose groups have no gradient prove nothing.
        listed = no_gradient if len(no_gradient) <= 4 else no_gradient[:3] + [f"and {len(no_gradient) - 3} more"]
        handles.append(Line2D([], [], color="none", label="no gradient (e.g. bias\nbefore BatchNorm):\n" + "\n".join(listed)))
    ax.legend(handles=handles, fontsize=7.5, loc="center left", bbox_to_anchor=(1.01, 0.5), framealpha=0.85)
    return fig


def _named_curves(curves: list[tuple[str, str, float, Any]]) -> list[tuple[str, str]]:
    """Which (symmetry, layer) curves get a legend entry of their own: all of them up to
    ``LEGEND_MAX``; past it, per symmetry the layers with the largest typical residual, as many
    as fit beside one "more layers" entry per symmetry, the float32 line and the no-gradient
    note."""
    if len(curves) <= LEGEND_MAX:
        return [(sym, layer) for sym, layer, _, _ in curves]
    symmetries = list(dict.fromkeys(sym for sym, _, _, _ in curves))
    budget = max(len(symmetries), LEGEND_MAX - 2 - len(symmetries))
    per_sym = max(1, budget // len(symmetries))
    named: set[tuple[str, str]] = set()
    for sym in symmetries:
        ranked = sorted((c for c in curves if c[0] == sym), key=lambda c: -c[2])
        named.update((c[0], c[1]) for c in ranked[:per_sym])
    return [(sym, layer) for sym, layer, _, _ in curves if (sym, layer) in named]


class _quiet_nan_warnings:
    """Silence numpy's all-NaN-slice warnings (expected here, for rows with no gradient)."""

    def __enter__(self) -> None:
        import warnings

        self._ctx = warnings.catch_warnings()
        self._ctx.__enter__()
        warnings.simplefilter("ignore", RuntimeWarning)

    def __exit__(self, *exc: Any) -> None:
        self._ctx.__exit__(*exc)


def plot_equilibrium(run: Any, layer: str | None = None, groups: int | None = 6, *, table: Any = None, window: float = 0.5, x: str = DEFAULT_X, ax: Any = None) -> Any:
    """Scale groups against the §5.4 model (docs/theory.md §5.4); a Figure with two panels (or
    the left one alone, into ``ax``).

    Left: for ``groups`` channels of ``layer`` (default: the first scale layer), the measured
    |θ_A|² (solid), where the §5.4 relaxation from the start of the run puts it
    (``equilibrium.relaxation_series``, dashed) and the equilibrium |θ*|² it relaxes toward, from
    the recent gradient noise (dotted). Right: per scale layer, the median over its groups of
    measured / relaxation (solid: flat near 1 when the norm relaxes as predicted) and of
    measured / equilibrium (dashed: 1 once at equilibrium), log scale; the title gives the
    relaxation time of each learning-rate phase against the phase's length. ``table``: unused
    (kept for callers of the earlier scatter); ``window``: see ``equilibrium_table``.
    """
    layer = default_layer(run, "scale") if layer is None else layer
    if ax is None:
        many = len(layers_of(run, "scale")) > LEGEND_MAX - 3  # the right legend then sits outside
        fig, (left, right) = new_figure(2, 1, width=6.4 if many else 5.2, height=4.1)
    else:
        fig, left, right = ax.figure, ax, None
    idx = pick_groups(run, "scale", layer, groups)
    xs, xlabel = _xaxis(run, x)
    measured = run.array("measured")
    relaxed = relaxation_series(run)
    target = equilibrium_series(run)
    colors = _colors(len(idx))
    for j, g in enumerate(idx):
        left.plot(xs, measured[:, g], color=colors[j], lw=1.6)
        left.plot(xs, relaxed[:, g], color=colors[j], lw=1.2, ls=(0, (4, 2)))
        left.plot(xs, target[:, g], color=colors[j], lw=0.8, ls=(0, (1, 2)), alpha=0.8)
    _mark_lr_changes(left, run, xs)
    left.set_yscale("log")
    left.set_xlabel(xlabel)
    left.set_ylabel("squared norm |θ_A|²")
    head = "\n".join(textwrap.wrap(f"Scale groups of {layer_name(run, layer)}", 52))
    left.set_title(f"{head}\nsolid measured, dashed §5.4 relaxation, dotted |θ*|²", fontsize=9.5)
    from matplotlib.lines import Line2D

    handles = [Line2D([], [], color="0.3", lw=1.6, label="measured |θ_A|²"),
               Line2D([], [], color="0.3", lw=1.2, ls=(0, (4, 2)), label="§5.4 relaxation (measured noise)"),
               Line2D([], [], color="0.3", lw=0.8, ls=(0, (1, 2)), label="equilibrium |θ*|² it heads to")]
    handles += [h for h, lab in zip(*left.get_legend_handles_labels()) if lab.startswith("lr step")]
    left.legend(handles=handles, fontsize=7.5, loc="best", framealpha=0.85)
    left.grid(alpha=0.25)
    if right is not None:
        _equilibrium_ratios(right, run, xs, xlabel, measured, relaxed, target)
    return fig


def _equilibrium_ratios(ax: Any, run: Any, xs: np.ndarray, xlabel: str, measured: np.ndarray, relaxed: np.ndarray, target: np.ndarray) -> None:
    g = run.groups
    layers = layers_of(run, "scale")
    with np.errstate(all="ignore"), _quiet_nan_warnings():
        ratios = {}
        for layer in layers:
            mask = (g.symmetry == "scale") & (g.layer == layer)
            ratios[layer] = (np.nanmedian(measured[:, mask] / relaxed[:, mask], axis=1), np.nanmedian(measured[:, mask] / target[:, mask], axis=1))
        # past LEGEND_MAX layers, name those that end farthest from the relaxation, draw the rest thin
        if len(layers) > LEGEND_MAX - 3:
            far = sorted(layers, key=lambda lay: -abs(np.log(np.nan_to_num(ratios[lay][0][-1], nan=1.0) or 1.0)))[: LEGEND_MAX - 4]
        else:
            far = layers
    colors = _colors(len(far))
    for layer in layers:
        to_relaxed, to_target = ratios[layer]
        if layer in far:
            color = colors[far.index(layer)]
            ax.plot(xs, to_relaxed, color=color, lw=1.5, label=layer_name(run, layer))
            ax.plot(xs, to_target, color=color, lw=1.1, ls=(0, (4, 2)))
        else:
            ax.plot(xs, to_relaxed, color="0.55", lw=0.7, alpha=0.6, label="_nolegend_")
            ax.plot(xs, to_target, color="0.55", lw=0.6, ls=(0, (4, 2)), alpha=0.5, label="_nolegend_")
    ax.axhline(1.0, color="k", lw=0.8, ls=":")
    _mark_lr_changes(ax, run, xs)
    ax.set_yscale("log")
    ax.set_xlabel(xlabel)
    ax.set_ylabel("measured |θ_A|² / prediction (median per layer)")
    phases = _phases(run)
    said = "; ".join(f"{steps:,} steps, relaxation {tau:,.0f}" for steps, tau in phases)
    ax.set_title(f"Measured / §5.4 relaxation (solid), / equilibrium (dashed)\nlr phases: {said}", fontsize=9)
    from matplotlib.lines import Line2D

    handles, _ = ax.get_legend_handles_labels()
    handles = [h for h in handles if not h.get_label().startswith("lr step")]
    if len(far) < len(layers):
        handles.append(Line2D([], [], color="0.55", lw=0.7, label=f"{len(layers) - len(far)} more layers"))
    handles += [Line2D([], [], color="0.3", lw=1.5, label="/ relaxation"), Line2D([], [], color="0.3", lw=1.1, ls=(0, (4, 2)), label="/ equilibrium")]
    if len(handles) > 6:
        ax.legend(handles=handles, fontsize=7, loc="upper left", bbox_to_anchor=(1.01, 1.0), framealpha=0.85)
    else:
        ax.legend(handles=handles, fontsize=7.5, loc="best", framealpha=0.85)
    ax.grid(alpha=0.25, which="both")


def _phases(run: Any) -> list[tuple[int, float]]:
    """(steps, relaxation time (1−β)/(4ηλ(1−d))) of each stretch of constant hyperparameters."""
    mask = run.groups.symmetry == "scale"
    first = int(np.flatnonzero(mask)[0]) if mask.any() else 0
    h = np.column_stack([run.array(c)[:-1, first] for c in ("lr", "momentum", "dampening", "weight_decay")])
    out: list[tuple[int, float]] = []
    start = 0
    for n in range(1, len(h) + 1):
        if n == len(h) or not np.array_equal(h[n], h[start], equal_nan=True):
            lr, beta, damp, wd = h[start]
            damp = damp if beta > 0 else 0.0
            with np.errstate(all="ignore"):
                tau = float((1 - beta) / (4 * lr * wd * (1 - damp))) if lr * wd > 0 else float("inf")
            out.append((n - start, tau))
            start = n
    return out


def plot_effective_lr(run: Any, layer: str | None = None, groups: int | None = 6, ax: Any = None, *, x: str = DEFAULT_X) -> Any:
    """The effective angular learning rate η/|θ_A|² of scale groups over time (log scale), with
    its equilibrium value (dashed); a Figure."""
    layer = default_layer(run, "scale") if layer is None else layer
    idx = pick_groups(run, "scale", layer, groups)
    fig, ax = _new_axes(ax)
    xs, xlabel = _xaxis(run, x)
    lr = run.array("lr")[:, idx]
    eff = lr / run.array("measured")[:, idx]
    eff_eq = lr / equilibrium_series(run)[:, idx]
    colors = _colors(len(idx))
    for j in range(len(idx)):
        ax.plot(xs, eff[:, j], color=colors[j], lw=1.5)
        ax.plot(xs, eff_eq[:, j], color=colors[j], lw=1.1, ls=(0, (4, 2)))
    _mark_lr_changes(ax, run, xs)
    from matplotlib.lines import Line2D

    handles = [Line2D([], [], color="0.3", lw=1.5, label="η / |θ_A|² (measured)"), Line2D([], [], color="0.3", lw=1.1, ls=(0, (4, 2)), label="η / |θ*|² (equilibrium)")]
    handles += [h for h, lab in zip(*ax.get_legend_handles_labels()) if lab.startswith("lr step")]
    ax.legend(handles=handles, fontsize=8, loc="best", framealpha=0.85)
    ax.set_yscale("log")
    ax.set_xlabel(xlabel)
    ax.set_ylabel("effective learning rate η / |θ_A|²")
    ax.set_title(f"Effective angular learning rate of {layer_name(run, layer)} (scale-invariant channels)", fontsize=10)
    ax.grid(alpha=0.25)
    return fig


FORECAST_LABEL = {
    "norm": "norm |θ_A|",
    "effective_lr": "effective learning rate",
    "angular_update": "angular update per step (rad)",
}


def plot_forecast(
    run: Any,
    forecast_df: Any = None,
    *,
    symmetry: str | None = None,
    layer: str | None = None,
    quantity: str = "charge",
    groups: int | None = 6,
    ax: Any = None,
    title: str | None = None,
) -> Any:
    """Measured (solid) against the forecast of docs/theory.md §5.7 (dashed, same colour) and its
    band (shaded) for at most ``groups`` groups of one layer; a Figure.

    ``forecast_df``: the output of ``Run.forecast`` / ``forecast.forecast``, or a list of them
    (each drawn from its own starting step, marked by a dotted grey line); None draws
    ``forecast.panel_forecasts(run)`` (from the middle of the run with the rates it followed,
    and from its end at the last rate). ``symmetry``: default scale if the run has scale groups,
    else rescale, else translation; ``layer``: default as in :func:`plot_charges`; ``quantity``:
    one of ``forecast.QUANTITIES`` (the last three for scale groups only). The x axis is the step.
    """
    frames = panel_forecasts(run) if forecast_df is None else (list(forecast_df) if isinstance(forecast_df, (list, tuple)) else [forecast_df])
    if not frames:
        raise InvalidArgumentError("nothing to draw: no forecast (the run is too short, or does not name its optimizer)")
    if quantity not in QUANTITIES:
        raise InvalidArgumentError(f"quantity must be one of {QUANTITIES}, got {quantity!r}")
    present = set(run.groups.symmetry)
    if symmetry is None:
        symmetry = next((s for s in ("scale", "rescale", "translation") if s in present), "scale")
    if quantity != "charge" and symmetry != "scale":
        raise InvalidArgumentError(f"{quantity!r} is forecast for scale groups only, not {symmetry!r}")
    layer = default_layer(run, symmetry) if layer is None else layer
    idx = pick_groups(run, symmetry, layer, groups)
    fig, ax = _new_axes(ax, figsize=(6.8, 4.2))
    xs = run.step_index.astype(float)
    measured = observed(run, quantity)[:, idx]
    colors = _colors(len(idx))
    wanted = run.groups.index[idx]
    for j in range(len(idx)):
        ax.plot(xs, measured[:, j], color=colors[j], lw=1.6)
    for k, frame in enumerate(frames):
        sel = frame[(frame["symmetry"] == symmetry) & (frame["layer"] == layer) & (frame["quantity"] == quantity)]
        for j, g in enumerate(wanted):
            rows = sel[sel["group"] == g]
            if not len(rows):
                continue
            steps = rows["step"].to_numpy(dtype=float)
            ax.plot(steps, rows["forecast"].to_numpy(), color=colors[j], lw=1.3, ls=(0, (4, 2)))
            ax.fill_between(steps, rows["low"].to_numpy(), rows["high"].to_numpy(), color=colors[j], alpha=0.13, lw=0)
        start = frame.attrs.get("at", float(frame["step"].min()))
        ax.axvline(float(start), color="0.45", lw=0.9, ls=":", label="forecast starts" if k == 0 else None)
    _mark_lr_changes(ax, run, xs)
    from matplotlib.lines import Line2D
    from matplotlib.patches import Patch

    handles = [
        Line2D([], [], color="0.3", lw=1.6, label="measured"),
        Line2D([], [], color="0.3", lw=1.3, ls=(0, (4, 2)), label="forecast (§5.7)"),
        Patch(color="0.3", alpha=0.2, label="band: drive at its 10–90th pct.,\n± the measured fluctuation"),
    ]
    handles += [h for h, lab in zip(*ax.get_legend_handles_labels()) if lab.startswith(("lr step", "forecast starts"))]
    ax.legend(handles=handles, fontsize=7.5, loc="best", framealpha=0.85)
    if quantity == "effective_lr":
        ax.set_yscale("log")
    ax.set_xlabel(STEP_LABEL)
    ax.set_ylabel(CHARGE_LABEL[symmetry] if quantity == "charge" else FORECAST_LABEL[quantity])
    n_all = int(((run.groups.symmetry == symmetry) & (run.groups.layer == layer)).sum())
    shown = f"{len(idx)} of {n_all} groups" if len(idx) < n_all else f"{n_all} groups"
    ax.set_title(title or f"Forecast: {SYMMETRY_TITLE[symmetry].lower()} groups of {layer} ({shown})\n"
                 f"from what the run held at step {', '.join(str(int(f.attrs.get('at', f['step'].min()))) for f in frames)}", fontsize=9.5)
    ax.grid(alpha=0.25)
    return fig
