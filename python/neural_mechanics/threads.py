"""The size of the private thread pool of the Rust core."""

from __future__ import annotations

from . import _native

ENV_VAR = "NEURAL_MECHANICS_NUM_THREADS"


def set_num_threads(n: int) -> None:
    """Use ``n`` threads for the parallel kernels; ``0`` restores the default.

    The default is the environment variable ``NEURAL_MECHANICS_NUM_THREADS`` if set, else the
    number of cores. The pool is private (it never competes with another rayon user's pool) and is
    rebuilt in a forked child, so DataLoader workers can call the kernels too.
    """
    if isinstance(n, bool) or not isinstance(n, int) or n < 0:
        from .errors import InvalidArgumentError

        raise InvalidArgumentError(f"set_num_threads needs an integer >= 0, got {n!r}")
    _native.set_num_threads(n)


def get_num_threads() -> int:
    """The number of threads the next parallel kernel call will use."""
    return int(_native.get_num_threads())
