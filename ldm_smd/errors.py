"""The one family of named errors.

Every error that a user's input can cause (a config typo, a missing or wrong checkpoint, an empty
image folder, a bad command-line value, a full disk) derives from :class:`LdmSmdError`. The
command line prints such an error as one line, ``ldm-smd CMD: error: MESSAGE``, and exits with
status 2; a full traceback is shown only with ``--debug`` (or ``LDM_SMD_DEBUG=1``). Anything else
that escapes is a bug and keeps its traceback.

The classes also derive from the built-in exception that describes them best (``ValueError``,
``RuntimeError``, ``FileNotFoundError``), so ``except ValueError`` in a caller keeps working.
This module imports nothing, so every layer may use it.
"""

from __future__ import annotations

import errno

DEBUG_ENV = "LDM_SMD_DEBUG"

#: errno values that mean "this path cannot be written" (not a bug of ours)
WRITE_ERRNOS = frozenset(
    getattr(errno, name)
    for name in ("ENOSPC", "EDQUOT", "EROFS", "EACCES", "EPERM", "ENOENT", "ENOTDIR", "EISDIR",
                 "EEXIST", "EFBIG", "EIO", "ENAMETOOLONG")
    if hasattr(errno, name)
)


class LdmSmdError(Exception):
    """Base of every named error: the message names the thing (key, value, file) at fault."""


class ConfigError(LdmSmdError, ValueError):
    """A config names an unknown key, a wrong type or value, or an unimportable target
    (also importable from :mod:`ldm_smd.config`)."""


class UsageError(LdmSmdError, ValueError):
    """A command-line or function argument is out of range or contradicts another."""


class DataError(LdmSmdError, ValueError):
    """A dataset cannot be built from what is on disk (an empty folder, an undecodable file)."""


class OutputError(LdmSmdError):
    """A file or folder cannot be written (disk full, read-only, no permission, a file in the
    way); the message names the path and says what was kept."""


class Interrupted(KeyboardInterrupt):
    """Ctrl-C stopped a command cleanly; the message says what was kept and how to go on.

    A ``KeyboardInterrupt`` (not an ``Exception``), so no ``except Exception`` swallows it; the
    command line prints it as one line, ``ldm-smd CMD: interrupted: MESSAGE``, and exits with
    status 130 (128 + SIGINT, what a shell reports for a command stopped by Ctrl-C).
    """


def describe_os_error(exc: OSError, path: object | None = None) -> str:
    """``"PATH: reason"`` for an ``OSError`` raised while writing ``path``."""
    target = path if path is not None else (exc.filename or "?")
    reason = exc.strerror or str(exc) or type(exc).__name__
    return f"{target}: {reason}"
