"""Overhead grid: training-step time with tracking every 1, 4, 16, 64 steps / untracked time.

Blocks of steps are interleaved in one process (untracked, every=1, every=4, ... then again), so
slow drift of a shared machine hits every configuration alike; the figure is the median over
blocks of each configuration's per-step time, divided by the untracked median. The last two
columns time the tracker's pre-step hook itself during the same blocks (median per measured step,
spread over every step of the block): the work the tracker adds, without the machine's drift.

    python benchmarks/bench_overhead.py --net acceptance            # (a) CPU, batch 64
    python benchmarks/bench_overhead.py --net vgg11                 # (b) CPU, batch 32, 32x32
    python benchmarks/bench_overhead.py --net vgg16 --device cuda   # (c) GPU, batch 128
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
    else:
        raise SystemExit(f"unknown net {net}")
    return model.to(device), x.to(device), y.to(device)


def run_block(model, opt, x, y, steps: int, device: str) -> float:
    """Seconds per step over a block (the device is synchronised only at the block's ends)."""
    if device == "cuda":
        torch.cuda.synchronize()
    t0 = time.perf_counter()
    for _ in range(steps):
        loss = F.cross_entropy(model(x), y)
        opt.zero_grad()
        loss.backward()
        opt.step()
    if device == "cuda":
        torch.cuda.synchronize()
    return (time.perf_counter() - t0) / steps


def time_hook(tracker, opt, into: list[float]) -> None:
    """Time the tracker's pre-step hook (the steadier figure on a noisy machine: the work the
    tracker adds, without the step-to-step drift of the machine). Steps it does not measure
    (every > 1) return in microseconds and are not counted."""
    inner = tracker._pre_step
    measured = tracker.every

    def timed(*args):
        t0 = time.perf_counter()
        inner(*args)
        if tracker._step % measured == 0:
            into.append(time.perf_counter() - t0)

    tracker._handles[-2].remove()  # the pre-step handle (set-up registered [pre, post])
    tracker._handles[-2] = opt.register_step_pre_hook(timed)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--net", default="acceptance", choices=["acceptance", "vgg11", "vgg16"])
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--block", type=int, default=64, help="steps per block (a multiple of 64)")
    ap.add_argument("--rounds", type=int, default=5, help="interleaved rounds")
    ap.add_argument("--threads", type=int, default=2, help="torch threads")
    ap.add_argument("--nm-threads", type=int, default=None, help="neural-mechanics threads (default: --threads)")
    ap.add_argument("--json", default=None, help="also write the results here")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    nm.set_num_threads(args.nm_threads or args.threads)
    torch.manual_seed(0)
    model, x, y = build(args.net, args.device)
    opt = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9, weight_decay=5e-4)
    symmetries = nm.find_symmetries(model, x)
    configs = ["off"] + [f"every={k}" for k in EVERY]
    times: dict[str, list[float]] = {c: [] for c in configs}
    hooks: dict[str, list[float]] = {c: [] for c in configs}  # seconds inside the pre-step hook
    run_block(model, opt, x, y, 3, args.device)  # warm-up: allocator, buffers, kernels
    for r in range(args.rounds):
        for c in configs:
            if c == "off":
                times[c].append(run_block(model, opt, x, y, args.block, args.device))
                continue
            k = int(c.split("=")[1])
            with nm.track(model, opt, symmetries, every=k) as tracker:
                time_hook(tracker, opt, hooks[c])
                n0 = len(hooks[c])
                run_block(model, opt, x, y, 1, args.device)  # set-up step, not timed
                del hooks[c][n0:]
                times[c].append(run_block(model, opt, x, y, args.block, args.device))
            del tracker
        print(f"round {r + 1}/{args.rounds} done", file=sys.stderr)
    base = statistics.median(times["off"])
    rows = []
    print(f"\n{args.net} on {args.device}: {len(symmetries)} groups, untracked step {base * 1e3:.2f} ms (median of {args.rounds} blocks of {args.block})")
    print(f"{'config':>10} {'median ms':>10} {'min ms':>8} {'ratio':>7} {'hook ms':>8} {'1+hook/step':>11}")
    for c in configs:
        med, lo = statistics.median(times[c]), min(times[c])
        # The hook's median over the measured steps, spread over every step of the block.
        hook = statistics.median(hooks[c]) * len(hooks[c]) / (args.rounds * args.block) if hooks[c] else 0.0
        rows.append({"config": c, "median_ms": med * 1e3, "min_ms": lo * 1e3, "ratio": med / base, "hook_ms_per_step": hook * 1e3})
        print(f"{c:>10} {med * 1e3:10.2f} {lo * 1e3:8.2f} {med / base:7.3f} {hook * 1e3:8.3f} {1 + hook / base:11.3f}")
    if args.json:
        with open(args.json, "w") as fh:
            json.dump({"net": args.net, "device": args.device, "rows": rows, "groups": len(symmetries)}, fh, indent=1)


if __name__ == "__main__":
    main()
