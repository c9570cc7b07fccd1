"""The SGD bookkeeping of tests/sgd_reference.py against what torch.optim.SGD really does, and the
tracker's native core (src/tracking/algebra.rs) against it."""

import numpy as np
import pytest
import torch

from neural_mechanics import _native, group_stats

from sgd_reference import PartSums, step_quantities


def rust_core(n):
    """A native core over n translation parts, one row each, each its own column and group (a
    translation part also reads ⟨1, b⟩, so every per-part quantity is exercised)."""
    idx = np.arange(n, dtype=np.int64)
    plan = {
        "part_row_starts": np.arange(n + 1, dtype=np.int64), "part_rows": idx, "part_sign": np.ones(n), "part_column": idx,
        "part_size": np.ones(n), "column_group": idx, "column_param_group": np.zeros(n, dtype=np.int64),
        "group_kind": np.zeros(n, dtype=np.int64), "group_size": np.ones(n), "extra_rows": idx, "rows": n,
    }  # fmt: skip
    return _native.TrackerCore(plan, sgd=True, every=1)


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
        core = rust_core(6)
        extra = None if bsum is None else np.column_stack([bsum, np.zeros(6)])
        core.step_sgd(0, np.ascontiguousarray(rows), extra, [(0.1, cfg["momentum"], cfg["dampening"], cfg["weight_decay"], cfg["nesterov"])])
        cols = core.last_columns()
        field = {name: j for j, name in enumerate(_native.COLUMN_FIELDS)}
        for name, want in (("update_sq", "uu"), ("update_sum", "su"), ("drive", "drive")):
            np.testing.assert_allclose(cols[:, field[name]], getattr(q, want), rtol=1e-12, atol=1e-300)
        if cfg["nesterov"]:
            np.testing.assert_allclose(cols[:, field["update_dot"]], q.e, rtol=1e-12)
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
