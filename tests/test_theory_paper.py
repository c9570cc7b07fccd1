"""The paper's closed forms (docs/theory.md §5.1, §5.2) against independent references: a direct
convolution with the closed-form kernels of THEORY's table, and an RK4 integration of the ODE
with 1,000 substeps per step, in every regime, at the critical point and under schedules."""

from __future__ import annotations

import numpy as np
import pytest

from neural_mechanics import theory

STIFF = {"translation": 2.0, "scale": 4.0, "rescale": 4.0}


def coefficients(kind, lr, beta, damp, wd):
    h = lr * (1.0 - damp)
    gamma = (1.0 - beta) / (h * (1.0 + beta))
    omega2 = STIFF[kind] * wd / (h * (1.0 + beta))
    cf = 0.0 if kind == "translation" else 2.0 / (1.0 - damp) ** 2
    return h, gamma, omega2, cf


def table_kernels(gamma, omega2, t, critical=False):
    """K(t), G(t) and P(t) = ∫_0^t G from the table of docs/theory.md §5.2 (float64, moderate arguments)."""
    t = np.asarray(t, dtype=float)
    if critical:
        e = np.exp(-gamma * t)
        k, g = e * (1 + gamma * t), t * e
        p = (1 - e * (1 + gamma * t)) / gamma**2
        return k, g, p
    d = omega2 - gamma**2
    if d > 0:
        om = np.sqrt(d)
        e = np.exp(-gamma * t)
        k = e * (np.cos(om * t) + gamma / om * np.sin(om * t))
        g = e * np.sin(om * t) / om
    else:
        r = np.sqrt(-d)
        ap, am = -gamma + r, -gamma - r
        k = (ap * np.exp(am * t) - am * np.exp(ap * t)) / (ap - am)
        g = (np.exp(ap * t) - np.exp(am * t)) / (ap - am)
    return k, g, (1 - k) / omega2


def convolution(kind, y0, v0, drive, lr, beta, damp, wd, critical=False):
    """y(t_N) = K y0 + G v0 + Σ_n f_n ∫_{t_n}^{t_{n+1}} G(t_N − s) ds, for every N."""
    h, gamma, omega2, cf = coefficients(kind, lr, beta, damp, wd)
    steps = drive.shape[0]
    out = [y0]
    for n_end in range(1, steps + 1):
        t_end = n_end * h
        k, g, _ = table_kernels(gamma, omega2, t_end, critical)
        y = k * y0 + g * v0
        lo = t_end - np.arange(n_end) * h  # t_N − t_n
        hi = t_end - np.arange(1, n_end + 1) * h  # t_N − t_{n+1}
        p_lo = table_kernels(gamma, omega2, lo, critical)[2]
        p_hi = table_kernels(gamma, omega2, hi, critical)[2]
        y = y + ((p_lo - p_hi)[:, None] * cf * drive[:n_end]).sum(axis=0)
        out.append(y)
    return np.array(out)


def rk4(kind, y0, v0, drive, lr, beta, damp, wd, substeps=1000):
    """Classic RK4 on (y, ẏ) with per-step coefficients, drive constant over each step."""
    lr, beta, damp, wd = (np.broadcast_to(np.asarray(a, float), (drive.shape[0],)) for a in (lr, beta, damp, wd))
    y, v = y0.astype(float).copy(), v0.astype(float).copy()
    out = [y.copy()]
    for n in range(drive.shape[0]):
        if beta[n] > 0:
            h, gamma, omega2, cf = coefficients(kind, lr[n], beta[n], damp[n], wd[n])
            f = cf * drive[n]

            def rhs(y, v, f=f, gamma=gamma, omega2=omega2):
                return v, f - 2 * gamma * v - omega2 * y
        else:
            h = lr[n]
            rate = STIFF[kind] / 2 * wd[n]
            f = (0.0 if kind == "translation" else h) * drive[n]

            def rhs(y, v, f=f, rate=rate):
                return f - rate * y, 0 * v
        dt = h / substeps
        for _ in range(substeps):
            k1y, k1v = rhs(y, v)
            k2y, k2v = rhs(y + 0.5 * dt * k1y, v + 0.5 * dt * k1v)
            k3y, k3v = rhs(y + 0.5 * dt * k2y, v + 0.5 * dt * k2v)
            k4y, k4v = rhs(y + dt * k3y, v + dt * k3v)
            y = y + dt / 6 * (k1y + 2 * k2y + 2 * k3y + k4y)
            v = v + dt / 6 * (k1v + 2 * k2v + 2 * k3v + k4v)
        out.append(y.copy())
    return np.array(out)


