"""find_symmetries on attention-era models: every pattern of docs/theory.md §2b, with its parts,
proved by verify. (The brute-force oracle that these are all there is: test_transformers_oracle.py.)"""

from __future__ import annotations

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F
from gpt_blocks import GPT, GPTConfig, lm_loss

import neural_mechanics as nm
from neural_mechanics.errors import InvalidArgumentError

E, H, D = 8, 2, 4  # width, heads, head width of the hand-written GPT below
SL = slice(None)


@pytest.fixture(autouse=True)
def one_thread():
    """Tiny models: one thread is fastest (and steady on a busy machine)."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def build(**kw):
    torch.manual_seed(0)
    return GPT(GPTConfig(**kw)).double()


def ids(B=3, T=6, V=12):
    g = torch.Generator().manual_seed(1)
    return torch.randint(0, V, (B, T), generator=g), torch.randint(0, V, (B, T), generator=g)


def holds(model, sym, x, y, loss=lm_loss):
    """Every claim holds: ok, no gradient (the key biases, unused rows), or broken only by a
    normaliser's epsilon within 10x its prediction (the residual stream's scale group)."""
    df = nm.verify(model, loss, (x, y), symmetries=sym)
    eps = df[df.status.str.endswith("ε")]
    assert (eps.residual <= 10 * eps.predicted).all()
    bad = df[~df.status.isin(["ok", "no gradient"]) & ~df.status.str.endswith("ε")]
    assert bad.empty, bad.to_string()
    assert (df.status == "ok").sum() > 0.5 * len(df)
    return df


def groups(sym, layer, symmetry):
    return [g for g in sym if g.layer == layer and g.symmetry == symmetry]


def group(sym, layer, symmetry, index):
    return next(g for g in sym if g.layer == layer and g.symmetry == symmetry and g.index == index)


A = "blocks.0.attn"


# -- the hand-written GPT ------------------------------------------------------------------------
def test_gpt_rmsnorm_gated_untied():
    m = build()
    x, y = ids()
    sym = nm.find_symmetries(m, x, class_axis=-1)
    # q/k per dimension: q row r (+), k row r (−)
    assert len(groups(sym, f"{A}.q_proj", "rescale")) == E
    assert group(sym, f"{A}.q_proj", "rescale", 5).parts == ((f"{A}.q_proj.weight", (5,), 1), (f"{A}.k_proj.weight", (5,), -1))
    # v/o per dimension: v row r (+), o column r (−)
    assert group(sym, f"{A}.v_proj", "rescale", 2).parts == ((f"{A}.v_proj.weight", (2,), 1), (f"{A}.o_proj.weight", (SL, 2), -1))
    # norm gains against every reader's column: q, k, v together; gate and up together
    g = group(sym, "blocks.0.attn_norm", "rescale", 3)
    assert {p[0] for p in g.outgoing} == {f"{A}.q_proj.weight", f"{A}.k_proj.weight", f"{A}.v_proj.weight"}
    g = group(sym, "blocks.0.mlp_norm", "rescale", 3)
    assert {p[0] for p in g.outgoing} == {"blocks.0.mlp.gate_proj.weight", "blocks.0.mlp.up_proj.weight"}
    # gated MLP: up row i against down column i, never the gate
    assert len(groups(sym, "blocks.0.mlp.up_proj", "rescale")) == 16
    assert "SiLU" in sym.skipped.get("blocks.0.mlp.gate_proj.weight", "SiLU")
    assert not groups(sym, "blocks.0.mlp.gate_proj", "rescale")
    # final norm against the (untied) head; the head's column translations
    assert group(sym, "norm", "rescale", 0).parts == (("norm.weight", (0,), 1), ("head.weight", (SL, 0), -1))
    assert len(groups(sym, "head", "translation")) == E
    # the residual stream: one scale group of every writer
    (stream,) = groups(sym, "tok", "scale")
    assert {p[0] for p in stream.parts} == {"tok.weight", "pos.weight", f"{A}.o_proj.weight", "blocks.0.mlp.down_proj.weight"}
    assert all(p[1] == (SL,) and p[2] == 1 for p in stream.parts)
    # token column j against position column j, a signed translation; no LayerNorm-only ones
    signed = groups(sym, "tok", "translation")
    assert len(signed) == E and signed[1].parts == (("tok.weight", (SL, 1), 1), ("pos.weight", (SL, 1), -1))
    assert not groups(sym, "pos", "translation")
    assert not groups(sym, f"{A}.k_proj", "translation")  # no key bias here
    holds(m, sym, x, y)


def test_gpt_layernorm_relu_bias_layernorm_only_translations_and_key_bias():
    m = build(norm="layer", mlp="relu", bias=True)
    x, y = ids()
    sym = nm.find_symmetries(m, x, class_axis=-1)
    tok = groups(sym, "tok", "translation")
    rows = [g for g in tok if g.label.startswith("row")]
    assert len(rows) == 12 and rows[4].parts == (("tok.weight", (4,), 1),)
    assert any(g.parts == (("tok.weight", (SL,), 1),) for g in tok)  # the whole table
    assert len(groups(sym, "pos", "translation")) == 8 + 1  # every position row, the whole table
    # the column translations of every weight writing the residual stream, and their biases
    assert len(groups(sym, f"{A}.o_proj", "translation")) == E + 1
    assert len(groups(sym, "blocks.0.mlp.down_proj", "translation")) == 16 + 1
    # the key bias: a translation whose gradient is identically zero ("no gradient")
    kb = groups(sym, f"{A}.k_proj", "translation")
    assert len(kb) == E and kb[3].parts == ((f"{A}.k_proj.bias", (3,), 1),)
    # q/k with biases; ReLU FFN up/down rescale
    assert group(sym, f"{A}.q_proj", "rescale", 0).parts == (
        (f"{A}.q_proj.weight", (0,), 1), (f"{A}.q_proj.bias", (0,), 1),
        (f"{A}.k_proj.weight", (0,), -1), (f"{A}.k_proj.bias", (0,), -1))
    assert len(groups(sym, "blocks.0.mlp.up_proj", "rescale")) == 16
    (stream,) = groups(sym, "tok", "scale")
    assert {f"{A}.o_proj.bias", "blocks.0.mlp.down_proj.bias"} <= {p[0] for p in stream.parts}
    df = holds(m, sym, x, y)
    assert set(df[(df.layer == f"{A}.k_proj") & (df.symmetry == "translation")].status) == {"no gradient"}


@pytest.mark.parametrize("attention", ["sdpa", "manual"])
def test_gpt_rotary_pairs_and_grouped_query_attention(attention):
    m = build(pos="rope", kv_heads=1, attention=attention)
    x, y = ids()
    sym = nm.find_symmetries(m, x, class_axis=-1)
    qk = groups(sym, f"{A}.q_proj", "rescale")
    # rotary pairs {r, r + d_h/2} on both sides; the one key head is read by both query heads
    assert len(qk) == D // 2
    g = qk[1]
    assert [p for p in g.parts if p[2] > 0] == [(f"{A}.q_proj.weight", (r,), 1) for r in (1, 3, 5, 7)]
    assert [p for p in g.parts if p[2] < 0] == [(f"{A}.k_proj.weight", (r,), -1) for r in (1, 3)]
    # v/o: v row r of the key/value head against o column r of every head reading it
    vo = groups(sym, f"{A}.v_proj", "rescale")
    assert len(vo) == D and vo[2].parts == ((f"{A}.v_proj.weight", (2,), 1), (f"{A}.o_proj.weight", (SL, 2), -1),
                                          (f"{A}.o_proj.weight", (SL, 6), -1))
    holds(m, sym, x, y)


def test_gpt_qk_norm_hand_written_rmsnorm():
    m = build(norm="rms_hand", pos="rope", qk_norm=True)
    x, y = ids()
    sym = nm.find_symmetries(m, x, class_axis=-1)
    # no q/k rescale; the q rows of one head are a scale group, likewise k
    heads = groups(sym, f"{A}.q_proj", "scale")
    assert len(heads) == H and [p[1] for p in heads[1].parts] == [(r,) for r in range(D, 2 * D)]
    assert len(groups(sym, f"{A}.k_proj", "scale")) == H
    assert not groups(sym, f"{A}.q_proj", "rescale")
    # q-norm gain j against k-norm gain j (with rotary positions: the pair {j, j + d_h/2})
    gains = groups(sym, f"{A}.q_norm", "rescale")
    assert len(gains) == D // 2
    assert gains[0].parts == ((f"{A}.q_norm.weight", (0,), 1), (f"{A}.q_norm.weight", (2,), 1),
                              (f"{A}.k_norm.weight", (0,), -1), (f"{A}.k_norm.weight", (2,), -1))
    # the hand-written RMSNorm counts as a norm: its gain against q, k, v's columns
    assert len(groups(sym, "blocks.0.attn_norm", "rescale")) == E
    holds(m, sym, x, y)


@pytest.mark.parametrize("norm", ["layer", "rms"])
def test_gpt_tied_head(norm):
    m = build(norm=norm, tied=True, bias=True)
    x, y = ids()
    sym = nm.find_symmetries(m, x, class_axis=-1)
    # the final norm's gain against the tied head's columns is never claimed (a note says why)
    assert not groups(sym, "norm", "rescale")
    assert any(n.startswith("norm:") and "tied" in n for n in sym.notes)
    # no row translations and no column translation of the head: its weight is the table
    assert not [g for g in groups(sym, "tok", "translation") if g.label.startswith("row")]
    assert not [g for g in sym if g.layer == "head" and g.symmetry == "translation" and "weight" in g.parts[0][0]]
    # the signed token/position translation holds tied or not
    signed = [g for g in groups(sym, "tok", "translation") if "against" in g.label]
    assert len(signed) == E
    # the stream: tied, the table scales only against the final norm (its gain moves inversely)
    (stream,) = groups(sym, "tok", "rescale")
    assert {p[0] for p in stream.outgoing} == {"norm.weight"} | ({"norm.bias"} if norm == "layer" else set())
    if norm == "layer":
        assert any(g.parts == (("tok.weight", (SL,), 1),) for g in groups(sym, "tok", "translation"))
    holds(m, sym, x, y)


def test_class_axis_of_sequence_logits():
    m = build(bias=True)
    x, y = ids()
    wrong = nm.find_symmetries(m, x)  # class axis 1 (the time axis of (B, T, V) logits)
    right = nm.find_symmetries(m, x, class_axis=-1)
    per_entry = [g for g in wrong if g.layer == "head" and g.label.startswith("bias ")]
    assert len(per_entry) == 12  # each bias entry "translates" along the time axis: false
    df = nm.verify(m, lm_loss, (x, y), symmetries=nm.Symmetries(per_entry))
    assert (df.status == "violated").all()
    (whole,) = [g for g in right if g.layer == "head" and g.label == "bias"]
    assert whole.parts == (("head.bias", (SL,), 1),)
    holds(m, right, x, y)
    df = nm.verify(m, lm_loss, (x, y), class_axis=-1)  # discovery inside verify, same axis
    assert len(df) == len(right) and set(df.status) <= {"ok", "no gradient"}
    with pytest.raises(InvalidArgumentError):
        nm.find_symmetries(m, x, class_axis="last")


def test_model_returning_a_mapping_is_read_through_its_logits():
    class Wrapped(nn.Module):
        def __init__(self):
            super().__init__()
            self.gpt = build()

        def forward(self, idx):
            return {"hidden": idx.double(), "logits": self.gpt(idx)}

    x, _ = ids()
    assert len(nm.find_symmetries(Wrapped(), x, class_axis=-1)) == len(nm.find_symmetries(build(), x, class_axis=-1))


# -- nn.MultiheadAttention and nn.TransformerEncoderLayer ----------------------------------------
class MHA(nn.Module):
    def __init__(self, mode="self", need_weights=False, **kw):
        super().__init__()
        self.mode, self.need = mode, need_weights
        kd, vd = kw.get("kdim", E), kw.get("vdim", E)
        self.q, self.k, self.v = nn.Linear(3, E), nn.Linear(3, kd), nn.Linear(3, vd)
        self.attn = nn.MultiheadAttention(E, H, batch_first=True, **kw)
        self.head = nn.Linear(E, 3)

    def forward(self, x):
        q = self.q(x)
        k, v = (q, q) if self.mode == "self" else (self.k(x), self.k(x)) if self.mode == "kv" else (self.k(x), self.v(x))
        if self.mode == "kv":
            v = k
        return self.head(self.attn(q, k, v, need_weights=self.need)[0].mean(1))


def mha_data():
    g = torch.Generator().manual_seed(2)
    return torch.randn(4, 5, 3, generator=g, dtype=torch.float64), torch.randint(0, 3, (4,), generator=g)


@pytest.mark.parametrize("need_weights", [False, True])
@pytest.mark.parametrize("bias", [True, False])
def test_multihead_attention_packed(need_weights, bias):
    torch.manual_seed(0)
    m = MHA("self", need_weights, bias=bias).double()
    x, y = mha_data()
    sym = nm.find_symmetries(m, x)
    W, B = "attn.in_proj_weight", "attn.in_proj_bias"
    rs = groups(sym, "attn.in_proj", "rescale")
    assert len(rs) == 2 * E
    qk = group(sym, "attn.in_proj", "rescale", 3)
    want = [(W, (3,), 1)] + ([(B, (3,), 1)] if bias else []) + [(W, (E + 3,), -1)] + ([(B, (E + 3,), -1)] if bias else [])
    assert list(qk.parts) == want
    vo = group(sym, "attn.in_proj", "rescale", 2 * E + 1)
    assert vo.parts[-1] == ("attn.out_proj.weight", (SL, 1), -1)
    kb = groups(sym, "attn.in_proj", "translation")
    assert [g.parts for g in kb] == ([((B, (E + r,), 1),) for r in range(E)] if bias else [])
    # out_proj is an ordinary Linear: its rows against the head's columns (through the mean)
    assert len(groups(sym, "attn.out_proj", "rescale")) == E
    holds(m, sym, x, y, loss=F.cross_entropy)


@pytest.mark.parametrize("mode,kw", [("kv", {}), ("sep", {}), ("sep", {"kdim": 6, "vdim": 5})],
                         ids=["cross-kv", "separate", "kdim-vdim"])
def test_multihead_attention_split_and_separate_projections(mode, kw):
    torch.manual_seed(0)
    m = MHA(mode, **kw).double()
    x, y = mha_data()
    sym = nm.find_symmetries(m, x)
    qk = [g for g in sym if g.symmetry == "rescale" and g.layer in ("attn.in_proj", "attn.q_proj") and g.index < E]
    vo = [g for g in sym if g.symmetry == "rescale" and any(p[0] == "attn.out_proj.weight" and p[2] < 0 for p in g.parts)]
    kb = [g for g in sym if g.symmetry == "translation" and g.parts[0][0] == "attn.in_proj_bias"]
    assert len(qk) == E and len(vo) == E and len(kb) == E
    if kw:
        assert qk[0].parts[0] == ("attn.q_proj_weight", (0,), 1) and qk[0].parts[2] == ("attn.k_proj_weight", (0,), -1)
    holds(m, sym, x, y, loss=F.cross_entropy)


@pytest.mark.parametrize("kw", [{"add_bias_kv": True}, {"add_zero_attn": True}])
def test_multihead_attention_extra_key_removes_the_key_bias_translation(kw):
    torch.manual_seed(0)
    m = MHA("self", **kw).double()
    x, y = mha_data()
    sym = nm.find_symmetries(m, x)
    assert not [g for g in sym if g.symmetry == "translation" and g.parts[0][0] == "attn.in_proj_bias"]
    if "add_zero_attn" in kw:  # a zero key and value scale with anything: q/k and v/o stay
        assert len(groups(sym, "attn.in_proj", "rescale")) == 2 * E
    holds(m, sym, x, y, loss=F.cross_entropy)


class Encoder(nn.Module):
    def __init__(self, **kw):
        super().__init__()
        self.emb = nn.Linear(3, E)
        self.enc = nn.TransformerEncoderLayer(E, H, 16, dropout=0.0, batch_first=True, **kw)
        self.head = nn.Linear(E, 3)

    def forward(self, x):
        return self.head(self.enc(self.emb(x)).mean(1))


@pytest.mark.parametrize("kw", [{}, {"activation": "gelu"}, {"norm_first": True}], ids=["post-relu", "post-gelu", "pre"])
def test_transformer_encoder_layer(kw):
    torch.manual_seed(0)
    m = Encoder(**kw).double()
    for mod in m.modules():
        if isinstance(mod, nn.LayerNorm):
            mod.eps = 1e-12
    x, y = mha_data()
    sym = nm.find_symmetries(m, x)
    if not kw.get("norm_first"):
        # post-LN: norm1's gain and bias, linear2's weight and bias (+1) against linear1's weight
        (rs,) = groups(sym, "enc.norm1", "rescale")
        assert {(p[0], p[2]) for p in rs.parts} == {("enc.norm1.weight", 1), ("enc.norm1.bias", 1), ("enc.linear2.weight", 1),
                                                   ("enc.linear2.bias", 1), ("enc.linear1.weight", -1)}
        scale = groups(sym, "enc.norm1", "scale")
        if "activation" in kw:
            assert not scale  # GELU is not homogeneous
            assert not groups(sym, "enc.linear1", "rescale")
        else:  # ReLU: norm1 (gain, bias), linear1's bias, linear2's bias, all ×α
            (sc,) = scale
            assert {p[0] for p in sc.parts} == {"enc.norm1.weight", "enc.norm1.bias", "enc.linear1.bias", "enc.linear2.bias"}
            assert len(groups(sym, "enc.linear1", "rescale")) == 16
    else:
        assert len(groups(sym, "enc.norm1", "rescale")) == E and len(groups(sym, "enc.norm2", "rescale")) == E
    assert len(groups(sym, "enc.self_attn.in_proj", "rescale")) == 2 * E
    holds(m, sym, x, y, loss=F.cross_entropy)


# -- Hugging Face models (built from tiny configs; nothing is downloaded) -------------------------
def _transformers():
    transformers = pytest.importorskip("transformers")
    transformers.logging.set_verbosity_error()
    return transformers


def hf_loss(out, y):
    return lm_loss(out.logits, y)


@pytest.mark.parametrize("tied", [True, False])
@pytest.mark.parametrize("attn", ["eager", "sdpa"])
def test_hf_gpt2_conv1d(tied, attn):
    tf = _transformers()
    torch.manual_seed(0)
    cfg = tf.GPT2Config(vocab_size=12, n_positions=8, n_embd=E, n_layer=1, n_head=H, resid_pdrop=0.0, embd_pdrop=0.0,
                        attn_pdrop=0.0, bos_token_id=0, eos_token_id=0, tie_word_embeddings=tied, attn_implementation=attn)
    m = tf.GPT2LMHeadModel(cfg).double()
    x, y = ids()
    sym = nm.find_symmetries(m, x, class_axis=-1)
    h = "transformer.h.0"
    W, B = f"{h}.attn.c_attn.weight", f"{h}.attn.c_attn.bias"
    # Conv1D stores (in, out): unit i is the column W[:, i], its input j the row W[j]
    assert group(sym, f"{h}.ln_1", "rescale", 3).parts == ((f"{h}.ln_1.weight", (3,), 1), (f"{h}.ln_1.bias", (3,), 1),
                                                          (W, (3,), -1))
    assert group(sym, f"{h}.attn.c_attn", "rescale", 1).parts == ((W, (SL, 1), 1), (B, (1,), 1), (W, (SL, E + 1), -1),
                                                                 (B, (E + 1,), -1))
    assert group(sym, f"{h}.attn.c_attn", "rescale", 2 * E + 5).parts[-1] == (f"{h}.attn.c_proj.weight", (5,), -1)
    assert [g.parts for g in groups(sym, f"{h}.attn.c_attn", "translation")] == [((B, (E + r,), 1),) for r in range(E)]
    assert group(sym, f"{h}.attn.c_proj", "translation", 2).parts == ((f"{h}.attn.c_proj.weight", (2,), 1),)
    if tied:
        assert not groups(sym, "transformer.ln_f", "rescale")
        assert any(n.startswith("transformer.ln_f:") and "tied" in n for n in sym.notes)
    else:
        assert len(groups(sym, "transformer.ln_f", "rescale")) == E and len(groups(sym, "lm_head", "translation")) == E
        (stream,) = groups(sym, "transformer.wte", "scale")
        assert len(stream.parts) == 6  # wte, wpe, both c_proj weights and biases
    holds(m, sym, x, y, loss=hf_loss)


@pytest.mark.parametrize("pad", [None, 0])
def test_hf_llama(pad):
    tf = _transformers()
    torch.manual_seed(0)
    cfg = tf.LlamaConfig(vocab_size=12, hidden_size=E, intermediate_size=12, num_hidden_layers=1, num_attention_heads=H,
                         num_key_value_heads=1, max_position_embeddings=8, rms_norm_eps=1e-12, bos_token_id=0,
                         eos_token_id=0, pad_token_id=pad, attn_implementation="sdpa")
    m = tf.LlamaForCausalLM(cfg).double()
    x, y = ids()
    sym = nm.find_symmetries(m, x, class_axis=-1)
    a = "model.layers.0.self_attn"
    assert len(groups(sym, f"{a}.q_proj", "rescale")) == D // 2  # rotary pairs, grouped-query
    assert len(groups(sym, f"{a}.v_proj", "rescale")) == D
    assert len(groups(sym, "model.layers.0.input_layernorm", "rescale")) == E  # the hand-written RMSNorm
    assert len(groups(sym, "model.layers.0.mlp.up_proj", "rescale")) == 12
    stream = groups(sym, "model.embed_tokens", "scale")
    if pad is None:
        assert len(stream) == 1
    else:  # the padding row gets no gradient: nothing that moves the table is conserved
        assert not stream and "padding_idx" in sym.skipped["model.embed_tokens.weight"]
    holds(m, sym, x, y, loss=hf_loss)


# -- declaring signed translations ---------------------------------------------------------------
def test_signed_translation_declare_and_verify():
    m = build(attention="manual")  # double backward (hessian=True) through hand-written attention
    x, y = ids()
    good = [nm.SymmetryGroup("translation", "mine", j, f"tok {j} - pos {j}",
                             [("tok.weight", (SL, j), 1), ("pos.weight", (SL, j), -1)]) for j in range(E)]
    unsigned = [nm.SymmetryGroup("translation", "mine", j, "tok + pos", [("tok.weight", (SL, j), 1), ("pos.weight", (SL, j), 1)])
                for j in range(E)]
    df = nm.verify(m, lm_loss, (x, y), symmetries=nm.declare(m, good), hessian=True)
    assert (df.status == "ok").all() and df.hessian_residual.max() < 1e-10
    assert (nm.verify(m, lm_loss, (x, y), symmetries=nm.declare(m, unsigned)).status == "violated").all()
    with pytest.raises(InvalidArgumentError):  # a scale group has no -1 side
        nm.declare(m, [nm.SymmetryGroup("scale", "x", 0, "bad", [("tok.weight", (0,), 1), ("pos.weight", (0,), -1)])])
    with pytest.raises(InvalidArgumentError):  # a translation needs a +1 part
        nm.declare(m, [nm.SymmetryGroup("translation", "x", 0, "bad", [("tok.weight", (0,), -1)])])
