"""Images in ``[-1, 1]`` to files: uint8 quantisation, grids, single PNGs (lossless, never JPEG).

Quantisation is pinned (FID depends on it): ``uint8 = round((x + 1) * 127.5)`` after clamping.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
from PIL import Image

from ldm_smd.checkpoints import atomic_write
from ldm_smd.errors import OutputError, describe_os_error


def to_uint8(images: torch.Tensor) -> np.ndarray:
    """``(N, C, H, W)`` in ``[-1, 1]`` -> ``(N, H, W, C)`` uint8."""
    if images.ndim != 4:
        raise ValueError(f"expected images of shape (N, C, H, W), got {tuple(images.shape)}")
    x = ((images.detach().float().clamp(-1, 1) + 1.0) * 127.5).round().to(torch.uint8)
    return x.permute(0, 2, 3, 1).cpu().numpy()


#: grids (sample grids, reconstructions) show each tile at least this many pixels wide
READABLE_TILE = 96


def readable_scale(height: int, width: int, *, min_tile: int = READABLE_TILE) -> int:
    """The whole factor that makes a ``height x width`` tile at least ``min_tile`` pixels on its
    longer side (1 for tiles that already are)."""
    return max(1, -(-min_tile // max(1, height, width)))


def make_grid(images: torch.Tensor, *, nrow: int, padding: int = 2, scale: int = 1) -> np.ndarray:
    """Tile ``(N, C, H, W)`` images into one uint8 ``(H', W', C)`` array, ``nrow`` per row, each
    tile enlarged ``scale`` times (every pixel a ``scale x scale`` block, nothing blended)."""
    arr = to_uint8(images)
    if scale > 1:
        arr = arr.repeat(scale, axis=1).repeat(scale, axis=2)
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


def save_grid(images: torch.Tensor, path: str | Path, *, nrow: int = 8,
              min_tile: int = READABLE_TILE) -> Path:
    """Write a PNG grid of ``images`` to ``path`` (to a temporary name, then renamed), small
    images enlarged to tiles of at least ``min_tile`` pixels (:func:`readable_scale`)."""
    scale = readable_scale(*images.shape[-2:], min_tile=min_tile)
    picture = _pil(make_grid(images, nrow=nrow, scale=scale))
    return atomic_write(path, lambda handle: picture.save(handle, format="PNG"))


def save_singles(images: torch.Tensor, folder: str | Path, *, start: int = 0) -> list[Path]:
    """Write each image as ``folder/000123.png`` numbered from ``start``.

    A failed write (disk full, ...) is an :class:`OutputError` naming the file; the images
    written before it are kept and the half-written file is removed (also on Ctrl-C).
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
    except BaseException as exc:  # a failed write, or Ctrl-C: no half-written file stays
        if path != folder and path not in paths:
            path.unlink(missing_ok=True)
        if not isinstance(exc, OSError):
            raise
        raise OutputError(
            f"could not write {describe_os_error(exc, path)}; the {start + len(paths)} images "
            f"before it in {folder} are kept"
        ) from exc
    return paths
