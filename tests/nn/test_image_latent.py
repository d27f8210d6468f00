"""SMD's image-level latent: one draw per picture, shared encoder, the authors' form unchanged."""

from __future__ import annotations

import pytest
import torch

from ldm_smd.diffusion.objectives import EnergyObjective
from ldm_smd.diffusion.schedule import NoiseSchedule
from ldm_smd.nn.image_latent import ImageLatentGenerator
from ldm_smd.nn.mlp import MLPDenoiser
from ldm_smd.nn.smd import SMDNetwork
from ldm_smd.nn.unet import UNetModel
from tests.nn.live import live as _live


def _unet(channel_mult=(1, 2)) -> UNetModel:
    return UNetModel(in_channels=1, out_channels=1, model_channels=16,
                     channel_mult=list(channel_mult), num_res_blocks=1, norm_groups=8)


@pytest.mark.parametrize(("placement", "golden"), [
    ("input_output", [0.0165, 0.3269, 0.43001, 0.27818]),
    ("output", [0.17384, 0.33115, 0.50939, 0.35335]),
])
def test_the_authors_form_is_unchanged(placement, golden):
    # pinned before the image-level latent existed: with image_latent_dim 0 (the default) the
    # per-position form draws and computes exactly what it did
    torch.manual_seed(0)
    net = _live(SMDNetwork(backbone=_unet(), latent_dim=8, placement=placement))
    assert net.image_generator is None
    x = torch.randn(2, 1, 16, 16, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        y = net(x, torch.tensor([3, 7]), torch.Generator().manual_seed(2), num_eta_samples=2)
    got = [float(v) for v in (y.mean(), y.std(), y[0, 0, 3, 5], y[3, 0, 10, 2])]
    assert got == pytest.approx(golden, abs=2e-5)


def test_draws_share_one_encoder_pass_and_rows_follow_the_draw_layout():
    torch.manual_seed(0)
    net = _live(SMDNetwork(backbone=_unet(), latent_dim=8, placement="none", image_latent_dim=6))
    calls = []
    net.backbone.input_blocks[0].register_forward_hook(lambda m, i, o: calls.append(o.shape[0]))
    x, t = torch.randn(3, 1, 16, 16), torch.tensor([1, 5, 9])
    eta_image = torch.randn(4 * 3, 6)
    with torch.no_grad():
        y = net(x, t, eta_image=eta_image, num_eta_samples=4)
        assert calls == [3]  # the encoder ran once, on the 3 examples
        assert y.shape == (12, 1, 16, 16)
        # row i + m B is example i under draw m: one call per draw gives the same rows
        for m in range(4):
            one = net(x, t, eta_image=eta_image[3 * m:3 * (m + 1)])
            torch.testing.assert_close(y[3 * m:3 * (m + 1)], one, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("draw_path", ["decoder", "deviation"])
def test_a_new_image_draw_changes_every_region_of_the_picture(draw_path):
    torch.manual_seed(0)
    net = _live(SMDNetwork(backbone=_unet((1, 2, 2)), latent_dim=8, placement="none",
                           image_latent_dim=16, draw_path=draw_path)).eval()
    x = torch.randn(2, 1, 32, 32, generator=torch.Generator().manual_seed(1))
    t = torch.tensor([3, 7])
    with torch.no_grad():
        diff = (net(x, t, torch.Generator().manual_seed(2))
                - net(x, t, torch.Generator().manual_seed(3))).abs()
    patches = diff.unfold(2, 8, 8).unfold(3, 8, 8).mean(dim=(-1, -2))  # 4 x 4 regions
    assert float(patches.min()) > 0.3 * float(diff.mean())


@pytest.mark.parametrize("draw_path", ["decoder", "deviation"])
def test_trained_image_latent_draws_whole_pictures(draw_path):
    # two pictures, each the other's negative; one x_T, 16 draws of the per-picture eta: each
    # prediction is one whole picture (not a patchwork of both), and both pictures are drawn
    proto = -torch.ones(1, 8, 8)
    proto[:, :4] = 1.0
    g = torch.Generator().manual_seed(0)
    torch.manual_seed(0)
    net = SMDNetwork(backbone=_unet(), latent_dim=8, placement="none", image_latent_dim=8,
                     draw_path=draw_path)
    objective = EnergyObjective(parameterization="x0", num_eta_samples=4)
    schedule = NoiseSchedule(kind="cosine", num_timesteps=2)
    opt = torch.optim.Adam(net.parameters(), 3e-3)
    # the deviation is odd in eta_image, so between the two pictures it passes through zero: the
    # draws near that crossing are blends until training makes the crossing steep
    for _ in range(300 if draw_path == "decoder" else 600):
        sign = torch.randint(0, 2, (32, 1, 1, 1), generator=g) * 2.0 - 1.0
        x0 = sign * proto + 0.05 * torch.randn(32, 1, 8, 8, generator=g)
        loss, _ = objective(net, x0, schedule=schedule, generator=g)
        opt.zero_grad()
        loss.backward()
        opt.step()
    x_T = torch.randn(1, 1, 8, 8, generator=g).expand(16, -1, -1, -1)
    with torch.no_grad():
        pred = net(x_T, torch.ones(16, dtype=torch.long), torch.Generator().manual_seed(1))
    agree = (pred.sign() == proto.sign()).float().mean(dim=(1, 2, 3))  # per draw, 1 or 0 if whole
    whole = torch.maximum(agree, 1.0 - agree)
    assert float(whole.min()) > 0.9
    assert 0 < int((agree > 0.5).sum()) < 16


def test_bad_image_latent_arguments_are_clear_errors():
    with pytest.raises(ValueError, match="placement='none' leaves SMD without a latent"):
        SMDNetwork(backbone=_unet(), placement="none")
    with pytest.raises(ValueError, match="MLPDenoiser does not"):
        SMDNetwork(backbone=MLPDenoiser(dim=2), placement="output", image_latent_dim=4)
    net = SMDNetwork(backbone=_unet(), placement="none", image_latent_dim=4)
    with pytest.raises(ValueError, match="eta_image shape"):
        net(torch.randn(2, 1, 16, 16), torch.tensor([1, 2]), eta_image=torch.randn(2, 5))
    with pytest.raises(ValueError, match="must be"):
        ImageLatentGenerator(in_channels=1, latent_dim=0, code_channels=8)
    with pytest.raises(ValueError, match="context of shape"):
        _unet()(torch.randn(2, 1, 16, 16), torch.tensor([1, 2]), context=torch.randn(3, 64))
