"""The theory engine (docs/theory.md §5) on numpy arrays: closed forms, exact ledger, equilibrium.

Everything runs in the Rust core in float64 with O(groups) state; the per-group work is spread
over the private thread pool when there are 16k groups or more. Full formulas: docs/theory.md.

Conventions, stated once:

* A *run* is ``steps`` optimizer steps; per-step inputs are arrays of shape ``(steps, groups)``
  and results have shape ``(steps + 1, groups)``, row 0 being the initial charges.
* Hyperparameters ``lr``, ``momentum``, ``dampening``, ``weight_decay`` are each a float (every
  step) or an array of shape ``(steps,)`` (a schedule: warm-up, step decay, ...).
* Model time of the closed forms: t_n = Σ_{k<n} h_k with h_k = η_k(1−d_k) with momentum and
  h_k = η_k without (PyTorch ignores dampening when momentum is 0). See :func:`times`.
* Drive of step n, held constant over [t_n, t_{n+1}]: without momentum |ĝ_n|² (the gradient
  before weight decay), with momentum |b_n|², the momentum buffer *after* step n.
* Rescale: every charge and every measured input is side A1 (incoming) minus side A2 (outgoing):
  Δ = |θ_A1|² − |θ_A2|².

Errors (all from :mod:`neural_mechanics.errors`): an unknown kind or an argument outside its
domain (negative lr or weight decay, momentum outside [0, 1), dampening outside [0, 1], nesterov
with dampening, momentum switching between zero and positive in a closed form, ``steps`` that is
not a non-negative integer) raises :class:`InvalidArgumentError`; mismatched shapes or lengths
:class:`ShapeError`; NaN or infinity :class:`NonFiniteError`; non-numeric input (strings,
complex numbers, bools, masked arrays, whose mask would be ignored) :class:`DTypeError`.
−0.0 is read as 0.

Sizes and long runs: a result is (steps + 1, groups) float64 values, allocated before the loop
starts. When no (steps, groups) input backs it (translation without a drive, :func:`times` with
constant hyperparameters) it may hold at most ``MAX_UNBACKED_VALUES`` (2**27, 1 GiB) values:
:class:`InvalidArgumentError` naming the size; advance a :class:`PaperStream` for longer runs. A
result the allocator refuses is an InvalidArgumentError too, never a crash. The batch functions
check for Ctrl-C every few milliseconds and raise KeyboardInterrupt.

Groups whose parts sit in optimizer param_groups with different hyperparameters (e.g. "no weight
decay on biases"): the paper's closed forms do not apply; run the ledger once per part with that
part's hyperparameters and add the results, which :func:`ledger_parts` does.
"""

from __future__ import annotations

import operator
from collections.abc import Iterable, Mapping, Sequence
from typing import Any

import numpy as np

from . import _native
from .errors import DTypeError, InvalidArgumentError, ShapeError

KINDS: tuple[str, ...] = tuple(_native.THEORY_KINDS)  # ("translation", "scale", "rescale")
REGIMES: tuple[str, ...] = ("first-order", "underdamped", "critical", "overdamped")
#: |ω² − γ²| ≤ CRITICAL_TOL·γ² is reported as "critical" by :func:`regime`.
CRITICAL_TOL: float = float(_native.THEORY_CRITICAL_TOL)
#: The most values a result may hold when no (steps, groups) input array backs it.
MAX_UNBACKED_VALUES: int = int(_native.THEORY_MAX_UNBACKED_VALUES)

__all__ = [
    "KINDS",
    "REGIMES",
    "CRITICAL_TOL",
    "MAX_UNBACKED_VALUES",
    "paper",
    "PaperStream",
    "ledger",
    "LedgerStream",
    "ledger_parts",
    "ledger_measured",
    "equilibrium_sgd",
    "equilibrium_adamw",
    "regime",
    "times",
]


# --------------------------------------------------------------------------------------------
# Argument normalisation (the values themselves are checked in Rust).


def _kind(kind: Any) -> str:
    if not isinstance(kind, str) or kind not in KINDS:
        raise InvalidArgumentError(f"unknown charge kind {kind!r}; expected one of {KINDS}")
    return kind


