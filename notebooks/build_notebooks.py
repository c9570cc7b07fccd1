"""Writes the notebooks of this folder (without outputs) with nbformat.

The .ipynb files are committed and are generated, never edited by hand: edit a cell here, then
``python notebooks/build_notebooks.py``. ``--check`` writes nothing: it builds every notebook in
memory and exits 1, naming each notebook that differs from the committed file (the test suite
runs it, tests/test_notebooks.py). Generation is byte-for-byte deterministic: cell ids are the
notebook's name and the cell's position, the format version is pinned. Every notebook reads
``NM_QUICK=1`` from the environment (tests/test_notebooks.py sets it) to run in a few seconds
with few steps.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Callable
from pathlib import Path

import nbformat
from nbformat.v4 import new_code_cell, new_markdown_cell, new_notebook

HERE = Path(__file__).resolve().parent
NBFORMAT_MINOR = 5  # 4.5: the first version with cell ids

SETUP = """\
%matplotlib inline
import os
import numpy as np
import torch
import neural_mechanics as nm

QUICK = os.environ.get("NM_QUICK") == "1"  # set by the test suite: few steps, same code
torch.set_num_threads(1)  # these models are tiny: one thread is fastest"""


def quickstart() -> list:
    return [
        new_markdown_cell(
            "# Quickstart: attach neural-mechanics to your own training loop\n\n"
            "Your loop stays as it is: `nm.track(model, optimizer)` hooks the optimizer, finds the model's "
            "symmetry groups at the first forward pass, and measures every group's *charge* at every step "
            "(column sums before softmax, squared norms before BatchNorm, differences of squared norms "
            "around ReLU units), next to two theories: the paper's closed form and the exact ledger."
        ),
        new_code_cell(SETUP),
        new_markdown_cell("## Your model and your data\n\nHere the digits shipped with the package and a small conv net; use your own."),
        new_code_cell(
            """\
import torch.nn as nn
import torch.nn.functional as F

x, y = nm.load_digits()            # (1797, 1, 8, 8) float32, (1797,) int64
torch.manual_seed(0)
model = nn.Sequential(
    nn.Conv2d(1, 16, 3, padding=1), nn.BatchNorm2d(16), nn.ReLU(),
    nn.Conv2d(16, 32, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2),
    nn.Flatten(), nn.Linear(32 * 4 * 4, 10),
)
# What will be tracked (discovery runs by itself inside track; this is only to look):
print(nm.find_symmetries(model, x[:8]))"""
        ),
        new_markdown_cell("## Train, tracked\n\nThe only new line is the `with nm.track(...)` block."),
        new_code_cell(
            """\
STEPS = 60 if QUICK else 600
opt = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9, weight_decay=5e-4)
sched = torch.optim.lr_scheduler.MultiStepLR(opt, milestones=[int(0.75 * STEPS)], gamma=0.1)
g = torch.Generator().manual_seed(0)

with nm.track(model, opt) as tracker:
    for step in range(STEPS):
        idx = torch.randint(0, len(x), (64,), generator=g)
        loss = F.cross_entropy(model(x[idx]), y[idx])
        opt.zero_grad()
        loss.backward()
        opt.step()
        sched.step()
    run = tracker.run   # take the run inside the block, before the model changes again
print(tracker)          # what is tracked, and what is not covered (also logged at INFO when tracking starts)
run"""
        ),
        new_markdown_cell(
            "## Theory against measurement\n\n"
            "`summary()` gives, per layer, a verdict on the symmetry (ok, broken by BatchNorm ε, violated, no gradient; "
            "the `reason` column states the numbers and thresholds), the error of the exact ledger (float precision) and "
            "of the paper's closed form (an O(η) approximation), and the gradient-constraint residuals."
        ),
        new_code_cell("run.summary()"),
        new_code_cell(
            """\
table = run.to_pandas()   # one row per (step, group)
table[table.symmetry == "scale"].head()"""
        ),
        new_markdown_cell("## Figures\n\nEvery plot function returns a matplotlib Figure (nothing global changes; save it with `fig.savefig`)."),
        new_code_cell('run.plot("scale", groups=6)'),
        new_code_cell('run.plot("translation")'),
        new_code_cell("run.plot_errors()"),
        new_code_cell("run.plot_residuals()"),
        new_markdown_cell("## Save and reload (no torch needed to read it back)"),
        new_code_cell(
            """\
import tempfile, pathlib
path = pathlib.Path(tempfile.mkdtemp()) / "my_run.nmrun"
run.save(path)
again = nm.load_run(path)
assert np.array_equal(again.array("measured"), run.array("measured"))
again"""
        ),
        new_markdown_cell(
            "Next: `paper_figures.ipynb` (the paper's figures on the reference models) and "
            "`equilibrium.ipynb` (where the norms go, and the effective learning rate). "
            "From the shell, `neural-mechanics demo` writes a full report; `neural-mechanics report RUN` redraws it from a saved run."
        ),
    ]


