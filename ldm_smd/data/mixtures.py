"""Isotropic Gaussian mixtures with known density: the data of the known-truth benchmark.

A mixture is ``sum_k w_k N(m_k, s_k^2 I)`` in ``dim`` dimensions. Means are given explicitly or
made by a generator:

- ``ring``: ``num_components`` means evenly spaced on a circle of ``radius`` (first two
  coordinates; the remaining ones, if ``dim > 2``, are zero);
- ``grid``: a ``side x side`` grid with ``spacing`` between neighbours, centred on 0 (2-D);
- ``random``: prototypes drawn from ``N(0, scale^2 I)`` with a seeded generator;
- ``images``: small pictures (``image_size`` 16 or 32, 1 or 3 channels) made of simple shapes,
  values in ``[-1, 1]``; the mixture lives in pixel space, ``dim = C * H * W``.

Everything is float64 internally; :meth:`GaussianMixture.sample` returns float32 by default.
This module imports nothing from the networks or the diffusion process (layer contract).
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from typing import Any

import torch

from ldm_smd.rng import GeneratorLike, randn

MIXTURE_KINDS = ("explicit", "ring", "grid", "random", "images")


class GaussianMixture:
    """A mixture of isotropic Gaussians ``sum_k w_k N(means[k], stds[k]^2 I)``.

    Args:
        means: ``(K, D)`` component means.
        stds: per-component standard deviations, ``(K,)``, or one number for all.
        weights: mixture weights ``(K,)`` (normalised here); ``None`` means equal weights.
        image_shape: ``(C, H, W)`` when the mixture lives in pixel space (``D == C * H * W``);
            ``None`` for plain vectors.
    """

    def __init__(
        self,
        *,
        means: Sequence[Sequence[float]] | torch.Tensor,
        stds: float | Sequence[float] | torch.Tensor = 1.0,
        weights: Sequence[float] | torch.Tensor | None = None,
        image_shape: Sequence[int] | None = None,
    ) -> None:
        m = torch.as_tensor(means, dtype=torch.float64)
        if m.ndim != 2 or m.shape[0] < 1:
            raise ValueError(f"GaussianMixture: means must be (K, D), got shape {tuple(m.shape)}")
        k, d = m.shape
        s = torch.as_tensor(stds, dtype=torch.float64)
        s = s.expand(k).clone() if s.ndim == 0 else s.flatten()
        if s.shape[0] != k or bool((s <= 0).any()):
            raise ValueError(
                f"GaussianMixture: stds must be {k} positive numbers, got {s.tolist()}"
            )
        if weights is None:
            w = torch.full((k,), 1.0 / k, dtype=torch.float64)
        else:
            w = torch.as_tensor(weights, dtype=torch.float64).flatten()
            if w.shape[0] != k or bool((w < 0).any()) or float(w.sum()) <= 0:
                raise ValueError(
                    f"GaussianMixture: weights must be {k} non-negative numbers with a positive "
                    f"sum, got {w.tolist()}"
                )
            w = w / w.sum()
        if image_shape is not None:
            image_shape = tuple(int(v) for v in image_shape)
            if math.prod(image_shape) != d:
                raise ValueError(
                    f"GaussianMixture: image_shape {image_shape} has {math.prod(image_shape)} "
                    f"values but the means have dimension {d}"
                )
        self.means = m
        self.stds = s
        self.weights = w
        self.image_shape = image_shape

    @property
    def num_components(self) -> int:
        return int(self.means.shape[0])

    @property
    def dim(self) -> int:
        return int(self.means.shape[1])

    def sample(
        self, n: int, *, generator: GeneratorLike, dtype: torch.dtype = torch.float32
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Draw ``n`` samples: returns ``(x (n, D), component labels (n,))``.

        ``generator`` is a single ``torch.Generator`` (or ``None``); labels and noise both come
        from it, so the same seed gives the same samples.
        """
        if generator is not None and not isinstance(generator, torch.Generator):
            raise TypeError("GaussianMixture.sample takes one torch.Generator (or None)")
        labels = torch.multinomial(self.weights, int(n), replacement=True, generator=generator)
        noise = randn((int(n), self.dim), generator=generator, dtype=torch.float64)
        x = self.means[labels] + self.stds[labels, None] * noise
        return x.to(dtype), labels

    def component_log_prob(self, x: torch.Tensor, *, chunk: int = 4096) -> torch.Tensor:
        """``log w_k + log N(x; m_k, s_k^2 I)`` for every row and component: ``(N, K)`` float64."""
        x = x.reshape(x.shape[0], -1).to(torch.float64)
        if x.shape[1] != self.dim:
            raise ValueError(f"log_prob: samples have dimension {x.shape[1]}, mixture {self.dim}")
        var = self.stds**2
        const = torch.log(self.weights) - 0.5 * self.dim * torch.log(2 * math.pi * var)
        out = []
        for start in range(0, x.shape[0], chunk):
            xb = x[start : start + chunk]
            sq = ((xb[:, None, :] - self.means[None]) ** 2).sum(-1)
            out.append(const[None] - 0.5 * sq / var[None])
        if not out:
            return torch.empty(0, self.num_components, dtype=torch.float64)
        return torch.cat(out)

    def log_prob(self, x: torch.Tensor) -> torch.Tensor:
        """Exact log-density of each row of ``x`` (any shape ``(N, ...)`` with ``D`` values)."""
        return torch.logsumexp(self.component_log_prob(x), dim=1)

    def to_images(self, x: torch.Tensor) -> torch.Tensor:
        """Reshape flat samples ``(N, D)`` to ``(N, C, H, W)`` for an image mixture."""
        if self.image_shape is None:
            raise ValueError("to_images: this mixture has no image_shape")
        return x.reshape(x.shape[0], *self.image_shape)

    def describe(self) -> dict[str, Any]:
        return {
            "num_components": self.num_components,
            "dim": self.dim,
            "stds": self.stds.tolist(),
            "weights": self.weights.tolist(),
            "image_shape": list(self.image_shape) if self.image_shape else None,
        }


