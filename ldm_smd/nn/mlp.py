"""MLP denoiser for vector data ``x`` of shape (B, D) (Gaussian-mixture benchmarks).

Modulation sites (used by :class:`ldm_smd.nn.smd.SMDNetwork`):
    ``"input"``: after the first layer (``hidden`` features);
    ``"output"``: on the features the last linear layer consumes (``hidden`` features).
"""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import nn

from ldm_smd.nn.layers import timestep_embedding


class _TimeResidualLayer(nn.Module):
    """``h + Linear(SiLU(LayerNorm(h) + emb))``: one residual layer conditioned on the time.

    Args:
        hidden: feature width.
        emb_dim: width of the time embedding it receives.
    """

    def __init__(self, *, hidden: int, emb_dim: int):
        super().__init__()
        self.norm = nn.LayerNorm(hidden)
        self.emb = nn.Linear(emb_dim, hidden)
        self.linear = nn.Linear(hidden, hidden)

    def forward(self, h: torch.Tensor, emb: torch.Tensor) -> torch.Tensor:
        return h + self.linear(F.silu(self.norm(h) + self.emb(emb)))


class MLPDenoiser(nn.Module):
    """Residual MLP with a sinusoidal time embedding, for vector data.

    ``forward(x, t, generator=None, *, modulation=None)`` maps (B, dim) to (B, dim);
    ``generator`` is accepted and ignored.

    Args:
        dim: data dimension ``D`` (input and output width).
        hidden: hidden width.
        depth: number of residual hidden layers between the input and output layers.
        time_embed_dim: width of the sinusoidal time embedding (then an MLP to ``hidden``).
    """

    def __init__(self, *, dim: int, hidden: int = 128, depth: int = 3, time_embed_dim: int = 64):
        super().__init__()
        if dim < 1 or hidden < 1 or depth < 0 or time_embed_dim < 2:
            raise ValueError(
                f"MLPDenoiser: need dim >= 1, hidden >= 1, depth >= 0, time_embed_dim >= 2; "
                f"got {dim=}, {hidden=}, {depth=}, {time_embed_dim=}"
            )
        self.dim = self.in_channels = self.out_channels = dim
        self.hidden = self.model_channels = hidden
        self.time_embed_dim, self.spatial_dims = time_embed_dim, 0
        self.time_embed = nn.Sequential(
            nn.Linear(time_embed_dim, hidden), nn.SiLU(), nn.Linear(hidden, hidden)
        )
        self.input_layer = nn.Linear(dim, hidden)
        self.layers = nn.ModuleList(
            [_TimeResidualLayer(hidden=hidden, emb_dim=hidden) for _ in range(depth)]
        )
        self.out_norm = nn.LayerNorm(hidden)
        self.out = nn.Linear(hidden, dim)
        self.modulation_sites: dict[str, int] = {"input": hidden, "output": hidden}
        self.modulation_site_strides: dict[str, int] = {"input": 1, "output": 1}

    def forward(
        self,
        x: torch.Tensor,
        t: torch.Tensor,
        generator=None,
        *,
        modulation: Callable[[torch.Tensor, str], torch.Tensor] | None = None,
    ) -> torch.Tensor:
        """Predict from ``x`` (B, dim) at timesteps ``t`` (B,)."""
        if x.dim() != 2 or x.shape[1] != self.dim:
            raise ValueError(
                f"MLPDenoiser: expected x of shape (B, {self.dim}), got {tuple(x.shape)}"
            )
        t = t.reshape(-1)
        if t.shape[0] == 1 and x.shape[0] != 1:
            t = t.expand(x.shape[0])
        emb = timestep_embedding(t.to(x.device), self.time_embed_dim).to(x.dtype)
        emb = F.silu(self.time_embed(emb))
        h = self.input_layer(x)
        if modulation is not None:
            h = modulation(h, "input")
        for layer in self.layers:
            h = layer(h, emb)
        h = F.silu(self.out_norm(h))
        if modulation is not None:
            h = modulation(h, "output")
        return self.out(h)
