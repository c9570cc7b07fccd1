"""The exact ledger (docs/theory.md §5.3) against simulated torch.optim.SGD runs of numpy toys:
a weight matrix whose loss depends only on its row directions (scale groups, with a small
breaking term so the flux is not zero) and a softmax/cross-entropy layer (translation groups)."""

from __future__ import annotations

import numpy as np
import pytest

from neural_mechanics import theory

G, D, C = 6, 5, 4  # scale groups (rows) and dims; classes of the translation toy


def sgd_step(theta, grad, buf, lr, beta, damp, wd, nesterov):
    """torch.optim.SGD's update, in numpy (coupled weight decay, first-step buffer rule)."""
    d_p = grad + wd * theta
    if beta != 0:
        buf = d_p.copy() if buf is None else beta * buf + (1 - damp) * d_p
        u = d_p + beta * buf if nesterov else buf
    else:
        u = d_p
    return theta - lr * u, u, buf


def scale_grad(w, x, t, breaking):
    """Gradient of ½ mean((x ŵᵀ − t)²) + breaking·Σ_i (Σ_j w_ij)², ŵ the row directions."""
    norms = np.linalg.norm(w, axis=1, keepdims=True)
    wh = w / norms
    r = (x @ wh.T - t) / x.shape[0]
    g_hat = r.T @ x  # ∂L/∂ŵ
    g = (g_hat - (g_hat * wh).sum(1, keepdims=True) * wh) / norms
    return g + breaking * 2 * w.sum(1, keepdims=True)


def translation_grad(v, h, labels):
    """Cross-entropy of softmax(v h) averaged over the batch: columns of the gradient sum to 0."""
    z = h @ v.T
    p = np.exp(z - z.max(1, keepdims=True))
    p /= p.sum(1, keepdims=True)
    p[np.arange(len(labels)), labels] -= 1
    return p.T @ h / len(labels)


def run_scale(steps, lr, beta, damp, wd, nesterov=False, breaking=1e-3, seed=0, start=0):
    """Simulate; record per step (after `start` untracked steps) x, s, |u|², ⟨u,b⟩, and b_{−1}."""
    rng = np.random.default_rng(seed)
    w = rng.normal(size=(G, D))
    lr = np.broadcast_to(np.asarray(lr, float), (start + steps,))
    buf, rec = None, {k: [] for k in ("x", "s", "usq", "udot")}
    dot0 = None
    for n in range(start + steps):
        x = rng.normal(size=(16, D))
        t = rng.normal(size=(16, G))
        g = scale_grad(w, x, t, breaking)
        if n == start:
            dot0 = None if buf is None else (w * buf).sum(1)
        w_next, u, buf = sgd_step(w, g, buf, lr[n], beta, damp, wd, nesterov)
        if n >= start:
            rec["x"].append((w * w).sum(1))
            rec["s"].append((w * g).sum(1))
            rec["usq"].append((u * u).sum(1))
            b = u if buf is None else buf
            rec["udot"].append((u * b).sum(1))
        w = w_next
    rec["x"].append((w * w).sum(1))
    out = {k: np.array(v) for k, v in rec.items()}
    out["dot0"] = dot0
    out["lr"] = lr[start:]
    return out


def mass_rel(pred, x):
    return float(np.max(np.abs(pred - x) / np.abs(x)))


CASES = [
    ("sgd", 0.0, 0.3, False),  # β = 0: dampening must be ignored, as PyTorch does
    ("momentum", 0.9, 0.0, False),
    ("momentum-dampening", 0.9, 0.3, False),
    ("nesterov", 0.9, 0.0, True),
]


