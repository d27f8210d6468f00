"""The domain classifier of MNIST-5k: a small CNN the project trains itself, the judge of samples.

FID needs Inception weights and thousands of samples; this classifier is the offline instrument
instead (:mod:`ldm_smd.eval.image_scores` scores samples on its features). Pure torch, no
Lightning and no ``ldm_smd.nn``:

- :class:`DigitClassifier`: three 3 x 3 conv blocks (conv, batch norm, ReLU, 2 x 2 max pool) on
  ``(N, 1, 32, 32)`` images in ``[-1, 1]``, then a ``feature_dim``-wide layer (ReLU): the
  penultimate *features* the Fréchet distance is computed on, then the 10-way linear head.
- :func:`train_classifier`: trains it on the ``train`` split of a prepared MNIST-5k folder and
  measures its accuracy on ``heldout``. Deterministic on the CPU: the initialisation, the order
  of every epoch, the augmentation (:func:`random_affine`: a small random rotation, scaling and
  shift of each digit, the frame filled with black) and the dropout on the features (training
  only) are drawn from generators seeded by ``seed``; Adam, with the learning rate following a
  cosine from ``lr`` to 0 over the run. Training runs on one CPU thread (restored afterwards):
  the reductions of a convolution's backward pass depend on the thread count, so the weights do
  not depend on the process's thread setting, and on a shared 2-core machine one thread was
  also the faster setting for convolutions this small.
- :func:`save_classifier` / :func:`load_classifier`: a safetensors file (written to a temporary
  name, then renamed) whose metadata holds the architecture, the training options, the held-out
  accuracy, the training time and the sha256 of the train split; loading is strict (a missing or
  unexpected key is a :class:`~ldm_smd.checkpoints.CheckpointError` listing them).

``ldm-smd train-classifier --data data/mnist5k`` trains and caches it as
``data/mnist5k/classifier.safetensors``.
"""

from __future__ import annotations

import json
import math
import os
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from ldm_smd.checkpoints import (
    CheckpointError,
    atomic_write,
    load_checkpoint,
    load_state_dict_strict,
)
from ldm_smd.data.mnist5k import NUM_CLASSES, arrays_hash, load_split, to_images
from ldm_smd.errors import UsageError

CLASSIFIER_NAME = "classifier.safetensors"
TRAIN_COMMAND = "ldm-smd train-classifier --data {data}"
#: the classifier's input size (28-pixel digits are padded to it)
INPUT_SIZE = 32
#: the training options and their defaults (what :func:`train_classifier` takes)
DEFAULT_OPTIONS: dict[str, Any] = {
    "epochs": 15, "batch_size": 32, "lr": 2e-3, "weight_decay": 1e-4, "shift": 2.0,
    "rotation": 10.0, "scale": 0.1, "dropout": 0.3, "seed": 0,
}


