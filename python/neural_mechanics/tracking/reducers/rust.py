"""CPU tensors: the fused Rust kernel, read by address, one call and one GIL release per step.

Tensors travel by address (``_native.reduce_ptrs``): making numpy views of dozens of tensors
every step would cost more than reducing them. This module keeps the kernel's contract: every
tensor (or a contiguous copy) stays referenced, contiguous and on the CPU during the call, and
is checked against the shape and dtype its layout was computed for.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np

from ... import _native
from ...errors import DTypeError
from .base import Blocks, Item, Pending, Reads


def _dtype_codes() -> dict[Any, int]:
    import torch

    return {getattr(torch, name): code for name, code in _native.DTYPE_CODES.items()}


_DTYPE_CODES = _dtype_codes()


class KernelPlan:
    """The fixed part of the kernel's spec of every reduction of ``reads``, computed once.

    A reduction's element count, layout and dtype code never change during a run, so a step only
    reads the tensors' current addresses and adds each reduction's byte offset. Addresses are
    never kept from one step to the next: the optimizer, autograd or the user may have replaced
    any tensor in between.
    """

    def __init__(self, reads: Reads):
        params = reads.params
        # None: a dtype the kernel does not read, so that the first step reports it
        self.expected = [(params[n].shape, params[n].dtype if params[n].dtype in _DTYPE_CODES else None) for n in reads.names]
        index = {n: i for i, n in enumerate(reads.names)}
        self._itemsize = [params[n].element_size() for n in reads.names]
        self._static = [self._static_spec(r, params[r.name], index[r.name]) for r in reads.reductions]
        self._sum_third = [s for s, wanted in zip(self._static, reads.sum_third) if wanted]

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
        return param_index, offset, (numel, *_native.layout(shape, r.axis, r.block), _DTYPE_CODES.get(p.dtype, 0))

    def by_element(self, with_sums: bool) -> tuple[list[tuple], list[tuple]]:
        """Every reduction (and, if asked, every plain sum of a third array) as (parameter index,
        element offset, numel, outer, groups, seg): the form ``_native.reduce_adam_ptrs`` reads,
        where the third array is computed in Rust rather than passed by address."""

        def of(static: list[tuple]) -> list[tuple]:
            return [(i, offset // self._itemsize[i], *rest[:4]) for i, offset, rest in static]

        return of(self._static), of(self._sum_third) if with_sums else []

    def specs(self, tensors: Sequence[Sequence[Any]], with_sums: bool, keep: list[Any]) -> tuple[list[tuple], list[tuple]]:
        """The kernel's specs of every reduction (and the third arrays' plain sums if asked)
        from this step's (θ, ĝ or None, v or None) per parameter; contiguous copies go to ``keep``."""
        addrs = [
            (_address(t, shape, dtype, keep), 0 if g is None else _address(g, shape, dtype, keep), 0 if v is None else _address(v, shape, dtype, keep))
            for (t, g, v), (shape, dtype) in zip(tensors, self.expected)
        ]
        main = []
        for i, offset, rest in self._static:
            t, g, v = addrs[i]
            main.append((t + offset, g + offset if g else 0, v + offset if v else 0) + rest)
        extra = [(addrs[i][2] + offset, 0, 0) + rest for i, offset, rest in self._sum_third] if with_sums else []
        return main, extra


def _address(t: Any, shape: Any, dtype: Any, keep: list[Any]) -> int:
    """The address of ``t`` after checking it is a CPU tensor of ``shape`` and ``dtype``."""
    if t.dtype is not dtype or not t.is_cpu or t.shape != shape:
        raise _unexpected_tensor_error(t, shape, dtype)
    if not t.is_contiguous():
        t = t.contiguous()
        keep.append(t)
    return t.data_ptr()


def _unexpected_tensor_error(t: Any, shape: Any, dtype: Any) -> Exception:
    from ...errors import DeviceError, DTypeError, ShapeError

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
    """CPU tensors through the fused kernel. ``compiled``: a plan's specs are compiled once
    (KernelPlan) and a step only reads addresses; False builds a spec per item every step (the
    general path, kept for comparisons)."""

    delayed = False

    def __init__(self, compiled: bool = True) -> None:
        self.compiled = compiled
        self._kernel: tuple[Reads, KernelPlan] | None = None

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
        return (addrs[0], addrs[1], addrs[2], theta.numel(), *_native.layout(tuple(theta.shape), axis, block), code)

    def submit_blocks(self, items: Sequence[Item], extra: Sequence[Item] = ()) -> Pending[Blocks]:
        keep: list[Any] = []  # contiguous copies must outlive the call
        blocks = _native.reduce_ptrs([self._spec(it, keep) for it in items], [self._spec(it, keep) for it in extra])
        del keep
        return Pending(lambda: blocks)

    def reduce_plan(self, reads: Reads, tensors: Sequence[Sequence[Any]], with_sums: bool) -> Pending[Blocks]:
        if not self.compiled:
            return self.submit_blocks(*reads.items(tensors, with_sums))
        if self._kernel is None or self._kernel[0] is not reads:
            self._kernel = (reads, KernelPlan(reads))
        keep: list[Any] = []
        try:
            specs = self._kernel[1].specs(tensors, with_sums, keep)
        except DTypeError:
            # Another dtype than the plan was compiled for (model.to(dtype) mid-run, a buffer
            # widened to match): the general path reads any dtype.
            return self.submit_blocks(*reads.items(tensors, with_sums))
        blocks = _native.reduce_ptrs(*specs)
        del keep
        return Pending(lambda: blocks)

    def submit(self, items: Sequence[Item]) -> Pending[list[np.ndarray]]:
        """One (groups, K) array per item, items of any arity (for tests and tools)."""
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
    from ...errors import DeviceError, DTypeError

    if t.device.type != "cpu":
        return DeviceError(f"the Rust reducer reads CPU tensors; got one on {t.device}")
    return DTypeError(f"unsupported or mixed dtypes {t.dtype} / {theta.dtype}; expected float32/64, float16, bfloat16")
