"""The frozen first stage of stage 2: a KL autoencoder, or the identity for pixel-space DDPM.

``FirstStage.encode`` maps images in ``[-1, 1]`` to latents already multiplied by
``scale_factor``; ``decode`` inverts it. Swapping latent diffusion for pixel-space DDPM is the
one config key ``first_stage: identity``. Which scale factor is used is decided in one place,
:func:`resolve_scale_factor`.
"""

from __future__ import annotations

import math
import shlex
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
from torch import nn

from ldm_smd.config import ConfigError
from ldm_smd.rng import GeneratorLike

if TYPE_CHECKING:
    from ldm_smd.convert import RecordedScales

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


def resolve_scale_factor(
    first_stage: str, *, configured: float | None, recorded: RecordedScales | None = None
) -> tuple[float, str]:
    """The latent scale factor stage 2 uses, and where it came from. The one place that decides,
    in this order:

    0. the identity first stage (pixel space): always 1 (``configured`` is ignored);
    1. ``model.params.scale_factor`` (``configured``), when set;
    2. else the first stage's own (``recorded``, what :func:`ldm_smd.convert.load_first_stage`
       found): a diffusers folder's ``scaling_factor``; else the ``scale_factor`` a stage-2
       checkpoint used as first stage recorded; else the ``scale_factor`` of the CompVis
       ``config.yaml`` beside the checkpoint (the checkpoint's own record comes first: it is what
       its weights were trained with);
    3. else a :class:`~ldm_smd.config.ConfigError` that says to run ``ldm-smd scale-factor``.

    The value that wins must be a finite number above 0 (else a ``ConfigError`` naming where it
    came from).
    """
    if first_stage == IDENTITY:
        return 1.0, "pixel space: identity first stage"
    candidates = [(configured, "model.params.scale_factor")]
    if recorded is not None:
        candidates += [
            (recorded.diffusers, f"scaling_factor of {first_stage}/config.json"),
            (recorded.stage2, f"scale_factor recorded in the stage-2 checkpoint {first_stage}"),
            (recorded.config_yaml, f"model.params.scale_factor of the config.yaml beside "
                                   f"{first_stage}"),
        ]
    for value, source in candidates:
        if value is None:
            continue
        if isinstance(value, bool) or not isinstance(value, int | float) or not (
                math.isfinite(value) and value > 0):
            raise ConfigError(
                f"latent scale factor {value!r} ({source}): must be a finite number above 0"
            )
        return float(value), source
    raise ConfigError(
        f"model.params.scale_factor is not set and the first stage {first_stage} records none: "
        f"run `ldm-smd scale-factor --ckpt {shlex.quote(first_stage)} --config DATA.yaml --write "
        f"STAGE2.yaml` "
        f"(or put the value it prints into model.params.scale_factor)"
    )


def build_first_stage(
    source: str,
    *,
    architecture: dict[str, Any] | None,
    load_weights: bool,
) -> tuple[nn.Module | None, RecordedScales | None, dict[str, Any] | None]:
    """Resolve ``source`` into ``(autoencoder, the scale factors its files record,
    architecture)``; :func:`resolve_scale_factor` decides which scale is used.

    ``source`` is ``identity``, our stage-1 checkpoint, a CompVis ``model.ckpt`` or a diffusers
    folder. With ``load_weights=False`` (rebuilding a stage-2 checkpoint that already holds the
    first stage's weights) the architecture recorded in that checkpoint is used instead, and no
    file is read (the recorded scales are ``None``).
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
        autoencoder, recorded = convert.load_first_stage(
            source,
            ddconfig=(architecture or {}).get("ddconfig"),
            embed_dim=(architecture or {}).get("embed_dim"),
        )
        return autoencoder, recorded, convert.architecture_of(autoencoder)
    if architecture is None:
        raise ValueError(
            "cannot rebuild the first stage: the checkpoint records no first-stage architecture"
        )
    return convert.build_autoencoder(**architecture), None, architecture
