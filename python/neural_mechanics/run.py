"""A recorded run: measured charges against the paper's closed forms and the exact ledger.

Row n of the long table describes θ_n, the parameters before optimizer step n: ``measured`` is
the charge of θ_n, ``paper`` and ``exact`` the two theories' predictions of it (both open-loop
from the first tracked step), and the per-step columns (``grad_sq``, ``update_sq``, ``flux``,
``update_sum``, ``residual``) describe step n. A last row n = N holds the final charge with the
per-step columns NaN.

Errors everywhere are |prediction − measured| / (max over the run of the group's magnitude),
where the magnitude is √|A|·|θ_A| (translation), |θ_A|² (scale), |θ_A1|² + |θ_A2|² (rescale).

Import direction: this module records and reads runs and imports no rendering module at import
time. ``Run.plot``, ``Run.plot_errors`` and ``Run.plot_residuals`` import ``plots`` when called;
that edge stays acyclic because ``plots`` (and the ``equilibrium`` analysis it draws) never
import this module, not even lazily.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
import weakref
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from . import _native
from .errors import InvalidArgumentError, RunFormatError, RunIOError, UnknownColumnError
from .storage import LayerAggregator, LayerIndex, Thinning, layer_fields

FILE_KIND = "neural-mechanics run"

# The columns of a row, in the order the tracker's native core writes them (src/tracking/mod.rs):
# the optimizer's hyperparameters of step n for each group (its first part's param_group), then
# the per-step values, one float64 per group.
COLUMNS: tuple[str, ...] = tuple(_native.ROW_FIELDS)
# Columns added after the first release (the ledger split, docs/theory.md §5.5; the live
# equilibrium, §5.6): a run saved before them loads them as NaN (the file format is one of named
# arrays, so no version bump: newer files stay readable by older releases, which ignore them).
ADDED_COLUMNS: tuple[str, ...] = ("decay", "drive", "breaking", "effective_lr", "angular_update", "effective_lr_eq", "angular_update_eq")
# The columns of ``Run.summary()``, in order.
SUMMARY_COLUMNS = ("symmetry", "layer", "module", "groups", "verdict", "exact_median", "exact_max", "paper_median", "paper_max",
                   "residual_median", "residual_max", "regime", "note", "reason", "equilibrium", "equilibrium_step")
HYPER_COLUMNS = COLUMNS[:4]
STEP_COLUMNS = COLUMNS[4:]
assert HYPER_COLUMNS == ("lr", "momentum", "dampening", "weight_decay")
# The per-layer aggregates of a row, in order (neural_mechanics.storage.layer_fields): one per
# column, then the derived fields. ``Run.to_pandas(per="layer")`` has one column per field.
LAYER_FIELDS: tuple[str, ...] = tuple(f for f, _ in layer_fields(COLUMNS, HYPER_COLUMNS))
# Saved runs store the per-layer aggregates as arrays named LAYERS_PREFIX + field.
LAYERS_PREFIX = "layers."


@dataclass
class GroupInfo:
    """What a run keeps of each symmetry group (no torch objects, so a run outlives its model)."""

    symmetry: np.ndarray  # (groups,) str
    layer: np.ndarray  # (groups,) str
    index: np.ndarray  # (groups,) int
    label: np.ndarray  # (groups,) str
    size: np.ndarray  # (groups,) int, entries |A|
    # The layer's module in a few words ("Linear(32→10)"), "" where the layer is no module (a
    # declared name); figures read "7 · Linear(32→10)". Runs saved before it existed load with "".
    layer_label: np.ndarray | None = None  # (groups,) str
    # The normaliser that makes a scale group ("BatchNorm", "LayerNorm", ...), "" otherwise.
    normalizer: np.ndarray | None = None  # (groups,) str

    def __post_init__(self) -> None:
        n = len(self.symmetry)
        if self.layer_label is None:
            self.layer_label = np.full(n, "", dtype=object)
        if self.normalizer is None:
            self.normalizer = np.full(n, "", dtype=object)

    def __len__(self) -> int:
        return len(self.symmetry)

    @classmethod
    def from_groups(cls, groups: Any, sizes: np.ndarray, layer_labels: dict[str, str] | None = None) -> GroupInfo:
        """From SymmetryGroup objects; ``layer_labels``: layer name → its module in a few words."""
        gs = list(groups)
        labels = layer_labels or {}
        return cls(
            symmetry=np.array([g.symmetry for g in gs], dtype=object),
            layer=np.array([g.layer for g in gs], dtype=object),
            index=np.array([int(g.index) for g in gs], dtype=np.int64),
            label=np.array([str(getattr(g, "label", g.index)) for g in gs], dtype=object),
            size=np.asarray(sizes, dtype=np.int64),
            layer_label=np.array([labels.get(str(g.layer), "") for g in gs], dtype=object),
            normalizer=np.array([next((str(n[1]) for n in getattr(g, "normalizers", ()) if n[1]), "") for g in gs], dtype=object),
        )

    def module_of(self, layer: str) -> str:
        """``layer``'s module in a few words ("Linear(32→10)"), "" if unknown."""
        found = self.layer_label[self.layer == layer] if self.layer_label is not None else []
        return next((str(x) for x in found if x), "")

    def display(self, layer: str) -> str:
        """How figures name ``layer``: "7 · Linear(32→10)", or the name alone."""
        label = self.module_of(layer)
        return f"{layer} · {label}" if label else str(layer)


