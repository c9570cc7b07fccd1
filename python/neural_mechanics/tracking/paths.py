"""The two ways a step is measured, one object each; the tracker (tracker.py) only calls them.

- ``SgdPath`` (torch.optim.SGD): one pass before step n over (θ_n, ĝ_n, b_{n−1}) tells
  everything the theories need about the step (docs/theory.md §5.3), so nothing is copied.
- ``UpdatePath`` (any other optimizer): θ_n is copied before the step (one copy of the tracked
  parameters, plus a temporary of the same size after it) and the applied update is measured
  after it; the exact column is then bookkeeping, the paper column the paper's first-order form
  driven by the measured update (docs/theory.md §5.5).

A measured step crosses into Rust twice: the reducer's one call (the fused sums of every
reduction), then ``_native.TrackerCore.step_*``, which sums rows into parts, columns and
groups, writes the run's row in place and advances the clock and both theories. A step that is
not measured (``every > 1``) crosses once (``skip``: the clock and the closed form move on).
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any, NamedTuple

import numpy as np

from ..run import Run
from .plan import Plan
from .reducers import Pending, Reads, Reducer


class ParamGroupHyper(NamedTuple):
    """One optimizer param_group's hyperparameters at one step (0 where the optimizer has none)."""

    lr: float
    momentum: float
    dampening: float
    weight_decay: float
    nesterov: bool


def read_hyper(optimizer: Any) -> list[ParamGroupHyper]:
    """Every param_group's hyperparameters now (read at each step, so schedulers just work)."""
    return [
        ParamGroupHyper(
            float(g["lr"]), float(g.get("momentum", 0.0)), float(g.get("dampening", 0.0)), float(g.get("weight_decay", 0.0)), bool(g.get("nesterov", False))
        )
        for g in optimizer.param_groups
    ]


class _Path:
    """What both paths share: the native core, the run, and results that may arrive a step late."""

    def __init__(self, plan: Plan, reads: Reads, reducer: Reducer, core: Any, run: Run, optimizer: Any, every: int, record_every: int):
        self.plan, self.reads, self.reducer, self.core, self.run = plan, reads, reducer, core, run
        self.optimizer = optimizer
        self.every = every
        self.record_every = record_every
        self._queue: list[Callable[[], None]] = []  # measurements waiting for their sums, oldest first
        self._no_grad_noted: set[str] = set()
        # Set by the tracker when something watches the run (loggers, the live view): called with
        # (step, time, row) after each row is committed; ``row`` is the run's (columns, groups) view.
        self.on_row: Callable[[int, float, np.ndarray], None] | None = None

    def flush(self) -> None:
        """Process every measurement still waiting (the device's results of an earlier step)."""
        while self._queue:
            self._queue.pop(0)()

    def _defer(self, work: Callable[[], None]) -> None:
        self._queue.append(work)
        if not self.reducer.delayed:
            self.flush()

    def _measured(self, step: int) -> bool:
        return step % self.every == 0

    def _recorded(self, step: int) -> bool:
        """Rows are kept at the measured steps that are multiples of ``record_every``."""
        return step % math.lcm(self.every, self.record_every) == 0

    def _record(self, step: int, measure: Callable[[np.ndarray | None], tuple[float, list[str], list[tuple[str, str]]]]) -> None:
        """Run one native measured step, writing its row straight into the run if it is kept."""
        row = self.run.reserve_row() if self._recorded(step) else None
        time, notes, regimes = measure(row)
        if row is not None:
            self.run.commit_row(step, time)
        for kind, regime in regimes:
            self.run.note_regime(kind, regime)
        self.run.notes.extend(notes)
        if row is not None and self.on_row is not None:
            self.on_row(step, time, row)

    def _skip(self, step: int, hyper: list[ParamGroupHyper]) -> None:
        self.run.notes.extend(self.core.skip(step, hyper))

    def _grad(self, name: str, p: Any, step: int) -> Any:
        """``p.grad``, or zeros for a tracked parameter without one at this step (noted once)."""
        if p.grad is not None:
            return p.grad
        if name not in self._no_grad_noted:
            self._no_grad_noted.add(name)
            self.run.notes.append(
                f"step {step}: {name} had no gradient; the optimizer skipped it, so the exact ledger of its groups "
                "no longer accounts for every step from here"
            )
        return _zeros(p)

    def finish(self, step: int) -> None:
        """Process what is waiting, then measure the run's last row from the parameters as they are."""
        self.flush()
        params = self.plan.params
        main, _ = self.reducer.reduce_plan(self.reads, [(params[n], None, None) for n in self.reads.names], False).result()
        final = self.core.final_row(main)
        if final is not None:
            self.run.final = {"step": step, **final}

    def before_step(self, step: int) -> None:
        raise NotImplementedError

    def after_step(self, step: int) -> None:
        raise NotImplementedError


class SgdPath(_Path):
    """torch.optim.SGD: everything from one fused pass before the step (docs/theory.md §5.3)."""

    def before_step(self, step: int) -> None:
        self.flush()  # the previous step's delayed results, before anything of this step
        hyper = read_hyper(self.optimizer)
        if not self._measured(step):
            self._skip(step, hyper)
            return
        state, params = self.optimizer.state, self.plan.params
        tensors = []
        for name in self.reads.names:
            p = params[name]
            st = state.get(p)  # .get: optimizer.state is a defaultdict, [p] would add an entry
            tensors.append([p, self._grad(name, p, step), None if st is None else st.get("momentum_buffer")])
        has_buffer = any(t[2] is not None for t in tensors)
        if has_buffer:
            for t in tensors:
                if t[2] is None:
                    t[2] = _zeros(t[0])  # a parameter that has not had a gradient yet: SGD gave it no buffer
        pending = self.reducer.reduce_plan(self.reads, tensors, has_buffer)
        self._defer(lambda: self._process(pending, has_buffer, hyper, step))

    def _process(self, pending: Pending, has_buffer: bool, hyper: list[ParamGroupHyper], step: int) -> None:
        main, extra = pending.result()
        self._record(step, lambda row: self.core.step_sgd(step, main, extra if has_buffer else None, hyper, row))

    def after_step(self, step: int) -> None:
        pass


class UpdatePath(_Path):
    """Any other optimizer: θ_n copied before the step, the applied update measured after it."""

    _snapshot: dict[str, Any] | None = None

    def before_step(self, step: int) -> None:
        self.flush()
        if self._measured(step):
            self._snapshot = {name: p.detach().clone() for name, p in self.plan.params.items()}

    def after_step(self, step: int) -> None:
        hyper = read_hyper(self.optimizer)
        snapshot, self._snapshot = self._snapshot, None
        if snapshot is None:
            self._skip(step, hyper)
            return
        params = self.plan.params
        # θ_n (the snapshot), ĝ_n and the applied update d_n = θ_n − θ_{n+1}.
        tensors = [(snapshot[n], self._grad(n, params[n], step), snapshot[n] - params[n].detach()) for n in self.reads.names]
        pending = self.reducer.reduce_plan(self.reads, tensors, True)
        self._defer(lambda: self._process(pending, hyper, step))

    def _process(self, pending: Pending, hyper: list[ParamGroupHyper], step: int) -> None:
        main, extra = pending.result()
        self._record(step, lambda row: self.core.step_update(main, extra, hyper, row, step=step))


def _zeros(p: Any) -> Any:
    import torch

    return torch.zeros_like(p)
