"""SMD sampling stays finite, and the step sweep and 256-pixel latent sampling run end to end."""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import pytest
import torch

from ldm_smd.data.mixtures import GaussianMixture, ring_means
from ldm_smd.diffusion.objectives import build_objective
from ldm_smd.diffusion.samplers import sample
from ldm_smd.diffusion.schedule import NoiseSchedule
from ldm_smd.nn.mlp import MLPDenoiser
from ldm_smd.nn.smd import Hypernetwork, SMDNetwork
from ldm_smd.nn.unet import UNetModel
from ldm_smd.train import train

ROOT = Path(__file__).resolve().parents[2]


def _ring() -> GaussianMixture:
    return GaussianMixture(means=ring_means(8, radius=4.0).tolist(), stds=[0.1] * 8)


@pytest.mark.parametrize("bound", ["tanh", "none"])
@pytest.mark.parametrize("trained", [False, True])
def test_smd_sampling_is_finite_fresh_and_briefly_trained(bound, trained):
    torch.manual_seed(0)
    net = SMDNetwork(backbone=MLPDenoiser(dim=2, hidden=64, depth=3), latent_dim=16,
                     hypernet_bound=bound)
    hypernets = [m for m in net.modules() if isinstance(m, Hypernetwork)]
    # the authors' initialisation: the output map is non-zero, the modulation active at once
    assert hypernets and all(torch.count_nonzero(h.B) > 0 for h in hypernets)
    schedule = NoiseSchedule(kind="cosine", num_timesteps=5)
    if trained:
        objective = build_objective("smd_mixture", parameterization="v", num_eta_samples=4)
        opt = torch.optim.Adam(net.parameters(), lr=3e-3)
        g = torch.Generator().manual_seed(1)
        for _ in range(60):
            x0, _ = _ring().sample(128, generator=g)
            loss, _ = objective(net, x0, schedule=schedule, generator=g)
            opt.zero_grad()
            loss.backward()
            opt.step()
    net.eval()
    for sampler in ("ddpm", "ddim", "dpmpp"):
        x = sample(net, (512, 2), schedule=schedule, parameterization="v", sampler=sampler,
                   generator=torch.Generator().manual_seed(2))
        assert torch.isfinite(x).all(), (bound, trained, sampler)


def test_unet_smd_sampling_is_finite_for_wild_inputs():
    torch.manual_seed(0)
    backbone = UNetModel(in_channels=3, out_channels=3, model_channels=32, channel_mult=[1, 2],
                         num_res_blocks=1, attention_resolutions=[2], num_heads=2)
    with torch.no_grad():  # as if trained: no zero-initialised layer (the UNet's output conv)
        for param in backbone.parameters():
            if not param.any():
                param.normal_(0.0, 0.05)
    net = SMDNetwork(backbone=backbone, latent_dim=8, hypernet_init="default").eval()
    schedule = NoiseSchedule(kind="linear", num_timesteps=20)
    x_T = 50.0 * torch.randn(2, 3, 16, 16)
    # not the identity: at these inputs the prediction moves with eta and differs from the
    # backbone's own (with B = 0 or a zero output layer it would not, and the test would prove
    # nothing)
    t = torch.full((2,), 19)
    with torch.no_grad():
        a, b = (net(x_T, t, generator=torch.Generator().manual_seed(s)) for s in (1, 2))
        plain = backbone(x_T, t)
    assert (a - plain).abs().max() > 0.1 * plain.abs().max()
    assert not torch.equal(a, b)
    x = sample(net, x_T.shape, schedule=schedule, parameterization="eps", steps=20, x_T=x_T,
               generator=torch.Generator().manual_seed(0))
    assert torch.isfinite(x).all()


def test_latent_sampling_at_256_pixels_with_an_f8_first_stage(tmp_path):
    common = [
        "data.params.batch_size=1",
        "data.params.train.params.size=256",
        "data.params.train.params.length=4",
        "trainer.max_steps=1",
        "trainer.enable_progress_bar=false",
        "trainer.enable_model_summary=false",
        "logging.sample_every_n_steps=0",
    ]
    ae = train(ROOT / "configs/demo/autoencoder.yaml", common + [
        f"run_dir={tmp_path / 'ae'}", "model.params.ddconfig.ch=8",
        "model.params.ddconfig.ch_mult=[1,1,1,1]", "model.params.ddconfig.resolution=256",
        "model.params.log_images_every_n_steps=0",
    ])["checkpoint"]
    ldm = train(ROOT / "configs/demo/ldm-vanilla.yaml", common + [
        f"run_dir={tmp_path / 'ldm'}", f"model.params.first_stage={ae}",
        "model.params.scale_factor=1.0", "model.params.image_size=32",
        "model.params.network.params.model_channels=16",
        "model.params.network.params.num_head_channels=16",
        "model.params.schedule.params.num_timesteps=4",
    ])["checkpoint"]
    from ldm_smd.sample import sample_to_dir

    out = sample_to_dir(ldm, tmp_path / "s", n=1, steps=2, sampler="dpmpp", progress=False)
    import numpy as np

    assert np.load(out["npz"])["images"].shape == (1, 256, 256, 3)


def test_sweep_steps_script_writes_table_and_plot(tmp_path, monkeypatch):
    pytest.importorskip("matplotlib")
    from ldm_smd.eval.inception import build_fid_inception

    weights = tmp_path / "inception.pth"
    torch.manual_seed(0)
    torch.save(build_fid_inception().state_dict(), weights)
    ckpt = train(ROOT / "configs/demo/ldm-vanilla.yaml", [
        f"run_dir={tmp_path / 'px'}", "model.params.first_stage=identity",
        "model.params.image_size=16", "model.params.channels=3",
        "model.params.network.params.in_channels=3", "model.params.network.params.out_channels=3",
        "model.params.network.params.model_channels=16",
        "model.params.network.params.num_head_channels=16",
        "model.params.schedule.params.num_timesteps=8", "data.params.batch_size=2",
        "data.params.train.params.size=16", "data.params.train.params.length=8",
        "trainer.max_steps=1", "trainer.enable_progress_bar=false",
        "logging.sample_every_n_steps=0",
    ])["checkpoint"]
    ref = tmp_path / "ref"
    ref.mkdir()
    from ldm_smd.data.synthetic import SyntheticShapes
    from ldm_smd.images import save_singles

    data = SyntheticShapes(size=16, length=6, seed=3)
    save_singles(torch.stack([data[i]["image"] for i in range(6)]), ref)
    spec = importlib.util.spec_from_file_location("sweep_steps", ROOT / "scripts/sweep_steps.py")
    sweep = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(sweep)
    monkeypatch.setenv("LDM_SMD_CACHE", str(tmp_path / "cache"))
    args = sweep.parse_args([
        "--ckpt", f"vanilla={ckpt}", "--steps", "2", "4", "--out-dir", str(tmp_path / "sw"),
        "--ref", str(ref), "--n", "6", "--min-samples", "2", "--inception-weights", str(weights),
        "--batch-size", "3", "--eval-batch-size", "6",
    ])
    sweep.run_sweep(args)
    out = tmp_path / "sw"
    assert (out / "sweep.png").is_file() and (out / "sweep.md").is_file()
    rows = json.loads((out / "sweep.json").read_text())
    assert len(rows["rows"] if isinstance(rows, dict) else rows) == 2
