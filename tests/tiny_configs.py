"""Override lists that shrink a demo config to a run of seconds, shared by the tests."""

from __future__ import annotations

from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
DEMO = ROOT / "configs" / "demo"

# no progress bar, no model table, no TensorBoard; a CSV row every step
QUIET = [
    "trainer.enable_progress_bar=false",
    "trainer.enable_model_summary=false",
    "trainer.log_every_n_steps=1",
    "logging.tensorboard=false",
]


def tiny_data(*, batch: int, length: int, size: int = 8) -> list[str]:
    """Synthetic shapes of ``size`` pixels, ``length`` items, batches of ``batch``."""
    return [
        f"data.params.batch_size={batch}",
        f"data.params.train.params.size={size}",
        f"data.params.train.params.length={length}",
    ]


def tiny_pixel_unet(*, timesteps: int = 20) -> list[str]:
    """Pixel-space (identity first stage) 8x8 RGB diffusion with a one-level width-32 UNet,
    for ``configs/demo/ldm-vanilla.yaml``."""
    net = "model.params.network.params"
    return [
        "model.params.first_stage=identity",
        "model.params.image_size=8",
        "model.params.channels=3",
        f"{net}.in_channels=3",
        f"{net}.out_channels=3",
        f"{net}.model_channels=32",
        f"{net}.channel_mult=[1]",
        f"{net}.attention_resolutions=[]",
        f"model.params.schedule.params.num_timesteps={timesteps}",
        f"model.params.sampler.params.steps={timesteps}",
    ]
