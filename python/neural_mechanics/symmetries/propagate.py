"""Follow perturbations of layers' units through the dataflow graph to where they are absorbed.

Every symmetry of docs/theory.md §2 and §2b is a perturbation of some layers' outputs that later
ops undo. Two kinds are followed (``mode``):

- ``scale``: unit u of a layer's output is multiplied by α_u > 0. A BatchNorm / InstanceNorm
  absorbs it per channel, a GroupNorm per channel group, a LayerNorm / RMSNorm per normalised
  slice (the units met in one slice must move together); a Linear / Conv / Conv1D reading the
  unit absorbs it by dividing its input column by α_u (the outgoing side of rescale). A product of
  two perturbed tensors contracted over the units (q·kᵀ in attention) absorbs it when the other
  side carries 1/α: the two units are *paired*. Positively homogeneous ops (ReLU, pooling, dropout,
  reshapes, head splits, concatenation, multiplication by an unperturbed tensor) pass it on.
- ``shift``: a constant c_u is added to unit u (a bias entry, an embedding column), or one
  input-dependent amount to every unit at once (a Linear's column j, an embedding row). Mean-
  subtracting normalisers and softmax / cross-entropy absorb it when it is uniform along the
  normalised axis; attention turns a key shift into one that is uniform along the keys.

Where each unit is in every tensor is a *label* (labels.py), so a unit may be spread over several
axes (a head split) or appear several times (grouped-query attention). Units that must move
together are merged, units that must move inversely (q/k pairs, cancelling shifts) are linked with
odd parity, both in one union-find. Calls are visited in recorded order (a topological order), so
every input's label is known when a call is read. An op that does not preserve the perturbation
marks the units it sees as broken, with the reason, and the others go on. A perturbation that
needs another layer to move with it (the partner of a pairing, the other operand of a residual
add) asks for it (``Outcome.need``); the caller adds that layer's units and runs again.
"""

from __future__ import annotations

import heapq
import math
import string
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch

from .graph import Call, Graph, Slot
from .labels import MIX, NEG, NONE, Lab, align, compress, expand, positions, reduce_classes, reshape


class Broken(Exception):
    """The perturbation reaches an op that does not preserve it; the message says which."""


class UnionFind:
    """Units with a parity: parity 0 moves like the root (α, or +c), parity 1 inversely (1/α, −c)."""

    def __init__(self) -> None:
        self.parent: dict[int, int] = {}
        self.parity: dict[int, int] = {}

    def find(self, u: int) -> tuple[int, int]:
        if u not in self.parent:
            self.parent[u] = u
            self.parity[u] = 0
            return u, 0
        path = []
        x = u
        while self.parent[x] != x:
            path.append(x)
            x = self.parent[x]
        acc = 0
        for y in reversed(path):
            acc ^= self.parity[y]
            self.parity[y] = acc
            self.parent[y] = x
        return x, (self.parity[u] if u != x else 0)

    def union(self, u: int, v: int, odd: int) -> bool:
        """Require parity(u) xor parity(v) == odd; False when that contradicts earlier links."""
        ru, pu = self.find(u)
        rv, pv = self.find(v)
        if ru == rv:
            return (pu ^ pv) == odd
        if rv < ru:
            ru, rv, pu, pv = rv, ru, pv, pu
        self.parent[rv] = ru
        self.parity[rv] = pu ^ pv ^ odd
        return True

    def copy(self) -> UnionFind:
        out = UnionFind()
        out.parent = dict(self.parent)
        out.parity = dict(self.parity)
        return out


@dataclass
class Outcome:
    uf: UnionFind = field(default_factory=UnionFind)
    broken: dict[int, str] = field(default_factory=dict)  # unit -> why it cannot move
    # unit -> outgoing parts (param, index) of the layers that absorb it by their input columns
    consumers: dict[int, list[tuple[str, tuple]]] = field(default_factory=dict)
    # (module name or None, kind, eps, unit -> channels) of every normaliser that absorbed units
    normalizers: list[tuple] = field(default_factory=list)
    absorbed: set[int] = field(default_factory=set)  # units that reached a sink
    # requests: (value id, call id, what) whose producers must be perturbed too
    need: list[tuple[int, int, str]] = field(default_factory=list)
    # pass-through layers of a variant run: call id -> the unit created for its output
    passed: dict[int, int] = field(default_factory=dict)


_NOT_HOMOGENEOUS = {
    "hardtanh": "ReLU6 / Hardtanh", "relu6": "ReLU6", "gelu": "GELU", "silu": "SiLU", "sigmoid": "Sigmoid",
    "tanh": "Tanh", "hardswish": "Hardswish", "hardsigmoid": "Hardsigmoid", "elu": "ELU", "selu": "SELU",
    "celu": "CELU", "softplus": "Softplus", "mish": "Mish", "logsigmoid": "LogSigmoid", "exp": "exp",
    "softsign": "Softsign", "tanhshrink": "Tanhshrink", "threshold": "Threshold", "pow": "pow", "sqrt": "sqrt",
    "rsqrt": "rsqrt", "log": "log", "square": "square", "reciprocal": "reciprocal", "cos": "cos", "sin": "sin",
}
_IDENTITY_LIKE = {"contiguous", "clone", "float", "to", "type", "type_as", "double", "half", "bfloat16", "detach_copy"}
_DROPOUTS = {"dropout", "dropout1d", "dropout2d", "dropout3d", "feature_dropout", "alpha_dropout"}
_MAXPOOL = {"max_pool1d", "max_pool2d", "max_pool3d", "adaptive_max_pool1d", "adaptive_max_pool2d",
            "adaptive_max_pool3d"}
_AVGPOOL = {"avg_pool1d", "avg_pool2d", "avg_pool3d"}
_ADAPTIVE_AVG = {"adaptive_avg_pool1d", "adaptive_avg_pool2d", "adaptive_avg_pool3d"}
_RESHAPES = {"flatten", "view", "reshape", "squeeze", "unsqueeze", "unflatten", "view_as", "reshape_as"}
_PERMUTES = {"permute", "transpose", "t", "movedim", "moveaxis"}
# replayed on the label itself: they only move entries (views, copies, selections)
_REPLAY = {"getitem", "select", "narrow", "split", "chunk", "unbind", "tensor_split", "split_with_sizes",
           "expand", "expand_as", "repeat", "repeat_interleave", "tile", "flip", "roll"}
_BILINEAR = {"matmul", "bmm", "einsum", "baddbmm", "addmm", "mm"}
_NORMS = ("batch_norm", "instance_norm", "group_norm", "layer_norm", "rms_norm")
_RESIDUAL = "a residual add (or a sum with another tensor) is not homogeneous per unit"
Out = list[tuple[int, "Lab | None"]]  # a call's perturbed outputs


