"""The latent scale factor: ``1 / std`` of a first stage's latents, the ``scale-factor``
command that estimates it on a config's data, and writing it into a config (with ruamel.yaml's
round trip, which keeps the file's comments and key order).

The estimate uses *sampled* latents ``z ~ q(z | x)`` (mean + std * eps), because that is what the
stage-2 model is trained on when the first stage samples its posterior (CompVis's convention;
their ``scale_factor`` is ``1 / z.flatten().std()`` of a sampled first batch). The standard
deviation is taken over every element of every batch together (not per channel), in float64.
"""

from __future__ import annotations

import io
import itertools
import math
import re
from collections.abc import Iterable
from pathlib import Path
from typing import Any

import torch
import yaml
from ruamel.yaml import YAML, YAMLError
from ruamel.yaml.representer import RoundTripRepresenter
from torch import nn

from ldm_smd.errors import UsageError
from ldm_smd.fileio import atomic_write
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


def check_stage2_config(config_path: str | Path) -> tuple[str, dict]:
    """``(text, parsed)`` of a config that can take ``model.params.scale_factor``: its model
    block is a stage-2 model (the target accepts ``scale_factor``) with a real first stage.
    Raises :class:`ConfigError` naming the file otherwise, and for a file that cannot be
    written."""
    from ldm_smd.blocks import import_target
    from ldm_smd.config import ConfigError

    path = Path(config_path)
    if not path.is_file():
        raise ConfigError(f"--write {path}: config not found")
    original = path.read_text()
    try:
        config = yaml.safe_load(original)
    except yaml.YAMLError as exc:
        raise ConfigError(f"--write {path} could not be parsed: {exc}") from exc
    try:
        _round_trip(original)  # what write_scale_factor edits: refused now, before any work
    except YAMLError as exc:
        raise ConfigError(f"--write {path} cannot be rewritten keeping its comments: "
                          f"{_problem(exc)}") from exc
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


_KEY_OPENING_A_BLOCK = re.compile(r"[^\s#-][^#]*:\s*(#.*)?")


def _indentation(text: str) -> tuple[int, int, int]:
    """``(mapping, sequence, offset)`` indentation of block-style YAML ``text``, as
    ``ruamel.yaml.YAML.indent`` takes them: how far a nested key stands in from its parent key,
    how far a block sequence's item content does, and its dash (defaults 2, 2, 0)."""
    mapping = sequence = offset = None
    parent = None  # the indentation of the line before, where that line opened a block
    for line in text.splitlines():
        body = line.strip()
        if not body or body.startswith("#"):
            continue
        indent = len(line) - len(line.lstrip(" "))
        if parent is not None and body.startswith("- ") and offset is None and indent >= parent:
            item = body[1:]
            offset = indent - parent
            sequence = offset + 1 + len(item) - len(item.lstrip(" "))
        elif parent is not None and indent > parent and mapping is None:
            mapping = indent - parent
        parent = indent if _KEY_OPENING_A_BLOCK.fullmatch(body) else None
    return mapping or 2, sequence or 2, offset or 0


def _problem(exc: YAMLError) -> str:
    """What ruamel.yaml found wrong, and on which line."""
    problem, mark = getattr(exc, "problem", None), getattr(exc, "problem_mark", None)
    if problem and mark is not None:
        return f"{problem} (line {mark.line + 1})"
    lines = str(exc).strip().splitlines()
    return lines[0] if lines else type(exc).__name__


def _round_trip(text: str) -> tuple[YAML, Any]:
    """A ruamel.yaml round-trip reader/writer set to ``text``'s indentation, and its document
    (comments, key order, flow style and quoting kept)."""
    mapping, sequence, offset = _indentation(text)
    rt = YAML(typ="rt")
    rt.indent(mapping=mapping, sequence=sequence, offset=offset)
    rt.width = 4096  # never re-wrap a long line
    rt.preserve_quotes = True
    rt.Representer = _Representer
    return rt, rt.load(text)


def _yaml11_float(representer: RoundTripRepresenter, value: float) -> Any:
    """A float as text that YAML 1.1 readers (PyYAML, OmegaConf) also read as a float: they need
    a dot in the mantissa (``1.0e-05``, not ``1e-05``)."""
    text = repr(float(value))
    mantissa, e, exponent = text.partition("e")
    if e and "." not in mantissa:
        text = f"{mantissa}.0e{exponent}"
    return representer.represent_scalar("tag:yaml.org,2002:float", text)


class _Representer(RoundTripRepresenter):
    """ruamel.yaml's round-trip representer, writing new floats with :func:`_yaml11_float` (the
    floats read from the file keep their own text); a subclass, so ruamel's own is unchanged."""


_Representer.add_representer(float, _yaml11_float)


def write_scale_factor(config_path: str | Path, value: float) -> Path:
    """Set ``model.params.scale_factor`` in the stage-2 YAML file ``config_path`` to ``value``.

    The file is rewritten by ruamel.yaml's round trip, so comments, key order, indentation and
    flow style stay as they were; a new ``scale_factor`` goes right after ``first_stage``. Before
    anything is written the result is checked to read, with PyYAML (the YAML 1.1 reader under
    :func:`ldm_smd.config.load_config`), as the old content plus the new value; it is written to
    a temporary name in the same folder, then renamed. A config that is not a stage-2 one is refused
    (:func:`check_stage2_config`), as is a value that is not a finite number above 0.
    """
    from ldm_smd.config import ConfigError

    path = Path(config_path)
    value = float(value)
    if not (math.isfinite(value) and value > 0):
        raise UsageError(f"scale factor {value!r} for {path}: must be a finite number above 0")
    original, expected = check_stage2_config(path)
    expected["model"]["params"]["scale_factor"] = value
    rt, document = _round_trip(original)
    params = document["model"]["params"]
    if "scale_factor" in params:
        params["scale_factor"] = value
    else:
        params.insert(list(params).index("first_stage") + 1, "scale_factor", value)
    stream = io.StringIO()
    rt.dump(document, stream)
    text = stream.getvalue()
    if yaml.safe_load(text) != expected:
        raise ConfigError(
            f"--write {path}: writing model.params.scale_factor back would change other values "
            "of this file (YAML that reads differently in version 1.1 and 1.2); nothing was "
            "written: put the value there by hand"
        )
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
    from ldm_smd.config import ConfigError, load_config
    from ldm_smd.convert import load_first_stage
    from ldm_smd.errors import DataError
    from ldm_smd.fileio import check_writable
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
