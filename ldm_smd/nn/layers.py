"""Shared building blocks for the denoising networks.

Parameter names follow CompVis' ``openaimodel`` (``in_layers``, ``emb_layers``, ``out_layers``,
``skip_connection``, ``op``, ``conv``) so that checkpoints of that layout map onto ours key by
key. Every forward runs the layers its module declares, in plain PyTorch; the measured CPU
speed-up (1x1 convolutions as batched matmuls) is switched in :mod:`ldm_smd.nn.kernels`.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from ldm_smd.nn import kernels


def timestep_embedding(t: torch.Tensor, dim: int, max_period: float = 10000.0) -> torch.Tensor:
    """Sinusoidal embedding of timesteps, CompVis order ``[cos, sin]``.

    Args:
        t: (B,) tensor of timestep indices (long or float; fractional values are allowed).
        dim: embedding width; an odd ``dim`` gets one zero column at the end.
        max_period: lowest frequency is ``1 / max_period``.

    Returns:
        (B, dim) float32 tensor.
    """
    if t.dim() != 1:
        raise ValueError(f"timestep_embedding: t must have shape (B,), got {tuple(t.shape)}")
    half = dim // 2
    freqs = torch.exp(
        -math.log(max_period) * torch.arange(half, dtype=torch.float32, device=t.device) / half
    )
    args = t.float()[:, None] * freqs[None]
    emb = torch.cat([torch.cos(args), torch.sin(args)], dim=-1)
    if dim % 2:
        emb = torch.cat([emb, torch.zeros_like(emb[:, :1])], dim=-1)
    return emb


def normalization(channels: int, groups: int = 32) -> nn.GroupNorm:
    """GroupNorm with ``gcd(groups, channels)`` groups (32 for the usual widths), eps 1e-5."""
    return nn.GroupNorm(math.gcd(groups, channels), channels, eps=1e-5)


def zero_module(module: nn.Module) -> nn.Module:
    """Zero every parameter of ``module`` and return it."""
    for p in module.parameters():
        nn.init.zeros_(p)
    return module


def channel_linear(x: torch.Tensor, weight: torch.Tensor,
                   bias: torch.Tensor | None = None) -> torch.Tensor:
    """``weight @ x + bias`` at every position: a linear map over dim 1 of ``x`` (B, K[, ...]).

    ``weight`` is (J, K); ``bias`` is (J,), one per row (B, J), or None. Returns (B, J[, ...]).
    Plain ``F.linear`` on the positions' vectors; the ``pointwise_bmm`` kernel runs maps as one
    batched matmul.
    """
    if x.dim() > 2 and kernels.enabled("pointwise_bmm"):
        return kernels.pointwise_bmm(x, weight, bias)
    per_row = bias is not None and bias.dim() == 2
    out = F.linear(x.movedim(1, -1), weight, None if per_row else bias)
    if per_row:
        out = out + bias.view(bias.shape[0], *([1] * (x.dim() - 2)), -1)
    return out.movedim(-1, 1)


class _Pointwise:
    """A kernel-size-1 convolution that runs as a batched matmul when the ``pointwise_bmm``
    kernel is on (same parameters, same result); mixed into ``nn.Conv1d`` / ``nn.Conv2d``."""

    def __init__(self, in_channels: int, out_channels: int):
        super().__init__(in_channels, out_channels, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if kernels.enabled("pointwise_bmm"):
            return kernels.pointwise_bmm(x, self.weight, self.bias)
        return super().forward(x)


class PointwiseConv1d(_Pointwise, nn.Conv1d):
    """``nn.Conv1d(in_channels, out_channels, 1)`` (see :class:`_Pointwise`).

    Args:
        in_channels: input channels.
        out_channels: output channels.
    """


class PointwiseConv2d(_Pointwise, nn.Conv2d):
    """``nn.Conv2d(in_channels, out_channels, 1)`` (see :class:`_Pointwise`).

    Args:
        in_channels: input channels.
        out_channels: output channels.
    """


class TimestepBlock(nn.Module):
    """Marker base class: a block whose forward takes ``(x, emb)``."""

    def forward(self, x: torch.Tensor, emb: torch.Tensor) -> torch.Tensor:  # pragma: no cover
        raise NotImplementedError


class TimestepEmbedSequential(nn.Sequential):
    """Sequential container that passes the timestep embedding to the blocks that take one."""

    def forward(self, x: torch.Tensor, emb: torch.Tensor) -> torch.Tensor:  # type: ignore[override]
        for layer in self:
            x = layer(x, emb) if isinstance(layer, TimestepBlock) else layer(x)
        return x


class Upsample(nn.Module):
    """Nearest-neighbour 2x upsampling, optionally followed by a 3x3 convolution.

    Args:
        channels: input channels.
        use_conv: apply a 3x3 convolution after upsampling.
        out_channels: output channels (default ``channels``; needs ``use_conv`` to differ).
    """

    def __init__(self, *, channels: int, use_conv: bool = True, out_channels: int | None = None):
        super().__init__()
        out_channels = out_channels or channels
        if not use_conv and out_channels != channels:
            raise ValueError("Upsample: out_channels != channels requires use_conv=True")
        self.channels = channels
        self.conv = nn.Conv2d(channels, out_channels, 3, padding=1) if use_conv else None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = F.interpolate(x, scale_factor=2.0, mode="nearest")
        return self.conv(x) if self.conv is not None else x


class Downsample(nn.Module):
    """2x downsampling by a strided 3x3 convolution (``use_conv``) or 2x2 average pooling.

    Args:
        channels: input channels.
        use_conv: strided convolution (else average pooling).
        out_channels: output channels (default ``channels``; needs ``use_conv`` to differ).
    """

    def __init__(self, *, channels: int, use_conv: bool = True, out_channels: int | None = None):
        super().__init__()
        out_channels = out_channels or channels
        if use_conv:
            self.op: nn.Module = nn.Conv2d(channels, out_channels, 3, stride=2, padding=1)
        else:
            if out_channels != channels:
                raise ValueError("Downsample: out_channels != channels requires use_conv=True")
            self.op = nn.AvgPool2d(kernel_size=2, stride=2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.op(x)


class ResBlock(TimestepBlock):
    """Residual block with timestep conditioning (CompVis ``ResBlock`` layout and names).

    ``in_layers`` = [GroupNorm, SiLU, conv3x3], ``emb_layers`` = [SiLU, Linear],
    ``out_layers`` = [GroupNorm, SiLU, Dropout, zero-initialised conv3x3], ``skip_connection`` =
    identity or a 1x1 (3x3 with ``use_conv``) convolution.

    Args:
        channels: input channels.
        emb_channels: width of the timestep embedding.
        dropout: dropout probability before the second convolution.
        out_channels: output channels (default ``channels``).
        use_conv: use a 3x3 instead of a 1x1 convolution on the skip path when channels change.
        use_scale_shift_norm: FiLM-style ``norm(h) * (1 + scale) + shift`` conditioning instead of
            adding the embedding.
        up: upsample 2x inside the block (BigGAN style).
        down: downsample 2x inside the block (BigGAN style).
        norm_groups: GroupNorm groups (reduced to ``gcd(norm_groups, channels)``).
    """

    def __init__(
        self,
        *,
        channels: int,
        emb_channels: int,
        dropout: float = 0.0,
        out_channels: int | None = None,
        use_conv: bool = False,
        use_scale_shift_norm: bool = False,
        up: bool = False,
        down: bool = False,
        norm_groups: int = 32,
    ):
        super().__init__()
        out_channels = out_channels or channels
        self.channels = channels
        self.out_channels = out_channels
        self.use_scale_shift_norm = use_scale_shift_norm
        self.in_layers = nn.Sequential(
            normalization(channels, norm_groups),
            nn.SiLU(),
            nn.Conv2d(channels, out_channels, 3, padding=1),
        )
        self.updown = up or down
        if up:
            self.h_upd: nn.Module = Upsample(channels=channels, use_conv=False)
            self.x_upd: nn.Module = Upsample(channels=channels, use_conv=False)
        elif down:
            self.h_upd = Downsample(channels=channels, use_conv=False)
            self.x_upd = Downsample(channels=channels, use_conv=False)
        self.emb_layers = nn.Sequential(
            nn.SiLU(),
            nn.Linear(emb_channels, 2 * out_channels if use_scale_shift_norm else out_channels),
        )
        self.out_layers = nn.Sequential(
            normalization(out_channels, norm_groups),
            nn.SiLU(),
            nn.Dropout(p=dropout),
            zero_module(nn.Conv2d(out_channels, out_channels, 3, padding=1)),
        )
        if out_channels == channels:
            self.skip_connection: nn.Module = nn.Identity()
        elif use_conv:
            self.skip_connection = nn.Conv2d(channels, out_channels, 3, padding=1)
        else:
            self.skip_connection = PointwiseConv2d(channels, out_channels)

    def forward(self, x: torch.Tensor, emb: torch.Tensor) -> torch.Tensor:
        if self.updown:  # resample between the activation and the convolution (CompVis)
            h = self.in_layers[:-1](x)
            h, x = self.h_upd(h), self.x_upd(x)
            h = self.in_layers[-1](h)
        else:
            h = self.in_layers(x)
        emb_out = self.emb_layers(emb)[:, :, None, None]
        if self.use_scale_shift_norm:
            scale, shift = emb_out.chunk(2, dim=1)
            h = self.out_layers[0](h) * (1 + scale) + shift
            h = self.out_layers[1:](h)
        else:
            h = self.out_layers(h + emb_out)
        return h + self.skip_connection(x)
