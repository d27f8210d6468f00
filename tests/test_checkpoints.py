"""Safe, atomic, strict checkpoint I/O."""

from __future__ import annotations

import pickle

import pytest
import torch
from torch import nn

from ldm_smd.checkpoints import CheckpointError, load_checkpoint, load_state_dict_strict
from ldm_smd.fileio import atomic_write


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