def _f64(x: Any, name: str) -> np.ndarray:
    if type(x) is np.ndarray and x.dtype == np.float64 and x.flags.c_contiguous:
        return x  # the common case, per step in live use: nothing to convert or refuse
    if isinstance(x, np.ma.MaskedArray):
        raise DTypeError(f"{name}: a masked array's mask would be ignored; pass x.filled(value) to say what masked entries are")
    if isinstance(x, (str, bytes)):
        raise DTypeError(f"{name}: expected numbers, got the string {x!r}")
    try:
        a = np.asarray(x)
        if a.dtype.kind not in "iufO":
            raise DTypeError(f"{name}: expected real numbers, got dtype {a.dtype}")
        a = a.astype(np.float64, copy=False)
    except (TypeError, ValueError) as exc:
        raise DTypeError(f"{name}: cannot be read as float64 ({exc})") from None
    # (np.ascontiguousarray would turn a 0-d array into shape (1,).)
    return a if a.flags.c_contiguous else np.ascontiguousarray(a)


def _vec(x: Any, name: str, groups: int | None = None) -> np.ndarray:
    a = _f64(x, name)
    if a.ndim != 1:
        raise ShapeError(f"{name} must be 1-D (groups,), got shape {a.shape}")
    if groups is not None and a.shape[0] != groups:
        raise ShapeError(f"{name} has {a.shape[0]} groups, y0 has {groups}")
    return a


def _mat(x: Any, name: str, groups: int, steps: int | None = None) -> np.ndarray:
    a = _f64(x, name)
    if a.ndim != 2 or a.shape[1] != groups or (steps is not None and a.shape[0] != steps):
        want = f"({'steps' if steps is None else steps}, {groups})"
        raise ShapeError(f"{name} has shape {a.shape}; expected {want} (steps, groups)")
    return a


def _row(x: Any, name: str, groups: int) -> np.ndarray:
    """One step's per-group input, shape (groups,)."""
    return _vec(x, name, groups)


def _hyper_steps(values: Mapping[str, Any]) -> int | None:
    """The run length implied by the per-step hyperparameter arrays (None if all scalars)."""
    steps = None
    for name, v in values.items():
        nd = np.ndim(v)
        if nd == 0:
            continue
        if nd != 1:
            raise ShapeError(f"{name} must be a float or an array of shape (steps,), got shape {np.shape(v)}")
        n = np.shape(v)[0]
        if steps is not None and n != steps:
            raise ShapeError(f"{name} has {n} steps but another hyperparameter has {steps}")
        steps = n
    return steps


def _hypers(values: Mapping[str, Any], steps: int) -> list[np.ndarray]:
    """Each hyperparameter as a float64 array of length 1 (constant) or ``steps``."""
    out = []
    for name, v in values.items():
        a = _f64(v, name)
        if a.ndim == 0:
            a = a.reshape(1)
        elif a.shape[0] != steps:
            raise ShapeError(f"{name} has {a.shape[0]} values but the run has {steps} steps")
        out.append(a)
    return out


def _scalar(x: Any, name: str) -> float:
    if type(x) is float:
        return x  # the common case, per step in live use
    if isinstance(x, (str, bytes, bool, np.bool_, np.ma.MaskedArray)):
        raise DTypeError(f"{name} must be a real number, got {x!r}")
    if np.ndim(x) != 0:
        raise ShapeError(f"{name} must be a single number for one step, got shape {np.shape(x)}")
    if isinstance(x, np.ndarray) and x.dtype.kind not in "iufO":
        raise DTypeError(f"{name} must be a real number, got dtype {x.dtype}")
    try:
        return float(x)
    except (TypeError, ValueError) as exc:
        raise DTypeError(f"{name}: {exc}") from None


def _count(x: Any, name: str) -> int:
    """A number of steps: any integer (np.int64 too), not a bool or a float, 0 <= x < 2**63."""
    if isinstance(x, (bool, np.bool_)) or not hasattr(type(x), "__index__"):
        raise InvalidArgumentError(f"{name} must be a non-negative integer, got {x!r}")
    n = operator.index(x)
    if not 0 <= n < 2**63:
        raise InvalidArgumentError(f"{name} must be a non-negative integer below 2**63, got {n}")
    return n


def _flag(x: Any, name: str) -> bool:
    if isinstance(x, (bool, np.bool_)):
        return bool(x)
    raise InvalidArgumentError(f"{name} must be a bool, got {x!r}")


# --------------------------------------------------------------------------------------------
# §5.1 / §5.2: the paper's closed forms.


