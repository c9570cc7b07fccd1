"""A brute-force float64 oracle for the transformer symmetries (docs/theory.md §2b, §3).

It knows nothing of the architectures beyond their parameter shapes:

- **claims hold**: every group find_symmetries claims is applied as a finite transformation
  (scale α = 1.3 with each part's sign, shift 0.3) and every token's loss must not move; its
  gradient constraint (docs/theory.md §3) must hold on every batch;
- **nothing is missed**: for random parameters and batches, every token's loss gradient g gives
  one linear constraint on the diagonal generators v of a symmetry: Σ v_e θ_e g_e = 0 (scale,
  rescale) or Σ v_e g_e = 0 (translation), which must hold at every θ. The null space of those
  rows (entries whose gradient is always zero left out) is every such symmetry there is; it must
  equal the span of the claims;
- **candidates from shapes**: rows, columns, column blocks, whole tensors, and pairs of them
  across tensors with both signs (a row of one tensor against the same column of another for
  rescale) are judged by the same rows; every candidate the rows accept must lie in the claims'
  span and verify must find it true; verify must call the rejected ones violated, and a finite
  transformation moves the loss for them.

Models: nn.MultiheadAttention with and without bias, nn.TransformerEncoderLayer (post-/pre-LN,
ReLU/GELU), the hand-written GPT of tests/gpt_blocks.py (RMSNorm/LayerNorm, tied/untied, QK-norm,
RoPE, GQA, (B, T, V) logits), Hugging Face GPT-2 and Llama from tiny configs, torchvision's
VisionTransformer. The measured extremes are printed (``pytest -s``).
"""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F
from gpt_blocks import GPT, GPTConfig

import neural_mechanics as nm

ALPHA, SHIFT = 1.3, 0.3
NULL_REL = 1e-9  # singular values below this fraction of the largest span the null space
FINITE_TOL = 1e-11  # relative change of the token losses under a true group's transformation
GRAD_TOL = 1e-9  # normalised gradient residual of a true group
MEASURED: dict[str, dict[str, float]] = {}


