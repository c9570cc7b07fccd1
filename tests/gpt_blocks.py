"""A small hand-written GPT for the transformer tests (docs/theory.md §2b).

Pre-norm decoder blocks with every option the symmetry table distinguishes: RMSNorm (torch's
``nn.RMSNorm`` or written by hand, as in Llama) or LayerNorm; learned or rotary (rotate-half)
positions; a gated (SwiGLU), ReLU or GELU MLP; optional QK-norm (a norm over the head width on q
and k); grouped-query attention (fewer key/value heads); ``F.scaled_dot_product_attention`` or a
hand-written softmax(q kᵀ) with a causal mask; a tied or untied LM head, with or without bias.
Logits are ``(B, T, V)``, so ``find_symmetries(..., class_axis=-1)``.

Every piece is plain PyTorch written for these tests; nothing here is imported by the package.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn as nn
import torch.nn.functional as F


@dataclass
class GPTConfig:
    vocab: int = 12
    width: int = 8
    heads: int = 2
    kv_heads: int | None = None  # None: as many as query heads; fewer: grouped-query attention
    layers: int = 1
    hidden: int = 16
    norm: str = "rms"  # "rms" (nn.RMSNorm), "rms_hand" (written out, as in Llama), "layer" (nn.LayerNorm)
    pos: str = "learned"  # "learned" (a position table) or "rope" (rotate-half rotary embeddings)
    mlp: str = "gated"  # "gated" (SwiGLU), "relu", "gelu"
    qk_norm: bool = False
    tied: bool = False
    bias: bool = False  # biases on every Linear (q, k, v, o, MLP, head)
    attention: str = "sdpa"  # "sdpa" or "manual"
    max_len: int = 8
    eps: float = 1e-12


class HandRMSNorm(nn.Module):
    """x * rsqrt(mean(x²) + ε) * w, written out as Llama does."""

    def __init__(self, dim: int, eps: float):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(dim))
        self.variance_epsilon = eps

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        dtype = x.dtype
        x = x.to(torch.float32) if dtype in (torch.float16, torch.bfloat16) else x
        variance = x.pow(2).mean(-1, keepdim=True)
        x = x * torch.rsqrt(variance + self.variance_epsilon)
        return self.weight * x.to(dtype)


def make_norm(kind: str, dim: int, eps: float) -> nn.Module:
    if kind == "rms":
        return nn.RMSNorm(dim, eps=eps)
    if kind == "rms_hand":
        return HandRMSNorm(dim, eps)
    if kind == "layer":
        return nn.LayerNorm(dim, eps=eps)
    raise ValueError(kind)


def rotate_half(x: torch.Tensor) -> torch.Tensor:
    half = x.shape[-1] // 2
    return torch.cat((-x[..., half:], x[..., :half]), dim=-1)


class Attention(nn.Module):
    def __init__(self, cfg: GPTConfig):
        super().__init__()
        self.cfg = cfg
        self.heads = cfg.heads
        self.kv_heads = cfg.kv_heads or cfg.heads
        self.dh = cfg.width // cfg.heads
        self.q_proj = nn.Linear(cfg.width, self.heads * self.dh, bias=cfg.bias)
        self.k_proj = nn.Linear(cfg.width, self.kv_heads * self.dh, bias=cfg.bias)
        self.v_proj = nn.Linear(cfg.width, self.kv_heads * self.dh, bias=cfg.bias)
        self.o_proj = nn.Linear(self.heads * self.dh, cfg.width, bias=cfg.bias)
        if cfg.qk_norm:
            self.q_norm = make_norm(cfg.norm, self.dh, cfg.eps)
            self.k_norm = make_norm(cfg.norm, self.dh, cfg.eps)

    def forward(self, x: torch.Tensor, cos: torch.Tensor | None, sin: torch.Tensor | None) -> torch.Tensor:
        B, T, _ = x.shape
        q = self.q_proj(x).view(B, T, self.heads, self.dh)
        k = self.k_proj(x).view(B, T, self.kv_heads, self.dh)
        v = self.v_proj(x).view(B, T, self.kv_heads, self.dh)
        if self.cfg.qk_norm:
            q, k = self.q_norm(q), self.k_norm(k)
        q, k, v = q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2)
        if cos is not None:
            q = q * cos + rotate_half(q) * sin
            k = k * cos + rotate_half(k) * sin
        rep = self.heads // self.kv_heads
        if self.cfg.attention == "sdpa":
            y = F.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=rep > 1)
        else:
            if rep > 1:  # as Hugging Face's repeat_kv: (B, Hkv, T, d) -> (B, Hkv·rep, T, d)
                k = k[:, :, None].expand(B, self.kv_heads, rep, T, self.dh).reshape(B, self.heads, T, self.dh)
                v = v[:, :, None].expand(B, self.kv_heads, rep, T, self.dh).reshape(B, self.heads, T, self.dh)
            scores = torch.matmul(q, k.transpose(-2, -1)) * self.dh ** -0.5
            mask = torch.ones(T, T, dtype=torch.bool, device=x.device).triu(1)
            scores = scores.masked_fill(mask, float("-inf"))
            y = torch.matmul(torch.softmax(scores, dim=-1), v)
        return self.o_proj(y.transpose(1, 2).reshape(B, T, self.heads * self.dh))


class MLP(nn.Module):
    def __init__(self, cfg: GPTConfig):
        super().__init__()
        self.kind = cfg.mlp
        if cfg.mlp == "gated":
            self.gate_proj = nn.Linear(cfg.width, cfg.hidden, bias=cfg.bias)
        self.up_proj = nn.Linear(cfg.width, cfg.hidden, bias=cfg.bias)
        self.down_proj = nn.Linear(cfg.hidden, cfg.width, bias=cfg.bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.kind == "gated":
            return self.down_proj(F.silu(self.gate_proj(x)) * self.up_proj(x))
        h = self.up_proj(x)
        return self.down_proj(F.relu(h) if self.kind == "relu" else F.gelu(h))


class Block(nn.Module):
    def __init__(self, cfg: GPTConfig):
        super().__init__()
        self.attn_norm = make_norm(cfg.norm, cfg.width, cfg.eps)
        self.attn = Attention(cfg)
        self.mlp_norm = make_norm(cfg.norm, cfg.width, cfg.eps)
        self.mlp = MLP(cfg)

    def forward(self, x: torch.Tensor, cos: torch.Tensor | None, sin: torch.Tensor | None) -> torch.Tensor:
        x = x + self.attn(self.attn_norm(x), cos, sin)
        return x + self.mlp(self.mlp_norm(x))


class GPT(nn.Module):
    """Token ids (B, T) -> logits (B, T, V)."""

    def __init__(self, cfg: GPTConfig):
        super().__init__()
        self.cfg = cfg
        self.tok = nn.Embedding(cfg.vocab, cfg.width)
        if cfg.pos == "learned":
            self.pos = nn.Embedding(cfg.max_len, cfg.width)
        else:
            dh = cfg.width // cfg.heads
            self.register_buffer("inv_freq", 1.0 / 10000 ** (torch.arange(0, dh, 2).float() / dh), persistent=False)
        self.blocks = nn.ModuleList(Block(cfg) for _ in range(cfg.layers))
        self.norm = make_norm(cfg.norm, cfg.width, cfg.eps)
        self.head = nn.Linear(cfg.width, cfg.vocab, bias=cfg.bias)
        if cfg.tied:
            self.head.weight = self.tok.weight

    def forward(self, idx: torch.Tensor) -> torch.Tensor:
        T = idx.shape[1]
        h = self.tok(idx)
        cos = sin = None
        if self.cfg.pos == "learned":
            h = h + self.pos(torch.arange(T, device=idx.device))
        else:
            freqs = torch.outer(torch.arange(T, device=idx.device, dtype=self.inv_freq.dtype), self.inv_freq)
            emb = torch.cat((freqs, freqs), dim=-1)
            cos, sin = emb.cos()[None, None].to(h.dtype), emb.sin()[None, None].to(h.dtype)
        for block in self.blocks:
            h = block(h, cos, sin)
        return self.head(self.norm(h))


def lm_loss(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """Cross-entropy of (B, T, V) logits against (B, T) targets."""
    return F.cross_entropy(logits.reshape(-1, logits.shape[-1]), targets.reshape(-1))