class DigitClassifier(nn.Module):
    """A small CNN over ``(N, 1, 32, 32)`` digits in ``[-1, 1]``; see the module docstring.

    Args:
        widths: channels of the three conv blocks.
        feature_dim: width of the penultimate (feature) layer.
        num_classes: outputs of the head.
        generator: draws the initialisation (Kaiming-normal weights, zero biases); ``None``
            uses torch's global generator.
    """

    def __init__(self, *, widths: tuple[int, int, int] | list[int] = (16, 32, 64),
                 feature_dim: int = 128, num_classes: int = NUM_CLASSES,
                 generator: torch.Generator | None = None) -> None:
        super().__init__()
        self.widths = [int(w) for w in widths]
        if len(self.widths) != 3 or min(self.widths) < 1 or feature_dim < 1:
            raise ValueError(f"DigitClassifier: widths={widths} (three positive ints) and "
                             f"feature_dim={feature_dim} (positive) expected")
        self.feature_dim, self.num_classes = int(feature_dim), int(num_classes)
        layers: list[nn.Module] = []
        channels = 1
        for width in self.widths:
            layers += [nn.Conv2d(channels, width, 3, padding=1, bias=False),
                       nn.BatchNorm2d(width), nn.ReLU(inplace=True), nn.MaxPool2d(2)]
            channels = width
        self.body = nn.Sequential(*layers)
        side = INPUT_SIZE // 8
        self.features = nn.Sequential(nn.Flatten(), nn.Linear(channels * side * side, feature_dim),
                                      nn.ReLU(inplace=True))
        self.head = nn.Linear(feature_dim, num_classes)
        for module in self.modules():
            if isinstance(module, nn.Conv2d | nn.Linear):
                nn.init.kaiming_normal_(module.weight, nonlinearity="relu", generator=generator)
                if module.bias is not None:
                    nn.init.zeros_(module.bias)

    def architecture(self) -> dict[str, Any]:
        """The constructor arguments that rebuild this network (stored with its weights)."""
        return {"widths": self.widths, "feature_dim": self.feature_dim,
                "num_classes": self.num_classes}

    def features_and_logits(self, images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """``(features (N, feature_dim), logits (N, num_classes))`` of ``(N, 1, 32, 32)``."""
        if images.ndim != 4 or images.shape[1:] != (1, INPUT_SIZE, INPUT_SIZE):
            raise ValueError(f"DigitClassifier expects (N, 1, {INPUT_SIZE}, {INPUT_SIZE}) "
                             f"images, got {tuple(images.shape)}")
        features = self.features(self.body(images))
        return features, self.head(features)

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return self.features_and_logits(images)[1]


def random_affine(images: torch.Tensor, generator: torch.Generator, *, shift: float = 2.0,
                  rotation: float = 10.0, scale: float = 0.1) -> torch.Tensor:
    """Each image turned by an angle in ``[-rotation, rotation]`` degrees, scaled by a factor in
    ``[1 - scale, 1 + scale]`` and moved by up to ``shift`` pixels along each axis (all uniform,
    drawn from ``generator``), bilinear, the uncovered frame filled with black (-1)."""
    n, _, h, w = images.shape
    u = torch.rand(n, 4, generator=generator) * 2.0 - 1.0
    angle = u[:, 0] * math.radians(rotation)
    zoom = 1.0 + u[:, 1] * scale
    cos, sin = torch.cos(angle) / zoom, torch.sin(angle) / zoom
    theta = torch.stack([
        torch.stack([cos, -sin, u[:, 2] * shift * 2.0 / w], dim=1),
        torch.stack([sin, cos, u[:, 3] * shift * 2.0 / h], dim=1),
    ], dim=1)
    grid = F.affine_grid(theta, list(images.shape), align_corners=False)
    moved = F.grid_sample(images + 1.0, grid, mode="bilinear", padding_mode="zeros",
                          align_corners=False)
    return moved - 1.0


@torch.no_grad()
def predict(model: DigitClassifier, images: torch.Tensor, *, batch_size: int = 500
            ) -> tuple[torch.Tensor, torch.Tensor]:
    """``(features, softmax probabilities)`` of ``images`` in batches, in eval mode."""
    was_training = model.training
    model.eval()
    features, probs = [], []
    try:
        for start in range(0, len(images), batch_size):
            f, logits = model.features_and_logits(images[start:start + batch_size])
            features.append(f)
            probs.append(logits.softmax(dim=1))
    finally:
        model.train(was_training)
    if not features:
        return torch.zeros(0, model.feature_dim), torch.zeros(0, model.num_classes)
    return torch.cat(features), torch.cat(probs)


def accuracy(model: DigitClassifier, images: torch.Tensor, labels: torch.Tensor) -> float:
    """Share of ``images`` whose most probable class is ``labels``."""
    probs = predict(model, images)[1]
    return float((probs.argmax(dim=1) == labels).float().mean())


def train_classifier(
    data: str | os.PathLike[str], *, epochs: int = DEFAULT_OPTIONS["epochs"],
    batch_size: int = DEFAULT_OPTIONS["batch_size"], lr: float = DEFAULT_OPTIONS["lr"],
    weight_decay: float = DEFAULT_OPTIONS["weight_decay"],
    shift: float = DEFAULT_OPTIONS["shift"], rotation: float = DEFAULT_OPTIONS["rotation"],
    scale: float = DEFAULT_OPTIONS["scale"], dropout: float = DEFAULT_OPTIONS["dropout"],
    seed: int = DEFAULT_OPTIONS["seed"], limit: int | None = None,
    progress: Callable[[str], None] | None = None,
) -> tuple[DigitClassifier, dict[str, Any]]:
    """Train a :class:`DigitClassifier` on ``DATA/train.npz``; returns it (in eval mode) and its
    metadata: the held-out accuracy, the training time, the options and the train split's hash.
    ``limit`` trains on the first ``limit`` images of a shuffled train split only (tests).
    ``progress`` receives one line per epoch."""
    options = {"epochs": int(epochs), "batch_size": int(batch_size), "lr": float(lr),
               "weight_decay": float(weight_decay), "shift": float(shift),
               "rotation": float(rotation), "scale": float(scale), "dropout": float(dropout),
               "seed": int(seed), "limit": limit}
    if (epochs < 1 or batch_size < 1 or not lr > 0 or min(shift, rotation, scale) < 0
            or scale >= 1 or not 0 <= dropout < 1 or (limit is not None and limit < 1)):
        raise UsageError(f"train_classifier: epochs, batch_size, lr and limit must be positive, "
                         f"shift, rotation and scale >= 0, scale and dropout in [0, 1); got "
                         f"{options}")
    start = time.perf_counter()
    pixels, labels = load_split(data, "train")
    heldout_pixels, heldout_labels = load_split(data, "heldout")
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # weights independent of the thread setting (module docstring)
    try:
        model = _fit(pixels, labels, options, progress)
    finally:
        torch.set_num_threads(threads)
    heldout = to_images(heldout_pixels, size=INPUT_SIZE)
    meta = {
        "heldout_accuracy": accuracy(model, heldout, torch.from_numpy(heldout_labels)),
        "train_seconds": round(time.perf_counter() - start, 1),
        "options": options,
        "train_sha256": arrays_hash(pixels, labels),
        "architecture": model.architecture(),
        "torch": torch.__version__,
    }
    return model, meta


def _fit(pixels: np.ndarray, labels: np.ndarray, options: dict[str, Any],
         progress: Callable[[str], None] | None) -> DigitClassifier:
    """The training loop of :func:`train_classifier` (``options`` are its arguments)."""
    seed, limit, batch_size = options["seed"], options["limit"], options["batch_size"]
    epochs, dropout = options["epochs"], options["dropout"]
    images, targets = to_images(pixels, size=INPUT_SIZE), torch.from_numpy(labels)
    order_gen = torch.Generator().manual_seed(seed)
    if limit is not None:
        keep = torch.randperm(len(targets), generator=order_gen)[:limit]
        images, targets = images[keep], targets[keep]
    init_gen, augment_gen = (torch.Generator().manual_seed(seed + k) for k in (1, 2))
    model = DigitClassifier(generator=init_gen)
    optimizer = torch.optim.Adam(model.parameters(), lr=options["lr"],
                                 weight_decay=options["weight_decay"])
    steps_per_epoch = math.ceil(len(targets) / batch_size)
    total = epochs * steps_per_epoch
    scheduler = torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda step: 0.5 * (1.0 + math.cos(math.pi * step / total))
    )
    model.train()
    for epoch in range(epochs):
        order = torch.randperm(len(targets), generator=order_gen)
        running = 0.0
        for first in range(0, len(order), batch_size):
            rows = order[first:first + batch_size]
            features, _ = model.features_and_logits(
                random_affine(images[rows], augment_gen, shift=options["shift"],
                              rotation=options["rotation"], scale=options["scale"]))
            keep = torch.rand(features.shape, generator=augment_gen) >= dropout
            logits = model.head(features * keep / (1.0 - dropout))
            loss = F.cross_entropy(logits, targets[rows])
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            scheduler.step()
            running += loss.item() * len(rows)
        if progress is not None:
            progress(f"epoch {epoch + 1}/{epochs}: train loss {running / len(targets):.4f}")
    return model.eval()


