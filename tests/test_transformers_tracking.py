"""track() on transformers: every group of docs/theory.md §2b through the fused kernel.

SGD with momentum and weight decay: the exact ledger (docs/theory.md §5.3) reproduces every
measured charge, signed translations included, to float32 rounding (≤ 1e-5 of the group's
magnitude). AdamW: the measured-update bookkeeping does too. The layouts the kernel reads here
are new to it: row ranges of a packed projection, Conv1D's (in, out) weights (a unit is a column,
an input a row), several columns of one weight in one part list (grouped-query attention), whole
tables against column pairs with signs.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
from gpt_blocks import GPT, GPTConfig, lm_loss

import neural_mechanics as nm


@pytest.fixture(autouse=True)
def one_thread():
    """Tiny models: one thread is fastest (and steady on a busy machine)."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def loop(model, opt, steps, vocab=12, T=6, B=8, *, loss=lm_loss):
    gen = torch.Generator().manual_seed(3)
    for _ in range(steps):
        x = torch.randint(0, vocab, (B, T), generator=gen)
        y = torch.randint(0, vocab, (B, T), generator=gen)
        out = model(x)
        value = loss(out, y)
        opt.zero_grad()
        value.backward()
        opt.step()


def hf_gpt2():
    transformers = pytest.importorskip("transformers")
    transformers.logging.set_verbosity_error()
    cfg = transformers.GPT2Config(vocab_size=12, n_positions=8, n_embd=8, n_layer=1, n_head=2, resid_pdrop=0.0,
                                  embd_pdrop=0.0, attn_pdrop=0.0, bos_token_id=0, eos_token_id=0, tie_word_embeddings=False)
    return transformers.GPT2LMHeadModel(cfg)


MODELS = {
    # LayerNorm, biases, learned positions, ReLU: q/k, v/o, key biases, norm gains, the stream's
    # scale group, signed token/position translations, the LayerNorm-only translations
    "gpt-ln-bias": lambda: GPT(GPTConfig(norm="layer", mlp="relu", bias=True)),
    # rotary pairs, grouped-query attention, QK-norm, a hand-written RMSNorm, a tied head
    "gpt-rope-gqa-qknorm-tied": lambda: GPT(GPTConfig(norm="rms_hand", pos="rope", kv_heads=1, qk_norm=True, tied=True)),
    "hf-gpt2": hf_gpt2,
}
OPTIMIZERS = {
    "sgd": lambda m: torch.optim.SGD(m.parameters(), lr=0.05, momentum=0.9, weight_decay=5e-4),
    "adamw": lambda m: torch.optim.AdamW(m.parameters(), lr=3e-3, weight_decay=1e-2),
}


@pytest.mark.parametrize("opt_name", list(OPTIMIZERS))
@pytest.mark.parametrize("model_name", list(MODELS))
def test_every_transformer_group_is_tracked_exactly(model_name, opt_name):
    torch.manual_seed(0)
    model = MODELS[model_name]()
    loss = lm_loss if model_name.startswith("gpt") else (lambda out, y: lm_loss(out.logits, y))
    opt = OPTIMIZERS[opt_name](model)
    with nm.track(model, opt, class_axis=-1) as tracker:  # discovered at the first forward
        loop(model, opt, 12, loss=loss)
    run = tracker.run
    kinds = set(run.groups.symmetry)
    assert kinds == {"translation", "scale", "rescale"} or model_name.endswith("tied") and kinds >= {"scale", "rescale"}
    err = run.errors("exact")
    assert np.nanmax(err) <= 1e-5, (model_name, opt_name, float(np.nanmax(err)))
    # the charges moved (so the ledger was tested on something)
    measured = run.array("measured")
    assert np.nanmax(np.abs(measured[-1] - measured[0])) > 1e-4
    if opt_name == "sgd":
        assert np.isfinite(run.errors("paper")).all()


def test_signed_translation_charge_is_the_signed_sum():
    torch.manual_seed(0)
    model = GPT(GPTConfig())
    x = torch.randint(0, 12, (4, 6))
    sym = nm.find_symmetries(model, x, class_axis=-1)
    signed = [g for g in sym if g.symmetry == "translation" and "against" in g.label]
    assert signed
    opt = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9, weight_decay=5e-4)
    with nm.track(model, opt, nm.Symmetries(signed)) as tracker:
        loop(model, opt, 10)
    run = tracker.run
    j = signed[0].index - 12 - 2 * 8  # the signed groups of table tok [12, 8] come after rows and columns
    expected = float(model.tok.weight[:, j].detach().double().sum() - model.pos.weight[:, j].detach().double().sum())
    assert abs(run.array("measured")[-1][0] - expected) <= 1e-6 * (1 + abs(expected))
    assert np.nanmax(run.errors("exact")) <= 1e-5