def paper(
    kind: str,
    y0: Any,
    drive: Any,
    *,
    lr: Any,
    momentum: Any = 0.0,
    dampening: Any = 0.0,
    weight_decay: Any = 0.0,
    ydot0: Any = None,
    steps: int | None = None,
) -> np.ndarray:
    """The paper's prediction of the charges at every step, shape ``(steps + 1, groups)``.

    ``y0``: (groups,) charges at step 0. ``drive``: (steps, groups); without momentum |ĝ_n|²,
    with momentum |b_n|² (the buffer after step n); rescale: side A1 minus side A2; ignored (may
    be None) for translation. ``momentum`` must be all zero (§5.1, first order) or all positive
    (§5.2, damped oscillator) over the run. ``ydot0``: (groups,) initial rate ẏ(0) per unit of
    model time, only with momentum (None = 0, the paper's start; with an existing buffer b_{−1}
    use −2⟨θ_0, b_{−1}⟩/(1−d), translation −⟨1, b_{−1}⟩/(1−d)). ``steps``: only needed for
    translation with constant hyperparameters and no drive.

    The state is advanced with the exact one-step propagator (drive constant over the step),
    which never forms a growing exponential and is continuous across the critical damping.
    """
    kind = _kind(kind)
    y = _vec(y0, "y0")
    hyper = {"lr": lr, "momentum": momentum, "dampening": dampening, "weight_decay": weight_decay}
    n = _hyper_steps(hyper)
    d = None
    if drive is not None:
        d = _mat(drive, "drive", y.shape[0], n)
        n = d.shape[0]
    elif kind != "translation":
        raise InvalidArgumentError(f"paper({kind!r}) needs a drive of shape (steps, groups)")
    if steps is not None:
        steps = _count(steps, "steps")
        if n is not None and n != steps:
            raise ShapeError(f"steps={steps} but the inputs have {n} steps")
        n = steps
    if n is None:
        raise InvalidArgumentError("the run length is unknown: pass steps= (translation, constant hyperparameters)")
    v = None if ydot0 is None else _vec(ydot0, "ydot0", y.shape[0])
    lr_a, m_a, d_a, w_a = _hypers(hyper, n)
    return _native.theory_paper(kind, y, d if kind != "translation" else None, lr_a, m_a, d_a, w_a, n, v)


class PaperStream:
    """The closed forms advanced one optimizer step at a time (live tracking).

    ``PaperStream(kind, y0, ydot0=None)``; ``step(drive, lr=..., momentum=..., dampening=...,
    weight_decay=...)`` returns y_{n+1} (groups,). The drive and hyperparameters are those of
    :func:`paper` for one step. Feeding the same inputs step by step gives bit-for-bit the rows
    of :func:`paper`. A failed step leaves the state unchanged (values, ``steps``, ``time``),
    whatever failed: a bad value, a NaN drive, or a result that would overflow float64.

    Attributes: ``y`` (current charges), ``ydot`` (current rate per unit of model time; without
    momentum the first-order right-hand side at the end of the last step), ``steps``, ``time``
    (model time t_n), ``kind``.
    """

    def __init__(self, kind: str, y0: Any, *, ydot0: Any = None) -> None:
        kind = _kind(kind)
        y = _vec(y0, "y0")
        v = None if ydot0 is None else _vec(ydot0, "ydot0", y.shape[0])
        self._groups = y.shape[0]
        self._quadratic = kind != "translation"
        self._native = _native.TheoryPaperStream(kind, y, v)

    def step(
        self,
        drive: Any,
        *,
        lr: float,
        momentum: float = 0.0,
        dampening: float = 0.0,
        weight_decay: float = 0.0,
    ) -> np.ndarray:
        if self._quadratic:
            if drive is None:
                raise InvalidArgumentError(f"step() of a {self.kind} stream needs a drive (groups,)")
            drive = _row(drive, "drive", self._groups)
        else:
            drive = None
        return self._native.step(
            drive,
            _scalar(lr, "lr"),
            _scalar(momentum, "momentum"),
            _scalar(dampening, "dampening"),
            _scalar(weight_decay, "weight_decay"),
        )

    @property
    def y(self) -> np.ndarray:
        return self._native.y

    @property
    def ydot(self) -> np.ndarray:
        return self._native.ydot

    @property
    def steps(self) -> int:
        return self._native.steps

    @property
    def time(self) -> float:
        return self._native.time

    @property
    def kind(self) -> str:
        return self._native.kind

    def __repr__(self) -> str:
        return f"PaperStream(kind={self.kind!r}, groups={self._groups}, steps={self.steps})"


# --------------------------------------------------------------------------------------------
# §5.3: the exact ledger.


