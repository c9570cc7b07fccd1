"""The §5.4 equilibrium of scale groups (docs/theory.md §5.4), measured from a recorded run.

Weight decay shrinks the norm of a scale-invariant group and the finite learning rate grows it;
under torch.optim.SGD the two balance at |θ*|⁴ = η(1−d)E|g̃_A|²/(2λ(1−β)), where g̃_A is the
gradient at unit norm (|g̃_A|² = |ĝ_A|²·|θ_A|², read from the run's ``grad_sq`` and ``measured``
columns). This module turns a :class:`~neural_mechanics.Run` into that prediction: per row
(:func:`equilibrium_series`), per group at the end of the last learning-rate phase
(:func:`equilibrium_table`) and per layer (:func:`equilibrium_summary`). It computes; it draws
and writes nothing (``plots`` and ``report`` do).

Imports: ``theory`` only. A Run is read through its public methods (``array``, ``groups``,
``step_index``, ``optimizer``), never imported: ``run`` imports ``plots`` lazily for
``Run.plot`` and ``plots`` imports this module, so importing ``run`` here would close a cycle.
"""

from __future__ import annotations

from typing import Any

import numpy as np

from . import theory

__all__ = [
    "has_equilibrium",
    "relaxation_series",
    "grad_sq_unit",
    "last_phase",
    "equilibrium_series",
    "equilibrium_table",
    "equilibrium_summary",
    "EQUILIBRIUM_TOLERANCE",
    "equilibrium_ratios",
    "equilibrium_reached",
]


def _ffill(a: np.ndarray) -> np.ndarray:
    """Forward-fill NaN rows (the final row has no hyperparameters: it keeps the last step's)."""
    out = a.copy()
    for i in range(1, len(out)):
        bad = ~np.isfinite(out[i])
        out[i, bad] = out[i - 1, bad]
    return out


def _scale_mask(run: Any) -> np.ndarray:
    return np.asarray(run.groups.symmetry == "scale")


def _is_sgd(run: Any) -> bool:
    return "SGD" in (run.optimizer or "") and np.isfinite(run.array("momentum")[:-1]).any()


def has_equilibrium(run: Any) -> bool:
    """Whether the §5.4 SGD equilibrium applies to ``run``: it has scale groups and was trained
    with torch.optim.SGD (every function here gives NaN or an empty table otherwise)."""
    return bool(_scale_mask(run).any()) and _is_sgd(run)


def grad_sq_unit(run: Any) -> np.ndarray:
    """E|g̃_A|² per row for scale groups: |ĝ_A|²·|θ_A|² (the gradient at unit norm), (rows, groups);
    NaN for other groups and for the final row."""
    g2 = run.array("grad_sq") * run.array("measured")
    g2[:, ~_scale_mask(run)] = np.nan
    return g2


def _sgd_equilibrium(run: Any, unit: np.ndarray, rows: Any) -> dict[str, np.ndarray]:
    hyper = {c: _ffill(run.array(c))[rows] for c in ("lr", "momentum", "dampening", "weight_decay")}
    with np.errstate(all="ignore"):
        return theory.equilibrium_sgd(
            lr=hyper["lr"], weight_decay=hyper["weight_decay"], grad_sq_unit=np.nan_to_num(unit, nan=0.0),
            momentum=hyper["momentum"], dampening=hyper["dampening"],
        )


def _scatter(values: np.ndarray, mask: np.ndarray, n: int) -> np.ndarray:
    full = np.full((values.shape[0], n), np.nan)
    full[:, mask] = values
    return full


