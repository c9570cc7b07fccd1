"""Record the real dataflow of a forward pass, op by op.

A ``TorchFunctionMode`` sees every torch function a forward calls (F.linear, F.batch_norm, relu,
flatten, ``+=``, ...), with the actual tensors, so the wiring comes from what the code does, not
from module order or names: functional calls, in-place ops, parameters used by hand and Python
control flow are all seen as they run.

The pass first runs on the ``meta`` device with meta stand-ins for every parameter and buffer
(``torch.func.functional_call``): shapes propagate, nothing is computed and the model's own
tensors are never touched. Code that needs real numbers (a data-dependent ``if``, ``.item()``)
fails there; it then runs for real under ``torch.no_grad`` and every buffer and the RNG state are
restored afterwards. (torch.fx symbolic tracing handles a subset of what the meta pass handles,
the data-independent forwards, and sees module calls rather than the ops inside them, so it is
not used.)
"""

from __future__ import annotations

from typing import Any

import torch
from torch.overrides import TorchFunctionMode

from .graph import Call, Graph, Slot, Value

# Argument names of the ops the analysis reads, so that positional and keyword calls look alike.
_CONV = ("input", "weight", "bias", "stride", "padding", "dilation", "groups")
_POOL_MAX = ("input", "kernel_size", "stride", "padding", "dilation", "ceil_mode", "return_indices")
_POOL_AVG = ("input", "kernel_size", "stride", "padding", "ceil_mode", "count_include_pad", "divisor_override")
_DROPOUT = ("input", "p", "training", "inplace")
_ARGS: dict[str, tuple[str, ...]] = {
    "linear": ("input", "weight", "bias"),
    "conv1d": _CONV,
    "conv2d": _CONV,
    "conv3d": _CONV,
    "batch_norm": ("input", "running_mean", "running_var", "weight", "bias", "training", "momentum", "eps"),
    "instance_norm": (
        "input", "running_mean", "running_var", "weight", "bias", "use_input_stats", "momentum", "eps",
    ),
    "layer_norm": ("input", "normalized_shape", "weight", "bias", "eps"),
    "group_norm": ("input", "num_groups", "weight", "bias", "eps"),
    "rms_norm": ("input", "normalized_shape", "weight", "eps"),
    "softmax": ("input", "dim"),
    "log_softmax": ("input", "dim"),
    "cross_entropy": ("input", "target", "weight"),
    "leaky_relu": ("input", "negative_slope", "inplace"),
    "prelu": ("input", "weight"),
    "dropout": _DROPOUT,
    "dropout1d": _DROPOUT,
    "dropout2d": _DROPOUT,
    "dropout3d": _DROPOUT,
    "max_pool1d": _POOL_MAX,
    "max_pool2d": _POOL_MAX,
    "max_pool3d": _POOL_MAX,
    "avg_pool1d": _POOL_AVG,
    "avg_pool2d": _POOL_AVG,
    "avg_pool3d": _POOL_AVG,
    "pad": ("input", "pad", "mode", "value"),
    "flatten": ("input", "start_dim", "end_dim"),
    "clamp": ("input", "min", "max"),
    "clamp_min": ("input", "min"),
    "add": ("input", "other"),
    "sub": ("input", "other"),
    "mul": ("input", "other"),
    "div": ("input", "other"),
    "mean": ("input", "dim", "keepdim"),
    "sum": ("input", "dim", "keepdim"),
    "amax": ("input", "dim", "keepdim"),
    "cat": ("tensors", "dim"),
    "transpose": ("input", "dim0", "dim1"),
    "weight_norm": ("v", "g", "dim"),
    "embedding": ("input", "weight"),
    "addmm": ("input", "mat1", "mat2"),
    "baddbmm": ("input", "batch1", "batch2"),
    "scaled_dot_product_attention": ("query", "key", "value", "attn_mask", "dropout_p", "is_causal", "scale",
                                     "enable_gqa"),
}
# Dunder and alias names mapped onto the canonical op.
_ALIAS = {
    "iadd": "add", "radd": "add", "isub": "sub", "imul": "mul", "rmul": "mul",
    "itruediv": "div", "truediv": "div", "rtruediv": "rdiv", "concat": "cat", "concatenate": "cat",
    "max_pool1d_with_indices": "max_pool1d", "max_pool2d_with_indices": "max_pool2d",
    "max_pool3d_with_indices": "max_pool3d", "true_divide": "div", "multiply": "mul",
    "swapaxes": "transpose", "swapdims": "transpose",
}


