"""Attention UNet for diffusion, CompVis ``openaimodel`` layout and parameter names.

Top-level names: ``time_embed``, ``input_blocks``, ``middle_block``, ``output_blocks``, ``out``,
so a CompVis ``model.diffusion_model.*`` state dict of the same configuration maps key by key.

Modulation sites (used by :class:`ldm_smd.nn.smd.SMDNetwork`; ``modulation(h, site) -> h``):
    ``"input"``: right after the input convolution (``model_channels`` channels, stride 1);
    ``"level_<i>"``: at the end of encoder level ``i`` (after its residual/attention blocks, before
        its downsampling; the skip connection saved there is the modulated map), with
        ``model_channels * channel_mult[i]`` channels at stride ``2**i``;
    ``"output"``: on the map the final 3x3 convolution consumes (after the last GroupNorm + SiLU),
        ``model_channels`` channels, stride 1.

Image-level code (``context``, used by SMD's per-picture latent): a (R B, ``context_channels``)
tensor added to the time embedding of the middle block and of every decoder block, so it reaches
every resolution of the decoder through each residual block's embedding path. The encoder does
not see it, so R codes per example (R draws of SMD's ``eta``) share one encoder pass: its output
and skip connections are tiled R times (rows ``i + r B``, :func:`ldm_smd.rng.repeat_rows`) before
the middle block, and the result has R B rows.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import nn

from ldm_smd.nn.attention import AttentionBlock, check_backend
from ldm_smd.nn.layers import (
    Downsample,
    ResBlock,
    TimestepEmbedSequential,
    Upsample,
    normalization,
    timestep_embedding,
    zero_module,
)
from ldm_smd.rng import repeat_rows

Modulation = Callable[[torch.Tensor, str], torch.Tensor]


class UNetModel(nn.Module):
    """Timestep-conditioned attention UNet (CompVis ``UNetModel``, unconditional).

    Called as ``forward(x, t, generator=None, *, modulation=None, context=None)``; returns a
    tensor with ``out_channels`` channels and ``x``'s spatial size (which must be divisible by
    ``2 ** (len(channel_mult) - 1)``), and R times ``x``'s rows when ``context`` holds R codes
    per example (module docstring). ``generator`` is accepted and ignored (a plain backbone
    draws nothing).

    Args:
        in_channels: channels of the input ``x``.
        out_channels: channels of the output (equal to ``in_channels`` for a denoiser).
        model_channels: base width; level ``i`` has ``model_channels * channel_mult[i]`` channels.
        channel_mult: width multiplier per resolution level (its length is the number of levels).
        num_res_blocks: residual blocks per level in the encoder (the decoder has one more).
        attention_resolutions: downsampling factors ``ds`` (1, 2, 4, ...) at which a
            self-attention block follows each residual block (CompVis meaning). The middle block
            always has one.
        dropout: dropout probability inside the residual blocks.
        num_heads: attention heads (used when ``num_head_channels == -1``).
        num_head_channels: channels per attention head; when not -1 it overrides ``num_heads``.
        attention_backend: ``"sdpa"`` | ``"xformers"`` | ``"auto"`` | ``"math"``
            (see :mod:`ldm_smd.nn.attention`).
        use_scale_shift_norm: FiLM-style timestep conditioning in the residual blocks.
        resblock_updown: resample with residual blocks (BigGAN style) instead of Upsample and
            Downsample layers.
        conv_resample: resample with 3x3 convolutions (else nearest / average pooling).
        norm_groups: GroupNorm groups (reduced to ``gcd(norm_groups, channels)`` per layer).
    """

    def __init__(
        self,
        *,
        in_channels: int,
        out_channels: int,
        model_channels: int,
        channel_mult: list[int] | tuple = (1, 2, 4, 8),
        num_res_blocks: int = 2,
        attention_resolutions: list[int] | tuple = (),
        dropout: float = 0.0,
        num_heads: int = 1,
        num_head_channels: int = -1,
        attention_backend: str = "sdpa",
        use_scale_shift_norm: bool = False,
        resblock_updown: bool = False,
        conv_resample: bool = True,
        norm_groups: int = 32,
    ):
        super().__init__()
        check_backend(attention_backend)
        channel_mult = [int(m) for m in channel_mult]
        attention_resolutions = [int(r) for r in attention_resolutions]
        if not channel_mult or min(channel_mult) < 1:
            raise ValueError(f"UNetModel: channel_mult must be non-empty positive, {channel_mult}")
        if num_res_blocks < 1:
            raise ValueError(f"UNetModel: num_res_blocks must be >= 1, got {num_res_blocks}")
        if not 0.0 <= dropout < 1.0:
            raise ValueError(f"UNetModel: dropout must be in [0, 1), got {dropout}")
        self.in_channels, self.out_channels = in_channels, out_channels
        self.model_channels, self.channel_mult = model_channels, channel_mult
        self.num_res_blocks, self.attention_resolutions = num_res_blocks, attention_resolutions
        self.spatial_dims = 2

        emb_dim = model_channels * 4
        self.context_channels = emb_dim  # the width of an image-level code (``context``)
        self.time_embed = nn.Sequential(
            nn.Linear(model_channels, emb_dim), nn.SiLU(), nn.Linear(emb_dim, emb_dim)
        )

        def res(ch: int, out: int, **kw) -> ResBlock:
            return ResBlock(channels=ch, emb_channels=emb_dim, dropout=dropout, out_channels=out,
                            use_scale_shift_norm=use_scale_shift_norm, norm_groups=norm_groups,
                            **kw)

        def attn(ch: int) -> AttentionBlock:
            return AttentionBlock(
                channels=ch,
                num_heads=num_heads,
                num_head_channels=num_head_channels,
                attention_backend=attention_backend,
                norm_groups=norm_groups,
            )

        self.input_blocks = nn.ModuleList(
            [TimestepEmbedSequential(nn.Conv2d(in_channels, model_channels, 3, padding=1))]
        )
        self.modulation_sites: dict[str, int] = {"input": model_channels}
        self.modulation_site_strides: dict[str, int] = {"input": 1}
        self._site_after_block: dict[int, str] = {0: "input"}
        skip_chans = [model_channels]
        ch, ds = model_channels, 1
        for level, mult in enumerate(channel_mult):
            for _ in range(num_res_blocks):
                layers: list[nn.Module] = [res(ch, model_channels * mult)]
                ch = model_channels * mult
                if ds in attention_resolutions:
                    layers.append(attn(ch))
                self.input_blocks.append(TimestepEmbedSequential(*layers))
                skip_chans.append(ch)
            site = f"level_{level}"
            self._site_after_block[len(self.input_blocks) - 1] = site
            self.modulation_sites[site] = ch
            self.modulation_site_strides[site] = ds
            if level != len(channel_mult) - 1:
                down = (
                    res(ch, ch, down=True)
                    if resblock_updown
                    else Downsample(channels=ch, use_conv=conv_resample)
                )
                self.input_blocks.append(TimestepEmbedSequential(down))
                skip_chans.append(ch)
                ds *= 2

        self.middle_block = TimestepEmbedSequential(res(ch, ch), attn(ch), res(ch, ch))

        self.output_blocks = nn.ModuleList()
        for level, mult in list(enumerate(channel_mult))[::-1]:
            for i in range(num_res_blocks + 1):
                layers = [res(ch + skip_chans.pop(), model_channels * mult)]
                ch = model_channels * mult
                if ds in attention_resolutions:
                    layers.append(attn(ch))
                if level and i == num_res_blocks:
                    layers.append(
                        res(ch, ch, up=True)
                        if resblock_updown
                        else Upsample(channels=ch, use_conv=conv_resample)
                    )
                    ds //= 2
                self.output_blocks.append(TimestepEmbedSequential(*layers))

        self.out = nn.Sequential(
            normalization(ch, norm_groups),
            nn.SiLU(),
            zero_module(nn.Conv2d(model_channels, out_channels, 3, padding=1)),
        )
        self.modulation_sites["output"] = ch
        self.modulation_site_strides["output"] = 1
        self.downsample_factor = 2 ** (len(channel_mult) - 1)

    def forward(
        self,
        x: torch.Tensor,
        t: torch.Tensor,
        generator=None,
        *,
        modulation: Modulation | None = None,
        context: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """Predict from ``x`` (B, in_channels, H, W) at timesteps ``t`` (B,); ``context`` is an
        image-level code (R B, context_channels) for the middle block and the decoder."""
        if x.dim() != 4 or x.shape[1] != self.in_channels:
            raise ValueError(
                f"UNetModel: expected x of shape (B, {self.in_channels}, H, W), "
                f"got {tuple(x.shape)}"
            )
        if x.shape[-1] % self.downsample_factor or x.shape[-2] % self.downsample_factor:
            raise ValueError(
                f"UNetModel: spatial size {tuple(x.shape[-2:])} must be divisible by "
                f"{self.downsample_factor} (2 ** (len(channel_mult) - 1))"
            )
        t = t.reshape(-1)
        if t.shape[0] == 1 and x.shape[0] != 1:
            t = t.expand(x.shape[0])
        emb = self.time_embed(timestep_embedding(t.to(x.device), self.model_channels).to(x.dtype))
        hs = []
        h = x
        for i, block in enumerate(self.input_blocks):
            h = block(h, emb)
            if modulation is not None and i in self._site_after_block:
                h = modulation(h, self._site_after_block[i])
            hs.append(h)
        if context is not None:
            draws = _draws(context, h)
            if draws > 1:  # the encoder's pass is shared by the R codes of each example
                h, emb = repeat_rows(h, draws), repeat_rows(emb, draws)
                hs = [repeat_rows(skip, draws) for skip in hs]
            emb = emb + context
        h = self.middle_block(h, emb)
        for block in self.output_blocks:
            h = block(torch.cat([h, hs.pop()], dim=1), emb)
        h = self.out[:-1](h)  # GroupNorm, SiLU
        if modulation is not None:
            h = modulation(h, "output")
        return self.out[-1](h)


def _draws(context: torch.Tensor, h: torch.Tensor) -> int:
    """How many codes per example ``context`` holds for the batch of ``h``."""
    draws = context.shape[0] // h.shape[0]
    if context.dim() != 2 or draws < 1 or draws * h.shape[0] != context.shape[0]:
        raise ValueError(
            f"UNetModel: context of shape {tuple(context.shape)} must be (R * {h.shape[0]}, "
            f"context_channels) for a batch of {h.shape[0]}"
        )
    return draws
