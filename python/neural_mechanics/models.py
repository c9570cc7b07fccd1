"""Reference models sized for small images (the packaged 8x8 digits by default).

Each model is built so that the symmetry the demo plots from it really exists
(docs/theory.md §2), which ``find_symmetries`` confirms (tests/test_demo.py checks it):

- ``vgg_bn``: Conv → BatchNorm → ReLU blocks, a Linear classifier.
  Translation: the classifier's columns (softmax). Scale: every conv before a BatchNorm.
  Rescale: each BatchNorm's (γ_i, β_i) pair against the next conv's input channel i.
- ``vgg``: the same without BatchNorm. Rescale: each conv's output channel i against the next
  conv's (or the classifier's) input channel i, across ReLU and max pooling. No scale groups.
- ``mlp``: Linear → ReLU layers. Translation on the classifier, rescale per hidden unit.

The convolutions keep biases even before BatchNorm: the bias then has zero gradient and is a
translation group of its own, which the tracker simply records.
"""

from __future__ import annotations

import time
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch.nn as nn

from .errors import InvalidArgumentError, ShapeError

# (conv widths, pool after this block?) per block: two 8x8 blocks then one 4x4 block, ending 2x2,
# so the classifier reads 2·2·width features. Small enough for a few hundred steps a second on
# two CPU cores, large enough that every channel moves visibly.
VGG_BLOCKS: tuple[tuple[int, bool], ...] = ((16, False), (16, True), (32, True))


def _vgg(in_channels: int, image_size: int, num_classes: int, batch_norm: bool, blocks: tuple[tuple[int, bool], ...]) -> nn.Sequential:
    # Named modules, so that runs, tables and figures say "conv2" and "classifier", not "3".
    layers: list[tuple[str, nn.Module]] = []
    channels, size = in_channels, image_size
    for i, (width, pool) in enumerate(blocks, start=1):
        layers.append((f"conv{i}", nn.Conv2d(channels, width, 3, padding=1)))
        if batch_norm:
            layers.append((f"bn{i}", nn.BatchNorm2d(width)))
        layers.append((f"relu{i}", nn.ReLU()))
        if pool:
            layers.append((f"pool{i}", nn.MaxPool2d(2)))
            size //= 2
        channels = width
    if size < 1:
        raise ShapeError(f"image_size {image_size} is too small for {sum(p for _, p in blocks)} poolings")
    layers += [("flatten", nn.Flatten()), ("classifier", nn.Linear(channels * size * size, num_classes))]
    return nn.Sequential(OrderedDict(layers))


def vgg_bn(in_channels: int = 1, image_size: int = 8, num_classes: int = 10, blocks: tuple[tuple[int, bool], ...] = VGG_BLOCKS) -> nn.Sequential:
    """VGG-style network with BatchNorm: (Conv3x3 → BN → ReLU [→ MaxPool2]) × blocks → Linear."""
    return _vgg(in_channels, image_size, num_classes, True, blocks)


def vgg(in_channels: int = 1, image_size: int = 8, num_classes: int = 10, blocks: tuple[tuple[int, bool], ...] = VGG_BLOCKS) -> nn.Sequential:
    """The same VGG-style network without BatchNorm (its rescale symmetry runs conv to conv)."""
    return _vgg(in_channels, image_size, num_classes, False, blocks)


def mlp(in_channels: int = 1, image_size: int = 8, num_classes: int = 10, hidden: tuple[int, ...] = (128, 64)) -> nn.Sequential:
    """ReLU MLP on flattened images: Flatten → (Linear → ReLU) × hidden → Linear."""
    layers: list[tuple[str, nn.Module]] = [("flatten", nn.Flatten())]
    width = in_channels * image_size * image_size
    for i, h in enumerate(hidden, start=1):
        layers += [(f"fc{i}", nn.Linear(width, h)), (f"relu{i}", nn.ReLU())]
        width = h
    layers.append(("classifier", nn.Linear(width, num_classes)))
    return nn.Sequential(OrderedDict(layers))


# name → (constructor, symmetries the demo expects find_symmetries to give it)
REFERENCE_MODELS: dict[str, tuple[Callable[..., nn.Module], tuple[str, ...]]] = {
    "vgg_bn": (vgg_bn, ("translation", "scale", "rescale")),
    "vgg": (vgg, ("translation", "rescale")),
    "mlp": (mlp, ("translation", "rescale")),
}


def build(name: str, **shape: Any) -> nn.Module:
    """A reference model by name (``vgg_bn``, ``vgg``, ``mlp``); ``shape``: in_channels,
    image_size, num_classes."""
    try:
        ctor = REFERENCE_MODELS[name][0]
    except KeyError:
        raise InvalidArgumentError(f"unknown reference model {name!r}; one of {sorted(REFERENCE_MODELS)}") from None
    return ctor(**shape)


