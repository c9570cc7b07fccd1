"""The tracker's callback list: what watches a run while it is recorded (loggers, the live view).

The tracker (tracking/tracker.py) creates one :class:`Observers` when the first observer is
added, starts it once the run exists, hands its ``on_row`` to the measuring path (called after
each committed row, docs/architecture.md) and closes it after the final row. An observer is any
object with

- ``name`` (a short description, used in notes),
- ``start(run, watcher)``: once, when the run exists,
- ``on_row(step, watcher)``: after each committed row (``watcher.row`` is the newest row),
- ``close(run, watcher)``: once, after the final row was measured (``run`` is None when the
  tracker closed before recording anything: release what you hold).

An observer that raises is never allowed to break training: the error is caught, a note is added
to ``run.notes`` (once) with a warning, and that observer is dropped; the others go on.
"""

from __future__ import annotations

import warnings
from typing import Any

import numpy as np

from .scalars import RowWatcher


class Observers:
    """The observers of one tracker, and the :class:`RowWatcher` they share."""

    def __init__(self) -> None:
        self.items: list[Any] = []
        self.run: Any = None
        self.watcher: RowWatcher | None = None
        self.closed = False

    def add(self, observer: Any) -> None:
        self.items.append(observer)
        if self.run is not None:
            self._call(observer, "start", self.run, self.watcher)

    def start(self, run: Any) -> None:
        """The run exists (the groups are known): build the shared state, start every observer."""
        self.run = run
        try:
            self.watcher = RowWatcher(run.groups, run.optimizer)
        except Exception as exc:  # noqa: BLE001 - never break training
            self._drop_all("start", exc)
            return
        for observer in tuple(self.items):
            self._call(observer, "start", run, self.watcher)

    def on_row(self, step: int, time: float, row: np.ndarray) -> None:
        if not self.items or self.watcher is None:
            return
        try:
            self.watcher.update(step, time, row)
        except Exception as exc:  # noqa: BLE001 - never break training
            self._drop_all(f"step {step}", exc)
            return
        for observer in tuple(self.items):
            self._call(observer, "on_row", step, self.watcher)

    def close(self, run: Any) -> None:
        if self.closed:
            return
        self.closed = True
        if self.run is None:
            self.run = run
        for observer in tuple(self.items):
            self._call(observer, "close", run, self.watcher)

    def _call(self, observer: Any, method: str, *args: Any) -> None:
        try:
            getattr(observer, method)(*args)
        except Exception as exc:  # noqa: BLE001 - a logger's error must never break training
            where = f"step {args[0]}" if method == "on_row" else method
            self._drop(observer, where, exc)

    def _drop(self, observer: Any, where: str, exc: BaseException) -> None:
        if observer in self.items:
            self.items.remove(observer)
        note = f"{getattr(observer, 'name', type(observer).__name__)}: stopped after an error at {where} ({type(exc).__name__}: {exc}); training went on without it"
        if self.run is not None:
            self.run.notes.append(note)
        warnings.warn(f"neural_mechanics: {note}", RuntimeWarning, stacklevel=4)

    def _drop_all(self, where: str, exc: BaseException) -> None:
        for observer in tuple(self.items):
            self._drop(observer, where, exc)
