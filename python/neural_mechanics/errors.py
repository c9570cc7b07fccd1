"""The exception hierarchy. Every error the library raises on bad input is one of these.

Each class also subclasses the built-in exception of the same meaning, so ``except ValueError``
keeps working for code that does not know this library.
"""


class NeuralMechanicsError(Exception):
    """Base class of every error raised by neural_mechanics."""


class ShapeError(NeuralMechanicsError, ValueError):
    """Shapes, lengths or memory layouts that do not fit together."""


class DTypeError(NeuralMechanicsError, TypeError):
    """An element type the library does not read (or mixed types)."""


class NonFiniteError(NeuralMechanicsError, ValueError):
    """A NaN or infinity where a finite number is needed."""


class InvalidArgumentError(NeuralMechanicsError, ValueError):
    """An argument outside its domain (negative learning rate, momentum >= 1, bad block, ...)."""


class NothingToTrackError(NeuralMechanicsError, ValueError):
    """A tracker was asked to follow a model in which no symmetry group was found."""


class DeviceError(NeuralMechanicsError, ValueError):
    """A tensor on a device this code path does not handle."""


class RunFormatError(NeuralMechanicsError, ValueError):
    """A saved run that is truncated, corrupted, not a run file, or from a newer format."""


class RunIOError(NeuralMechanicsError, OSError):
    """The operating system refused to read or write a saved run."""


class UnknownColumnError(NeuralMechanicsError, KeyError):
    """A column name that a run does not record (``Run.array("nope")``)."""


class RunNotOnThisRankError(NeuralMechanicsError, RuntimeError):
    """The Run of a distributed tracker is only kept on rank 0."""


class MissingDependencyError(NeuralMechanicsError, ImportError):
    """An optional package (an extra such as ``neural-mechanics[dataframes]``) is not installed."""


__all__ = [
    "NeuralMechanicsError",
    "ShapeError",
    "DTypeError",
    "NonFiniteError",
    "InvalidArgumentError",
    "NothingToTrackError",
    "DeviceError",
    "RunFormatError",
    "RunIOError",
    "UnknownColumnError",
    "RunNotOnThisRankError",
    "MissingDependencyError",
]
