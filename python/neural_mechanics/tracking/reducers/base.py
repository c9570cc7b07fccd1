"""The one protocol every reducer follows, and what they share.

A reducer turns items, ``(θ, ĝ or None, v or None, axis, block)`` of torch tensors, into the
fused sums of every kept index: one float64 array (rows, sums) for the items (sums in the order
of ``SUM_NAMES``) and one (rows, 2) array of plain sums of the ``extra`` items (θ only).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any, Generic, Protocol, TypeVar

import numpy as np

Item = tuple  # (theta, grad | None, velocity | None, axis, block)
Blocks = tuple[np.ndarray, "np.ndarray | None"]  # (main rows, extra rows or None)
T = TypeVar("T")


class Pending(Generic[T]):
    """A result that may still be on its way from the device."""

    def __init__(self, fetch: Callable[[], T]):
        self._fetch = fetch
        self._value: T | None = None
        self._done = False

    def result(self) -> T:
        if not self._done:
            self._value, self._done = self._fetch(), True
        return self._value  # type: ignore[return-value]


@dataclass(frozen=True)
class Reads:
    """What a tracker reads every step: its plan's reductions, over the parameters in ``names``
    order; ``view(reduction)`` maps a tensor to what that reduction reads (a row range stays
    lazy under FSDP2); ``sum_third[i]``: reduction i also needs the plain sum of the third array
    (a translation part's ⟨1, b⟩ or ⟨1, d⟩)."""

    reductions: Sequence[Any]
    names: Sequence[str]
    params: dict[str, Any]
    sum_third: np.ndarray
    view: Callable[[Any], Callable[[Any], Any]]

    def items(self, tensors: Sequence[Sequence[Any]], with_sums: bool) -> tuple[list[Item], list[Item]]:
        """The items of every reduction from (θ, ĝ, v) per parameter, and (if asked) the θ-only
        items of v for the reductions in ``sum_third``."""
        by_name = dict(zip(self.names, tensors))
        items, extra = [], []
        for r, third in zip(self.reductions, self.sum_third):
            view = self.view(r)
            t, g, v = by_name[r.name]
            items.append((view(t), None if g is None else view(g), None if v is None else view(v), r.axis, r.block))
            if with_sums and third:
                extra.append((view(v), None, None, r.axis, r.block))
        return items, extra


class Reducer(Protocol):
    """Reduces items where their tensors live. ``delayed``: the result of a step is read one
    step later (the host never waits for the device inside the training loop)."""

    delayed: bool

    def submit_blocks(self, items: Sequence[Item], extra: Sequence[Item] = ()) -> Pending[Blocks]:
        """The items' sums as one (rows, K) block and the extra items' (rows, 2) sums (or None)."""
        ...

    def reduce_plan(self, reads: Reads, tensors: Sequence[Sequence[Any]], with_sums: bool) -> Pending[Blocks]:
        """``submit_blocks`` of ``reads.items(tensors, with_sums)`` (a reducer may do it faster)."""
        ...
