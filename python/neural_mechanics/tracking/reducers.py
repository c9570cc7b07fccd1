"""Where the per-step reductions run: the Rust kernel (CPU tensors) or the tensors' own device.

Both reducers take the same items, (θ, ĝ or None, v or None, axis, block) as torch tensors, and
give the same answer: one float64 array (groups, sums) per item, sums in the order of SUM_NAMES.

The device reducer is ordinary torch code, so it runs on CPU tensors too (tests compare it with
the Rust kernel there). On CUDA it never makes the training stream wait: the O(groups) results are
copied into pinned host buffers with non_blocking=True behind a CUDA event, and the tracker reads
them one step later (``delayed``), by which time the copy has long finished.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import numpy as np

from .. import _native

Item = tuple  # (theta, grad | None, velocity | None, axis, block)

# Temporaries of the device reducer are capped at about this many float64 elements per chunk.
_CHUNK_ELEMS = 1 << 24


class Pending:
    """A result that may still be on its way from the device."""

    def __init__(self, fetch: Callable[[], list[np.ndarray]]):
        self._fetch = fetch
        self._value: list[np.ndarray] | None = None

    def result(self) -> list[np.ndarray]:
        if self._value is None:
            self._value = self._fetch()
        return self._value


def _dtype_codes() -> dict[Any, int]:
    import torch

    return {torch.float32: 0, torch.float64: 1, torch.float16: 2, torch.bfloat16: 3}


_DTYPE_CODES = _dtype_codes()


def _layout(shape: tuple, axis: int, block: int) -> tuple[int, int, int]:
    """(outer, groups, seg) of the Rust kernel (src/stats.rs) for a C-contiguous tensor."""
    out = shape[0]
    inner = shape[1] if len(shape) > 1 else 1
    rest = int(np.prod(shape[2:])) if len(shape) > 2 else 1
    if axis == 0:
        return 1, out, inner * rest
    return out, inner // block, block * rest


class KernelPlan:
    """The fixed part of the Rust kernel's spec of every reduction of a plan, computed once.

    A reduction's element count, layout and dtype code never change during a run, so a step only
    reads the tensors' current addresses (``addresses``) and adds each reduction's byte offset
    (``specs``). Addresses are never kept from one step to the next: the optimizer, autograd or
    the user may have replaced any tensor in between. Each step checks every tensor against the
    shape and dtype the layouts were computed for, so a stale layout is an error, not a bad read.
    """

    def __init__(self, reductions: Sequence[Any], params: dict[str, Any], sum_velocity: Sequence[bool] | np.ndarray):
        # Parameters in the order their reductions first appear.
        names = list(dict.fromkeys(r.name for r in reductions))
        self.names = names
        # None: a dtype the kernel does not read, so that the first step reports it
        self.expected = [(params[n].shape, params[n].dtype if params[n].dtype in _DTYPE_CODES else None) for n in names]
        self._static = [self._static_spec(r, params[r.name], names.index(r.name)) for r in reductions]
        self._sum_velocity = [s for s, wanted in zip(self._static, sum_velocity) if wanted]

    @staticmethod
    def _static_spec(r: Any, p: Any, param_index: int) -> tuple[int, int, tuple]:
        """(parameter index, byte offset, (numel, outer, groups, seg, dtype code)) of one reduction."""
        shape = tuple(p.shape)
        offset = 0
        if r.rows is not None:  # a row range of a C-contiguous tensor is one contiguous run
            row_elems = int(np.prod(shape[1:])) if len(shape) > 1 else 1
            offset = r.rows[0] * row_elems * p.element_size()
            shape = (r.rows[1] - r.rows[0],) + shape[1:]
        numel = int(np.prod(shape))
        return param_index, offset, (numel, *_layout(shape, r.axis, r.block), _DTYPE_CODES.get(p.dtype, 0))

    def addresses(self, tensors: Sequence[tuple], keep: list[Any]) -> list[tuple[int, int, int]]:
        """Addresses of (θ, ĝ or None, v or None) per parameter (0 for None), after the checks.

        Non-contiguous tensors (channels_last weights, say) are read through a contiguous copy
        that is appended to ``keep``: the caller holds it until the kernel returns.
        """
        return [
            (_address(t, shape, dtype, keep), 0 if g is None else _address(g, shape, dtype, keep), 0 if v is None else _address(v, shape, dtype, keep))
            for (t, g, v), (shape, dtype) in zip(tensors, self.expected)
        ]

    def specs(self, addrs: list[tuple[int, int, int]]) -> list[tuple]:
        """group_stats_ptrs specs of every reduction from this step's addresses."""
        out = []
        for i, offset, rest in self._static:
            t, g, v = addrs[i]
            out.append((t + offset, g + offset if g else 0, v + offset if v else 0) + rest)
        return out

    def velocity_sum_specs(self, addrs: list[tuple[int, int, int]]) -> list[tuple]:
        """Specs of plain sums of the velocity (v in θ's place) of the ``sum_velocity`` reductions."""
        return [(addrs[i][2] + offset, 0, 0) + rest for i, offset, rest in self._sum_velocity]


