"""A brute-force gradient oracle that knows nothing of the architecture.

For small float64 models with randomised normaliser affines and biases (so that clipping
activations really clip), it tests every weight row, weight column / column block, whole tensor
and (row of one tensor [+ the same row of a tensor of the same length], column or column block of
another) pair against the gradient constraints of docs/theory.md §3 on several random batches.
Every group the oracle finds true must be claimed by find_symmetries (up to unions of claims and
entries without gradient), and every claim must hold.
"""


import numpy as np
import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

import neural_mechanics as nm

TOL = 1e-8


def randomise(model, bias_std=0.5, gain=1.0):
    torch.manual_seed(1)
    with torch.no_grad():
        for m in model.modules():
            if hasattr(m, "eps"):
                m.eps = 1e-12  # epsilon breaks scale symmetry by ~eps/var: keep it below TOL
            if isinstance(m, (nn.BatchNorm1d, nn.BatchNorm2d, nn.LayerNorm, nn.GroupNorm)) and m.weight is not None:
                m.weight.uniform_(0.5, 1.5)
            if getattr(m, "bias", None) is not None:
                m.bias.normal_(0, bias_std)
            if isinstance(m, (nn.Linear, nn.Conv2d)):
                m.weight.mul_(gain)
    return model.double()


def entries(name, shape, index):
    """Flat entry ids of param[index] as a set of (name, flat index)."""
    ids = torch.arange(int(np.prod(shape))).reshape(shape)[index]
    return {(name, int(i)) for i in ids.flatten()}


