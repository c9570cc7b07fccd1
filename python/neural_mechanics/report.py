"""The report folder: figures, tables and saved runs, from runs in memory or from saved files.

Layout of a report folder (``write_report``)::

    index.md, index.html          the page to open: data, recipe, training, figures, tables
    summary.md, summary.html      per model and layer: groups, errors of both theories, residuals;
                                  then the equilibrium of the scale groups
    exact_dynamics.png            the paper's "exact dynamics" figure (translation, scale, rescale)
    <model>/transformer.png       (transformers) one panel per symmetry pattern of docs/theory.md §2b
    <model>/charges_<sym>.png     measured charges against theory, one per symmetry of the model
    <model>/errors.png            error of the exact ledger and of the paper's closed form
    <model>/residuals.png         gradient-constraint residuals per layer
    <model>/equilibrium.png       scale groups against the §5.4 equilibrium (models with scale groups)
    <model>/forecast.png          the §5.7 forecast from mid-run and past the end, against the run
    <model>/summary.md, .html     that model's part of summary.md
    runs/<model>.nmrun            the saved runs (``neural_mechanics.load_run``)

Everything is computed from the runs alone (what they recorded of their training, in
``run.info``, included), so ``neural-mechanics report runs/*.nmrun`` rebuilds the same figures and
the same pages.

This module renders and writes; it computes nothing of its own. The figures come from
``plots``, the equilibrium tables from ``equilibrium`` (whose functions ``equilibrium_series``,
``equilibrium_table``, ``equilibrium_summary``, ``grad_sq_unit`` and ``last_phase`` lived here
before and are still importable from here), the transformer section from
``report_transformer``. Import direction, one way: ``report`` → ``report_transformer`` →
``plots`` → ``equilibrium`` → ``theory``, and ``report`` → ``run``; nothing below imports
``report``.
"""

from __future__ import annotations

import html
import os
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from . import plots
from .equilibrium import equilibrium_series, equilibrium_summary, equilibrium_table, grad_sq_unit, has_equilibrium, last_phase
from .forecast import panel_forecasts
from .report_transformer import has_transformer_panels, not_claimed, pattern_table, transformer_figure
from .run import load_run
from .verdicts import EPS_MAX, HOLDS, NO_GRADIENT_REL, ROUNDING, coverage_line, exact_is_bookkeeping, uncovered_table

__all__ = [
    "SYMMETRIES",
    "Block",
    "write_report",
    "load_runs",
    "run_files",
    "summary_table",
    "summary_blocks",
    "training_table",
    "training_tables",
    "uncovered_summary",
    "ordered",
    "run_figures",
    "run_blocks",
    "exact_dynamics_panels",
    "to_markdown",
    "to_html_table",
    "render_markdown",
    "render_html",
    # the equilibrium analysis, re-exported from its own module (neural_mechanics.equilibrium)
    "equilibrium_series",
    "equilibrium_table",
    "equilibrium_summary",
    "grad_sq_unit",
    "last_phase",
]

SYMMETRIES = ("translation", "scale", "rescale")


# -- tables --------------------------------------------------------------------------------------
# The report's headline table: Run.summary() without its long "reason" sentences (the verdict
# rules are stated above the table; the reasons are in Run.summary()) and without the "not
# covered" rows, which the table of uncovered parameters lists with their reasons.
HEADLINE_DROP = ("reason",)


def summary_table(runs: dict[str, Any]) -> Any:
    """``Run.summary()`` of every run, a ``model`` column first."""
    import pandas as pd

    frames = []
    for name, run in runs.items():
        s = run.summary()
        s.insert(0, "model", name)
        frames.append(s)
    return pd.concat(frames, ignore_index=True) if frames else pd.DataFrame()


def ordered(runs: dict[str, Any]) -> dict[str, Any]:
    """``runs`` in the order they were made (``run.info["order"]``, which the demo sets), the
    others after them as given: a report redrawn from ``runs/*.nmrun`` lists the models, and
    picks the exact-dynamics panels, as the demo did."""
    order = {name: (0, run.info["order"]) if isinstance(getattr(run, "info", {}).get("order"), int) else (1, k)
             for k, (name, run) in enumerate(runs.items())}
    return {name: runs[name] for name in sorted(runs, key=lambda n: order[n])}


