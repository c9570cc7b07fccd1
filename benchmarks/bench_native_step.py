"""The native step alone: median time of ``TrackerCore.step_sgd`` / ``step_update`` per step.

Trains the acceptance network (Conv–BN–ReLU, Conv–ReLU–pool, Linear–ReLU–Linear on the packaged
digits, batch 64, one torch thread) tracked every step and times the one native call per step
that turns the fused sums into the run's row (the rest of the row's cost, the reduction, is
bench_overhead's). Run it once per build to compare builds side by side, e.g. the installed
package against another one put first on PYTHONPATH:

    python benchmarks/bench_native_step.py [--steps 200]
"""

from __future__ import annotations

import argparse
import statistics
import time
from typing import Any

import torch
import torch.nn.functional as F
from bench_overhead import acceptance_net  # the same network as the overhead grid

import neural_mechanics as nm


class TimedCore:
    """The tracker's native core, its ``step_*`` calls timed."""

    def __init__(self, core: Any):
        self.core, self.seconds = core, []

    def __getattr__(self, name: str) -> Any:
        call = getattr(self.core, name)
        if not name.startswith("step_"):
            return call

        def timed(*args: Any, **kwargs: Any) -> Any:
            start = time.perf_counter()
            out = call(*args, **kwargs)
            self.seconds.append(time.perf_counter() - start)
            return out

        return timed


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--steps", type=int, default=200)
    args = ap.parse_args()
    torch.set_num_threads(1)
    x, y = nm.load_digits()
    optimizers = {
        "SGD (momentum 0.9)": lambda p: torch.optim.SGD(p, lr=0.05, momentum=0.9, weight_decay=5e-4),
        "AdamW": lambda p: torch.optim.AdamW(p, lr=3e-3, weight_decay=0.05),
    }
    for name, make in optimizers.items():
        torch.manual_seed(0)
        model = acceptance_net()
        opt = make(model.parameters())
        g = torch.Generator().manual_seed(0)
        tracker = nm.track(model, opt)
        core = None
        start = 0.0
        for step in range(args.steps + 1):
            if step == 1:  # the groups are set up at the first forward: time from the second step
                core = tracker._path.core = TimedCore(tracker._path.core)
                start = time.perf_counter()
            idx = torch.randint(0, len(x), (64,), generator=g)
            opt.zero_grad()
            F.cross_entropy(model(x[idx]), y[idx]).backward()
            opt.step()
        per_step = (time.perf_counter() - start) / args.steps
        tracker.close()
        native = statistics.median(core.seconds) if core is not None else float("nan")
        print(f"{name}: {len(tracker.run.groups)} groups; native step median {native * 1e6:.1f} us; "
              f"tracked step {per_step * 1e3:.2f} ms ({100 * native / per_step:.2f}%)")


if __name__ == "__main__":
    main()
