"""Benchmark of a tensor reduced both by rows and by columns (θ, ĝ, v; all eight sums).

A conv or Linear between two symmetries is reduced twice per step: by rows (its output units'
incoming weights) and by column blocks (the previous units' outgoing weights). Contenders, per
shape (float32, fresh arrays far larger than the caches unless the shape is small):

* one call   group_stats_batch([rows, columns]) on the same arrays: the kernel sees the same
             memory twice and reads it once (src/stats/plan.rs `pairs`);
* two calls  the same two reductions as two calls (what it cost before the fused read);
* read pass  one plain read of the three arrays (the bandwidth limit of any one-pass kernel).

Rounds interleave the contenders; the table gives medians and ratios to the read pass.

    python3 benchmarks/bench_columns.py                 # 2 threads
    python3 benchmarks/bench_columns.py --threads 1 2 --rounds 15
"""

from __future__ import annotations

import argparse
import statistics
import time

import numpy as np

import neural_mechanics as nm
from neural_mechanics import _native

# (label, shape): vgg11's deep conv, its Flatten->Linear (column blocks of 7x7=49), a hidden
# Linear, and the acceptance network's Linear (in cache).
SHAPES = [
    ("conv 512x512x3x3", (512, 512, 3, 3)),
    ("fc 512x(512x49)", (512, 512, 49)),
    ("fc 512x512", (512, 512)),
    ("fc 64x(32x16), in cache", (64, 32, 16)),
]


def contenders(shape: tuple[int, ...]) -> dict:
    rng = np.random.default_rng(0)
    t, g, v = (rng.standard_normal(shape, dtype=np.float32) for _ in range(3))
    rows, cols = (t, g, v, 0, 1), (t, g, v, 1, 1)
    flat = [a.reshape(-1).view(np.uint8) for a in (t, g, v)]
    return {
        "one call": lambda: nm.group_stats_batch([rows, cols]),
        "two calls": lambda: (nm.group_stats_batch([rows]), nm.group_stats_batch([cols])),
        "read pass": lambda: _native.read_pass(flat),
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--threads", nargs="+", type=int, default=[2])
    ap.add_argument("--rounds", type=int, default=11)
    args = ap.parse_args()
    print("| shape | threads | one call ms | two calls ms | read pass ms | one call / read | two calls / one call |")
    print("|---|---|---|---|---|---|---|")
    for threads in args.threads:
        nm.set_num_threads(threads)
        for label, shape in SHAPES:
            fns = contenders(shape)
            inner = 50 if np.prod(shape) < 1e6 else 3
            times: dict[str, list[float]] = {k: [] for k in fns}
            for fn in fns.values():
                fn()
            for r in range(args.rounds):
                for name in list(fns)[:: 1 if r % 2 else -1]:
                    t0 = time.perf_counter()
                    for _ in range(inner):
                        fns[name]()
                    times[name].append((time.perf_counter() - t0) / inner)
            m = {k: statistics.median(v) for k, v in times.items()}
            print(
                f"| {label} | {threads} | {m['one call'] * 1e3:.3f} | {m['two calls'] * 1e3:.3f} | {m['read pass'] * 1e3:.3f} "
                f"| {m['one call'] / m['read pass']:.2f} | {m['two calls'] / m['one call']:.2f} |",
                flush=True,
            )
    nm.set_num_threads(0)


if __name__ == "__main__":
    main()
