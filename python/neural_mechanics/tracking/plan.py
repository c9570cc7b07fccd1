"""The measurement plan: symmetry groups compiled into fused reductions and index maps.

Every part of a group (a row, a column, a column block, a whole tensor, a column inside a row
range) is a set of output rows of one fused reduction of its parameter (docs/theory.md §2). The
plan lists each distinct reduction once, so one call into Rust per step reduces every tensor;
the maps from output rows to parts, columns and groups go to Rust once (``native_arrays``), and
each step's sums along them happen there (src/tracking/plan.rs).

Terms: a *part* is one (parameter, index, sign) entry of a group; a *column* is the set of parts
of one group that share one optimizer param_group (one ledger runs per column and the group's
ledger is their sum, docs/theory.md §5.3); a *group* is a symmetry group.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
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
    """A run's reductions and the index maps from their output rows to parts, columns and groups.

    Parts are ordered by (group, param_group, position in the group); a column is a run of parts
    with one (group, param_group), a group a run of columns. The sums along these maps happen in
    Rust (src/tracking/plan.rs, through ``native_arrays``).
    """

    groups: list[Any]
    params: dict[str, Any]  # name -> torch Parameter, the parameters the groups read
    names: list[str]  # the parameters in the order their reductions first appear
    reductions: list[Reduction]
    reduction_offsets: np.ndarray  # first output row of each reduction, and the total
    translation_reductions: np.ndarray  # (reductions,) bool: a translation part reads it
    part_rows: list[list[int]]  # output rows of each part
    part_param: list[str]  # each part's parameter
    part_sign: np.ndarray
    part_size: np.ndarray  # entries per part
    part_column: np.ndarray
    column_group: np.ndarray
    column_param_group: np.ndarray  # index into optimizer.param_groups
    group_kind: np.ndarray  # 0 translation, 1 scale, 2 rescale
    group_size: np.ndarray  # entries per group (|A|)

    @property
    def n_groups(self) -> int:
        return len(self.groups)

    @property
    def extra_rows(self) -> np.ndarray:
        """The output rows of the translation reductions: where a plain sum of a third array (the
        momentum buffer, the measured update) is needed, in the order the reducers return them."""
        offsets = self.reduction_offsets
        spans = [np.arange(offsets[i], offsets[i + 1]) for i in np.flatnonzero(self.translation_reductions)]
        return np.concatenate(spans).astype(np.int64) if spans else np.zeros(0, np.int64)

    def columns_per_group(self) -> np.ndarray:
        return np.bincount(self.column_group, minlength=self.n_groups)

    def layers(self) -> tuple[np.ndarray, np.ndarray]:
        """Each group's layer (:func:`gradient_layer`) and each part's (its parameter's module) as
        indices: the "no gradient" rule compares a group's |ĝ_A|² with its layer's, the |ĝ|² of
        every part in that layer whatever its group (docs/theory.md §3)."""
        from ..symmetries.discover import module_name

        index: dict[str, int] = {}
        groups = [index.setdefault(gradient_layer(g), len(index)) for g in self.groups]
        parts = [index.setdefault(module_name(name), len(index)) for name in self.part_param]
        return np.array(groups, dtype=np.int64), np.array(parts, dtype=np.int64)

    def native_arrays(self) -> dict[str, Any]:
        """The maps as _native.TrackerCore takes them."""
        group_layer, part_layer = self.layers()
        return {
            "part_row_starts": np.cumsum([0] + [len(r) for r in self.part_rows]).astype(np.int64),
            "part_rows": np.array([r for rows in self.part_rows for r in rows], dtype=np.int64),
            "part_sign": self.part_sign.astype(np.float64),
            "part_column": self.part_column,
            "part_size": self.part_size.astype(np.float64),
            "column_group": self.column_group,
            "column_param_group": self.column_param_group,
            "group_kind": self.group_kind,
            "group_size": self.group_size.astype(np.float64),
            "group_layer": group_layer,
            "part_layer": part_layer,
            "extra_rows": self.extra_rows,
            "rows": int(self.reduction_offsets[-1]),
        }


KIND_CODE = {"translation": 0, "scale": 1, "rescale": 2}


def gradient_layer(group: Any) -> str:
    """The layer a group's gradient is compared with by the "no gradient" rule (docs/theory.md §3):
    the module of its first part's parameter ("conv1.bias" → "conv1"; a weight_norm leaf
    "0.parametrizations.weight.original1" → "0"), i.e. its incoming side. ``verify`` and the
    tracker both use it, so a bias before BatchNorm is judged against its conv's weight."""
    from ..symmetries.discover import module_name

    return module_name(group.parts[0][0])


def build_plan(groups: Sequence[Any], named_params: dict[str, Any], param_group_of: dict[str, int]) -> Plan:
    """Compile groups (objects with .symmetry and .parts) into a Plan.

    ``param_group_of`` maps each parameter name to its optimizer param_group index.
    """
    reductions: list[Reduction] = []
    red_index: dict[Reduction, int] = {}
    red_offset: list[int] = []
    red_rows: list[int] = []
    translation_reds: set[int] = set()
    parts: list[tuple[int, int, int, float, list[int], int, str]] = []  # group, param_group, order, sign, rows, size, parameter
    for g_i, group in enumerate(groups):
        for order, (name, index, sign) in enumerate(group.parts):
            shape = tuple(named_params[name].shape)
            red, rows = part_rows(name, shape, tuple(index))
            if red not in red_index:
                red_index[red] = len(reductions)
                reductions.append(red)
                red_offset.append(sum(red_rows))
                red_rows.append(_reduction_groups(shape, red))
            r = red_index[red]
            if group.symmetry == "translation":
                translation_reds.add(r)
            parts.append((g_i, param_group_of[name], order, float(sign), [red_offset[r] + x for x in rows], _part_size(shape, tuple(index)), name))
    parts.sort(key=lambda p: p[:3])
    column_of: dict[tuple[int, int], int] = {}
    for g_i, pg, *_ in parts:
        column_of.setdefault((g_i, pg), len(column_of))
    group_size = np.zeros(len(groups), dtype=np.int64)
    for p in parts:
        group_size[p[0]] += p[5]
    used = {name for group in groups for name, _, _ in group.parts}
    return Plan(
        groups=list(groups),
        params={name: p for name, p in named_params.items() if name in used},
        names=list(dict.fromkeys(r.name for r in reductions)),
        reductions=reductions,
        reduction_offsets=np.cumsum([0] + red_rows).astype(np.int64),
        translation_reductions=np.array([i in translation_reds for i in range(len(reductions))], dtype=bool),
        part_rows=[p[4] for p in parts],
        part_param=[p[6] for p in parts],
        part_sign=np.array([p[3] for p in parts]),
        part_size=np.array([p[5] for p in parts], dtype=np.int64),
        part_column=np.array([column_of[(p[0], p[1])] for p in parts], dtype=np.int64),
        column_group=np.array([g for g, _ in column_of], dtype=np.int64),
        column_param_group=np.array([pg for _, pg in column_of], dtype=np.int64),
        group_kind=np.array([KIND_CODE[g.symmetry] for g in groups], dtype=np.int64),
        group_size=group_size,
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