class _Rows:
    """Recorded rows in preallocated blocks: steps (n,), time (n,), and (n, groups) per column.

    The columns are views into one (capacity, columns, groups) array, so that a whole row is
    written once, in place: ``reserve`` then ``commit`` (the tracker's per-step path). The
    per-layer aggregates use the same store, with LAYER_FIELDS as columns and pairs as groups.
    """

    NAMES = COLUMNS

    def __init__(self, groups: int, capacity: int = 64, limit: int | None = None, names: tuple[str, ...] = COLUMNS):
        self.NAMES = names
        self.groups = groups
        self.limit = limit  # never grow past this many rows (the run spills there)
        self.n = 0
        self.steps = np.empty(capacity, dtype=np.int64)
        self.time = np.empty(capacity, dtype=np.float64)
        self._set_block(np.empty((capacity, len(self.NAMES), groups)))

    def _set_block(self, block: np.ndarray) -> None:
        self.block = block
        self.cols = {c: block[:, j] for j, c in enumerate(self.NAMES)}

    def append(self, step: int, time: float, row: dict[str, Any]) -> None:
        stored = self.reserve()
        for j, c in enumerate(self.NAMES):
            stored[j] = row[c]  # a copy: callers may reuse their arrays; scalars broadcast
        self.commit(step, time)

    def append_row(self, step: int, time: float, row: np.ndarray) -> None:
        """``row``: a (columns, groups) array in NAMES order, copied into the block."""
        self.reserve()[...] = row
        self.commit(step, time)

    def reserve(self) -> np.ndarray:
        """The next row's (columns, groups) storage, to be written in place, then ``commit``-ted."""
        if self.n == len(self.steps):
            grown = 2 * len(self.steps)
            self._grow(grown if self.limit is None else max(self.n + 1, min(grown, self.limit)))
        return self.block[self.n]

    def commit(self, step: int, time: float) -> None:
        """Keep the reserved row, at ``step`` and ``time``."""
        self.steps[self.n], self.time[self.n] = step, time
        self.n += 1

    def _grow(self, capacity: int) -> None:
        self.steps = np.resize(self.steps, capacity)
        self.time = np.resize(self.time, capacity)
        grown = np.empty((capacity, len(self.NAMES), self.groups))
        grown[: self.n] = self.block[: self.n]
        self._set_block(grown)

    def arrays(self) -> dict[str, np.ndarray]:
        out = {"steps": self.steps[: self.n], "time": self.time[: self.n]}
        out.update({c: self.cols[c][: self.n] for c in self.NAMES})
        return out


