"""The live view: ``tracker.live(every=25)`` (or ``nm.live(tracker)``) in a Jupyter notebook.

While the loop runs, one figure is updated in place under the cell (IPython display handles) and a
progress line (tqdm.auto) shows the steps, the groups and the worst error so far. The figure has
one panel per chosen layer (measured charges solid, the exact ledger dashed, the paper's closed
form dotted, for a few groups), the worst error of each layer over time, and the effective
learning rates of the scale layers (integrations/scalars.py).

Cost:

- outside a notebook (no IPython kernel) ``live`` returns an inactive view and attaches nothing:
  the tracked step costs exactly what it cost before;
- in a notebook, every ``every``-th row is sampled (a few numpy calls on O(groups) numbers), and
  the figure is redrawn only when the time since the last redraw is at least ``1/budget`` times
  what a redraw costs (the largest of the last three; ``budget=0.02``: drawing takes at most
  ~2% of the wall time, however fast the steps are), and not more often than every
  ``min_interval`` seconds. The
  samples kept are thinned (every other one dropped) past ``max_points``, so a redraw's cost
  stays bounded over long runs. docs/benchmarks.md gives the measured overhead.

Nothing here imports pyplot: the figure is a ``matplotlib.figure.Figure`` drawn by the Agg canvas
into PNG bytes, shown with ``IPython.display.Image``.
"""

from __future__ import annotations

import io
import sys
import time
import warnings
from collections.abc import Callable
from typing import Any

import numpy as np

from ..errors import InvalidArgumentError
from .scalars import _C, RowWatcher

SYMMETRY_ORDER = ("translation", "scale", "rescale")


def in_notebook() -> bool:
    """Whether this process is a Jupyter kernel (IPython with a kernel attached). Never imports
    IPython: a process that has not imported it is not a kernel."""
    ipython = sys.modules.get("IPython")
    if ipython is None:
        return False
    get = getattr(ipython, "get_ipython", None)
    shell = get() if callable(get) else None
    return shell is not None and getattr(shell, "kernel", None) is not None


