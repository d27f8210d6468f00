"""One training example followed through the first stage to the network, before any step.

A stage-2 config states the shape of its diffusion variable twice more than the data does:
``model.params.channels`` / ``image_size`` (or ``latent_shape``), and the network's own
``in_channels`` / ``out_channels`` (``dim`` for a vector network). Swapping the first stage
(``first_stage: identity`` turns 4x8x8 latents into 3x32x32 pixels) changes the first without
the others. :func:`check_shapes` compares them once the model and the data are built, so a
mismatch is a :class:`~ldm_smd.config.ConfigError` that names every key involved and the values
that fit, instead of a convolution's complaint at the first step.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from ldm_smd.errors import ConfigError

#: the network parameters that must equal the diffusion variable's channels (or size, ``dim``)
CHANNEL_KEYS = ("in_channels", "out_channels")
VECTOR_KEYS = ("dim",)


def example_shape(datamodule: Any) -> tuple[int, ...] | None:
    """The shape of one training image (or vector) of a set-up data module, ``None`` when it
    cannot be told without drawing a batch."""
    dataset = getattr(datamodule, "train_dataset", None)
    if dataset is not None and len(dataset) > 0:
        item = _untouched_rngs(dataset.__getitem__, 0)
        key = getattr(datamodule, "image_key", "image")
        image = item[key] if isinstance(item, Mapping) else item
        return tuple(int(v) for v in getattr(image, "shape", ()))
    mixture = getattr(datamodule, "mixture", None)
    if mixture is not None:
        shape = mixture.image_shape or (mixture.dim,)
        return tuple(int(v) for v in shape)
    return None


def _untouched_rngs(fn: Any, *args: Any) -> Any:
    """``fn(*args)`` with the global RNGs (torch, numpy, ``random``) put back afterwards, so
    looking at an item (a random crop or flip draws) does not change the run's draws."""
    import random

    import numpy as np
    import torch

    states = random.getstate(), np.random.get_state()
    with torch.random.fork_rng(devices=[]):
        try:
            return fn(*args)
        finally:
            random.setstate(states[0])
            np.random.set_state(states[1])


def first_stage_output(image_shape: tuple[int, ...], architecture: Mapping[str, Any] | None
                       ) -> tuple[tuple[int, ...], str]:
    """The diffusion variable's shape for images of ``image_shape`` and how it came about:
    unchanged by the identity; ``embed_dim`` channels at ``1 / 2**(len(ch_mult) - 1)`` of the
    size through a KL autoencoder of ``architecture`` (``{ddconfig, embed_dim}``)."""
    if architecture is None:
        return image_shape, "the first stage is 'identity' (pixel space)"
    ddconfig = architecture.get("ddconfig") or {}
    factor = 2 ** (len(ddconfig.get("ch_mult") or [1]) - 1)
    embed = int(architecture.get("embed_dim", ddconfig.get("z_channels", 0)))
    c, *spatial = image_shape
    shape = (embed, *(s // factor for s in spatial))
    return shape, f"the first stage makes {_fmt(shape)} latents of them (downsampling x{factor})"


def network_keys(block: Mapping[str, Any], key: str, names: tuple[str, ...]
                 ) -> dict[str, int]:
    """``{dotted key: value}`` of the parameters ``names`` in a network block and the blocks
    nested in it (an SMD network's ``backbone``)."""
    found: dict[str, int] = {}
    params = block.get("params") or {}
    for name, value in params.items():
        if name in names and isinstance(value, int):
            found[f"{key}.params.{name}"] = value
        elif isinstance(value, Mapping) and "target" in value:
            found.update(network_keys(value, f"{key}.params.{name}", names))
    return found


def _fmt(shape: tuple[int, ...]) -> str:
    return "x".join(str(v) for v in shape)


def _model_keys(params: Mapping[str, Any], shape: tuple[int, ...]) -> dict[str, Any]:
    """The overrides of the model's own shape keys that give ``shape``."""
    if params.get("latent_shape") is not None or len(shape) != 3 or shape[1] != shape[2]:
        return {"model.params.latent_shape": list(shape)}
    return {"model.params.channels": shape[0], "model.params.image_size": shape[1]}


def check_shapes(config: Mapping[str, Any], model: Any, datamodule: Any) -> None:
    """Raise :class:`ConfigError` when the data, the first stage, the model's diffusion shape
    and the network's channels do not fit together (a stage-2 model; others pass)."""
    latent_shape = getattr(model, "latent_shape", None)
    params = (config.get("model") or {}).get("params") or {}
    if latent_shape is None or not isinstance(params.get("network"), Mapping):
        return
    latent_shape = tuple(int(v) for v in latent_shape)
    architecture = (getattr(model, "hparams", {}) or {}).get("first_stage_config")
    wanted, how = latent_shape, ""
    image = example_shape(datamodule)
    if image is not None:
        takes = ((architecture or {}).get("ddconfig") or {}).get("in_channels")
        if architecture is not None and takes is not None and len(image) == 3 \
                and image[0] != int(takes):
            raise ConfigError(
                f"data: the images have {image[0]} channel(s) ({_fmt(image)}), but the first "
                f"stage {params.get('first_stage')} takes {takes}-channel images "
                "(its ddconfig.in_channels): give data of that kind, or another first stage"
            )
        wanted, how = first_stage_output(image, architecture)
        how = f"the data's images are {_fmt(image)} and {how}"
    names = CHANNEL_KEYS if len(wanted) == 3 else VECTOR_KEYS
    net = network_keys(params["network"], "model.params.network", names)
    fix = {k: wanted[0] for k in net if net[k] != wanted[0]}
    if wanted != latent_shape:
        stated = _model_keys(params, latent_shape)
        fix = {**{k: v for k, v in _model_keys(params, wanted).items() if stated.get(k) != v},
               **fix}
    if not fix:
        return
    stated = ", ".join(f"{k}={v}" for k, v in {**_model_keys(params, latent_shape), **net}.items())
    source = how or f"model.params sets a {_fmt(latent_shape)} diffusion variable"
    raise ConfigError(
        f"model: {source}, so the diffusion variable is {_fmt(wanted)}, but the config says "
        f"{stated}: set " + " ".join(f"{k}={_value(v)}" for k, v in fix.items())
    )


def _value(value: Any) -> str:
    return "[" + ", ".join(str(v) for v in value) + "]" if isinstance(value, list) else str(value)
