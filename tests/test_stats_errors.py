"""Every documented error of group_stats / group_stats_batch, and a fuzz that nothing else escapes."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import neural_mechanics as nm
from neural_mechanics.errors import (
    DeviceError,
    DTypeError,
    InvalidArgumentError,
    NeuralMechanicsError,
    NonFiniteError,
    ShapeError,
)

F32 = np.ones((4, 6), dtype=np.float32)


def raises(cls, builtin, *fragments):
    """pytest.raises for a library error that is also the documented built-in exception, whose
    message contains every fragment (case-insensitive)."""

    class Check:
        def __enter__(self):
            self.ctx = pytest.raises(cls)
            self.info = self.ctx.__enter__()
            return self.info

        def __exit__(self, *exc):
            suppressed = self.ctx.__exit__(*exc)
            assert isinstance(self.info.value, builtin) and isinstance(self.info.value, NeuralMechanicsError)
            message = str(self.info.value).lower()
            for f in fragments:
                assert f.lower() in message, f"{f!r} not in {message!r}"
            return suppressed

    return Check()


# --- shapes -------------------------------------------------------------------------------------


def test_grad_shape_differs():
    with raises(ShapeError, ValueError, "grad", "(4, 6)", "(6, 4)"):
        nm.group_stats(F32, np.ones((6, 4), np.float32))
    with raises(ShapeError, ValueError, "velocity", "shape"):
        nm.group_stats(F32, F32, np.ones(24, np.float32))


def test_zero_dim():
    with raises(ShapeError, ValueError, "0-d"):
        nm.group_stats(np.array(3.0, np.float32))
    with raises(ShapeError, ValueError, "0-d"):
        nm.group_stats(torch.tensor(1.0))


# --- dtypes -------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "bad",
    [
        np.ones((3, 2), np.int64),
        np.ones((3, 2), np.int8),
        np.ones((3, 2), np.complex64),
        np.ones((3, 2), bool),
        np.array([[1.0, "a"]], dtype=object),
        torch.ones(3, 2, dtype=torch.int32),
        torch.ones(3, 2, dtype=torch.complex64),
        torch.ones(3, 2, dtype=torch.bool),
    ],
    ids=["int64", "int8", "complex64", "bool", "object", "torch-int32", "torch-complex", "torch-bool"],
)
def test_unsupported_dtypes(bad):
    with raises(DTypeError, TypeError, "unsupported dtype", "float32, float64, float16 or bfloat16"):
        nm.group_stats(bad)
    good = np.ones(bad.shape, np.float32) if isinstance(bad, np.ndarray) else torch.ones(bad.shape)
    with raises(DTypeError, TypeError, "grad"):
        nm.group_stats(good, bad)


def test_mixed_dtypes():
    with raises(DTypeError, TypeError, "grad", "float64", "float32"):
        nm.group_stats(F32, F32.astype(np.float64))
    with raises(DTypeError, TypeError, "grad", "bfloat16"):
        nm.group_stats(torch.ones(4, 6, dtype=torch.bfloat16), torch.ones(4, 6))
    with raises(DTypeError, TypeError, "velocity", "float16"):
        nm.group_stats(F32, F32, F32.astype(np.float16))


@pytest.mark.parametrize("bad", [[[1.0, 2.0]], None, 3.0, "theta", {"a": 1}], ids=["list", "None", "float", "str", "dict"])
def test_not_an_array(bad):
    with raises(DTypeError, TypeError, "numpy array or a torch tensor"):
        nm.group_stats(bad)
    with raises(DTypeError, TypeError, "grad", "numpy array or a torch tensor"):
        nm.group_stats(F32, [[1.0] * 6] * 4 if bad is not None else "x")


# --- arguments ----------------------------------------------------------------------------------


def test_velocity_without_grad():
    with raises(InvalidArgumentError, ValueError, "velocity needs a gradient"):
        nm.group_stats(F32, None, F32)


def test_block_must_divide():
    with raises(InvalidArgumentError, ValueError, "block=4", "does not divide", "size 6"):
        nm.group_stats(F32, axis=1, block=4)


def test_block_with_axis0():
    with raises(InvalidArgumentError, ValueError, "block=2", "axis=1"):
        nm.group_stats(F32, axis=0, block=2)


@pytest.mark.parametrize("axis", [2, 3, -1, -2, True, False, 0.0, "0", None, 2**70])
def test_bad_axis(axis):
    with raises(InvalidArgumentError, ValueError, "axis"):
        nm.group_stats(F32, axis=axis)


@pytest.mark.parametrize("block", [0, -1, True, 1.5, None, 2**70])
def test_bad_block(block):
    with raises(InvalidArgumentError, ValueError, "block"):
        nm.group_stats(F32, axis=1, block=block)


def test_bad_check_finite_flag():
    with raises(InvalidArgumentError, ValueError, "check_finite"):
        nm.group_stats(F32, check_finite="no")


def test_bad_batch_items():
    with raises(DTypeError, TypeError, "items"):
        nm.group_stats_batch(5)
    with raises(DTypeError, TypeError, "item 0"):
        nm.group_stats_batch([5])
    with raises(InvalidArgumentError, ValueError, "item 1", "theta"):
        nm.group_stats_batch([(F32,), {"grad": F32}])
    with raises(InvalidArgumentError, ValueError, "item 0", "entries"):
        nm.group_stats_batch([(F32, F32, None, 0, 1, "extra")])
    with raises(ShapeError, ValueError, "tensor 1", "grad"):
        nm.group_stats_batch([(F32, F32), (F32, F32.T.copy())])


# --- memory layout ------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "make",
    [
        lambda: np.ones((6, 4), np.float32).T,
        lambda: np.asfortranarray(np.ones((4, 6), np.float32)),
        lambda: np.ones((4, 12), np.float32)[:, ::2],
        lambda: np.ones((8, 6), np.float32)[::2],
        lambda: torch.ones(6, 4).t(),
        lambda: torch.ones(4, 12)[:, ::2],
        lambda: torch.ones(16, 8, 3, 3).to(memory_format=torch.channels_last),  # axis=1: not rows
    ],
    ids=["transposed", "fortran", "strided-cols", "strided-rows", "torch-t", "torch-strided", "channels-last-axis1"],
)
def test_non_contiguous(make):
    x = make()
    axis = 1 if x.ndim == 4 else 0
    with raises(ShapeError, ValueError, "not c-contiguous", "contiguous"):
        nm.group_stats(x, axis=axis)
    # The contiguous copy the message suggests works.
    fixed = np.ascontiguousarray(x) if isinstance(x, np.ndarray) else x.contiguous()
    nm.group_stats(fixed, axis=axis)


def test_misaligned():
    buf = np.zeros(4 * 24 + 1, np.uint8)
    x = np.frombuffer(buf.data, dtype=np.float32, count=24, offset=1).reshape(4, 6)
    assert not x.flags.aligned
    with raises(ShapeError, ValueError, "aligned"):
        nm.group_stats(x)


def test_sparse_tensor():
    with raises(ShapeError, ValueError, "sparse", "to_dense"):
        nm.group_stats(torch.eye(4).to_sparse())


# --- values -------------------------------------------------------------------------------------


@pytest.mark.parametrize("bad", [np.nan, np.inf, -np.inf])
@pytest.mark.parametrize("where", ["theta", "grad", "velocity"])
def test_non_finite(bad, where):
    arrays = {k: np.ones((4, 6), np.float32) for k in ("theta", "grad", "velocity")}
    arrays[where][2, 3] = bad
    with raises(NonFiniteError, ValueError, "tensor 0", "group 2", where):
        nm.group_stats(arrays["theta"], arrays["grad"], arrays["velocity"])
    # Columns: the same element is in group 3.
    with raises(NonFiniteError, ValueError, "group 3", where):
        nm.group_stats(arrays["theta"], arrays["grad"], arrays["velocity"], axis=1)
    got = nm.group_stats(arrays["theta"], arrays["grad"], arrays["velocity"], check_finite=False)
    bad_keys = {"theta": "sumsq_theta", "grad": "sumsq_grad", "velocity": "sumsq_velocity"}
    assert not np.isfinite(got[bad_keys[where]][2])
    assert np.isfinite(got[bad_keys[where]][[0, 1, 3]]).all()
    assert np.isfinite(got["sum_theta"][[0, 1, 3]]).all()


def test_non_finite_names_the_tensor_in_a_batch():
    bad = np.ones((3, 3), np.float32)
    bad[1, 1] = np.nan
    with raises(NonFiniteError, ValueError, "tensor 1", "group 1", "grad"):
        nm.group_stats_batch([(F32, F32), (np.ones((3, 3), np.float32), bad)])


# --- empty --------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "shape,axis,groups",
    [((0,), 0, 0), ((3, 0), 0, 3), ((0, 5), 0, 0), ((0, 5), 1, 5), ((3, 0), 1, 0), ((4, 2, 0, 3), 0, 4), ((4, 2, 0, 3), 1, 2)],
)
def test_empty_tensors(shape, axis, groups):
    x = np.zeros(shape, np.float32)
    got = nm.group_stats(x, x, x, axis=axis)
    assert len(got) == 8
    for v in got.values():
        assert v.dtype == np.float64 and v.shape == (groups,)
        assert (v == 0).all()
    got = nm.group_stats(torch.zeros(shape, dtype=torch.bfloat16), axis=axis)
    assert got["sum_theta"].shape == (groups,)


@pytest.mark.parametrize(
    "make",
    [
        lambda: (np.empty((0, 2**40), np.float32), 1),
        lambda: (np.empty((2**40, 0), np.float32), 0),
        lambda: (torch.empty((0, 2**40)), 1),
        lambda: (torch.empty((2**40, 0), dtype=torch.bfloat16), 0),
        lambda: (np.empty((0, 2**40, 3), np.float64), 1),
    ],
    ids=["numpy-columns", "numpy-rows", "torch-columns", "torch-bf16-rows", "numpy-3d"],
)
def test_an_empty_tensor_never_asks_for_terabytes(make):
    """Finding: group_stats(np.empty((0, 2**40)), axis=1) tried to allocate 16 TiB of zero sums
    and died with SIGABRT. Now refused before any allocation, naming the size."""
    x, axis = make()
    with raises(ShapeError, ValueError, "1099511627776 groups", "16.0 TiB", str(nm.stats.MAX_EMPTY_GROUPS)):
        nm.group_stats(x, axis=axis)
    with raises(ShapeError, ValueError, "tensor 1"):
        nm.group_stats_batch([(F32,), (x, None, None, axis)])


def test_an_empty_tensor_at_the_group_limit():
    # One past the limit is refused; the limit itself is allowed (not run here: 256 MiB of zeros).
    limit = nm.stats.MAX_EMPTY_GROUPS
    with raises(ShapeError, ValueError, f"{limit + 1} groups"):
        nm.group_stats(np.empty((0, limit + 1), np.float32), axis=1)
    assert nm.group_stats(np.empty((0, 1000), np.float32), axis=1)["sum_theta"].shape == (1000,)


def test_the_exported_layout_refuses_overflowing_shapes():
    from neural_mechanics import _native

    with raises(ShapeError, ValueError, "more elements than memory can address"):
        _native.layout([0, 2**40, 2**40, 2**40], 0, 1)


def test_a_masked_array_is_refused_not_read_without_its_mask():
    """Finding: a numpy masked array's mask was ignored (its masked entries summed)."""
    m = np.ma.masked_array(np.ones((2, 3), np.float32), mask=[[1, 0, 0], [0, 0, 0]])
    with raises(DTypeError, TypeError, "masked", "filled"):
        nm.group_stats(m)
    with raises(DTypeError, TypeError, "grad", "masked"):
        nm.group_stats(F32, np.ma.masked_array(F32))
    assert nm.group_stats(m.filled(0))["sum_theta"].tolist() == [2.0, 3.0]