@pytest.mark.parametrize("name,beta,damp,nesterov", CASES, ids=[c[0] for c in CASES])
def test_scale_ledger_reproduces_sgd(name, beta, damp, nesterov):
    steps = 300
    lr = np.where(np.arange(steps) < 100, 0.05, 0.01)  # StepLR-like
    r = run_scale(steps, lr, beta, damp, 5e-3, nesterov)
    kw = dict(flux=r["s"], update_sq=r["usq"], lr=r["lr"], momentum=beta, dampening=damp, weight_decay=5e-3, nesterov=nesterov)
    if nesterov:
        kw["update_dot"] = r["udot"]
    got = theory.ledger("scale", r["x"][0], **kw)
    assert mass_rel(got, r["x"]) <= 1e-12
    # Streaming gives the same bits.
    st = theory.LedgerStream("scale", r["x"][0])
    for n in range(steps):
        row = st.step(
            flux=r["s"][n], update_sq=r["usq"][n], lr=r["lr"][n], momentum=beta, dampening=damp,
            weight_decay=5e-3, nesterov=nesterov, update_dot=r["udot"][n] if nesterov else None,
        )
        assert np.array_equal(row, got[n + 1])
    # The flux matters: dropping it leaves a visible error (the test can fail).
    kw["flux"] = np.zeros_like(r["s"])
    assert mass_rel(theory.ledger("scale", r["x"][0], **kw), r["x"]) > 1e-6


@pytest.mark.parametrize("beta,damp,nesterov", [(0.9, 0.3, False), (0.8, 0.0, True)])
def test_existing_buffer(beta, damp, nesterov):
    r = run_scale(150, 0.03, beta, damp, 1e-2, nesterov, start=25)
    got = theory.ledger(
        "scale", r["x"][0], flux=r["s"], update_sq=r["usq"], lr=0.03, momentum=beta, dampening=damp,
        weight_decay=1e-2, nesterov=nesterov, update_dot=r["udot"] if nesterov else None, buffer_dot0=r["dot0"],
    )
    assert mass_rel(got, r["x"]) <= 1e-12
    # Forgetting the buffer (first-step rule) is wrong here.
    wrong = theory.ledger(
        "scale", r["x"][0], flux=r["s"], update_sq=r["usq"], lr=0.03, momentum=beta, dampening=damp,
        weight_decay=1e-2, nesterov=nesterov, update_dot=r["udot"] if nesterov else None,
    )
    assert mass_rel(wrong, r["x"]) > 1e-6


def test_rescale_is_the_difference_of_sides():
    r = run_scale(100, 0.05, 0.9, 0.1, 1e-3)
    a, b = slice(0, 3), slice(3, 6)  # sides A1 = rows 0-2, A2 = rows 3-5 of the toy
    delta = r["x"][:, a] - r["x"][:, b]
    got = theory.ledger(
        "rescale", delta[0], flux=r["s"][:, a] - r["s"][:, b], update_sq=r["usq"][:, a] - r["usq"][:, b],
        lr=0.05, momentum=0.9, dampening=0.1, weight_decay=1e-3,
    )
    mass = r["x"][:, a] + r["x"][:, b]
    assert float(np.max(np.abs(got - delta) / mass)) <= 1e-12


def test_parts_with_different_hyperparameters():
    """One group = row part P (weight decay) + part B (no weight decay), as with param_groups."""
    rng = np.random.default_rng(5)
    w = rng.normal(size=(G, D))
    parts = (slice(0, 4), slice(4, 5))
    wds, lr, beta = (5e-2, 0.0), 0.05, 0.9
    bufs = [None, None]
    rec = {k: [] for k in ("x", "s0", "s1", "u0", "u1", "x0", "x1")}
    for _ in range(120):
        g = scale_grad(w, rng.normal(size=(16, D)), rng.normal(size=(16, G)), 1e-3)
        rec["x"].append((w * w).sum(1))
        new = w.copy()
        for i, (p, wd) in enumerate(zip(parts, wds)):
            rec[f"x{i}"].append((w[:, p] ** 2).sum(1))
            rec[f"s{i}"].append((w[:, p] * g[:, p]).sum(1))
            new[:, p], u, bufs[i] = sgd_step(w[:, p], g[:, p], bufs[i], lr, beta, 0.0, wd, False)
            rec[f"u{i}"].append((u * u).sum(1))
        w = new
    rec["x"].append((w * w).sum(1))
    r = {k: np.array(v) for k, v in rec.items()}
    got = theory.ledger_parts("scale", [
        dict(y0=r["x0"][0], flux=r["s0"], update_sq=r["u0"], lr=lr, momentum=beta, weight_decay=wds[0]),
        dict(y0=r["x1"][0], flux=r["s1"], update_sq=r["u1"], lr=lr, momentum=beta, weight_decay=wds[1]),
    ])
    assert mass_rel(got, r["x"]) <= 1e-12
    # One ledger for the whole group with either weight decay is wrong.
    whole = theory.ledger("scale", r["x"][0], flux=r["s0"] + r["s1"], update_sq=r["u0"] + r["u1"], lr=lr, momentum=beta, weight_decay=wds[0])
    assert mass_rel(whole, r["x"]) > 1e-6


