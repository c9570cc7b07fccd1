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
from ..storage import check_max_bytes
from ..verdicts import coverage_line
from .adam_path import AdamPath, fused_adam_applies
from .distributed import RunOnRankZero, attach
from .paths import SgdPath, UpdatePath
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
        max_bytes: int | None = None,
        log_to: Any = None,
        log_every: int = 50,
        log_histograms: bool = False,
        log_figures: bool = True,
        class_axis: int = 1,
        on_error: str = "note",
    ):
        import torch

        # Every argument is checked here, when it is given, not at the first spill or forward.
        if on_error not in ("note", "raise"):
            raise InvalidArgumentError(f"on_error must be 'note' or 'raise', got {on_error!r}")
        every = _integer("every", every, 1)
        record_every = _integer("record_every", record_every, 1)
        log_every = _integer("log_every", log_every, 1)
        if memory_limit is not None:
            memory_limit = _integer("memory_limit", memory_limit, Run.MIN_MEMORY_LIMIT)
        self._max_bytes = check_max_bytes(max_bytes)
        if spill_dir is not None:
            spill_dir = _spill_folder(spill_dir)
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
        self._on_error = on_error
        self._early_notes: list[str] = []  # notes from before the run exists (discovery pending)
        self._dtypes: list[Any] = []  # the tracked parameters' dtypes, to notice model.to(dtype)
        self._resume: dict[str, Any] | None = None  # load_state_dict() before discovery: applied at set-up
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
    def _discover(self, module: Any, args: tuple, kwargs: dict | None = None) -> None:
        global _DISCOVERING
        from ..symmetries import find_symmetries

        # The forwards that another tracker's discovery runs are not the model's: wait for a real
        # one. (torch may still call a hook removed during the forward that snapshotted it, then
        # without kwargs: hence the default, and the check that this tracker is not set up.)
        if _DISCOVERING or self._plan is not None or self._closed:
            return
        self._handles[0].remove()  # one look at the example input is enough
        example = args[0] if len(args) == 1 and not kwargs else args
        finder = find_symmetries if self._dist is None else self._dist.find_symmetries
        _DISCOVERING += 1
        try:
            found = finder(self.model, example, class_axis=self._class_axis)
        finally:
            _DISCOVERING -= 1
        self._setup(found)

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
        decoupled, beta1 = update_rule(self.optimizer)
        core = _native.TrackerCore(
            plan.native_arrays(), sgd=self._sgd, every=self.every, decoupled=decoupled, beta1=beta1, strict=self._on_error == "raise"
        )
        info = GroupInfo.from_groups(kept, plan.group_size, _layer_labels(self.model, {str(g.layer) for g in kept}))
        run = self._run = Run(
            groups=info,
            optimizer=type(self.optimizer).__name__,
            skipped=skipped,
            max_rows_in_memory=None if self._memory_limit is None else Run.rows_for_memory(len(info), self._memory_limit),
            spill_dir=self._spill_dir,
            max_bytes=self._max_bytes,
            coverage=_coverage(named, kept, skipped),
            hyperparameters=[_plain_hyper(g) for g in self.optimizer.param_groups],
            exact_kind="ledger" if self._sgd else "bookkeeping",
        )
        self._coverage_line = coverage_line(len(info), len(set(info.layer)), run.coverage)
        log.info("neural_mechanics.track: %s", self._coverage_line)
        self._note_where_theories_apply(run, plan)
        run.notes.extend(self._early_notes)
        self._early_notes.clear()
        self._dtypes = [p.dtype for p in plan.params.values()]
        _note_low_precision(run, plan.params, "")
        # SGD: one pass before the step; Adam/AdamW on the CPU kernel: the update computed from
        # the optimizer's state (adam_path.py); anything else: a snapshot (docs/tracking.md).
        path = SgdPath if self._sgd else AdamPath if fused_adam_applies(self.optimizer, reducer) else UpdatePath
        self._path = path(plan, reads, reducer, core, run, self.optimizer, self.every, self.record_every)
        self._path.on_error = self._on_error
        if self._resume is not None:
            state, self._resume = self._resume, None
            self._apply_state(state)
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
            decoupled, _ = update_rule(self.optimizer)
            decay = "decoupled weight decay taken out of it" if decoupled else "coupled weight decay left in it"
            for g in plan.groups:
                run.paper_notes.setdefault(
                    (g.symmetry, g.layer),
                    f"{PAPER_FORM_LABEL} ({type(self.optimizer).__name__}, {decay}; docs/theory.md §5.5); "
                    "exact is bookkeeping of the measured update",
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
            self._safely(self._before_step)
            return None
        # optimizer.step(closure) (Lightning, closure-style loops): the gradient of this step
        # exists only once the optimizer has run the closure, so measure right after its first
        # call, before the update (a pre-hook may hand the optimizer new arguments).
        self._closure_pending = True

        def closure_then_measure() -> Any:
            if not self._closure_pending and isinstance(self._path, UpdatePath):
                # Called again (LBFGS evaluates at moved parameters): keep ĝ_n as the first call left it.
                self._path.keep_grads(self._step)
            loss = closure()
            if self._closure_pending:
                self._closure_pending = False
                self._safely(self._before_step)
            return loss

        if "closure" in kwargs:
            return args, {**kwargs, "closure": closure_then_measure}
        return (args[0], closure_then_measure, *args[2:]), kwargs

    def _before_step(self) -> None:
        if self._closed:
            return
        if self._path is None:
            message = (
                "track(symmetries=None) discovers groups from the first forward pass of the model, "
                f"but optimizer.step() came before any forward pass (step {self._step})"
            )
            if self._on_error == "raise":
                raise NothingToTrackError(message)
            if not self._early_notes:
                log.warning("neural_mechanics.track: %s; the step goes ahead untracked", message)
                self._early_notes.append(message + "; the steps before discovery went untracked")
            return
        self._check_dtypes()
        self._path.before_step(self._step)

    def _check_dtypes(self) -> None:
        """A note when the tracked parameters change dtype mid-run (``model.to(torch.bfloat16)``)."""
        params = self._plan.params if self._plan is not None else {}
        if self._run is None or all(p.dtype == d for p, d in zip(params.values(), self._dtypes)):
            return
        old = {str(d).replace("torch.", "") for d in self._dtypes}
        new = {str(p.dtype).replace("torch.", "") for p in params.values()}
        self._run.notes.append(
            f"step {self._step}: the tracked parameters changed dtype ({'/'.join(sorted(old))} → {'/'.join(sorted(new))}); "
            "the sums are taken in the wider of each parameter's and its buffer's dtype"
        )
        _note_low_precision(self._run, params, f"from step {self._step}: ")
        self._dtypes = [p.dtype for p in params.values()]

    def _safely(self, work: Any) -> None:
        """Run a hook's work; under on_error="note" an exception the paths did not handle
        themselves is noted (the step goes ahead) rather than raised into the training loop."""
        try:
            work()
        except Exception as exc:
            if self._on_error == "raise" or self._path is None:
                raise
            self._path._note_failure(self._step, "tracking the step", exc)

    def _post_step(self, optimizer: Any, args: Any, kwargs: Any) -> None:
        if self._closed or self._path is None:
            return
        try:
            self._after_step()
        finally:
            self._step += 1

    def _after_step(self) -> None:
        assert self._path is not None
        if self._closure_pending:  # an optimizer that never called its closure: the step went unmeasured
            self._closure_pending = False
            if self._run is not None:
                self._run.notes.append(f"step {self._step}: optimizer.step(closure) never called the closure; the step was not measured")
        path = self._path
        self._safely(lambda: path.after_step(self._step))

    # -- checkpoints (tracking/resume.py, docs/tracking.md "Resuming a run") -----------------
    def state_dict(self, rows: bool = True) -> dict[str, Any]:
        """The tracker's state between two steps, to save with the model's and the optimizer's
        (``torch.save``; ``torch.load(weights_only=True)`` reads it back): the step, the native
        core's clock and theory states, the run's notes and, unless ``rows=False``, its rows."""
        from . import resume

        if self._path is None or self._run is None:
            raise NothingToTrackError("state_dict: nothing tracked yet (no forward pass / optimizer step has been seen)")
        if self._dist is not None and not self._dist.owns_run:
            raise InvalidArgumentError("state_dict: under torch.distributed the tracker's state lives on rank 0")
        self._path.flush()
        return resume.export(self, rows)

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Continue the run of ``state`` (from ``state_dict()``): call it right after ``track()``,
        before the first step, with the same model, optimizer and settings (else a clear
        InvalidArgumentError). With discovery (``symmetries=None``) the state is checked now and
        applied at the first forward pass, once the groups are known."""
        from . import resume

        if self._closed or self._step > 0 or (self._run is not None and len(self._run.step_index)):
            raise InvalidArgumentError("load_state_dict: call it right after track(), before the first optimizer step")
        resume.parse(state)
        if self._path is None:
            self._resume = state
        else:
            resume.apply(self, state)

    def _apply_state(self, state: dict[str, Any]) -> None:
        from . import resume

        resume.apply(self, state)

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


# Trackers discovering right now (their find_symmetries runs the model: other trackers' hooks
# wait for a real forward).
_DISCOVERING = 0

# Relative rounding of one stored value (half an ulp at 1.0) per low-precision dtype name.
_ROUNDING = {"bfloat16": 2.0**-9, "float16": 2.0**-12}


def _note_low_precision(run: Run, params: dict[str, Any], when: str) -> None:
    """A note when tracked parameters are bfloat16/float16: every update is rounded to the
    parameter's dtype, which bounds the agreement of exact (and of the paper) with the measured
    charges (docs/tracking.md, "Low-precision parameters")."""
    low = sorted({str(p.dtype).replace("torch.", "") for p in params.values()} & set(_ROUNDING))
    if not low:
        return
    run.notes.append(
        when
        + f"parameters in {'/'.join(low)}: every update is rounded to the parameter's dtype (relative "
        + ", ".join(f"{_ROUNDING[d]:.1e} per entry in {d}" for d in low)
        + "), which the theories do not model: |exact − measured| / magnitude drifts by up to about "
        + ", ".join(f"{_DRIFT[d]:.0e} per step in {d}" for d in low)
        + " (float32: ~1e-7 over a run; docs/tracking.md, \"Low-precision parameters\")"
    )


# How fast exact drifts from the measured charges per dtype, as a fraction of the magnitude per
# step: an upper bound of what SGD with momentum measured on the tests' MLP over 200 steps
# (bfloat16 0.11, float16 0.034 after 200 steps; docs/tracking.md).
_DRIFT = {"bfloat16": 1e-3, "float16": 3e-4}


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


#: How summary() labels the paper column of an optimizer other than torch.optim.SGD.
PAPER_FORM_LABEL = "the paper's form applied to the optimizer's update"


def update_rule(optimizer: Any) -> tuple[bool, float]:
    """(decoupled, beta1) of an optimizer other than torch.optim.SGD (docs/theory.md §5.5):
    whether its weight decay is decoupled (θ ← (1 − ηλ)θ − ηu: torch.optim.AdamW, and Adam,
    NAdam, RAdam with ``decoupled_weight_decay=True``) rather than added to the gradient, and
    its first-moment β1 (``betas[0]``; 0 without betas). Read from the first param_group at
    set-up."""
    import torch

    group = optimizer.param_groups[0] if optimizer.param_groups else {}
    decoupled = bool(group.get("decoupled_weight_decay", isinstance(optimizer, torch.optim.AdamW)))
    betas = group.get("betas")
    try:
        beta1 = float(betas[0]) if betas is not None else 0.0
    except (TypeError, ValueError, IndexError):
        beta1 = 0.0
    return decoupled, beta1 if 0.0 <= beta1 < 1.0 else 0.0


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
    max_bytes: int | None = None,
    log_to: Any = None,
    log_every: int = 50,
    log_histograms: bool = False,
    log_figures: bool = True,
    class_axis: int = 1,
    on_error: str = "note",
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
        memory_limit: bytes the run's records may take in memory (rows, per-layer aggregates,
            and what saving reads back); older rows spill to ``spill_dir`` (a temporary folder by
            default). None keeps everything in memory.
        max_bytes: the byte budget of the saved run's per-group rows and per-layer aggregates
            (before compression), e.g. ``2**30``: past it the stored steps are thinned, dense
            early and sparser later, the first and last step and every learning-rate change kept;
            the per-layer aggregates (``run.to_pandas(per="layer")``) keep every recorded step.
            None (the default) keeps every recorded row (docs/tracking.md, "Storage").
        log_to: a TensorBoard ``SummaryWriter``, a wandb run, a Lightning logger, "tensorboard",
            "wandb", or a list of them: per-layer scalars every ``log_every`` steps, the summary
            table and the report's figures at close (``log_figures``), per-neuron histograms of
            the charges only with ``log_histograms`` (docs/integrations.md).
        class_axis: the logits' class axis for discovery (``find_symmetries``): 1, PyTorch's
            convention, or -1 for ``(B, T, V)`` language-model logits.
        on_error: what a failure of the tracker inside ``optimizer.step()`` does (NaN/Inf
            gradients, a full disk while spilling, a dtype change): "note" (the default) records
            it in ``run.notes``, leaves that step's values NaN and lets the step go ahead exactly
            as untracked; "raise" raises it (non-finite sums before the optimizer moves anything).

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
        max_bytes=max_bytes,
        log_to=log_to,
        log_every=log_every,
        log_histograms=log_histograms,
        log_figures=log_figures,
        class_axis=class_axis,
        on_error=on_error,
    )


def _integer(name: str, value: Any, least: int) -> int:
    """Any integer type (int, np.int64: whatever has __index__), never a bool or a float."""
    import operator

    try:
        n = operator.index(value) if not isinstance(value, bool) else None
    except TypeError:
        n = None
    if n is None or n < least:
        raise InvalidArgumentError(f"{name} must be an integer >= {least}, got {value!r}")
    return n


def _spill_folder(spill_dir: Any) -> str:
    """``spill_dir`` as a writable folder path (created if missing), or a clear error now."""
    import os

    from ..errors import RunIOError

    if isinstance(spill_dir, bytes) or not isinstance(spill_dir, (str, os.PathLike)):
        raise InvalidArgumentError(f"spill_dir must be a folder path (str or os.PathLike) or None, got {spill_dir!r}")
    path = os.fspath(spill_dir)
    if not isinstance(path, str) or not path:
        raise InvalidArgumentError(f"spill_dir must be a folder path, got {spill_dir!r}")
    if os.path.exists(path) and not os.path.isdir(path):
        raise InvalidArgumentError(f"spill_dir {path!r} exists and is not a folder")
    try:
        os.makedirs(path, exist_ok=True)
    except OSError as exc:
        raise RunIOError(f"spill_dir {path!r}: cannot create the folder ({exc})") from None
    if not os.access(path, os.W_OK | os.X_OK):
        raise RunIOError(f"spill_dir {path!r}: the folder is not writable")
    return path
