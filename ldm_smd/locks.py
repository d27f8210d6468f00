"""One command at a time in a folder: a lock file that names its owner.

A command that writes results into a folder (``train``'s run_dir, ``sample``'s ``--out``, the
benchmark's ``--out``) holds the folder's lock while it works::

    with FolderLock(run_dir, what="run_dir"):
        ...  # check the folder's contents, then write

The lock is the file ``FOLDER/.ldm-smd.lock``: one JSON line with the owner's pid, host, process
start, command and start time, held open with an exclusive ``flock`` for as long as the owner
runs. The operating system drops a ``flock`` when its process ends, however it ends (``kill -9``
included), so:

- a second command into a locked folder is refused with :class:`FolderLockedError`, which names
  the owner (pid, host, command, since when) before the second command changed anything;
- a lock file left by a process that is gone (a *stale* lock: no ``flock`` held, and on this host
  no live process with that pid and start time) is taken over, and the new owner prints one line
  naming the old one;
- a lock file written on another host whose process cannot be checked from here is refused too,
  with the lock file's path to delete once that command is known to be gone.

Releasing (leaving the ``with`` block, also by an exception) deletes the lock file, and the
folder too when the lock made it and nothing else was written there, so a command that failed
its checks leaves no empty folder behind. Locks are advisory: only commands that take them
(every ldm-smd command that writes into a folder) respect them.
"""

from __future__ import annotations

import datetime
import errno
import json
import os
import shlex
import socket
import sys
from pathlib import Path
from typing import Any

from ldm_smd.errors import OutputError, describe_os_error

#: the lock file's name inside the locked folder (no command counts it as one of its results)
LOCK_NAME = ".ldm-smd.lock"

try:  # POSIX; where flock is missing, the recorded pid alone decides (this host only)
    import fcntl
except ImportError:  # pragma: no cover - Windows
    fcntl = None  # type: ignore[assignment]


class FolderLockedError(OutputError):
    """Another command holds the folder's lock; the message names it and says what to do."""


def current_command() -> str:
    """This process's command line, shell-quoted, as a second command is shown it."""
    argv = list(sys.argv) or ["python"]
    head = Path(argv[0]).name
    if head == "__main__.py":
        head = f"python -m {Path(argv[0]).parent.name}"
    return " ".join([head, *(shlex.quote(a) for a in argv[1:])])


def _process_start(pid: int) -> str | None:
    """``boot id:start tick`` of process ``pid`` (Linux ``/proc``), which a reused pid does not
    share; ``None`` where it cannot be read."""
    try:
        boot = Path("/proc/sys/kernel/random/boot_id").read_text().strip()
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    fields = stat[stat.rfind(")") + 2:].split()  # after the command name, which may hold spaces
    return f"{boot}:{fields[19]}" if len(fields) > 19 else None


def _alive(pid: int, process_start: str | None) -> bool:
    """Whether process ``pid`` of this host still runs (and is the same process)."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        pass  # another user's process: it exists
    return process_start is None or _process_start(pid) in (None, process_start)


class LockOwner:
    """What a lock file records about the command that holds (or held) it.

    Args:
        pid: the owner's process id.
        host: the host name it runs on.
        command: its command line.
        started: when it took the lock (local time, ISO format).
        process_start: its ``boot id:start tick`` (tells a reused pid apart), or ``None``.
    """

    def __init__(self, *, pid: int, host: str, command: str, started: str,
                 process_start: str | None = None) -> None:
        self.pid, self.host, self.command = int(pid), str(host), str(command)
        self.started, self.process_start = str(started), process_start

    @classmethod
    def of_this_process(cls, command: str) -> LockOwner:
        now = datetime.datetime.now().isoformat(timespec="seconds")
        return cls(pid=os.getpid(), host=socket.gethostname(), command=command, started=now,
                   process_start=_process_start(os.getpid()))

    @classmethod
    def parse(cls, text: str) -> LockOwner | None:
        """The owner a lock file's text records; ``None`` for an empty or foreign file."""
        try:
            data = json.loads(text)
            return cls(pid=data["pid"], host=data["host"], command=data.get("command", "?"),
                       started=data.get("started", "?"),
                       process_start=data.get("process_start"))
        except (ValueError, TypeError, KeyError):
            return None

    def to_text(self) -> str:
        return json.dumps({"pid": self.pid, "host": self.host, "command": self.command,
                           "started": self.started, "process_start": self.process_start}) + "\n"

    @property
    def on_this_host(self) -> bool:
        return self.host == socket.gethostname()

    def is_running(self) -> bool | None:
        """True or False on this host; ``None`` (unknown) for another host's process."""
        return _alive(self.pid, self.process_start) if self.on_this_host else None

    def describe(self, width: int = 160) -> str:
        """The owner in one line; a command longer than ``width`` characters keeps its start
        and its end (where a command line's own settings usually are), the middle cut (the whole
        command line is in the lock file)."""
        command = self.command
        if len(command) > width:
            head = width // 3
            command = command[:head] + " … " + command[len(command) - (width - head - 3):]
        return f"pid {self.pid} on {self.host}, since {self.started}: `{command}`"


