"""Grayscale end to end: MNIST-5k through stage 1, pixel-space and latent stage 2, sampling to
one-channel files; data and model disagreeing about channels is a config error before any step."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from ldm_smd.config import ConfigError
from ldm_smd.sample import sample_to_dir
from ldm_smd.train import train

ROOT = Path(__file__).resolve().parents[1]
AUTOENCODER = ROOT / "configs" / "autoencoder" / "mnist5k-kl-f4.yaml"
PIXEL = ROOT / "configs" / "pixel-diffusion" / "mnist5k-vanilla.yaml"
LATENT = ROOT / "configs" / "demo" / "ldm-vanilla.yaml"
QUIET = ["trainer.enable_progress_bar=false", "trainer.enable_model_summary=false",
         "logging.tensorboard=false"]


def data(root: Path, config: Path = PIXEL) -> list[str]:
    """The shipped config's data, read from the session's prepared folder."""
    overrides = [f"data.params.train.params.root={root}", "data.params.batch_size=4",
                 "trainer.limit_val_batches=0"]
    if config == AUTOENCODER:  # it validates on the held-out split
        overrides.append(f"data.params.validation.params.root={root}")
    return overrides


def tiny_network(prefix: str = "model.params.network.params") -> list[str]:
    return [f"{prefix}.model_channels=16", f"{prefix}.channel_mult=[1,2]",
            f"{prefix}.attention_resolutions=[2]", f"{prefix}.num_head_channels=16",
            "model.params.schedule.params.num_timesteps=10", "model.params.sampler.params.steps=10"]


def assert_gray_png(path: Path, size: tuple[int, int] | None = None) -> None:
    with Image.open(path) as image:
        assert image.mode == "L", path
        assert size is None or image.size == size


@pytest.fixture(scope="module")
def gray_autoencoder(mnist5k_root, tmp_path_factory) -> Path:
    run = tmp_path_factory.mktemp("ae")
    result = train(AUTOENCODER, data(mnist5k_root, AUTOENCODER) + QUIET + [
        f"run_dir={run}", "model.params.ddconfig.ch=16", "trainer.max_steps=2",
        "model.params.log_images_every_n_steps=1", "model.params.log_images_n=2",
    ])
    reconstructions = sorted((run / "reconstructions").glob("train_step_*.png"))
    assert reconstructions, "no reconstruction grid was written"
    assert_gray_png(reconstructions[0], (2 * 34 + 2, 2 * 34 + 2))  # inputs over reconstructions
    return result["checkpoint"]


def test_pixel_space_model_trains_and_samples_one_channel(mnist5k_root, tmp_path):
    run = tmp_path / "run"
    result = train(PIXEL, data(mnist5k_root) + QUIET + tiny_network() + [
        f"run_dir={run}", "trainer.max_steps=2", "logging.sample_every_n_steps=2",
        "logging.sample_n=4",
    ])
    assert_gray_png(run / "samples" / "step_000002.png")
    out = sample_to_dir(result["checkpoint"], tmp_path / "s", n=3, batch_size=3, progress=False)
    assert_gray_png(out["grid"])
    for single in sorted(out["images"].glob("*.png")):
        assert_gray_png(single, (32, 32))
    with np.load(out["npz"]) as arrays:
        assert arrays["images"].shape == (3, 32, 32, 1) and arrays["images"].dtype == np.uint8


def test_latent_model_on_a_grayscale_first_stage(gray_autoencoder, mnist5k_root, tmp_path):
    stage2 = QUIET + tiny_network() + [
        f"model.params.first_stage={gray_autoencoder}", "model.params.scale_factor=1.0",
        "trainer.max_steps=1", "logging.sample_every_n_steps=0",
    ]
    # the demo's data are RGB shapes: refused before anything is written
    with pytest.raises(ConfigError, match=r"the data gives 3-channel images .*"
                       r"model.params.first_stage \(.*ddconfig.in_channels\) is 1"):
        train(LATENT, stage2 + [f"run_dir={tmp_path / 'refused'}"])
    assert not (tmp_path / "refused").exists()
    mnist = [f"data.params.train={{target: ldm_smd.data.mnist5k.MNIST5k, params: "
             f"{{root: {mnist5k_root}}}}}", "data.params.batch_size=4"]
    result = train(LATENT, stage2 + mnist + [f"run_dir={tmp_path / 'ldm'}"])
    out = sample_to_dir(result["checkpoint"], tmp_path / "s", n=2, batch_size=2, progress=False)
    with np.load(out["npz"]) as arrays:
        assert arrays["images"].shape == (2, 32, 32, 1)
    assert_gray_png(out["grid"])


@pytest.mark.parametrize("config, override, key", [
    (AUTOENCODER, ["model.params.ddconfig.in_channels=3", "model.params.ddconfig.out_ch=3",
                   "model.params.lossconfig.params.disc_in_channels=3"],
     "model.params.ddconfig.in_channels is 3"),
    (PIXEL, ["model.params.channels=3"], "model.params.channels is 3"),
])
def test_one_channel_data_for_a_three_channel_model_is_refused(
        mnist5k_root, tmp_path, config, override, key):
    run = tmp_path / "run"
    with pytest.raises(ConfigError, match=f"the data gives 1-channel images .*{key}"):
        train(config, data(mnist5k_root, config) + QUIET + override + [f"run_dir={run}"])
    assert not run.exists()
