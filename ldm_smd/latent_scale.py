"""The latent scale factor: ``1 / std`` of a first stage's latents, the ``scale-factor``
command that estimates it on a config's data, and writing it into a config.

The estimate uses *sampled* latents ``z ~ q(z | x)`` (mean + std * eps), because that is what the
stage-2 model is trained on when the first stage samples its posterior (CompVis's convention;
their ``scale_factor`` is ``1 / z.flatten().std()`` of a sampled first batch). The standard
deviation is taken over every element of every batch together (not per channel), in float64.
"""

from __future__ import annotations

import itertools
import re
from collections.abc import Iterable
from pathlib import Path

import torch
import yaml
from torch import nn

from ldm_smd.checkpoints import atomic_write
from ldm_smd.rng import GeneratorLike


@torch.no_grad()
def estimate_scale_factor(
    autoencoder: nn.Module,
    batches: Iterable[torch.Tensor],
    *,
    generator: GeneratorLike = None,
    sample_posterior: bool = True,
) -> float:
    """``1 / std`` of the latents of ``batches`` (images in [-1, 1], NCHW).

    Latents are posterior samples drawn with ``generator`` (``sample_posterior=False``: the
    posterior mean). The std is pooled over all elements of all batches.
    """
    device = next(autoencoder.parameters()).device
    count, total, total_sq = 0, 0.0, 0.0
    for images in batches:
        posterior = autoencoder.encode(images.to(device))
        z = posterior.sample(generator) if sample_posterior else posterior.mode()
        z = z.double()
        count += z.numel()
        total += float(z.sum())
        total_sq += float(z.pow(2).sum())
    if count < 2:
        raise ValueError("estimate_scale_factor: no latents (the batches were empty)")
    mean = total / count
    var = (total_sq - count * mean * mean) / (count - 1)
    if not var > 0:
        raise ValueError(f"estimate_scale_factor: latent variance is {var}; cannot take 1/std")
    return float(var**-0.5)


def _edit_in_place(text: str, value: float) -> str | None:
    """``text`` with ``model.params.scale_factor`` set by editing that one line (or inserting it
    under ``params:``), keeping comments and layout; ``None`` where the layout is too unusual."""
    lines = text.splitlines(keepends=True)
    path: list[tuple[int, str]] = []  # (indent, key) of the enclosing block keys
    params_line = None
    for i, line in enumerate(lines):
        stripped = line.strip()
        if not stripped or stripped.startswith("#"):
            continue
        indent = len(line) - len(line.lstrip(" "))
        match = re.match(r"([A-Za-z_][\w-]*)\s*:(\s*(#.*)?)?$|([A-Za-z_][\w-]*)\s*:\s", stripped)
        if not match or stripped.startswith("-"):
            continue
        key = match.group(1) or match.group(4)
        while path and path[-1][0] >= indent:
            path.pop()
        keys = [k for _, k in path]
        if keys == ["model", "params"] and key == "scale_factor":
            head = line[: indent] + "scale_factor: "
            comment = re.search(r"\s+#.*$", line.rstrip("\n"))
            tail = (comment.group(0) if comment else "") + "\n"
            lines[i] = f"{head}{value!r}{tail}"
            return "".join(lines)
        if match.group(1):  # a key opening a block
            path.append((indent, key))
            if [k for _, k in path] == ["model", "params"]:
                params_line = i
    if params_line is None:
        return None
    child_indent = None
    for line in lines[params_line + 1:]:
        if line.strip() and not line.strip().startswith("#"):
            child_indent = len(line) - len(line.lstrip(" "))
            break
    parent_indent = len(lines[params_line]) - len(lines[params_line].lstrip(" "))
    if child_indent is None or child_indent <= parent_indent:
        return None
    lines.insert(params_line + 1, " " * child_indent + f"scale_factor: {value!r}\n")
    return "".join(lines)


