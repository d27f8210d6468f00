"""The KL autoencoder of latent diffusion: Encoder, Decoder, diagonal Gaussian posterior.

Parameter names follow CompVis's ``ldm.modules.diffusionmodules.model`` so that their first-stage
checkpoints load without renaming: ``conv_in``, ``down.{i}.block.{j}``, ``down.{i}.attn.{j}``,
``down.{i}.downsample.conv``, ``mid.block_1``, ``mid.attn_1``, ``mid.block_2``,
``up.{i}.block.{j}``, ``up.{i}.upsample.conv``, ``norm_out``, ``conv_out``. The architecture is
configured by a CompVis ``ddconfig`` dict: ``ch``, ``ch_mult``, ``num_res_blocks``,
``attn_resolutions``, ``z_channels``, ``double_z``, ``resolution``, ``in_channels``, ``out_ch``,
``dropout``.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from ldm_smd.rng import GeneratorLike, randn_like

DDCONFIG_KEYS = (
    "ch",
    "ch_mult",
    "num_res_blocks",
    "attn_resolutions",
    "z_channels",
    "double_z",
    "resolution",
    "in_channels",
    "out_ch",
    "dropout",
)
_DDCONFIG_OPTIONAL = {"attn_resolutions": (), "double_z": True, "dropout": 0.0, "resolution": 256}


def check_ddconfig(ddconfig: Mapping) -> dict:
    """Validate a CompVis ``ddconfig`` and return it as a plain dict with defaults filled in."""
    unknown = sorted(set(ddconfig) - set(DDCONFIG_KEYS))
    if unknown:
        raise ValueError(f"ddconfig: unknown keys {unknown}; valid keys are {list(DDCONFIG_KEYS)}")
    out = {**_DDCONFIG_OPTIONAL, **dict(ddconfig)}
    missing = [k for k in DDCONFIG_KEYS if k not in out]
    if missing:
        raise ValueError(f"ddconfig: missing keys {missing}")
    out["ch_mult"] = [int(m) for m in out["ch_mult"]]
    out["attn_resolutions"] = [int(r) for r in out["attn_resolutions"]]
    for key in ("ch", "num_res_blocks", "z_channels", "resolution", "in_channels", "out_ch"):
        out[key] = int(out[key])
    out["double_z"] = bool(out["double_z"])
    out["dropout"] = float(out["dropout"])
    if out["ch"] < 1 or any(m < 1 for m in out["ch_mult"]):
        raise ValueError(f"ddconfig: ch and ch_mult must be positive, got {out['ch']}, "
                         f"{out['ch_mult']}")
    return out


def _norm(channels: int) -> nn.GroupNorm:
    # 32 groups as CompVis (every width that is a multiple of 32); narrower CPU-sized models
    # (e.g. the demo's ch=16) use gcd(32, channels) groups
    return nn.GroupNorm(num_groups=math.gcd(32, channels), num_channels=channels, eps=1e-6)


class ResnetBlock(nn.Module):
    """Pre-activation residual block: GroupNorm, SiLU, 3x3 conv, twice; 1x1 shortcut if needed.

    Args:
        in_channels: input channels.
        out_channels: output channels.
        dropout: dropout probability before the second convolution.
    """

    def __init__(self, *, in_channels: int, out_channels: int, dropout: float = 0.0) -> None:
        super().__init__()
        self.norm1 = _norm(in_channels)
        self.conv1 = nn.Conv2d(in_channels, out_channels, 3, padding=1)
        self.norm2 = _norm(out_channels)
        self.dropout = nn.Dropout(dropout)
        self.conv2 = nn.Conv2d(out_channels, out_channels, 3, padding=1)
        if in_channels != out_channels:
            self.nin_shortcut = nn.Conv2d(in_channels, out_channels, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.conv1(F.silu(self.norm1(x)))
        h = self.conv2(self.dropout(F.silu(self.norm2(h))))
        if hasattr(self, "nin_shortcut"):
            x = self.nin_shortcut(x)
        return x + h


class AttnBlock(nn.Module):
    """Single-head spatial self-attention with 1x1-conv projections and a residual connection.

    Args:
        channels: feature channels.
    """

    def __init__(self, *, channels: int) -> None:
        super().__init__()
        self.norm = _norm(channels)
        self.q = nn.Conv2d(channels, channels, 1)
        self.k = nn.Conv2d(channels, channels, 1)
        self.v = nn.Conv2d(channels, channels, 1)
        self.proj_out = nn.Conv2d(channels, channels, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, c, h, w = x.shape
        hn = self.norm(x)
        q, k, v = (
            m(hn).reshape(b, 1, c, h * w).transpose(-1, -2) for m in (self.q, self.k, self.v)
        )
        out = F.scaled_dot_product_attention(q, k, v)  # (b, 1, hw, c), scale 1/sqrt(c)
        return x + self.proj_out(out.transpose(-1, -2).reshape(b, c, h, w))


class Downsample(nn.Module):
    """Halve the resolution with a stride-2 3x3 conv after asymmetric (right, bottom) padding.

    Args:
        channels: feature channels.
    """

    def __init__(self, *, channels: int) -> None:
        super().__init__()
        self.conv = nn.Conv2d(channels, channels, 3, stride=2, padding=0)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.conv(F.pad(x, (0, 1, 0, 1)))


class Upsample(nn.Module):
    """Double the resolution (nearest neighbour) followed by a 3x3 conv.

    Args:
        channels: feature channels.
    """

    def __init__(self, *, channels: int) -> None:
        super().__init__()
        self.conv = nn.Conv2d(channels, channels, 3, padding=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.conv(F.interpolate(x, scale_factor=2.0, mode="nearest"))


def _level(block_in: int, block_out: int, *, num_blocks: int, attention: bool,
           dropout: float) -> nn.Module:
    """One resolution level: ``num_blocks`` residual blocks ``block_in -> block_out``, each
    followed by self-attention when ``attention`` (CompVis names ``block.N``, ``attn.N``)."""
    level = nn.Module()
    level.block = nn.ModuleList(
        ResnetBlock(in_channels=c, out_channels=block_out, dropout=dropout)
        for c in [block_in] + [block_out] * (num_blocks - 1)
    )
    level.attn = nn.ModuleList(
        AttnBlock(channels=block_out) for _ in range(num_blocks if attention else 0)
    )
    return level


def _run_level(level: nn.Module, h: torch.Tensor) -> torch.Tensor:
    for i, block in enumerate(level.block):
        h = block(h)
        if len(level.attn) > 0:
            h = level.attn[i](h)
    return h


def _mid(channels: int, dropout: float) -> nn.Module:
    mid = nn.Module()
    mid.block_1 = ResnetBlock(in_channels=channels, out_channels=channels, dropout=dropout)
    mid.attn_1 = AttnBlock(channels=channels)
    mid.block_2 = ResnetBlock(in_channels=channels, out_channels=channels, dropout=dropout)
    return mid


class Encoder(nn.Module):
    """Image -> posterior parameters (``2 * z_channels`` channels when ``double_z``).

    The spatial size shrinks by ``2 ** (len(ch_mult) - 1)``.

    Args:
        ch: base channel count.
        ch_mult: channel multiplier per resolution level.
        num_res_blocks: residual blocks per level.
        attn_resolutions: feature-map sizes (relative to ``resolution``) that get self-attention.
        z_channels: latent channels before ``quant_conv``.
        double_z: output mean and log-variance (``2 * z_channels``) rather than ``z_channels``.
        resolution: nominal input size, used only to place ``attn_resolutions``.
        in_channels: image channels.
        out_ch: image channels of the decoder (accepted so one ddconfig builds both; unused).
        dropout: dropout inside residual blocks.
    """

    def __init__(
        self,
        *,
        ch: int,
        ch_mult: Sequence[int],
        num_res_blocks: int,
        z_channels: int,
        in_channels: int = 3,
        out_ch: int = 3,
        attn_resolutions: Sequence[int] = (),
        double_z: bool = True,
        resolution: int = 256,
        dropout: float = 0.0,
    ) -> None:
        super().__init__()
        self.conv_in = nn.Conv2d(in_channels, ch, 3, padding=1)
        in_mult = (1, *ch_mult)
        res = resolution
        self.down = nn.ModuleList()
        block_out = ch
        for i, mult in enumerate(ch_mult):
            block_out = ch * mult
            level = _level(ch * in_mult[i], block_out, num_blocks=num_res_blocks,
                           attention=res in attn_resolutions, dropout=dropout)
            if i != len(ch_mult) - 1:
                level.downsample = Downsample(channels=block_out)
                res //= 2
            self.down.append(level)
        self.mid = _mid(block_out, dropout)
        self.norm_out = _norm(block_out)
        z_out = 2 * z_channels if double_z else z_channels
        self.conv_out = nn.Conv2d(block_out, z_out, 3, padding=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.conv_in(x)
        for level in self.down:
            h = _run_level(level, h)
            if hasattr(level, "downsample"):
                h = level.downsample(h)
        h = self.mid.block_2(self.mid.attn_1(self.mid.block_1(h)))
        return self.conv_out(F.silu(self.norm_out(h)))


class Decoder(nn.Module):
    """Latent (``z_channels``) -> image (``out_ch``); the spatial size grows by
    ``2 ** (len(ch_mult) - 1)``. Takes the ddconfig of :class:`Encoder` (its keys are documented
    there and in the module docstring; the decoder uses one more residual block per level and
    ignores the encoder-only ``in_channels`` and ``double_z``).
    """

    def __init__(self, **ddconfig: Any) -> None:
        super().__init__()
        cfg = check_ddconfig(ddconfig)
        ch, ch_mult, dropout = cfg["ch"], cfg["ch_mult"], cfg["dropout"]
        block_in = ch * ch_mult[-1]
        res = cfg["resolution"] // 2 ** (len(ch_mult) - 1)
        self.conv_in = nn.Conv2d(cfg["z_channels"], block_in, 3, padding=1)
        self.mid = _mid(block_in, dropout)
        levels: list[nn.Module] = []
        for i in reversed(range(len(ch_mult))):
            block_out = ch * ch_mult[i]
            level = _level(block_in, block_out, num_blocks=cfg["num_res_blocks"] + 1,
                           attention=res in cfg["attn_resolutions"], dropout=dropout)
            block_in = block_out
            if i != 0:
                level.upsample = Upsample(channels=block_in)
                res *= 2
            levels.insert(0, level)  # up[i] is level i, as in CompVis
        self.up = nn.ModuleList(levels)
        self.norm_out = _norm(block_in)
        self.conv_out = nn.Conv2d(block_in, cfg["out_ch"], 3, padding=1)

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        h = self.conv_in(z)
        h = self.mid.block_2(self.mid.attn_1(self.mid.block_1(h)))
        for level in reversed(self.up):
            h = _run_level(level, h)
            if hasattr(level, "upsample"):
                h = level.upsample(h)
        return self.conv_out(F.silu(self.norm_out(h)))


class DiagonalGaussianDistribution:
    """Diagonal Gaussian over latents, parameterised by mean and log-variance stacked on dim 1.

    Statistics are kept in float32 (the log-variance is clamped to [-30, 20]) so that KL and
    samples stay finite under bf16 autocast.

    Args:
        parameters: (B, 2C, H, W) tensor, mean then log-variance along channels.
        deterministic: zero variance (``sample`` returns the mean, ``kl`` is 0).
    """

    def __init__(self, parameters: torch.Tensor, *, deterministic: bool = False) -> None:
        mean, logvar = parameters.float().chunk(2, dim=1)
        self.mean = mean
        self.logvar = logvar.clamp(-30.0, 20.0)
        self.deterministic = deterministic
        if deterministic:
            self.logvar = torch.zeros_like(self.mean)
        self.std = torch.exp(0.5 * self.logvar)
        self.var = torch.exp(self.logvar)
        if deterministic:
            self.std = self.var = torch.zeros_like(self.mean)

    def sample(self, generator: GeneratorLike = None) -> torch.Tensor:
        """Reparameterised draw ``mean + std * eps`` with ``eps`` from ``generator``."""
        return self.mean + self.std * randn_like(self.mean, generator=generator)

    def mode(self) -> torch.Tensor:
        """The mean (the mode of a Gaussian)."""
        return self.mean

    def kl(self, other: DiagonalGaussianDistribution | None = None) -> torch.Tensor:
        """KL(self || other) per batch row, summed over C, H, W; ``other`` defaults to N(0, I)."""
        if self.deterministic:
            return torch.zeros(self.mean.shape[0], device=self.mean.device)
        if other is None:
            terms = self.mean.pow(2) + self.var - 1.0 - self.logvar
        else:
            terms = (
                (self.mean - other.mean).pow(2) / other.var
                + self.var / other.var
                - 1.0
                - self.logvar
                + other.logvar
            )
        return 0.5 * terms.sum(dim=(1, 2, 3))

    def nll(self, sample: torch.Tensor) -> torch.Tensor:
        """Negative log-likelihood of ``sample`` per batch row, summed over C, H, W."""
        if self.deterministic:
            return torch.zeros(self.mean.shape[0], device=self.mean.device)
        terms = math.log(2.0 * math.pi) + self.logvar + (sample - self.mean).pow(2) / self.var
        return 0.5 * terms.sum(dim=(1, 2, 3))


class AutoencoderKL(nn.Module):
    """The first stage: ``encode(x) -> posterior`` over ``embed_dim``-channel latents,
    ``decode(z) -> image``. Holds ``encoder``, ``decoder``, ``quant_conv`` and ``post_quant_conv``
    under CompVis's names. Latents here are *unscaled*; the stage-2 model multiplies by
    ``scale_factor``.

    Args:
        ddconfig: CompVis architecture dict (keys listed in the module docstring).
        embed_dim: latent channels seen by the diffusion model.
    """

    def __init__(self, *, ddconfig: dict, embed_dim: int) -> None:
        super().__init__()
        cfg = check_ddconfig(ddconfig)
        if not cfg["double_z"]:
            raise ValueError("AutoencoderKL needs ddconfig.double_z = true (mean and log-variance)")
        self.ddconfig = cfg
        self.embed_dim = int(embed_dim)
        self.encoder = Encoder(**cfg)
        self.decoder = Decoder(**cfg)
        self.quant_conv = nn.Conv2d(2 * cfg["z_channels"], 2 * self.embed_dim, 1)
        self.post_quant_conv = nn.Conv2d(self.embed_dim, cfg["z_channels"], 1)

    @property
    def downsampling_factor(self) -> int:
        """Ratio of image size to latent size."""
        return 2 ** (len(self.ddconfig["ch_mult"]) - 1)

    def encode(self, x: torch.Tensor) -> DiagonalGaussianDistribution:
        """Posterior q(z | x) for images ``x`` in [-1, 1]."""
        return DiagonalGaussianDistribution(self.quant_conv(self.encoder(x)))

    def decode(self, z: torch.Tensor) -> torch.Tensor:
        """Images (roughly in [-1, 1]) from unscaled latents ``z``."""
        return self.decoder(self.post_quant_conv(z.to(self.post_quant_conv.weight.dtype)))

    def forward(
        self, x: torch.Tensor, *, sample_posterior: bool = True, generator: GeneratorLike = None
    ) -> tuple[torch.Tensor, DiagonalGaussianDistribution]:
        """Reconstruction and posterior; the latent is sampled (or the mode when not)."""
        posterior = self.encode(x)
        z = posterior.sample(generator) if sample_posterior else posterior.mode()
        return self.decode(z), posterior

    def last_layer(self) -> torch.Tensor:
        """The decoder's output-conv weight (used for the adaptive GAN weight)."""
        return self.decoder.conv_out.weight