def save_classifier(model: DigitClassifier, meta: dict[str, Any],
                    path: str | os.PathLike[str]) -> Path:
    """Write the weights and ``meta`` (as JSON in the safetensors metadata) to ``path``."""
    from safetensors.torch import save

    tensors = {k: v.detach().contiguous() for k, v in model.state_dict().items()}
    payload = save(tensors, metadata={"ldm_smd": json.dumps(meta)})
    return atomic_write(path, lambda handle: handle.write(payload))


def read_metadata(path: str | os.PathLike[str]) -> dict[str, Any]:
    """The metadata :func:`save_classifier` stored in ``path``."""
    from safetensors import safe_open

    try:
        with safe_open(str(path), framework="pt") as handle:
            meta = (handle.metadata() or {}).get("ldm_smd")
    except Exception as exc:  # safetensors raises its own error types
        raise CheckpointError(f"{path} is not a readable safetensors file: {exc}") from exc
    if meta is None:
        raise CheckpointError(f"{path} holds no classifier metadata: it was not written by "
                              f"`ldm-smd train-classifier`")
    try:
        return json.loads(meta)
    except ValueError as exc:
        raise CheckpointError(f"{path}: its classifier metadata is not JSON ({exc})") from exc


def load_classifier(path: str | os.PathLike[str], *, data: str | os.PathLike[str] | None = None
                    ) -> tuple[DigitClassifier, dict[str, Any]]:
    """``(classifier in eval mode, metadata)`` from ``path``, loaded strictly. A missing file is
    a :class:`CheckpointError` naming the command that makes it (``data``: the folder to name)."""
    path = Path(path)
    if not path.is_file():
        folder = data if data is not None else path.parent
        raise CheckpointError(
            f"domain classifier not found: {path}; train it once with "
            f"`{TRAIN_COMMAND.format(data=folder)} --out {path}`"
        )
    meta = read_metadata(path)
    architecture = meta.get("architecture")
    if not isinstance(architecture, dict):
        raise CheckpointError(f"{path}: its metadata names no classifier architecture")
    try:
        model = DigitClassifier(**architecture)
    except (TypeError, ValueError) as exc:
        raise CheckpointError(f"{path}: bad classifier architecture {architecture}: {exc}"
                              ) from exc
    load_state_dict_strict(model, load_checkpoint(path), source=str(path))
    return model.eval(), meta


def describe(meta: dict[str, Any]) -> str:
    """One line: held-out accuracy, training time and options of a classifier's metadata."""
    options = ", ".join(f"{k}={v}" for k, v in meta.get("options", {}).items() if v is not None)
    return (f"held-out accuracy {100 * meta['heldout_accuracy']:.2f}% after "
            f"{meta['train_seconds']:.0f} s of training ({options})")