@pytest.fixture(autouse=True)
def one_thread():
    """Many tiny backward passes and small SVDs: one thread is fastest (and immune to a busy machine)."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


# -- models -------------------------------------------------------------------------------------
class MHAModel(nn.Module):
    def __init__(self, bias: bool = True, **kw):
        super().__init__()
        self.emb = nn.Linear(3, 4)
        self.attn = nn.MultiheadAttention(4, 2, batch_first=True, bias=bias, **kw)
        self.head = nn.Linear(4, 3)

    def forward(self, x):
        h = self.emb(x)
        return self.head(self.attn(h, h, h, need_weights=False)[0].mean(1))


class EncoderModel(nn.Module):
    def __init__(self, **kw):
        super().__init__()
        self.emb = nn.Linear(3, 4)
        self.enc = nn.TransformerEncoderLayer(4, 2, 6, dropout=0.0, batch_first=True, **kw)
        self.head = nn.Linear(4, 3)

    def forward(self, x):
        return self.head(self.enc(self.emb(x)).mean(1))


def _hf_quiet():
    import transformers

    transformers.logging.set_verbosity_error()
    return transformers


def hf_gpt2(tied: bool = True):
    transformers = _hf_quiet()
    cfg = transformers.GPT2Config(vocab_size=6, n_positions=4, n_embd=4, n_layer=1, n_head=2, n_inner=6,
                                  resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0, layer_norm_epsilon=1e-12,
                                  bos_token_id=0, eos_token_id=0, tie_word_embeddings=tied,
                                  attn_implementation="eager")
    return transformers.GPT2LMHeadModel(cfg)


def hf_llama():
    transformers = _hf_quiet()
    cfg = transformers.LlamaConfig(vocab_size=6, hidden_size=4, intermediate_size=6, num_hidden_layers=1,
                                   num_attention_heads=2, num_key_value_heads=1, max_position_embeddings=8,
                                   rms_norm_eps=1e-12, bos_token_id=0, eos_token_id=0, pad_token_id=0,
                                   attn_implementation="sdpa")
    return transformers.LlamaForCausalLM(cfg)


def vit():
    import torchvision

    # two layers: with one, the patch tokens of the last layer are never read (the head takes the
    # class token) and scaling the patch embedding alone is a symmetry the analysis does not model
    return torchvision.models.VisionTransformer(image_size=4, patch_size=2, num_layers=2, num_heads=2, hidden_dim=4,
                                                mlp_dim=4, num_classes=3)


def gpt(**kw):
    return GPT(GPTConfig(vocab=6, width=4, hidden=6, max_len=4, **kw))


# -- the oracle ---------------------------------------------------------------------------------
def logits_of(out):
    return out.logits if hasattr(out, "logits") else out


def token_losses(out, y):
    lg = logits_of(out)
    if lg.dim() == 3:
        return F.cross_entropy(lg.reshape(-1, lg.shape[-1]), y.reshape(-1), reduction="none")
    return F.cross_entropy(lg, y, reduction="none")


def total_loss(out, y):
    return token_losses(out, y).mean()


def randomise(model, gen):
    with torch.no_grad():
        for p in model.parameters():
            p.copy_(torch.randn(p.shape, generator=gen, dtype=p.dtype) * 0.5)


def prepare(model):
    model = model.double().eval()
    for m in model.modules():
        for attr in ("eps", "variance_epsilon"):
            if isinstance(getattr(m, attr, None), float):
                setattr(m, attr, 1e-12)  # epsilon breaks scale groups by ~eps/var: keep it below the tolerances
    return model


class Entries:
    """Flat entry ids of every parameter, the *atoms* (what a part can single out: an entry of a
    1-d or 2-d tensor, an (i, j) slice of a tensor with more axes, e.g. a conv kernel or one
    token row of a (1, S, E) position table), and a group's signed generator over the atoms."""

    def __init__(self, params):
        self.names = list(params)
        self.offset, self.shape = {}, {}
        atom, first = [], []
        off = 0
        for n, p in params.items():
            self.offset[n], self.shape[n] = off, tuple(p.shape)
            lead = math.prod(p.shape[:2])
            per = p.numel() // max(lead, 1)
            base = len(first)
            atom.append(torch.arange(lead).repeat_interleave(per) + base)
            first += [off + k * per for k in range(lead)]
            off += p.numel()
        self.n = off
        self.atom = torch.cat(atom)
        self.first = torch.tensor(first)
        self.n_atoms = len(first)

    def ids(self, name, index):
        return torch.arange(math.prod(self.shape[name])).reshape(self.shape[name])[index].flatten() + self.offset[name]

    def vector(self, parts):
        """The generator over atoms (every part is a union of atoms)."""
        v = torch.zeros(self.n, dtype=torch.float64)
        for name, index, sign in parts:
            v[self.ids(name, index)] += sign
        return v[self.first]

    def atoms(self, M):
        """Rows over entries -> rows over atoms (a generator constant on each atom)."""
        return torch.zeros(M.shape[0], self.n_atoms, dtype=M.dtype).index_add_(1, self.atom, M)


def gradient_rows(model, batches, gen, samples):
    """Per-token loss gradients at ``samples`` random parameter draws: (g rows, θ∘g rows)."""
    plist = list(model.parameters())
    rows_g, rows_s = [], []
    for s in range(samples):
        randomise(model, gen)
        x, y = batches[s % len(batches)]
        losses = token_losses(model(x), y)
        theta = torch.cat([p.detach().reshape(-1) for p in plist])
        for i in range(losses.numel()):
            gs = torch.autograd.grad(losses[i], plist, retain_graph=i + 1 < losses.numel(), allow_unused=True)
            g = torch.cat([(torch.zeros_like(p) if gr is None else gr).reshape(-1) for p, gr in zip(plist, gs)])
            rows_g.append(g)
            rows_s.append(g * theta)
    return torch.stack(rows_g), torch.stack(rows_s)


