"""The SGD bookkeeping of tracking/sgd.py against what torch.optim.SGD really does."""

import numpy as np
import pytest
import torch

from neural_mechanics import group_stats
from neural_mechanics.tracking.sgd import PartSums, step_quantities


def rust_core(n, translation):
    """A plan of n parts, one row each, each its own column and group."""
    from neural_mechanics import _native

    idx = np.arange(n, dtype=np.int64)
    flag = np.full(n, int(translation), dtype=np.int64)
    return _native.TrackerPlan(np.arange(n + 1, dtype=np.int64), idx, np.ones(n), flag, idx, idx, np.ones(n), idx, flag, np.ones(n))


CONFIGS = [
    dict(momentum=0.0, dampening=0.0, weight_decay=1e-2, nesterov=False),
    dict(momentum=0.0, dampening=0.5, weight_decay=0.0, nesterov=False),  # dampening ignored without momentum
    dict(momentum=0.9, dampening=0.0, weight_decay=5e-3, nesterov=False),
    dict(momentum=0.9, dampening=0.3, weight_decay=5e-3, nesterov=False),
    dict(momentum=0.8, dampening=0.0, weight_decay=5e-3, nesterov=True),
]


@pytest.mark.parametrize("cfg", CONFIGS)
def test_step_quantities_match_the_applied_update(cfg):
    torch.manual_seed(0)
    w = torch.nn.Parameter(torch.randn(6, 5, dtype=torch.float64))
    opt = torch.optim.SGD([w], lr=0.1, **cfg)
    for _ in range(5):
        opt.zero_grad()
        loss = (torch.tanh(w @ torch.randn(5, 3, dtype=torch.float64)) ** 2).sum()
        loss.backward()
        buf = opt.state.get(w, {}).get("momentum_buffer")
        theta0 = w.detach().clone()
        st = group_stats(w, w.grad, buf) if buf is not None else group_stats(w, w.grad)
        bsum = group_stats(buf)["sum_theta"] if buf is not None else None
        rows = np.column_stack([st[k] for k in st])
        sums = PartSums.from_rows(rows, bsum)
        h = {k: np.full(6, float(v)) for k, v in cfg.items()}
        q = step_quantities(sums, h["momentum"], h["dampening"], h["weight_decay"], h["nesterov"].astype(bool))
        # The tracker's Rust path (one part per row, each its own column and group) agrees.
        core = rust_core(6, translation=False)
        cols, _ = core.measure_sgd(np.ascontiguousarray(rows), None if bsum is None else np.ascontiguousarray(bsum), *(np.asarray(h[k], dtype=float) for k in ("momentum", "dampening", "weight_decay", "nesterov")))
        for j, name in ((3, "uu"), (6, "su"), (5, "drive")):
            np.testing.assert_allclose(cols[:, j], getattr(q, name), rtol=1e-12, atol=1e-300)
        if cfg["nesterov"]:
            np.testing.assert_allclose(cols[:, 4], q.e, rtol=1e-12)
        opt.step()
        u = ((theta0 - w.detach()) / 0.1).numpy()
        th = theta0.numpy()
        np.testing.assert_allclose(q.uu, (u * u).sum(1), rtol=1e-10, atol=1e-12)
        np.testing.assert_allclose(q.tu, (th * u).sum(1), rtol=1e-10, atol=1e-12)
        np.testing.assert_allclose(q.su, u.sum(1), rtol=1e-10, atol=1e-12)
        if cfg["momentum"] > 0:
            b = opt.state[w]["momentum_buffer"].numpy()
            np.testing.assert_allclose(q.drive, (b * b).sum(1), rtol=1e-10)
            np.testing.assert_allclose(q.e, (u * b).sum(1), rtol=1e-10, atol=1e-12)
        else:
            np.testing.assert_allclose(q.drive, st["sumsq_grad"], rtol=1e-12)