def paper_figures() -> list:
    return [
        new_markdown_cell(
            "# The paper's figures\n\n"
            "Kunin et al., *Neural Mechanics* (ICLR 2021), \"exact dynamics\": (a) translation — the column sums "
            "of the classifier decay as e^{−λt}; (b) scale — the squared norms of a conv before BatchNorm; "
            "(c) rescale — per-channel differences of squared norms between consecutive convs of a network "
            "without BatchNorm. Measured solid, the paper's closed form dashed with circles, the exact ledger dotted "
            "with crosses; the x axis is the optimizer step (`x=\"time\"` for the model time of the closed forms)."
        ),
        new_code_cell(SETUP),
        new_code_cell(
            """\
from neural_mechanics import data_sources, models, plots, report

source = data_sources.digits()       # or data_sources.image_folder("path/to/folder"), data_sources.from_dataset(ds)
recipe = models.Recipe(steps=60 if QUICK else 1500)   # SGD, momentum 0.9, weight decay 5e-4, lr ×0.1 at 75%
trained = {name: models.train(name, source, recipe) for name in ("vgg_bn", "vgg")}
runs = {name: t.run for name, t in trained.items()}
{name: f"test accuracy {t.test_accuracy:.3f}" for name, t in trained.items()}"""
        ),
        new_markdown_cell("## Exact dynamics (the three panels)"),
        new_code_cell(
            """\
panels = report.exact_dynamics_panels(runs)   # translation, scale from vgg_bn; rescale from vgg
plots.plot_exact_dynamics(panels, groups=8)"""
        ),
        new_markdown_cell(
            "## How good is each theory?\n\n"
            "The exact ledger (docs/theory.md §5.3) accounts for every step to float precision; the paper's closed form "
            "with momentum (§5.2) is a continuous-time model, accurate to O(η)."
        ),
        new_code_cell("plots.plot_errors(runs['vgg_bn'])"),
        new_code_cell("report.summary_table(runs)"),
        new_markdown_cell(
            "## The geometric constraints hold at every step\n\n"
            "Each symmetry makes the gradient orthogonal to its generator (docs/theory.md §3): residuals near float32 "
            "precision. Biases before BatchNorm have no gradient at all, and so prove nothing."
        ),
        new_code_cell("plots.plot_residuals(runs['vgg_bn'])"),
        new_markdown_cell("## Any layer, all groups"),
        new_code_cell("runs['vgg_bn'].plot('scale', 'conv3', groups=None)"),
        new_code_cell(
            """\
fig, axes = plots.new_figure(3, 1, width=4.6, height=3.8)
for ax, layer in zip(axes, ["conv1", "conv2", "conv3"]):
    plots.plot_charges(runs["vgg"], "rescale", layer, groups=6, ax=ax, legend=(layer == "conv1"))
fig"""
        ),
    ]