def candidates(params):
    """Rows (+ a same-length companion's row), columns, column blocks and whole tensors."""
    rows, cols, wholes = [], [], []
    names = list(params)
    for n in names:
        p = params[n]
        wholes.append([(n, (slice(None),))])
        for i in range(p.shape[0]):
            rows.append([(n, (i,))])
            for q in names:
                if q != n and params[q].shape[0] == p.shape[0] and q > n:
                    rows.append([(n, (i,)), (q, (i,))])
        for q in names:
            if q > n and params[q].shape[0] == p.shape[0]:
                wholes.append([(n, (slice(None),)), (q, (slice(None),))])
        if p.dim() >= 2:
            c = p.shape[1]
            for b in [b for b in range(1, c) if c % b == 0]:
                for j in range(c // b):
                    cols.append([(n, (slice(None), j if b == 1 else slice(j * b, (j + 1) * b)))])
    return rows, cols, wholes


def measure(model, batches, params, sets):
    """Per batch and set: <g,theta>, <g,1>, |g|, |theta|, size."""
    out = []
    for x, y in batches:
        loss = F.cross_entropy(model(x), y)
        grads = dict(zip(params, torch.autograd.grad(loss, list(params.values()), allow_unused=True)))
        grads = {n: torch.zeros_like(params[n]) if g is None else g for n, g in grads.items()}
        scale = max(float(g.norm()) for g in grads.values())
        rows = []
        for s in sets:
            th = torch.cat([params[n].detach()[i].flatten() for n, i in s])
            gr = torch.cat([grads[n][i].flatten() for n, i in s])
            rows.append((float(gr @ th), float(gr.sum()), float(gr.norm()), float(th.norm()), gr.numel()))
        out.append((np.array(rows), scale))
    return out


def oracle(model, batches):
    params = dict(model.named_parameters())
    rows, cols, wholes = candidates(params)
    allsets = rows + cols + wholes
    stats = measure(model, batches, params, allsets)
    true = []
    nonzero_any = np.zeros(len(allsets), bool)
    trans_ok = np.ones(len(allsets), bool)
    scale_ok = np.ones(len(allsets), bool)
    for a, scale in stats:
        gt, g1, ng, nt, size = a.T
        nz = ng > 1e-10 * scale
        nonzero_any |= nz
        trans_ok &= ~nz | (np.abs(g1) <= TOL * np.sqrt(size) * ng)
        scale_ok &= ~nz | (np.abs(gt) <= TOL * ng * nt)
    for k, s in enumerate(allsets):
        if nonzero_any[k] and trans_ok[k]:
            true.append(("translation", [(n, i, 1) for n, i in s]))
        if nonzero_any[k] and scale_ok[k]:
            true.append(("scale", [(n, i, 1) for n, i in s]))
    # rescale pairs: a row set u against a column set v of another tensor
    nu, nv = len(rows), len(cols)
    ok = np.ones((nu, nv), bool)
    nz_any = np.zeros((nu, nv), bool)
    trivial = (scale_ok | ~nonzero_any)
    for a, scale in stats:
        gt, _, ng, nt, _ = a.T
        su, sv = gt[:nu], gt[nu:nu + nv]
        au, av = (ng * nt)[:nu], (ng * nt)[nu:nu + nv]
        nz = (ng[:nu, None] > 1e-10 * scale) | (ng[None, nu:nu + nv] > 1e-10 * scale)
        nz_any |= nz
        ok &= ~nz | (np.abs(su[:, None] - sv[None, :]) <= TOL * (au[:, None] + av[None, :]))
    for u, v in zip(*np.nonzero(ok & nz_any)):
        if trivial[u] and trivial[nu + v]:
            continue  # two groups that are each scale invariant: implied, not a new group
        if {n for n, _ in rows[u]} & {n for n, _ in cols[v]}:
            continue
        true.append(("rescale", [(n, i, 1) for n, i in rows[u]] + [(n, i, -1) for n, i in cols[v]]))
    return true, stats, allsets


def zero_grad_entries(model, batches):
    params = dict(model.named_parameters())
    acc = {n: torch.zeros_like(p) for n, p in params.items()}
    scale = 0.0
    for x, y in batches:
        gs = torch.autograd.grad(F.cross_entropy(model(x), y), list(params.values()), allow_unused=True)
        for n, g in zip(params, gs):
            if g is not None:
                acc[n] += g.abs()
                scale = max(scale, float(g.norm()))
    return {(n, int(i)) for n, a in acc.items() for i in torch.nonzero(a.flatten() <= 1e-10 * scale).flatten()}


def check_oracle(model, make_batch, n_batches=3, bias_std=0.5, gain=1.0):
    model = randomise(model, bias_std, gain)
    torch.manual_seed(2)
    batches = [make_batch() for _ in range(n_batches)]
    params = dict(model.named_parameters())
    shapes = {n: tuple(p.shape) for n, p in params.items()}
    sym = nm.find_symmetries(model, batches[0][0])
    # every claim holds on every batch
    for x, y in batches:
        df = nm.verify(model, F.cross_entropy, (x, y), symmetries=sym, tol=1e-7)
        assert set(df.status) <= {"ok", "no gradient"}, df[df.status != "ok"].to_string()
    zero = zero_grad_entries(model, batches)
    claims = {}
    for g in sym:
        ent = set()
        for n, idx, sign in g.parts:
            ent |= {(e, sign) for e in entries(n, shapes[n], idx)}
        claims.setdefault(g.symmetry, []).append({(e, s) for e, s in ent if e not in zero})
    true, _, _ = oracle(model, batches)
    missing = []
    for symmetry, parts in true:
        want = set()
        for n, idx, sign in parts:
            want |= {(e, sign) for e in entries(n, shapes[n], idx) if e not in zero}
        if not want:
            continue
        union = set().union(*[c for c in claims.get(symmetry, []) if c and c <= want] or [set()])
        if union != want:
            missing.append((symmetry, parts))
    assert not missing, f"{len(missing)} oracle groups not claimed, e.g. {missing[:3]}"
    return sym, true


def classification(shape, classes=3, n=8, scale=1.0):
    return lambda: (scale * torch.randn(n, *shape, dtype=torch.float64), torch.randint(0, classes, (n,)))


def test_oracle_relu_mlp():
    m = nn.Sequential(nn.Linear(4, 5), nn.ReLU(), nn.Linear(5, 4), nn.LeakyReLU(0.2), nn.Linear(4, 3))
    sym, true = check_oracle(m, classification((4,)))
    assert len([t for t in true if t[0] == "rescale"]) == 9 and len(sym) > 0


def test_oracle_conv_bn_flatten():
    m = nn.Sequential(nn.Conv2d(2, 3, 3, padding=1), nn.BatchNorm2d(3), nn.ReLU(), nn.MaxPool2d(2),
                      nn.Conv2d(3, 2, 3, padding=1), nn.ReLU(), nn.Flatten(), nn.Linear(2 * 3 * 3, 3))
    check_oracle(m, classification((2, 6, 6)))


def test_oracle_layernorm_groupnorm():
    m = nn.Sequential(nn.Linear(4, 6), nn.LayerNorm(6), nn.ReLU(), nn.Linear(6, 4), nn.ReLU(), nn.Linear(4, 3))
    check_oracle(m, classification((4,)))
    m = nn.Sequential(nn.Conv2d(2, 4, 3), nn.GroupNorm(2, 4), nn.ReLU(), nn.AdaptiveAvgPool2d(1),
                      nn.Flatten(), nn.Linear(4, 3))
    check_oracle(m, classification((2, 5, 5)))


class Residual(nn.Module):
    def __init__(self):
        super().__init__()
        self.a, self.b, self.c = nn.Linear(4, 4), nn.Linear(4, 4), nn.Linear(4, 3)

    def forward(self, x):
        return self.c(F.relu(self.b(F.relu(self.a(x))) + x))


@pytest.mark.parametrize("act", [nn.ReLU6, nn.GELU])
def test_oracle_negative_cases(act):
    # one hidden layer: behind a first ReLU6 a unit whose weights keep it below 6 for every input
    # in [0, 6] would be a genuine (local) ReLU unit
    m = nn.Sequential(nn.Linear(4, 5), act(), nn.Linear(5, 3))
    # inputs large enough that ReLU6 really clips (else it is a ReLU on these batches)
    sym, true = check_oracle(m, classification((4,), n=64, scale=20.0), bias_std=5.0, gain=2.0)
    assert not [t for t in true if t[0] != "translation"]
    sym, true = check_oracle(Residual(), classification((4,)))
    assert not [t for t in true if t[0] == "rescale" and t[1][0][0].startswith("b")]
