"""Command line: ``neural-mechanics demo`` (train, track, report) and ``neural-mechanics report``
(redraw a report from saved runs). Also :func:`demo`, the same as a Python function.

The demo trains the three image classifiers of ``models`` on the packaged digits and the
character-level GPT of ``models_gpt`` on Python's documentation twice (AdamW, then SGD with
momentum); ``--model`` picks some of them.

Every user error (a bad option value, an unknown model, unreadable data, a bad run file, a folder
that cannot be written) ends the command with one line on stderr, ``neural-mechanics: error:
...``, and exit code 2, without a traceback; Ctrl-C exits with 130."""

from __future__ import annotations

import argparse
import os
import sys
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from .errors import InvalidArgumentError, NeuralMechanicsError

# Steps per run: the image classifiers, and the GPT (each of its two runs).
QUICK_STEPS = 150
DEFAULT_STEPS = 1500
GPT_QUICK_STEPS = 60
GPT_DEFAULT_STEPS = 400
IMAGE_MODELS = ("vgg_bn", "vgg", "mlp")
GPT_MODELS = ("gpt_adamw", "gpt_sgd")  # models_gpt.GPT_RECIPES: the same GPT, two optimizers
DEFAULT_MODELS = IMAGE_MODELS + GPT_MODELS
# Names --model also takes for several runs at once.
MODEL_ALIASES: dict[str, tuple[str, ...]] = {"gpt": GPT_MODELS, "digits": IMAGE_MODELS, "all": DEFAULT_MODELS}


def resolve_models(names: Sequence[str] | str) -> tuple[str, ...]:
    """The runs that ``names`` ask for, in the demo's order, each once: model names
    (``vgg_bn``, ``vgg``, ``mlp``, ``gpt_adamw``, ``gpt_sgd``), aliases (``gpt``: both GPT
    runs; ``digits``: the three classifiers; ``all``) and comma-separated lists of them."""
    items = [names] if isinstance(names, str) else list(names)
    wanted: set[str] = set()
    for item in items:
        for name in filter(None, (part.strip() for part in str(item).split(","))):
            if name in MODEL_ALIASES:
                wanted.update(MODEL_ALIASES[name])
            elif name in DEFAULT_MODELS:
                wanted.add(name)
            else:
                raise InvalidArgumentError(f"unknown model {name!r}; one of {', '.join(DEFAULT_MODELS)}, or {', '.join(MODEL_ALIASES)}")
    if not wanted:
        raise InvalidArgumentError("no model to train")
    return tuple(m for m in DEFAULT_MODELS if m in wanted)


def demo(
    out: str | os.PathLike[str] = "nm-report",
    *,
    steps: int | None = None,
    quick: bool = False,
    data: Any = None,
    models: Sequence[str] | str = DEFAULT_MODELS,
    progress: bool = True,
    image_size: int = 8,
    text: Any = None,
    trust_data: bool = False,
) -> Path:
    """Train the demo's models, tracked, and write the report folder ``out``; returns the path of
    its index.html.

    ``models``: see :func:`resolve_models` (default: all five runs). The image classifiers train
    on ``data`` with the reference SGD recipe (``models.Recipe``); ``data``: None (the packaged
    digits), an ImageFolder directory, a .pt file, a ``data_sources.DataSource`` or any torch
    Dataset. The GPT trains on ``text``: None (Python's documentation, ``pydoc_data.topics``), a
    UTF-8 file or a ``data_sources.TextSource``, with the recipes of ``models_gpt.GPT_RECIPES``.
    ``steps``: per run (default 1500 for the classifiers and 400 for the GPT; 150 and 60 with
    ``quick``). ``trust_data``: load a .pt file that holds more than tensors (a pickled Dataset),
    which runs code from the file (see ``data_sources.load``).
    """
    from . import data_sources
    from .report import write_report

    names = resolve_models(models)
    images = [m for m in names if m in IMAGE_MODELS]
    gpts = [m for m in names if m in GPT_MODELS]
    if steps is not None and (isinstance(steps, bool) or not isinstance(steps, int) or steps < 2):
        raise InvalidArgumentError(f"steps must be an integer of at least 2, got {steps!r}")
    if data is not None and not images:
        raise InvalidArgumentError(f"--data is for the image classifiers ({', '.join(IMAGE_MODELS)}), and none of them is trained")
    if text is not None and not gpts:
        raise InvalidArgumentError(f"--text is for the GPT ({', '.join(GPT_MODELS)}), and it is not trained")
    image_size = data_sources.check_image_size(image_size)
    # Every source is read before anything trains: a bad --text fails at once, not after the classifiers.
    source = corpus = None
    if images:
        if isinstance(data, data_sources.DataSource):
            source = data
        elif data is None or isinstance(data, (str, os.PathLike)):
            source = data_sources.load(data, image_size=image_size, trust=trust_data)
        else:
            source = data_sources.from_dataset(data)
    if gpts:
        corpus = text if isinstance(text, data_sources.TextSource) else data_sources.load_text(text)
    runs: dict[str, Any] = {}
    lines: dict[str, str] = {}
    if source is not None:
        from . import models as zoo

        recipe = zoo.Recipe(steps=steps if steps is not None else (QUICK_STEPS if quick else DEFAULT_STEPS))
        line = f"Data: {source!r}." + (f" {source.credit}." if source.credit else "")
        for name in images:
            runs[name] = zoo.train(name, source, recipe, progress=progress).run
            lines[name] = line
    if corpus is not None:
        import dataclasses

        from . import models_gpt

        n_steps = steps if steps is not None else (GPT_QUICK_STEPS if quick else GPT_DEFAULT_STEPS)
        line = (f"Data: {corpus!r}; the first {len(corpus.train):,} characters train, the last {len(corpus.val):,} validate."
                + (f" {corpus.credit}." if corpus.credit else ""))
        for name in gpts:
            recipe_gpt = dataclasses.replace(models_gpt.GPT_RECIPES[name], steps=n_steps)
            runs[name] = models_gpt.train_gpt(name, corpus, recipe_gpt, progress=progress).run
            lines[name] = line
    for order, (name, run) in enumerate(runs.items()):
        # What the report prints above the figures, saved with each run, so that
        # `neural-mechanics report runs/*.nmrun` redraws the same page in the same order.
        run.info.update(order=order, data=lines[name])
    return write_report(runs, out, title="neural-mechanics demo")