@dataclass
class Run:
    """Measured charges and theory per group per recorded step; see the module docstring."""

    groups: GroupInfo
    optimizer: str = ""
    #: The smallest memory limit the tracker accepts (bytes): 1 MiB. Rows spill whole, so a limit
    #: below one row's size (20 columns x 8 bytes per group) still keeps one row in memory.
    MIN_MEMORY_LIMIT = 2**20
    # layer notes: (symmetry, layer) -> why the paper column is NaN there
    paper_notes: dict[tuple[str, str], str] = field(default_factory=dict)
    exact_note: str = ""
    regimes: dict[str, list[str]] = field(default_factory=dict)  # symmetry -> regimes seen, in order
    skipped: dict[str, str] = field(default_factory=dict)  # parameter or group -> reason
    notes: list[str] = field(default_factory=list)
    # What the groups cover, measured at set-up: {"parameters": trainable parameters, "entries":
    # their entries, "uncovered": {parameter: [entries, reason]}}; None for runs saved before it.
    coverage: dict[str, Any] | None = None
    # The optimizer's hyperparameters that the row's columns do not carry, per param_group, as
    # read at set-up (Adam's betas and eps, ...); also says which of momentum/dampening exist.
    hyperparameters: list[dict[str, Any]] = field(default_factory=list)
    # "ledger" (torch.optim.SGD: the exact discrete ledger, docs/theory.md §5.3) or "bookkeeping"
    # (any other optimizer: the measured update re-added); "" for runs saved before it existed.
    exact_kind: str = ""
    # Free-form facts about the run for reports (the demo's training table and recipe).
    info: dict[str, Any] = field(default_factory=dict)
    final: dict[str, Any] | None = None  # the row n = N, refreshed by the tracker
    # Bounded memory: at most `max_rows_in_memory` rows live in memory; older rows move to chunk
    # files (the saved-run format) in a folder of this run's own (`spill_folder`), created inside
    # `spill_dir` (the system's temporary folder if None) at the first spill.
    max_rows_in_memory: int | None = None
    spill_dir: str | None = None
    chunks: list[str] = field(default_factory=list)  # chunk files, oldest first
    # The byte budget of the per-group rows (module ``storage``): None keeps every recorded row;
    # otherwise the stored rows plus the per-layer aggregates stay within ``max_bytes`` before
    # compression, by thinning the rows (dense early, sparser later).
    max_bytes: int | None = None
    layer_chunks: list[str] = field(default_factory=list)  # spilled per-layer aggregates, oldest first

    def __post_init__(self) -> None:
        # Start small and grow by doubling up to the limit: a large memory limit is a ceiling,
        # never allocated up front.
        limit = None if self.max_rows_in_memory is None else max(1, self.max_rows_in_memory)
        self._mem = _Rows(len(self.groups), min(limit or 64, 64), limit)
        self.spill_folder: str | None = None
        self.layers = LayerIndex(self.groups.symmetry, self.groups.layer)
        self._aggregator = LayerAggregator(self.layers, COLUMNS, HYPER_COLUMNS)
        # The aggregates get a quarter of the rows' memory (they are a few hundred bytes a step).
        layer_limit = None if limit is None else max(64, limit * _row_bytes(len(self.groups), len(COLUMNS)) // (4 * _row_bytes(len(self.layers), len(LAYER_FIELDS))))
        self._layer_rows = _Rows(len(self.layers), min(layer_limit or 64, 64), layer_limit, names=LAYER_FIELDS)
        self._thinning: Thinning | None = None if self.max_bytes is None else Thinning(self._rows_in_budget(0))
        self._chunk_rows: list[int] = []  # rows in each chunk of ``chunks``
        self._layer_chunk_rows: list[int] = []
        self._tail_off_stride = False  # the last stored row is off the stride: the next one replaces it
        self.recorded_steps = 0  # rows committed, kept or thinned
        self._spilled_last_step: int | None = None  # the step of the last spilled row

    @staticmethod
    def rows_for_memory(groups: int, limit_bytes: int) -> int:
        """How many rows of ``groups`` groups a memory limit of ``limit_bytes`` holds in memory: an
        eighth of it, the rest being room for the per-layer aggregates (a quarter of that), for
        reading one spilled chunk back while thinning or saving (the chunk and its compressed
        bytes), for the codec's buffers and for the allocator's slack (docs/tracking.md)."""
        return max(1, int(limit_bytes) // 8 // _row_bytes(groups, len(_Rows.NAMES)))

    def _rows_in_budget(self, layer_rows: int) -> int:
        """Per-group rows that fit in ``max_bytes`` next to ``layer_rows`` rows of aggregates."""
        if self.max_bytes is None:
            return 2**62
        left = self.max_bytes - layer_rows * _row_bytes(len(self.layers), len(LAYER_FIELDS))
        return max(2, left // _row_bytes(len(self.groups), len(COLUMNS)))

    # -- recording ---------------------------------------------------------------------------
    def append(self, step: int, time: float, values: dict[str, Any]) -> None:
        """One row: ``values`` maps every name of COLUMNS to a (groups,) array (or a scalar)."""
        stored = self.reserve_row()
        for j, c in enumerate(COLUMNS):
            stored[j] = values[c]  # a copy: callers may reuse their arrays; scalars broadcast
        self.commit_row(step, time)

    def append_row(self, step: int, time: float, row: np.ndarray) -> None:
        """One row as a (len(COLUMNS), groups) array in COLUMNS order."""
        self.reserve_row()[...] = row
        self.commit_row(step, time)

    def reserve_row(self) -> np.ndarray:
        """The next row's storage, a (len(COLUMNS), groups) C-contiguous view into the run, for
        the tracker to write in place (a row is written once, where it stays); ``commit_row``
        keeps it, anything else leaves the run as it was."""
        return self._mem.reserve()

    def commit_row(self, step: int, time: float) -> None:
        """Keep the reserved row: its per-layer aggregates always, the row itself as the byte
        budget allows (``max_bytes``, module ``storage``)."""
        step, time = int(step), float(time)
        mem = self._mem
        row = mem.block[mem.n]
        self._aggregator.compute(row, self._layer_rows.reserve())
        self._layer_rows.commit(step, time)
        if self.max_rows_in_memory is not None and self._layer_rows.n >= self._layer_rows.limit:  # type: ignore[operator]
            self._spill_layers()
        self.recorded_steps += 1
        if self._thinning is None:
            mem.commit(step, time)
        else:
            kept = self._thinning.classify(step, row[0])  # row[0]: the lr column
            if self._tail_off_stride and mem.n > 0:
                # The last stored row left the stride: this row takes its place (the last row of
                # a run is always stored, so a row off the stride waits there until the next).
                mem.block[mem.n - 1] = row
                mem.steps[mem.n - 1], mem.time[mem.n - 1] = step, time
            else:
                mem.commit(step, time)
            self._tail_off_stride = not kept
            self._thinning.max_rows = self._rows_in_budget(self._layer_rows.n + sum(self._layer_chunk_rows))
            if mem.n + sum(self._chunk_rows) > self._thinning.max_rows:
                self._thin_out()
        self._spill_if_full()

    def _spill_if_full(self) -> None:
        if self.max_rows_in_memory is not None and self._mem.n >= self.max_rows_in_memory:
            self._spill()

    def _thin_out(self) -> None:
        """Double the stride until the stored rows fit the budget, dropping the rows that leave it
        (in memory and in spilled chunks); the dense start and the protected rows (first,
        learning-rate changes) give way only when they alone exceed the budget."""
        thin = self._thinning
        assert thin is not None
        for _ in range(128):
            stored = self._mem.n + sum(self._chunk_rows)
            if stored <= thin.max_rows:
                return
            span = (self._last_step() or 0) - (thin.first or 0)
            if thin.stride * (thin.gap or 1) > span:
                thin.give_up_more()
            else:
                thin.stride *= 2
            self._filter_rows(thin.keep_mask)

    def _filter_rows(self, keep: Any) -> None:
        """Drop the stored rows whose steps ``keep`` (steps -> bool mask) refuses; the run's last
        stored row always stays."""
        mem = self._mem
        for i, chunk in enumerate(list(self.chunks)):
            arrays = dict(_native.load_run(chunk)[1])
            mask = keep(arrays["steps"])
            if i == len(self.chunks) - 1 and mem.n == 0 and len(mask):
                mask[-1] = True
            if mask.all():
                continue
            if mask.any():
                # One column at a time: no second copy of the chunk in memory.
                writer = _native.RunWriter(chunk)
                for k in list(arrays):
                    writer.add([(k, np.ascontiguousarray(arrays.pop(k)[mask]))])
                writer.finish(json.dumps({"kind": FILE_KIND + " chunk"}))
            else:
                os.unlink(chunk)
            self._chunk_rows[i] = int(mask.sum())
        emptied = [i for i, n in enumerate(self._chunk_rows) if n == 0]
        self.chunks = [c for i, c in enumerate(self.chunks) if i not in emptied]
        self._chunk_rows = [n for n in self._chunk_rows if n]
        if mem.n:
            mask = keep(mem.steps[: mem.n])
            mask[-1] = True
            idx = np.flatnonzero(mask)
            for j, i in enumerate(idx.tolist()):  # in place, row by row: no second block in memory
                if i != j:
                    mem.block[j] = mem.block[i]
            mem.steps[: len(idx)], mem.time[: len(idx)] = mem.steps[idx], mem.time[idx]
            mem.n = len(idx)

    def _claim_spill_folder(self) -> str:
        """This run's own spill folder, made at the first spill: a new folder (``nmrun-spill-*``,
        created exclusively, so no two runs ever share one) inside ``spill_dir`` or the system's
        temporary folder, holding a lock file (``LOCK``, created with O_EXCL, naming the process)
        while the run is alive. The temporary folder is removed with the Run; in a folder the
        caller named, the chunks stay and only the lock goes."""
        if self.spill_folder is not None:
            return self.spill_folder
        try:
            if self.spill_dir is not None:
                os.makedirs(self.spill_dir, exist_ok=True)
            folder = tempfile.mkdtemp(prefix="nmrun-spill-", dir=self.spill_dir)
            lock = os.path.join(folder, SPILL_LOCK)
            fd = os.open(lock, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644)
            with os.fdopen(fd, "w") as f:
                f.write(f"pid {os.getpid()}\n")
        except OSError as exc:
            raise RunIOError(f"cannot spill rows to {self.spill_dir or tempfile.gettempdir()!r}: {exc}") from None
        if self.spill_dir is None:
            weakref.finalize(self, shutil.rmtree, folder, ignore_errors=True)
        else:
            weakref.finalize(self, _unlink_quietly, lock)
        self.spill_folder = folder
        return folder

    def _spill(self) -> None:
        """Move the in-memory rows to a new chunk file (the same format as a saved run)."""
        self._chunk_rows.append(self._mem.n)
        self._spilled_last_step = int(self._mem.steps[self._mem.n - 1])
        self._spill_store(self._mem, self.chunks, "chunk")
        self._tail_off_stride = False  # the last row is on disk now: it stays

    def _spill_layers(self) -> None:
        self._layer_chunk_rows.append(self._layer_rows.n)
        self._spill_store(self._layer_rows, self.layer_chunks, "layers")

    def _spill_store(self, store: _Rows, chunks: list[str], name: str) -> None:
        # Numbered past every chunk made so far (thinning may have removed some).
        number = int(os.path.basename(chunks[-1]).split("-")[1].split(".")[0]) + 1 if chunks else 0
        path = os.path.join(self._claim_spill_folder(), f"{name}-{number:06d}.nmrun")
        arrays = [(k, np.ascontiguousarray(v)) for k, v in store.arrays().items()]
        _native.save_run(path, json.dumps({"kind": FILE_KIND + " chunk"}), arrays)
        chunks.append(path)
        store.n = 0

    def note_regime(self, symmetry: str, regime: str) -> None:
        seen = self.regimes.setdefault(symmetry, [])
        if not seen or seen[-1] != regime:
            seen.append(regime)

    # -- views -------------------------------------------------------------------------------
    def _final_block(self) -> dict[str, Any] | None:
        """The final row n = N as a one-row block, if the run has one past its last stored row."""
        last = self._last_step()
        if self.final is None or (last is not None and self.final["step"] <= last):
            return None
        n = len(self.groups)
        final: dict[str, Any] = {c: np.asarray(self.final.get(c, np.full(n, np.nan)), dtype=np.float64)[None, :] for c in COLUMNS}
        final.update(steps=np.array([self.final["step"]]), time=np.array([self.final["time"]]))
        return final

    def _final_layer_block(self) -> dict[str, Any] | None:
        """The final row's per-layer aggregates, as a one-row block (computed when read)."""
        final = self._final_block()
        if final is None:
            return None
        out = np.empty((len(LAYER_FIELDS), len(self.layers)))
        self._aggregator.compute(np.stack([final[c][0] for c in COLUMNS]), out, update=False)
        block: dict[str, Any] = {f: out[j][None, :] for j, f in enumerate(LAYER_FIELDS)}
        block.update(steps=final["steps"], time=final["time"])
        return block

    def _rows(self) -> tuple[np.ndarray, np.ndarray, dict[str, np.ndarray]]:
        """(steps, time, columns) with the final row appended; columns are (rows, groups)."""
        return self._concat(self.chunks, self._mem, self._final_block(), COLUMNS)

    def _layer_table(self) -> tuple[np.ndarray, np.ndarray, dict[str, np.ndarray]]:
        """(steps, time, fields): the per-layer aggregates of every recorded step and of the final
        row, each field (rows, pairs) in ``self.layers`` order."""
        return self._concat(self.layer_chunks, self._layer_rows, self._final_layer_block(), LAYER_FIELDS)

    def _concat(self, chunks: list[str], mem: _Rows, final: dict[str, Any] | None, names: tuple[str, ...]) -> tuple[np.ndarray, np.ndarray, dict[str, np.ndarray]]:
        blocks = [dict(_native.load_run(chunk)[1]) for chunk in chunks]
        blocks.append(mem.arrays())
        if final is not None:
            blocks.append(final)
        cat = {k: np.concatenate([b[k] for b in blocks]) for k in ("steps", "time", *names)}
        for c in self.absent_hyperparameters():
            cat[c] = np.full_like(cat[c], np.nan)  # Adam has no momentum: NaN, not 0.0
        return cat["steps"], cat["time"], {c: cat[c] for c in names}

    def absent_hyperparameters(self) -> tuple[str, ...]:
        """The hyperparameter columns the optimizer does not have (Adam: momentum, dampening):
        they read NaN; its own hyperparameters (betas, ...) are in ``hyperparameters``."""
        if not self.hyperparameters:
            return ()
        return tuple(c for c in HYPER_COLUMNS if c != "lr" and c not in self.hyperparameters[0])

    def describe_optimizer(self) -> str:
        """"Adam (betas (0.9, 0.999), eps 1e-08, weight_decay 0)": the optimizer and the
        hyperparameters of its first param_group other than the learning rate."""
        name = self.optimizer or "optimizer"
        if not self.hyperparameters:
            return name
        shown = []
        for k, v in sorted(self.hyperparameters[0].items()):  # sorted: a saved run's JSON keeps no order
            if k == "lr" or v is None or isinstance(v, bool) and not v:
                continue
            text = f"({', '.join(f'{x:g}' for x in v)})" if isinstance(v, (list, tuple)) else f"{v:g}" if isinstance(v, float) else str(v)
            shown.append(f"{k} {text}")
        return f"{name} ({', '.join(shown)})" if shown else name

    def _last_step(self) -> int | None:
        if self._mem.n:
            return int(self._mem.steps[self._mem.n - 1])
        if self.chunks:
            return self._spilled_last_step  # thinning never drops a run's last row
        return None

    def array(self, column: str) -> np.ndarray:
        """One column as a (rows, groups) array, final row included (see COLUMNS)."""
        if column not in COLUMNS:
            raise UnknownColumnError(f"unknown column {column!r}; one of {COLUMNS}")
        return self._rows()[2][column]

    @property
    def time_index(self) -> np.ndarray:
        """The model time t_n = Σ_{k<n} η_k(1 − d_k) of every row."""
        return self._rows()[1]

    @property
    def step_index(self) -> np.ndarray:
        return self._rows()[0]

    def errors(self, which: str) -> np.ndarray:
        """|prediction − measured| / max-over-run magnitude, (rows, groups); which: paper/exact."""
        c = self._rows()[2]
        scale = np.nanmax(np.abs(c["magnitude"]), axis=0) if len(c["magnitude"]) else np.ones(len(self.groups))
        scale = np.where(scale > 0, scale, 1.0)
        return np.abs(c[which] - c["measured"]) / scale

    def layer_array(self, field: str) -> np.ndarray:
        """One per-layer aggregate as a (rows, pairs) array, a row per recorded step (thinned or
        not) and the final row; pairs in ``run.layers`` order (see LAYER_FIELDS)."""
        if field not in LAYER_FIELDS:
            raise UnknownColumnError(f"unknown per-layer field {field!r}; one of {LAYER_FIELDS}")
        return self._layer_table()[2][field]

    @property
    def layer_step_index(self) -> np.ndarray:
        """The steps of the per-layer aggregates: every recorded step, then the final row's."""
        return self._layer_table()[0]

    @property
    def layer_time_index(self) -> np.ndarray:
        """The model time t_n of every row of the per-layer aggregates."""
        return self._layer_table()[1]

    @property
    def thinned(self) -> bool:
        """Whether the byte budget (``max_bytes``) dropped some per-group rows: fewer stored rows
        than recorded steps (the per-layer aggregates have one per recorded step)."""
        return self._layer_rows.n + sum(self._layer_chunk_rows) > self._mem.n + sum(self._chunk_rows)

    def to_pandas(self, per: str = "group") -> Any:
        """The long table: one row per (step, group) (docs/tracking.md, "What each row means").

        ``per="layer"``: one row per (step, layer, symmetry) at every recorded step, even where
        the per-group rows were thinned (``max_bytes``): the per-layer aggregates (LAYER_FIELDS;
        docs/tracking.md, "Storage", says how each field aggregates the layer's groups).

        ``grad_sq``, ``update_sq`` and ``flux`` of a rescale group are differences, incoming side
        minus outgoing side (|u_A1|² − |u_A2|² for ``update_sq``): they can be negative. Columns of
        hyperparameters the optimizer does not have (Adam's momentum) are NaN; its own are in
        ``run.hyperparameters``.
        """
        import pandas as pd

        if per == "layer":
            return self._layer_frame()
        if per != "group":
            raise InvalidArgumentError(f"per must be 'group' or 'layer', got {per!r}")
        steps, time, c = self._rows()
        n_rows, n = len(steps), len(self.groups)
        table = {
            "step": np.repeat(steps, n),
            "time": np.repeat(time, n),
            "symmetry": np.tile(self.groups.symmetry, n_rows),
            "layer": np.tile(self.groups.layer, n_rows),
            "group": np.tile(self.groups.index, n_rows),
            "label": np.tile(self.groups.label, n_rows),
        }
        for col in COLUMNS:
            table[col] = c[col].reshape(-1)
        frame = pd.DataFrame(table)
        for col in ("symmetry", "layer", "label"):
            frame[col] = frame[col].astype("category")
        return frame

    def _layer_frame(self) -> Any:
        import pandas as pd

        steps, time, f = self._layer_table()
        n_rows, n = len(steps), len(self.layers)
        table: dict[str, Any] = {
            "step": np.repeat(steps, n),
            "time": np.repeat(time, n),
            "symmetry": np.tile(self.layers.symmetry, n_rows),
            "layer": np.tile(self.layers.layer, n_rows),
            "groups": np.tile(self.layers.groups, n_rows),
        }
        for name in LAYER_FIELDS:
            table[name] = f[name].reshape(-1)
        frame = pd.DataFrame(table)
        frame["residual_groups"] = frame["residual_groups"].astype(np.int64)
        for col in ("symmetry", "layer"):
            frame[col] = frame[col].astype("category")
        return frame

    # -- the same long table for Arrow, polars and Parquet (docs/integrations.md) -------------
    def _long_table(self) -> tuple[int, dict[str, Any]]:
        """(rows of the long table, {column: array}) in ``to_pandas()``'s column order, built from
        the stored blocks with numpy repeat/tile: numeric columns as numpy arrays, the string
        columns (symmetry, layer, label) as (codes, categories) with the categories sorted, as
        pandas sorts a categorical's categories."""
        steps, time, c = self._rows()
        n_rows, n = len(steps), len(self.groups)
        table: dict[str, Any] = {"step": np.repeat(steps, n), "time": np.repeat(time, n)}
        for col in ("symmetry", "layer", "group", "label"):
            values = getattr(self.groups, "index" if col == "group" else col)
            if col == "group":
                table[col] = np.tile(values, n_rows)
            elif n_rows == 0:
                table[col] = (np.zeros(0, dtype=np.int32), [])
            else:
                categories, codes = np.unique(np.asarray(values, dtype=str), return_inverse=True)
                table[col] = (np.tile(codes.astype(np.int32), n_rows), categories.tolist())
        for col in COLUMNS:
            table[col] = c[col].reshape(-1)
        return n_rows * n, table

    def to_arrow(self) -> Any:
        """The long table of ``to_pandas()`` as a ``pyarrow.Table``: the same columns and types
        (int64, float64; symmetry, layer and label dictionary-encoded, which ``to_pandas()`` of
        the table turns into pandas categoricals). Needs ``neural-mechanics[dataframes]``."""
        from .integrations import require

        pa = require("pyarrow", "Run.to_arrow")
        _, table = self._long_table()
        arrays = {}
        for col, v in table.items():
            if isinstance(v, tuple):
                arrays[col] = pa.DictionaryArray.from_arrays(pa.array(v[0], type=pa.int32()), pa.array(v[1], type=pa.string()))
            else:
                arrays[col] = pa.array(v)
        return pa.table(arrays)

    def to_polars(self) -> Any:
        """The long table of ``to_pandas()`` as a ``polars.DataFrame``: the same columns and types,
        symmetry, layer and label as ``pl.Enum`` over their sorted values (polars' ``to_pandas()``
        gives them back as categoricals, marked ordered). Needs ``neural-mechanics[dataframes]``."""
        from .integrations import require

        pl = require("polars", "Run.to_polars")
        _, table = self._long_table()
        columns = []
        for col, v in table.items():
            if isinstance(v, tuple):
                codes, categories = v
                columns.append(pl.Series(col, categories, dtype=pl.Enum(categories)).gather(codes))
            else:
                columns.append(pl.Series(col, v))
        return pl.DataFrame(columns)

    def to_parquet(self, path: str | os.PathLike[str], **options: Any) -> Path:
        """Write ``to_arrow()`` to a Parquet file (read back with ``pandas.read_parquet``,
        ``polars.read_parquet`` or ``pyarrow.parquet.read_table``); returns the path.
        Dictionary encoding is kept to the string columns (measured values are nearly all
        distinct: encoding them tripled the write time for nothing); ``options`` go to
        ``pyarrow.parquet.write_table``. Needs ``neural-mechanics[dataframes]``."""
        from .integrations import require

        pq = require("pyarrow.parquet", "Run.to_parquet")
        target = Path(path)
        options.setdefault("use_dictionary", ["symmetry", "layer", "label"])
        pq.write_table(self.to_arrow(), os.fspath(target), **options)
        return target

    def summary(self) -> Any:
        """Per (symmetry, layer): the layer's module, groups, a verdict and its reason (module
        ``verdicts``: thresholds stated there and in the reason), median and max error of
        ``exact`` and ``paper``, median and max constraint residual, the momentum regime and why a
        theory is NaN where it is, and for scale layers whether they have reached the §5.4
        equilibrium (``equilibrium``: within ``equilibrium.EQUILIBRIUM_TOLERANCE`` of the
        predicted angular update and effective learning rate, and from which step:
        ``equilibrium_step``; docs/theory.md §5.6). Then one row per module whose trainable
        parameters no group covers (verdict "not covered", the reason per parameter).
        ``residual_max`` is read from the per-layer aggregates, so it covers every recorded step
        even where ``max_bytes`` thinned the per-group rows; medians and errors come from the
        stored rows."""
        import pandas as pd

        from .equilibrium import equilibrium_reached
        from .verdicts import layer_verdict, uncovered_by_module, uncovered_table

        exact, paper = self.errors("exact"), self.errors("paper")
        residual, paper_col = self.array("residual"), self.array("paper")
        layer_residual = self.layer_array("residual")
        g = self.groups
        rows = []
        for pair, (sym, layer) in enumerate(zip(self.layers.symmetry, self.layers.layer)):
            mask = (g.symmetry == sym) & (g.layer == layer)
            v = layer_verdict(self, sym, layer, residual=residual, paper=paper_col)
            has_paper = bool(np.isfinite(paper_col[:, mask]).any())
            reached, reached_step = equilibrium_reached(self, layer) if sym == "scale" else ("", float("nan"))
            rows.append(
                {
                    "symmetry": sym,
                    "layer": layer,
                    "module": g.module_of(layer),
                    "groups": int(mask.sum()),
                    "verdict": v.verdict,
                    "exact_median": _nan_stat(np.nanmedian, exact[:, mask]),
                    "exact_max": _nan_stat(np.nanmax, exact[:, mask]),
                    "paper_median": _nan_stat(np.nanmedian, paper[:, mask]),
                    "paper_max": _nan_stat(np.nanmax, paper[:, mask]),
                    "residual_median": v.residual_median,
                    "residual_max": _nan_stat(np.nanmax, layer_residual[:, pair]),
                    "regime": (" -> ".join(self.regimes.get(sym, [])) or "n/a") if has_paper else "n/a",
                    "note": self.paper_notes.get((sym, layer), self.exact_note),
                    "reason": v.reason,
                    "equilibrium": reached,
                    "equilibrium_step": reached_step,
                }
            )
        for module, reason in uncovered_by_module(uncovered_table(self.coverage, self.skipped)):
            rows.append({"symmetry": "—", "layer": module, "module": "", "groups": 0, "verdict": "not covered",
                         "regime": "n/a", "note": "", "reason": reason})
        return pd.DataFrame(rows, columns=SUMMARY_COLUMNS)

    # -- figures (neural_mechanics.plots, imported at call time: matplotlib only when drawing) ---
    def plot(self, symmetry: str, layer: str | None = None, **kwargs: Any) -> Any:
        """Measured charges (solid) against theory (dashed) for one symmetry; a Figure."""
        from .plots import plot_charges

        return plot_charges(self, symmetry, layer=layer, **kwargs)

    def plot_errors(self, **kwargs: Any) -> Any:
        """Error of the exact ledger and of the paper's closed form over time; a Figure."""
        from .plots import plot_errors

        return plot_errors(self, **kwargs)

    def plot_residuals(self, **kwargs: Any) -> Any:
        """Constraint residuals per layer; a Figure."""
        from .plots import plot_residuals

        return plot_residuals(self, **kwargs)

    # -- forecast (docs/theory.md §5.7; neural_mechanics.forecast, imported at call time) ------
    def forecast(self, steps: int, *, at: int | None = None, lr: Any = None, window: int = 50, **kwargs: Any) -> Any:
        """Every group's charge (scale groups: also norm, effective lr, angular update) for the
        ``steps`` steps after step ``at`` (default: the last row), from what the run held there,
        under the future rates ``lr`` (a callable of the step index, an array of ``steps``
        rates, or None to hold the last); a long DataFrame with a band. See
        ``neural_mechanics.forecast.forecast``."""
        from .forecast import forecast

        return forecast(self, steps, at=at, lr=lr, window=window, **kwargs)

    def plot_forecast(self, forecast: Any = None, **kwargs: Any) -> Any:
        """Measured (solid), forecast (dashed) and its band (shaded); a Figure. ``forecast``: a
        frame of ``Run.forecast`` (or a list of them); None draws one from the middle of the run
        and one past its end. See ``neural_mechanics.plots.plot_forecast``."""
        from .plots import plot_forecast

        return plot_forecast(self, forecast, **kwargs)

    # -- persistence -------------------------------------------------------------------------
    def _meta(self) -> dict[str, Any]:
        g = self.groups
        return {
            "kind": FILE_KIND,
            "optimizer": self.optimizer,
            "groups": {
                "symmetry": list(map(str, g.symmetry)),
                "layer": list(map(str, g.layer)),
                "index": [int(i) for i in g.index],
                "label": list(map(str, g.label)),
                "size": [int(i) for i in g.size],
                "layer_label": list(map(str, g.layer_label if g.layer_label is not None else [""] * len(g))),
                "normalizer": list(map(str, g.normalizer if g.normalizer is not None else [""] * len(g))),
            },
            "paper_notes": [[k[0], k[1], v] for k, v in self.paper_notes.items()],
            "exact_note": self.exact_note,
            "regimes": self.regimes,
            "skipped": self.skipped,
            "notes": self.notes,
            "coverage": _json_safe(self.coverage),
            "hyperparameters": _json_safe(self.hyperparameters),
            "exact_kind": self.exact_kind,
            "info": _json_safe(self.info),
            "storage": {
                "max_bytes": self.max_bytes,
                "recorded_steps": self.recorded_steps,
                "thinning": None if self._thinning is None else self._thinning.describe(),
            },
        }

    def save(self, path: str | os.PathLike[str]) -> Path:
        """Write the run to ``path`` atomically (a crash mid-save leaves any previous file intact).

        One file (format version ``neural_mechanics._native.RUN_FORMAT_VERSION``, checksummed,
        compressed losslessly: every float comes back bit for bit) holding the groups, notes,
        hyperparameters per step, every column of the stored per-group rows (thinned to the
        run's ``max_bytes``), final row included, and the per-layer aggregates of every recorded
        step. Reload with :func:`load_run`, in any process, without torch. The file is written
        block by block: a run that spilled to disk is read back one chunk at a time, so saving
        stays within the run's memory limit.

        ``path`` must not exist or be a regular file: a symbolic link (save to its target's real
        path, ``os.path.realpath``), a folder, a device, a FIFO or a socket is refused with
        :class:`RunIOError` and left untouched.
        """
        target = Path(_fspath(path, "path"))
        meta = json.dumps(self._meta())
        writer = _native.RunWriter(os.fspath(target))
        try:
            for prefix, chunks, mem, final, names in (
                ("", self.chunks, self._mem, self._final_block(), COLUMNS),
                (LAYERS_PREFIX, self.layer_chunks, self._layer_rows, self._final_layer_block(), LAYER_FIELDS),
            ):
                for block in self._blocks(chunks, mem, final):
                    for c in self.absent_hyperparameters():
                        block[c] = np.full_like(block[c], np.nan)  # Adam has no momentum: NaN, not 0.0
                    for k in ("steps", "time", *names):  # one column at a time (a copy of a strided view at most)
                        writer.add([(prefix + k, np.ascontiguousarray(block[k]))])
                    del block  # before the next chunk is read: one chunk in memory at a time
            writer.finish(meta)
        except BaseException:
            writer.abort()
            raise
        return target

    def _blocks(self, chunks: list[str], mem: _Rows, final: dict[str, Any] | None) -> Any:
        """The stored blocks one at a time: each spilled chunk (read when reached), the rows in
        memory, the final row."""
        for chunk in chunks:
            yield dict(_native.load_run(chunk)[1])
        if mem.n:
            yield mem.arrays()
        if final is not None:
            yield final

    def __repr__(self) -> str:
        n_rows = len(self.step_index)
        kinds = {k: int((self.groups.symmetry == k).sum()) for k in ("translation", "scale", "rescale")}
        return (
            f"Run({self.optimizer or 'optimizer'}, {len(self.groups)} groups "
            f"({', '.join(f'{v} {k}' for k, v in kinds.items() if v)}), {n_rows} recorded rows"
            + (f", {len(self.notes)} notes in .notes" if self.notes else "")
            + ")"
        )


def _json_safe(value: Any) -> Any:
    """``value`` with every non-finite float (a diverged loss, an infinite tolerance) as None and
    numpy scalars as Python ones: the saved run's metadata is strict JSON."""
    if isinstance(value, dict):
        return {str(k): _json_safe(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_json_safe(v) for v in value]
    if isinstance(value, np.generic):
        value = value.item()
    if isinstance(value, float) and not np.isfinite(value):
        return None
    return value


def _row_bytes(groups: int, columns: int) -> int:
    """Bytes of one stored row: ``columns`` float64 per group, plus its step and time."""
    return max(groups, 1) * columns * 8 + 16


def _nan_stat(fn: Any, a: np.ndarray) -> float:
    finite = a[np.isfinite(a)]
    return float(fn(finite)) if finite.size else float("nan")


SPILL_LOCK = "LOCK"
_KINDS: tuple[str, ...] = tuple(_native.THEORY_KINDS)  # the symmetries a run may hold


def _unlink_quietly(path: str) -> None:
    try:
        os.unlink(path)
    except OSError:
        pass


def _fspath(path: Any, what: str) -> str:
    if isinstance(path, bytes) or not isinstance(path, (str, os.PathLike)):
        raise InvalidArgumentError(f"{what} must be a str or os.PathLike, got {type(path).__name__}")
    out = os.fspath(path)
    if not isinstance(out, str):
        raise InvalidArgumentError(f"{what} must be a str or os.PathLike of str, got {out!r}")
    return out


class _Schema:
    """Checks of a saved run's metadata: every malformed value is a RunFormatError naming it."""

    def __init__(self, where: str):
        self.where = where

    def fail(self, what: str) -> RunFormatError:
        return RunFormatError(f"{self.where}: malformed run file: {what}")

    def str_(self, value: Any, what: str) -> str:
        if not isinstance(value, str):
            raise self.fail(f"{what} must be a string, got {type(value).__name__}")
        return value

    def strs(self, value: Any, what: str) -> list[str]:
        if not isinstance(value, list):
            raise self.fail(f"{what} must be a list of strings, got {type(value).__name__}")
        return [self.str_(v, f"{what}[{i}]") for i, v in enumerate(value)]

    def ints(self, value: Any, what: str) -> list[int]:
        if not isinstance(value, list) or not all(type(v) is int and 0 <= v < 2**63 for v in value):
            raise self.fail(f"{what} must be a list of non-negative integers")
        return value

    def list_(self, value: Any, what: str) -> list:
        if not isinstance(value, list):
            raise self.fail(f"{what} must be a list, got {type(value).__name__}")
        return value

    def dict_(self, value: Any, what: str) -> dict:
        if not isinstance(value, dict):
            raise self.fail(f"{what} must be an object, got {type(value).__name__}")
        return value


def _read_meta(meta: Any, where: str) -> dict[str, Any]:
    """The run's metadata, checked field by field (see Run._meta for what save writes)."""
    v = _Schema(where)
    meta = v.dict_(meta, "the metadata")
    if meta.get("kind") != FILE_KIND:
        raise RunFormatError(f"{where}: a neural-mechanics file, but not a run (kind {meta.get('kind')!r})")
    g = v.dict_(meta.get("groups"), "groups")
    groups: dict[str, list[Any]] = {k: v.strs(g.get(k), f"groups.{k}") for k in ("symmetry", "layer", "label")}
    groups.update({k: v.ints(g.get(k), f"groups.{k}") for k in ("index", "size")})
    for k in ("layer_label", "normalizer"):  # optional: runs saved before they existed lack them
        if k in g:
            groups[k] = v.strs(g[k], f"groups.{k}")
    lengths = {k: len(x) for k, x in groups.items()}
    if len(set(lengths.values())) != 1:
        raise v.fail(f"the group lists differ in length {lengths}")
    unknown = sorted(set(groups["symmetry"]) - set(_KINDS))
    if unknown:
        raise v.fail(f"unknown symmetry {unknown[0]!r} (expected one of {_KINDS})")
    notes = meta.get("paper_notes", [])
    if not isinstance(notes, list) or not all(isinstance(n, list) and len(n) == 3 for n in notes):
        raise v.fail("paper_notes must be a list of [symmetry, layer, note]")
    paper_notes = {(v.str_(a, "paper_notes"), v.str_(b, "paper_notes")): v.str_(c, "paper_notes") for a, b, c in notes}
    regimes = {v.str_(k, "regimes"): v.strs(x, f"regimes[{k!r}]") for k, x in v.dict_(meta.get("regimes", {}), "regimes").items()}
    skipped = {k: v.str_(x, f"skipped[{k!r}]") for k, x in v.dict_(meta.get("skipped", {}), "skipped").items()}
    return {
        "groups": groups,
        "optimizer": v.str_(meta.get("optimizer", ""), "optimizer"),
        "paper_notes": paper_notes,
        "exact_note": v.str_(meta.get("exact_note", ""), "exact_note"),
        "regimes": regimes,
        "skipped": skipped,
        "notes": v.strs(meta.get("notes", []), "notes"),
        "coverage": None if meta.get("coverage") is None else v.dict_(meta["coverage"], "coverage"),
        "hyperparameters": [v.dict_(h, "hyperparameters") for h in v.list_(meta.get("hyperparameters", []), "hyperparameters")],
        "exact_kind": v.str_(meta.get("exact_kind", ""), "exact_kind"),
        "info": v.dict_(meta.get("info", {}), "info"),
        "storage": v.dict_(meta.get("storage", {}), "storage"),
    }


def _read_arrays(arrays: list[tuple[str, np.ndarray]], groups: int, where: str) -> tuple[int, dict[str, np.ndarray]]:
    """The run's arrays, each of exactly its expected dtype and shape: steps (rows,) int64,
    time (rows,) float64, every column (rows, groups) float64 (never broadcast)."""
    data = dict(arrays)
    rows = data["steps"].shape[0] if "steps" in data and data["steps"].ndim == 1 else -1
    for c in ADDED_COLUMNS:  # saved before the column existed: NaN (an unknown, not a zero)
        if c not in data and rows >= 0:
            data[c] = np.full((rows, groups), np.nan)
    missing = [c for c in ("steps", "time", *COLUMNS) if c not in data]
    if missing:
        raise RunFormatError(f"{where}: run file lacks the arrays {missing}")
    rows = data["steps"].shape[0] if data["steps"].ndim == 1 else -1
    for name in ("steps", "time", *COLUMNS):
        a = data[name]
        dtype, shape = (np.int64, (rows,)) if name == "steps" else (np.float64, (rows,) if name == "time" else (rows, groups))
        if a.dtype != dtype or a.shape != shape:
            raise RunFormatError(
                f"{where}: malformed run file: array {name!r} is {a.dtype} of shape {a.shape}; "
                f"expected {np.dtype(dtype)} of shape {shape if rows >= 0 else '(rows,)'}"
            )
    return rows, data


def load_run(path: str | os.PathLike[str]) -> Run:
    """Load a run written by :meth:`Run.save`. Needs no torch.

    A run file is untrusted input: only a regular file is read (a FIFO, a device or a folder is
    refused before a byte is read), its preamble and header first; every array must have exactly
    the dtype and shape its counts imply (rows from ``steps``, groups from the metadata) and the
    metadata matches a schema, so what loading allocates is bounded by the file's size. The
    checksum detects corruption, not forgery.

    Raises RunFormatError for a truncated, corrupted, malformed or foreign file (or one written by
    a newer format version), RunIOError if it cannot be read or is not a regular file.
    """
    where = _fspath(path, "path")
    meta_json, arrays = _native.load_run(where)
    try:
        meta = json.loads(meta_json)
    except (ValueError, RecursionError) as exc:
        raise RunFormatError(f"{where}: run metadata is not readable ({exc})") from None
    fields = _read_meta(meta, where)
    g = fields.pop("groups")
    groups = GroupInfo(
        symmetry=np.array(g["symmetry"], dtype=object),
        layer=np.array(g["layer"], dtype=object),
        index=np.array(g["index"], dtype=np.int64),
        label=np.array(g["label"], dtype=object),
        size=np.array(g["size"], dtype=np.int64),
        layer_label=np.array(g["layer_label"], dtype=object) if "layer_label" in g else None,
        normalizer=np.array(g["normalizer"], dtype=object) if "normalizer" in g else None,
    )
    storage = fields.pop("storage")
    rows, data = _read_arrays(arrays, len(groups), where)
    run = Run(groups=groups, **fields)
    max_bytes = storage.get("max_bytes")
    run.max_bytes = max_bytes if type(max_bytes) is int and max_bytes > 0 else None
    run._mem = _filled(_Rows(len(groups), max(1, rows)), rows, data, "")
    layer_rows = _read_layer_arrays(data, len(run.layers), where)
    if layer_rows is None:
        # A file saved before the aggregates existed: computed from its rows (final row included).
        for n in range(rows):
            run._aggregator.compute(np.stack([data[c][n] for c in COLUMNS]), run._layer_rows.reserve())
            run._layer_rows.commit(int(data["steps"][n]), float(data["time"][n]))
    else:
        run._layer_rows = _filled(_Rows(len(run.layers), max(1, layer_rows), names=LAYER_FIELDS), layer_rows, data, LAYERS_PREFIX)
    recorded = storage.get("recorded_steps")
    run.recorded_steps = recorded if type(recorded) is int and recorded >= 0 else run._layer_rows.n
    return run


def _filled(store: _Rows, rows: int, data: dict[str, np.ndarray], prefix: str) -> _Rows:
    store.n = rows
    store.steps[:rows], store.time[:rows] = data[prefix + "steps"][:rows], data[prefix + "time"][:rows]
    for c in store.NAMES:
        store.cols[c][:rows] = data[prefix + c][:rows]
    return store


def _read_layer_arrays(data: dict[str, np.ndarray], pairs: int, where: str) -> int | None:
    """The rows of a saved run's per-layer aggregates (every field (rows, pairs) float64, steps
    int64 and time float64 (rows,)), or None for a file saved without them."""
    if LAYERS_PREFIX + "steps" not in data:
        return None
    steps = data[LAYERS_PREFIX + "steps"]
    rows = steps.shape[0] if steps.ndim == 1 else -1
    for name in ("steps", "time", *LAYER_FIELDS):
        a = data.get(LAYERS_PREFIX + name)
        dtype, shape = (np.int64, (rows,)) if name == "steps" else (np.float64, (rows,) if name == "time" else (rows, pairs))
        if a is None or a.dtype != dtype or a.shape != shape:
            got = "missing" if a is None else f"{a.dtype} of shape {a.shape}"
            raise RunFormatError(f"{where}: malformed run file: per-layer array {name!r} is {got}; expected {np.dtype(dtype)} of shape {shape}")
    return rows
