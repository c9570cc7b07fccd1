"""verify: prove (or refute) claimed symmetry groups with the model's own gradients.

For every group the geometric constraint of docs/theory.md §3 is measured on one batch:
the gradient constraint from one backward pass and, on request, the Hessian constraint from
Hessian-vector products (double backward). A true group gives ~1e-7 in float32, a false claim
O(1); BatchNorm's epsilon breaks scale groups by about eps / (sigma^2 + eps), which is predicted
from the normaliser's input (captured with a forward hook) and reported next to the residual.
"""

from __future__ import annotations

import math
from typing import Any

import torch

from .errors import InvalidArgumentError
from .symmetries import Symmetries, SymmetryGroup, find_symmetries
from .symmetries.discover import module_name
from .tracking.plan import gradient_layer

# "No gradient" (docs/theory.md §3): |ĝ_A| ≤ NO_GRADIENT_REL·|ĝ_L|, where L is the group's layer
# (tracking.plan.gradient_layer: its first part's module) and |ĝ_L|² the |ĝ|² of every part of
# every group in that module added up.
# The tracker's residual column applies the same rule, squared (src/tracking/mod.rs, NO_GRADIENT).
NO_GRADIENT_REL = 1e-5


def _as_args(inputs: Any) -> tuple:
    return inputs if isinstance(inputs, tuple) else (inputs,)


