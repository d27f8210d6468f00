"""SMD objectives that draw several ``eta`` per example: the mixture bound and the energy score.

Both evaluate ``M = num_eta_samples`` draws of ``eta`` for each ``x_t`` in one network call,
``network(x_t, t, generator=generator, num_eta_samples=M)`` (an SMD network returns ``M * B``
rows, row ``i + m * B`` being example ``i`` under draw ``m``; with placement ``"output"`` the
draws share one backbone pass). Only a network that declares it draws eta (:func:`draws_eta`)
is asked for ``M > 1`` draws; asking another is an error that says so.

A network whose draws centre on a regression it must fit (``trains_regression``: SMD's deviation
path, :mod:`ldm_smd.nn.deviation`) is asked for that regression too; only the energy objective
trains it (by the squared error, as vanilla's network is trained).
"""

from __future__ import annotations

import math

import torch

from ldm_smd.diffusion.denoising import DenoisingObjective, Network, loss_weights
from ldm_smd.diffusion.schedule import NoiseSchedule
from ldm_smd.errors import UsageError
from ldm_smd.rng import GeneratorLike, repeat_rows

ELBO_VARIANCES = ("posterior", "beta")


def draws_eta(network: object) -> bool:
    """Whether ``network`` (a network, or its class) declares that it draws ``eta``.

    The declaration is a class attribute, ``draws_eta = True`` (:class:`ldm_smd.nn.smd.SMDNetwork`
    has it); such a network accepts ``num_eta_samples=M`` in its call and then returns ``M * B``
    rows, row ``i + m * B`` being example ``i`` under its ``m``-th draw. A network without the
    attribute draws nothing. Read by :meth:`MultiEtaObjective.predictions` and, from the class a
    config names, by the config check of the stage-2 model, so the two can never disagree.
    """
    return getattr(network, "draws_eta", False) is True


class MultiEtaObjective(DenoisingObjective):
    """Shared part of the objectives that evaluate ``M`` draws of ``eta`` per example.

    Args:
        parameterization: what the network predicts: "eps", "x0" or "v".
        loss_weighting: "simple" (weight 1) or "min_snr" (Min-SNR-gamma).
        min_snr_gamma: gamma of the Min-SNR weighting.
        loss_type: "l2" (squared error) or "l1" (absolute error).
        num_eta_samples: M, the eta draws per example.
    """

    #: whether :meth:`loss` fits a network's regression (see :meth:`predictions`)
    fits_regression = False

    def __init__(
        self,
        *,
        parameterization: str = "eps",
        loss_weighting: str = "simple",
        min_snr_gamma: float = 5.0,
        loss_type: str = "l2",
        num_eta_samples: int = 4,
    ) -> None:
        super().__init__(
            parameterization=parameterization,
            loss_weighting=loss_weighting,
            min_snr_gamma=min_snr_gamma,
            loss_type=loss_type,
        )
        if isinstance(num_eta_samples, bool) or int(num_eta_samples) < 1:
            raise ValueError(f"num_eta_samples={num_eta_samples!r} must be at least 1")
        self.num_eta_samples = int(num_eta_samples)

    def __repr__(self) -> str:
        return f"{super().__repr__()[:-1]}, num_eta_samples={self.num_eta_samples})"

    def predictions(self, network: Network, x_t: torch.Tensor, t: torch.Tensor,
                    generator: GeneratorLike) -> torch.Tensor:
        """The network's predictions under ``M`` draws of ``eta``: shape (M, B, ...); the
        :meth:`loss` of a subclass receives them with the targets (B, ...). For a network that
        ``trains_regression``, (M + 1, B, ...): the M draws, then its regression."""
        M = self.num_eta_samples
        if getattr(network, "trains_regression", False):
            if not self.fits_regression:
                raise UsageError(
                    f"{type(network).__name__} draws around a regression that its objective must "
                    f"fit by the squared error; {type(self).__name__} does not: use "
                    f"EnergyObjective"
                )
            draws, regression = network(x_t, t, generator=generator, num_eta_samples=M,
                                        with_regression=True)
            return torch.cat([draws.reshape(M, *regression.shape), regression[None]])
        if M == 1:
            return network(x_t, t, generator=generator)[None]
        if not draws_eta(network):
            raise UsageError(
                f"{type(self).__name__} draws num_eta_samples={M} values of eta per example and "
                f"needs an SMD network (ldm_smd.nn.smd.SMDNetwork); {type(network).__name__} has "
                f"no latent (it does not declare draws_eta = True)"
            )
        pred = network(x_t, t, generator=generator, num_eta_samples=M)
        if pred.shape[0] != M * x_t.shape[0]:
            raise ValueError(
                f"network returned {pred.shape[0]} rows for {x_t.shape[0]} examples x "
                f"num_eta_samples={M}"
            )
        return pred.reshape(M, *x_t.shape[:1], *pred.shape[1:])


