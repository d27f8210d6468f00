"""Noise schedules of the forward process, and the conversion between eps / x0 / v.

Conventions (the project contract): ``t`` is a ``(B,)`` long tensor of 0-based training indices
``0 .. T-1``; ``x_t = sqrt(abar[t]) x0 + sqrt(1 - abar[t]) eps`` with ``abar[0] = 1 - beta[0]``
(CompVis). ``v = sqrt(abar) eps - sqrt(1 - abar) x0`` (Salimans & Ho).

Every schedule is a continuous curve ``abar(s)``, ``s`` in ``[0, 1]``, ``abar(0) = 1``, read at
``s = (i + 1) / T`` for ``i = 0 .. T-1``; ``beta_i = 1 - abar_i / abar_{i-1}``, clipped to
``(0, 0.999]``, and ``abar`` is then recomputed from the clipped betas. This makes every ``T``
from 2 upwards valid with the *same* end point ``abar_{T-1}`` (x_T close to pure noise):

- ``linear`` (CompVis): ``beta = linspace(sqrt(linear_start), sqrt(linear_end), 1000) ** 2`` is
  the reference 1000-step chain that ``linear_start`` / ``linear_end`` are defined for;
  ``log abar`` of that chain is interpolated linearly in its step index. At ``T = 1000`` the
  betas are exactly CompVis's; at ``T = 100`` the chain is CompVis's read at every 10th step
  (what improved-DDPM's respacing does). A literal ``1e-4 .. 2e-2`` linspace of length 5 would
  leave ``abar_T ~ 0.95``; improved-DDPM's ``betas * 1000 / T`` clips 3 of 5 betas to the cap
  at ``T = 5`` (wasted steps). Reading the 1000-step curve avoids both.
- ``cosine`` (Nichol & Dhariwal 2021): ``abar(s) = f(s) / f(0)``,
  ``f(s) = cos((s + cosine_s) / (1 + cosine_s) * pi / 2) ** 2``.
- ``sigmoid`` (Jabri et al. 2022, the SMD authors' choice): ``abar(s) = (sig(end / tau) -
  sig((s (end - start) + start) / tau)) / (sig(end / tau) - sig(start / tau))``.

All tables are float64 on the CPU; coefficients are gathered at ``t``, then cast to the dtype and
device of the tensor they multiply. The schedule is a plain object, not an ``nn.Module``, so that
no ``.to(dtype)`` / precision plugin can ever turn its tables into float16 or float32.
"""

from __future__ import annotations

import math

import numpy as np
import torch

SCHEDULE_KINDS = ("linear", "cosine", "sigmoid")
PARAMETERIZATIONS = ("eps", "x0", "v")
MAX_BETA = 0.999
LINEAR_REFERENCE_STEPS = 1000


def check_parameterization(parameterization: str) -> str:
    """Return ``parameterization`` if valid, else raise a ValueError naming the valid ones."""
    if parameterization not in PARAMETERIZATIONS:
        raise ValueError(
            f"parameterization={parameterization!r} is not one of {list(PARAMETERIZATIONS)}"
        )
    return parameterization


def _linear_log_abar(s: np.ndarray, start: float, end: float) -> np.ndarray:
    ref = np.linspace(math.sqrt(start), math.sqrt(end), LINEAR_REFERENCE_STEPS, dtype=np.float64)
    log_abar_ref = np.cumsum(np.log1p(-(ref**2)))
    xs = np.arange(-1, LINEAR_REFERENCE_STEPS, dtype=np.float64)
    ys = np.concatenate([[0.0], log_abar_ref])
    return np.interp(s * LINEAR_REFERENCE_STEPS - 1.0, xs, ys)


