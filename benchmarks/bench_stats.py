"""Benchmark of the fused per-group statistics kernel (neural_mechanics.group_stats_batch).

For every tensor of a parameter set (with a gradient of the same shape) each contender computes,
per row (axis 0: one group per output unit, like the scale groups), the five sums
Σθ, Σθ², Σĝ, Σĝ², Σθĝ. Contenders:

* fused      neural_mechanics.group_stats_batch, one call for all tensors;
* read pass  neural_mechanics._native.read_pass: reads the same bytes once with the same pool
             and does nothing else. This is the bandwidth limit of any one-pass kernel;
* torch      the best composition a user would write in torch on CPU: sum, vector_norm², einsum
             for the dot (one op per sum, each a pass over its tensor);
* numpy      sum and einsum (numpy reductions run on one thread).

Rounds interleave the contenders (so that machine noise hits all of them alike); the table shows
the median and the minimum over rounds, and ratios of medians. Reproduce with

    unset OPENBLAS_CORETYPE OPENBLAS_L2_SIZE; python3 benchmarks/bench_stats.py

(`--rounds`, `--threads 1 2`, `--sets vgg16 mlp`, `--quick`).
"""

from __future__ import annotations

import argparse
import gc
import os
import platform
import statistics
import sys
import time
from collections.abc import Callable

import numpy as np
import torch

import neural_mechanics as nm
from neural_mechanics import _native

# ----------------------------------------------------------------------------------------------
# Parameter sets: (name, shape) of every parameter; each gets a gradient of the same shape.


def vgg16_shapes() -> list[tuple[int, ...]]:
    convs = [(64, 3), (64, 64), (128, 64), (128, 128), (256, 128), (256, 256), (256, 256),
             (512, 256)] + [(512, 512)] * 5
    fcs = [(4096, 25088), (4096, 4096), (1000, 4096)]
    shapes: list[tuple[int, ...]] = []
    for out, inp in convs:
        shapes += [(out, inp, 3, 3), (out,)]
    for out, inp in fcs:
        shapes += [(out, inp), (out,)]
    return shapes


def mlp_shapes() -> list[tuple[int, ...]]:
    shapes: list[tuple[int, ...]] = []
    for out, inp in [(512, 784), (512, 512), (10, 512)]:
        shapes += [(out, inp), (out,)]
    return shapes


SETS = {"vgg16": vgg16_shapes, "mlp": mlp_shapes}


def make_tensors(shapes: list[tuple[int, ...]], seed: int = 0) -> list[tuple[torch.Tensor, torch.Tensor]]:
    gen = torch.Generator().manual_seed(seed)
    return [(torch.randn(s, generator=gen), torch.randn(s, generator=gen) * 1e-3) for s in shapes]


# ----------------------------------------------------------------------------------------------
# Contenders. Each returns something derived from every result, so nothing is skipped.


def fused(pairs):
    out = nm.group_stats_batch([(t, g) for t, g in pairs], as_arrays=True)
    return out


def read_pass_buffers(pairs):
    # Byte views of the same memory (no copy); built once, outside the timed region.
    bufs = []
    for t, g in pairs:
        for x in (t, g):
            bufs.append(x.detach().numpy().reshape(-1).view(np.uint8))
    return bufs


def torch_best(pairs):
    out = []
    for t, g in pairs:
        t2 = t.reshape(t.shape[0], -1)
        g2 = g.reshape(g.shape[0], -1)
        out.append((
            t2.sum(1),
            torch.linalg.vector_norm(t2, dim=1).square(),
            g2.sum(1),
            torch.linalg.vector_norm(g2, dim=1).square(),
            torch.einsum("ij,ij->i", t2, g2),
        ))
    return out


def numpy_pairs(pairs):
    return [(t.numpy().reshape(t.shape[0], -1), g.numpy().reshape(g.shape[0], -1)) for t, g in pairs]


def numpy_best(npairs):
    out = []
    for t, g in npairs:
        out.append((
            t.sum(1),
            np.einsum("ij,ij->i", t, t),
            g.sum(1),
            np.einsum("ij,ij->i", g, g),
            np.einsum("ij,ij->i", t, g),
        ))
    return out


def check_agreement(pairs) -> float:
    """Largest relative difference between fused and a float64 torch reference (sanity)."""
    got = fused(pairs)
    worst = 0.0
    for (t, g), sums in zip(pairs, got):
        t2 = t.reshape(t.shape[0], -1).double()
        g2 = g.reshape(g.shape[0], -1).double()
        ref = torch.stack([t2.sum(1), (t2 * t2).sum(1), g2.sum(1), (g2 * g2).sum(1), (t2 * g2).sum(1)], 1).numpy()
        scale = np.abs(ref).max() + 1e-300
        worst = max(worst, float(np.abs(sums - ref).max() / scale))
    return worst


