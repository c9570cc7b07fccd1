"""Loggers: ``nm.track(model, opt, log_to=..., log_every=50)`` writes the run where researchers look.

``log_to`` is a TensorBoard ``SummaryWriter`` (``torch.utils.tensorboard`` or tensorboardX), a
wandb run, a Lightning logger, the strings ``"tensorboard"`` (a new ``SummaryWriter()``, closed
with the tracker) or ``"wandb"`` (the current ``wandb.run``), or a list of these. Every
``log_every`` steps each sink gets the per-layer scalars of :mod:`.scalars` (names
``neural_mechanics/<layer>/<symmetry>/<quantity>``, at the tracker's step n: the row of θ_n);
per-neuron histograms of the charges only with ``log_histograms=True``. At close: the summary as
a table and the report's figures as images (``log_figures=False`` leaves them out).

A sink that raises is dropped with a note in ``run.notes`` (observers.py); training goes on.
"""

from __future__ import annotations

import os
import tempfile
from collections.abc import Callable, Iterable
from functools import partial
from typing import Any

import numpy as np

from ..errors import InvalidArgumentError
from . import require
from .scalars import PREFIX, RowWatcher

STEP_KEY = f"{PREFIX}/step"  # wandb: the x axis of every neural_mechanics/* metric
SYMMETRIES = ("translation", "scale", "rescale")


# -- sinks: one class per destination, each with the same five calls ------------------------------
class TensorBoardSink:
    """A ``SummaryWriter``: add_scalar / add_histogram / add_text / add_image."""

    def __init__(self, writer: Any, owned: bool = False):
        self.writer, self.owned = writer, owned
        self.name = f"TensorBoard ({getattr(writer, 'log_dir', None) or type(writer).__name__})"

    def scalars(self, values: dict[str, float], step: int) -> None:
        for tag, value in values.items():
            self.writer.add_scalar(tag, value, step)

    def histograms(self, values: dict[str, np.ndarray], step: int) -> None:
        for tag, v in values.items():
            if len(v) and np.isfinite(v).any():
                self.writer.add_histogram(tag, v[np.isfinite(v)], step)

    def table(self, frame: Any, step: int) -> None:
        self.writer.add_text(f"{PREFIX}/summary", markdown_table(frame), step)

    def images(self, paths: dict[str, str], step: int) -> None:
        from matplotlib.image import imread

        for name, path in paths.items():
            rgb = np.asarray(imread(path))[..., :3]
            if rgb.dtype != np.uint8:
                rgb = (np.clip(rgb, 0.0, 1.0) * 255).round().astype(np.uint8)
            self.writer.add_image(f"{PREFIX}/figures/{name}", rgb, step, dataformats="HWC")

    def flush(self) -> None:
        self.writer.flush()

    def close(self) -> None:
        self.writer.flush()
        if self.owned:
            self.writer.close()


class WandbSink:
    """A wandb run: one ``run.log`` per logged step, on its own x axis ``neural_mechanics/step``
    (no ``step=``, so it never fights the caller's own steps)."""

    def __init__(self, run: Any):
        self.run = run
        self.name = f"wandb run {getattr(run, 'id', '?')}"

    def start(self) -> None:
        self.run.define_metric(STEP_KEY)
        self.run.define_metric(f"{PREFIX}/*", step_metric=STEP_KEY)

    def scalars(self, values: dict[str, float], step: int) -> None:
        self.run.log({**values, STEP_KEY: step})

    def histograms(self, values: dict[str, np.ndarray], step: int) -> None:
        wandb = require("wandb", "logging to wandb")
        data = {tag: wandb.Histogram(v[np.isfinite(v)]) for tag, v in values.items() if np.isfinite(v).any()}
        if data:
            self.run.log({**data, STEP_KEY: step})

    def table(self, frame: Any, step: int) -> None:
        wandb = require("wandb", "logging to wandb")
        self.run.log({f"{PREFIX}/summary": wandb.Table(dataframe=frame), STEP_KEY: step})

    def images(self, paths: dict[str, str], step: int) -> None:
        wandb = require("wandb", "logging to wandb")
        self.run.log({**{f"{PREFIX}/figures/{k}": wandb.Image(p) for k, p in paths.items()}, STEP_KEY: step})

    def flush(self) -> None:
        pass

    def close(self) -> None:
        pass  # the caller's run: never finished here