def training_table(runs: dict[str, Any]) -> Any:
    """One row per run that recorded how it was trained (``run.info["training"]``, (column,
    value) pairs that ``models.train`` and ``models_gpt.train_gpt`` write), in the runs' order;
    an empty DataFrame if none did. Columns a run does not have are NaN in its row."""
    import pandas as pd

    rows = [dict(map(tuple, run.info["training"])) for run in runs.values() if getattr(run, "info", {}).get("training")]
    return pd.DataFrame(rows)


def training_tables(runs: dict[str, Any]) -> list[Any]:
    """:func:`training_table` split by the columns the runs recorded (the image classifiers'
    accuracies, the GPT's losses), one table per set of columns, in order of first appearance."""
    import pandas as pd

    by_columns: dict[tuple[str, ...], list[dict[str, Any]]] = {}
    for run in runs.values():
        pairs = getattr(run, "info", {}).get("training")
        if pairs:
            row = dict(map(tuple, pairs))
            by_columns.setdefault(tuple(row), []).append(row)
    return [pd.DataFrame(rows) for rows in by_columns.values()]


def uncovered_summary(run: Any) -> Any:
    """The trainable parameters of ``run`` that no group covers, one row per reason: how many,
    their share of the weights, which (the first few) and the reason as a sentence."""
    import pandas as pd

    table = uncovered_table(getattr(run, "coverage", None), run.skipped)
    rows = []
    for reason, part in table.groupby("reason", sort=False):
        names = list(part["parameter"])
        rows.append({
            "reason": part["category"].iloc[0],
            "parameters": len(names),
            "% of weights": float(part["% of weights"].sum()) if part["% of weights"].notna().all() else float("nan"),
            "which": ", ".join(names[:4]) + (f", … ({len(names) - 4} more)" if len(names) > 4 else ""),
            "why": reason,
        })
    return pd.DataFrame(rows, columns=["reason", "parameters", "% of weights", "which", "why"])


def _fmt(v: Any) -> str:
    if isinstance(v, (float, np.floating)):
        v = float(v)
        if not np.isfinite(v):
            return "—"
        if v.is_integer() and abs(v) < 1e9:
            return f"{int(v)}"
        if 1e-3 <= abs(v) < 1e5:
            return f"{v:.4g}"
        return f"{v:.2e}"
    return str(v)


def to_markdown(frame: Any) -> str:
    """A pipe table (no tabulate dependency), numbers formatted compactly and deterministically."""
    cols = [str(c).replace("|", "\\|") for c in frame.columns]  # "|θ|²" must not split a cell
    lines = ["| " + " | ".join(cols) + " |", "|" + "|".join("---" for _ in cols) + "|"]
    for row in frame.itertuples(index=False):
        lines.append("| " + " | ".join(_fmt(v).replace("|", "\\|") for v in row) + " |")
    return "\n".join(lines) + "\n"


def to_html_table(frame: Any) -> str:
    return frame.to_html(index=False, border=0, classes="nm", formatters={c: _fmt for c in frame.columns}, escape=True)


# -- documents: a list of blocks rendered to both Markdown and HTML --------------------------------
@dataclass
class Block:
    kind: str  # "h1", "h2", "h3", "p", "img", "table", "code"
    content: Any
    alt: str = ""


def render_markdown(blocks: Sequence[Block]) -> str:
    out = []
    for b in blocks:
        if b.kind in ("h1", "h2", "h3"):
            out.append("#" * int(b.kind[1]) + " " + b.content)
        elif b.kind == "p":
            out.append(b.content)
        elif b.kind == "img":
            out.append(f"![{b.alt}]({b.content})")
        elif b.kind == "table":
            out.append(to_markdown(b.content).rstrip("\n"))
        elif b.kind == "code":
            out.append("```\n" + b.content + "\n```")
    return "\n\n".join(out) + "\n"


