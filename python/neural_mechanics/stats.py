"""Per-group statistics of a parameter tensor, its gradient and a velocity, in one fused pass.

The reductions of docs/theory.md §2: keep axis 0 of an (out, in, rest) view of the tensor (one group
per row: the incoming weights of a unit, a channel before BatchNorm) or keep axis 1 in blocks of
``block`` columns (the outgoing weights of a unit, translation columns, the column blocks of
Conv -> Flatten -> Linear). The work runs in Rust, in parallel, without copying contiguous input.

Behaviour on awkward input (each tested in tests/test_stats_errors.py):

* dtypes float32, float64, float16 and bfloat16 are read; all arrays of one item share one dtype.
  Anything else raises :class:`~neural_mechanics.errors.DTypeError` (a TypeError).
* Shapes: a 0-d tensor, or a gradient / velocity whose shape differs from theta's, raises
  :class:`~neural_mechanics.errors.ShapeError`; ``block`` with ``axis=0``, an ``axis`` other than
  0 or 1, or a block that does not divide axis 1 raises
  :class:`~neural_mechanics.errors.InvalidArgumentError`. Both are ValueErrors.
* Non-contiguous or misaligned input raises ShapeError (copying silently would hide a large
  cost), except torch channels_last tensors with ``axis=0``, which are read without a copy (each
  row is still one dense block); theta, grad and velocity must then all be channels_last.
  Sparse tensors raise ShapeError; anything that is not a numpy array or a torch tensor (a list,
  None) raises DTypeError, and so does a numpy masked array (its mask would be ignored: pass
  ``a.filled(0)`` to say what the masked entries are).
* ``axis`` must be 0 or 1 and ``block`` a positive integer (bools and floats are refused), else
  InvalidArgumentError.
* Empty tensors: each group's sums are 0 (an empty array when there are no groups), e.g. shape
  (3, 0) gives three zero rows with ``axis=0`` and no groups with ``axis=1``. An empty tensor may
  give at most ``MAX_EMPTY_GROUPS`` (2**24) groups: nothing bounds a shape such as (0, 2**40)
  (which would ask for 16 TiB of zeros), so more raise ShapeError naming the size, before
  anything is allocated. A tensor with elements has at most one group per element.
* NaN or infinity: with ``check_finite=True`` (the default)
  :class:`~neural_mechanics.errors.NonFiniteError` names the tensor, the group and the array;
  with ``check_finite=False`` the affected groups' sums are NaN/inf, as numpy's would be.
* CUDA (or meta) tensors raise :class:`~neural_mechanics.errors.DeviceError`: reduce them on
  the device.

Numerics: every sum accumulates in float64 (products of float32/16-bit inputs are exact in
float64). The work is cut into tasks by shape alone and partial sums are merged in a fixed order,
so results are bit-identical for any number of threads (set_num_threads) on one machine.
"""

from __future__ import annotations

import sys
from collections.abc import Iterable, Mapping, Sequence
from typing import Any

import numpy as np

from . import _native
from .errors import DeviceError, DTypeError, InvalidArgumentError, ShapeError

SUM_NAMES: tuple[str, ...] = tuple(_native.SUM_NAMES)
_WIDTH_NAMES = {2: SUM_NAMES[:2], 5: SUM_NAMES[:5], 8: SUM_NAMES}


_TORCH_FLOATS: dict[Any, bool] = {}  # torch dtype -> holds bfloat16, filled on first use
_MASKED = np.ma.MaskedArray
#: The most groups an empty tensor may be reduced into (defined in src/stats/input.rs).
MAX_EMPTY_GROUPS: int = int(_native.MAX_EMPTY_GROUPS)


