"""What a run says about each layer, in words: a verdict per (symmetry, layer), and what it leaves out.

A verdict judges the gradient constraint of docs/theory.md §3 over the whole run, from the
``residual`` column (NaN where a group had no gradient, by the rule of §3), and says whether a
theory was tested at all:

====================  =======================================================================
verdict               rule (r = median residual over the layer's groups and steps with a gradient)
====================  =======================================================================
no gradient           no group of the layer had a gradient at any step (a bias before BatchNorm)
ok                    r ≤ ``HOLDS[symmetry]``: the constraint holds to float32 rounding
broken by <norm> ε    a scale layer behind a normaliser with ``ROUNDING`` < r ≤ ``EPS_MAX``: the
                      normaliser's ε breaks the symmetry slightly; the exact ledger accounts for it
violated              anything above: the claimed symmetry does not hold
bookkeeping only      the constraint holds, but the optimizer's ``exact`` column only re-adds the
                      measured update and no ``paper`` prediction exists: no theory is tested
not covered           (summary rows of parameters that no tracked group contains)
====================  =======================================================================

The translation threshold is higher because its residual divides by |ĝ_A|: a classifier's
column gradient shrinks with the loss while the float32 rounding of Σ_c ĝ_c does not, so
rounding alone reaches ~1e-5 near zero training loss.

The second half of this module is coverage: which trainable parameters no group contains, why,
and the one line the tracker logs at set-up ("7,233 groups in 29 layers; 24 parameters (0.05% of
weights) not covered: residual add (24)").

Plain data in, plain data out: a run is read through its public methods (``groups``, ``array``,
``optimizer``, ...), never imported, so ``run`` (``summary``), ``plots`` and ``report`` all use
this module.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import numpy as np

__all__ = [
    "HOLDS",
    "ROUNDING",
    "EPS_MAX",
    "NO_GRADIENT_REL",
    "VERDICTS",
    "Verdict",
    "layer_verdict",
    "exact_is_bookkeeping",
    "skip_category",
    "as_sentence",
    "coverage_line",
    "uncovered_table",
    "uncovered_by_module",
]

# The constraint holds (float32 rounding) when the median residual is at most this.
HOLDS: dict[str, float] = {"translation": 1e-4, "scale": 1e-5, "rescale": 1e-5}
# Float32 rounding keeps an exact scale constraint below this; above it (and up to EPS_MAX), a
# scale group behind a normaliser is broken by the normaliser's ε (docs/theory.md §3).
ROUNDING = 1e-6
# ε/(σ² + ε) stays below this unless a channel's variance is under 100ε: above it, "violated".
EPS_MAX = 1e-2
# The "no gradient" rule of docs/theory.md §3 (verify and the tracker): |ĝ_A| ≤ this × |ĝ_L|.
NO_GRADIENT_REL = 1e-5

VERDICTS = ("ok", "broken by ε", "violated", "no gradient", "bookkeeping only", "not covered")


@dataclass(frozen=True)
class Verdict:
    """One layer's verdict: ``verdict`` (a word or two), ``reason`` (a sentence, thresholds
    included), the median residual and how many groups had a gradient at some step."""

    verdict: str
    reason: str
    residual_median: float
    groups_with_gradient: int
    groups: int


def exact_is_bookkeeping(run: Any) -> bool:
    """Whether the run's ``exact`` column only re-adds the measured update (any optimizer but
    torch.optim.SGD: docs/theory.md §5.3, "Other optimizers")."""
    kind = getattr(run, "exact_kind", "")
    if kind:
        return bool(kind == "bookkeeping")
    return (run.optimizer or "") != "SGD"


def _normalizer(run: Any, mask: np.ndarray) -> str:
    names = getattr(run.groups, "normalizer", None)
    if names is None:
        return ""
    found = [str(n) for n in names[mask] if n]
    return found[0] if found else ""


def layer_verdict(run: Any, symmetry: str, layer: str, *, residual: np.ndarray | None = None, paper: np.ndarray | None = None) -> Verdict:
    """The verdict of one (symmetry, layer) of ``run`` (see the module docstring for the rules).

    ``residual`` and ``paper``: the run's columns, when the caller already holds them (summary()
    judges every layer from one read)."""
    g = run.groups
    mask = np.asarray((g.symmetry == symmetry) & (g.layer == layer))
    n = int(mask.sum())
    res = (run.array("residual") if residual is None else residual)[:, mask]
    finite = np.isfinite(res)
    with_gradient = int(finite.any(axis=0).sum())
    if not finite.any():
        return Verdict(
            "no gradient",
            f"No group had a gradient above {NO_GRADIENT_REL:g} of its layer's at any step (docs/theory.md §3), "
            "as for a bias before BatchNorm: there is nothing to test.",
            float("nan"), 0, n,
        )
    r = float(np.median(res[finite]))
    partly = f" {n - with_gradient} of {n} groups never had a gradient." if with_gradient < n else ""
    norm = _normalizer(run, mask)
    if symmetry == "scale" and norm:
        if r <= ROUNDING:
            verdict, why = "ok", f"median residual {r:.1e} ≤ {ROUNDING:g}: the symmetry holds to float32 rounding."
        elif r <= EPS_MAX:
            verdict = f"broken by {norm} ε"
            why = (f"median residual {r:.1e}, above float32 rounding ({ROUNDING:g}) and ≤ {EPS_MAX:g}: {norm}'s ε breaks the "
                   "scale symmetry slightly; the exact ledger accounts for the breaking flux (docs/theory.md §3, §5.3).")
        else:
            verdict, why = "violated", f"median residual {r:.1e} > {EPS_MAX:g}: more than {norm}'s ε can explain; the symmetry does not hold."
    elif r <= HOLDS[symmetry]:
        verdict, why = "ok", f"median residual {r:.1e} ≤ {HOLDS[symmetry]:g}: the symmetry holds to float32 rounding."
    else:
        verdict, why = "violated", f"median residual {r:.1e} > {HOLDS[symmetry]:g}: the gradient is not orthogonal to the symmetry; it does not hold."
    if verdict != "violated" and exact_is_bookkeeping(run):
        p = (run.array("paper") if paper is None else paper)[:, mask]
        if not np.isfinite(p).any():
            why = (f"The constraint holds ({verdict}: {why[0].lower() + why[1:]}) But with {run.optimizer or 'this optimizer'} "
                   "`exact` only re-adds the measured update and there is no `paper` prediction: no theory is tested "
                   "(docs/theory.md §5.3).")
            verdict = "bookkeeping only"
    return Verdict(verdict, why[0].upper() + why[1:] + partly, r, with_gradient, n)


# -- coverage ------------------------------------------------------------------------------------
# Short names of skip reasons for the one-line coverage summary: the first pattern found in the
# reason wins; anything else is named by the reason's first clause.
SKIP_CATEGORIES: tuple[tuple[str, str], ...] = (
    ("residual add", "residual add"),
    ("frozen", "frozen"),
    ("not in the optimizer", "not in the optimizer"),
    ("not used in the forward pass", "unused in the forward pass"),
    ("shared parameter", "shared parameter"),
    ("computed by code", "computed by code"),
    ("eval mode", "normaliser in eval mode"),
    ("not positively homogeneous", "non-homogeneous activation"),
    ("identically zero", "zero gradient by construction"),
    ("reaches the model output", "reaches the output"),
    ("no symmetry pattern applies", "no symmetry pattern"),
)


def skip_category(reason: str) -> str:
    """A few words naming a skip reason ("residual add", "frozen", ...), for counts per reason."""
    low = reason.lower()
    for pattern, name in SKIP_CATEGORIES:
        if pattern in low:
            return name
    first = reason.split(";")[0].split(":")[0].strip()
    return first if len(first) <= 40 else first[:39] + "…"


def as_sentence(reason: str) -> str:
    """A skip reason as sentences: each "; "-separated clause capitalised and ended with a full
    stop (the words are discovery's, unchanged)."""
    out = []
    for clause in reason.split("; "):
        text = clause.strip()
        if text:
            text = text[0].upper() + text[1:]
            out.append(text if text.endswith((".", "!", "?")) else text + ".")
    return " ".join(out)


def uncovered_by_module(table: Any) -> list[tuple[str, str]]:
    """(module, reason) per module of an :func:`uncovered_table`: the parameters of one module
    that share a reason are named once ("weight, bias: Reason.")."""
    out = []
    for module, part in table.groupby("module", sort=False):
        by_reason: dict[str, list[str]] = {}
        for name, reason in zip(part["parameter"], part["reason"]):
            short = name[len(module) + 1 :] if name.startswith(module + ".") else name
            by_reason.setdefault(reason, []).append(short)
        out.append((str(module), " ".join(f"{', '.join(names)}: {reason}" for reason, names in by_reason.items())))
    return out


def _module(name: str) -> str:
    return name.rsplit(".", 1)[0] if "." in name else name


def uncovered_table(coverage: Mapping[str, Any] | None, skipped: Mapping[str, str] | None = None) -> Any:
    """One row per parameter no tracked group contains: parameter, module, entries, % of the
    trainable weights, category and reason (a sentence); a pandas DataFrame.

    ``coverage``: a run's ``coverage`` (None for runs saved before it existed: then the rows come
    from ``skipped``, without sizes).
    """
    import pandas as pd

    cols = ["parameter", "module", "entries", "% of weights", "category", "reason"]
    rows = []
    if coverage:
        total = max(int(coverage.get("entries", 0)), 1)
        for name, (entries, reason) in coverage.get("uncovered", {}).items():
            rows.append([name, _module(name), int(entries), 100.0 * int(entries) / total, skip_category(reason), as_sentence(reason)])
    else:
        for name, reason in (skipped or {}).items():
            rows.append([name, _module(name), np.nan, np.nan, skip_category(reason), as_sentence(reason)])
    return pd.DataFrame(rows, columns=cols)


def coverage_line(groups: int, layers: int, coverage: Mapping[str, Any] | None) -> str:
    """"7,233 groups in 29 layers; 24 parameters (0.05% of weights) not covered: residual add (24)"."""
    head = f"{groups:,} group{'s' if groups != 1 else ''} in {layers:,} layer{'s' if layers != 1 else ''}"
    if not coverage:
        return head
    uncovered = coverage.get("uncovered", {})
    if not uncovered:
        return head + f"; every trainable parameter is covered ({int(coverage.get('parameters', 0)):,} parameters)"
    entries = sum(int(e) for e, _ in uncovered.values())
    share = 100.0 * entries / max(int(coverage.get("entries", 0)), 1)
    counts: dict[str, int] = {}
    for _, reason in uncovered.values():
        key = skip_category(reason)
        counts[key] = counts.get(key, 0) + 1
    by_reason = ", ".join(f"{k} ({v})" for k, v in sorted(counts.items(), key=lambda kv: -kv[1]))
    n = len(uncovered)
    return head + f"; {n} parameter{'s' if n != 1 else ''} ({_percent(share)} of weights) not covered: {by_reason}"


def _percent(p: float) -> str:
    if p == 0:
        return "0%"
    if p < 0.01:
        return "<0.01%"
    return f"{p:.2g}%" if p < 10 else f"{p:.0f}%"
