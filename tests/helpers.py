"""Data, models and the seeded training loop that several test files share.

Plain functions (``from helpers import ...``; tests/conftest.py puts this folder on sys.path), so
that module-level constants and module-scoped fixtures can use them too. Every builder seeds
torch where the tests that share it always did, so the runs they give are the ones the tests'
tolerances were measured on.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
import torch.nn as nn
import torch.nn.functional as F

import neural_mechanics as nm


def digits(*, flatten: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
    """The packaged digits, normalised: (1797, 1, 8, 8) images, or (1797, 64) with ``flatten``."""
    return nm.load_digits(flatten=flatten)


def bn_mlp(hidden: tuple[int, ...] = (32, 32), *, seed: int = 1) -> nn.Sequential:
    """An MLP on flattened digits with all three symmetries: Linear(64, h₁) → BatchNorm1d → ReLU,
    (Linear → ReLU) for each further width, Linear(·, 10); initialised from ``seed``."""
    torch.manual_seed(seed)
    layers: list[nn.Module] = [nn.Linear(64, hidden[0]), nn.BatchNorm1d(hidden[0]), nn.ReLU()]
    for width_in, width_out in zip(hidden, hidden[1:]):
        layers += [nn.Linear(width_in, width_out), nn.ReLU()]
    layers.append(nn.Linear(hidden[-1], 10))
    return nn.Sequential(*layers)


def acceptance_net() -> nn.Module:
    """The conv + BatchNorm network of the tracking acceptance test, on (1, 8, 8) digits (the
    caller seeds torch): Conv → BN → ReLU, Conv → ReLU → MaxPool, Linear → ReLU → Linear."""
    return nn.Sequential(
        nn.Conv2d(1, 16, 3, padding=1),
        nn.BatchNorm2d(16),
        nn.ReLU(),
        nn.Conv2d(16, 32, 3, padding=1),
        nn.ReLU(),
        nn.MaxPool2d(2),
        nn.Flatten(),
        nn.Linear(32 * 4 * 4, 64),
        nn.ReLU(),
        nn.Linear(64, 10),
    )


def sgd(**kw: Any) -> Callable[[nn.Module], torch.optim.SGD]:
    """An optimizer factory: torch.optim.SGD with lr 0.05, momentum 0.9, weight decay 5e-4,
    overridden by ``kw``."""
    args = dict(lr=0.05, momentum=0.9, weight_decay=5e-4) | kw
    return lambda m: torch.optim.SGD(m.parameters(), **args)


def train_steps(
    model: nn.Module,
    opt: torch.optim.Optimizer,
    x: torch.Tensor,
    y: torch.Tensor,
    steps: int,
    *,
    batch: int = 32,
    seed: int = 0,
    accumulate: int = 1,
    scheduler: Any = None,
) -> None:
    """``steps`` optimizer steps of cross-entropy on random minibatches of (x, y), drawn from a
    generator seeded with ``seed`` on x's device; ``accumulate`` backward passes per step, then
    ``scheduler.step()`` if given."""
    g = torch.Generator(device=x.device).manual_seed(seed)
    for _ in range(steps):
        opt.zero_grad()
        for _ in range(accumulate):
            idx = torch.randint(0, len(x), (batch,), generator=g, device=x.device)
            F.cross_entropy(model(x[idx]), y[idx]).backward()
        opt.step()
        if scheduler is not None:
            scheduler.step()
