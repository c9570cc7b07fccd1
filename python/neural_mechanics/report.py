"""The report folder: figures, tables and saved runs, from runs in memory or from saved files.

Layout of a report folder (``write_report``)::

    index.md, index.html          the page to open: data, recipe, training, figures, tables
    summary.md, summary.html      per model and layer: groups, errors of both theories, residuals;
                                  then the equilibrium of the scale groups
    exact_dynamics.png            the paper's "exact dynamics" figure (translation, scale, rescale)
    <model>/charges_<sym>.png     measured charges against theory, one per symmetry of the model
    <model>/errors.png            error of the exact ledger and of the paper's closed form
    <model>/residuals.png         gradient-constraint residuals per layer
    <model>/equilibrium.png       scale groups against the §5.4 equilibrium (models with scale groups)
    <model>/summary.md, .html     that model's part of summary.md
    runs/<model>.nmrun            the saved runs (``neural_mechanics.load_run``)

Everything except the training table is computed from the runs alone, so
``neural-mechanics report runs/*.nmrun`` rebuilds the same figures and the same summary.
"""

from __future__ import annotations

import html
import os
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

SYMMETRIES = ("translation", "scale", "rescale")


# -- equilibrium (THEORY.md §5.4) ----------------------------------------------------------------
def _ffill(a: np.ndarray) -> np.ndarray:
    """Forward-fill NaN rows (the final row has no hyperparameters: it keeps the last step's)."""
    out = a.copy()
    for i in range(1, len(out)):
        bad = ~np.isfinite(out[i])
        out[i, bad] = out[i - 1, bad]
    return out


def _scale_mask(run: Any) -> np.ndarray:
    return np.asarray(run.groups.symmetry == "scale")


def grad_sq_unit(run: Any) -> np.ndarray:
    """E|g̃_A|² per row for scale groups: |ĝ_A|²·|θ_A|² (the gradient at unit norm), (rows, groups);
    NaN for other groups and for the final row."""
    g2 = run.array("grad_sq") * run.array("measured")
    g2[:, ~_scale_mask(run)] = np.nan
    return g2


def _sgd_equilibrium(run: Any, unit: np.ndarray, rows: Any) -> dict[str, np.ndarray]:
    from . import theory

    hyper = {c: _ffill(run.array(c))[rows] for c in ("lr", "momentum", "dampening", "weight_decay")}
    with np.errstate(all="ignore"):
        return theory.equilibrium_sgd(
            lr=hyper["lr"], weight_decay=hyper["weight_decay"], grad_sq_unit=np.nan_to_num(unit, nan=0.0),
            momentum=hyper["momentum"], dampening=hyper["dampening"],
        )