def null_space(M):
    """Orthonormal basis of the null space of M over its non-zero columns (columns normalised)."""
    nz = (M.abs() > 1e-13 * M.abs().max()).any(0)
    Mr = M[:, nz]
    Mr = Mr / Mr.norm(dim=0, keepdim=True)
    R = torch.linalg.qr(Mr, mode="r").R if Mr.shape[0] > Mr.shape[1] else Mr
    _, S, Vh = torch.linalg.svd(R)
    if S.numel() < nz.sum():
        S = torch.cat([S, torch.zeros(int(nz.sum()) - S.numel(), dtype=S.dtype)])
    null = Vh[S <= NULL_REL * S[0]]
    gap = float(S[S > NULL_REL * S[0]].min() / S[0])
    return nz, Mr, null, gap


def in_span(Q, V):
    """Largest distance of the rows of V from the row space spanned by Q's rows."""
    if V.numel() == 0:
        return 0.0
    if Q.numel() == 0:
        return float(V.norm(dim=1).max())
    U, S, Vh = torch.linalg.svd(Q, full_matrices=False)
    basis = Vh[S > 1e-10 * S[0]]
    return float((V - (V @ basis.T) @ basis).norm(dim=1).max())


def apply_group(model, g, factor: float):
    """Transform the parameters in place by ``g`` (scale/rescale: α^sign per part; translation:
    + sign·shift); returns the saved copies."""
    params = dict(model.named_parameters())
    saved = {n: params[n].detach().clone() for n in {p[0] for p in g.parts}}
    with torch.no_grad():
        for name, index, sign in g.parts:
            if g.symmetry == "translation":
                params[name][index] += sign * factor
            else:
                params[name][index] *= factor ** sign
    return saved


def finite_change(model, g, batches):
    """Largest relative change of any token's loss when ``g`` is applied."""
    params = dict(model.named_parameters())
    with torch.no_grad():
        before = [token_losses(model(x), y) for x, y in batches]
        saved = apply_group(model, g, SHIFT if g.symmetry == "translation" else ALPHA)
        after = [token_losses(model(x), y) for x, y in batches]
        for n, t in saved.items():
            params[n].copy_(t)
    return max(float((a - b).abs().max() / b.abs().max()) for a, b in zip(after, before))


