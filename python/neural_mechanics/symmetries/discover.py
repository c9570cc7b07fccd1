"""find_symmetries: trace the model, then turn every layer's absorbed perturbations into groups.

For each layer (Linear, Conv, Hugging Face Conv1D, embedding, normaliser affine, in dataflow
order) three perturbations of its output are followed (propagate.py): a scale of each unit (scale
and rescale groups, docs/theory.md §2), an input-dependent shift of every unit at once (the
translation of each weight column, or of each embedding row) and a constant shift of each unit
(bias and embedding-column translations). A perturbation that needs other layers to move with it
(a query's key in attention, the other writers of a normalised residual stream, docs/theory.md
§2b) brings them in, and the units that end up linked form one group. Shifts of two tables added
together (token and position embeddings) are also tried with opposite signs.
"""

from __future__ import annotations

import gc
import re
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

import torch

from ..errors import InvalidArgumentError
from .graph import Call, Graph, Slot
from .groups import Symmetries, SymmetryGroup
from .labels import MIX, NONE, Lab, positions
from .propagate import (
    _DROPOUTS,
    _IDENTITY_LIKE,
    _PERMUTES,
    _REPLAY,
    _RESHAPES,
    Outcome,
    Propagator,
    UnionFind,
)
from .rewrite import fold_handwritten_norms
from .trace import trace

_LAYERS = ("linear", "conv1d", "conv2d", "conv3d")
_NORMS = ("batch_norm", "instance_norm", "group_norm", "layer_norm", "rms_norm")
_SELECT = {"getitem", "select", "narrow", "split", "chunk", "unbind", "tensor_split", "split_with_sizes"}
_MAX_ROUNDS = 64  # layers brought in by one perturbation, at most


def layer_name(param: str) -> str:
    """The layer a weight stands for: its module, or for a weight that is not a module's plain
    ``weight`` (nn.MultiheadAttention's ``in_proj_weight``, ``q_proj_weight``) the name without
    ``_weight`` ("attn.in_proj_weight" -> "attn.in_proj")."""
    last = param.rsplit(".", 1)[-1]
    if last.endswith("_weight") and last not in ("weight",) and not last.startswith("weight_"):
        return param[: -len("_weight")]
    return module_name(param)


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


@dataclass
class Seed:
    """The units of one layer's output that a perturbation moves.

    ``parts`` are templates of unit i's parameter parts, moved with the unit (+1 on the incoming
    side): (name, "row", r0) is ``name[r0 + i]``, (name, "col", c0) is ``name[:, c0 + i]``,
    (name, "whole", 0) all of ``name``. ``whole`` are the parts when every unit moves together
    (the whole tensors); ``axis`` is where the units lie in the output value ``vid`` (None: every
    entry is the one unit of a parameter added directly)."""

    key: tuple
    vid: int
    n: int
    axis: int | None
    parts: tuple[tuple[str, str, int], ...]
    whole: list[tuple[str, tuple]] | None
    layer: str
    unit: str
    order: int
    names: tuple[str, ...] = ()
    scale_ok: bool = True
    extra: dict = field(default_factory=dict)
    first: int = 0  # index of unit 0 in its layer (rows r0:r1 of a packed projection: r0)

    def incoming(self, i: int) -> list[tuple[str, tuple]]:
        out: list[tuple[str, tuple]] = []
        for name, kind, off in self.parts:
            out.append((name, (off + i,)) if kind == "row" else (name, (slice(None), off + i)) if kind == "col"
                       else (name, (slice(None),)))
        return out

    def label(self, base: int, nd: int) -> torch.Tensor:
        if self.axis is None:
            return torch.full((1,) * nd, base, dtype=torch.int64)
        shape = [1] * nd
        shape[self.axis] = self.n
        return (torch.arange(self.n, dtype=torch.int64) + base).reshape(shape)


