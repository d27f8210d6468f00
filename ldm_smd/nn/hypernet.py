"""The SMD hypernetwork ``f(z)``: the authors' ``HyperNet``, evaluated in O(d).

At a site with features ``h`` (``C`` channels per position) and latent ``z`` (``d`` channels)::

    r = A h + a;   r <- M_L ... M_1 r;   h <- h + B r + b,
    M_l r = v_l (v_l . r) + softplus(s_l) r,   v_l = W_l z + w_l  (or tanh(W_l z + w_l) / sqrt(d))

without ever building a ``d x d`` matrix. :class:`Hypernetwork` is written as these lines. See
:mod:`ldm_smd.nn.smd` for the bound, the initialisation and where the sites are.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from ldm_smd.nn.layers import channel_linear
from ldm_smd.rng import repeat_rows

HYPERNET_BOUNDS = ("tanh", "none")
HYPERNET_INITS = ("default", "zero")


class Hypernetwork(nn.Module):
    """SMD modulation ``h <- h + B M_L ... M_1 (A h + a) + b`` at one site, evaluated in O(d).

    The authors' ``HyperNet`` (in- and out-projections with biases) with an optional bound on
    the vectors ``v_l``. Works per position on NCHW maps (``z`` of shape (B, d, H, W), matching
    ``h``'s resolution) and on vectors (``h`` of shape (B, C), ``z`` of shape (B, d)). See the
    module docstring for the maths and the initialisation.

    Args:
        channels: feature channels ``C`` at the site.
        latent_dim: latent width ``d``.
        num_layers: number ``L`` of rank-one-plus-identity factors.
        bound: ``"tanh"`` (bounded, default) or ``"none"`` (the reference, unbounded form).
        init: ``"default"`` (the authors': PyTorch's ``nn.Linear`` initialisation for every map,
            ``s_l ~ N(0, 1)``) or ``"zero"`` (the same, but ``B = 0`` and ``b = 0``, so the site
            starts as the identity: for wrapping a pretrained backbone without changing it).
    """

    def __init__(self, *, channels: int, latent_dim: int = 100, num_layers: int = 2,
                 bound: str = "tanh", init: str = "default"):
        super().__init__()
        if bound not in HYPERNET_BOUNDS:
            raise ValueError(f"hypernet_bound={bound!r} is not one of {list(HYPERNET_BOUNDS)}")
        if init not in HYPERNET_INITS:
            raise ValueError(f"hypernet_init={init!r} is not one of {list(HYPERNET_INITS)}")
        if num_layers < 1:
            raise ValueError(f"hypernet_layers must be >= 1, got {num_layers}")
        if latent_dim < 1 or channels < 1:
            raise ValueError(f"Hypernetwork: need {channels=} >= 1 and {latent_dim=} >= 1")
        self.channels, self.latent_dim, self.num_layers, self.bound = (
            channels, latent_dim, num_layers, bound
        )
        # The authors' layers, in their order: param_projs (W_l, w_l), scales, in_proj, out_proj.
        w_maps = [nn.Linear(latent_dim, latent_dim) for _ in range(num_layers)]
        s = torch.randn(num_layers)
        a_map, b_map = nn.Linear(channels, latent_dim), nn.Linear(latent_dim, channels)
        self.A = nn.Parameter(a_map.weight.detach().clone())  # (d, C)
        self.a = nn.Parameter(a_map.bias.detach().clone())  # (d,)
        # (L d, d): rows l*d:(l+1)*d hold W_l; w (L d,) holds the biases w_l
        self.W = nn.Parameter(torch.cat([m.weight.detach() for m in w_maps]))
        self.w = nn.Parameter(torch.cat([m.bias.detach() for m in w_maps]))
        self.s = nn.Parameter(s)
        self.B = nn.Parameter(b_map.weight.detach().clone())  # (C, d)
        self.b = nn.Parameter(b_map.bias.detach().clone())  # (C,)
        if init == "zero":
            with torch.no_grad():
                self.B.zero_()
                self.b.zero_()

    def vectors(self, z: torch.Tensor) -> torch.Tensor:
        """All ``v_l`` stacked along dim 1, (B, L d[, ...]): ``W z + w`` per position, or
        ``tanh(W z + w) / sqrt(d)`` with the tanh bound, for ``z`` (B, d[, ...])."""
        affine = channel_linear(z, self.W, self.w)
        if self.bound == "none":
            return affine
        return torch.tanh(affine) / math.sqrt(self.latent_dim)

    def modulate(self, h: torch.Tensor, v_all: torch.Tensor) -> torch.Tensor:
        """``h + B M_L .. M_1 (A h + a) + b`` for ``h`` (B, C[, ...]) given the vectors ``v_all``
        (:meth:`vectors`), with ``M_l r = softplus(s_l) r + v_l (v_l . r)`` at every position.

        ``v_all`` may hold ``M`` times the rows of ``h`` (row ``i + m B`` modulating row ``i``:
        ``M`` draws of ``eta`` for the same features); ``A h + a`` is then computed once.
        """
        r = channel_linear(h, self.A, self.a)
        repeats = v_all.shape[0] // h.shape[0]
        if repeats > 1:
            h, r = repeat_rows(h, repeats), repeat_rows(r, repeats)
        scales = F.softplus(self.s)
        for layer, v in enumerate(v_all.split(self.latent_dim, dim=1)):
            r = scales[layer] * r + v * (v * r).sum(dim=1, keepdim=True)
        return h + channel_linear(r, self.B, self.b)

    def forward(self, h: torch.Tensor, z: torch.Tensor) -> torch.Tensor:
        """Modulate ``h`` (B, C[, H, W]) with ``z`` (B, d[, H, W]) of the same resolution."""
        return self.modulate(h, self.vectors(z))