def check_stage2_config(config_path: str | Path) -> tuple[str, dict]:
    """``(text, parsed)`` of a config that can take ``model.params.scale_factor``: its model
    block is a stage-2 model (the target accepts ``scale_factor``) with a real first stage.
    Raises :class:`ConfigError` naming the file otherwise, and for a file that cannot be
    written."""
    from ldm_smd.config import ConfigError, import_target

    path = Path(config_path)
    if not path.is_file():
        raise ConfigError(f"--write {path}: config not found")
    original = path.read_text()
    try:
        config = yaml.safe_load(original)
    except yaml.YAMLError as exc:
        raise ConfigError(f"--write {path} could not be parsed: {exc}") from exc
    model = config.get("model") if isinstance(config, dict) else None
    if not isinstance(model, dict):
        raise ConfigError(f"--write {path}: no 'model' block to put model.params.scale_factor in")
    params = model.get("params")
    if params is not None and not isinstance(params, dict):
        raise ConfigError(f"--write {path}: model.params is not a mapping ({params!r})")
    target = model.get("target")
    accepted = ()
    if isinstance(target, str):
        import inspect

        cls = import_target(target, key=f"--write {path}: model.target")
        accepted = tuple(inspect.signature(cls).parameters)
    if "scale_factor" not in accepted:
        raise ConfigError(
            f"--write {path}: model.target {target} is not a stage-2 (latent diffusion) model "
            "and takes no scale_factor; give the stage-2 config that uses this first stage"
        )
    if (params or {}).get("first_stage", "identity") == "identity":
        raise ConfigError(
            f"--write {path}: model.params.first_stage is 'identity' (pixel space), where the "
            "scale factor is not used; set model.params.first_stage to this first stage first"
        )
    return original, config


def write_scale_factor(config_path: str | Path, value: float) -> Path:
    """Set ``model.params.scale_factor`` in the stage-2 YAML file ``config_path`` to ``value``.

    The file is edited in place where its layout allows (comments and order kept), otherwise
    re-serialised; either way the result is checked to parse to the old content plus the new
    value. The new file is written to a temporary name in the same folder, then renamed.
    A config that is not a stage-2 one is refused (:func:`check_stage2_config`).
    """
    path = Path(config_path)
    original, config = check_stage2_config(path)
    model = config["model"]
    if model.get("params") is None:
        model["params"] = {}
    value = float(value)
    model["params"]["scale_factor"] = value
    text = _edit_in_place(original, value)
    if text is None or yaml.safe_load(text) != config:
        text = yaml.safe_dump(config, sort_keys=False, default_flow_style=None)
    return atomic_write(path, lambda handle: handle.write(text.encode()))


def stage2_scale_factor(ckpt: str | Path) -> float | None:
    """The ``scale_factor`` a stage-2 checkpoint was trained with, or ``None`` when ``ckpt`` is
    not a stage-2 checkpoint (a stage-1 one, a CompVis first stage, a diffusers folder)."""
    from ldm_smd.checkpoints import load_checkpoint

    path = Path(ckpt)
    if not path.is_file() or path.suffix == ".safetensors":
        return None
    data = load_checkpoint(path, mmap=True)
    hparams = data.get("hyper_parameters") if isinstance(data, dict) else None
    if not isinstance(hparams, dict) or "network" not in hparams:
        return None
    value = hparams.get("scale_factor")
    return float(value) if isinstance(value, int | float) else float("nan")


def scale_factor_command(
    ckpt: str | Path, config_path: str | Path, *, batches: int = 8, write: str | Path | None = None
) -> float:
    """``ldm-smd scale-factor``: estimate the factor of the first stage ``ckpt`` on ``batches``
    batches of the config's data; with ``write``, store it as ``model.params.scale_factor``.

    Everything is checked before the estimate: ``batches``, the ``write`` target (a stage-2
    config, writable), the data config, the checkpoint and the dataset."""
    from ldm_smd.checkpoints import check_writable
    from ldm_smd.config import ConfigError, load_config
    from ldm_smd.convert import load_first_stage
    from ldm_smd.errors import DataError, UsageError
    from ldm_smd.train import build_block, setup_data

    if batches < 1:
        raise UsageError(f"--batches {batches}: must be at least 1")
    if write is not None:
        check_stage2_config(write)
        check_writable(write, what="--write", folder=False)
    config = load_config(config_path)
    if "data" not in config:
        raise ConfigError(f"{config_path}: needs a 'data' block to draw images from")
    autoencoder, _ = load_first_stage(str(ckpt))
    if (used := stage2_scale_factor(ckpt)) is not None:
        print(f"[ldm-smd] {ckpt} is a stage-2 (diffusion) checkpoint: the estimate below is for "
              f"the first stage it holds; that model was trained with scale_factor {used:.6g}")
    datamodule = build_block("data", config["data"])
    setup_data(datamodule)
    images = (batch["image"] for batch in itertools.islice(datamodule.train_dataloader(), batches))
    try:
        value = estimate_scale_factor(autoencoder, images)
    except ValueError as exc:
        raise DataError(f"scale-factor on {config_path}: {exc}") from exc
    if write is not None:
        write_scale_factor(write, value)
        print(f"[ldm-smd] wrote model.params.scale_factor={value:.6g} into {write}")
    return value
