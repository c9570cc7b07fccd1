"""Tracking under torch.distributed: DDP and FSDP2 (``torch.distributed.fsdp.fully_shard``).

DDP: every rank holds the whole model and, when the optimizer's step hooks run, the same averaged
gradients and momentum buffers. Rank 0 alone measures; the other ranks register no hook, reduce
nothing and send nothing. Their ``tracker.run`` is a ``RunOnRankZero`` stub that says so.

FSDP2: every parameter is a DTensor sharded on dim 0 over a 1-D device mesh, so no rank sees a
whole tensor. Each rank reduces its own shard with the ordinary reducer and the per-row results are
combined with ONE all-reduce (SUM) of O(groups) float64 numbers per measured step:

- row statistics (axis 0: scale, the incoming side of rescale, biases): the local rows of a dim-0
  shard are the contiguous global rows [offset, offset + n); each rank writes them at their global
  position of a zero vector, so the sum holds every row exactly once (adding zeros is exact);
- column statistics (axis 1: translation, the outgoing side of rescale, Flatten blocks, a row range
  of a grouped convolution): a shard holds some rows of every column, so its sums are partial and
  the all-reduce adds them.

The result is laid out exactly as a single-process reducer's, so the tracker's algebra runs
unchanged, identically on every rank (O(groups) work); the Run handed out lives on rank 0.
Nothing of size O(parameters) crosses the network. FSDP1 (``FullyShardedDataParallel``) is
refused with an error that says what to use: its parameters are 1-D slices of a flat buffer whose
shard boundaries cut through rows.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any, NamedTuple

from ..errors import InvalidArgumentError, RunNotOnThisRankError

__all__ = ["RunOnRankZero", "RunNotOnThisRankError", "Context", "attach", "is_sharded"]


class RunOnRankZero:
    """What ``tracker.run`` gives on ranks other than 0: a handle that says where the Run is."""

    def __init__(self, rank: int, world_size: int, mode: str):
        self.rank = rank
        self.world_size = world_size
        self.mode = mode

    def _message(self) -> str:
        return (
            f"the run lives on rank 0 (this is rank {self.rank} of {self.world_size}, {self.mode}); "
            "read tracker.run there (e.g. `if dist.get_rank() == 0: run = tracker.run`)"
        )

    def __getattr__(self, name: str) -> Any:
        if name.startswith("__"):
            raise AttributeError(name)
        raise RunNotOnThisRankError(self._message())

    def __bool__(self) -> bool:  # `if run:` is false on the ranks that hold no run
        return False

    def __repr__(self) -> str:
        return f"RunOnRankZero({self._message()})"


class RowRange(NamedTuple):
    """Rows [start, stop) of a (possibly sharded) tensor, kept lazy: slicing a DTensor along its
    sharded dim would make torch gather the whole tensor, which is what this module avoids."""

    tensor: Any
    start: int
    stop: int


def initialized_dist() -> Any:
    import torch.distributed as dist

    return dist if dist.is_available() and dist.is_initialized() else None


def dtensor_type() -> Any:
    try:
        from torch.distributed.tensor import DTensor
    except ImportError:  # pragma: no cover - very old torch
        return None
    return DTensor


def is_sharded(params: Sequence[Any]) -> bool:
    """True when any of ``params`` is a DTensor (FSDP2 / tensor parallel parameters)."""
    if initialized_dist() is None:
        return False
    dtensor = dtensor_type()
    return dtensor is not None and any(isinstance(p, dtensor) for p in params)


def _fsdp1_type() -> Any:
    try:
        from torch.distributed.fsdp import FullyShardedDataParallel
    except ImportError:  # pragma: no cover
        return None
    return FullyShardedDataParallel


class Context:
    """How one tracker takes part in a distributed job (built by ``attach``)."""

    def __init__(self, mode: str, module: Any, rank: int, world_size: int, group: Any = None):
        self.mode = mode  # "ddp" or "fsdp2"
        self.module = module  # the module the tracker reads (DDP: the wrapped one)
        self.rank = rank
        self.world_size = world_size
        self.group = group
        # DDP: only rank 0 does anything. FSDP2: every rank must reduce its shard.
        self.hooks = mode != "ddp" or rank == 0
        self.owns_run = rank == 0
        # Collective (FSDP2): every rank runs the same reductions in the same order.
        self.collective = mode == "fsdp2"
        self._named: dict[str, Any] = {}
        if mode == "ddp":
            # The same Parameter objects under both spellings, so that groups found on the
            # wrapped module ("0.weight") and groups declared on the DDP wrapper
            # ("module.0.weight") both resolve.
            inner = dict(module.named_parameters())
            self._named = {**inner, **{f"module.{k}": v for k, v in inner.items()}}
        else:
            # Captured now, outside any forward: inside FSDP2's forward the root module's
            # parameters are temporarily swapped for unsharded plain tensors.
            self._named = dict(module.named_parameters())

    def named_parameters(self) -> dict[str, Any]:
        return self._named

    def view(self, reduction: Any) -> Callable[[Any], Any]:
        """The tracker's per-reduction view; under FSDP2 a row range stays lazy (RowRange)."""
        if not self.collective or reduction.rows is None:
            return reduction.view
        r0, r1 = reduction.rows
        return lambda t: RowRange(t, r0, r1)

    def find_symmetries(self, model: Any, example: Any, **kw: Any) -> Any:
        """Discovery from the first forward (``kw``: find_symmetries' options). FSDP2: on meta
        stand-ins with FSDP's hooks suspended."""
        from ..symmetries import find_symmetries

        if not self.collective:
            return find_symmetries(model, example, **kw)
        return _find_symmetries_sharded(model, example, **kw)