_CSS = (
    "body{font-family:system-ui,sans-serif;max-width:1200px;margin:2em auto;padding:0 1em;color:#222}"
    "table.nm{border-collapse:collapse;font-size:0.85em;margin:1em 0}"
    "table.nm td,table.nm th{padding:3px 8px;border-bottom:1px solid #ddd;text-align:right}"
    "table.nm th{background:#f3f3f3}img{max-width:100%;border:1px solid #eee;margin:0.5em 0}"
    "code,pre{background:#f6f6f6;padding:2px 4px}"
)


def render_html(blocks: Sequence[Block], title: str) -> str:
    body = []
    for b in blocks:
        if b.kind in ("h1", "h2", "h3"):
            body.append(f"<{b.kind}>{html.escape(b.content)}</{b.kind}>")
        elif b.kind == "p":
            body.append(f"<p>{_inline_html(b.content)}</p>")
        elif b.kind == "img":
            body.append(f'<p><img src="{html.escape(b.content)}" alt="{html.escape(b.alt)}"></p>')
        elif b.kind == "table":
            body.append(to_html_table(b.content))
        elif b.kind == "code":
            body.append(f"<pre>{html.escape(b.content)}</pre>")
    return (
        f"<!doctype html>\n<html><head><meta charset='utf-8'><title>{html.escape(title)}</title>"
        f"<style>{_CSS}</style></head><body>\n" + "\n".join(body) + "\n</body></html>\n"
    )


def _inline_html(text: str) -> str:
    """Markdown's `code` and [text](link) in a paragraph, as HTML."""
    import re

    out = html.escape(text, quote=False)
    out = re.sub(r"`([^`]+)`", r"<code>\1</code>", out)
    out = re.sub(r"\*\*([^*]+)\*\*", r"<b>\1</b>", out)
    return re.sub(r"\[([^\]]+)\]\(([^)]+)\)", r'<a href="\2">\1</a>', out)


def _write_doc(folder: Path, stem: str, blocks: Sequence[Block], title: str) -> tuple[Path, Path]:
    md, page = folder / f"{stem}.md", folder / f"{stem}.html"
    md.write_text(render_markdown(blocks), encoding="utf-8")
    page.write_text(render_html(blocks, title), encoding="utf-8")
    return md, page


# -- figures ---------------------------------------------------------------------------------------
def _save(fig: Any, path: Path) -> Path:
    fig.savefig(path, dpi=130)
    return path


def exact_dynamics_panels(runs: dict[str, Any]) -> list[tuple[Any, str, str | None]]:
    """Which run and layer each panel of the paper's figure comes from: translation and scale
    from the first run with BatchNorm (scale groups), rescale from the first run without it (its
    rescale groups run conv to conv); falling back to any run that has the symmetry. Runs whose
    ``exact`` is the ledger of torch.optim.SGD come before the others (for another optimizer it
    only re-adds the measured update: docs/theory.md §5.3)."""
    candidates = sorted(runs.values(), key=exact_is_bookkeeping)  # stable: the runs' order otherwise
    with_scale = [r for r in candidates if (r.groups.symmetry == "scale").any()]
    without = [r for r in candidates if not (r.groups.symmetry == "scale").any()]
    preferred = {"translation": with_scale + without, "scale": with_scale, "rescale": without + with_scale}
    panels: list[tuple[Any, str, str | None]] = []
    for sym in SYMMETRIES:
        for run in preferred[sym]:
            if (run.groups.symmetry == sym).any():
                panels.append((run, sym, None))
                break
    return panels


def run_figures(run: Any, folder: Path, *, groups: int = 8) -> dict[str, Path]:
    """Every per-run figure into ``folder``; name → path."""
    folder.mkdir(parents=True, exist_ok=True)
    out: dict[str, Path] = {}
    if has_transformer_panels(run):  # first: the transformer's own patterns (docs/theory.md §2b)
        out["transformer"] = _save(transformer_figure(run, groups=groups), folder / "transformer.png")
    for sym in SYMMETRIES:
        if (run.groups.symmetry == sym).any():
            out[f"charges_{sym}"] = _save(plots.plot_charges(run, sym, groups=groups), folder / f"charges_{sym}.png")
    out["errors"] = _save(plots.plot_errors(run), folder / "errors.png")
    out["residuals"] = _save(plots.plot_residuals(run), folder / "residuals.png")
    if has_equilibrium(run):
        out["equilibrium"] = _save(plots.plot_equilibrium(run), folder / "equilibrium.png")
    if forecasts := panel_forecasts(run):  # docs/theory.md §5.7
        out["forecast"] = _save(plots.plot_forecast(run, forecasts), folder / "forecast.png")
    return out