def _as_array(x: Any, what: str, axis: int) -> tuple[np.ndarray, bool, bool]:
    """A numpy view of ``x`` (no copy), whether it holds bfloat16 bits, and whether it is a
    channels_last tensor read as (out, kh, kw, in). Kept lean: it runs for every tensor at every
    training step (a few microseconds per tensor)."""
    if isinstance(x, np.ndarray):
        if isinstance(x, _MASKED):
            raise DTypeError(f"{what} is a masked array: its mask would be ignored; pass a.filled(0) (or the values you mean)")
        if not x.flags.aligned:
            raise ShapeError(f"{what} is not aligned in memory for its dtype; pass np.require(x, requirements='CA')")
        return x, False, False
    torch = sys.modules.get("torch")
    if torch is None or not isinstance(x, torch.Tensor):
        raise DTypeError(f"{what}: expected a numpy array or a torch tensor, got {type(x).__name__}")
    if not _TORCH_FLOATS:
        _TORCH_FLOATS.update({torch.float32: False, torch.float64: False, torch.float16: False, torch.bfloat16: True})
    if not x.is_cpu:
        raise DeviceError(
            f"{what} is on {x.device}; group_stats reads CPU memory. "
            "Tracking reduces device tensors on the device itself."
        )
    if x.layout != torch.strided:
        raise ShapeError(f"{what}: a {x.layout} tensor has no dense memory to read; pass tensor.to_dense()")
    bf16 = _TORCH_FLOATS.get(x.dtype)
    if bf16 is None:
        raise DTypeError(f"{what}: unsupported dtype {x.dtype}; expected float32, float64, float16 or bfloat16")
    t = x.detach()
    permuted = False
    if axis == 0 and t.dim() == 4 and not t.is_contiguous() and t.is_contiguous(memory_format=torch.channels_last):
        # Each output channel is still one dense block: a permuted view reads the same rows.
        t = t.permute(0, 2, 3, 1)
        permuted = True
    try:
        if bf16:
            # numpy has no bfloat16: pass the bits (a view, no copy); Rust widens them.
            return t.view(torch.int16).numpy().view(np.uint16), True, permuted
        return t.numpy(), False, permuted
    except (TypeError, RuntimeError) as e:  # e.g. a tensor subclass numpy cannot see through
        raise DTypeError(f"{what}: cannot read this tensor's memory ({e})") from None


def _check_axis_block(axis: Any, block: Any) -> None:
    # Checked here (not only in Rust) so that odd Python values (bool, float, 2**70) give an
    # InvalidArgumentError instead of a TypeError/OverflowError from the argument conversion.
    for name, value in (("axis", axis), ("block", block)):
        if isinstance(value, bool) or not isinstance(value, (int, np.integer)):
            raise InvalidArgumentError(f"{name} must be an integer, got {value!r}")
    if axis not in (0, 1):
        raise InvalidArgumentError(f"axis must be 0 (rows) or 1 (columns), got {axis!r}")
    if not 1 <= block < 2**62:
        raise InvalidArgumentError(f"block must be a positive integer, got {block!r}")


def _check_flag(check_finite: Any) -> bool:
    if not isinstance(check_finite, (bool, np.bool_)):
        raise InvalidArgumentError(f"check_finite must be True or False, got {check_finite!r}")
    return bool(check_finite)


def _spec(theta: Any, grad: Any, velocity: Any, axis: int, block: int, index: int) -> tuple:
    _check_axis_block(axis, block)
    if velocity is not None and grad is None:
        raise InvalidArgumentError(f"tensor {index}: a velocity needs a gradient too")
    t, bf16, permuted = _as_array(theta, f"tensor {index}: theta", axis)
    arrays: list[np.ndarray | None] = [t]
    for name, x in (("grad", grad), ("velocity", velocity)):
        if x is None:
            arrays.append(None)
            continue
        a, b, p = _as_array(x, f"tensor {index}: {name}", axis)
        if b != bf16:
            raise DTypeError(f"tensor {index}: {name} and theta differ in dtype (bfloat16 and another)")
        if p != permuted:
            # The dot products pair elements by memory position: both must use one memory format.
            raise ShapeError(
                f"tensor {index}: {name} and theta differ in memory format (channels_last and contiguous); "
                "make them match, e.g. .contiguous(memory_format=torch.channels_last) on both"
            )
        arrays.append(a)
    return (arrays[0], arrays[1], arrays[2], int(axis), int(block), bf16)


