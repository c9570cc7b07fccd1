"""The measurement plan: symmetry groups compiled into fused reductions and index maps.

Every part of a group (a row, a column, a column block, a whole tensor, a column inside a row
range) is a set of output rows of one fused reduction of its parameter (THEORY.md §2). The plan
lists each distinct reduction once, so one call into Rust per step reduces every tensor, and
then turns the reduction outputs into per-part and per-group numbers with a few vectorised numpy
operations (no Python loop over groups in the per-step path).

Terms: a *part* is one (parameter, index, sign) entry of a group; a *column* is the set of parts
of one group that share one optimizer param_group (one ledger runs per column and the group's
ledger is their sum, THEORY §5.3); a *group* is a symmetry group.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from ..errors import InvalidArgumentError


@dataclass(frozen=True)
class Reduction:
    """One fused reduction: a parameter (or a range of its rows) reduced keeping an axis."""

    name: str
    axis: int
    block: int
    rows: tuple[int, int] | None  # a row range of the parameter (grouped convolutions), or all

    def view(self, tensor: Any) -> Any:
        return tensor if self.rows is None else tensor[self.rows[0] : self.rows[1]]


def _is_full(s: Any) -> bool:
    return isinstance(s, slice) and s.start is None and s.stop is None and s.step in (None, 1)


def part_rows(name: str, shape: Sequence[int], index: tuple) -> tuple[Reduction, list[int]]:
    """The reduction and its output rows that make up ``param[index]``."""
    ndim = len(shape)
    if len(index) == 1 and isinstance(index[0], (int, np.integer)):
        i = int(index[0])
        if not 0 <= i < shape[0]:
            raise InvalidArgumentError(f"{name}: row {i} out of range for shape {tuple(shape)}")
        return Reduction(name, 0, 1, None), [i]
    if len(index) == 1 and _is_full(index[0]):
        return Reduction(name, 0, 1, None), list(range(shape[0]))
    if len(index) == 2 and ndim >= 2:
        rows, col = index
        if isinstance(col, (int, np.integer)):
            j = int(col)
            if not 0 <= j < shape[1]:
                raise InvalidArgumentError(f"{name}: column {j} out of range for shape {tuple(shape)}")
            if _is_full(rows):
                return Reduction(name, 1, 1, None), [j]
            if isinstance(rows, slice) and rows.step in (None, 1):
                r0, r1, _ = rows.indices(shape[0])
                return Reduction(name, 1, 1, (r0, r1)), [j]
        if _is_full(rows) and isinstance(col, slice) and col.step in (None, 1):
            a, b, _ = col.indices(shape[1])
            width = b - a
            if width > 0 and a % width == 0 and shape[1] % width == 0:
                return Reduction(name, 1, width, None), [a // width]
    raise InvalidArgumentError(
        f"{name}: index {index!r} is not one of the supported part forms "
        "(i,), (:,), (:, j), (:, a:b) with b-a dividing the columns, (r0:r1, j)"
    )


@dataclass
class Plan:
    """Index maps from reduction outputs to parts, columns and groups."""

    groups: list[Any]
    params: dict[str, Any]  # name -> torch Parameter
    reductions: list[Reduction]
    reduction_rows: list[int]  # output rows of each reduction
    # Parts, ordered by (group, param_group): part -> rows of the concatenated reduction output.
    part_name: list[str]
    part_sign: np.ndarray
    part_size: np.ndarray  # entries per part
    row_order: np.ndarray  # concatenated-output rows, sorted by part
    row_starts: np.ndarray  # reduceat starts of each part in row_order
    part_param_group: np.ndarray  # index into optimizer.param_groups
    # Columns: runs of parts with one (group, param_group).
    column_starts: np.ndarray
    column_group: np.ndarray
    column_param_group: np.ndarray
    # Groups: runs of columns.
    group_column_starts: np.ndarray
    group_part_starts: np.ndarray
    group_kind: np.ndarray  # 0 translation, 1 scale, 2 rescale
    group_size: np.ndarray  # entries per group (|A|)
    translation_reductions: np.ndarray = field(default_factory=lambda: np.zeros(0, bool))
    reduction_offsets: np.ndarray = field(default_factory=lambda: np.zeros(1, np.int64))  # first row of each reduction
    rows_in_order: bool = False  # row_order is the identity: no gather needed
    _flat_index: dict = field(default_factory=dict)  # cached bincount indices of _segments

    @property
    def n_groups(self) -> int:
        return len(self.groups)

    def reduce_parts(self, rows: np.ndarray) -> np.ndarray:
        """Per-part sums from the concatenated per-row sums (rows, K) -> (parts, K)."""
        ordered = rows if self.rows_in_order else rows[self.row_order]
        return self._segments("part", self.row_starts, ordered)

    def to_columns(self, per_part: np.ndarray) -> np.ndarray:
        """Signed sums of per-part values (parts, ...) into columns."""
        signed = per_part * self.part_sign.reshape((-1,) + (1,) * (per_part.ndim - 1))
        return self._segments("column", self.column_starts, signed)

    def to_groups(self, per_column: np.ndarray) -> np.ndarray:
        return self._segments("group", self.group_column_starts, per_column)

    def parts_to_groups_unsigned(self, per_part: np.ndarray) -> np.ndarray:
        return self._segments("group-of-part", self.group_part_starts, per_part)

    def _segments(self, name: str, starts: np.ndarray, values: np.ndarray) -> np.ndarray:
        """Sums over consecutive runs of rows beginning at ``starts``, for 1-D or (N, K) values.

        One np.bincount over a precomputed flat index: several times faster than
        np.add.reduceat on small 2-D arrays (whose cost grows with segments x columns), and it
        adds in row order, so the result does not depend on anything but the inputs.
        """
        n = len(values)
        k = 1 if values.ndim == 1 else values.shape[1]
        key = (name, n, k)
        flat = self._flat_index.get(key)
        if flat is None:
            segment_of_row = np.repeat(np.arange(len(starts)), np.diff(np.append(starts, n)))
            flat = (segment_of_row[:, None] * k + np.arange(k)).ravel()
            self._flat_index[key] = flat
        out = np.bincount(flat, weights=values.ravel(), minlength=len(starts) * k)
        return out if values.ndim == 1 else out.reshape(len(starts), k)


KIND_CODE = {"translation": 0, "scale": 1, "rescale": 2}


def build_plan(groups: Sequence[Any], named_params: dict[str, Any], param_group_of: dict[str, int]) -> Plan:
    """Compile groups (objects with .symmetry and .parts) into a Plan.

    ``param_group_of`` maps each parameter name to its optimizer param_group index.
    """
    reductions: list[Reduction] = []
    red_index: dict[Reduction, int] = {}
    red_offset: list[int] = []
    red_rows: list[int] = []
    parts: list[tuple[int, int, str, float, list[int], int, int]] = []  # group, pg, name, sign, rows, size, order
    for g_i, group in enumerate(groups):
        for order, (name, index, sign) in enumerate(group.parts):
            param = named_params[name]
            shape = tuple(param.shape)
            red, rows = part_rows(name, shape, tuple(index))
            if red not in red_index:
                red_index[red] = len(reductions)
                reductions.append(red)
                n_rows = _reduction_groups(shape, red)
                red_offset.append(sum(red_rows))
                red_rows.append(n_rows)
            r = red_index[red]
            size = _part_size(shape, tuple(index))
            parts.append((g_i, param_group_of[name], name, float(sign), [red_offset[r] + x for x in rows], size, order))
    parts.sort(key=lambda p: (p[0], p[1], p[6]))
    row_order: list[int] = []
    row_starts: list[int] = []
    for p in parts:
        row_starts.append(len(row_order))
        row_order.extend(p[4])
    column_starts, column_group, column_pg = [], [], []
    for i, p in enumerate(parts):
        if i == 0 or (p[0], p[1]) != (parts[i - 1][0], parts[i - 1][1]):
            column_starts.append(i)
            column_group.append(p[0])
            column_pg.append(p[1])
    group_column_starts = [0] + [i for i in range(1, len(column_group)) if column_group[i] != column_group[i - 1]]
    group_part_starts = [0] + [i for i in range(1, len(parts)) if parts[i][0] != parts[i - 1][0]]
    group_size = np.zeros(len(groups), dtype=np.int64)
    for p in parts:
        group_size[p[0]] += p[5]
    translation_reds = np.zeros(len(reductions), dtype=bool)
    for group in groups:
        if group.symmetry == "translation":
            for name, index, _ in group.parts:
                translation_reds[red_index[part_rows(name, tuple(named_params[name].shape), tuple(index))[0]]] = True
    used = {name for group in groups for name, _, _ in group.parts}
    return Plan(
        groups=list(groups),
        params={name: p for name, p in named_params.items() if name in used},
        reductions=reductions,
        reduction_rows=red_rows,
        part_name=[p[2] for p in parts],
        part_sign=np.array([p[3] for p in parts]),
        part_size=np.array([p[5] for p in parts], dtype=np.int64),
        row_order=np.array(row_order, dtype=np.int64),
        row_starts=np.array(row_starts, dtype=np.int64),
        part_param_group=np.array([p[1] for p in parts], dtype=np.int64),
        column_starts=np.array(column_starts, dtype=np.int64),
        column_group=np.array(column_group, dtype=np.int64),
        column_param_group=np.array(column_pg, dtype=np.int64),
        group_column_starts=np.array(group_column_starts, dtype=np.int64),
        group_part_starts=np.array(group_part_starts, dtype=np.int64),
        group_kind=np.array([KIND_CODE[g.symmetry] for g in groups], dtype=np.int64),
        group_size=group_size,
        translation_reductions=translation_reds,
        reduction_offsets=np.cumsum([0] + red_rows).astype(np.int64),
        rows_in_order=len(row_order) == sum(red_rows) and row_order == list(range(len(row_order))),
    )


def _reduction_groups(shape: tuple, red: Reduction) -> int:
    if red.axis == 0:
        return shape[0]
    return shape[1] // red.block


def _part_size(shape: tuple, index: tuple) -> int:
    """Number of entries of param[index] without allocating the tensor."""
    sizes = []
    for dim, n in enumerate(shape):
        ix = index[dim] if dim < len(index) else slice(None)
        sizes.append(len(range(*ix.indices(n))) if isinstance(ix, slice) else 1)
    return int(np.prod(sizes, dtype=np.int64))
