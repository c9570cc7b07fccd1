"""The demo in quick mode writes the whole report (the three digit classifiers and the GPT under
AdamW and SGD); `report` redraws it from the saved runs. The GPT's own tests (model, text, CLI):
test_gpt_demo.py."""

from __future__ import annotations

import re
from pathlib import Path

import numpy as np
import pytest
import torch

import neural_mechanics as nm
from neural_mechanics import cli, data_sources, models
from neural_mechanics.errors import InvalidArgumentError, ShapeError

STEPS = 60  # enough for the lr step (at 75%) and for every charge to move; a few seconds per run
GPT_RUNS = cli.GPT_MODELS


@pytest.fixture(scope="module")
def report(tmp_path_factory):
    threads = torch.get_num_threads()  # the demo command sets one thread; give the rest back
    out = tmp_path_factory.mktemp("demo")
    rc = cli.main(["demo", "--out", str(out), "--steps", str(STEPS), "--no-progress"])
    torch.set_num_threads(threads)
    assert rc == 0
    return out


def _table_rows(md: str, header_start: str) -> list[list[str]]:
    """The rows of the first Markdown table whose header starts with ``header_start``."""
    lines = md.splitlines()
    start = next(i for i, line in enumerate(lines) if line.startswith("| " + header_start))
    rows = []
    for line in lines[start + 2 :]:
        if not line.startswith("|"):
            break
        rows.append([c.strip() for c in line.strip("|").split(" | ")])
    return rows


def test_every_expected_file_exists(report):
    expected = ["index.md", "index.html", "summary.md", "summary.html", "exact_dynamics.png"]
    expected += [f"runs/{m}.nmrun" for m in cli.DEFAULT_MODELS]
    per_model = {
        "vgg_bn": ["charges_translation", "charges_scale", "charges_rescale", "errors", "residuals", "equilibrium"],
        "vgg": ["charges_translation", "charges_rescale", "errors", "residuals"],
        "mlp": ["charges_translation", "charges_rescale", "errors", "residuals"],
        # the transformer figure (docs/theory.md §2b patterns) first; the SGD run has an equilibrium panel
        "gpt_adamw": ["transformer", "charges_translation", "charges_scale", "charges_rescale", "errors", "residuals", "forecast"],
        "gpt_sgd": ["transformer", "charges_translation", "charges_scale", "charges_rescale", "errors", "residuals", "equilibrium", "forecast"],
    }
    for model, figs in per_model.items():
        expected += [f"{model}/{f}.png" for f in figs] + [f"{model}/summary.md", f"{model}/summary.html"]
    missing = [p for p in expected if not (report / p).is_file() or (report / p).stat().st_size == 0]
    assert not missing
    # every image the pages show exists
    index = (report / "index.md").read_text()
    for img in re.findall(r"!\[[^\]]*\]\(([^)]+)\)", index):
        assert (report / img).is_file(), img
    assert "<img" in (report / "index.html").read_text()


def test_summary_has_all_three_symmetries_and_exact_errors_within_1e_5(report):
    rows = _table_rows((report / "summary.md").read_text(), "model | symmetry")
    assert {r[1] for r in rows} == {"translation", "scale", "rescale"}
    assert {r[0] for r in rows} == set(cli.DEFAULT_MODELS)
    for name in cli.DEFAULT_MODELS:
        run = nm.load_run(report / "runs" / f"{name}.nmrun")
        assert len(run.step_index) == STEPS + 1
        assert run.errors("exact").max() <= 1e-5, name  # AdamW: the bookkeeping of its measured update
        if run.optimizer == "SGD":
            assert np.isfinite(run.errors("paper")).all(), name


