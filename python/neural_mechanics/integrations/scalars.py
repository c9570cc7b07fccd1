"""The per-layer scalars that the loggers and the live view report, from a run's newest row.

Numpy only, vectorised: groups map to (layer, symmetry) keys once per run (``np.unique(...,
return_inverse=True)``), and every scalar of every key comes from a handful of ``bincount`` /
``reduceat`` calls on the row, never a loop over groups.

Per (layer, symmetry), names ``neural_mechanics/<layer>/<symmetry>/<quantity>``:

- ``charge_mean``, ``charge_std``: mean and spread (population standard deviation) over the
  layer's groups of the measured charge;
- ``error_paper``, ``error_exact``: the worst group's |prediction − measured| divided by the
  largest magnitude the group has had so far (``Run.errors`` divides by the largest over the
  whole run, so the final table can only be smaller);
- ``residual_max``: the worst constraint residual (docs/theory.md §3);
- scale layers only: ``norm`` (mean |θ_A|), ``effective_lr`` (mean η/|θ_A|² under SGD, η/|θ_A|
  under Adam-style updates, docs/theory.md §5.4) and ``angular_update`` (mean angle in radians
  between θ_{n−1} and θ_n, see :func:`angular_update`).

Non-finite values (a theory that is NaN for this optimizer, an angle without the previous row)
are left out rather than logged as NaN.

The two derived quantities are one small function each (:func:`effective_lr`,
:func:`angular_update`), so that they can be swapped for run columns once the tracker records
them itself.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np

from ..run import COLUMNS

PREFIX = "neural_mechanics"
COMMON = ("charge_mean", "charge_std", "error_paper", "error_exact", "residual_max")
SCALE_ONLY = ("norm", "effective_lr", "angular_update")
_C = {c: j for j, c in enumerate(COLUMNS)}


def effective_lr(lr: np.ndarray, norm_sq: np.ndarray, adam_style: bool) -> np.ndarray:
    """The effective angular learning rate of scale groups: η/|θ_A|² for SGD, η/|θ_A| for
    Adam-style updates, whose step does not shrink with |θ_A| (docs/theory.md §5.4)."""
    with np.errstate(divide="ignore", invalid="ignore"):
        return lr / (np.sqrt(norm_sq) if adam_style else norm_sq)


def angular_update(x_prev: np.ndarray, x_next: np.ndarray, update_sq_prev: np.ndarray, lr_prev: np.ndarray) -> np.ndarray:
    """The angle (radians) between θ_n and θ_{n+1} for each scale group, from two consecutive
    rows: x = |θ_A|² (``measured``) of both, and |u_n|² (``update_sq``) and η_n (``lr``) of the
    first, where θ_{n+1} = θ_n − η_n u_n.

    The step's length is |θ_{n+1} − θ_n|² = η_n²|u_n|² = x_n + x_{n+1} − 2⟨θ_n, θ_{n+1}⟩, i.e.
    ⟨θ_n, θ_{n+1}⟩ = x_n − η_n⟨θ_n, u_n⟩ with the ⟨θ_n, u_n⟩ that x_{n+1} = x_n − 2η_n⟨θ_n, u_n⟩
    + η_n²|u_n|² implies. The angle is taken in its stable form,
    ∠ = 2 arcsin √((η_n²|u_n|² − (|θ_{n+1}| − |θ_n|)²) / (4|θ_n||θ_{n+1}|)), equal to
    arccos(⟨θ_n, θ_{n+1}⟩ / (|θ_n||θ_{n+1}|)) without its cancellation at small angles.
    An ``lr`` of 0 reads ``update_sq`` as the step itself, as the tracker does."""
    with np.errstate(divide="ignore", invalid="ignore"):
        a, b = np.sqrt(x_prev), np.sqrt(x_next)
        lr = np.where(lr_prev > 0, lr_prev, 1.0)
        step_sq = lr * lr * update_sq_prev
        s = (step_sq - (b - a) ** 2) / (4.0 * a * b)
        return 2.0 * np.arcsin(np.sqrt(np.clip(s, 0.0, 1.0)))


@dataclass
class LayerIndex:
    """Groups → (layer, symmetry) keys, computed once per run."""

    keys: list[tuple[str, str]]  # (layer, symmetry) per key, in np.unique's order
    inverse: np.ndarray  # (groups,) key of each group
    counts: np.ndarray  # (keys,)
    order: np.ndarray  # groups sorted by key (stable)
    starts: np.ndarray  # first position of each key in ``order``
    scale: np.ndarray  # (groups,) indices of the scale groups
    scale_key: np.ndarray  # (keys,) bool: a scale key

    @classmethod
    def of(cls, groups: Any) -> LayerIndex:
        layer = np.asarray(groups.layer, dtype=str)
        symmetry = np.asarray(groups.symmetry, dtype=str)
        layers, li = np.unique(layer, return_inverse=True)
        symmetries, si = np.unique(symmetry, return_inverse=True)
        uniq, inverse = np.unique(li.reshape(-1) * len(symmetries) + si.reshape(-1), return_inverse=True)
        inverse = inverse.reshape(-1)
        keys = [(str(layers[u // len(symmetries)]), str(symmetries[u % len(symmetries)])) for u in uniq.tolist()]
        order = np.argsort(inverse, kind="stable")
        counts = np.bincount(inverse, minlength=len(keys))
        starts = np.concatenate([[0], np.cumsum(counts)[:-1]]).astype(np.intp)
        return cls(
            keys=keys,
            inverse=inverse,
            counts=counts,
            order=order,
            starts=starts,
            scale=np.flatnonzero(symmetry == "scale"),
            scale_key=np.array([k[1] == "scale" for k in keys], dtype=bool),
        )

    def name(self, key: int, quantity: str) -> str:
        layer, symmetry = self.keys[key]
        return f"{PREFIX}/{layer}/{symmetry}/{quantity}"

    def mean(self, values: np.ndarray, inverse: np.ndarray | None = None) -> np.ndarray:
        """Per key, the mean of the finite ``values`` (NaN where none is finite)."""
        inv = self.inverse if inverse is None else inverse
        finite = np.isfinite(values)
        total = np.bincount(inv, weights=np.where(finite, values, 0.0), minlength=len(self.keys))
        count = np.bincount(inv, weights=finite.astype(np.float64), minlength=len(self.keys))
        with np.errstate(divide="ignore", invalid="ignore"):
            return total / count

    def max(self, values: np.ndarray) -> np.ndarray:
        """Per key, the largest finite value (NaN where none is finite)."""
        with np.errstate(invalid="ignore"):
            return np.fmax.reduceat(values[self.order], self.starts) if len(values) else np.zeros(0)

    def split(self, values: np.ndarray) -> list[np.ndarray]:
        """``values`` of each key's groups, one array per key."""
        return np.split(values[self.order], self.starts[1:])