def _address(t: Any, shape: Any, dtype: Any, keep: list[Any]) -> int:
    """The address of ``t`` after checking it is a CPU tensor of ``shape`` and ``dtype``."""
    if t.dtype is not dtype or not t.is_cpu or t.shape != shape:
        raise _unexpected_tensor_error(t, shape, dtype)
    if not t.is_contiguous():
        t = t.contiguous()
        keep.append(t)
    return t.data_ptr()


def _unexpected_tensor_error(t: Any, shape: Any, dtype: Any) -> Exception:
    from ..errors import DeviceError, DTypeError, ShapeError

    if t.device.type != "cpu":
        return DeviceError(f"the Rust reducer reads CPU tensors; got one on {t.device}")
    if dtype is None:
        return DTypeError(f"unsupported dtype {t.dtype}; expected float32/64, float16, bfloat16")
    if t.dtype != dtype:
        return DTypeError(f"mixed dtypes {t.dtype} / {dtype}: a gradient or momentum buffer differs from its parameter")
    return ShapeError(
        f"a tensor of shape {tuple(t.shape)} where the tracker's plan expects {tuple(shape)} "
        "(a parameter replaced by one of another shape after track() cannot be tracked)"
    )


class RustReducer:
    """CPU tensors: one call into the fused Rust kernel per step, GIL released.

    Tensors travel by address (``_native.group_stats_ptrs``): making numpy views of dozens of
    tensors every step would cost more than reducing them. This class keeps the kernel's contract:
    the tensors (or contiguous copies) stay referenced, contiguous and on the CPU during the call.
    """

    delayed = False

    def __init__(self) -> None:
        self._layouts: dict[tuple, tuple[int, int, int]] = {}

    def _spec(self, item: Item, keep: list[Any]) -> tuple:
        theta, grad, velocity, axis, block = item
        code = _DTYPE_CODES.get(theta.dtype)
        addrs = []
        for t in (theta, grad, velocity):
            if t is None:
                addrs.append(0)
                continue
            if not t.is_cpu or t.dtype != theta.dtype or code is None:
                raise _device_or_dtype_error(t, theta)
            if not t.is_contiguous():
                t = t.contiguous()
                keep.append(t)
            addrs.append(t.data_ptr())
        key = (theta.shape, axis, block)
        layout = self._layouts.get(key)
        if layout is None:
            layout = self._layouts[key] = _layout(tuple(theta.shape), axis, block)
        return (addrs[0], addrs[1], addrs[2], theta.numel(), *layout, code)

    def submit_blocks(self, items: Sequence[Item], extra: Sequence[Item] = ()) -> Pending:
        """Items of one arity reduced into one (rows, K) block; ``extra`` (θ only) into another."""
        keep: list[Any] = []  # contiguous copies must outlive the call
        main = _native.group_stats_ptrs([self._spec(it, keep) for it in items])
        more = _native.group_stats_ptrs([self._spec(it, keep) for it in extra]) if extra else None
        del keep
        return Pending(lambda: (main, more))

    def submit_tensors(self, plan: KernelPlan, tensors: Sequence[tuple], sum_velocity: bool) -> Pending:
        """``submit_blocks`` for the reductions of ``plan``: (θ, ĝ, v) per parameter of plan.names,
        with the plain sums of v of its sum_velocity reductions as the extra block if asked."""
        keep: list[Any] = []  # contiguous copies must outlive the call
        addrs = plan.addresses(tensors, keep)
        main = _native.group_stats_ptrs(plan.specs(addrs))
        extra = plan.velocity_sum_specs(addrs) if sum_velocity else []
        more = _native.group_stats_ptrs(extra) if extra else None
        del keep
        return Pending(lambda: (main, more))

    def submit(self, items: Sequence[Item]) -> Pending:
        """One (groups, K) array per item, items of any arity."""
        keep: list[Any] = []
        specs = [self._spec(it, keep) for it in items]
        by_width: dict[int, list[int]] = {}
        for i, sp in enumerate(specs):
            by_width.setdefault(sum(a != 0 for a in sp[:3]), []).append(i)
        out: list[Any] = [None] * len(specs)
        for members in by_width.values():
            block_out = _native.group_stats_ptrs([specs[i] for i in members])
            at = 0
            for i in members:
                out[i] = block_out[at : at + specs[i][5]]
                at += specs[i][5]
        del keep
        return Pending(lambda: out)


def _device_or_dtype_error(t: Any, theta: Any) -> Exception:
    from ..errors import DeviceError, DTypeError

    if t.device.type != "cpu":
        return DeviceError(f"the Rust reducer reads CPU tensors; got one on {t.device}")
    return DTypeError(f"unsupported or mixed dtypes {t.dtype} / {theta.dtype}; expected float32/64, float16, bfloat16")