def ledger(
    kind: str,
    y0: Any,
    *,
    flux: Any,
    update_sq: Any = None,
    lr: Any,
    momentum: Any = 0.0,
    dampening: Any = 0.0,
    weight_decay: Any = 0.0,
    nesterov: bool = False,
    update_dot: Any = None,
    buffer_dot0: Any = None,
) -> np.ndarray:
    """The exact charges of a ``torch.optim.SGD`` run, shape ``(steps + 1, groups)``.

    ``flux`` (steps, groups): s_n = ⟨θ_n, ĝ_n⟩ (scale; rescale s_A1 − s_A2), ⟨1, ĝ_n⟩
    (translation): the breaking fluxes, zero for an exact symmetry. ``update_sq`` (steps,
    groups): |u_n|² of the applied update (rescale: side difference), required for
    scale/rescale. ``update_dot``: e_n = ⟨u_n, b_n⟩, required with ``nesterov=True``
    (scale/rescale); at a step with momentum 0 after a buffer existed, ⟨u_n, b_{n−1}⟩, which
    moves ⟨θ, b⟩ with θ under the buffer PyTorch keeps (docs/theory.md §5.3). ``buffer_dot0``
    (groups,): ⟨θ_0, b_{−1}⟩ (translation ⟨1, b_{−1}⟩) when the optimizer already held a buffer;
    None = PyTorch's first-step rule b_0 = ĝ_0 + λθ_0. Steps with momentum 0 follow PyTorch
    (dampening ignored, buffer untouched).
    """
    kind = _kind(kind)
    y = _vec(y0, "y0")
    g = y.shape[0]
    hyper = {"lr": lr, "momentum": momentum, "dampening": dampening, "weight_decay": weight_decay}
    n = _hyper_steps(hyper)
    fl = _mat(flux, "flux", g, n)
    n = fl.shape[0]
    quadratic = kind != "translation"
    usq = _mat(update_sq, "update_sq", g, n) if (quadratic and update_sq is not None) else None
    if quadratic and usq is None:
        raise InvalidArgumentError(f"ledger({kind!r}) needs update_sq (|u_n|², shape (steps, groups))")
    nest = _flag(nesterov, "nesterov")
    udot = _mat(update_dot, "update_dot", g, n) if (quadratic and update_dot is not None) else None
    b0 = None if buffer_dot0 is None else _vec(buffer_dot0, "buffer_dot0", g)
    lr_a, m_a, d_a, w_a = _hypers(hyper, n)
    return _native.theory_ledger(kind, y, fl, usq, udot, b0, lr_a, m_a, d_a, w_a, nest)


class LedgerStream:
    """The exact ledger advanced one optimizer step at a time (live tracking).

    ``LedgerStream(kind, y0, buffer_dot0=None)``; ``step(flux=..., update_sq=..., lr=...,
    momentum=..., dampening=..., weight_decay=..., nesterov=False, update_dot=None)`` returns
    y_{n+1}. Inputs are those of :func:`ledger` for one step, shape (groups,). Bit-for-bit the
    rows of :func:`ledger`; a failed step leaves the state unchanged.

    Attributes: ``y``, ``steps``, ``buffer_dot`` (⟨θ_n, b_{n−1}⟩ as carried by the ledger).
    """

    def __init__(self, kind: str, y0: Any, *, buffer_dot0: Any = None) -> None:
        kind = _kind(kind)
        y = _vec(y0, "y0")
        b0 = None if buffer_dot0 is None else _vec(buffer_dot0, "buffer_dot0", y.shape[0])
        self._groups = y.shape[0]
        self._quadratic = kind != "translation"
        self._kind = kind
        self._native = _native.TheoryLedgerStream(kind, y, b0)

    def step(
        self,
        *,
        flux: Any,
        update_sq: Any = None,
        lr: float,
        momentum: float = 0.0,
        dampening: float = 0.0,
        weight_decay: float = 0.0,
        nesterov: bool = False,
        update_dot: Any = None,
    ) -> np.ndarray:
        g = self._groups
        fl = _row(flux, "flux", g)
        usq = _row(update_sq, "update_sq", g) if (self._quadratic and update_sq is not None) else None
        udot = _row(update_dot, "update_dot", g) if (self._quadratic and update_dot is not None) else None
        return self._native.step(
            fl,
            usq,
            udot,
            _scalar(lr, "lr"),
            _scalar(momentum, "momentum"),
            _scalar(dampening, "dampening"),
            _scalar(weight_decay, "weight_decay"),
            _flag(nesterov, "nesterov"),
        )

    @property
    def y(self) -> np.ndarray:
        return self._native.y

    @property
    def buffer_dot(self) -> np.ndarray:
        return self._native.buffer_dot

    @property
    def steps(self) -> int:
        return self._native.steps

    @property
    def kind(self) -> str:
        return self._kind

    def __repr__(self) -> str:
        return f"LedgerStream(kind={self._kind!r}, groups={self._groups}, steps={self.steps})"