def _norm_axis(d: int, ndim: int) -> int:
    return d + ndim if d < 0 else d


def _spatial_dims(op: str) -> int:
    for k in ("1d", "2d", "3d"):
        if k in op:
            return int(k[0])
    return 0


def _strip(ids: torch.Tensor) -> torch.Tensor:
    """Unit ids without the shift sign."""
    return torch.where(ids >= 0, ids & (NEG - 1), ids)


class Propagator:
    def __init__(self, graph: Graph, output: str, class_axis: int, weight_kind: Callable[[int], tuple],
                 module_of: Callable[[Call], str | None], uses: Callable[[str], int]):
        self.g = graph
        self.output = output
        self.class_axis = class_axis
        self.weight_kind = weight_kind  # value id -> ("plain", name) / ("rows", name, r0, r1) / other kinds
        self.module_of = module_of  # normaliser call -> owning module name (for eps predictions)
        self.uses = uses  # parameter name -> number of ops that read it
        self.live = graph.live()

    # -- the sweep -----------------------------------------------------------------------------
    def run(self, starts: list[tuple[int, Lab]], mode: str, *, uf: UnionFind | None = None,
            refuse: frozenset[int] = frozenset(), cancel: frozenset[int] = frozenset(),
            passthrough: bool = False, fresh: int = 1 << 30, extend_adds: bool = True,
            scaled: dict[int, int] | None = None) -> Outcome:
        """Follow ``starts`` (value id, label) in ``mode``. ``refuse``: calls where a request for
        more layers is answered no (the op fails instead); ``cancel``: adds where two shifts are to
        cancel; ``passthrough``: a Linear whose whole input is one merged unit passes it on (its
        bias moves with it) instead of absorbing it; new unit ids for that start at ``fresh``;
        ``extend_adds``: whether an add may bring in the layers of its other operand; ``scaled``:
        weights (leaf value id -> unit) scaled as a whole with that unit (a tied embedding table
        read by an LM head), so their Linear's input must move inversely."""
        self.out = Outcome(uf=uf.copy() if uf is not None else UnionFind())
        self.mode, self.refuse, self.cancel, self.passthrough = mode, refuse, cancel, passthrough
        self.fresh = fresh
        self.extend_adds = extend_adds
        self.scaled = scaled or {}
        self.labels: dict[int, Lab] = {}
        self.heap: list[int] = []
        self.pushed: set[int] = set()
        for vid, lab in starts:
            self._assign(vid, lab)
        for leaf in self.scaled:
            for cid in self.g.values[leaf].consumers:
                if cid not in self.pushed:
                    self.pushed.add(cid)
                    heapq.heappush(self.heap, cid)
        while self.heap:
            call = self.g.calls[heapq.heappop(self.heap)]
            if not any(o in self.live for o in call.outputs):
                continue  # a side computation (e.g. an `if` test): it cannot change the loss
            ins = {v: self.labels[v] for v in dict.fromkeys(call.inputs) if v in self.labels}
            if self.scaled and call.op == "linear" and call.roles.get("weight") in self.scaled:
                try:
                    self._scaled_weight(call, ins)
                except Broken as e:
                    self._fail({self.scaled[call.roles["weight"]]} | set().union(*(lab.units() for lab in ins.values())), str(e))
                continue
            if not ins:
                continue
            try:
                results = self._step(call, ins)
            except Broken as e:
                self._fail(set().union(*(lab.units() for lab in ins.values())), str(e))
                continue
            for vid, out in results:
                self._assign(vid, out)
        return self.out

    def _assign(self, vid: int, lab: Lab | None) -> None:
        if lab is None or not bool((lab.L != NONE).any()):
            return
        self.labels[vid] = lab
        if self.g.outputs and vid in self.g.outputs:
            try:
                self._at_output(vid, lab)
            except Broken as e:
                self._fail(lab.units(), str(e))
        for cid in self.g.values[vid].consumers:
            if cid not in self.pushed:
                self.pushed.add(cid)
                heapq.heappush(self.heap, cid)

    def _fail(self, units: set[int], why: str) -> None:
        for u in units:
            self.out.broken.setdefault(u, why)

    def _link(self, pairs: torch.Tensor, odd: torch.Tensor | int, why: str) -> None:
        """Link unit pairs (rows of ``pairs``, unit ids with the shift sign bit) with parity ``odd``
        (xor the pair's sign bits); a contradiction breaks both."""
        if pairs.numel() == 0:
            return
        odd_t = torch.as_tensor(odd, dtype=torch.int64).expand(pairs.shape[0]) if not isinstance(odd, torch.Tensor) else odd
        sign = ((pairs[:, 0] >= NEG).long() ^ (pairs[:, 1] >= NEG).long()) if self.mode == "shift" else 0
        u, v = pairs[:, 0] & (NEG - 1), pairs[:, 1] & (NEG - 1)
        # one key per (u, v, parity) (unit ids stay below 2**30), deduplicated in one pass
        keys = torch.unique((u << 32 | v) << 1 | (odd_t ^ sign))
        rows = torch.stack([keys >> 33, (keys >> 1) & ((1 << 32) - 1), keys & 1], 1)
        for u, v, p in rows.tolist():
            if not self.out.uf.union(u, v, p):
                self._fail({u, v}, why)

    def _need(self, vid: int, call: Call, what: str, units: set[int]) -> None:
        """Ask for the producers of ``vid`` to move with these units, or fail when refused."""
        if call.id in self.refuse:
            raise Broken(what)
        self.out.need.append((vid, call.id, what))
        self.out.absorbed |= units  # waiting for the partner: not "unused"

    # -- sinks ----------------------------------------------------------------------------------
    def _at_output(self, vid: int, lab: Lab) -> None:
        if self.output != "logits" or vid != self.g.outputs[0]:
            raise Broken(f"the layer's output reaches the model output, and with output={self.output!r} the loss is not "
                         "known to absorb it")
        nd = len(self.g.values[vid].shape)
        axis = _norm_axis(self.class_axis, nd) if nd >= 2 else 0
        if not 0 <= axis < nd:
            raise Broken(f"the class axis {self.class_axis} is outside the logits' {nd} axes")
        self._softmax_like(vid, lab, (axis,), "the softmax of the logits")

    def _softmax_like(self, vid: int, lab: Lab, axes: tuple[int, ...], what: str) -> None:
        """A shift uniform over each slice along ``axes`` is absorbed (units met in one slice merge)."""
        if self.mode == "scale":
            raise Broken(f"{what} is not scale invariant")
        self._slices(vid, lab, axes, what)

    def _slices(self, vid: int, lab: Lab, axes: tuple[int, ...], what: str, kind: str | None = None,
                call: Call | None = None) -> None:
        """Absorption by an op that works on slices spanning ``axes`` (a normaliser, softmax): the
        units met in one slice must move together, every entry of a perturbed slice must be
        perturbed, and a shift must be uniform along the slice."""
        shape = self.g.values[vid].shape
        nd = len(shape)
        L = align(lab.L, nd)
        if self.mode == "shift" and lab.P is not None and any(align(lab.P, nd).shape[a] > 1 for a in axes):
            raise Broken(f"{what} is not taken along the shifted axis" if kind is None else
                         f"{what} normalises over more than the shifted axis")
        inside = [a for a in axes if L.shape[a] > 1]
        if inside:
            rest = [a for a in range(nd) if a not in axes]
            Lf = L.expand([shape[a] if a in inside else L.shape[a] for a in range(nd)])
            rows = Lf.permute(rest + list(axes)).reshape(math.prod(Lf.shape[a] for a in rest), -1)
            rows = torch.unique(rows, dim=0)
            has = rows != NONE
            if bool((has.any(1) & ~has.all(1)).any()):
                raise Broken(f"{what} also normalises entries that come from other layers")
            if bool((rows == MIX).any()) and rows.shape[1] > 1 and bool((rows != rows[:, :1]).any()):
                raise Broken(f"{what} mixes shifts of several units")
            if self.mode == "shift" and lab.P is not None and lab.P.numel() > 1 and bool((rows != rows[:, :1]).any()):
                raise Broken(f"{what} mixes input-dependent shifts of several units")
            pairs = torch.stack([rows[:, :1].expand_as(rows), rows], -1).reshape(-1, 2)
            pairs = pairs[(pairs >= 0).all(1)]
            self._link(pairs, 0, f"{what} merges units that are linked otherwise")
        units = lab.units()
        self.out.absorbed |= units
        if self.mode == "scale" and kind is not None:
            ch = _channels(L, shape)
            self.out.normalizers.append((self.module_of(call) if call is not None else None, kind,
                                         call.attrs.get("eps", 1e-5) if call is not None else 1e-5, ch))

    # -- one op ----------------------------------------------------------------------------------
    def _step(self, c: Call, ins: dict[int, Lab]) -> Out:
        op = c.op
        first = c.inputs[0] if c.inputs else None
        vid = next(iter(ins))
        lab = ins[vid]
        shape = self.g.values[vid].shape
        nd = len(shape)
        role = next((r for r, i in c.roles.items() if i == vid), None)
        outshape = self.g.values[c.outputs[0]].shape if c.outputs else ()
        scale = self.mode == "scale"

        def same(label: Lab = lab) -> Out:
            return [(c.outputs[0], label)]

        if op in _NOT_HOMOGENEOUS:
            raise Broken(f"the layer's output passes through {_NOT_HOMOGENEOUS[op]}, which is not positively homogeneous")
        if op in ("relu", "leaky_relu", "prelu", "abs") and vid == first and len(ins) == 1:
            if not scale:
                raise Broken(f"a constant shift does not pass through {op}")
            return same()
        if op in ("clamp", "clamp_min"):
            args = c.attrs.get("args") or (None,)
            lo = c.attrs.get("min", args[0])
            if scale and lo == 0 and c.attrs.get("max") is None and len(c.inputs) == 1:
                return same()
            raise Broken("the layer's output passes through clamp, which is not positively homogeneous")
        if op in _DROPOUTS:
            if not scale and c.attrs.get("training", True) and c.attrs.get("p", 0.5) > 0:
                raise Broken("a shift does not pass through dropout")
            return same()
        if op in _IDENTITY_LIKE:
            return same() if vid == first else []
        if op == "neg":
            return same(lab if scale else _negate(lab))
        if op in _MAXPOOL | _AVGPOOL | _ADAPTIVE_AVG or op in ("interpolate", "upsample"):
            k = _spatial_dims(op) or max(nd - 2, 1)
            L = align(lab.L, nd)
            if any(L.shape[a] > 1 for a in range(nd - k, nd)):
                raise Broken(f"{op} pools along the unit's own axis")
            if op in _MAXPOOL and not scale and lab.varying() & set(range(nd - k, nd)):
                raise Broken("max pooling does not keep an input-dependent shift uniform")
            if op in _AVGPOOL and not scale:
                pad = c.attrs.get("padding", 0)
                padded = any(p != 0 for p in (pad if isinstance(pad, (tuple, list)) else (pad,)))
                if (padded and c.attrs.get("count_include_pad", True)) or c.attrs.get("divisor_override"):
                    raise Broken("average pooling over zero padding does not pass a constant shift")
            return same(Lab(L, None if lab.P is None else _squash(align(lab.P, nd), outshape), lab.mix))
        if op == "pad":
            pads = c.attrs.get("pad", ())
            k = len(pads) // 2
            if any(align(lab.L, nd).shape[a] > 1 for a in range(nd - k, nd)):
                raise Broken("padding along the unit's own axis")
            pmode = c.attrs.get("mode", "constant")
            zero = pmode == "constant" and not c.attrs.get("value")
            if pmode == "constant" and not zero:
                raise Broken("padding with a non-zero constant is not homogeneous")
            if not scale and zero:
                raise Broken("zero padding does not shift with the channel")
            return same(Lab(align(lab.L, nd), None if lab.P is None else _squash(align(lab.P, nd), outshape),
                            lab.mix))
        if op in _RESHAPES:
            return same(self._reshaped(lab, shape, outshape))
        if op in _PERMUTES:
            return same(self._permuted(c, lab, nd))
        if op in _REPLAY:
            return self._replay(c, vid, lab)
        if op in ("mean", "sum", "amax", "nanmean", "nansum"):
            return self._reduce(c, lab, nd)
        if op in ("cat", "concat", "concatenate", "stack"):
            return self._cat(c, ins)
        if op in ("add", "sub", "rsub"):
            return self._add(c, ins, outshape)
        if op in ("mul", "div"):
            return self._mul(c, ins, outshape)
        if op == "masked_fill" and vid == first:
            value = c.attrs.get("value", (c.attrs.get("args") or (None,))[-1])
            if isinstance(value, (int, float)) and ((scale and (value == 0 or math.isinf(value)))
                                                    or (not scale and value <= -1e30)):
                return same()
            raise Broken("masked_fill with a value that does not move with the unit")
        # -- layers, attention, normalisers ----------------------------------------------------
        if op in ("linear", "conv1d", "conv2d", "conv3d"):
            if role != "input":
                raise Broken(f"the layer's output is used as the {role} of a {op}")
            if not scale:
                raise Broken(f"a shift feeds a {op}, which does not absorb it")
            if op == "linear" and self.passthrough:
                passed = self._pass_linear(c, lab, nd)
                if passed is not None:
                    return same(passed)
            self._absorb_columns(c, lab, nd, shape)
            return []
        if op in _BILINEAR:
            return self._bilinear_op(c, ins)
        if op == "scaled_dot_product_attention":
            return self._sdpa(c, ins)
        if op in ("batch_norm", "instance_norm"):
            if role != "input":
                raise Broken(f"the layer's output is used as the {role} of {op}")
            batch_stats = c.attrs.get("training", False) if op == "batch_norm" else c.attrs.get("use_input_stats", True)
            if op == "batch_norm" and "running_mean" not in c.roles:
                batch_stats = True
            if not batch_stats:
                raise Broken(f"{op} in eval mode uses running statistics and is an affine map")
            L = align(lab.L, nd)
            if nd < 2 or any(L.shape[a] > 1 for a in range(nd) if a != 1):
                raise Broken(f"{op} normalises another axis")
            if not scale and lab.varying() - {1}:
                raise Broken(f"{op} does not absorb an input-dependent shift")
            kind = "BatchNorm" if op == "batch_norm" else "InstanceNorm"
            axes = tuple(a for a in range(nd) if a != 1) if op == "batch_norm" else tuple(range(2, nd))
            self._slices(vid, lab, axes, op, kind, c)
            return []
        if op == "group_norm":
            L = align(lab.L, nd)
            if role != "input" or nd < 2 or any(L.shape[a] > 1 for a in range(nd) if a != 1) or lab.varying():
                raise Broken("group_norm does not absorb this perturbation")
            groups = int(c.attrs["num_groups"])
            Lf = L.expand([1, shape[1]] + [1] * (nd - 2)).reshape(groups, -1)
            has = Lf != NONE
            if bool((has.any(1) & ~has.all(1)).any()):
                raise Broken("a GroupNorm group mixes this layer's channels with other channels")
            pairs = torch.stack([Lf[:, :1].expand_as(Lf), Lf], -1).reshape(-1, 2)
            self._link(pairs[(pairs >= 0).all(1)], 0, "GroupNorm merges units that are linked otherwise")
            self.out.absorbed |= lab.units()
            if scale:
                self.out.normalizers.append((self.module_of(c), "GroupNorm", c.attrs.get("eps", 1e-5), _channels(L, shape)))
            return []
        if op in ("layer_norm", "rms_norm"):
            if role != "input":
                raise Broken(f"the layer's output is used as the {role} of {op}")
            ns = c.attrs.get("normalized_shape", ())
            k = len(ns) if isinstance(ns, (tuple, list)) else 1
            kind = "LayerNorm" if op == "layer_norm" else "RMSNorm"
            if op == "rms_norm" and not scale:
                raise Broken("RMSNorm does not subtract the mean, so it does not absorb a shift")
            self._slices(vid, lab, tuple(range(nd - k, nd)), kind, kind, c)
            return []
        if op in ("softmax", "log_softmax"):
            dim = c.attrs.get("dim")
            if dim is None or role not in ("input", None):
                raise Broken(f"{op} without an explicit dim")
            self._softmax_like(vid, lab, (_norm_axis(dim, nd),), op)
            return []
        if op == "cross_entropy":
            if role != "input":
                raise Broken("the layer's output is the target of cross_entropy")
            self._softmax_like(vid, lab, (1 if nd >= 2 else 0,), op)
            return []
        raise Broken(f"the layer's output passes through {op}, which the analysis does not know to preserve it")

    # -- shape ops ---------------------------------------------------------------------------------
    def _reshaped(self, lab: Lab, src: tuple, dst: tuple) -> Lab:
        L = reshape(lab.L, src, dst)
        if L is None:
            raise Broken(f"a reshape from {list(src)} to {list(dst)} the analysis cannot follow")
        P = None if lab.P is None else reshape(lab.P, src, dst)
        return Lab(L, P, lab.mix)

    def _permuted(self, c: Call, lab: Lab, nd: int) -> Lab:
        def perm(t: torch.Tensor) -> torch.Tensor:
            t = align(t, nd)
            if c.op == "t":
                return t.t() if nd == 2 else t
            if c.op == "transpose":
                return t.transpose(c.attrs["dim0"], c.attrs["dim1"])
            args = c.targs[1:] if c.targs and isinstance(c.targs[0], Slot) else c.attrs.get("args", ())
            kw = {k: v for k, v in c.tkwargs.items() if k not in ("input", "self")}
            return c.fn(t, *args, **kw) if c.fn is not None else t
        return Lab(perm(lab.L), None if lab.P is None else perm(lab.P), lab.mix)

    def _replay(self, c: Call, vid: int, lab: Lab) -> Out:
        """Run the op itself on the label (materialised to the value's shape as a broadcast view)."""
        shape = self.g.values[vid].shape
        if c.fn is None or not c.targs or c.targs[0] != Slot(vid):
            raise Broken(f"{c.op} reads the unit in a way the analysis does not follow")

        def sub(obj: Any, t: torch.Tensor) -> Any:
            if isinstance(obj, Slot):
                if obj.vid == vid:
                    return t
                other = self.g.values[obj.vid]
                if c.op in ("expand_as",):
                    return torch.empty(other.shape)
                raise Broken(f"{c.op} with a tensor argument the analysis does not follow")
            if isinstance(obj, tuple):
                return tuple(sub(o, t) for o in obj)
            if isinstance(obj, list):
                return [sub(o, t) for o in obj]
            if isinstance(obj, dict):
                return {k: sub(o, t) for k, o in obj.items()}
            return obj

        def run(t: torch.Tensor) -> list[torch.Tensor]:
            res = c.fn(*sub(c.targs, expand(t, shape)), **sub(c.tkwargs, expand(t, shape)))
            return list(res) if isinstance(res, (tuple, list)) else [res]

        Ls = run(lab.L)
        Ps = run(lab.P) if lab.P is not None else [None] * len(Ls)
        if len(Ls) != len(c.outputs):
            raise Broken(f"{c.op} returned an unexpected number of tensors")
        return [(o, Lab(compress(L), None if P is None else compress(P), lab.mix)) for o, L, P in zip(c.outputs, Ls, Ps)]

    def _reduce(self, c: Call, lab: Lab, nd: int) -> Out:
        dims = c.attrs.get("dim")
        if dims is None:
            args = c.attrs.get("args") or ()
            dims = args[0] if args else None
        if dims is None or dims == ():
            raise Broken(f"{c.op} over all axes mixes units")
        dims = {_norm_axis(d, nd) for d in (dims if isinstance(dims, (tuple, list)) else (dims,))}
        L = align(lab.L, nd)
        if any(L.shape[d] > 1 for d in dims):
            raise Broken(f"{c.op} over the unit's own axis mixes units")
        if c.op == "amax" and self.mode == "shift" and lab.varying() & dims:
            raise Broken("amax does not keep an input-dependent shift uniform")
        keep = bool(c.attrs.get("keepdim", False))
        newL = L if keep else L.reshape([n for a, n in enumerate(L.shape) if a not in dims])
        P = None if lab.P is None else reduce_classes(align(lab.P, nd), sorted(dims), keep)
        return [(c.outputs[0], Lab(newL, P, lab.mix))]

    def _cat(self, c: Call, ins: dict[int, Lab]) -> Out:
        n = c.attrs.get("n_tensors", 0)
        slots = [c.roles.get(f"tensors{k}") for k in range(n)]
        outshape = self.g.values[c.outputs[0]].shape
        nd = len(outshape)
        stack = c.op == "stack"
        dim = _norm_axis(c.attrs.get("dim", 0), nd)
        parts: list[tuple[torch.Tensor, torch.Tensor, int]] = []
        mix: frozenset[int] = frozenset()
        zero_like = None
        for s_ in slots:
            if s_ is not None and s_ in ins and not stack:
                L0 = align(ins[s_].L, nd)
                zero_like = Lab(L0.narrow(dim, 0, 1), None, ins[s_].mix)
                break
        for s_ in slots:
            if s_ is None:
                continue
            v = self.g.values[s_]
            if len(v.shape) == 1 and v.shape[0] == 0 and not stack:
                continue  # torch.cat skips empty 1-d tensors (a key/value cache's first step)
            size = 1 if stack else v.shape[dim]
            lab = ins.get(s_)
            if lab is None and self.mode == "scale" and _is_zeros(self.g, s_):
                lab = zero_like  # zeros scale with any unit: they take the label of a perturbed neighbour
            if lab is None:
                L, P = torch.full((1,) * nd, NONE, dtype=torch.int64), torch.zeros((1,) * nd, dtype=torch.int64)
            else:
                L = lab.L.unsqueeze(dim) if stack else align(lab.L, nd)
                P = torch.zeros((1,) * nd, dtype=torch.int64) if lab.P is None else (
                    lab.P.unsqueeze(dim) if stack else align(lab.P, nd))
                mix |= lab.mix
            parts.append((L, P, size))
        wide = [a for a in range(nd) if a != dim and any(t.shape[a] > 1 for L, P, _ in parts for t in (L, P))]

        def joined(k: int) -> torch.Tensor:
            ts = []
            for L_, P_, size in parts:
                shp = [outshape[a] if a in wide else 1 for a in range(nd)]
                shp[dim] = size
                ts.append((P_ if k else L_).expand(shp))
            return compress(torch.cat(ts, dim))

        return [(c.outputs[0], Lab(joined(0), None if self.mode == "scale" else joined(1), mix))]

    # -- arithmetic --------------------------------------------------------------------------------
    def _operands(self, c: Call, ins: dict[int, Lab]) -> tuple[int | None, int | None]:
        tensors = [i for i in c.inputs if self.g.values[i].floating or i in ins]
        a = tensors[0] if tensors else None
        b = tensors[1] if len(tensors) > 1 else None
        return a, b

    def _add(self, c: Call, ins: dict[int, Lab], outshape: tuple) -> Out:
        a, b = self._operands(c, ins)
        nd = len(outshape)
        negate_b = c.op == "sub"
        if c.op == "rsub":
            a, b = b, a
        if a is None:
            return []
        if self.mode == "scale":
            if b is None:
                raise Broken(_RESIDUAL)
            la, lb = ins.get(a), ins.get(b)
            if (la is None or lb is None) and not self.extend_adds:
                raise Broken(_RESIDUAL)
            if la is None or lb is None:
                present = la if la is not None else lb
                assert present is not None
                self._need(b if la is not None else a, c, _RESIDUAL, present.units())
                return []
            # labels broadcast against each other at their small (compressed) shapes
            La, Lb = torch.broadcast_tensors(align(la.L, nd), align(lb.L, nd))
            ha, hb = La != NONE, Lb != NONE
            if bool((ha != hb).any()):
                if not self.extend_adds:
                    raise Broken(_RESIDUAL)
                self._need(a if bool((hb & ~ha).any()) else b, c, _RESIDUAL, la.units() | lb.units())
                return []
            pairs = torch.stack([La[ha], Lb[hb]], 1)
            self._link(pairs, 0, "a sum of two perturbed tensors merges units that are linked otherwise")
            return [(c.outputs[0], Lab(compress(torch.where(ha, La, Lb)), None, frozenset()))]
        # shift mode
        if b is None:
            return [(c.outputs[0], ins[a])] if a in ins else []
        la, lb = ins.get(a), ins.get(b)
        if lb is not None and negate_b:
            lb = _negate(lb)
        if la is None or lb is None:
            lab = la or lb
            assert lab is not None
            return [(c.outputs[0], Lab(align(lab.L, nd), None if lab.P is None else align(lab.P, nd), lab.mix))]
        zero = torch.zeros(1, dtype=torch.int64)
        La, Lb, Pa, Pb = torch.broadcast_tensors(align(la.L, nd), align(lb.L, nd),
                                                 align(la.P if la.P is not None else zero, nd),
                                                 align(lb.P if lb.P is not None else zero, nd))
        ha, hb = La != NONE, Lb != NONE
        both = ha & hb
        if c.id in self.cancel:
            if bool((La[both] < 0).any()) or bool((Lb[both] < 0).any()):
                raise Broken("cancelling shifts must be single units")
            self._link(torch.stack([La[both], Lb[both]], 1), 1, "cancelling shifts that are linked otherwise")
            L = torch.where(both, torch.full_like(La, NONE), torch.where(ha, La, Lb))
            if bool((Pa[both] != Pb[both]).any()):
                raise Broken("cancelling shifts that vary differently")
            P = torch.where(ha, Pa, Pb)
            return [(c.outputs[0], Lab(compress(L), compress(P), la.mix | lb.mix))]
        if bool(both.any()) and not (torch.equal(La[both], Lb[both]) and la.P is not None and lb.P is not None
                                     and torch.equal(Pa[both], Pb[both])):
            raise Broken("an add whose other operand depends on the same layer")
        L = torch.where(ha, La, Lb)
        return [(c.outputs[0], Lab(compress(L), compress(torch.where(ha, Pa, Pb)), la.mix | lb.mix))]

    def _mul(self, c: Call, ins: dict[int, Lab], outshape: tuple) -> Out:
        a, b = self._operands(c, ins)
        nd = len(outshape)
        if c.op == "div" and b is not None and b in ins:
            raise Broken("the layer's output divides by the unit's value")
        if a in ins and b in ins:
            raise Broken(f"{c.op} by a tensor that is not a constant of the unit")
        mine = a if a in ins else b
        other = b if mine == a else a
        lab = ins[mine]  # type: ignore[index]
        L = align(lab.L, nd)
        if self.mode == "scale":
            return [(c.outputs[0], Lab(L, None, lab.mix))]
        P = align(lab.P if lab.P is not None else torch.zeros(1, dtype=torch.int64), nd)
        scalar = c.attrs.get("other", (c.attrs.get("args") or (None,))[0])
        if other is not None:
            # the shift is now multiplied by a tensor: it varies wherever that tensor does
            oshape = align(torch.empty(self.g.values[other].shape), nd).shape
            axes = [x for x in range(nd) if oshape[x] > 1]
            if axes:
                P = positions(outshape, sorted(set(axes) | {x for x in range(nd) if P.shape[x] > 1}))
        elif isinstance(scalar, (int, float)) and scalar < 0:
            return [(c.outputs[0], _negate(Lab(L, P, lab.mix)))]
        return [(c.outputs[0], Lab(L, compress(P), lab.mix))]

    def _scaled_weight(self, c: Call, ins: dict[int, Lab]) -> None:
        """A Linear whose whole weight is scaled with unit u: its input must carry 1/α_u on every
        column (the reader of a tied table: the final norm's gain against the embedding)."""
        u = self.scaled[c.roles["weight"]]
        x = c.roles.get("input")
        if x is None or any(r in ins for r in (c.roles["weight"], c.roles.get("bias")) if r is not None):
            raise Broken("a Linear whose weight is scaled reads other perturbed tensors")
        if self.mode != "scale":
            raise Broken("a shifted weight")
        if x not in ins:
            self._need(x, c, "a scaled weight whose input does not move inversely", {u})
            return
        lab = ins[x]
        nd = len(self.g.values[x].shape)
        L = align(lab.L, nd)
        if any(L.shape[a] > 1 for a in range(nd - 1)) or bool((L == NONE).any()):
            raise Broken("a scaled weight whose input moves only in part")
        pairs = torch.stack([L.reshape(-1), torch.full((L.numel(),), u, dtype=torch.int64)], 1)
        self._link(pairs, 1, "a scaled weight against its input")
        self.out.absorbed |= lab.units() | {u}

    # -- layers that absorb a scale by their input columns ---------------------------------------
    def _absorb_columns(self, c: Call, lab: Lab, nd: int, shape: tuple) -> None:
        wvid = c.roles["weight"]
        wkind = self.weight_kind(wvid)
        if wkind[0] not in ("plain", "rows"):
            raise Broken("the layer's output feeds a layer whose weight is parametrised (its columns are not trained leaves)")
        name = wkind[1]
        if self.uses(name) > 1:
            raise Broken(f"the layer's output feeds {name}, which is tied: read by {self.uses(name)} ops, so its columns cannot move alone")
        r0, r1 = (wkind[2], wkind[3]) if wkind[0] == "rows" else (None, None)
        L = align(lab.L, nd)
        units_parts: dict[int, list[tuple[str, tuple]]] = {}
        if c.op == "linear":
            if any(L.shape[a] > 1 for a in range(nd - 1)):
                raise Broken("the layer's output feeds a Linear along another axis")
            cols = L.reshape(-1)
            if cols.numel() == 1:
                cols = cols.expand(shape[-1])
            for j, u in enumerate(cols.tolist()):
                if u >= 0:
                    idx = (slice(None), j) if r0 is None else (slice(r0, r1), j)
                    units_parts.setdefault(u, []).append((name, idx))
        else:
            if nd < 2 or any(L.shape[a] > 1 for a in range(nd) if a != 1):
                raise Broken("the layer's output feeds a convolution along another axis")
            wshape = self.g.values[wvid].shape
            groups = int(c.attrs.get("groups", 1))
            cin_g, out_g = wshape[1], wshape[0] // groups
            chans = L.reshape(-1)
            if chans.numel() == 1:
                chans = chans.expand(shape[1])
            for ch, u in enumerate(chans.tolist()):
                if u < 0:
                    continue
                if groups == 1:
                    idx = (slice(None), ch) if r0 is None else (slice(r0, r1), ch)
                else:
                    k = ch // cin_g
                    idx = (slice(k * out_g, (k + 1) * out_g), ch - k * cin_g)
                units_parts.setdefault(u, []).append((name, idx))
        for u, parts in units_parts.items():
            self.out.consumers.setdefault(u, []).extend(parts)
        self.out.absorbed |= set(units_parts)

    def _absorb_rows(self, c: Call, lab: Lab, wvid: int) -> None:
        """x @ W with W (in, out) a trained leaf (Hugging Face Conv1D's addmm): unit on x's last
        axis, absorbed by the rows of W."""
        wkind = self.weight_kind(wvid)
        if wkind[0] != "plain":
            raise Broken("the layer's output feeds a matrix product whose weight is computed by code")
        name = wkind[1]
        if self.uses(name) > 1:
            raise Broken(f"the layer's output feeds {name}, which is tied: read by {self.uses(name)} ops, so its rows cannot move alone")
        nd = lab.L.dim()
        L = lab.L
        if any(L.shape[a] > 1 for a in range(nd - 1)):
            raise Broken("the layer's output feeds a matrix product along another axis")
        rows = L.reshape(-1)
        if rows.numel() == 1:
            rows = rows.expand(self.g.values[wvid].shape[0])
        found: set[int] = set()
        for j, u in enumerate(rows.tolist()):
            if u >= 0:
                self.out.consumers.setdefault(u, []).append((name, (j,)))
                found.add(u)
        self.out.absorbed |= found

    def _pass_linear(self, c: Call, lab: Lab, nd: int) -> Lab | None:
        """Variant runs: a Linear whose whole input is one merged unit passes it on (output ×α with
        its bias ×α), instead of absorbing it by its columns."""
        L = align(lab.L, nd)
        ids = torch.unique(L)
        if bool((ids < 0).any()) or any(L.shape[a] > 1 for a in range(nd - 1)):
            return None
        roots = {self.out.uf.find(int(u))[0] for u in ids.tolist()}
        pars = {self.out.uf.find(int(u))[1] for u in ids.tolist()}
        if len(roots) != 1 or len(pars) != 1:
            return None
        wkind = self.weight_kind(c.roles["weight"])
        bias = c.roles.get("bias")
        if wkind[0] != "plain" or self.uses(wkind[1]) > 1 or (bias is not None and self.g.values[bias].kind != "param"):
            return None
        u = self.fresh + len(self.out.passed)
        self.out.passed[c.id] = u
        self.out.uf.union(int(ids[0]), u, 0)
        return Lab(torch.full((1,) * nd, u, dtype=torch.int64))

    # -- products of two tensors (attention) ------------------------------------------------------
    def _bilinear_op(self, c: Call, ins: dict[int, Lab]) -> Out:
        op = c.op
        t = [i for i in c.inputs if self.g.values[i].floating]
        outshape = self.g.values[c.outputs[0]].shape
        if op == "einsum":
            eq = c.targs[0] if c.targs and isinstance(c.targs[0], str) else None
            ops = [x.vid for x in (c.targs[1:] if len(c.targs) > 2 else (c.targs[1] if len(c.targs) > 1 else ()))
                   if isinstance(x, Slot)]
            if eq is None or len(ops) != 2:
                raise Broken("einsum with other than two operands")
            spec = _einsum_spec(eq, [self.g.values[o].shape for o in ops])
            return [(c.outputs[0], self._bilinear(c, ops[0], ops[1], spec, ins, outshape))]
        if op in ("addmm", "baddbmm"):
            base = c.roles.get("input")
            m1 = c.roles.get("mat1", c.roles.get("batch1"))
            m2 = c.roles.get("mat2", c.roles.get("batch2"))
            if m1 is None or m2 is None:
                raise Broken(f"{op} with arguments the analysis does not read")
            if op == "addmm" and self.g.values[m2].kind == "param" and m1 in ins and m2 not in ins and base not in ins:
                if self.mode != "scale":
                    raise Broken("a shift feeds a matrix product with a weight, which does not absorb it")
                self._absorb_rows(c, ins[m1], m2)
                return []
            if base in ins:
                raise Broken(f"the added term of {op} is perturbed")
            spec = _matmul_spec(self.g.values[m1].shape, self.g.values[m2].shape)
            return [(c.outputs[0], self._bilinear(c, m1, m2, spec, ins, outshape))]
        a, b = t[0], t[1] if len(t) > 1 else t[0]
        if op in ("matmul", "mm") and self.g.values[b].kind == "param" and len(self.g.values[b].shape) == 2 \
                and a in ins and b not in ins:
            if self.mode != "scale":
                raise Broken("a shift feeds a matrix product with a weight, which does not absorb it")
            self._absorb_rows(c, ins[a], b)
            return []
        spec = _matmul_spec(self.g.values[a].shape, self.g.values[b].shape)
        return [(c.outputs[0], self._bilinear(c, a, b, spec, ins, outshape))]

    def _bilinear(self, c: Call, a: int, b: int, spec: tuple[str, str, str], ins: dict[int, Lab],
                  outshape: tuple, gqa: int = 1) -> Lab | None:
        """The label of out[spec[2]] = Σ a[spec[0]] b[spec[1]] (einsum letters)."""
        sa, sb, so = spec
        la, lb = ins.get(a), ins.get(b)
        if la is None and lb is None:
            return None
        La = None if la is None else align(la.L, len(sa))
        Lb = None if lb is None else align(lb.L, len(sb))
        if gqa > 1 and Lb is not None:
            Lb = _repeat_heads(Lb, gqa, len(sb) - 3)
        contr = [x for x in sa if x in sb and x not in so]
        free_a = [x for x in sa if x not in sb]
        free_b = [x for x in sb if x not in sa]
        on = lambda L, s, letters: any(L.shape[s.index(x)] > 1 for x in letters)  # noqa: E731
        if self.mode == "scale":
            if La is not None and Lb is not None:
                if on(La, sa, free_a) or on(Lb, sb, free_b):
                    raise Broken("a product of two perturbed tensors that the analysis cannot pair")
                common = [x for x in sa if x in sb]
                A = _letters(La, sa, common)
                B = _letters(Lb, sb, common)
                A, B = torch.broadcast_tensors(A, B)
                ha, hb = A != NONE, B != NONE
                if bool((ha != hb).any()):
                    raise Broken("a product pairs perturbed entries with unperturbed ones")
                self._link(torch.stack([A[ha], B[hb]], 1), 1, "pairs units that are linked otherwise")
                self.out.absorbed |= la.units() | lb.units()  # type: ignore[union-attr]
                return None
            lab, L, s, other = (la, La, sa, b) if la is not None else (lb, Lb, sb, a)
            assert L is not None and lab is not None
            if on(L, s, contr):
                self._need(other, c, "a product over the unit's axis with a tensor that does not move with it",
                           lab.units())
                return None
            return Lab(_to_letters(L, s, so), None, lab.mix)
        # shift: Σ_k δ(a) b or a δ(b); uniform only along the shifted operand's own free axes
        if la is not None and lb is not None:
            raise Broken("a product of two shifted tensors")
        lab, L, s, mine_free = (la, La, sa, free_a) if la is not None else (lb, Lb, sb, free_b)
        assert L is not None and lab is not None
        P = align(lab.P if lab.P is not None else torch.zeros(1, dtype=torch.int64), len(s))
        if gqa > 1 and la is None:
            P = _repeat_heads(P, gqa, len(sb) - 3)
        uniform = [x for x in mine_free if L.shape[s.index(x)] == 1 and P.shape[s.index(x)] == 1]
        present = _to_letters((L != NONE).long() * 2 - 1, s, so, reduce="max")
        Lout = torch.where(present > 0, torch.full_like(present, MIX), torch.full_like(present, NONE))
        vary = [i for i, x in enumerate(so) if x not in uniform]
        return Lab(compress(Lout), positions(outshape, vary), lab.units() | set(lab.mix))  # type: ignore[arg-type]

    def _sdpa(self, c: Call, ins: dict[int, Lab]) -> Out:
        q, k, v = (c.roles.get(r) for r in ("query", "key", "value"))
        if q is None or k is None or v is None:
            raise Broken("scaled_dot_product_attention with arguments the analysis does not read")
        mask = c.roles.get("attn_mask")
        if mask is not None and mask in ins:
            raise Broken("the attention mask is perturbed")
        qs, ks = self.g.values[q].shape, self.g.values[k].shape
        nd = len(qs)
        gqa = 1
        if nd >= 3 and ks[-3] != qs[-3]:
            if not c.attrs.get("enable_gqa", False) or qs[-3] % ks[-3]:
                raise Broken("attention heads the analysis cannot match")
            gqa = qs[-3] // ks[-3]
        letters = string.ascii_lowercase[: nd - 2]
        spec = (letters + "ix", letters + "jx", letters + "ij")
        scores = self._bilinear(c, q, k, spec, ins, tuple(qs[:-1]) + (ks[-2],), gqa)
        if scores is not None:
            sshape = tuple(qs[:-1]) + (ks[-2],)
            self._softmax_like_value(sshape, scores, (nd - 1,), "the attention softmax")
        if v not in ins:
            return []
        lv = ins[v]
        Lv = align(lv.L, nd)
        if gqa > 1:
            Lv = _repeat_heads(Lv, gqa, nd - 3)
        if Lv.shape[-2] > 1:
            raise Broken("values whose unit changes along the keys")
        outshape = self.g.values[c.outputs[0]].shape
        if self.mode == "scale":
            return [(c.outputs[0], Lab(Lv, None, lv.mix))]
        Pv = align(lv.P if lv.P is not None else torch.zeros(1, dtype=torch.int64), nd)
        vary = [a for a in range(nd) if a == nd - 2 or (a < nd - 2) or Pv.shape[a] > 1]
        return [(c.outputs[0], Lab(Lv, positions(outshape, vary), lv.mix))]

    def _softmax_like_value(self, shape: tuple, lab: Lab, axes: tuple[int, ...], what: str) -> None:
        """_softmax_like for an intermediate that is not a graph value (inside an attention op)."""
        if self.mode == "scale":
            raise Broken(f"{what} is not scale invariant: the attention scores are scaled")
        nd = len(shape)
        if lab.P is not None and any(align(lab.P, nd).shape[a] > 1 for a in axes):
            raise Broken(f"{what} is not taken along the shifted axis")
        L = align(lab.L, nd)
        rows = expand(L, shape)
        has = rows != NONE
        if bool((has.any(axes[0]) & ~has.all(axes[0])).any()):
            raise Broken(f"{what} also normalises entries that come from other layers")
        if any(L.shape[a] > 1 for a in axes):
            raise Broken(f"{what} mixes shifts of several units")
        self.out.absorbed |= lab.units()


