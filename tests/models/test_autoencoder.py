"""The KL autoencoder network and its stage-1 Lightning module."""

from pathlib import Path

import lightning as L
import pytest
import torch
from torch.utils.data import DataLoader, Dataset

from ldm_smd.convert import load_first_stage
from ldm_smd.models.autoencoder import AutoencoderKL as AutoencoderModule
from ldm_smd.nn.autoencoder import AutoencoderKL, DiagonalGaussianDistribution, check_ddconfig


def tiny_ddconfig(levels: int = 2, **overrides):
    config = dict(ch=32, ch_mult=[1] + [2] * (levels - 1), num_res_blocks=1, attn_resolutions=[],
                  z_channels=4, double_z=True, resolution=16, in_channels=3, out_ch=3,
                  dropout=0.0)
    config.update(overrides)
    return config


@pytest.mark.parametrize("levels, factor", [(2, 2), (3, 4), (4, 8)])
def test_encode_decode_shapes(levels, factor):
    torch.manual_seed(0)
    ae = AutoencoderKL(ddconfig=tiny_ddconfig(levels, attn_resolutions=[8]), embed_dim=3)
    assert ae.downsampling_factor == factor
    x = torch.rand(2, 3, 16, 16) * 2 - 1
    posterior = ae.encode(x)
    assert posterior.mean.shape == (2, 3, 16 // factor, 16 // factor)
    assert ae.decode(posterior.sample()).shape == x.shape
    recon, post = ae(x, sample_posterior=False)
    assert recon.shape == x.shape and torch.equal(post.mode(), post.mean)


def test_attention_blocks_placed_at_requested_resolution():
    ae = AutoencoderKL(ddconfig=tiny_ddconfig(3, attn_resolutions=[8]), embed_dim=4)
    keys = ae.state_dict().keys()
    assert any(k.startswith("encoder.down.1.attn.0.") for k in keys)
    assert not any(k.startswith("encoder.down.0.attn.") for k in keys)
    assert any(k.startswith("decoder.up.1.attn.1.") for k in keys)  # num_res_blocks + 1 blocks
    assert not any(k.startswith("decoder.up.1.attn.2.") for k in keys)
    assert "decoder.conv_out.weight" in keys and "quant_conv.weight" in keys


def test_ddconfig_validation_names_the_key():
    with pytest.raises(ValueError, match="unknown keys \\['chmult'\\]"):
        check_ddconfig({**tiny_ddconfig(), "chmult": [1]})
    with pytest.raises(ValueError, match="missing keys \\['z_channels'\\]"):
        check_ddconfig({k: v for k, v in tiny_ddconfig().items() if k != "z_channels"})


def test_kl_of_standard_normal_posterior_is_zero_and_positive_otherwise():
    zeros = torch.zeros(2, 8, 4, 4)
    assert torch.allclose(DiagonalGaussianDistribution(zeros).kl(), torch.zeros(2))
    shifted = zeros.clone()
    shifted[:, :4] = 1.0  # mean 1, var 1: KL = 0.5 per element
    assert torch.allclose(DiagonalGaussianDistribution(shifted).kl(), torch.full((2,), 32.0))
    p = DiagonalGaussianDistribution(torch.randn(2, 8, 4, 4))
    assert torch.allclose(p.kl(p), torch.zeros(2), atol=1e-5)


def test_posterior_sample_follows_generator():
    p = DiagonalGaussianDistribution(torch.randn(3, 8, 4, 4))
    a = p.sample(torch.Generator().manual_seed(1))
    b = p.sample(torch.Generator().manual_seed(1))
    c = p.sample(torch.Generator().manual_seed(2))
    assert torch.equal(a, b) and not torch.equal(a, c)
    rows = [torch.Generator().manual_seed(5 + i) for i in range(3)]
    per_row = p.sample(rows)
    alone = DiagonalGaussianDistribution(p.mean[1:2].repeat(1, 2, 1, 1) * 0)  # zero-mean, std 1
    assert per_row.shape == a.shape
    assert torch.allclose(
        (per_row[1] - p.mean[1]) / p.std[1],
        alone.sample(torch.Generator().manual_seed(6))[0],
        atol=1e-5,
    )


class RandomImages(Dataset):
    def __len__(self):
        return 4

    def __getitem__(self, i):
        return {"image": torch.rand(3, 16, 16, generator=torch.Generator().manual_seed(i)) * 2 - 1}


def _fit(tmp_path: Path, loss_params: dict, steps: int = 2):
    torch.manual_seed(0)
    module = AutoencoderModule(
        ddconfig=tiny_ddconfig(2), embed_dim=4, learning_rate=1e-3, log_images_n=2,
        lossconfig={"target": "ldm_smd.models.losses.LPIPSWithDiscriminator",
                    "params": {"disc_ndf": 8, "disc_num_layers": 2, **loss_params}},
    )
    before = {k: v.clone() for k, v in module.state_dict().items()}
    trainer = L.Trainer(
        max_steps=steps, accelerator="cpu", logger=False, enable_checkpointing=False,
        enable_progress_bar=False, enable_model_summary=False, default_root_dir=str(tmp_path),
        limit_val_batches=1, num_sanity_val_steps=0,
    )
    loader = DataLoader(RandomImages(), batch_size=2)
    trainer.fit(module, loader, loader)
    return module, trainer, before


def test_fit_without_gan_or_lpips(tmp_path):
    module, trainer, before = _fit(tmp_path, {"perceptual_weight": 0.0, "disc_weight": 0.0})
    assert not hasattr(module.loss, "perceptual_loss") and not hasattr(module.loss, "discriminator")
    assert len(trainer.optimizers) == 1
    assert not torch.equal(before["decoder.conv_out.weight"], module.decoder.conv_out.weight)
    metrics = trainer.callback_metrics
    assert "train/g_loss" not in metrics and torch.isfinite(metrics["train/nll_loss"])
    assert (tmp_path / "reconstructions" / "val_step_000002.png").is_file()
    # CompVis first-stage layout, loadable without unpickling code
    path = tmp_path / "ae.ckpt"
    trainer.save_checkpoint(str(path))
    ckpt = torch.load(path, weights_only=True)
    prefixes = {k.split(".")[0] for k in ckpt["state_dict"]}
    assert prefixes == {"encoder", "decoder", "quant_conv", "post_quant_conv", "loss"}
    assert ckpt["hyper_parameters"]["ddconfig"]["ch_mult"] == [1, 2]
    assert ckpt["hyper_parameters"]["lossconfig"]["params"]["disc_weight"] == 0.0
    # and it is a first stage for stage 2
    autoencoder, scale = load_first_stage(path)
    assert scale is None and not autoencoder.training
    x = torch.rand(2, 3, 16, 16) * 2 - 1
    module.eval()
    with torch.no_grad():
        assert torch.equal(autoencoder.decode(autoencoder.encode(x).mean),
                           module.autoencoder.decode(module.autoencoder.encode(x).mean))


def test_fit_with_gan_and_random_trunk_lpips(tmp_path):
    module, trainer, before = _fit(
        tmp_path,
        {"perceptual_weight": 1.0, "perceptual_trunk": "random", "disc_start": 0,
         "disc_loss": "vanilla"},
        steps=4,  # global_step counts both optimisers: 2 batches
    )
    metrics = trainer.callback_metrics
    for key in ("train/g_loss", "train/d_weight", "train/disc_loss", "train/p_loss"):
        assert torch.isfinite(metrics[key]), key
    assert metrics["train/d_weight"] > 0
    d_key = "loss.discriminator.main.0.weight"
    assert not torch.equal(before[d_key], module.state_dict()[d_key])
    lpips_key = next(k for k in before if k.startswith("loss.perceptual_loss.net."))
    assert torch.equal(before[lpips_key], module.state_dict()[lpips_key])  # LPIPS stays frozen


def test_gan_waits_for_disc_start(tmp_path):
    module, trainer, before = _fit(
        tmp_path, {"perceptual_weight": 0.0, "disc_start": 100}, steps=2
    )
    assert len(trainer.optimizers) == 2 and "train/disc_loss" not in trainer.callback_metrics
    d_key = "loss.discriminator.main.0.weight"
    assert torch.equal(before[d_key], module.state_dict()[d_key])


def test_batch_without_image_key_is_a_clear_error():
    module = AutoencoderModule(ddconfig=tiny_ddconfig(2), embed_dim=4,
                               lossconfig={"params": {"perceptual_weight": 0.0}})
    with pytest.raises(KeyError, match="'image'"):
        module.log_images({"img": torch.zeros(1, 3, 16, 16)})
    out = module.log_images({"image": torch.zeros(3, 3, 16, 16)}, n=2)
    assert out["reconstructions"].shape == (2, 3, 16, 16)


def test_channels_of_reconstruction_and_discriminator_must_match_the_input():
    gan = {"params": {"perceptual_weight": 0.0, "disc_ndf": 8, "disc_num_layers": 2}}
    gray = tiny_ddconfig(2, in_channels=1, out_ch=1)
    module = AutoencoderModule(ddconfig=gray, embed_dim=4, lossconfig={
        "params": {**gan["params"], "disc_in_channels": 1}})
    assert module.image_channels() == (1, "model.params.ddconfig.in_channels")
    out = module.log_images({"image": torch.zeros(2, 1, 16, 16)})
    assert out["reconstructions"].shape == (2, 1, 16, 16)
    with pytest.raises(ValueError, match="disc_in_channels=3 differs from "
                                         "model.params.ddconfig.in_channels=1"):
        AutoencoderModule(ddconfig=gray, embed_dim=4, lossconfig=gan)
    with pytest.raises(ValueError, match="out_ch=3 differs from .*in_channels=1"):
        AutoencoderModule(ddconfig=tiny_ddconfig(2, in_channels=1), embed_dim=4,
                          lossconfig={"params": {"perceptual_weight": 0.0, "disc_weight": 0.0}})
