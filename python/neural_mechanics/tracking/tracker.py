"""`track(model, optimizer)`: attach to an unmodified training loop through optimizer hooks.

This module is the tracker's lifecycle: the hooks, discovery at the first forward pass, the
set-up (plan, reducer, native core, run) and close(). How a step is measured lives in paths.py
(one object per optimizer family), the per-step algebra and theories in Rust (src/tracking/).
"""

from __future__ import annotations

import logging
from typing import Any

from .. import _native
from ..errors import InvalidArgumentError, NothingToTrackError
from ..run import GroupInfo, Run
from ..verdicts import coverage_line
from .adam_path import AdamPath, fused_adam_applies
from .distributed import RunOnRankZero, attach
from .paths import SgdPath, UpdatePath, read_hyper
from .plan import Plan, build_plan
from .reducers import Reads, choose

log = logging.getLogger("neural_mechanics")


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
        log_to: Any = None,
        log_every: int = 50,
        log_histograms: bool = False,
        log_figures: bool = True,
        class_axis: int = 1,
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
        log_every = integer("log_every", log_every, 1)
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
        self._class_axis = class_axis
        self._handles: list[Any] = []
        self._plan: Plan | None = None
        self._path: SgdPath | UpdatePath | None = None
        self._run: Run | None = None
        self._step = 0
        self._closed = False
        self._closure_pending = False  # optimizer.step(closure): measured once the closure has run
        self._observers: Any = None  # loggers and the live view (neural_mechanics.integrations), if any
        if log_to is not None and (self._dist is None or self._dist.owns_run):
            from ..integrations.loggers import loggers_for

            for logger in loggers_for(log_to, every=log_every, histograms=log_histograms, figures=log_figures):
                self.observe(logger)
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
        finder = find_symmetries if self._dist is None else self._dist.find_symmetries
        self._setup(finder(self.model, example, class_axis=self._class_axis))

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
        info = GroupInfo.from_groups(kept, plan.group_size, _layer_labels(self.model, {str(g.layer) for g in kept}))
        run = self._run = Run(
            groups=info,
            optimizer=type(self.optimizer).__name__,
            skipped=skipped,
            max_rows_in_memory=None if self._memory_limit is None else Run.rows_for_memory(len(info), self._memory_limit),
            spill_dir=self._spill_dir,
            coverage=_coverage(named, kept, skipped),
            hyperparameters=[_plain_hyper(g) for g in self.optimizer.param_groups],
            exact_kind="ledger" if self._sgd else "bookkeeping",
        )
        self._coverage_line = coverage_line(len(info), len(set(info.layer)), run.coverage)
        log.info("neural_mechanics.track: %s", self._coverage_line)
        self._note_where_theories_apply(run, plan)
        # SGD: one pass before the step; Adam/AdamW on the CPU kernel: the update computed from
        # the optimizer's state (adam_path.py); anything else: a snapshot (docs/tracking.md).
        path = SgdPath if self._sgd else AdamPath if fused_adam_applies(self.optimizer, reducer) else UpdatePath
        self._path = path(plan, reads, reducer, core, run, self.optimizer, self.every, self.record_every)
        if self._observers is not None:
            self._observers.start(run)
            self._path.on_row = self._observers.on_row

    # -- observers: what watches the run while it is recorded (loggers, the live view) -------
    def observe(self, observer: Any) -> None:
        """Call ``observer`` after each committed row and at close: its ``start(run, watcher)``
        once the run exists, ``on_row(step, watcher)`` after each row, ``close(run, watcher)``
        after the final row (neural_mechanics.integrations.observers). An observer that raises
        is dropped with a note in ``run.notes``; training goes on."""
        if self._closed:
            raise InvalidArgumentError("the tracker is closed: nothing more will be recorded to observe")
        if self._observers is None:
            from ..integrations.observers import Observers

            self._observers = Observers()
            if self._path is not None and self._run is not None:
                self._observers.start(self._run)
                self._path.on_row = self._observers.on_row
        self._observers.add(observer)

    def live(self, every: int = 25, **kwargs: Any) -> Any:
        """In Jupyter, a figure updated in place and a progress line while the loop runs
        (neural_mechanics.integrations.live); elsewhere a no-op that costs nothing."""
        from ..integrations.live import live

        return live(self, every=every, **kwargs)

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
    def _pre_step(self, optimizer: Any, args: Any, kwargs: Any) -> tuple[Any, Any] | None:
        if self._closed:
            return None
        # torch hands the hook step's own arguments: (optimizer, closure?), {closure?}
        closure = kwargs.get("closure") if "closure" in kwargs else (args[1] if len(args) > 1 else None)
        if not callable(closure):
            self._before_step()
            return None
        # optimizer.step(closure) (Lightning, closure-style loops): the gradient of this step
        # exists only once the optimizer has run the closure, so measure right after its first
        # call, before the update (a pre-hook may hand the optimizer new arguments).
        self._closure_pending = True

        def closure_then_measure() -> Any:
            loss = closure()
            if self._closure_pending:
                self._closure_pending = False
                self._before_step()
            return loss

        if "closure" in kwargs:
            return args, {**kwargs, "closure": closure_then_measure}
        return (args[0], closure_then_measure, *args[2:]), kwargs

    def _before_step(self) -> None:
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
        if self._closure_pending:  # an optimizer that never called its closure: the step went unmeasured
            self._closure_pending = False
            if isinstance(self._path, SgdPath):
                self._path._skip(self._step, read_hyper(self.optimizer))
            if self._run is not None:
                self._run.notes.append(f"step {self._step}: optimizer.step(closure) never called the closure; the step was not measured")
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
        if self._observers is not None:
            self._observers.close(self._run)  # None if no row was ever recorded
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
        what = getattr(self, "_coverage_line", None) or "? groups (discovered at the first forward)"
        return f"Tracker({state}, {what}, step {self._step}, every={self.every})"


