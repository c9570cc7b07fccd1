"""The report's transformer section: one figure with a panel per symmetry pattern of
docs/theory.md §2b, and a table of the run's layers grouped by pattern.

What to draw comes from the run itself (``run.info``, written by ``models_gpt.train_gpt`` while
the model was at hand): ``panels`` (per panel the symmetry, the layer, the groups, e.g. one
head's Q/K groups, and a title), ``patterns`` ((symmetry, layer, pattern) for every tracked
layer) and ``not_claimed`` (what discovery leaves out, in sentences). A run without them (any
other model) has no transformer section. So a report redrawn from saved runs, without torch,
draws the same figure.

The panels are drawn by ``plots.plot_charges`` on a view of the run restricted to the panel's
groups (:class:`GroupSubset`): measured solid, the paper's closed form dashed with circles, the
exact ledger (or, for optimizers other than SGD, the measured update re-added) dotted with
crosses, each legend with that theory's largest error over the groups drawn, and the layer's
verdict (module ``verdicts``, judged on all of the layer's groups) in the title.

Imports: numpy, ``plots`` and ``verdicts``; pandas when a table is built. ``report`` imports this
module, never the other way round.
"""

from __future__ import annotations

import dataclasses
import textwrap
from typing import Any

import numpy as np

from . import plots
from .verdicts import exact_is_bookkeeping, layer_verdict

__all__ = ["GroupSubset", "has_transformer_panels", "transformer_figure", "pattern_table", "not_claimed"]

# Groups drawn per panel at most (those whose charges moved most), as elsewhere in the report.
GROUPS_PER_PANEL = 8
PANEL_COLUMNS = 3
TITLE_WIDTH = 60  # characters per line of a panel's title


class GroupSubset:
    """A read-only view of a run restricted to the groups in ``mask``: the same steps, columns
    and metadata, fewer groups. Anything the view does not narrow is the run's own."""

    def __init__(self, run: Any, mask: np.ndarray):
        self._run = run
        self._mask = np.asarray(mask, dtype=bool)
        g = run.groups
        narrowed = {f.name: getattr(g, f.name)[self._mask] for f in dataclasses.fields(g) if getattr(g, f.name) is not None}
        self.groups = dataclasses.replace(g, **narrowed)

    def array(self, column: str) -> np.ndarray:
        return self._run.array(column)[:, self._mask]

    def errors(self, which: str) -> np.ndarray:
        return self._run.errors(which)[:, self._mask]

    def __getattr__(self, name: str) -> Any:  # step_index, time_index, optimizer, exact_kind, info ...
        return getattr(self._run, name)


def has_transformer_panels(run: Any) -> bool:
    """Whether ``run`` says what its transformer figure draws (``run.info["panels"]``) and has
    at least one of those layers."""
    return bool(_panels(run))


def _panels(run: Any) -> list[dict[str, Any]]:
    g = run.groups
    present = set(zip(map(str, g.symmetry), map(str, g.layer)))
    panels = getattr(run, "info", {}).get("panels") or []
    return [p for p in panels if (str(p.get("symmetry")), str(p.get("layer"))) in present]


def _selection(run: Any, panel: dict[str, Any]) -> np.ndarray:
    g = run.groups
    mask = (g.symmetry == panel["symmetry"]) & (g.layer == panel["layer"])
    if panel.get("groups") is not None:
        mask &= np.isin(g.index, [int(i) for i in panel["groups"]])
    return np.asarray(mask, dtype=bool)


def _errors_said(view: Any, symmetry: str, layer: str, groups: int) -> str:
    """The largest error of each theory over the groups a panel draws (the figure's measure:
    |prediction − measured| / max-over-run magnitude), as the panel's title says it."""
    idx = plots.pick_groups(view, symmetry, layer, groups)
    said = []
    for theory in ("exact", "paper"):
        err = view.errors(theory)[:, idx]
        if np.isfinite(err).any():
            name = "bookkeeping" if theory == "exact" and exact_is_bookkeeping(view) else theory
            said.append(f"{name} ≤ {float(np.nanmax(err)):.0e}")
    return ", ".join(said)


