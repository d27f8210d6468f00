"""Safe, atomic, strict checkpoint I/O."""

from __future__ import annotations

import os
import pickle

import pytest
import torch
from torch import nn

from ldm_smd.checkpoints import (
    CheckpointError,
    atomic_write,
    load_checkpoint,
    load_state_dict_strict,
)


def save_checkpoint(obj, path):
    """A checkpoint written as the trainer writes one (AtomicCheckpointIO: atomic torch.save)."""
    return atomic_write(path, lambda handle: torch.save(obj, handle))


class _WritesFile:
    """Unpickling this object would create a file: a stand-in for a malicious checkpoint."""

    def __init__(self, path: str) -> None:
        self.path = path

    def __reduce__(self):
        return (open, (self.path, "w"))


def test_crafted_pickle_is_refused_and_runs_nothing(tmp_path):
    marker = tmp_path / "pwned.txt"
    bad = tmp_path / "bad.ckpt"
    with open(bad, "wb") as f:
        pickle.dump({"state_dict": _WritesFile(str(marker))}, f)
    with pytest.raises(CheckpointError, match="refused to load"):
        load_checkpoint(bad)
    assert not marker.exists()


def test_round_trip_and_safetensors(tmp_path):
    state = {"w": torch.randn(3, 2)}
    path = save_checkpoint({"state_dict": state, "step": 3}, tmp_path / "a.ckpt")
    back = load_checkpoint(path)
    assert back["step"] == 3 and torch.equal(back["state_dict"]["w"], state["w"])
    from safetensors.torch import save_file

    save_file(state, str(tmp_path / "w.safetensors"))
    assert torch.equal(load_checkpoint(tmp_path / "w.safetensors")["w"], state["w"])


def test_truncated_and_missing_are_named(tmp_path):
    path = save_checkpoint({"w": torch.randn(100)}, tmp_path / "t.ckpt")
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])
    with pytest.raises(CheckpointError, match="t.ckpt"):
        load_checkpoint(path)
    with pytest.raises(CheckpointError, match="not found"):
        load_checkpoint(tmp_path / "absent.ckpt")


def test_atomic_write_keeps_old_file_when_writer_fails(tmp_path):
    path = tmp_path / "last.ckpt"
    save_checkpoint({"v": 1}, path)

    def failing(handle):
        handle.write(b"partial")
        raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        atomic_write(path, failing)
    assert load_checkpoint(path) == {"v": 1}
    assert [p.name for p in tmp_path.iterdir()] == ["last.ckpt"]
    assert os.path.getsize(path) > 0


def test_strict_loading_lists_missing_and_unexpected():
    net = nn.Linear(2, 2)
    state = {"weight": torch.zeros(2, 2), "extra.x": torch.zeros(1), "loss.w": torch.zeros(1)}
    with pytest.raises(CheckpointError) as err:
        load_state_dict_strict(net, state)
    assert "bias" in str(err.value) and "extra.x" in str(err.value)
    state["bias"] = torch.ones(2)
    del state["extra.x"]
    load_state_dict_strict(net, state, ignore_prefixes=("loss.",))
    assert torch.equal(net.bias, torch.ones(2))
    with pytest.raises(CheckpointError, match="shape mismatch"):
        load_state_dict_strict(net, {"weight": torch.zeros(3, 2), "bias": torch.zeros(2)})


@pytest.mark.parametrize("mask", [0o022, 0o077, 0o002])
def test_atomic_write_gives_files_the_users_umask(tmp_path, mask):
    import stat

    old = os.umask(mask)
    try:
        path = atomic_write(tmp_path / "f.bin", lambda handle: handle.write(b"x"))
        again = atomic_write(path, lambda handle: handle.write(b"y"))  # a replacement too
    finally:
        os.umask(old)
    assert stat.S_IMODE(path.stat().st_mode) == 0o666 & ~mask
    assert stat.S_IMODE(again.stat().st_mode) == 0o666 & ~mask


def test_failed_atomic_write_names_the_file_and_keeps_the_previous_one(tmp_path):
    import errno

    from ldm_smd.errors import OutputError

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
    import errno

    from ldm_smd.errors import OutputError

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
