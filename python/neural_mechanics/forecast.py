"""Forecast of every group's charge from what a run held at one step (docs/theory.md §5.7).

``forecast(run, steps, at=..., lr=...)`` propagates the charge of every symmetry group (and, for
scale groups, its norm, effective learning rate and angular update) ``steps`` steps past step
``at``, under a given future learning-rate schedule, with the closed forms of docs/theory.md
§5.7: weight decay and the learning rate are known, the drive (the centrifugal input of the
gradient noise) is estimated over the last ``window`` recorded steps before ``at`` and held at
its physical invariant: |u_A|²·|θ_A|² for a scale group under SGD (the update at unit norm),
Adam's direction |a_A|² under decoupled weight decay. The band adds, in quadrature, the same
forecast with the drive at its 10th and 90th percentiles over the window and the charge's own
fluctuation about the model measured over the window. ``forecast_errors`` compares a forecast
from an earlier step with what the run then measured, against two baselines (hold the last value;
extend the last ``window`` steps linearly).

Imports: numpy, pandas (when a table is built) and ``errors`` only. A Run is read through its
public methods (``array``, ``groups``, ``step_index``, ``optimizer``), never imported: ``run``
calls this module, and ``plots`` draws from it.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import numpy as np

from .errors import InvalidArgumentError, NeuralMechanicsError, NonFiniteError, ShapeError, UnknownColumnError

__all__ = [
    "QUANTITIES",
    "BAND_PERCENTILES",
    "DEFAULT_BETA1",
    "Drive",
    "forecast",
    "estimate_drive",
    "scale_quantities",
    "observed",
    "forecast_errors",
    "baselines",
    "panel_forecasts",
    "recorded_lr",
]

QUANTITIES: tuple[str, ...] = ("charge", "norm", "effective_lr", "angular_update")
# The band: the forecast with the drive at these percentiles of its values over the window.
BAND_PERCENTILES: tuple[float, float] = (10.0, 90.0)
Z_BAND = 1.2815515655446004  # the 90th percentile of a unit normal, matching BAND_PERCENTILES
# The charge's fluctuation about the model is measured over blocks of this many steps (longer
# than the momentum's memory at β = 0.9), so that correlated residuals are counted once.
BLOCK = 10
# Adam-style runs do not record β1: PyTorch's default, unless the caller passes another.
DEFAULT_BETA1 = 0.9
# The smallest half-width of a band, relative to the group's magnitude at ``at``: the precision
# to which a float32 run measures its charges (docs/theory.md §5.3: the exact ledger matches them
# to ~1e-7–1e-6 of the magnitude), so that an exactly known charge is not given a band of zero.
BAND_FLOOR = 1e-6
_NEEDED = ("measured", "update_sq", "update_sum", "flux", "magnitude", "lr", "momentum", "dampening", "weight_decay")


# -- the one small function the run's own columns can later replace --------------------------------
def scale_quantities(norm_sq: Any, lr: Any, update_sq: Any, *, adaptive: bool) -> dict[str, np.ndarray]:
    """Norm, effective learning rate and angular update of scale groups (docs/theory.md §5.4).

    ``norm_sq`` |θ_A|², ``lr`` η, ``update_sq`` |u_A|² of the update direction that turns the
    group (SGD: the applied update, the momentum buffer; Adam-style: Adam's direction without the
    decoupled decay). ``norm`` = |θ_A|; ``effective_lr`` = η/|θ_A|² for SGD (the gradient of a
    scale-invariant group scales as 1/|θ_A|) and η/|θ_A| for Adam-style optimizers (whose step
    does not); ``angular_update`` = η|u_A|/|θ_A| radians per step (u is orthogonal to θ up to
    O(ηλ) when the group is scale-invariant).
    """
    x = np.asarray(norm_sq, dtype=np.float64)
    with np.errstate(divide="ignore", invalid="ignore"):
        norm = np.sqrt(x)
        eff = np.asarray(lr, dtype=np.float64) / (norm if adaptive else x)
        angle = np.asarray(lr, dtype=np.float64) * np.sqrt(np.maximum(np.asarray(update_sq, dtype=np.float64), 0.0)) / norm
    return {"norm": norm, "effective_lr": eff, "angular_update": angle}


def _adaptive(run: Any) -> bool:
    name = str(getattr(run, "optimizer", "") or "")
    if not name:
        raise InvalidArgumentError("the run does not name its optimizer: the forecast needs to know SGD from Adam-style updates")
    return "SGD" not in name


def observed(run: Any, quantity: str) -> np.ndarray:
    """What the run measured of ``quantity`` at every row, (rows, groups): ``charge`` is the
    ``measured`` column; ``norm``, ``effective_lr`` and ``angular_update`` (scale groups only, NaN
    elsewhere) are the run's own columns (§5.6: ``effective_lr``, and ``angular_update`` the
    angle of the step itself) where it records them, else follow from it and the step's lr and
    update by :func:`scale_quantities`. For Adam-style runs the update is Adam's direction with
    the decoupled decay taken out (§5.7)."""
    if quantity not in QUANTITIES:
        raise InvalidArgumentError(f"quantity must be one of {QUANTITIES}, got {quantity!r}")
    x = _column(run, "measured")
    if quantity == "charge":
        return x
    adaptive = _adaptive(run)
    lr = _ffill(_column(run, "lr"))
    u2 = _column(run, "update_sq")
    if adaptive:
        u2 = _adam_direction_sq(np.asarray(run.step_index), x, u2, _ffill(_column(run, "weight_decay")), lr)
    out = scale_quantities(x, lr, u2, adaptive=adaptive)[quantity]
    # The run's own columns where it records them (docs/theory.md §5.6: the angle of the step
    # itself, not η|u|/|θ|); runs saved before them hold NaN there and keep the derived values.
    recorded = _recorded(run, quantity)
    if recorded is not None:
        out = np.where(np.isfinite(recorded), recorded, out)
    out[:, ~np.asarray(run.groups.symmetry == "scale")] = np.nan
    return out


def _recorded(run: Any, name: str) -> np.ndarray | None:
    """The run's column ``name``, or None where the run has no such column."""
    try:
        return np.array(run.array(name), dtype=np.float64)
    except (UnknownColumnError, KeyError):
        return None


