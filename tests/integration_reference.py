"""An independent (loop-based) reference of the logged per-layer scalars, computed from a
finished Run, for the integration tests to compare what the loggers wrote against."""

from __future__ import annotations

import numpy as np


def expected_scalars(run, step: int) -> dict[str, float]:
    """``neural_mechanics/<layer>/<symmetry>/<quantity>`` → value at ``step``, from the run alone:
    errors against the largest magnitude up to that step, the angle from rows step−1 and step."""
    n = len(run.groups)
    steps = run.step_index
    rows = {int(s): i for i, s in enumerate(steps)}
    i = rows[step]
    cols = {c: run.array(c) for c in ("measured", "paper", "exact", "magnitude", "residual", "lr", "update_sq")}
    biggest = np.nanmax(np.abs(cols["magnitude"][: i + 1]), axis=0)
    biggest = np.where(biggest > 0, biggest, 1.0)
    adam = "SGD" not in run.optimizer
    out: dict[str, float] = {}
    keys = sorted(set(zip(map(str, run.groups.layer), map(str, run.groups.symmetry))))
    for layer, sym in keys:
        members = [g for g in range(n) if run.groups.layer[g] == layer and run.groups.symmetry[g] == sym]
        x = cols["measured"][i, members]
        name = f"neural_mechanics/{layer}/{sym}"
        values = {
            "charge_mean": float(np.mean(x)),
            "charge_std": float(np.std(x)),
            "error_paper": _max(np.abs(cols["paper"][i, members] - x) / biggest[members]),
            "error_exact": _max(np.abs(cols["exact"][i, members] - x) / biggest[members]),
            "residual_max": _max(cols["residual"][i, members]),
        }
        if sym == "scale":
            lr = cols["lr"][i, members]
            values["norm"] = float(np.mean(np.sqrt(x)))
            values["effective_lr"] = float(np.mean(lr / (np.sqrt(x) if adam else x)))
            if i > 0 and rows.get(step - 1) == i - 1:
                values["angular_update"] = float(np.mean(direct_angle(cols, i, members)))
        out.update({f"{name}/{q}": v for q, v in values.items() if np.isfinite(v)})
    return out


def direct_angle(cols, i: int, members) -> np.ndarray:
    """The angle between θ_{i−1} and θ_i by the law of cosines, arccos form."""
    x0, x1 = cols["measured"][i - 1, members], cols["measured"][i, members]
    lr = cols["lr"][i - 1, members]
    step_sq = lr * lr * cols["update_sq"][i - 1, members]
    cos = (x0 + x1 - step_sq) / (2 * np.sqrt(x0 * x1))
    return np.arccos(np.clip(cos, -1, 1))


def _max(v: np.ndarray) -> float:
    v = v[np.isfinite(v)]
    return float(v.max()) if v.size else float("nan")