def rel_err(a, b):
    return float(np.max(np.abs(a - b)) / np.max(np.abs(b)))


def critical_wd(lr, beta, damp=0.0):
    h = lr * (1 - damp)
    return (1 - beta) ** 2 / (4 * h * (1 + beta))


# (name, kind, lr, momentum, dampening, weight decay, expected regime)
CASES = [
    ("underdamped", "scale", 0.1, 0.9, 0.0, 0.05, "underdamped"),
    ("underdamped-dampened", "rescale", 0.1, 0.95, 0.2, 0.2, "underdamped"),
    ("overdamped", "scale", 0.1, 0.5, 0.0, 0.01, "overdamped"),
    ("critical", "scale", 0.1, 0.5, 0.0, critical_wd(0.1, 0.5), "critical"),
    ("translation", "translation", 0.1, 0.9, 0.0, 0.05, "underdamped"),
]


@pytest.fixture(scope="module")
def inputs():
    rng = np.random.default_rng(3)
    groups, steps = 3, 120
    y0 = np.array([1.0, 0.4, -0.3])
    v0 = np.array([0.0, 0.2, -0.5])
    drive = rng.uniform(0.0, 0.05, (steps, groups))
    drive[:, 2] -= 0.025  # a rescale-like signed drive
    return y0, v0, drive


@pytest.mark.parametrize("name,kind,lr,beta,damp,wd,regime", CASES, ids=[c[0] for c in CASES])
def test_against_direct_convolution(inputs, name, kind, lr, beta, damp, wd, regime):
    y0, v0, drive = inputs
    assert theory.regime(lr=lr, momentum=beta, dampening=damp, weight_decay=wd, kind=kind) == regime
    got = theory.paper(kind, y0, drive, lr=lr, momentum=beta, dampening=damp, weight_decay=wd, ydot0=v0)
    ref = convolution(kind, y0, v0, drive, lr, beta, damp, wd, critical=(regime == "critical"))
    assert got.shape == (drive.shape[0] + 1, 3)
    assert rel_err(got, ref) <= 1e-10


def test_first_order_against_direct_convolution(inputs):
    y0, _, drive = inputs
    lr, wd = 0.1, 0.05
    got = theory.paper("scale", y0, drive, lr=lr, weight_decay=wd)
    n = drive.shape[0]
    ref = [y0]
    for end in range(1, n + 1):
        t_end = end * lr
        lo = t_end - np.arange(end) * lr
        hi = lo - lr
        w = (np.exp(-2 * wd * hi) - np.exp(-2 * wd * lo)) / (2 * wd)
        ref.append(np.exp(-2 * wd * t_end) * y0 + (w[:, None] * lr * drive[:end]).sum(0))
    assert rel_err(got, np.array(ref)) <= 1e-10
    # Translation without momentum: q(t) = e^{−λt} q(0).
    q = theory.paper("translation", y0, None, lr=lr, weight_decay=wd, steps=n)
    assert rel_err(q, np.exp(-wd * lr * np.arange(n + 1))[:, None] * y0) <= 1e-12


@pytest.mark.parametrize("name,kind,lr,beta,damp,wd,regime", CASES, ids=[c[0] for c in CASES])
def test_against_rk4(inputs, name, kind, lr, beta, damp, wd, regime):
    y0, v0, drive = inputs
    drive = drive[:15]
    got = theory.paper(kind, y0, drive, lr=lr, momentum=beta, dampening=damp, weight_decay=wd, ydot0=v0)
    ref = rk4(kind, y0, v0, drive, lr, beta, damp, wd)
    assert rel_err(got, ref) <= 1e-8


