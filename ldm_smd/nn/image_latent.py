"""SMD's image-level latent: one mixture choice per picture.

The authors' latent ``z`` is one vector per position, drawn from an ``eta`` with the image's
shape; nothing then makes the positions of one picture agree on a mixture component, so
neighbouring pixels can pick different ones (measured: samples that mix parts of two prototype
pictures, speckled digits). Here a part of ``eta`` is drawn once per picture, a vector
``eta_image`` of ``image_latent_dim`` values, and :class:`ImageLatentGenerator` turns it into one
code per picture, ``c = g(eta_image, x_t, t)``. The code reaches every resolution of the decoder:
the UNet adds it to the time embedding of its middle block and of each decoder block
(:class:`~ldm_smd.nn.unet.UNetModel`, ``context``), so every residual block of the decoder is
shifted by it, as a latent fed to every block's normalisation is in few-step GAN-like diffusion
models. The encoder does not see it, so the ``M`` draws of a multi-eta objective share one
encoder pass.

``g`` has a global receptive field: ``x_t`` is summarised by two strided convolutions and a mean
over all positions (computed once per ``x_t``, shared by its draws); the summary, ``eta_image``
and a sinusoidal embedding of ``t`` go through an MLP to the code.
"""

from __future__ import annotations

import torch
from torch import nn

from ldm_smd.nn.layers import timestep_embedding
from ldm_smd.rng import repeat_rows


class ImageLatentGenerator(nn.Module):
    """``c = g(eta_image, x_t, t)``: one code per picture, (R B, code_channels).

    ``forward(eta_image, x_t, t)`` takes ``eta_image`` of shape (R B, latent_dim) for ``x_t``
    (B, C, H, W) and ``t`` (B,): row ``i + r B`` of the code is example ``i`` under its ``r``-th
    draw (the layout of :func:`ldm_smd.rng.repeat_rows`). The summary of ``x_t`` and the time
    embedding are computed once per example. The last layer keeps PyTorch's default
    initialisation, so the code depends on ``eta_image`` from the first step (a zero start would
    leave the draws of the energy score identical and their gradient zero).

    Args:
        in_channels: channels of ``x_t``.
        latent_dim: size of ``eta_image``, the per-picture part of the noise.
        code_channels: width of the code (the backbone's ``context_channels``).
        width: width of the summary convolutions (``width`` then ``2 width`` channels) and of the
            time embedding; the MLP's hidden layers have ``4 width`` units.
    """

    def __init__(self, *, in_channels: int, latent_dim: int, code_channels: int,
                 width: int = 16):
        super().__init__()
        if min(in_channels, latent_dim, code_channels, width) < 1:
            raise ValueError(
                f"ImageLatentGenerator: in_channels, latent_dim, code_channels and width must be "
                f">= 1, got {in_channels=}, {latent_dim=}, {code_channels=}, {width=}"
            )
        self.latent_dim, self.width = latent_dim, width
        self.summary = nn.Sequential(
            nn.Conv2d(in_channels, width, 3, stride=2, padding=1), nn.SiLU(),
            nn.Conv2d(width, 2 * width, 3, stride=2, padding=1), nn.SiLU(),
        )
        hidden = 4 * width
        self.mlp = nn.Sequential(
            nn.Linear(latent_dim + 3 * width, hidden), nn.SiLU(),
            nn.Linear(hidden, hidden), nn.SiLU(),
            nn.Linear(hidden, code_channels),
        )

    def forward(self, eta_image: torch.Tensor, x_t: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        draws = eta_image.shape[0] // x_t.shape[0]
        if eta_image.dim() != 2 or eta_image.shape[1] != self.latent_dim or (
                draws < 1 or draws * x_t.shape[0] != eta_image.shape[0]):
            raise ValueError(
                f"ImageLatentGenerator: eta_image of shape {tuple(eta_image.shape)} must be "
                f"(R * {x_t.shape[0]}, {self.latent_dim})"
            )
        summary = self.summary(x_t).mean(dim=(2, 3))  # every position of x_t, once per example
        time = timestep_embedding(t, self.width).to(x_t.dtype)
        per_example = torch.cat([summary, time], dim=1)
        return self.mlp(torch.cat([eta_image, repeat_rows(per_example, draws)], dim=1))
