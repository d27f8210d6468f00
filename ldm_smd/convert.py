"""Others' weights in our modules: first stages (CompVis, diffusers; export to diffusers) and
the SMD authors' ``HyperNet``.

:func:`load_first_stage` accepts

- our stage-1 Lightning checkpoint (``.ckpt``): the architecture comes from its saved
  hyper-parameters (``ddconfig``, ``embed_dim``);
- a CompVis first-stage ``model.ckpt``: same key layout (``encoder.``, ``decoder.``,
  ``quant_conv.``, ``post_quant_conv.``; ``loss.*`` ignored on purpose); the architecture comes
  from the explicit arguments or from a ``config.yaml`` beside it (``model.params.ddconfig`` and
  ``model.params.embed_dim``, CompVis layout). A CompVis *LDM* checkpoint works too: its
  ``first_stage_model.*`` keys are used and every other key is ignored (the same for our
  stage-2 checkpoints, whose ``first_stage_config`` hyper-parameter gives the architecture);
- a diffusers ``AutoencoderKL`` folder (``config.json`` + ``diffusion_pytorch_model.safetensors``,
  the format of Stable Diffusion's VAE).

With the autoencoder it returns the latent scale factors the first stage's files record
(:class:`RecordedScales`); which value stage 2 uses is decided in one place,
:func:`ldm_smd.models.first_stage.resolve_scale_factor`.

Loading is strict (missing or unexpected keys are an error listing them) and never runs code:
safetensors, or ``torch.load(weights_only=True)`` through :mod:`ldm_smd.checkpoints`.

:func:`hypernet_from_official` builds our :class:`~ldm_smd.nn.smd.Hypernetwork` from the state
dict of one ``HyperNet`` of the SMD authors' code (vanderschaarlab/smd, ``src/smd/nn.py``).
"""

from __future__ import annotations

import json
import re
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import yaml

from ldm_smd.checkpoints import CheckpointError, load_checkpoint
from ldm_smd.checkpoints import load_state_dict_strict as _load_strict
from ldm_smd.fileio import atomic_write
from ldm_smd.nn.autoencoder import AutoencoderKL
from ldm_smd.nn.smd import Hypernetwork

DIFFUSERS_CONFIG = "config.json"
DIFFUSERS_WEIGHTS = "diffusion_pytorch_model.safetensors"
IGNORED_PREFIXES = ("loss.",)  # the training loss (LPIPS, discriminator, logvar) of stage 1
_LDM_PREFIX = "first_stage_model."
# diffusers names for the pieces of our (CompVis) names, applied in order
_ATTN = {"norm": "group_norm", "q": "to_q", "k": "to_k", "v": "to_v", "proj_out": "to_out.0"}
_LEGACY_ATTN = {"query": "to_q", "key": "to_k", "value": "to_v", "proj_attn": "to_out.0"}


@dataclass(frozen=True)
class RecordedScales:
    """The latent scale factors a first stage's own files record (``None``: none recorded).

    Only what the files say: none of them is preferred here.

    Args:
        diffusers: ``scaling_factor`` of a diffusers folder's ``config.json``.
        stage2: the ``scale_factor`` a stage-2 checkpoint (ours, or another with the same
            hyper-parameters) used as a first stage recorded.
        config_yaml: ``model.params.scale_factor`` of the CompVis ``config.yaml`` beside a
            checkpoint (read where the architecture comes from it).
    """

    diffusers: float | None = None
    stage2: float | None = None
    config_yaml: float | None = None


def build_autoencoder(*, ddconfig: dict, embed_dim: int) -> AutoencoderKL:
    """A randomly initialised autoencoder of the given architecture."""
    return AutoencoderKL(ddconfig=dict(ddconfig), embed_dim=int(embed_dim))


