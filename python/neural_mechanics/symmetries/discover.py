"""find_symmetries: trace the model, then turn every layer's absorbed perturbations into groups."""

from __future__ import annotations

import gc
import re
from collections.abc import Mapping
from typing import Any

import torch

from ..errors import InvalidArgumentError
from .graph import Call, Graph
from .groups import Symmetries, SymmetryGroup
from .propagate import Broken, Loc, Outcome, Propagator
from .trace import trace

_LAYERS = ("linear", "conv1d", "conv2d", "conv3d")
_NORMS = ("batch_norm", "instance_norm", "group_norm", "layer_norm", "rms_norm")


def module_name(param: str) -> str:
    """The module a parameter belongs to ("features.0.weight" -> "features.0")."""
    stripped = re.sub(r"\.parametrizations\.weight\.original\d?$", "", param)
    if stripped != param:
        return stripped
    return param.rsplit(".", 1)[0] if "." in param else param


def _spectral_leaves(model: torch.nn.Module) -> set[str]:
    """Names of the trained leaves of spectral-normalised weights (new and legacy API)."""
    from torch.nn.utils import parametrize

    out = set()
    for name, mod in model.named_modules():
        prefix = f"{name}." if name else ""
        if parametrize.is_parametrized(mod, "weight"):
            if any(type(p).__name__ == "_SpectralNorm" for p in mod.parametrizations.weight):
                out.add(f"{prefix}parametrizations.weight.original")
        if any(type(h).__name__ == "SpectralNorm" for h in mod._forward_pre_hooks.values()):
            out.add(f"{prefix}weight_orig")
    return out