# -- helpers ----------------------------------------------------------------------------------------
def _is_zeros(g: Graph, vid: int) -> bool:
    """A tensor of zeros made by the forward (nn.MultiheadAttention's add_zero_attn)."""
    p = g.producer(vid)
    if p is None or p.inputs:
        return False
    if p.op in ("zeros", "zeros_like", "new_zeros"):
        return True
    return p.op == "full" and (p.attrs.get("args") or (None, None))[-1] == 0


def _negate(lab: Lab) -> Lab:
    L = lab.L
    L = torch.where(L >= 0, L ^ NEG, L)
    return Lab(L, lab.P, lab.mix)


def _squash(P: torch.Tensor, outshape: tuple) -> torch.Tensor:
    """Classes after an op that changes the sizes of some axes (pooling, padding): every position
    along an axis the shift varied along gets its own class."""
    return positions(outshape, [a for a in range(P.dim()) if P.shape[a] > 1])


def _channels(L: torch.Tensor, shape: tuple) -> dict[int, tuple[int, ...]]:
    """unit -> the channels (axis 1, or the last axis for a 1-d normaliser input) it occupies."""
    nd = len(shape)
    axis = 1 if nd >= 2 else 0
    Lf = L
    if Lf.dim() > axis and Lf.shape[axis] > 1:
        others = [a for a in range(nd) if a != axis]
        col = Lf.permute([axis] + others).reshape(Lf.shape[axis], -1)[:, 0]
    else:
        col = Lf.reshape(-1)[:1].expand(shape[axis] if nd else 1)
    out: dict[int, list[int]] = {}
    for ch, u in enumerate(col.tolist()):
        if u >= 0:
            out.setdefault(u & (NEG - 1), []).append(ch)
    return {u: tuple(v) for u, v in out.items()}