def _module_label(module: Any) -> str:
    """A module in a few words: "Linear(32→10)", "Conv2d(1→16, 3×3)", "BatchNorm2d(16)"."""
    name = type(module).__name__
    if hasattr(module, "in_features") and hasattr(module, "out_features"):
        return f"{name}({module.in_features}→{module.out_features})"
    if hasattr(module, "in_channels") and hasattr(module, "out_channels"):
        k = getattr(module, "kernel_size", None)
        kernel = "×".join(map(str, k)) if isinstance(k, tuple) else str(k) if k is not None else ""
        return f"{name}({module.in_channels}→{module.out_channels}" + (f", {kernel})" if kernel else ")")
    if hasattr(module, "num_features"):
        return f"{name}({module.num_features})"
    if hasattr(module, "normalized_shape"):
        return f"{name}({', '.join(map(str, module.normalized_shape))})"
    if hasattr(module, "num_embeddings") and hasattr(module, "embedding_dim"):
        return f"{name}({module.num_embeddings}, {module.embedding_dim})"
    if hasattr(module, "embed_dim") and hasattr(module, "num_heads"):
        return f"{name}({module.embed_dim}, {module.num_heads} heads)"
    return name


def _layer_labels(model: Any, layers: set[str]) -> dict[str, str]:
    """Layer name → its module in a few words, for the layers that name a module (a layer named
    after a parametrised leaf, "0.parametrizations.weight.original1", names module "0")."""
    from ..symmetries.discover import module_name

    modules = dict(model.named_modules())
    out = {}
    for layer in layers:
        module = modules.get(layer) if layer in modules else modules.get(module_name(layer))
        if module is not None and layer != "":
            out[layer] = _module_label(module)
    return out


def _coverage(named: dict[str, Any], kept: list[Any], skipped: dict[str, str]) -> dict[str, Any]:
    """What the tracked groups cover: trainable parameters and entries, and per trainable
    parameter in no tracked group its entries and the reason (docs/tracking.md, "Coverage")."""
    trainable = {n: p for n, p in named.items() if getattr(p, "requires_grad", False)}
    covered = {n for g in kept for n, _, _ in g.parts}
    dropped: dict[str, str] = {}  # parameter -> why a group containing it was not tracked
    for key, why in skipped.items():
        if key not in named and "parameter " in why:
            dropped.setdefault(why.split("parameter ", 1)[1].split(" ", 1)[0], f"its groups were dropped: {why}")
    uncovered = {}
    for n, p in trainable.items():
        if n not in covered:
            reason = skipped.get(n) or dropped.get(n) or "no tracked symmetry group contains it"
            uncovered[n] = [int(p.numel()), reason]
    return {"parameters": len(trainable), "entries": int(sum(int(p.numel()) for p in trainable.values())), "uncovered": uncovered}


def _plain_hyper(param_group: dict[str, Any]) -> dict[str, Any]:
    """A param_group's hyperparameters as plain JSON values (no params, no tensors)."""
    out: dict[str, Any] = {}
    for k, v in param_group.items():
        if k in ("params", "initial_lr") or k.startswith("_"):
            continue
        if hasattr(v, "item") and getattr(v, "ndim", 1) == 0:
            v = v.item()
        if isinstance(v, (tuple, list)) and all(isinstance(x, (int, float)) for x in v):
            out[k] = [float(x) for x in v]
        elif v is None or isinstance(v, (bool, int, float, str)):
            out[k] = v
    return out


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
    log_to: Any = None,
    log_every: int = 50,
    log_histograms: bool = False,
    log_figures: bool = True,
    class_axis: int = 1,
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
        log_to: a TensorBoard ``SummaryWriter``, a wandb run, a Lightning logger, "tensorboard",
            "wandb", or a list of them: per-layer scalars every ``log_every`` steps, the summary
            table and the report's figures at close (``log_figures``), per-neuron histograms of
            the charges only with ``log_histograms`` (docs/integrations.md).
        class_axis: the logits' class axis for discovery (``find_symmetries``): 1, PyTorch's
            convention, or -1 for ``(B, T, V)`` language-model logits.

    Use ``with track(model, opt) as tracker: ...`` and read ``tracker.run``.
    """
    return Tracker(
        model,
        optimizer,
        symmetries,
        every=every,
        record_every=record_every,
        reducer=reducer,
        memory_limit=memory_limit,
        spill_dir=spill_dir,
        log_to=log_to,
        log_every=log_every,
        log_histograms=log_histograms,
        log_figures=log_figures,
        class_axis=class_axis,
    )