def equilibrium() -> list:
    return [
        new_markdown_cell(
            "# Equilibrium and the effective learning rate\n\n"
            "A channel before BatchNorm is scale-invariant: its loss does not depend on |θ_A|. Weight decay "
            "shrinks the norm, the finite learning rate grows it (the η|ĝ|² \"centrifugal\" term), and the two "
            "balance at (docs/theory.md §5.4, SGD with momentum β, dampening d, coupled weight decay λ)\n\n"
            "|θ*|⁴ = η(1−d) E|g̃|² / (2λ(1−β)),\n\n"
            "where g̃ is the gradient at unit norm (|g̃_A| = |ĝ_A|·|θ_A|). The direction then moves with the "
            "*effective* learning rate η/|θ|², and the norm relaxes to equilibrium in about (1−β)/(4ηλ(1−d)) steps."
        ),
        new_code_cell(SETUP),
        new_code_cell(
            """\
from neural_mechanics import data_sources, models, plots
from neural_mechanics.equilibrium import equilibrium_summary, equilibrium_table

source = data_sources.digits()
# A weight decay of 5e-3 and lr 0.1 make the relaxation time (1-β)/(4ηλ) = 50 steps, so the run
# lasts many relaxation times; no learning-rate step, so there is one equilibrium to reach.
recipe = models.Recipe(steps=80 if QUICK else 600, lr=0.1, weight_decay=5e-3, lr_step_at=1.0)
t = models.train("vgg_bn", source, recipe)
run = t.run
nm.theory.equilibrium_sgd(lr=recipe.lr, weight_decay=recipe.weight_decay, grad_sq_unit=1.0, momentum=recipe.momentum)"""
        ),
        new_markdown_cell(
            "## Prediction against the norms reached\n\n"
            "E|g̃|² is measured by the tracker (`grad_sq` × `measured` for scale groups), averaged over the "
            "second half of the run. A ratio near 1 means the layer sits at its equilibrium."
        ),
        new_code_cell("equilibrium_summary(run)"),
        new_code_cell("plots.plot_equilibrium(run)"),
        new_markdown_cell(
            "## The effective learning rate\n\n"
            "With BatchNorm, what the learning rate does to the function is η/|θ|²: as the norms settle, so does "
            "the effective learning rate, whatever the initial scale."
        ),
        new_code_cell("plots.plot_effective_lr(run)"),
        new_markdown_cell(
            "## Compare: the demo's recipe\n\n"
            "With λ = 5e-4 and η = 0.05 the relaxation time is 1,000 steps, and 10,000 after the learning-rate "
            "step, and the digits are learnt to zero loss, so the noise (and the equilibrium) keeps falling: a short "
            "run ends far above equilibrium (ratio ≫ 1). The §5.4 relaxation, run from the first step on the measured "
            "noise, still says where the norms are: `ratio_relaxed` (reached / relaxation) stays near 1."
        ),
        new_code_cell(
            """\
demo = models.train("vgg_bn", source, models.Recipe(steps=60 if QUICK else 1500))
table = equilibrium_table(demo.run)
table[["layer", "label", "final_norm_sq", "predicted_norm_sq", "ratio", "relaxed_norm_sq", "ratio_relaxed", "relaxation_steps", "phase_steps"]].head(8)"""
        ),
        new_code_cell("plots.plot_equilibrium(demo.run)"),
    ]