def _matmul_spec(sa: tuple, sb: tuple) -> tuple[str, str, str]:
    """einsum letters of torch.matmul's broadcasting rules."""
    na, nb = len(sa), len(sb)
    if na == 1 and nb == 1:
        return "k", "k", ""
    batch = string.ascii_lowercase[: max(na, nb) - 2] if max(na, nb) > 2 else ""
    A = (batch[len(batch) - (na - 2):] if na > 2 else "") + ("ik" if na >= 2 else "k")
    B = (batch[len(batch) - (nb - 2):] if nb > 2 else "") + ("kj" if nb >= 2 else "k")
    out = batch + ("i" if na >= 2 else "") + ("j" if nb >= 2 else "")
    return A.replace("k", "z"), B.replace("k", "z"), out


def _einsum_spec(eq: str, shapes: list[tuple]) -> tuple[str, str, str]:
    eq = eq.replace(" ", "")
    lhs, _, rhs = eq.partition("->")
    ins = lhs.split(",")
    if "..." in eq:
        n = max(len(s) - len(i.replace("...", "")) for s, i in zip(shapes, ins))
        fill = "".join(ch for ch in string.ascii_uppercase if ch not in eq)[:n]
        ins = [i.replace("...", fill[n - (len(s) - len(i.replace("...", ""))):]) for s, i in zip(shapes, ins)]
        rhs = rhs.replace("...", fill) if "->" in eq else rhs
    if "->" not in eq:
        letters = "".join(ins)
        rhs = "".join(sorted(x for x in set(letters) if letters.count(x) == 1))
    return ins[0], ins[1], rhs