# ----------------------------------------------------------------------------------------------


def time_rounds(contenders: dict[str, Callable[[], object]], rounds: int, inner: int) -> dict[str, list[float]]:
    """Seconds per call of each contender, `rounds` samples each, interleaved round by round.
    Each sample is the mean of `inner` back-to-back calls (inner > 1 for sub-millisecond work)."""
    times: dict[str, list[float]] = {k: [] for k in contenders}
    for fn in contenders.values():  # warm-up: page faults, pool start, torch kernels
        fn()
        fn()
    for r in range(rounds):
        names = list(contenders)
        if r % 2:
            names.reverse()  # no contender always runs right after the same one
        for name in names:
            fn = contenders[name]
            t0 = time.perf_counter()
            for _ in range(inner):
                fn()
            times[name].append((time.perf_counter() - t0) / inner)
    return times


def fmt_ms(s: float) -> str:
    return f"{s * 1e3:.3f}" if s < 0.01 else f"{s * 1e3:.1f}"


def run_set(set_name: str, threads: int, rounds: int, skip: list[str]) -> list[str]:
    shapes = SETS[set_name]()
    pairs = make_tensors(shapes)
    nbytes = sum(t.numel() * t.element_size() * 2 for t, _ in pairs)
    bufs = read_pass_buffers(pairs)
    npairs = numpy_pairs(pairs)
    nm.set_num_threads(threads)
    torch.set_num_threads(threads)
    contenders = {
        "fused": lambda: fused(pairs),
        "read pass": lambda: _native.read_pass(bufs),
        "torch": lambda: torch_best(pairs),
        "numpy": lambda: numpy_best(npairs),
    }
    contenders = {k: v for k, v in contenders.items() if k not in skip}
    inner = 1 if nbytes > 50e6 else 20
    err = check_agreement(pairs)
    gc.collect()
    times = time_rounds(contenders, rounds, inner)
    med = {k: statistics.median(v) for k, v in times.items()}
    mins = {k: min(v) for k, v in times.items()}
    lines = []
    for name in contenders:
        gbs = nbytes / med[name] / 1e9
        ratio = med[name] / med["fused"]
        extra = ""
        if name == "fused":
            extra = f"{med['read pass'] / med['fused']:.2f} of read-pass bandwidth"
        elif name != "read pass" and "fused" in med:
            extra = f"fused is {ratio:.1f}x faster"
        else:
            extra = "bandwidth limit"
        lines.append(
            f"| {set_name} | {threads} | {name} | {fmt_ms(med[name])} | {fmt_ms(mins[name])} | {gbs:.1f} | {extra} |"
        )
    print(f"# {set_name}: {len(shapes)} tensors, {nbytes / 1e6:.1f} MB (θ and ĝ, float32), "
          f"{threads} thread(s), {rounds} rounds x {inner}; fused vs float64 reference: {err:.1e}",
          file=sys.stderr, flush=True)
    for line in lines:
        print(line, file=sys.stderr, flush=True)
    contenders.clear()  # drop the tensors before the next set is made
    gc.collect()
    return lines


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--sets", nargs="+", default=["vgg16", "mlp"], choices=list(SETS))
    ap.add_argument("--threads", nargs="+", type=int, default=[1, 2])
    ap.add_argument("--rounds", type=int, default=15)
    ap.add_argument("--quick", action="store_true", help="5 rounds (a smoke run)")
    ap.add_argument("--skip", nargs="*", choices=["torch", "numpy"], default=[],
                    help="leave these contenders out (for tuning runs)")
    args = ap.parse_args()
    rounds = 5 if args.quick else args.rounds
    print(f"machine: {platform.processor() or platform.machine()}, {os.cpu_count()} cores, "
          f"load {os.getloadavg()[0]:.2f}; torch {torch.__version__}, numpy {np.__version__}, "
          f"neural_mechanics {nm.__version__}")
    header = [
        "| set | threads | contender | median ms | min ms | GB/s (median) | note |",
        "|---|---|---|---|---|---|---|",
    ]
    rows = []
    for set_name in args.sets:
        for threads in args.threads:
            rows += run_set(set_name, threads, rounds, args.skip)
    print("\n".join(header + rows))
    print(f"\nload after: {os.getloadavg()[0]:.2f}")
    print("reproduce: unset OPENBLAS_CORETYPE OPENBLAS_L2_SIZE; python3 benchmarks/bench_stats.py "
          + " ".join(sys.argv[1:]))


if __name__ == "__main__":
    main()
