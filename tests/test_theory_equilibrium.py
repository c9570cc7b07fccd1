"""Equilibrium (docs/theory.md §5.4) against the long-run average of pure-noise scale-invariant toys
with ηλ ≤ 1e-4: SGD, SGD with momentum (and dampening), AdamW. Within 3%."""

from __future__ import annotations

import numpy as np
import pytest

from neural_mechanics import theory

GROUPS, DIM = 128, 16


def noise_grad(w, rng):
    """The gradient of a scale-invariant loss under pure minibatch noise: an isotropic normal
    vector projected orthogonally to the row, divided by the row's norm (E|g̃|² = DIM − 1)."""
    norms = np.linalg.norm(w, axis=1, keepdims=True)
    wh = w / norms
    xi = rng.standard_normal(w.shape)
    return (xi - (xi * wh).sum(1, keepdims=True) * wh) / norms


def start_at(norm_sq, rng):
    w = rng.standard_normal((GROUPS, DIM))
    return w * np.sqrt(norm_sq / (w * w).sum(1, keepdims=True))


def angle_sq(w0, w1):
    a = w0 / np.linalg.norm(w0, axis=1, keepdims=True)
    b = w1 / np.linalg.norm(w1, axis=1, keepdims=True)
    return ((a - b) ** 2).sum(1)  # chord² = angle² (1 + O(angle²))


@pytest.mark.parametrize("beta,damp", [(0.0, 0.0), (0.9, 0.0), (0.9, 0.5)])
def test_sgd_equilibrium(beta, damp):
    lr, wd = 0.1, 1e-3  # ηλ = 1e-4
    pred = theory.equilibrium_sgd(lr=lr, weight_decay=wd, grad_sq_unit=DIM - 1.0, momentum=beta, dampening=damp)
    rng = np.random.default_rng(11)
    w = start_at(pred["norm_sq"], rng)
    buf = None
    burn = int(3 * pred["relaxation_steps"])
    xs, angles = [], []
    for n in range(burn + 6000):
        d_p = noise_grad(w, rng) + wd * w
        if beta:
            buf = d_p if buf is None else beta * buf + (1 - damp) * d_p
            d_p = buf
        w_next = w - lr * d_p
        if n >= burn:
            xs.append((w * w).sum(1).mean())
            angles.append(angle_sq(w, w_next).mean())
        w = w_next
    assert np.mean(xs) == pytest.approx(pred["norm_sq"], rel=0.03)
    assert np.sqrt(np.mean(angles)) == pytest.approx(pred["angular_update"], rel=0.03)
    assert pred["effective_lr"] == pytest.approx(lr / pred["norm_sq"])


def test_sgd_relaxation_time():
    # From 0.6x the equilibrium |θ|² and near it, the gap to equilibrium decays by e in about
    # relaxation_steps (the linearised rate; loose: 25%).
    lr, wd = 0.1, 1e-3
    pred = theory.equilibrium_sgd(lr=lr, weight_decay=wd, grad_sq_unit=DIM - 1.0)
    rng = np.random.default_rng(3)
    w = start_at(0.9 * pred["norm_sq"], rng)
    tau = pred["relaxation_steps"]
    xs = []
    for _ in range(int(tau)):
        xs.append((w * w).sum(1).mean())
        w = w - lr * (noise_grad(w, rng) + wd * w)
    gap0 = pred["norm_sq"] - xs[0]
    gap = pred["norm_sq"] - np.mean(xs[-20:])
    assert gap / gap0 == pytest.approx(np.exp(-1), rel=0.25)


def test_adamw_equilibrium():
    lr, wd, b1, b2 = 1e-3, 0.1, 0.9, 0.999  # ηλ = 1e-4
    rng = np.random.default_rng(7)
    guess = theory.equilibrium_adamw(lr=lr, weight_decay=wd, update_sq=DIM * (1 - b1) / (1 + b1), beta1=b1)
    w = start_at(guess["norm_sq"], rng)
    m = np.zeros_like(w)
    v = np.zeros_like(w)
    burn = 3 * int(guess["relaxation_steps"])
    xs, usq, angles = [], [], []
    for n in range(1, burn + 8000):
        g = noise_grad(w, rng)
        m = b1 * m + (1 - b1) * g
        v = b2 * v + (1 - b2) * g * g
        u = (m / (1 - b1**n)) / (np.sqrt(v / (1 - b2**n)) + 1e-8)
        w_next = w * (1 - lr * wd) - lr * u
        if n > burn:
            xs.append((w * w).sum(1).mean())
            usq.append((u * u).sum(1).mean())
            angles.append(angle_sq(w, w_next).mean())
        w = w_next
    pred = theory.equilibrium_adamw(lr=lr, weight_decay=wd, update_sq=np.mean(usq), beta1=b1)
    assert np.mean(xs) == pytest.approx(pred["norm_sq"], rel=0.03)
    assert np.sqrt(np.mean(angles)) == pytest.approx(pred["angular_update"], rel=0.03)
    assert pred["relaxation_steps"] == pytest.approx(1 / (2 * lr * wd))


def test_broadcasting_and_types():
    out = theory.equilibrium_sgd(lr=[0.1, 0.2], weight_decay=1e-3, grad_sq_unit=[[1.0], [4.0]])
    assert out["norm_sq"].shape == (2, 2)
    assert np.allclose(out["norm_sq"][1, 0], np.sqrt(0.1 * 4.0 / 2e-3))
    scalar = theory.equilibrium_adamw(lr=1e-3, weight_decay=0.1, update_sq=2.0)
    assert isinstance(scalar["norm_sq"], float)
    assert theory.equilibrium_sgd(lr=0.1, weight_decay=0.0, grad_sq_unit=1.0)["norm_sq"] == np.inf
