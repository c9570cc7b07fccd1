"""Wall time of find_symmetries on torchvision vgg16_bn (CPU), or on the small GPT of
bench_overhead.py (``--model gpt``: token ids (16, 32), ``class_axis=-1``).

    python benchmarks/bench_discovery.py [--repeats 7] [--model vgg16_bn] [--size 224]
    python benchmarks/bench_discovery.py --model gpt

Prints the median (and min/max) of the repeats after one warm-up call; model construction is not
timed. The trace runs on the meta device, so the input size barely matters.
"""

import argparse
import statistics
import sys
import time

import torch
import torchvision


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--repeats", type=int, default=7)
    ap.add_argument("--model", default="vgg16_bn")
    ap.add_argument("--size", type=int, default=224)
    args = ap.parse_args()
    import neural_mechanics as nm

    if args.model == "gpt":
        from bench_overhead import GPT

        model, x, axis = GPT(), torch.randint(0, 128, (16, 32)), -1
        shape = "16x32 tokens"
    else:
        model, x, axis = getattr(torchvision.models, args.model)(), torch.randn(1, 3, args.size, args.size), 1
        shape = f"1x3x{args.size}x{args.size}"
    sym = nm.find_symmetries(model, x, class_axis=axis)  # warm-up (imports, first-call costs)
    times = []
    for _ in range(args.repeats):
        t0 = time.perf_counter()
        sym = nm.find_symmetries(model, x, class_axis=axis)
        times.append(time.perf_counter() - t0)
    print(f"command: python {' '.join(sys.argv)}")
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads")
    print(f"{args.model} input {shape}: {len(sym)} groups, {len(sym.skipped)} skipped")
    print(f"find_symmetries median {statistics.median(times) * 1e3:.0f} ms "
          f"(min {min(times) * 1e3:.0f}, max {max(times) * 1e3:.0f}, {args.repeats} repeats)")


if __name__ == "__main__":
    main()