def ledger_parts(kind: str, parts: Iterable[Mapping[str, Any]], signs: Sequence[float] | None = None) -> np.ndarray:
    """Σ_i signs[i] · ledger(kind, **parts[i]): a group split over param_groups.

    Each part is a dict of :func:`ledger` keyword arguments plus ``y0`` (that part's charge and
    measured inputs, with that part's lr/momentum/dampening/weight_decay). Example, a scale
    group whose bias has no weight decay::

        x = theory.ledger_parts("scale", [
            dict(y0=w_sq0, flux=s_w, update_sq=u_w, lr=lr, momentum=0.9, weight_decay=5e-4),
            dict(y0=b_sq0, flux=s_b, update_sq=u_b, lr=lr, momentum=0.9, weight_decay=0.0),
        ])

    For a rescale group whose two sides differ in hyperparameters, run each side as a "scale"
    part (its own |θ|², ⟨θ,ĝ⟩, |u|²) with ``signs=(1, -1)``. The ledger is linear in its
    inputs, so the sum of the parts is exactly the ledger of the whole.
    """
    parts = list(parts)
    if not parts:
        raise InvalidArgumentError("ledger_parts needs at least one part")
    if signs is None:
        signs = [1.0] * len(parts)
    if len(signs) != len(parts):
        raise ShapeError(f"{len(signs)} signs for {len(parts)} parts")
    total: np.ndarray | None = None
    for sign, part in zip(signs, parts):
        kw = dict(part)
        if "y0" not in kw:
            raise InvalidArgumentError("each part needs its own y0")
        y0 = kw.pop("y0")
        out = float(sign) * ledger(kind, y0, **kw)
        if total is not None and out.shape != total.shape:
            raise ShapeError(f"parts give shapes {total.shape} and {out.shape}")
        total = out if total is None else total + out
    assert total is not None  # parts is not empty
    return total


def ledger_measured(
    kind: str,
    y0: Any,
    *,
    lr: Any,
    dot_theta_update: Any = None,
    update_sq: Any = None,
    update_sum: Any = None,
) -> np.ndarray:
    """The optimizer-agnostic identity θ_{n+1} = θ_n − η_n u_n (Adam, AdamW, Lion, ...).

    scale/rescale: y_{n+1} = y_n − 2η_n⟨θ_n, u_n⟩ + η_n²|u_n|² from ``dot_theta_update`` and
    ``update_sq`` (steps, groups); translation: y_{n+1} = y_n − η_n⟨1, u_n⟩ from
    ``update_sum``. This is bookkeeping, not a prediction. Returns (steps + 1, groups).
    """
    kind = _kind(kind)
    y = _vec(y0, "y0")
    g = y.shape[0]
    n = _hyper_steps({"lr": lr})
    if kind == "translation":
        if update_sum is None:
            raise InvalidArgumentError("ledger_measured('translation') needs update_sum (⟨1, u_n⟩)")
        s = _mat(update_sum, "update_sum", g, n)
        n, dot, usq = s.shape[0], None, None
    else:
        if dot_theta_update is None or update_sq is None:
            raise InvalidArgumentError(f"ledger_measured({kind!r}) needs dot_theta_update and update_sq")
        dot = _mat(dot_theta_update, "dot_theta_update", g, n)
        n = dot.shape[0]
        usq = _mat(update_sq, "update_sq", g, n)
        s = None
    (lr_a,) = _hypers({"lr": lr}, n)
    return _native.theory_ledger_measured(kind, y, lr_a, n, dot, usq, s)


# --------------------------------------------------------------------------------------------
# §5.4: equilibrium.


def _broadcast(values: Mapping[str, Any]) -> tuple[list[np.ndarray], tuple[int, ...]]:
    arrays = [_f64(v, k) for k, v in values.items()]
    try:
        b = np.broadcast_arrays(*arrays)
    except ValueError as exc:
        raise ShapeError(f"{', '.join(values)} do not broadcast together ({exc})") from None
    shape = b[0].shape
    size = int(np.prod(shape, dtype=object))
    if size > max(MAX_UNBACKED_VALUES, *(a.size for a in arrays)):
        # e.g. (10**5, 1) against (1, 10**5): 10**10 values no input holds (80 GB per column).
        raise InvalidArgumentError(
            f"{', '.join(values)} broadcast to shape {shape}, {size} values, more than any input holds "
            f"and more than {MAX_UNBACKED_VALUES}"
        )
    return [np.ascontiguousarray(a.reshape(-1)) for a in b], shape


