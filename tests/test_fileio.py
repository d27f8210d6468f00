"""Atomic writes and writability checks (ldm_smd.fileio)."""

from __future__ import annotations

import errno
import os
import stat

import pytest

from ldm_smd.errors import OutputError
from ldm_smd.fileio import atomic_write, check_writable


def test_atomic_write_keeps_old_file_when_writer_fails(tmp_path):
    path = atomic_write(tmp_path / "last.ckpt", lambda handle: handle.write(b"complete"))

    def failing(handle):
        handle.write(b"partial")
        raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        atomic_write(path, failing)
    assert path.read_bytes() == b"complete"
    assert [p.name for p in tmp_path.iterdir()] == ["last.ckpt"]


@pytest.mark.parametrize("mask", [0o022, 0o077, 0o002])
def test_atomic_write_gives_files_the_users_umask(tmp_path, mask):
    old = os.umask(mask)
    try:
        path = atomic_write(tmp_path / "f.bin", lambda handle: handle.write(b"x"))
        again = atomic_write(path, lambda handle: handle.write(b"y"))  # a replacement too
    finally:
        os.umask(old)
    assert stat.S_IMODE(path.stat().st_mode) == 0o666 & ~mask
    assert stat.S_IMODE(again.stat().st_mode) == 0o666 & ~mask


def test_failed_atomic_write_names_the_file_and_keeps_the_previous_one(tmp_path):
    path = atomic_write(tmp_path / "c.ckpt", lambda handle: handle.write(b"old"))

    def full(handle):
        raise OSError(errno.ENOSPC, "No space left on device")

    with pytest.raises(OutputError, match=r"could not write .*c\.ckpt: No space left on device; "
                                          r"the previous c\.ckpt there is unchanged"):
        atomic_write(path, full)
    assert path.read_bytes() == b"old"
    assert [p.name for p in tmp_path.iterdir()] == ["c.ckpt"]  # no temporary left
    with pytest.raises(OutputError, match=r"cannot write .*c\.ckpt/x"):
        atomic_write(path / "x", lambda handle: handle.write(b"z"))  # a file in the way


def test_a_full_disk_reported_by_torch_save_as_a_runtime_error_is_named(tmp_path):
    def torch_like(handle):  # what torch.save raises when the disk fills mid-write
        try:
            raise OSError(errno.ENOSPC, "No space left on device")
        except OSError:
            raise RuntimeError("[enforce fail at inline_container.cc:672] . unexpected pos")  # noqa: B904 (as torch does)

    with pytest.raises(OutputError, match=r"x\.ckpt: No space left on device; no partial file"):
        atomic_write(tmp_path / "x.ckpt", torch_like)
    assert list(tmp_path.iterdir()) == []
    with pytest.raises(RuntimeError, match="a bug"):  # anything else keeps its type
        atomic_write(tmp_path / "y.ckpt", lambda handle: (_ for _ in ()).throw(
            RuntimeError("a bug")))


def test_check_writable_names_what_is_in_the_way_and_creates_nothing(tmp_path):
    (tmp_path / "a_file").write_text("x")
    assert check_writable(tmp_path / "new" / "deeper", what="run_dir", folder=True) == (
        tmp_path / "new" / "deeper")
    assert check_writable(tmp_path / "new" / "out.json", what="--out", folder=False)
    with pytest.raises(OutputError, match=r"run_dir .*a_file is a file, not a folder"):
        check_writable(tmp_path / "a_file", what="run_dir", folder=True)
    with pytest.raises(OutputError, match=r"--out .* is a folder; give a file path"):
        check_writable(tmp_path, what="--out", folder=False)
    with pytest.raises(OutputError, match=r"--out .*a_file is a file, so no folder can be made"):
        check_writable(tmp_path / "a_file" / "sub" / "x.png", what="--out", folder=False)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a_file"]  # no probe, no folder left
