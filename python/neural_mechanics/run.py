"""A recorded run: measured charges against the paper's closed forms and the exact ledger.

Row n of the long table describes θ_n, the parameters before optimizer step n: ``measured`` is
the charge of θ_n, ``paper`` and ``exact`` the two theories' predictions of it (both open-loop
from the first tracked step), and the per-step columns (``grad_sq``, ``update_sq``, ``flux``,
``update_sum``, ``residual``) describe step n. A last row n = N holds the final charge with the
per-step columns NaN.

Errors everywhere are |prediction − measured| / (max over the run of the group's magnitude),
where the magnitude is √|A|·|θ_A| (translation), |θ_A|² (scale), |θ_A1|² + |θ_A2|² (rescale).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import numpy as np

# Per-step columns stored for every recorded row, one float64 value per group.
STEP_COLUMNS = ("measured", "paper", "exact", "grad_sq", "update_sq", "flux", "update_sum", "magnitude", "residual")


@dataclass
class GroupInfo:
    """What a run keeps of each symmetry group (no torch objects, so a run outlives its model)."""

    symmetry: np.ndarray  # (groups,) str
    layer: np.ndarray  # (groups,) str
    index: np.ndarray  # (groups,) int
    label: np.ndarray  # (groups,) str
    size: np.ndarray  # (groups,) int, entries |A|

    def __len__(self) -> int:
        return len(self.symmetry)

    @classmethod
    def from_groups(cls, groups: Any, sizes: np.ndarray) -> "GroupInfo":
        gs = list(groups)
        return cls(
            symmetry=np.array([g.symmetry for g in gs], dtype=object),
            layer=np.array([g.layer for g in gs], dtype=object),
            index=np.array([int(g.index) for g in gs], dtype=np.int64),
            label=np.array([str(getattr(g, "label", g.index)) for g in gs], dtype=object),
            size=np.asarray(sizes, dtype=np.int64),
        )


@dataclass
class Run:
    """Measured charges and theory per group per recorded step; see the module docstring."""

    groups: GroupInfo
    optimizer: str = ""
    steps: list[int] = field(default_factory=list)
    time: list[float] = field(default_factory=list)
    lr: list[np.ndarray] = field(default_factory=list)  # per group (mixed param_groups differ)
    columns: dict[str, list[np.ndarray]] = field(default_factory=lambda: {c: [] for c in STEP_COLUMNS})
    # layer notes: (symmetry, layer) -> why the paper column is NaN there
    paper_notes: dict[tuple[str, str], str] = field(default_factory=dict)
    exact_note: str = ""
    regimes: dict[str, list[str]] = field(default_factory=dict)  # symmetry -> regimes seen, in order
    skipped: dict[str, str] = field(default_factory=dict)  # parameter or group -> reason
    notes: list[str] = field(default_factory=list)
    final: dict[str, Any] | None = None  # the row n = N, refreshed by the tracker

    # -- recording ---------------------------------------------------------------------------
    def append(self, step: int, time: float, lr: np.ndarray, values: dict[str, np.ndarray]) -> None:
        self.steps.append(int(step))
        self.time.append(float(time))
        self.lr.append(np.asarray(lr, dtype=np.float64))
        for c in STEP_COLUMNS:
            self.columns[c].append(np.asarray(values[c], dtype=np.float64))

    def note_regime(self, symmetry: str, regime: str) -> None:
        seen = self.regimes.setdefault(symmetry, [])
        if not seen or seen[-1] != regime:
            seen.append(regime)

    # -- views -------------------------------------------------------------------------------
    def _rows(self) -> tuple[np.ndarray, np.ndarray, np.ndarray, dict[str, np.ndarray]]:
        """(steps, time, lr, columns) with the final row appended, as 2-D arrays (rows, groups)."""
        steps = list(self.steps)
        time = list(self.time)
        lr = list(self.lr)
        cols = {c: list(v) for c, v in self.columns.items()}
        if self.final is not None and (not steps or self.final["step"] > steps[-1]):
            steps.append(self.final["step"])
            time.append(self.final["time"])
            n = len(self.groups)
            lr.append(np.full(n, np.nan))
            for c in STEP_COLUMNS:
                cols[c].append(np.asarray(self.final.get(c, np.full(n, np.nan)), dtype=np.float64))
        n = len(self.groups)
        as2d = {c: (np.vstack(v) if v else np.zeros((0, n))) for c, v in cols.items()}
        lr2 = np.vstack(lr) if lr else np.zeros((0, n))
        return np.asarray(steps, dtype=np.int64), np.asarray(time, dtype=np.float64), lr2, as2d

    def array(self, column: str) -> np.ndarray:
        """One column as a (rows, groups) array, final row included."""
        if column in ("lr",):
            return self._rows()[2]
        return self._rows()[3][column]

    @property
    def step_index(self) -> np.ndarray:
        return self._rows()[0]

    def errors(self, which: str) -> np.ndarray:
        """|prediction − measured| / max-over-run magnitude, (rows, groups); which: paper/exact."""
        _, _, _, c = self._rows()
        scale = np.nanmax(np.abs(c["magnitude"]), axis=0) if len(c["magnitude"]) else np.ones(len(self.groups))
        scale = np.where(scale > 0, scale, 1.0)
        return np.abs(c[which] - c["measured"]) / scale

    def to_pandas(self) -> Any:
        """The long table: one row per (step, group)."""
        import pandas as pd

        steps, time, lr, c = self._rows()
        n_rows, n = len(steps), len(self.groups)
        table = {
            "step": np.repeat(steps, n),
            "time": np.repeat(time, n),
            "lr": lr.reshape(-1),
            "symmetry": np.tile(self.groups.symmetry, n_rows),
            "layer": np.tile(self.groups.layer, n_rows),
            "group": np.tile(self.groups.index, n_rows),
            "label": np.tile(self.groups.label, n_rows),
        }
        for col in STEP_COLUMNS:
            table[col] = c[col].reshape(-1)
        frame = pd.DataFrame(table)
        for col in ("symmetry", "layer", "label"):
            frame[col] = frame[col].astype("category")
        return frame

    def summary(self) -> Any:
        """Per layer: groups, median and max error of paper and exact, max constraint residual,
        the momentum regime, and why a theory is NaN where it is."""
        import pandas as pd

        exact = self.errors("exact")
        paper = self.errors("paper")
        residual = self.array("residual")
        rows = []
        keys = list(dict.fromkeys(zip(self.groups.symmetry, self.groups.layer)))
        for sym, layer in keys:
            mask = (self.groups.symmetry == sym) & (self.groups.layer == layer)
            e, p, r = exact[:, mask], paper[:, mask], residual[:, mask]
            rows.append(
                {
                    "symmetry": sym,
                    "layer": layer,
                    "groups": int(mask.sum()),
                    "exact_median": _nan_stat(np.nanmedian, e),
                    "exact_max": _nan_stat(np.nanmax, e),
                    "paper_median": _nan_stat(np.nanmedian, p),
                    "paper_max": _nan_stat(np.nanmax, p),
                    "residual_max": _nan_stat(np.nanmax, r),
                    "regime": " -> ".join(self.regimes.get(sym, [])) or "n/a",
                    "note": self.paper_notes.get((sym, layer), self.exact_note),
                }
            )
        return pd.DataFrame(rows)

    def __repr__(self) -> str:
        n_rows = len(self.steps) + (self.final is not None)
        kinds = {k: int((self.groups.symmetry == k).sum()) for k in ("translation", "scale", "rescale")}
        return (
            f"Run({self.optimizer or 'optimizer'}, {len(self.groups)} groups "
            f"({', '.join(f'{v} {k}' for k, v in kinds.items() if v)}), {n_rows} recorded rows)"
        )


def _nan_stat(fn: Any, a: np.ndarray) -> float:
    finite = a[np.isfinite(a)]
    return float(fn(finite)) if finite.size else float("nan")
