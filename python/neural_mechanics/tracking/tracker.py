"""`track(model, optimizer)`: attach to an unmodified training loop through optimizer hooks.

torch.optim.SGD (the closed forms and the exact ledger): one fused pass before each step over
(θ_n, ĝ_n, b_{n−1}) gives everything (tracking/sgd.py). Any other optimizer (Adam, AdamW, ...):
θ_n is copied before the step (memory: one copy of the tracked parameters, plus one temporary of
the same size during the post-step pass) and the applied update is measured after it; the exact
column is then bookkeeping and the paper column is NaN.

The per-step path is written for small networks, where a step takes a few milliseconds: the
plan is compiled once, every per-part quantity travels as one column of a matrix so that signed
sums into columns and groups are a few reduceat calls, hyperparameter-derived values are cached
per distinct hyperparameter setting, and steps that are not measured (``every > 1``) only note
their hyperparameters; the paper's streams catch up at the next measurement.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any

import numpy as np

from .. import _native, theory
from ..errors import InvalidArgumentError, NothingToTrackError
from ..run import COLUMNS, GroupInfo, Run
from .plan import Plan, build_plan
from .reducers import KernelPlan, Pending, RustReducer, choose

KINDS = ("translation", "scale", "rescale")
# Columns of the per-part matrix that is summed into columns and groups with signs (the order of
# src/tracking.rs COLUMN_FIELDS), and the per-group values of its GROUP_FIELDS.
_CHARGE, _FLUX, _GG, _UU, _E, _DRIVE, _SU, _BDOT = range(8)
_GROUP_FIELDS = ("measured", "flux", "grad_sq", "update_sq", "update_sum", "magnitude", "residual")
# Where the per-group values land in a Run's row (COLUMNS order).
_ROW_HYPER = slice(0, 4)
assert COLUMNS[_ROW_HYPER] == ("lr", "momentum", "dampening", "weight_decay")
_ROW_GROUP_FIELDS = np.array([COLUMNS.index(c) for c in _GROUP_FIELDS])
_ROW_PREDICTIONS = slice(COLUMNS.index("paper"), COLUMNS.index("paper") + 2)
assert COLUMNS[_ROW_PREDICTIONS] == ("paper", "exact")  # the rows of TrackerLanes.predictions()

_EMPTY, _NO_ROWS = np.zeros(0), np.zeros(0, dtype=np.int64)
Hyper = tuple  # per param_group: (lr, momentum, dampening, weight_decay, nesterov)


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
        import torch

        for name, value in (("every", every), ("record_every", record_every)):
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise InvalidArgumentError(f"{name} must be an integer >= 1, got {value!r}")
        if not isinstance(optimizer, torch.optim.Optimizer):
            raise InvalidArgumentError(f"optimizer must be a torch.optim.Optimizer, got {type(optimizer).__name__}")
        from .distributed import attach

        # torch.distributed (DDP / FSDP2): None for an ordinary model. DDP: track the wrapped module.
        self._dist = attach(model)
        self.model = model if self._dist is None else self._dist.module
        self.optimizer = optimizer
        self.every = every
        self.record_every = record_every
        self._stride = every * record_every // math.gcd(every, record_every)
        self._sgd = type(optimizer) is torch.optim.SGD and not any(g.get("maximize", False) for g in optimizer.param_groups)
        self._reducer_kind = reducer
        self._memory_limit = memory_limit
        self._spill_dir = spill_dir
        self._handles: list[Any] = []
        self._plan: Plan | None = None
        self._run: Run | None = None
        self._step = 0
        self._closed = False
        self._queue: list[Callable[[], None]] = []  # delayed measurements, oldest first
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
        parts_per_group = np.diff(np.append(plan.group_part_starts, len(plan.part_sign)))
        self._part_translation = np.repeat(plan.group_kind == 0, parts_per_group)
        cols_per_group = np.diff(np.append(plan.group_column_starts, len(plan.column_group)))
        self._single_column = cols_per_group[plan.column_group] == 1
        self._first_pg = plan.column_param_group[plan.group_column_starts]
        column_kind = plan.group_kind[plan.column_group]
        # Lanes: the columns of one (kind, param_group); each lane runs its own theory streams.
        self._lanes = []
        for kind in range(3):
            for pg in np.unique(plan.column_param_group):
                cols = np.flatnonzero((column_kind == kind) & (plan.column_param_group == pg))
                if cols.size:
                    self._lanes.append({"kind": KINDS[kind], "pg": int(pg), "cols": cols, "paper_cols": cols[self._single_column[cols]]})
        self._core = _native.TrackerPlan(
            np.append(plan.row_starts, len(plan.row_order)).astype(np.int64),
            plan.row_order,
            plan.part_sign.astype(np.float64),
            self._part_translation.astype(np.int64),
            np.repeat(np.arange(len(plan.column_starts)), np.diff(np.append(plan.column_starts, len(plan.part_sign)))).astype(np.int64),
            np.repeat(np.arange(plan.n_groups), parts_per_group).astype(np.int64),
            plan.part_size.astype(np.float64),
            plan.column_group,
            (plan.group_kind == 0).astype(np.int64),
            plan.group_size.astype(np.float64),
        )
        offsets = plan.reduction_offsets
        # Rows whose buffer sums the extra reductions give (the translation parts' ⟨1, b⟩).
        self._translation_rows = np.concatenate(
            [np.arange(offsets[i], offsets[i + 1]) for i, t in enumerate(plan.translation_reductions) if t] or [np.zeros(0, np.int64)]
        ).astype(np.int64)
        self._reducer = choose([named[n] for n in plan.params], self._reducer_kind)
        # The Rust kernel in this process reads tensors by address: its specs are compiled once.
        self._kernel_plan = KernelPlan(plan.reductions, plan.params, plan.translation_reductions) if isinstance(self._reducer, RustReducer) else None
        # (name, parameter) in the order of first appearance in plan.reductions: KernelPlan.names,
        # and the order in which "no gradient" notes are written.
        self._tracked = [(name, plan.params[name]) for name in dict.fromkeys(r.name for r in plan.reductions)]
        info = GroupInfo.from_groups(kept, plan.group_size)
        run = self._run = Run(
            groups=info,
            optimizer=type(self.optimizer).__name__,
            skipped=skipped,
            max_rows_in_memory=None if self._memory_limit is None else Run.rows_for_memory(len(info), self._memory_limit),
            spill_dir=self._spill_dir,
        )
        for gi in np.flatnonzero(cols_per_group > 1):
            g = kept[gi]
            run.paper_notes[(g.symmetry, g.layer)] = (
                "parts in param_groups with different hyperparameters: no closed form (THEORY §5.3); exact sums per-part ledgers"
            )
        if not self._sgd:
            for g in kept:
                run.paper_notes[(g.symmetry, g.layer)] = (
                    f"closed forms hold for torch.optim.SGD only; {type(self.optimizer).__name__}: "
                    "exact is bookkeeping of the measured update (see theory.equilibrium_*)"
                )
        elif any(g.get("nesterov", False) for g in self.optimizer.param_groups):
            for g in kept:
                run.paper_notes.setdefault(
                    (g.symmetry, g.layer), "nesterov: the paper's heavy-ball oscillator is an approximation here (exact holds)"
                )
        if self.every > 1:
            run.exact_note = f"exact needs every step; every={self.every} leaves it NaN"
        self._time = np.zeros(len(self.optimizer.param_groups))
        self._streams: Any = None  # _native.TrackerLanes, from the first measurement
        self._held_drive = np.zeros(len(plan.column_group))
        self._idle: list[Hyper] = []  # hyperparameters of unmeasured steps, not yet seen by the paper
        self._snapshot: dict[str, Any] | None = None
        self._measured_this_step = False
        self._cache: dict[tuple, Any] = {}
        self._reported_no_grad: set[str] = set()
        self._regimes_noted: dict[str, Any] | None = None  # the hyper whose regimes the run has last noted

    # -- hyperparameters ---------------------------------------------------------------------
    def _read_hyper(self) -> Hyper:
        return tuple(
            (float(g["lr"]), float(g.get("momentum", 0.0)), float(g.get("dampening", 0.0)), float(g.get("weight_decay", 0.0)), bool(g.get("nesterov", False)))
            for g in self.optimizer.param_groups
        )

    def _hyper(self, h: Hyper) -> dict[str, Any]:
        """Arrays per param_group and per part, and the regime, for one hyperparameter setting."""
        cached = self._cache.get(h)
        if cached is not None:
            return cached
        plan = self._plan
        assert plan is not None
        lr, mom, damp, wd, nest = (np.array(v, dtype=float if i < 4 else bool) for i, v in enumerate(zip(*h)))
        pg = plan.part_param_group
        regimes = {}
        for lane in self._lanes:
            p = lane["pg"]
            try:
                regimes[lane["kind"]] = theory.regime(lr=lr[p], momentum=mom[p], dampening=damp[p], weight_decay=wd[p])
            except Exception:  # noqa: BLE001 - a regime is a label, never a reason to stop training
                regimes[lane["kind"]] = "n/a"
        # t_{n+1} = t_n + η_n(1 − d_n); PyTorch ignores dampening without momentum.
        dt = lr * (1 - np.where(mom > 0, damp, 0.0))
        core_hyper = tuple(np.ascontiguousarray(a[pg], dtype=np.float64) for a in (mom, damp, wd, nest))
        out = {"lr": lr, "momentum": mom, "dampening": damp, "weight_decay": wd, "nesterov": nest, "core": core_hyper, "regimes": regimes, "dt": dt}
        # per-group hyperparameter columns of the Run (each group's first param_group)
        # per lane: its param_group's hyperparameters as the native streams take them
        out["lanes"] = [(float(lr[p]), float(mom[p]), float(damp[p]), float(wd[p]), bool(nest[p])) for p in (lane["pg"] for lane in self._lanes)]
        # A Run row (COLUMNS order) with this setting's per-group hyperparameters filled in.
        out["row"] = np.full((len(COLUMNS), plan.n_groups), np.nan)
        out["row"][_ROW_HYPER] = np.stack([a[self._first_pg] for a in (lr, mom, damp, wd)])
        if len(self._cache) > 4096:  # a schedule that changes every step: do not grow without bound
            self._cache.clear()
        self._cache[h] = out
        return out

    # -- per-step work -----------------------------------------------------------------------
    def _pre_step(self, optimizer: Any, args: Any, kwargs: Any) -> None:
        if self._closed:
            return
        if self._plan is None:
            raise NothingToTrackError(
                "track(symmetries=None) discovers groups from the first forward pass of the model, "
                "but optimizer.step() came before any forward pass"
            )
        self._flush()  # the previous step's delayed results, before anything of this step
        h = self._read_hyper()
        hyper = self._hyper(h)
        measure = self._step % self.every == 0
        self._measured_this_step = measure
        if not self._sgd:
            if measure:
                self._snapshot = {name: p.detach().clone() for name, p in self._plan.params.items()}
            return
        if measure:
            pending, has_buffer = self._submit_sgd()
            step, time = self._step, self._time  # no copy: _advance_time rebinds, never writes in place
            self._defer(lambda: self._process_sgd(pending, has_buffer, hyper, step, time))
        else:
            self._idle.append(h)
        self._advance_time(hyper)

    def _advance_time(self, hyper: dict[str, Any]) -> None:
        dt = hyper["dt"]
        if len(dt) != len(self._time):  # optimizer.add_param_group() during training
            self._time = np.pad(self._time, (0, len(dt) - len(self._time)))
        self._time = self._time + dt

    def _post_step(self, optimizer: Any, args: Any, kwargs: Any) -> None:
        if self._closed or self._plan is None:
            return
        if not self._sgd:
            hyper = self._hyper(self._read_hyper())
            if self._measured_this_step and self._snapshot is not None:
                self._submit_generic(hyper)
            self._advance_time(hyper)
            self._snapshot = None
        self._step += 1

    def _view(self, r: Any) -> Callable[[Any], Any]:
        """A reduction's view of a tensor (FSDP2: row ranges stay lazy, see distributed.RowRange)."""
        return r.view if self._dist is None else self._dist.view(r)

    def _no_grad(self, name: str, p: Any) -> Any:
        """A tracked parameter without a gradient at this step: reported once, read as zeros."""
        if name not in self._reported_no_grad:
            self._reported_no_grad.add(name)
            assert self._run is not None
            self._run.notes.append(
                f"step {self._step}: {name} had no gradient; the optimizer skipped it, so the exact ledger of its groups "
                "no longer accounts for every step from here"
            )
        return _zeros(p)

    def _defer(self, work: Callable[[], None]) -> None:
        self._queue.append(work)
        if not self._reducer.delayed:
            self._flush()

    def _flush(self) -> None:
        while self._queue:
            self._queue.pop(0)()

    def _submit(self, items: list[tuple], sum_only: list[Any]) -> Pending:
        """Reduce every item, plus a plain sum of each tensor in ``sum_only`` (None: skipped)."""
        plan = self._plan
        assert plan is not None
        extra = [(t, None, None, r.axis, r.block) for r, t in zip(plan.reductions, sum_only) if t is not None]
        return self._reducer.submit_blocks(items, extra)

    def _parse(self, blocks: tuple[np.ndarray, np.ndarray | None], sum_only: list[Any]) -> tuple[np.ndarray, np.ndarray | None]:
        """Per-part sums (parts, K) and per-part plain sums of the extra tensors (or None)."""
        plan = self._plan
        assert plan is not None
        main, extra = blocks
        parts = plan.reduce_parts(main)
        if extra is None:
            return parts, None
        offsets = plan.reduction_offsets
        extra_rows = np.zeros(offsets[-1])
        at = 0
        for i, t in enumerate(sum_only):
            if t is not None:
                n = offsets[i + 1] - offsets[i]
                extra_rows[offsets[i] : offsets[i + 1]] = extra[at : at + n, 0]
                at += n
        return parts, plan.reduce_parts(extra_rows[:, None])[:, 0]

    def _submit_sgd(self) -> tuple[Pending, bool]:
        """Reduce (θ_n, ĝ_n, b_{n−1}) per reduction, and b_{n−1} again where a plain sum is needed.

        Also says whether any momentum buffer exists (then every reduction carries one)."""
        plan = self._plan
        assert plan is not None
        state = self.optimizer.state
        tensors = []
        for name, p in self._tracked:
            st = state.get(p)  # .get: optimizer.state is a defaultdict, [p] would add an entry
            grad = p.grad
            tensors.append([p, grad if grad is not None else self._no_grad(name, p), None if st is None else st.get("momentum_buffer")])
        has_buffer = any(t[2] is not None for t in tensors)
        if has_buffer:
            for t in tensors:
                if t[2] is None:
                    t[2] = _zeros(t[0])  # a parameter that has not had a gradient yet: SGD gave it no buffer
        if self._kernel_plan is not None:
            return self._reducer.submit_tensors(self._kernel_plan, tensors, has_buffer), has_buffer
        by_name = {name: t for (name, _), t in zip(self._tracked, tensors)}
        items, sum_only = [], []
        for r, is_translation in zip(plan.reductions, plan.translation_reductions):
            p, grad, buf = by_name[r.name]
            view = self._view(r)
            items.append((view(p), view(grad), None if buf is None else view(buf), r.axis, r.block))
            sum_only.append(view(buf) if has_buffer and is_translation else None)
        return self._submit(items, sum_only), has_buffer

    def _process_sgd(self, pending: Pending, has_buffer: bool, hyper: dict[str, Any], step: int, time: np.ndarray) -> None:
        main, extra = pending.result()
        buffer_sum = buffer_rows = None
        if has_buffer:  # ⟨1, b⟩ of the translation rows (the extra block); other rows read 0
            if extra is None:
                buffer_sum, buffer_rows = _EMPTY, _NO_ROWS
            else:
                buffer_sum, buffer_rows = np.ascontiguousarray(extra[:, 0]), self._translation_rows
        # One call: per-part SGD algebra (tracking/sgd.py, in Rust), signed sums into columns and
        # groups, magnitudes and constraint residuals.
        momentum, dampening, weight_decay, nesterov = hyper["core"]  # per part
        cols, groups = self._core.measure_sgd(np.ascontiguousarray(main), buffer_sum, momentum, dampening, weight_decay, nesterov, buffer_rows)
        if self._streams is None:
            self._init_streams(cols[:, _CHARGE], cols[:, _BDOT] if has_buffer else None, hyper)
        self._catch_up_paper()
        self._record(step, time, groups, hyper)
        self._held_drive = np.ascontiguousarray(cols[:, _DRIVE])
        self._advance_paper(hyper, self._held_drive)
        if self.every == 1:
            self._advance_ledger(hyper, cols)

    # -- theory streams ----------------------------------------------------------------------
    def _init_streams(self, columns_y0: np.ndarray, buffer_dot0: np.ndarray | None, hyper: dict[str, Any]) -> None:
        """The lanes' streams (native: one call per step advances them all) from the first measurement."""
        plan = self._plan
        assert plan is not None
        exact = "none" if self.every > 1 else "ledger" if self._sgd else "measured"
        columns_y0 = np.ascontiguousarray(columns_y0)
        bd = None if buffer_dot0 is None else np.ascontiguousarray(buffer_dot0)
        streams = _native.TrackerLanes(plan.column_group, plan.n_groups)
        for lane in self._lanes:
            pcols, pg = lane["paper_cols"], lane["pg"]
            ydot0 = None
            if bd is not None and hyper["momentum"][pg] > 0 and pcols.size:
                # ẏ(0) from the buffer that existed before tracking (THEORY §5.2).
                factor = -1.0 if lane["kind"] == "translation" else -2.0
                ydot0 = factor * bd[pcols] / (1 - hyper["dampening"][pg])
            paper = bool(self._sgd and pcols.size)
            streams.add_lane(lane["kind"], lane["cols"], pcols, exact, columns_y0, bd if exact == "ledger" else None, paper, ydot0)
        self._streams = streams

    def _advance_paper(self, hyper: dict[str, Any], drive: np.ndarray) -> None:
        """One step of every lane's paper stream; ``drive`` (columns,) contiguous."""
        assert self._streams is not None
        # A lane whose closed form fails stops there (e.g. momentum switched between zero and
        # non-zero mid-run); the others go on.
        for lane, why in self._streams.advance_paper(drive, hyper["lanes"]):
            assert self._run is not None
            self._run.notes.append(f"paper closed form stopped at step {self._step} for {self._lanes[lane]['kind']}: {why}")

    def _catch_up_paper(self) -> None:
        """Advance the paper's streams over unmeasured steps with the last measured drive."""
        idle, self._idle = self._idle, []
        for h in idle:
            self._advance_paper(self._hyper(h), self._held_drive)

    def _advance_ledger(self, hyper: dict[str, Any], cols: np.ndarray) -> None:
        assert self._streams is not None
        self._streams.advance_ledger(cols, hyper["lanes"])

    def _predictions(self) -> np.ndarray:
        """Current predictions per group, rows (paper, exact) (NaN where a theory does not apply)."""
        assert self._streams is not None
        return self._streams.predictions()

    def _record(self, step: int, time: np.ndarray, groups: np.ndarray, hyper: dict[str, Any]) -> None:
        """Note the regimes and append a row; ``groups`` (groups, 7) holds the _GROUP_FIELDS."""
        run = self._run
        assert run is not None
        if hyper is not self._regimes_noted:  # the same setting as last time: nothing new to note
            for kind, reg in hyper["regimes"].items():
                run.note_regime(kind, reg)
            self._regimes_noted = hyper
        if step % self._stride:
            return
        # A run's clock is the first param_group's (mixed groups are rare; their lr column differs).
        # The setting's row template goes straight into the run, the measured values over it.
        run.append_row(
            step, float(time[self._first_pg[0]]), hyper["row"], (_ROW_GROUP_FIELDS, groups.T), (_ROW_PREDICTIONS, self._predictions())
        )

    # -- any other optimizer -----------------------------------------------------------------
    def _submit_generic(self, hyper: dict[str, Any]) -> None:
        """θ_n (the snapshot), ĝ_n and the applied update d_n = θ_n − θ_{n+1} in one pass."""
        plan = self._plan
        assert plan is not None and self._snapshot is not None
        deltas = {name: snap - plan.params[name].detach() for name, snap in self._snapshot.items()}
        items, sum_only = [], []
        for r, is_translation in zip(plan.reductions, plan.translation_reductions):
            p = plan.params[r.name]
            grad = p.grad if p.grad is not None else _zeros(p)
            view = self._view(r)
            delta = view(deltas[r.name])
            items.append((view(self._snapshot[r.name]), view(grad), delta, r.axis, r.block))
            sum_only.append(delta if is_translation else None)
        pending = self._submit(items, sum_only)
        step, time = self._step, self._time.copy()
        self._defer(lambda: self._process_generic(pending, sum_only, hyper, step, time))

    def _process_generic(self, pending: Pending, sum_only: list[Any], hyper: dict[str, Any], step: int, time: np.ndarray) -> None:
        plan = self._plan
        assert plan is not None
        main, _ = blocks = pending.result()
        # Charges, fluxes, magnitudes and residuals: the Rust bookkeeping on the (θ_n, ĝ_n) sums,
        # with no momentum and no decay (its update columns are not used here).
        zeros = np.zeros(len(plan.part_sign))
        cols, groups = self._core.measure_sgd(np.ascontiguousarray(main[:, :5]), None, zeros, zeros, zeros, zeros)
        parts, d_sum = self._parse(blocks, sum_only)
        d_sum = np.zeros(len(parts)) if d_sum is None else d_sum
        dd, td = parts[:, 5], parts[:, 6]
        t = self._part_translation
        lr = hyper["lr"][plan.part_param_group]
        safe_lr = np.where(lr > 0, lr, 1.0)
        # The measured update d_n = θ_n − θ_{n+1}: |u|², ⟨1, u⟩ (u = d/η), and the exact change
        # y_{n+1} − y_n = −2⟨θ_n, d_n⟩ + |d_n|² (scale, rescale), −⟨1, d_n⟩ (translation).
        update = plan.to_columns(np.column_stack([dd / safe_lr**2, d_sum / safe_lr, np.where(t, -d_sum, -2 * td + dd)]))
        update_groups = plan.to_groups(update)
        if self._streams is None:
            self._init_streams(cols[:, _CHARGE], None, hyper)
        groups[:, _GROUP_FIELDS.index("update_sq")] = update_groups[:, 0]
        groups[:, _GROUP_FIELDS.index("update_sum")] = np.where(plan.group_kind == 0, update_groups[:, 1], np.nan)
        self._record(step, time, groups, hyper)
        if self.every == 1:
            assert self._streams is not None
            self._streams.advance_measured(np.ascontiguousarray(update[:, 2]))

    # -- results -----------------------------------------------------------------------------
    @property
    def run(self) -> Run:
        """The run so far, its last row measured from the parameters as they are now."""
        if self._dist is not None:  # rank != 0: a stub; FSDP2: a collective until close()
            out = self._dist.run(self)
            if out is not None:
                return out
        if self._run is None:
            raise NothingToTrackError("nothing recorded yet: no forward pass / optimizer step has been seen")
        if not self._closed:  # after close() the last row stays as it was measured then
            self._refresh_final()
        return self._run

    def _refresh_final(self) -> None:
        plan, run = self._plan, self._run
        assert plan is not None and run is not None
        self._flush()
        if self._streams is None:
            return
        self._catch_up_paper()
        items = [(self._view(r)(plan.params[r.name]), None, None, r.axis, r.block) for r in plan.reductions]
        parts = plan.reduce_parts(self._reducer.submit_blocks(items).result()[0])
        t = self._part_translation
        measured = plan.to_groups(plan.to_columns(np.where(t, parts[:, 0], parts[:, 1])))
        x_abs = plan.parts_to_groups_unsigned(parts[:, 1])
        paper, exact = self._predictions()
        run.final = {
            "step": self._step,
            "time": float(self._time[self._first_pg[0]]),
            "measured": measured,
            "magnitude": np.where(plan.group_kind == 0, np.sqrt(plan.group_size * x_abs), x_abs),
            "paper": paper,
            "exact": exact,
        }

    def close(self) -> None:
        """Remove every hook; the run stays readable."""
        if self._closed:
            return
        if self._run is not None and self._plan is not None:
            self._refresh_final()
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


def _zeros(p: Any) -> Any:
    import torch

    return torch.zeros_like(p)


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