class LightningSink:
    """A Lightning logger: scalars through ``logger.log_metrics`` (so they land wherever that
    logger writes); histograms, the table and the figures through its ``experiment`` when it is a
    SummaryWriter or a wandb run, otherwise the table as ``neural_mechanics_summary.csv`` and the
    figures as PNG files in the logger's ``log_dir``."""

    def __init__(self, logger: Any):
        self.logger = logger
        self.name = f"Lightning {type(logger).__name__}"
        self._inner: Any = None
        self._inner_made = False

    def _experiment(self) -> Any:
        if not self._inner_made:
            self._inner_made = True
            exp = getattr(self.logger, "experiment", None)
            if type(exp).__module__.startswith("wandb"):
                self._inner = _WandbNoDefine(exp)
            elif hasattr(exp, "add_scalar") and hasattr(exp, "add_image"):
                self._inner = TensorBoardSink(exp)
        return self._inner

    def scalars(self, values: dict[str, float], step: int) -> None:
        self.logger.log_metrics(values, step)

    def histograms(self, values: dict[str, np.ndarray], step: int) -> None:
        if self._experiment() is not None:
            self._inner.histograms(values, step)

    def table(self, frame: Any, step: int) -> None:
        if self._experiment() is not None:
            self._inner.table(frame, step)
        elif (folder := self._folder()) is not None:
            frame.to_csv(os.path.join(folder, "neural_mechanics_summary.csv"), index=False)

    def images(self, paths: dict[str, str], step: int) -> None:
        if self._experiment() is not None:
            self._inner.images(paths, step)
        elif (folder := self._folder()) is not None:
            import shutil

            for name, path in paths.items():
                shutil.copyfile(path, os.path.join(folder, f"neural_mechanics_{name}.png"))

    def _folder(self) -> str | None:
        folder = getattr(self.logger, "log_dir", None)
        if folder:
            os.makedirs(folder, exist_ok=True)
        return folder

    def flush(self) -> None:
        save = getattr(self.logger, "save", None)
        if callable(save):
            save()

    def close(self) -> None:
        self.flush()


class _WandbNoDefine(WandbSink):
    """The wandb run of a Lightning ``WandbLogger``, which defines its own x axis."""

    def start(self) -> None:
        pass


def sink_for(target: Any) -> Any:
    """The sink that writes to ``target`` (see the module docstring for what it may be)."""
    if isinstance(target, str):
        if target == "tensorboard":
            require("tensorboard", "log_to='tensorboard'")
            from torch.utils.tensorboard import SummaryWriter

            return TensorBoardSink(SummaryWriter(), owned=True)
        if target == "wandb":
            wandb = require("wandb", "log_to='wandb'")
            if wandb.run is None:
                raise InvalidArgumentError("log_to='wandb' logs to the current wandb run, and there is none: call wandb.init() first")
            return WandbSink(wandb.run)
        raise InvalidArgumentError(f"log_to: unknown destination {target!r}; 'tensorboard', 'wandb', a SummaryWriter, a wandb run or a Lightning logger")
    if isinstance(target, (TensorBoardSink, WandbSink, LightningSink)):
        return target
    if type(target).__module__.startswith("wandb"):
        return WandbSink(target)
    if hasattr(target, "log_metrics") and hasattr(target, "log_hyperparams"):  # Lightning's Logger interface
        return LightningSink(target)
    if hasattr(target, "add_scalar"):
        return TensorBoardSink(target)
    raise InvalidArgumentError(f"log_to: cannot log to a {type(target).__name__}; a SummaryWriter, a wandb run, a Lightning logger, 'tensorboard' or 'wandb'")


def sinks_for(log_to: Any) -> list[Any]:
    targets = list(log_to) if isinstance(log_to, (list, tuple)) else [log_to]
    if not targets:
        raise InvalidArgumentError("log_to is an empty list")
    return [sink_for(t) for t in targets]


