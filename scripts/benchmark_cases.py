"""The cases of ``scripts/benchmark.py``: each case's network, objective and fixed data.

One job: build a case. ``DenseHypernetwork`` is the reference implementation's cost model (the
d x d matrix per position), ``DiffusersDenoiser`` diffusers' UNet2DModel behind our network call;
:func:`make_state` gives everything a train or sample step needs (see ``benchmark.py``).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import nn

from ldm_smd.diffusion.objectives import build_objective
from ldm_smd.diffusion.schedule import NoiseSchedule
from ldm_smd.nn import kernels as nn_kernels
from ldm_smd.nn.smd import Hypernetwork, SMDNetwork
from ldm_smd.nn.unet import UNetModel
from ldm_smd.rng import repeat_rows

CASE_NAMES = ("vanilla", "smd_paper", "smd_paper_unbounded", "smd_energy_M4", "smd_energy_M8",
              "smd_image_M2", "smd_image_M4", "smd_deviation_M4", "smd_mixture_M4",
              "smd_reference_dxd", "diffusers_unet2d")
CHANNEL_MULT = (1, 2, 2, 2)
NUM_RES_BLOCKS = 2
ATTENTION_RESOLUTIONS = (2,)  # downsampling factor 2: 16x16 for 32x32 inputs
LATENT_DIM = 100
IMAGE_LATENT_DIM = 32   # the image configs' per-picture latent
HYPERNET_LAYERS = 2
MIXTURE_M = 4


class DenseHypernetwork(Hypernetwork):
    """The reference implementation's cost model: ``M_l`` built as a d x d matrix per position.

    Same parameters (``A``, ``a``, ``W``, ``w``, ``s``, ``B``, ``b``) and same function as
    :class:`Hypernetwork`; only the evaluation differs: every per-position linear map is an
    ``einsum``, and each ``M_l = v_l v_l^T + softplus(s_l) I`` is materialised (``einsum`` outer
    product plus identity) and applied with ``torch.bmm``: O(d^2) per position. Both entry
    points are overridden: ``forward(h, z)`` and ``modulate(h, v_all)`` (the one SMDNetwork
    calls, with the vectors ``v_l``); ``dense_calls`` counts them, so the benchmark can check
    that the dense path really ran.
    """

    dense_calls = 0

    def _scale(self) -> float:
        """``c`` in ``v_l = c u_l``: ``1 / sqrt(d)`` with the tanh bound, 1 without."""
        return 1.0 / math.sqrt(self.latent_dim) if self.bound == "tanh" else 1.0

    def _dense(self, h: torch.Tensor, v_all: torch.Tensor) -> torch.Tensor:
        """``h + B M_L .. M_1 (A h + a) + b`` for token rows ``h`` (N, C), vectors ``v_all``."""
        self.dense_calls += 1
        d = self.latent_dim
        r = (torch.einsum("dc,nc->nd", self.A, h) + self.a).unsqueeze(-1)  # (N, d, 1)
        eye = torch.eye(d, dtype=h.dtype, device=h.device)
        scales = F.softplus(self.s)
        for layer in range(self.num_layers):
            v = v_all[:, layer * d:(layer + 1) * d]
            m = torch.einsum("ni,nj->nij", v, v) + scales[layer] * eye  # (N, d, d)
            r = torch.bmm(m, r)
        return h + torch.einsum("cd,nd->nc", self.B, r.squeeze(-1)) + self.b

    def _tokens(self, x: torch.Tensor) -> torch.Tensor:
        """(B, K, H, W) maps as (B H W, K) token rows; (B, K) vectors unchanged."""
        return x if x.dim() == 2 else x.permute(0, 2, 3, 1).reshape(-1, x.shape[1])

    def forward(self, h: torch.Tensor, z: torch.Tensor) -> torch.Tensor:
        u = torch.einsum("kd,nd->nk", self.W, self._tokens(z)) + self.w
        v_all = (torch.tanh(u) if self.bound == "tanh" else u) * self._scale()
        return self._untokens(self._dense(self._tokens(h), v_all), h.shape)

    def modulate(self, h: torch.Tensor, v_all: torch.Tensor) -> torch.Tensor:
        repeats = v_all.shape[0] // h.shape[0]  # M draws for the same features (see Hypernetwork)
        if repeats > 1:
            h = repeat_rows(h, repeats)
        return self._untokens(self._dense(self._tokens(h), self._tokens(v_all)), h.shape)

    @staticmethod
    def _untokens(rows: torch.Tensor, shape: torch.Size) -> torch.Tensor:
        """Token rows back to ``shape`` (B, C[, H, W])."""
        if len(shape) == 2:
            return rows
        b, c, hh, ww = shape
        return rows.reshape(b, hh, ww, c).permute(0, 3, 1, 2)


def make_dense(net: SMDNetwork) -> SMDNetwork:
    """Swap every hypernetwork of ``net`` for a :class:`DenseHypernetwork` with the same weights."""
    for site, old in list(net.hypernets.items()):
        dense = DenseHypernetwork(channels=old.channels, latent_dim=old.latent_dim,
                                  num_layers=old.num_layers, bound=old.bound)
        dense.load_state_dict(old.state_dict())
        net.hypernets[site] = dense
    return net


class DiffusersDenoiser(nn.Module):
    """diffusers' UNet2DModel behind our network call ``net(x_t, t, generator=None)``.

    Args:
        width: base width; block_out_channels = width * (1, 2, 2, 2).
        image_size: input height and width.
    """

    def __init__(self, *, width: int = 64, image_size: int = 32):
        super().__init__()
        from diffusers import UNet2DModel  # bench-only extra, imported only for this case

        down = ["DownBlock2D"] * len(CHANNEL_MULT)
        up = ["UpBlock2D"] * len(CHANNEL_MULT)
        for i in range(len(CHANNEL_MULT)):
            if 2 ** i in ATTENTION_RESOLUTIONS:
                down[i] = "AttnDownBlock2D"
                up[len(CHANNEL_MULT) - 1 - i] = "AttnUpBlock2D"
        self.unet = UNet2DModel(
            sample_size=image_size, in_channels=3, out_channels=3,
            block_out_channels=tuple(width * m for m in CHANNEL_MULT),
            layers_per_block=NUM_RES_BLOCKS, down_block_types=tuple(down),
            up_block_types=tuple(up), attention_head_dim=None,  # None: one head, as ours
            norm_num_groups=math.gcd(32, width),
        )

    def forward(self, x_t: torch.Tensor, t: torch.Tensor, generator=None) -> torch.Tensor:
        return self.unet(x_t, t).sample


def build_network(name: str, width: int, image_size: int = 32) -> nn.Module:
    """The network of case ``name`` at base width ``width`` (seeded, default initialisation)."""
    if name not in CASE_NAMES:
        raise ValueError(f"benchmark: unknown case {name!r}; cases are {list(CASE_NAMES)}")
    torch.manual_seed(0)
    if name == "diffusers_unet2d":
        return DiffusersDenoiser(width=width, image_size=image_size)
    unet = UNetModel(in_channels=3, out_channels=3, model_channels=width,
                     channel_mult=CHANNEL_MULT, num_res_blocks=NUM_RES_BLOCKS,
                     attention_resolutions=ATTENTION_RESOLUTIONS, norm_groups=32)
    if name == "vanilla":
        return unet
    if name.startswith(("smd_image", "smd_deviation")):
        path = "deviation" if name.startswith("smd_deviation") else "decoder"
        return SMDNetwork(backbone=unet, latent_dim=LATENT_DIM, placement="none",
                          image_latent_dim=IMAGE_LATENT_DIM, draw_path=path)
    bound = "none" if name in ("smd_paper_unbounded", "smd_reference_dxd") else "tanh"
    placement = "output" if name.startswith("smd_energy") else "input_output"
    net = SMDNetwork(backbone=unet, latent_dim=LATENT_DIM, hypernet_layers=HYPERNET_LAYERS,
                     hypernet_bound=bound, placement=placement)
    return make_dense(net) if name == "smd_reference_dxd" else net


def objective_for(name: str):
    """(objective, eta samples per example) of case ``name``."""
    if name == "smd_mixture_M4":
        return build_objective("smd_mixture", num_eta_samples=MIXTURE_M), MIXTURE_M
    if name.startswith(("smd_energy_M", "smd_image_M", "smd_deviation_M")):
        m = int(name.rsplit("M", 1)[1])
        return build_objective("smd_energy", num_eta_samples=m), m
    if name in ("vanilla", "diffusers_unet2d"):
        return build_objective("vanilla"), 1
    return build_objective("smd_paper"), 1


@dataclass
class CaseState:
    """Everything one case needs to run train and sample steps, under its kernel set ``kernels``
    (a spec of :func:`ldm_smd.nn.kernels.parse`)."""

    name: str
    width: int
    kernels: str
    net: nn.Module
    objective: object
    eta_samples: int
    x0: torch.Tensor
    x_t: torch.Tensor
    t: torch.Tensor
    schedule: NoiseSchedule
    generator: torch.Generator
    optimizer: torch.optim.Optimizer
    train_ms: list[float] = field(default_factory=list)
    sample_ms: list[float] = field(default_factory=list)
    train_cpu_ms: list[float] = field(default_factory=list)
    sample_cpu_ms: list[float] = field(default_factory=list)

    @property
    def params(self) -> int:
        return sum(p.numel() for p in self.net.parameters())

    def train_step(self) -> None:
        self.net.train()
        self.optimizer.zero_grad(set_to_none=True)
        with nn_kernels.use(self.kernels):
            loss, _ = self.objective(self.net, self.x0, schedule=self.schedule,
                                     generator=self.generator)
            loss.backward()
        self.optimizer.step()

    def sample_step(self) -> None:
        self.net.eval()
        with torch.no_grad(), nn_kernels.use(self.kernels):
            self.net(self.x_t, self.t, generator=self.generator)


def make_state(name: str, width: int, *, batch: int = 16, image_size: int = 32,
               kernels: str = "all") -> CaseState:
    """Build case ``name``: network, objective, AdamW, fixed data in [-1, 1], a generator; its
    steps run under the kernel set ``kernels``."""
    net = build_network(name, width, image_size)
    objective, eta_samples = objective_for(name)
    data = torch.Generator().manual_seed(1)
    x0 = torch.rand(batch, 3, image_size, image_size, generator=data) * 2 - 1
    schedule = NoiseSchedule(kind="linear", num_timesteps=1000)
    t = torch.randint(0, 1000, (batch,), generator=data)
    x_t = schedule.q_sample(x0, t, torch.randn(x0.shape, generator=data))
    if name == "smd_reference_dxd":
        with torch.no_grad():
            net(x_t[:2], t[:2])  # GroupNorm needs more than one value per group
        if not all(m.dense_calls for m in net.hypernets.values()):
            raise RuntimeError("benchmark: SMDNetwork no longer calls Hypernetwork.forward or "
                               ".modulate, so DenseHypernetwork is bypassed; update it")
    return CaseState(name=name, width=width, kernels=kernels, net=net, objective=objective,
                     eta_samples=eta_samples, x0=x0, x_t=x_t, t=t, schedule=schedule,
                     generator=torch.Generator().manual_seed(2),
                     optimizer=torch.optim.AdamW(net.parameters(), lr=1e-4))
