"""The demo's transformer: the text it reads (Python's documentation, or a file), the character-level
GPT (every attention-era pattern of docs/theory.md §2b found in it), its training under AdamW and
SGD (exact ledger ≤ 1e-5), the report's transformer figure and pattern table, and the command line
(--model, --text, one-line errors). The demo's own report with the GPT in it: test_demo.py."""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest
import torch

import neural_mechanics as nm
from neural_mechanics import cli, data_sources, datasets, models_gpt, report_transformer
from neural_mechanics.errors import InvalidArgumentError
from neural_mechanics.models_gpt import CharGPT, GPTConfig, GPTRecipe

SL = slice(None)


@pytest.fixture(autouse=True)
def one_thread():
    """Tiny models: one thread is fastest (and steady on a busy machine)."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="module")
def corpus():
    return data_sources.pydoc_topics()


# -- the text ---------------------------------------------------------------------------------------
def test_pydoc_topics_is_the_standard_librarys_documentation(corpus):
    from pydoc_data.topics import topics

    text = datasets.load_pydoc_topics()
    assert text == "".join(topics[k] for k in sorted(topics))  # sorted key order: the same text on every run
    assert len(text) > 100_000 and text.startswith(topics[min(topics)])
    assert corpus.chars == "".join(sorted(set(text)))
    assert len(corpus.train) + len(corpus.val) == len(text)
    assert abs(len(corpus.val) - 0.1 * len(text)) <= 1  # the last 10% validate
    assert corpus.decode(corpus.train[:200]) == text[:200] and corpus.decode(corpus.val[-50:]) == text[-50:]
    assert "PSF" in corpus.credit and "pydoc_data.topics" in corpus.credit
    assert torch.equal(corpus.encode("for x in"), corpus.train.new_tensor([corpus.chars.index(c) for c in "for x in"]))


def test_windows_are_shifted_by_one_and_evaluation_is_fixed(corpus):
    x, y = next(data_sources.text_batches(corpus.train, 4, 16, seed=0))
    assert x.shape == y.shape == (4, 16) and torch.equal(x[:, 1:], y[:, :-1])
    x2, _ = next(data_sources.text_batches(corpus.train, 4, 16, seed=0))
    assert torch.equal(x, x2)
    torch.manual_seed(0)
    model = CharGPT(GPTConfig(vocab=corpus.vocab_size, width=16, layers=1, heads=2, hidden=16, context=16))
    a = data_sources.evaluate_lm(model, corpus.val, 16, windows=8)
    assert a == data_sources.evaluate_lm(model, corpus.val, 16, windows=8)
    assert abs(a - np.log(corpus.vocab_size)) < 1.0  # untrained: about uniform over the vocabulary


def test_text_sources_refuse_what_cannot_train(tmp_path):
    with pytest.raises(InvalidArgumentError, match="too few"):
        data_sources.text("short text")
    with pytest.raises(InvalidArgumentError):
        data_sources.text("x" * 5000, val_fraction=1.0)
    with pytest.raises(InvalidArgumentError, match="no such file"):
        data_sources.text_file(tmp_path / "missing.txt")
    (tmp_path / "latin1.txt").write_bytes("caf\xe9 ".encode("latin-1") * 1000)
    with pytest.raises(InvalidArgumentError, match="UTF-8"):
        data_sources.text_file(tmp_path / "latin1.txt")
    with pytest.raises(InvalidArgumentError, match="vocabulary"):
        data_sources.text("ab" * 3000).encode("abc")


# -- the model and its symmetries ---------------------------------------------------------------------
def _find(cfg: GPTConfig):
    torch.manual_seed(0)
    model = CharGPT(cfg)
    x = torch.randint(0, cfg.vocab, (2, cfg.context))
    assert model(x).shape == (2, cfg.context, cfg.vocab)
    sym = nm.find_symmetries(model, x, class_axis=-1)
    return model, {(g.symmetry, g.layer, g.index): g for g in sym}, sym


def _layer(found, symmetry, layer):
    return [g for (s, lay, _), g in found.items() if s == symmetry and lay == layer]


def test_the_default_gpt_has_every_pattern_the_report_draws():
    cfg = GPTConfig(vocab=20, width=16, heads=2, hidden=24, context=8)  # the demo's shape, smaller
    _, found, sym = _find(cfg)
    A, dh = "blocks.0.attn", 8
    # Q/K under rotary positions: q rows {r, r + d_h/2} against k rows {r, r + d_h/2}, d_h/2 pairs per head
    qk = _layer(found, "rescale", f"{A}.q_proj")
    assert len(qk) == cfg.width // 2
    assert {p[:2] for p in qk[0].parts} == {(f"{A}.q_proj.weight", (0,)), (f"{A}.q_proj.weight", (dh // 2,)),
                                            (f"{A}.k_proj.weight", (0,)), (f"{A}.k_proj.weight", (dh // 2,))}
    # V/O: v row r against o column r
    vo = _layer(found, "rescale", f"{A}.v_proj")
    assert len(vo) == cfg.width and vo[3].parts == ((f"{A}.v_proj.weight", (3,), 1), (f"{A}.o_proj.weight", (SL, 3), -1))
    # norm gain j against column j of every reader: q, k, v; gate and up; the final norm against the LM head
    gain = _layer(found, "rescale", "blocks.0.attn_norm")[2]
    assert {p[0] for p in gain.parts if p[2] == -1} == {f"{A}.q_proj.weight", f"{A}.k_proj.weight", f"{A}.v_proj.weight"}
    assert {p[0] for p in _layer(found, "rescale", "blocks.0.mlp_norm")[0].parts if p[2] == -1} == {
        "blocks.0.mlp.gate_proj.weight", "blocks.0.mlp.up_proj.weight"}
    assert _layer(found, "rescale", "norm")[5].parts == (("norm.weight", (5,), 1), ("head.weight", (SL, 5), -1))
    # gated MLP: up row against down column, never the gate (SiLU)
    assert len(_layer(found, "rescale", "blocks.0.mlp.up_proj")) == cfg.hidden
    assert not _layer(found, "rescale", "blocks.0.mlp.gate_proj")
    assert any("gate_proj" in n and "SiLU" in n for n in sym.notes)
    # the untied LM head's columns (softmax over the vocabulary, class_axis=-1) and the residual stream's scale group
    head = _layer(found, "translation", "head")
    assert len(head) == cfg.width and head[0].parts == (("head.weight", (SL, 0), 1),)
    (stream,) = _layer(found, "scale", "tok")
    assert {p[0] for p in stream.parts} == {"tok.weight", f"{A}.o_proj.weight", "blocks.0.mlp.down_proj.weight",
                                            "blocks.1.attn.o_proj.weight", "blocks.1.mlp.down_proj.weight"}
    assert not sym.skipped  # every parameter is in some group


def test_learned_positions_and_grouped_query_attention():
    cfg = GPTConfig(vocab=20, width=16, heads=4, kv_heads=2, hidden=16, context=8, layers=1, positions="learned")
    model, found, _ = _find(cfg)
    A = "blocks.0.attn"
    # per-dimension Q/K; a key row is read by the two query heads that share it
    qk = _layer(found, "rescale", f"{A}.q_proj")
    assert len(qk) == 2 * 4  # one per key row
    assert sorted(p[1][0] for p in qk[0].parts if p[0].endswith("q_proj.weight")) == [0, 4]
    # the token table's columns against the position table's (a signed translation)
    signed = [g for g in _layer(found, "translation", "tok") if "against pos" in g.label]
    assert len(signed) == cfg.width and signed[0].parts[1][0] == "pos.weight" and signed[0].parts[1][2] == -1
    # the report's panels follow the key/value heads: one head's 4 Q/K groups (each read by 2 query heads), its 4 V/O groups
    run = _StillRun(found)
    panels = {p["key"]: p for p in models_gpt.transformer_panels(model, list(found.values()), run)}
    assert len(panels["qk"]["groups"]) == len(panels["vo"]["groups"]) == 4
    assert "key/value head" in panels["qk"]["title"] and "query heads" in panels["qk"]["title"]


class _StillRun:
    """The least of a run transformer_panels reads: groups and a measured column (nothing moved)."""

    def __init__(self, found):
        keys = list(found)
        self.groups = type("G", (), {"symmetry": np.array([k[0] for k in keys], dtype=object),
                                     "layer": np.array([k[1] for k in keys], dtype=object),
                                     "index": np.array([k[2] for k in keys])})()

    def array(self, column):
        return np.zeros((2, len(self.groups.symmetry)))


def test_configs_and_recipes_refuse_nonsense():
    for bad in ({"positions": "alibi"}, {"width": 10, "heads": 4}, {"heads": 4, "kv_heads": 3}, {"width": 12, "heads": 4}):
        with pytest.raises(InvalidArgumentError):
            GPTConfig(vocab=10, **bad)
    with pytest.raises(InvalidArgumentError):
        GPTRecipe("adam")
    with pytest.raises(InvalidArgumentError):
        CharGPT(GPTConfig(vocab=10, width=8, heads=2, hidden=8, context=4))(torch.zeros(1, 5, dtype=torch.int64))


# -- training, tracked --------------------------------------------------------------------------------
TINY = {"width": 16, "layers": 1, "heads": 2, "hidden": 16, "context": 16}  # the vocabulary comes from the text


@pytest.fixture(scope="module")
def trained(corpus):
    torch.set_num_threads(1)
    cfg = GPTConfig(vocab=corpus.vocab_size, **TINY)
    out = {}
    for name in cli.GPT_MODELS:
        recipe = dataclasses.replace(models_gpt.GPT_RECIPES[name], steps=16, batch_size=8)
        out[name] = models_gpt.train_gpt(name, corpus, recipe, config=cfg, progress=False)
    return out


def test_sgd_run_is_accounted_for_by_the_exact_ledger(trained):
    t = trained["gpt_sgd"]
    run = t.run
    assert run.optimizer == "SGD" and run.exact_kind == "ledger" and len(run.step_index) == 17
    assert np.nanmax(run.errors("exact")) <= 1e-5
    assert np.isfinite(run.errors("paper")).all() and np.nanmax(run.errors("paper")) < 1e-2
    assert set(run.regimes) == {"translation", "scale", "rescale"}
    assert np.nanmax(np.abs(run.array("measured")[-1] - run.array("measured")[0])) > 1e-3  # the charges moved
    assert np.isfinite([t.train_loss, t.val_loss, t.final_loss]).all()
    assert t.sample.startswith("The ") and len(t.sample) == 4 + models_gpt.SAMPLE_CHARS


def test_adamw_run_is_bookkeeping_and_says_so(trained):
    run = trained["gpt_adamw"].run
    assert run.optimizer == "AdamW" and run.exact_kind == "bookkeeping"
    assert np.nanmax(run.errors("exact")) <= 1e-5
    summary = run.summary()
    if not np.isfinite(run.array("paper")).any():  # no closed form for AdamW in this tracker
        assert set(summary.verdict) == {"bookkeeping only"}


def test_run_records_what_the_report_draws(trained, tmp_path):
    run = trained["gpt_sgd"].run
    info = run.info
    assert [p["key"] for p in info["panels"]] == ["qk", "vo", "gain", "mlp", "final", "lm_head"]
    qk = info["panels"][0]
    assert len(qk["groups"]) == 4 and "rotary pairs" in qk["title"]  # one head of 8: its 4 rotary pairs
    assert {tuple(x[:2]) for x in info["patterns"]} == set(zip(run.groups.symmetry, run.groups.layer))
    assert "Model: a character-level GPT" in info["architecture"] and "AdamW" not in info["recipe"]
    # saved and loaded, the run draws the same figure and table (JSON keeps the panels)
    again = nm.load_run(run.save(tmp_path / "gpt.nmrun"))
    assert again.info["panels"] == info["panels"]
    fig = report_transformer.transformer_figure(again)
    titles = [ax.get_title() for ax in fig.axes if ax.get_visible()]
    assert len(titles) == 6 and titles[0].startswith("(a) Q/K rescale") and "exact ≤" in titles[0] and "paper ≤" in titles[0]
    assert sum(ax.get_legend() is not None for ax in fig.axes) == 1  # one legend, in the first panel
    table = report_transformer.pattern_table(again)
    assert {"Q/K rescale, rotary pairs", "V/O rescale", "norm gain / next columns", "gated MLP up/down",
            "final norm gain / LM-head columns", "LM-head column translation", "residual-stream scale"} == set(table.pattern)
    assert (table.exact_max <= 1e-5).all() and (table.verdict == "ok").all()


def test_a_run_without_panels_has_no_transformer_section(trained):
    run = trained["gpt_sgd"].run
    plain = report_transformer.GroupSubset(run, np.ones(len(run.groups), dtype=bool))
    assert len(plain.groups) == len(run.groups) and plain.array("measured").shape == run.array("measured").shape
    saved = run.info.pop("panels"), run.info.pop("patterns")
    try:
        assert not report_transformer.has_transformer_panels(run) and report_transformer.pattern_table(run).empty
        with pytest.raises(InvalidArgumentError):
            report_transformer.transformer_figure(run)
    finally:
        run.info.update(panels=saved[0], patterns=saved[1])


# -- the command line ---------------------------------------------------------------------------------
def test_model_names_and_aliases():
    assert cli.resolve_models("gpt") == ("gpt_adamw", "gpt_sgd")
    assert cli.resolve_models(["gpt_sgd,vgg", "mlp"]) == ("vgg", "mlp", "gpt_sgd")  # the demo's order, each once
    assert cli.resolve_models(["all"]) == cli.DEFAULT_MODELS == cli.IMAGE_MODELS + cli.GPT_MODELS
    with pytest.raises(InvalidArgumentError, match="unknown model"):
        cli.resolve_models(["gpt2"])


@pytest.mark.parametrize("argv, says", [
    (["--model", "bert"], "unknown model 'bert'"),
    (["--model", "gpt", "--data", "digits"], "--data is for the image classifiers"),
    (["--model", "mlp", "--text", "x.txt"], "--text is for the GPT"),
    (["--model", "gpt", "--text", "no-such-file.txt"], "no such file"),
    (["--model", "mlp,gpt", "--text", "no-such-file.txt"], "no such file"),  # before the classifier trains
    (["--steps", "1"], "from 2 up"),
])  # fmt: skip
def test_user_errors_are_one_line_and_exit_2(argv, says, tmp_path, capsys):
    assert cli.main(["demo", "--out", str(tmp_path / "out"), "--no-progress", *argv]) == 2
    err = capsys.readouterr().err
    assert err.startswith("neural-mechanics: error: ") and says in err and err.count("\n") == 1
    assert not (tmp_path / "out").exists()


def test_demo_trains_only_the_model_asked_for_on_your_text(tmp_path):
    from pydoc_data.topics import topics

    (tmp_path / "mine.txt").write_text(topics["for"] * 2, encoding="utf-8")  # a few KB of text of your own
    threads = torch.get_num_threads()
    rc = cli.main(["demo", "--model", "gpt_sgd", "--steps", "4", "--text", str(tmp_path / "mine.txt"),
                   "--out", str(tmp_path / "out"), "--no-progress"])
    torch.set_num_threads(threads)
    assert rc == 0
    assert sorted(p.name for p in (tmp_path / "out" / "runs").iterdir()) == ["gpt_sgd.nmrun"]
    page = (tmp_path / "out" / "index.md").read_text()
    assert "TextSource('mine.txt'" in page and (tmp_path / "out" / "gpt_sgd" / "transformer.png").is_file()
    # with no classifier, the exact-dynamics figure comes from the SGD run's ledger
    assert "(a) translation from model gpt_sgd" in page
