"""`track(model, optimizer)`: attach to an unmodified training loop through optimizer hooks.

This module is the tracker's lifecycle: the hooks, discovery at the first forward pass, the
set-up (plan, reducer, native core, run) and close(). How a step is measured lives in paths.py
(one object per optimizer family), the per-step algebra and theories in Rust (src/tracking/).
"""

from __future__ import annotations

from typing import Any

from .. import _native
from ..errors import InvalidArgumentError, NothingToTrackError
from ..run import GroupInfo, Run
from .distributed import RunOnRankZero, attach
from .paths import SgdPath, UpdatePath
from .plan import Plan, build_plan
from .reducers import Reads, choose


class Tracker:
    """Records a Run while the training loop runs. Use as a context manager, or call close()."""

    def __init__(
        self,
        model: Any,
        optimizer: Any,
        symmetries: Any = None,
        *,
        every: int = 1,
        record_every: int = 1,
        reducer: str = "auto",
        memory_limit: int | None = 256 * 2**20,
        spill_dir: str | None = None,
    ):
        import operator
        import os

        import torch

        from ..errors import RunIOError

        # Every argument is checked here, when it is given, not at the first spill or forward.
        def integer(name: str, value: Any, least: int) -> int:
            """Any integer type (int, np.int64: whatever has __index__), never a bool or a float."""
            try:
                n = operator.index(value) if not isinstance(value, bool) else None
            except TypeError:
                n = None
            if n is None or n < least:
                raise InvalidArgumentError(f"{name} must be an integer >= {least}, got {value!r}")
            return n

        every = integer("every", every, 1)
        record_every = integer("record_every", record_every, 1)
        if memory_limit is not None:
            memory_limit = integer("memory_limit", memory_limit, Run.MIN_MEMORY_LIMIT)
        if spill_dir is not None:
            if isinstance(spill_dir, bytes) or not isinstance(spill_dir, (str, os.PathLike)):
                raise InvalidArgumentError(f"spill_dir must be a folder path (str or os.PathLike) or None, got {spill_dir!r}")
            spill_dir = os.fspath(spill_dir)
            if not isinstance(spill_dir, str) or not spill_dir:
                raise InvalidArgumentError(f"spill_dir must be a folder path, got {spill_dir!r}")
            if os.path.exists(spill_dir) and not os.path.isdir(spill_dir):
                raise InvalidArgumentError(f"spill_dir {spill_dir!r} exists and is not a folder")
            try:
                os.makedirs(spill_dir, exist_ok=True)
            except OSError as exc:
                raise RunIOError(f"spill_dir {spill_dir!r}: cannot create the folder ({exc})") from None
            if not os.access(spill_dir, os.W_OK | os.X_OK):
                raise RunIOError(f"spill_dir {spill_dir!r}: the folder is not writable")
        if not isinstance(optimizer, torch.optim.Optimizer):
            raise InvalidArgumentError(f"optimizer must be a torch.optim.Optimizer, got {type(optimizer).__name__}")
        # torch.distributed (DDP / FSDP2): None for an ordinary model. DDP: track the wrapped module.
        self._dist = attach(model)
        self.model = model if self._dist is None else self._dist.module
        self.optimizer = optimizer
        self.every = every
        self.record_every = record_every
        self._sgd = type(optimizer) is torch.optim.SGD and not any(g.get("maximize", False) for g in optimizer.param_groups)
        self._reducer_kind = reducer
        self._memory_limit = memory_limit
        self._spill_dir = spill_dir
        self._handles: list[Any] = []
        self._plan: Plan | None = None
        self._path: SgdPath | UpdatePath | None = None
        self._run: Run | None = None
        self._step = 0
        self._closed = False
        if self._dist is not None and not self._dist.hooks:
            return  # DDP rank != 0: rank 0 records; no hooks, no reductions, nothing sent
        if symmetries is None:
            self._handles.append(self.model.register_forward_pre_hook(self._discover, with_kwargs=True))
        else:
            self._setup(symmetries)
        self._handles.append(optimizer.register_step_pre_hook(self._pre_step))
        self._handles.append(optimizer.register_step_post_hook(self._post_step))

    # -- set-up ------------------------------------------------------------------------------
    def _discover(self, module: Any, args: tuple, kwargs: dict) -> None:
        from ..symmetries import find_symmetries

        self._handles[0].remove()  # one look at the example input is enough
        example = args[0] if len(args) == 1 and not kwargs else args
        self._setup((find_symmetries if self._dist is None else self._dist.find_symmetries)(self.model, example))

    def _setup(self, symmetries: Any) -> None:
        named = dict(self.model.named_parameters()) if self._dist is None else self._dist.named_parameters()
        by_id = {id(p): i for i, g in enumerate(self.optimizer.param_groups) for p in g["params"]}
        param_group_of = {name: by_id[id(p)] for name, p in named.items() if id(p) in by_id}
        skipped: dict[str, str] = dict(getattr(symmetries, "skipped", {}) or {})
        kept = []
        for g in symmetries:
            bad = [n for n, _, _ in g.parts if n not in param_group_of or not named[n].requires_grad]
            if bad:
                frozen = all(n in named and not named[n].requires_grad for n in bad)
                why = "frozen (requires_grad=False)" if frozen else "not in the optimizer"
                skipped[f"{g.symmetry} {g.layer} #{g.index}"] = f"parameter {bad[0]} is {why}"
                continue
            kept.append(g)
        if not kept:
            raise NothingToTrackError(
                "no symmetry group to track: "
                + ("the model has none" if not list(symmetries) else "every group touches a frozen or unoptimised parameter")
                + (f" (skipped: {dict(list(skipped.items())[:5])})" if skipped else "")
            )
        plan = self._plan = build_plan(kept, named, param_group_of)
        view = self._dist.view if self._dist is not None else (lambda r: r.view)
        reads = Reads(plan.reductions, plan.names, plan.params, plan.translation_reductions, view)
        reducer = choose([plan.params[n] for n in plan.names], self._reducer_kind)
        core = _native.TrackerCore(plan.native_arrays(), sgd=self._sgd, every=self.every)
        info = GroupInfo.from_groups(kept, plan.group_size)
        run = self._run = Run(
            groups=info,
            optimizer=type(self.optimizer).__name__,
            skipped=skipped,
            max_rows_in_memory=None if self._memory_limit is None else Run.rows_for_memory(len(info), self._memory_limit),
            spill_dir=self._spill_dir,
        )
        self._note_where_theories_apply(run, plan)
        path = SgdPath if self._sgd else UpdatePath
        self._path = path(plan, reads, reducer, core, run, self.optimizer, self.every, self.record_every)

    def _note_where_theories_apply(self, run: Run, plan: Plan) -> None:
        """The run's notes on layers where the paper's closed form (or the ledger) does not apply."""
        for gi in (plan.columns_per_group() > 1).nonzero()[0]:
            g = plan.groups[gi]
            run.paper_notes[(g.symmetry, g.layer)] = (
                "parts in param_groups with different hyperparameters: no closed form (docs/theory.md §5.3); exact sums per-part ledgers"
            )
        if not self._sgd:
            for g in plan.groups:
                run.paper_notes[(g.symmetry, g.layer)] = (
                    f"closed forms hold for torch.optim.SGD only; {type(self.optimizer).__name__}: "
                    "exact is bookkeeping of the measured update (see theory.equilibrium_*)"
                )
        elif any(g.get("nesterov", False) for g in self.optimizer.param_groups):
            for g in plan.groups:
                run.paper_notes.setdefault(
                    (g.symmetry, g.layer), "nesterov: the paper's heavy-ball oscillator is an approximation here (exact holds)"
                )
        if self.every > 1:
            run.exact_note = f"exact needs every step; every={self.every} leaves it NaN"

    # -- per-step work: the path measures, the lifecycle counts ------------------------------
    def _pre_step(self, optimizer: Any, args: Any, kwargs: Any) -> None:
        if self._closed:
            return
        if self._path is None:
            raise NothingToTrackError(
                "track(symmetries=None) discovers groups from the first forward pass of the model, "
                "but optimizer.step() came before any forward pass"
            )
        self._path.before_step(self._step)

    def _post_step(self, optimizer: Any, args: Any, kwargs: Any) -> None:
        if self._closed or self._path is None:
            return
        self._path.after_step(self._step)
        self._step += 1

    # -- results -----------------------------------------------------------------------------
    @property
    def run(self) -> Run:
        """The run so far (cheap: nothing is measured; the last row N, the final charges, is
        measured at close()). Under torch.distributed the Run lives on rank 0; other ranks get a
        ``RunOnRankZero`` stub."""
        if self._dist is not None and not self._dist.owns_run:
            return RunOnRankZero(self._dist.rank, self._dist.world_size, self._dist.mode)  # type: ignore[return-value]
        if self._run is None:
            raise NothingToTrackError("nothing recorded yet: no forward pass / optimizer step has been seen")
        if self._path is not None and not self._closed:
            self._path.flush()  # a step whose sums were still on their way from the device
        return self._run

    def close(self) -> None:
        """Measure the final row (every rank together under FSDP2), then remove every hook; the
        run stays readable."""
        if self._closed:
            return
        if self._path is not None:
            self._path.finish(self._step)
        for h in self._handles:
            h.remove()
        self._handles.clear()
        self._closed = True

    def __enter__(self) -> Tracker:
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()

    def __repr__(self) -> str:
        state = "closed" if self._closed else "attached"
        groups = self._plan.n_groups if self._plan is not None else "? (discovered at the first forward)"
        return f"Tracker({state}, {groups} groups, step {self._step}, every={self.every})"