def _letters(L: torch.Tensor, s: str, keep: list[str]) -> torch.Tensor:
    """L (axes named by ``s``) reduced to the axes ``keep`` (it must not vary along the others),
    in ``keep``'s order."""
    idx = [s.index(x) for x in keep]
    rest = [a for a in range(len(s)) if a not in idx]
    return L.permute(idx + rest).reshape([L.shape[a] for a in idx] + [-1])[..., 0]


def _to_letters(L: torch.Tensor, s: str, so: str, reduce: str | None = None) -> torch.Tensor:
    """A label over letters ``s`` written over the output letters ``so`` (axes missing from ``s``
    are broadcast; axes of ``s`` missing from ``so`` are reduced: taken where constant, else
    ``reduce``)."""
    gone = [a for a, x in enumerate(s) if x not in so]
    if gone:
        if reduce == "max":
            L = L.amax(dim=gone)
        else:
            L = L.reshape([n for a, n in enumerate(L.shape) if a not in gone]) if all(L.shape[a] == 1 for a in gone) \
                else L.amax(dim=gone)
        s = "".join(x for x in s if x in so)
    order = [s.index(x) for x in so if x in s]
    L = L.permute(order) if order else L
    shape, k = [], 0
    for x in so:
        if x in s:
            shape.append(L.shape[k])
            k += 1
        else:
            shape.append(1)
    return compress(L.reshape(shape))


def _repeat_heads(L: torch.Tensor, n: int, axis: int) -> torch.Tensor:
    """Grouped-query attention: each key/value head read by ``n`` query heads in a row."""
    if axis < 0 or L.shape[axis] == 1:
        return L
    return L.repeat_interleave(n, dim=axis)
