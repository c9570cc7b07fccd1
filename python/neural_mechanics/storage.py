"""Runs of real length (docs/tracking.md, "Storage"): what a run keeps when per-group rows at
every step would not fit.

A row holds len(COLUMNS) float64 per group per step (ResNet-18: 7,233 groups, ~0.75 MB a step).
Two things keep a long run bounded:

- **Per-layer aggregates at every recorded step** (:class:`LayerAggregator`): one row per
  (symmetry, layer) per step, with every quantity the figures and ``summary()`` read, computed
  at commit time with ``numpy.add.reduceat`` over the groups sorted by layer once (no gather
  when the groups already come layer by layer, as the tracker makes them). They are never
  thinned. How each field aggregates the layer's groups is in :data:`LAYER_FIELDS` and
  docs/tracking.md.
- **Per-group rows under a byte budget** (:class:`Thinning`): a quarter of the budget keeps
  every recorded step from the start (early training, where the charges move fastest); past
  it, when the stored rows would exceed the budget, the stride between kept steps doubles and
  every stored row off the new stride is dropped: dense early, sparser later. The first row,
  the last row and every learning-rate change are kept.

This module holds the arithmetic; ``run.Run`` moves the rows (memory and spilled chunks).
"""

from __future__ import annotations

from typing import Any

import numpy as np

from .errors import InvalidArgumentError

#: A learning-rate change that thinning keeps: some group's lr moves by more than this fraction
#: from one recorded step to the next (a step schedule's drop; the per-step drift of a smooth
#: schedule such as cosine is not one, or every step would be kept).
LR_CHANGE = 0.1


#: Per-group rates (docs/theory.md §5.6) that a sum over a layer would not mean anything for: a
#: layer's value is their mean over its groups that have one (scale groups; NaN elsewhere).
PER_GROUP_RATES = ("effective_lr", "angular_update", "effective_lr_eq", "angular_update_eq")


def layer_fields(columns: tuple[str, ...], hyper: tuple[str, ...]) -> tuple[tuple[str, str], ...]:
    """(field, how) for every per-layer aggregate, in order: one per row column (hyperparameters:
    the layer's first group's value; ``residual``: the largest; the per-group rates of
    :data:`PER_GROUP_RATES`: their mean over the groups that have one; any other column: the sum over
    the layer's groups), then the derived fields. Built from the columns, so that a column added
    to the row (src/tracking/mod.rs ROW_FIELDS) is aggregated (summed) without a change here."""
    fields = [(c, "first" if c in hyper else "max" if c == "residual" else "mean" if c in PER_GROUP_RATES else "sum") for c in columns]
    fields += [
        ("magnitude_max", "max"),  # the largest group magnitude in the layer
        ("residual_groups", "count"),  # groups whose residual is finite (they had a gradient)
        ("exact_error_max", "max"),  # the largest |exact − measured| / (group magnitude so far)
        ("paper_error_max", "max"),  # the same for the paper's closed form
    ]
    return tuple(fields)


class LayerIndex:
    """The (symmetry, layer) pairs of a run's groups, in first-appearance order (as ``summary()``
    lists them), and the order that puts each pair's groups together."""

    def __init__(self, symmetry: np.ndarray, layer: np.ndarray):
        pairs = list(dict.fromkeys(zip(map(str, symmetry), map(str, layer))))
        of = {p: i for i, p in enumerate(pairs)}
        pair = np.array([of[(str(s), str(x))] for s, x in zip(symmetry, layer)], dtype=np.int64)
        self.symmetry = np.array([p[0] for p in pairs], dtype=object)
        self.layer = np.array([p[1] for p in pairs], dtype=object)
        self.order = np.argsort(pair, kind="stable")
        self.starts = np.searchsorted(pair[self.order], np.arange(len(pairs)))
        self.groups = np.diff(np.append(self.starts, len(pair)))
        # The tracker makes groups layer by layer: then no gather is needed at all.
        self.contiguous = bool((self.order == np.arange(len(pair))).all())

    def __len__(self) -> int:
        return len(self.symmetry)