# -- reading a run ----------------------------------------------------------------------------------
def _column(run: Any, name: str) -> np.ndarray:
    try:
        return np.array(run.array(name), dtype=np.float64)
    except (UnknownColumnError, KeyError) as exc:
        raise UnknownColumnError(f"the forecast needs the run's {name!r} column, which this run does not record ({exc})") from None


def _hyper_column(run: Any, name: str) -> np.ndarray:
    """A hyperparameter column; one the optimizer does not have (Adam's momentum and dampening,
    NaN in the run) reads 0: the adaptive model never uses it."""
    col = _column(run, name)
    absent = run.absent_hyperparameters() if hasattr(run, "absent_hyperparameters") else ()
    return np.zeros_like(col) if name in absent else col


def _beta1(run: Any, beta1: float | None) -> float:
    """Adam's β1: as given, else the run's own (``run.hyperparameters``), else DEFAULT_BETA1."""
    if beta1 is None:
        groups = getattr(run, "hyperparameters", None) or [{}]
        betas = groups[0].get("betas") if isinstance(groups[0], dict) else None
        beta1 = float(betas[0]) if betas else DEFAULT_BETA1
    if isinstance(beta1, bool) or not isinstance(beta1, (int, float, np.floating)) or not 0 <= float(beta1) < 1:
        raise InvalidArgumentError(f"beta1 must be in [0, 1), got {beta1!r}")
    return float(beta1)


def _ffill(a: np.ndarray) -> np.ndarray:
    out = a.copy()
    for i in range(1, len(out)):
        bad = ~np.isfinite(out[i])
        out[i, bad] = out[i - 1, bad]
    return out


def _adam_direction_sq(steps: np.ndarray, x: np.ndarray, u2: np.ndarray, lam: np.ndarray, lr: np.ndarray) -> np.ndarray:
    """|a_A|² of Adam's direction from the recorded |u_A|² = |d_A|²/η² (docs/theory.md §5.7).

    The applied update is d = η(λθ + a), so |a|² = |u|² − 2λ⟨θ, u⟩ + λ²|θ|² with
    ⟨θ_n, u_n⟩ = (x_n − x_{n+1} + η²|u_n|²)/(2η) from the charges of two consecutive rows
    (rescale: the same, side differences). Rows whose next row is not the next step use
    ⟨θ, a⟩ ≈ 0, i.e. |a|² ≈ |u|² − λ²|θ|² (an O(ηλ/(1−β1)) relative error)."""
    out = u2 - lam**2 * x
    nxt = np.flatnonzero(np.diff(steps) == 1)
    if len(nxt):
        e = lr[nxt]
        with np.errstate(divide="ignore", invalid="ignore"):
            tu = (x[nxt] - x[nxt + 1] + e**2 * u2[nxt]) / (2 * e)
            exact = u2[nxt] - 2 * lam[nxt] * tu + lam[nxt] ** 2 * x[nxt]
        out[nxt] = np.where(np.isfinite(exact) & (e > 0), exact, out[nxt])
    return out