def architecture_of(autoencoder: AutoencoderKL) -> dict[str, Any]:
    """``{"ddconfig": ..., "embed_dim": ...}`` as plain data (rebuilds with
    :func:`build_autoencoder`)."""
    return {"ddconfig": dict(autoencoder.ddconfig), "embed_dim": int(autoencoder.embed_dim)}


def _freeze(autoencoder: AutoencoderKL) -> AutoencoderKL:
    autoencoder.eval()
    autoencoder.requires_grad_(False)
    return autoencoder


def load_first_stage(
    path: str | Path, *, ddconfig: dict | None = None, embed_dim: int | None = None
) -> tuple[AutoencoderKL, RecordedScales]:
    """``(autoencoder in eval mode with frozen weights, the scale factors its files record)``
    from ``path`` (our ``.ckpt``, a CompVis ``model.ckpt`` or a diffusers folder; see the module
    docstring)."""
    path = Path(path)
    if path.is_dir():
        autoencoder, scaling_factor = load_diffusers(path)
        return autoencoder, RecordedScales(diffusers=scaling_factor)
    if not path.exists():
        raise CheckpointError(
            f"first stage {path} not found: expected our stage-1 .ckpt, a CompVis model.ckpt "
            f"or a diffusers AutoencoderKL folder"
        )
    ckpt = load_checkpoint(path)
    if not isinstance(ckpt, Mapping):
        raise CheckpointError(f"{path}: expected a dict checkpoint, got {type(ckpt).__name__}")
    state = ckpt.get("state_dict", ckpt)
    hparams = ckpt.get("hyper_parameters") or {}
    ignore: tuple[str, ...] = IGNORED_PREFIXES
    stage2_scale = config_scale = None
    if not any(k.startswith("encoder.") for k in state):
        # a whole latent-diffusion model (CompVis's, or our stage 2): keep its first stage only
        for prefix in (_LDM_PREFIX + "autoencoder.", _LDM_PREFIX):
            if any(k.startswith(prefix + "encoder.") for k in state):
                state = {k[len(prefix):]: v for k, v in state.items() if k.startswith(prefix)}
                break
        if isinstance(hparams, Mapping) and isinstance(hparams.get("first_stage_config"), Mapping):
            stage2_scale = hparams.get("scale_factor")
            hparams = hparams["first_stage_config"]
    if isinstance(hparams, Mapping) and "ddconfig" in hparams and "embed_dim" in hparams:
        arch = {"ddconfig": hparams["ddconfig"], "embed_dim": hparams["embed_dim"]}
    elif ddconfig is not None and embed_dim is not None:
        arch = {"ddconfig": ddconfig, "embed_dim": embed_dim}
    else:
        arch, config_scale = _compvis_config(path)
    autoencoder = build_autoencoder(**arch)
    _load_strict(autoencoder, state, ignore_prefixes=ignore, source=str(path))
    recorded = RecordedScales(
        stage2=float(stage2_scale) if stage2_scale is not None else None, config_yaml=config_scale
    )
    return _freeze(autoencoder), recorded


def _compvis_config(ckpt_path: Path) -> tuple[dict[str, Any], float | None]:
    """Architecture (and scale factor, if any) from the ``config.yaml`` beside a checkpoint."""
    config_path = ckpt_path.with_name("config.yaml")
    if not config_path.is_file():
        raise CheckpointError(
            f"{ckpt_path} records no architecture: put its CompVis config.yaml beside it "
            f"({config_path}) or pass ddconfig= and embed_dim="
        )
    with config_path.open() as handle:
        config = yaml.safe_load(handle) or {}
    params = (config.get("model") or {}).get("params") or {}
    scale = params.get("scale_factor")
    if "ddconfig" not in params and "first_stage_config" in params:  # a CompVis LDM config
        params = params["first_stage_config"].get("params") or {}
    if "ddconfig" not in params or "embed_dim" not in params:
        raise CheckpointError(
            f"{config_path}: expected model.params.ddconfig and model.params.embed_dim"
        )
    arch = {"ddconfig": params["ddconfig"], "embed_dim": params["embed_dim"]}
    return arch, float(scale) if scale is not None else None


