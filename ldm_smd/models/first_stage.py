"""The frozen first stage of stage 2: a KL autoencoder, or the identity for pixel-space DDPM.

``FirstStage.encode`` maps images in ``[-1, 1]`` to latents already multiplied by
``scale_factor``; ``decode`` inverts it. Swapping latent diffusion for pixel-space DDPM is the
one config key ``first_stage: identity``.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
from torch import nn

from ldm_smd.rng import GeneratorLike

IDENTITY = "identity"


class FirstStage(nn.Module):
    """A frozen autoencoder (or none) with its latent scale factor.

    Args:
        autoencoder: the KL autoencoder module (``encode(x) -> posterior``, ``decode(z)``), or
            ``None`` for the identity (pixel space).
        scale_factor: latents are ``scale_factor * E(x)``; 1.0 for the identity.
        sample_posterior: encode with a posterior sample (as CompVis trains) instead of its mode.
    """

    def __init__(
        self,
        *,
        autoencoder: nn.Module | None,
        scale_factor: float = 1.0,
        sample_posterior: bool = True,
    ) -> None:
        super().__init__()
        self.autoencoder = autoencoder
        self.scale_factor = float(scale_factor)
        self.sample_posterior = sample_posterior
        if autoencoder is not None:
            autoencoder.eval()
            autoencoder.requires_grad_(False)

    @property
    def is_identity(self) -> bool:
        return self.autoencoder is None

    def train(self, mode: bool = True) -> FirstStage:
        # the first stage is frozen: it stays in eval mode whatever the parent does
        super().train(False)
        return self

    @torch.no_grad()
    def encode(self, images: torch.Tensor, *, generator: GeneratorLike = None) -> torch.Tensor:
        if self.autoencoder is None:
            return images
        posterior = self.autoencoder.encode(images)
        z = posterior.sample(generator) if self.sample_posterior else posterior.mode()
        return self.scale_factor * z

    @torch.no_grad()
    def decode(self, latents: torch.Tensor) -> torch.Tensor:
        if self.autoencoder is None:
            return latents
        return self.autoencoder.decode(latents / self.scale_factor)


def build_first_stage(
    source: str,
    *,
    architecture: dict[str, Any] | None,
    load_weights: bool,
) -> tuple[nn.Module | None, float | None, dict[str, Any] | None]:
    """Resolve ``source`` into ``(autoencoder, its own scale factor, architecture)``.

    ``source`` is ``identity``, our stage-1 checkpoint, a CompVis ``model.ckpt`` or a diffusers
    folder. With ``load_weights=False`` (rebuilding a stage-2 checkpoint that already holds the
    first stage's weights) the architecture recorded in that checkpoint is used instead.
    """
    if source == IDENTITY:
        return None, None, None
    from ldm_smd import convert

    if load_weights:
        if not Path(source).exists():
            raise FileNotFoundError(
                f"first stage {source!r} not found: give the path of a stage-1 checkpoint, a "
                f"CompVis model.ckpt or a diffusers AutoencoderKL folder, or 'identity' for "
                f"pixel space (model.params.first_stage)"
            )
        autoencoder, scale = convert.load_first_stage(
            source,
            ddconfig=(architecture or {}).get("ddconfig"),
            embed_dim=(architecture or {}).get("embed_dim"),
        )
        return autoencoder, scale, convert.architecture_of(autoencoder)
    if architecture is None:
        raise ValueError(
            "cannot rebuild the first stage: the checkpoint records no first-stage architecture"
        )
    return convert.build_autoencoder(**architecture), None, architecture
