import numpy as np

import neural_mechanics as nm
from neural_mechanics.datasets import load_digits_numpy


def test_digits_are_the_uci_set():
    images, labels = load_digits_numpy()
    assert images.shape == (1797, 8, 8) and labels.shape == (1797,)
    assert images.min() == 0 and images.max() == 16
    assert sorted(np.unique(labels)) == list(range(10))
    # Every class is present in roughly equal numbers (174-183 images each in this set).
    counts = np.bincount(labels)
    assert counts.min() >= 170 and counts.max() <= 185


def test_torch_loader_shapes_and_normalisation():
    x, y = nm.load_digits()
    assert tuple(x.shape) == (1797, 1, 8, 8) and str(x.dtype) == "torch.float32"
    assert abs(float(x.mean())) < 1e-5 and abs(float(x.std()) - 1) < 1e-4
    xf, _ = nm.load_digits(flatten=True, normalize=False)
    assert tuple(xf.shape) == (1797, 64) and float(xf.max()) == 16.0
    assert str(y.dtype) == "torch.int64"
