"""group_stats / group_stats_batch against float64 numpy references (docs/theory.md §2, §6)."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import neural_mechanics as nm
from neural_mechanics import stats as nm_stats

SETTINGS = settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])
DTYPES = ["float32", "float64", "float16", "bfloat16"]
TORCH_DTYPES = {"float32": torch.float32, "float64": torch.float64, "float16": torch.float16, "bfloat16": torch.bfloat16}


def reference(theta, grad=None, velocity=None, axis=0, block=1):
    """Per-group sums in float64 by numpy, straight from docs/theory.md §2's definition."""

    def grouped(x):
        x = np.asarray(x, dtype=np.float64)
        if x.ndim == 1:
            x = x.reshape(-1, 1, 1)
        x = x.reshape(x.shape[0], x.shape[1], -1)
        if axis == 0:
            return x.reshape(x.shape[0], -1)  # (groups, members)
        out, inn, rest = x.shape
        # (out, groups, block, rest) -> (groups, out * block * rest)
        return x.reshape(out, inn // block, block, rest).transpose(1, 0, 2, 3).reshape(inn // block, -1)

    t = grouped(theta)
    r = {"sum_theta": t.sum(1), "sumsq_theta": (t * t).sum(1)}
    if grad is not None:
        g = grouped(grad)
        r.update(sum_grad=g.sum(1), sumsq_grad=(g * g).sum(1), dot_theta_grad=(t * g).sum(1))
    if velocity is not None:
        v = grouped(velocity)
        r.update(sumsq_velocity=(v * v).sum(1), dot_theta_velocity=(t * v).sum(1), dot_grad_velocity=(g * v).sum(1))
    return r


def as64(x):
    """Exact float64 values of a numpy array or tensor of any supported dtype."""
    if isinstance(x, torch.Tensor):
        return x.detach().double().numpy()
    return np.asarray(x, dtype=np.float64)


def assert_matches(got, theta, grad=None, velocity=None, axis=0, block=1, rtol=1e-12):
    want = reference(as64(theta), None if grad is None else as64(grad), None if velocity is None else as64(velocity), axis, block)
    assert list(got) == list(want), "keys and their order follow SUM_NAMES"
    for key, w in want.items():
        g = got[key]
        assert g.dtype == np.float64 and g.shape == w.shape, key
        # Float64 accumulation in another order: the error is relative to the summed magnitudes.
        scale = 1.0 + np.abs(w).max(initial=0.0)
        np.testing.assert_allclose(g, w, rtol=0, atol=rtol * scale * 64, err_msg=key)


def make(shape, dtype, rng, container, scale=1.0):
    x = rng.standard_normal(shape) * scale
    if container == "numpy" and dtype != "bfloat16":
        return x.astype(dtype)
    return torch.from_numpy(x).to(TORCH_DTYPES[dtype])


@st.composite
def cases(draw):
    ndim = draw(st.sampled_from([1, 2, 2, 3, 4, 4]))
    shape = [draw(st.integers(1, 12)) for _ in range(ndim)]
    if ndim >= 2 and draw(st.booleans()):
        shape[1] = draw(st.integers(1, 80))  # long rows and wide column tiles
    if ndim == 2 and draw(st.integers(0, 4)) == 0:
        shape = [draw(st.integers(1, 40)), draw(st.integers(200, 700))]  # > 1 column tile
    axis = draw(st.sampled_from([0, 1])) if ndim >= 2 else 0
    block = 1
    if axis == 1:
        divisors = [d for d in range(1, shape[1] + 1) if shape[1] % d == 0]
        block = draw(st.sampled_from(divisors))
    dtype = draw(st.sampled_from(DTYPES))
    container = "torch" if dtype == "bfloat16" else draw(st.sampled_from(["numpy", "torch"]))
    arrays = draw(st.integers(1, 3))
    seed = draw(st.integers(0, 2**32 - 1))
    return tuple(shape), axis, block, dtype, container, arrays, seed


@SETTINGS
@given(cases())
def test_matches_numpy_reference(case):
    shape, axis, block, dtype, container, arrays, seed = case
    rng = np.random.default_rng(seed)
    theta = make(shape, dtype, rng, container)
    grad = make(shape, dtype, rng, container, 1e-2) if arrays > 1 else None
    vel = make(shape, dtype, rng, container, 1e-1) if arrays > 2 else None
    got = nm.group_stats(theta, grad, vel, axis=axis, block=block)
    assert_matches(got, theta, grad, vel, axis, block)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize(
    "shape,axis,block",
    [
        ((512, 512), 0, 1),  # parallel path (> 65536 elements)
        ((3, 300_000), 0, 1),  # rows longer than one task: split inside the row
        ((700, 300), 1, 1),  # Linear columns (translation / outgoing groups), column kernel
        ((64, 128, 3, 3), 1, 4),  # column blocks of a conv
        ((256, 32 * 7 * 7), 1, 49),  # Conv -> Flatten -> Linear: blocks of H*W columns
        ((100_000,), 0, 1),  # a bias vector: every entry its own group
    ],
)
def test_large_layouts(shape, axis, block, dtype):
    rng = np.random.default_rng(7)
    theta, grad, vel = (make(shape, dtype, rng, "torch", s) for s in (1.0, 1e-3, 1e-1))
    got = nm.group_stats(theta, grad, vel, axis=axis, block=block)
    assert_matches(got, theta, grad, vel, axis, block)


def test_requires_grad_parameters_and_their_grad():
    layer = torch.nn.Linear(30, 20)
    layer(torch.randn(5, 30)).pow(2).sum().backward()
    w = layer.weight
    assert w.requires_grad and w.grad is not None
    got = nm.group_stats(w, w.grad)
    assert_matches(got, w, w.grad)
    got = nm.group_stats(layer.bias, layer.bias.grad)
    assert_matches(got, layer.bias, layer.bias.grad)


def test_sums_of_known_values():
    theta = np.array([[1.0, 2.0], [3.0, 4.0]])
    grad = np.array([[0.5, -1.0], [2.0, 0.0]])
    rows = nm.group_stats(theta, grad)
    np.testing.assert_array_equal(rows["sum_theta"], [3.0, 7.0])
    np.testing.assert_array_equal(rows["sumsq_theta"], [5.0, 25.0])
    np.testing.assert_array_equal(rows["dot_theta_grad"], [-1.5, 6.0])
    cols = nm.group_stats(theta, grad, axis=1)
    np.testing.assert_array_equal(cols["sum_theta"], [4.0, 6.0])
    np.testing.assert_array_equal(cols["sum_grad"], [2.5, -1.0])
    one = nm.group_stats(theta, axis=1, block=2)
    np.testing.assert_array_equal(one["sumsq_theta"], [30.0])
    assert set(one) == {"sum_theta", "sumsq_theta"}


def test_float64_accumulation_of_float32_input():
    # 2**24 + many ones: a float32 accumulator would stop counting at 2**24.
    theta = np.ones((1, 1 << 25), dtype=np.float32)
    assert nm.group_stats(theta)["sum_theta"][0] == float(1 << 25)


def test_channels_last_conv_weight_rows_read_without_copy(monkeypatch):
    w = torch.randn(32, 16, 3, 3).to(memory_format=torch.channels_last)
    g = torch.randn(32, 16, 3, 3).to(memory_format=torch.channels_last)
    assert not w.is_contiguous()
    seen = spy_native(monkeypatch)
    got = nm.group_stats(w, g, axis=0)
    assert_matches(got, w, g)
    theta_arr, grad_arr = seen[0][0][0], seen[0][0][1]
    assert np.shares_memory(theta_arr, w.detach().numpy()) and np.shares_memory(grad_arr, g.detach().numpy())


def spy_native(monkeypatch):
    """Record what group_stats hands to the native call."""
    seen = []
    real = nm_stats._native

    class Spy:
        def __getattr__(self, name):
            return getattr(real, name)

        def group_stats_batch(self, specs, check_finite):
            seen.append(specs)
            return real.group_stats_batch(specs, check_finite)

    monkeypatch.setattr(nm_stats, "_native", Spy())
    return seen


@pytest.mark.parametrize("kind", ["numpy", "torch", "torch-requires-grad", "bfloat16"])
def test_contiguous_input_is_not_copied(monkeypatch, kind):
    rng = np.random.default_rng(0)
    if kind == "numpy":
        theta, grad = rng.standard_normal((64, 100)).astype(np.float32), rng.standard_normal((64, 100)).astype(np.float32)
        base = [theta, grad]
    else:
        dt = torch.bfloat16 if kind == "bfloat16" else torch.float32
        theta = torch.randn(64, 100, dtype=dt, requires_grad=kind == "torch-requires-grad")
        grad = torch.randn(64, 100, dtype=dt)
        base = [theta.detach().view(torch.int16).numpy() if dt == torch.bfloat16 else theta.detach().numpy(),
                grad.view(torch.int16).numpy() if dt == torch.bfloat16 else grad.numpy()]
    seen = spy_native(monkeypatch)
    nm.group_stats_batch([(theta, grad)])
    passed = seen[0][0]
    assert np.shares_memory(passed[0], base[0]) and np.shares_memory(passed[1], base[1])
    assert passed[0].__array_interface__["data"][0] == base[0].__array_interface__["data"][0]


def test_batch_equals_individual_calls():
    rng = np.random.default_rng(3)
    items = [
        (rng.standard_normal((64, 27)).astype(np.float32), rng.standard_normal((64, 27)).astype(np.float32)),
        {"theta": torch.randn(10, 64), "grad": torch.randn(10, 64), "axis": 1},
        {"theta": torch.randn(128, 64, 3, 3, dtype=torch.bfloat16), "axis": 1, "block": 8},
        (rng.standard_normal(300), rng.standard_normal(300), rng.standard_normal(300)),
        (torch.randn(600, 600), torch.randn(600, 600), None, 1, 3),
    ]
    batch = nm.group_stats_batch(items)
    arrays = nm.group_stats_batch(items, as_arrays=True)
    for item, got, arr in zip(items, batch, arrays):
        if isinstance(item, dict):
            single = nm.group_stats(item["theta"], item.get("grad"), axis=item.get("axis", 0), block=item.get("block", 1))
        else:
            t, g, *rest = item
            v = rest[0] if rest else None
            axis, block = (rest[1], rest[2]) if len(rest) > 1 else (0, 1)
            single = nm.group_stats(t, g, v, axis=axis, block=block)
        assert list(got) == list(single)
        for k, key in enumerate(got):
            np.testing.assert_array_equal(got[key], single[key])
            np.testing.assert_array_equal(arr[:, k], single[key])
    assert nm.group_stats_batch([]) == []


@pytest.mark.parametrize("axis,block,shape", [(0, 1, (1024, 4608)), (1, 1, (4096, 300)), (1, 4, (64, 512, 3, 3)), (0, 1, (2, 3_000_000))])
def test_bitwise_identical_for_one_and_two_threads(axis, block, shape):
    rng = np.random.default_rng(11)
    theta = rng.standard_normal(shape).astype(np.float32)
    grad = rng.standard_normal(shape).astype(np.float32)
    vel = rng.standard_normal(shape).astype(np.float32)
    before = nm.get_num_threads()
    try:
        results = []
        for n in (1, 2, 1, 3):
            nm.set_num_threads(n)
            results.append(nm.group_stats(theta, grad, vel, axis=axis, block=block))
    finally:
        nm.set_num_threads(0)
    assert nm.get_num_threads() == before
    for r in results[1:]:
        for key in results[0]:
            assert results[0][key].tobytes() == r[key].tobytes(), key


def test_sum_names():
    assert nm.SUM_NAMES == (
        "sum_theta", "sumsq_theta", "sum_grad", "sumsq_grad", "dot_theta_grad",
        "sumsq_velocity", "dot_theta_velocity", "dot_grad_velocity",
    )


def test_read_pass_helper_reads_every_byte():
    from neural_mechanics import _native

    x = np.arange(1_000_003, dtype=np.uint8)
    before = _native.read_pass([x, x[:5]])
    assert isinstance(before, int)
    y = x.copy()
    y[999_999] ^= 1
    assert _native.read_pass([y, x[:5]]) != before
    assert _native.read_pass([]) == 0


# -- the Rust <-> Python contract: constants and helpers defined once, in Rust -----------------


@pytest.mark.parametrize(
    "shape,axis,block,want",
    [
        ((7,), 0, 1, (1, 7, 1)),
        ((4, 6), 0, 1, (1, 4, 6)),
        ((4, 6), 1, 3, (4, 2, 3)),
        ((8, 6, 3, 3), 0, 1, (1, 8, 54)),
        ((8, 6, 3, 3), 1, 2, (8, 3, 18)),
        ((3, 0), 0, 1, (1, 3, 0)),
        ((3, 0), 1, 1, (3, 0, 1)),
    ],
)
def test_native_layout_is_the_kernels_view(shape, axis, block, want):
    from neural_mechanics import _native

    outer, groups, seg = _native.layout(shape, axis, block)
    assert (outer, groups, seg) == want
    assert outer * groups * seg == int(np.prod(shape))
    # The groups the kernels return are the layout's groups.
    x = np.random.default_rng(0).standard_normal(shape)
    got = nm.group_stats(x, x, axis=axis, block=block)
    assert all(v.shape == (groups,) for v in got.values())


@pytest.mark.parametrize(
    "shape,axis,block,error",
    [((), 0, 1, nm.ShapeError), ((4, 6), 1, 4, nm.InvalidArgumentError), ((4, 6), 0, 2, nm.InvalidArgumentError), ((4, 6), 2, 1, nm.InvalidArgumentError)],
)
def test_native_layout_refuses_what_group_stats_refuses(shape, axis, block, error):
    from neural_mechanics import _native

    with pytest.raises(error) as native:
        _native.layout(shape, axis, block)
    if axis in (0, 1):  # group_stats checks the axis itself, in Python
        with pytest.raises(error) as public:
            nm.group_stats(np.ones(shape), axis=axis, block=block)
        assert str(native.value) == str(public.value)


def test_dtype_codes_round_trip_through_group_stats_ptrs():
    from neural_mechanics import _native

    assert _native.DTYPE_CODES == {"float32": 0, "float64": 1, "float16": 2, "bfloat16": 3}
    rng = np.random.default_rng(3)
    for name, code in _native.DTYPE_CODES.items():
        t, g = (torch.from_numpy(rng.standard_normal((6, 40))).to(TORCH_DTYPES[name]) for _ in range(2))
        layout = _native.layout(tuple(t.shape), 0, 1)
        got = _native.group_stats_ptrs([(t.data_ptr(), g.data_ptr(), 0, t.numel(), *layout, code)])
        want = nm.group_stats_batch([(t, g)], as_arrays=True)[0]
        assert got.tobytes() == want.tobytes(), name
    with pytest.raises(nm.DTypeError, match="unknown dtype code 4"):
        _native.group_stats_ptrs([(t.data_ptr(), 0, 0, t.numel(), *layout, 4)])