def test_the_gpt_runs_cover_every_transformer_pattern(report):
    index = (report / "index.md").read_text()
    for name in GPT_RUNS:
        run = nm.load_run(report / "runs" / f"{name}.nmrun")
        layers = {(s, str(layer)) for s, layer in zip(run.groups.symmetry, run.groups.layer)}
        # Q/K (rotary pairs), V/O, norm gain / next columns, gated MLP, final norm / LM head, LM-head columns, the stream
        assert {("rescale", "blocks.0.attn.q_proj"), ("rescale", "blocks.0.attn.v_proj"), ("rescale", "blocks.0.attn_norm"),
                ("rescale", "blocks.1.mlp.up_proj"), ("rescale", "norm"), ("translation", "head"), ("scale", "tok")} <= layers
        patterns = {p for _, _, p in run.info["patterns"]}
        assert {"Q/K rescale, rotary pairs", "V/O rescale", "norm gain / next columns", "LM-head column translation"} <= patterns
        assert "other" not in patterns
        assert [p["key"] for p in run.info["panels"]] == ["qk", "vo", "gain", "mlp", "final", "lm_head"]
        assert run.coverage["uncovered"] == {}  # the gate is covered by the norm's columns; what is not claimed is said
        assert any("SiLU" in s for s in run.info["not_claimed"])
        assert f"![{name} transformer]({name}/transformer.png)" in index
        if name == "gpt_sgd":  # the ledger and the paper's closed form
            assert run.exact_kind == "ledger" and np.nanmax(run.errors("exact")) <= 1e-5
            assert np.nanmax(run.errors("paper")) < 1e-2
        else:  # AdamW: bookkeeping, no closed form in this tracker (NaN) or the paper's form of the update
            assert run.exact_kind == "bookkeeping" and run.optimizer == "AdamW"
    # the pattern tables, the samples and both training tables are on the page
    assert index.count("the transformer's symmetries by pattern") == 2
    assert index.count("Sampled from gpt_") == 2
    headers = [line for line in index.splitlines() if line.startswith("| model | ")]
    assert any("test accuracy" in h for h in headers) and any("validation loss" in h for h in headers)
    assert not any("test accuracy" in h and "validation loss" in h for h in headers)  # one table per kind of run


def test_markdown_tables_are_well_formed(report):
    # a "|" inside a header or cell (|θ|²) must be escaped, or the table falls apart
    for md in [report / "summary.md", report / "index.md", *report.glob("*/summary.md")]:
        widths = set()
        for line in md.read_text().splitlines() + [""]:
            if line.startswith("|"):
                widths.add(len(re.split(r"(?<!\\)\|", line)))
            elif widths:
                assert len(widths) == 1, (md, widths)
                widths = set()


def test_report_from_saved_runs_redraws_what_the_demo_drew(report, tmp_path):
    # as a shell glob gives them (alphabetical: mlp, vgg, vgg_bn), not in the demo's order
    runs = sorted(str(p) for p in (report / "runs").glob("*.nmrun"))
    assert [Path(r).stem for r in runs] != list(cli.DEFAULT_MODELS)
    assert cli.main(["report", *runs, "--out", str(tmp_path)]) == 0
    assert (tmp_path / "summary.md").read_text() == (report / "summary.md").read_text()
    for m in cli.DEFAULT_MODELS:
        assert (tmp_path / m / "summary.md").read_text() == (report / m / "summary.md").read_text()
        assert sorted(p.name for p in (tmp_path / m).iterdir()) == sorted(p.name for p in (report / m).iterdir())
    # the same figures, pixel for pixel: same row order, same panels, same titles
    drawn = sorted(p.relative_to(report) for p in report.rglob("*.png"))
    assert drawn and drawn == sorted(p.relative_to(tmp_path) for p in tmp_path.rglob("*.png"))
    for png in drawn:
        assert (tmp_path / png).read_bytes() == (report / png).read_bytes(), png
    # the same page after the title and the line saying where it comes from, training table included
    demo_page, redrawn = (report / "index.md").read_text(), (tmp_path / "index.md").read_text()
    body = demo_page[demo_page.index("Data: "):].replace(demo_page[demo_page.index("Saved runs: "):].split("\n\n")[0] + "\n\n", "")
    assert "## Training" in body and redrawn.endswith(body)


def test_a_report_folder_stands_for_its_runs(report, tmp_path, capsys):
    from neural_mechanics.report import load_runs

    assert list(load_runs([report])) == sorted(cli.DEFAULT_MODELS)  # `neural-mechanics report nm-report`
    assert list(load_runs([report / "runs"])) == sorted(cli.DEFAULT_MODELS)
    assert cli.main(["report", str(tmp_path), "--out", str(tmp_path / "out")]) == 2  # an empty folder: one line, exit 2
    assert capsys.readouterr().err.startswith("neural-mechanics: error: ") and not (tmp_path / "out").exists()


def test_report_of_one_run(report, tmp_path, capsys):
    assert cli.main(["report", str(report / "runs" / "vgg_bn.nmrun"), "--out", str(tmp_path)]) == 0
    printed = capsys.readouterr().out
    assert str((tmp_path / "index.html").resolve()) in printed
    assert (tmp_path / "summary.md").read_text().count("| vgg_bn |") >= 10
    assert (tmp_path / "vgg_bn" / "equilibrium.png").is_file()


