"""FolderLock: one command at a time in a folder, its owner named, stale locks taken over."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest

from ldm_smd.errors import OutputError
from ldm_smd.locks import LOCK_NAME, FolderLock, FolderLockedError, LockOwner, read_owner

ROOT = Path(__file__).resolve().parents[1]


def _holder(folder: Path, command: str) -> subprocess.Popen:
    """Another process that holds ``folder``'s lock until its stdin closes."""
    code = ("import sys; from ldm_smd.locks import FolderLock\n"
            "with FolderLock(sys.argv[1], what='--out', command=sys.argv[2]):\n"
            "    print('locked', flush=True); sys.stdin.read()")
    process = subprocess.Popen([sys.executable, "-c", code, str(folder), command],
                               stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True,
                               env={**os.environ, "PYTHONPATH": str(ROOT)})
    assert process.stdout.readline().strip() == "locked"
    return process


def _record(folder: Path, **fields) -> None:
    owner = {"pid": os.getpid(), "host": socket.gethostname(), "command": "ldm-smd sample",
             "started": "2024-01-01T00:00:00", **fields}
    folder.mkdir(parents=True, exist_ok=True)
    (folder / LOCK_NAME).write_text(LockOwner(**owner).to_text())


def test_the_lock_records_its_owner_and_leaves_nothing_behind(tmp_path):
    folder = tmp_path / "new" / "out"
    with FolderLock(folder, what="--out", command="ldm-smd sample --out x") as lock:
        owner = read_owner(folder)
        assert (owner.pid, owner.host, owner.command) == (
            os.getpid(), socket.gethostname(), "ldm-smd sample --out x")
        assert lock.stale is None
    assert not folder.exists()  # made by the lock, empty again: removed
    assert (tmp_path / "new").is_dir()  # only the folder itself, not its parents


def test_a_folder_with_results_stays_and_only_the_lock_file_goes(tmp_path):
    with FolderLock(tmp_path / "out"):
        (tmp_path / "out" / "grid.png").write_bytes(b"png")
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == ["grid.png"]


def test_a_live_owner_in_another_process_is_named(tmp_path):
    holder = _holder(tmp_path / "out", "ldm-smd sample --n 64")
    try:
        with pytest.raises(FolderLockedError) as err:
            FolderLock(tmp_path / "out", what="--out").acquire()
        message = str(err.value)
        assert f"--out {tmp_path / 'out'} is in use by another command" in message
        assert f"pid {holder.pid} on {socket.gethostname()}" in message
        assert "`ldm-smd sample --n 64`" in message and "nothing was changed" in message
        assert "delete" not in message  # its flock proves it runs
        assert isinstance(err.value, OutputError)
    finally:
        holder.stdin.close()
        holder.wait(timeout=60)
    with FolderLock(tmp_path / "out") as lock:  # free again
        assert lock.stale is None


def test_a_dead_owners_lock_is_taken_over_and_named(tmp_path, capsys):
    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"],
                          capture_output=True, text=True, check=True)
    _record(tmp_path / "out", pid=int(dead.stdout), command="ldm-smd train --config c.yaml")
    with FolderLock(tmp_path / "out", what="run_dir") as lock:
        assert lock.stale.pid == int(dead.stdout)
        assert read_owner(tmp_path / "out").pid == os.getpid()
    printed = capsys.readouterr().out
    assert "took over the stale lock of a command that is no longer running" in printed
    assert f"pid {dead.stdout.strip()}" in printed and "ldm-smd train --config c.yaml" in printed


def test_a_reused_pid_with_another_start_time_is_stale(tmp_path):
    _record(tmp_path / "out", pid=os.getppid(), process_start="another-boot:1")
    with FolderLock(tmp_path / "out") as lock:
        assert lock.stale is not None


def test_another_hosts_lock_is_refused_with_the_file_to_delete(tmp_path):
    _record(tmp_path / "out", pid=1, host="elsewhere.example")
    with pytest.raises(FolderLockedError) as err:
        FolderLock(tmp_path / "out", what="run_dir").acquire()
    assert "pid 1 on elsewhere.example" in str(err.value)
    assert f"if that command is gone, delete {tmp_path / 'out' / LOCK_NAME}" in str(err.value)
    assert read_owner(tmp_path / "out").host == "elsewhere.example"  # untouched


def test_an_unmakeable_folder_is_an_output_error(tmp_path):
    (tmp_path / "file").write_text("in the way")
    with pytest.raises(OutputError, match="cannot make --out"):
        FolderLock(tmp_path / "file" / "out", what="--out").acquire()


def test_a_long_owner_command_is_cut_in_the_message_but_kept_in_the_file():
    from ldm_smd.locks import LockOwner

    owner = LockOwner.of_this_process("ldm-smd train " + " ".join(f"k{i}=v" for i in range(200)))
    line = owner.describe()
    assert len(line) < 260 and line.endswith("k199=v`") and "ldm-smd train k0=v" in line
    assert "k100=v" in owner.command and "k100=v" not in line and " … " in line
    assert LockOwner.of_this_process("ldm-smd sample").describe().endswith("`ldm-smd sample`")