def _row_of(run: Any, at: int | None) -> tuple[int, int]:
    steps = np.asarray(run.step_index)
    if not len(steps):
        raise InvalidArgumentError("the run has no recorded rows")
    if at is None:
        return len(steps) - 1, int(steps[-1])
    if isinstance(at, bool) or not isinstance(at, (int, np.integer)):
        raise InvalidArgumentError(f"at must be a recorded step (an int), got {at!r}")
    hit = np.flatnonzero(steps == int(at))
    if not len(hit):
        raise InvalidArgumentError(f"step {at} is not recorded in this run (recorded: {int(steps[0])} … {int(steps[-1])}, {len(steps)} rows)")
    return int(hit[-1]), int(at)


def _future_lr(lr: Any, at: int, steps: int, held: np.ndarray) -> np.ndarray:
    """(steps, groups) learning rates of steps at … at+steps−1. ``held``: the groups' lr at ``at``."""
    if lr is None:
        return np.broadcast_to(held, (steps, len(held))).copy()
    if callable(lr):
        seq = np.array([float(lr(at + k)) for k in range(steps)], dtype=np.float64)
    else:
        try:
            seq = np.asarray(lr, dtype=np.float64)
        except (TypeError, ValueError):
            raise InvalidArgumentError(f"lr must be None, a callable of the step index, or an array of {steps} rates") from None
        if seq.ndim == 0:
            seq = np.full(steps, float(seq))
        if seq.shape != (steps,):
            raise ShapeError(f"lr has shape {seq.shape}; the forecast needs one learning rate per step, ({steps},)")
    if not np.isfinite(seq).all():
        raise NonFiniteError(f"lr: non-finite learning rate at future step {at + int(np.flatnonzero(~np.isfinite(seq))[0])}")
    if (seq < 0).any():
        raise InvalidArgumentError("lr: negative learning rate")
    # Groups whose param_group has another lr at ``at`` keep their ratio to the first group's
    # (schedulers scale every param_group by the same factor).
    ref = held[0] if held[0] > 0 else 1.0
    ratio = np.where(held > 0, held / ref, 1.0)
    return seq[:, None] * ratio[None, :]


# -- the drive ----------------------------------------------------------------------------------
@dataclass
class Drive:
    """What the forecast holds fixed, per group, estimated over the window (docs/theory.md §5.7).

    ``value`` is the window mean and ``low``/``high`` its percentiles ``BAND_PERCENTILES``, of:
    scale under SGD Ũ = |u_A|²|θ_A|²; scale under Adam-style optimizers |a_A|²; rescale the
    side difference |u_A1|² − |u_A2|² (|a_A1|² − |a_A2|²); translation under SGD the flux
    ⟨1, ĝ_A⟩, under Adam-style optimizers ⟨1, a_A⟩. ``buffer`` is ⟨1, b⟩ of the last step
    before ``at`` (SGD translation; NaN where unknown), ``rows`` the window's row indices.
    ``diffusion``: the variance per step of the charge's own fluctuation about the model over
    the window (what the mean drive averages out: the residuals of each recorded step's change,
    summed over blocks of ``BLOCK`` steps; 0 where no two consecutive rows were recorded).
    """

    value: np.ndarray
    low: np.ndarray
    high: np.ndarray
    buffer: np.ndarray
    rows: np.ndarray
    adaptive: bool
    diffusion: np.ndarray