class LiveView:
    """A figure and a progress line that follow a tracked run (see the module docstring).
    ``active`` is False outside a notebook; ``frames`` counts the redraws shown."""

    name = "live view"

    def __init__(
        self,
        *,
        every: int = 25,
        layers: list[str] | None = None,
        groups: int = 3,
        total: int | None = None,
        budget: float = 0.02,
        min_interval: float = 0.5,
        max_points: int = 2000,
        display: Callable[[bytes], None] | None = None,
        progress: bool = True,
        active: bool = True,
        clock: Callable[[], float] = time.perf_counter,
    ):
        for name, value in (("every", every), ("groups", groups), ("max_points", max_points)):
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise InvalidArgumentError(f"{name} must be an integer >= 1, got {value!r}")
        if not 0 < budget <= 1:
            raise InvalidArgumentError(f"budget must be in (0, 1], got {budget!r}")
        self.every, self.layers, self.groups, self.total = every, layers, groups, total
        self.budget, self.min_interval, self.max_points = budget, min_interval, max_points
        self.active = active
        self._clock = clock
        self.frames = 0
        self.samples = 0
        self.figure: Any = None
        self._display = display
        self._handle: Any = None
        self._progress = progress
        self._bar: Any = None
        self._stride = every
        self._last_sample: int | None = None
        self._last_draw = -np.inf
        self._draw_cost = 0.0
        self._costs: list[float] = []
        self._steps: list[int] = []
        self._charges: list[np.ndarray] = []  # (3, chosen groups): measured, exact, paper
        self._errors: list[np.ndarray] = []  # (2, keys): exact, paper
        self._eff_lr: list[np.ndarray] = []  # (scale keys,)
        self._worst = np.array([np.nan, np.nan])  # worst exact, paper error so far

    def __repr__(self) -> str:
        state = "active" if self.active else "inactive (not in a notebook)"
        return f"LiveView({state}, every={self.every}, {self.samples} samples, {self.frames} frames)"

    # -- observer protocol (integrations/observers.py) -----------------------------------------
    def start(self, run: Any, watcher: RowWatcher) -> None:
        g = run.groups
        present = [s for s in SYMMETRY_ORDER if (g.symmetry == s).any()]
        if self.layers is None:
            from ..plots import default_layer

            panels = [(s, default_layer(run, s)) for s in present]
        else:
            panels = [(s, lay) for lay in self.layers for s in present if ((g.symmetry == s) & (g.layer == lay)).any()]
            if not panels:
                raise InvalidArgumentError(f"live(layers={self.layers!r}): no tracked group in these layers; layers: {sorted(set(g.layer))}")
        self._panels = panels[:4]
        self._chosen = []
        for s, lay in self._panels:
            idx = np.flatnonzero((g.symmetry == s) & (g.layer == lay))
            pick = np.unique(np.linspace(0, len(idx) - 1, min(self.groups, len(idx))).round().astype(int))
            self._chosen.append(idx[pick])
        self._chosen_all = np.concatenate(self._chosen)
        self._keys = watcher.index.keys
        self._scale_keys = np.flatnonzero(watcher.index.scale_key)
        self._n_groups = len(g)
        if self._progress:
            self._bar = _progress_bar(self.total)

    def on_row(self, step: int, watcher: RowWatcher) -> None:
        if self._last_sample is not None and step - self._last_sample < self._stride:
            return
        self._sample(step, watcher)
        now = self._clock()
        if now - self._last_draw >= max(self.min_interval, self._draw_cost / self.budget):
            self._draw()

    def close(self, run: Any, watcher: RowWatcher | None) -> None:
        try:
            if watcher is not None and watcher.row is not None and watcher.step != self._last_sample:
                self._sample(watcher.step if watcher.step is not None else 0, watcher)
            if self._steps:
                self._draw()
        finally:
            if self._bar is not None:
                self._bar.close()

    # -- sampling --------------------------------------------------------------------------------
    def _sample(self, step: int, watcher: RowWatcher) -> None:
        row = watcher.row
        assert row is not None
        values = watcher.values()
        self._last_sample = step
        self._steps.append(step)
        self._charges.append(row[[_C["measured"], _C["exact"], _C["paper"]]][:, self._chosen_all])
        self._errors.append(np.stack([values["error_exact"], values["error_paper"]]))
        self._eff_lr.append(values["effective_lr"][self._scale_keys])
        self._worst = np.fmax(self._worst, np.array([_finite_max(values["error_exact"]), _finite_max(values["error_paper"])]))
        self.samples += 1
        if len(self._steps) > self.max_points:  # thin: keep every other sample, sample half as often
            for series in (self._steps, self._charges, self._errors, self._eff_lr):
                del series[1::2]
            self._stride *= 2
        if self._bar is not None:
            self._bar.update(step + 1 - self._bar.n)
            self._bar.set_postfix_str(f"{self._n_groups} groups, worst error exact {self._worst[0]:.1e} paper {self._worst[1]:.1e}", refresh=False)

    # -- drawing ---------------------------------------------------------------------------------
    def _draw(self) -> None:
        start = self._clock()
        if self.figure is None:
            self._make_figure()
        steps = np.asarray(self._steps, dtype=float)
        charges = np.stack(self._charges)  # (samples, 3, chosen)
        errors = np.stack(self._errors)  # (samples, 2, keys)
        at = 0
        for lines, chosen in zip(self._charge_lines, self._chosen):
            for j in range(len(chosen)):
                for k in range(3):
                    lines[j][k].set_data(steps, charges[:, k, at + j])
            at += len(chosen)
        errors = np.where(errors > 0, errors, np.nan)  # a log axis: exact zeros (row 0) are not drawn
        for key, (le, lp) in enumerate(self._error_lines):
            le.set_data(steps, errors[:, 0, key])
            lp.set_data(steps, errors[:, 1, key])
        if self._lr_lines:
            eff = np.stack(self._eff_lr)
            for j, line in enumerate(self._lr_lines):
                line.set_data(steps, eff[:, j])
        for ax in self._axes:
            ax.relim()
            ax.autoscale_view()
        buf = io.BytesIO()
        self._canvas.print_png(buf)
        if self.frames == 0:
            self.figure.set_layout_engine("none")  # the layout of the first frame is kept: cheaper redraws
        self._show(buf.getvalue())
        self.frames += 1
        end = self._clock()
        # The redraw's cost, for the budget: the largest of the last three (a loaded machine
        # makes it vary), the first frame counting for half (it also builds the figure and its
        # layout, two to three times a redraw).
        cost = end - start if self.frames > 1 else 0.5 * (end - start)
        self._costs = [*self._costs[-2:], cost]
        self._draw_cost, self._last_draw = max(self._costs), end

    def _make_figure(self) -> None:
        from matplotlib.backends.backend_agg import FigureCanvasAgg
        from matplotlib.figure import Figure

        n = len(self._panels) + 2
        fig = Figure(figsize=(3.3 * n, 3.0), dpi=80, layout="constrained")
        self._canvas = FigureCanvasAgg(fig)
        axes = fig.subplots(1, n, squeeze=False)[0]
        colors = [f"C{i}" for i in range(10)]
        self._charge_lines = []
        for ax, (sym, layer), chosen in zip(axes, self._panels, self._chosen):
            lines = []
            for j in range(len(chosen)):
                c = colors[j % 10]
                lines.append([ax.plot([], [], color=c, lw=1.4)[0], ax.plot([], [], color=c, lw=1.0, ls="--")[0], ax.plot([], [], color=c, lw=1.0, ls=":")[0]])
            self._charge_lines.append(lines)
            ax.set_title(f"{sym} {layer}: measured — exact -- paper ··", fontsize=8)
            ax.set_xlabel("step", fontsize=8)
        ax_err = axes[len(self._panels)]
        self._error_lines = []
        for key, (layer, sym) in enumerate(self._keys):
            c = colors[key % 10]
            le = ax_err.plot([], [], color=c, lw=1.2, label=f"{sym} {layer}")[0]
            lp = ax_err.plot([], [], color=c, lw=1.0, ls=":")[0]
            self._error_lines.append((le, lp))
        ax_err.set_yscale("log")
        ax_err.set_title("worst error per layer: exact — paper ··", fontsize=8)
        ax_err.set_xlabel("step", fontsize=8)
        if len(self._keys) <= 8:
            ax_err.legend(fontsize=6, loc="best")
        ax_lr = axes[-1]
        self._lr_lines = []
        for j, scale_key in enumerate(self._scale_keys.tolist()):
            layer, _ = self._keys[scale_key]
            self._lr_lines.append(ax_lr.plot([], [], color=colors[j % 10], lw=1.2, label=layer)[0])
        if self._lr_lines:
            ax_lr.set_yscale("log")
            ax_lr.set_title("effective learning rate (scale layers)", fontsize=8)
            if len(self._lr_lines) <= 8:
                ax_lr.legend(fontsize=6, loc="best")
        else:
            ax_lr.set_title("effective learning rate: no scale groups", fontsize=8)
        ax_lr.set_xlabel("step", fontsize=8)
        from matplotlib.ticker import LogLocator, MaxNLocator

        for ax in axes:  # few tick labels: text is most of a redraw's cost
            ax.tick_params(which="both", labelsize=7)
            ax.xaxis.set_major_locator(MaxNLocator(4, integer=True))
            if ax.get_yscale() == "log":
                ax.yaxis.set_minor_locator(LogLocator(subs=(2.0, 5.0)))  # labelled only within a decade
            else:
                ax.yaxis.set_major_locator(MaxNLocator(4))
            ax.grid(alpha=0.25)
        self.figure, self._axes = fig, list(axes)

    def _show(self, png: bytes) -> None:
        if self._display is not None:
            self._display(png)
            return
        from IPython.display import Image, display

        if self._handle is None:
            self._handle = display(Image(data=png), display_id=True)
        else:
            self._handle.update(Image(data=png))


