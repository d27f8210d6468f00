"""Saving and loading weights safely.

- Loading never runs code: ``.safetensors`` files are read with safetensors, everything else with
  ``torch.load(weights_only=True)``; a pickle that asks for anything but tensors and plain data is
  refused with an error that says so.
- Saving is atomic: bytes go to a temporary name in the same folder, are flushed to disk, then
  renamed over the target, so an interrupted write never leaves a half-written checkpoint.
- State dicts load strictly: missing or unexpected keys are an error that lists them, unless a key
  starts with a prefix on an explicit ignore list.

Converters for CompVis and diffusers autoencoder weights live in :mod:`ldm_smd.convert`.
"""

from __future__ import annotations

import os
import pickle
import tempfile
import time
from collections.abc import Callable, Iterable, Mapping
from pathlib import Path
from typing import Any

import torch
from torch import nn


class CheckpointError(RuntimeError):
    """A checkpoint is missing, unreadable, unsafe, or does not match the model."""


def atomic_write(path: str | Path, write: Callable[[Any], None]) -> Path:
    """Call ``write(file_object)`` on a temporary file beside ``path``, fsync, then rename."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp_name = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as handle:
            write(handle)
            handle.flush()
            os.fsync(handle.fileno())
            _test_pause(path)
        os.replace(tmp_name, path)
    except BaseException:
        Path(tmp_name).unlink(missing_ok=True)
        raise
    return path


WRITE_PAUSE_ENV = "LDM_SMD_TEST_WRITE_PAUSE"


def _test_pause(path: Path) -> None:
    """Test hook: when ``$LDM_SMD_TEST_WRITE_PAUSE`` is set, sleep that many seconds while the
    replacement of an existing checkpoint is fully written under its temporary name but not yet
    renamed (crash-safety tests kill the process in this window)."""
    pause = os.environ.get(WRITE_PAUSE_ENV)
    if pause and path.suffix == ".ckpt" and path.exists():
        time.sleep(float(pause))


def load_checkpoint(path: str | Path, *, map_location: str | torch.device = "cpu") -> Any:
    """Load a checkpoint without executing code.

    ``.safetensors`` gives a flat dict of tensors; anything else goes through
    ``torch.load(weights_only=True)``.
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
        return torch.load(path, map_location=map_location, weights_only=True)
    except pickle.UnpicklingError as exc:
        raise CheckpointError(
            f"refused to load {path}: it asks to run code or build objects other than tensors "
            f"and plain data, which weights-only loading does not allow ({exc}). Convert it "
            f"to safetensors where it was made, or load it only if you trust its source."
        ) from exc
    except (RuntimeError, EOFError, OSError) as exc:
        raise CheckpointError(f"checkpoint {path} is truncated or not a checkpoint: {exc}") from exc


def load_state_dict_strict(
    module: nn.Module,
    state_dict: Mapping[str, torch.Tensor],
    *,
    ignore_prefixes: Iterable[str] = (),
    source: str = "checkpoint",
) -> None:
    """Load ``state_dict`` into ``module``; any key mismatch not on the ignore list is an error."""
    ignore = tuple(ignore_prefixes)
    kept = {k: v for k, v in state_dict.items() if not (ignore and k.startswith(ignore))}
    expected = set(module.state_dict())
    missing = sorted(expected - set(kept))
    unexpected = sorted(set(kept) - expected)
    if missing or unexpected:
        lines = [f"{source} does not match {type(module).__name__}:"]
        if missing:
            lines.append(f"  missing keys ({len(missing)}): {_abbrev(missing)}")
        if unexpected:
            lines.append(f"  unexpected keys ({len(unexpected)}): {_abbrev(unexpected)}")
        raise CheckpointError("\n".join(lines))
    own = module.state_dict()
    bad_shapes = [
        f"{k}: checkpoint {tuple(v.shape)} vs model {tuple(own[k].shape)}"
        for k, v in kept.items()
        if tuple(v.shape) != tuple(own[k].shape)
    ]
    if bad_shapes:
        raise CheckpointError(f"{source}: shape mismatch: " + "; ".join(bad_shapes[:10]))
    module.load_state_dict(kept, strict=True)


def _abbrev(keys: list[str], limit: int = 20) -> str:
    shown = ", ".join(keys[:limit])
    return shown + (f", ... (+{len(keys) - limit} more)" if len(keys) > limit else "")
