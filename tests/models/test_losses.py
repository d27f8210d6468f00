"""Stage-1 loss: LPIPS offline, GAN switches, adaptive weight, bf16."""

import pytest
import torch

from ldm_smd.models.losses import (
    PERCEPTUAL_OFF,
    LPIPSWithDiscriminator,
    build_lpips,
    hinge_d_loss,
    vanilla_d_loss,
    vgg16_path,
)
from ldm_smd.nn.autoencoder import AutoencoderKL, DiagonalGaussianDistribution
from ldm_smd.nn.discriminator import NLayerDiscriminator

DDCONFIG = dict(ch=32, ch_mult=[1, 2], num_res_blocks=1, attn_resolutions=[], z_channels=4,
                double_z=True, resolution=16, in_channels=3, out_ch=3, dropout=0.0)


@pytest.fixture(scope="module")
def random_lpips():
    return build_lpips("random")


def test_missing_vgg_file_is_reported_before_training(tmp_path, monkeypatch):
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "empty_home"))
    expected = tmp_path / "empty_home" / "hub" / "checkpoints" / "vgg16-397923af.pth"
    assert vgg16_path() == expected
    with pytest.raises(FileNotFoundError) as info:
        LPIPSWithDiscriminator(perceptual_weight=1.0)
    message = str(info.value)
    assert str(expected) in message and PERCEPTUAL_OFF in message
    assert PERCEPTUAL_OFF == "model.params.lossconfig.params.perceptual_weight=0"
    # without the perceptual term nothing is needed
    loss = LPIPSWithDiscriminator(perceptual_weight=0.0)
    assert not hasattr(loss, "perceptual_loss")


def test_vgg_trunk_is_read_from_torch_home(tmp_path, monkeypatch, random_lpips):
    # a torchvision-style state dict (features.* only: the classifier is not needed)
    state = {}
    for name, value in random_lpips.net.state_dict().items():
        _, index, kind = name.split(".")  # slice{k}.{index}.{weight|bias}
        state[f"features.{index}.{kind}"] = value.clone()
    home = tmp_path / "home"
    (home / "hub" / "checkpoints").mkdir(parents=True)
    torch.save(state, home / "hub" / "checkpoints" / "vgg16-397923af.pth")
    monkeypatch.setenv("TORCH_HOME", str(home))
    loaded = build_lpips("hub")
    assert torch.equal(loaded.net.slice3.get_parameter("14.weight"), state["features.14.weight"])
    assert not any(p.requires_grad for p in loaded.parameters()) and not loaded.training
    x, y = torch.rand(2, 3, 16, 16) * 2 - 1, torch.rand(2, 3, 16, 16) * 2 - 1
    assert torch.allclose(loaded(x, y), random_lpips(x, y))


def test_lpips_uses_the_packaged_linear_weights(random_lpips):
    import lpips

    packaged = torch.load(f"{lpips.__path__[0]}/weights/v0.1/vgg.pth", weights_only=True,
                          map_location="cpu")
    assert torch.equal(random_lpips.lin2.model[1].weight, packaged["lin2.model.1.weight"])
    x = torch.rand(1, 3, 16, 16) * 2 - 1
    assert random_lpips(x, x).abs().max() == 0
    assert random_lpips(x, -x).item() > 0


def test_gan_losses():
    real, fake = torch.full((4,), 2.0), torch.full((4,), -2.0)
    assert hinge_d_loss(real, fake) == 0  # confident and right: no hinge loss
    assert torch.isclose(hinge_d_loss(-real, -fake), torch.tensor(3.0))
    assert vanilla_d_loss(real, fake) < vanilla_d_loss(-real, -fake)
    with pytest.raises(ValueError, match="disc_loss"):
        LPIPSWithDiscriminator(perceptual_weight=0.0, disc_loss="wasserstein")


def test_discriminator_gives_patch_logits():
    disc = NLayerDiscriminator(input_nc=3, ndf=8, n_layers=3)
    assert disc(torch.randn(2, 3, 64, 64)).shape == (2, 1, 6, 6)
    assert disc.main[0].weight.std() < 0.05  # N(0, 0.02) initialisation


def _setup(**params):
    torch.manual_seed(0)
    ae = AutoencoderKL(ddconfig=DDCONFIG, embed_dim=4)
    loss = LPIPSWithDiscriminator(disc_ndf=8, disc_num_layers=2, **params)
    x = torch.rand(2, 3, 16, 16) * 2 - 1
    return ae, loss, x