def _cmd_demo(args: argparse.Namespace) -> int:
    if args.image_size is not None and args.data is None:
        raise InvalidArgumentError("--image-size applies to --data (the packaged digits are 8x8)")
    _limit_threads(args.threads)
    start = time.perf_counter()
    index = demo(
        args.out,
        steps=args.steps,
        quick=args.quick,
        data=args.data,
        models=args.model,
        progress=not args.no_progress,
        image_size=8 if args.image_size is None else args.image_size,
        text=args.text,
        trust_data=args.trust_data,
    )
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


class _Parser(argparse.ArgumentParser):
    """argparse with one-line errors: ``neural-mechanics: error: ...`` and exit code 2 (the
    default prints the usage block first)."""

    def error(self, message: str) -> Any:  # argparse's signature returns NoReturn
        _fail(f"{message} (see {self.prog} --help)")


def _fail(message: str) -> Any:
    sys.stderr.write(f"neural-mechanics: error: {' '.join(str(message).split())}\n")
    sys.exit(2)


def _integer(least: int, most: int | None = None) -> Any:
    """An argparse type: an integer in [least, most]."""

    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected an integer, got {text!r}") from None
        if value < least or (most is not None and value > most):
            raise argparse.ArgumentTypeError(f"expected an integer from {least}" + (f" to {most}" if most is not None else " up") + f", got {value}")
        return value

    parse.__name__ = "integer"
    return parse


def build_parser() -> argparse.ArgumentParser:
    from .data_sources import MAX_IMAGE_SIZE, MIN_IMAGE_SIZE

    parser = _Parser(
        prog="neural-mechanics",
        description="Symmetries, conserved charges and their breaking, measured while a model trains.",
    )
    sub = parser.add_subparsers(dest="command", required=True)

    d = sub.add_parser("demo", help="train the reference models and a small GPT (tracked) and write a report folder")
    d.add_argument("--out", default="nm-report", help="report folder (default: nm-report)")
    d.add_argument(
        "--model",
        nargs="+",
        default=list(DEFAULT_MODELS),
        metavar="NAME",
        help=f"which runs to train: {', '.join(DEFAULT_MODELS)}, or gpt (both GPT runs), digits (the three classifiers), "
        "all; space- or comma-separated (default: all)",
    )
    d.add_argument("--quick", action="store_true", help=f"{QUICK_STEPS} steps per classifier, {GPT_QUICK_STEPS} per GPT run (tests, a first look)")
    d.add_argument("--steps", type=_integer(2), default=None,
                   help=f"steps per run (default {DEFAULT_STEPS} per classifier, {GPT_DEFAULT_STEPS} per GPT run)")
    d.add_argument("--data", default=None, help="the classifiers' data: an ImageFolder directory or a .pt file (a Dataset or (inputs, labels)); default: the packaged digits")
    d.add_argument(
        "--trust-data",
        action="store_true",
        help="also load a .pt file that holds more than tensors (a pickled Dataset): unpickling it runs code "
        "from the file, so pass this only for files whose author you trust (without it, torch.load(weights_only=True))",
    )
    d.add_argument(
        "--image-size",
        type=_integer(MIN_IMAGE_SIZE, MAX_IMAGE_SIZE),
        default=None,
        help=f"images of --data are resized to this square, {MIN_IMAGE_SIZE} to {MAX_IMAGE_SIZE} (default 8)",
    )
    d.add_argument("--text", default=None, help="the GPT's text: a UTF-8 file; default: Python's documentation (the standard library's pydoc_data.topics)")
    d.add_argument("--threads", type=_integer(1, 4096), default=None, help="torch intra-op threads (default 1: fastest for these small models)")
    d.add_argument("--no-progress", action="store_true", help="no progress bars")
    d.set_defaults(func=_cmd_demo)

    r = sub.add_parser("report", help="draw the report's figures and tables from saved runs, without training")
    r.add_argument("runs", nargs="+", help="saved run files (.nmrun), e.g. nm-report/runs/*.nmrun, or a report folder (its runs/)")
    r.add_argument("--out", default="nm-report-redrawn", help="report folder (default: nm-report-redrawn)")
    r.set_defaults(func=_cmd_report)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Run the command line; returns the exit code (0, 2 for a user error, 130 on Ctrl-C)."""
    try:
        args = build_parser().parse_args(argv)
        return int(args.func(args))
    except SystemExit as exc:  # argparse: --help (0) and the one-line errors of _Parser (2)
        return exc.code if isinstance(exc.code, int) else 2
    except (NeuralMechanicsError, OSError) as exc:
        # The library's errors are about the input; an OSError here is a file or folder that
        # cannot be read or written (--out, --data, --text, a run file).
        sys.stderr.write(f"neural-mechanics: error: {' '.join(str(exc).split()) or type(exc).__name__}\n")
        return 2
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130
