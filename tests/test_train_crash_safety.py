"""Crash safety: a training process killed with SIGKILL (between steps, or while it replaces
``last.ckpt``) leaves a complete ``last.ckpt``; resuming from what is on disk finishes the run
with exactly the weights of an uninterrupted run."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import tiny_configs
import torch

from ldm_smd.checkpoints import load_checkpoint
from ldm_smd.fileio import WRITE_PAUSE_ENV
from ldm_smd.train import train

ROOT = tiny_configs.ROOT
CONFIG = tiny_configs.DEMO / "ldm-vanilla.yaml"
STEPS = 8
TINY = tiny_configs.tiny_data(batch=4, length=24) + tiny_configs.QUIET + [
    *tiny_configs.tiny_pixel_unet(), "model.params.ema_decay=0.9",
    "checkpoint.every_n_train_steps=1", f"trainer.max_steps={STEPS}",
]


@pytest.fixture(scope="module")
def reference(tmp_path_factory) -> dict:
    run = tmp_path_factory.mktemp("ref")
    train(CONFIG, TINY + [f"run_dir={run}"])
    return load_checkpoint(run / "checkpoints" / "last.ckpt")["state_dict"]


def launch(run: Path, *, resume: bool = False, **env: str) -> subprocess.Popen:
    environ = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1", **env}
    args = ["--resume", str(run)] if resume else ["--config", str(CONFIG), *TINY, f"run_dir={run}"]
    return subprocess.Popen(
        [sys.executable, "-m", "ldm_smd", "train", *args],
        cwd=ROOT, env=environ, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
    )


def wait_for(proc: subprocess.Popen, condition, what: str, timeout: float = 120.0) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        if proc.poll() is not None:
            raise AssertionError(f"training exited ({proc.returncode}) before {what}: "
                                 f"{proc.stderr.read().decode()[-2000:]}")
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.02)


def kill(proc: subprocess.Popen) -> None:
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    proc.stderr.close()


def test_killed_at_several_moments_then_resumed_exactly(tmp_path, reference):
    ckpts = tmp_path / "checkpoints"
    # 1. killed between or during steps, once step 2's checkpoint is on disk
    proc = launch(tmp_path)
    try:
        wait_for(proc, (ckpts / "step=2.ckpt").is_file, "step=2.ckpt")
    finally:
        kill(proc)
    first = load_checkpoint(ckpts / "last.ckpt")  # complete: it loads
    assert 1 <= first["global_step"] < STEPS  # step 2 or, mid-write of last.ckpt, step 1

    # 2. resumed by the CLI, then killed while last.ckpt's replacement is fully written under a
    #    temporary name but not yet renamed over it
    proc = launch(tmp_path, resume=True, **{WRITE_PAUSE_ENV: "60"})
    try:
        wait_for(proc, lambda: (ckpts / "last.ckpt").is_file()
                 and list(ckpts.glob(".last.ckpt.*.tmp")), "a last.ckpt rewrite")
    finally:
        kill(proc)
    assert list(ckpts.glob(".last.ckpt.*.tmp"))
    second = load_checkpoint(ckpts / "last.ckpt")  # the previous complete version
    assert first["global_step"] <= second["global_step"] < STEPS

    # 3. resumed from what is on disk: the run finishes exactly as if never interrupted
    train(resume=tmp_path)
    assert not list(ckpts.glob(".*.tmp"))  # the stale temporary was removed
    final = load_checkpoint(ckpts / "last.ckpt")
    assert final["global_step"] == STEPS
    for k, v in reference.items():
        assert torch.equal(final["state_dict"][k], v), k
