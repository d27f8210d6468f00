"""SMD's deviation head: draws of ``x_0`` around an intact regression.

With the per-picture code shifting the backbone's decoder (``draw_path: decoder``), one network
both regresses and draws, and measured on real digits the mean of its draws is a worse estimate
than a vanilla network's at every step (4-24% larger RMS error). With ``draw_path: deviation`` the
backbone stays the vanilla regression ``mu(x_t, t)`` (trained by the squared error alone), and a
draw is

    prediction = mu + d(eta_image, x_t, t),      d = DeviationHead([h, mu, x_t], code)

where ``h`` are the backbone's last features (before its output convolution), ``code`` the
per-picture code of :class:`~ldm_smd.nn.image_latent.ImageLatentGenerator` and ``d`` a small UNet
trained by the energy score on detached inputs: the deviation cannot move the regression, and the
``M`` draws of a call share the whole backbone pass (only the head runs once per draw).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from ldm_smd.nn.layers import Downsample, ResBlock, normalization


class DeviationHead(nn.Module):
    """``d = head(features, code)``: a two-level UNet whose residual blocks are modulated
    (scale and shift of their normalisation) by a per-picture code.

    ``forward(features, code)`` takes ``features`` (N, in_channels, H, W) and ``code``
    (N, code_channels) and returns (N, out_channels, H, W). The levels: ``width`` channels at full
    resolution, ``2 width`` at half and quarter resolution (the deviation of a whole picture needs a
    receptive field of its size; the code brings the choice, the convolutions its layout).

    Args:
        in_channels: channels of ``features``.
        out_channels: channels of the deviation (the backbone's output channels).
        code_channels: width of the per-picture code.
        width: channels at full resolution.
        norm_groups: GroupNorm groups of the residual blocks.
    """

    def __init__(self, *, in_channels: int, out_channels: int, code_channels: int,
                 width: int = 16, norm_groups: int = 8):
        super().__init__()
        if min(in_channels, out_channels, code_channels, width, norm_groups) < 1:
            raise ValueError(
                f"DeviationHead: every size must be >= 1, got {in_channels=}, {out_channels=}, "
                f"{code_channels=}, {width=}, {norm_groups=}"
            )
        kw = {"emb_channels": code_channels, "norm_groups": norm_groups,
              "use_scale_shift_norm": True}
        self.conv_in = nn.Conv2d(in_channels, width, 3, padding=1)
        self.enc0 = ResBlock(channels=width, **kw)
        self.down0 = Downsample(channels=width, out_channels=2 * width)
        self.enc1 = ResBlock(channels=2 * width, **kw)
        self.down1 = Downsample(channels=2 * width)
        self.mid = ResBlock(channels=2 * width, **kw)
        self.dec1 = ResBlock(channels=4 * width, out_channels=2 * width, **kw)
        self.dec0 = ResBlock(channels=3 * width, out_channels=width, **kw)
        self.out = nn.Sequential(normalization(width, norm_groups), nn.SiLU(),
                                 nn.Conv2d(width, out_channels, 3, padding=1))

    def forward(self, features: torch.Tensor, code: torch.Tensor) -> torch.Tensor:
        if features.shape[-1] % 4 or features.shape[-2] % 4:
            raise ValueError(f"DeviationHead: spatial size {tuple(features.shape[-2:])} must be "
                             f"divisible by 4")
        h0 = self.enc0(self.conv_in(features), code)
        h1 = self.enc1(self.down0(h0), code)
        h = self.mid(self.down1(h1), code)
        h = self.dec1(torch.cat([F.interpolate(h, scale_factor=2.0), h1], dim=1), code)
        h = self.dec0(torch.cat([F.interpolate(h, scale_factor=2.0), h0], dim=1), code)
        return self.out(h)
