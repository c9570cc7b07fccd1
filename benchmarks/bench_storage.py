"""Runs of real length: bytes per group-step, save/load time and peak memory of ResNet-18-sized
runs (7,233 groups) of 10³, 10⁴ and 10⁵ recorded steps, under ``max_bytes`` and ``memory_limit``.

    python3 benchmarks/bench_storage.py                       # 10^3, 10^4, 10^5 steps
    python3 benchmarks/bench_storage.py --steps 1000 --max-bytes 0   # no budget: every row kept

Each size runs in a fresh process (no torch imported), so that its peak resident size
(``ru_maxrss``) means something: the table gives the growth of the peak over the process's size
before the run was made, while recording and saving, against the memory limit. The rows are
synthetic, made through the Run API as the tracker makes them (``reserve_row`` / ``commit_row``):
charges drifting slowly from step to step, the per-step columns drawn from a pool of random rows
(random mantissas, as measured gradients have) scaled by a factor that changes every step (so
no step repeats another), hyperparameters constant, a learning-rate drop
at 60% of the steps. Compression ratios are those of this data; a real run's charges drift as
slowly, its gradients are as random.

Also times the per-layer aggregates of one row (``LayerAggregator.compute``) against the copy of
the row into the run, median of interleaved repeats.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import textwrap
import time

CHILD = textwrap.dedent(
    """
    import json, os, resource, shutil, sys, tempfile, time
    import numpy as np
    from neural_mechanics.run import COLUMNS, GroupInfo, Run, load_run

    steps, groups, max_bytes, limit = (int(a) for a in sys.argv[1:5])
    max_bytes = max_bytes or None

    def peak():
        return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024

    # ResNet-18's shape of groups: 20 BatchNorm layers of scale groups (its channels), rescale
    # groups between conv and BN, one translation group at the classifier: 7,233 in all.
    channels = [64] + [64] * 4 + [128] * 5 + [256] * 5 + [512] * 5
    sym, lay = [], []
    for i, c in enumerate(channels):
        sym += ["scale"] * c
        lay += [f"bn{i}"] * c
    rest = groups - len(sym) - 1
    for i in range(rest // 512 + 1):
        n = min(512, rest - 512 * i)
        sym += ["rescale"] * n
        lay += [f"conv{i}"] * n
    sym += ["translation"]
    lay += ["fc"]
    n = len(sym)
    info = GroupInfo(np.array(sym, dtype=object), np.array(lay, dtype=object), np.arange(n),
                     np.array(["g"] * n, dtype=object), np.ones(n, dtype=np.int64))
    rng = np.random.default_rng(0)
    pool = rng.normal(size=(16, len(COLUMNS), n))
    col = {c: j for j, c in enumerate(COLUMNS)}
    charge = rng.uniform(1, 2, n)
    spill = tempfile.mkdtemp(prefix="bench-storage-")
    base = peak()
    run = Run(groups=info, optimizer="SGD", max_rows_in_memory=Run.rows_for_memory(n, limit), spill_dir=spill, max_bytes=max_bytes)
    t0 = time.perf_counter()
    for k in range(steps):
        row = run.reserve_row()
        # The pool, scaled a little differently at every step: no two steps repeat (deflate would
        # find a repeat within its 32 KB window in the small per-layer arrays).
        np.multiply(pool[k % 16], 1.0 + 1e-9 * k, out=row)
        charge *= 1.0 + 1e-6 * pool[(k + 1) % 16, 0]
        row[col["lr"]] = 0.1 if k < 0.6 * steps else 0.01
        row[col["momentum"]], row[col["dampening"]], row[col["weight_decay"]] = 0.9, 0.0, 5e-4
        row[col["measured"]] = charge
        row[col["exact"]] = charge * (1.0 + 1e-7 * pool[(k + 2) % 16, 0])
        row[col["paper"]] = charge * (1.0 + 1e-3 * pool[(k + 3) % 16, 0])
        row[col["magnitude"]] = charge
        run.commit_row(k, 0.1 * k)
    record_s = time.perf_counter() - t0
    run.final = {"step": steps, "time": 0.1 * steps, "measured": charge, "magnitude": charge}
    path = os.path.join(spill, "run.nmrun")
    t0 = time.perf_counter()
    run.save(path)
    save_s = time.perf_counter() - t0
    grown = peak() - base
    size = os.path.getsize(path)
    kept = len(run.step_index)
    del run
    t0 = time.perf_counter()
    back = load_run(path)
    load_s = time.perf_counter() - t0
    assert len(back.layer_step_index) == steps + 1
    shutil.rmtree(spill, ignore_errors=True)
    print(json.dumps(dict(steps=steps, kept=kept, size=size, record_s=record_s, save_s=save_s, load_s=load_s, grown=grown,
                          pairs=len(back.layers), limit=limit, max_bytes=max_bytes)))
    """
)


def aggregate_cost(groups: int, repeats: int) -> tuple[float, float]:
    """Median seconds of the per-layer aggregates of one row and of copying the row in."""
    import numpy as np

    from neural_mechanics.run import COLUMNS, LAYER_FIELDS, GroupInfo
    from neural_mechanics.storage import LayerAggregator, LayerIndex

    layers = np.repeat([f"l{i}" for i in range(29)], groups // 29 + 1)[:groups].astype(object)
    info = GroupInfo(np.array(["scale"] * groups, dtype=object), layers, np.arange(groups), layers, np.ones(groups, dtype=np.int64))
    agg = LayerAggregator(LayerIndex(info.symmetry, info.layer), COLUMNS, COLUMNS[:4])
    row = np.random.default_rng(0).normal(size=(len(COLUMNS), groups))
    out = np.empty((len(LAYER_FIELDS), 29))
    block = np.empty_like(row)
    a, c = [], []
    for _ in range(repeats):
        t0 = time.perf_counter()
        agg.compute(row, out)
        a.append(time.perf_counter() - t0)
        t0 = time.perf_counter()
        block[...] = row
        c.append(time.perf_counter() - t0)
    return float(np.median(a)), float(np.median(c))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--steps", type=int, nargs="+", default=[1000, 10_000, 100_000])
    ap.add_argument("--groups", type=int, default=7233)
    ap.add_argument("--max-bytes", type=int, default=2**30, help="0: no budget")
    ap.add_argument("--memory-limit", type=int, default=256 * 2**20)
    args = ap.parse_args()
    agg, copy = aggregate_cost(args.groups, 2000)
    print(f"per-layer aggregates of one row ({args.groups} groups, 29 layers): {agg * 1e6:.0f} µs median; copying the row in: {copy * 1e6:.0f} µs")
    print("| steps | rows kept | file | bytes per group-step | record | save | load | peak RSS growth / memory_limit |")
    print("|---:|---:|---:|---:|---:|---:|---:|---:|")
    for steps in args.steps:
        proc = subprocess.run(
            [sys.executable, "-c", CHILD, str(steps), str(args.groups), str(args.max_bytes), str(args.memory_limit)],
            capture_output=True, text=True, check=False,
        )
        if proc.returncode != 0:
            print(f"| {steps} | failed: {proc.stderr.strip().splitlines()[-1:]} |")
            continue
        r = json.loads(proc.stdout.strip().splitlines()[-1])
        per = r["size"] / (steps * args.groups)
        print(
            f"| {steps:,} | {r['kept']:,} | {r['size'] / 2**20:,.0f} MiB | {per:.2f} | {r['record_s']:.0f} s | {r['save_s']:.1f} s | "
            f"{r['load_s']:.1f} s | {r['grown'] / 2**20:.0f} MiB / {r['limit'] / 2**20:.0f} MiB |",
            flush=True,
        )


if __name__ == "__main__":
    main()
