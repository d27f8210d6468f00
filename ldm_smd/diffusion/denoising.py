"""The weighted denoising loss (vanilla and SMD paper) and the pieces every objective shares.

Every objective is called as::

    loss, logs = objective(network, x0, schedule=schedule, generator=generator)

It draws ``t ~ U{0..T-1}`` (``torch.randint`` with the generator, one draw per row for a per-row
generator list), then ``noise`` with :func:`ldm_smd.rng.randn`, forms ``x_t`` and calls
``network(x_t, t, generator=generator)`` — an SMD network draws its ``eta`` from that same
generator, after ``t`` and ``noise``. ``t=`` and ``noise=`` may be passed to override the draws.
``loss`` is a scalar tensor; ``logs`` maps names to detached scalar tensors.

Per-example error: ``e = w(t) * mean_over_dims(err(pred - target))`` with ``err`` squared
(``l2``) or absolute (``l1``), ``target`` the network's parameterization (eps, x0 or v) and
``w`` = 1 (``simple``) or the Min-SNR-gamma weight (Hang et al. 2023), which makes the loss equal
``min(snr, gamma) * |x0 - x0_hat|^2`` in x0 space whatever the parameterization:
``min(snr, gamma) / snr`` for eps, ``min(snr, gamma)`` for x0, ``min(snr, gamma) / (snr + 1)``
for v.
"""

from __future__ import annotations

from collections.abc import Callable

import torch

from ldm_smd import rng
from ldm_smd.diffusion.schedule import NoiseSchedule, check_parameterization
from ldm_smd.rng import GeneratorLike

LOSS_WEIGHTINGS = ("simple", "min_snr")
LOSS_TYPES = ("l2", "l1")

Network = Callable[..., torch.Tensor]


def draw_timesteps(
    batch: int, num_timesteps: int, *, generator: GeneratorLike, device: torch.device | str
) -> torch.Tensor:
    """``t ~ U{0 .. T-1}`` of shape (B,), from one generator or one per row."""
    if generator is None or isinstance(generator, torch.Generator):
        gen_device = generator.device if generator is not None else device
        t = torch.randint(0, num_timesteps, (batch,), generator=generator, device=gen_device)
        return t.to(device)
    gens = list(generator)
    if len(gens) != batch:
        raise ValueError(f"draw_timesteps: got {len(gens)} per-row generators for {batch} rows")
    rows = [torch.randint(0, num_timesteps, (1,), generator=g, device=g.device) for g in gens]
    return torch.cat(rows).to(device)


def loss_weights(
    schedule: NoiseSchedule,
    t: torch.Tensor,
    *,
    parameterization: str,
    loss_weighting: str,
    min_snr_gamma: float,
) -> torch.Tensor:
    """Per-example loss weights, float64 (B,) on t's device (module docstring)."""
    if loss_weighting == "simple":
        return torch.ones(t.shape[0], dtype=torch.float64, device=t.device)
    snr = schedule.snr(t)
    clipped = torch.clamp(snr, max=min_snr_gamma)
    if parameterization == "eps":
        return clipped / snr
    if parameterization == "x0":
        return clipped
    return clipped / (snr + 1.0)


class DenoisingObjective:
    """Weighted denoising loss with one network call: "vanilla" and "smd_paper".

    Both names are this one computation. For a plain network it is the usual (weighted) MSE;
    for an SMD network, which draws one ``eta`` per example from the generator it is given, it
    is the paper's objective (Jensen's upper bound on the mixture's negative log-likelihood).

    Args:
        parameterization: what the network predicts: "eps", "x0" or "v".
        loss_weighting: "simple" (weight 1) or "min_snr" (Min-SNR-gamma).
        min_snr_gamma: gamma of the Min-SNR weighting.
        loss_type: "l2" (squared error) or "l1" (absolute error).
    """

    def __init__(
        self,
        *,
        parameterization: str = "eps",
        loss_weighting: str = "simple",
        min_snr_gamma: float = 5.0,
        loss_type: str = "l2",
    ) -> None:
        self.parameterization = check_parameterization(parameterization)
        if loss_weighting not in LOSS_WEIGHTINGS:
            raise ValueError(
                f"loss_weighting={loss_weighting!r} is not one of {list(LOSS_WEIGHTINGS)}"
            )
        if loss_type not in LOSS_TYPES:
            raise ValueError(f"loss_type={loss_type!r} is not one of {list(LOSS_TYPES)}")
        if not min_snr_gamma > 0:
            raise ValueError(f"min_snr_gamma={min_snr_gamma!r} must be positive")
        self.loss_weighting = loss_weighting
        self.min_snr_gamma = float(min_snr_gamma)
        self.loss_type = loss_type

    def __repr__(self) -> str:
        return (
            f"{type(self).__name__}(parameterization={self.parameterization!r}, "
            f"loss_weighting={self.loss_weighting!r}, loss_type={self.loss_type!r})"
        )

    # shared pieces ------------------------------------------------------------
    def _draw(
        self,
        x0: torch.Tensor,
        schedule: NoiseSchedule,
        generator: GeneratorLike,
        t: torch.Tensor | None,
        noise: torch.Tensor | None,
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        if t is None:
            t = draw_timesteps(
                x0.shape[0], schedule.num_timesteps, generator=generator, device=x0.device
            )
        if noise is None:
            noise = rng.randn(x0.shape, generator=generator, device=x0.device, dtype=x0.dtype)
        x_t = schedule.q_sample(x0, t, noise)
        return t, noise, x_t

    def _errors(self, pred: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        """Unweighted per-example error, mean over all non-batch dims."""
        diff = pred - target
        err = diff.square() if self.loss_type == "l2" else diff.abs()
        return err.reshape(err.shape[0], -1).mean(dim=1)

    def _weights(self, schedule: NoiseSchedule, t: torch.Tensor, like: torch.Tensor):
        w = loss_weights(
            schedule,
            t,
            parameterization=self.parameterization,
            loss_weighting=self.loss_weighting,
            min_snr_gamma=self.min_snr_gamma,
        )
        return w.to(device=like.device, dtype=like.dtype)

    def __call__(
        self,
        network: Network,
        x0: torch.Tensor,
        *,
        schedule: NoiseSchedule,
        generator: GeneratorLike,
        t: torch.Tensor | None = None,
        noise: torch.Tensor | None = None,
    ) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        t, noise, x_t = self._draw(x0, schedule, generator, t, noise)
        pred = self.predictions(network, x_t, t, generator)
        target = schedule.target(x0, noise, t, self.parameterization)
        return self.loss(pred, target, t, schedule)

    def predictions(self, network: Network, x_t: torch.Tensor, t: torch.Tensor,
                    generator: GeneratorLike) -> torch.Tensor:
        """The network's prediction at ``(x_t, t)``; an SMD network draws one ``eta`` per row."""
        return network(x_t, t, generator=generator)

    def loss(self, pred: torch.Tensor, target: torch.Tensor, t: torch.Tensor,
             schedule: NoiseSchedule) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """Scalar loss and logs from the predictions and the targets (same shape)."""
        raw = self._errors(pred, target)
        loss = (self._weights(schedule, t, raw) * raw).mean()
        logs = {"loss": loss.detach(), "loss_simple": raw.mean().detach()}
        return loss, logs
