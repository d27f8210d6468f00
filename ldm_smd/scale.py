"""The ``scale-factor`` command: estimate ``1 / std`` of a first stage's latents on real batches.

The estimate itself is :func:`ldm_smd.latent_scale.estimate_scale_factor`; this module only finds
the batches (from a config's data block) and the first stage (from a checkpoint or folder).
"""

from __future__ import annotations

import itertools
from pathlib import Path

from ldm_smd.config import ConfigError, instantiate, load_config


def scale_factor_command(
    ckpt: str | Path, config_path: str | Path, *, batches: int = 8, write: str | Path | None = None
) -> float:
    """Estimate the scale factor; with ``write``, store it as ``model.params.scale_factor``."""
    from ldm_smd.convert import load_first_stage
    from ldm_smd.latent_scale import estimate_scale_factor, write_scale_factor

    config = load_config(config_path)
    if "data" not in config:
        raise ConfigError(f"{config_path}: needs a 'data' block to draw images from")
    autoencoder, _ = load_first_stage(str(ckpt))
    datamodule = instantiate(config["data"])
    datamodule.setup("fit")
    loader = datamodule.train_dataloader()
    images = (batch["image"] for batch in itertools.islice(loader, batches))
    value = estimate_scale_factor(autoencoder, images)
    if write is not None:
        write_scale_factor(write, value)
        print(f"[ldm-smd] wrote model.params.scale_factor={value:.6g} into {write}")
    return value
