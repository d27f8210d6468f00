"""Loading weights safely.

- Loading never runs code: ``.safetensors`` files are read with safetensors, everything else with
  ``torch.load(weights_only=True)``; a pickle that asks for anything but tensors and plain data is
  refused with an error that says so.
- State dicts load strictly: missing or unexpected keys are an error that lists them, unless a key
  starts with a prefix on an explicit ignore list.

Checkpoints are written atomically by :func:`ldm_smd.fileio.atomic_write` (a temporary name,
then a rename), as every other file the package writes. Converters for CompVis and diffusers
autoencoder weights live in :mod:`ldm_smd.convert`.
"""

from __future__ import annotations

import pickle
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any

import torch
from torch import nn

from ldm_smd.errors import LdmSmdError


class CheckpointError(LdmSmdError, RuntimeError):
    """A checkpoint is missing, unreadable, unsafe, or does not match the model."""


def load_checkpoint(
    path: str | Path, *, map_location: str | torch.device = "cpu", mmap: bool = False
) -> Any:
    """Load a checkpoint without executing code.

    ``.safetensors`` gives a flat dict of tensors; anything else goes through
    ``torch.load(weights_only=True)`` (``mmap=True``: tensors stay on disk until read, for a
    cheap look at a large checkpoint).
    """
    path = Path(path)
    if not path.exists():
        raise CheckpointError(f"checkpoint not found: {path}")
    if path.is_dir():
        raise CheckpointError(f"checkpoint {path} is a folder; expected a file")
    if path.suffix == ".safetensors":
        from safetensors.torch import load_file

        try:
            return load_file(str(path), device=str(map_location))
        except Exception as exc:  # safetensors raises its own error types
            raise CheckpointError(
                f"checkpoint {path} is not a readable safetensors file: {exc}"
            ) from exc
    try:
        if mmap:
            try:
                return torch.load(path, map_location=map_location, weights_only=True, mmap=True)
            except RuntimeError:
                pass  # not the zip format (or truncated): the plain load below says which
        return torch.load(path, map_location=map_location, weights_only=True)
    except pickle.UnpicklingError as exc:
        if "Weights only load failed" not in str(exc):
            raise CheckpointError(
                f"checkpoint {path} is truncated or not a checkpoint: {_one_line(exc)}"
            ) from exc
        raise CheckpointError(
            f"refused to load {path}: weights-only loading cannot read it "
            f"({_unpickler_reason(exc)}): it asks to run code or to build objects other than "
            "tensors and plain data, or it is no checkpoint at all. Convert it to safetensors "
            "where it was made, or load it only if you trust its source."
        ) from exc
    except (RuntimeError, EOFError, OSError, KeyError, IndexError, ValueError,
            AttributeError) as exc:  # what torch.load raises on bytes that are no checkpoint
        raise CheckpointError(
            f"checkpoint {path} is truncated or not a checkpoint: {_one_line(exc)}"
        ) from exc


def _one_line(exc: BaseException) -> str:
    """``Type: first line`` of an exception, cut after its first sentence when long."""
    lines = str(exc).strip().splitlines()
    text = lines[0] if lines else ""
    if len(text) > 120 and ". " in text:
        text = text[: text.index(". ") + 1]
    return f"{type(exc).__name__}: {text}".rstrip(": ")


def _unpickler_reason(exc: BaseException) -> str:
    """The line of torch's weights-only refusal that says what was asked for."""
    text = str(exc)
    if "WeightsUnpickler error:" in text:
        rest = text.split("WeightsUnpickler error:", 1)[1]
        for line in rest.splitlines():
            if line.strip():
                return line.strip()
    return _one_line(exc)


def load_state_dict_strict(
    module: nn.Module,
    state_dict: Mapping[str, torch.Tensor],
    *,
    ignore_prefixes: Iterable[str] = (),
    source: str = "checkpoint",
) -> None:
    """Load ``state_dict`` into ``module``; any key mismatch not on the ignore list is an error."""
    kept = check_state_dict(module, state_dict, ignore_prefixes=ignore_prefixes, source=source)
    module.load_state_dict(kept, strict=True)


def check_state_dict(
    module: nn.Module,
    state_dict: Mapping[str, torch.Tensor],
    *,
    ignore_prefixes: Iterable[str] = (),
    source: str = "checkpoint",
) -> dict[str, torch.Tensor]:
    """The entries of ``state_dict`` that ``module`` would load (those not on the ignore list);
    a missing or unexpected key, or a shape mismatch, is a :class:`CheckpointError` listing
    them. Nothing is loaded."""
    ignore = tuple(ignore_prefixes)
    kept = {k: v for k, v in state_dict.items() if not (ignore and k.startswith(ignore))}
    expected = set(module.state_dict())
    missing = sorted(expected - set(kept))
    unexpected = sorted(set(kept) - expected)
    if missing or unexpected:
        parts = []
        if missing:
            parts.append(f"missing keys ({len(missing)}): {_abbrev(missing)}")
        if unexpected:
            parts.append(f"unexpected keys ({len(unexpected)}): {_abbrev(unexpected)}")
        raise CheckpointError(
            f"{source} does not match {type(module).__name__}: " + "; ".join(parts)
        )
    own = module.state_dict()
    bad_shapes = [
        f"{k}: checkpoint {tuple(v.shape)} vs model {tuple(own[k].shape)}"
        for k, v in kept.items()
        if tuple(v.shape) != tuple(own[k].shape)
    ]
    if bad_shapes:
        raise CheckpointError(f"{source}: shape mismatch: " + "; ".join(bad_shapes[:10]))
    return kept


def check_finite_weights(state_dict: Mapping[str, Any], *, source: str = "checkpoint",
                         ignore_prefixes: Iterable[str] = ()) -> None:
    """Every floating-point tensor of ``state_dict`` (but those under ``ignore_prefixes``) is
    finite; else a :class:`CheckpointError` listing the tensors that hold NaN or infinite values
    (a model with them samples blank or black images)."""
    ignore = tuple(ignore_prefixes)
    bad = [name for name, value in state_dict.items()
           if not (ignore and name.startswith(ignore))
           and torch.is_tensor(value) and value.is_floating_point()
           and not bool(torch.isfinite(value).all())]
    if bad:
        raise CheckpointError(
            f"{source}: {len(bad)} weight tensor(s) hold NaN or infinite values: "
            f"{_abbrev(bad, limit=8)}; this model cannot sample (an earlier checkpoint of the "
            "run, checkpoints/step=N.ckpt, may be finite)"
        )


def _abbrev(keys: list[str], limit: int = 20) -> str:
    shown = ", ".join(keys[:limit])
    return shown + (f", ... (+{len(keys) - limit} more)" if len(keys) > limit else "")
