"""Training objectives, by name: ``vanilla``, ``smd_paper``, ``smd_mixture`` and ``smd_energy``.

Every objective is called as::

    loss, logs = objective(network, x0, schedule=schedule, generator=generator)

``vanilla`` and ``smd_paper`` are one computation, the weighted denoising loss
(:mod:`ldm_smd.diffusion.denoising`); the SMD objectives that draw several ``eta`` per example are
in :mod:`ldm_smd.diffusion.multi_eta`.
"""

from __future__ import annotations

import inspect

from ldm_smd.diffusion.denoising import (
    LOSS_TYPES,
    LOSS_WEIGHTINGS,
    DenoisingObjective,
    draw_timesteps,
    loss_weights,
)
from ldm_smd.diffusion.multi_eta import ELBO_VARIANCES, EnergyObjective, MixtureObjective

__all__ = [
    "ELBO_VARIANCES", "LOSS_TYPES", "LOSS_WEIGHTINGS", "OBJECTIVES", "DenoisingObjective",
    "EnergyObjective", "MixtureObjective", "build_objective", "draw_timesteps", "loss_weights",
]

OBJECTIVES: dict[str, type[DenoisingObjective]] = {
    "vanilla": DenoisingObjective,
    "smd_paper": DenoisingObjective,
    "smd_mixture": MixtureObjective,
    "smd_energy": EnergyObjective,
}


def build_objective(name: str, **params: object) -> DenoisingObjective:
    """Build objective ``name`` (a key of :data:`OBJECTIVES`) from keyword params."""
    if name not in OBJECTIVES:
        raise ValueError(f"objective name={name!r} is not one of {list(OBJECTIVES)}")
    cls = OBJECTIVES[name]
    valid = [p for p in inspect.signature(cls.__init__).parameters if p != "self"]
    unknown = sorted(set(params) - set(valid))
    if unknown:
        raise ValueError(f"objective {name!r}: unknown params {unknown}; valid params: {valid}")
    return cls(**params)
