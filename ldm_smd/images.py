"""Images in ``[-1, 1]`` to files: uint8 quantisation, grids, single PNGs (lossless, never JPEG).

Quantisation is pinned (FID depends on it): ``uint8 = round((x + 1) * 127.5)`` after clamping.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
from PIL import Image

from ldm_smd.errors import OutputError, describe_os_error
from ldm_smd.fileio import atomic_write


def to_uint8(images: torch.Tensor) -> np.ndarray:
    """``(N, C, H, W)`` in ``[-1, 1]`` -> ``(N, H, W, C)`` uint8."""
    if images.ndim != 4:
        raise ValueError(f"expected images of shape (N, C, H, W), got {tuple(images.shape)}")
    x = ((images.detach().float().clamp(-1, 1) + 1.0) * 127.5).round().to(torch.uint8)
    return x.permute(0, 2, 3, 1).cpu().numpy()


def make_grid(images: torch.Tensor, *, nrow: int, padding: int = 2) -> np.ndarray:
    """Tile ``(N, C, H, W)`` images into one uint8 ``(H', W', C)`` array, ``nrow`` per row."""
    arr = to_uint8(images)
    n, h, w, c = arr.shape
    ncol = max(1, min(nrow, n))
    nrows = (n + ncol - 1) // ncol
    grid = np.full(
        (nrows * (h + padding) + padding, ncol * (w + padding) + padding, c), 255, np.uint8
    )
    for i in range(n):
        r, col = divmod(i, ncol)
        y, x = padding + r * (h + padding), padding + col * (w + padding)
        grid[y:y + h, x:x + w] = arr[i]
    return grid


def _pil(array: np.ndarray) -> Image.Image:
    return Image.fromarray(array[..., 0] if array.shape[-1] == 1 else array)


def save_grid(images: torch.Tensor, path: str | Path, *, nrow: int = 8) -> Path:
    """Write a PNG grid of ``images`` to ``path`` (to a temporary name, then renamed)."""
    picture = _pil(make_grid(images, nrow=nrow))
    return atomic_write(path, lambda handle: picture.save(handle, format="PNG"))


def save_singles(images: torch.Tensor, folder: str | Path, *, start: int = 0) -> list[Path]:
    """Write each image as ``folder/000123.png`` numbered from ``start``.

    A failed write (disk full, ...) is an :class:`OutputError` naming the file; the images
    written before it are kept and the half-written file is removed.
    """
    folder = Path(folder)
    paths = []
    path = folder
    try:
        folder.mkdir(parents=True, exist_ok=True)
        for i, array in enumerate(to_uint8(images)):
            path = folder / f"{start + i:06d}.png"
            _pil(array).save(path, format="PNG")
            paths.append(path)
    except OSError as exc:
        if path != folder:
            path.unlink(missing_ok=True)
        raise OutputError(
            f"could not write {describe_os_error(exc, path)}; the {start + len(paths)} images "
            f"before it in {folder} are kept"
        ) from exc
    return paths
