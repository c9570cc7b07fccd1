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

A monitor never changes the training it watches (docs/tracking.md, "When something goes
wrong"): with ``on_error="note"`` (the default) a step the path cannot measure is noted in
``run.notes``, its row is NaN, the core is told (``lose``: the clock moves, the theories restart
at the next good step) and the optimizer's step goes ahead untouched; ``on_error="raise"``
raises instead. The native step of a measured step runs after the optimizer's step has
returned, so a step that raises inside the optimizer (and is retried) is measured once.
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
        self.on_error = "note"  # set by the tracker: "note" or "raise" (track(on_error=...))
        self._failed_step: int | None = None  # a step whose measurement failed before the update
        self._failures: dict[str, list[int]] = {}  # a failure's text -> [times seen, last step]

    # -- failures: noted (the default) or raised; never a changed step ----------------------
    def failed(self, step: int, what: str, exc: BaseException, hyper: list[ParamGroupHyper] | None = None) -> None:
        """A failure of the tracker after the optimizer took ``step``: the core is told the step
        is lost (so the clock and the theories stay in step with training), then the failure
        is noted once per distinct failure, or raised under on_error="raise"."""
        self._lose(step, hyper)
        if self.on_error == "raise":
            raise exc
        self._note_failure(step, what, exc)

    def _note_failure(self, step: int, what: str, exc: BaseException) -> None:
        key = f"{what} ({type(exc).__name__}: {exc})"
        seen = self._failures.setdefault(key, [0, step])
        seen[0] += 1
        seen[1] = step
        if seen[0] == 1:
            self.run.notes.append(
                f"step {step}: {key}; the optimizer's step went ahead untouched, this step's row is NaN and paper "
                "and exact restart from the measured charges at the next step the tracker can measure"
            )
            import logging

            logging.getLogger("neural_mechanics").warning("neural_mechanics.track: step %d: %s (noted in run.notes)", step, key)

    def _lose(self, step: int, hyper: list[ParamGroupHyper] | None = None) -> None:
        """The core learns that ``step`` went unmeasured (``hyper``: the step's, when read a
        step late); a kept row is all NaN."""
        if self._recorded(step):
            row = self.run.reserve_row()
            row[...] = np.nan
            self._commit(step, self.core.time, row)
        try:
            self.core.lose(step, hyper if hyper is not None else read_hyper(self.optimizer))
        except Exception as exc:  # noqa: BLE001 - hyperparameters the core refuses: noted, clock held
            self._note_failure(step, "reading the hyperparameters", exc)

    def _commit(self, step: int, time: float, row: np.ndarray) -> None:
        """Keep a written row; a failed spill (a full disk) keeps the rows in memory, noted."""
        try:
            self.run.commit_row(step, time)
        except Exception as exc:
            if self.on_error == "raise":
                raise
            self._note_failure(step, "spilling rows to disk", exc)

    def close_failures(self) -> None:
        """At close: how often each noted failure came back."""
        for key, (times, last) in self._failures.items():
            if times > 1:
                self.run.notes.append(f"{key}: the same at {times - 1} more steps (last at step {last})")
        self._failures.clear()

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

    def _record(
        self, step: int, measure: Callable[[np.ndarray | None], tuple[float, list[str], list[tuple[str, str]]]], hyper: list[ParamGroupHyper] | None = None
    ) -> None:
        """Run one native measured step, writing its row straight into the run if it is kept."""
        row = self.run.reserve_row() if self._recorded(step) else None
        try:
            time, notes, regimes = measure(row)
        except Exception as exc:
            self.failed(step, "measuring the step", exc, hyper)  # the core refused it: unchanged
            return
        if row is not None:
            self._commit(step, time, row)
        for kind, regime in regimes:
            self.run.note_regime(kind, regime)
        if any(n.startswith(f"step {step}: non-finite sums") for n in notes):
            notes = [n + self._non_finite_parameters() if n.startswith(f"step {step}: non-finite sums") else n for n in notes]
        self.run.notes.extend(notes)
        if row is not None and self.on_row is not None:
            self.on_row(step, time, row)

    def _non_finite_parameters(self) -> str:
        """Which tracked parameters (or their gradients) hold a NaN/Inf now: read only when a
        step's sums were not finite, to name them in the note."""
        import torch

        bad = []
        for name, p in self.plan.params.items():
            if p.grad is not None and not bool(torch.isfinite(p.grad).all()):
                bad.append(f"{name} (gradient)")
            elif not bool(torch.isfinite(p.detach()).all()):
                bad.append(name)
        return f" [non-finite now: {', '.join(bad[:5])}{', ...' if len(bad) > 5 else ''}]" if bad else ""

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
        try:
            main, _ = self.reducer.reduce_plan(self.reads, [(params[n], None, None) for n in self.reads.names], False).result()
            final = self.core.final_row(main)
        except Exception as exc:
            if self.on_error == "raise":
                raise
            self._note_failure(step, "measuring the final row", exc)
            final = None
        if final is not None:
            self.run.final = {"step": step, **final}
        self.close_failures()

    def before_step(self, step: int) -> None:
        raise NotImplementedError

    def after_step(self, step: int) -> None:
        raise NotImplementedError


class SgdPath(_Path):
    """torch.optim.SGD: everything from one fused pass before the step (docs/theory.md §5.3)."""

    # The fused sums of the step under way, taken before it; handed to the core once the
    # optimizer's step has returned (a step that raised inside the optimizer is measured again).
    _taken: tuple[int, Pending, bool, list[ParamGroupHyper]] | None = None

    def before_step(self, step: int) -> None:
        self.flush()  # the previous step's delayed results, before anything of this step
        self._taken, self._failed_step = None, None
        try:
            hyper = read_hyper(self.optimizer)
            if not self._measured(step):
                return
            state, params = self.optimizer.state, self.plan.params
            tensors = []
            for name in self.reads.names:
                p = params[name]
                st = state.get(p)  # .get: optimizer.state is a defaultdict, [p] would add an entry
                tensors.append(_same_dtype([p, self._grad(name, p, step), None if st is None else st.get("momentum_buffer")]))
            has_buffer = any(t[2] is not None for t in tensors)
            if has_buffer:
                for t in tensors:
                    if t[2] is None:
                        t[2] = _zeros(t[0])  # a parameter that has not had a gradient yet: SGD gave it no buffer
            pending = self.reducer.reduce_plan(self.reads, tensors, has_buffer)
            if self.on_error == "raise" and not self.reducer.delayed:
                _refuse_non_finite(step, pending)  # strict: before the optimizer moves anything
        except Exception as exc:
            if self.on_error == "raise":
                raise
            self._note_failure(step, "reading the step's tensors", exc)
            self._failed_step = step
            return
        self._taken = (step, pending, has_buffer, hyper)

    def after_step(self, step: int) -> None:
        taken, self._taken = self._taken, None
        if self._failed_step == step:
            self._failed_step = None
            self._lose(step)
        elif taken is None or taken[0] != step:
            self._skip(step, read_hyper(self.optimizer))
        else:
            _, pending, has_buffer, hyper = taken
            self._defer(lambda: self._process(pending, has_buffer, hyper, step))

    def _process(self, pending: Pending, has_buffer: bool, hyper: list[ParamGroupHyper], step: int) -> None:
        try:
            main, extra = pending.result()
        except Exception as exc:
            self.failed(step, "reading the step's sums", exc, hyper)
            return
        self._record(step, lambda row: self.core.step_sgd(step, main, extra if has_buffer else None, hyper, row), hyper)


class UpdatePath(_Path):
    """Any other optimizer: θ_n copied before the step, the applied update measured after it."""

    _snapshot: dict[str, Any] | None = None

    # ĝ_n, kept when the optimizer runs its closure a second time within one step (LBFGS
    # evaluates it at moved parameters); None otherwise: p.grad is still ĝ_n after the step.
    _grads: dict[str, Any] | None = None

    def keep_grads(self, step: int) -> None:
        """Copy ĝ_n now, before the closure runs again (once per step; tracker.py calls it)."""
        if self._grads is None and self._snapshot is not None:
            self._grads = {n: self._grad(n, p, step).detach().clone() for n, p in self.plan.params.items()}

    def before_step(self, step: int) -> None:
        self.flush()
        self._snapshot, self._grads, self._failed_step = None, None, None
        if not self._measured(step):
            return
        try:
            self._snapshot = {name: p.detach().clone() for name, p in self.plan.params.items()}
        except Exception as exc:
            if self.on_error == "raise":
                raise
            self._snapshot = None
            self._note_failure(step, "copying the parameters before the step", exc)
            self._failed_step = step

    def after_step(self, step: int) -> None:
        snapshot, self._snapshot = self._snapshot, None
        grads, self._grads = self._grads, None
        if self._failed_step == step:
            self._failed_step = None
            self._lose(step)
            return
        hyper = read_hyper(self.optimizer)
        if snapshot is None:
            self._skip(step, hyper)
            return
        params = self.plan.params
        try:
            # θ_n (the snapshot), ĝ_n and the applied update d_n = θ_n − θ_{n+1}.
            tensors = [
                _same_dtype([snapshot[n], grads[n] if grads is not None else self._grad(n, params[n], step), snapshot[n] - params[n].detach()])
                for n in self.reads.names
            ]
            pending = self.reducer.reduce_plan(self.reads, tensors, True)
        except Exception as exc:
            self.failed(step, "measuring the applied update", exc, hyper)
            return
        self._defer(lambda: self._process(pending, hyper, step))

    def _process(self, pending: Pending, hyper: list[ParamGroupHyper], step: int) -> None:
        try:
            main, extra = pending.result()
        except Exception as exc:
            self.failed(step, "reading the step's sums", exc, hyper)
            return
        self._record(step, lambda row: self.core.step_update(main, extra, hyper, row, step=step), hyper)


def _zeros(p: Any) -> Any:
    import torch

    return torch.zeros_like(p)


def _same_dtype(tensors: list[Any]) -> list[Any]:
    """(θ, ĝ, b or d) in one dtype: after ``model.to(torch.bfloat16)`` mid-run the optimizer's
    buffers keep their float32; the narrower ones are widened (exactly) to the widest."""
    present = [t for t in tensors if t is not None]
    dtype = present[0].dtype
    if all(t.dtype == dtype for t in present[1:]):
        return tensors
    import torch

    for t in present[1:]:
        dtype = torch.promote_types(dtype, t.dtype)
    return [t if t is None or t.dtype == dtype else t.detach().to(dtype) for t in tensors]


def _refuse_non_finite(step: int, pending: Pending) -> None:
    """on_error="raise": non-finite sums stop the step before the optimizer moves anything."""
    from ..errors import NonFiniteError

    main, extra = pending.result()
    if not np.isfinite(main).all() or (extra is not None and not np.isfinite(extra).all()):
        raise NonFiniteError(
            f"step {step}: a tracked parameter, gradient or momentum buffer is NaN or Inf "
            "(on_error='raise'; the default on_error='note' notes it and lets the step go ahead)"
        )
