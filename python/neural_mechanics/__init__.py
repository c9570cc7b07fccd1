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

from . import theory  # noqa: E402
from .run import Run, load_run  # noqa: E402

# Everything that needs torch is imported on first use, so that `import neural_mechanics` (theory,
# saved runs, group_stats on numpy arrays) works in a process without torch.
_LAZY = {
    "track": ".tracking",
    "Tracker": ".tracking",
    "find_symmetries": ".symmetries",
    "declare": ".symmetries",
    "SymmetryGroup": ".symmetries",
    "Symmetries": ".symmetries",
    "verify": ".verify",
    "live": ".integrations.live",
}


def __getattr__(name: str):  # PEP 562
    if name in _LAZY:
        import importlib

        value = getattr(importlib.import_module(_LAZY[name], __name__), name)
        globals()[name] = value
        return value
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted(list(globals()) + list(_LAZY))


__all__ += ["theory", "Run", "load_run", *_LAZY]