def run_blocks(name: str, run: Any, figures: dict[str, Path], base: Path) -> list[Block]:
    """A model's section: its summary, what it does not cover, its equilibrium table and figures
    (paths relative to ``base``)."""
    g = run.groups
    covered = coverage_line(len(g), len(set(g.layer)), getattr(run, "coverage", None))
    describe = getattr(run, "describe_optimizer", None)
    optimizer = describe() if describe is not None else (run.optimizer or "unknown")
    blocks = [Block("h2", f"Model {name}"), Block("p", f"{run!r}. Optimizer: {optimizer}. Tracked: {covered}.")]
    blocks.append(Block("table", _rounded_summary(run.summary())))
    patterns = pattern_table(run)
    if len(patterns):
        blocks.append(Block("h3", f"{name}: the transformer's symmetries by pattern (docs/theory.md §2b)"))
        blocks.append(Block("p", _PATTERN_HELP))
        blocks.append(Block("table", patterns))
    uncovered = uncovered_summary(run)
    if len(uncovered):
        blocks.append(Block("h3", f"{name}: parameters no group covers"))
        blocks.append(Block("table", uncovered))
    if left_out := not_claimed(run):
        blocks.append(Block("p", f"Not claimed in {name} (every parameter above is in some group; these symmetries or parts "
                                 "are not): " + "; ".join(left_out) + "."))
    eq = equilibrium_summary(run)
    if len(eq):
        blocks.append(Block("h3", f"{name}: equilibrium of the scale groups (docs/theory.md §5.4)"))
        blocks.append(Block("p", _EQUILIBRIUM_HELP))
        blocks.append(Block("table", eq))
    for key, path in figures.items():
        blocks.append(Block("img", os.path.relpath(path, base), alt=f"{name} {key}"))
    if run.notes:
        blocks.append(Block("p", "Notes: " + "; ".join(map(str, run.notes))))
    return blocks


def _rounded_summary(s: Any) -> Any:
    # the "not covered" rows are listed with their reasons in their own table (uncovered_summary)
    if "verdict" in s.columns:
        s = s[s["verdict"] != "not covered"]
    s = s.drop(columns=[c for c in HEADLINE_DROP if c in s.columns])
    s["note"] = s["note"].replace("", "—")
    if "module" in s.columns:
        s["module"] = s["module"].replace("", "—")
    return s


# -- the whole report ----------------------------------------------------------------------------------
class _Finished:
    """A finished run read once: each column, error table and the summary are computed on first
    use and handed out as copies (``Run.array`` assembles every column on each call, and a
    report reads a few hundred columns). Anything else is the run's own."""

    def __init__(self, run: Any):
        self._run = run
        self._cache: dict[tuple[str, str], Any] = {}

    def _get(self, kind: str, key: str, make: Any) -> Any:
        if (kind, key) not in self._cache:
            self._cache[kind, key] = make()
        return self._cache[kind, key].copy()

    def array(self, column: str) -> np.ndarray:
        return self._get("array", column, lambda: self._run.array(column))

    def errors(self, which: str) -> np.ndarray:
        return self._get("errors", which, lambda: self._run.errors(which))

    def summary(self) -> Any:
        return self._get("summary", "", self._run.summary)

    @property
    def step_index(self) -> np.ndarray:
        return self._get("index", "step", lambda: self._run.step_index)

    @property
    def time_index(self) -> np.ndarray:
        return self._get("index", "time", lambda: self._run.time_index)

    def __getattr__(self, name: str) -> Any:
        return getattr(self._run, name)

    def __repr__(self) -> str:
        return repr(self._run)