class MixtureObjective(MultiEtaObjective):
    """SMD "mixture" objective: a Monte-Carlo bound on the mixture likelihood of each step.

    For each example, ``M = num_eta_samples`` draws of ``eta`` for the same ``x_t`` (same t,
    same noise; see :class:`MultiEtaObjective`) give errors ``e_1..e_M`` (each weighted and
    averaged over dims as in :mod:`ldm_smd.diffusion.denoising`), and

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
            num_eta_samples=num_eta_samples,
        )
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
        return f"{super().__repr__()[:-1]}, tau={self.tau!r})"

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

    def loss(self, pred: torch.Tensor, target: torch.Tensor, t: torch.Tensor,
             schedule: NoiseSchedule) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """The mixture bound from predictions (M, B, ...) and targets (B, ...)."""
        M, B = pred.shape[:2]
        raw = self._errors(pred.flatten(0, 1), repeat_rows(target, M))
        raw = raw.reshape(M, B)
        e = self._weights(schedule, t, raw) * raw  # (M, B), weight broadcasts over m
        # float64 and centred on the mean: exact identities that keep large tau accurate
        tau = self.taus(schedule, t, target[0].numel()).to(device=e.device)
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


class EnergyObjective(MultiEtaObjective):
    """SMD "energy" objective: the energy score of each step's prediction (our extension).

    SMD's step is exact when, for every ``x_t``, the prediction under a random ``eta`` is
    distributed as the target under ``q(x_0 | x_t)`` (then the DDPM update turns it into a sample
    of ``q(x_{t-1} | x_t)``). The energy score (Gneiting and Raftery 2007) is a strictly proper
    scoring rule for that distribution: with ``M`` predictions ``p_1..p_M`` of one example and its
    target ``y``,

        ES = (1/M) sum_m ||p_m - y||^beta  -  1 / (2 M (M - 1)) sum_{m != m'} ||p_m - p_m'||^beta,

    an unbiased estimate (for any ``M >= 2``) of ``E||P - y||^beta - E||P - P'||^beta / 2``, whose
    expectation over ``y`` is minimised only by the true distribution (``0 < beta < 2``). It needs
    no temperature and no kernel width, unlike the mixture bound. Norms are root-mean-square over
    the dimensions (``||d|| = sqrt(mean(d^2) + 1e-8)``), so the score has the scale of the error;
    the per-example loss is ``w(t) * ES`` with the usual weighting. Predictions are compared in the
    parameterization's space; for a fixed ``x_t`` that space is an affine image of ``x_0`` space
    with an isotropic scale, so the score stays proper, only re-weighted per ``t``.

    Args:
        parameterization: what the network predicts: "eps", "x0" or "v".
        loss_weighting: "simple" (weight 1) or "min_snr" (Min-SNR-gamma).
        min_snr_gamma: gamma of the Min-SNR weighting.
        num_eta_samples: M >= 2, the eta draws per example.
        beta: exponent of the score, in (0, 2); 1 is the usual energy score.
        mean_weight: weight of the exponent-2 energy score added to it. That score's expectation
            is ``||E p - y||^2``: it scores only the mean (the vanilla MSE's job), with the
            quadratic gradient that learns the mean fast, and leaves the score proper.
        marginal_weight: weight of the marginal energy score added to it: the same score (exponent
            ``beta``) of every coordinate (pixel, or latent element) on its own, averaged over
            the coordinates. Scored over the whole example, independent noise of size ``d`` added
            to every coordinate of every draw costs only about ``d^2 / ||error||`` (the fit and
            spread terms nearly cancel in high dimension); per coordinate it costs about ``d``
            where the target is certain (a blank background). Each coordinate's score is proper
            for its marginal, so the sum stays proper.

    With a network that ``trains_regression`` the loss also has the weighted squared error of its
    regression (vanilla's loss, on the parameters the draws do not reach).
    """

    fits_regression = True

    def __init__(
        self,
        *,
        parameterization: str = "eps",
        loss_weighting: str = "simple",
        min_snr_gamma: float = 5.0,
        num_eta_samples: int = 4,
        beta: float = 1.0,
        mean_weight: float = 0.0,
        marginal_weight: float = 0.0,
    ) -> None:
        super().__init__(
            parameterization=parameterization,
            loss_weighting=loss_weighting,
            min_snr_gamma=min_snr_gamma,
            num_eta_samples=num_eta_samples,
        )
        if self.num_eta_samples < 2:
            raise ValueError(
                f"num_eta_samples={num_eta_samples!r}: the energy score needs at least 2 draws"
            )
        if isinstance(beta, bool) or not (isinstance(beta, int | float) and 0 < beta < 2):
            raise ValueError(f"beta={beta!r} must be a number in (0, 2)")
        self.beta = float(beta)
        if isinstance(mean_weight, bool) or not (isinstance(mean_weight, int | float)
                                                 and mean_weight >= 0):
            raise ValueError(f"mean_weight={mean_weight!r} must be a number >= 0")
        self.mean_weight = float(mean_weight)
        if isinstance(marginal_weight, bool) or not (isinstance(marginal_weight, int | float)
                                                     and marginal_weight >= 0):
            raise ValueError(f"marginal_weight={marginal_weight!r} must be a number >= 0")
        self.marginal_weight = float(marginal_weight)

    def __repr__(self) -> str:
        return (f"{super().__repr__()[:-1]}, beta={self.beta!r}, "
                f"mean_weight={self.mean_weight!r}, marginal_weight={self.marginal_weight!r})")

    @staticmethod
    def _norm(diff: torch.Tensor, beta: float, marginal: bool = False) -> torch.Tensor:
        """``||d||^beta`` with the RMS norm over all dims after the first two; ``marginal``: the
        mean over those dims of each coordinate's ``|d|^beta``."""
        sq = diff.square().flatten(2)
        if not marginal:
            sq = sq.mean(dim=2, keepdim=True)
        return (sq if beta == 2 else (sq + 1e-8).pow(beta / 2)).mean(dim=2)

    def _score(self, pred: torch.Tensor, target: torch.Tensor, beta: float,
               marginal: bool = False):
        """Per-example (fit, spread) terms of the energy score with exponent ``beta``."""
        M = pred.shape[0]
        fit = self._norm(pred - target[None], beta, marginal).mean(dim=0)  # (B,)
        i, j = torch.triu_indices(M, M, offset=1, device=pred.device)
        # mean over the M(M-1)/2 pairs
        spread = self._norm(pred[i] - pred[j], beta, marginal).mean(dim=0)
        return fit, spread

    def loss(self, pred: torch.Tensor, target: torch.Tensor, t: torch.Tensor,
             schedule: NoiseSchedule) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """The energy score from predictions (M, B, ...) and targets (B, ...); predictions
        (M + 1, B, ...) end with a regression, whose squared error is added."""
        regression = None
        if pred.shape[0] == self.num_eta_samples + 1:
            pred, regression = pred[:-1], pred[-1]
        fit, spread = self._score(pred, target, self.beta)
        score = fit - 0.5 * spread
        if self.mean_weight:
            fit2, spread2 = self._score(pred, target, 2.0)
            score = score + self.mean_weight * (fit2 - 0.5 * spread2)
        if self.marginal_weight:
            fit1, spread1 = self._score(pred, target, self.beta, marginal=True)
            score = score + self.marginal_weight * (fit1 - 0.5 * spread1)
        w = self._weights(schedule, t, score)
        loss = (w * score).mean()
        logs = {
            "loss_simple": (pred - target[None]).square().mean().detach(),
            "energy_fit": (w * fit).mean().detach(),
            "energy_spread": (w * spread).mean().detach(),
        }
        if regression is not None:  # vanilla's loss, on the parameters the draws do not reach
            regression_loss = (w * self._errors(regression, target)).mean()
            loss = loss + regression_loss
            logs["loss_regression"] = regression_loss.detach()
        return loss, {"loss": loss.detach(), **logs}