def _to_dict(sums: np.ndarray) -> dict[str, np.ndarray]:
    return {name: sums[:, k] for k, name in enumerate(_WIDTH_NAMES[sums.shape[1]])}


def group_stats(
    theta: Any,
    grad: Any = None,
    velocity: Any = None,
    *,
    axis: int = 0,
    block: int = 1,
    check_finite: bool = True,
) -> dict[str, np.ndarray]:
    """Per-group sums of ``theta`` (and ``grad``, ``velocity``) in one pass.

    Args:
        theta: the parameter, a numpy array or CPU torch tensor (1-D is viewed as (n, 1, 1),
            2-D as (out, in, 1), more dimensions as (out, in, rest)).
        grad, velocity: arrays of theta's shape and dtype, or None. A velocity needs a grad.
        axis: 0 keeps rows (one group per index of dim 0); 1 keeps columns of dim 1.
        block: with ``axis=1``, the number of adjacent columns per group (must divide dim 1).
        check_finite: raise NonFiniteError if a group's sums are not finite.

    Returns:
        A dict of float64 arrays of length ``groups``: ``sum_theta``, ``sumsq_theta``; with a
        grad also ``sum_grad``, ``sumsq_grad``, ``dot_theta_grad``; with a velocity also
        ``sumsq_velocity``, ``dot_theta_velocity``, ``dot_grad_velocity``.
    """
    check_finite = _check_flag(check_finite)
    spec = _spec(theta, grad, velocity, axis, block, 0)
    (sums,) = _native.group_stats_batch([spec], check_finite)
    return _to_dict(sums)


def group_stats_batch(
    items: Iterable[Mapping[str, Any] | Sequence[Any]],
    *,
    check_finite: bool = True,
    as_arrays: bool = False,
) -> list[Any]:
    """Many tensors in one call (one release of the GIL, one parallel region).

    Each item is a mapping with keys ``theta`` and optionally ``grad``, ``velocity``, ``axis``,
    ``block``, or a tuple ``(theta, grad, velocity, axis, block)`` (trailing entries optional).
    Returns one dict per item, as :func:`group_stats` does, or with ``as_arrays=True`` one
    float64 array of shape (groups, sums) per item, columns in the order of ``SUM_NAMES``.
    """
    check_finite = _check_flag(check_finite)
    if isinstance(items, (np.ndarray, str, bytes, Mapping)) or not isinstance(items, Iterable):
        raise DTypeError(f"items must be a list of (theta, grad, velocity, axis, block) or of dicts, got {type(items).__name__}")
    specs = []
    for i, item in enumerate(items):
        if isinstance(item, Mapping):
            unknown = set(item) - {"theta", "grad", "velocity", "axis", "block"}
            if unknown or "theta" not in item:
                raise InvalidArgumentError(
                    f"item {i}: needs key 'theta' and only theta/grad/velocity/axis/block, got {sorted(item)}"
                )
            args = (item["theta"], item.get("grad"), item.get("velocity"), item.get("axis", 0), item.get("block", 1))
        elif isinstance(item, (tuple, list)):
            seq = tuple(item)
            if not 1 <= len(seq) <= 5:
                raise InvalidArgumentError(f"item {i}: expected (theta, grad, velocity, axis, block), got {len(seq)} entries")
            args = seq + (None, None, 0, 1)[len(seq) - 1 :]
        else:
            raise DTypeError(f"item {i}: expected a tuple (theta, grad, velocity, axis, block) or a dict, got {type(item).__name__}")
        specs.append(_spec(*args, index=i))
    results = _native.group_stats_batch(specs, check_finite)
    return list(results) if as_arrays else [_to_dict(r) for r in results]
