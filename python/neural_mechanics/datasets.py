"""Small real data that needs no download: the digits shipped inside the package, and a text
corpus that every Python ships (the standard library's ``pydoc_data.topics``)."""

from __future__ import annotations

import gzip
import platform
from importlib import resources
from typing import Any

import numpy as np

DIGITS_CREDIT = (
    "UCI Optical Recognition of Handwritten Digits (E. Alpaydin, C. Kaynak, 1998), CC BY 4.0, "
    "as distributed by scikit-learn"
)

# Python's documentation: the text of the topics ``help()`` shows ("assert", "for", "typesseq",
# ...), generated from the Python documentation at each release; not shipped in this package.
PYDOC_TOPICS_CREDIT = (
    "Python's documentation topics (the standard library's pydoc_data.topics, Python {version}), "
    "Copyright © Python Software Foundation, PSF License Version 2"
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


def load_pydoc_topics() -> str:
    """The text of every topic of ``pydoc_data.topics`` (the pages ``help("for")`` shows),
    concatenated in sorted key order: about 465 KB of English prose, grammar and code, the same
    on every machine running the same Python release (it changes a little between releases).

    Source: see ``PYDOC_TOPICS_CREDIT`` and ``data/PYDOC_TOPICS_SOURCE.md``. Raises
    ``InvalidArgumentError`` where a Python distribution leaves the module out.
    """
    try:
        from pydoc_data.topics import topics
    except ImportError as exc:  # some distributions strip the documentation from the stdlib
        from .errors import InvalidArgumentError

        raise InvalidArgumentError(
            f"this Python ({platform.python_version()}) has no pydoc_data.topics ({exc}); pass a text file of your own instead"
        ) from None
    return "".join(topics[key] for key in sorted(topics))


def pydoc_topics_credit() -> str:
    """``PYDOC_TOPICS_CREDIT`` for the running Python."""
    return PYDOC_TOPICS_CREDIT.format(version=platform.python_version())