def canonical(name: str) -> str:
    op = name.strip("_")
    return _ALIAS.get(op, op)


def _slots(obj: Any, ids: dict[int, int]) -> Any:
    """``obj`` with every tensor replaced by the ``Slot`` of its value id (for replaying an op)."""
    if isinstance(obj, torch.Tensor):
        return Slot(ids[id(obj)])
    if isinstance(obj, tuple):
        return tuple(_slots(o, ids) for o in obj)
    if isinstance(obj, list):
        return [_slots(o, ids) for o in obj]
    if isinstance(obj, dict):
        return {k: _slots(o, ids) for k, o in obj.items()}
    return obj


def _opened() -> dict[Any, Any]:
    """Composite torch functions whose body is recorded op by op instead of as one opaque call
    (their arguments are checked with ``has_torch_function`` at the top, so a mode sees them whole):
    the function -> the module global that performs that check."""
    import torch.nn.functional as F

    return {F.multi_head_attention_forward: F}


def _tensors_in(obj: Any) -> list[torch.Tensor]:
    if isinstance(obj, torch.Tensor):
        return [obj]
    if isinstance(obj, (list, tuple)):
        return [t for o in obj for t in _tensors_in(o)]
    if isinstance(obj, dict):
        return [t for o in obj.values() for t in _tensors_in(o)]
    return []


class _Recorder(TorchFunctionMode):
    def __init__(self, leaves: dict[int, tuple[str, str]]):
        super().__init__()
        self.g = Graph()
        self.leaves = leaves  # id(tensor) -> (kind, name)
        self.ids: dict[int, int] = {}  # id(tensor) -> current value id
        self.keep: list[torch.Tensor] = []  # holds every seen tensor so that no id() is reused
        self._func: Any = None

    def value_of(self, t: torch.Tensor, default_kind: str = "const") -> int:
        key = id(t)
        if key in self.ids:
            return self.ids[key]
        kind, name = self.leaves.get(key, (default_kind, None))
        return self._new_value(t, kind, name, None)

    def _new_value(self, t: torch.Tensor, kind: str, name: str | None, producer: int | None) -> int:
        vid = len(self.g.values)
        self.g.values[vid] = Value(
            vid, tuple(t.shape), kind, name, producer, floating=t.is_floating_point() or t.is_complex()
        )
        if name is not None:
            self.g.leaf_of.setdefault(name, vid)
        self.ids[id(t)] = vid
        self.keep.append(t)
        return vid

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        opened = _opened().get(func)
        if opened is not None:
            return self._open(func, opened, args, kwargs)
        out = func(*args, **kwargs)
        raw = getattr(func, "__name__", str(func))
        if raw == "__get__" or raw == "__set__":  # attribute access (.shape, .grad, ...): no dataflow
            return out
        outs = _tensors_in(out)
        mutated = [t for t in _tensors_in(args[:1]) if raw == "__setitem__"]
        if not outs and not mutated:
            return out
        self._func = func
        self._record(raw, args, kwargs, outs + mutated)
        return out

    def _open(self, func, module, args: tuple, kwargs: dict):
        """Run a composite function's body with recording on: its first ``has_torch_function``
        check (the one that would hand it to this mode whole) answers False once."""
        original = module.has_torch_function
        state = {"first": True}

        def once(*a: Any) -> bool:
            if state["first"]:
                state["first"] = False
                return False
            return original(*a)

        module.has_torch_function = once
        try:
            with self:
                return func(*args, **kwargs)
        finally:
            module.has_torch_function = original

    def _record(self, raw: str, args: tuple, kwargs: dict, outs: list[torch.Tensor]) -> None:
        op = canonical(raw)
        in_tensors = _tensors_in(args) + _tensors_in(kwargs)
        inputs = [self.value_of(t) for t in in_tensors]
        roles: dict[str, int] = {}
        attrs: dict[str, Any] = {}
        names = _ARGS.get(op)
        if names is not None:
            bound = dict(zip(names, args))
            bound.update(kwargs)
            for k, v in bound.items():
                if isinstance(v, torch.Tensor):
                    roles[k] = self.ids[id(v)]
                elif k == "tensors":
                    roles.update({f"tensors{i}": self.ids[id(t)] for i, t in enumerate(v)})
                    attrs["n_tensors"] = len(v)
                else:
                    attrs[k] = v
        else:
            attrs["args"] = tuple(a for a in args if not isinstance(a, torch.Tensor))
            attrs.update({k: v for k, v in kwargs.items() if not isinstance(v, torch.Tensor)})
        cid = len(self.g.calls)
        call = Call(cid, op, raw, inputs, roles, attrs, [], fn=self._func, targs=_slots(args, self.ids),
                    tkwargs=_slots(kwargs, self.ids))
        self.g.calls[cid] = call
        for v in dict.fromkeys(inputs):
            self.g.values[v].consumers.append(cid)
        for t in outs:
            # a fresh value even when the op wrote into an input (in-place): later readers of
            # that tensor see the new version
            call.outputs.append(self._new_value(t, "computed", None, cid))
        for v in inputs:
            val = self.g.values[v]
            if val.kind == "param":
                self.g.param_uses.setdefault(val.name, []).append(cid)  # type: ignore[arg-type]