class _Analysis:
    def __init__(self, model: torch.nn.Module, graph: Graph, output: str, class_axis: int):
        self.model = model
        self.g = graph
        fold_handwritten_norms(graph)
        self.params = dict(model.named_parameters())
        self.spectral = _spectral_leaves(model)
        self.prop = Propagator(graph, output, class_axis, self.weight_kind, self.module_of, self.uses)
        self.groups: list[SymmetryGroup] = []
        self.keys: set[tuple[str, str, int]] = set()
        self.seen: set[frozenset] = set()
        self.reasons: dict[str, list[str]] = {}
        self.notes: list[str] = []
        self._anc: dict[int, frozenset[str]] = {}
        self._seeds: dict[int, Seed | None] = {}

    # -- how a layer's weight is made ----------------------------------------------------------
    def uses(self, name: str) -> int:
        return len(self.g.param_uses.get(name, []))

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
        rows = self._row_slice(vid)
        if rows is not None:
            return rows
        anc = self.g.param_ancestors(vid, self._anc)
        if len(anc) == 1 and next(iter(anc)) in self.spectral:
            return ("spectral", next(iter(anc)))
        return ("derived", tuple(sorted(anc)))

    def _row_slice(self, vid: int) -> tuple | None:
        """("rows", name, r0, r1) when ``vid`` is rows r0:r1 of a parameter (a packed projection
        split by chunk / split / slicing, as nn.MultiheadAttention does)."""
        call = self.g.producer(vid)
        if call is None or call.op not in _SELECT or not call.inputs or call.fn is None:
            return None
        src = self.g.values[call.inputs[0]]
        if src.kind != "param" or not call.targs or call.targs[0] != Slot(src.id):
            return None
        shape = src.shape
        lab = torch.arange(shape[0], dtype=torch.int64).reshape((shape[0],) + (1,) * (len(shape) - 1)).expand(shape)
        try:
            res = call.fn(lab, *call.targs[1:], **call.tkwargs)
        except Exception:  # noqa: BLE001 - anything the replay cannot do is simply not a row slice
            return None
        res = list(res) if isinstance(res, (tuple, list)) else [res]
        if len(res) != len(call.outputs):
            return None
        t = res[call.outputs.index(vid)]
        if t.dim() != len(shape) or tuple(t.shape[1:]) != tuple(shape[1:]) or t.shape[0] == 0:
            return None
        rows = t.reshape(t.shape[0], -1)[:, 0]
        r0 = int(rows[0])
        if not torch.equal(rows, torch.arange(r0, r0 + t.shape[0])) or not torch.equal(t, rows.reshape(
                (-1,) + (1,) * (len(shape) - 1)).expand(t.shape)):
            return None
        return ("rows", src.name, r0, r0 + t.shape[0])

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
            if n and self.uses(n) > 1:
                return f"{n} is read by {self.uses(n)} ops (a shared parameter)"
        return None

    # -- the layers -----------------------------------------------------------------------------
    def seed_of(self, call: Call, why: list[str] | None = None) -> Seed | None:
        """The units of ``call``'s output when it is a layer whose units can move (None if not)."""
        if call.id in self._seeds and why is None:
            return self._seeds[call.id]
        seed = self._make_seed(call, why if why is not None else [])
        self._seeds[call.id] = seed
        return seed

    def _make_seed(self, call: Call, why: list[str]) -> Seed | None:
        op = call.op
        if not call.outputs:
            return None
        out = call.outputs[0]
        oshape = self.g.values[out].shape
        nd = len(oshape)
        if op in _LAYERS or op == "embedding" or (op in ("addmm", "matmul", "mm") and self._param_rhs(call)):
            if op in ("addmm", "matmul", "mm"):
                wid = self._param_rhs(call)
                bias_vid = call.roles.get("input") if op == "addmm" else None
            else:
                wid = call.roles.get("weight")
                bias_vid = call.roles.get("bias")
            if wid is None:
                return None
            wk = self.weight_kind(wid)
            bias = None
            if bias_vid is not None:
                bk = self.weight_kind(bias_vid)
                if bk[0] not in ("plain", "rows"):
                    why.append("the bias is computed by code the analysis does not read")
                    return None
                bias = bk
            axis = 1 if op in ("conv1d", "conv2d", "conv3d") else nd - 1
            n = oshape[axis]
            unit = "channel" if op.startswith("conv") else "unit"
            names: list[str] = ([wk[1]] if wk[0] in ("plain", "rows") else []) + ([bias[1]] if bias else [])
            tpl: list[tuple[str, str, int]]
            whole: list[tuple[str, tuple]] | None
            if wk[0] == "plain":
                w = wk[1]
                if op == "embedding":
                    tpl, unit = [(w, "col", 0)], "feature"
                elif op in ("addmm", "matmul", "mm"):
                    tpl = [(w, "col", 0)]
                else:
                    tpl = [(w, "row", 0)]
                whole = [(w, (slice(None),))]
                layer = layer_name(w)
                if self.uses(w) > 1 and bias is not None:  # a tied head: name it after its own bias
                    layer = module_name(bias[1])
                scale_ok, first = True, 0
            elif wk[0] == "rows" and op == "linear":
                w, r0 = wk[1], wk[2]
                tpl, whole = [(w, "row", r0)], None
                layer = layer_name(w)
                scale_ok, first = True, r0
            elif wk[0] == "weight_norm" and wk[3] == 0 and op in _LAYERS:
                tpl = [(wk[2], "row", 0)]  # g scales row i
                whole = [(wk[2], (slice(None),))]
                layer = module_name(wk[1])
                names = [wk[2]] + ([bias[1]] if bias else [])
                scale_ok, first = False, 0
            else:
                anc = [n for n in (wk[1:] if wk[0] != "derived" else wk[1]) if isinstance(n, str)]
                self._why(anc + ([bias[1]] if bias else []), "the weight is computed by code (a parametrisation the "
                          "analysis does not read): declare its groups by hand")
                why.append("computed weight")
                return None
            if bias is not None:
                if bias[0] == "plain":
                    tpl.append((bias[1], "row", 0))
                    if whole is not None:
                        whole = whole + [(bias[1], (slice(None),))]
                else:
                    tpl.append((bias[1], "row", bias[2]))
                    whole = None
            return Seed(("call", call.id), out, n, axis, tuple(tpl), whole, layer, unit, call.id, tuple(names), scale_ok,
                        {"op": op, "weight": wk, "bias": bias}, first)
        if op in _NORMS:
            gamma, beta = self._leaf(call, "weight"), self._leaf(call, "bias")
            if not gamma or beta == "":
                if gamma == "" or beta == "":
                    self._why([gamma, beta], "the affine parameters are computed by code")
                return None
            if op in ("layer_norm", "rms_norm"):
                if self.params[gamma].dim() != 1:
                    self._why([gamma, beta], "a multi-axis LayerNorm affine is not analysed")
                    return None
                axis, unit = nd - 1, "feature"
            else:
                axis, unit = 1, "channel"
            affine = (gamma,) + ((beta,) if beta else ())
            return Seed(("call", call.id), out, oshape[axis], axis, tuple((n_, "row", 0) for n_ in affine),
                        [(n_, (slice(None),)) for n_ in affine], module_name(gamma), unit, call.id, affine, True,
                        {"op": op})
        return None

    def _param_rhs(self, call: Call) -> int | None:
        """The weight of x @ W (Hugging Face Conv1D's addmm, or a hand-written matmul): a 2-d
        trained leaf (in, out) as the right operand, the left operand an activation."""
        if call.op == "addmm":
            w = call.roles.get("mat2")
            x = call.roles.get("mat1")
        else:
            ts = [i for i in call.inputs if self.g.values[i].floating]
            if len(ts) != 2:
                return None
            x, w = ts
        if w is None or x is None:
            return None
        wv, xv = self.g.values[w], self.g.values[x]
        if wv.kind != "param" or len(wv.shape) != 2 or xv.kind == "param":
            return None
        return w

    def _param_seed(self, vid: int) -> Seed | None:
        """A parameter read directly by an add / concatenation (a learned position table added
        by hand, a class token): all of it is one unit."""
        val = self.g.values[vid]
        name = val.name
        if name is None or self.uses(name) != 1:
            return None
        return Seed(("param", name), vid, 1, None, ((name, "whole", 0),), [(name, (slice(None),))],
                    module_name(name), "all", self.g.param_uses[name][0], (name,), True, {"op": "param"})

    # -- the driver -------------------------------------------------------------------------------
    def run(self) -> Symmetries:
        for call in self.g.calls.values():
            op = call.op
            if op in _LAYERS or op == "embedding" or (op in ("addmm", "matmul", "mm") and self._param_rhs(call)):
                self._layer(call)
            elif op in _NORMS:
                self._norm_affine(call)
            elif op == "weight_norm":
                self._weight_norm_directions(call)
            elif op in ("add", "sub"):
                self._signed_pairs(call)
        self._direct_params()
        for name in sorted(self.spectral):
            if name in self.g.leaf_of:
                self._add("scale", name, 0, "all (spectral norm)", [(name, (slice(None),), 1)])
        return self._result()

    def _layer(self, call: Call) -> None:
        why: list[str] = []
        seed = self.seed_of(call, why)
        if seed is None:
            return
        op = call.op
        wk, bias = seed.extra["weight"], seed.extra["bias"]
        bias_name = bias[1] if bias else None
        wname = wk[1] if wk[0] == "plain" else None
        incoming = list(seed.names)
        if op == "embedding":
            self._embedding(call, seed)
            return
        shared = self._shared(incoming)
        if shared:
            self._why(incoming, shared)
        else:
            self._units(seed)
        cols = False
        if wname is not None and int(call.attrs.get("groups", 1)) == 1 and wk[0] == "plain" and not self._shared([wname]):
            cols = self._columns(call, seed, wname)
        if bias_name and not self._shared([bias_name]):
            offset = None
            if cols and wname:
                offset = self.params[wname].shape[0] if op in ("addmm", "matmul", "mm") else self.params[wname].shape[1]
            self._bias_shift(seed, bias_name, offset, bias)

    def _norm_affine(self, call: Call) -> None:
        seed = self.seed_of(call)
        if seed is None:
            return
        shared = self._shared(seed.names)
        if shared:
            self._why(seed.names, shared)
            return
        self._units(seed)
        beta = self._leaf(call, "bias")
        if beta:
            self._bias_shift(seed, beta, None, ("plain", beta))

    def _weight_norm_directions(self, call: Call) -> None:
        v = self._leaf(call, "v")
        if not v or self.uses(v) != 1:
            return
        dim = call.attrs.get("dim")
        if dim == 0:
            for i in range(self.params[v].shape[0]):
                self._add("scale", v, i, f"row {i} (weight_norm direction)", [(v, (i,), 1)])
        elif dim in (-1, None):
            self._add("scale", v, 0, "all (weight_norm direction)", [(v, (slice(None),), 1)])

    # -- scale / rescale ---------------------------------------------------------------------------
    def _scale_run(self, first: list[Seed], *, uf: UnionFind | None = None, passthrough: bool = False,
                   extend_adds: bool = True, scaled: dict[int, int] | None = None
                   ) -> tuple[Outcome, list[Seed], list[int], set[int]]:
        """Follow a scale of ``first``'s units, bringing in the layers it needs; returns the outcome,
        every seed used, their first unit ids and the calls where an add brought layers in."""
        seeds = list(first)
        refuse: set[int] = set()
        add_calls: set[int] = set()
        oc = Outcome()
        for _ in range(_MAX_ROUNDS):
            bases = _bases(seeds)
            starts = [(s.vid, Lab(s.label(b, len(self.g.values[s.vid].shape)))) for s, b in zip(seeds, bases)]
            oc = self.prop.run(starts, "scale", uf=uf, refuse=frozenset(refuse), passthrough=passthrough,
                               fresh=bases[-1] + seeds[-1].n + (1 << 20), extend_adds=extend_adds, scaled=scaled)
            if not oc.need:
                break
            have = {s.key for s in seeds}
            for vid, cid, _what in oc.need:
                src = self._sources(vid)
                new = [s for s in (src or []) if s.key not in have]
                if not new:
                    refuse.add(cid)
                    continue
                for s in new:
                    have.add(s.key)
                    seeds.append(s)
                if self.g.calls[cid].op in ("add", "sub"):
                    add_calls.add(cid)
        bases = _bases(seeds)
        return oc, seeds, bases, add_calls

    def _units(self, seed: Seed, scaled: dict[int, int] | None = None) -> None:
        oc, seeds, bases, add_calls = self._scale_run([seed], scaled=scaled)
        if add_calls and not self._whole(oc, seeds, bases):
            # a residual stream is claimed only when a normaliser merges all of it (docs/theory.md §2b)
            oc, seeds, bases, add_calls = self._scale_run([seed], extend_adds=False, scaled=scaled)
        made = self._emit_scale(oc, seeds, bases, seed)
        if made is None:
            return
        full, with_consumers = made
        if full and with_consumers and seed.n > 1:
            # the same group with every layer it feeds passing the scale on (bias with it): the
            # post-LN stream's scale group (docs/theory.md §2b)
            root_uf = oc.uf
            v_oc, v_seeds, v_bases, _ = self._scale_run([seed], uf=_restrict(root_uf, bases[0], seed.n), passthrough=True)
            if v_oc.passed:
                self._emit_scale(v_oc, v_seeds, v_bases, seed, variant=True)

    def _whole(self, oc: Outcome, seeds: list[Seed], bases: list[int]) -> bool:
        units = [b + i for s, b in zip(seeds, bases) for i in range(s.n)]
        if any(u in oc.broken for u in units):
            return False
        return len({oc.uf.find(u)[0] for u in units}) == 1

    def _emit_scale(self, oc: Outcome, seeds: list[Seed], bases: list[int], seed: Seed,
                    variant: bool = False) -> tuple[bool, bool] | None:
        """Groups from a scale run; returns (a group holds every unit of every seed, it has
        consumers) for the first seed's groups, or None when nothing was claimed."""
        own = range(bases[0], bases[0] + seed.n)
        broken_own = [oc.broken[u] for u in own if u in oc.broken]
        if broken_own and len(broken_own) == seed.n:
            why = "; ".join(dict.fromkeys(broken_own))
            self._why(seed.names, f"no scale or rescale group: {why}")
            self.notes.append(f"{seed.layer}: no scale or rescale group: {why}")
            return None
        members: dict[int, list[tuple[int, int, int]]] = {}  # root -> (seed index, unit, parity)
        linked = oc.uf.parent
        for k, (s, b) in enumerate(zip(seeds, bases)):
            for i in range(s.n):
                if b + i in linked:
                    root, par = oc.uf.find(b + i)
                    members.setdefault(root, []).append((k, i, par))
                else:
                    members[b + i] = [(k, i, 0)]
        passed_units = {u: cid for cid, u in oc.passed.items()}
        for u in passed_units:
            root, par = oc.uf.find(u)
            members.setdefault(root, []).append((-1, u, par))
        bad_roots = {oc.uf.find(u)[0] for u in oc.broken}
        # unit -> [(normaliser index, its channels)]: which normalisers' epsilon breaks a group
        self._unit_norms: dict[int, list[tuple[int, tuple[int, ...]]]] = {}
        for ni, (_, _, _, ch_map) in enumerate(oc.normalizers):
            for u, chs in ch_map.items():
                self._unit_norms.setdefault(u, []).append((ni, chs))
        emitted_full = emitted_consumers = False
        any_made = False
        items = list(members.items())
        if len(seeds) > 1 or passed_units:
            items.sort(key=lambda kv: min((seeds[k].order if k >= 0 else 1 << 60, i) for k, i, _ in kv[1]))
        total = sum(s.n for s in seeds) + len(passed_units)
        for root, mem in items:
            if root in bad_roots:
                continue
            if len(mem) == 1:
                if mem[0][0] != 0:
                    continue
                made = self._unit_group(oc, seed, bases[0], mem[0][1], variant)
            else:
                if not any(k == 0 for k, _, _ in mem):
                    continue
                units = [bases[k] + i for k, i, _ in mem if k >= 0] + [i for k, i, _ in mem if k < 0]
                if not any(u in oc.absorbed or u in oc.consumers for u in units) and not any(k < 0 for k, _, _ in mem):
                    continue
                made = self._scale_group(oc, seeds, bases, mem, passed_units, variant)
            if made is None:
                continue
            any_made = True
            full = len(mem) == total
            emitted_full |= full
            emitted_consumers |= full and made
        if not any_made:
            broken_any = [oc.broken[u] for u in own if u in oc.broken]
            if broken_any:
                why = "; ".join(dict.fromkeys(broken_any))
                self._why(seed.names, f"no scale or rescale group: {why}")
            elif not variant:
                self._why(seed.names, "the layer's output is not used")
            return None
        return emitted_full, emitted_consumers

    def _unit_group(self, oc: Outcome, seed: Seed, base: int, i: int, variant: bool) -> bool | None:
        """The common case, one unit alone: its parts (+1) and its consumers' columns (−1)."""
        u = base + i
        cons = oc.consumers.get(u)
        if not cons and u not in oc.absorbed:
            return None
        parts = [(n, idx, 1) for n, idx in seed.incoming(i)]
        if cons:
            parts += [(n, idx, -1) for n, idx in _merge_runs(cons, self.params)]
            j = seed.first + i
            return True if self._add("rescale", seed.layer, j, f"{seed.unit} {j}", parts) else None
        if not seed.scale_ok:
            self._why(seed.names, "weight_norm's magnitude before a normaliser: its gradient is identically zero "
                      "(the direction rows carry the scale groups)")
            return None
        found: dict[int, set[int]] = {}
        for ni, chs in self._unit_norms.get(u, ()):
            found.setdefault(ni, set()).update(chs)
        norms = tuple((oc.normalizers[ni][0], oc.normalizers[ni][1], tuple(sorted(chs)), oc.normalizers[ni][2])
                      for ni, chs in sorted(found.items()))
        label = "all" if seed.axis is None else f"{seed.unit} {seed.first + i}"
        return False if self._add("scale", seed.layer, seed.first + i, label, parts, norms) else None

    def _scale_group(self, oc: Outcome, seeds: list[Seed], bases: list[int], mem: list[tuple[int, int, int]],
                     passed_units: dict[int, int], variant: bool) -> bool | None:
        """One group from one linked set of units; returns whether it has consumers (None: not
        claimed)."""
        mem = sorted(mem, key=lambda m: ((seeds[m[0]].order, m[1]) if m[0] >= 0 else (1 << 60, m[1])))
        p0 = mem[0][2]
        parts: list[tuple[str, tuple, int]] = []
        outgoing: list[tuple[str, tuple, int]] = []
        by_seed: dict[int, list[tuple[int, int]]] = {}
        for k, i, par in mem:
            by_seed.setdefault(k, []).append((i, par))
        for k, units in by_seed.items():
            if k < 0:
                for u, par in units:
                    call = self.g.calls[passed_units[u]]
                    b = call.roles.get("bias")
                    if b is not None:
                        parts.append((self.g.values[b].name, (slice(None),), 1 if par == p0 else -1))  # type: ignore[arg-type]
                continue
            s = seeds[k]
            signs = {1 if par == p0 else -1 for _, par in units}
            whole = len(units) == s.n and (s.n > 1 or s.axis is None) and s.whole is not None and len(signs) == 1
            if whole:
                sg = next(iter(signs))
                parts += [(n, idx, sg) for n, idx in s.whole]  # type: ignore[union-attr]
            else:
                for i, par in units:
                    parts += [(n, idx, 1 if par == p0 else -1) for n, idx in s.incoming(i)]
            for i, par in units:
                sign = -1 if par == p0 else 1
                outgoing += [(n, idx, sign) for n, idx in oc.consumers.get(bases[k] + i, [])]
        multi = len(mem) > 1
        out_parts: list[tuple[str, tuple, int]] = []
        for sign in (-1, 1):
            sel = [(n, idx) for n, idx, sg in outgoing if sg == sign]
            sel = _compress(sel, self.params) if multi else _merge_runs(sel, self.params)
            out_parts += [(n, idx, sign) for n, idx in sel]
        parts += out_parts
        # a part listed twice with opposite signs moves by α·(1/α): it does not move at all
        net: dict[tuple[str, str], int] = {}
        for n, idx, sg in parts:
            net[(n, repr(idx))] = net.get((n, repr(idx)), 0) + sg
        parts = [p for p in parts if net[(p[0], repr(p[1]))] != 0]
        parts = list({(n, repr(idx), sg): (n, idx, sg) for n, idx, sg in parts}.values())
        if not parts:
            return None
        symmetry = "rescale" if any(sg < 0 for _, _, sg in parts) else "scale"
        if symmetry == "rescale" and not any(sg > 0 for _, _, sg in parts):
            parts = [(n, idx, -sg) for n, idx, sg in parts]
            symmetry = "scale"
        first = seeds[mem[0][0]] if mem[0][0] >= 0 else seeds[0]
        if symmetry == "scale" and all(seeds[k].extra.get("op") != "param" and not seeds[k].scale_ok
                                       for k in by_seed if k >= 0) and not variant:
            self._why(first.names, "weight_norm's magnitude before a normaliser: its gradient is identically zero "
                      "(the direction rows carry the scale groups)")
            return None
        # the normalisers that absorbed these units: their epsilon breaks the group slightly
        found: dict[int, set[int]] = {}
        for k, i, _ in mem:
            if k >= 0:
                for ni, chs in self._unit_norms.get(bases[k] + i, ()):
                    found.setdefault(ni, set()).update(chs)
        norms = tuple((oc.normalizers[ni][0], oc.normalizers[ni][1], tuple(sorted(chs)), oc.normalizers[ni][2])
                      for ni, chs in sorted(found.items()))
        k0, i0 = mem[0][0], mem[0][1]
        own = [i for k, i, _ in mem if k == k0]
        n_first = first.n
        whole_first = len(own) == n_first and n_first > 1
        f0 = first.first
        own = sorted(own)
        if whole_first or first.axis is None:
            label = "all"
        elif len(own) == 1:
            label = f"{first.unit} {f0 + own[0]}"
        elif own[-1] - own[0] == len(own) - 1:
            label = f"{first.unit}s {f0 + own[0]}-{f0 + own[-1]}"
        else:
            label = f"{first.unit}s " + ", ".join(str(f0 + i) for i in own)
        others = [seeds[k].layer for k in dict.fromkeys(k for k, _, _ in mem) if k >= 0 and k != k0
                  and seeds[k].layer != first.layer]
        if others:
            label += " with " + ", ".join(dict.fromkeys(others))
        if variant:
            label += " (layers it feeds pass it on)"
        index = 0 if whole_first else f0 + i0
        return self._add(symmetry, first.layer, index, label, parts, norms, bump=bool(others) or variant) \
            and bool(out_parts)

    # -- what a perturbation needs ------------------------------------------------------------------
    def _sources(self, vid: int, depth: int = 0) -> list[Seed] | None:
        """The layers whose outputs make up ``vid`` through ops that carry a scale (reshapes,
        additions, concatenations, multiplication by unperturbed tensors), or None if some part
        of it cannot be scaled (the model input, a constant)."""
        if depth > 200:
            return None
        val = self.g.values[vid]
        if val.kind == "param":
            s = self._param_seed(vid)
            return None if s is None else [s]
        if val.kind != "computed":
            return None
        call = self.g.producer(vid)
        if call is None:
            return None
        seed = self.seed_of(call) if vid == call.outputs[0] else None
        if seed is not None:
            if any(self.uses(n) > 1 for n in seed.names):
                return None
            if call.op == "embedding" and call.attrs.get("padding_idx") is not None:
                return None  # the padding row gets no gradient: training does not conserve the group
            return [seed]
        op = call.op
        ts = [i for i in call.inputs if self.g.values[i].floating]
        if op in _IDENTITY_LIKE | _DROPOUTS | _RESHAPES | _PERMUTES | _REPLAY | {"neg", "relu", "leaky_relu"}:
            return self._sources(call.inputs[0], depth + 1) if call.inputs else None
        if op in ("add", "sub", "cat", "concat", "stack"):
            out: list[Seed] = []
            for i in ts:
                v = self.g.values[i]
                if op == "cat" and len(v.shape) == 1 and v.shape[0] == 0:
                    continue
                found = self._sources(i, depth + 1)
                if found is None:
                    return None
                out += found
            return out
        if op in ("mul", "div"):
            moving = [i for i in ts if self.g.param_ancestors(i, self._anc)]
            if len(moving) != 1 or (op == "div" and moving[0] != ts[0]):
                return None
            return self._sources(moving[0], depth + 1)
        return None

    # -- translations ----------------------------------------------------------------------------
    def _shift_run(self, starts: list[tuple[int, Lab]], cancel: frozenset[int] = frozenset()) -> Outcome:
        return self.prop.run(starts, "shift", cancel=cancel, refuse=frozenset(self.g.calls))

    def _colshift_lab(self, vid: int, axis: int) -> Lab:
        shape = self.g.values[vid].shape
        nd = len(shape)
        return Lab(torch.zeros((1,) * nd, dtype=torch.int64), positions(shape, [a for a in range(nd) if a != axis]))

    def _columns(self, call: Call, seed: Seed, wname: str) -> bool:
        oc = self._shift_run([(seed.vid, self._colshift_lab(seed.vid, seed.axis))])  # type: ignore[arg-type]
        if oc.broken or not oc.absorbed:
            if oc.broken:
                self._why([wname], f"no column translation: {next(iter(oc.broken.values()))}")
            return False
        rows_are_columns = call.op in ("addmm", "matmul", "mm")
        n = self.params[wname].shape[0 if rows_are_columns else 1]
        for j in range(n):
            self._add("translation", seed.layer, j, f"column {j}", [(wname, (j,) if rows_are_columns else (slice(None), j), 1)])
        return True

    def _bias_shift(self, seed: Seed, bias: str, offset: int | None, bkind: tuple) -> None:
        nd = len(self.g.values[seed.vid].shape)
        lab = Lab(seed.label(0, nd), torch.zeros((1,) * nd, dtype=torch.int64))
        oc = self._shift_run([(seed.vid, lab)])
        results = [(oc, list(range(seed.n)))]
        if oc.broken and len(oc.broken) < seed.n or (oc.broken and seed.n > 1):
            parts = self._partitions(seed, lab)
            if len(parts) > 1:
                results = []
                for part in parts:
                    keep = torch.tensor(sorted(part), dtype=torch.int64)
                    L = torch.where(torch.isin(lab.L, keep), lab.L, torch.full_like(lab.L, NONE))
                    results.append((self._shift_run([(seed.vid, Lab(L, lab.P))]), sorted(part)))
        r0 = bkind[2] if bkind[0] == "rows" else 0
        blocks_out: list[list[int]] = []
        whys: list[str] = []
        for res, units in results:
            if res.broken:
                whys += list(res.broken.values())
            for block in _components(res, units):
                if any(u in res.broken for u in block) or not any(u in res.absorbed for u in block):
                    continue
                blocks_out.append(block)
        if not blocks_out:
            if whys:
                self._why([bias], f"no bias translation: {whys[0]}")
            return
        for bi, block in enumerate(sorted(blocks_out)):
            whole = len(block) == seed.n and seed.n > 1 and bkind[0] == "plain"
            entries: list[tuple[str, tuple, int]] = [(bias, (slice(None),), 1)] if whole else \
                [(bias, (r0 + i,), 1) for i in block]
            label = "bias" if whole else f"bias {r0 + block[0]}" if len(block) == 1 else \
                f"bias {r0 + block[0]}-{r0 + block[-1]}"
            index = offset + bi if offset is not None else r0 + block[0]
            self._add("translation", seed.layer, index, label, entries)

    def _partitions(self, seed: Seed, lab: Lab) -> list[set[int]]:
        """Units split apart by the first selection their output goes through (q, k, v of a
        packed projection), so that a failure of one part does not hide the others."""
        vid = seed.vid
        live = self.prop.live
        for _ in range(64):
            cons = [self.g.calls[c] for c in self.g.values[vid].consumers
                    if any(o in live for o in self.g.calls[c].outputs)]
            if len(cons) == 1 and cons[0].op in _RESHAPES | _PERMUTES | _IDENTITY_LIKE:
                vid = cons[0].outputs[0]
                continue
            break
        else:
            return []
        if not cons or not all(c.op in _SELECT for c in cons):
            return []
        self.prop.run([(seed.vid, lab)], "shift", refuse=frozenset(self.g.calls))
        labels = self.prop.labels
        out = []
        for c in cons:
            for o in c.outputs:
                if o in labels:
                    u = labels[o].units()
                    if u and u not in out:
                        out.append(u)
        return out

    def _embedding(self, call: Call, seed: Seed) -> None:
        """An embedding table: its columns are units (scale, and constant shifts like a bias),
        its rows input-dependent shifts (like a Linear's columns). A table read by other ops too
        (a tied LM head) is followed through every use at once."""
        w = seed.names[0]
        uses = [self.g.calls[c] for c in self.g.param_uses.get(w, [])]
        pad = call.attrs.get("padding_idx")
        if pad is not None:
            # the padding row gets no gradient, so no group that moves it is conserved by training
            self._why([w], f"padding_idx={pad}: the padding row never receives a gradient, so only the other "
                      "rows' translations are claimed")
        elif self.uses(w) > 1:
            if all(c.op == "embedding" or (c.op == "linear" and c.roles.get("weight") == self.g.leaf_of.get(w))
                   for c in uses) and sum(c.op == "embedding" for c in uses) == 1:
                # a table tied to an LM head: scaled as a whole, the head's input must move inversely
                table = Seed(("tied", w), seed.vid, 1, None, ((w, "whole", 0),), [(w, (slice(None),))], seed.layer,
                             "all", seed.order, (w,), True, {"op": "tied"})
                self._units(table, scaled={self.g.leaf_of[w]: 0})
            else:
                self._why([w], f"{w} is read by {self.uses(w)} ops (a shared parameter), so it has no scale or rescale group")
        else:
            self._units(seed)
        V = self.params[w].shape[0]
        # rows
        starts = self._table_starts(w, uses, "rows")
        if starts is not None:
            oc = self._shift_run(starts)
            if not oc.broken and oc.absorbed:
                for t in range(V):
                    if t != pad:
                        self._add("translation", seed.layer, t, f"row {t}", [(w, (t,), 1)])
            elif oc.broken:
                self._why([w], f"no row translation: {next(iter(oc.broken.values()))}")
        starts = self._table_starts(w, uses, "columns") if pad is None else None
        if starts is not None:
            oc = self._shift_run(starts)
            for block in _components(oc, list(range(seed.n))):
                if any(u in oc.broken for u in block) or not any(u in oc.absorbed for u in block):
                    continue
                whole = len(block) == seed.n and seed.n > 1
                parts = [(w, (slice(None),), 1)] if whole else [(w, (slice(None), i), 1) for i in block]
                label = "all" if whole else f"column {block[0]}" if len(block) == 1 else f"columns {block[0]}-{block[-1]}"
                self._add("translation", seed.layer, V + block[0], label, parts)
            if oc.broken and not any(u not in oc.broken for u in range(seed.n)):
                self._why([w], f"no column translation: {next(iter(oc.broken.values()))}")

    def _table_starts(self, w: str, uses: list[Call], what: str, base: int = 0) -> list[tuple[int, Lab]] | None:
        """Shift labels of every use of table ``w`` [V, E] when its rows (or columns) move (unit
        ids from ``base``)."""
        V, E = self.params[w].shape[:2]
        starts = []
        for c in uses:
            out = c.outputs[0]
            shape = self.g.values[out].shape
            nd = len(shape)
            if c.op == "embedding":
                if what == "rows":
                    mix = frozenset(range(V))
                    L = torch.full((1,) * nd, MIX if self.uses(w) > 1 else 0, dtype=torch.int64)
                    starts.append((out, Lab(L, positions(shape, list(range(nd - 1))), mix if self.uses(w) > 1 else frozenset())))
                else:
                    starts.append((out, Lab(torch.arange(base, base + E).reshape((1,) * (nd - 1) + (E,)),
                                            torch.zeros((1,) * nd, dtype=torch.int64))))
            elif c.op == "linear" and c.roles.get("weight") == self.g.leaf_of.get(w):
                if what == "rows":
                    starts.append((out, Lab(torch.arange(V).reshape((1,) * (nd - 1) + (V,)),
                                            positions(shape, list(range(nd - 1))))))
                else:
                    starts.append((out, Lab(torch.full((1,) * nd, MIX, dtype=torch.int64),
                                            positions(shape, list(range(nd - 1))), frozenset(range(base, base + E)))))
            else:
                return None
        return starts

    def _signed_pairs(self, call: Call) -> None:
        """Two shift-carrying layers added together (token + position embeddings, two biases):
        unit j of one shifted by +c and unit j of the other by −c cancel in the sum."""
        ts = [i for i in call.inputs if self.g.values[i].floating]
        if len(ts) != 2:
            return
        found = []
        for v in ts:
            s = self._shift_source(v)
            if s is None:
                return
            found.append(s)
        (sa, va), (sb, vb) = found
        if sa.key == sb.key or sa.n != sb.n:
            return
        starts: list[tuple[int, Lab]] = []
        for s_, base in ((sa, 0), (sb, sa.n)):
            nd = len(self.g.values[s_.vid].shape)
            if s_.extra.get("op") == "embedding" and self.uses(s_.names[0]) > 1:
                more = self._table_starts(s_.names[0], [self.g.calls[c] for c in self.g.param_uses[s_.names[0]]],
                                          "columns", base)
                if more is None:
                    return
                starts += more
            else:
                starts.append((s_.vid, Lab(s_.label(base, nd), torch.zeros((1,) * nd, dtype=torch.int64))))
        oc = self._shift_run(starts, cancel=frozenset({call.id}))
        claimed = {frozenset((n, repr(i)) for n, i, _ in g.parts) for g in self.groups if g.symmetry == "translation"}
        for block in _components(oc, list(range(sa.n + sb.n))):
            if any(u in oc.broken for u in block) or not (any(u < sa.n for u in block) and any(u >= sa.n for u in block)):
                continue
            p0 = oc.uf.find(block[0])[1]
            parts: list[tuple[str, tuple, int]] = []
            sides = []
            for s_, lo in ((sa, 0), (sb, sa.n)):
                units = [u for u in block if lo <= u < lo + s_.n]
                signs = {1 if oc.uf.find(u)[1] == p0 else -1 for u in units}
                side = [(n, idx) for u in units for n, idx in _shift_parts(s_, u - lo)]
                if len(units) == s_.n and s_.n > 1 and len(signs) == 1:
                    name = side[0][0]
                    side = [(name, (slice(None),))]
                sides.append(side)
                parts += [(n, idx, 1 if oc.uf.find(u)[1] == p0 else -1) for u in units for n, idx in _shift_parts(s_, u - lo)] \
                    if len(side) > 1 or side[0][1] != (slice(None),) else [(side[0][0], (slice(None),), signs.pop())]
            if all(frozenset((n, repr(i)) for n, i in side) in claimed for side in sides):
                continue  # each side is a translation on its own: the pair adds nothing
            i0 = block[0]
            base = self.params[va].shape[0] + 2 * sa.n if sa.extra.get("op") == "embedding" else 2 * sa.n
            self._add("translation", sa.layer, base + i0, f"column {i0} against {sb.layer}" if len(block) == 2
                      else f"all against {sb.layer}", parts, bump=True)

    def _shift_source(self, vid: int) -> tuple[Seed, str] | None:
        """The layer whose units carry a constant shift into ``vid`` (an embedding's columns, a bias)
        through ops that keep it (reshapes, dtype casts, dropout off)."""
        for _ in range(64):
            call = self.g.producer(vid)
            if call is None:
                return None
            if vid == call.outputs[0]:
                seed = self.seed_of(call)
                if seed is not None:
                    if seed.extra.get("op") == "embedding":
                        w = seed.names[0]
                        if call.attrs.get("padding_idx") is not None:
                            return None
                        tied_ok = all(self.g.calls[c].op in ("embedding", "linear") for c in self.g.param_uses[w])
                        return (seed, w) if tied_ok else None
                    b = seed.extra.get("bias")
                    if b and b[0] == "plain" and self.uses(b[1]) == 1:
                        return seed, b[1]
                    return None
            if call.op in _IDENTITY_LIKE | _RESHAPES | _PERMUTES or (
                    call.op in _DROPOUTS and not (call.attrs.get("training", True) and call.attrs.get("p", 0.5) > 0)):
                vid = call.inputs[0]
                continue
            if call.op == "add" and len(call.inputs) == 2:
                # a sum (a residual stream): the most recent term that carries a shift
                for v in sorted(call.inputs, key=lambda i: -(self.g.values[i].producer or -1)):
                    found = self._shift_source(v)
                    if found is not None:
                        return found
            return None
        return None

    def _direct_params(self) -> None:
        """Parameters added to activations by hand (a position table, a class token): their shift
        translations (the whole tensor, and each row)."""
        for name, uses in self.g.param_uses.items():
            if name not in self.params or len(uses) != 1:
                continue
            c = self.g.calls[uses[0]]
            if c.op not in ("add", "sub", "cat", "concat", "stack", "expand", "expand_as", "repeat", "reshape", "view"):
                continue
            vid = self.g.leaf_of[name]
            shape = self.params[name].shape
            nd = len(shape)
            z = torch.zeros((1,) * nd, dtype=torch.int64)
            oc = self._shift_run([(vid, Lab(torch.zeros((1,) * nd, dtype=torch.int64), z))])
            if not oc.broken and oc.absorbed:
                self._add("translation", module_name(name), 0, "all", [(name, (slice(None),), 1)])
            elif oc.broken:
                self._why([name], f"no translation: {next(iter(oc.broken.values()))}")
            axis = 0 if shape[0] > 1 else (1 if nd >= 2 and shape[1] > 1 else None)
            if axis is None:
                continue
            lab_shape = [1] * nd
            lab_shape[axis] = shape[axis]
            L = torch.arange(shape[axis], dtype=torch.int64).reshape(lab_shape)
            oc = self._shift_run([(vid, Lab(L, z))])
            for block in _components(oc, list(range(shape[axis]))):
                if len(block) == shape[axis] or any(u in oc.broken for u in block) or not any(u in oc.absorbed for u in block):
                    continue
                idx = [((i,) if axis == 0 else (slice(None), i)) for i in block]
                self._add("translation", module_name(name), 1 + block[0], f"row {block[0]}" if len(block) == 1 else
                          f"rows {block[0]}-{block[-1]}", [(name, ix, 1) for ix in idx])

    # -- results --------------------------------------------------------------------------------
    def _add(self, symmetry, layer, index, label, parts, norms=(), bump: bool = False) -> bool:
        """Record a group. ``bump``: a group that several layers' runs can find (several layers'
        units, a variant, a signed pair): skipped when already recorded, and given the next free
        index when its (symmetry, layer, index) is taken."""
        parts = tuple(parts)
        if bump:
            key_parts = frozenset((n, repr(i), s) for n, i, s in parts)
            flipped = frozenset((n, repr(i), -s) for n, i, s in parts)
            if key_parts in self.seen or flipped in self.seen:
                return False
            self.seen.add(key_parts)
        key = (symmetry, layer, int(index))
        if key in self.keys:
            if not bump:
                return False
            index = int(index)
            while (symmetry, layer, index) in self.keys:
                index += 1 << 16
            key = (symmetry, layer, index)
        self.keys.add(key)
        self.groups.append(SymmetryGroup(symmetry, layer, int(index), label, parts, tuple(norms)))
        return True

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
                ops = sorted({self.g.calls[c].op for c in self.g.param_uses.get(name, []) if c in self.g.calls})
                skipped[name] = f"read by {', '.join(ops) or 'no op'}: no symmetry pattern applies"
        # groups come in dataflow order of their layers, each layer's by increasing index
        return Symmetries(self.groups, skipped, self.notes)


