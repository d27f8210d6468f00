"""N-layer patch-GAN discriminator (pix2pix / taming-transformers layout).

Parameter names (``main.{i}``) match CompVis's ``loss.discriminator.main.{i}`` checkpoint keys.
"""

from __future__ import annotations

import torch
from torch import nn


class NLayerDiscriminator(nn.Module):
    """Fully convolutional discriminator giving one logit per overlapping image patch.

    ``n_layers`` stride-2 4x4 convolutions (the first without normalisation), one stride-1 conv,
    then a 1-channel stride-1 output conv; BatchNorm and LeakyReLU(0.2) between. Weights are
    initialised N(0, 0.02) (convs) and N(1, 0.02) (norm scales).

    Args:
        input_nc: image channels.
        ndf: channels of the first conv; doubled per layer up to ``8 * ndf``.
        n_layers: number of stride-2 convolutions.
    """

    def __init__(self, *, input_nc: int = 3, ndf: int = 64, n_layers: int = 3) -> None:
        super().__init__()
        if n_layers < 1:
            raise ValueError(f"NLayerDiscriminator: n_layers must be >= 1, got {n_layers}")
        self.input_nc = int(input_nc)
        layers: list[nn.Module] = [
            nn.Conv2d(input_nc, ndf, 4, stride=2, padding=1),
            nn.LeakyReLU(0.2, True),
        ]
        mult = 1
        for n in range(1, n_layers + 1):
            prev, mult = mult, min(2**n, 8)
            stride = 2 if n < n_layers else 1
            layers += [
                nn.Conv2d(ndf * prev, ndf * mult, 4, stride=stride, padding=1, bias=False),
                nn.BatchNorm2d(ndf * mult),
                nn.LeakyReLU(0.2, True),
            ]
        layers.append(nn.Conv2d(ndf * mult, 1, 4, stride=1, padding=1))
        self.main = nn.Sequential(*layers)
        self._init_weights()

    def _init_weights(self) -> None:
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.normal_(m.weight, 0.0, 0.02)
            elif isinstance(m, nn.BatchNorm2d):
                nn.init.normal_(m.weight, 1.0, 0.02)
                nn.init.zeros_(m.bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.main(x)