def estimate_drive(run: Any, at: int | None = None, window: int = 50, beta1: float | None = None) -> Drive:
    """The drive of every group over the ``window`` recorded steps before step ``at`` (default
    the last recorded), using only rows up to ``at``; see :class:`Drive`."""
    if isinstance(window, bool) or not isinstance(window, (int, np.integer)) or window < 1:
        raise InvalidArgumentError(f"window must be a positive int, got {window!r}")
    beta1 = _beta1(run, beta1)
    i_at, at_step = _row_of(run, at)
    steps = np.asarray(run.step_index)
    rows = np.flatnonzero((steps < at_step) & (steps >= at_step - int(window)))
    rows = rows[rows < i_at]
    if not len(rows):
        raise InvalidArgumentError(f"the forecast needs at least one recorded step before step {at_step} to estimate the drive")
    adaptive = _adaptive(run)
    cols = {c: _column(run, c)[: i_at + 1] for c in _NEEDED}
    for c in ("lr", "momentum", "dampening", "weight_decay"):
        cols[c] = _ffill(_hyper_column(run, c)[: i_at + 1])
    x, u2 = cols["measured"], cols["update_sq"]
    if not np.isfinite(u2[rows]).any():
        raise InvalidArgumentError(f"the run records no update_sq in the window before step {at_step}: nothing to estimate the drive from")
    sym = np.asarray(run.groups.symmetry)
    n = len(sym)
    per_step = np.full((len(rows), n), np.nan)
    if adaptive:
        lam, lr = cols["weight_decay"], cols["lr"]
        # Rows up to ``at`` only: the last step's ⟨θ, u⟩ needs the charge at ``at`` (known).
        a2 = _adam_direction_sq(steps[: i_at + 1], x, u2, lam, lr)
        for kind in ("scale", "rescale"):
            per_step[:, sym == kind] = a2[rows][:, sym == kind]
        t = sym == "translation"
        per_step[:, t] = (cols["update_sum"] - lam * x)[rows][:, t]  # ⟨1, a⟩ = ⟨1, u⟩ − λq
    else:
        # The buffer's weight-decay part, (1−d)λθ/(1−β), is taken out of |u|²: it scales as
        # |θ|², not as 1/|θ|², and _propagate puts it back into the decay rate (§5.7).
        u2g = u2 - _decay_part(cols["momentum"], cols["dampening"], cols["weight_decay"]) * x
        per_step[:, sym == "scale"] = (u2g * x)[rows][:, sym == "scale"]
        per_step[:, sym == "rescale"] = u2g[rows][:, sym == "rescale"]
        per_step[:, sym == "translation"] = cols["flux"][rows][:, sym == "translation"]
    with np.errstate(all="ignore"), _quiet():
        value = np.nanmean(per_step, axis=0)
        low, high = np.nanpercentile(per_step, BAND_PERCENTILES, axis=0)
    value = np.nan_to_num(value, nan=0.0)
    if adaptive:
        # Adam's ⟨1, a⟩: no symmetry keeps its sign (docs/theory.md §5.7); held at zero, the
        # band spanning zero to its window mean.
        t = sym == "translation"
        low[t], high[t] = np.minimum(value[t], 0.0), np.maximum(value[t], 0.0)
        value[t] = 0.0
    buffers = _buffers(steps[: i_at + 1], cols["update_sum"], adaptive)
    diffusion = _diffusion(sym, steps, cols, rows, value, buffers, adaptive, beta1)
    return Drive(value=value, low=np.nan_to_num(low, nan=0.0), high=np.nan_to_num(high, nan=0.0), buffer=buffers[i_at],
                 rows=rows, adaptive=adaptive, diffusion=diffusion)


def _buffers(steps: np.ndarray, update_sum: np.ndarray, adaptive: bool) -> np.ndarray:
    """Row j: ⟨1, b⟩ of the SGD momentum buffer before step j (the recorded ⟨1, u⟩ of step j − 1;
    NaN where that step is not recorded, and for Adam-style runs)."""
    out = np.full_like(update_sum, np.nan)
    if not adaptive:
        prev = np.flatnonzero(np.diff(steps) == 1)
        out[prev + 1] = update_sum[prev]
    return out


def _diffuse(kind: np.ndarray, per_step: np.ndarray, lr: np.ndarray, hyper: dict[str, np.ndarray], adaptive: bool, growth: np.ndarray) -> np.ndarray:
    """(steps + 1, groups) variance of the charge's accumulated fluctuation: v_{n+1} = ρ_n² v_n + σ_n²,
    with ρ_n the charge's relaxation factor over step n and σ_n² = σ²·growth_n (docs/theory.md §5.7)."""
    steps, n = lr.shape
    lam = hyper["weight_decay"]
    if adaptive:
        rate = np.where(kind == "translation", 1.0, 2.0) * lam  # per unit η: (1 − ηλ) or (1 − ηλ)²
    else:
        beta = hyper["momentum"]
        one_minus_d = np.where(beta > 0, 1 - hyper["dampening"], 1.0)
        rate = np.where(kind == "translation", 1.0, np.where(kind == "scale", 4.0, 2.0)) * one_minus_d * lam / (1 - beta)
    out = np.zeros((steps + 1, n))
    v = np.zeros(n)
    for k in range(steps):
        v = v * np.exp(-2 * rate * lr[k]) + per_step * growth[k]
        out[k + 1] = v
    return out