# --------------------------------------------------------------------------- mean generators


def ring_means(num_components: int, *, radius: float = 1.0, dim: int = 2) -> torch.Tensor:
    """``num_components`` points evenly spaced on a circle (angle 0 first) in the first 2 coords."""
    if dim < 2:
        raise ValueError(f"ring_means: dim must be >= 2, got {dim}")
    angle = 2 * math.pi * torch.arange(num_components, dtype=torch.float64) / num_components
    m = torch.zeros(num_components, dim, dtype=torch.float64)
    m[:, 0] = radius * torch.cos(angle)
    m[:, 1] = radius * torch.sin(angle)
    return m


def grid_means(side: int, *, spacing: float = 1.0, dim: int = 2) -> torch.Tensor:
    """A ``side x side`` grid centred on the origin (row-major, x fastest), first 2 coords."""
    if dim < 2:
        raise ValueError(f"grid_means: dim must be >= 2, got {dim}")
    axis = (torch.arange(side, dtype=torch.float64) - (side - 1) / 2) * spacing
    yy, xx = torch.meshgrid(axis, axis, indexing="ij")
    m = torch.zeros(side * side, dim, dtype=torch.float64)
    m[:, 0] = xx.flatten()
    m[:, 1] = yy.flatten()
    return m


def random_means(num_components: int, *, dim: int, scale: float = 1.0, seed: int = 0):
    """Prototypes drawn from ``N(0, scale^2 I)`` with ``torch.Generator().manual_seed(seed)``."""
    g = torch.Generator().manual_seed(int(seed))
    return scale * torch.randn(num_components, dim, generator=g, dtype=torch.float64)


