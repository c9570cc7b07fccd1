"""The result types: one symmetry group, and the collection with its summary and skip reasons."""

from __future__ import annotations

import html
from collections.abc import Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import torch

from ..errors import InvalidArgumentError

SYMMETRIES = ("translation", "scale", "rescale")

Index = tuple  # one of the allowed forms, see ``check_index``
Part = tuple  # (parameter name, index, sign)


@dataclass(frozen=True)
class SymmetryGroup:
    """One group A of docs/theory.md §2 and the parameter entries it is made of.

    ``parts`` lists ``(parameter name, index, sign)``: ``param[index]`` are the entries, ``sign``
    is +1, or -1 for the outgoing side of a rescale group and for the parts of a signed
    translation that move by −c (docs/theory.md §2b: a token-table column against the same
    column of the position table). ``normalizers`` (filled by discovery
    for scale groups) names the normaliser modules whose epsilon slightly breaks the group, as
    ``(module name, kind, channels of its input, eps)``; verify uses it to predict the residual.
    """

    symmetry: str
    layer: str
    index: int
    label: str
    parts: tuple[Part, ...]
    normalizers: tuple = ()

    def __post_init__(self) -> None:
        # Accept a list for convenience but store a tuple: the dataclass is frozen and hashable.
        if not isinstance(self.parts, tuple):
            object.__setattr__(self, "parts", tuple(tuple(p) for p in self.parts))

    @property
    def incoming(self) -> tuple[Part, ...]:
        return tuple(p for p in self.parts if p[2] > 0)

    @property
    def outgoing(self) -> tuple[Part, ...]:
        return tuple(p for p in self.parts if p[2] < 0)

    def size(self, params: dict[str, torch.Tensor]) -> int:
        return sum(params[n][idx].numel() for n, idx, _ in self.parts)


def _is_full(s: Any) -> bool:
    return isinstance(s, slice) and s.start is None and s.stop is None and s.step is None


def _is_range(s: Any, n: int) -> bool:
    return (
        isinstance(s, slice) and s.step is None and isinstance(s.start, int) and isinstance(s.stop, int)
        and 0 <= s.start < s.stop <= n
    )


def _is_int(x: Any, n: int) -> bool:
    return isinstance(x, int) and not isinstance(x, bool) and 0 <= x < n


def check_index(index: Any, shape: Sequence[int]) -> str | None:
    """None if ``index`` is one of the allowed forms and in range for ``shape``, else why not.

    Allowed (a tracker maps each to a fused reduction): a row ``(i,)``, a column
    ``(slice(None), j)``, a column block ``(slice(None), slice(a, b))``, the whole tensor
    ``(slice(None),)`` and, for grouped convolutions, a column within a row range
    ``(slice(r0, r1), j)``.
    """
    if not isinstance(index, tuple) or len(index) not in (1, 2):
        return f"index must be a tuple of 1 or 2 items, got {index!r}"
    if len(shape) == 0:
        return "a 0-d parameter cannot be indexed; it cannot be part of a group"
    if len(index) == 1:
        (a,) = index
        if _is_full(a) or _is_int(a, shape[0]):
            return None
        return f"{index!r} is neither a row (i,) with 0 <= i < {shape[0]} nor the whole tensor (slice(None),)"
    if len(shape) < 2:
        return f"a column index {index!r} needs a tensor of 2 or more dimensions, not shape {tuple(shape)}"
    a, b = index
    if not (_is_full(a) or _is_range(a, shape[0])):
        return f"the first item of {index!r} must be slice(None) or slice(r0, r1) within {shape[0]} rows"
    if _is_int(b, shape[1]):
        return None
    if _is_full(a) and _is_range(b, shape[1]):
        return None
    return f"the column part of {index!r} must be an int or a block slice(a, b) within {shape[1]} columns"


def validate_group(group: SymmetryGroup, params: Mapping[str, torch.Tensor]) -> None:
    if group.symmetry not in SYMMETRIES:
        raise InvalidArgumentError(f"symmetry must be one of {SYMMETRIES}, got {group.symmetry!r}")
    if not group.parts:
        raise InvalidArgumentError(f"group {group.layer}/{group.index} has no parts")
    for part in group.parts:
        if len(part) != 3:
            raise InvalidArgumentError(f"a part is (parameter name, index, sign), got {part!r}")
        name, index, sign = part
        if name not in params:
            raise InvalidArgumentError(
                f"{name!r} is not a parameter of the model (see model.named_parameters())"
            )
        why = check_index(index, params[name].shape)
        if why is not None:
            raise InvalidArgumentError(f"{name}: {why}")
        if sign not in (1, -1):
            raise InvalidArgumentError(f"sign must be +1 or -1, got {sign!r}")
        if sign == -1 and group.symmetry == "scale":
            raise InvalidArgumentError("a scale group has no -1 parts (rescale: the outgoing side; translation: "
                                       "the parts shifted by -c)")
    if group.symmetry == "rescale" and not (group.incoming and group.outgoing):
        raise InvalidArgumentError("a rescale group needs parts with sign +1 and parts with sign -1")
    if group.symmetry == "translation" and not group.incoming:
        raise InvalidArgumentError("a signed translation needs at least one part with sign +1")


