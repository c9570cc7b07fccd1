"""The dataflow graph the pattern analysis reads: tensor values and the calls between them.

The graph is op-level (F.linear, F.conv2d, F.batch_norm, relu, flatten, add, ...), not
module-level, so a functional call inside a forward, an in-place op or a parameter used by hand
looks exactly like its module counterpart. It is built by ``trace.py`` from a real forward pass.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any


@dataclass
class Value:
    """One tensor as it existed at one point of the forward pass (an in-place op makes a new one)."""

    id: int
    shape: tuple[int, ...]
    kind: str  # "input", "param", "buffer", "const" or "computed"
    name: str | None = None  # parameter / buffer name for leaves
    producer: int | None = None  # id of the Call that made it
    consumers: list[int] = field(default_factory=list)  # ids of Calls reading it
    floating: bool = True


@dataclass
class Call:
    """One intercepted torch function call."""

    id: int
    op: str  # canonical op name (leading underscores and in-place suffix removed)
    raw: str  # the function's own name
    inputs: list[int]  # value ids of every tensor argument, in argument order
    roles: dict[str, int]  # named tensor arguments of the ops the analysis knows (weight, bias...)
    attrs: dict[str, Any]  # non-tensor arguments, bound to their names where known
    outputs: list[int]  # value ids of the tensors it returned (or mutated)
    # the function and its arguments with every tensor replaced by ``Slot(value id)``, so that
    # shape operations can be replayed on a label tensor (propagate.py)
    fn: Any = None
    targs: tuple = ()
    tkwargs: dict[str, Any] = field(default_factory=dict)


@dataclass(frozen=True)
class Slot:
    """Stands for the tensor argument that was value ``vid`` in a recorded call's arguments."""

    vid: int


@dataclass
class Graph:
    values: dict[int, Value] = field(default_factory=dict)
    calls: dict[int, Call] = field(default_factory=dict)
    outputs: list[int] = field(default_factory=list)  # value ids the forward returned, in order
    # parameter name -> ids of the calls that read that leaf directly
    param_uses: dict[str, list[int]] = field(default_factory=dict)
    # parameter / buffer name -> leaf value id
    leaf_of: dict[str, int] = field(default_factory=dict)
    mode: str = "meta"  # how the trace ran: "meta" (no compute) or "real"

    def producer(self, vid: int) -> Call | None:
        p = self.values[vid].producer
        return None if p is None else self.calls.get(p)

    def param_ancestors(self, vid: int, _memo: dict[int, frozenset[str]] | None = None) -> frozenset[str]:
        """Names of the parameters a value is computed from (itself, if it is one)."""
        memo = {} if _memo is None else _memo
        stack = [vid]
        order: list[int] = []
        while stack:  # iterative post-order: parametrisation chains can be long
            v = stack.pop()
            if v in memo:
                continue
            order.append(v)
            call = self.producer(v)
            if call is not None:
                stack.extend(i for i in call.inputs if i not in memo)
        for v in reversed(order):
            val = self.values[v]
            if val.kind == "param":
                memo[v] = frozenset([val.name])  # type: ignore[list-item]
                continue
            call = self.producer(v)
            acc: frozenset[str] = frozenset()
            if call is not None:
                for i in call.inputs:
                    acc = acc | memo.get(i, frozenset())
            memo[v] = acc
        return memo[vid]

    def reachable_from(self, vid: int) -> set[int]:
        """Every value computed (directly or not) from ``vid``, itself included."""
        seen = {vid}
        stack = [vid]
        while stack:
            v = stack.pop()
            for c in self.values[v].consumers:
                for o in self.calls[c].outputs:
                    if o not in seen:
                        seen.add(o)
                        stack.append(o)
        return seen

    def live(self) -> set[int]:
        """Values the model's outputs depend on; the rest (control-flow tests, logging) is ignored."""
        seen = set(self.outputs)
        stack = list(self.outputs)
        while stack:
            call = self.producer(stack.pop())
            if call is None:
                continue
            for i in call.inputs:
                if i not in seen:
                    seen.add(i)
                    stack.append(i)
        return seen