class RowWatcher:
    """The state the scalars need between rows, updated after every committed row in O(groups)
    numpy work: the newest row (a view, valid until the next row is written), the largest
    magnitude of each group so far, and the measured charge, |u|² and η of the scale groups in
    the row before (for the angle)."""

    def __init__(self, groups: Any, optimizer: str = ""):
        self.index = LayerIndex.of(groups)
        self.groups = len(self.index.inverse)
        self.adam_style = "SGD" not in (optimizer or "")
        self.step: int | None = None
        self.time = float("nan")
        self.row: np.ndarray | None = None
        self.rows = 0
        self.max_magnitude = np.zeros(self.groups)
        # (measured, update_sq, lr) of the scale groups, this row and the row before (two
        # buffers, swapped): flat indices into a C-contiguous (columns, groups) row.
        scale = self.index.scale
        self._cols = [_C[c] for c in ("measured", "update_sq", "lr")]
        self._take = np.concatenate([j * self.groups + scale for j in self._cols])
        # Scale groups usually sit in a few contiguous runs (a layer's channels): copy those as
        # slices, which is cheaper than a gather (np.take) over 10⁴ groups.
        breaks = np.flatnonzero(np.diff(scale) != 1) + 1 if len(scale) else np.zeros(0, dtype=np.intp)
        bounds = np.concatenate([[0], breaks, [len(scale)]]).astype(int).tolist()
        self._runs = [(int(scale[a]), int(scale[b - 1]) + 1, a, b) for a, b in zip(bounds[:-1], bounds[1:]) if b > a]
        self._buffers = [np.full(len(self._take), np.nan), np.full(len(self._take), np.nan)]
        self._current = 0
        self._prev_step: int | None = None
        self._names = {q: [self.index.name(k, q) for k in range(len(self.index.keys))] for q in COMMON + SCALE_ONLY}

    def update(self, step: int, time: float, row: np.ndarray) -> None:
        """Called once per committed row."""
        np.fmax(self.max_magnitude, np.abs(row[_C["magnitude"]]), out=self.max_magnitude)
        self._current ^= 1
        out = self._buffers[self._current]
        if len(self._runs) <= 8:
            view = out.reshape(3, -1)
            for lo, hi, a, b in self._runs:
                for j, c in enumerate(self._cols):
                    view[j, a:b] = row[c, lo:hi]
        else:
            np.take(row.reshape(-1), self._take, out=out, mode="clip")
        self._prev_step, self.step, self.time, self.row = self.step, int(step), float(time), row
        self.rows += 1

    def scale_state(self) -> tuple[np.ndarray, np.ndarray]:
        """(this row, the row before) as (3, scale groups) arrays of measured, update_sq, lr."""
        k = len(self.index.scale)
        return self._buffers[self._current].reshape(3, k), self._buffers[self._current ^ 1].reshape(3, k)

    def errors(self, which: str) -> np.ndarray:
        """(groups,) |prediction − measured| / the largest magnitude so far, of the newest row."""
        assert self.row is not None
        scale = np.where(self.max_magnitude > 0, self.max_magnitude, 1.0)
        return np.abs(self.row[_C[which]] - self.row[_C["measured"]]) / scale

    def angles(self) -> np.ndarray:
        """(scale groups,) the angle of the step from the row before to the newest; NaN unless the
        two rows are consecutive steps."""
        now, before = self.scale_state()
        if self._prev_step is None or self.step != self._prev_step + 1:
            return np.full(now.shape[1], np.nan)
        return angular_update(before[0], now[0], before[1], before[2])

    def values(self) -> dict[str, np.ndarray]:
        """Every scalar of the newest row, per key: quantity → (keys,) array (NaN where it does
        not apply)."""
        assert self.row is not None
        idx, row = self.index, self.row
        x = row[_C["measured"]]
        mean = idx.mean(x)
        dev = x - mean[idx.inverse]
        with np.errstate(invalid="ignore"):
            std = np.sqrt(idx.mean(dev * dev))
        out = {
            "charge_mean": mean,
            "charge_std": std,
            "error_paper": idx.max(self.errors("paper")),
            "error_exact": idx.max(self.errors("exact")),
            "residual_max": idx.max(row[_C["residual"]]),
        }
        nan = np.full(len(idx.keys), np.nan)
        if len(idx.scale):
            now, _ = self.scale_state()
            inv = idx.inverse[idx.scale]
            with np.errstate(invalid="ignore"):
                out["norm"] = idx.mean(np.sqrt(now[0]), inv)
            out["effective_lr"] = idx.mean(effective_lr(now[2], now[0], self.adam_style), inv)
            out["angular_update"] = idx.mean(self.angles(), inv)
        else:
            out.update({q: nan for q in SCALE_ONLY})
        return out

    def scalars(self) -> dict[str, float]:
        """``neural_mechanics/<layer>/<symmetry>/<quantity>`` → value, finite values only."""
        out: dict[str, float] = {}
        for quantity, per_key in self.values().items():
            names = self._names[quantity]
            for k in np.flatnonzero(np.isfinite(per_key)).tolist():
                out[names[k]] = float(per_key[k])
        return out

    def charges(self) -> dict[str, np.ndarray]:
        """``neural_mechanics/<layer>/<symmetry>/charge`` → the measured charges of its groups
        (for histograms)."""
        assert self.row is not None
        parts = self.index.split(self.row[_C["measured"]])
        return {self.index.name(k, "charge"): v for k, v in enumerate(parts)}
