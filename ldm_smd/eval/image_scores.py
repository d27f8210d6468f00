"""Scores of generated digits against MNIST-5k, judged by the project's own domain classifier.

:class:`ImageScorer` scores a set of images (tensors, uint8 arrays, a ``samples.npz`` or a folder
of PNGs) with four metrics, each beside its *floor*: the held-out split scored the same way,
against the train split (what real digits the models never saw get):

- ``fd`` (lower is better): the Fréchet distance between the classifier's penultimate features
  of the images and of the train split, the FID of this domain. Like FID it is biased upward
  for small sets: compare sets of the same size (the floor uses the 1,000 held-out digits).
- ``confident`` (higher): the share of images the classifier labels with a confidence (maximum
  softmax probability) of at least 0.9: legibility.
- ``class_kl`` (lower): ``KL(p_train || p_images)`` in nats between the train split's class
  histogram (uniform here) and the images' histogram of predicted (argmax) classes, the
  latter smoothed by adding 0.5 to every class count (Jeffreys), so a class that no image
  shows costs a finite amount: class coverage.
- ``nn_dist`` (higher; a memorisation check): the mean over images of the distance to the
  nearest train image, as the RMS per pixel of the 32 x 32 difference with pixels in ``[0, 1]``
  (28-pixel images are padded with black first). A copy of the train set scores 0; a value far
  below the floor means copies, far above it means images unlike any digit.

Images are quantised to uint8 as :func:`ldm_smd.images.to_uint8` does before scoring, so a
tensor scores the same as the ``samples.npz`` written from it; RGB images are averaged to gray.
The train split's features, class histogram and pixels are computed once per scorer.
``ldm-smd score-images --samples PATH --data data/mnist5k`` prints the metrics beside the floor.
"""

from __future__ import annotations

import os
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image

from ldm_smd.checkpoints import CheckpointError
from ldm_smd.data.mnist5k import (
    DIGIT_SIZE,
    NUM_CLASSES,
    arrays_hash,
    load_split,
    split_file,
    to_images,
)
from ldm_smd.errors import UsageError
from ldm_smd.eval.classifier import (
    CLASSIFIER_NAME,
    INPUT_SIZE,
    TRAIN_COMMAND,
    describe,
    load_classifier,
    predict,
)
from ldm_smd.eval.fid import (
    EvalInputError,
    EvalInputMissing,
    feature_statistics,
    frechet_distance,
    list_images,
    load_uint8_array,
)
from ldm_smd.fileio import check_writable
from ldm_smd.images import to_uint8
from ldm_smd.jsonio import write_json

CONFIDENCE = 0.9
#: pseudo-count added to every class of the images' histogram before the KL
CLASS_PSEUDO_COUNT = 0.5
SAMPLES_FILE = "samples.npz"


def _as_uint8(images: Any) -> np.ndarray:
    """``(N, H, W)`` uint8 gray images from any accepted layout (see :meth:`ImageScorer.score`)."""
    if isinstance(images, torch.Tensor):
        if images.ndim != 4:
            raise UsageError(f"expected a (N, C, H, W) tensor in [-1, 1], got shape "
                             f"{tuple(images.shape)}")
        array = to_uint8(images)  # (N, H, W, C)
    else:
        array = np.asarray(images)
        if array.dtype != np.uint8:
            raise UsageError(f"expected uint8 images (or a float tensor in [-1, 1]), got "
                             f"{array.dtype}")
        if array.ndim == 3:
            array = array[..., None]
        elif array.ndim == 4 and array.shape[1] in (1, 3) and array.shape[-1] not in (1, 3):
            array = array.transpose(0, 2, 3, 1)  # NCHW -> NHWC
        elif array.ndim != 4:
            raise UsageError(f"expected images (N, H, W), (N, H, W, C) or (N, C, H, W), got "
                             f"shape {array.shape}")
    n, h, w, c = array.shape
    if c not in (1, 3) or h != w or h not in (DIGIT_SIZE, INPUT_SIZE):
        raise UsageError(f"expected 1- or 3-channel {DIGIT_SIZE}x{DIGIT_SIZE} or "
                         f"{INPUT_SIZE}x{INPUT_SIZE} images, got {n} of {h}x{w} with {c} "
                         f"channel(s)")
    if n < 2:
        raise UsageError(f"scoring needs at least 2 images (the Fréchet distance estimates a "
                         f"covariance), got {n}")
    if c == 3:
        return np.rint(array.astype(np.float64).mean(axis=-1)).astype(np.uint8)
    return array[..., 0]


