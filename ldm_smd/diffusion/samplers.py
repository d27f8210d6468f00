"""Samplers: pure functions over a denoiser, seeded, any number of steps.

A denoiser is any callable ``denoiser(x_t, t, generator) -> output`` (called positionally, so a
network ``net(x_t, t, generator=None)`` can be passed as is), where ``output`` is the model's
prediction in ``parameterization`` ("eps", "x0" or "v");
:func:`~ldm_smd.diffusion.schedule.x0_and_eps` turns it into the x0 and eps estimates that every
update uses (the one conversion of parameterisations). At every step the denoiser is called
first (an SMD network draws its fresh ``eta`` from ``generator`` then), and the sampler's own
noise is drawn after it, with :func:`ldm_smd.rng.randn` and the same generator (one generator for
the batch, or a list of per-row generators, which makes the samples independent of the batch
split).

The chain visits ``timesteps(T, steps, spacing)`` (descending training indices, always starting
at ``T - 1``) and ends at clean data: the transition out of the last visited timestep goes to
``abar = 1`` and returns the model's x0 estimate. Between visited timesteps ``t > s`` every
sampler uses the respaced process with ``abar_t``, ``abar_s`` (improved-DDPM respacing), so the
DDPM sampler with all ``T`` steps is exactly the trained ancestral chain. Coefficients are
computed in float64 (Python floats) and applied in the tensor's dtype. Samples are never
clipped; ``clip_x0=True`` clamps the x0 estimate to ``[-1, 1]`` (pixel space only).

- ``ddpm``: ancestral sampling from ``q(x_s | x_t, x0_hat)``, variance beta tilde of the
  respaced step (``beta = 1 - abar_t / abar_s``, ``var = beta (1 - abar_s) / (1 - abar_t)``).
- ``ddim`` (Song et al. 2021): ``x_s = sqrt(abar_s) x0_hat + sqrt(1 - abar_s - sigma^2) eps_hat
  + sigma z`` with ``sigma = ddim_eta * sqrt((1 - abar_s) / (1 - abar_t) * (1 - abar_t /
  abar_s))``; ``ddim_eta = 0`` is deterministic given x_T, ``ddim_eta = 1`` is DDPM.
- ``dpmpp``: DPM-Solver++(2M) (Lu et al. 2022), multistep, data prediction, in
  ``lambda = log(sqrt(abar) / sqrt(1 - abar))``: the first step is first order, the others use the
  previous x0 estimate, and the last (to clean data) returns x0_hat.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Literal

import torch
from tqdm.auto import tqdm

from ldm_smd import rng
from ldm_smd.diffusion.schedule import (
    NoiseSchedule,
    check_parameterization,
    convert_prediction,
    x0_and_eps,
)
from ldm_smd.rng import GeneratorLike

SAMPLERS = ("ddpm", "ddim", "dpmpp")
SPACINGS = ("uniform", "trailing", "quadratic")

Denoiser = Callable[[torch.Tensor, torch.Tensor, GeneratorLike], torch.Tensor]


# ---------------------------------------------------------------------------- spacing
def timesteps(num_timesteps: int, steps: int, spacing: str = "uniform") -> list[int]:
    """Training indices visited by a ``steps``-step sampler, strictly decreasing from ``T - 1``.

    - ``uniform``: ``round(linspace(0, T-1, steps))``: both ends, ``T-1`` and ``0``.
    - ``trailing`` (Lin et al. 2024): ``round(T - i T / steps) - 1``, i = 0..steps-1: from
      ``T-1`` down to ``T / steps - 1`` (the last stride ends at clean data).
    - ``quadratic`` (the DDIM paper's): ``round((T-1) u^2)``, u uniform in [0, 1]: dense at
      small t, both ends included; collisions are pushed apart to keep them distinct.

    ``steps = 1`` gives ``[T-1]`` for every spacing; ``steps = T`` gives ``T-1, ..., 0``.
    """
    T, S = int(num_timesteps), int(steps)
    if spacing not in SPACINGS:
        raise ValueError(f"spacing={spacing!r} is not one of {list(SPACINGS)}")
    if not 1 <= S <= T:
        raise ValueError(f"steps={steps!r} must be between 1 and num_timesteps={T}")
    if S == 1:
        return [T - 1]
    if spacing == "uniform":
        asc = [round(i * (T - 1) / (S - 1)) for i in range(S)]
    elif spacing == "trailing":
        asc = [round(T - i * T / S) - 1 for i in range(S)][::-1]
    else:
        asc = [round((T - 1) * (i / (S - 1)) ** 2) for i in range(S)]
    # make strictly increasing inside [0, T-1] (only quadratic ever needs it)
    for i in range(1, S):
        asc[i] = max(asc[i], asc[i - 1] + 1)
    asc[-1] = min(asc[-1], T - 1)
    for i in range(S - 2, -1, -1):
        asc[i] = min(asc[i], asc[i + 1] - 1)
    return asc[::-1]


# ---------------------------------------------------------------------------- single updates
def _noise_like(x: torch.Tensor, generator: GeneratorLike) -> torch.Tensor:
    return rng.randn(x.shape, generator=generator, device=x.device, dtype=x.dtype)


def ddpm_step(
    x: torch.Tensor, x0: torch.Tensor, abar_t: float, abar_s: float, generator: GeneratorLike
) -> torch.Tensor:
    """One ancestral step from abar_t to abar_s > abar_t (abar_s = 1: returns x0)."""
    beta = 1.0 - abar_t / abar_s
    c1 = math.sqrt(abar_s) * beta / (1.0 - abar_t)
    c2 = math.sqrt(1.0 - beta) * (1.0 - abar_s) / (1.0 - abar_t)
    var = beta * (1.0 - abar_s) / (1.0 - abar_t)
    mean = c1 * x0 + c2 * x
    if var <= 0.0:
        return mean
    return mean + math.sqrt(var) * _noise_like(x, generator)


def ddim_step(
    x: torch.Tensor,
    x0: torch.Tensor,
    eps: torch.Tensor,
    abar_t: float,
    abar_s: float,
    ddim_eta: float,
    generator: GeneratorLike,
) -> torch.Tensor:
    """One DDIM step from abar_t to abar_s with stochasticity ``ddim_eta``."""
    sigma2 = ddim_eta**2 * (1.0 - abar_s) / (1.0 - abar_t) * (1.0 - abar_t / abar_s)
    out = math.sqrt(abar_s) * x0 + math.sqrt(max(1.0 - abar_s - sigma2, 0.0)) * eps
    if sigma2 <= 0.0:
        return out
    return out + math.sqrt(sigma2) * _noise_like(x, generator)


def _lam(abar: float) -> float:
    return 0.5 * (math.log(abar) - math.log1p(-abar))


def dpmpp_2m_step(
    x: torch.Tensor,
    x0: torch.Tensor,
    abar_t: float,
    abar_s: float,
    prev: tuple[torch.Tensor, float] | None,
) -> torch.Tensor:
    """One DPM-Solver++(2M) step; ``prev`` = (previous x0 estimate, previous step's h) or None."""
    if abar_s >= 1.0:
        return x0
    h = _lam(abar_s) - _lam(abar_t)
    if prev is None:
        d = x0
    else:
        x0_prev, h_prev = prev
        k = h / (2.0 * h_prev)  # 1 / (2 r), r = h_prev / h
        d = (1.0 + k) * x0 - k * x0_prev
    ratio = math.sqrt((1.0 - abar_s) / (1.0 - abar_t))
    return ratio * x - math.sqrt(abar_s) * math.expm1(-h) * d


# ---------------------------------------------------------------------------- the loop
def sample(
    denoiser: Denoiser,
    shape: tuple[int, ...] | list[int] | torch.Size,
    *,
    schedule: NoiseSchedule,
    parameterization: str,
    sampler: str = "ddpm",
    steps: int | None = None,
    spacing: str = "uniform",
    generator: GeneratorLike = None,
    ddim_eta: float = 0.0,
    clip_x0: bool = False,
    x_T: torch.Tensor | None = None,
    progress: bool = False,
    device: torch.device | str | None = None,
    dtype: torch.dtype = torch.float32,
) -> torch.Tensor:
    """Draw samples of ``shape`` by running ``sampler`` for ``steps`` denoiser calls.

    Args:
        denoiser: ``denoiser(x_t, t, generator) -> prediction`` (t a (B,) long tensor).
        shape: shape of the batch, ``(B, ...)``.
        schedule: the training noise schedule.
        parameterization: what the denoiser predicts: "eps", "x0" or "v".
        sampler: "ddpm", "ddim" or "dpmpp" (DPM-Solver++ 2M).
        steps: number of denoiser calls, 1..T (default T).
        spacing: "uniform", "trailing" or "quadratic" (see :func:`timesteps`).
        generator: one torch.Generator, a list with one per row, or None (global RNG).
        ddim_eta: DDIM's stochasticity (0 deterministic, 1 DDPM-like); DDIM only.
        clip_x0: clamp the x0 estimate to [-1, 1] at every step (pixel space only).
        x_T: start from this noise instead of drawing it (its device and dtype are used).
        progress: show a tqdm bar.
        device: device of the samples when x_T is not given (default CPU).
        dtype: dtype of the samples when x_T is not given.
    """
    check_parameterization(parameterization)
    if sampler not in SAMPLERS:
        raise ValueError(f"sampler={sampler!r} is not one of {list(SAMPLERS)}")
    if ddim_eta < 0:
        raise ValueError(f"ddim_eta={ddim_eta!r} must be non-negative")
    T = schedule.num_timesteps
    ts = timesteps(T, T if steps is None else steps, spacing)
    abar = schedule.alphas_cumprod.tolist()
    if x_T is None:
        x = rng.randn(tuple(shape), generator=generator, device=device, dtype=dtype)
    else:
        if tuple(x_T.shape) != tuple(shape):
            raise ValueError(f"x_T has shape {tuple(x_T.shape)}, expected {tuple(shape)}")
        x = x_T
    batch = x.shape[0]
    prev: tuple[torch.Tensor, float] | None = None
    for i, t in enumerate(tqdm(ts, desc=f"{sampler} sampling", disable=not progress)):
        a_t = abar[t]
        a_s = abar[ts[i + 1]] if i + 1 < len(ts) else 1.0
        sa, s1 = math.sqrt(a_t), math.sqrt(1.0 - a_t)
        t_batch = torch.full((batch,), t, dtype=torch.long, device=x.device)
        x0, eps = x0_and_eps(denoiser(x, t_batch, generator), x, sa, s1, parameterization)
        if clip_x0:
            x0 = x0.clamp(-1.0, 1.0)
            eps = convert_prediction(x0, x, sa, s1, source="x0", target="eps")
        if sampler == "ddpm":
            x = ddpm_step(x, x0, a_t, a_s, generator)
        elif sampler == "ddim":
            x = ddim_step(x, x0, eps, a_t, a_s, ddim_eta, generator)
        else:
            x_new = dpmpp_2m_step(x, x0, a_t, a_s, prev)
            if a_s < 1.0:
                prev = (x0, _lam(a_s) - _lam(a_t))
            x = x_new
    return x


class Sampler:
    """A sampler and its options, as a model's ``sampler`` block names it; :meth:`run` draws.

    Args:
        kind: "ddpm", "ddim" or "dpmpp" (DPM-Solver++ 2M).
        steps: number of denoiser calls, 1..T; ``None`` takes all ``T`` steps of the schedule.
        spacing: "uniform", "trailing" or "quadratic" (see :func:`timesteps`).
        ddim_eta: DDIM's stochasticity (0 deterministic, 1 DDPM-like); DDIM only.
    """

    def __init__(
        self,
        *,
        kind: Literal["ddpm", "ddim", "dpmpp"] = "ddpm",
        steps: int | None = None,
        spacing: Literal["uniform", "trailing", "quadratic"] = "uniform",
        ddim_eta: float = 0.0,
    ) -> None:
        if kind not in SAMPLERS:
            raise ValueError(f"sampler kind={kind!r} is not one of {list(SAMPLERS)}")
        if spacing not in SPACINGS:
            raise ValueError(f"spacing={spacing!r} is not one of {list(SPACINGS)}")
        if steps is not None and (isinstance(steps, bool) or int(steps) < 1):
            raise ValueError(f"sampler steps={steps!r} must be a positive number or null")
        if not float(ddim_eta) >= 0:
            raise ValueError(f"ddim_eta={ddim_eta!r} must be non-negative")
        self.kind = kind
        self.steps = None if steps is None else int(steps)
        self.spacing = spacing
        self.ddim_eta = float(ddim_eta)

    def __repr__(self) -> str:
        return (f"Sampler(kind={self.kind!r}, steps={self.steps}, spacing={self.spacing!r}, "
                f"ddim_eta={self.ddim_eta})")

    def replace(self, **options: object) -> Sampler:
        """A copy with the options that are not ``None`` in ``options`` changed."""
        current = {"kind": self.kind, "steps": self.steps, "spacing": self.spacing,
                   "ddim_eta": self.ddim_eta}
        unknown = sorted(set(options) - set(current))
        if unknown:
            raise TypeError(f"Sampler.replace: unknown option(s) {unknown}; valid: "
                            f"{sorted(current)}")
        current.update({k: v for k, v in options.items() if v is not None})
        return Sampler(**current)  # type: ignore[arg-type]

    def run(self, denoiser: Denoiser, shape: tuple[int, ...] | list[int] | torch.Size, *,
            schedule: NoiseSchedule, parameterization: str, **kwargs: object) -> torch.Tensor:
        """:func:`sample` with these options; ``kwargs`` are :func:`sample`'s others
        (``generator``, ``clip_x0``, ``x_T``, ``progress``, ``device``, ``dtype``)."""
        return sample(
            denoiser, shape, schedule=schedule, parameterization=parameterization,
            sampler=self.kind, steps=self.steps, spacing=self.spacing, ddim_eta=self.ddim_eta,
            **kwargs,  # type: ignore[arg-type]
        )