@pytest.mark.parametrize("name", sorted(models.REFERENCE_MODELS))
def test_reference_models_have_the_symmetries_the_demo_plots(name):
    ctor, expected = models.REFERENCE_MODELS[name]
    found = nm.find_symmetries(ctor(), torch.zeros(4, 1, 8, 8))
    kinds = {g.symmetry for g in found}
    assert set(expected) <= kinds
    layers = {(g.symmetry, g.layer) for g in found}
    assert ("translation", "classifier") in layers
    if name == "vgg_bn":
        assert {("scale", "conv1"), ("rescale", "bn1")} <= layers
    if name == "vgg":
        # the no-BN model's rescale groups run conv to conv (the paper's panel c)
        assert {("rescale", "conv1"), ("rescale", "conv2")} <= layers and "scale" not in kinds


def test_models_follow_the_image_shape():
    for name in models.REFERENCE_MODELS:
        m = models.build(name, in_channels=3, image_size=16, num_classes=4)
        assert m(torch.zeros(2, 3, 16, 16)).shape == (2, 4)
    with pytest.raises(ValueError):
        models.build("resnet")


def _write_image_folder(root: Path, per_class: int = 12) -> None:
    from PIL import Image

    images, labels = nm.datasets.load_digits_numpy()
    for cls in (0, 1, 2):
        (root / f"digit{cls}").mkdir(parents=True)
        picks = np.flatnonzero(labels == cls)[:per_class]
        for k, i in enumerate(picks):
            Image.fromarray((images[i] * 15).astype(np.uint8), mode="L").resize((16, 16)).save(root / f"digit{cls}" / f"{k}.png")


def test_own_data_image_folder(tmp_path):
    _write_image_folder(tmp_path / "imgs")
    source = data_sources.image_folder(tmp_path / "imgs")
    assert (source.in_channels, source.image_size, source.num_classes) == (1, 8, 3)
    assert len(source.train) + len(source.test) == 36
    index = cli.demo(tmp_path / "out", steps=8, data=str(tmp_path / "imgs"), models=("mlp",), progress=False)
    assert index.is_file() and "ImageFolder" in index.with_suffix(".md").read_text()
    streamed = data_sources.image_folder(tmp_path / "imgs", in_memory=False, grayscale=False, image_size=8)
    x, y = next(data_sources.batches(streamed.train, 4))
    assert x.shape == (4, 3, 8, 8) and y.shape == (4,)


def test_own_data_any_dataset_and_tensors(tmp_path):
    x, y = nm.load_digits()
    pair = data_sources.from_dataset((x[:100], y[:100]))
    assert pair.num_classes == 10 and len(pair.train) == 80

    class Plain(torch.utils.data.Dataset):
        def __len__(self):
            return 40

        def __getitem__(self, i):
            return x[i], int(y[i]) % 3

    plain = data_sources.from_dataset(Plain(), test_fraction=0.25)
    assert plain.num_classes == 3 and len(plain.test) == 10
    trained = models.train("vgg", plain, models.Recipe(steps=4, batch_size=8), progress=False)
    assert len(trained.run.step_index) == 5
    torch.save((x[:64], y[:64]), tmp_path / "d.pt")
    assert data_sources.load(str(tmp_path / "d.pt")).num_classes == 10
    with pytest.raises(ValueError):
        data_sources.load(str(tmp_path / "nothing-here"))


def test_bad_inputs_raise_library_errors(tmp_path):
    with pytest.raises(InvalidArgumentError):
        models.build("resnet")
    with pytest.raises(ShapeError):
        models.vgg(image_size=2)  # two poolings leave nothing of a 2x2 image
    with pytest.raises(InvalidArgumentError):
        data_sources.digits(test_fraction=1.0)
    with pytest.raises(InvalidArgumentError):
        data_sources.from_dataset((torch.zeros(0, 1, 8, 8), torch.zeros(0, dtype=torch.int64)))
    with pytest.raises(ShapeError):
        data_sources.from_dataset((torch.zeros(4, 1, 8, 6), torch.zeros(4, dtype=torch.int64)))
    with pytest.raises(InvalidArgumentError):
        data_sources.load(str(tmp_path / "nothing-here"))
    with pytest.raises(InvalidArgumentError):
        cli.demo(tmp_path / "out", steps=1, progress=False)