def _eps_prediction(kind: str, module: torch.nn.Module, x: torch.Tensor, eps: float) -> torch.Tensor:
    """eps / (sigma^2 + eps) per channel of x (BatchNorm, InstanceNorm, GroupNorm) or as a scalar."""
    if eps is None:  # RMSNorm's default: the machine epsilon of the input's dtype
        eps = torch.finfo(x.dtype).eps
    x = x.detach().double()
    if kind == "BatchNorm":
        c = x.shape[1]
        var = x.transpose(0, 1).reshape(c, -1).var(dim=1, unbiased=False)
        return eps / (var + eps)
    if kind == "InstanceNorm":
        n, c = x.shape[:2]
        var = x.reshape(n, c, -1).var(dim=2, unbiased=False)
        return (eps / (var + eps)).mean(dim=0)
    if kind == "GroupNorm":
        n, c = x.shape[:2]
        groups = int(getattr(module, "num_groups", 1))
        var = x.reshape(n, groups, -1).var(dim=2, unbiased=False)
        return (eps / (var + eps)).mean(dim=0).repeat_interleave(c // groups)
    k = len(getattr(module, "normalized_shape", (x.shape[-1],)))
    flat = x.reshape(-1, math.prod(x.shape[x.dim() - k:]))
    s2 = flat.pow(2).mean(dim=1) if kind == "RMSNorm" else flat.var(dim=1, unbiased=False)
    return (eps / (s2 + eps)).mean().reshape(1)


def verify(model: torch.nn.Module, loss_fn, data, symmetries: Symmetries | None = None,
           hessian: bool = False, tol: float = 1e-5, output: str = "logits", class_axis: int = 1):
    """Per group, the normalised constraint residuals of docs/theory.md §3, as a DataFrame.

    ``data`` is ``(inputs, targets)``; the loss is ``loss_fn(model(*inputs), targets)`` (a model
    returning a Hugging Face ``ModelOutput`` hands it whole to ``loss_fn``). With
    ``symmetries=None`` the groups are discovered from ``inputs`` (``output`` and ``class_axis``
    are passed on).
    Columns: layer, symmetry, index, label, residual (gradient constraint), status ("ok",
    "no gradient", "BatchNorm ε" (or the epsilon of another normaliser), "violated"),
    predicted (eps / (sigma^2 + eps) where a normaliser's epsilon breaks the group),
    hessian_residual (NaN unless ``hessian=True``) and grad_norm. The model runs in its current
    mode; its parameters, gradients, buffers and mode are unchanged afterwards.
    """
    import pandas as pd

    if not (isinstance(data, (tuple, list)) and len(data) == 2):
        raise InvalidArgumentError("data must be a pair (inputs, targets)")
    inputs, targets = data
    if symmetries is None:
        symmetries = find_symmetries(model, inputs, output=output, class_axis=class_axis)
    groups = list(symmetries)
    params = dict(model.named_parameters())
    for g in groups:
        for name, _, _ in g.parts:
            if name not in params:
                raise InvalidArgumentError(f"group {g.layer}/{g.index}: {name!r} is not a parameter of the model")
    names = [n for n, p in params.items() if p.requires_grad]
    plist = [params[n] for n in names]
    modules = dict(model.named_modules())
    buffers = {k: b.detach().clone() for k, b in model.named_buffers()}

    captured: dict[str, torch.Tensor] = {}
    hooks = []
    wanted = {n[0] for g in groups for n in g.normalizers if n[0] is not None and n[0] in modules}
    for mod_name in wanted:
        def hook(mod, args, out, _name=mod_name):
            if args and isinstance(args[0], torch.Tensor):
                captured[_name] = args[0].detach()
        hooks.append(modules[mod_name].register_forward_hook(hook))
    try:
        with torch.enable_grad():
            out = model(*_as_args(inputs))
            loss = loss_fn(out, targets)
            grads_t = torch.autograd.grad(loss, plist, create_graph=hessian, allow_unused=True)
        grads = {n: (torch.zeros_like(p) if gr is None else gr) for n, p, gr in zip(names, plist, grads_t)}
        preds = {}
        for g in groups:
            for mod_name, kind, _, eps in g.normalizers:
                if mod_name in captured and (mod_name, kind) not in preds:
                    preds[(mod_name, kind)] = _eps_prediction(kind, modules[mod_name], captured[mod_name], eps)
        sums = _Sums(params, grads)
        partial = [_gradient_sums(g, sums) for g in groups]
        layers = [gradient_layer(g) for g in groups]
        layer_sq: dict[str, float] = {}  # every part in a layer counts, whichever its group
        for g in groups:
            for name, idx, _ in g.parts:
                m = module_name(name)
                layer_sq[m] = layer_sq.get(m, 0.0) + sums.part(name, idx)[0]["gg"]
        rows = []
        for g, layer, part in zip(groups, layers, partial):
            row = _gradient_row(g, part, layer_sq[layer], preds, tol)
            if hessian:
                row["hessian_residual"] = _hessian_residual(g, names, plist, params, grads_t, grads) \
                    if row["status"] != "no gradient" else math.nan
            rows.append(row)
    finally:
        for h in hooks:
            h.remove()
        with torch.no_grad():
            for k, b in model.named_buffers():
                if k in buffers:
                    b.copy_(buffers[k])
    cols = ["layer", "symmetry", "index", "label", "residual", "status", "predicted", "hessian_residual",
            "grad_norm"]
    return pd.DataFrame(rows, columns=cols)


class _Sums:
    """Per-row and per-column float64 sums of g*theta, g^2, theta^2 and g for each tensor.

    Each part of a group is then a lookup (rows, columns, column blocks, whole tensors), so
    verifying tens of thousands of groups costs a few passes over the parameters, not one
    indexing operation per part.
    """

    KEYS = ("gt", "gg", "tt", "g")

    def __init__(self, params, grads):
        self.params, self.grads = params, grads
        self.rows: dict[str, dict] = {}
        self.cols: dict[str, dict] = {}

    def _fields(self, th: torch.Tensor, gr: torch.Tensor) -> dict[str, torch.Tensor]:
        # products in the tensor's own dtype (one rounding each), every sum in float64
        th, gr = th.detach(), gr.detach()
        if th.dtype not in (torch.float32, torch.float64):
            th, gr = th.float(), gr.float()
        return {"gt": gr * th, "gg": gr * gr, "tt": th * th, "g": gr}

    def _ensure(self, name: str) -> None:
        if name in self.rows:
            return
        f = self._fields(self.params[name], self.grads[name])
        d = torch.float64
        if f["g"].dim() == 0:
            f = {k: v.reshape(1) for k, v in f.items()}
        self.rows[name] = {k: (v.reshape(v.shape[0], -1).sum(1, dtype=d) if v.dim() > 1 else v.to(d)).cpu().numpy()
                           for k, v in f.items()}
        self.cols[name] = {k: v.reshape(v.shape[0], v.shape[1], -1).sum((0, 2), dtype=d).cpu().numpy()
                           for k, v in f.items()} if f["g"].dim() > 1 else {}

    def part(self, name: str, idx: tuple) -> tuple[dict[str, float], int]:
        self._ensure(name)
        shape = self.params[name].shape
        rest = math.prod(shape[2:]) if len(shape) > 2 else 1
        if len(idx) == 1 and isinstance(idx[0], int):
            return {k: float(v[idx[0]]) for k, v in self.rows[name].items()}, math.prod(shape[1:])
        if len(idx) == 1:
            return {k: float(v.sum()) for k, v in self.rows[name].items()}, math.prod(shape)
        if idx[0] == slice(None):
            sel = idx[1]
            width = 1 if isinstance(sel, int) else sel.stop - sel.start
            return ({k: float(v[sel].sum()) for k, v in self.cols[name].items()},
                    shape[0] * width * rest)
        f = self._fields(self.params[name][idx], self.grads[name][idx])
        return {k: float(v.sum(dtype=torch.float64)) for k, v in f.items()}, f["g"].numel()


def _gradient_sums(g: SymmetryGroup, sums: _Sums) -> tuple[float, float, float, int]:
    """(numerator, denominator, |ĝ_A|², |A|) of a group's gradient residual (docs/theory.md §3)."""
    num = den = gsq = 0.0
    count = 0
    for name, idx, sign in g.parts:
        s, n = sums.part(name, idx)
        gsq += s["gg"]
        count += n
        if g.symmetry == "translation":
            num += sign * s["g"]  # a signed translation moves its −1 parts by −c
        else:
            num += sign * s["gt"]
            den += math.sqrt(s["gg"] * s["tt"])
    return num, den, gsq, count


def _gradient_row(g: SymmetryGroup, partial: tuple[float, float, float, int], layer_sq: float, preds, tol) -> dict[str, Any]:
    num, den, gsq, count = partial
    gnorm = math.sqrt(gsq)
    row = {"layer": g.layer, "symmetry": g.symmetry, "index": g.index, "label": g.label,
           "residual": math.nan, "status": "no gradient", "predicted": math.nan,
           "hessian_residual": math.nan, "grad_norm": gnorm}
    pred = [float(preds[(m, k)][list(ch)].max()) if len(preds[(m, k)]) > 1 and ch else float(preds[(m, k)].max())
            for m, k, ch, _ in g.normalizers if (m, k) in preds]
    kinds = [k for m, k, _, _ in g.normalizers if (m, k) in preds]
    if pred:
        row["predicted"] = max(pred)
    if gnorm == 0.0 or gnorm <= NO_GRADIENT_REL * math.sqrt(layer_sq):
        return row
    if g.symmetry != "translation" and den == 0.0:
        return row  # every part has zero gradient or zero weights (a zero-initialised head): nothing to measure
    if g.symmetry == "translation":
        res = abs(num) / (math.sqrt(count) * gnorm)
    else:
        res = abs(num) / den if den > 0 else math.nan
    row["residual"] = res
    if res <= tol:
        row["status"] = "ok"
    elif pred and res <= 10 * max(pred):
        row["status"] = f"{kinds[pred.index(max(pred))]} ε"
    else:
        row["status"] = "violated"
    return row


def _hessian_residual(g: SymmetryGroup, names, plist, params, grads_t, grads) -> float:
    """|H v + m*g| / (|H v| + |m*g|) with v = m*theta (scale, rescale), or |H 1_A| / (sqrt|A| |H r_A|)."""
    mask = {n: torch.zeros_like(params[n]) for n in {p[0] for p in g.parts}}
    for name, idx, sign in g.parts:
        mask[name][idx] += sign
    support = {n: (m != 0).to(m.dtype) for n, m in mask.items()}
    usable = [i for i, gr in enumerate(grads_t) if gr is not None and gr.requires_grad]

    def hvp(vec: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        outs = [grads_t[i] for i in usable]
        vs = [vec.get(names[i], torch.zeros_like(plist[i])) for i in usable]
        res = torch.autograd.grad(outs, [plist[i] for i in usable], grad_outputs=vs, retain_graph=True,
                                  allow_unused=True)
        return {names[i]: (torch.zeros_like(plist[i]) if r is None else r.detach())
                for i, r in zip(usable, res)}

    def norm(d: dict[str, torch.Tensor]) -> float:
        return math.sqrt(sum(float(t.double().pow(2).sum()) for t in d.values()))

    if g.symmetry == "translation":
        h1 = hvp({n: m.detach() for n, m in mask.items()})  # the signed generator
        gen = torch.Generator().manual_seed(0)
        r = {n: torch.randn(m.shape, generator=gen, dtype=m.dtype).to(m.device) * m for n, m in support.items()}
        rn = norm(r)
        h2 = hvp({n: t / rn for n, t in r.items()})
        size = sum(float(m.sum()) for m in support.values())
        d = math.sqrt(size) * norm(h2)
        return norm(h1) / d if d > 0 else math.nan
    hv = hvp({n: (m * params[n].detach()) for n, m in mask.items()})
    mg = {n: m * grads[n].detach() for n, m in mask.items()}
    total = {n: hv[n].clone() for n in hv}
    for n, t in mg.items():
        total[n] = total.get(n, torch.zeros_like(t)) + t
    d = norm(hv) + norm(mg)
    return norm(total) / d if d > 0 else math.nan
