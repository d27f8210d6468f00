"""Training objectives: vanilla / SMD paper (weighted MSE) and the SMD mixture bound.

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

import inspect
import math
from collections.abc import Callable

import torch

from ldm_smd import rng
from ldm_smd.diffusion.schedule import NoiseSchedule, check_parameterization
from ldm_smd.rng import GeneratorLike

LOSS_WEIGHTINGS = ("simple", "min_snr")
LOSS_TYPES = ("l2", "l1")
ELBO_VARIANCES = ("posterior", "beta")

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
        pred = network(x_t, t, generator=generator)
        target = schedule.target(x0, noise, t, self.parameterization)
        raw = self._errors(pred, target)
        loss = (self._weights(schedule, t, raw) * raw).mean()
        logs = {"loss": loss.detach(), "loss_simple": raw.mean().detach()}
        return loss, logs


class MixtureObjective(DenoisingObjective):
    """SMD "mixture" objective: a Monte-Carlo bound on the mixture likelihood of each step.

    For each example, ``M = num_eta_samples`` copies of the same ``x_t`` (same t, same noise)
    are evaluated in one batched call (rows ``i + m * B``; per-row generators are tiled with
    :func:`ldm_smd.rng.repeat_generators`, so the M copies draw distinct consecutive ``eta``),
    giving errors ``e_1..e_M`` (each weighted and averaged over dims as in the module doc), and

        loss_i = -tau * log( (1/M) sum_m exp(-e_m / tau) )       (computed with logsumexp),

    averaged over examples. ``tau -> inf`` gives the mean of ``e_m`` (the paper objective),
    ``tau -> 0`` gives ``min_m e_m`` (winner-take-all). With ``M = 1`` it is exactly the paper
    objective on the same draws.

    ``tau="elbo"`` (needs ``loss_type="l2"``). The step's model is
    ``p(x_{t-1} | x_t) = E_eta N(x_{t-1}; mu_m, sigma_t^2 I)`` with
    ``mu_m = c1_t x0_hat_m + c2_t x_t`` (c1, c2 the posterior-mean coefficients). Evaluating the
    density at the posterior mean ``mu~ = c1_t x0 + c2_t x_t`` of ``q(x_{t-1} | x_t, x0)``
    (for M = 1 this is exactly DDPM's KL term ``|mu~ - mu|^2 / (2 sigma^2)``; the data-independent
    constants are dropped) gives the per-step Monte-Carlo bound
    ``-log (1/M) sum_m exp(-lambda_t * S_m)``, where ``S_m`` is the squared error *summed* over
    the ``D`` dimensions in the parameterization's space, because
    ``mu~ - mu_m = c1_t (x0 - x0_hat_m)`` and
    ``x0 - x0_hat = -sqrt((1 - abar)/abar) (eps - eps_hat) = -sqrt(1 - abar) (v - v_hat)``:

        lambda_t = c1_t^2 / (2 sigma_t^2) * {x0: 1, eps: (1 - abar_t) / abar_t, v: 1 - abar_t}.

    ``sigma_t^2`` is the sampler's DDPM variance: beta tilde with its t = 0 value replaced by
    t = 1's (``elbo_variance="posterior"``, the default) or ``beta_t`` (``"beta"``). Our ``e_m``
    stays the weighted *mean* over dims, ``e_m = w_t S_m / D``, so ``tau_t = w_t / (D lambda_t)``
    makes ``e_m / tau_t = lambda_t S_m`` exactly; the loss is then the step's mixture bound in
    nats times ``tau_t``, i.e. rescaled by the same per-t factor that turns DDPM's Gaussian bound
    into the chosen loss weighting (and at M = 1 it equals the paper objective).

    Args:
        parameterization: what the network predicts: "eps", "x0" or "v".
        loss_weighting: "simple" (weight 1) or "min_snr" (Min-SNR-gamma).
        min_snr_gamma: gamma of the Min-SNR weighting.
        loss_type: "l2" (squared error) or "l1" (absolute error; not with tau="elbo").
        num_eta_samples: M, the eta samples per example (the network is called on M * B rows).
        tau: temperature, a positive number or "elbo" (derived per t, see above).
        elbo_variance: sigma_t^2 used by tau="elbo": "posterior" (beta tilde) or "beta".
    """

    def __init__(
        self,
        *,
        parameterization: str = "eps",
        loss_weighting: str = "simple",
        min_snr_gamma: float = 5.0,
        loss_type: str = "l2",
        num_eta_samples: int = 4,
        tau: float | str = "elbo",
        elbo_variance: str = "posterior",
    ) -> None:
        super().__init__(
            parameterization=parameterization,
            loss_weighting=loss_weighting,
            min_snr_gamma=min_snr_gamma,
            loss_type=loss_type,
        )
        if int(num_eta_samples) < 1:
            raise ValueError(f"num_eta_samples={num_eta_samples!r} must be at least 1")
        self.num_eta_samples = int(num_eta_samples)
        if isinstance(tau, str):
            if tau != "elbo":
                raise ValueError(f"tau={tau!r} must be a positive number or 'elbo'")
            if loss_type != "l2":
                raise ValueError(f"tau='elbo' needs loss_type='l2', got loss_type={loss_type!r}")
        elif isinstance(tau, bool) or not (isinstance(tau, int | float) and tau > 0):
            raise ValueError(f"tau={tau!r} must be a positive number or 'elbo'")
        if elbo_variance not in ELBO_VARIANCES:
            raise ValueError(
                f"elbo_variance={elbo_variance!r} is not one of {list(ELBO_VARIANCES)}"
            )
        self.tau = tau if isinstance(tau, str) else float(tau)
        self.elbo_variance = elbo_variance

    def __repr__(self) -> str:
        return (
            f"{super().__repr__()[:-1]}, num_eta_samples={self.num_eta_samples}, tau={self.tau!r})"
        )

    def elbo_lambda(self, schedule: NoiseSchedule, t: torch.Tensor) -> torch.Tensor:
        """lambda_t of the class docstring, float64 (B,) on t's device."""
        abar = schedule.gather("alphas_cumprod", t)
        c1 = schedule.gather("posterior_mean_coef1", t)
        name = "posterior_variance_clipped" if self.elbo_variance == "posterior" else "betas"
        sigma2 = schedule.gather(name, t)
        factor = {"x0": torch.ones_like(abar), "eps": (1.0 - abar) / abar, "v": 1.0 - abar}
        return c1.square() / (2.0 * sigma2) * factor[self.parameterization]

    def taus(self, schedule: NoiseSchedule, t: torch.Tensor, num_dims: int) -> torch.Tensor:
        """Per-example temperatures tau_t, float64 (B,) on t's device."""
        if self.tau != "elbo":
            return torch.full((t.shape[0],), float(self.tau), dtype=torch.float64, device=t.device)
        w = loss_weights(
            schedule,
            t,
            parameterization=self.parameterization,
            loss_weighting=self.loss_weighting,
            min_snr_gamma=self.min_snr_gamma,
        )
        return w / (num_dims * self.elbo_lambda(schedule, t))

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
        B, M = x0.shape[0], self.num_eta_samples
        reps = (M,) + (1,) * (x0.dim() - 1)
        pred = network(x_t.repeat(reps), t.repeat(M), generator=rng.repeat_generators(generator, M))
        target = schedule.target(x0, noise, t, self.parameterization)
        raw = self._errors(pred, target.repeat(reps)).reshape(M, B)
        e = self._weights(schedule, t, raw) * raw  # (M, B), weight broadcasts over m
        # float64 and centred on the mean: exact identities that keep large tau accurate
        tau = self.taus(schedule, t, x0[0].numel()).to(device=e.device)
        e64 = e.double()
        centre = e64.mean(dim=0)
        soft = torch.logsumexp(-(e64 - centre) / tau, dim=0) - math.log(M)
        loss = (centre - tau * soft).mean().to(e.dtype)
        logs = {
            "loss": loss.detach(),
            "loss_simple": raw.mean().detach(),
            "loss_paper": e.mean().detach(),
            "loss_min": e.min(dim=0).values.mean().detach(),
            "tau": tau.mean().to(e.dtype).detach(),
        }
        return loss, logs


OBJECTIVES: dict[str, type[DenoisingObjective]] = {
    "vanilla": DenoisingObjective,
    "smd_paper": DenoisingObjective,
    "smd_mixture": MixtureObjective,
}


def build_objective(name: str, **params: object) -> DenoisingObjective:
    """Build objective ``name`` ("vanilla", "smd_paper" or "smd_mixture") from keyword params."""
    if name not in OBJECTIVES:
        raise ValueError(f"objective name={name!r} is not one of {list(OBJECTIVES)}")
    cls = OBJECTIVES[name]
    valid = [p for p in inspect.signature(cls.__init__).parameters if p != "self"]
    unknown = sorted(set(params) - set(valid))
    if unknown:
        raise ValueError(f"objective {name!r}: unknown params {unknown}; valid params: {valid}")
    return cls(**params)