def make_betas(
    kind: str, num_timesteps: int, *, linear: tuple[float, float] = (1e-4, 2e-2),
    cosine_s: float = 8e-3, sigmoid: tuple[float, float, float] = (-3.0, 3.0, 1.0),
) -> np.ndarray:
    """float64 betas of length ``num_timesteps`` for schedule ``kind`` (see the module doc):
    ``linear = (linear_start, linear_end)``, ``sigmoid = (sigmoid_start, sigmoid_end,
    sigmoid_tau)`` as :class:`NoiseSchedule` names them."""
    (linear_start, linear_end), (sigmoid_start, sigmoid_end, sigmoid_tau) = linear, sigmoid
    if kind not in SCHEDULE_KINDS:
        raise ValueError(f"schedule kind={kind!r} is not one of {list(SCHEDULE_KINDS)}")
    T = int(num_timesteps)
    if T < 2:
        raise ValueError(f"num_timesteps={num_timesteps!r} must be at least 2")
    if kind == "linear":
        if not 0.0 < linear_start < linear_end < 1.0:
            raise ValueError(
                f"linear schedule needs 0 < linear_start < linear_end < 1, got "
                f"linear_start={linear_start}, linear_end={linear_end}"
            )
        if T == LINEAR_REFERENCE_STEPS:  # bit-exact CompVis betas
            ref = np.linspace(math.sqrt(linear_start), math.sqrt(linear_end), T, dtype=np.float64)
            return np.clip(ref**2, 0.0, MAX_BETA)
    if kind == "sigmoid" and not (sigmoid_start < sigmoid_end and sigmoid_tau > 0):
        raise ValueError(
            f"sigmoid schedule needs sigmoid_start < sigmoid_end and sigmoid_tau > 0, got "
            f"{sigmoid_start}, {sigmoid_end}, {sigmoid_tau}"
        )
    if kind == "cosine" and not cosine_s >= 0:
        raise ValueError(f"cosine schedule needs cosine_s >= 0, got {cosine_s}")
    s = np.arange(0, T + 1, dtype=np.float64) / T
    if kind == "linear":
        log_abar = _linear_log_abar(s, linear_start, linear_end)
        betas = -np.expm1(log_abar[1:] - log_abar[:-1])
    elif kind == "cosine":
        f = np.cos((s + cosine_s) / (1.0 + cosine_s) * math.pi / 2.0) ** 2
        abar = f / f[0]
        betas = 1.0 - abar[1:] / abar[:-1]
    else:

        def sig(x: np.ndarray | float) -> np.ndarray:
            return 1.0 / (1.0 + np.exp(-np.asarray(x, dtype=np.float64)))

        v_start, v_end = sig(sigmoid_start / sigmoid_tau), sig(sigmoid_end / sigmoid_tau)
        abar = v_end - sig((s * (sigmoid_end - sigmoid_start) + sigmoid_start) / sigmoid_tau)
        abar = abar / (v_end - v_start)
        betas = 1.0 - abar[1:] / abar[:-1]
    return np.clip(betas, 1e-12, MAX_BETA)


