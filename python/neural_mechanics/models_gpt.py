"""The demo's transformer: a small character-level GPT, its two recipes, and its training.

``CharGPT`` is a pre-norm decoder (docs/theory.md §2b): token table → blocks of
[RMSNorm → causal self-attention (rotary or learned positions, optional grouped-query) → add,
RMSNorm → gated (SwiGLU) MLP → add] → final RMSNorm → untied LM head. Token ids (B, T) give
logits (B, T, V), so discovery and tracking read the classes on the last axis
(``track(..., class_axis=-1)``). Every attention-era symmetry of docs/theory.md §2b that such a
model has is found by ``find_symmetries`` (tests/test_gpt_demo.py checks each pattern):

- Q/K rescale per head dimension (rotary: per pair of dimensions {r, r + d_h/2});
- V/O rescale per head dimension (a value row against the output projection's column);
- norm gain j against column j of every Linear reading the normalised stream (q, k, v together;
  gate and up together; the final norm against the LM head);
- the gated MLP's up row i against the down column i (never the gate: SiLU is not homogeneous);
- the LM head's column translations (softmax over the vocabulary);
- the residual stream's scale group (every writer of the stream ×α), broken only by RMSNorm's ε.

``train_gpt(source, recipe)`` trains it on a ``data_sources.TextSource`` (Python's own
documentation by default) under one of two recipes: AdamW, the transformer's usual optimizer
(``exact`` is then bookkeeping of the measured update), and SGD with momentum (the exact ledger
and the paper's closed forms, docs/theory.md §5.2–5.3).
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn as nn
import torch.nn.functional as F

from .errors import InvalidArgumentError

POSITIONS = ("rope", "learned")


@dataclass(frozen=True)
class GPTConfig:
    """Shape of a :class:`CharGPT`. The defaults are sized for a few hundred steps a minute on
    two CPU cores: 2 layers of width 64 with 4 heads of 16, context 64."""

    vocab: int
    width: int = 64
    layers: int = 2
    heads: int = 4
    kv_heads: int | None = None  # None: one per query head; fewer: grouped-query attention
    hidden: int = 128  # the gated MLP's hidden width
    context: int = 64
    positions: str = "rope"  # "rope" (rotate-half rotary) or "learned" (a position table)
    eps: float = 1e-6  # RMSNorm's ε (it alone breaks the residual stream's scale symmetry)

    def __post_init__(self) -> None:
        if self.positions not in POSITIONS:
            raise InvalidArgumentError(f"positions must be one of {POSITIONS}, got {self.positions!r}")
        kv = self.kv_heads or self.heads
        if self.width % self.heads or self.heads % kv:
            raise InvalidArgumentError(f"width {self.width} must split into {self.heads} heads, and heads into {kv} key/value heads")
        if self.positions == "rope" and (self.width // self.heads) % 2:
            raise InvalidArgumentError(f"rotary positions need an even head width, got {self.width // self.heads}")
        if min(self.vocab, self.width, self.layers, self.hidden, self.context) < 1:
            raise InvalidArgumentError(f"every size must be positive: {self}")

    @property
    def head_width(self) -> int:
        return self.width // self.heads


def _rotate_half(x: torch.Tensor) -> torch.Tensor:
    half = x.shape[-1] // 2
    return torch.cat((-x[..., half:], x[..., :half]), dim=-1)


class Attention(nn.Module):
    """Causal self-attention: separate q/k/v/o projections without biases, rotary positions
    applied to q and k, ``F.scaled_dot_product_attention``."""

    def __init__(self, cfg: GPTConfig):
        super().__init__()
        self.heads, self.kv_heads, self.dh = cfg.heads, cfg.kv_heads or cfg.heads, cfg.head_width
        self.q_proj = nn.Linear(cfg.width, self.heads * self.dh, bias=False)
        self.k_proj = nn.Linear(cfg.width, self.kv_heads * self.dh, bias=False)
        self.v_proj = nn.Linear(cfg.width, self.kv_heads * self.dh, bias=False)
        self.o_proj = nn.Linear(self.heads * self.dh, cfg.width, bias=False)

    def forward(self, x: torch.Tensor, rotary: tuple[torch.Tensor, torch.Tensor] | None) -> torch.Tensor:
        B, T, _ = x.shape
        q = self.q_proj(x).view(B, T, self.heads, self.dh).transpose(1, 2)
        k = self.k_proj(x).view(B, T, self.kv_heads, self.dh).transpose(1, 2)
        v = self.v_proj(x).view(B, T, self.kv_heads, self.dh).transpose(1, 2)
        if rotary is not None:
            cos, sin = rotary
            q = q * cos + _rotate_half(q) * sin
            k = k * cos + _rotate_half(k) * sin
        y = F.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=self.kv_heads < self.heads)
        return self.o_proj(y.transpose(1, 2).reshape(B, T, self.heads * self.dh))


class GatedMLP(nn.Module):
    """SwiGLU: down(silu(gate(x)) · up(x)), no biases."""

    def __init__(self, cfg: GPTConfig):
        super().__init__()
        self.gate_proj = nn.Linear(cfg.width, cfg.hidden, bias=False)
        self.up_proj = nn.Linear(cfg.width, cfg.hidden, bias=False)
        self.down_proj = nn.Linear(cfg.hidden, cfg.width, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.down_proj(F.silu(self.gate_proj(x)) * self.up_proj(x))


class Block(nn.Module):
    """Pre-norm: x + attn(norm(x)), then x + mlp(norm(x))."""

    def __init__(self, cfg: GPTConfig):
        super().__init__()
        self.attn_norm = nn.RMSNorm(cfg.width, eps=cfg.eps)
        self.attn = Attention(cfg)
        self.mlp_norm = nn.RMSNorm(cfg.width, eps=cfg.eps)
        self.mlp = GatedMLP(cfg)

    def forward(self, x: torch.Tensor, rotary: tuple[torch.Tensor, torch.Tensor] | None) -> torch.Tensor:
        x = x + self.attn(self.attn_norm(x), rotary)
        return x + self.mlp(self.mlp_norm(x))


class CharGPT(nn.Module):
    """Token ids (B, T) → logits (B, T, vocab); see the module docstring."""

    def __init__(self, cfg: GPTConfig):
        super().__init__()
        self.cfg = cfg
        self.tok = nn.Embedding(cfg.vocab, cfg.width)
        if cfg.positions == "learned":
            self.pos = nn.Embedding(cfg.context, cfg.width)
        else:
            dh = cfg.head_width
            inv_freq = 1.0 / 10000 ** (torch.arange(0, dh, 2, dtype=torch.float32) / dh)
            self.register_buffer("inv_freq", inv_freq, persistent=False)
        self.blocks = nn.ModuleList(Block(cfg) for _ in range(cfg.layers))
        self.norm = nn.RMSNorm(cfg.width, eps=cfg.eps)
        self.head = nn.Linear(cfg.width, cfg.vocab, bias=False)

    def forward(self, idx: torch.Tensor) -> torch.Tensor:
        T = idx.shape[1]
        if T > self.cfg.context:
            raise InvalidArgumentError(f"sequence of {T} tokens is longer than the context ({self.cfg.context})")
        h = self.tok(idx)
        rotary = None
        if self.cfg.positions == "learned":
            h = h + self.pos(torch.arange(T, device=idx.device))
        else:
            inv_freq: torch.Tensor = self.inv_freq  # type: ignore[assignment]  # a buffer (nn.Module types it loosely)
            freqs = torch.outer(torch.arange(T, device=idx.device, dtype=torch.float32), inv_freq)
            angles = torch.cat((freqs, freqs), dim=-1)
            rotary = (angles.cos()[None, None].to(h.dtype), angles.sin()[None, None].to(h.dtype))
        for block in self.blocks:
            h = block(h, rotary)
        return self.head(self.norm(h))

    @torch.no_grad()
    def generate(self, prompt: torch.Tensor, length: int, *, temperature: float = 0.8, seed: int = 0) -> torch.Tensor:
        """``prompt`` (T,) continued by ``length`` sampled tokens (reproducible from ``seed``)."""
        gen = torch.Generator().manual_seed(seed)
        was_training = self.training
        self.eval()
        out = prompt.clone()
        for _ in range(length):
            logits = self(out[-self.cfg.context :][None])[0, -1]
            probs = torch.softmax(logits.double() / max(temperature, 1e-6), dim=-1)
            out = torch.cat([out, torch.multinomial(probs, 1, generator=gen)])
        self.train(was_training)
        return out


def lm_loss(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """Mean cross-entropy of (B, T, V) logits against (B, T) targets (nats per character)."""
    return F.cross_entropy(logits.reshape(-1, logits.shape[-1]), targets.reshape(-1))


def describe(cfg: GPTConfig, parameters: int) -> str:
    """The model in one sentence, as the report prints it."""
    kv = cfg.kv_heads or cfg.heads
    heads = f"{cfg.heads} heads of {cfg.head_width}" + (f" sharing {kv} key/value heads" if kv < cfg.heads else "")
    positions = "rotary positions" if cfg.positions == "rope" else "a learned position table"
    return (f"Model: a character-level GPT (`neural_mechanics.models_gpt.CharGPT`), {parameters:,} parameters: width {cfg.width}, "
            f"{cfg.layers} pre-norm blocks (RMSNorm ε {cfg.eps:g}), {heads}, {positions}, SwiGLU MLP of {cfg.hidden}, "
            f"untied LM head, context {cfg.context} characters, vocabulary {cfg.vocab}.")


# -- the two recipes ---------------------------------------------------------------------------
OPTIMIZERS = ("adamw", "sgd")


@dataclass
class GPTRecipe:
    """How the demo trains the GPT: one optimizer over every parameter (one param_group, so that
    every group's parts share their hyperparameters), random windows of the train text, the
    learning rate × ``lr_gamma`` after ``lr_step_at`` of the steps (as the digits recipe)."""

    optimizer: str = "adamw"  # "adamw" (torch.optim.AdamW) or "sgd" (torch.optim.SGD with momentum)
    steps: int = 400
    lr: float = 5e-3
    weight_decay: float = 0.1
    momentum: float = 0.9  # SGD only
    betas: tuple[float, float] = (0.9, 0.99)  # AdamW only
    batch_size: int = 32
    lr_step_at: float = 0.75
    lr_gamma: float = 0.1
    seed: int = 0

    def __post_init__(self) -> None:
        if self.optimizer not in OPTIMIZERS:
            raise InvalidArgumentError(f"optimizer must be one of {OPTIMIZERS}, got {self.optimizer!r}")
        if self.steps < 2:
            raise InvalidArgumentError(f"steps must be at least 2, got {self.steps}")

    @property
    def milestone(self) -> int | None:
        """The step from which the learning rate is multiplied by ``lr_gamma`` (None: no step)."""
        return max(1, int(round(self.steps * self.lr_step_at))) if self.lr_step_at < 1 else None

    def make_optimizer(self, params: Any) -> torch.optim.Optimizer:
        if self.optimizer == "adamw":
            return torch.optim.AdamW(params, lr=self.lr, betas=self.betas, weight_decay=self.weight_decay)
        return torch.optim.SGD(params, lr=self.lr, momentum=self.momentum, weight_decay=self.weight_decay)

    def describe(self) -> str:
        """The recipe in one sentence, as the report prints it."""
        step = f" (× {self.lr_gamma:g} at step {self.milestone})" if self.milestone is not None else ""
        if self.optimizer == "adamw":
            opt = f"torch.optim.AdamW, lr {self.lr:g}{step}, betas ({self.betas[0]:g}, {self.betas[1]:g}), decoupled weight decay {self.weight_decay:g}"
        else:
            opt = f"torch.optim.SGD, lr {self.lr:g}{step}, momentum {self.momentum:g}, weight decay {self.weight_decay:g}"
        return (f"Recipe ({self.optimizer}): {opt} on every parameter, batch {self.batch_size} windows, {self.steps} steps, "
                f"seed {self.seed}; every symmetry group tracked from the first step with `neural_mechanics.track(..., class_axis=-1)`.")


# The demo's two runs: AdamW, the transformer's usual optimizer, and SGD with momentum, under which
# the exact ledger and the paper's closed forms apply (docs/theory.md §5.2-5.3). SGD needs a much
# larger learning rate than AdamW; 0.3 trains as fast as AdamW at 5e-3 here and stays stable
# (1.0 diverged in our trials).
GPT_RECIPES: dict[str, GPTRecipe] = {
    "gpt_adamw": GPTRecipe("adamw", lr=5e-3, weight_decay=0.1),
    "gpt_sgd": GPTRecipe("sgd", lr=0.3, weight_decay=5e-4),
}


# -- which pattern of docs/theory.md §2b each tracked layer is --------------------------------------
def _pattern(model: CharGPT, symmetry: str, layer: str) -> str:
    """The §2b pattern a (symmetry, layer) of a CharGPT run belongs to, in a few words."""
    leaf = layer.rsplit(".", 1)[-1]
    if symmetry == "scale":
        return "residual-stream scale"
    if symmetry == "translation":
        return "LM-head column translation" if layer == "head" else "token / position signed translation"
    if leaf == "q_proj":
        return "Q/K rescale, rotary pairs" if model.cfg.positions == "rope" else "Q/K rescale, per dimension"
    if leaf == "v_proj":
        return "V/O rescale"
    if leaf == "up_proj":
        return "gated MLP up/down"
    if layer == "norm":
        return "final norm gain / LM-head columns"
    if leaf.endswith("norm"):
        return "norm gain / next columns"
    return "other"


def _moved(run: Any, symmetry: str, layer: str, indices: list[int]) -> float:
    """How much the charges of these groups moved over the run, summed."""
    import numpy as np

    g = run.groups
    mask = (g.symmetry == symmetry) & (g.layer == layer) & np.isin(g.index, indices)
    m = run.array("measured")[:, mask]
    return float(np.nansum(np.nanmax(m, axis=0) - np.nanmin(m, axis=0))) if mask.any() else 0.0


def transformer_panels(model: CharGPT, symmetries: Any, run: Any, block: int = 0) -> list[dict[str, Any]]:
    """What the report's transformer figure draws for a run of ``model``: one panel per pattern
    of docs/theory.md §2b, each ``{"key", "symmetry", "layer", "groups" (the groups' indices, or
    None for every group of the layer), "title"}``. Q/K and V/O show one head of block ``block``:
    the (key/value) head whose Q/K charges moved most over the run."""
    cfg = model.cfg
    dh, kv = cfg.head_width, cfg.kv_heads or cfg.heads
    attn = f"blocks.{block}.attn"
    by_layer: dict[tuple[str, str], list[Any]] = {}
    for g in symmetries:
        by_layer.setdefault((g.symmetry, g.layer), []).append(g)

    def kv_head(g: Any, proj: str) -> int:
        """The key/value head of a Q/K (``proj="k_proj"``) or V/O (``"v_proj"``) group: its row
        of that projection over the head width (one head per row block, GQA or not)."""
        return int(next(p[1][0] for p in g.parts if p[0] == f"{attn}.{proj}.weight")) // dh

    heads: dict[int, list[int]] = {}
    for g in by_layer.get(("rescale", f"{attn}.q_proj"), []):
        heads.setdefault(kv_head(g, "k_proj"), []).append(int(g.index))
    panels: list[dict[str, Any]] = []
    if heads:
        h = max(sorted(heads), key=lambda k: _moved(run, "rescale", f"{attn}.q_proj", heads[k]))
        rep = cfg.heads // kv
        name = f"head {h} (of {kv}, moved most)" if rep == 1 else \
            f"key/value head {h} (of {kv}, moved most; query heads {h * rep}–{h * rep + rep - 1})"
        what = f"rotary pairs {{r, r+{dh // 2}}}" if cfg.positions == "rope" else "per dimension r"
        panels.append({"key": "qk", "symmetry": "rescale", "layer": f"{attn}.q_proj", "groups": heads[h],
                       "title": f"Q/K rescale, {attn} {name}: |Q_r|² − |K_r|², {what}"})
        vo = [int(g.index) for g in by_layer.get(("rescale", f"{attn}.v_proj"), []) if kv_head(g, "v_proj") == h]
        if vo:
            panels.append({"key": "vo", "symmetry": "rescale", "layer": f"{attn}.v_proj", "groups": vo,
                           "title": f"V/O rescale, {attn} {'head' if rep == 1 else 'key/value head'} {h}: "
                                    "|V_r|² − |O[:, r]|² per dimension r"})
    more = [
        ("gain", "rescale", f"blocks.{block}.attn_norm",
         f"Norm gain vs next columns, blocks.{block}.attn_norm: γ_j² − |W_q,k,v[:, j]|²"),
        ("mlp", "rescale", f"blocks.{block}.mlp.up_proj", f"Gated MLP, blocks.{block}.mlp: |up_i|² − |down[:, i]|² per unit i"),
        ("final", "rescale", "norm", "Final norm gain vs LM-head columns: γ_j² − |W_head[:, j]|²"),
        ("lm_head", "translation", "head", "LM-head column translation: Σ_v W_head[v, j] (before softmax)"),
    ]
    for key, sym, layer, title in more:
        if (sym, layer) in by_layer:
            panels.append({"key": key, "symmetry": sym, "layer": layer, "groups": None, "title": title})
    return panels


# -- training ----------------------------------------------------------------------------------------
@dataclass
class TrainedGPT:
    """What training the GPT once gives: the tracked run and a few plain numbers."""

    name: str
    run: Any  # neural_mechanics.Run
    model: CharGPT
    seconds: float
    final_loss: float  # the last minibatch's loss
    train_loss: float  # evaluate_lm on fixed windows of the train text
    val_loss: float  # the same on the validation text
    sample: str
    recipe: GPTRecipe

    def table_row(self) -> dict[str, Any]:
        """This run's row of the report's training table (losses in nats per character)."""
        return {
            "model": self.name,
            "optimizer": self.run.optimizer or self.recipe.optimizer,
            "parameters": sum(p.numel() for p in self.model.parameters()),
            "groups": len(self.run.groups),
            "steps": self.recipe.steps,
            "seconds": round(self.seconds, 1),
            "final loss": self.final_loss,
            "train loss": self.train_loss,
            "validation loss": self.val_loss,
        }


SAMPLE_PROMPT = "The "
SAMPLE_CHARS = 240
SAMPLE_TEMPERATURE = 0.8


def train_gpt(
    name: str,
    source: Any,
    recipe: GPTRecipe | None = None,
    *,
    config: GPTConfig | None = None,
    progress: bool = True,
    position: int = 0,
) -> TrainedGPT:
    """Train a :class:`CharGPT` on ``source`` (a ``data_sources.TextSource``) with ``recipe``
    (default ``GPT_RECIPES[name]``, else AdamW), tracked with ``neural_mechanics.track`` from the
    first step; a tqdm bar shows the steps unless ``progress`` is False. ``config``: the model's
    shape (default: ``GPTConfig(vocab=source.vocab_size)``).

    The run records, for the report (``run.info``): the recipe, the model, the training table's
    row, a sample of generated text, the transformer panels (:func:`transformer_panels`), the
    pattern of every tracked layer and what discovery does not claim."""
    from tqdm import tqdm

    from .data_sources import evaluate_lm, text_batches
    from .symmetries import find_symmetries
    from .tracking import track

    recipe = recipe or GPT_RECIPES.get(name, GPTRecipe())
    cfg = config or GPTConfig(vocab=source.vocab_size)
    if cfg.vocab < source.vocab_size:
        raise InvalidArgumentError(f"the model's vocabulary ({cfg.vocab}) is smaller than the text's ({source.vocab_size})")
    torch.manual_seed(recipe.seed)
    model = CharGPT(cfg)
    opt = recipe.make_optimizer(model.parameters())
    milestones = [recipe.milestone] if recipe.milestone is not None else []
    sched = torch.optim.lr_scheduler.MultiStepLR(opt, milestones=milestones, gamma=recipe.lr_gamma)
    data = text_batches(source.train, recipe.batch_size, cfg.context, seed=recipe.seed)
    start = time.perf_counter()
    example, _ = next(text_batches(source.train, 2, cfg.context, seed=recipe.seed + 1))
    symmetries = find_symmetries(model, example, class_axis=-1)
    loss = torch.tensor(float("nan"))
    bar = tqdm(range(recipe.steps), desc=f"{name:>9}", unit="step", disable=not progress, position=position, leave=True)
    with track(model, opt, symmetries) as tracker:
        for step in bar:
            x, y = next(data)
            loss = lm_loss(model(x), y)
            opt.zero_grad()
            loss.backward()
            lr = opt.param_groups[0]["lr"]
            opt.step()
            sched.step()
            if step % 50 == 0 or step == recipe.steps - 1:
                bar.set_postfix(loss=f"{loss.item():.3f}", lr=f"{lr:.3g}")
        run = tracker.run
    seconds = time.perf_counter() - start
    bar.close()
    prompt = SAMPLE_PROMPT if set(SAMPLE_PROMPT) <= set(source.chars) else source.decode(source.val[:8])
    sample = source.decode(model.generate(source.encode(prompt), SAMPLE_CHARS, temperature=SAMPLE_TEMPERATURE, seed=recipe.seed))
    trained = TrainedGPT(
        name=name,
        run=run,
        model=model,
        seconds=seconds,
        final_loss=float(loss.item()),
        train_loss=evaluate_lm(model, source.train, cfg.context),
        val_loss=evaluate_lm(model, source.val, cfg.context),
        sample=sample,
        recipe=recipe,
    )
    g = run.groups
    not_claimed = [str(n) for n in getattr(symmetries, "notes", ())]
    if cfg.positions == "rope":
        not_claimed.append("single Q/K rows: rotary positions mix dimensions r and r + d_h/2 of q and k, so only the pairs are "
                           "symmetries (docs/theory.md §2b)")
    not_claimed.append("the off-diagonal part of each head's GL(d_h) symmetry: only its diagonal, the per-dimension Q/K and V/O "
                       "charges, is tracked (docs/theory.md §2b)")
    # Saved with the run, so that a report redrawn from the file shows the same page.
    run.info.update(
        training=list(map(list, trained.table_row().items())),  # pairs: a saved run's JSON keeps no key order
        recipe=recipe.describe(),
        architecture=describe(cfg, sum(p.numel() for p in model.parameters())),
        sample={"prompt": prompt, "text": sample, "temperature": SAMPLE_TEMPERATURE},
        panels=transformer_panels(model, symmetries, run),
        patterns=[[str(sym), str(layer), _pattern(model, str(sym), str(layer))] for sym, layer in dict.fromkeys(zip(g.symmetry, g.layer))],
        not_claimed=not_claimed,
    )
    return trained
