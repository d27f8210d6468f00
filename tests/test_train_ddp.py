"""Multi-process training: Lightning DDP on CPU (gloo, two processes) through the real CLI; its
checkpoint loads in a single process; the learning-rate line names devices x accumulation and
the rate is used as given. Launched as a subprocess (Lightning's DDP launcher re-runs the
command for rank 1, which it cannot do for a pytest process)."""

from __future__ import annotations

import os
import subprocess
import sys

import tiny_configs
import torch

from ldm_smd.checkpoints import load_checkpoint
from ldm_smd.data.datamodule import SeededEpochSampler
from ldm_smd.sample import load_diffusion_checkpoint

ROOT = tiny_configs.ROOT
CONFIG = tiny_configs.DEMO / "ldm-vanilla.yaml"
TINY = tiny_configs.tiny_data(batch=2, length=16) + tiny_configs.QUIET + [
    *tiny_configs.tiny_pixel_unet(), "model.params.learning_rate=0.001",
    "trainer.max_steps=3", "trainer.accumulate_grad_batches=2",
    "trainer.accelerator=cpu", "trainer.devices=2", "trainer.strategy=ddp",
]


def test_sampler_shards_are_disjoint_and_cover_the_epoch():
    shards = [list(SeededEpochSampler(length=11, seed=3, rank=r, num_replicas=2)) for r in (0, 1)]
    assert len(shards[0]) == len(shards[1]) == 5
    assert not set(shards[0]) & set(shards[1])
    whole = list(SeededEpochSampler(length=11, seed=3))
    assert sorted(shards[0] + shards[1]) == sorted(whole[:10])


def test_ddp_on_cpu_trains_and_its_checkpoint_loads_in_one_process(tmp_path):
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"}
    done = subprocess.run(
        [sys.executable, "-m", "ldm_smd", "train", "--config", str(CONFIG), *TINY,
         f"run_dir={tmp_path}"],
        cwd=ROOT, env=env, capture_output=True, text=True, timeout=300,
    )
    out = done.stdout + done.stderr
    assert done.returncode == 0, out[-3000:]
    lr_lines = [line for line in out.splitlines() if "learning rate 0.001 used as given" in line]
    assert len(lr_lines) == 1, out[-3000:]  # printed once, by rank 0
    assert "2 process(es) x accumulation 2" in lr_lines[0] and "would be 0.004" in lr_lines[0]
    assert "effective batch 8" in lr_lines[0]

    ckpt = tmp_path / "checkpoints" / "last.ckpt"
    state = load_checkpoint(ckpt)
    assert state["global_step"] == 3
    assert state["optimizer_states"][0]["param_groups"][0]["initial_lr"] == 1e-3  # not rescaled
    data = state["ImageDataModule"]
    # 8 items per process = 4 batches per epoch; 3 steps x accumulation 2 = epoch 1, batch 2
    assert (data["num_replicas"], data["epoch"], data["batches_done"]) == (2, 1, 2)
    model = load_diffusion_checkpoint(ckpt)
    x = model.sample_images(2, generator=torch.Generator().manual_seed(0), steps=2)
    assert x.shape == (2, 3, 8, 8) and torch.isfinite(x).all()
