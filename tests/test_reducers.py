"""The device reducer (plain torch code) against the Rust kernel, and delayed consumption."""

import numpy as np
import pytest
import torch

import neural_mechanics as nm
from neural_mechanics.tracking.reducers import RustReducer, TorchReducer, torch_group_sums

SHAPES = [((7,), 0, 1), ((6, 5), 0, 1), ((6, 5), 1, 1), ((8, 12, 3, 3), 0, 1), ((8, 12, 3, 3), 1, 4), ((10, 32 * 4), 1, 4)]


@pytest.mark.parametrize("shape,axis,block", SHAPES)
@pytest.mark.parametrize("arrays", [1, 2, 3])
def test_torch_sums_equal_rust(shape, axis, block, arrays):
    torch.manual_seed(0)
    ts = [torch.randn(shape) for _ in range(3)]
    item = (ts[0], ts[1] if arrays > 1 else None, ts[2] if arrays > 2 else None, axis, block)
    want = RustReducer().submit([item]).result()[0]
    got = torch_group_sums(*item).numpy()
    np.testing.assert_allclose(got, want, rtol=1e-12, atol=1e-12)
    delayed = TorchReducer(delayed=True).submit([item]).result()[0]
    np.testing.assert_array_equal(delayed, got)


def test_chunked_device_sums_match(monkeypatch):
    from neural_mechanics.tracking.reducers import device

    monkeypatch.setattr(device, "_CHUNK_ELEMS", 50)  # force many chunks
    t, g = torch.randn(40, 30), torch.randn(40, 30)
    for axis in (0, 1):
        want = RustReducer().submit([(t, g, None, axis, 1)]).result()[0]
        np.testing.assert_allclose(torch_group_sums(t, g, None, axis, 1).numpy(), want, rtol=1e-12, atol=1e-12)


def test_tracking_with_the_delayed_device_path_on_cpu_equals_rust():
    """The whole CUDA code path, run on CPU: results consumed one step late, same run."""
    from helpers import bn_mlp, digits, sgd, train_steps

    x, y = digits(flatten=True)
    runs = {}
    for reducer in ("rust", "torch", "torch-sync"):
        model = bn_mlp((32,), seed=3)
        opt = sgd()(model)
        with nm.track(model, opt, reducer=reducer) as tracker:
            train_steps(model, opt, x, y, 25)
        runs[reducer] = tracker.run
    base = runs["rust"]
    for name in ("torch", "torch-sync"):
        for col in ("measured", "paper", "exact", "grad_sq", "update_sq", "flux"):
            np.testing.assert_allclose(runs[name].array(col), base.array(col), rtol=1e-9, atol=1e-12, err_msg=f"{name} {col}")
    assert base.errors("exact").max() <= 1e-5


def test_rust_reducer_refuses_device_tensors():
    from neural_mechanics.errors import DeviceError, InvalidArgumentError
    from neural_mechanics.tracking.reducers import choose

    meta = torch.empty(3, device="meta")
    with pytest.raises(DeviceError):
        choose([meta], "rust")
    with pytest.raises(InvalidArgumentError):
        choose([torch.empty(3)], "gpu")
    assert isinstance(choose([meta], "auto"), TorchReducer)