def _to_input(pixels: np.ndarray) -> torch.Tensor:
    """uint8 ``(N, 28 | 32, ...)`` -> the classifier's ``(N, 1, 32, 32)`` in ``[-1, 1]``."""
    if pixels.shape[-1] == INPUT_SIZE:
        return torch.from_numpy(np.ascontiguousarray(pixels)).float().div(127.5).sub(1.0)[:, None]
    return to_images(pixels, size=INPUT_SIZE)


def read_samples(path: str | os.PathLike[str]) -> np.ndarray:
    """uint8 images from ``path``: a ``.npz`` / ``.npy`` (key ``images``, as ``ldm-smd sample``
    writes it), a folder holding ``samples.npz``, or a folder of PNG images (read as gray)."""
    path = Path(path)
    if path.is_dir() and (path / SAMPLES_FILE).is_file():
        path = path / SAMPLES_FILE
    if path.is_file():
        return load_uint8_array(path)
    if not path.exists():
        raise EvalInputMissing(f"samples not found: {path}")
    files = list_images(path, samples=True)
    if not files:
        raise EvalInputError(f"{path} holds no PNG images and no {SAMPLES_FILE}")
    arrays = []
    for file in files:
        with Image.open(file) as image:
            arrays.append(np.asarray(image.convert("L"), dtype=np.uint8))
    shapes = {a.shape for a in arrays}
    if len(shapes) > 1:
        raise EvalInputError(f"{path}: the images differ in size ({sorted(shapes)[:3]}); a "
                             f"sample folder holds images of one size")
    return np.stack(arrays)