class _Analysis:
    def __init__(self, model: torch.nn.Module, graph: Graph, output: str):
        self.model = model
        self.g = graph
        self.params = dict(model.named_parameters())
        self.spectral = _spectral_leaves(model)
        self.prop = Propagator(graph, output, self.weight_kind, self.module_of)
        self.groups: list[SymmetryGroup] = []
        self.reasons: dict[str, list[str]] = {}
        self.notes: list[str] = []
        self._anc: dict[int, frozenset[str]] = {}

    # -- how a layer's weight is made ----------------------------------------------------------
    def weight_kind(self, vid: int) -> tuple:
        val = self.g.values[vid]
        if val.kind == "param":
            return ("plain", val.name)
        call = self.g.producer(vid)
        if call is not None and call.op == "weight_norm":
            v, gg = call.roles.get("v"), call.roles.get("g")
            if v is not None and gg is not None and self.g.values[v].kind == "param" \
                    and self.g.values[gg].kind == "param":
                return ("weight_norm", self.g.values[v].name, self.g.values[gg].name, call.attrs.get("dim"))
        anc = self.g.param_ancestors(vid, self._anc)
        if len(anc) == 1 and next(iter(anc)) in self.spectral:
            return ("spectral", next(iter(anc)))
        return ("derived", tuple(sorted(anc)))

    def module_of(self, call: Call) -> str | None:
        for role in ("weight", "running_mean", "bias"):
            vid = call.roles.get(role)
            if vid is not None and self.g.values[vid].name is not None:
                return module_name(self.g.values[vid].name)  # type: ignore[arg-type]
        return None

    def _leaf(self, call: Call, role: str) -> str | None:
        vid = call.roles.get(role)
        if vid is None:
            return None
        val = self.g.values[vid]
        return val.name if val.kind == "param" else ""  # "" = computed by code: not a leaf

    def _why(self, names, why: str) -> None:
        for n in names:
            if n:
                self.reasons.setdefault(n, []).append(why)

    def _shared(self, names) -> str | None:
        for n in names:
            uses = self.g.param_uses.get(n, [])
            if n and len(uses) > 1:
                return f"{n} is read by {len(uses)} ops (a shared parameter)"
        return None

    # -- producers ---------------------------------------------------------------------------
    def run(self) -> Symmetries:
        for call in self.g.calls.values():
            if call.op in _LAYERS:
                self._layer(call)
            elif call.op in _NORMS:
                self._norm_affine(call)
            elif call.op == "weight_norm":
                self._weight_norm_directions(call)
        for name in sorted(self.spectral):
            if name in self.g.leaf_of:
                self._add("scale", name, 0, "all (spectral norm)", [(name, (slice(None),), 1)])
        return self._result()

    def _layer(self, call: Call) -> None:
        wid = call.roles.get("weight")
        if wid is None or not call.outputs:
            return
        wk = self.weight_kind(wid)
        bias = self._leaf(call, "bias")
        out = call.outputs[0]
        nd = len(self.g.values[out].shape)
        axis = nd - 1 if call.op == "linear" else 1
        k = self.g.values[out].shape[axis]
        unit = "unit" if call.op == "linear" else "channel"
        if wk[0] == "plain":
            wname = wk[1]
            layer = module_name(wname)
            incoming = [wname] + ([bias] if bias else [])
        elif wk[0] == "weight_norm" and wk[3] == 0:
            wname = None
            layer = module_name(wk[1])
            incoming = [wk[2]] + ([bias] if bias else [])  # g scales row i
        else:
            names = [n for n in (wk[1:] if wk[0] != "derived" else wk[1]) if isinstance(n, str)]
            self._why(names + [bias], "the weight is computed by code (a parametrisation the analysis "
                      "does not read): declare its groups by hand")
            return
        if bias == "":
            self._why(incoming, "the bias is computed by code the analysis does not read")
            return
        shared = self._shared(incoming)
        if shared:
            self._why(incoming, shared)
            return
        # weight_norm's g before a normaliser: its gradient is identically zero (g only scales
        # the row, which the normaliser removes), so a scale group of it would prove nothing
        self._units(call, out, Loc(axis), k, layer, unit, incoming, scale_ok=wname is not None)
        cols = False
        if wname is not None and int(call.attrs.get("groups", 1)) == 1:
            cols = self._columns(out, Loc(axis), k, layer, wname)
        if bias:
            offset = self.params[wname].shape[1] if (cols and wname) else None
            self._bias_shift(out, Loc(axis), k, layer, bias, offset)

    def _norm_affine(self, call: Call) -> None:
        gamma, beta = self._leaf(call, "weight"), self._leaf(call, "bias")
        if not gamma or not call.outputs or beta == "":
            if gamma == "" or beta == "":
                self._why([gamma, beta], "the affine parameters are computed by code")
            return
        out = call.outputs[0]
        shape = self.g.values[out].shape
        if call.op in ("layer_norm", "rms_norm"):
            if self.params[gamma].dim() != 1:
                self._why([gamma, beta], "a multi-axis LayerNorm affine is not analysed")
                return
            axis, unit = len(shape) - 1, "feature"
        else:
            axis, unit = 1, "channel"
        incoming = [gamma] + ([beta] if beta else [])
        shared = self._shared(incoming)
        if shared:
            self._why(incoming, shared)
            return
        layer = module_name(gamma)
        self._units(call, out, Loc(axis), shape[axis], layer, unit, incoming)
        if beta:
            self._bias_shift(out, Loc(axis), shape[axis], layer, beta, None)

    def _weight_norm_directions(self, call: Call) -> None:
        v = self._leaf(call, "v")
        if not v or len(self.g.param_uses.get(v, [])) != 1:
            return
        dim = call.attrs.get("dim")
        if dim == 0:
            for i in range(self.params[v].shape[0]):
                self._add("scale", v, i, f"row {i} (weight_norm direction)", [(v, (i,), 1)])
        elif dim in (-1, None):
            self._add("scale", v, 0, "all (weight_norm direction)", [(v, (slice(None),), 1)])

    # -- perturbations -> groups ---------------------------------------------------------------
    def _follow(self, out: int, loc: Loc, k: int, mode: str) -> Outcome | str:
        try:
            return self.prop.run(out, loc, k, mode)
        except Broken as e:
            return str(e)

    def _units(self, call, out, loc, k, layer, unit, incoming, scale_ok=True) -> None:
        oc = self._follow(out, loc, k, "scale")
        if isinstance(oc, str):
            self._why(incoming, f"no scale/rescale: the output {oc}")
            self.notes.append(f"{layer}: no scale/rescale groups: the output {oc}")
            return
        if not oc.absorbed:
            self._why(incoming, "the output is not used")
            return
        for block in _blocks(k, oc.merges):
            whole = len(block) == k and k > 1
            parts = [(n, (slice(None),), 1) for n in incoming] if whole else \
                [(n, (i,), 1) for i in block for n in incoming]
            outgoing = [p for fn in oc.consumers for i in block for p in fn(i)]
            if len(block) > 1:  # one unit's columns are already one block per consumer
                outgoing = _compress(outgoing, self.params)
            parts += [(n, idx, -1) for n, idx in outgoing]
            symmetry = "rescale" if outgoing else "scale"
            if not scale_ok and symmetry == "scale":
                self._why(incoming, "weight_norm's magnitude before a normaliser: its gradient is "
                          "identically zero (the direction rows carry the scale groups)")
                continue
            norms = () if outgoing or not oc.normalizers else tuple(
                (mod, kind, tuple(ch for i in block for ch in lc.channels(i)), eps)
                for mod, kind, eps, lc in oc.normalizers)
            label = "all" if whole else f"{unit} {block[0]}" if len(block) == 1 else \
                f"{unit}s {block[0]}-{block[-1]}"
            self._add(symmetry, layer, 0 if whole else block[0], label, parts, norms)

    def _columns(self, out, loc, k, layer, wname) -> bool:
        oc = self._follow(out, loc, k, "colshift")
        if isinstance(oc, str) or not oc.absorbed:
            if isinstance(oc, str):
                self._why([wname], f"no column translation: the output {oc}")
            return False
        for j in range(self.params[wname].shape[1]):
            self._add("translation", layer, j, f"column {j}", [(wname, (slice(None), j), 1)])
        return True

    def _bias_shift(self, out, loc, k, layer, bias, offset) -> None:
        oc = self._follow(out, loc, k, "shift")
        if isinstance(oc, str):
            self._why([bias], f"no bias translation: the output {oc}")
            return
        if not oc.absorbed:
            return
        for bi, block in enumerate(_blocks(k, oc.merges)):
            whole = len(block) == k and k > 1
            parts = [(bias, (slice(None),), 1)] if whole else [(bias, (i,), 1) for i in block]
            label = "bias" if whole else f"bias {block[0]}" if len(block) == 1 else \
                f"bias {block[0]}-{block[-1]}"
            index = offset + bi if offset is not None else block[0]
            self._add("translation", layer, index, label, parts)

    def _add(self, symmetry, layer, index, label, parts, norms=()) -> None:
        self.groups.append(SymmetryGroup(symmetry, layer, int(index), label, tuple(parts), tuple(norms)))

    def _result(self) -> Symmetries:
        covered = {p[0] for grp in self.groups for p in grp.parts}
        skipped = {}
        for name in self.params:
            if name in covered:
                continue
            if name in self.reasons:
                skipped[name] = "; ".join(dict.fromkeys(self.reasons[name]))
            elif name not in self.g.leaf_of:
                skipped[name] = "not used in the forward pass on the example input"
            else:
                ops = sorted({self.g.calls[c].op for c in self.g.param_uses.get(name, [])})
                skipped[name] = f"read by {', '.join(ops) or 'no op'}: no symmetry pattern applies"
        # groups come in dataflow order of their layers, each layer's by increasing index
        return Symmetries(self.groups, skipped, self.notes)


