"""Soft Mixture Denoising (Li, van Breugel, van der Schaar, ICLR 2024; arXiv 2309.14068).

One backward step is a continuous mixture of Gaussians: a latent ``z = g(eta, x_t, t)`` with
``eta ~ N(0, I)`` of ``x_t``'s shape selects, through a hypernetwork, a modulation of the
denoiser's features. :class:`SMDNetwork` wraps any backbone that exposes modulation sites
(:class:`~ldm_smd.nn.unet.UNetModel`, :class:`~ldm_smd.nn.mlp.MLPDenoiser`) and keeps the plain
network call ``net(x_t, t, generator=None)``, so nothing downstream knows SMD exists.

Hypernetwork at a site with features ``h`` (``C`` channels per position), ``d = latent_dim``
(the authors' ``HyperNet``, vanderschaarlab/smd ``src/smd/nn.py``, evaluated in O(d))::

    r = A h + a                               # C -> d, with bias (their in_proj)
    v_l = W_l z + w_l                         # "none"  (reference, unbounded)
    v_l = tanh(W_l z + w_l) / sqrt(d)         # "tanh"  (default; |v_l| <= 1)
    r <- M_l r = v_l (v_l . r) + softplus(s_l) r,   l = 1 .. L     # O(d), no d x d matrix
    h <- h + B r + b                          # d -> C, with bias (their out_proj)

The in-projection's bias gives the z-dependent shift ``B M(z) a`` that does not depend on ``h``.
With the tanh bound every eigenvalue of ``M_l = v_l v_l^T + softplus(s_l) I`` lies in
``(0, 1 + softplus(s_l)]``, so ``L`` layers cannot blow up however far ``z`` wanders.

Initialisation (``hypernet_init``): ``"default"`` is the authors': PyTorch's ``nn.Linear``
initialisation for ``A, a, W_l, w_l, B, b`` and ``s_l ~ N(0, 1)``. ``"zero"`` sets ``B = 0`` and
``b = 0`` on top of that, so a fresh SMD network computes exactly its backbone (for wrapping a
pretrained vanilla model). Its cost, measured: while ``B = 0`` the latent
generator and ``W`` receive exactly zero gradient and the ``M`` eta samples of a multi-sample
objective give identical errors, so training starts at the symmetric point where ``eta`` is
ignored and, on the mixture benchmark, stays there.

Placements: ``"input_output"`` (the reference: after the input layer and before the output
layer), ``"every_level"`` (every site the backbone declares), ``"output"`` (one hypernetwork
before the output layer only) and ``"none"`` (no per-position latent: the image-level latent
alone). With ``"output"`` or ``"none"`` the ``num_eta_samples`` draws of one call share a single
backbone pass, or its encoder when the image-level latent is on: only ``g``, the hypernetwork, the
decoder that sees the image-level code and the output layer run once per draw.

The image-level latent (``image_latent_dim > 0``, :mod:`ldm_smd.nn.image_latent`): a part of
``eta`` drawn once per picture, turned into one code per picture that the backbone adds to the
time embedding of its middle block and decoder, so that the whole picture follows one draw. The
authors' per-position form is ``image_latent_dim: 0`` with any placement but ``"none"``.

Draw paths of the image-level latent: ``"decoder"`` (the code shifts the backbone's middle block
and decoder, so one network both regresses and draws) or ``"deviation"`` (the backbone is left the
vanilla regression ``mu``, trained by the squared error alone, and a draw is ``mu`` plus the
output of a small head that sees the code: :mod:`ldm_smd.nn.deviation`). A network on the
deviation path returns, when asked with ``with_regression=True``, its regression beside its draws
(:attr:`SMDNetwork.trains_regression`), which is how the energy objective trains it.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from ldm_smd.errors import UsageError
from ldm_smd.nn.deviation import DeviationHead
from ldm_smd.nn.hypernet import HYPERNET_BOUNDS, HYPERNET_INITS, Hypernetwork
from ldm_smd.nn.image_latent import ImageLatentGenerator
from ldm_smd.nn.layers import (
    Downsample,
    PointwiseConv2d,
    ResBlock,
    normalization,
    timestep_embedding,
)
from ldm_smd.rng import randn, randn_like, repeat_generators, repeat_rows

PLACEMENTS = ("input_output", "every_level", "output", "none")
DRAW_PATHS = ("decoder", "deviation")
#: placements whose eta draws share the backbone's pass (or, with the image-level latent, its
#: encoder's): every modulated layer comes after it
SHARED_PASS_PLACEMENTS = ("output", "none")


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
        global_context: images only: add to every position's ``z`` a linear map of the mean of
            the half-resolution features, so each position sees all of ``eta`` (the reference
            generator's receptive field is local: about 17 pixels).
    """

    def __init__(self, *, in_channels: int, latent_dim: int = 100, width: int = 16,
                 spatial: bool = True, global_context: bool = False):
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
            self.act_out = nn.SiLU()
            self.conv_out = PointwiseConv2d(3 * width, latent_dim)
            self.global_proj = nn.Linear(2 * width, latent_dim) if global_context else None
        else:
            self.inp = nn.Linear(2 * in_channels, width)
            self.hidden = nn.Linear(width, width)
            self.out = nn.Linear(width, latent_dim)
            self.global_proj = None

    def forward(self, eta: torch.Tensor, x_t: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        """Return ``z`` of shape (B, latent_dim, H, W) or (B, latent_dim)."""
        emb = self.time_embed(timestep_embedding(t, self.width).to(x_t.dtype))
        xin = torch.cat([x_t, eta], dim=1)
        if not self.spatial:
            return self.out(F.silu(self.hidden(F.silu(self.inp(xin) + emb))))
        h0 = self.enc0(self.conv_in(xin), emb)
        h1 = self.enc1(self.down(h0), emb)
        up = F.interpolate(h1, size=h0.shape[-2:], mode="nearest")
        z = self.conv_out(self.act_out(self.norm_out(torch.cat([up, h0], dim=1))))
        if self.global_proj is None:
            return z
        return z + self.global_proj(F.silu(h1.mean(dim=(2, 3))))[:, :, None, None]


class SMDNetwork(nn.Module):
    """A backbone modulated by SMD, with the plain network call.

    ``forward(x_t, t, generator=None, *, eta=None, eta_image=None, num_eta_samples=1)``: draws
    ``eta_image`` (B, image_latent_dim) and then ``eta`` (``x_t``'s shape) with
    ``ldm_smd.rng.randn`` unless given, computes the image-level code ``c = g_image(eta_image,
    x_t, t)`` and ``z = g(eta, x_t, t)``, and runs ``backbone(x_t, t, modulation=...,
    context=c)`` with one :class:`Hypernetwork` per used site. At sites
    coarser than the input (``every_level``), ``z`` is average-pooled to the site's resolution.
    With ``num_eta_samples = M > 1`` it returns ``M * B`` rows, row ``i + m * B`` being example
    ``i`` under its ``m``-th draw of ``eta`` (per-row generators are tiled with
    :func:`ldm_smd.rng.repeat_generators`, so the ``M`` draws of a row are consecutive draws of
    its generator); with placement ``"output"`` or ``"none"`` the backbone (its encoder, with the
image-level latent) runs once for all ``M``. The class
    attribute ``draws_eta = True`` declares this (read by the multi-eta objectives and the
    config check: :func:`ldm_smd.diffusion.multi_eta.draws_eta`).

    Args:
        backbone: the denoiser; must expose ``in_channels``, ``model_channels``,
            ``spatial_dims`` (2 for NCHW images, 0 for vectors), ``modulation_sites``
            (site -> channels), ``modulation_site_strides`` (site -> downsampling factor) and
            accept ``modulation=`` in its forward, applying the ``"output"`` site right before
            its output layer (a modulation may return more rows than it was given there); for
            the image-level latent also ``context_channels`` and ``context=`` (R codes per
            example, R times the rows out: :class:`~ldm_smd.nn.unet.UNetModel`).
        latent_dim: width ``d`` of the latent ``z`` (reference 100).
        hypernet_layers: number ``L`` of factors ``M_l`` per hypernetwork (reference 2).
        generator_width: base width of ``g``; None -> ``max(8, backbone.model_channels // 4)``.
        placement: ``"input_output"`` (the reference), ``"every_level"``, ``"output"`` (one
            site before the output layer; the eta draws of a call share one backbone pass) or
            ``"none"`` (no per-position latent; needs ``image_latent_dim > 0``).
        hypernet_bound: ``"tanh"`` (bounded, default) or ``"none"`` (reference, unbounded).
        hypernet_init: ``"default"`` (the authors') or ``"zero"`` (identity at initialisation).
        generator_global_context: images: give ``g`` a global path (see :class:`LatentGenerator`).
        image_latent_dim: size of the per-picture part of ``eta`` (0: none, the authors' form).
        image_latent_width: width of the image-level generator
            (:class:`~ldm_smd.nn.image_latent.ImageLatentGenerator`); None -> the generator width.
        draw_path: how the image-level code reaches the prediction: ``"decoder"`` (it shifts the
            backbone's middle block and decoder) or ``"deviation"`` (the backbone is the vanilla
            regression and the code drives a :class:`~ldm_smd.nn.deviation.DeviationHead` whose
            output is added to it; needs placement ``"none"`` and an objective that trains the
            regression, :class:`~ldm_smd.diffusion.multi_eta.EnergyObjective`).
        deviation_width: full-resolution width of the deviation head; None -> the generator width.
    """

    draws_eta = True

    def __init__(
        self,
        *,
        backbone: nn.Module,
        latent_dim: int = 100,
        hypernet_layers: int = 2,
        generator_width: int | None = None,
        placement: str = "input_output",
        hypernet_bound: str = "tanh",
        hypernet_init: str = "default",
        generator_global_context: bool = False,
        image_latent_dim: int = 0,
        image_latent_width: int | None = None,
        draw_path: str = "decoder",
        deviation_width: int | None = None,
    ):
        super().__init__()
        if draw_path not in DRAW_PATHS:
            raise ValueError(f"draw_path={draw_path!r} is not one of {list(DRAW_PATHS)}")
        if draw_path == "deviation" and (placement != "none" or not image_latent_dim):
            raise ValueError(
                f"draw_path='deviation' draws around the backbone's regression with the "
                f"per-picture latent only: it needs placement='none' and image_latent_dim > 0, "
                f"got placement={placement!r}, image_latent_dim={image_latent_dim}"
            )
        if deviation_width is not None and deviation_width < 1:
            raise ValueError(f"deviation_width must be >= 1 or None, got {deviation_width}")
        if placement not in PLACEMENTS:
            raise ValueError(f"placement={placement!r} is not one of {list(PLACEMENTS)}")
        if hypernet_bound not in HYPERNET_BOUNDS:
            raise ValueError(
                f"hypernet_bound={hypernet_bound!r} is not one of {list(HYPERNET_BOUNDS)}"
            )
        if hypernet_init not in HYPERNET_INITS:
            raise ValueError(
                f"hypernet_init={hypernet_init!r} is not one of {list(HYPERNET_INITS)}"
            )
        if latent_dim < 1:
            raise ValueError(f"latent_dim must be >= 1, got {latent_dim}")
        if hypernet_layers < 1:
            raise ValueError(f"hypernet_layers must be >= 1, got {hypernet_layers}")
        if generator_width is not None and generator_width < 1:
            raise ValueError(f"generator_width must be >= 1 or None, got {generator_width}")
        if image_latent_dim < 0 or (image_latent_width is not None and image_latent_width < 1):
            raise ValueError(f"image_latent_dim must be >= 0 and image_latent_width >= 1 or None, "
                             f"got {image_latent_dim} and {image_latent_width}")
        if placement == "none" and not image_latent_dim:
            raise ValueError("placement='none' leaves SMD without a latent: set image_latent_dim "
                             "> 0 (the per-picture latent) or choose a placement")
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
        if image_latent_dim and not hasattr(backbone, "context_channels"):
            raise ValueError(
                f"SMDNetwork: image_latent_dim={image_latent_dim} needs a backbone that takes an "
                f"image-level code (context_channels, forward(..., context=...)); "
                f"{type(backbone).__name__} does not"
            )
        sites = dict(backbone.modulation_sites)
        if placement == "none":
            sites = {}
        elif placement != "every_level":
            wanted = ("output",) if placement == "output" else ("input", "output")
            absent = [s for s in wanted if s not in sites]
            if absent:
                raise ValueError(
                    f"SMDNetwork: placement={placement!r} needs sites {list(wanted)}; "
                    f"backbone declares {list(sites)}"
                )
            sites = {s: sites[s] for s in wanted}
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
            global_context=generator_global_context and backbone.spatial_dims == 2,
        ) if sites else None
        self.image_latent_dim = int(image_latent_dim)
        self.image_generator = ImageLatentGenerator(
            in_channels=backbone.in_channels,
            latent_dim=self.image_latent_dim,
            code_channels=backbone.context_channels,
            width=image_latent_width or width,
        ) if image_latent_dim else None
        self.draw_path = draw_path
        self.deviation = DeviationHead(
            in_channels=backbone.model_channels + 2 * backbone.in_channels,
            out_channels=self.out_channels,
            code_channels=backbone.context_channels,
            width=deviation_width or width,
        ) if draw_path == "deviation" else None
        self.hypernets = nn.ModuleDict(
            {
                site: Hypernetwork(channels=ch, latent_dim=latent_dim,
                                   num_layers=hypernet_layers, bound=hypernet_bound,
                                   init=hypernet_init)
                for site, ch in sites.items()
            }
        )
        self.site_strides = {s: int(backbone.modulation_site_strides.get(s, 1)) for s in sites}

    @property
    def trains_regression(self) -> bool:
        """Whether the network's draws centre on a regression that training must fit by the
        squared error (``draw_path="deviation"``): then ``forward(..., with_regression=True)``
        returns ``(draws, regression)``."""
        return self.deviation is not None

    def _eta(self, x_t: torch.Tensor, generator, eta: torch.Tensor | None) -> torch.Tensor:
        if eta is None:
            return randn_like(x_t, generator=generator)
        if eta.shape != x_t.shape:
            raise ValueError(f"SMDNetwork: eta shape {tuple(eta.shape)} != x_t shape "
                             f"{tuple(x_t.shape)}")
        return eta

    def _eta_image(self, rows: int, like: torch.Tensor, generator,
                   eta_image: torch.Tensor | None) -> torch.Tensor:
        shape = (rows, self.image_latent_dim)
        if eta_image is None:
            return randn(shape, generator=generator, device=like.device, dtype=like.dtype)
        if tuple(eta_image.shape) != shape:
            raise ValueError(f"SMDNetwork: eta_image shape {tuple(eta_image.shape)} != {shape}")
        return eta_image

    def latent(self, x_t: torch.Tensor, t: torch.Tensor, generator=None, *,
               eta: torch.Tensor | None = None) -> torch.Tensor:
        """The per-position ``z = g(eta, x_t, t)``, drawing ``eta`` from ``generator`` when not
        given."""
        if self.generator is None:
            raise ValueError("SMDNetwork: placement='none' has no per-position latent")
        eta = self._eta(x_t, generator, eta)
        return self.generator(eta, x_t, _per_row(t, x_t).to(x_t.device))

    def site_vectors(self, eta: torch.Tensor, x_t: torch.Tensor,
                     t: torch.Tensor) -> dict[str, torch.Tensor]:
        """Each site's vectors ``v_l`` (:meth:`Hypernetwork.vectors`) of ``z = g(eta, x_t, t)``,
        ``z`` average-pooled to the site's resolution."""
        z = self.generator(eta, x_t, t)
        out = {}
        for site, hypernet in self.hypernets.items():
            stride = self.site_strides[site]
            out[site] = hypernet.vectors(F.avg_pool2d(z, stride) if stride > 1 else z)
        return out

    def forward(self, x_t: torch.Tensor, t: torch.Tensor, generator=None, *,
                eta: torch.Tensor | None = None, eta_image: torch.Tensor | None = None,
                num_eta_samples: int = 1, with_regression: bool = False):
        M = num_eta_samples
        if with_regression and self.deviation is None:
            raise UsageError(f"SMDNetwork: with_regression=True needs draw_path='deviation', "
                             f"this network's is {self.draw_path!r}")
        t = _per_row(t, x_t)
        x_all, t_all = x_t, t
        if M > 1:  # the M copies of each row: rows i + m * B
            x_all, t_all = repeat_rows(x_t, M), repeat_rows(t, M)
            generator = repeat_generators(generator, M)
            if self.placement not in SHARED_PASS_PLACEMENTS:  # the whole backbone per draw
                x_t, t = x_all, t_all
        context = None
        if self.image_generator is not None:  # drawn first: the authors' form draws as before
            eta_image = self._eta_image(x_all.shape[0], x_t, generator, eta_image)
            if self.deviation is not None:
                return self._around_regression(x_t, t, generator, eta_image, M, with_regression)
            context = self.image_generator(eta_image, x_t, t)
        if not self.hypernets:
            return self.backbone(x_t, t, generator, context=context)
        site_v = self.site_vectors(self._eta(x_all, generator, eta), x_all, t_all)

        def modulation(h: torch.Tensor, site: str) -> torch.Tensor:
            if site not in site_v:
                return h
            v = site_v[site]  # with a shared pass, M times the rows of h (modulate tiles h)
            if v.shape[2:] != h.shape[2:]:
                raise ValueError(
                    f"SMDNetwork: site {site!r} has resolution {tuple(h.shape[2:])}, which does "
                    f"not match the input {tuple(x_t.shape[2:])} pooled by its declared stride "
                    f"{self.site_strides[site]}"
                )
            return self.hypernets[site].modulate(h, v)

        if context is None:
            return self.backbone(x_t, t, generator, modulation=modulation)
        return self.backbone(x_t, t, generator, modulation=modulation, context=context)

    def _around_regression(self, x_t, t, generator, eta_image, M, with_regression):
        """Draws ``mu + d`` (M B rows) of the deviation path, and ``mu`` if asked.

        ``d(eta) = (f(eta) - f(-eta)) / 2`` with ``f`` the head under the code of ``eta``: odd in
        ``eta``, whose law is symmetric, so the draws average to the regression exactly.
        """
        if self.training and torch.is_grad_enabled() and not with_regression:
            raise UsageError(
                "SMDNetwork: draw_path='deviation' trains its backbone, the regression, by the "
                "squared error, which the training objective must ask for (with_regression=True): "
                "use ldm_smd.diffusion.objectives.EnergyObjective"
            )
        kept = {}

        def keep_features(h: torch.Tensor, site: str) -> torch.Tensor:
            kept[site] = h
            return h

        mu = self.backbone(x_t, t, generator, modulation=keep_features)
        inputs = torch.cat([kept["output"], mu, x_t], dim=1).detach()
        code = self.image_generator(torch.cat([eta_image, -eta_image]), x_t, t)
        f = self.deviation(repeat_rows(inputs, 2 * M), code)
        draws = repeat_rows(mu.detach(), M) + 0.5 * (f[:M * mu.shape[0]] - f[M * mu.shape[0]:])
        return (draws, mu) if with_regression else draws


def _per_row(t: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    """Timesteps as a (B,) tensor for ``x`` of batch B (a single timestep is broadcast)."""
    t = t.reshape(-1)
    if t.shape[0] == 1 and x.shape[0] != 1:
        t = t.expand(x.shape[0])
    return t
