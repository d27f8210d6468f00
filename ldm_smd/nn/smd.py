"""Soft Mixture Denoising (Li, van Breugel, van der Schaar, ICLR 2024), SMD.md section 2.

One backward step is a continuous mixture of Gaussians: a latent ``z = g(eta, x_t, t)`` with
``eta ~ N(0, I)`` of ``x_t``'s shape selects, through a hypernetwork, a modulation of the
denoiser's features. :class:`SMDNetwork` wraps any backbone that exposes modulation sites
(:class:`~ldm_smd.nn.unet.UNetModel`, :class:`~ldm_smd.nn.mlp.MLPDenoiser`) and keeps the plain
network call ``net(x_t, t, generator=None)``, so nothing downstream knows SMD exists.

Hypernetwork at a site with features ``h`` (``C`` channels per position), ``d = latent_dim``::

    r = A h                                   # C -> d
    v_l = W_l z + b_l                         # "none"  (reference, unbounded)
    v_l = tanh(W_l z + b_l) / sqrt(d)         # "tanh"  (default; |v_l| <= 1)
    r <- M_l r = v_l (v_l . r) + softplus(s_l) r,   l = 1 .. L     # O(d), no d x d matrix
    h <- h + B r                              # d -> C

With the tanh bound every eigenvalue of ``M_l = v_l v_l^T + softplus(s_l) I`` lies in
``(0, 1 + softplus(s_l)]``, so ``L`` layers cannot blow up however far ``z`` wanders.

Initialisation: ``B`` is zero, so a freshly built SMD network computes exactly its backbone
(a pretrained vanilla backbone can be wrapped without changing its predictions, and training
starts from the well-behaved vanilla model). ``B`` still receives a gradient at once
(``dL/dB = dL/dh r^T``); the rest of the hypernetwork and ``g`` receive theirs as soon as ``B``
is non-zero. ``s_l`` starts at ``log(e - 1)`` so ``softplus(s_l) = 1``; ``A`` and ``W_l`` use
PyTorch's default linear initialisation.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from ldm_smd.nn.layers import Downsample, ResBlock, normalization, timestep_embedding
from ldm_smd.rng import randn_like

PLACEMENTS = ("input_output", "every_level")
HYPERNET_BOUNDS = ("tanh", "none")


class LatentGenerator(nn.Module):
    """Latent generator ``z = g(eta, x_t, t)`` with its own time embedding.

    Images (``spatial=True``): a two-level UNet over ``[x_t, eta]`` with no attention: an input
    3x3 convolution and one residual block at full resolution (``width`` channels), a strided
    downsampling and one residual block at half resolution (``2 * width``), then the decoder:
    nearest upsampling, concatenation with the full-resolution skip (``3 * width``),
    GroupNorm + SiLU and a 1x1 convolution to ``latent_dim`` channels, returning
    (B, latent_dim, H, W). The decoder has no residual block and a 1x1 head because full-resolution
    work is what g costs; the receptive field comes from the encoder (measured on CPU, 32x32,
    batch 16, width 16: forward 44 ms with a full-resolution decoder block and a 3x3 head, 15 ms
    this way, against about 800 ms for a width-64 backbone). Vectors (``spatial=False``): an MLP
    over ``[x_t, eta, time]`` returning (B, latent_dim). The last layer keeps the default (non-zero)
    initialisation so ``z`` depends on ``eta`` from the start.

    Args:
        in_channels: channels of ``x_t`` (image) or its dimension ``D`` (vector).
        latent_dim: channels / width ``d`` of ``z``.
        width: base width of the generator.
        spatial: image (NCHW) generator if True, vector generator if False.
    """

    def __init__(self, *, in_channels: int, latent_dim: int = 100, width: int = 16,
                 spatial: bool = True):
        super().__init__()
        if width < 1 or latent_dim < 1 or in_channels < 1:
            raise ValueError(
                f"LatentGenerator: in_channels, latent_dim and width must be >= 1, got "
                f"{in_channels=}, {latent_dim=}, {width=}"
            )
        self.width = width
        self.spatial = spatial
        self.latent_dim = latent_dim
        emb = 4 * width if spatial else width
        self.time_embed = nn.Sequential(nn.Linear(width, emb), nn.SiLU(), nn.Linear(emb, emb))
        if spatial:
            kw = {"emb_channels": emb, "norm_groups": 8}
            self.conv_in = nn.Conv2d(2 * in_channels, width, 3, padding=1)
            self.enc0 = ResBlock(channels=width, **kw)
            self.down = Downsample(channels=width, use_conv=True)
            self.enc1 = ResBlock(channels=width, out_channels=2 * width, **kw)
            self.norm_out = normalization(3 * width, 8)
            self.conv_out = nn.Conv2d(3 * width, latent_dim, 1)
        else:
            self.inp = nn.Linear(2 * in_channels, width)
            self.hidden = nn.Linear(width, width)
            self.out = nn.Linear(width, latent_dim)

    def forward(self, eta: torch.Tensor, x_t: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        """Return ``z`` of shape (B, latent_dim, H, W) or (B, latent_dim)."""
        emb = self.time_embed(timestep_embedding(t, self.width).to(x_t.dtype))
        xin = torch.cat([x_t, eta], dim=1)
        if not self.spatial:
            h = F.silu(self.inp(xin) + emb)
            h = F.silu(self.hidden(h))
            return self.out(h)
        h0 = self.enc0(self.conv_in(xin), emb)
        h1 = self.enc1(self.down(h0), emb)
        h1 = F.interpolate(h1, size=h0.shape[-2:], mode="nearest")
        n = self.norm_out
        h = F.silu(F.group_norm(torch.cat([h1, h0], dim=1), n.num_groups, n.weight, n.bias, n.eps))
        # The 1x1 head as a batched matmul (faster than a 1x1 convolution on CPU).
        w = self.conv_out.weight
        z = torch.baddbmm(self.conv_out.bias[None, :, None], w.view(w.shape[0], -1).expand(
            h.shape[0], -1, -1), h.flatten(2))
        return z.view(h.shape[0], -1, *h.shape[-2:])


class Hypernetwork(nn.Module):
    """SMD modulation ``h <- h + B M_L ... M_1 A h`` at one site, evaluated in O(d).

    Works per position on NCHW maps (``z`` of shape (B, d, H, W), matching ``h``'s resolution)
    and on vectors (``h`` of shape (B, C), ``z`` of shape (B, d)). See the module docstring for
    the maths and the initialisation.

    Args:
        channels: feature channels ``C`` at the site.
        latent_dim: latent width ``d``.
        num_layers: number ``L`` of rank-one-plus-identity factors.
        bound: ``"tanh"`` (bounded, default) or ``"none"`` (the reference, unbounded form).
    """

    def __init__(self, *, channels: int, latent_dim: int = 100, num_layers: int = 2,
                 bound: str = "tanh"):
        super().__init__()
        if bound not in HYPERNET_BOUNDS:
            raise ValueError(f"hypernet_bound={bound!r} is not one of {list(HYPERNET_BOUNDS)}")
        if num_layers < 1:
            raise ValueError(f"hypernet_layers must be >= 1, got {num_layers}")
        if latent_dim < 1 or channels < 1:
            raise ValueError(f"Hypernetwork: need {channels=} >= 1 and {latent_dim=} >= 1")
        self.channels, self.latent_dim, self.num_layers, self.bound = (
            channels, latent_dim, num_layers, bound
        )
        a = nn.Linear(channels, latent_dim, bias=False)
        w = nn.Linear(latent_dim, num_layers * latent_dim)
        self.A = nn.Parameter(a.weight.detach().clone())  # (d, C)
        self.W = nn.Parameter(w.weight.detach().clone())  # (L d, d), rows l*d:(l+1)*d = W_l
        self.b = nn.Parameter(w.bias.detach().clone())  # (L d,)
        self.s = nn.Parameter(torch.full((num_layers,), math.log(math.e - 1.0)))
        self.B = nn.Parameter(torch.zeros(channels, latent_dim))  # (C, d), zero: identity at init

    @staticmethod
    def _linear(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None):
        """Per-position linear map over dim 1 of a (B, K) or flattened (B, K, N) tensor.

        For maps a batched matmul is used rather than a 1x1 convolution: on CPU it is several
        times faster for these widths (measured: 100 -> 200 channels at 32x32, batch 16).
        """
        if x.dim() == 2:
            return F.linear(x, weight, bias)
        w = weight.expand(x.shape[0], -1, -1)
        if bias is None:
            return torch.bmm(w, x)
        return torch.baddbmm(bias[None, :, None], w, x)

    @property
    def vector_scale_sq(self) -> float:
        """``c**2`` where ``v_l = c u_l``: ``1 / d`` for the tanh bound, 1 without a bound."""
        return 1.0 / self.latent_dim if self.bound == "tanh" else 1.0

    def directions(self, z: torch.Tensor) -> torch.Tensor:
        """Unscaled ``u_l`` (``v_l = c u_l``) for all layers, stacked: (B, L d[, N])."""
        return _directions(z, self.W, self.b, self.bound)

    def vectors(self, z: torch.Tensor) -> torch.Tensor:
        """All ``v_l`` stacked along dim 1: (B, L d) or (B, L d, N) for flattened maps."""
        return self.directions(z) * math.sqrt(self.vector_scale_sq)

    def modulate(self, h: torch.Tensor, u_all: torch.Tensor) -> torch.Tensor:
        """``h + B M_L .. M_1 A h`` for ``h`` (B, C[, N]) given precomputed directions ``u_all``.

        ``M_l r = c^2 u_l (u_l . r) + softplus(s_l) r``: O(d) per position, no d x d matrix.
        """
        r = self._linear(h, self.A)
        scales = F.softplus(self.s)
        if torch.is_grad_enabled():
            r = _RankOneChain.apply(r, u_all, scales, self.vector_scale_sq)
        else:
            r = _rank_one_chain_(r, u_all, scales, self.vector_scale_sq)
        if h.dim() == 2:
            return torch.addmm(h, r, self.B.t())
        return torch.baddbmm(h, self.B.expand(h.shape[0], -1, -1), r)

    def forward(self, h: torch.Tensor, z: torch.Tensor) -> torch.Tensor:
        """Modulate ``h`` (B, C[, H, W]) with ``z`` (B, d[, H, W]) of the same resolution."""
        shape = h.shape
        if h.dim() == 4:
            h, z = h.flatten(2), z.flatten(2)
        return self.modulate(h, self.directions(z)).view(shape)


def _rank_one_chain_(r: torch.Tensor, u_all: torch.Tensor, scales: torch.Tensor, c2: float):
    """``r <- M_L .. M_1 r`` in place, ``M_l r = c2 u_l (u_l . r) + scales[l] r`` (no autograd)."""
    d = r.shape[1]
    for layer in range(scales.shape[0]):
        u = u_all[:, layer * d:(layer + 1) * d]
        dot = (u * r).sum(dim=1, keepdim=True).mul_(c2)
        r = r.mul_(scales[layer]).addcmul_(u, dot)
    return r


class _RankOneChain(torch.autograd.Function):
    """``M_L .. M_1 r`` with a hand-written backward (fewer full-size passes than autograd's).

    Forward per layer: ``a = c2 (u . r)``, ``r' = s r + a u``. Backward, with ``g = dL/dr'``:
    ``e = c2 (u . g)``, ``dL/du = a g + e r``, ``dL/ds = <g, r>``, ``dL/dr = s g + e u``
    (``M_l`` is symmetric).
    """

    @staticmethod
    def forward(ctx, r, u_all, scales, c2):
        d = r.shape[1]
        saved = []
        for layer in range(scales.shape[0]):
            u = u_all[:, layer * d:(layer + 1) * d]
            dot = (u * r).sum(dim=1, keepdim=True).mul_(c2)
            saved += [r, dot]
            r = torch.mul(r, scales[layer]).addcmul_(u, dot)
        ctx.save_for_backward(u_all, scales)
        ctx.intermediates = saved  # plain tensors, no graph: kept on ctx
        ctx.c2 = c2
        return r

    @staticmethod
    def backward(ctx, grad):
        u_all, scales = ctx.saved_tensors
        saved, c2 = ctx.intermediates, ctx.c2
        d = grad.shape[1]
        grad_u = torch.empty(u_all.shape, dtype=u_all.dtype, device=u_all.device)
        grad_s = torch.empty_like(scales)
        g = grad
        for layer in reversed(range(scales.shape[0])):
            r_prev, dot = saved[2 * layer], saved[2 * layer + 1]
            u = u_all[:, layer * d:(layer + 1) * d]
            e = (u * g).sum(dim=1, keepdim=True).mul_(c2)
            gu = grad_u[:, layer * d:(layer + 1) * d]
            torch.mul(g, dot, out=gu)
            gu.addcmul_(r_prev, e)
            grad_s[layer] = (g * r_prev).sum()
            g = torch.mul(g, scales[layer]).addcmul_(u, e)
        return g, grad_u, grad_s, None


def _directions(z: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor, bound: str):
    """``W z + b`` (bound "none") or ``tanh(W z + b)`` (bound "tanh") per position.

    ``tanh(x) = 2 sigmoid(2x) - 1``, computed that way because sigmoid is the faster CPU kernel
    (measured about 5x on 3M elements); the affine part is a single fused pass.
    """
    if bound == "none":
        return Hypernetwork._linear(z, weight, bias)
    pre = Hypernetwork._linear(z, 2.0 * weight, 2.0 * bias)
    minus_one = torch.full((), -1.0, dtype=pre.dtype, device=pre.device)
    if not torch.is_grad_enabled():
        return torch.add(minus_one, pre.sigmoid_(), alpha=2.0, out=pre)
    return torch.add(minus_one, torch.sigmoid(pre), alpha=2.0)


class SMDNetwork(nn.Module):
    """A backbone modulated by SMD, with the plain network call.

    ``forward(x_t, t, generator=None, *, eta=None)``: draws ``eta`` with
    ``ldm_smd.rng.randn_like(x_t, generator=generator)`` unless given, computes
    ``z = g(eta, x_t, t)``, and runs ``backbone(x_t, t, modulation=...)`` with one
    :class:`Hypernetwork` per used site. At sites coarser than the input (``every_level``),
    ``z`` is average-pooled to the site's resolution.

    Args:
        backbone: the denoiser; must expose ``in_channels``, ``model_channels``,
            ``spatial_dims`` (2 for NCHW images, 0 for vectors), ``modulation_sites``
            (site -> channels), ``modulation_site_strides`` (site -> downsampling factor) and
            accept ``modulation=`` in its forward.
        latent_dim: width ``d`` of the latent ``z`` (reference 100).
        hypernet_layers: number ``L`` of factors ``M_l`` per hypernetwork (reference 2).
        generator_width: base width of ``g``; None -> ``max(8, backbone.model_channels // 4)``.
        placement: ``"input_output"`` (the reference: after the input convolution and before the
            output convolution) or ``"every_level"`` (every site the backbone declares).
        hypernet_bound: ``"tanh"`` (bounded, default) or ``"none"`` (reference, unbounded).
    """

    def __init__(
        self,
        *,
        backbone: nn.Module,
        latent_dim: int = 100,
        hypernet_layers: int = 2,
        generator_width: int | None = None,
        placement: str = "input_output",
        hypernet_bound: str = "tanh",
    ):
        super().__init__()
        if placement not in PLACEMENTS:
            raise ValueError(f"placement={placement!r} is not one of {list(PLACEMENTS)}")
        if hypernet_bound not in HYPERNET_BOUNDS:
            raise ValueError(
                f"hypernet_bound={hypernet_bound!r} is not one of {list(HYPERNET_BOUNDS)}"
            )
        if latent_dim < 1:
            raise ValueError(f"latent_dim must be >= 1, got {latent_dim}")
        if hypernet_layers < 1:
            raise ValueError(f"hypernet_layers must be >= 1, got {hypernet_layers}")
        if generator_width is not None and generator_width < 1:
            raise ValueError(f"generator_width must be >= 1 or None, got {generator_width}")
        required = ("in_channels", "model_channels", "spatial_dims", "modulation_sites",
                    "modulation_site_strides")
        missing = [name for name in required if not hasattr(backbone, name)]
        if missing:
            raise ValueError(
                f"SMDNetwork: backbone {type(backbone).__name__} lacks {missing}; it must expose "
                f"{list(required)} and accept forward(..., modulation=...)"
            )
        if backbone.spatial_dims not in (0, 2):
            raise ValueError(f"SMDNetwork: backbone.spatial_dims must be 0 or 2, got "
                             f"{backbone.spatial_dims}")
        sites = dict(backbone.modulation_sites)
        if placement == "input_output":
            absent = [s for s in ("input", "output") if s not in sites]
            if absent:
                raise ValueError(
                    f"SMDNetwork: placement='input_output' needs sites 'input' and 'output'; "
                    f"backbone declares {list(sites)}"
                )
            sites = {s: sites[s] for s in ("input", "output")}
        self.backbone = backbone
        self.latent_dim = latent_dim
        self.placement = placement
        self.hypernet_bound = hypernet_bound
        self.in_channels = backbone.in_channels
        self.out_channels = getattr(backbone, "out_channels", backbone.in_channels)
        self.model_channels = backbone.model_channels
        self.spatial_dims = backbone.spatial_dims
        width = generator_width or max(8, backbone.model_channels // 4)
        self.generator = LatentGenerator(
            in_channels=backbone.in_channels,
            latent_dim=latent_dim,
            width=width,
            spatial=backbone.spatial_dims == 2,
        )
        self.hypernets = nn.ModuleDict(
            {
                site: Hypernetwork(channels=ch, latent_dim=latent_dim,
                                   num_layers=hypernet_layers, bound=hypernet_bound)
                for site, ch in sites.items()
            }
        )
        self.site_strides = {s: int(backbone.modulation_site_strides.get(s, 1)) for s in sites}
        self._sites_by_stride: dict[int, list[str]] = {}
        for site, stride in self.site_strides.items():
            self._sites_by_stride.setdefault(stride, []).append(site)

    def latent(self, x_t: torch.Tensor, t: torch.Tensor, generator=None, *,
               eta: torch.Tensor | None = None) -> torch.Tensor:
        """``z = g(eta, x_t, t)``, drawing ``eta`` from ``generator`` when not given."""
        if eta is None:
            eta = randn_like(x_t, generator=generator)
        elif eta.shape != x_t.shape:
            raise ValueError(f"SMDNetwork: eta shape {tuple(eta.shape)} != x_t shape "
                             f"{tuple(x_t.shape)}")
        t = t.reshape(-1)
        if t.shape[0] == 1 and x_t.shape[0] != 1:
            t = t.expand(x_t.shape[0])
        return self.generator(eta, x_t, t.to(x_t.device))

    def forward(self, x_t: torch.Tensor, t: torch.Tensor, generator=None, *,
                eta: torch.Tensor | None = None) -> torch.Tensor:
        z = self.latent(x_t, t, generator, eta=eta)
        # One matmul per resolution for the vectors of all sites there (same work as one per
        # site, fewer and larger kernels); each site then gets a slice of it.
        directions: dict[str, torch.Tensor] = {}
        for stride, sites in self._sites_by_stride.items():
            zs = z
            if z.dim() == 4:
                zs = (F.avg_pool2d(z, stride) if stride > 1 else z).flatten(2)
            hns = [self.hypernets[s] for s in sites]
            weight = torch.cat([hn.W for hn in hns]) if len(hns) > 1 else hns[0].W
            bias = torch.cat([hn.b for hn in hns]) if len(hns) > 1 else hns[0].b
            u = _directions(zs, weight, bias, self.hypernet_bound)
            width = hns[0].W.shape[0]
            for i, site in enumerate(sites):
                directions[site] = u[:, i * width:(i + 1) * width]

        def modulation(h: torch.Tensor, site: str) -> torch.Tensor:
            if site not in directions:
                return h
            u = directions[site]
            if h.dim() == 2:
                return self.hypernets[site].modulate(h, u)
            if u.shape[-1] != h.shape[-2] * h.shape[-1]:
                raise ValueError(
                    f"SMDNetwork: site {site!r} has resolution {tuple(h.shape[-2:])}, which does "
                    f"not match the input {tuple(x_t.shape[-2:])} pooled by its declared stride "
                    f"{self.site_strides[site]}"
                )
            return self.hypernets[site].modulate(h.flatten(2), u).view(h.shape)

        return self.backbone(x_t, t, generator, modulation=modulation)