# ---------------------------------------------------------------------------- diffusers
def _diffusers_name(key: str, num_levels: int) -> str:
    """Our (CompVis) parameter name -> the diffusers ``AutoencoderKL`` name."""
    key = re.sub(r"^encoder\.down\.(\d+)\.block\.", r"encoder.down_blocks.\1.resnets.", key)
    key = re.sub(r"^encoder\.down\.(\d+)\.downsample\.", r"encoder.down_blocks.\1.downsamplers.0.",
                 key)
    up = re.match(r"^decoder\.up\.(\d+)\.", key)
    if up:
        rest = key[up.end():].replace("block.", "resnets.", 1).replace("upsample.", "upsamplers.0.")
        key = f"decoder.up_blocks.{num_levels - 1 - int(up.group(1))}.{rest}"
    key = re.sub(r"\.mid\.block_(\d)\.", lambda m: f".mid_block.resnets.{int(m.group(1)) - 1}.",
                 key)
    attn = re.match(r"^(encoder|decoder)\.mid\.attn_1\.(\w+)\.(weight|bias)$", key)
    if attn:
        key = f"{attn.group(1)}.mid_block.attentions.0.{_ATTN[attn.group(2)]}.{attn.group(3)}"
    key = key.replace(".nin_shortcut.", ".conv_shortcut.")
    return re.sub(r"^(encoder|decoder)\.norm_out\.", r"\1.conv_norm_out.", key)


def _is_linear_attn(diffusers_key: str) -> bool:
    return ".attentions." in diffusers_key and diffusers_key.endswith("weight") and (
        ".group_norm." not in diffusers_key
    )