def _as_groups(x: Any, axis: int, block: int) -> Any:
    """(groups, outer, seg) view/copy of a tensor for the reduction keeping ``axis``."""
    shape = tuple(x.shape)
    out = shape[0]
    inner = shape[1] if len(shape) > 1 else 1
    rest = int(np.prod(shape[2:])) if len(shape) > 2 else 1
    if axis == 0:
        return x.reshape(out, 1, inner * rest)
    return x.reshape(out, inner // block, block * rest).transpose(0, 1)


def torch_group_sums(theta: Any, grad: Any, velocity: Any, axis: int, block: int) -> Any:
    """The fused sums with torch ops on the tensors' device, float64: (groups, K) tensor.

    All pairwise products come from one batched Gram matrix per chunk of groups: X (groups, m, L)
    with m = 1..3 stacked arrays, X Xᵀ holds every ⟨a, b⟩ at once, X·1 the plain sums.
    """
    import torch

    arrays = [a for a in (theta, grad, velocity) if a is not None]
    m = len(arrays)
    views = [_as_groups(a.detach(), axis, block) for a in arrays]
    groups, outer, seg = views[0].shape
    per_group = max(1, outer * seg * m)
    step = max(1, _CHUNK_ELEMS // per_group)
    pieces = []
    for g0 in range(0, groups, step):
        x = torch.stack([v[g0 : g0 + step].reshape(-1, outer * seg) for v in views], dim=1).to(torch.float64)
        sums = x.sum(dim=2)  # (g, m)
        gram = torch.bmm(x, x.transpose(1, 2))  # (g, m, m)
        cols = [sums[:, 0], gram[:, 0, 0]]
        if m > 1:
            cols += [sums[:, 1], gram[:, 1, 1], gram[:, 0, 1]]
        if m > 2:
            cols += [gram[:, 2, 2], gram[:, 0, 2], gram[:, 1, 2]]
        pieces.append(torch.stack(cols, dim=1))
    if not pieces:
        return torch.zeros((0, {1: 2, 2: 5, 3: 8}[m]), dtype=torch.float64, device=theta.device)
    return torch.cat(pieces)


class TorchReducer:
    """Reductions on the tensors' device; only O(groups) numbers cross to the host.

    ``delayed=True`` (the default on CUDA) means the tracker consumes step n's results at step
    n + 1, so the host never waits for the device inside the training loop.
    """

    def __init__(self, delayed: bool = True):
        self.delayed = delayed
        self._pinned: list[Any] = [None, None]  # double buffer: one being filled, one being read
        self._turn = 0

    def submit_blocks(self, items: Sequence[Item], extra: Sequence[Item] = ()) -> Pending:
        """Items of one arity reduced into one (rows, K) block; ``extra`` (θ only) into another."""
        n = len(items)
        pending = self.submit(list(items) + list(extra))

        def fetch() -> tuple[np.ndarray, np.ndarray | None]:
            out = pending.result()
            main = np.concatenate(out[:n], axis=0)
            return main, (np.concatenate(out[n:], axis=0) if len(out) > n else None)

        return Pending(fetch)

    def submit(self, items: Sequence[Item]) -> Pending:
        import torch

        results = [torch_group_sums(*item) for item in items]
        widths = [r.shape[1] for r in results]
        rows = [r.shape[0] for r in results]
        flat = torch.cat([r.reshape(-1) for r in results]) if results else torch.zeros(0, dtype=torch.float64)
        if flat.device.type == "cuda":
            slot = self._turn
            self._turn ^= 1
            buf = self._pinned[slot]
            if buf is None or buf.numel() < flat.numel():
                buf = torch.empty(max(flat.numel(), 1), dtype=torch.float64, pin_memory=True)
                self._pinned[slot] = buf
            host = buf[: flat.numel()]
            host.copy_(flat, non_blocking=True)
            done = torch.cuda.Event()
            done.record()

            def fetch() -> list[np.ndarray]:
                done.synchronize()
                return _split(host.numpy().copy(), rows, widths)

            return Pending(fetch)
        host_flat = flat.cpu().numpy()
        return Pending(lambda: _split(host_flat, rows, widths))


def _split(flat: np.ndarray, rows: list[int], widths: list[int]) -> list[np.ndarray]:
    out, at = [], 0
    for r, w in zip(rows, widths):
        out.append(flat[at : at + r * w].reshape(r, w))
        at += r * w
    return out


def choose(params: Sequence[Any], kind: str) -> Any:
    """The reducer for ``kind``: "auto" (Rust for CPU tensors, the device otherwise), "rust",
    "torch" (device reducer, delayed), "torch-sync" (device reducer, consumed at once)."""
    from ..errors import DeviceError, InvalidArgumentError
    from .distributed import is_sharded, sharded_reducer

    if is_sharded(params):  # FSDP2 DTensors: reduce each shard, combine O(groups) results
        return sharded_reducer(params, kind)
    devices = {p.device.type for p in params}
    if kind == "auto":
        kind = "rust" if devices <= {"cpu"} else "torch"
    if kind == "rust":
        if not devices <= {"cpu"}:
            raise DeviceError(f"reducer='rust' reads CPU memory, but parameters live on {sorted(devices)}")
        return RustReducer()
    if kind == "torch":
        return TorchReducer(delayed=True)
    if kind == "torch-sync":
        return TorchReducer(delayed=False)
    raise InvalidArgumentError(f"reducer must be 'auto', 'rust', 'torch' or 'torch-sync', got {kind!r}")
