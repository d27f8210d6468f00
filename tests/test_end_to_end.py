"""Both stages for a handful of steps through the real entry points, then sampling to files."""

from __future__ import annotations

import hashlib
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from ldm_smd.cli import main as cli
from ldm_smd.sample import load_diffusion_checkpoint, sample_to_dir
from ldm_smd.train import train

ROOT = Path(__file__).resolve().parents[1]
DEMO = ROOT / "configs" / "demo"

TINY_DATA = [
    "data.params.batch_size=4",
    "data.params.train.params.size=16",
    "data.params.train.params.length=64",
    "trainer.log_every_n_steps=1",
]
TINY_AE = TINY_DATA + [
    "model.params.ddconfig.ch=32",
    "model.params.ddconfig.resolution=16",
    "model.params.ddconfig.ch_mult=[1,1]",
    "trainer.max_steps=3",
    "trainer.enable_progress_bar=false",
    "trainer.enable_model_summary=false",
]


def tiny_ldm(run_dir: Path, ae_ckpt: Path, objective: str, smd: bool) -> list[str]:
    net = "model.params.network.params.backbone.params" if smd else "model.params.network.params"
    overrides = TINY_DATA + [
        f"run_dir={run_dir}",
        f"model.params.first_stage={ae_ckpt}",
        "model.params.scale_factor=1.0",
        "model.params.image_size=8",
        "model.params.schedule.params.num_timesteps=10",
        "model.params.sampler.params.steps=10",
        f"model.params.objective={{target: ldm_smd.diffusion.objectives.{objective}}}",
        f"{net}.model_channels=32",
        "trainer.max_steps=3",
        "trainer.enable_progress_bar=false",
        "trainer.enable_model_summary=false",
        "logging.sample_every_n_steps=2",
        "logging.sample_n=4",
    ]
    if smd:
        overrides.append("model.params.network.params.latent_dim=8")
    return overrides


@pytest.fixture(scope="module")
def autoencoder_ckpt(tmp_path_factory) -> Path:
    run = tmp_path_factory.mktemp("ae")
    result = train(DEMO / "autoencoder.yaml", TINY_AE + [f"run_dir={run}"])
    assert (run / "config.yaml").is_file()
    assert any((run / "logs").rglob("metrics.csv"))
    return result["checkpoint"]


@pytest.mark.parametrize("config,objective,smd", [
    ("ldm-smd.yaml", "DenoisingObjective", True),  # the paper's objective: SMD by the network
    ("ldm-smd.yaml", "MixtureObjective", True),
    ("ldm-vanilla.yaml", "DenoisingObjective", False),
])
def test_two_stages_then_sample(tmp_path, autoencoder_ckpt, config, objective, smd):
    run = tmp_path / "ldm"
    result = train(DEMO / config, tiny_ldm(run, autoencoder_ckpt, objective, smd))
    ckpt = result["checkpoint"]
    assert ckpt.is_file()
    assert (run / "samples" / "step_000002.png").is_file()
    model = load_diffusion_checkpoint(ckpt)
    assert type(model.model.diffusion_model).__name__ == ("SMDNetwork" if smd else "UNetModel")
    out = sample_to_dir(ckpt, tmp_path / "s", n=3, seed=5, batch_size=3, progress=False)
    images = np.load(out["npz"])["images"]
    assert images.shape == (3, 16, 16, 3) and images.dtype == np.uint8
    assert Image.open(out["grid"]).size[0] > 16
    assert len(list((tmp_path / "s" / "images").glob("*.png"))) == 3


def test_sample_cli_same_seed_same_files_any_batch_size(tmp_path, autoencoder_ckpt):
    run = tmp_path / "ldm"
    overrides = tiny_ldm(run, autoencoder_ckpt, "DenoisingObjective", True)
    ckpt = train(DEMO / "ldm-smd.yaml", overrides)["checkpoint"]

    def digest(folder: Path) -> list[str]:
        return [hashlib.sha256(p.read_bytes()).hexdigest()
                for p in sorted((folder / "images").glob("*.png"))]

    for name, batch in (("a", 4), ("b", 4), ("c", 2)):
        code = cli(["sample", "--ckpt", str(ckpt), "--n", "4", "--steps", "5", "--seed", "3",
                    "--batch-size", str(batch), "--out", str(tmp_path / name), "--no-progress"])
        assert code == 0
    assert digest(tmp_path / "a") == digest(tmp_path / "b") == digest(tmp_path / "c")
    assert (tmp_path / "a" / "grid.png").read_bytes() == (tmp_path / "c" / "grid.png").read_bytes()
    code = cli(["sample", "--ckpt", str(ckpt), "--n", "4", "--steps", "5", "--seed", "4",
                "--out", str(tmp_path / "d"), "--no-progress"])
    assert code == 0 and digest(tmp_path / "d") != digest(tmp_path / "a")


def test_pixel_space_backbone_swap_is_one_key(tmp_path):
    overrides = TINY_DATA + [
        f"run_dir={tmp_path / 'px'}",
        "model.params.first_stage=identity",
        "model.params.image_size=16",
        "model.params.channels=3",
        "model.params.network.params.in_channels=3",
        "model.params.network.params.out_channels=3",
        "model.params.network.params.model_channels=32",
        "model.params.schedule.params.num_timesteps=10",
        "model.params.clip_x0=true",
        "trainer.max_steps=2",
        "trainer.enable_progress_bar=false",
    ]
    ckpt = train(DEMO / "ldm-vanilla.yaml", overrides)["checkpoint"]
    model = load_diffusion_checkpoint(ckpt)
    assert model.first_stage_model.is_identity
    x = model.sample_images(2, generator=torch.Generator().manual_seed(0), steps=3)
    assert x.shape == (2, 3, 16, 16) and torch.isfinite(x).all()


def test_cli_reports_bad_config_key(tmp_path, capsys):
    code = cli(["train", "--config", str(DEMO / "ldm-smd.yaml"), "model.params.learning_rat=1"])
    assert code == 2
    err = capsys.readouterr().err
    assert "model.params.learning_rat" in err and "learning_rate" in err


def test_scale_factor_command_prints_and_writes(tmp_path, autoencoder_ckpt, capsys):
    import shutil

    import yaml

    target = tmp_path / "ldm.yaml"
    shutil.copy(DEMO / "ldm-smd.yaml", target)
    code = cli(["scale-factor", "--ckpt", str(autoencoder_ckpt), "--config",
                str(DEMO / "autoencoder.yaml"), "--batches", "2", "--write", str(target)])
    assert code == 0
    printed = float(capsys.readouterr().out.strip().splitlines()[-1])
    assert printed > 0
    written = yaml.safe_load(target.read_text())["model"]["params"]["scale_factor"]
    assert written == pytest.approx(printed, rel=1e-5)
    assert "# Stage 2 of the two-stage example" in target.read_text()  # comments kept
