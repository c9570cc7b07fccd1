"""CUDA checks: reductions on the device and tracking a model that lives on the GPU.

Skipped without a GPU (the same code paths run on CPU in test_reducers.py, including the
one-step-delayed consumption); benchmarks/gpu.sh runs these on a machine with one.
"""

import numpy as np
import pytest
import torch
import torch.nn.functional as F

import neural_mechanics as nm
from neural_mechanics.tracking.reducers import RustReducer, TorchReducer, torch_group_sums

pytestmark = [pytest.mark.cuda, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")]


@pytest.mark.parametrize("shape,axis,block", [((64, 3, 3, 3), 0, 1), ((512, 4096), 1, 1), ((4096, 512 * 49), 1, 49), ((1000,), 0, 1)])
def test_device_sums_equal_the_rust_kernel(shape, axis, block):
    torch.manual_seed(0)
    ts = [torch.randn(shape, device="cuda") for _ in range(3)]
    got = torch_group_sums(ts[0], ts[1], ts[2], axis, block).cpu().numpy()
    cpu = [t.cpu() for t in ts]
    want = RustReducer().submit([(cpu[0], cpu[1], cpu[2], axis, block)]).result()[0]
    scale = np.abs(want).max(axis=0, keepdims=True) + 1e-300
    assert np.max(np.abs(got - want) / scale) < 1e-10


def test_pinned_delayed_results_arrive_intact():
    reducer = TorchReducer(delayed=True)
    a = torch.randn(256, 300, device="cuda")
    first = reducer.submit_blocks([(a, a, None, 0, 1)])
    second = reducer.submit_blocks([(2 * a, a, None, 0, 1)])  # the other pinned buffer
    third = reducer.submit_blocks([(3 * a, a, None, 0, 1)])  # reuses the first buffer
    m1, m2, m3 = first.result()[0], second.result()[0], third.result()[0]
    np.testing.assert_allclose(m2[:, 0], 2 * m1[:, 0], rtol=1e-12)
    np.testing.assert_allclose(m3[:, 1], 9 * m1[:, 1], rtol=1e-12)


def test_tracking_a_cuda_model_is_exact():
    torch.manual_seed(0)
    x, y = nm.load_digits()
    x, y = x.cuda(), y.cuda()
    model = torch.nn.Sequential(
        torch.nn.Conv2d(1, 16, 3, padding=1), torch.nn.BatchNorm2d(16), torch.nn.ReLU(),
        torch.nn.Conv2d(16, 32, 3, padding=1), torch.nn.ReLU(), torch.nn.MaxPool2d(2), torch.nn.Flatten(),
        torch.nn.Linear(512, 64), torch.nn.ReLU(), torch.nn.Linear(64, 10),
    ).cuda()  # fmt: skip
    opt = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9, weight_decay=5e-4)
    g = torch.Generator(device="cuda").manual_seed(0)
    with nm.track(model, opt) as tracker:
        assert "?" in repr(tracker)
        for _ in range(200):
            idx = torch.randint(0, len(x), (64,), device="cuda", generator=g)
            loss = F.cross_entropy(model(x[idx]), y[idx])
            opt.zero_grad()
            loss.backward()
            opt.step()
    run = tracker.run
    assert isinstance(tracker._path.reducer, TorchReducer) and tracker._path.reducer.delayed
    assert run.errors("exact").max() <= 1e-5
    assert run.errors("paper").max() <= 2e-2