@pytest.mark.parametrize("beta,damp,nesterov", [(0.0, 0.0, False), (0.9, 0.2, False), (0.9, 0.0, True)])
def test_translation_ledger_reproduces_sgd(beta, damp, nesterov):
    rng = np.random.default_rng(1)
    v = rng.normal(size=(C, D))
    steps, wd = 200, 1e-2
    lr = np.where(np.arange(steps) < 20, 0.1 * (np.arange(steps) + 1) / 20, 0.1)  # warm-up
    buf, qs, fl, mass = None, [], [], []
    for n in range(steps):
        g = translation_grad(v, rng.normal(size=(32, D)), rng.integers(0, C, 32))
        qs.append(v.sum(0))
        mass.append(np.abs(v).sum(0))
        fl.append(g.sum(0))
        v, _, buf = sgd_step(v, g, buf, lr[n], beta, damp, wd, nesterov)
    qs.append(v.sum(0))
    mass.append(np.abs(v).sum(0))
    qs, fl, mass = np.array(qs), np.array(fl), np.array(mass)
    got = theory.ledger("translation", qs[0], flux=fl, lr=lr, momentum=beta, dampening=damp, weight_decay=wd, nesterov=nesterov)
    assert float(np.max(np.abs(got - qs) / mass)) <= 1e-12
    st = theory.LedgerStream("translation", qs[0])
    for n in range(steps):
        row = st.step(flux=fl[n], lr=lr[n], momentum=beta, dampening=damp, weight_decay=wd, nesterov=nesterov)
        assert np.array_equal(row, got[n + 1])


def test_measured_identity_reproduces_adamw():
    rng = np.random.default_rng(2)
    w = rng.normal(size=(G, D))
    m = np.zeros_like(w)
    s = np.zeros_like(w)
    lr, wd, b1, b2 = 1e-2, 1e-2, 0.9, 0.999
    xs, dots, usq, sums = [], [], [], []
    for n in range(1, 201):
        g = scale_grad(w, rng.normal(size=(16, D)), rng.normal(size=(16, G)), 0.0)
        m = b1 * m + (1 - b1) * g
        s = b2 * s + (1 - b2) * g * g
        # AdamW's whole step written as θ ← θ − η u (decay folded into u).
        u = wd * w + (m / (1 - b1**n)) / (np.sqrt(s / (1 - b2**n)) + 1e-8)
        xs.append((w * w).sum(1))
        dots.append((w * u).sum(1))
        usq.append((u * u).sum(1))
        sums.append(u.sum(1))
        w = w - lr * u
    xs.append((w * w).sum(1))
    xs = np.array(xs)
    got = theory.ledger_measured("scale", xs[0], lr=lr, dot_theta_update=np.array(dots), update_sq=np.array(usq))
    assert mass_rel(got, xs) <= 1e-12
    q = theory.ledger_measured("translation", w.sum(1) * 0 + 1.0, lr=lr, update_sum=np.array(sums))
    assert q.shape == (201, G)