def _decay_part(beta: Any, damp: Any, lam: Any) -> Any:
    """B = ((1−d)λ/(1−β))²: |u|² of SGD's buffer holds B·|θ|² from the weight decay (β = 0: λ²)."""
    one_minus_d = np.where(beta > 0, 1 - damp, 1.0)
    return (one_minus_d * lam / (1 - beta)) ** 2


def _diffusion(kind: np.ndarray, steps: np.ndarray, cols: dict[str, np.ndarray], rows: np.ndarray, value: np.ndarray,
               buffers: np.ndarray, adaptive: bool, beta1: float) -> np.ndarray:
    """Per-step variance of the charge's change about the model's over the window (see Drive)."""
    x = cols["measured"]
    sums: list[np.ndarray] = []
    lengths: list[int] = []
    acc, length = np.zeros(len(kind)), 0
    for j in rows:  # every window row has its successor recorded (it is ≤ at)
        gap = int(steps[j + 1] - steps[j])
        hyper = {c: cols[c][j] for c in ("momentum", "dampening", "weight_decay")}
        lr = np.broadcast_to(cols["lr"][j], (gap, len(kind)))
        model = _propagate(kind, x[j], value, buffers[j], lr, hyper, adaptive, beta1)[-1]
        acc, length = acc + (x[j + 1] - model), length + gap
        if length >= BLOCK:
            sums.append(acc)
            lengths.append(length)
            acc, length = np.zeros(len(kind)), 0
    if not sums:
        return np.zeros(len(kind))
    with np.errstate(all="ignore"):
        out = np.nansum(np.square(sums), axis=0) / float(sum(lengths))
    return np.where(np.isfinite(out), out, 0.0)


class _quiet:
    def __enter__(self) -> None:
        import warnings

        self._ctx = warnings.catch_warnings()
        self._ctx.__enter__()
        warnings.simplefilter("ignore", RuntimeWarning)

    def __exit__(self, *exc: Any) -> None:
        self._ctx.__exit__(*exc)


# -- the closed forms -------------------------------------------------------------------------------
def _phi(z: np.ndarray) -> np.ndarray:
    """(1 − e^{−z})/z, 1 at z = 0."""
    z = np.asarray(z, dtype=np.float64)
    with np.errstate(divide="ignore", invalid="ignore"):
        return np.where(np.abs(z) > 1e-12, -np.expm1(-z) / np.where(z == 0, 1.0, z), 1.0 - z / 2)