def equilibrium_series(run: Any, window: int | None = None) -> np.ndarray:
    """The equilibrium |θ*|² of every scale group at every row, (rows, groups), NaN elsewhere.

    E|g̃_A|² is the mean of |ĝ_A|²|θ_A|² over the trailing ``window`` rows (default: 1/10 of the
    run, at least 5), the hyperparameters those of the row's step: "where the norm is heading
    now". Only meaningful for torch.optim.SGD runs (NaN otherwise).
    """
    mask = _scale_mask(run)
    rows = len(run.step_index)
    out = np.full((rows, len(run.groups)), np.nan)
    if not mask.any() or not _is_sgd(run):
        return out
    w = max(5, rows // 10) if window is None else max(1, int(window))
    unit = _ffill(grad_sq_unit(run)[:, mask])
    finite = np.isfinite(unit)
    csum = np.cumsum(np.where(finite, unit, 0.0), axis=0)
    ccount = np.cumsum(finite, axis=0)
    lag_sum = np.vstack([np.zeros((w, unit.shape[1])), csum[:-w]]) if rows > w else np.zeros_like(csum)
    lag_count = np.vstack([np.zeros((w, unit.shape[1])), ccount[:-w]]) if rows > w else np.zeros_like(ccount)
    with np.errstate(all="ignore"):
        mean = (csum - lag_sum) / (ccount - lag_count)
    eq = _sgd_equilibrium(run, _scatter(mean, mask, len(run.groups)), slice(None))
    out[:, mask] = np.asarray(eq["norm_sq"])[:, mask]
    return out


def _scatter(values: np.ndarray, mask: np.ndarray, n: int) -> np.ndarray:
    full = np.full((values.shape[0], n), np.nan)
    full[:, mask] = values
    return full


def _is_sgd(run: Any) -> bool:
    return "SGD" in (run.optimizer or "") and np.isfinite(run.array("momentum")[:-1]).any()


def last_phase(run: Any) -> tuple[int, int]:
    """(first row, last step row) of the last stretch of constant learning rate."""
    lr = run.array("lr")[:, 0]
    last = len(lr) - 2  # the final row has no step
    start = last
    while start > 0 and lr[start - 1] == lr[last]:
        start -= 1
    return start, last


def equilibrium_table(run: Any, window: float = 0.5) -> Any:
    """Per scale group: the §5.4 equilibrium |θ*|² of the last learning-rate phase against the
    |θ_A|² reached at the end (a pandas DataFrame; empty without scale groups or for a non-SGD
    run).

    E|g̃_A|² = mean of |ĝ_A|²·|θ_A|² over the last ``window`` fraction of that phase, hyperparameters
    its last step's. ``ratio`` = reached / predicted: 1 at equilibrium, > 1 a norm still decaying
    toward it, < 1 still growing. ``phase_steps`` against ``relaxation_steps`` says whether the
    run was long enough to get there.
    """
    import pandas as pd

    mask = _scale_mask(run)
    cols = ["layer", "group", "label", "initial_norm_sq", "final_norm_sq", "predicted_norm_sq", "ratio",
            "relaxation_steps", "phase_steps", "angular_update", "effective_lr_final", "effective_lr_equilibrium"]
    if not mask.any() or not _is_sgd(run):
        return pd.DataFrame(columns=cols)
    start, last = last_phase(run)
    lo = max(start, last + 1 - max(1, int(round((last + 1 - start) * window))))
    unit = grad_sq_unit(run)[lo : last + 1][:, mask]
    finite = np.isfinite(unit)
    with np.errstate(all="ignore"):
        e_unit = _scatter((np.where(finite, unit, 0.0).sum(0) / finite.sum(0))[None, :], mask, len(run.groups))[0]
    eq = _sgd_equilibrium(run, e_unit[None, :], slice(last, last + 1))
    measured = run.array("measured")
    lr = _ffill(run.array("lr"))[last]
    idx = np.flatnonzero(mask)
    final, pred = measured[-1, idx], np.asarray(eq["norm_sq"])[0, idx]
    frame = pd.DataFrame(
        {
            "layer": run.groups.layer[idx].astype(str),
            "group": run.groups.index[idx],
            "label": run.groups.label[idx].astype(str),
            "initial_norm_sq": measured[0, idx],
            "final_norm_sq": final,
            "predicted_norm_sq": pred,
            "ratio": final / pred,
            "relaxation_steps": np.asarray(eq["relaxation_steps"])[0, idx],
            "phase_steps": np.full(len(idx), last + 1 - start),
            "angular_update": np.asarray(eq["angular_update"])[0, idx],
            "effective_lr_final": lr[idx] / final,
            "effective_lr_equilibrium": np.asarray(eq["effective_lr"])[0, idx],
        }
    )
    return frame[cols]


def equilibrium_summary(run: Any, window: float = 0.5) -> Any:
    """``equilibrium_table`` per layer: medians of the predicted and reached norms and their ratio."""
    import pandas as pd

    t = equilibrium_table(run, window)
    rows = []
    for layer in dict.fromkeys(t["layer"]):
        s = t[t["layer"] == layer]
        rows.append(
            {
                "layer": layer,
                "groups": len(s),
                "initial |θ|² (median)": float(np.median(s["initial_norm_sq"])),
                "reached |θ|² (median)": float(np.median(s["final_norm_sq"])),
                "predicted |θ*|² (median)": float(np.median(s["predicted_norm_sq"])),
                "reached / predicted (median)": float(np.median(s["ratio"])),
                "relaxation steps": float(np.median(s["relaxation_steps"])),
                "last phase steps": int(s["phase_steps"].iloc[0]),
            }
        )
    return pd.DataFrame(rows)


# -- tables --------------------------------------------------------------------------------------
def summary_table(runs: dict[str, Any]) -> Any:
    """``Run.summary()`` of every run, a ``model`` column first."""
    import pandas as pd

    frames = []
    for name, run in runs.items():
        s = run.summary()
        s.insert(0, "model", name)
        frames.append(s)
    return pd.concat(frames, ignore_index=True) if frames else pd.DataFrame()


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
    rescale groups run conv to conv); falling back to any run that has the symmetry."""
    with_scale = [r for r in runs.values() if (r.groups.symmetry == "scale").any()]
    without = [r for r in runs.values() if not (r.groups.symmetry == "scale").any()]
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
    from . import plots

    folder.mkdir(parents=True, exist_ok=True)
    out: dict[str, Path] = {}
    for sym in SYMMETRIES:
        if (run.groups.symmetry == sym).any():
            out[f"charges_{sym}"] = _save(plots.plot_charges(run, sym, groups=groups), folder / f"charges_{sym}.png")
    out["errors"] = _save(plots.plot_errors(run), folder / "errors.png")
    out["residuals"] = _save(plots.plot_residuals(run), folder / "residuals.png")
    if (run.groups.symmetry == "scale").any() and _is_sgd(run):
        out["equilibrium"] = _save(plots.plot_equilibrium(run), folder / "equilibrium.png")
    return out


def run_blocks(name: str, run: Any, figures: dict[str, Path], base: Path) -> list[Block]:
    """A model's section: its summary, equilibrium table and figures (paths relative to ``base``)."""
    blocks = [Block("h2", f"Model {name}"), Block("p", f"{run!r}. Optimizer: {run.optimizer or 'unknown'}.")]
    blocks.append(Block("table", _rounded_summary(run.summary())))
    eq = equilibrium_summary(run)
    if len(eq):
        blocks.append(Block("h3", f"{name}: equilibrium of the scale groups (THEORY §5.4)"))
        blocks.append(Block("p", _EQUILIBRIUM_HELP))
        blocks.append(Block("table", eq))
    for key, path in figures.items():
        blocks.append(Block("img", os.path.relpath(path, base), alt=f"{name} {key}"))
    if run.notes:
        blocks.append(Block("p", "Notes: " + "; ".join(map(str, run.notes))))
    return blocks


