"""Integrations' costs: Run → DataFrames on a 10⁶-row run, and the live view's overhead.

(a) ``to_pandas``, ``to_arrow``, ``to_polars`` and ``to_parquet`` of a run whose long table has
    10⁶ rows (10,000 recorded steps × 100 groups, in memory), interleaved round by round; the
    table gives the median and the minimum per call and the median ratio to ``to_pandas``.

(b) The live view (``tracker.live()`` at its defaults: every=25, budget 2%) on the tracking
    acceptance network (digits, batch 64, CPU, SGD, tracked every step), against the same
    tracked loop without it, in interleaved blocks of steps on two models (the order rotates
    from round to round); the figure is the
    median over blocks of the per-step time with the view divided by the median without. The
    frames are drawn and encoded as PNG (the real cost) and dropped instead of being sent to a
    notebook. The view's redraw budget runs on a clock that is paused while the other
    configuration's blocks run, so that it sees the same time it would in an uninterrupted
    loop. A third configuration calls ``tracker.live()`` outside a notebook (inactive: nothing
    is attached). Drift-free second figure: the time spent inside the live view's callbacks
    (per-row bookkeeping, sampling and every redraw) over the rest of the live configuration's
    step time.

    python benchmarks/bench_dataframes.py                 # both, default sizes
    python benchmarks/bench_dataframes.py --skip live     # (a) only
    python benchmarks/bench_dataframes.py --rows 10000000 # (a) on 10⁷ rows
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
import time

import numpy as np

from neural_mechanics.run import COLUMNS, GroupInfo, Run


def synthetic_run(rows: int, groups: int = 100) -> Run:
    steps = rows // groups
    third = groups // 3
    info = GroupInfo(
        symmetry=np.array(["scale"] * third + ["translation"] * third + ["rescale"] * (groups - 2 * third), dtype=object),
        layer=np.array([f"features.{(7 * i) % 12}" for i in range(groups)], dtype=object),
        index=np.arange(groups, dtype=np.int64),
        label=np.array([f"unit {i}" for i in range(groups)], dtype=object),
        size=np.ones(groups, dtype=np.int64),
    )
    run = Run(groups=info, optimizer="SGD")
    block = np.random.default_rng(0).standard_normal((steps, len(COLUMNS), groups))
    for s in range(steps):
        run.append_row(s, 0.1 * s, block[s])
    return run


def bench_dataframes(rows: int, rounds: int) -> dict:
    run = synthetic_run(rows)
    folder = tempfile.mkdtemp(prefix="nm-bench-")
    contenders = {
        "to_pandas": run.to_pandas,
        "to_arrow": run.to_arrow,
        "to_polars": run.to_polars,
        "to_parquet": lambda: run.to_parquet(os.path.join(folder, "run.parquet")),
    }
    for f in contenders.values():  # warm-up (imports, caches)
        f()
    times: dict[str, list[float]] = {k: [] for k in contenders}
    for _ in range(rounds):
        for name, f in contenders.items():
            start = time.perf_counter()
            f()
            times[name].append(time.perf_counter() - start)
    base = statistics.median(times["to_pandas"])
    out = {"rows": rows, "rounds": rounds, "parquet_bytes": os.path.getsize(os.path.join(folder, "run.parquet"))}
    print(f"\n(a) long table of {rows:,} rows ({rows // 100:,} steps x 100 groups), {rounds} interleaved rounds")
    print(f"{'call':<12}{'median ms':>12}{'min ms':>10}{'vs to_pandas':>15}")
    for name, ts in times.items():
        med = statistics.median(ts)
        out[name] = {"median_s": med, "min_s": min(ts), "ratio_to_pandas": med / base}
        print(f"{name:<12}{1e3 * med:>12.1f}{1e3 * min(ts):>10.1f}{med / base:>14.3f}x")
    print(f"parquet file: {out['parquet_bytes'] / 2**20:.1f} MiB")
    return out


class PausableClock:
    """perf_counter minus the time spent while paused."""

    def __init__(self) -> None:
        self.paused_total = 0.0
        self.paused_at: float | None = None

    def __call__(self) -> float:
        return (self.paused_at or time.perf_counter()) - self.paused_total

    def pause(self) -> None:
        self.paused_at = time.perf_counter()

    def resume(self) -> None:
        if self.paused_at is not None:
            self.paused_total += time.perf_counter() - self.paused_at
            self.paused_at = None


def bench_live(blocks: int, steps: int) -> dict:
    import torch
    import torch.nn as nn
    import torch.nn.functional as F

    import neural_mechanics as nm

    torch.set_num_threads(1)
    x, y = nm.load_digits()
    x, y = x[:64], y[:64]

    def net() -> nn.Module:
        torch.manual_seed(0)
        return nn.Sequential(
            nn.Conv2d(1, 16, 3, padding=1), nn.BatchNorm2d(16), nn.ReLU(),
            nn.Conv2d(16, 32, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2), nn.Flatten(),
            nn.Linear(32 * 4 * 4, 64), nn.ReLU(), nn.Linear(64, 10),
        )  # fmt: skip

    inside = [0.0]  # seconds spent in the live view's callbacks during the measured blocks
    clock = PausableClock()
    clock.pause()
    frames: list[int] = []
    configs = {}
    for name in ("tracked", "tracked + live", "tracked + live (not a notebook)"):
        model = net()
        opt = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9, weight_decay=5e-4)
        tracker = nm.track(model, opt)
        model(x)  # discovery
        view = None
        if name == "tracked + live":
            view = tracker.live(display=lambda png: frames.append(len(png)), clock=clock, progress=False)
            hooked = tracker._path.on_row  # the observers' call after each row: timed below

            def timed(step, t, row, hooked=hooked):
                start = time.perf_counter()
                hooked(step, t, row)
                inside[0] += time.perf_counter() - start

            tracker._path.on_row = timed
        elif name.endswith("(not a notebook)"):
            view = tracker.live()
            assert not view.active
        configs[name] = (model, opt, tracker, view)

    def block(model, opt) -> float:
        start = time.perf_counter()
        for _ in range(steps):
            loss = F.cross_entropy(model(x), y)
            opt.zero_grad()
            loss.backward()
            opt.step()
        return (time.perf_counter() - start) / steps

    for name, (model, opt, _, _) in configs.items():  # warm-up, and the live view's first frame
        if name == "tracked + live":
            clock.resume()
        block(model, opt)
        if name == "tracked + live":
            clock.pause()
    inside[0] = 0.0
    per_step: dict[str, list[float]] = {k: [] for k in configs}
    names = list(configs)
    for b in range(blocks):
        for name in names[b % len(names) :] + names[: b % len(names)]:  # the order rotates every round
            model, opt, _, _ = configs[name]
            if name == "tracked + live":
                clock.resume()
            per_step[name].append(block(model, opt))
            if name == "tracked + live":
                clock.pause()
    view = configs["tracked + live"][3]
    frames_in_blocks = view.frames
    live_total = sum(per_step["tracked + live"]) * steps
    for _, _, tracker, _ in configs.values():
        tracker.close()
    base = statistics.median(per_step["tracked"])
    hook_share = inside[0] / (live_total - inside[0])
    out: dict = {
        "blocks": blocks,
        "steps_per_block": steps,
        "frames": view.frames,
        "frames_in_blocks": frames_in_blocks - 1,
        "samples": view.samples,
        "png_bytes_median": statistics.median(frames),
        "live_callbacks_share": hook_share,
    }
    print(f"\n(b) live view at its defaults (every=25, budget=2%), acceptance net, batch 64, {blocks} interleaved blocks of {steps} steps")
    print(f"{'configuration':<34}{'median ms/step':>15}{'ratio':>8}")
    for name, ts in per_step.items():
        med = statistics.median(ts)
        out[name] = {"median_ms_per_step": 1e3 * med, "ratio": med / base}
        print(f"{name:<34}{1e3 * med:>15.3f}{med / base:>8.3f}")
    print(f"frames drawn during the blocks: {frames_in_blocks - 1} ({view.samples} samples over {blocks * steps:,} steps)")
    print(f"time inside the live view's callbacks (sampling and drawing included) / the rest of the step: {100 * hook_share:.2f}%")
    return out


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rows", type=int, default=1_000_000)
    parser.add_argument("--rounds", type=int, default=7)
    parser.add_argument("--blocks", type=int, default=15)
    parser.add_argument("--steps", type=int, default=300, help="steps per block of (b)")
    parser.add_argument("--skip", nargs="*", default=[], choices=["dataframes", "live"])
    parser.add_argument("--json", type=str, default=None, help="also write the results to this file")
    args = parser.parse_args(argv)
    import platform

    import pandas
    import polars
    import pyarrow

    print(f"python {platform.python_version()}, numpy {np.__version__}, pandas {pandas.__version__}, pyarrow {pyarrow.__version__}, polars {polars.__version__}, {os.cpu_count()} cores")
    results = {}
    if "dataframes" not in args.skip:
        results["dataframes"] = bench_dataframes(args.rows, args.rounds)
    if "live" not in args.skip:
        results["live"] = bench_live(args.blocks, args.steps)
    if args.json:
        with open(args.json, "w") as f:
            json.dump(results, f, indent=2)
    return 0


if __name__ == "__main__":
    sys.exit(main())
