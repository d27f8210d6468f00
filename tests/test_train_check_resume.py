"""check_resume: a checkpoint to resume from is checked against the model before any work, so
trainer.fit's own strict load never meets a mismatch (no error message is read to find one)."""

from __future__ import annotations

import lightning as L
import pytest
import torch
from torch import nn

from ldm_smd.checkpoints import CheckpointError
from ldm_smd.train import check_resume


class _Tiny(L.LightningModule):
    def __init__(self, width: int = 3) -> None:
        super().__init__()
        self.net = nn.Linear(2, width)
        self.register_buffer("steps", torch.zeros((), dtype=torch.int64))


def _saved(tmp_path, state, name="last.ckpt"):
    path = tmp_path / name
    torch.save({"state_dict": state, "global_step": 1}, path)
    return path


def test_a_matching_checkpoint_passes(tmp_path):
    check_resume(_Tiny(), _saved(tmp_path, _Tiny().state_dict()))


def test_missing_unexpected_and_mis_shaped_keys_are_named(tmp_path):
    state = dict(_Tiny().state_dict())
    del state["net.bias"]
    state["net.scale"] = torch.ones(3)
    with pytest.raises(CheckpointError) as info:
        check_resume(_Tiny(), _saved(tmp_path, state))
    message = str(info.value)
    assert "--resume" in message and "last.ckpt" in message
    assert "missing keys (1): net.bias" in message
    assert "unexpected keys (1): net.scale" in message
    assert "the config's model differs from the run's" in message
    with pytest.raises(CheckpointError, match=r"shape mismatch: net.weight: checkpoint \(5, 2\) "
                                              r"vs model \(3, 2\)"):
        check_resume(_Tiny(), _saved(tmp_path, _Tiny(width=5).state_dict()))


def test_a_file_that_is_no_lightning_checkpoint_is_named(tmp_path):
    path = tmp_path / "weights.ckpt"
    torch.save(_Tiny().state_dict(), path)
    with pytest.raises(CheckpointError, match="not a Lightning checkpoint"):
        check_resume(_Tiny(), path)