def transformer_figure(run: Any, *, groups: int = GROUPS_PER_PANEL, suptitle: str | None = None) -> Any:
    """One panel per entry of ``run.info["panels"]`` (three to a row); a Figure. Each title
    names the pattern, the groups drawn, the layer's verdict and each theory's largest error over
    the groups drawn; the first panel carries the legend (line styles)."""
    panels = _panels(run)
    if not panels:
        from .errors import InvalidArgumentError

        raise InvalidArgumentError("the run does not say what its transformer figure draws (run.info['panels'])")
    ncols = min(PANEL_COLUMNS, len(panels))
    nrows = -(-len(panels) // ncols)
    fig, axes = plots.new_figure(ncols, nrows, width=5.3, height=4.2)
    axes = np.atleast_1d(axes).ravel()
    drawn_paper = False
    for k, (ax, panel) in enumerate(zip(axes, panels)):
        mask = _selection(run, panel)
        view = GroupSubset(run, mask)
        sym, layer = str(panel["symmetry"]), str(panel["layer"])
        n = int(mask.sum())
        shown = f"{groups} of {n} groups drawn" if n > groups else f"{n} groups"
        verdict = layer_verdict(run, sym, layer).verdict
        head = "\n".join(textwrap.wrap(f"({chr(97 + k)}) {panel['title']}", TITLE_WIDTH))
        said = "; ".join(x for x in (shown, f"layer {verdict}", _errors_said(view, sym, layer, groups)) if x)
        plots.plot_charges(view, sym, layer, groups=groups, ax=ax, title=f"{head}\n({said})", legend=(k == 0))
        ax.title.set_fontsize(9)
        drawn_paper |= bool(np.isfinite(view.array("paper")).any())
    for ax in axes[len(panels):]:
        ax.set_visible(False)
    if suptitle is None:
        if drawn_paper:
            theories = "paper's closed form dashed with circles, exact ledger dotted with crosses"
        elif exact_is_bookkeeping(run):
            theories = f"no closed form for {run.optimizer or 'this optimizer'}; dotted with crosses: the measured update re-added (bookkeeping)"
        else:
            theories = "exact ledger dotted with crosses"
        suptitle = f"Transformer symmetries (docs/theory.md §2b), {run.optimizer or 'optimizer'}: measured solid; {theories}"
    fig.suptitle(suptitle, fontsize=11)
    return fig


def _nan(fn: Any, values: Any) -> float:
    a = np.asarray(values, dtype=float)
    a = a[np.isfinite(a)]
    return float(fn(a)) if a.size else float("nan")


def pattern_table(run: Any) -> Any:
    """The run's layers grouped by §2b pattern (``run.info["patterns"]``): per pattern the
    layers, their groups, verdicts, the largest exact and paper errors, the median paper error
    and the largest median residual; a pandas DataFrame (empty without patterns)."""
    import pandas as pd

    cols = ["pattern", "symmetry", "layers", "groups", "verdict", "exact_max", "paper_median", "paper_max", "residual_median"]
    patterns = getattr(run, "info", {}).get("patterns") or []
    if not patterns:
        return pd.DataFrame(columns=cols)
    which = {(str(s), str(layer)): str(p) for s, layer, p in patterns}
    summary = run.summary()
    summary = summary[summary["verdict"] != "not covered"]
    rows: dict[tuple[str, str], dict[str, Any]] = {}
    for r in summary.itertuples(index=False):
        key = (which.get((str(r.symmetry), str(r.layer)), "other"), str(r.symmetry))
        row = rows.setdefault(key, {"layers": [], "groups": 0, "verdict": [], "exact_max": [], "paper_median": [], "paper_max": [], "residual_median": []})
        row["layers"].append(str(r.layer))
        row["groups"] += int(r.groups)
        row["verdict"].append(str(r.verdict))
        for c in ("exact_max", "paper_median", "paper_max", "residual_median"):
            row[c].append(getattr(r, c))
    out = []
    for (pattern, sym), row in rows.items():
        layers = row["layers"]
        out.append({
            "pattern": pattern,
            "symmetry": sym,
            "layers": ", ".join(layers) if len(layers) <= 3 else f"{', '.join(layers[:2])}, … ({len(layers)} layers)",
            "groups": row["groups"],
            "verdict": ", ".join(dict.fromkeys(row["verdict"])),
            "exact_max": _nan(np.max, row["exact_max"]),
            # the median over layers of each layer's median: a typical group, not a weighted one
            "paper_median": _nan(np.median, row["paper_median"]),
            "paper_max": _nan(np.max, row["paper_max"]),
            "residual_median": _nan(np.max, row["residual_median"]),
        })
    return pd.DataFrame(out, columns=cols)


def not_claimed(run: Any) -> list[str]:
    """What discovery leaves out of the run's model, in sentences (``run.info["not_claimed"]``)."""
    return [str(s) for s in (getattr(run, "info", {}).get("not_claimed") or [])]