def read_owner(folder: str | Path) -> LockOwner | None:
    """The owner recorded in ``folder``'s lock file, or ``None`` when there is none."""
    try:
        return LockOwner.parse((Path(folder) / LOCK_NAME).read_text())
    except OSError:
        return None


class FolderLock:
    """Hold ``folder``'s lock (see the module docstring): a context manager, or call
    :meth:`acquire` and :meth:`release`.

    Args:
        folder: the folder to own; made (with its parents) when missing, and removed again on
            release when this lock made it and it is empty then.
        what: how messages name the folder, e.g. ``run_dir`` or ``--out``.
        command: the owner's command line shown to a second command (default: this process's,
            :func:`current_command`).
    """

    def __init__(self, folder: str | Path, *, what: str = "folder",
                 command: str | None = None) -> None:
        self.folder = Path(folder)
        self.what = what
        self.command = command or current_command()
        self.path = self.folder / LOCK_NAME
        self.stale: LockOwner | None = None  # the gone owner whose lock was taken over
        self._fd: int | None = None
        self._made_folder = False

    def __enter__(self) -> FolderLock:
        self.acquire()
        return self

    def __exit__(self, *exc: Any) -> None:
        self.release()

    def _refuse(self, owner: LockOwner | None, *, certain: bool) -> FolderLockedError:
        who = owner.describe() if owner is not None else "a command that has not written its name"
        advice = f"wait for it to finish, or give another {self.what}"
        if not certain:  # another host's process, or a live pid that holds no flock
            advice += f"; if that command is gone, delete {self.path}"
        return FolderLockedError(
            f"{self.what} {self.folder} is in use by another command ({who}); nothing was "
            f"changed: {advice}"
        )

    def acquire(self) -> None:
        """Take the lock, or raise :class:`FolderLockedError` naming the owner."""
        if self._fd is not None:
            raise RuntimeError(f"FolderLock({self.folder}) is already held by this object")
        try:
            self._made_folder = not self.folder.exists()
            self.folder.mkdir(parents=True, exist_ok=True)
        except OSError as exc:
            reason = describe_os_error(exc, self.folder)
            raise OutputError(f"cannot make {self.what} {reason}") from exc
        for _ in range(10):  # the file can be replaced between open and flock: then again
            fd = self._open()
            try:
                previous = self._lock(fd)
            except BaseException:
                os.close(fd)
                self._remove_made_folder()
                raise
            if previous is not False:
                self._fd = fd
                self._record(previous)
                return
            os.close(fd)
        self._remove_made_folder()
        raise FolderLockedError(f"{self.what} {self.folder}: its lock file {self.path} kept "
                                "changing while it was taken; another command is starting there")

    def _open(self) -> int:
        try:
            return os.open(self.path, os.O_RDWR | os.O_CREAT, 0o666)
        except OSError as exc:
            self._remove_made_folder()
            reason = describe_os_error(exc, self.path)
            raise OutputError(f"cannot write the lock file {reason}") from exc

    def _lock(self, fd: int) -> LockOwner | None | bool:
        """Lock the open lock file ``fd``: the previous owner recorded in it (a stale one, or
        ``None``), or ``False`` when the file was replaced meanwhile (try again)."""
        if fcntl is not None:
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except OSError as exc:
                if exc.errno in (errno.EWOULDBLOCK, errno.EAGAIN, errno.EACCES):
                    owner = LockOwner.parse(_read(fd))
                    raise self._refuse(owner, certain=True) from None
                # ENOLCK / EOPNOTSUPP (a file system without flock): the recorded pid decides
        try:
            same = os.path.samestat(os.fstat(fd), os.stat(self.path))
        except FileNotFoundError:
            same = False
        if not same:
            return False
        previous = LockOwner.parse(_read(fd))
        if previous is None or previous.pid == os.getpid():
            return previous
        if previous.is_running() is False:
            return previous  # its process is gone: a stale lock (a live flock stopped us above)
        raise self._refuse(previous, certain=False)

    def _record(self, previous: LockOwner | None) -> None:
        assert self._fd is not None
        text = LockOwner.of_this_process(self.command).to_text().encode()
        os.ftruncate(self._fd, 0)
        os.pwrite(self._fd, text, 0)
        if previous is not None and previous.pid != os.getpid():
            self.stale = previous
            print(f"[ldm-smd] {self.what} {self.folder}: took over the stale lock of a command "
                  f"that is no longer running ({previous.describe()})")

    def release(self) -> None:
        """Delete the lock file (and the folder, if this lock made it and it is empty)."""
        fd, self._fd = self._fd, None
        if fd is None:
            return
        try:
            if os.path.samestat(os.fstat(fd), os.stat(self.path)):
                os.unlink(self.path)
        except OSError:
            pass  # already gone (the folder was removed): nothing to release but the descriptor
        finally:
            os.close(fd)
        self._remove_made_folder()

    def _remove_made_folder(self) -> None:
        if self._made_folder:
            try:
                self.folder.rmdir()  # only an empty folder
            except OSError:
                pass  # something was written there: it stays
            self._made_folder = False


def _read(fd: int) -> str:
    try:
        return os.pread(fd, 4096, 0).decode("utf-8", "replace")
    except OSError:
        return ""