def _propagate(kind: np.ndarray, x0: np.ndarray, drive: np.ndarray, buffer: np.ndarray, lr: np.ndarray, hyper: dict[str, np.ndarray], adaptive: bool, beta1: float) -> np.ndarray:
    """(steps + 1, groups) charges from ``x0`` under ``lr`` (steps, groups), the drive held;
    the closed forms of docs/theory.md §5.7, one step of piecewise-constant η at a time."""
    steps, n = lr.shape
    lam = hyper["weight_decay"]
    out = np.empty((steps + 1, n))
    out[0] = x0
    scale, trans = kind == "scale", kind == "translation"
    if adaptive:
        gain = (1 + beta1) / (1 - beta1)  # the first moment's quasi-static lag (§5.4)
        y = x0.copy()
        for k in range(steps):
            e = lr[k]
            shrink = 1 - e * lam
            # scale, rescale: x_{n+1} = (1−ηλ)² x_n + η² gain |a|²  (rescale: side differences)
            # translation:    q_{n+1} = (1−ηλ) q_n − η ⟨1, a⟩
            y = np.where(trans, shrink * y - e * drive, shrink**2 * y + e**2 * gain * drive)
            out[k + 1] = y
        return out
    # SGD. Without momentum PyTorch ignores dampening (h = η); with it h = η(1−d).
    beta = hyper["momentum"]
    moment = beta > 0
    one_minus_d = np.where(moment, 1 - hyper["dampening"], 1.0)
    gain = (1 + beta) / (1 - beta)
    # translation: the exact discrete recursion of §5.3 with ⟨1, b⟩ as state, the flux held
    p = np.where(np.isfinite(buffer), buffer, one_minus_d * (lam * x0 + drive) / (1 - beta))
    q = x0.copy()
    # scale: y = x², y' = −2κy + 2η²·gain·Ũ;  rescale: Δ' = −κΔ + η²·gain·D  (per step)
    z = np.where(scale, x0**2, x0)
    for k in range(steps):
        e = lr[k]
        # the decay rate, less the weight-decay part of |u|² that the drive leaves out
        kappa = 2 * e * one_minus_d * lam / (1 - beta) - e**2 * gain * _decay_part(beta, hyper["dampening"], lam)
        squared = z * np.exp(-2 * kappa) + 2 * e**2 * gain * drive * _phi(2 * kappa)
        linear = z * np.exp(-kappa) + e**2 * gain * drive * _phi(kappa)
        z = np.where(scale, np.maximum(squared, 0.0), linear)
        p = np.where(moment, beta * p + one_minus_d * (lam * q + drive), lam * q + drive)
        q = q - e * p
        out[k + 1] = np.where(scale, np.sqrt(np.maximum(z, 0.0)), np.where(trans, q, z))
    return out


def forecast(
    run: Any,
    steps: int,
    *,
    at: int | None = None,
    lr: Callable[[int], float] | Any = None,
    window: int = 50,
    beta1: float | None = None,
) -> Any:
    """Every group's charge (and, for scale groups, norm, effective lr and angular update) for
    the ``steps`` steps after step ``at``, from what the run held at ``at`` (docs/theory.md §5.7).

    ``at``: a recorded step (default the last row). ``lr``: the future learning rates, a callable
    of the absolute step index, an array of ``steps`` rates (those of steps at … at+steps−1), or
    None to hold the rate of step ``at``; param_groups whose rate differs from the first group's
    keep their ratio to it. Momentum, dampening and weight decay stay at their values at ``at``.
    ``window``: recorded steps before ``at`` the drive and its band are estimated from.
    ``beta1``: Adam's first-moment coefficient (default: the run's own, from
    ``run.hyperparameters``, else 0.9), unused for SGD.

    Returns a long pandas DataFrame with columns step (at … at+steps; the row at ``at`` is the
    measured starting point), symmetry, layer, group, quantity (``QUANTITIES``; only "charge"
    for translation and rescale groups), forecast, low, high (the band: the drive at its 10th and
    90th percentiles over the window, and the charge's measured fluctuation about the model, in
    quadrature). ``frame.attrs`` holds at, steps, window, optimizer, model ("sgd" or "adaptive")
    and beta1. Memory: O(steps × groups).
    """
    import pandas as pd

    if isinstance(steps, bool) or not isinstance(steps, (int, np.integer)) or steps < 1:
        raise InvalidArgumentError(f"steps must be a positive int, got {steps!r}")
    beta1 = _beta1(run, beta1)
    steps = int(steps)
    i_at, at_step = _row_of(run, at)
    drive = estimate_drive(run, at_step, window, float(beta1))
    adaptive = drive.adaptive
    hyper = {c: _ffill(_hyper_column(run, c)[: i_at + 1])[-1] for c in ("lr", "momentum", "dampening", "weight_decay")}
    if not np.isfinite(np.stack(list(hyper.values()))).all():
        raise NonFiniteError(f"the run holds no hyperparameters at or before step {at_step}")
    if not adaptive and ((hyper["momentum"] < 0) | (hyper["momentum"] >= 1)).any():
        raise InvalidArgumentError(f"momentum outside [0, 1) at step {at_step}")
    x0 = _column(run, "measured")[i_at]
    if not np.isfinite(x0).all():
        raise NonFiniteError(f"the run's charges at step {at_step} are not all finite")
    mag0 = np.abs(_column(run, "magnitude")[i_at])
    future = _future_lr(lr, at_step, steps, hyper["lr"])
    kind = np.asarray(run.groups.symmetry)
    scale = kind == "scale"
    drives = (drive.value, drive.low, drive.high)
    mid, edge_a, edge_b = (_propagate(kind, x0, d, drive.buffer, future, hyper, adaptive, float(beta1)) for d in drives)
    # The band: the drive at its percentiles (systematic), and the charge's own fluctuation about
    # the model (diffusion, relaxing as the charge does), added in quadrature.
    # Adam's radial fluctuation 2η⟨θ, a⟩ has a variance ∝ |θ|²: it grows with the charge.
    with np.errstate(divide="ignore", invalid="ignore"):
        growth = np.where(adaptive & scale & (x0 > 0), mid / np.where(x0 > 0, x0, 1.0), 1.0)
    spread = Z_BAND * np.sqrt(_diffuse(kind, drive.diffusion, future, hyper, adaptive, np.maximum(growth, 0.0)))
    floor = BAND_FLOOR * np.where(np.isfinite(mag0), mag0, 0.0)
    down = np.maximum(np.hypot(np.maximum(mid - np.minimum(edge_a, edge_b), 0.0), spread), floor)
    up = np.maximum(np.hypot(np.maximum(np.maximum(edge_a, edge_b) - mid, 0.0), spread), floor)
    lo, hi = mid - down, mid + up
    lo[0] = hi[0] = x0
    blocks = {"charge": (mid, lo, hi)}
    if scale.any():
        lr_rows = np.vstack([future, future[-1:]])
        with np.errstate(divide="ignore", invalid="ignore"):
            # |u|² of the update that turns the group. SGD: Ũ/|θ|²; Adam-style: |a|², the drive.
            u2 = [np.broadcast_to(d, mid.shape) if adaptive else d / mid for d in drives]
        # Every pairing of a charge at the band's edges (or centre) with a drive at its
        # percentiles (or mean): the band of each derived quantity is their range.
        qs = [scale_quantities(c, lr_rows, u, adaptive=adaptive) for c in (mid, np.maximum(lo, 0.0), hi) for u in u2]
        for name in QUANTITIES[1:]:
            every = np.stack([np.broadcast_to(q[name], mid.shape) for q in qs])
            with np.errstate(invalid="ignore"), _quiet():
                blocks[name] = (qs[0][name], np.nanmin(every, axis=0), np.nanmax(every, axis=0))
    return _long_frame(run, at_step, steps, blocks, scale, pd, attrs={
        "at": at_step, "steps": steps, "window": int(window), "optimizer": str(run.optimizer),
        "model": "adaptive" if adaptive else "sgd", "beta1": float(beta1) if adaptive else None,
    })