def attach(model: Any) -> Context | None:
    """The distributed context of ``model``, or None for an ordinary single-process model."""
    dist = initialized_dist()
    if dist is None:
        return None
    import torch

    fsdp1 = _fsdp1_type()
    if fsdp1 is not None and any(isinstance(m, fsdp1) for m in model.modules()):
        raise InvalidArgumentError(
            "FSDP1 (FullyShardedDataParallel) is not supported by track(): its parameters are 1-D "
            "slices of a flat buffer whose shard boundaries cut through rows, even with "
            "use_orig_params=True. Use FSDP2 (torch.distributed.fsdp.fully_shard), whose "
            "parameters are DTensors sharded on dim 0, or DistributedDataParallel."
        )
    rank, world = dist.get_rank(), dist.get_world_size()
    if isinstance(model, torch.nn.parallel.DistributedDataParallel):
        return Context("ddp", model.module, rank, world)
    params = [p for p in model.parameters()]
    dtensor = dtensor_type()
    shards = [p for p in params if dtensor is not None and isinstance(p, dtensor)]
    if not shards:
        return None  # a plain model in a distributed job (e.g. per-rank experiments): as usual
    mesh = shards[0].device_mesh
    if any(p.device_mesh != mesh for p in shards):  # DeviceMesh compares by layout, not identity
        raise InvalidArgumentError("track(): the model's DTensor parameters live on several device meshes; one 1-D mesh is supported")
    if mesh.ndim != 1:
        raise InvalidArgumentError(
            f"track(): a {mesh.ndim}-D device mesh (HSDP / tensor parallel) is not supported yet; "
            "FSDP2 over a 1-D mesh and DDP are"
        )
    from torch.distributed.tensor import Replicate, Shard

    for name, p in model.named_parameters():
        if isinstance(p, dtensor) and not all(pl == Shard(0) or isinstance(pl, Replicate) for pl in p.placements):
            raise InvalidArgumentError(f"track(): parameter {name} has placements {p.placements}; Shard(0) or Replicate are supported")
    return Context("fsdp2", model, rank, world, group=mesh.get_group())


def _find_symmetries_sharded(model: Any, example: Any, **kw: Any) -> Any:
    """find_symmetries on an FSDP2 model from inside its forward, touching no shard.

    Every module's parameters are swapped for meta stand-ins of the global shape and every
    module's forward hooks are set aside, so the trace neither all-gathers nor reshards; the
    shapes (hence the groups and the parameter names) are those of the unsharded model.
    Everything is put back afterwards.
    """
    import torch

    from ..symmetries import find_symmetries

    modules = list(model.modules())
    saved = [(m, dict(m._parameters), dict(m._forward_pre_hooks), dict(m._forward_hooks)) for m in modules]
    meta: dict[int, Any] = {}
    try:
        for m in modules:
            m._forward_pre_hooks.clear()
            m._forward_hooks.clear()
            for leaf, p in list(m._parameters.items()):
                if p is None:
                    continue
                if id(p) not in meta:  # a parameter shared by two modules stays shared
                    stand_in = torch.empty(tuple(p.shape), dtype=p.dtype, device="meta")
                    meta[id(p)] = torch.nn.Parameter(stand_in, requires_grad=p.requires_grad)
                m._parameters[leaf] = meta[id(p)]
        return find_symmetries(model, example, **kw)
    finally:
        for m, params, pre, post in saved:
            m._parameters.clear()
            m._parameters.update(params)
            m._forward_pre_hooks.clear()
            m._forward_pre_hooks.update(pre)
            m._forward_hooks.clear()
            m._forward_hooks.update(post)