def _rounded_summary(s: Any) -> Any:
    s = s.copy()
    s["note"] = s["note"].replace("", "—")
    return s


# -- the whole report ----------------------------------------------------------------------------------
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

    ``intro``: blocks placed before the figures (the demo puts its data, recipe and training
    table there). ``save_runs``: also write runs/<name>.nmrun.
    """
    from . import plots

    root = Path(out)
    root.mkdir(parents=True, exist_ok=True)
    blocks: list[Block] = [Block("h1", title), *intro]
    if save_runs:
        (root / "runs").mkdir(exist_ok=True)
        paths = [run.save(root / "runs" / f"{name}.nmrun") for name, run in runs.items()]
        blocks.append(Block("p", "Saved runs: " + ", ".join(f"[{p.name}]({os.path.relpath(p, root)})" for p in paths)
                                 + ". Redraw this report from them with `neural-mechanics report runs/*.nmrun --out DIR`."))
    panels = exact_dynamics_panels(runs)
    if panels:
        names = {id(r): n for n, r in runs.items()}
        fig = plots.plot_exact_dynamics(panels, groups=groups, suptitle="Exact dynamics: measured charges (solid) against theory (dashed: paper, dotted: exact ledger)")
        _save(fig, root / "exact_dynamics.png")
        blocks.append(Block("h2", "Exact dynamics"))
        blocks.append(Block("p", "Panels: " + "; ".join(f"({chr(97 + k)}) {sym} from model {names[id(r)]}" for k, (r, sym, _) in enumerate(panels)) + "."))
        blocks.append(Block("img", "exact_dynamics.png", alt="exact dynamics"))

    for name, run in runs.items():
        figures = run_figures(run, root / name, groups=groups)
        blocks += run_blocks(name, run, figures, root)
        _write_doc(root / name, "summary", [Block("h1", f"Summary: {name}"), Block("p", _SUMMARY_HELP), *[b for b in run_blocks(name, run, figures, root / name)]], f"{name} summary")
    blocks.append(Block("p", "All tables on one page: [summary.md](summary.md) / [summary.html](summary.html)."))
    _write_doc(root, "summary", summary_blocks(runs), "summary")
    _, index = _write_doc(root, "index", blocks, title)
    return index


def summary_blocks(runs: dict[str, Any]) -> list[Block]:
    """summary.md: one table of every model's layers, then one of every scale layer's equilibrium."""
    import pandas as pd

    blocks = [Block("h1", "Summary"), Block("p", _SUMMARY_HELP), Block("table", _rounded_summary(summary_table(runs)))]
    eq = []
    for name, run in runs.items():
        t = equilibrium_summary(run)
        if len(t):
            t.insert(0, "model", name)
            eq.append(t)
    if eq:
        blocks += [Block("h2", "Equilibrium of the scale groups (THEORY §5.4)"), Block("p", _EQUILIBRIUM_HELP),
                   Block("table", pd.concat(eq, ignore_index=True))]
    return blocks


_EQUILIBRIUM_HELP = (
    "Predicted |θ*|² = √(η(1−d)E|g̃|²/(2λ(1−β))) with E|g̃|² = |ĝ|²·|θ|² averaged over the second half of the last "
    "learning-rate phase, against |θ|² at the end. A ratio above 1 is a norm still relaxing down toward equilibrium, "
    "below 1 one still growing; compare the phase length with the relaxation time."
)

_SUMMARY_HELP = (
    "Per layer: errors are |prediction − measured| / (max over the run of the group's magnitude), median and max "
    "over groups and steps; `exact` is the discrete ledger (THEORY §5.3), `paper` the closed form with momentum "
    "(§5.2); `residual_max` the largest gradient-constraint residual (§3; ~1e-7 is exact in float32, NaN a group "
    "with no gradient)."
)


def load_runs(paths: Sequence[str | os.PathLike[str]]) -> dict[str, Any]:
    """Saved runs by name (the file's stem, made unique)."""
    from .run import load_run

    runs: dict[str, Any] = {}
    for p in paths:
        name = base = Path(p).stem
        k = 2
        while name in runs:
            name, k = f"{base}-{k}", k + 1
        runs[name] = load_run(p)
    return runs
