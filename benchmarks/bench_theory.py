"""Throughput of the theory engine's streaming updates (group-steps per second).

Reproduce:  python3 benchmarks/bench_theory.py            (defaults: 10^5 groups, 200 steps, 7 repeats)
            python3 benchmarks/bench_theory.py --groups 100000 --steps 200 --repeats 7 --threads 2

Each measurement times `steps` consecutive calls of `step()` on one stream (the Python call, the
Rust update of every group and the fresh numpy array returned), and reports group-steps per
second as groups*steps/elapsed; the table gives the median and the best (min time) of the
repeats. The batch forms are timed for comparison (whole (steps, groups) arrays in one call).
"""

from __future__ import annotations

import argparse
import os
import platform
import statistics
import time

import numpy as np

import neural_mechanics as nm
from neural_mechanics import theory


def _time(fn, repeats: int) -> list[float]:
    fn()  # warm-up: page in the buffers, build the pool
    out = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        out.append(time.perf_counter() - t0)
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--groups", type=int, default=100_000)
    ap.add_argument("--steps", type=int, default=200)
    ap.add_argument("--repeats", type=int, default=7)
    ap.add_argument("--threads", type=int, default=0, help="pool size (0: default)")
    args = ap.parse_args()
    if args.threads:
        nm.set_num_threads(args.threads)
    g, n = args.groups, args.steps
    rng = np.random.default_rng(0)
    y0 = rng.uniform(0.5, 2.0, g)
    drive = rng.uniform(0.0, 1e-2, (n, g))
    flux = rng.normal(0.0, 1e-6, (n, g))
    usq = rng.uniform(0.0, 1e-2, (n, g))

    cases = []

    def paper_stream(momentum: float):
        def run():
            s = theory.PaperStream("scale", y0)
            for k in range(n):
                s.step(drive[k], lr=0.1, momentum=momentum, weight_decay=5e-4)
        return run

    def ledger_stream():
        s = theory.LedgerStream("scale", y0)
        def run():
            for k in range(n):
                s.step(flux=flux[k], update_sq=usq[k], lr=0.1, momentum=0.9, weight_decay=5e-4)
        return run

    cases.append(("PaperStream.step, momentum 0.9", paper_stream(0.9)))
    cases.append(("PaperStream.step, no momentum", paper_stream(0.0)))
    cases.append(("LedgerStream.step, momentum 0.9", ledger_stream()))
    cases.append(("paper() batch, momentum 0.9",
                  lambda: theory.paper("scale", y0, drive, lr=0.1, momentum=0.9, weight_decay=5e-4)))
    cases.append(("ledger() batch, momentum 0.9",
                  lambda: theory.ledger("scale", y0, flux=flux, update_sq=usq, lr=0.1, momentum=0.9, weight_decay=5e-4)))

    print(f"# neural_mechanics {nm.__version__}, {platform.processor() or platform.machine()}, "
          f"{os.cpu_count()} cores, pool {nm.get_num_threads()} threads")
    print(f"# {g} groups x {n} steps per repeat, {args.repeats} repeats")
    print(f"| {'case':<34} | {'median Mgs/s':>12} | {'best Mgs/s':>10} | {'median us/step':>14} |")
    print(f"|{'-' * 36}|{'-' * 14}|{'-' * 12}|{'-' * 16}|")
    for name, fn in cases:
        ts = _time(fn, args.repeats)
        med, best = statistics.median(ts), min(ts)
        print(f"| {name:<34} | {g * n / med / 1e6:>12.0f} | {g * n / best / 1e6:>10.0f} | {med / n * 1e6:>14.1f} |")


if __name__ == "__main__":
    main()
