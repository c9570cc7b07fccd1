"""Where the per-step reductions run: one protocol (``base.Reducer``), three implementations.

- ``rust``: CPU tensors, the fused Rust kernel read by address (one call per step);
- ``device``: torch operations on the tensors' device, results read one step later on CUDA;
- ``sharded``: FSDP2, each rank reduces its shard and one all-reduce combines O(groups) numbers.

``choose`` picks one from the parameters and the tracker's ``reducer=`` argument.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from ...errors import DeviceError, InvalidArgumentError
from ..distributed import is_sharded
from .base import Blocks, Item, Pending, Reads, Reducer
from .device import TorchReducer, torch_group_sums
from .rust import KernelPlan, RustReducer
from .sharded import DistributedReducer, local_tensors, sharded_reducer

__all__ = [
    "Blocks",
    "Item",
    "Pending",
    "Reads",
    "Reducer",
    "RustReducer",
    "KernelPlan",
    "TorchReducer",
    "torch_group_sums",
    "DistributedReducer",
    "choose",
]


def choose(params: Sequence[Any], kind: str) -> Reducer:
    """The reducer for ``kind``: "auto" (Rust for CPU tensors, the device otherwise), "rust",
    "torch" (device reducer, delayed), "torch-sync" (device reducer, consumed at once). DTensor
    parameters (FSDP2) get the sharded reducer around the local one ``kind`` picks."""
    if is_sharded(params):
        return sharded_reducer(params, _single_process(local_tensors(params), kind))
    return _single_process(params, kind)


def _single_process(params: Sequence[Any], kind: str) -> Reducer:
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