def _blocks(k: int, merges: list[list[int]]) -> list[list[int]]:
    if not merges:
        return [[u] for u in range(k)]
    parent = list(range(k))

    def find(x: int) -> int:
        while parent[x] != x:
            parent[x] = parent[parent[x]]
            x = parent[x]
        return x

    for m in merges:
        for u in m[1:]:
            a, b = find(m[0]), find(u)
            if a != b:
                parent[max(a, b)] = min(a, b)
    out: dict[int, list[int]] = {}
    for u in range(k):
        out.setdefault(find(u), []).append(u)
    return sorted(out.values(), key=lambda b: b[0])


def _compress(parts: list[tuple[str, tuple]], params: Mapping[str, torch.Tensor]) -> list[tuple[str, tuple]]:
    """Merge a unit block's outgoing columns into column blocks (or the whole tensor)."""
    cols: dict[str, list[tuple[int, int]]] = {}
    other: list[tuple[str, tuple]] = []
    for name, idx in parts:
        if len(idx) == 2 and idx[0] == slice(None):
            c = idx[1]
            cols.setdefault(name, []).append((c, c + 1) if isinstance(c, int) else (c.start, c.stop))
        elif (name, idx) not in other:
            other.append((name, idx))
    out: list[tuple[str, tuple]] = []
    for name, ranges in cols.items():
        ranges.sort()
        runs: list[list[int]] = []
        for a, b in ranges:
            if runs and a <= runs[-1][1]:
                runs[-1][1] = max(runs[-1][1], b)
            else:
                runs.append([a, b])
        if len(runs) == 1 and runs[0] == [0, params[name].shape[1]] and params[name].shape[1] > 1 \
                and len(ranges) > 1:
            out.append((name, (slice(None),)))
            continue
        for a, b in runs:
            out.append((name, (slice(None), a) if b - a == 1 else (slice(None), slice(a, b))))
    return out + other


def find_symmetries(model: torch.nn.Module, example_input: Any, output: str = "logits") -> Symmetries:
    """Every translation, scale and rescale group of ``model`` (docs/theory.md §2).

    ``example_input`` is what ``model`` is called with (a tensor, or a tuple of positional
    arguments). ``output="logits"`` says the model's (first) output feeds softmax / cross-entropy
    over axis 1, so translation groups at the output are claimed; any other value claims none
    there unless the model applies softmax itself. BatchNorm counts as a normaliser only in
    training mode (the analysis reads the model in its current mode). The model (parameters,
    buffers, mode) is left unchanged.
    """
    if not isinstance(model, torch.nn.Module):
        raise InvalidArgumentError(f"model must be a torch.nn.Module, got {type(model).__name__}")
    if not isinstance(output, str):
        raise InvalidArgumentError(f"output must be a string such as 'logits', got {output!r}")
    modes = {m: m.training for m in model.modules()}
    collecting = gc.isenabled()
    gc.disable()  # tens of thousands of small tuples: the cyclic collector would cost more than the work
    try:
        graph = trace(model, example_input)
        return _Analysis(model, graph, output).run()
    finally:
        for m, t in modes.items():
            m.training = t
        if collecting:
            gc.enable()