def live() -> list:
    return [
        new_markdown_cell(
            "# Watching a run live\n\n"
            "`tracker.live()` (or `nm.live(tracker)`) shows, while the loop runs, one figure updated in place under the "
            "cell — measured charges against both theories for one layer per symmetry, the worst error of each layer, "
            "the effective learning rates of the scale layers — and a progress line with the steps, the groups and the "
            "worst error so far. Outside a notebook it does nothing and costs nothing; in a notebook it redraws within "
            "a time budget (2% of the wall time by default). See docs/integrations.md."
        ),
        new_code_cell(SETUP),
        new_code_cell(
            """\
import torch.nn as nn
import torch.nn.functional as F

x, y = nm.load_digits()
torch.manual_seed(0)
model = nn.Sequential(
    nn.Conv2d(1, 16, 3, padding=1), nn.BatchNorm2d(16), nn.ReLU(),
    nn.Conv2d(16, 32, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2),
    nn.Flatten(), nn.Linear(32 * 4 * 4, 10),
)
opt = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9, weight_decay=5e-4)
STEPS = 60 if QUICK else 1500
g = torch.Generator().manual_seed(0)

with nm.track(model, opt) as tracker:
    view = tracker.live(every=10 if QUICK else 25, total=STEPS)
    for step in range(STEPS):
        idx = torch.randint(0, len(x), (64,), generator=g)
        loss = F.cross_entropy(model(x[idx]), y[idx])
        opt.zero_grad()
        loss.backward()
        opt.step()"""
        ),
        new_markdown_cell(
            "The view is active because this is a Jupyter kernel; the same line in a script returns an inactive view. "
            "The last frame stays in the cell's output; the figure itself is `view.figure`."
        ),
        new_code_cell(
            """\
assert view.active and view.frames >= 1, view
print(view)
tracker.run.summary()"""
        ),
    ]