# -- the observer that feeds one sink --------------------------------------------------------------
class Logger:
    """Feeds one sink: scalars every ``every`` steps, the table and figures at close."""

    def __init__(self, sink: Any, every: int | None = 50, histograms: bool = False, figures: bool = True):
        self.sink, self.every, self.histograms, self.figures = sink, every, histograms, figures
        self.name = f"logging to {sink.name}"
        self.logged_step: int | None = None

    def due(self, step: int) -> bool:
        """The first row at or after each multiple of ``every`` (rows may be thinned by the
        tracker's ``every``/``record_every``); never with ``every=None`` (a trainer's callback
        calls :meth:`log` at its own cadence)."""
        if self.every is None:
            return False
        return self.logged_step is None or step // self.every > self.logged_step // self.every

    def start(self, run: Any, watcher: RowWatcher) -> None:
        start = getattr(self.sink, "start", None)
        if callable(start):
            start()

    def on_row(self, step: int, watcher: RowWatcher) -> None:
        if self.due(step):
            self.log(step, watcher)

    def log(self, step: int, watcher: RowWatcher) -> None:
        """Log the newest row now (the trainers' callbacks call this at their own cadence)."""
        self.logged_step = step
        self.sink.scalars(watcher.scalars(), step)
        if self.histograms:
            self.sink.histograms(watcher.charges(), step)

    def close(self, run: Any, watcher: RowWatcher | None) -> None:
        if run is None:  # the tracker closed before recording anything
            self.sink.close()
            return
        step = _last_step(run, watcher)
        try:
            self.sink.table(run.summary(), step)
            if self.figures:
                with tempfile.TemporaryDirectory(prefix="nm-figures-") as folder:
                    self.sink.images(report_figures(run, folder), step)
        finally:
            self.sink.close()


def report_figures(run: Any, folder: str) -> dict[str, str]:
    """The figures of a run's report (those of ``report.run_figures``: the charges of each
    symmetry, the errors, the residuals, the equilibrium where it applies) as PNG files in
    ``folder``, drawn by ``plots`` (``report`` sits above everything and is imported by the
    command line only, docs/architecture.md)."""
    from .. import plots
    from ..equilibrium import has_equilibrium

    figures: dict[str, Callable[[], Any]] = {}
    for sym in SYMMETRIES:
        if (run.groups.symmetry == sym).any():
            figures[f"charges_{sym}"] = partial(plots.plot_charges, run, sym, groups=8)
    figures["errors"] = lambda: plots.plot_errors(run)
    figures["residuals"] = lambda: plots.plot_residuals(run)
    if has_equilibrium(run):
        figures["equilibrium"] = lambda: plots.plot_equilibrium(run)
    out = {}
    for name, draw in figures.items():
        path = os.path.join(folder, f"{name}.png")
        draw().savefig(path, dpi=130)
        out[name] = path
    return out


def markdown_table(frame: Any) -> str:
    """A pipe table of a DataFrame (TensorBoard renders Markdown text), numbers in 4 digits."""

    def fmt(v: Any) -> str:
        if isinstance(v, (float, np.floating)):
            if not np.isfinite(v):
                return "—"
            return f"{v:.4g}" if v == 0 or 1e-3 <= abs(v) < 1e5 else f"{v:.2e}"
        return (str(v) or "—").replace("|", "\\|")  # a "|" must not split a cell

    cols = [fmt(c) for c in frame.columns]
    lines = ["| " + " | ".join(cols) + " |", "|" + "|".join("---" for _ in cols) + "|"]
    lines += ["| " + " | ".join(fmt(v) for v in row) + " |" for row in frame.itertuples(index=False)]
    return "\n".join(lines) + "\n"


def _last_step(run: Any, watcher: RowWatcher | None) -> int:
    if run.final is not None:
        return int(run.final["step"])
    if watcher is not None and watcher.step is not None:
        return watcher.step
    return 0


def loggers_for(log_to: Any, *, every: int = 50, histograms: bool = False, figures: bool = True) -> Iterable[Logger]:
    """One :class:`Logger` per destination of ``log_to``."""
    return [Logger(s, every, histograms, figures) for s in sinks_for(log_to)]
