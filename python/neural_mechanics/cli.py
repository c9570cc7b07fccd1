"""Command line: ``neural-mechanics demo`` (train, track, report) and ``neural-mechanics report``
(redraw a report from saved runs). Also :func:`demo`, the same as a Python function."""

from __future__ import annotations

import argparse
import os
import sys
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from .errors import InvalidArgumentError

QUICK_STEPS = 150
DEFAULT_STEPS = 1500
DEFAULT_MODELS = ("vgg_bn", "vgg", "mlp")


def demo(
    out: str | os.PathLike[str] = "nm-report",
    *,
    steps: int | None = None,
    quick: bool = False,
    data: Any = None,
    models: Sequence[str] = DEFAULT_MODELS,
    progress: bool = True,
    image_size: int = 8,
) -> Path:
    """Train the reference models on ``data`` with the reference SGD recipe, tracked, and write
    the report folder ``out``; returns the path of its index.html.

    ``data``: None (the packaged digits), an ImageFolder directory, a .pt file, a
    ``data_sources.DataSource`` or any torch Dataset. ``steps``: per model (default 1500, or 150
    with ``quick``).
    """
    from . import data_sources
    from . import models as zoo
    from .report import write_report

    if isinstance(data, data_sources.DataSource):
        source = data
    elif data is None or isinstance(data, (str, os.PathLike)):
        source = data_sources.load(data, image_size=image_size)
    else:
        source = data_sources.from_dataset(data)
    n_steps = steps if steps is not None else (QUICK_STEPS if quick else DEFAULT_STEPS)
    if n_steps < 2:
        raise InvalidArgumentError(f"steps must be at least 2, got {n_steps}")
    recipe = zoo.Recipe(steps=n_steps)
    trained = [zoo.train(name, source, recipe, progress=progress) for name in models]
    data_line = f"Data: {source!r}." + (f" {source.credit}." if source.credit else "")
    for order, t in enumerate(trained):
        # What the report prints above the figures, saved with each run, so that
        # `neural-mechanics report runs/*.nmrun` redraws the same page in the same order.
        t.run.info.update(order=order, data=data_line)
    return write_report({t.name: t.run for t in trained}, out, title="neural-mechanics demo")


def _cmd_demo(args: argparse.Namespace) -> int:
    _limit_threads(args.threads)
    start = time.perf_counter()
    index = demo(args.out, steps=args.steps, quick=args.quick, data=args.data, progress=not args.no_progress, image_size=args.image_size)
    print(f"\nReport written in {time.perf_counter() - start:.0f} s: {index.resolve()}")
    print(f"(Markdown: {index.with_suffix('.md').resolve()})")
    return 0


def _cmd_report(args: argparse.Namespace) -> int:
    from .report import Block, load_runs, write_report

    runs = load_runs(args.runs)
    intro = [Block("p", "Redrawn from saved runs: " + ", ".join(f"`{os.fspath(p)}`" for p in args.runs) + ".")]
    index = write_report(runs, args.out, title="neural-mechanics report", intro=intro, save_runs=False)
    print(f"Report written: {index.resolve()}")
    print(f"(Markdown: {index.with_suffix('.md').resolve()})")
    return 0


def _limit_threads(threads: int | None) -> None:
    """The reference models are tiny: one intra-op thread is faster than several (less
    synchronisation) and leaves the other cores to the rest of the machine."""
    import torch

    torch.set_num_threads(threads or 1)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="neural-mechanics",
        description="Symmetries, conserved charges and their breaking, measured while a model trains.",
    )
    sub = parser.add_subparsers(dest="command", required=True)

    d = sub.add_parser("demo", help="train the reference models (tracked) and write a report folder")
    d.add_argument("--out", default="nm-report", help="report folder (default: nm-report)")
    d.add_argument("--quick", action="store_true", help=f"{QUICK_STEPS} steps per model (tests, a first look)")
    d.add_argument("--steps", type=int, default=None, help=f"steps per model (default {DEFAULT_STEPS}; {QUICK_STEPS} with --quick)")
    d.add_argument("--data", default=None, help="an ImageFolder directory or a .pt file (a Dataset or (inputs, labels)); default: the packaged digits")
    d.add_argument("--image-size", type=int, default=8, help="images of --data are resized to this square (default 8)")
    d.add_argument("--threads", type=int, default=None, help="torch intra-op threads (default 1: fastest for these small models)")
    d.add_argument("--no-progress", action="store_true", help="no progress bars")
    d.set_defaults(func=_cmd_demo)

    r = sub.add_parser("report", help="draw the report's figures and tables from saved runs, without training")
    r.add_argument("runs", nargs="+", help="saved run files (.nmrun), e.g. nm-report/runs/*.nmrun")
    r.add_argument("--out", default="nm-report-redrawn", help="report folder (default: nm-report-redrawn)")
    r.set_defaults(func=_cmd_report)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return int(args.func(args))
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130