# --- devices ------------------------------------------------------------------------------------


def test_meta_device_tensor():
    x = torch.empty(4, 6, device="meta")
    with raises(DeviceError, ValueError, "meta", "cpu"):
        nm.group_stats(x)
    with raises(DeviceError, ValueError, "grad", "meta"):
        nm.group_stats(torch.ones(4, 6), x)


@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU (the meta-device test covers the CPU-only path)")
def test_cuda_tensor():
    x = torch.ones(4, 6, device="cuda")
    with raises(DeviceError, ValueError, "cuda"):
        nm.group_stats(x)


# --- never a panic ------------------------------------------------------------------------------


def _garbage():
    arrays = st.builds(
        lambda shape, dt, order: np.zeros(shape, dtype=dt, order=order),
        st.lists(st.integers(0, 4), min_size=0, max_size=4).map(tuple),
        st.sampled_from([np.float32, np.float64, np.float16, np.int32, np.uint16, np.complex128, np.bool_]),
        st.sampled_from(["C", "F"]),
    )
    tensors = st.builds(
        lambda shape, dt: torch.zeros(shape, dtype=dt),
        st.lists(st.integers(0, 4), min_size=0, max_size=4).map(tuple),
        st.sampled_from([torch.float32, torch.bfloat16, torch.float16, torch.int64, torch.uint8]),
    )
    scalars = st.one_of(st.none(), st.integers(-(2**70), 2**70), st.floats(allow_nan=True), st.text(max_size=3), st.booleans())
    lists = st.lists(st.floats(allow_nan=True), max_size=4)
    return st.one_of(arrays, tensors, scalars, lists, arrays.map(lambda a: a[..., ::2] if a.ndim else a))


@settings(max_examples=200, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(theta=_garbage(), grad=_garbage(), velocity=_garbage(), axis=_garbage(), block=_garbage())
def test_fuzz_only_library_errors(theta, grad, velocity, axis, block):
    for call in (
        lambda: nm.group_stats(theta, grad, velocity, axis=axis, block=block),
        lambda: nm.group_stats(theta, axis=axis if isinstance(axis, int) else 0),
        lambda: nm.group_stats_batch([(theta, grad, velocity, axis, block)]),
        lambda: nm.group_stats_batch([{"theta": theta, "grad": grad}, theta]),
    ):
        try:
            call()
        except NeuralMechanicsError as e:
            assert str(e), "errors carry a message"


def test_channels_last_theta_with_contiguous_grad():
    w = torch.randn(8, 4, 3, 3).to(memory_format=torch.channels_last)
    with raises(ShapeError, ValueError, "memory format", "channels_last"):
        nm.group_stats(w, torch.randn(8, 4, 3, 3), axis=0)
    nm.group_stats(w, torch.randn(8, 4, 3, 3).to(memory_format=torch.channels_last), axis=0)
