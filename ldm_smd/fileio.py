"""Writing files safely: every file the package writes goes through here.

- :func:`atomic_write`: bytes go to a temporary name in the same folder, are flushed to disk,
  then renamed over the target, so an interrupted write never leaves a half-written file (a
  checkpoint, a config, a results file, an image). The file gets the mode an ordinary ``open``
  would give it (``0o666`` less the user's umask), and a write that fails (disk full, read-only
  folder) is an :class:`~ldm_smd.errors.OutputError` naming the file and saying that the previous
  version, if any, is unchanged.
- :func:`check_writable`: before any work, a path that cannot be written is an ``OutputError``
  naming it, so a long run does not fail at its end.

This module knows nothing of what it writes (checkpoints, JSON, YAML, images); it imports only
:mod:`ldm_smd.errors`, so every layer may use it.
"""

from __future__ import annotations

import os
import tempfile
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from ldm_smd.errors import OutputError, describe_os_error

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
