"""Saving and loading weights safely.

- Loading never runs code: ``.safetensors`` files are read with safetensors, everything else with
  ``torch.load(weights_only=True)``; a pickle that asks for anything but tensors and plain data is
  refused with an error that says so.
- Saving is atomic: bytes go to a temporary name in the same folder, are flushed to disk, then
  renamed over the target, so an interrupted write never leaves a half-written checkpoint. The
  file gets the mode an ordinary ``open`` would give it (``0o666`` less the user's umask), and a
  write that fails (disk full, read-only folder) is an :class:`~ldm_smd.errors.OutputError`
  naming the file and saying that the previous version, if any, is unchanged.
- State dicts load strictly: missing or unexpected keys are an error that lists them, unless a key
  starts with a prefix on an explicit ignore list.

Converters for CompVis and diffusers autoencoder weights live in :mod:`ldm_smd.convert`.
"""

from __future__ import annotations

import os
import pickle
import tempfile
import threading
import time
from collections.abc import Callable, Iterable, Mapping
from pathlib import Path
from typing import Any

import torch
from torch import nn

from ldm_smd.errors import LdmSmdError, OutputError, describe_os_error


class CheckpointError(LdmSmdError, RuntimeError):
    """A checkpoint is missing, unreadable, unsafe, or does not match the model."""


_UMASK_LOCK = threading.Lock()


def current_umask() -> int:
    """The process's umask (read from ``/proc`` where it can be, so no thread sees it change)."""
    try:
        with open("/proc/self/status") as handle:
            for line in handle:
                if line.startswith("Umask:"):
                    return int(line.split()[1], 8)
    except (OSError, ValueError, IndexError):
        pass
    with _UMASK_LOCK:
        mask = os.umask(0o022)
        os.umask(mask)
    return mask


def atomic_write(path: str | Path, write: Callable[[Any], None]) -> Path:
    """Call ``write(file_object)`` on a temporary file beside ``path``, fsync, then rename.

    The file is created with mode ``0o666 & ~umask`` (as ``open`` would), not ``mkstemp``'s
    ``0o600``. An ``OSError`` (disk full, no permission, ...) becomes an :class:`OutputError`
    naming ``path``; the temporary file is removed and an earlier ``path`` is left unchanged.
    """
    path = Path(path)
    existed = path.is_file()
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp_name = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    except OSError as exc:
        raise OutputError(f"cannot write {describe_os_error(exc, path)}; nothing was written "
                          f"there") from exc
    try:
        os.fchmod(fd, 0o666 & ~current_umask())
        with os.fdopen(fd, "wb") as handle:
            write(handle)
            handle.flush()
            os.fsync(handle.fileno())
            _test_pause(path)
        os.replace(tmp_name, path)
    except BaseException as exc:
        Path(tmp_name).unlink(missing_ok=True)
        # torch.save reports a full disk as a RuntimeError raised while handling the OSError
        cause = _os_error_in(exc)
        if cause is None:
            raise
        kept = (f"the previous {path.name} there is unchanged" if existed
                else "no partial file was left")
        raise OutputError(f"could not write {describe_os_error(cause, path)}; {kept}") from exc
    return path


def _os_error_in(exc: BaseException | None) -> OSError | None:
    """The ``OSError`` that ``exc`` is or was raised while handling (its context chain)."""
    seen = 0
    while exc is not None and seen < 8:
        if isinstance(exc, OSError):
            return exc
        exc, seen = exc.__cause__ or exc.__context__, seen + 1
    return None


def check_writable(path: str | Path, *, what: str, folder: bool) -> Path:
    """Check, before any work, that ``path`` (a file, or a folder with ``folder=True``) can be
    written, without creating it: nothing in the way is a file or folder of the wrong kind, and
    the nearest existing folder above it accepts a new file (a probe file is made and removed).
    Raises :class:`OutputError` naming ``what`` and the path."""
    path = Path(path)
    if folder and path.exists() and not path.is_dir():
        raise OutputError(f"{what} {path} is a file, not a folder; give a folder path")
    if not folder and path.is_dir():
        raise OutputError(f"{what} {path} is a folder; give a file path")
    ancestor = path if folder and path.is_dir() else path.parent
    while not ancestor.exists() and ancestor != ancestor.parent:
        ancestor = ancestor.parent
    if not ancestor.is_dir():
        raise OutputError(f"{what} {path}: {ancestor} is a file, so no folder can be made there")
    try:
        fd, probe = tempfile.mkstemp(prefix=".ldm-smd-probe.", dir=ancestor)
    except OSError as exc:
        reason = exc.strerror or type(exc).__name__
        raise OutputError(
            f"{what} {path} cannot be written: making a file in {ancestor} failed ({reason})"
        ) from exc
    os.close(fd)
    os.unlink(probe)
    return path


WRITE_PAUSE_ENV = "LDM_SMD_TEST_WRITE_PAUSE"


def _test_pause(path: Path) -> None:
    """Test hook: when ``$LDM_SMD_TEST_WRITE_PAUSE`` is set, sleep that many seconds while the
    replacement of an existing checkpoint is fully written under its temporary name but not yet
    renamed (crash-safety tests kill the process in this window)."""
    pause = os.environ.get(WRITE_PAUSE_ENV)
    if pause and path.suffix == ".ckpt" and path.exists():
        time.sleep(float(pause))


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
