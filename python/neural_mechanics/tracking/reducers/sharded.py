"""FSDP2: every rank reduces its own shard, and one all-reduce of O(groups) numbers combines them.

``DistributedReducer.submit_blocks`` answers exactly what a single-process reducer answers for the
global tensors (rows of axis-0 reductions in global order, complete column sums), so the tracker
cannot tell the difference (docs/distributed.md).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any, NamedTuple

import numpy as np

from ..distributed import RowRange, dtensor_type
from .base import Blocks, Pending, Reads, Reducer


class _Local(NamedTuple):
    """One item's share on this rank: the local item (None: nothing here) and where it lands."""

    item: tuple | None
    rows: int  # global output rows of the item
    at: int  # first global output row this rank's rows land on (axis 0), 0 for partial columns


def _chunk_range(n: int, mesh: Any, placements: Any) -> tuple[int, int]:
    """Global rows [lo, hi) of dim 0 held by this rank (torch.chunk layout, as DTensor uses)."""
    try:
        from torch.distributed.tensor._utils import compute_local_shape_and_global_offset

        shape, offset = compute_local_shape_and_global_offset((n,), mesh, placements)
        return int(offset[0]), int(offset[0]) + int(shape[0])
    except ImportError:  # pragma: no cover - the private helper moved: the documented chunk rule
        world, rank = mesh.size(), mesh.get_local_rank()
        size = -(-n // world)
        return min(rank * size, n), min((rank + 1) * size, n)


class DistributedReducer:
    """Reduces DTensor items shard by shard and combines the O(groups) results in one all-reduce.

    ``submit_blocks`` answers exactly what a single-process reducer answers for the global tensors
    (rows of axis-0 reductions in global order, complete column sums), so the tracker cannot tell
    the difference. ``last_bytes`` is the size of the last all-reduced vector.
    """

    def __init__(self, local: Reducer, group: Any, mesh: Any, device: Any):
        self._local = local
        self._group = group
        self._mesh = mesh
        self._device = device
        # CUDA (NCCL): the all-reduce runs asynchronously on the device and is read a step later,
        # as the single-process device reducer does. CPU (gloo): consumed at once.
        self.delayed = bool(getattr(local, "delayed", False)) and device.type != "cpu"
        self.last_bytes = 0
        self.bytes_total = 0
        self.calls = 0

    def _share(self, item: tuple) -> _Local:
        theta, grad, velocity, axis, block = item
        start, stop = 0, None
        if isinstance(theta, RowRange):
            theta, start, stop = theta.tensor, theta.start, theta.stop
            grad = None if grad is None else grad.tensor
            velocity = None if velocity is None else velocity.tensor
        shape = tuple(theta.shape)  # a DTensor's shape is the global one
        stop = shape[0] if stop is None else stop
        rows_global = (stop - start) if axis == 0 else (shape[1] // block)
        dtensor = dtensor_type()
        if isinstance(theta, dtensor):
            from torch.distributed.tensor import Shard

            sharded = any(pl == Shard(0) for pl in theta.placements)
            tensors = [None if t is None else t.to_local() for t in (theta, grad, velocity)]
            if sharded:
                lo, hi = _chunk_range(shape[0], theta.device_mesh, theta.placements)
            else:  # replicated: every rank holds it all; rank 0 of the mesh alone contributes
                lo, hi = (0, shape[0]) if theta.device_mesh.get_local_rank() == 0 else (0, 0)
        else:  # a plain tensor in a sharded model: the same on every rank, counted once
            tensors = [theta, grad, velocity]
            lo, hi = (0, shape[0]) if self._mesh.get_local_rank() == 0 else (0, 0)
        a, b = max(lo, start), min(hi, stop)
        if b <= a:
            return _Local(None, rows_global, 0)
        local = tuple(None if t is None else t[a - lo : b - lo] for t in tensors)
        return _Local((*local, axis, block), rows_global, (a - start) if axis == 0 else 0)

    def reduce_plan(self, reads: Reads, tensors: Sequence[Sequence[Any]], with_sums: bool) -> Pending[Blocks]:
        return self.submit_blocks(*reads.items(tensors, with_sums))

    def submit_blocks(self, items: Sequence[tuple], extra: Sequence[tuple] = ()) -> Pending[Blocks]:
        import torch

        shares = [self._share(it) for it in items]
        more = [self._share(it) for it in extra]
        present = [s.item for s in shares if s.item is not None]
        present_more = [s.item for s in more if s.item is not None]
        width = {1: 2, 2: 5, 3: 8}[sum(x is not None for x in items[0][:3])] if items else 2
        if present or present_more:
            local_main, local_more = self._local.submit_blocks(present, present_more).result()
        else:
            local_main, local_more = np.zeros((0, width)), None
        n_main = sum(s.rows for s in shares)
        n_more = sum(s.rows for s in more)
        flat = np.zeros(n_main * width + n_more * 2)
        main = flat[: n_main * width].reshape(n_main, width)
        tail = flat[n_main * width :].reshape(n_more, 2)
        _place(main, shares, local_main)
        if more:
            _place(tail, more, local_more)
        buf = torch.from_numpy(flat)
        if self._device.type != "cpu":
            buf = buf.to(self._device)  # NCCL reduces device memory only
        import torch.distributed as dist

        work = dist.all_reduce(buf, op=dist.ReduceOp.SUM, group=self._group, async_op=self.delayed)
        self.last_bytes = buf.numel() * buf.element_size()
        self.bytes_total += self.last_bytes
        self.calls += 1

        def fetch() -> tuple[np.ndarray, np.ndarray | None]:
            if work is not None:
                work.wait()
            out = buf.cpu().numpy() if buf.device.type != "cpu" else buf.numpy()
            m = out[: n_main * width].reshape(n_main, width)
            t = out[n_main * width :].reshape(n_more, 2)
            return m, (t if extra else None)

        return Pending(fetch)


def _place(target: np.ndarray, shares: list[_Local], local: np.ndarray | None) -> None:
    """Write each item's local rows at their global position of ``target`` (zeros elsewhere)."""
    at_global, at_local = 0, 0
    for s in shares:
        if s.item is not None:
            assert local is not None
            theta, _, _, axis, block = s.item
            n = theta.shape[0] if axis == 0 else theta.shape[1] // block
            target[at_global + s.at : at_global + s.at + n] = local[at_local : at_local + n]
            at_local += n
        at_global += s.rows


def local_tensors(params: Sequence[Any]) -> list[Any]:
    """This rank's shards of DTensor parameters (plain tensors as they are)."""
    dtensor = dtensor_type()
    return [p.to_local() if isinstance(p, dtensor) else p for p in params]


def sharded_reducer(params: Sequence[Any], local: Reducer) -> DistributedReducer:
    """The reducer for a model with DTensor parameters; ``local`` reduces this rank's shards."""
    dtensor = dtensor_type()
    mesh = next(p for p in params if isinstance(p, dtensor)).device_mesh
    return DistributedReducer(local, mesh.get_group(), mesh, local_tensors(params)[0].device)