class ImageScorer:
    """Scores images of digits against MNIST-5k; see the module docstring for the metrics.

    Args:
        data: a prepared MNIST-5k folder (``train.npz``, ``heldout.npz``).
        classifier: the domain classifier file; defaults to ``DATA/classifier.safetensors``
            (made by ``ldm-smd train-classifier --data DATA``).
        batch_size: images per classifier batch (and per block of the nearest-neighbour
            search).
    """

    metrics: tuple[str, ...] = ("fd", "confident", "class_kl", "nn_dist")
    # nn_dist has no better side: near the floor is right, far below it means copies
    better: dict[str, str] = {"fd": "lower", "confident": "higher", "class_kl": "lower",
                              "nn_dist": "near the floor"}

    def __init__(self, *, data: str | Path, classifier: str | Path | None = None,
                 batch_size: int = 500) -> None:
        if batch_size < 1:
            raise UsageError(f"batch_size={batch_size} must be at least 1")
        self.data = Path(data)
        for split in ("train", "heldout"):
            split_file(self.data, split)  # a missing folder names the script that makes it
        self.classifier_path = Path(classifier) if classifier is not None else (
            self.data / CLASSIFIER_NAME)
        self.model, self.meta = load_classifier(self.classifier_path, data=self.data)
        self.batch_size = int(batch_size)
        pixels, labels = load_split(self.data, "train")
        if self.meta.get("train_sha256") != arrays_hash(pixels, labels):
            raise CheckpointError(
                f"{self.classifier_path} was trained on another train split than "
                f"{self.data}'s: train it again with "
                f"`{TRAIN_COMMAND.format(data=self.data)} --out {self.classifier_path}`"
            )
        features, _ = predict(self.model, _to_input(pixels), batch_size=self.batch_size)
        self._train_mu, self._train_sigma = feature_statistics(features.numpy())
        counts = np.bincount(labels, minlength=NUM_CLASSES).astype(np.float64)
        self._train_classes = counts / counts.sum()
        self._train_pixels = _to_input(pixels).flatten(1).add(1.0).div(2.0)
        self._floor: dict[str, float] | None = None

    def describe(self) -> str:
        """One line about the classifier: its held-out accuracy and training."""
        return f"classifier {self.classifier_path}: {describe(self.meta)}"

    def score(self, images: Any) -> dict[str, float]:
        """The metrics of ``images``: a float tensor ``(N, C, H, W)`` in ``[-1, 1]``, or uint8
        ``(N, H, W)``, ``(N, H, W, C)`` or ``(N, C, H, W)``; 28 or 32 pixels; 1 or 3 channels;
        at least 2 images."""
        x = _to_input(_as_uint8(images))
        features, probs = predict(self.model, x, batch_size=self.batch_size)
        mu, sigma = feature_statistics(features.numpy())
        counts = np.bincount(probs.argmax(dim=1).numpy(), minlength=NUM_CLASSES)
        smoothed = (counts + CLASS_PSEUDO_COUNT) / (counts.sum() + CLASS_PSEUDO_COUNT * len(counts))
        p = self._train_classes
        class_kl = float(np.sum(np.where(p > 0, p * np.log(p / smoothed), 0.0)))
        return {
            "fd": frechet_distance(mu, sigma, self._train_mu, self._train_sigma),
            "confident": float((probs.max(dim=1).values >= CONFIDENCE).float().mean()),
            "class_kl": class_kl,
            "nn_dist": self._nearest_train_distance(x),
        }

    def _nearest_train_distance(self, x: torch.Tensor) -> float:
        """Mean RMS-per-pixel distance (pixels in [0, 1]) to the nearest train image."""
        train = self._train_pixels
        pixels = train.shape[1]
        nearest = []
        for start in range(0, len(x), self.batch_size):
            query = x[start:start + self.batch_size].flatten(1).add(1.0).div(2.0)
            d2 = torch.cdist(query.double(), train.double()).pow(2).min(dim=1).values
            nearest.append(d2.clamp_min(0.0).div(pixels).sqrt())
        return float(torch.cat(nearest).mean())

    def floor(self) -> dict[str, float]:
        """The held-out split scored the same way: what real, unseen digits get."""
        if self._floor is None:
            self._floor = self.score(load_split(self.data, "heldout")[0])
        return dict(self._floor)

    def score_samples(self, path: str | os.PathLike[str]) -> dict[str, float]:
        """:meth:`score` of the images in a ``samples.npz`` (or a folder with one) or a folder
        of PNGs (see :func:`read_samples`)."""
        return self.score(read_samples(path))


def format_scores(scores: dict[str, float], floor: dict[str, float], better: dict[str, str],
                  *, n: int) -> str:
    """A small table: each metric, its value, the floor, and which way is better."""
    lines = [f"{'metric':<10} {'samples':>10} {'floor':>10}  better  ({n} samples; floor: "
             f"the held-out split)"]
    for name, value in scores.items():
        lines.append(f"{name:<10} {value:>10.4f} {floor[name]:>10.4f}  {better[name]}")
    return "\n".join(lines)


def score_images_command(samples: str | os.PathLike[str], data: str | os.PathLike[str], *,
                         classifier: str | os.PathLike[str] | None = None,
                         out: str | os.PathLike[str] | None = None,
                         batch_size: int = 500) -> dict[str, Any]:
    """What ``ldm-smd score-images`` does: score ``samples``, print them beside the floor and
    write them (with the floor) to ``out`` as JSON when given; returns that record."""
    start = time.perf_counter()
    if out is not None:
        check_writable(out, what="--out", folder=False)
    images = read_samples(samples)
    scorer = ImageScorer(data=data, classifier=classifier, batch_size=batch_size)
    scores = scorer.score(images)
    floor = scorer.floor()
    print(f"[ldm-smd] {scorer.describe()}")
    print(format_scores(scores, floor, scorer.better, n=len(images)))
    record = {
        "samples": str(samples), "num_samples": len(images), "data": str(data),
        "classifier": str(scorer.classifier_path), "scores": scores, "floor": floor,
        "better": scorer.better, "seconds": round(time.perf_counter() - start, 2),
        "classifier_heldout_accuracy": scorer.meta.get("heldout_accuracy"),
    }
    if out is not None:
        write_json(out, record)
    return record
