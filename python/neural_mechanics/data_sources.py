"""Where the demo's data comes from: the packaged digits by default, or your own.

A :class:`DataSource` is a train and a test ``torch.utils.data.Dataset`` of ``(image, label)``
pairs with images shaped (channels, size, size), plus what the reference models need to know
(channels, image size, number of classes). Three ways to make one:

- :func:`digits` — the UCI digits shipped in the package (``neural_mechanics.datasets``), no
  download;
- :func:`image_folder` — a folder ``root/<class>/<image>`` read with
  ``torchvision.datasets.ImageFolder``, converted to grayscale and resized (8x8 by default, the
  size the reference models are tuned for);
- :func:`from_dataset` — any torch ``Dataset`` (or an ``(inputs, labels)`` pair of tensors).

:func:`load` turns a command-line ``--data`` argument into a source. :func:`batches` draws
minibatches forever, by direct tensor indexing for in-memory data (the common case here, much
faster than a DataLoader for tiny images) and through a shuffling DataLoader otherwise.
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

from .datasets import DIGITS_CREDIT, load_digits
from .errors import InvalidArgumentError, ShapeError


@dataclass
class DataSource:
    """Train/test datasets of (image (C, H, W) float tensor, int label) and their shape."""

    name: str
    train: Any  # torch.utils.data.Dataset
    test: Any  # torch.utils.data.Dataset (may be empty)
    in_channels: int
    image_size: int
    num_classes: int
    credit: str = ""

    @property
    def shape(self) -> dict[str, int]:
        """Keyword arguments for the reference models (``models.build(name, **source.shape)``)."""
        return {"in_channels": self.in_channels, "image_size": self.image_size, "num_classes": self.num_classes}

    def __repr__(self) -> str:
        return (
            f"DataSource({self.name!r}: {len(self.train)} train / {len(self.test)} test, "
            f"{self.in_channels}x{self.image_size}x{self.image_size}, {self.num_classes} classes)"
        )


def _split(dataset: Any, test_fraction: float, seed: int) -> tuple[Any, Any]:
    """Random train/test split, reproducible from ``seed``; TensorDatasets stay TensorDatasets
    (so :func:`batches` can index them directly)."""
    import torch
    from torch.utils.data import Subset, TensorDataset

    if not 0.0 <= test_fraction < 1.0:
        raise InvalidArgumentError(f"test_fraction must be in [0, 1), got {test_fraction}")
    n = len(dataset)
    n_test = int(round(n * test_fraction))
    perm = torch.randperm(n, generator=torch.Generator().manual_seed(seed))
    test_idx, train_idx = perm[:n_test], perm[n_test:]
    if isinstance(dataset, TensorDataset):
        return (TensorDataset(*(t[train_idx] for t in dataset.tensors)), TensorDataset(*(t[test_idx] for t in dataset.tensors)))
    return Subset(dataset, train_idx.tolist()), Subset(dataset, test_idx.tolist())


def digits(test_fraction: float = 0.2, seed: int = 0) -> DataSource:
    """The 1,797 packaged 8x8 digits, normalised, split train/test."""
    from torch.utils.data import TensorDataset

    x, y = load_digits()
    train, test = _split(TensorDataset(x, y), test_fraction, seed)
    return DataSource("digits", train, test, in_channels=1, image_size=8, num_classes=10, credit=DIGITS_CREDIT)


def image_folder(
    root: str | os.PathLike[str],
    *,
    image_size: int = 8,
    grayscale: bool = True,
    test_fraction: float = 0.2,
    seed: int = 0,
    in_memory: bool = True,
) -> DataSource:
    """Images in ``root/<class name>/<file>`` (torchvision's ImageFolder layout).

    Each image becomes a ``grayscale`` (1 channel; else RGB, 3 channels) ``image_size`` square,
    normalised with the mean and standard deviation of the whole folder. ``in_memory`` decodes
    every image once up front (right for small folders; set False for large ones, which then
    stream through a DataLoader).
    """
    import torch
    from torch.utils.data import TensorDataset
    from torchvision import datasets, transforms

    steps: list[Any] = [transforms.Grayscale(1)] if grayscale else [transforms.Lambda(lambda im: im.convert("RGB"))]
    steps += [transforms.Resize((image_size, image_size)), transforms.ToTensor()]
    folder = datasets.ImageFolder(os.fspath(root), transform=transforms.Compose(steps))
    if len(folder) == 0:
        raise InvalidArgumentError(f"{root}: no images found (expected root/<class>/<image>)")
    channels = 1 if grayscale else 3
    if in_memory:
        x = torch.stack([folder[i][0] for i in range(len(folder))])
        y = torch.tensor(folder.targets, dtype=torch.int64)
        x = (x - x.mean()) / x.std().clamp_min(1e-8)
        dataset: Any = TensorDataset(x, y)
    else:
        # Normalise with statistics of (up to) 512 images rather than a full pass.
        sample = torch.stack([folder[i][0] for i in range(min(len(folder), 512))])
        mean, std = float(sample.mean()), float(sample.std().clamp_min(1e-8))
        folder.transform = transforms.Compose([*steps, transforms.Normalize([mean] * channels, [std] * channels)])
        dataset = folder
    train, test = _split(dataset, test_fraction, seed)
    return DataSource(
        f"ImageFolder {os.fspath(root)}", train, test, in_channels=channels, image_size=image_size, num_classes=len(folder.classes)
    )


def from_dataset(
    dataset: Any,
    *,
    num_classes: int | None = None,
    test: Any = None,
    test_fraction: float = 0.2,
    seed: int = 0,
    name: str = "dataset",
) -> DataSource:
    """Any torch Dataset of ``(image (C, H, W), label)`` with square images, or an
    ``(inputs, labels)`` pair of tensors.

    ``test``: a separate test set; otherwise ``test_fraction`` of ``dataset`` is held out.
    ``num_classes``: read from the labels when not given (one pass over a non-tensor dataset).
    """
    import torch
    from torch.utils.data import TensorDataset

    if isinstance(dataset, (tuple, list)) and len(dataset) == 2 and all(torch.is_tensor(t) for t in dataset):
        dataset = TensorDataset(dataset[0].float(), dataset[1].long())
    if len(dataset) == 0:
        raise InvalidArgumentError("the dataset is empty")
    image = dataset[0][0]
    if image.dim() != 3 or image.shape[1] != image.shape[2]:
        raise ShapeError(f"images must be (channels, size, size); got {tuple(image.shape)}")
    if test is None:
        train, test = _split(dataset, test_fraction, seed)
    else:
        train = dataset
    if num_classes is None:
        labels = dataset.tensors[1] if isinstance(dataset, TensorDataset) else torch.tensor([int(dataset[i][1]) for i in range(len(dataset))])
        num_classes = int(labels.max()) + 1
    return DataSource(name, train, test, in_channels=int(image.shape[0]), image_size=int(image.shape[1]), num_classes=num_classes)


def load(spec: str | os.PathLike[str] | None, *, image_size: int = 8) -> DataSource:
    """A source from a command-line ``--data`` value: None → the digits; a directory → an
    ImageFolder; a ``.pt``/``.pth`` file → ``torch.load`` of a Dataset or an (inputs, labels)
    pair (loaded with ``weights_only=False``: only load files you trust)."""
    if spec is None or str(spec) == "digits":
        return digits()
    path = os.fspath(spec)
    if os.path.isdir(path):
        return image_folder(path, image_size=image_size)
    if os.path.isfile(path) and path.endswith((".pt", ".pth")):
        import torch

        return from_dataset(torch.load(path, weights_only=False), name=os.path.basename(path))
    raise InvalidArgumentError(f"--data {path!r}: expected 'digits', an ImageFolder directory or a .pt/.pth file")


def batches(dataset: Any, batch_size: int, *, seed: int = 0) -> Iterator[tuple[Any, Any]]:
    """Shuffled minibatches ``(inputs, labels)`` forever (epoch after epoch), reproducible."""
    import torch
    from torch.utils.data import DataLoader, TensorDataset

    g = torch.Generator().manual_seed(seed)
    if isinstance(dataset, TensorDataset):
        x, y = dataset.tensors[:2]
        n = len(x)
        while True:
            perm = torch.randperm(n, generator=g)
            for i in range(0, n - batch_size + 1 if n >= batch_size else 1, batch_size):
                idx = perm[i : i + batch_size]
                yield x[idx], y[idx]
    loader = DataLoader(dataset, batch_size=batch_size, shuffle=True, drop_last=len(dataset) >= batch_size, generator=g)
    while True:
        yield from loader


def evaluate(model: Any, dataset: Any, batch_size: int = 512) -> float:
    """Accuracy of ``model`` on ``dataset`` (eval mode, then the model's mode is restored);
    NaN for an empty dataset."""
    import torch
    from torch.utils.data import DataLoader

    if len(dataset) == 0:
        return float("nan")
    was_training = model.training
    model.eval()
    correct = 0
    with torch.no_grad():
        for x, y in DataLoader(dataset, batch_size=batch_size):
            correct += int((model(x).argmax(1) == y).sum())
    model.train(was_training)
    return correct / len(dataset)
