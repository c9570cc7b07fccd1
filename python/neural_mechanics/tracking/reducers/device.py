"""Reductions with torch operations on the tensors' own device: only O(groups) numbers cross to
the host.

Ordinary torch code, so it runs on CPU tensors too (the tests compare it with the Rust kernel
there). On CUDA it never makes the training stream wait: the results are copied into pinned host
buffers with non_blocking=True behind a CUDA event, and the tracker reads them one step later
(``delayed``), by which time the copy has long finished.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np

from .base import Blocks, Item, Pending, Reads

# Temporaries are capped at about this many float64 elements per chunk.
_CHUNK_ELEMS = 1 << 24


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
    """Reductions on the tensors' device. ``delayed=True`` (the default on CUDA): the tracker
    consumes step n's results at step n + 1, so the host never waits for the device."""

    def __init__(self, delayed: bool = True):
        self.delayed = delayed
        self._pinned: list[Any] = [None, None]  # double buffer: one being filled, one being read
        self._turn = 0

    def submit_blocks(self, items: Sequence[Item], extra: Sequence[Item] = ()) -> Pending[Blocks]:
        n = len(items)
        pending = self.submit(list(items) + list(extra))

        def fetch() -> Blocks:
            out = pending.result()
            main = np.concatenate(out[:n], axis=0) if n else np.zeros((0, 2))
            return main, (np.concatenate(out[n:], axis=0) if len(out) > n else None)

        return Pending(fetch)

    def reduce_plan(self, reads: Reads, tensors: Sequence[Sequence[Any]], with_sums: bool) -> Pending[Blocks]:
        return self.submit_blocks(*reads.items(tensors, with_sums))

    def submit(self, items: Sequence[Item]) -> Pending[list[np.ndarray]]:
        """One (groups, K) array per item."""
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