def equilibrium_series(run: Any, window: int | None = None) -> np.ndarray:
    """The equilibrium |θ*|² of every scale group at every row, (rows, groups), NaN elsewhere.

    E|g̃_A|² is the mean of |ĝ_A|²|θ_A|² over the trailing ``window`` rows (default: 1/10 of the
    run, at least 5), the hyperparameters those of the row's step: "where the norm is heading
    now". Only meaningful for torch.optim.SGD runs (NaN otherwise).
    """
    mask = _scale_mask(run)
    rows = len(run.step_index)
    out = np.full((rows, len(run.groups)), np.nan)
    if not has_equilibrium(run):
        return out
    w = max(5, rows // 10) if window is None else max(1, int(window))
    unit = _ffill(grad_sq_unit(run)[:, mask])
    finite = np.isfinite(unit)
    csum = np.cumsum(np.where(finite, unit, 0.0), axis=0)
    ccount = np.cumsum(finite, axis=0)
    lag_sum = np.vstack([np.zeros((w, unit.shape[1])), csum[:-w]]) if rows > w else np.zeros_like(csum)
    lag_count = np.vstack([np.zeros((w, unit.shape[1])), ccount[:-w]]) if rows > w else np.zeros_like(ccount)
    with np.errstate(all="ignore"):
        mean = (csum - lag_sum) / (ccount - lag_count)
    eq = _sgd_equilibrium(run, _scatter(mean, mask, len(run.groups)), slice(None))
    out[:, mask] = np.asarray(eq["norm_sq"])[:, mask]
    return out


def relaxation_series(run: Any) -> np.ndarray:
    """Where the §5.4 model puts |θ_A|² at every row, (rows, groups), NaN but for scale groups.

    The model of docs/theory.md §5.4 moves z = |θ_A|⁴ toward its equilibrium |θ*|⁴ at the rate
    1/τ = 4ηλ(1−d)/(1−β) per step: z_{n+1} = z_n e^{−1/τ} + (1 − e^{−1/τ}) |θ*_n|⁴, with
    |θ*_n|⁴ = η(1−d)|g̃_n|²/(2λ(1−β)) from the noise measured at step n (|g̃_n|² = |ĝ_n|²|θ_n|²)
    and that step's hyperparameters; it starts from the measured |θ_0|² and is never corrected
    by the measurement afterwards (open loop, like the theories of §5). A ratio measured /
    predicted that stays flat says the norm relaxes as §5.4 predicts, however far from
    equilibrium it still is. Only meaningful for torch.optim.SGD runs (NaN otherwise).
    """
    mask = _scale_mask(run)
    rows = len(run.step_index)
    out = np.full((rows, len(run.groups)), np.nan)
    if not has_equilibrium(run) or rows == 0:
        return out
    hyper = {c: _ffill(run.array(c))[:, mask] for c in ("lr", "momentum", "dampening", "weight_decay")}
    lr, beta, wd = hyper["lr"], hyper["momentum"], hyper["weight_decay"]
    damp = np.where(beta > 0, hyper["dampening"], 0.0)  # PyTorch ignores dampening without momentum
    measured = run.array("measured")[:, mask]
    unit = np.nan_to_num(grad_sq_unit(run)[:, mask], nan=0.0)
    with np.errstate(all="ignore"):
        rate = 4 * lr * wd * (1 - damp) / (1 - beta)
        # rate·|θ*|⁴ = 2η²(1−d)²|g̃|²/(1−β)², finite also without weight decay
        drive = 2 * lr**2 * (1 - damp) ** 2 * unit / (1 - beta) ** 2
        gain = np.where(rate > 0, -np.expm1(-rate) / np.where(rate > 0, rate, 1.0), 1.0)
    z = np.empty_like(measured)
    z[0] = measured[0] ** 2
    for n in range(rows - 1):
        z[n + 1] = z[n] * np.exp(-rate[n]) + gain[n] * drive[n]
    out[:, mask] = np.sqrt(z)
    return out


def last_phase(run: Any) -> tuple[int, int]:
    """(first row, last step row) of the last stretch of constant learning rate."""
    lr = run.array("lr")[:, 0]
    last = len(lr) - 2  # the final row has no step
    start = last
    while start > 0 and lr[start - 1] == lr[last]:
        start -= 1
    return start, last


def equilibrium_table(run: Any, window: float = 0.5) -> Any:
    """Per scale group: the §5.4 equilibrium |θ*|² of the last learning-rate phase against the
    |θ_A|² reached at the end (a pandas DataFrame; empty without scale groups or for a non-SGD
    run).

    E|g̃_A|² = mean of |ĝ_A|²·|θ_A|² over the last ``window`` fraction of that phase, hyperparameters
    its last step's. ``ratio`` = reached / predicted: 1 at equilibrium, > 1 a norm still decaying
    toward it, < 1 still growing. ``phase_steps`` against ``relaxation_steps`` says whether the
    run was long enough to get there. ``relaxed_norm_sq``: where the §5.4 relaxation from the
    start of the run puts the norm at the end (:func:`relaxation_series`); ``ratio_relaxed`` =
    reached / that, near 1 when the norm follows the model however far from equilibrium.
    """
    import pandas as pd

    mask = _scale_mask(run)
    cols = ["layer", "group", "label", "initial_norm_sq", "final_norm_sq", "predicted_norm_sq", "ratio",
            "relaxation_steps", "phase_steps", "relaxed_norm_sq", "ratio_relaxed", "angular_update", "effective_lr_final",
            "effective_lr_equilibrium"]
    if not has_equilibrium(run):
        return pd.DataFrame(columns=cols)
    start, last = last_phase(run)
    lo = max(start, last + 1 - max(1, int(round((last + 1 - start) * window))))
    unit = grad_sq_unit(run)[lo : last + 1][:, mask]
    finite = np.isfinite(unit)
    with np.errstate(all="ignore"):
        e_unit = _scatter((np.where(finite, unit, 0.0).sum(0) / finite.sum(0))[None, :], mask, len(run.groups))[0]
    eq = _sgd_equilibrium(run, e_unit[None, :], slice(last, last + 1))
    measured = run.array("measured")
    lr = _ffill(run.array("lr"))[last]
    idx = np.flatnonzero(mask)
    final, pred = measured[-1, idx], np.asarray(eq["norm_sq"])[0, idx]
    relaxed = relaxation_series(run)[-1, idx]
    frame = pd.DataFrame(
        {
            "layer": run.groups.layer[idx].astype(str),
            "group": run.groups.index[idx],
            "label": run.groups.label[idx].astype(str),
            "initial_norm_sq": measured[0, idx],
            "final_norm_sq": final,
            "predicted_norm_sq": pred,
            "ratio": final / pred,
            "relaxation_steps": np.asarray(eq["relaxation_steps"])[0, idx],
            "phase_steps": np.full(len(idx), last + 1 - start),
            "relaxed_norm_sq": relaxed,
            "ratio_relaxed": final / relaxed,
            "angular_update": np.asarray(eq["angular_update"])[0, idx],
            "effective_lr_final": lr[idx] / final,
            "effective_lr_equilibrium": np.asarray(eq["effective_lr"])[0, idx],
        }
    )
    return frame[cols]


def equilibrium_summary(run: Any, window: float = 0.5) -> Any:
    """``equilibrium_table`` per layer: medians of the predicted and reached norms and their ratio."""
    import pandas as pd

    t = equilibrium_table(run, window)
    rows = []
    for layer in dict.fromkeys(t["layer"]):
        s = t[t["layer"] == layer]
        rows.append(
            {
                "layer": layer,
                "groups": len(s),
                "initial |θ|² (median)": float(np.median(s["initial_norm_sq"])),
                "reached |θ|² (median)": float(np.median(s["final_norm_sq"])),
                "predicted |θ*|² (median)": float(np.median(s["predicted_norm_sq"])),
                "reached / predicted (median)": float(np.median(s["ratio"])),
                "relaxation steps": float(np.median(s["relaxation_steps"])),
                "last phase steps": int(s["phase_steps"].iloc[0]),
                "reached / §5.4 relaxation (median)": float(np.median(s["ratio_relaxed"])),
            }
        )
    return pd.DataFrame(rows)


# -- equilibrium, live: the run's own per-step columns (docs/theory.md §5.6) ------------------

#: A scale group is at its §5.4 equilibrium when its measured angular update and effective
#: learning rate, averaged over the trailing window, are within this relative tolerance of their
#: predicted equilibrium values (the run's columns ``angular_update_eq``, ``effective_lr_eq``).
EQUILIBRIUM_TOLERANCE = 0.1


def _window_rows(rows: int) -> int:
    """The trailing window of the live equilibrium: 1/10 of the run, between 5 and 50 rows."""
    return max(5, min(50, rows // 10))


def _trailing_mean(a: np.ndarray, w: int) -> np.ndarray:
    """The mean of the last ``w`` finite values of every column at every row, (rows, groups);
    NaN until ``w`` rows have passed or where the window holds no finite value."""
    finite = np.isfinite(a)
    csum = np.cumsum(np.where(finite, a, 0.0), axis=0)
    ccount = np.cumsum(finite, axis=0)
    lag = lambda c: np.vstack([np.zeros((w, c.shape[1])), c[:-w]]) if len(c) > w else np.zeros_like(c)  # noqa: E731
    with np.errstate(all="ignore"):
        mean = (csum - lag(csum)) / (ccount - lag(ccount))
    mean[: w - 1] = np.nan
    return mean


def equilibrium_ratios(run: Any, window: int | None = None) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(steps, angle ratio, effective-lr ratio) per step row and group: measured over predicted
    equilibrium, each over the trailing ``window`` rows (default 1/10 of the run, 5 to 50).

    The angle is an RMS angle (§5.4 predicts the RMS), the prediction's noise averaged where it
    enters linearly (E|g̃|² under SGD, E|u|² under AdamW: the window mean of 1/effective_lr_eq²).
    NaN for groups without a prediction (not scale, λ = 0, coupled decay under a preconditioner)
    and for runs saved before the columns existed."""
    steps = np.asarray(run.step_index)
    angle, angle_eq = run.array("angular_update"), run.array("angular_update_eq")
    lr, lr_eq = run.array("effective_lr"), run.array("effective_lr_eq")
    rows = np.isfinite(angle).any(axis=1) if angle.size else np.zeros(0, dtype=bool)  # step rows (not the final one)
    steps, angle, angle_eq, lr, lr_eq = steps[rows], angle[rows], angle_eq[rows], lr[rows], lr_eq[rows]
    w = _window_rows(len(steps)) if window is None else max(1, int(window))
    with np.errstate(all="ignore"):
        angle_ratio = np.sqrt(_trailing_mean(angle**2, w) / _trailing_mean(angle_eq**2, w))
        lr_ratio = _trailing_mean(lr, w) * np.sqrt(_trailing_mean(1.0 / lr_eq**2, w))
    return steps, angle_ratio, lr_ratio


def equilibrium_reached(run: Any, layer: str, tolerance: float = EQUILIBRIUM_TOLERANCE, window: int | None = None) -> tuple[str, float]:
    """Whether ``layer``'s scale groups have reached the §5.4 equilibrium, in words, and the
    step from which they stay there (NaN if they have not, or no prediction exists).

    At each step row the layer's ratios are the medians over its scale groups of
    :func:`equilibrium_ratios`; the layer has reached equilibrium at the first step from which
    both stay within ``tolerance`` of 1 to the end of the run."""
    mask = np.asarray((run.groups.symmetry == "scale") & (run.groups.layer == layer))
    if not mask.any():
        return "", float("nan")
    steps, angle, lr = equilibrium_ratios(run, window)
    angle, lr = angle[:, mask], lr[:, mask]
    if not (np.isfinite(angle).any() and np.isfinite(lr).any()):
        return "n/a: no equilibrium predicted (weight decay 0, coupled decay under a preconditioner, or mixed param_groups)", float("nan")
    with np.errstate(all="ignore"):
        import warnings

        with warnings.catch_warnings():
            warnings.simplefilter("ignore", RuntimeWarning)  # all-NaN rows before the window fills
            a, lr_med = np.nanmedian(angle, axis=1), np.nanmedian(lr, axis=1)
    inside = (np.abs(a - 1) <= tolerance) & (np.abs(lr_med - 1) <= tolerance)
    tol = f"within {tolerance:.0%}"
    if not inside[-1]:
        return (f"not reached ({tol}): angular update {a[-1]:.2f}×, effective lr {lr_med[-1]:.2f}× the equilibrium "
                f"at step {int(steps[-1])}"), float("nan")
    first = len(inside) - int(np.argmin(inside[::-1])) if not inside.all() else 0
    step = int(steps[first])
    return f"reached ({tol}) at step {step}, after {step - int(steps[0])} steps", float(step)