class NoiseSchedule:
    """Discrete forward process with ``T = num_timesteps`` steps.

    Args:
        kind: "linear" (CompVis sqrt-linear), "cosine" (Nichol & Dhariwal) or "sigmoid"
            (Jabri et al.); any ``T >= 2`` keeps x_T close to pure noise (module docstring).
        num_timesteps: number of training timesteps T.
        linear_start: first beta of the reference 1000-step linear chain.
        linear_end: last beta of the reference 1000-step linear chain.
        cosine_s: offset s of the cosine schedule.
        sigmoid_start: left end of the sigmoid's input range.
        sigmoid_end: right end of the sigmoid's input range.
        sigmoid_tau: temperature of the sigmoid schedule.

    Float64 CPU tables (length T): ``betas``, ``alphas``, ``alphas_cumprod``,
    ``alphas_cumprod_prev`` (1 at t = 0), ``posterior_variance`` (beta tilde; 0 at t = 0),
    ``posterior_variance_clipped`` (beta tilde with t = 0 replaced by t = 1),
    ``posterior_mean_coef1`` (on x0) and ``posterior_mean_coef2`` (on x_t).
    """

    def __init__(
        self,
        *,
        kind: str = "linear",
        num_timesteps: int = 1000,
        linear_start: float = 1e-4,
        linear_end: float = 2e-2,
        cosine_s: float = 8e-3,
        sigmoid_start: float = -3.0,
        sigmoid_end: float = 3.0,
        sigmoid_tau: float = 1.0,
    ) -> None:
        self.kind = kind
        self.num_timesteps = int(num_timesteps)
        betas = make_betas(kind, num_timesteps, linear=(linear_start, linear_end),
                           cosine_s=cosine_s, sigmoid=(sigmoid_start, sigmoid_end, sigmoid_tau))
        alphas = 1.0 - betas
        abar = np.cumprod(alphas)
        abar_prev = np.concatenate([[1.0], abar[:-1]])
        post_var = betas * (1.0 - abar_prev) / (1.0 - abar)
        post_var_clipped = np.concatenate([post_var[1:2], post_var[1:]])

        def table(a: np.ndarray) -> torch.Tensor:
            return torch.from_numpy(np.ascontiguousarray(a, dtype=np.float64))

        self.betas = table(betas)
        self.alphas = table(alphas)
        self.alphas_cumprod = table(abar)
        self.alphas_cumprod_prev = table(abar_prev)
        self.sqrt_alphas_cumprod = table(np.sqrt(abar))
        self.sqrt_one_minus_alphas_cumprod = table(np.sqrt(1.0 - abar))
        self.posterior_variance = table(post_var)
        self.posterior_variance_clipped = table(post_var_clipped)
        self.posterior_mean_coef1 = table(betas * np.sqrt(abar_prev) / (1.0 - abar))
        self.posterior_mean_coef2 = table((1.0 - abar_prev) * np.sqrt(alphas) / (1.0 - abar))
        self._device_cache: dict[tuple[str, str], torch.Tensor] = {}

    def __repr__(self) -> str:
        return f"NoiseSchedule(kind={self.kind!r}, num_timesteps={self.num_timesteps})"

    # ------------------------------------------------------------------ gathering
    def _table_on(self, name: str, device: torch.device) -> torch.Tensor:
        key = (name, str(device))
        cached = self._device_cache.get(key)
        if cached is None:
            dtype = torch.float32 if device.type == "mps" else torch.float64
            cached = getattr(self, name).to(device=device, dtype=dtype)
            self._device_cache[key] = cached
        return cached

    def gather(self, name: str, t: torch.Tensor, like: torch.Tensor | None = None) -> torch.Tensor:
        """Table ``name`` at ``t``; with ``like``, cast to its dtype/device and shaped to broadcast.

        Without ``like`` the result is float64 (B,) on ``t``'s device.
        """
        t = self._check_t(t)
        values = self._table_on(name, t.device)[t]
        if like is None:
            return values
        values = values.to(device=like.device, dtype=like.dtype)
        return values.reshape(values.shape[0], *([1] * (like.dim() - 1)))

    def _check_t(self, t: torch.Tensor) -> torch.Tensor:
        if not isinstance(t, torch.Tensor) or t.dtype not in (torch.int64, torch.int32):
            raise TypeError(f"t must be an integer tensor of timesteps, got {t!r}")
        if t.dim() != 1:
            raise ValueError(f"t must have shape (B,), got {tuple(t.shape)}")
        return t.long()

    # ------------------------------------------------------------------ forward process
    def q_sample(self, x0: torch.Tensor, t: torch.Tensor, noise: torch.Tensor) -> torch.Tensor:
        """``x_t = sqrt(abar_t) x0 + sqrt(1 - abar_t) noise``."""
        return (
            self.gather("sqrt_alphas_cumprod", t, x0) * x0
            + self.gather("sqrt_one_minus_alphas_cumprod", t, x0) * noise
        )

    def snr(self, t: torch.Tensor) -> torch.Tensor:
        """Signal-to-noise ratio ``abar_t / (1 - abar_t)``, float64 (B,) on t's device."""
        abar = self.gather("alphas_cumprod", t)
        return abar / (1.0 - abar)

    def posterior_mean_variance(
        self, x0: torch.Tensor, x_t: torch.Tensor, t: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Mean and variance (broadcastable) of ``q(x_{t-1} | x_t, x0)``; variance 0 at t = 0."""
        mean = (
            self.gather("posterior_mean_coef1", t, x_t) * x0
            + self.gather("posterior_mean_coef2", t, x_t) * x_t
        )
        return mean, self.gather("posterior_variance", t, x_t)

    # ------------------------------------------------------------------ parameterizations
    def target(
        self, x0: torch.Tensor, noise: torch.Tensor, t: torch.Tensor, parameterization: str
    ) -> torch.Tensor:
        """What a network of ``parameterization`` should output for (x0, noise, t)."""
        check_parameterization(parameterization)
        if parameterization == "eps":
            return noise
        if parameterization == "x0":
            return x0
        return (
            self.gather("sqrt_alphas_cumprod", t, x0) * noise
            - self.gather("sqrt_one_minus_alphas_cumprod", t, x0) * x0
        )

    def convert(
        self, pred: torch.Tensor, x_t: torch.Tensor, t: torch.Tensor, *, source: str, target: str
    ) -> torch.Tensor:
        """Convert a prediction at ``(x_t, t)`` from parameterization ``source`` to ``target``
        (:func:`convert_prediction` with this schedule's coefficients at ``t``)."""
        return convert_prediction(
            pred, x_t, self.gather("sqrt_alphas_cumprod", t, x_t),
            self.gather("sqrt_one_minus_alphas_cumprod", t, x_t), source=source, target=target,
        )


def x0_and_eps(
    pred: torch.Tensor,
    x_t: torch.Tensor,
    sqrt_abar: float | torch.Tensor,
    sqrt_one_minus_abar: float | torch.Tensor,
    parameterization: str,
) -> tuple[torch.Tensor, torch.Tensor]:
    """The ``(x0, eps)`` that a prediction of kind ``parameterization`` implies at ``x_t``.

    The one place where a network output becomes what the samplers and conversions need:
    ``x_t = a x0 + s eps`` with ``a = sqrt_abar``, ``s = sqrt_one_minus_abar`` (numbers, or
    tensors that broadcast against ``x_t``), and ``v = a eps - s x0``, so ``x0 = a x_t - s v``
    and ``eps = s x_t + a v``.
    """
    check_parameterization(parameterization)
    a, s = sqrt_abar, sqrt_one_minus_abar
    if parameterization == "eps":
        return (x_t - s * pred) / a, pred
    if parameterization == "x0":
        return pred, (x_t - a * pred) / s
    return a * x_t - s * pred, s * x_t + a * pred


def convert_prediction(pred: torch.Tensor, x_t: torch.Tensor, sqrt_abar: float | torch.Tensor,
                       sqrt_one_minus_abar: float | torch.Tensor, *, source: str,
                       target: str) -> torch.Tensor:
    """Convert ``pred`` from parameterization ``source`` to ``target`` (see :func:`x0_and_eps`)."""
    check_parameterization(target)
    x0, eps = x0_and_eps(pred, x_t, sqrt_abar, sqrt_one_minus_abar, source)
    if source == target:
        return pred
    if target == "x0":
        return x0
    if target == "eps":
        return eps
    return sqrt_abar * eps - sqrt_one_minus_abar * x0
