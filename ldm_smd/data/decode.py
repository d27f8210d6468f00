"""Decoding image files with PIL and turning them into square ``[-1, 1]`` tensors.

Conversions to 8-bit RGB (every dataset of the package goes through :func:`to_rgb`):

- grayscale (``1``, ``L``) -> RGB by repeating the channel;
- 16-bit and 32-bit integer grayscale (``I;16*``, ``I``) -> 8 bits by ``round(v * 255 / 65535)``
  (a 16-bit range is assumed; ``I`` images whose values all fit in 0..255 are kept as they are);
  32-bit float (``F``) is read as [0, 1] when its maximum is at most 1, else as [0, 255];
- palette (``P``) -> RGB through the palette; a palette with a transparent entry goes through RGBA;
- alpha (``RGBA``, ``LA``, ``PA``) -> RGB by ``alpha``: ``"white"`` composites the image over a
  white background (what a viewer shows), ``"black"`` over black, ``"drop"`` discards the
  alpha channel and keeps the colour values stored under transparent pixels;
- CMYK, YCbCr, LAB, HSV -> RGB with PIL's conversion.

With ``channels=1`` (:func:`decode_image`) the RGB image then becomes 8-bit grayscale with PIL's
``convert("L")`` (ITU-R 601-2 luma, ``L = (19595 R + 38470 G + 7471 B + 32768) >> 16``), which
gives a grayscale file back its own values exactly.

EXIF orientation tags are not applied (as in CompVis' loaders; LSUN and CelebA-HQ carry none).
A file that PIL cannot identify or fully decode (including a truncated file, unless the process
set ``PIL.ImageFile.LOAD_TRUNCATED_IMAGES``) raises :class:`CorruptImageError` naming the file.
Geometry: :func:`crop_square` cuts the largest square (centred, or at a random offset), then
:func:`resize_square` resizes it with PIL (``bicubic`` by default, as CompVis' LSUN loader).
"""

from __future__ import annotations

import io
import os
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from ldm_smd.errors import DataError

IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg", ".webp", ".bmp", ".tif", ".tiff")
ALPHA_MODES = ("white", "black", "drop")
CROP_MODES = ("center", "random")
CHANNELS = (1, 3)
INTERPOLATIONS = {
    "nearest": Image.Resampling.NEAREST,
    "bilinear": Image.Resampling.BILINEAR,
    "bicubic": Image.Resampling.BICUBIC,
    "lanczos": Image.Resampling.LANCZOS,
    "box": Image.Resampling.BOX,
}
_DECODE_ERRORS = (OSError, SyntaxError, ValueError, EOFError, Image.DecompressionBombError)


class CorruptImageError(DataError):
    """An image file (or LMDB value) that PIL cannot decode; the message names it."""


def check_choice(owner: str, name: str, value: str, choices: tuple[str, ...] | dict) -> None:
    """Raise a ValueError naming ``owner.name`` when ``value`` is not one of ``choices``."""
    if value not in choices:
        raise ValueError(f"{owner}: {name}={value!r} is not one of {', '.join(choices)}")


def decode_image(source: str | os.PathLike[str] | bytes, *, name: str | None = None,
                 alpha: str = "white", channels: int = 3) -> Image.Image:
    """Decode a file path or encoded bytes to an 8-bit RGB PIL image, or an 8-bit grayscale
    one with ``channels=1`` (conversions above)."""
    if channels not in CHANNELS:
        raise ValueError(f"decode_image: channels={channels} is not 1 or 3")
    label = name if name is not None else str(source) if not isinstance(source, bytes) else "bytes"
    if not isinstance(source, bytes) and not Path(source).is_file():
        raise FileNotFoundError(f"image file not found: {label}")
    try:
        stream = io.BytesIO(source) if isinstance(source, bytes) else source
        with Image.open(stream) as img:
            img.load()
            rgb = to_rgb(img, alpha=alpha)
            return rgb.convert("L") if channels == 1 else rgb
    except _DECODE_ERRORS as exc:
        raise CorruptImageError(f"cannot decode image {label}: {exc}") from exc


def _gray_to_uint8(img: Image.Image) -> np.ndarray:
    arr = np.asarray(img)
    if img.mode == "F":
        arr = arr.astype(np.float64)
        scale = 255.0 if np.nanmax(arr, initial=0.0) <= 1.0 else 1.0
        return np.clip(np.nan_to_num(arr) * scale, 0, 255).round().astype(np.uint8)
    arr = arr.astype(np.int64)
    if img.mode.startswith("I;16") or arr.max(initial=0) > 255:
        arr = (arr * 255 + 32767) // 65535
    return np.clip(arr, 0, 255).astype(np.uint8)


def to_rgb(img: Image.Image, *, alpha: str = "white") -> Image.Image:
    """Convert any PIL mode to 8-bit RGB (see the module docstring for each conversion)."""
    check_choice("to_rgb", "alpha", alpha, ALPHA_MODES)
    mode = img.mode
    if mode == "RGB":
        return img
    if mode.startswith("I") or mode == "F":
        return Image.fromarray(_gray_to_uint8(img), mode="L").convert("RGB")
    if mode == "P":
        img = img.convert("RGBA") if "transparency" in img.info else img.convert("RGB")
        mode = img.mode
    if mode in ("LA", "La", "PA", "RGBa", "RGBA"):
        rgba = img.convert("RGBA")
        if alpha == "drop":
            return rgba.convert("RGB")
        fill = (255, 255, 255, 255) if alpha == "white" else (0, 0, 0, 255)
        background = Image.new("RGBA", rgba.size, fill)
        return Image.alpha_composite(background, rgba).convert("RGB")
    return img.convert("RGB")


def crop_square(img: Image.Image, *, mode: str = "center",
                generator: torch.Generator | None = None) -> Image.Image:
    """The largest square of ``img``: centred (CompVis: offset ``(long - short) // 2``) or random.

    A random offset is drawn with ``torch.randint`` from ``generator`` (torch's global generator
    when ``None``, which DataLoader workers seed per worker).
    """
    w, h = img.size
    s = min(w, h)
    if w == h:
        return img
    if mode == "center":
        left, top = (w - s) // 2, (h - s) // 2
    else:
        left = int(torch.randint(0, w - s + 1, (), generator=generator))
        top = int(torch.randint(0, h - s + 1, (), generator=generator))
    return img.crop((left, top, left + s, top + s))


def resize_square(img: Image.Image, size: int | None, *, interpolation: str = "bicubic"
                  ) -> Image.Image:
    """Resize a square image to ``size`` x ``size`` (unchanged when ``size`` is None or equal)."""
    if size is None or img.size == (size, size):
        return img
    return img.resize((size, size), resample=INTERPOLATIONS[interpolation])


def to_tensor(img: Image.Image) -> torch.Tensor:
    """8-bit RGB (or grayscale ``L``) PIL image -> float32 (3, H, W) (or (1, H, W)) tensor in
    [-1, 1] (``v / 127.5 - 1``)."""
    arr = np.asarray(img, dtype=np.uint8)
    if arr.ndim == 2:
        arr = arr[:, :, None]
    if arr.ndim != 3 or arr.shape[2] not in CHANNELS:
        raise ValueError(f"to_tensor expects an RGB or grayscale image, got an array of shape "
                         f"{arr.shape}")
    return torch.from_numpy(arr.copy()).permute(2, 0, 1).float().div_(127.5).sub_(1.0)
