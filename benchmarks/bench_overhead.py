"""Overhead grid: training-step time with tracking every 1, 4, 16, 64 steps / untracked time.

Blocks of steps are interleaved in one process (untracked, every=1, every=4, ... then again), so
slow drift of a shared machine hits every configuration alike; the figure is the median over
blocks of each configuration's per-step time, divided by the untracked median. The last two
columns time the tracker's step hooks (pre and post) during the same blocks (median per measured
step, spread over every step of the block): the work the tracker adds, without the machine's drift.

    python benchmarks/bench_overhead.py --net acceptance            # (a) CPU, batch 64
    python benchmarks/bench_overhead.py --net vgg11                 # (b) CPU, batch 32, 32x32
    python benchmarks/bench_overhead.py --net vgg16 --device cuda   # (c) GPU, batch 128
    python benchmarks/bench_overhead.py --net gpt --opt adamw       # (d) a small GPT, CPU

``--opt`` chooses the optimizer: sgd (momentum 0.9, weight decay 5e-4; the default) or adamw.
Under adamw a further configuration, ``snapshot``, tracks every step through the snapshot route
(θ copied before the step, the update measured after it) instead of the update computed from
AdamW's state (tracking/adam_path.py), in the same interleaved rounds:

    python benchmarks/bench_overhead.py --net acceptance --opt adamw --every 1 --rounds 15
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time

import torch
import torch.nn as nn
import torch.nn.functional as F

import neural_mechanics as nm

EVERY = (1, 4, 16, 64)


def acceptance_net() -> nn.Module:
    return nn.Sequential(
        nn.Conv2d(1, 16, 3, padding=1), nn.BatchNorm2d(16), nn.ReLU(),
        nn.Conv2d(16, 32, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2), nn.Flatten(),
        nn.Linear(32 * 4 * 4, 64), nn.ReLU(), nn.Linear(64, 10),
    )  # fmt: skip


class GPTBlock(nn.Module):
    """Pre-norm decoder block: RMSNorm, causal multi-head attention (scaled_dot_product_attention),
    RMSNorm, SwiGLU MLP, both added to the residual stream."""

    def __init__(self, width: int, heads: int, hidden: int):
        super().__init__()
        self.heads = heads
        self.attn_norm, self.mlp_norm = nn.RMSNorm(width), nn.RMSNorm(width)
        self.q, self.k, self.v, self.o = (nn.Linear(width, width, bias=False) for _ in range(4))
        self.gate, self.up = nn.Linear(width, hidden, bias=False), nn.Linear(width, hidden, bias=False)
        self.down = nn.Linear(hidden, width, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        B, T, E = x.shape
        h = self.attn_norm(x)
        q, k, v = (p(h).view(B, T, self.heads, E // self.heads).transpose(1, 2) for p in (self.q, self.k, self.v))
        a = F.scaled_dot_product_attention(q, k, v, is_causal=True)
        x = x + self.o(a.transpose(1, 2).reshape(B, T, E))
        h = self.mlp_norm(x)
        return x + self.down(F.silu(self.gate(h)) * self.up(h))


class GPT(nn.Module):
    """A small GPT (token ids (B, T) -> logits (B, T, V)): learned positions, untied head."""

    def __init__(self, vocab: int = 128, width: int = 96, heads: int = 4, layers: int = 4, hidden: int = 256, context: int = 32):
        super().__init__()
        self.tok, self.pos = nn.Embedding(vocab, width), nn.Embedding(context, width)
        self.blocks = nn.Sequential(*(GPTBlock(width, heads, hidden) for _ in range(layers)))
        self.norm = nn.RMSNorm(width)
        self.head = nn.Linear(width, vocab, bias=False)

    def forward(self, idx: torch.Tensor) -> torch.Tensor:
        h = self.tok(idx) + self.pos(torch.arange(idx.shape[1], device=idx.device))
        return self.head(self.norm(self.blocks(h)))


def loss_fn(logits: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """Cross-entropy with the class axis last for (B, T, V) logits."""
    if logits.dim() == 3:
        return F.cross_entropy(logits.reshape(-1, logits.shape[-1]), y.reshape(-1))
    return F.cross_entropy(logits, y)


def build(net: str, device: str) -> tuple[nn.Module, torch.Tensor, torch.Tensor]:
    import torchvision

    if net == "acceptance":
        x, y = nm.load_digits()
        model, batch = acceptance_net(), 64
        x, y = x[:batch], y[:batch]
    elif net == "vgg11":
        model = torchvision.models.vgg11_bn(num_classes=10)
        model.classifier = nn.Sequential(nn.Linear(25088, 512), nn.ReLU(), nn.Linear(512, 512), nn.ReLU(), nn.Linear(512, 10))
        x, y = torch.randn(32, 3, 32, 32), torch.randint(0, 10, (32,))
    elif net == "vgg16":
        model = torchvision.models.vgg16_bn(num_classes=1000)
        x, y = torch.randn(128, 3, 224, 224), torch.randint(0, 1000, (128,))
    elif net == "gpt":
        model = GPT()
        x, y = torch.randint(0, 128, (16, 32)), torch.randint(0, 128, (16, 32))
    else:
        raise SystemExit(f"unknown net {net}")
    return model.to(device), x.to(device), y.to(device)


def run_block(model, opt, x, y, steps: int, device: str) -> float:
    """Seconds per step over a block (the device is synchronised only at the block's ends)."""
    if device == "cuda":
        torch.cuda.synchronize()
    t0 = time.perf_counter()
    for _ in range(steps):
        loss = loss_fn(model(x), y)
        opt.zero_grad()
        loss.backward()
        opt.step()
    if device == "cuda":
        torch.cuda.synchronize()
    return (time.perf_counter() - t0) / steps


def time_hook(tracker, opt, into: list[float]) -> None:
    """Time the tracker's step hooks, pre and post together (the steadier figure on a noisy
    machine: the work the tracker adds, without the step-to-step drift of the machine; SGD works
    before the step, other optimizers mostly after it). Steps it does not measure (every > 1)
    return in microseconds and are not counted."""
    pre, post = tracker._pre_step, tracker._post_step
    measured = tracker.every
    spent = [0.0]

    def timed_pre(*args):
        t0 = time.perf_counter()
        pre(*args)
        spent[0] = time.perf_counter() - t0

    def timed_post(*args):
        step = tracker._step
        t0 = time.perf_counter()
        post(*args)
        if step % measured == 0:
            into.append(spent[0] + time.perf_counter() - t0)

    # set-up registered [pre, post] last
    tracker._handles[-2].remove()
    tracker._handles[-1].remove()
    tracker._handles[-2] = opt.register_step_pre_hook(timed_pre)
    tracker._handles[-1] = opt.register_step_post_hook(timed_post)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--net", default="acceptance", choices=["acceptance", "vgg11", "vgg16", "gpt"])
    ap.add_argument("--opt", default="sgd", choices=["sgd", "adamw"])
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--block", type=int, default=64, help="steps per block (a multiple of 64)")
    ap.add_argument("--rounds", type=int, default=5, help="interleaved rounds")
    ap.add_argument("--threads", type=int, default=2, help="torch threads")
    ap.add_argument("--nm-threads", type=int, default=None, help="neural-mechanics threads (default: --threads)")
    ap.add_argument("--every", default=",".join(map(str, EVERY)), help="comma-separated tracking intervals to time")
    ap.add_argument("--json", default=None, help="also write the results here")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    nm.set_num_threads(args.nm_threads or args.threads)
    torch.manual_seed(0)
    model, x, y = build(args.net, args.device)
    if args.opt == "sgd":
        opt: torch.optim.Optimizer = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9, weight_decay=5e-4)
    else:
        opt = torch.optim.AdamW(model.parameters(), lr=1e-3, weight_decay=1e-2)
    symmetries = nm.find_symmetries(model, x, class_axis=-1 if args.net == "gpt" else 1)
    configs = ["off"] + [f"every={int(k)}" for k in args.every.split(",")] + (["snapshot"] if args.opt == "adamw" else [])
    times: dict[str, list[float]] = {c: [] for c in configs}
    hooks: dict[str, list[float]] = {c: [] for c in configs}  # seconds inside the pre-step hook
    run_block(model, opt, x, y, 3, args.device)  # warm-up: allocator, buffers, kernels
    for r in range(args.rounds):
        for c in configs:
            if c == "off":
                times[c].append(run_block(model, opt, x, y, args.block, args.device))
                continue
            k = 1 if c == "snapshot" else int(c.split("=")[1])
            with nm.track(model, opt, symmetries, every=k) as tracker:
                if c == "snapshot":
                    tracker._path.fused = False  # AdamPath: every step through the snapshot route
                time_hook(tracker, opt, hooks[c])
                n0 = len(hooks[c])
                run_block(model, opt, x, y, 1, args.device)  # set-up step, not timed
                del hooks[c][n0:]
                times[c].append(run_block(model, opt, x, y, args.block, args.device))
            del tracker
        print(f"round {r + 1}/{args.rounds} done", file=sys.stderr)
    base = statistics.median(times["off"])
    rows = []
    print(f"\n{args.net} on {args.device}, {args.opt}: {len(symmetries)} groups, untracked step {base * 1e3:.2f} ms (median of {args.rounds} blocks of {args.block})")
    print(f"{'config':>10} {'median ms':>10} {'min ms':>8} {'ratio':>7} {'hook ms':>8} {'1+hook/step':>11}")
    for c in configs:
        med, lo = statistics.median(times[c]), min(times[c])
        # The hook's median over the measured steps, spread over every step of the block.
        hook = statistics.median(hooks[c]) * len(hooks[c]) / (args.rounds * args.block) if hooks[c] else 0.0
        rows.append({"config": c, "median_ms": med * 1e3, "min_ms": lo * 1e3, "ratio": med / base, "hook_ms_per_step": hook * 1e3})
        print(f"{c:>10} {med * 1e3:10.2f} {lo * 1e3:8.2f} {med / base:7.3f} {hook * 1e3:8.3f} {1 + hook / base:11.3f}")
    if args.json:
        with open(args.json, "w") as fh:
            json.dump({"net": args.net, "opt": args.opt, "device": args.device, "rows": rows, "groups": len(symmetries)}, fh, indent=1)


if __name__ == "__main__":
    main()
