"""The size of the private thread pool of the Rust core."""

from __future__ import annotations

from typing import Any

from . import _native
from .errors import InvalidArgumentError

ENV_VAR = "NEURAL_MECHANICS_NUM_THREADS"
#: More threads than this is refused (a typo, not a machine): the Rust core's limit, read from it.
MAX_THREADS: int = _native.MAX_THREADS


def set_num_threads(n: Any) -> None:
    """Use ``n`` threads for the parallel kernels; ``0`` restores the default.

    The default is the environment variable ``NEURAL_MECHANICS_NUM_THREADS`` if set (an integer
    from 1 to 4096; anything else makes every kernel call raise InvalidArgumentError), else the
    number of cores. The pool is private (it never competes with another rayon user's pool) and
    is rebuilt in a forked child, so DataLoader workers can call the kernels too. Inputs below
    65,536 elements per call run on the calling thread whatever the setting.
    """
    if isinstance(n, bool) or not hasattr(n, "__index__") or not 0 <= int(n) <= MAX_THREADS:
        raise InvalidArgumentError(f"set_num_threads needs an integer from 0 to {MAX_THREADS}, got {n!r}")
    _native.set_num_threads(int(n))


def get_num_threads() -> int:
    """The number of threads the next parallel kernel call will use.

    Raises InvalidArgumentError if ``NEURAL_MECHANICS_NUM_THREADS`` is set to something that is
    not a thread count (and ``set_num_threads`` has not overridden it).
    """
    return int(_native.get_num_threads())