def _bases(seeds: list[Seed]) -> list[int]:
    out, b = [], 0
    for s in seeds:
        out.append(b)
        b += s.n
    return out


def _restrict(uf: UnionFind, base: int, n: int) -> UnionFind:
    """A union-find holding only the links between units base..base+n-1 of ``uf``."""
    out = UnionFind()
    roots: dict[int, tuple[int, int]] = {}
    for u in range(base, base + n):
        r, p = uf.find(u)
        if r in roots:
            v, q = roots[r]
            out.union(v, u, p ^ q)
        else:
            roots[r] = (u, p)
    return out


def _components(oc: Outcome, units: list[int]) -> list[list[int]]:
    comps: dict[int, list[int]] = {}
    linked = oc.uf.parent
    for u in units:
        comps.setdefault(oc.uf.find(u)[0] if u in linked else u, []).append(u)
    return sorted(comps.values(), key=lambda b: b[0])


def _shift_parts(seed: Seed, i: int) -> list[tuple[str, tuple]]:
    if seed.extra.get("op") == "embedding":
        return seed.incoming(i)
    b = seed.extra["bias"]
    return [(b[1], (i,))]


def _merge_runs(parts: list[tuple[str, tuple]], params: Mapping[str, torch.Tensor]) -> list[tuple[str, tuple]]:
    """One unit's outgoing columns: consecutive columns of one weight become one block when the
    tracker can read it as one (a width that divides the columns, aligned)."""
    if len(parts) <= 1:
        return parts
    cols: dict[str, list[int]] = {}
    other: list[tuple[str, tuple]] = []
    for name, idx in parts:
        if len(idx) == 2 and idx[0] == slice(None) and isinstance(idx[1], int):
            cols.setdefault(name, []).append(idx[1])
        elif (name, idx) not in other:
            other.append((name, idx))
    out: list[tuple[str, tuple]] = []
    for name, cs in cols.items():
        cs = sorted(set(cs))
        total = params[name].shape[1]
        runs: list[list[int]] = []
        for c in cs:
            if runs and c == runs[-1][1]:
                runs[-1][1] = c + 1
            else:
                runs.append([c, c + 1])
        for a, b in runs:
            w = b - a
            if w == 1:
                out.append((name, (slice(None), a)))
            elif total % w == 0 and a % w == 0:
                out.append((name, (slice(None), slice(a, b))))
            else:
                out += [(name, (slice(None), c)) for c in range(a, b)]
    return out + other


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
        total = params[name].shape[1]
        for a, b in runs:
            w = b - a
            if w == 1:
                out.append((name, (slice(None), a)))
            elif total % w == 0 and a % w == 0:
                out.append((name, (slice(None), slice(a, b))))
            else:
                out += [(name, (slice(None), c)) for c in range(a, b)]
    return out + other