# -- the reference recipe --------------------------------------------------------------------
@dataclass
class Recipe:
    """The demo's SGD recipe (torch.optim.SGD with coupled weight decay, one learning-rate step)."""

    steps: int = 1500
    lr: float = 0.05
    momentum: float = 0.9
    weight_decay: float = 5e-4
    batch_size: int = 64
    lr_step_at: float = 0.75  # the learning rate is multiplied by lr_gamma after this fraction of steps
    lr_gamma: float = 0.1
    seed: int = 0

    @property
    def milestone(self) -> int | None:
        """The step from which the learning rate is multiplied by ``lr_gamma`` (None: no step)."""
        return max(1, int(round(self.steps * self.lr_step_at))) if self.lr_step_at < 1 else None

    def describe(self) -> str:
        """The recipe in one sentence, as the report prints it."""
        step = f" (× {self.lr_gamma:g} at step {self.milestone})" if self.milestone is not None else ""
        return (
            f"Recipe: torch.optim.SGD, lr {self.lr:g}{step}, momentum {self.momentum:g}, weight decay {self.weight_decay:g}, "
            f"batch {self.batch_size}, {self.steps} steps, seed {self.seed}; every symmetry group tracked from the first "
            "step with `neural_mechanics.track`."
        )


@dataclass
class Trained:
    """What training one reference model gives: the tracked run and a few plain numbers."""

    name: str
    run: Any  # neural_mechanics.Run
    model: nn.Module
    seconds: float
    final_loss: float
    train_accuracy: float
    test_accuracy: float
    recipe: Recipe = field(default_factory=Recipe)

    def table_row(self) -> dict[str, Any]:
        """This model's row of the report's training table."""
        return {
            "model": self.name,
            "parameters": sum(p.numel() for p in self.model.parameters()),
            "groups": len(self.run.groups),
            "steps": self.recipe.steps,
            "seconds": round(self.seconds, 1),
            "final loss": self.final_loss,
            "train accuracy": self.train_accuracy,
            "test accuracy": self.test_accuracy,
        }


def train(name: str, source: Any, recipe: Recipe | None = None, *, progress: bool = True, position: int = 0) -> Trained:
    """Train reference model ``name`` on ``source`` (a ``data_sources.DataSource``) with
    ``recipe``, tracked with ``neural_mechanics.track`` from the first step; a tqdm bar shows
    the steps unless ``progress`` is False."""
    import torch
    import torch.nn.functional as F

    # Plain tqdm, not tqdm.auto: the notebook widget needs ipywidgets, which is not a dependency.
    from tqdm import tqdm

    from .data_sources import batches, evaluate
    from .tracking import track

    recipe = recipe or Recipe()
    torch.manual_seed(recipe.seed)
    model = build(name, **source.shape)
    opt = torch.optim.SGD(model.parameters(), lr=recipe.lr, momentum=recipe.momentum, weight_decay=recipe.weight_decay)
    # lr_step_at >= 1 means no step inside the run.
    milestones = [recipe.milestone] if recipe.milestone is not None else []
    sched = torch.optim.lr_scheduler.MultiStepLR(opt, milestones=milestones, gamma=recipe.lr_gamma)
    data = batches(source.train, recipe.batch_size, seed=recipe.seed)
    start = time.perf_counter()
    loss = torch.tensor(float("nan"))
    bar = tqdm(range(recipe.steps), desc=f"{name:>7}", unit="step", disable=not progress, position=position, leave=True)
    with track(model, opt) as tracker:
        for step in bar:
            x, y = next(data)
            loss = F.cross_entropy(model(x), y)
            opt.zero_grad()
            loss.backward()
            lr = opt.param_groups[0]["lr"]
            opt.step()
            sched.step()
            if step % 50 == 0 or step == recipe.steps - 1:
                bar.set_postfix(loss=f"{loss.item():.3f}", lr=f"{lr:.3g}")
        run = tracker.run  # its last row, the final charges, is measured when the block closes
    seconds = time.perf_counter() - start
    bar.close()
    trained = Trained(
        name=name,
        run=run,
        model=model,
        seconds=seconds,
        final_loss=float(loss.item()),
        train_accuracy=evaluate(model, source.train),
        test_accuracy=evaluate(model, source.test),
        recipe=recipe,
    )
    # Saved with the run, so that a report redrawn from the file shows the same training table.
    run.info["training"] = list(map(list, trained.table_row().items()))  # pairs: a saved run's JSON keeps no key order
    run.info["recipe"] = recipe.describe()
    return trained
