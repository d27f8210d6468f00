"""``trainer.precision``: bf16-mixed fits both stages on the CPU (tiny tensors: bf16 is slow on
CPU) with finite loss terms, the GAN and KL terms included; 16-mixed on the CPU is a config error
naming the key; on a CUDA machine 16-mixed fits both stages."""

from __future__ import annotations

import csv
import math
from pathlib import Path

import pytest
import tiny_configs
import torch

from ldm_smd.checkpoints import load_checkpoint
from ldm_smd.config import ConfigError
from ldm_smd.train import train

DEMO = tiny_configs.DEMO
QUIET = tiny_configs.QUIET + tiny_configs.tiny_data(batch=2, length=8)
PIXEL = QUIET + tiny_configs.tiny_pixel_unet()
GAN = "model.params.lossconfig.params"
AE = QUIET + [
    "model.params.ddconfig.ch=32", "model.params.ddconfig.resolution=8",
    "model.params.ddconfig.ch_mult=[1]",
    f"{GAN}.disc_weight=0.5", f"{GAN}.disc_start=0", f"{GAN}.disc_num_layers=1",
    f"{GAN}.disc_ndf=8", f"{GAN}.kl_weight=1.0",
]


def logged(run: Path) -> dict[str, list[float]]:
    values: dict[str, list[float]] = {}
    with open(run / "logs" / "metrics.csv") as f:
        for row in csv.DictReader(f):
            for k, v in row.items():
                if k.startswith("train/") and v:
                    values.setdefault(k, []).append(float(v))
    return values


def check_finite_run(run: Path, steps: int, terms: tuple[str, ...]) -> dict[str, list[float]]:
    values = logged(run)
    for term in terms:
        assert term in values, (term, sorted(values))
    assert all(math.isfinite(v) for vs in values.values() for v in vs), values
    state = load_checkpoint(run / "checkpoints" / "last.ckpt")
    assert state["global_step"] == steps
    weights = [v for v in state["state_dict"].values() if v.is_floating_point()]
    assert all(v.dtype in (torch.float32, torch.float64) for v in weights)  # master weights
    assert all(torch.isfinite(v).all() for v in weights)
    return values


def test_stage2_bf16_mixed_fits(tmp_path):
    base = [o for o in PIXEL if not o.startswith("model.params.network.")]
    train(DEMO / "ldm-smd.yaml", base + [
        f"run_dir={tmp_path}", "trainer.precision=bf16-mixed", "trainer.max_steps=2",
        "model.params.network.params.latent_dim=8",
        "model.params.network.params.backbone.params.in_channels=3",
        "model.params.network.params.backbone.params.out_channels=3",
        "model.params.network.params.backbone.params.model_channels=32",
        "model.params.network.params.backbone.params.channel_mult=[1]",
        "model.params.network.params.backbone.params.attention_resolutions=[]",
    ])
    check_finite_run(tmp_path, 2, ("train/loss",))


def test_stage1_bf16_mixed_fits_with_gan_and_kl_finite(tmp_path):
    train(DEMO / "autoencoder.yaml", AE + [
        f"run_dir={tmp_path}", "trainer.precision=bf16-mixed", "trainer.max_steps=4"])
    values = check_finite_run(tmp_path, 4, ("train/rec_loss",))
    assert any("kl" in k for k in values) and any("disc" in k or "g_loss" in k for k in values)


@pytest.mark.parametrize("precision", ["16-mixed", "16"])
def test_fp16_on_cpu_is_a_config_error_naming_the_key(tmp_path, precision):
    with pytest.raises(ConfigError, match=r"trainer\.precision.*needs a CUDA GPU.*bf16-mixed"):
        train(DEMO / "ldm-vanilla.yaml", PIXEL + [
            f"run_dir={tmp_path}", f"trainer.precision={precision}", "trainer.accelerator=cpu"])
    assert not (tmp_path / "checkpoints").exists()


@pytest.mark.skipif(not torch.cuda.is_available(), reason="16-mixed needs CUDA")
@pytest.mark.parametrize("stage", ["ldm-vanilla.yaml", "autoencoder.yaml"])
def test_fp16_mixed_on_cuda_fits_both_stages(tmp_path, stage):
    overrides = PIXEL if stage == "ldm-vanilla.yaml" else AE
    train(DEMO / stage, overrides + [
        f"run_dir={tmp_path}", "trainer.precision=16-mixed", "trainer.accelerator=gpu",
        "trainer.devices=1", "trainer.max_steps=4"])
    check_finite_run(tmp_path, 4, ())