def _long_frame(run: Any, at: int, steps: int, blocks: dict[str, tuple[np.ndarray, np.ndarray, np.ndarray]], scale: np.ndarray, pd: Any, attrs: dict[str, Any]) -> Any:
    g = run.groups
    step_axis = np.arange(at, at + steps + 1)
    parts = []
    for name, (mid, lo, hi) in blocks.items():
        cols = np.arange(len(scale)) if name == "charge" else np.flatnonzero(scale)
        r = len(step_axis)
        parts.append(
            {
                "step": np.repeat(step_axis, len(cols)),
                "symmetry": np.tile(np.asarray(g.symmetry)[cols], r),
                "layer": np.tile(np.asarray(g.layer)[cols], r),
                "group": np.tile(np.asarray(g.index)[cols], r),
                "quantity": np.full(r * len(cols), name, dtype=object),
                "forecast": mid[:, cols].reshape(-1),
                "low": lo[:, cols].reshape(-1),
                "high": hi[:, cols].reshape(-1),
            }
        )
    frame = pd.DataFrame({k: np.concatenate([p[k] for p in parts]) for k in parts[0]})
    for col in ("symmetry", "layer", "quantity"):
        frame[col] = frame[col].astype("category")
    frame.attrs.update(attrs)
    return frame


# -- validation against what the run measured later ---------------------------------------------------
def recorded_lr(run: Any, start: int, stop: int) -> np.ndarray:
    """The first group's learning rate of steps start … stop−1 as the run recorded them (a step
    between recorded rows takes the rate of the row before it): the schedule it followed."""
    steps = np.asarray(run.step_index)
    rates = _ffill(_column(run, "lr"))[:, 0]
    idx = np.searchsorted(steps, np.arange(int(start), int(stop)), side="right") - 1
    return rates[np.clip(idx, 0, len(rates) - 1)]


