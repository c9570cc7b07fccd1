"""Labels: which unit of a layer each entry of a tensor belongs to, kept small.

A perturbation of a layer's units (docs/theory.md §2) reaches later tensors through reshapes,
transposes, head splits, concatenations and the like. Where each unit went is a *label*: an int64
tensor with one entry per entry of the value (the unit's id, ``NONE`` where no unit is), stored
*compressed*: every axis along which the label does not change has size 1 (broadcasting gives the
rest back). A Linear's output ``(B, T, E)`` is labelled by a ``(1, 1, E)`` tensor, its view into
heads ``(B, T, H, d_h)`` by ``(1, 1, H, d_h)``, a conv channel after a flatten by ``(1, C·H·W)``.

Shift perturbations also carry *position classes* ``P`` (same layout): two entries of one unit
are shifted by the same amount when their classes are equal. A bias shift is one class
everywhere; the shift of a Linear's column j (x_j·c) varies along every axis but the features;
attention turns a key-bias shift into one that varies along the queries and not the keys.

Every function here is pure and works on these small tensors; the cost is the size of the
label's non-broadcast axes, not the size of the activation.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch

NONE = -1  # no unit: the entry is not perturbed
MIX = -2  # a sum of several units' shifts (after attention mixes them): units in ``Lab.mix``
NEG = 1 << 40  # a shift label u | NEG is unit u's shift with a minus sign


class Lab:
    """One value's label ``L`` (unit ids), its shift classes ``P`` (None in scale mode) and, when
    ``L`` holds ``MIX`` entries, the units mixed there."""

    __slots__ = ("L", "P", "mix")

    def __init__(self, L: torch.Tensor, P: torch.Tensor | None = None, mix: frozenset[int] = frozenset()):
        self.L = L
        self.P = P
        self.mix = mix

    def units(self) -> set[int]:
        ids = torch.unique(self.L)
        out = {int(u) & (NEG - 1) for u in ids.tolist() if u >= 0}
        if (ids == MIX).any():
            out |= set(self.mix)
        return out

    def varying(self) -> set[int]:
        """Axes along which a shift may differ between entries of one unit."""
        return set() if self.P is None else {a for a, n in enumerate(self.P.shape) if n > 1}

    def labelled_axes(self) -> set[int]:
        return {a for a, n in enumerate(self.L.shape) if n > 1}


def compress(t: torch.Tensor) -> torch.Tensor:
    """``t`` with every axis along which it is constant reduced to size 1 (a contiguous copy)."""
    for a in range(t.dim()):
        if t.shape[a] > 1 and t.stride(a) == 0:
            t = t.narrow(a, 0, 1)
    for a in range(t.dim()):
        if t.shape[a] > 1:
            first = t.narrow(a, 0, 1)
            if torch.equal(t, first.expand_as(t)):
                t = first
    return t.contiguous()


def align(t: torch.Tensor, ndim: int) -> torch.Tensor:
    """Leading size-1 axes up to ``ndim`` (numpy broadcasting)."""
    return t.reshape((1,) * (ndim - t.dim()) + tuple(t.shape)) if t.dim() < ndim else t


def none_like(ndim: int) -> torch.Tensor:
    return torch.full((1,) * ndim, NONE, dtype=torch.int64)


def zeros_like(ndim: int) -> torch.Tensor:
    return torch.zeros((1,) * ndim, dtype=torch.int64)


def _groups(src: Sequence[int], dst: Sequence[int]) -> list[tuple[list[int], list[int]]] | None:
    """Consecutive axes of ``src`` and ``dst`` with equal products (how a reshape regroups)."""
    if math.prod(src) != math.prod(dst) or 0 in src or 0 in dst:
        return None
    out: list[tuple[list[int], list[int]]] = []
    i = j = 0
    while i < len(src) and j < len(dst):
        a, b = [i], [j]
        ps, pd = src[i], dst[j]
        i, j = i + 1, j + 1
        while ps != pd:
            if ps < pd:
                ps *= src[i]
                a.append(i)
                i += 1
            else:
                pd *= dst[j]
                b.append(j)
                j += 1
        out.append((a, b))
    if not out:
        return [(list(range(len(src))), list(range(len(dst))))]
    out[-1][0].extend(range(i, len(src)))
    out[-1][1].extend(range(j, len(dst)))
    return out


def reshape(t: torch.Tensor, src: Sequence[int], dst: Sequence[int]) -> torch.Tensor | None:
    """The label of a value of shape ``src`` after a reshape to ``dst``; only the axis groups the
    label varies along are materialised. None when the sizes do not match."""
    t = align(t, len(src))
    groups = _groups(src, dst)
    if groups is None:
        return None
    full_src = list(t.shape)
    new = [1] * len(dst)
    for a, b in groups:
        if any(t.shape[x] > 1 for x in a):
            for x in a:
                full_src[x] = src[x]
            for y in b:
                new[y] = dst[y]
    return compress(t.expand(full_src).reshape(new))


def expand(t: torch.Tensor, shape: Sequence[int]) -> torch.Tensor:
    return align(t, len(shape)).expand(tuple(shape))


def positions(shape: Sequence[int], axes: Sequence[int]) -> torch.Tensor:
    """A class per position along ``axes`` (constant along the others): row-major ids."""
    sizes = [shape[a] if a in axes else 1 for a in range(len(shape))]
    return torch.arange(math.prod(sizes), dtype=torch.int64).reshape(sizes)


def reduce_classes(P: torch.Tensor, axes: Sequence[int], keepdim: bool) -> torch.Tensor:
    """Classes after a sum/mean over ``axes``: positions whose classes agree along the reduced
    axes keep one class."""
    axes = sorted(a for a in axes if a < P.dim())
    if not any(P.shape[a] > 1 for a in axes):
        out = P
    else:
        keep = [a for a in range(P.dim()) if a not in axes]
        moved = P.permute(keep + axes)
        rows = moved.reshape(math.prod(moved.shape[: len(keep)]), -1)
        ids = torch.unique(rows, dim=0, return_inverse=True)[1]
        out = ids.reshape([P.shape[a] for a in keep] + [1] * len(axes)).permute(
            [keep.index(a) if a in keep else len(keep) + axes.index(a) for a in range(P.dim())])
    if not keepdim:
        out = out.reshape([n for a, n in enumerate(out.shape) if a not in axes])
    return compress(out)