def _to_meta(obj: Any) -> Any:
    if isinstance(obj, torch.Tensor):
        return torch.empty_like(obj, device="meta")
    if isinstance(obj, tuple):
        return tuple(_to_meta(o) for o in obj)
    if isinstance(obj, list):
        return [_to_meta(o) for o in obj]
    if isinstance(obj, dict):
        return {k: _to_meta(o) for k, o in obj.items()}
    return obj


def _as_args(example_input: Any) -> tuple:
    return example_input if isinstance(example_input, tuple) else (example_input,)


def _run(model: torch.nn.Module, args: tuple, leaves: dict[int, tuple[str, str]], call) -> Graph:
    rec = _Recorder(leaves)
    for i, t in enumerate(_tensors_in(args)):
        rec._new_value(t, "input", f"input{i}", None)
    with rec:
        out = call()
    rec.g.outputs = [rec.ids[id(t)] for t in _model_outputs(out) if id(t) in rec.ids]
    return rec.g


def _model_outputs(out: Any) -> list[torch.Tensor]:
    """The tensors a forward returned, in order; a Hugging Face ``ModelOutput`` (or any mapping or
    object with a ``logits`` tensor) is read through its logits first."""
    logits = out.get("logits") if isinstance(out, dict) else getattr(out, "logits", None)
    if isinstance(logits, torch.Tensor):
        rest = [t for t in _tensors_in(dict(out) if isinstance(out, dict) else out) if t is not logits]
        return [logits] + rest
    return _tensors_in(out)


def trace(model: torch.nn.Module, example_input: Any) -> Graph:
    """The op-level dataflow graph of ``model(*example_input)``; the model is left unchanged."""
    from torch.func import functional_call

    params = dict(model.named_parameters())
    buffers = dict(model.named_buffers())
    args = _as_args(example_input)
    try:
        meta = {k: torch.empty_like(v, device="meta") for k, v in {**params, **buffers}.items()}
        leaves = {id(t): ("param" if k in params else "buffer", k) for k, t in meta.items()}
        margs = _to_meta(args)
        g = _run(model, margs, leaves, lambda: functional_call(model, meta, margs))
        g.mode = "meta"
        return g
    except Exception:  # noqa: BLE001 - any failure on meta means the code needs real numbers
        pass
    leaves = {id(t): ("param", k) for k, t in params.items()}
    leaves.update({id(t): ("buffer", k) for k, t in buffers.items()})
    saved = {k: b.detach().clone() for k, b in buffers.items()}
    devices = [t.device.index for t in _tensors_in(args) if t.is_cuda]
    try:
        with torch.no_grad(), torch.random.fork_rng(devices=devices or []):
            g = _run(model, args, leaves, lambda: model(*args))
    finally:
        with torch.no_grad():
            for k, b in buffers.items():
                b.copy_(saved[k])
    g.mode = "real"
    return g