_EQ_KEYS = ("norm_sq", "angular_update", "effective_lr", "relaxation_steps")


def _pack(columns: Sequence[np.ndarray], shape: tuple[int, ...]) -> dict[str, Any]:
    if shape == ():
        return {k: float(c[0]) for k, c in zip(_EQ_KEYS, columns)}
    return {k: c.reshape(shape) for k, c in zip(_EQ_KEYS, columns)}


def equilibrium_sgd(
    *,
    lr: Any,
    weight_decay: Any,
    grad_sq_unit: Any,
    momentum: Any = 0.0,
    dampening: Any = 0.0,
) -> dict[str, Any]:
    """SGD (with momentum β, dampening d, coupled weight decay λ) at equilibrium (§5.4).

    ``grad_sq_unit`` = E|g̃_A|², the squared minibatch gradient at unit norm (|ĝ_A|·|θ_A|).
    Returns ``norm_sq`` |θ*|² = √(η(1−d)E|g̃|²/(2λ(1−β))), ``angular_update`` (RMS angle per
    step) √(2ηλ(1−d)/(1+β)), ``effective_lr`` η/|θ*|², ``relaxation_steps`` (1−β)/(4ηλ(1−d)).
    With β = 0 dampening is ignored (as PyTorch does). λ = 0: no equilibrium (norm_sq = inf).
    Inputs broadcast; all-scalar inputs give floats.
    """
    cols, shape = _broadcast(
        {"lr": lr, "weight_decay": weight_decay, "grad_sq_unit": grad_sq_unit, "momentum": momentum, "dampening": dampening}
    )
    return _pack(_native.theory_equilibrium_sgd(*cols), shape)


def equilibrium_adamw(*, lr: Any, weight_decay: Any, update_sq: Any, beta1: Any = 0.9) -> dict[str, Any]:
    """AdamW (decoupled λ) at equilibrium (§5.4); ``update_sq`` = E|u_A|² of Adam's direction.

    ``norm_sq`` = ηE|u|²(1+β1)/(2λ(1−β1)), ``angular_update`` √(2ηλ(1−β1)/(1+β1)),
    ``effective_lr`` η/|θ*|, ``relaxation_steps`` 1/(2ηλ).
    """
    cols, shape = _broadcast({"lr": lr, "weight_decay": weight_decay, "update_sq": update_sq, "beta1": beta1})
    return _pack(_native.theory_equilibrium_adamw(*cols), shape)


def regime(*, lr: float, momentum: float, dampening: float = 0.0, weight_decay: float, kind: str = "scale") -> str:
    """Which solution the §5.2 oscillator takes: "underdamped" (γ < ω), "critical"
    (|ω² − γ²| ≤ CRITICAL_TOL·γ²), "overdamped", or "first-order" when momentum is 0.
    ``kind`` picks ω² (scale/rescale 4λ/(h(1+β)), translation 2λ/(h(1+β)))."""
    return _native.theory_regime(
        _scalar(lr, "lr"), _scalar(momentum, "momentum"), _scalar(dampening, "dampening"),
        _scalar(weight_decay, "weight_decay"), _kind(kind),
    )


def times(*, lr: Any, momentum: Any = 0.0, dampening: Any = 0.0, steps: int | None = None) -> np.ndarray:
    """The model time t_n (n = 0 … steps) of the closed forms: Σ_{k<n} η_k(1−d_k) with momentum,
    Σ_{k<n} η_k without (dampening is ignored when momentum is 0). The hyperparameters are
    checked as :func:`paper` checks them; the sum runs in order, as the streams' ``time``."""
    hyper = {"lr": lr, "momentum": momentum, "dampening": dampening}
    n = _hyper_steps(hyper)
    if steps is not None:
        steps = _count(steps, "steps")
        if n is not None and n != steps:
            raise ShapeError(f"steps={steps} but the hyperparameters have {n} steps")
        n = steps
    if n is None:
        raise InvalidArgumentError("pass steps= or a per-step hyperparameter array")
    lr_a, m_a, d_a = _hypers(hyper, n)
    return _native.theory_times(lr_a, m_a, d_a, n)