def transformers() -> list:
    return [
        new_markdown_cell(
            "# Transformers: the attention-era symmetries while a small GPT learns\n\n"
            "A character-level GPT (`neural_mechanics.models_gpt.CharGPT`: pre-norm RMSNorm, rotary positions, a gated "
            "SwiGLU MLP, an untied LM head) learns Python's own documentation, the text of `help()` "
            "(`pydoc_data.topics`, in every Python: nothing to download). Its architecture has symmetries the paper's "
            "convolutional networks do not (docs/theory.md §2b): queries against keys and values against the output "
            "projection per head dimension, each norm's gain against the columns that read it, the LM head's columns "
            "before softmax, the whole residual stream. `nm.find_symmetries` finds them by itself, `nm.track` measures "
            "each group's charge at every step, and under SGD the exact ledger and the paper's closed forms predict it."
        ),
        new_code_cell(SETUP),
        new_code_cell(
            """\
from neural_mechanics import data_sources, models_gpt, plots, report_transformer
from neural_mechanics.models_gpt import CharGPT, GPTConfig, lm_loss

corpus = data_sources.pydoc_topics()       # or data_sources.text_file("your.txt")
print(corpus)
print(corpus.credit)
torch.manual_seed(0)
model = CharGPT(GPTConfig(vocab=corpus.vocab_size))   # width 64, 2 blocks, 4 heads of 16, rotary, context 64
x, y = next(data_sources.text_batches(corpus.train, 32, model.cfg.context))
model(x).shape                              # (batch, time, vocabulary): the classes are on the last axis"""
        ),
        new_markdown_cell(
            "## What discovery finds\n\n"
            "The logits are `(B, T, V)`, so the classes are on the last axis: `class_axis=-1`. Every group is listed "
            "with its layer; `skipped` names parameters no group covers (none here), and `notes` what is not claimed "
            "and why."
        ),
        new_code_cell(
            """\
sym = nm.find_symmetries(model, x, class_axis=-1)
print(sym.skipped or "every parameter is in some group")
for note in sym.notes:
    print("not claimed:", note)
sym.summary()"""
        ),
        new_markdown_cell(
            "## The symmetries, one by one (docs/theory.md §2b)\n\n"
            "- **Q/K rescale, per head dimension.** An attention logit is q·k = Σ_r q_r k_r: multiplying query row r by "
            "α and key row r by 1/α changes no logit. Charge |Q_r|² − |K_r|². Rotary positions rotate dimensions r and "
            "r + d_h/2 together, so only the pair is a symmetry (a single row is not): the groups are pairs "
            "(`units 0, 8 with ...k_proj`).\n"
            "- **V/O rescale, per head dimension.** A head's output is linear in its values: value row r × α and the output "
            "projection's column r × 1/α cancel. Charge |V_r|² − |O_{:,r}|².\n"
            "- **Norm gain against the next columns.** RMSNorm's output γ_j x̂_j is read only by linear maps (q, k and v "
            "together; gate and up together; the final norm by the LM head): γ_j × α and column j of every reader × 1/α. "
            "Charge γ_j² − Σ|W_{:,j}|².\n"
            "- **Gated MLP.** down(silu(gate·x) ⊙ up·x): up row i × α against down column i × 1/α. Never the gate's row: "
            "SiLU is not positively homogeneous.\n"
            "- **LM-head column translation.** Adding c to every entry of column j of the head adds c·h_j to every logit "
            "alike, which softmax ignores. Charge Σ_v W_head[v, j].\n"
            "- **Residual-stream scale.** In a pre-norm model every reader of the stream normalises it first, so scaling "
            "every writer (the token table, each attention and MLP output projection) by α changes nothing but RMSNorm's "
            "ε term, which breaks it slightly (as BatchNorm's ε does, docs/theory.md §3).\n\n"
            "The per-dimension Q/K and V/O charges are the diagonal of a per-head GL(d_h) symmetry; its off-diagonal part "
            "is not tracked (§2b)."
        ),
        new_code_cell(
            """\
qk = next(g for g in sym if g.layer == "blocks.0.attn.q_proj")
vo = next(g for g in sym if g.layer == "blocks.0.attn.v_proj")
for g in (qk, vo):
    print(g.symmetry, g.layer, repr(g.label))
    for name, index, sign in g.parts:
        print(f"   {sign:+d}  {name}{list(index)}")"""
        ),
        new_markdown_cell(
            "## Train, tracked: SGD with momentum\n\n"
            "Under `torch.optim.SGD` the exact ledger (docs/theory.md §5.3) accounts for every charge to float32 rounding "
            "and the paper's closed forms with momentum (§5.2) predict it to O(η). The learning rate drops ×0.1 at 75% of "
            "the steps, as in the demo."
        ),
        new_code_cell(
            """\
STEPS = 40 if QUICK else 400
opt = torch.optim.SGD(model.parameters(), lr=0.3, momentum=0.9, weight_decay=5e-4)
sched = torch.optim.lr_scheduler.MultiStepLR(opt, milestones=[int(0.75 * STEPS)], gamma=0.1)
batches = data_sources.text_batches(corpus.train, 32, model.cfg.context, seed=0)

with nm.track(model, opt, sym) as tracker:   # the groups found above (or symmetries=None and class_axis=-1)
    for step in range(STEPS):
        x, y = next(batches)
        loss = lm_loss(model(x), y)
        opt.zero_grad()
        loss.backward()
        opt.step()
        sched.step()
    run = tracker.run
print(f"validation loss {data_sources.evaluate_lm(model, corpus.val, model.cfg.context):.3f} nats per character")
run"""
        ),
        new_code_cell("run.summary()"),
        new_markdown_cell(
            "## Q/K and V/O charges against theory\n\n"
            "Measured solid, the paper's closed form dashed with circles, the exact ledger dotted with crosses (the legend "
            "gives each theory's largest error over the groups drawn; the eight groups of the layer that moved most)."
        ),
        new_code_cell(
            """\
fig, axes = plots.new_figure(2, 1, width=5.6, height=4.3)
plots.plot_charges(run, "rescale", "blocks.0.attn.q_proj", groups=8, ax=axes[0],
                   title="Q/K of blocks.0: |Q_r|² − |K_r|² per rotary pair\\n(the 8 of 32 groups that moved most)")
plots.plot_charges(run, "rescale", "blocks.0.attn.v_proj", groups=8, ax=axes[1],
                   title="V/O of blocks.0: |V_r|² − |O[:, r]|² per dimension\\n(the 8 of 64 groups that moved most)")
fig"""
        ),
        new_markdown_cell(
            "## Every pattern at once\n\n"
            "`models_gpt.transformer_panels` says what the report's transformer figure draws (one head's Q/K and V/O "
            "groups, the norm gains, the gated MLP, the final norm against the head, the head's columns); kept in "
            "`run.info`, it is saved with the run, so `neural-mechanics report` redraws the same figure."
        ),
        new_code_cell(
            """\
run.info["panels"] = models_gpt.transformer_panels(model, sym, run)
report_transformer.transformer_figure(run)"""
        ),
        new_markdown_cell(
            "## AdamW: what the charges do, and what is not a theory\n\n"
            "The transformer's usual optimizer. The symmetries still hold (the verdicts' residuals are float32 "
            "rounding). `exact` re-adds the measured update, a bookkeeping check, not a theory; `paper` is the paper's "
            "first-order form driven by AdamW's own update (docs/theory.md §5.5), and the `breaking` column shows how "
            "far Adam's preconditioner breaks the symmetry that form assumes. `models_gpt.train_gpt` is the demo's "
            "training function (recipe, tracking, losses, a sample of text, the panels)."
        ),
        new_code_cell(
            """\
import dataclasses

recipe = dataclasses.replace(models_gpt.GPT_RECIPES["gpt_adamw"], steps=STEPS)
adamw = models_gpt.train_gpt("gpt_adamw", corpus, recipe, progress=False)
print(recipe.describe())
print(f"train loss {adamw.train_loss:.3f}, validation loss {adamw.val_loss:.3f}; sampled:")
print(adamw.sample)
adamw.run.summary()[["symmetry", "layer", "groups", "verdict", "exact_max", "paper_max", "residual_median"]]"""
        ),
        new_code_cell("report_transformer.transformer_figure(adamw.run)"),
        new_markdown_cell(
            "From the shell, `neural-mechanics demo --model gpt` trains both runs (AdamW, then SGD) and writes the report "
            "with these figures and a table per pattern; `neural-mechanics demo` adds the digit classifiers."
        ),
    ]