def test_adaptive_weight_is_finite_positive_and_scaled():
    ae, loss, x = _setup(perceptual_weight=0.0, disc_start=0, disc_weight=0.5)
    recon, posterior = ae(x, generator=torch.Generator().manual_seed(0))
    total, logs = loss.generator_loss(x, recon, posterior, step=0, last_layer=ae.last_layer())
    d_weight = logs["train/d_weight"]
    assert torch.isfinite(d_weight) and 0 < d_weight <= 0.5 * 1e4
    nll = logs["train/nll_loss"] + loss.kl_weight * logs["train/kl_loss"]
    expected = nll + d_weight * logs["train/g_loss"]
    assert torch.allclose(total.detach(), expected, rtol=1e-5)
    total.backward()
    assert ae.decoder.conv_out.weight.grad is not None
    # the weight is proportional to disc_weight
    loss.discriminator_weight = 1.0
    again = loss.calculate_adaptive_weight(
        *_nll_and_g(loss, ae, x), ae.last_layer()
    )
    assert torch.isfinite(again) and again > 0


def _nll_and_g(loss, ae, x):
    recon = ae.decode(ae.encode(x).mode())
    nll = (x - recon).abs().sum()
    return nll, -loss.discriminator(recon).mean()


def test_gan_off_before_disc_start_and_when_weight_zero():
    ae, loss, x = _setup(perceptual_weight=0.0, disc_start=10)
    recon, posterior = ae(x)
    _, logs = loss.generator_loss(x, recon, posterior, step=9, last_layer=ae.last_layer())
    assert "train/g_loss" not in logs
    d_loss, _ = loss.discriminator_loss(x, recon, step=9)
    assert d_loss == 0
    _, logs = loss.generator_loss(x, recon, posterior, step=10, last_layer=ae.last_layer())
    assert "train/g_loss" in logs
    off = LPIPSWithDiscriminator(perceptual_weight=0.0, disc_weight=0.0, disc_start=0)
    assert not off.gan_active(10**6) and not hasattr(off, "discriminator")


def test_learned_logvar_and_kl_weight():
    ae, loss, x = _setup(perceptual_weight=0.0, disc_weight=0.0, kl_weight=0.0, logvar_init=1.0)
    recon, posterior = ae(x)
    total, logs = loss.generator_loss(x, recon, posterior, step=0)
    l1_sum = (x - recon).abs().sum() / 2
    n = x[0].numel()
    assert torch.allclose(total, l1_sum / torch.e + n, rtol=1e-5)
    total.backward()
    assert loss.logvar.grad is not None and loss.logvar.requires_grad
    fixed = LPIPSWithDiscriminator(perceptual_weight=0.0, learn_logvar=False)
    assert not fixed.logvar.requires_grad


def test_perceptual_term_with_random_trunk(random_lpips, monkeypatch):
    ae, loss, x = _setup(perceptual_weight=0.0, disc_weight=0.0)
    loss.perceptual_weight = 1.0
    loss.perceptual_loss = random_lpips
    recon, posterior = ae(x)
    total, logs = loss.generator_loss(x, recon, posterior, step=0)
    assert logs["train/p_loss"] > 0 and torch.isfinite(total)
    total.backward()
    assert ae.decoder.conv_out.weight.grad.abs().sum() > 0


def test_gan_and_kl_terms_finite_under_bf16_autocast():
    ae, loss, x = _setup(perceptual_weight=0.0, disc_start=0)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        recon, posterior = ae(x[:1])
        total, logs = loss.generator_loss(x[:1], recon, posterior, step=0,
                                          last_layer=ae.last_layer())
        d_loss, d_logs = loss.discriminator_loss(x[:1], recon, step=0)
    for key in ("train/kl_loss", "train/g_loss", "train/d_weight", "train/total_loss"):
        assert torch.isfinite(logs[key]), key
    assert torch.isfinite(d_loss) and d_loss.dtype == torch.float32
    big = DiagonalGaussianDistribution(torch.full((1, 8, 4, 4), 60.0, dtype=torch.bfloat16))
    assert torch.isfinite(big.kl()).all()  # log-variance clamped, statistics in float32


def test_grayscale_lpips_sees_the_channel_repeated_and_the_gan_one_channel(random_lpips):
    torch.manual_seed(0)
    ae = AutoencoderKL(ddconfig={**DDCONFIG, "in_channels": 1, "out_ch": 1}, embed_dim=4)
    loss = LPIPSWithDiscriminator(disc_ndf=8, disc_num_layers=2, disc_in_channels=1,
                                  disc_start=0, perceptual_weight=0.0)
    loss.perceptual_weight = 1.0
    loss.perceptual_loss = random_lpips
    x = torch.rand(2, 1, 16, 16) * 2 - 1
    recon, posterior = ae(x)
    total, logs = loss.generator_loss(x, recon, posterior, step=0, last_layer=ae.last_layer())
    expected = random_lpips(x.repeat(1, 3, 1, 1), recon.repeat(1, 3, 1, 1)).mean()
    assert torch.isclose(logs["train/p_loss"], expected) and logs["train/p_loss"] > 0
    assert torch.isfinite(total) and torch.isfinite(logs["train/g_loss"])
    d_loss, _ = loss.discriminator_loss(x, recon, step=0)
    assert torch.isfinite(d_loss)