def warmup_step_decay(steps, base=0.1, warm=5, every=6):
    n = np.arange(steps)
    return np.where(n < warm, base * (n + 1) / warm, base * 0.5 ** ((n - warm) // every))


@pytest.mark.parametrize("beta", [0.0, 0.9])
def test_schedule_against_rk4_and_streaming(inputs, beta):
    y0, v0, drive = inputs
    drive = drive[:18]
    lr = warmup_step_decay(18)
    wd = np.linspace(0.05, 0.2, 18)  # a weight-decay schedule too
    v = v0 if beta else None
    got = theory.paper("scale", y0, drive, lr=lr, momentum=beta, dampening=0.1, weight_decay=wd, ydot0=v)
    ref = rk4("scale", y0, v0 if beta else 0 * v0, drive, lr, beta, 0.1 if beta else 0.0, wd)
    assert rel_err(got, ref) <= 1e-8
    stream = theory.PaperStream("scale", y0, ydot0=v)
    for n in range(18):
        row = stream.step(drive[n], lr=lr[n], momentum=beta, dampening=0.1, weight_decay=wd[n])
        assert np.array_equal(row, got[n + 1])  # bit for bit
    assert stream.steps == 18
    assert stream.time == pytest.approx(theory.times(lr=lr, momentum=beta, dampening=0.1)[-1], rel=1e-14)
    assert np.array_equal(stream.y, got[-1])


def test_continuous_across_the_critical_point(inputs):
    y0, v0, drive = inputs
    lr, beta = 0.1, 0.5
    lc = critical_wd(lr, beta)
    rows = {
        f: theory.paper("scale", y0, drive, lr=lr, momentum=beta, weight_decay=lc * f, ydot0=v0)
        for f in (1 - 1e-9, 1.0, 1 + 1e-9)
    }
    scale = np.max(np.abs(rows[1.0]))
    # A 1e-9 change of λ moves the prediction by O(1e-9), from either side (no jump, no blow-up).
    assert np.max(np.abs(rows[1 - 1e-9] - rows[1.0])) <= 1e-8 * scale
    assert np.max(np.abs(rows[1 + 1e-9] - rows[1.0])) <= 1e-8 * scale
    assert theory.regime(lr=lr, momentum=beta, weight_decay=lc * (1 - 1e-6)) == "overdamped"
    assert theory.regime(lr=lr, momentum=beta, weight_decay=lc * (1 + 1e-6)) == "underdamped"


def test_translation_ignores_drive_and_decays(inputs):
    y0, v0, drive = inputs
    a = theory.paper("translation", y0, drive, lr=0.1, momentum=0.9, weight_decay=0.05, ydot0=v0)
    b = theory.paper("translation", y0, None, lr=0.1, momentum=0.9, weight_decay=0.05, ydot0=v0, steps=drive.shape[0])
    assert np.array_equal(a, b)
    s = theory.PaperStream("translation", y0, ydot0=v0)
    for n in range(drive.shape[0]):
        assert np.array_equal(s.step(None, lr=0.1, momentum=0.9, weight_decay=0.05), a[n + 1])


def test_no_weight_decay_grows_by_the_centrifugal_term():
    # λ = 0, no momentum: x_{n+1} = x_n + η²|ĝ|² exactly (the η∫|ĝ|² term of §5.1).
    drive = np.full((10, 1), 0.3)
    got = theory.paper("scale", [2.0], drive, lr=0.1)
    assert np.allclose(got[:, 0], 2.0 + 0.01 * 0.3 * np.arange(11), rtol=1e-15, atol=0)


def test_long_run_is_bounded_and_reaches_the_fixed_point():
    # 20,000 steps at lr 0.1, β 0.99, λ 1e-3 (the 10^7-step version is a Rust test).
    steps = 20_000
    drive = np.full((steps, 2), [0.3, 1e-4])
    y = theory.paper("scale", [1.0, 5.0], drive, lr=0.1, momentum=0.99, weight_decay=1e-3)
    target = 2 * drive[0] * 0.1 * 1.99 / (4 * 1e-3)
    assert np.all(np.isfinite(y))
    assert np.allclose(y[-1], target, rtol=1e-9, atol=0)
