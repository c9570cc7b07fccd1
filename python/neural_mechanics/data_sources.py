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

Data is checked before anything is built from it: images are (channels, size, size) with size
>= 4 (the reference models pool twice), labels are integers in [0, MAX_CLASSES) (the classifier
has one output per class: a label of 10**9 would ask for a 512 GB layer), inputs and labels
agree in length, images decode. Every problem is an
:class:`~neural_mechanics.errors.InvalidArgumentError` or
:class:`~neural_mechanics.errors.ShapeError` naming the file or the sample.

A ``.pt`` file is loaded with ``torch.load(weights_only=True)``: tensors, tuples, lists and dicts
only, no code runs. A file that needs more (a pickled Dataset class) loads only with
``trust=True`` (the command line's ``--trust-data``): unpickling such a file can run any code
its author put in it.

The demo's transformer reads text instead: a :class:`TextSource` holds a character vocabulary and
the train and validation characters as token ids. :func:`pydoc_topics` is Python's own
documentation (``neural_mechanics.datasets.load_pydoc_topics``, in every Python, no download);
:func:`text` any string, :func:`text_file` a UTF-8 file (``--text``). :func:`text_batches` draws
random windows of the train ids forever, :func:`evaluate_lm` the mean loss on fixed windows.
"""

from __future__ import annotations

import operator
import os
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

from .datasets import DIGITS_CREDIT, load_digits, load_pydoc_topics, pydoc_topics_credit
from .errors import InvalidArgumentError, ShapeError

#: Labels must lie in [0, MAX_CLASSES): the classifier has one output per class.
MAX_CLASSES = 2**16
#: Image sizes accepted for resizing (``image_size``): the reference models pool twice.
MIN_IMAGE_SIZE, MAX_IMAGE_SIZE = 4, 1024


def check_image_size(image_size: Any) -> int:
    """An ``image_size`` argument: an integer in [MIN_IMAGE_SIZE, MAX_IMAGE_SIZE]."""
    try:
        n = None if isinstance(image_size, bool) else operator.index(image_size)
    except TypeError:
        n = None
    if n is None or not MIN_IMAGE_SIZE <= n <= MAX_IMAGE_SIZE:
        raise InvalidArgumentError(f"image_size must be an integer from {MIN_IMAGE_SIZE} to {MAX_IMAGE_SIZE}, got {image_size!r}")
    return n


def _check_labels(labels: Any, n: int, where: str) -> int:
    """``labels``: a 1-D tensor of n integer values in [0, MAX_CLASSES); returns the class count."""
    import torch

    if not torch.is_tensor(labels) or labels.dim() != 1 or len(labels) != n:
        shape = tuple(labels.shape) if torch.is_tensor(labels) else type(labels).__name__
        raise ShapeError(f"{where}: labels must be a 1-D tensor of {n} values (one per input), got {shape}")
    if labels.is_complex() or labels.dtype == torch.bool:
        raise InvalidArgumentError(f"{where}: labels must be integers, got dtype {labels.dtype}")
    if n == 0:
        return 0
    if labels.is_floating_point() and not bool((labels == labels.round()).all()):
        raise InvalidArgumentError(f"{where}: labels must be whole numbers, got non-integer values (dtype {labels.dtype})")
    low, high = float(labels.min()), float(labels.max())
    if not (low >= 0 and high < MAX_CLASSES):
        raise InvalidArgumentError(
            f"{where}: labels must be class indices in [0, {MAX_CLASSES}), got values from {low:g} to {high:g} "
            f"(the classifier has one output per class)"
        )
    return int(high) + 1


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

    image_size = check_image_size(image_size)
    path = os.fspath(root)
    if not os.path.isdir(path):
        raise InvalidArgumentError(f"{path}: not a folder (expected root/<class>/<image>)")
    steps: list[Any] = [transforms.Grayscale(1)] if grayscale else [transforms.Lambda(lambda im: im.convert("RGB"))]
    steps += [transforms.Resize((image_size, image_size)), transforms.ToTensor()]
    try:
        folder = datasets.ImageFolder(path, transform=transforms.Compose(steps))
    except (OSError, RuntimeError) as exc:  # no class folder, no permission
        raise InvalidArgumentError(f"{path}: cannot read the image folder ({exc})") from None
    if len(folder) == 0:
        raise InvalidArgumentError(f"{root}: no images found (expected root/<class>/<image>)")
    if len(folder.classes) > MAX_CLASSES:
        raise InvalidArgumentError(f"{root}: {len(folder.classes)} class folders; at most {MAX_CLASSES}")

    def image(i: int) -> Any:
        try:
            return folder[i][0]
        except Exception as exc:  # any decoder failure (PIL raises OSError, ValueError, SyntaxError...)
            raise InvalidArgumentError(f"{folder.samples[i][0]}: cannot read this image ({type(exc).__name__}: {exc})") from None

    channels = 1 if grayscale else 3
    if in_memory:
        x = torch.stack([image(i) for i in range(len(folder))])
        y = torch.tensor(folder.targets, dtype=torch.int64)
        x = (x - x.mean()) / x.std().clamp_min(1e-8)
        dataset: Any = TensorDataset(x, y)
    else:
        # Normalise with statistics of (up to) 512 images rather than a full pass.
        sample = torch.stack([image(i) for i in range(min(len(folder), 512))])
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
    The checks of the module documentation apply (images, labels, lengths).
    """
    import torch
    from torch.utils.data import Dataset, TensorDataset

    if isinstance(dataset, (tuple, list)) and len(dataset) == 2 and all(torch.is_tensor(t) for t in dataset):
        x, y = dataset
        if x.dim() != 4:
            raise ShapeError(f"{name}: inputs must be (N, channels, size, size), got shape {tuple(x.shape)}")
        if x.is_complex() or not (x.is_floating_point() or x.dtype in (torch.uint8, torch.int8, torch.int16, torch.int32, torch.int64)):
            raise InvalidArgumentError(f"{name}: inputs must be real numbers, got dtype {x.dtype}")
        _check_labels(y, len(x), name)
        x = x.float()
        if not bool(torch.isfinite(x).all()):
            raise InvalidArgumentError(f"{name}: the inputs hold NaN or infinity")
        dataset = TensorDataset(x, y.long())
    elif isinstance(dataset, (str, bytes, dict)) or not (
        isinstance(dataset, Dataset) or (hasattr(dataset, "__len__") and hasattr(dataset, "__getitem__"))
    ):
        raise InvalidArgumentError(
            f"{name}: expected a torch Dataset of (image, label) or a pair of tensors (inputs, labels), got {type(dataset).__name__}"
        )
    try:
        n = len(dataset)
        first = dataset[0] if n else None
    except Exception as exc:  # a user Dataset: whatever its __len__ / __getitem__ raise
        raise InvalidArgumentError(f"{name}: cannot read the dataset ({type(exc).__name__}: {exc})") from None
    if n == 0:
        raise InvalidArgumentError(f"{name}: the dataset is empty")
    if not isinstance(first, (tuple, list)) or len(first) < 2 or not torch.is_tensor(first[0]):
        raise InvalidArgumentError(f"{name}: each sample must be a pair (image tensor, label), got {type(first).__name__}")
    image = first[0]
    if image.dim() != 3 or image.shape[1] != image.shape[2]:
        raise ShapeError(f"images must be (channels, size, size); got {tuple(image.shape)}")
    if image.shape[1] < MIN_IMAGE_SIZE:
        raise ShapeError(f"{name}: images of {image.shape[1]}x{image.shape[2]} are too small (at least {MIN_IMAGE_SIZE}x{MIN_IMAGE_SIZE})")
    if test is None:
        train, test = _split(dataset, test_fraction, seed)
    else:
        train = dataset
    if num_classes is None:
        if isinstance(dataset, TensorDataset):
            labels = dataset.tensors[1]
        else:
            try:
                labels = torch.tensor([float(dataset[i][1]) for i in range(n)], dtype=torch.float64)
            except Exception as exc:
                raise InvalidArgumentError(f"{name}: cannot read the labels ({type(exc).__name__}: {exc})") from None
        num_classes = _check_labels(labels, n, name)
    else:
        try:
            num_classes = None if isinstance(num_classes, bool) else operator.index(num_classes)
        except TypeError:
            num_classes = None
        if num_classes is None or not 1 <= num_classes <= MAX_CLASSES:
            raise InvalidArgumentError(f"num_classes must be an integer from 1 to {MAX_CLASSES}")
    return DataSource(name, train, test, in_channels=int(image.shape[0]), image_size=int(image.shape[1]), num_classes=num_classes)


def load(spec: str | os.PathLike[str] | None, *, image_size: int = 8, trust: bool = False) -> DataSource:
    """A source from a command-line ``--data`` value: None → the digits; a directory → an
    ImageFolder; a ``.pt``/``.pth`` file → ``torch.load`` of an (inputs, labels) pair of tensors
    with ``weights_only=True`` (no code runs), or of anything (a pickled Dataset) with
    ``trust=True`` only: unpickling runs whatever code the file's author put in it."""
    image_size = check_image_size(image_size)
    if spec is None or str(spec) == "digits":
        return digits()
    if isinstance(spec, bytes) or not isinstance(spec, (str, os.PathLike)):
        raise InvalidArgumentError(f"--data must be a path, got {type(spec).__name__}")
    path = os.fspath(spec)
    if not os.path.exists(path):
        raise InvalidArgumentError(f"--data {path!r}: no such file or folder")
    if os.path.isdir(path):
        if not os.access(path, os.R_OK | os.X_OK):
            raise InvalidArgumentError(f"--data {path!r}: the folder is not readable")
        return image_folder(path, image_size=image_size)
    if os.path.isfile(path) and path.endswith((".pt", ".pth")):
        return from_dataset(_torch_load(path, trust), name=os.path.basename(path))
    raise InvalidArgumentError(f"--data {path!r}: expected 'digits', an ImageFolder directory or a .pt/.pth file")


def _torch_load(path: str, trust: bool) -> Any:
    import pickle
    import re

    import torch

    try:
        return torch.load(path, weights_only=not trust, map_location="cpu")
    except pickle.UnpicklingError as exc:
        # weights_only refuses an object it would have to import code for ("Unsupported global:
        # GLOBAL module.Class"); any other unpickling error is a file that is not a torch file.
        needs = re.search(r"Unsupported global: GLOBAL (\S+)", str(exc))
        if needs and not trust:
            raise InvalidArgumentError(
                f"--data {path!r} holds a {needs.group(1).rstrip('.,')} object, not only tensors: loading it would run code "
                "from the file; pass --trust-data (trust=True) only if you trust its author"
            ) from None
        raise InvalidArgumentError(f"--data {path!r}: not a readable torch file ({' '.join(str(exc).split())[:200]})") from None
    except Exception as exc:  # not a torch file, truncated, unreadable: torch raises many kinds
        raise InvalidArgumentError(f"--data {path!r}: not a readable torch file ({type(exc).__name__}: {exc})") from None


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


# -- text, for the character-level GPT (models_gpt) ---------------------------------------------
@dataclass
class TextSource:
    """A character-level corpus: the vocabulary (every distinct character, sorted) and the train
    and validation text as int64 token ids (torch tensors), split once, deterministically."""

    name: str
    chars: str  # the vocabulary: token i is chars[i]
    train: Any  # torch.Tensor (n_train,) int64
    val: Any  # torch.Tensor (n_val,) int64
    credit: str = ""

    @property
    def vocab_size(self) -> int:
        return len(self.chars)

    def encode(self, text: str) -> Any:
        """Token ids of ``text`` (int64 tensor); a character outside the vocabulary is an error."""
        import torch

        index = {c: i for i, c in enumerate(self.chars)}
        missing = sorted(set(text) - index.keys())
        if missing:
            raise InvalidArgumentError(f"characters outside the vocabulary of {self.name}: {missing[:10]!r}")
        return torch.tensor([index[c] for c in text], dtype=torch.int64)

    def decode(self, ids: Any) -> str:
        return "".join(self.chars[int(i)] for i in ids)

    def __repr__(self) -> str:
        return (f"TextSource({self.name!r}: {len(self.train):,} train / {len(self.val):,} validation characters, "
                f"vocabulary of {self.vocab_size})")


# A text must leave at least this many characters on each side of the split (a batch window of
# the demo's context, and then some).
MIN_TEXT_CHARS = 256


def text(corpus: str, *, name: str = "text", val_fraction: float = 0.1, credit: str = "") -> TextSource:
    """A :class:`TextSource` from a string: the vocabulary is its distinct characters (sorted by
    code point); the first ``1 − val_fraction`` of the text trains, the rest validates (a
    contiguous split, so that no validation window overlaps a train window)."""
    import numpy as np
    import torch

    if not 0.0 < val_fraction < 1.0:
        raise InvalidArgumentError(f"val_fraction must be in (0, 1), got {val_fraction}")
    n_val = int(round(len(corpus) * val_fraction))
    if min(len(corpus) - n_val, n_val) < MIN_TEXT_CHARS:
        raise InvalidArgumentError(
            f"{name}: {len(corpus):,} characters are too few: each of train and validation needs at least {MIN_TEXT_CHARS}"
        )
    chars = "".join(sorted(set(corpus)))
    # One table lookup per character (code points index a small array), not a Python dict loop.
    codes = np.frombuffer(corpus.encode("utf-32-le"), dtype=np.uint32)
    lookup = np.zeros(int(codes.max()) + 1, dtype=np.int64)
    lookup[[ord(c) for c in chars]] = np.arange(len(chars))
    ids = torch.from_numpy(lookup[codes])
    split = len(corpus) - n_val
    return TextSource(name, chars, ids[:split].clone(), ids[split:].clone(), credit=credit)


def pydoc_topics(val_fraction: float = 0.1) -> TextSource:
    """Python's documentation topics (``pydoc_data.topics``, sorted by key, about 465 KB): the
    demo's default text. The last ``val_fraction`` of the characters validates."""
    return text(load_pydoc_topics(), name="pydoc_data.topics", val_fraction=val_fraction, credit=pydoc_topics_credit())


def text_file(path: str | os.PathLike[str], *, val_fraction: float = 0.1) -> TextSource:
    """A UTF-8 text file as a :class:`TextSource` (``--text``)."""
    p = os.fspath(path)
    if not os.path.isfile(p):
        raise InvalidArgumentError(f"--text {p!r}: no such file")
    try:
        with open(p, encoding="utf-8") as f:
            corpus = f.read()
    except UnicodeDecodeError as exc:
        raise InvalidArgumentError(f"--text {p!r}: not UTF-8 text ({exc.reason} at byte {exc.start})") from None
    return text(corpus, name=os.path.basename(p), val_fraction=val_fraction)


def load_text(spec: str | os.PathLike[str] | None) -> TextSource:
    """A text source from a command-line ``--text`` value: None → :func:`pydoc_topics`; else a
    UTF-8 file."""
    if spec is None or str(spec) == "pydoc":
        return pydoc_topics()
    return text_file(spec)


def _windows(ids: Any, starts: Any, context: int) -> tuple[Any, Any]:
    import torch

    offsets = torch.arange(context + 1)
    block = ids[starts[:, None] + offsets]  # (B, context + 1)
    return block[:, :-1], block[:, 1:]


def text_batches(ids: Any, batch_size: int, context: int, *, seed: int = 0) -> Iterator[tuple[Any, Any]]:
    """Random windows of ``ids`` forever: ``(inputs, targets)`` of shape (batch_size, context),
    the targets shifted by one character; reproducible from ``seed``."""
    import torch

    if len(ids) < context + 1:
        raise InvalidArgumentError(f"{len(ids)} tokens are fewer than one window of {context} + 1")
    g = torch.Generator().manual_seed(seed)
    while True:
        yield _windows(ids, torch.randint(0, len(ids) - context, (batch_size,), generator=g), context)


def evaluate_lm(model: Any, ids: Any, context: int, *, windows: int = 64, batch_size: int = 32) -> float:
    """Mean cross-entropy (nats per character) of ``model`` on ``windows`` fixed windows of
    ``ids`` (evenly spaced, so every call sees the same ones; eval mode, then the model's mode is
    restored)."""
    import torch
    import torch.nn.functional as F

    starts = torch.linspace(0, len(ids) - context - 1, windows).long()
    was_training = model.training
    model.eval()
    total, count = 0.0, 0
    with torch.no_grad():
        for i in range(0, windows, batch_size):
            x, y = _windows(ids, starts[i : i + batch_size], context)
            logits = model(x)
            total += float(F.cross_entropy(logits.reshape(-1, logits.shape[-1]), y.reshape(-1), reduction="sum"))
            count += y.numel()
    model.train(was_training)
    return total / count
