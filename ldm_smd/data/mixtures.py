"""Isotropic Gaussian mixtures with known density: the data of the known-truth benchmark.

A mixture is ``sum_k w_k N(m_k, s_k^2 I)`` in ``dim`` dimensions. Means are given explicitly or
made by a generator:

- ``ring``: ``num_components`` means evenly spaced on a circle of ``radius`` (first two
  coordinates; the remaining ones, if ``dim > 2``, are zero);
- ``grid``: a ``side x side`` grid with ``spacing`` between neighbours, centred on 0 (2-D);
- ``random``: prototypes drawn from ``N(0, scale^2 I)`` with a seeded generator;
- ``images``: small pictures (``image_size`` 16 or 32, 1 or 3 channels) made of simple shapes,
  values in ``[-1, 1]``; the mixture lives in pixel space, ``dim = C * H * W``.

A config names a mixture as a target/params block: :func:`ring_mixture`, :func:`grid_mixture`,
:func:`random_mixture`, :func:`image_mixture`, or :class:`GaussianMixture` with explicit means.

Everything is float64 internally; :meth:`GaussianMixture.sample` returns float32 by default.
This module imports nothing from the networks or the diffusion process (layer contract).
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from typing import Any

import torch

from ldm_smd.errors import ConfigError
from ldm_smd.rng import GeneratorLike, randn


def non_finite(value: Any) -> bool:
    """Whether a number, a (nested) list of numbers or a tensor holds a NaN or an infinity."""
    if isinstance(value, torch.Tensor):
        return value.is_floating_point() and not bool(torch.isfinite(value).all())
    if isinstance(value, list | tuple):
        return any(non_finite(v) for v in value)
    return isinstance(value, float) and not math.isfinite(value)


def _check_finite(owner: str, **values: Any) -> None:
    for name, value in values.items():
        if non_finite(value):
            small = isinstance(value, torch.Tensor) and value.numel() <= 8
            shown = value.tolist() if small else value
            raise ValueError(f"{owner}: {name} must be finite numbers, got {shown}")


def check_finite_params(params: Mapping[str, Any], *, key: str) -> None:
    """The config loader's check of a mixture block (its ``check_config``): every number given
    is finite, so ``std: .nan`` or ``radius: .inf`` is refused when the config is loaded."""
    for name, value in params.items():
        if non_finite(value):
            raise ConfigError(f"{key}.params.{name}: {value!r} is not a finite number (a "
                              "mixture's parameters are finite)")


def _checked_when_loaded(target: Any) -> Any:
    """Give a config target the hook the loader calls, ``check_config(params, key=...)``."""
    target.check_config = check_finite_params
    return target


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
        _check_finite("GaussianMixture", means=means, stds=stds, weights=weights)
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
        self.means, self.stds, self.weights, self.image_shape = m, s, w, image_shape

    check_config = staticmethod(check_finite_params)

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
    _check_finite("ring_means", radius=radius)
    angle = 2 * math.pi * torch.arange(num_components, dtype=torch.float64) / num_components
    m = torch.zeros(num_components, dim, dtype=torch.float64)
    m[:, 0] = radius * torch.cos(angle)
    m[:, 1] = radius * torch.sin(angle)
    return m


def grid_means(side: int, *, spacing: float = 1.0, dim: int = 2) -> torch.Tensor:
    """A ``side x side`` grid centred on the origin (row-major, x fastest), first 2 coords."""
    if dim < 2:
        raise ValueError(f"grid_means: dim must be >= 2, got {dim}")
    _check_finite("grid_means", spacing=spacing)
    axis = (torch.arange(side, dtype=torch.float64) - (side - 1) / 2) * spacing
    yy, xx = torch.meshgrid(axis, axis, indexing="ij")
    m = torch.zeros(side * side, dim, dtype=torch.float64)
    m[:, 0] = xx.flatten()
    m[:, 1] = yy.flatten()
    return m


def random_means(num_components: int, *, dim: int, scale: float = 1.0, seed: int = 0):
    """Prototypes drawn from ``N(0, scale^2 I)`` with ``torch.Generator().manual_seed(seed)``."""
    _check_finite("random_means", scale=scale)
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


# --------------------------------------------------------------------------- config targets
# A config names a mixture as a target/params block, e.g.
# ``{target: ldm_smd.data.mixtures.ring_mixture, params: {num_components: 8, std: 0.1}}``;
# the loader checks its keys against these signatures. Every kind also takes ``std`` (one standard
# deviation for all components, or one each) and ``weights`` (normalised; ``None`` for equal).

Stds = float | list[float]
Weights = list[float] | None


@_checked_when_loaded
def ring_mixture(*, num_components: int = 8, radius: float = 1.0, dim: int = 2,
                 std: Stds = 1.0, weights: Weights = None) -> GaussianMixture:
    """``num_components`` Gaussians evenly spaced on a circle of ``radius`` in the first two of
    ``dim`` coordinates (:func:`ring_means`)."""
    means = ring_means(num_components, radius=radius, dim=dim)
    return GaussianMixture(means=means, stds=std, weights=weights)


@_checked_when_loaded
def grid_mixture(*, side: int = 5, spacing: float = 1.0, dim: int = 2, std: Stds = 1.0,
                 weights: Weights = None) -> GaussianMixture:
    """A ``side x side`` grid of Gaussians ``spacing`` apart, centred on the origin, in the first
    two of ``dim`` coordinates (:func:`grid_means`)."""
    return GaussianMixture(means=grid_means(side, spacing=spacing, dim=dim), stds=std,
                           weights=weights)


@_checked_when_loaded
def random_mixture(*, num_components: int = 8, dim: int, scale: float = 1.0, seed: int = 0,
                   std: Stds = 1.0, weights: Weights = None) -> GaussianMixture:
    """Gaussians around ``num_components`` prototypes drawn from ``N(0, scale^2 I_dim)`` with
    ``seed`` (the mixture's own, fixed; not a run's seed; :func:`random_means`)."""
    prototypes = random_means(num_components, dim=dim, scale=scale, seed=seed)
    return GaussianMixture(means=prototypes, stds=std, weights=weights)


@_checked_when_loaded
def image_mixture(*, num_components: int = 8, image_size: int = 16, channels: int = 1,
                  std: Stds = 1.0, weights: Weights = None) -> GaussianMixture:
    """Gaussians in pixel space around prototype pictures of ``image_size`` (16 or 32) pixels
    and 1 or 3 ``channels`` (:func:`image_prototypes`); samples are ``(C, H, W)`` images and
    ``std`` is per pixel."""
    shape = (channels, image_size, image_size)
    pictures = image_prototypes(num_components, image_size=image_size, channels=channels)
    return GaussianMixture(means=pictures, stds=std, weights=weights, image_shape=shape)

