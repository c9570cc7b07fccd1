"""Hand-written normalisers, recognised in the recorded graph and folded into one norm call.

Llama-style models write RMSNorm by hand, ``w * (x * rsqrt(mean(x², -1) + ε))``, and some models
LayerNorm, ``w * (x − mean(x)) / sqrt(var(x) + ε) + b``. Both count as normalisers
(docs/theory.md §2b): the chain of ops is replaced by one ``rms_norm`` / ``layer_norm`` call with
the same input, output, affine parameters and ε, so the analysis reads them like
``F.rms_norm`` / ``F.layer_norm``. A chain whose intermediate values are used elsewhere is left
alone.
"""

from __future__ import annotations

from .graph import Call, Graph

_IDENTITY = {"to", "float", "type", "type_as", "contiguous", "clone", "double", "half", "bfloat16"}


def _root(g: Graph, vid: int) -> int:
    """The value before any identity-like conversion (``.to(float32)``)."""
    while True:
        p = g.producer(vid)
        if p is None or p.op not in _IDENTITY or not p.inputs or p.inputs[0] == vid:
            return vid
        vid = p.inputs[0]


def _prod(g: Graph, vid: int | None, *ops: str) -> Call | None:
    if vid is None:
        return None
    p = g.producer(vid)
    return p if p is not None and p.op in ops else None


def _scalar(c: Call) -> float | None:
    v = c.attrs.get("other", (c.attrs.get("args") or (None,))[0])
    return float(v) if isinstance(v, (int, float)) and not isinstance(v, bool) else None


def _tensor_inputs(g: Graph, c: Call) -> list[int]:
    return [i for i in c.inputs if g.values[i].floating]


def _trailing_dims(g: Graph, c: Call, vid: int) -> tuple[int, ...] | None:
    """The normalised shape when ``c`` is a mean over the trailing axes with keepdim."""
    nd = len(g.values[vid].shape)
    dims = c.attrs.get("dim", (c.attrs.get("args") or (None,))[0])
    if dims is None or not c.attrs.get("keepdim", False):
        return None
    dims = sorted(d + nd if d < 0 else d for d in (dims if isinstance(dims, (tuple, list)) else (dims,)))
    if dims != list(range(nd - len(dims), nd)):
        return None
    return tuple(g.values[vid].shape[nd - len(dims):])


def _mean_square(g: Graph, vid: int) -> tuple[int, tuple[int, ...], list[Call]] | None:
    """``vid`` = mean(x², trailing, keepdim) -> (root of x, normalised shape, the calls)."""
    m = _prod(g, vid, "mean")
    if m is None:
        return None
    sq = _prod(g, m.inputs[0], "pow", "mul", "square")
    if sq is None:
        return None
    ins = _tensor_inputs(g, sq)
    if sq.op == "pow" and (_scalar(sq) != 2.0 or len(ins) != 1):
        return None
    if sq.op == "mul" and (len(sq.inputs) != 2 or _root(g, sq.inputs[0]) != _root(g, sq.inputs[1])):
        return None
    shape = _trailing_dims(g, m, sq.inputs[0])
    if shape is None:
        return None
    return _root(g, sq.inputs[0]), shape, [m, sq]


def _variance(g: Graph, vid: int) -> tuple[int, tuple[int, ...], list[Call], str] | None:
    """``vid`` = var + ε under rsqrt / sqrt -> (root of x, normalised shape, calls, kind)."""
    calls: list[Call] = []
    add = _prod(g, vid, "add")
    if add is None or _scalar(add) is None or len(_tensor_inputs(g, add)) != 1:
        return None
    calls.append(add)
    inner = add.inputs[0]
    ms = _mean_square(g, inner)
    if ms is not None:
        x, shape, more = ms
        sub = _prod(g, x, "sub")
        if sub is not None and len(sub.inputs) == 2:  # mean((x - mean(x))²): LayerNorm's variance
            mu = _prod(g, sub.inputs[1], "mean")
            if mu is not None and _root(g, mu.inputs[0]) == _root(g, sub.inputs[0]) \
                    and _trailing_dims(g, mu, mu.inputs[0]) == shape:
                return x, shape, calls + more, "layer_norm"
        return x, shape, calls + more, "rms_norm"
    var = _prod(g, inner, "var")
    if var is not None:
        unbiased = var.attrs.get("unbiased", var.attrs.get("correction", 1))
        if unbiased in (False, 0):
            nd = len(g.values[var.inputs[0]].shape)
            dims = var.attrs.get("dim", (var.attrs.get("args") or (None,))[0])
            if dims is not None and var.attrs.get("keepdim", False):
                dl = sorted(d + nd if d < 0 else d for d in (dims if isinstance(dims, (tuple, list)) else (dims,)))
                if dl == list(range(nd - len(dl), nd)):
                    return _root(g, var.inputs[0]), tuple(g.values[var.inputs[0]].shape[nd - len(dl):]), \
                        calls + [var], "layer_norm_var"
    return None