def _shape_masks(size: int) -> list[torch.Tensor]:
    """Simple binary pictures on a ``size x size`` canvas (1 = foreground)."""
    c = (size - 1) / 2
    yy, xx = torch.meshgrid(
        torch.arange(size, dtype=torch.float64), torch.arange(size, dtype=torch.float64),
        indexing="ij",
    )
    r = torch.sqrt((yy - c) ** 2 + (xx - c) ** 2)
    q = size / 4
    masks = [
        r <= 1.5 * q,  # disc
        ((yy - c).abs() <= q) & ((xx - c).abs() <= q),  # square
        (yy - c).abs() <= q / 2,  # horizontal bar
        (xx - c).abs() <= q / 2,  # vertical bar
        ((yy - c).abs() <= q / 2) | ((xx - c).abs() <= q / 2),  # cross
        (yy - xx).abs() <= q / 2,  # diagonal
        (r <= 1.7 * q) & (r >= 1.0 * q),  # ring
        ((yy // max(1, size // 4)) + (xx // max(1, size // 4))) % 2 == 0,  # checkerboard
        (yy >= c - q) & ((xx - c).abs() <= (yy - (c - q)) / 2),  # triangle
        xx < c,  # left half
    ]
    return [mk.to(torch.float64) for mk in masks]


_PALETTE = [(1.0, -1.0, -1.0), (-1.0, 1.0, -1.0), (-1.0, -1.0, 1.0), (1.0, 1.0, -1.0)]


def image_prototypes(num_components: int, *, image_size: int = 16, channels: int = 1):
    """``(K, C*H*W)`` prototype pictures in ``[-1, 1]``: shapes on a dark background.

    Component ``k`` uses shape ``k % 10``; beyond 10 components the picture is recoloured (RGB) or
    shifted by a few pixels (grayscale), so every prototype is distinct.
    """
    if image_size not in (16, 32) or channels not in (1, 3):
        raise ValueError(
            f"image_prototypes: image_size must be 16 or 32 and channels 1 or 3, got "
            f"{image_size}, {channels}"
        )
    masks = _shape_masks(image_size)
    out = []
    for k in range(num_components):
        mask = masks[k % len(masks)]
        variant = k // len(masks)
        if channels == 1:
            mask = torch.roll(mask, shifts=(2 * variant, 3 * variant), dims=(0, 1))
            img = (2 * mask - 1)[None]
        else:
            color = torch.tensor(_PALETTE[variant % len(_PALETTE)], dtype=torch.float64)
            img = torch.where(mask[None] > 0, color[:, None, None], torch.full_like(mask, -1.0))
        out.append(img.flatten())
    return torch.stack(out)


def build_mixture(spec: Mapping[str, Any]) -> GaussianMixture:
    """Build a mixture from a config mapping (the ``mixture:`` block of a benchmark YAML).

    Keys: ``kind`` (one of ``explicit``, ``ring``, ``grid``, ``random``, ``images``), ``dim``,
    ``std`` (number or list), ``weights`` (list or null), and per kind: ``means`` (explicit);
    ``num_components``, ``radius`` (ring); ``side``, ``spacing`` (grid); ``num_components``,
    ``scale``, ``seed`` (random); ``num_components``, ``image_size``, ``channels`` (images).
    """
    spec = dict(spec)
    kind = spec.pop("kind", "explicit")
    allowed = {
        "explicit": {"means", "dim"},
        "ring": {"num_components", "radius", "dim"},
        "grid": {"side", "spacing", "dim"},
        "random": {"num_components", "dim", "scale", "seed"},
        "images": {"num_components", "image_size", "channels"},
    }
    if kind not in allowed:
        raise ValueError(f"mixture kind {kind!r} unknown; choose one of {list(allowed)}")
    std = spec.pop("std", 1.0)
    weights = spec.pop("weights", None)
    unknown = set(spec) - allowed[kind]
    if unknown:
        raise ValueError(
            f"mixture kind {kind!r}: unknown keys {sorted(unknown)}; valid: "
            f"{sorted(allowed[kind] | {'kind', 'std', 'weights'})}"
        )
    image_shape = None
    if kind == "explicit":
        if "means" not in spec:
            raise ValueError("mixture kind 'explicit' needs 'means'")
        means = torch.as_tensor(spec["means"], dtype=torch.float64)
        if "dim" in spec and means.ndim == 2 and means.shape[1] != int(spec["dim"]):
            raise ValueError(f"mixture: dim {spec['dim']} but means have {means.shape[1]} columns")
    elif kind == "ring":
        means = ring_means(
            int(spec.get("num_components", 8)), radius=float(spec.get("radius", 1.0)),
            dim=int(spec.get("dim", 2)),
        )
    elif kind == "grid":
        means = grid_means(
            int(spec.get("side", 5)), spacing=float(spec.get("spacing", 1.0)),
            dim=int(spec.get("dim", 2)),
        )
    elif kind == "random":
        if "dim" not in spec:
            raise ValueError("mixture kind 'random' needs 'dim'")
        means = random_means(
            int(spec.get("num_components", 8)), dim=int(spec["dim"]),
            scale=float(spec.get("scale", 1.0)), seed=int(spec.get("seed", 0)),
        )
    else:
        size, ch = int(spec.get("image_size", 16)), int(spec.get("channels", 1))
        means = image_prototypes(int(spec.get("num_components", 8)), image_size=size, channels=ch)
        image_shape = (ch, size, size)
    return GaussianMixture(means=means, stds=std, weights=weights, image_shape=image_shape)