class LayerAggregator:
    """Per-layer aggregates of one row (see :func:`layer_fields`), written into a (fields, pairs)
    array. Keeps each group's largest magnitude so far, the scale of the error fields: an error
    field is therefore at least the largest of ``Run.errors()`` over the layer at that step (which
    divides by the run's largest magnitude, known only at the end)."""

    def __init__(self, index: LayerIndex, columns: tuple[str, ...], hyper: tuple[str, ...]):
        self.index = index
        self.fields = layer_fields(columns, hyper)
        col = {c: j for j, c in enumerate(columns)}
        self._hyper = np.array([col[c] for c in hyper], dtype=np.int64)
        self._means = [c for c, how in self.fields if how == "mean"]
        self._col = col
        self._n_columns = len(columns)
        fid = {f: i for i, (f, _) in enumerate(self.fields)}
        self._fid = fid
        self._max_magnitude = np.zeros(int(index.groups.sum()))

    def compute(self, row: np.ndarray, out: np.ndarray, *, update: bool = True) -> None:
        """``row``: (columns, groups); ``out``: (fields, pairs), overwritten. ``update=False``
        leaves the magnitude-so-far as it is (the final row, computed at read time)."""
        ix, col, fid = self.index, self._col, self._fid
        r = row if ix.contiguous else row[:, ix.order]
        starts = ix.starts
        if len(starts) == 0:
            return
        with np.errstate(invalid="ignore"):
            out[: self._n_columns] = np.add.reduceat(r, starts, axis=1)
            out[self._hyper] = r[self._hyper][:, starts]
            for c in self._means:
                values = r[col[c]]
                finite = np.isfinite(values)
                out[fid[c]] = np.add.reduceat(np.where(finite, values, 0.0), starts) / np.add.reduceat(finite, starts)
            residual = r[col["residual"]]
            out[fid["residual"]] = np.fmax.reduceat(residual, starts)
            out[fid["residual_groups"]] = np.add.reduceat(np.isfinite(residual), starts)
            magnitude = np.abs(r[col["magnitude"]])
            out[fid["magnitude_max"]] = np.fmax.reduceat(magnitude, starts)
            most = np.fmax(self._max_magnitude, magnitude)
            if update:
                self._max_magnitude = most
            scale = np.where(most > 0, most, 1.0)
            measured = r[col["measured"]]
            for theory in ("exact", "paper"):
                out[fid[f"{theory}_error_max"]] = np.fmax.reduceat(np.abs(r[col[theory]] - measured) / scale, starts)


class Thinning:
    """Which recorded steps keep their per-group row under a byte budget.

    A step is kept if it is the first, a learning-rate change (:data:`LR_CHANGE`), one of the
    first ``dense`` recorded steps (a quarter of the budget), or on the stride: (step − first) /
    gap is a multiple of ``stride``, where gap is the step distance of the first two recorded rows
    (``every`` × ``record_every``). The stride starts at 1 and doubles each time the stored rows
    exceed the budget; the run then drops the stored rows that left the stride (never its last
    row)."""

    def __init__(self, max_rows: int):
        self.max_rows = max(2, int(max_rows))  # the run lowers it as its aggregates grow
        self._dense_shift = 2  # dense = max_rows >> 2, a quarter; more when giving up more
        self.stride = 1
        self.first: int | None = None
        self.gap: int | None = None
        self.protected: set[int] = set()
        self._last_lr: np.ndarray | None = None

    def classify(self, step: int, lr: np.ndarray) -> bool:
        """Whether ``step`` (with the groups' learning rates ``lr``) is kept at the current stride."""
        kept = False
        if self.first is None:
            self.first, kept = step, True
        elif self.gap is None:
            self.gap = max(1, step - self.first)
        if self._last_lr is not None and _lr_changed(self._last_lr, lr):
            kept = True
        self._last_lr = np.array(lr, dtype=np.float64)
        if kept:
            self.protected.add(step)
            return True
        return self.on_stride(step)

    @property
    def dense(self) -> int:
        """How many recorded steps from the start are all kept: a quarter of the budget's rows."""
        return self.max_rows >> self._dense_shift

    def on_stride(self, step: int) -> bool:
        if self.first is None:
            return True
        k = (step - self.first) // (self.gap or 1)
        return k < self.dense or k % self.stride == 0

    def keep_mask(self, steps: np.ndarray) -> np.ndarray:
        """Which of ``steps`` stay at the current stride (protected steps always do)."""
        steps = np.asarray(steps, dtype=np.int64)
        if self.first is None:
            return np.ones(len(steps), dtype=bool)
        k = (steps - self.first) // (self.gap or 1)
        on = (k < self.dense) | (k % self.stride == 0)
        return on | np.isin(steps, np.fromiter(self.protected, dtype=np.int64, count=len(self.protected)))

    def give_up_more(self) -> None:
        """When the stride leaves nothing more to drop (the dense start and the protected steps
        alone exceed a budget that the growing aggregates shrank): halve the dense start, then
        keep every other protected step (the first stays)."""
        if self.dense > 0:
            self._dense_shift += 1
            return
        kept = sorted(self.protected)[::2]
        self.protected = set(kept) | ({self.first} if self.first is not None else set())

    def describe(self) -> dict[str, Any]:
        return {"stride": self.stride, "gap": self.gap, "dense": self.dense, "learning_rate_changes": len(self.protected) - 1 if self.protected else 0}


def _lr_changed(before: np.ndarray, now: np.ndarray) -> bool:
    both = np.isfinite(before) & np.isfinite(now)
    if not both.any():
        return False
    b, n = before[both], now[both]
    return bool((np.abs(n - b) > LR_CHANGE * np.maximum(np.abs(b), np.abs(n))).any())


def check_max_bytes(value: Any) -> int | None:
    """``max_bytes`` as given to ``track``: None (keep every row) or a positive integer."""
    import operator

    if value is None:
        return None
    try:
        n = operator.index(value) if not isinstance(value, bool) else None
    except TypeError:
        n = None
    if n is None or n < 1:
        raise InvalidArgumentError(f"max_bytes must be a positive integer (bytes of the saved run) or None, got {value!r}")
    return n
