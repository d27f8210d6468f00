"""Every shipped training config builds and runs one training step on CPU (with tiny overrides).

The overrides shrink widths and swap the data for the built-in synthetic set; everything else —
targets, schedules, objectives, SMD settings, loss terms — is exercised as shipped.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml

from ldm_smd.train import train

ROOT = Path(__file__).resolve().parents[1]
CONFIGS = sorted(
    p.relative_to(ROOT / "configs")
    for p in (ROOT / "configs").rglob("*.yaml")
    if p.parent.name in ("demo", "autoencoder", "pixel-diffusion", "latent-diffusion")
)
COMMON = [
    "data.params.batch_size=2",
    "data.params.num_workers=0",
    "data.params.pin_memory=false",
    "~data.params.validation",
    "trainer.max_steps=1",
    "trainer.accelerator=cpu",
    "trainer.limit_val_batches=0",
    "trainer.enable_progress_bar=false",
    "trainer.enable_model_summary=false",
    "logging.sample_every_n_steps=0",
]


def synthetic(size: int) -> list[str]:
    return [
        "data.params.train={target: ldm_smd.data.synthetic.SyntheticShapes, "
        f"params: {{size: {size}, length: 8}}}}",
    ]


def tiny_autoencoder(size: int, levels: int) -> list[str]:
    mult = ",".join(["1"] * levels)
    return [
        "model.params.ddconfig.ch=32",
        f"model.params.ddconfig.ch_mult=[{mult}]",
        "model.params.ddconfig.num_res_blocks=1",
        f"model.params.ddconfig.resolution={size}",
        "model.params.ddconfig.attn_resolutions=[]",
    ]


@pytest.fixture(scope="module")
def first_stages(tmp_path_factory) -> dict[int, Path]:
    """Tiny stage-1 checkpoints with downsampling factors 4 and 8, trained for one step."""
    out = {}
    for factor, levels in ((4, 3), (8, 4)):
        run = tmp_path_factory.mktemp(f"ae-f{factor}")
        overrides = COMMON + synthetic(32) + tiny_autoencoder(32, levels) + [
            f"run_dir={run}", "model.params.lossconfig.params.perceptual_weight=0",
        ]
        demo = ROOT / "configs/demo/autoencoder.yaml"
        overrides = _without_missing(yaml.safe_load(demo.read_text()), overrides)
        out[factor] = train(demo, overrides)["checkpoint"]
    return out


def _without_missing(config: dict, overrides: list[str]) -> list[str]:
    """Drop deletions (``~key``) of keys the config does not have."""
    kept = []
    for item in overrides:
        if item.startswith("~"):
            node = config
            for part in item[1:].split("."):
                node = node.get(part) if isinstance(node, dict) else None
            if node is None:
                continue
        kept.append(item)
    return kept


@pytest.mark.parametrize("name", [str(c) for c in CONFIGS])
def test_config_runs_one_training_step(name, tmp_path, first_stages):
    path = ROOT / "configs" / name
    config = yaml.safe_load(path.read_text())
    params = config["model"]["params"]
    overrides = COMMON + [f"run_dir={tmp_path / 'run'}"]
    if config["model"]["target"].endswith("AutoencoderKL"):
        levels = len(params["ddconfig"]["ch_mult"])
        overrides += synthetic(32) + tiny_autoencoder(32, levels) + [
            "model.params.lossconfig.params.perceptual_trunk=random",
            "model.params.lossconfig.params.disc_start=0",
            "model.params.lossconfig.params.disc_ndf=8",
        ]
    else:
        smd = params["network"]["target"].endswith("SMDNetwork")
        net = "model.params.network.params" + (".backbone.params" if smd else "")
        channels = params["channels"]
        if params["first_stage"] == "identity":
            size, overrides = 16, overrides + synthetic(16)
        else:
            factor = 8 if "kl-f8" in params["first_stage"] else 4
            ckpt = first_stages[factor]
            channels = 4
            size = 32 // factor
            overrides += synthetic(32) + [f"model.params.first_stage={ckpt}",
                                          "model.params.scale_factor=0.5",
                                          f"model.params.channels={channels}",
                                          f"{net}.in_channels={channels}",
                                          f"{net}.out_channels={channels}"]
        overrides += [
            f"model.params.image_size={size}",
            f"{net}.model_channels=32",
            f"{net}.channel_mult=[1,2]",
            f"{net}.num_res_blocks=1",
            f"{net}.attention_resolutions=[2]",
            f"{net}.num_heads=2",
            f"{net}.num_head_channels=-1",
            "model.params.schedule.num_timesteps=10",
        ]
        if smd:
            overrides.append("model.params.network.params.latent_dim=8")
    result = train(path, _without_missing(config, overrides))
    assert result["trainer"].global_step >= 1
    assert result["checkpoint"].is_file()