def candidates(params):
    """Groups built from shapes alone: rows, columns, column blocks, whole tensors, and pairs of
    them across tensors with both signs (a row against the same column for rescale)."""
    out = []
    names = list(params)
    for n in names:
        p = params[n]
        out.append(("scale", [(n, (slice(None),), 1)]))
        out.append(("translation", [(n, (slice(None),), 1)]))
        for i in range(p.shape[0]):
            out += [("scale", [(n, (i,), 1)]), ("translation", [(n, (i,), 1)])]
        if p.dim() >= 2:
            c = p.shape[1]
            for j in range(c):
                out += [("scale", [(n, (slice(None), j), 1)]), ("translation", [(n, (slice(None), j), 1)])]
            for b in (b for b in range(2, c) if c % b == 0):
                out += [("scale", [(n, (slice(None), slice(j * b, (j + 1) * b)), 1)]) for j in range(c // b)]
    for a in names:
        for b in names:
            if a >= b:
                continue
            pa, pb = params[a], params[b]
            for s in (1, -1):
                if pa.shape[0] == pb.shape[0]:
                    for i in range(pa.shape[0]):
                        kind = "translation"
                        out.append((kind, [(a, (i,), 1), (b, (i,), s)]))
                        out.append(("rescale" if s < 0 else "scale", [(a, (i,), 1), (b, (i,), s)]))
                if pa.dim() >= 2 and pb.dim() >= 2 and pa.shape[1] == pb.shape[1]:
                    for j in range(pa.shape[1]):
                        out.append(("translation", [(a, (slice(None), j), 1), (b, (slice(None), j), s)]))
        for b in names:
            if a == b or params[b].dim() < 2:
                continue
            for i in range(min(params[a].shape[0], params[b].shape[1])):
                out.append(("rescale", [(a, (i,), 1), (b, (slice(None), i), -1)]))
    return out


def check(name, model, make_batch, *, class_axis=1, samples=None):
    """Run the oracle on ``model`` (returns the claims)."""
    torch.manual_seed(0)
    model = prepare(model)
    gen = torch.Generator().manual_seed(1)
    batches = [make_batch(gen) for _ in range(3)]
    sym = nm.find_symmetries(model, batches[0][0], class_axis=class_axis)
    params = dict(model.named_parameters())
    E = Entries(params)
    randomise(model, gen)
    stats: dict[str, float] = {}
    # 1. every claim holds, by finite transformation and by its gradient constraint
    df = nm.verify(model, total_loss, batches[0], symmetries=sym, tol=GRAD_TOL)
    assert set(df.status) <= {"ok", "no gradient"}, df[~df.status.isin(["ok", "no gradient"])].to_string()
    changes = [finite_change(model, g, batches[:2]) for g in sym]
    stats["claims"] = len(sym)
    stats["max_finite_change"] = max(changes)
    stats["max_grad_residual"] = float(df.residual.max())
    assert max(changes) <= FINITE_TOL, [(g.layer, g.label, c) for g, c in zip(sym, changes) if c > FINITE_TOL][:5]
    # 2. the null spaces of the gradient rows are spanned by the claims
    tokens = token_losses(model(batches[0][0]), batches[0][1]).numel()
    samples = samples or max(6, int(1.25 * E.n_atoms / tokens) + 2)
    G, S = gradient_rows(model, batches, gen, samples)
    G, S = E.atoms(G), E.atoms(S)
    rejected_min = math.inf
    for kind, M in (("translation", G), ("scale", S)):
        nz, Mr, null, gap = null_space(M)
        claims = [g for g in sym if (g.symmetry == "translation") == (kind == "translation")]
        C = torch.stack([E.vector(g.parts) for g in claims])[:, nz] if claims else torch.zeros(0, int(nz.sum()))
        cn = M[:, nz].norm(dim=0)
        C = C * cn  # the generator in the normalised columns' coordinates
        C_all = C
        missing = in_span(C_all, null)
        stats[f"{kind}_null_dim"] = null.shape[0]
        stats[f"{kind}_gap"] = gap
        stats[f"{kind}_unspanned"] = missing
        assert missing <= 1e-6, f"{name}: {kind} symmetries not claimed (distance {missing:.2e})"
        if len(C):
            res = (Mr @ C.T).abs().max(0).values / ((Mr.abs() @ C.T.abs()).max(0).values + 1e-300)
            stats[f"{kind}_claims_row_residual"] = float(res.max())
        # 3. candidates from shapes, judged by the rows
        cands = [(k, parts) for k, parts in candidates(params) if (k == "translation") == (kind == "translation")]
        V = torch.stack([E.vector(p) for _, p in cands])[:, nz] * cn
        keep = V.abs().sum(1) > 0
        V, cands = V[keep], [c for c, k in zip(cands, keep.tolist()) if k]
        res = (Mr @ V.T).abs().max(0).values / ((Mr.abs() @ V.T.abs()).max(0).values + 1e-300)
        ok = res <= GRAD_TOL
        if ok.any():
            assert in_span(C_all, V[ok] / V[ok].norm(dim=1, keepdim=True)) <= 1e-6, f"{name}: a shape candidate true but unclaimed"
        rejected = res[~ok]
        if len(rejected):
            rejected_min = min(rejected_min, float(rejected.min()))
        # verify agrees on both sides (candidates as declared groups), at three parameter draws:
        # the accepted ones hold at every draw; every rejected one is violated at some draw (at one
        # draw a rejected candidate can hold by accident, on units that are dead on the batch)
        declared = nm.Symmetries([nm.SymmetryGroup(k, f"candidate{i}", 0, "candidate", parts)
                                  for i, (k, parts) in enumerate(cands)])
        strong = (~ok & (res > 1e-5)).numpy()
        refuted = torch.zeros(len(cands), dtype=torch.bool).numpy()
        judged = refuted.copy()
        for draw in range(3):
            if draw:
                randomise(model, gen)
            vdf = nm.verify(model, total_loss, batches[draw], symmetries=declared, tol=1e-7)
            good = vdf[ok.numpy()]
            assert set(good.status) <= {"ok", "no gradient"}, good[~good.status.isin(["ok", "no gradient"])].head().to_string()
            refuted |= (vdf.status == "violated").to_numpy()
            judged |= (vdf.status != "no gradient").to_numpy()
        never = strong & judged & ~refuted
        assert not never.any(), f"{name}: verify never refutes " + str([(cands[i], float(res[i])) for i in never.nonzero()[0][:4]])
        # finite transformations of a sample of rejected candidates move the loss (at one of two
        # parameter draws: at one draw a candidate may touch only dead units)
        picks = [i for i in torch.nonzero(~ok).flatten().tolist() if res[i] > 1e-5][:: max(1, int((~ok).sum()) // 20)]
        moved = [finite_change(model, declared[i], batches[:1]) for i in picks]
        randomise(model, gen)
        moved = [max(m, finite_change(model, declared[i], batches[1:2])) for m, i in zip(moved, picks)]
        if moved:
            stats[f"{kind}_rejected_min_finite_change"] = min(moved)
    stats["rejected_min_row_residual"] = rejected_min
    MEASURED[name] = stats
    print(f"\n{name}: " + ", ".join(f"{k}={v:.3g}" if isinstance(v, float) else f"{k}={v}" for k, v in stats.items()))
    return sym


def tokens(vocab=6, T=4, B=4):
    return lambda gen: (torch.randint(0, vocab, (B, T), generator=gen), torch.randint(0, vocab, (B, T), generator=gen))


def vectors(B=4, T=3, d=3, classes=3):
    return lambda gen: (torch.randn(B, T, d, generator=gen, dtype=torch.float64), torch.randint(0, classes, (B,), generator=gen))


def kinds(sym, layer_part=""):
    out: dict[str, int] = {}
    for g in sym:
        if layer_part in g.layer:
            out[g.symmetry] = out.get(g.symmetry, 0) + 1
    return out


# -- the models ---------------------------------------------------------------------------------
@pytest.mark.parametrize("bias", [True, False])
def test_oracle_multihead_attention(bias):
    sym = check(f"MHA bias={bias}", MHAModel(bias=bias), vectors())
    qk = [g for g in sym if g.layer == "attn.in_proj" and g.symmetry == "rescale"]
    assert len(qk) == 8  # 4 q/k pairs and 4 v/o pairs
    assert len([g for g in sym if g.layer == "attn.in_proj" and g.symmetry == "translation"]) == (4 if bias else 0)


@pytest.mark.parametrize("kw", [dict(), dict(activation="gelu"), dict(norm_first=True)], ids=["post-relu", "post-gelu", "pre-relu"])
def test_oracle_transformer_encoder_layer(kw):
    sym = check(f"TransformerEncoderLayer {kw}", EncoderModel(**kw), vectors())
    norm1 = {g.symmetry for g in sym if g.layer == "enc.norm1"}
    if not kw:
        assert norm1 == {"rescale", "scale"}  # the post-LN stream's rescale and scale
    elif "activation" in kw:
        assert norm1 == {"rescale"}


@pytest.mark.parametrize("kw", [
    dict(norm="rms", pos="learned", mlp="gated"),
    dict(norm="layer", pos="learned", mlp="relu", bias=True),
    dict(norm="rms_hand", pos="rope", qk_norm=True, kv_heads=1, attention="manual"),
    dict(norm="layer", pos="learned", tied=True, bias=True, attention="manual"),
    dict(norm="rms", pos="rope", kv_heads=1, tied=True, mlp="gelu"),
], ids=["rms-learned-gated", "ln-relu-bias", "rope-qknorm-gqa-hand", "ln-tied-bias", "rope-gqa-tied"])
def test_oracle_hand_gpt(kw):
    check(f"GPT {kw}", gpt(**kw), tokens(), class_axis=-1)


def test_oracle_hf_gpt2():
    pytest.importorskip("transformers")
    check("HF GPT-2 (tied)", hf_gpt2(), tokens(), class_axis=-1)


def test_oracle_hf_llama():
    pytest.importorskip("transformers")
    check("HF Llama (GQA, RoPE)", hf_llama(), tokens(), class_axis=-1)


def test_oracle_vision_transformer():
    check("torchvision ViT", vit(), lambda gen: (torch.randn(4, 3, 4, 4, generator=gen, dtype=torch.float64),
                                                torch.randint(0, 3, (4,), generator=gen)))
