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

from typing import Any

import numpy as np

from .equilibrium import equilibrium_series, equilibrium_table
from .errors import InvalidArgumentError
from .forecast import QUANTITIES, observed, panel_forecasts

# The x axis of charge and error plots: the model time of the closed forms, or the step.
TIME_LABEL = "time t = Σ η(1−d)"
STEP_LABEL = "step"

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
    "translation": "column sums of {layer} (before softmax)",
    "scale": "squared channel norms of {layer} (before BatchNorm)",
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
    if x == "time":
        return run.time_index, TIME_LABEL
    if x == "step":
        return run.step_index.astype(float), STEP_LABEL
    raise InvalidArgumentError(f"x must be 'time' or 'step', got {x!r}")


def layers_of(run: Any, symmetry: str) -> list[str]:
    """The layers carrying ``symmetry`` in ``run``, in the order the tracker found them."""
    g = run.groups
    return list(dict.fromkeys(g.layer[g.symmetry == symmetry]))


def default_layer(run: Any, symmetry: str) -> str:
    """The layer the paper's figure shows: for translation the classifier (the layer whose groups
    are whole columns, i.e. the largest groups; the last such), otherwise the first layer."""
    layers = layers_of(run, symmetry)
    if not layers:
        present = sorted(set(run.groups.symmetry))
        raise InvalidArgumentError(f"the run has no {symmetry!r} groups (it has {present})")
    if symmetry != "translation":
        return layers[0]
    g = run.groups
    mean_size = [float(np.mean(g.size[(g.symmetry == symmetry) & (g.layer == lay)])) for lay in layers]
    best = max(mean_size)
    return [lay for lay, s in zip(layers, mean_size) if s == best][-1]


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
    x: str = "time",
    theories: tuple[str, ...] = ("paper", "exact"),
    title: str | None = None,
    legend: bool = True,
) -> Any:
    """Measured charges (solid) against the paper's closed form (dashed, same colour) and the
    exact ledger (black dotted) for one layer; a Figure.

    ``layer``: default the paper's choice (:func:`default_layer`); ``groups``: the maximum
    number of groups drawn (those that moved most), None for all; ``x``: "time" (t = Σ η(1−d))
    or "step". Lines drawn: (1 + len(theories)) per group, plus one grey line per
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
    colors = _colors(len(idx))
    for j in range(len(idx)):
        ax.plot(xs, measured[:, j], color=colors[j], lw=1.6)
        if "paper" in cols:
            ax.plot(xs, cols["paper"][:, j], color=colors[j], lw=1.2, ls=(0, (4, 2)), alpha=0.9)
        if "exact" in cols:
            ax.plot(xs, cols["exact"][:, j], color="k", lw=0.8, ls=(0, (1, 2)))
    _mark_lr_changes(ax, run, xs)
    ax.set_xlabel(xlabel)
    ax.set_ylabel(CHARGE_LABEL[symmetry])
    n_all = int(((run.groups.symmetry == symmetry) & (run.groups.layer == layer)).sum())
    shown = f"{len(idx)} of {n_all} groups" if len(idx) < n_all else f"{n_all} groups"
    ax.set_title(title or f"{SYMMETRY_TITLE[symmetry]}: {CHARGE_WHAT[symmetry].format(layer=layer)}\n({shown})", fontsize=10)
    if legend:
        _style_legend(ax, theories)
    ax.grid(alpha=0.25)
    return fig


def _colors(n: int) -> list[Any]:
    from matplotlib import colormaps

    cmap = colormaps["viridis"]
    return [cmap(0.9 * k / max(n - 1, 1)) for k in range(n)]


def _style_legend(ax: Any, theories: tuple[str, ...]) -> None:
    """One legend entry per line style (not per group): measured / paper / exact / lr step."""
    from matplotlib.lines import Line2D

    handles = [Line2D([], [], color="0.3", lw=1.6, label="measured")]
    if "paper" in theories:
        handles.append(Line2D([], [], color="0.3", lw=1.2, ls=(0, (4, 2)), label="paper closed form"))
    if "exact" in theories:
        handles.append(Line2D([], [], color="k", lw=0.8, ls=(0, (1, 2)), label="exact ledger"))
    existing, labels = ax.get_legend_handles_labels()
    handles += [h for h, lab in zip(existing, labels) if lab.startswith("lr step")]
    ax.legend(handles=handles, fontsize=8, loc="best", framealpha=0.85)


def plot_exact_dynamics(panels: list[tuple[Any, str, str | None]], *, groups: int = 8, x: str = "time", suptitle: str | None = None) -> Any:
    """The paper's "exact dynamics" figure: one panel per ``(run, symmetry, layer)``, measured
    solid, theories dashed/dotted; a Figure."""
    if not panels:
        raise InvalidArgumentError("no panels to draw")
    fig, axes = new_figure(len(panels), 1, width=4.8, height=3.9)
    axes = np.atleast_1d(axes)
    for k, (ax, (run, symmetry, layer)) in enumerate(zip(axes, panels)):
        plot_charges(run, symmetry, layer, groups=groups, ax=ax, x=x, legend=(k == 0))
        ax.set_title(f"({chr(97 + k)}) " + ax.get_title(), fontsize=9.5)
    if suptitle:
        fig.suptitle(suptitle, fontsize=11)
    return fig


def plot_errors(run: Any, ax: Any = None, *, x: str = "time", title: str | None = None) -> Any:
    """Error of the exact ledger (solid) and of the paper's closed form (dashed) over time, the
    maximum over the groups of each symmetry, log scale; a Figure.

    Error = |prediction − measured| / (max over the run of the group's magnitude). Lines drawn:
    two per symmetry present (one when a theory is NaN throughout), plus one grey line per
    learning-rate change.
    """
    fig, ax = _new_axes(ax)
    xs, xlabel = _xaxis(run, x)
    # Row 0 is the common starting point (error 0 by construction): start at row 1 so the log
    # axis spans the errors that mean something.
    xs = xs[1:]
    for which, ls, name in (("exact", "-", "exact ledger"), ("paper", (0, (4, 2)), "paper closed form")):
        err = run.errors(which)[1:]
        for sym in SYMMETRY_TITLE:
            mask = run.groups.symmetry == sym
            if not mask.any() or not np.isfinite(err[:, mask]).any():
                continue
            worst = np.nanmax(np.where(np.isfinite(err[:, mask]), err[:, mask], np.nan), axis=1)
            ax.plot(xs, np.maximum(worst, LOG_FLOOR), color=SYMMETRY_COLOR[sym], ls=ls, lw=1.4, label=f"{name}, {sym}")
    _mark_lr_changes(ax, run, np.concatenate([[np.nan], xs]))
    ax.set_yscale("log")
    ax.set_xlabel(xlabel)
    ax.set_ylabel("max relative error over groups")
    ax.set_title(title or "Theory against measurement: worst group at each time", fontsize=10)
    ax.grid(alpha=0.25, which="major")
    ax.legend(fontsize=8, loc="best", framealpha=0.85)
    return fig


# A group whose |ĝ_A|² is below this fraction of the step's median over all groups has no
# gradient to speak of (a bias before BatchNorm: rounding noise only); its residual is 0/0.
NO_GRADIENT = 1e-8
# Residuals are noisy step to step: long runs are drawn as at most this many bins.
RESIDUAL_BINS = 150


def plot_residuals(run: Any, ax: Any = None, *, x: str = "step", title: str | None = None) -> Any:
    """Gradient-constraint residuals per layer (docs/theory.md §3): the median over the layer's groups
    (line) and the band between its 10th and 90th percentiles, log scale; a Figure.

    ~1e-7 is a symmetry holding to float32 precision; O(1) is no symmetry. Groups with no
    gradient (a bias before BatchNorm; |ĝ_A|² below ``NO_GRADIENT`` × the step's median) prove
    nothing and are left out; layers with nothing left are listed in the legend. Runs longer than
    ``RESIDUAL_BINS`` steps are drawn in bins of consecutive steps. One line per
    (symmetry, layer) with a gradient, plus the float32 reference line.
    """
    fig, ax = _new_axes(ax, figsize=(6.8, 4.2))
    xs, xlabel = _xaxis(run, x)
    # The last row is the final state, with no step and so no residual.
    # |grad_sq|: for rescale groups it is the signed |ĝ_A1|² − |ĝ_A2|².
    xs, res, g2 = xs[:-1], run.array("residual")[:-1], np.abs(run.array("grad_sq")[:-1])
    with np.errstate(all="ignore"), _quiet_nan_warnings():
        floor = NO_GRADIENT * np.nanmedian(np.where(g2 > 0, g2, np.nan), axis=1, keepdims=True)
    res = np.where(np.isfinite(res) & (g2 > floor), res, np.nan)
    bins = np.array_split(np.arange(len(xs)), min(len(xs), RESIDUAL_BINS)) if len(xs) else []
    bx = np.array([xs[b].mean() for b in bins])
    keys = list(dict.fromkeys(zip(run.groups.symmetry, run.groups.layer)))
    styles = {"translation": "-", "scale": "--", "rescale": "-."}
    no_gradient = []
    palette = _colors(len(keys))
    for k, (sym, layer) in enumerate(keys):
        mask = (run.groups.symmetry == sym) & (run.groups.layer == layer)
        r = res[:, mask]
        if not np.isfinite(r).any():
            no_gradient.append(f"{sym} {layer}")
            continue
        with np.errstate(all="ignore"), _quiet_nan_warnings():
            stats = np.array([np.nanpercentile(r[b], [10, 50, 90]) for b in bins])
        lo, med, hi = (np.maximum(stats[:, i], LOG_FLOOR) for i in range(3))
        ax.plot(bx, med, color=palette[k], ls=styles.get(sym, "-"), lw=1.4, label=f"{sym}: {layer}")
        ax.fill_between(bx, lo, hi, color=palette[k], alpha=0.12, lw=0)
    ax.axhline(1.2e-7, color="0.5", lw=0.8, ls=":", label="float32 ε")
    ax.set_yscale("log")
    ax.set_xlabel(xlabel)
    ax.set_ylabel("constraint residual |⟨ĝ, generator⟩| / norms")
    binned = f", bins of {len(xs) // len(bins)} steps" if len(bins) and len(xs) > len(bins) else ""
    ax.set_title(title or f"Gradient constraint residuals per layer\n(median over groups, 10–90% band{binned})", fontsize=10)
    ax.grid(alpha=0.25)
    handles, _ = ax.get_legend_handles_labels()
    if no_gradient:
        # Listed in the legend (not drawn): layers whose groups have no gradient prove nothing.
        from matplotlib.lines import Line2D

        handles.append(Line2D([], [], color="none", label="no gradient (e.g. bias\nbefore BatchNorm):\n" + "\n".join(no_gradient)))
    ax.legend(handles=handles, fontsize=7.5, loc="center left", bbox_to_anchor=(1.01, 0.5), framealpha=0.85)
    return fig


class _quiet_nan_warnings:
    """Silence numpy's all-NaN-slice warnings (expected here, for rows with no gradient)."""

    def __enter__(self) -> None:
        import warnings

        self._ctx = warnings.catch_warnings()
        self._ctx.__enter__()
        warnings.simplefilter("ignore", RuntimeWarning)

    def __exit__(self, *exc: Any) -> None:
        self._ctx.__exit__(*exc)


def plot_equilibrium(run: Any, layer: str | None = None, groups: int | None = 6, *, table: Any = None, window: float = 0.5, x: str = "step", ax: Any = None) -> Any:
    """Scale groups against the §5.4 equilibrium; a Figure with two panels (or one, into ``ax``).

    Left: for ``groups`` channels of ``layer`` (default: the first scale layer), the measured
    |θ_A|² (solid) and the equilibrium |θ*|² predicted from the recent gradient noise and the
    step's hyperparameters (dashed). Right: for every scale group, the predicted |θ*|² of the
    last learning-rate phase against the |θ_A|² reached at the end, with the line y = x; points
    below it are still relaxing down, above it still growing. ``table``: the output of
    ``equilibrium.equilibrium_table`` (computed when None). ``window``: see that function.
    """
    layer = default_layer(run, "scale") if layer is None else layer
    if table is None:
        table = equilibrium_table(run, window=window)
    if ax is None:
        fig, (left, right) = new_figure(2, 1, width=5.0, height=4.0)
    else:
        fig, left, right = ax.figure, ax, None
    idx = pick_groups(run, "scale", layer, groups)
    xs, xlabel = _xaxis(run, x)
    measured = run.array("measured")[:, idx]
    predicted = equilibrium_series(run)[:, idx]
    colors = _colors(len(idx))
    for j in range(len(idx)):
        left.plot(xs, measured[:, j], color=colors[j], lw=1.6)
        left.plot(xs, predicted[:, j], color=colors[j], lw=1.2, ls=(0, (4, 2)))
    _mark_lr_changes(left, run, xs)
    left.set_yscale("log")
    left.set_xlabel(xlabel)
    left.set_ylabel("squared norm |θ_A|²")
    left.set_title(f"Scale groups of {layer}: norm against equilibrium\n(solid measured, dashed |θ*|² from recent noise)", fontsize=9.5)
    from matplotlib.lines import Line2D

    handles = [Line2D([], [], color="0.3", lw=1.6, label="measured |θ_A|²"), Line2D([], [], color="0.3", lw=1.2, ls=(0, (4, 2)), label="equilibrium |θ*|²")]
    handles += [h for h, lab in zip(*left.get_legend_handles_labels()) if lab.startswith("lr step")]
    left.legend(handles=handles, fontsize=8, loc="best", framealpha=0.85)
    left.grid(alpha=0.25)
    if right is not None:
        _equilibrium_scatter(right, table)
    return fig


def _equilibrium_scatter(ax: Any, table: Any) -> None:
    layers = list(dict.fromkeys(table["layer"]))
    colors = _colors(len(layers))
    for color, layer in zip(colors, layers):
        t = table[table["layer"] == layer]
        ax.scatter(t["predicted_norm_sq"], t["final_norm_sq"], s=14, color=color, alpha=0.8, label=layer)
    both = np.concatenate([table["predicted_norm_sq"], table["final_norm_sq"]])
    both = both[np.isfinite(both) & (both > 0)]
    if both.size:
        lo, hi = both.min() / 1.5, both.max() * 1.5
        ax.plot([lo, hi], [lo, hi], color="k", lw=0.9, ls="--", label="y = x (at equilibrium)")
        ax.set_xlim(lo, hi)
        ax.set_ylim(lo, hi)
    ax.set_xscale("log")
    ax.set_yscale("log")
    ax.set_xlabel("predicted equilibrium |θ*|² (last lr phase)")
    ax.set_ylabel("|θ_A|² reached at the end")
    relax = float(np.nanmedian(table["relaxation_steps"])) if len(table) else float("nan")
    ran = float(np.nanmedian(table["phase_steps"])) if len(table) else float("nan")
    ax.set_title(f"Equilibrium prediction vs norm reached\n(relaxation ≈ {relax:,.0f} steps; last phase ran {ran:,.0f})", fontsize=9.5)
    ax.grid(alpha=0.25, which="both")
    ax.legend(fontsize=8, loc="best", framealpha=0.85)


def plot_effective_lr(run: Any, layer: str | None = None, groups: int | None = 6, ax: Any = None, *, x: str = "step") -> Any:
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
    ax.set_title(f"Effective angular learning rate of {layer} (scale-invariant channels)", fontsize=10)
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
