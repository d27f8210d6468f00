"""Shared building blocks for the denoising networks.

Parameter names follow CompVis' ``openaimodel`` (``in_layers``, ``emb_layers``, ``out_layers``,
``skip_connection``, ``op``, ``conv``) so that checkpoints of that layout map onto ours key by
key. The forward passes are written out by hand (GroupNorm followed by SiLU, in-place additions on
tensors autograd does not need) rather than run through ``nn.Sequential``, which keeps the CPU
training step lean.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn


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


def norm_silu(norm: nn.GroupNorm, x: torch.Tensor) -> torch.Tensor:
    """``silu(norm(x))`` through the functional API (no module dispatch for the activation)."""
    return F.silu(F.group_norm(x, norm.num_groups, norm.weight, norm.bias, norm.eps))


def conv1x1(x: torch.Tensor, conv: nn.Conv1d | nn.Conv2d) -> torch.Tensor:
    """Apply a kernel-size-1 convolution as a batched matmul over the flattened positions.

    Same parameters and result as ``conv(x)``; on CPU the matmul is markedly faster than the
    1x1 convolution kernel (measured 1.5-2x forward + backward at 64-256 channels).
    """
    b, c, *spatial = x.shape
    weight = conv.weight.view(conv.weight.shape[0], c).expand(b, -1, -1)
    flat = x.reshape(b, c, -1)
    if conv.bias is None:
        out = torch.bmm(weight, flat)
    else:
        out = torch.baddbmm(conv.bias[None, :, None], weight, flat)
    return out.view(b, -1, *spatial)


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
        self.dropout = float(dropout)
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
        else:
            k = 3 if use_conv else 1
            self.skip_connection = nn.Conv2d(channels, out_channels, k, padding=k // 2)

    def forward(self, x: torch.Tensor, emb: torch.Tensor) -> torch.Tensor:
        norm_in, _, conv_in = self.in_layers
        h = norm_silu(norm_in, x)
        if self.updown:
            h = self.h_upd(h)
            x = self.x_upd(x)
        h = conv_in(h)
        emb_out = self.emb_layers[1](F.silu(emb))[:, :, None, None]
        norm_out = self.out_layers[0]
        if self.use_scale_shift_norm:
            scale, shift = emb_out.chunk(2, dim=1)
            h = F.group_norm(h, norm_out.num_groups, norm_out.weight, norm_out.bias, norm_out.eps)
            h = F.silu(torch.addcmul(shift, h, 1.0 + scale))
        else:
            h = norm_silu(norm_out, h.add_(emb_out))  # conv outputs are not saved: in place
        if self.dropout > 0.0:
            h = F.dropout(h, p=self.dropout, training=self.training)
        h = self.out_layers[3](h)
        skip = self.skip_connection
        if isinstance(skip, nn.Conv2d) and skip.kernel_size == (1, 1):
            return h.add_(conv1x1(x, skip))
        return h.add_(skip(x))