NOTEBOOKS: dict[str, Callable[[], list]] = {"quickstart": quickstart, "paper_figures": paper_figures, "equilibrium": equilibrium, "live": live,
                                            "transformers": transformers}


def render(name: str) -> str:
    """Notebook ``name`` as the exact text of its .ipynb file."""
    cells = NOTEBOOKS[name]()
    for position, cell in enumerate(cells):
        cell.id = f"{name}-{position:02d}"  # deterministic (nbformat's default is random)
    nb = new_notebook(cells=cells, metadata={"kernelspec": {"name": "python3", "display_name": "Python 3", "language": "python"},
                                             "language_info": {"name": "python"}})
    nb.nbformat_minor = NBFORMAT_MINOR
    nbformat.validate(nb)
    text = nbformat.writes(nb)
    return text if text.endswith("\n") else text + "\n"


def write(folder: Path = HERE) -> list[Path]:
    paths = []
    for name in NOTEBOOKS:
        path = folder / f"{name}.ipynb"
        path.write_bytes(render(name).encode("utf-8"))
        paths.append(path)
    return paths


def check(folder: Path = HERE) -> list[str]:
    """What differs between the notebooks in ``folder`` and what this script writes (empty: nothing)."""
    problems = []
    for name in NOTEBOOKS:
        path = folder / f"{name}.ipynb"
        if not path.is_file():
            problems.append(f"{path}: missing")
        elif path.read_bytes() != render(name).encode("utf-8"):
            problems.append(f"{path}: differs from what build_notebooks.py writes")
    for path in sorted(folder.glob("*.ipynb")):
        if path.stem not in NOTEBOOKS:
            problems.append(f"{path}: not written by build_notebooks.py")
    return problems


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--check", action="store_true", help="write nothing; exit 1 if a committed notebook differs")
    parser.add_argument("--dir", type=Path, default=HERE, help="the notebooks' folder (default: this script's)")
    args = parser.parse_args(argv)
    if not args.check:
        for path in write(args.dir):
            print(path)
        return 0
    problems = check(args.dir)
    for line in problems:
        print(line)
    if problems:
        print("regenerate them: python notebooks/build_notebooks.py")
        return 1
    print(f"{len(NOTEBOOKS)} notebooks match build_notebooks.py")
    return 0


if __name__ == "__main__":
    sys.exit(main())