class Symmetries:
    """Every symmetry group found in a model, and why the other parameters are not covered.

    Iterate over it for the groups (``SymmetryGroup``); ``len``, ``by_kind``, ``summary()``
    (a pandas DataFrame) and ``skipped`` (parameter name -> reason) describe it.
    """

    def __init__(self, groups: Iterable[SymmetryGroup] = (), skipped: dict[str, str] | None = None,
                 notes: Sequence[str] = ()):
        self.groups: tuple[SymmetryGroup, ...] = tuple(groups)
        self.skipped: dict[str, str] = dict(skipped or {})
        self.notes: tuple[str, ...] = tuple(notes)
        seen: set[tuple[str, str, int]] = set()
        for g in self.groups:
            key = (g.symmetry, g.layer, g.index)
            if key in seen:
                raise InvalidArgumentError(f"two groups share (symmetry, layer, index) = {key}")
            seen.add(key)

    @classmethod
    def from_groups(cls, model: torch.nn.Module, groups: Iterable[SymmetryGroup | dict | tuple]) -> Symmetries:
        """Groups declared by hand, validated against ``model``'s parameters."""
        params = dict(model.named_parameters())
        out = []
        for g in groups:
            if isinstance(g, dict):
                g = SymmetryGroup(**g)
            elif isinstance(g, tuple) and not isinstance(g, SymmetryGroup):
                g = SymmetryGroup(*g)
            if not isinstance(g, SymmetryGroup):
                raise InvalidArgumentError(f"expected a SymmetryGroup (or its fields as a dict), got {g!r}")
            validate_group(g, params)
            out.append(g)
        return cls(out)

    def __add__(self, other: Symmetries) -> Symmetries:
        if not isinstance(other, Symmetries):
            return NotImplemented
        covered = {p[0] for g in other.groups for p in g.parts}
        skipped = {k: v for k, v in {**self.skipped, **other.skipped}.items() if k not in covered}
        return Symmetries(self.groups + other.groups, skipped, self.notes + other.notes)

    def __iter__(self) -> Iterator[SymmetryGroup]:
        return iter(self.groups)

    def __len__(self) -> int:
        return len(self.groups)

    def __getitem__(self, i: int) -> SymmetryGroup:
        return self.groups[i]

    def by_kind(self, symmetry: str) -> list[SymmetryGroup]:
        if symmetry not in SYMMETRIES:
            raise InvalidArgumentError(f"symmetry must be one of {SYMMETRIES}, got {symmetry!r}")
        return [g for g in self.groups if g.symmetry == symmetry]

    def _rows(self) -> list[dict[str, Any]]:
        rows: dict[tuple[str, str], dict[str, Any]] = {}
        for g in self.groups:
            r = rows.setdefault((g.layer, g.symmetry), {"layer": g.layer, "symmetry": g.symmetry,
                                                       "groups": 0, "parameters": []})
            r["groups"] += 1
            for name, _, _ in g.parts:
                if name not in r["parameters"]:
                    r["parameters"].append(name)
        for r in rows.values():
            r["parameters"] = ", ".join(r["parameters"])
        return list(rows.values())

    def summary(self):
        """One row per (layer, symmetry): how many groups, over which parameters."""
        import pandas as pd

        return pd.DataFrame(self._rows(), columns=["layer", "symmetry", "groups", "parameters"])

    def __repr__(self) -> str:
        counts = {s: len(self.by_kind(s)) for s in SYMMETRIES}
        head = (f"Symmetries({len(self)} groups: " + ", ".join(f"{v} {k}" for k, v in counts.items())
                + f"; {len(self.skipped)} parameters skipped)")
        lines = [head]
        for r in self._rows():
            lines.append(f"  {r['layer']:<32} {r['symmetry']:<12} {r['groups']:>6}  {r['parameters']}")
        for name, why in self.skipped.items():
            lines.append(f"  skipped {name}: {why}")
        return "\n".join(lines)

    def _repr_html_(self) -> str:
        rows = "".join(
            f"<tr><td>{html.escape(r['layer'])}</td><td>{r['symmetry']}</td><td>{r['groups']}</td>"
            f"<td>{html.escape(r['parameters'])}</td></tr>" for r in self._rows()
        )
        skipped = "".join(
            f"<tr><td>{html.escape(k)}</td><td>{html.escape(v)}</td></tr>" for k, v in self.skipped.items()
        )
        return (
            f"<p><b>{len(self)} symmetry groups</b></p><table><tr><th>layer</th><th>symmetry</th>"
            f"<th>groups</th><th>parameters</th></tr>{rows}</table>"
            + (f"<p>skipped</p><table><tr><th>parameter</th><th>reason</th></tr>{skipped}</table>"
               if skipped else "")
        )


def declare(model: torch.nn.Module, groups: Iterable[SymmetryGroup | dict | tuple],
            symmetries: Symmetries | None = None) -> Symmetries:
    """Declare groups by hand (for code neither tracing nor hooks can read), validated.

    ``groups`` are ``SymmetryGroup`` objects or dicts of their fields. With ``symmetries`` (e.g.
    the result of ``find_symmetries``) the declared groups are added to it.
    """
    declared = Symmetries.from_groups(model, groups)
    return declared if symmetries is None else symmetries + declared
