"""Small real data shipped inside the package (no download at run time)."""

from __future__ import annotations

import gzip
from importlib import resources
from typing import Any

import numpy as np

DIGITS_CREDIT = (
    "UCI Optical Recognition of Handwritten Digits (E. Alpaydin, C. Kaynak, 1998), CC BY 4.0, "
    "as distributed by scikit-learn"
)


def load_digits_numpy() -> tuple[np.ndarray, np.ndarray]:
    """The 1,797 UCI digits: images (1797, 8, 8) uint8 in 0..16 and labels (1797,) int64."""
    with resources.files(__package__).joinpath("data/digits.csv.gz").open("rb") as raw:
        with gzip.open(raw, "rt") as text:
            table = np.loadtxt(text, delimiter=",", dtype=np.int64)
    images = table[:, :64].reshape(-1, 8, 8).astype(np.uint8)
    labels = table[:, 64]
    return images, labels


def load_digits(*, normalize: bool = True, flatten: bool = False) -> tuple[Any, Any]:
    """The packaged digits as torch tensors ``(inputs, labels)``.

    Args:
        normalize: scale pixels to zero mean and unit variance (over the whole set), as float32;
            otherwise the raw 0..16 values as float32.
        flatten: inputs of shape (1797, 64) instead of (1797, 1, 8, 8).

    Source: see ``DIGITS_CREDIT``.
    """
    import torch

    images, labels = load_digits_numpy()
    x = torch.from_numpy(images.astype(np.float32))
    if normalize:
        x = (x - x.mean()) / x.std()
    x = x.reshape(-1, 64) if flatten else x.unsqueeze(1)
    return x, torch.from_numpy(labels)