def write_report(
    runs: dict[str, Any],
    out: str | os.PathLike[str],
    *,
    title: str = "neural-mechanics report",
    intro: Iterable[Block] = (),
    save_runs: bool = True,
    groups: int = 8,
) -> Path:
    """Write the report folder for ``runs`` (name → Run) into ``out``; returns index.html's path.

    ``intro``: blocks placed first. Then what the runs recorded of their training
    (``run.info``: data, recipe, the training table; ``models.train`` and the demo record it),
    so that a report redrawn from saved runs shows what the demo showed. Runs are taken in the
    order they were made (:func:`ordered`). ``save_runs``: also write runs/<name>.nmrun.
    """
    from . import plots

    runs = {name: _Finished(run) for name, run in ordered(runs).items()}
    root = Path(out)
    root.mkdir(parents=True, exist_ok=True)
    blocks: list[Block] = [Block("h1", title), *intro, *training_blocks(runs)]
    if save_runs:
        (root / "runs").mkdir(exist_ok=True)
        paths = [run.save(root / "runs" / f"{name}.nmrun") for name, run in runs.items()]
        blocks.append(Block("p", "Saved runs: " + ", ".join(f"[{p.name}]({os.path.relpath(p, root)})" for p in paths)
                                 + ". Redraw this report from them with `neural-mechanics report runs/*.nmrun --out DIR`."))
    panels = exact_dynamics_panels(runs)
    if panels:
        names = {id(r): n for n, r in runs.items()}
        with_paper = any(np.isfinite(r.array("paper")).any() for r, _, _ in panels)
        theories = "dashed with circles: paper, dotted with crosses: exact ledger" if with_paper else "dotted with crosses: exact"
        fig = plots.plot_exact_dynamics(panels, groups=groups, suptitle=f"Exact dynamics: measured charges (solid) against theory ({theories})")
        _save(fig, root / "exact_dynamics.png")
        blocks.append(Block("h2", "Exact dynamics"))
        blocks.append(Block("p", "Panels: " + "; ".join(f"({chr(97 + k)}) {sym} from model {names[id(r)]}" for k, (r, sym, _) in enumerate(panels)) + "."))
        blocks.append(Block("img", "exact_dynamics.png", alt="exact dynamics"))
    blocks.append(Block("p", _VERDICT_HELP))

    for name, run in runs.items():
        figures = run_figures(run, root / name, groups=groups)
        blocks += run_blocks(name, run, figures, root)
        _write_doc(root / name, "summary", [Block("h1", f"Summary: {name}"), Block("p", _SUMMARY_HELP), Block("p", _VERDICT_HELP), *run_blocks(name, run, figures, root / name)], f"{name} summary")
    blocks.append(Block("p", "All tables on one page: [summary.md](summary.md) / [summary.html](summary.html)."))
    _write_doc(root, "summary", summary_blocks(runs), "summary")
    _, index = _write_doc(root, "index", blocks, title)
    return index


def training_blocks(runs: dict[str, Any]) -> list[Block]:
    """Data, model, recipe and training tables, then any text the models generated, from what
    the runs recorded (``run.info``): the demo and a report redrawn from its saved runs write the
    same blocks."""
    infos = [getattr(run, "info", {}) for run in runs.values()]
    keys = ("data", "architecture", "recipe")
    blocks = [Block("p", text) for text in dict.fromkeys(str(i[k]) for i in infos for k in keys if i.get(k))]
    tables = training_tables(runs)
    if tables:
        blocks.append(Block("h2", "Training"))
        blocks += [Block("table", t) for t in tables]
    for name, run in runs.items():
        sample = getattr(run, "info", {}).get("sample")
        if isinstance(sample, dict) and sample.get("text"):
            prompt = str(sample.get("prompt", ""))
            blocks.append(Block("p", f"Sampled from {name} after training (temperature {float(sample.get('temperature', 1.0)):g}), "
                                     f"from the prompt {prompt!r}:"))
            blocks.append(Block("code", str(sample["text"])))
    return blocks