def _finite_max(v: np.ndarray) -> float:
    finite = v[np.isfinite(v)]
    return float(finite.max()) if finite.size else float("nan")


def _progress_bar(total: int | None) -> Any:
    """tqdm.auto's bar (a widget where ipywidgets is installed), else tqdm's text bar."""
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            from tqdm.auto import tqdm

            return tqdm(total=total, unit="step", desc="neural-mechanics", leave=True)
    except ImportError:  # tqdm.notebook without ipywidgets
        from tqdm.std import tqdm as text_tqdm

        return text_tqdm(total=total, unit="step", desc="neural-mechanics", leave=True)


def live(tracker: Any, every: int = 25, **kwargs: Any) -> LiveView:
    """Show ``tracker``'s run live in a Jupyter notebook: a figure updated in place and a progress
    line, every ``every`` steps (see the module docstring). Outside a notebook: an inactive view,
    nothing attached, nothing computed.

    Keyword arguments: ``layers`` (the layers to draw; default one per symmetry, the paper's
    choice), ``groups`` (groups drawn per layer, 3), ``total`` (the number of steps, for the
    progress bar), ``budget`` (the largest share of wall time spent drawing, 0.02),
    ``min_interval`` (seconds between redraws, 0.5), ``max_points`` (samples kept, 2000),
    ``progress`` (the progress line, True), ``display`` (a callable that receives each frame's
    PNG bytes instead of the notebook: the view is then active anywhere), ``clock`` (the clock
    of the redraw budget, ``time.perf_counter``; benchmarks/bench_dataframes.py pauses it).
    """
    display = kwargs.get("display")
    view = LiveView(every=every, active=display is not None or in_notebook(), **kwargs)
    if view.active:
        tracker.observe(view)
    return view
