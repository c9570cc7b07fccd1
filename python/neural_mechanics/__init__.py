"""neural-mechanics: the physics of neural-network training, measured while a model trains.

Symmetries of an architecture (translation, scale, rescale) conserve one number per neuron under
gradient flow; real SGD breaks the conservation in ways that closed forms predict (Kunin et al.,
"Neural Mechanics", ICLR 2021). This package finds the symmetries, measures the charges at every
step with a fused Rust kernel, and compares them with theory.
"""

from . import errors
from ._native import __version__
from .datasets import load_digits
from .errors import (
    DeviceError,
    DTypeError,
    InvalidArgumentError,
    NeuralMechanicsError,
    NonFiniteError,
    NothingToTrackError,
    ShapeError,
)
from .stats import SUM_NAMES, group_stats, group_stats_batch
from .threads import get_num_threads, set_num_threads

__all__ = [
    "__version__",
    "errors",
    "load_digits",
    "group_stats",
    "group_stats_batch",
    "SUM_NAMES",
    "set_num_threads",
    "get_num_threads",
    "NeuralMechanicsError",
    "ShapeError",
    "DTypeError",
    "NonFiniteError",
    "InvalidArgumentError",
    "NothingToTrackError",
    "DeviceError",
]

from .symmetries import SymmetryGroup, Symmetries, find_symmetries, declare  # noqa: E402
from .verify import verify  # noqa: E402

__all__ += ["SymmetryGroup", "Symmetries", "find_symmetries", "declare", "verify"]