def fold_handwritten_norms(g: Graph) -> None:
    """Replace every recognised hand-written RMSNorm / LayerNorm chain by one norm call."""
    for call in list(g.calls.values()):
        if call.op not in ("mul", "div") or len(call.inputs) != 2 or call.id not in g.calls:
            continue
        found = _match(g, call)
        if found is not None:
            _fold(g, *found)


def _match(g: Graph, y: Call):
    a, b = y.inputs
    for x, other in ((a, b), (b, a)) if y.op == "mul" else ((a, b),):
        if y.op == "mul":
            r = _prod(g, other, "rsqrt")
            if r is None:
                r_in = None
            else:
                r_in = r.inputs[0]
            extra = [r] if r is not None else []
        else:
            s = _prod(g, other, "sqrt")
            r_in = s.inputs[0] if s is not None else None
            extra = [s] if s is not None else []
        if r_in is None:
            continue
        v = _variance(g, r_in)
        if v is None:
            continue
        xr, shape, calls, kind = v
        eps = _scalar(calls[0])
        if kind == "rms_norm":
            if _root(g, x) != xr:
                continue
            return y, _root(g, x), x, "rms_norm", shape, eps, calls + extra
        # LayerNorm: y = (x - mean(x)) * rsqrt(var + eps)
        sub = _prod(g, x, "sub")
        if sub is None or len(sub.inputs) != 2:
            continue
        mu = _prod(g, sub.inputs[1], "mean")
        if mu is None or _root(g, mu.inputs[0]) != _root(g, sub.inputs[0]) or _trailing_dims(g, mu, mu.inputs[0]) != shape:
            continue
        if kind == "layer_norm" and _root(g, xr) != _root(g, x):
            continue
        if kind == "layer_norm_var" and xr != _root(g, sub.inputs[0]):
            continue
        return y, _root(g, sub.inputs[0]), sub.inputs[0], "layer_norm", shape, eps, calls + extra + [sub, mu]
    return None


def _single_live_consumer(g: Graph, vid: int) -> Call | None:
    cons = g.values[vid].consumers
    return g.calls[cons[0]] if len(cons) == 1 else None


def _fold(g: Graph, y: Call, root: int, x: int, kind: str, shape: tuple[int, ...], eps: float | None,
          internal: list[Call]) -> None:
    # the intermediate values may feed nothing but the chain
    chain = {c.id for c in internal} | {y.id}
    for c in internal:
        for o in c.outputs:
            if any(k not in chain for k in g.values[o].consumers):
                return
    # optional affine: (identity-like)* then mul by a parameter of the normalised shape, then + bias
    last = y
    out = y.outputs[0]
    weight = bias = None
    hops: list[Call] = []
    cur = out
    while True:
        nxt = _single_live_consumer(g, cur)
        if nxt is None:
            break
        if nxt.op in _IDENTITY and nxt.inputs[0] == cur:
            hops.append(nxt)
            cur = nxt.outputs[0]
            continue
        if nxt.op == "mul" and weight is None and len(nxt.inputs) == 2:
            w = next((i for i in nxt.inputs if i != cur), None)
            if w is not None and g.values[w].kind == "param" and tuple(g.values[w].shape) == shape:
                weight = w
                hops.append(nxt)
                last, cur = nxt, nxt.outputs[0]
                continue
        if nxt.op == "add" and weight is not None and bias is None and kind == "layer_norm" and len(nxt.inputs) == 2:
            b = next((i for i in nxt.inputs if i != cur), None)
            if b is not None and g.values[b].kind == "param" and tuple(g.values[b].shape) == shape:
                bias = b
                hops.append(nxt)
                last, cur = nxt, nxt.outputs[0]
        break
    if weight is None:
        hops, last = [], y
    else:
        hops = hops[: hops.index(last) + 1]
    removed = chain | {h.id for h in hops if h.id != last.id}
    if last.id != y.id:
        removed.add(y.id)
    removed.discard(last.id)
    roles = {"input": x}
    if weight is not None:
        roles["weight"] = weight
    if bias is not None:
        roles["bias"] = bias
    inputs = [x] + ([weight] if weight is not None else []) + ([bias] if bias is not None else [])
    norm = Call(last.id, kind, f"handwritten_{kind}", inputs, roles,
                {"normalized_shape": shape, "eps": eps, "handwritten": True}, [last.outputs[0]])
    g.calls[last.id] = norm
    for cid in removed:
        dead = g.calls.pop(cid, None)
        if dead is None:
            continue
        for i in dict.fromkeys(dead.inputs):
            cons = g.values[i].consumers
            if cid in cons:
                cons.remove(cid)
    for i in dict.fromkeys(inputs):
        cons = g.values[i].consumers
        cons[:] = sorted(set(cons) | {last.id})
    for name in list(g.param_uses):
        uses = [u for u in g.param_uses[name] if u not in removed]
        g.param_uses[name] = uses
    for p in (weight, bias):
        leaf = g.values[p].name if p is not None else None
        if leaf is not None:
            g.param_uses[leaf] = sorted(set(g.param_uses.get(leaf, [])) | {last.id})
