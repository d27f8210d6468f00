"""Batch-level augmentation and resizing on image tensors, on whatever device the batch is on.

Per-item transforms (decode, crop, resize) run in DataLoader workers; what is cheap on a whole
batch runs here, after the batch reached the accelerator (the DataModule calls
:class:`BatchAugment` from ``on_after_batch_transfer``). Resizing uses kornia (antialiased);
random decisions are drawn on a CPU ``torch.Generator`` owned by the transform and then moved to
the batch's device, so a seed gives the same augmentation on CPU and GPU, and the generator's
state can be saved and restored with the training state.
"""

from __future__ import annotations

from typing import Any

import kornia.geometry.transform as KT
import torch

CROP_MODES = ("none", "center", "random")
INTERPOLATIONS = ("bilinear", "bicubic", "nearest", "area")


class BatchAugment(torch.nn.Module):
    """Random horizontal flip, then optional resize and square crop, of an NCHW image batch.

    Order: flip (each row with probability ``flip_p``), resize (the short side to ``resize``,
    keeping the aspect ratio), crop (``crop_size`` square, centred or at a random offset per
    row). Values stay in the input's range (antialiased bilinear/bicubic resizing may overshoot
    slightly; the result is clamped to [-1, 1] when ``clamp`` is set).

    Args:
        flip_p: probability of flipping each image left-right (0 disables).
        resize: short side after resizing, in pixels; ``None`` keeps the size.
        crop: ``"none"``, ``"center"`` or ``"random"`` square crop of ``crop_size``.
        crop_size: side of the square crop; required unless ``crop`` is ``"none"``.
        interpolation: kornia interpolation for resizing: bilinear, bicubic, nearest or area.
        clamp: clamp the result to [-1, 1].
        seed: seed of the transform's own CPU generator.
    """

    def __init__(
        self,
        *,
        flip_p: float = 0.5,
        resize: int | None = None,
        crop: str = "none",
        crop_size: int | None = None,
        interpolation: str = "bicubic",
        clamp: bool = True,
        seed: int = 0,
    ) -> None:
        super().__init__()
        if not 0.0 <= flip_p <= 1.0:
            raise ValueError(f"BatchAugment: flip_p={flip_p} is not a probability in [0, 1]")
        if crop not in CROP_MODES:
            raise ValueError(f"BatchAugment: crop={crop!r} is not one of {CROP_MODES}")
        if crop != "none" and (crop_size is None or crop_size < 1):
            raise ValueError(f"BatchAugment: crop={crop!r} needs a positive crop_size")
        if resize is not None and resize < 1:
            raise ValueError(f"BatchAugment: resize={resize} must be positive")
        if interpolation not in INTERPOLATIONS:
            raise ValueError(
                f"BatchAugment: interpolation={interpolation!r} is not one of {INTERPOLATIONS}"
            )
        self.flip_p = float(flip_p)
        self.resize = resize
        self.crop = crop
        self.crop_size = crop_size
        self.interpolation = interpolation
        self.clamp = clamp
        self.seed = int(seed)
        self.generator = torch.Generator().manual_seed(self.seed)

    # the generator is training state: checkpoint it so a resumed run continues the stream
    def rng_state(self) -> torch.Tensor:
        """The CPU generator's state (save it with the training state)."""
        return self.generator.get_state()

    def set_rng_state(self, state: torch.Tensor) -> None:
        """Restore a state returned by :meth:`rng_state`."""
        self.generator.set_state(state)

    def flip_mask(self, batch_size: int) -> torch.Tensor:
        """Rows the next call flips: a (B,) bool CPU tensor (draws from the generator)."""
        return torch.rand(batch_size, generator=self.generator) < self.flip_p

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        if images.ndim != 4:
            raise ValueError(f"BatchAugment expects an NCHW batch, got shape {tuple(images.shape)}")
        b = images.shape[0]
        if self.flip_p > 0:
            mask = self.flip_mask(b).to(images.device).view(b, 1, 1, 1)
            images = torch.where(mask, images.flip(-1), images)
        if self.resize is not None:
            h, w = images.shape[-2:]
            scale = self.resize / min(h, w)
            size = (max(1, round(h * scale)), max(1, round(w * scale)))
            if size != (h, w):
                images = KT.resize(
                    images, size, interpolation=self.interpolation, antialias=True
                )
        if self.crop != "none":
            images = self._crop(images)
        if self.clamp:
            images = images.clamp(-1.0, 1.0)
        return images

    def _crop(self, images: torch.Tensor) -> torch.Tensor:
        assert self.crop_size is not None
        h, w = images.shape[-2:]
        s = self.crop_size
        if s > h or s > w:
            raise ValueError(f"BatchAugment: crop_size={s} is larger than the batch's {h}x{w}")
        if self.crop == "center":
            top, left = (h - s) // 2, (w - s) // 2
            return images[..., top : top + s, left : left + s]
        b = images.shape[0]
        tops = torch.randint(0, h - s + 1, (b,), generator=self.generator).tolist()
        lefts = torch.randint(0, w - s + 1, (b,), generator=self.generator).tolist()
        windows = enumerate(zip(tops, lefts, strict=True))
        return torch.stack([images[i, :, t : t + s, lf : lf + s] for i, (t, lf) in windows])

    def extra_repr(self) -> str:
        parts: dict[str, Any] = {
            "flip_p": self.flip_p,
            "resize": self.resize,
            "crop": self.crop,
            "crop_size": self.crop_size,
            "seed": self.seed,
        }
        return ", ".join(f"{k}={v}" for k, v in parts.items())
