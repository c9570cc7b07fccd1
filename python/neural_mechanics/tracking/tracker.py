"""`track(model, optimizer)`: attach to an unmodified training loop through optimizer hooks.

torch.optim.SGD (the closed forms and the exact ledger): one fused pass before each step over
(θ_n, ĝ_n, b_{n−1}) gives everything (tracking/sgd.py). Any other optimizer (Adam, AdamW, ...):
θ_n is copied before the step (memory: one copy of the tracked parameters, plus one temporary of
the same size during the post-step pass) and the applied update is measured after it; the exact
column is then bookkeeping and the paper column is NaN.
"""

from __future__ import annotations

import math
from typing import Any, Callable

import numpy as np

from .. import theory
from ..errors import InvalidArgumentError, NothingToTrackError
from ..run import GroupInfo, Run
from .plan import KIND_CODE, Plan, build_plan
from .reducers import Pending, choose
from .sgd import PartSums, step_quantities

KINDS = ("translation", "scale", "rescale")
# A group's mean squared gradient entry below this fraction of the model's counts as no gradient.
NO_GRADIENT = 1e-8


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
        self.model = model
        self.optimizer = optimizer
        self.every = every
        self.record_every = record_every
        self._reducer_kind = reducer
        self._memory_limit = memory_limit
        self._spill_dir = spill_dir
        self._queue: list[Callable[[], None]] = []  # delayed measurements, oldest first
        self._stride = every * record_every // math.gcd(every, record_every)
        self._sgd = type(optimizer) is torch.optim.SGD and not any(g.get("maximize", False) for g in optimizer.param_groups)
        self._handles: list[Any] = []
        self._plan: Plan | None = None
        self._run: Run | None = None
        self._step = 0
        self._closed = False
        if symmetries is None:
            self._handles.append(model.register_forward_pre_hook(self._discover, with_kwargs=True))
        else:
            self._setup(symmetries)
        self._handles.append(optimizer.register_step_pre_hook(self._pre_step))
        self._handles.append(optimizer.register_step_post_hook(self._post_step))

    # -- set-up ------------------------------------------------------------------------------
    def _discover(self, module: Any, args: tuple, kwargs: dict) -> None:
        from ..symmetries import find_symmetries

        self._handles[0].remove()  # one look at the example input is enough
        example = args[0] if len(args) == 1 and not kwargs else args
        self._setup(find_symmetries(self.model, example))

    def _setup(self, symmetries: Any) -> None:
        named = dict(self.model.named_parameters())
        param_group_of: dict[str, int] = {}
        by_id = {id(p): i for i, g in enumerate(self.optimizer.param_groups) for p in g["params"]}
        skipped: dict[str, str] = dict(getattr(symmetries, "skipped", {}) or {})
        for name, p in named.items():
            if id(p) in by_id:
                param_group_of[name] = by_id[id(p)]
        kept = []
        for g in symmetries:
            bad = [n for n, _, _ in g.parts if n not in param_group_of or not named[n].requires_grad]
            if bad:
                why = "frozen (requires_grad=False)" if all(n in named and not named[n].requires_grad for n in bad) else "not in the optimizer"
                skipped[f"{g.symmetry} {g.layer} #{g.index}"] = f"parameter {bad[0]} is {why}"
                continue
            kept.append(g)
        if not kept:
            raise NothingToTrackError(
                "no symmetry group to track: "
                + ("the model has none" if not list(symmetries) else "every group touches a frozen or unoptimised parameter")
                + (f" (skipped: {dict(list(skipped.items())[:5])})" if skipped else "")
            )
        self._plan = build_plan(kept, named, param_group_of)
        plan = self._plan
        self._part_kind = plan.group_kind[np.repeat(np.arange(plan.n_groups), np.diff(np.append(plan.group_part_starts, len(plan.part_sign))))]
        self._column_kind = plan.group_kind[plan.column_group]
        n_cols_per_group = np.diff(np.append(plan.group_column_starts, len(plan.column_group)))
        self._single_column = n_cols_per_group[plan.column_group] == 1
        # Lanes: the columns of one (kind, param_group); each lane runs its own theory streams.
        self._lanes = []
        for kind in range(3):
            for pg in np.unique(plan.column_param_group):
                cols = np.flatnonzero((self._column_kind == kind) & (plan.column_param_group == pg))
                if cols.size:
                    self._lanes.append({"kind": KINDS[kind], "pg": int(pg), "cols": cols, "paper_cols": cols[self._single_column[cols]]})
        self._reducer = choose([named[n] for n in plan.params if n in named], self._reducer_kind)
        info = GroupInfo.from_groups(kept, plan.group_size)
        self._run = Run(
            groups=info,
            optimizer=type(self.optimizer).__name__,
            skipped=skipped,
            max_rows_in_memory=None if self._memory_limit is None else Run.rows_for_memory(len(info), self._memory_limit),
            spill_dir=self._spill_dir,
        )
        run = self._run
        for gi in np.flatnonzero(n_cols_per_group > 1):
            g = kept[gi]
            run.paper_notes[(g.symmetry, g.layer)] = "parts in param_groups with different hyperparameters: no closed form (THEORY §5.3); exact sums per-part ledgers"
        if not self._sgd:
            for g in kept:
                run.paper_notes[(g.symmetry, g.layer)] = (
                    f"closed forms hold for torch.optim.SGD only; {type(self.optimizer).__name__}: exact is bookkeeping of the measured update (see theory.equilibrium_*)"
                )
        nesterov = self._sgd and any(g.get("nesterov", False) for g in self.optimizer.param_groups)
        if nesterov:
            for g in kept:
                run.paper_notes.setdefault(
                    (g.symmetry, g.layer), "nesterov: the paper's heavy-ball oscillator is an approximation here (exact holds)"
                )
        if self.every > 1:
            run.exact_note = f"exact needs every step; every={self.every} leaves it NaN"
        self._time = np.zeros(len(self.optimizer.param_groups))
        self._streams: dict[int, dict[str, Any]] | None = None
        self._held_drive = np.zeros(len(plan.column_group))
        self._snapshot: dict[str, Any] | None = None
        self._measured_this_step = False

    # -- per-step work -----------------------------------------------------------------------
    def _hyper(self) -> dict[str, np.ndarray]:
        pgs = self.optimizer.param_groups
        get = lambda key, default: np.array([float(g.get(key, default)) for g in pgs])  # noqa: E731
        return {
            "lr": get("lr", 0.0),
            "momentum": get("momentum", 0.0),
            "dampening": get("dampening", 0.0),
            "weight_decay": get("weight_decay", 0.0),
            "nesterov": np.array([bool(g.get("nesterov", False)) for g in pgs]),
        }

    def _submit(self, items: list[tuple], sum_only: list[Any]) -> Pending:
        """Reduce every item, plus a plain sum of each tensor in ``sum_only`` (None: skipped)."""
        extra = [(t, None, None, r.axis, r.block) for r, t in zip(self._plan.reductions, sum_only) if t is not None]
        return self._reducer.submit(list(items) + extra)

    def _parse(self, results: list[np.ndarray], sum_only: list[Any]) -> tuple[np.ndarray, np.ndarray | None]:
        """Per-part sums (parts, K) and per-part plain sums of the extra tensors (or None)."""
        plan = self._plan
        assert plan is not None
        n = len(plan.reductions)
        parts = plan.reduce_parts(np.concatenate(results[:n], axis=0))
        if not any(t is not None for t in sum_only):
            return parts, None
        offsets = np.cumsum([0] + plan.reduction_rows)
        extra_rows = np.zeros(offsets[-1])
        extras = iter(results[n:])
        for i, t in enumerate(sum_only):
            if t is not None:
                extra_rows[offsets[i] : offsets[i + 1]] = next(extras)[:, 0]
        return parts, plan.reduce_parts(extra_rows[:, None])[:, 0]

    def _sgd_items(self) -> tuple[list[tuple], list[Any], bool]:
        """(θ_n, ĝ_n, b_{n−1}) per reduction, and b_{n−1} again where a plain sum is needed."""
        plan = self._plan
        assert plan is not None
        state = self.optimizer.state
        has_buffer = any(state.get(plan.params[r.name], {}).get("momentum_buffer") is not None for r in plan.reductions)
        items, sum_only = [], []
        for r, is_translation in zip(plan.reductions, plan.translation_reductions):
            p = plan.params[r.name]
            grad = p.grad if p.grad is not None else _zeros(p)
            buf = state.get(p, {}).get("momentum_buffer") if has_buffer else None
            if has_buffer and buf is None:
                buf = _zeros(p)
            items.append((r.view(p), r.view(grad), None if buf is None else r.view(buf), r.axis, r.block))
            sum_only.append(r.view(buf) if has_buffer and is_translation else None)
        return items, sum_only, has_buffer

    def _group_view(self, p: PartSums) -> dict[str, np.ndarray]:
        """Group-level measured charge, flux, magnitude and constraint residual from part sums."""
        plan = self._plan
        assert plan is not None
        translation = self._part_kind == 0
        charge = plan.to_groups(plan.to_columns(np.where(translation, p.q, p.x)))
        flux = plan.to_groups(plan.to_columns(np.where(translation, p.gs, p.s)))
        x_abs = plan.parts_to_groups_unsigned(p.x)
        is_t = plan.group_kind == 0
        magnitude = np.where(is_t, np.sqrt(plan.group_size * x_abs), x_abs)
        with np.errstate(invalid="ignore", divide="ignore"):
            norm_prod = plan.parts_to_groups_unsigned(np.sqrt(p.gg * p.x))
            g_abs = plan.parts_to_groups_unsigned(p.gg)
            denom = np.where(is_t, np.sqrt(plan.group_size * g_abs), norm_prod)
            residual = np.abs(flux) / np.where(denom > 0, denom, 1.0)
        # A group whose gradient is at float rounding level (a bias before BatchNorm, a dead
        # unit) proves nothing (THEORY §3): its residual is NaN, "no gradient".
        mean_sq = p.gg.sum() / max(float(plan.part_size.sum()), 1.0)
        residual[(g_abs <= NO_GRADIENT * mean_sq * plan.group_size) | (denom <= 0)] = np.nan
        return {"measured": charge, "flux": flux, "magnitude": magnitude, "residual": residual}

    def _init_streams(self, columns_y0: np.ndarray, buffer_dot0: np.ndarray | None, hyper: dict[str, np.ndarray]) -> None:
        self._streams = {}
        for lane_i, lane in enumerate(self._lanes):
            cols, pcols = lane["cols"], lane["paper_cols"]
            pg = lane["pg"]
            bd = None if buffer_dot0 is None else buffer_dot0[cols]
            streams: dict[str, Any] = {}
            if self._sgd and self.every == 1:
                streams["ledger"] = theory.LedgerStream(lane["kind"], columns_y0[cols], buffer_dot0=bd)
            elif not self._sgd and self.every == 1:
                streams["ledger_y"] = columns_y0[cols].copy()
            if self._sgd and pcols.size:
                ydot0 = None
                if buffer_dot0 is not None and hyper["momentum"][pg] > 0:
                    k = 1 - hyper["dampening"][pg]
                    factor = -1.0 if lane["kind"] == "translation" else -2.0
                    ydot0 = factor * buffer_dot0[pcols] / k
                streams["paper"] = theory.PaperStream(lane["kind"], columns_y0[pcols], ydot0=ydot0)
            self._streams[lane_i] = streams

    def _predictions(self) -> tuple[np.ndarray, np.ndarray]:
        """Current (paper, exact) predictions per group (NaN where a theory does not apply)."""
        plan = self._plan
        assert plan is not None and self._streams is not None
        n_cols = len(plan.column_group)
        paper_cols = np.full(n_cols, np.nan)
        exact_cols = np.full(n_cols, np.nan)
        for lane_i, lane in enumerate(self._lanes):
            st = self._streams[lane_i]
            if "paper" in st and st["paper"] is not None:
                paper_cols[lane["paper_cols"]] = st["paper"].y
            if "ledger" in st:
                exact_cols[lane["cols"]] = st["ledger"].y
            elif "ledger_y" in st:
                exact_cols[lane["cols"]] = st["ledger_y"]
        paper = np.full(plan.n_groups, np.nan)
        single = self._single_column
        paper[plan.column_group[single]] = paper_cols[single]
        return paper, plan.to_groups(exact_cols)

    def _advance_paper(self, hyper: dict[str, np.ndarray], drive_cols: np.ndarray) -> None:
        assert self._streams is not None
        for lane_i, lane in enumerate(self._lanes):
            stream = self._streams[lane_i].get("paper")
            if stream is None:
                continue
            pg = lane["pg"]
            try:
                stream.step(
                    None if lane["kind"] == "translation" else drive_cols[lane["paper_cols"]],
                    lr=hyper["lr"][pg],
                    momentum=hyper["momentum"][pg],
                    dampening=hyper["dampening"][pg],
                    weight_decay=hyper["weight_decay"][pg],
                )
            except Exception as err:  # e.g. momentum switched between zero and non-zero mid-run
                self._streams[lane_i]["paper"] = None
                assert self._run is not None
                self._run.notes.append(f"paper closed form stopped at step {self._step} for {lane['kind']}: {err}")

    def _record(self, step: int, time: np.ndarray, values: dict[str, np.ndarray], hyper: dict[str, np.ndarray]) -> None:
        plan, run = self._plan, self._run
        assert plan is not None and run is not None
        if step % self._stride:
            return
        first_pg = plan.column_param_group[plan.group_column_starts]
        paper, exact = self._predictions()
        values = dict(values, paper=paper, exact=exact)
        # A run's clock is the first param_group's (mixed groups are rare; their lr column differs).
        run.append(step, float(time[first_pg[0]]), hyper["lr"][first_pg], values)

    def _pre_step(self, optimizer: Any, args: Any, kwargs: Any) -> None:
        if self._closed:
            return
        if self._plan is None:
            raise NothingToTrackError(
                "track(symmetries=None) discovers groups from the first forward pass of the model, "
                "but optimizer.step() came before any forward pass"
            )
        self._flush()  # the previous step's delayed results, before anything of this step
        hyper = self._hyper()
        measure = self._step % self.every == 0
        self._measured_this_step = measure
        if not self._sgd:
            if measure:
                self._snapshot = {r.name: self._plan.params[r.name].detach().clone() for r in self._plan.reductions}
            return
        if measure:
            items, sum_only, has_buffer = self._sgd_items()
            pending = self._submit(items, sum_only)
            step, time = self._step, self._time.copy()
            self._defer(lambda: self._process_sgd(pending.result(), sum_only, has_buffer, hyper, step, time))
        else:
            self._advance_paper(hyper, self._held_drive)
        self._advance_time(hyper)

    def _defer(self, work: Callable[[], None]) -> None:
        self._queue.append(work)
        if not self._reducer.delayed:
            self._flush()

    def _flush(self) -> None:
        while self._queue:
            self._queue.pop(0)()

    def _process_sgd(
        self, results: list[np.ndarray], sum_only: list[Any], has_buffer: bool, hyper: dict[str, np.ndarray], step: int, time: np.ndarray
    ) -> None:
        plan, run = self._plan, self._run
        assert plan is not None and run is not None
        parts, buffer_sum = self._parse(results, sum_only)
        sums = PartSums.from_rows(parts, buffer_sum if has_buffer else None)
        pg = plan.part_param_group
        q = step_quantities(sums, hyper["momentum"][pg], hyper["dampening"][pg], hyper["weight_decay"][pg], hyper["nesterov"][pg])
        view = self._group_view(sums)
        translation = self._part_kind == 0
        if self._streams is None:
            cols_y0 = plan.to_columns(np.where(translation, sums.q, sums.x))
            buffer_dot0 = None if sums.tb is None else plan.to_columns(np.where(translation, sums.bs, sums.tb))
            self._init_streams(cols_y0, buffer_dot0, hyper)
        cols = {
            "flux": plan.to_columns(np.where(translation, sums.gs, sums.s)),
            "update_sq": plan.to_columns(q.uu),
            "update_dot": plan.to_columns(q.e),
            "drive": plan.to_columns(q.drive),
        }
        values = dict(
            view,
            grad_sq=plan.to_groups(plan.to_columns(sums.gg)),
            update_sq=plan.to_groups(cols["update_sq"]),
            update_sum=np.where(plan.group_kind == 0, plan.to_groups(plan.to_columns(q.su)), np.nan),
        )
        self._record(step, time, values, hyper)
        self._note_regimes(hyper)
        self._held_drive = cols["drive"]
        self._advance_paper(hyper, cols["drive"])
        if self.every == 1:
            assert self._streams is not None
            for lane_i, lane in enumerate(self._lanes):
                c, p = lane["cols"], lane["pg"]
                self._streams[lane_i]["ledger"].step(
                    flux=cols["flux"][c],
                    update_sq=None if lane["kind"] == "translation" else cols["update_sq"][c],
                    lr=hyper["lr"][p],
                    momentum=hyper["momentum"][p],
                    dampening=hyper["dampening"][p],
                    weight_decay=hyper["weight_decay"][p],
                    nesterov=bool(hyper["nesterov"][p]),
                    update_dot=None if lane["kind"] == "translation" or not hyper["nesterov"][p] else cols["update_dot"][c],
                )

    def _note_regimes(self, hyper: dict[str, np.ndarray]) -> None:
        run = self._run
        assert run is not None
        for lane in self._lanes:
            p = lane["pg"]
            try:
                reg = theory.regime(lr=hyper["lr"][p], momentum=hyper["momentum"][p], dampening=hyper["dampening"][p], weight_decay=hyper["weight_decay"][p])
            except Exception:  # noqa: BLE001 - a regime is a label, never a reason to stop training
                reg = "n/a"
            run.note_regime(lane["kind"], reg)

    def _advance_time(self, hyper: dict[str, np.ndarray]) -> None:
        # t_{n+1} = t_n + η_n(1 − d_n); PyTorch ignores dampening without momentum.
        damp = np.where(hyper["momentum"] > 0, hyper["dampening"], 0.0)
        self._time = self._time + hyper["lr"] * (1 - damp)

    def _post_step(self, optimizer: Any, args: Any, kwargs: Any) -> None:
        if self._closed or self._plan is None:
            return
        if not self._sgd:
            hyper = self._hyper()
            if self._measured_this_step and self._snapshot is not None:
                self._submit_generic(hyper)
            self._advance_time(hyper)
            self._snapshot = None
        self._step += 1

    def _submit_generic(self, hyper: dict[str, np.ndarray]) -> None:
        """θ_n (the snapshot), ĝ_n and the applied update d_n = θ_n − θ_{n+1} in one pass."""
        plan = self._plan
        assert plan is not None and self._snapshot is not None
        items, sum_only = [], []
        for r, is_translation in zip(plan.reductions, plan.translation_reductions):
            p = plan.params[r.name]
            grad = p.grad if p.grad is not None else _zeros(p)
            snap = self._snapshot[r.name]
            delta = snap - r.view(p.detach())
            items.append((r.view(snap), r.view(grad), delta, r.axis, r.block))
            sum_only.append(delta if is_translation else None)
        pending = self._submit(items, sum_only)
        step, time = self._step, self._time.copy()
        self._defer(lambda: self._process_generic(pending.result(), sum_only, hyper, step, time))

    def _process_generic(self, results: list[np.ndarray], sum_only: list[Any], hyper: dict[str, np.ndarray], step: int, time: np.ndarray) -> None:
        plan = self._plan
        assert plan is not None
        parts, d_sum = self._parse(results, sum_only)
        if d_sum is None:
            d_sum = np.zeros(len(parts))
        sums = PartSums.from_rows(parts[:, :5], None)
        dd, td = parts[:, 5], parts[:, 6]
        translation = self._part_kind == 0
        view = self._group_view(sums)
        if self._streams is None:
            self._init_streams(plan.to_columns(np.where(translation, sums.q, sums.x)), None, hyper)
        lr = hyper["lr"][plan.part_param_group]
        safe_lr = np.where(lr > 0, lr, 1.0)
        values = dict(
            view,
            grad_sq=plan.to_groups(plan.to_columns(sums.gg)),
            update_sq=plan.to_groups(plan.to_columns(dd / safe_lr**2)),
            update_sum=np.where(plan.group_kind == 0, plan.to_groups(plan.to_columns(d_sum / safe_lr)), np.nan),
        )
        self._record(step, time, values, hyper)
        if self.every == 1:
            # y_{n+1} = y_n − 2⟨θ_n, d_n⟩ + |d_n|² (scale, rescale); q_{n+1} = q_n − ⟨1, d_n⟩.
            change = plan.to_columns(np.where(translation, -d_sum, -2 * td + dd))
            assert self._streams is not None
            for lane_i, lane in enumerate(self._lanes):
                self._streams[lane_i]["ledger_y"] = self._streams[lane_i]["ledger_y"] + change[lane["cols"]]

    # -- results -----------------------------------------------------------------------------
    @property
    def run(self) -> Run:
        """The run so far, its last row measured from the parameters as they are now."""
        if self._run is None:
            raise NothingToTrackError("nothing recorded yet: no forward pass / optimizer step has been seen")
        self._refresh_final()
        return self._run

    def _refresh_final(self) -> None:
        plan, run = self._plan, self._run
        assert plan is not None and run is not None
        self._flush()
        if self._streams is None:
            return
        items = [(r.view(plan.params[r.name]), None, None, r.axis, r.block) for r in plan.reductions]
        parts = plan.reduce_parts(np.concatenate(self._reducer.submit(items).result(), axis=0))
        translation = self._part_kind == 0
        measured = plan.to_groups(plan.to_columns(np.where(translation, parts[:, 0], parts[:, 1])))
        x_abs = plan.parts_to_groups_unsigned(parts[:, 1])
        magnitude = np.where(plan.group_kind == 0, np.sqrt(plan.group_size * x_abs), x_abs)
        paper, exact = self._predictions()
        first_pg = plan.column_param_group[plan.group_column_starts]
        run.final = {
            "step": self._step,
            "time": float(self._time[first_pg[0]]),
            "measured": measured,
            "magnitude": magnitude,
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

    def __enter__(self) -> "Tracker":
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