def track(
    model: Any,
    optimizer: Any,
    symmetries: Any = None,
    *,
    every: int = 1,
    record_every: int = 1,
    reducer: str = "auto",
    memory_limit: int | None = 256 * 2**20,
    spill_dir: str | None = None,
) -> Tracker:
    """Track the symmetry charges of ``model`` while ``optimizer`` trains it.

    Args:
        model: the torch.nn.Module being trained.
        optimizer: its optimizer. torch.optim.SGD gets the paper's closed forms and the exact
            ledger; any other optimizer the measured-update bookkeeping.
        symmetries: the groups to track (``find_symmetries`` / ``declare``); None discovers them
            from the first forward pass after ``track`` is entered.
        every: measure every ``every``-th step only (the exact ledger then is NaN, the paper's
            closed form holds the last measured drive over the steps in between).
        record_every: keep every ``record_every``-th measured row (thins memory only).
        reducer: where the per-step reductions run: "auto" (the Rust kernel for CPU parameters,
            the parameters' device otherwise, results read one step later), "rust", "torch",
            "torch-sync".
        memory_limit: bytes of recorded rows kept in memory; older rows spill to ``spill_dir``
            (a temporary folder by default). None keeps everything in memory.

    Use ``with track(model, opt) as tracker: ...`` and read ``tracker.run``.
    """
    return Tracker(
        model, optimizer, symmetries, every=every, record_every=record_every, reducer=reducer, memory_limit=memory_limit, spill_dir=spill_dir
    )
