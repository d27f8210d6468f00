"""The built-in dataset: procedurally rendered coloured shapes, structured as a mixture.

Every image is one of a finite set of *prototypes* (shape x colour x position on a grid) plus
small variations (position, size, rotation and colour jitter, a plain or textured background,
pixel noise). The data distribution is therefore a mixture of tight, well separated modes: the
setting where a Gaussian denoising posterior is a poor fit and Soft Mixture Denoising can help.

Nothing is stored: item ``i`` is rendered from a counter-based hash of ``(seed, i)``, so it is the
same image in every process, worker and batch. Rendering is vectorised over a batch
(signed distance functions with a one-pixel anti-aliasing ramp); the DataLoader's batched fetch
(``__getitems__``) renders a whole batch at once.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import numpy as np
import torch
from torch.utils.data import Dataset

SHAPES = ("circle", "square", "triangle", "diamond", "ring", "cross")
COLOURS = (  # saturated, well separated RGB in [0, 1]
    (0.90, 0.15, 0.15),  # red
    (0.20, 0.80, 0.25),  # green
    (0.20, 0.40, 0.95),  # blue
    (0.95, 0.85, 0.15),  # yellow
    (0.85, 0.25, 0.80),  # magenta
    (0.15, 0.85, 0.85),  # cyan
    (0.98, 0.55, 0.10),  # orange
    (0.95, 0.95, 0.95),  # white
)
BACKGROUNDS = (  # dark, close tones: every shape colour stands out, modes stay tight
    (0.13, 0.13, 0.15),
    (0.22, 0.19, 0.17),
    (0.14, 0.17, 0.23),
    (0.21, 0.21, 0.21),
)
BACKGROUND_MODES = ("plain", "textured", "mixed")

_M64 = (1 << 64) - 1
_GOLDEN = np.uint64(0x9E3779B97F4A7C15)
_MUL1 = np.uint64(0xBF58476D1CE4E5B9)
_MUL2 = np.uint64(0x94D049BB133111EB)
_NUM_STREAMS = 20  # per-item uniform numbers (see _draw)
_NOISE_STREAM = 1 << 20  # pixel-noise streams start here


def _mix(x: np.ndarray) -> np.ndarray:
    """splitmix64 finaliser on a uint64 array (wrapping arithmetic)."""
    with np.errstate(over="ignore"):
        x = x + _GOLDEN
        x = (x ^ (x >> np.uint64(30))) * _MUL1
        x = (x ^ (x >> np.uint64(27))) * _MUL2
        return x ^ (x >> np.uint64(31))


def _to_unit(h: np.ndarray) -> np.ndarray:
    """uint64 hashes -> float64 uniforms in [0, 1)."""
    return (h >> np.uint64(11)).astype(np.float64) * (1.0 / (1 << 53))


class SyntheticShapes(Dataset):
    """Coloured shapes on plain or textured backgrounds: a mixture of prototypes, no files needed.

    Prototype ``label = (shape * num_colours + colour) * num_positions + position``. Labels are
    balanced: every consecutive block of ``num_prototypes`` indices holds each prototype once,
    in a seeded random order. Items are ``{"image": float32 (3, size, size) in [-1, 1],
    "label": int}``.

    Args:
        size: image height and width in pixels (at least 8).
        length: number of items.
        seed: seed of the whole dataset; item ``i`` depends only on ``(seed, i)``.
        num_shapes: how many of ``circle, square, triangle, diamond, ring, cross`` (1-6) are used.
        num_colours: how many of the 8 built-in shape colours are used (1-8).
        num_positions: shape centres on a ``ceil(sqrt(n))`` square grid (1 = image centre).
        shape_scale: shape radius as a fraction of half a grid cell.
        position_jitter: uniform jitter of the centre, in fractions of the image size (+-).
        scale_jitter: relative jitter of the radius (+-).
        rotation_jitter: rotation jitter in degrees (+-); circles and rings are unaffected.
        colour_jitter: per-channel jitter of the shape colour, in [0, 1] colour units (+-).
        background: ``"plain"`` (flat dark tone), ``"textured"`` (tone plus oriented stripes and
            a gradient) or ``"mixed"`` (each item plain or textured at random).
        background_jitter: per-channel jitter of the background tone (+-).
        texture_amplitude: amplitude of the stripes and of the gradient of textured backgrounds.
        noise_std: standard deviation of the uniform pixel noise, in [0, 1] colour units.
    """

    def __init__(
        self, *, size: int = 64, length: int = 10000, seed: int = 0,
        num_shapes: int = 3, num_colours: int = 4, num_positions: int = 4,
        shape_scale: float = 0.7, position_jitter: float = 0.03, scale_jitter: float = 0.1,
        rotation_jitter: float = 15.0, colour_jitter: float = 0.06, background: str = "mixed",
        background_jitter: float = 0.04, texture_amplitude: float = 0.06, noise_std: float = 0.02,
    ) -> None:
        if size < 8:
            raise ValueError(f"SyntheticShapes: size={size} is too small (need at least 8)")
        if length < 1:
            raise ValueError(f"SyntheticShapes: length={length} must be positive")
        if not 1 <= num_shapes <= len(SHAPES):
            raise ValueError(f"SyntheticShapes: num_shapes={num_shapes} not in 1..{len(SHAPES)}")
        if not 1 <= num_colours <= len(COLOURS):
            raise ValueError(
                f"SyntheticShapes: num_colours={num_colours} not in 1..{len(COLOURS)}"
            )
        if num_positions < 1:
            raise ValueError(f"SyntheticShapes: num_positions={num_positions} must be positive")
        if background not in BACKGROUND_MODES:
            raise ValueError(
                f"SyntheticShapes: background={background!r} is not one of {BACKGROUND_MODES}"
            )
        non_negative = {
            "shape_scale": shape_scale, "position_jitter": position_jitter,
            "scale_jitter": scale_jitter, "rotation_jitter": rotation_jitter,
            "colour_jitter": colour_jitter, "background_jitter": background_jitter,
            "texture_amplitude": texture_amplitude, "noise_std": noise_std,
        }
        for name, value in non_negative.items():
            if value < 0:
                raise ValueError(f"SyntheticShapes: {name}={value} must be non-negative")
            setattr(self, name, float(value))
        self.size, self.length, self.seed = int(size), int(length), int(seed)
        self.num_shapes, self.num_colours = int(num_shapes), int(num_colours)
        self.num_positions, self.background = int(num_positions), background
        self._seed_key = _mix(np.array([self.seed & _M64], dtype=np.uint64))[0]
        self._grid = math.ceil(math.sqrt(self.num_positions))
        self._noise_keys: np.ndarray | None = None  # per-pixel stream keys, built on first use

    # ------------------------------------------------------------------ structure

    @property
    def num_prototypes(self) -> int:
        """Number of mixture components: shapes x colours x positions."""
        return self.num_shapes * self.num_colours * self.num_positions

    def prototype(self, label: int) -> dict[str, object]:
        """What a label stands for: shape name, colour index and RGB, position index and centre."""
        if not 0 <= label < self.num_prototypes:
            raise IndexError(f"label {label} out of range 0..{self.num_prototypes - 1}")
        shape, rest = divmod(label, self.num_colours * self.num_positions)
        colour, position = divmod(rest, self.num_positions)
        return {
            "shape": SHAPES[shape],
            "colour": colour,
            "rgb": COLOURS[colour],
            "position": position,
            "centre": self._centre(position),
        }

    def _centre(self, position: int) -> tuple[float, float]:
        row, col = divmod(position, self._grid)
        return ((col + 0.5) / self._grid, (row + 0.5) / self._grid)

    def labels(self, indices: Sequence[int] | np.ndarray) -> np.ndarray:
        """Prototype labels of the given item indices (int64 array)."""
        idx = np.asarray(indices, dtype=np.int64)
        p = self.num_prototypes
        blocks, within = np.divmod(idx, p)
        uniq, inverse = np.unique(blocks, return_inverse=True)
        with np.errstate(over="ignore"):
            block_keys = _mix(_mix(uniq.astype(np.uint64) ^ self._seed_key) + np.uint64(1))
            slots = _mix(np.arange(p, dtype=np.uint64) + np.uint64(7919))
        perms = np.argsort(_mix(block_keys[:, None] ^ slots[None, :]), axis=1, kind="stable")
        return perms[inverse.reshape(-1), within]

    # ------------------------------------------------------------------ dataset protocol

    def __len__(self) -> int:
        return self.length

    def _check_index(self, index: int) -> int:
        index = int(index)
        if index < 0:
            index += self.length
        if not 0 <= index < self.length:
            raise IndexError(f"SyntheticShapes index {index} out of range (length {self.length})")
        return index

    def __getitem__(self, index: int) -> dict[str, torch.Tensor | int]:
        images, labels = self.render([self._check_index(index)])
        return {"image": images[0], "label": int(labels[0])}

    def __getitems__(self, indices: Sequence[int]) -> list[dict[str, torch.Tensor | int]]:
        images, labels = self.render([self._check_index(i) for i in indices])
        return [{"image": img, "label": int(lab)} for img, lab in zip(images, labels, strict=True)]

    # ------------------------------------------------------------------ rendering

    def _draw(self, idx: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """Per-item keys and uniforms of shape (N, _NUM_STREAMS)."""
        with np.errstate(over="ignore"):
            keys = _mix(_mix(idx.astype(np.uint64) + np.uint64(0x5EED)) ^ self._seed_key)
            streams = _mix(np.arange(_NUM_STREAMS, dtype=np.uint64) + np.uint64(0xA5A5))
        return keys, _to_unit(_mix(keys[:, None] ^ streams[None, :]))

    def _pixel_noise(self, keys: np.ndarray) -> torch.Tensor:
        n_pix = 3 * self.size * self.size
        if self._noise_keys is None:
            self._noise_keys = _mix(np.arange(n_pix, dtype=np.uint64) + np.uint64(_NOISE_STREAM))
        u = _to_unit(_mix(keys[:, None] ^ self._noise_keys[None, :])).astype(np.float32)
        noise = torch.from_numpy(u).view(-1, 3, self.size, self.size)
        return (noise - 0.5) * (math.sqrt(12.0) * self.noise_std)  # uniform with std noise_std

    def render(self, indices: Sequence[int]) -> tuple[torch.Tensor, torch.Tensor]:
        """Render items ``indices`` at once: images (N, 3, size, size) in [-1, 1], labels (N,)."""
        idx = np.asarray(indices, dtype=np.int64).reshape(-1)
        labels = self.labels(idx)
        keys, u = self._draw(idx)
        u_t = torch.from_numpy(u.astype(np.float32))
        n = len(idx)
        shape_i, rest = np.divmod(labels, self.num_colours * self.num_positions)
        colour_i, pos_i = np.divmod(rest, self.num_positions)

        def sym(k: int) -> torch.Tensor:  # uniform in [-1, 1) from stream k, shape (N, 1, 1)
            return (u_t[:, k] * 2.0 - 1.0).view(n, 1, 1)

        centres = torch.tensor([self._centre(int(p)) for p in pos_i], dtype=torch.float32)
        cx = centres[:, 0].view(n, 1, 1) + self.position_jitter * sym(0)
        cy = centres[:, 1].view(n, 1, 1) + self.position_jitter * sym(1)
        radius = (self.shape_scale * 0.5 / self._grid) * (1.0 + self.scale_jitter * sym(2))
        angle = math.radians(self.rotation_jitter) * sym(3)

        coords = (torch.arange(self.size, dtype=torch.float32) + 0.5) / self.size
        xs, ys = coords.view(1, 1, -1), coords.view(1, -1, 1)
        dx, dy = xs - cx, ys - cy
        cos, sin = torch.cos(angle), torch.sin(angle)
        px, py = cos * dx + sin * dy, cos * dy - sin * dx

        sdf = torch.empty(n, self.size, self.size)
        shape_t = torch.from_numpy(shape_i)
        for k in np.unique(shape_i):
            sel = (shape_t == int(k)).nonzero().view(-1)
            sdf[sel] = _sdf(SHAPES[int(k)], px[sel], py[sel], radius[sel])
        alpha = (0.5 - sdf * self.size).clamp(0.0, 1.0).unsqueeze(1)  # 1-pixel AA ramp

        palette = torch.tensor(COLOURS, dtype=torch.float32)
        jitter = torch.stack([sym(4), sym(5), sym(6)], dim=1).view(n, 3, 1, 1)
        colour = palette[torch.from_numpy(colour_i)].view(n, 3, 1, 1)
        colour = colour + self.colour_jitter * jitter

        bg_palette = torch.tensor(BACKGROUNDS, dtype=torch.float32)
        bg_i = (u_t[:, 7] * len(BACKGROUNDS)).long().clamp(max=len(BACKGROUNDS) - 1)
        bg_jitter = torch.stack([sym(8), sym(9), sym(10)], dim=1).view(n, 3, 1, 1)
        bg = bg_palette[bg_i].view(n, 3, 1, 1) + self.background_jitter * bg_jitter
        bg = bg.expand(n, 3, self.size, self.size)
        if self.background != "plain" and self.texture_amplitude > 0:
            textured = torch.ones(n) if self.background == "textured" else (u_t[:, 11] < 0.5)
            freq = (2.0 + 4.0 * u_t[:, 12]).view(n, 1, 1)  # cycles per image
            theta = (math.pi * u_t[:, 13]).view(n, 1, 1)
            phase = (2 * math.pi * u_t[:, 14]).view(n, 1, 1)
            psi = (2 * math.pi * u_t[:, 15]).view(n, 1, 1)
            stripes = torch.sin(
                2 * math.pi * freq * (torch.cos(theta) * xs + torch.sin(theta) * ys) + phase
            )
            gradient = torch.cos(psi) * (xs - 0.5) + torch.sin(psi) * (ys - 0.5)
            texture = self.texture_amplitude * (stripes + 2.0 * gradient)
            bg = bg + (textured.float().view(n, 1, 1) * texture).unsqueeze(1)

        image = bg * (1.0 - alpha) + colour * alpha
        if self.noise_std > 0:
            image = image + self._pixel_noise(keys)
        image = (image.clamp(0.0, 1.0) * 2.0 - 1.0).contiguous()
        return image, torch.from_numpy(labels)


def _box(px: torch.Tensor, py: torch.Tensor, hx: torch.Tensor, hy: torch.Tensor) -> torch.Tensor:
    """Exact signed distance to an axis-aligned box with half-sizes (hx, hy)."""
    qx, qy = px.abs() - hx, py.abs() - hy
    outside = torch.hypot(qx.clamp(min=0), qy.clamp(min=0))
    return outside + torch.maximum(qx, qy).clamp(max=0)


def _sdf(shape: str, px: torch.Tensor, py: torch.Tensor, r: torch.Tensor) -> torch.Tensor:
    """Signed distance (image units, negative inside) of a shape of radius ``r`` at the origin."""
    if shape == "circle":
        return torch.hypot(px, py) - r
    if shape == "square":
        return _box(px, py, 0.82 * r, 0.82 * r)
    if shape == "triangle":  # equilateral, pointing up (image y grows downwards)
        py = py - 0.275 * r  # centre the triangle's bounding box on the cell
        inradius = 0.55 * r
        d1 = py
        d2 = -0.5 * py - 0.8660254 * px
        d3 = -0.5 * py + 0.8660254 * px
        return torch.maximum(torch.maximum(d1, d2), d3) - inradius
    if shape == "diamond":
        return (px.abs() + py.abs()) * 0.70710678 - 0.78 * r
    if shape == "ring":
        return (torch.hypot(px, py) - 0.72 * r).abs() - 0.28 * r
    if shape == "cross":
        return torch.minimum(_box(px, py, r, 0.32 * r), _box(px, py, 0.32 * r, r))
    raise ValueError(f"unknown shape {shape!r}; known: {SHAPES}")
