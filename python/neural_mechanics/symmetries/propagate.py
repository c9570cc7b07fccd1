"""Follow one perturbation of a layer's output through the dataflow graph to where it is absorbed.

Every symmetry of docs/theory.md §2 is a perturbation of one layer's output that some later op
undoes. Three kinds are followed ("mode"):

- ``scale``: channel (unit) i of the output is multiplied by alpha > 0. A BatchNorm /
  InstanceNorm absorbs it per channel, a GroupNorm per channel group, a LayerNorm / RMSNorm over
  the whole normalised set; a Linear / Conv reading the channel absorbs it by dividing its input
  column by alpha (the outgoing side of rescale). Positively homogeneous per-channel ops (ReLU,
  LeakyReLU, PReLU, pooling, dropout, zero padding, flatten...) pass it on.
- ``shift``: a constant c is added to channel i (a bias entry). Mean-subtracting normalisers
  and softmax / cross-entropy absorb it; max / average pooling and reshapes pass it on.
- ``colshift``: the same (input-dependent) amount is added to every channel (a column of the
  weight). Softmax / cross-entropy along that axis and a LayerNorm over exactly that axis absorb it.

A unit's place in a tensor is ``Loc(axis, bs, off)``: unit i covers indices
[off + i*bs, off + (i+1)*bs) along ``axis`` (bs > 1 after a flatten, off > 0 after a concat).
Anything not known to preserve the perturbation stops the search with a reason; a value with
several consumers keeps the symmetry only if every consumer keeps it.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass, field

from .graph import Call, Graph


class Broken(Exception):
    """The perturbation reaches an op that does not preserve it; the message says which."""


@dataclass(frozen=True)
class Loc:
    axis: int
    bs: int = 1
    off: int = 0

    def channels(self, i: int) -> range:
        return range(self.off + i * self.bs, self.off + (i + 1) * self.bs)


@dataclass
class Outcome:
    merges: list[list[int]] = field(default_factory=list)  # units that must move together
    # per consumer: unit -> outgoing parts (param, index) of that consumer
    consumers: list[Callable[[int], list[tuple[str, tuple]]]] = field(default_factory=list)
    # (module name or None, kind, eps, unit -> channels) of every normaliser that absorbed it
    normalizers: list[tuple] = field(default_factory=list)
    absorbed: bool = False  # some sink was reached


_NOT_HOMOGENEOUS = {
    "hardtanh": "ReLU6 / Hardtanh", "relu6": "ReLU6", "gelu": "GELU", "silu": "SiLU", "sigmoid": "Sigmoid",
    "tanh": "Tanh", "hardswish": "Hardswish", "hardsigmoid": "Hardsigmoid", "elu": "ELU", "selu": "SELU",
    "celu": "CELU", "softplus": "Softplus", "mish": "Mish", "logsigmoid": "LogSigmoid", "exp": "exp",
    "softsign": "Softsign", "tanhshrink": "Tanhshrink", "threshold": "Threshold",
}
_IDENTITY_LIKE = {"contiguous", "clone", "float", "to", "type", "type_as", "double", "half", "bfloat16"}
_DROPOUTS = {"dropout", "dropout1d", "dropout2d", "dropout3d", "feature_dropout"}
_MAXPOOL = {"max_pool1d", "max_pool2d", "max_pool3d", "adaptive_max_pool1d", "adaptive_max_pool2d",
            "adaptive_max_pool3d"}
_AVGPOOL = {"avg_pool1d", "avg_pool2d", "avg_pool3d"}
_ADAPTIVE_AVG = {"adaptive_avg_pool1d", "adaptive_avg_pool2d", "adaptive_avg_pool3d"}
_RESHAPES = {"flatten", "view", "reshape", "squeeze", "unsqueeze", "unflatten", "view_as", "reshape_as"}


def _norm_axis(d: int, ndim: int) -> int:
    return d + ndim if d < 0 else d


def _spatial_dims(op: str) -> int:
    for k in ("1d", "2d", "3d"):
        if k in op:
            return int(k[0])
    return 0


def _reshape_loc(src: tuple[int, ...], dst: tuple[int, ...], loc: Loc) -> Loc:
    """Where a unit lands after a reshape; Broken if it is no longer a block along one axis."""
    a = loc.axis
    outer = math.prod(src[:a])
    inner = math.prod(src[a + 1:])
    cands = [b for b in range(len(dst))
             if math.prod(dst[:b]) == outer and inner % max(math.prod(dst[b + 1:]), 1) == 0]
    preferred = [b for b in cands if dst[b] > 1] or cands
    if not preferred:
        raise Broken(f"a reshape from {list(src)} to {list(dst)} splits the unit across axes")
    best = (preferred[-1], max(math.prod(dst[preferred[-1] + 1:]), 1))
    b, inner2 = best
    f = inner // inner2
    return Loc(b, loc.bs * f, loc.off * f)


class Propagator:
    def __init__(self, graph: Graph, output: str, weight_kind: Callable[[int], tuple],
                 module_of: Callable[[Call], str | None]):
        self.g = graph
        self.output = output
        self.weight_kind = weight_kind  # value id -> ("plain", name) / other kinds
        self.module_of = module_of  # normaliser call -> owning module name (for eps predictions)
        self.live = graph.live()

    def run(self, start: int, loc: Loc, n_units: int, mode: str) -> Outcome:
        out = Outcome()
        reach = self.g.reachable_from(start)
        seen: set[tuple[int, Loc]] = set()
        stack = [(start, loc)]
        while stack:
            vid, lc = stack.pop()
            if (vid, lc) in seen:
                continue
            seen.add((vid, lc))
            val = self.g.values[vid]
            if self.g.outputs and vid in self.g.outputs:
                self._at_output(vid, lc, n_units, mode, out)
            for cid in val.consumers:
                call = self.g.calls[cid]
                if not any(o in self.live for o in call.outputs):
                    continue  # a side computation (e.g. an `if` test): it cannot change the loss
                stack.extend(self._step(call, vid, lc, n_units, mode, reach, out))
        return out

    # -- sinks -------------------------------------------------------------------------------
    def _full(self, shape: tuple[int, ...], lc: Loc, n_units: int) -> bool:
        return lc.off == 0 and lc.bs * n_units == shape[lc.axis]

    def _merge_all(self, shape, lc, n_units, out: Outcome, what: str) -> None:
        if not self._full(shape, lc, n_units):
            raise Broken(f"{what} also normalises entries that come from other layers")
        out.merges.append(list(range(n_units)))

    def _at_output(self, vid: int, lc: Loc, n_units: int, mode: str, out: Outcome) -> None:
        if self.output != "logits" or vid != self.g.outputs[0]:
            raise Broken(f"reaches the model output, and with output={self.output!r} the loss is not "
                         "known to absorb it")
        shape = self.g.values[vid].shape
        class_axis = 1 if len(shape) >= 2 else 0  # cross_entropy's class axis
        self._softmax_like(shape, lc, n_units, mode, class_axis, out, "the softmax of the logits")

    def _softmax_like(self, shape, lc, n_units, mode, dim, out, what) -> None:
        if mode == "shift":
            if dim == lc.axis:
                self._merge_all(shape, lc, n_units, out, what)
        elif mode == "colshift":
            if dim != lc.axis or not self._full(shape, lc, n_units):
                raise Broken(f"{what} is not taken along the shifted axis")
        else:
            raise Broken(f"{what} is not scale invariant")
        out.absorbed = True

    # -- one op ------------------------------------------------------------------------------
    def _step(self, c: Call, vid: int, lc: Loc, n_units: int, mode: str, reach: set[int], out: Outcome):
        op = c.op
        shape = self.g.values[vid].shape
        nd = len(shape)
        nuses = c.inputs.count(vid)
        if nuses > 1 and op != "cat":
            raise Broken(f"{op} reads the same tensor twice")
        others = [i for i in c.inputs if i != vid]
        role = next((r for r, i in c.roles.items() if i == vid), None)
        same = [(o, lc) for o in c.outputs[:1]]
        outshape = self.g.values[c.outputs[0]].shape if c.outputs else ()

        def others_free() -> bool:
            return not any(o in reach for o in others)

        if op in _NOT_HOMOGENEOUS:
            raise Broken(f"passes through {_NOT_HOMOGENEOUS[op]}, which is not positively homogeneous")
        if op in ("relu", "leaky_relu", "prelu") and others_free():
            if mode != "scale":
                raise Broken(f"a constant shift does not pass through {op}")
            return same
        if op in ("clamp", "clamp_min"):
            lo = c.attrs.get("min", c.attrs.get("args", (None,))[0] if c.attrs.get("args") else None)
            if mode == "scale" and lo == 0 and c.attrs.get("max") is None and not others:
                return same
            raise Broken("passes through clamp, which is not positively homogeneous")
        if op in _DROPOUTS:
            if mode != "scale" and c.attrs.get("training", True) and c.attrs.get("p", 0.5) > 0:
                raise Broken("a shift does not pass through dropout")
            return same
        if op in _IDENTITY_LIKE and not others:
            return same
        if op == "neg":
            return same
        if op in _MAXPOOL | _AVGPOOL | _ADAPTIVE_AVG or op == "interpolate" or op == "upsample":
            k = _spatial_dims(op) or max(nd - 2, 1)
            if lc.axis >= nd - k:
                raise Broken(f"{op} pools along the unit's own axis")
            if op in _MAXPOOL and mode == "colshift":
                raise Broken("max pooling does not keep an input-dependent shift uniform")
            if op in _AVGPOOL and mode == "shift":
                pad = c.attrs.get("padding", 0)
                padded = any(p != 0 for p in (pad if isinstance(pad, (tuple, list)) else (pad,)))
                if (padded and c.attrs.get("count_include_pad", True)) or c.attrs.get("divisor_override"):
                    raise Broken("average pooling over zero padding does not pass a constant shift")
            return same
        if op == "pad":
            pads = c.attrs.get("pad", ())
            k = len(pads) // 2
            if lc.axis >= nd - k:
                raise Broken("padding along the unit's own axis")
            pmode = c.attrs.get("mode", "constant")
            zero = pmode == "constant" and not c.attrs.get("value")
            if pmode == "constant" and not zero:
                raise Broken("padding with a non-zero constant is not homogeneous")
            if mode == "shift" and zero:
                raise Broken("zero padding does not shift with the channel")
            return same
        if op in _RESHAPES:
            return [(c.outputs[0], _reshape_loc(shape, outshape, lc))]
        if op in ("permute", "transpose", "t", "movedim"):
            return [(c.outputs[0], Loc(self._permuted_axis(c, lc.axis, nd), lc.bs, lc.off))]
        if op in ("mean", "sum", "amax", "nanmean"):
            dims = c.attrs.get("dim")
            if dims is None:
                raise Broken(f"{op} over all axes mixes units")
            dims = {_norm_axis(d, nd) for d in (dims if isinstance(dims, (tuple, list)) else (dims,))}
            if lc.axis in dims:
                raise Broken(f"{op} over the unit's own axis mixes units")
            if op == "amax" and mode == "colshift":
                raise Broken("amax does not keep an input-dependent shift uniform")
            keep = c.attrs.get("keepdim", False)
            ax = lc.axis if keep else lc.axis - sum(1 for d in dims if d < lc.axis)
            return [(c.outputs[0], Loc(ax, lc.bs, lc.off))]
        if op == "cat":
            return self._cat(c, vid, lc, nd)
        if op in ("add", "sub"):
            if mode == "scale":
                raise Broken("a residual add (or a sum with another tensor) is not homogeneous per unit")
            if not others_free() or outshape != shape or c.attrs.get("alpha", 1) == 0:
                raise Broken("an add whose other operand depends on the same layer")
            return same
        if op in ("mul", "div"):
            scalar_other = not others
            if op == "div" and c.inputs and c.inputs[0] != vid:
                raise Broken("divides by the unit's value")
            if scalar_other or (mode == "scale" and others_free() and outshape == shape):
                return same
            raise Broken(f"{op} by a tensor that is not a constant of the unit")
        # -- sinks and layers --
        if op in ("linear", "conv1d", "conv2d", "conv3d"):
            if role != "input":
                raise Broken(f"is used as the {role} of a {op}")
            if mode != "scale":
                raise Broken(f"a shift feeds a {op}, which does not absorb it")
            out.consumers.append(self._consumer_parts(c, lc, nd))
            out.absorbed = True
            return []
        if op in ("batch_norm", "instance_norm"):
            if role != "input":
                raise Broken(f"is used as the {role} of {op}")
            batch_stats = c.attrs.get("training", False) if op == "batch_norm" else c.attrs.get(
                "use_input_stats", True)
            if op == "batch_norm" and "running_mean" not in c.roles:
                batch_stats = True
            if not batch_stats:
                raise Broken(f"{op} in eval mode uses running statistics and is an affine map")
            if lc.axis != 1:
                raise Broken(f"{op} normalises another axis")
            if mode == "colshift":
                raise Broken(f"{op} does not absorb an input-dependent shift")
            self._note_norm(c, "BatchNorm" if op == "batch_norm" else "InstanceNorm", lc, out, mode)
            out.absorbed = True
            return []
        if op == "group_norm":
            if role != "input" or lc.axis != 1 or mode == "colshift":
                raise Broken("group_norm does not absorb this perturbation")
            groups = int(c.attrs["num_groups"])
            cpg = shape[1] // groups
            owner = {ch: u for u in range(n_units) for ch in lc.channels(u)}
            for k in range(groups):
                chans = range(k * cpg, (k + 1) * cpg)
                units = {owner.get(ch) for ch in chans}
                if units == {None}:
                    continue
                if None in units:
                    raise Broken("a GroupNorm group mixes this layer's channels with other channels")
                out.merges.append(sorted(units))  # type: ignore[arg-type]
            self._note_norm(c, "GroupNorm", lc, out, mode)
            out.absorbed = True
            return []
        if op in ("layer_norm", "rms_norm"):
            if role != "input":
                raise Broken(f"is used as the {role} of {op}")
            ns = c.attrs.get("normalized_shape", ())
            k = len(ns) if isinstance(ns, (tuple, list)) else 1
            kind = "LayerNorm" if op == "layer_norm" else "RMSNorm"
            if op == "rms_norm" and mode != "scale":
                raise Broken("RMSNorm does not subtract the mean, so it does not absorb a shift")
            inside = lc.axis >= nd - k
            if mode == "colshift":
                rest = [shape[d] for d in range(nd - k, nd) if d != lc.axis]
                if not inside or any(s != 1 for s in rest) or not self._full(shape, lc, n_units):
                    raise Broken("LayerNorm normalises over more than the shifted axis")
            elif inside:
                self._merge_all(shape, lc, n_units, out, kind)
            self._note_norm(c, kind, lc, out, mode)
            out.absorbed = True
            return []
        if op in ("softmax", "log_softmax"):
            dim = c.attrs.get("dim")
            if dim is None or role not in ("input", None):
                raise Broken(f"{op} without an explicit dim")
            self._softmax_like(shape, lc, n_units, mode, _norm_axis(dim, nd), out, op)
            return []
        if op == "cross_entropy":
            if role != "input":
                raise Broken("is the target of cross_entropy")
            self._softmax_like(shape, lc, n_units, mode, 1 if nd >= 2 else 0, out, op)
            return []
        raise Broken(f"passes through {op}, which the analysis does not know to preserve it")

    def _permuted_axis(self, c: Call, axis: int, nd: int) -> int:
        if c.op == "transpose":
            d0, d1 = _norm_axis(c.attrs["dim0"], nd), _norm_axis(c.attrs["dim1"], nd)
            return d1 if axis == d0 else d0 if axis == d1 else axis
        if c.op == "t":
            return 1 - axis if nd == 2 else axis
        if c.op == "permute":
            dims = c.attrs.get("dims", c.attrs.get("args", ()))
            if len(dims) == 1 and isinstance(dims[0], (tuple, list)):
                dims = dims[0]
            dims = [_norm_axis(d, nd) for d in dims]
            return dims.index(axis)
        raise Broken(f"{c.op} is not followed")

    def _cat(self, c: Call, vid: int, lc: Loc, nd: int):
        dim = _norm_axis(c.attrs.get("dim", 0), nd)
        slots = [c.roles[f"tensors{k}"] for k in range(c.attrs.get("n_tensors", 0))]
        if slots.count(vid) != 1:
            raise Broken("concatenated more than once")
        if dim != lc.axis:
            raise Broken("concatenated along another axis")
        off = sum(self.g.values[s].shape[dim] for s in slots[: slots.index(vid)])
        return [(c.outputs[0], Loc(lc.axis, lc.bs, lc.off + off))]

    def _note_norm(self, c: Call, kind: str, lc: Loc, out: Outcome, mode: str) -> None:
        if mode == "scale":
            out.normalizers.append((self.module_of(c), kind, c.attrs.get("eps", 1e-5), lc))

    def _consumer_parts(self, c: Call, lc: Loc, nd: int) -> Callable[[int], list[tuple[str, tuple]]]:
        wkind = self.weight_kind(c.roles["weight"])
        if wkind[0] != "plain":
            raise Broken("feeds a layer whose weight is parametrised (its columns are not trained leaves)")
        name = wkind[1]
        wshape = self.g.values[c.roles["weight"]].shape
        if c.op == "linear":
            if lc.axis != nd - 1:
                raise Broken("feeds a Linear along another axis")

            def linear_parts(i: int) -> list[tuple[str, tuple]]:
                a, b = lc.off + i * lc.bs, lc.off + (i + 1) * lc.bs
                return [(name, (slice(None), a) if b - a == 1 else (slice(None), slice(a, b)))]

            return linear_parts
        if lc.axis != 1 or lc.bs != 1:
            raise Broken("feeds a convolution along another axis")
        groups = int(c.attrs.get("groups", 1))
        cin_g = wshape[1]
        out_g = wshape[0] // groups

        def conv_parts(i: int) -> list[tuple[str, tuple]]:
            ch = lc.off + i
            if groups == 1:
                return [(name, (slice(None), ch))]
            k = ch // cin_g
            return [(name, (slice(k * out_g, (k + 1) * out_g), ch - k * cin_g))]

        return conv_parts