def baselines(run: Any, steps: int, *, at: int, window: int = 50) -> dict[str, np.ndarray]:
    """The two naive forecasts of every group's charge at step ``at + steps``, (groups,) each:
    ``hold`` the value at ``at``; ``linear`` the least-squares slope of the charge over the
    recorded steps of [at − window, at], extended from the value at ``at``."""
    i_at, at_step = _row_of(run, at)
    stp = np.asarray(run.step_index)[: i_at + 1]
    x = _column(run, "measured")[: i_at + 1]
    rows = np.flatnonzero(stp >= at_step - int(window))
    t = stp[rows].astype(np.float64)
    if len(rows) < 2:
        slope = np.zeros(x.shape[1])
    else:
        tc = t - t.mean()
        slope = (tc[:, None] * (x[rows] - x[rows].mean(0))).sum(0) / (tc**2).sum()
    return {"hold": x[i_at].copy(), "linear": x[i_at] + slope * int(steps)}


def forecast_errors(run: Any, *, at: int, steps: int | None = None, lr: Any = None, window: int = 50, beta1: float | None = None) -> Any:
    """Forecast the charges from step ``at`` to ``at + steps`` (default: the run's last recorded
    step) and compare with what the run measured there: per symmetry, the median and 90th
    percentile over groups of |prediction − measured| / (max over the run of the group's
    magnitude) (docs/theory.md §1) for the forecast and the two :func:`baselines`, and the share
    of groups whose band holds the measured value. ``lr``: as in :func:`forecast`; None uses the
    rates the run recorded for those steps (the schedule it actually followed). A DataFrame.
    """
    import pandas as pd

    i_at, at_step = _row_of(run, at)
    stp = np.asarray(run.step_index)
    last = int(stp[-1]) if steps is None else at_step + int(steps)
    hit = np.flatnonzero(stp == last)
    if last <= at_step or not len(hit):
        raise InvalidArgumentError(f"step {last} (the horizon) is not a recorded step after {at_step}")
    horizon = last - at_step
    if lr is None:
        lr = recorded_lr(run, at_step, last)
    frame = forecast(run, horizon, at=at_step, lr=lr, window=window, beta1=beta1)
    f = frame[(frame["quantity"] == "charge") & (frame["step"] == last)]
    n = len(run.groups)
    pred, low, high = (f[c].to_numpy().reshape(n) for c in ("forecast", "low", "high"))
    truth = _column(run, "measured")[hit[-1]]
    mag = np.abs(_column(run, "magnitude"))
    with np.errstate(all="ignore"), _quiet():
        scale = np.nanmax(mag, axis=0)
    scale = np.where(np.isfinite(scale) & (scale > 0), scale, 1.0)
    base = baselines(run, horizon, at=at_step, window=window)
    errs = {"forecast": np.abs(pred - truth) / scale, **{k: np.abs(v - truth) / scale for k, v in base.items()}}
    inside = (truth >= low) & (truth <= high)
    rows = []
    sym = np.asarray(run.groups.symmetry)
    for kind in ("translation", "scale", "rescale"):
        m = sym == kind
        if not m.any():
            continue
        row: dict[str, Any] = {"symmetry": kind, "groups": int(m.sum()), "at": at_step, "horizon": last}
        for name, e in errs.items():
            row[f"{name}_median"] = float(np.median(e[m]))
            row[f"{name}_p90"] = float(np.percentile(e[m], 90))
        row["band_coverage"] = float(inside[m].mean())
        rows.append(row)
    return pd.DataFrame(rows)


def panel_forecasts(run: Any, window: int = 50) -> list[Any]:
    """The two forecasts the report's panel draws: from the middle of the run to its end under
    the rates it recorded (to be compared with what it measured), and from its last row for half
    the run's length more at the last rate (where each group is heading). Empty when the run is
    too short (fewer than 5 recorded rows) or cannot be forecast (it does not name its optimizer,
    records no update, ...): a report draws what it can."""
    steps = np.asarray(run.step_index)
    if len(steps) < 5 or not getattr(run, "optimizer", ""):
        return []
    mid = int(steps[np.searchsorted(steps, steps[0] + (steps[-1] - steps[0]) // 2)])
    try:
        out = []
        if mid < steps[-1]:
            out.append(forecast(run, int(steps[-1]) - mid, at=mid, lr=recorded_lr(run, mid, int(steps[-1])), window=window))
        out.append(forecast(run, max(1, int(steps[-1] - steps[0]) // 2), window=window))
    except NeuralMechanicsError:
        return []
    return out