def find_symmetries(model: torch.nn.Module, example_input: Any, output: str = "logits", class_axis: int = 1) -> Symmetries:
    """Every translation, scale and rescale group of ``model`` (docs/theory.md §2, §2b).

    ``example_input`` is what ``model`` is called with (a tensor, or a tuple of positional
    arguments). ``output="logits"`` says the model's (first) output feeds softmax / cross-entropy
    over ``class_axis`` (default 1, PyTorch's cross-entropy convention; -1 for ``(B, T, V)``
    language-model logits), so translation groups at the output are claimed; any other value
    claims none there unless the model applies softmax itself. A model that returns a Hugging
    Face ``ModelOutput`` is read through its ``logits``. BatchNorm counts as a normaliser only in
    training mode (the analysis reads the model in its current mode). The model (parameters,
    buffers, mode) is left unchanged.
    """
    if not isinstance(model, torch.nn.Module):
        raise InvalidArgumentError(f"model must be a torch.nn.Module, got {type(model).__name__}")
    if not isinstance(output, str):
        raise InvalidArgumentError(f"output must be a string such as 'logits', got {output!r}")
    if isinstance(class_axis, bool) or not isinstance(class_axis, int):
        raise InvalidArgumentError(f"class_axis must be an int (1, or -1 for (B, T, V) logits), got {class_axis!r}")
    modes = {m: m.training for m in model.modules()}
    collecting = gc.isenabled()
    gc.disable()  # tens of thousands of small tuples: the cyclic collector would cost more than the work
    try:
        graph = trace(model, example_input)
        return _Analysis(model, graph, output, class_axis).run()
    finally:
        for m, t in modes.items():
            m.training = t
        if collecting:
            gc.enable()