def summary_blocks(runs: dict[str, Any]) -> list[Block]:
    """summary.md: one table of every model's layers, then one of every scale layer's equilibrium."""
    import pandas as pd

    blocks = [Block("h1", "Summary"), Block("p", _SUMMARY_HELP), Block("p", _VERDICT_HELP), Block("table", _rounded_summary(summary_table(runs)))]
    eq = []
    for name, run in runs.items():
        t = equilibrium_summary(run)
        if len(t):
            t.insert(0, "model", name)
            eq.append(t)
    if eq:
        blocks += [Block("h2", "Equilibrium of the scale groups (docs/theory.md §5.4)"), Block("p", _EQUILIBRIUM_HELP),
                   Block("table", pd.concat(eq, ignore_index=True))]
    return blocks


_PATTERN_HELP = (
    "The rows of the summary above grouped by the symmetry pattern they come from: the layers, their groups, the "
    "verdicts, the largest error of the exact ledger (for optimizers other than SGD: the measured update re-added, "
    "bookkeeping) and of the paper's closed form, the median over the layers of each layer's median paper error, and "
    "the largest of the layers' median residuals."
)

_EQUILIBRIUM_HELP = (
    "Predicted |θ*|² = √(η(1−d)E|g̃|²/(2λ(1−β))) with E|g̃|² = |ĝ|²·|θ|² averaged over the second half of the last "
    "learning-rate phase, against |θ|² at the end. A ratio above 1 is a norm still relaxing down toward equilibrium, "
    "below 1 one still growing; compare the phase length with the relaxation time. The last column compares the norm "
    "reached with where the §5.4 relaxation, run from the first step on the measured noise, puts it: near 1 when the "
    "norms relax as predicted, however far from equilibrium they still are."
)

_SUMMARY_HELP = (
    "Per layer: errors are |prediction − measured| / (max over the run of the group's magnitude), median and max "
    "over groups and steps; `exact` is the discrete ledger (docs/theory.md §5.3; for optimizers other than SGD the "
    "measured update re-added, bookkeeping), `paper` the closed form with momentum (§5.2); `residual_median` and "
    "`residual_max` the gradient-constraint residual over the groups and steps that had a gradient (§3; ~1e-7 is "
    "exact in float32)."
)

_VERDICT_HELP = (
    f"Verdicts (from the median residual r; `Run.summary()` gives each layer's reason): **ok** r ≤ {HOLDS['scale']:g} "
    f"(translation {HOLDS['translation']:g}: its residual divides by a gradient that shrinks with the loss); "
    f"**broken by BatchNorm ε** (or another normaliser's) a scale layer with {ROUNDING:g} < r ≤ {EPS_MAX:g}; **violated** "
    f"above; **no gradient** no group's |ĝ_A| exceeded {NO_GRADIENT_REL:g}·|ĝ| of its layer at any step (nothing to "
    "test); **bookkeeping only** the constraint holds but no theory is tested (the optimizer's `exact` re-adds the "
    "measured update); **not covered** trainable parameters in no group."
)


def run_files(paths: Sequence[str | os.PathLike[str]]) -> list[Path]:
    """``paths`` with every folder replaced by the runs it holds: its ``*.nmrun`` files, or those
    of its ``runs/`` folder (a report folder), sorted by name."""
    from .errors import InvalidArgumentError

    files: list[Path] = []
    for p in map(Path, paths):
        if not p.is_dir():
            files.append(p)
            continue
        found = sorted(p.glob("*.nmrun")) or sorted((p / "runs").glob("*.nmrun"))
        if not found:
            raise InvalidArgumentError(f"{p}: no saved runs (*.nmrun) in it or in its runs/ folder")
        files += found
    return files


def load_runs(paths: Sequence[str | os.PathLike[str]]) -> dict[str, Any]:
    """Saved runs by name (the file's stem, made unique); a folder stands for the runs it holds
    (:func:`run_files`: a report folder gives its ``runs/*.nmrun``)."""
    runs: dict[str, Any] = {}
    for p in run_files(paths):
        name = base = Path(p).stem
        k = 2
        while name in runs:
            name, k = f"{base}-{k}", k + 1
        runs[name] = load_run(p)
    return runs
