"""Are a model's draws of ``x0`` what they should be? Their mean error and their spread, per step.

An SMD step is exact when, for every ``x_t``, the network's ``x0`` estimate under a random
``eta`` is a draw of ``q(x0 | x_t)``. On data the model did not train on, :func:`draw_calibration`
noises each example to ``x_t`` at every training timestep (one noise draw per example), calls
the denoiser ``K`` times (each call draws its own ``eta``) and reports

- ``err_mean``: the root-mean-square error of the mean of the ``K`` draws, the model as a
  regression (for a model without a latent, its only estimate);
- ``err_draw``: the root-mean-square error of one draw;
- ``spread``: the root-mean-square deviation of the draws from their mean;
- ``calibration``: ``spread / err_mean * sqrt((K + 1) / (K - 1))``. For draws distributed as
  ``q(x0 | x_t)`` the expected squares are ``spread^2 = Var (K - 1) / K`` and
  ``err_mean^2 = Var (K + 1) / K``, so it is 1; draws that are too narrow give less, a model
  without a latent 0. A mean that misses the posterior's mean raises ``err_mean`` and lowers it
  too: read it beside ``err_mean``.

Every figure is in the space the model denoises (pixels, or latents) and over all dimensions.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch

from ldm_smd.diffusion.samplers import Denoiser
from ldm_smd.diffusion.schedule import NoiseSchedule, x0_and_eps


@torch.no_grad()
def draw_calibration(
    denoiser: Denoiser,
    x0: torch.Tensor,
    *,
    schedule: NoiseSchedule,
    parameterization: str,
    generator: torch.Generator,
    num_draws: int = 8,
    timesteps: Sequence[int] | None = None,
    clip_x0: bool = False,
) -> list[dict[str, float]]:
    """One row per timestep (default: all of ``schedule``'s), as in the module docstring.

    Args:
        denoiser: ``denoiser(x_t, t, generator) -> prediction`` in ``parameterization``, as the
            samplers call it (an SMD network draws a fresh ``eta`` at every call).
        x0: held-out examples, ``(N, ...)``, in the space the model denoises.
        schedule: the model's noise schedule.
        parameterization: what the denoiser predicts: "eps", "x0" or "v".
        generator: the noise of ``x_t`` and the draws of ``eta``.
        num_draws: K >= 2, the calls per ``x_t``.
        timesteps: training indices to report (default: every one, from 0).
        clip_x0: clamp each ``x0`` estimate to ``[-1, 1]`` as the pixel-space samplers do.
    """
    if isinstance(num_draws, bool) or int(num_draws) < 2:
        raise ValueError(f"num_draws={num_draws!r} must be at least 2 (the spread needs two)")
    K = int(num_draws)
    steps = range(schedule.num_timesteps) if timesteps is None else timesteps
    rows = []
    for step in steps:
        if not 0 <= int(step) < schedule.num_timesteps:
            raise ValueError(f"timestep {step} is outside 0 .. {schedule.num_timesteps - 1}")
        t = torch.full((x0.shape[0],), int(step), dtype=torch.long, device=x0.device)
        noise = torch.randn(x0.shape, generator=generator, dtype=x0.dtype).to(x0.device)
        x_t = schedule.q_sample(x0, t, noise)
        abar = float(schedule.gather("alphas_cumprod", t)[0])
        a, s = math.sqrt(abar), math.sqrt(1.0 - abar)
        draws = []
        for _ in range(K):
            estimate, _ = x0_and_eps(denoiser(x_t, t, generator), x_t, a, s, parameterization)
            draws.append(estimate.clamp(-1.0, 1.0) if clip_x0 else estimate)
        d = torch.stack(draws).double()
        mean = d.mean(dim=0)
        err_mean = (mean - x0).square().mean().sqrt().item()
        spread = (d - mean).square().mean().sqrt().item()
        rows.append({
            "t": int(step),
            "abar": abar,
            "err_mean": err_mean,
            "err_draw": (d - x0).square().mean().sqrt().item(),
            "spread": spread,
            "calibration": spread / err_mean * math.sqrt((K + 1) / (K - 1)) if err_mean else 0.0,
        })
    return rows