def _ddconfig_from_diffusers(config: Mapping[str, Any], source: Path) -> tuple[dict, int]:
    problems = []
    if any(t != "DownEncoderBlock2D" for t in config.get("down_block_types", [])):
        problems.append(f"down_block_types {config.get('down_block_types')}")
    if any(t != "UpDecoderBlock2D" for t in config.get("up_block_types", [])):
        problems.append(f"up_block_types {config.get('up_block_types')}")
    for key, want in (("act_fn", "silu"), ("norm_num_groups", 32), ("use_quant_conv", True),
                      ("use_post_quant_conv", True), ("mid_block_add_attention", True)):
        if config.get(key, want) != want:
            problems.append(f"{key}={config[key]!r} (need {want!r})")
    channels = [int(c) for c in config.get("block_out_channels", [64])]
    if any(c % channels[0] for c in channels):
        problems.append(f"block_out_channels {channels} are not multiples of the first")
    if problems:
        raise CheckpointError(
            f"{source}: this diffusers AutoencoderKL cannot be mapped onto ours: "
            + "; ".join(problems)
        )
    latent = int(config.get("latent_channels", 4))
    ddconfig = {
        "ch": channels[0], "ch_mult": [c // channels[0] for c in channels],
        "num_res_blocks": int(config.get("layers_per_block", 1)), "attn_resolutions": [],
        "z_channels": latent, "double_z": True, "resolution": int(config.get("sample_size", 32)),
        "in_channels": int(config.get("in_channels", 3)),
        "out_ch": int(config.get("out_channels", 3)), "dropout": 0.0,
    }
    return ddconfig, latent


def load_diffusers(folder: str | Path) -> tuple[AutoencoderKL, float | None]:
    """Our autoencoder from a diffusers ``AutoencoderKL`` folder, and its ``scaling_factor``."""
    folder = Path(folder)
    config_path, weights_path = folder / DIFFUSERS_CONFIG, folder / DIFFUSERS_WEIGHTS
    for needed in (config_path, weights_path):
        if not needed.is_file():
            others = sorted(p.name for p in folder.iterdir())
            raise CheckpointError(
                f"{folder}: not a diffusers AutoencoderKL folder: {needed.name} is missing "
                f"(found {others}); only safetensors weights are read (a .bin pickle is not)"
            )
    config = json.loads(config_path.read_text())
    ddconfig, embed_dim = _ddconfig_from_diffusers(config, folder)
    autoencoder = build_autoencoder(ddconfig=ddconfig, embed_dim=embed_dim)
    state = load_checkpoint(weights_path)
    for legacy, new in _LEGACY_ATTN.items():  # attention names of diffusers < 0.14
        state = {k.replace(f".attentions.0.{legacy}.", f".attentions.0.{new}."): v
                 for k, v in state.items()}
    levels = len(ddconfig["ch_mult"])
    names = {ours: _diffusers_name(ours, levels) for ours in autoencoder.state_dict()}
    missing = sorted(set(names.values()) - set(state))
    unexpected = sorted(set(state) - set(names.values()))
    if missing or unexpected:
        raise CheckpointError(
            f"{weights_path} does not match the architecture in {config_path}: "
            f"missing keys {missing}; unexpected keys {unexpected}"
        )
    own = autoencoder.state_dict()
    mapped = {
        ours: state[theirs].reshape(own[ours].shape) if _is_linear_attn(theirs) else state[theirs]
        for ours, theirs in names.items()
    }
    _load_strict(autoencoder, mapped, source=str(weights_path))
    scale = config.get("scaling_factor")
    return _freeze(autoencoder), float(scale) if scale is not None else None


def export_diffusers(
    autoencoder: AutoencoderKL, folder: str | Path, scaling_factor: float | None = None
) -> Path:
    """Write ``autoencoder`` as a diffusers ``AutoencoderKL`` folder (each file atomically)."""
    from safetensors.torch import save as save_safetensors

    cfg = autoencoder.ddconfig
    if cfg["attn_resolutions"]:
        raise ValueError(
            f"diffusers' AutoencoderKL has attention only in the middle block; this autoencoder "
            f"also has it at resolutions {cfg['attn_resolutions']} (ddconfig.attn_resolutions)"
        )
    if any((cfg["ch"] * m) % 32 for m in cfg["ch_mult"]):
        raise ValueError(
            f"diffusers' AutoencoderKL uses 32 GroupNorm groups: every width ch * ch_mult must be "
            f"a multiple of 32, got ch={cfg['ch']}, ch_mult={cfg['ch_mult']}"
        )
    if cfg["z_channels"] != autoencoder.embed_dim:
        raise ValueError(
            f"diffusers' AutoencoderKL needs z_channels == embed_dim; got "
            f"{cfg['z_channels']} and {autoencoder.embed_dim}"
        )
    levels = len(cfg["ch_mult"])
    tensors = {}
    for key, value in autoencoder.state_dict().items():
        name = _diffusers_name(key, levels)
        if _is_linear_attn(name):
            value = value.reshape(value.shape[0], value.shape[1])
        tensors[name] = value.detach().cpu().contiguous()
    config: dict[str, Any] = {
        "_class_name": "AutoencoderKL", "_diffusers_version": "0.30.0",
        "in_channels": cfg["in_channels"], "out_channels": cfg["out_ch"],
        "down_block_types": ["DownEncoderBlock2D"] * levels,
        "up_block_types": ["UpDecoderBlock2D"] * levels,
        "block_out_channels": [cfg["ch"] * m for m in cfg["ch_mult"]],
        "layers_per_block": cfg["num_res_blocks"], "act_fn": "silu",
        "latent_channels": autoencoder.embed_dim, "norm_num_groups": 32,
        "sample_size": cfg["resolution"], "force_upcast": True,
    }
    if scaling_factor is not None:
        config["scaling_factor"] = float(scaling_factor)
    folder = Path(folder)
    payload = save_safetensors(tensors)
    atomic_write(folder / DIFFUSERS_WEIGHTS, lambda handle: handle.write(payload))
    text = json.dumps(config, indent=2).encode()
    atomic_write(folder / DIFFUSERS_CONFIG, lambda handle: handle.write(text))
    return folder


_OFFICIAL_HYPERNET = re.compile(r"param_projs\.(\d+)\.(weight|bias)")


def hypernet_from_official(state_dict: Mapping[str, Any], *, bound: str = "none") -> Hypernetwork:
    """Our :class:`Hypernetwork` holding the weights of the authors' ``HyperNet``.

    Their keys: ``in_proj.{weight,bias}`` (``A``, ``a``), ``param_projs.{l}.{weight,bias}``
    (``W_l``, ``w_l``), ``scales`` (``s``), ``out_proj.{weight,bias}`` (``B``, ``b``) and the
    constant identity ``eye`` (optional; checked when present). With ``bound="none"`` (their form)
    ``module(h, z) - h`` equals their ``HyperNet.forward(h, get_weights(z))`` for features ``h``
    (B, C, H, W) and latent ``z`` (B, d, H, W). A missing or unexpected key, or shapes that
    disagree, is a :class:`~ldm_smd.checkpoints.CheckpointError` naming the keys.
    """
    sd = {str(k): v for k, v in state_dict.items()}
    layers = sorted({int(m.group(1)) for k in sd if (m := _OFFICIAL_HYPERNET.fullmatch(k))})
    expected = {"in_proj.weight", "in_proj.bias", "out_proj.weight", "out_proj.bias", "scales"}
    expected |= {f"param_projs.{i}.{n}" for i in range(max(layers, default=-1) + 1)
                 for n in ("weight", "bias")}
    missing = sorted(expected - set(sd))
    unexpected = sorted(set(sd) - expected - {"eye"})
    if missing or unexpected or not layers:
        raise CheckpointError(
            "not an SMD HyperNet state dict: missing keys "
            f"{missing or ([] if layers else ['param_projs.0.weight'])}"
            f", unexpected keys {unexpected}"
        )
    d, channels = tuple(sd["in_proj.weight"].shape)
    shapes = {"in_proj.weight": (d, channels), "in_proj.bias": (d,),
              "out_proj.weight": (channels, d), "out_proj.bias": (channels,),
              "scales": (len(layers),)}
    shapes |= {f"param_projs.{i}.weight": (d, d) for i in layers}
    shapes |= {f"param_projs.{i}.bias": (d,) for i in layers}
    if "eye" in sd:
        shapes["eye"] = (d, d)
    wrong = {k: tuple(sd[k].shape) for k, shape in shapes.items() if tuple(sd[k].shape) != shape}
    if wrong:
        raise CheckpointError(
            f"SMD HyperNet state dict with in_proj.weight of shape {(d, channels)} "
            f"(latent_dim={d}, channels={channels}, {len(layers)} layers): keys with other "
            f"shapes than {', '.join(f'{k} {shapes[k]}' for k in wrong)}: "
            f"{', '.join(f'{k} {v}' for k, v in wrong.items())}"
        )
    if "eye" in sd and not torch.equal(sd["eye"].float(), torch.eye(d)):
        raise CheckpointError("SMD HyperNet state dict: 'eye' is not the identity matrix")
    module = Hypernetwork(channels=channels, latent_dim=d, num_layers=len(layers), bound=bound)
    ours = {
        "A": sd["in_proj.weight"], "a": sd["in_proj.bias"],
        "W": torch.cat([sd[f"param_projs.{i}.weight"] for i in layers]),
        "w": torch.cat([sd[f"param_projs.{i}.bias"] for i in layers]),
        "s": sd["scales"], "B": sd["out_proj.weight"], "b": sd["out_proj.bias"],
    }
    module.load_state_dict({k: v.detach().to(torch.float32) for k, v in ours.items()},
                           strict=True)
    return module

