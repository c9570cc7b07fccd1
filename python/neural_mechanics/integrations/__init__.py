"""Where researchers already look: loggers, trainers and a live notebook view (docs/integrations.md).

Nothing heavy is imported here, so that ``import neural_mechanics`` works without torch,
tensorboard, wandb, Lightning or transformers. Each integration module imports its package when
it is used, and says which extra to install when it is missing:

- ``scalars``      the per-layer scalars that the loggers and the live view share (numpy only);
- ``observers``    the tracker's callback list: called after each committed row, and at close;
- ``loggers``      TensorBoard (``SummaryWriter``), wandb runs and Lightning loggers as sinks;
- ``live``         ``tracker.live()`` / ``nm.live(tracker)``: a figure and a progress line in Jupyter;
- ``lightning``    ``NeuralMechanicsCallback`` for ``pytorch_lightning`` / ``lightning.pytorch``;
- ``huggingface``  ``NeuralMechanicsCallback`` for ``transformers.Trainer``.
"""

from __future__ import annotations

import importlib
from types import ModuleType

from ..errors import MissingDependencyError

# The extra of pyproject.toml that installs each optional package.
EXTRAS = {
    "torch": "torch",
    "pandas": "analysis",
    "matplotlib": "analysis",
    "polars": "dataframes",
    "pyarrow": "dataframes",
    "tensorboard": "tensorboard",
    "wandb": "wandb",
    "pytorch_lightning": "lightning",
    "lightning": "lightning",
    "transformers": "huggingface",
    "accelerate": "huggingface",
}


def require(module: str, what: str) -> ModuleType:
    """``importlib.import_module(module)``, or a MissingDependencyError naming the extra to install."""
    try:
        return importlib.import_module(module)
    except ImportError as exc:
        top = module.split(".")[0]
        extra = EXTRAS.get(top, "integrations")
        raise MissingDependencyError(f"{what} needs the package {top!r}, which is not installed: pip install 'neural-mechanics[{extra}]'") from exc


__all__ = ["require", "EXTRAS"]
