"""The component blocks of a stage-2 model and the checks its signature cannot express.

:class:`~ldm_smd.models.diffusion.LatentDiffusion` names its components one way, as
``target`` / ``params`` blocks (:data:`COMPONENTS` gives each one's default target);
:func:`check_model_params` is what the config loader runs on its ``params`` (through
``LatentDiffusion.check_config``) before any work, and what the constructor runs too.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from ldm_smd.blocks import import_target, is_spec
from ldm_smd.config import ConfigError
from ldm_smd.diffusion.multi_eta import MultiEtaObjective, draws_eta

LR_SCHEDULES = ("constant", "cosine")
#: the component blocks of the model and the target each defaults to
COMPONENTS = {
    "schedule": "ldm_smd.diffusion.schedule.NoiseSchedule",
    "objective": "ldm_smd.diffusion.objectives.DenoisingObjective",
    "sampler": "ldm_smd.diffusion.samplers.Sampler",
}


def check_model_params(params: Mapping[str, Any], *, key: str = "model") -> None:
    """What the signature cannot say, checked when a config is loaded (before any work).

    The component blocks are ``target`` / ``params`` blocks (not the old ``name:`` / bare
    keyword forms); the objective does not set the parameterization; the latent shape is
    given one way; and an objective that draws several ``eta`` per example
    (``MixtureObjective``, ``EnergyObjective``) needs an SMD network, one whose class declares
    it draws eta (:func:`~ldm_smd.diffusion.multi_eta.draws_eta`). Raises
    :class:`~ldm_smd.config.ConfigError`.
    """
    for name, default in COMPONENTS.items():
        block = params.get(name)
        if block is not None and not is_spec(block):
            raise ConfigError(
                f"{key}.params.{name}: expected a target/params block such as "
                f"{{target: {default}, params: {{...}}}}, got {block!r}"
            )
    objective = params.get("objective")
    if objective is not None and "parameterization" in (objective.get("params") or {}):
        raise ConfigError(
            f"{key}.params.objective.params.parameterization: set "
            f"{key}.params.parameterization instead (the network and its objective share it)"
        )
    given = [k for k in ("image_size", "channels") if params.get(k) is not None]
    if params.get("latent_shape") is not None:
        if given:
            raise ConfigError(
                f"{key}.params: give latent_shape or image_size and channels, not both "
                f"(got latent_shape and {', '.join(given)})"
            )
        shape = params["latent_shape"]
        if not shape or any(isinstance(v, bool) or int(v) < 1 for v in shape):
            raise ConfigError(f"{key}.params.latent_shape: {shape!r} is not a shape")
    elif len(given) != 2:
        raise ConfigError(
            f"{key}.params: missing required parameter(s): 'latent_shape' ([C, H, W] or "
            f"[D]), or both 'image_size' and 'channels'"
        )
    if params.get("lr_schedule", "constant") not in LR_SCHEDULES:
        raise ConfigError(
            f"{key}.params.lr_schedule: {params['lr_schedule']!r} is not one of "
            f"{', '.join(LR_SCHEDULES)}"
        )
    network = params.get("network")
    if objective is None or not is_spec(network):
        return
    obj_cls = import_target(objective["target"], key=f"{key}.params.objective.target")
    net_cls = import_target(network["target"], key=f"{key}.params.network.target")
    if isinstance(obj_cls, type) and issubclass(obj_cls, MultiEtaObjective):
        if not draws_eta(net_cls):
            raise ConfigError(
                f"{key}.params.objective: {objective['target']} draws several eta per "
                f"example and needs an SMD network (a latent: ldm_smd.nn.smd.SMDNetwork), "
                f"but {key}.params.network.target is {network['target']}"
            )


def component(block: Mapping[str, Any] | None, name: str) -> dict[str, Any]:
    """The block of component ``name``, or the default target without params."""
    return dict(block) if block is not None else {"target": COMPONENTS[name]}
