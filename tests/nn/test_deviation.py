"""SMD's deviation path: draws around a regression that only the squared error trains."""

from __future__ import annotations

import pytest
import torch

from ldm_smd.diffusion.objectives import DenoisingObjective, EnergyObjective, MixtureObjective
from ldm_smd.diffusion.schedule import NoiseSchedule
from ldm_smd.errors import UsageError
from ldm_smd.nn.deviation import DeviationHead
from ldm_smd.nn.smd import SMDNetwork
from ldm_smd.nn.unet import UNetModel
from tests.nn.live import live


def _net(**kw) -> SMDNetwork:
    torch.manual_seed(0)
    backbone = UNetModel(in_channels=1, out_channels=1, model_channels=16, channel_mult=[1, 2],
                         num_res_blocks=1, norm_groups=8)
    return live(SMDNetwork(backbone=backbone, placement="none", image_latent_dim=8,
                           draw_path="deviation", **kw))


def _batch():
    g = torch.Generator().manual_seed(1)
    return (torch.randn(6, 1, 16, 16, generator=g), torch.tensor([0, 1, 1, 0, 1, 0]),
            torch.randn(6, 1, 16, 16, generator=g))


def test_the_backbone_is_trained_by_the_squared_error_alone():
    # the energy objective's gradient on the backbone is exactly vanilla's loss gradient: the
    # draws' score reaches only the head and the image-level generator
    schedule = NoiseSchedule(kind="cosine", num_timesteps=2)
    x0, t, noise = _batch()
    net = _net()
    loss, logs = EnergyObjective(parameterization="v", num_eta_samples=3)(
        net, x0, schedule=schedule, generator=torch.Generator().manual_seed(2), t=t, noise=noise)
    loss.backward()
    got = [p.grad.clone() for p in net.backbone.parameters()]
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in net.deviation.parameters()
               if p.requires_grad and p.dim() > 1)
    net.zero_grad()
    vanilla, vlogs = DenoisingObjective(parameterization="v")(
        net.backbone, x0, schedule=schedule, generator=None, t=t, noise=noise)
    vanilla.backward()
    for g, p in zip(got, net.backbone.parameters(), strict=True):
        torch.testing.assert_close(g, p.grad, rtol=1e-5, atol=1e-7)
    assert float(logs["loss_regression"]) == pytest.approx(float(vanilla.detach()), rel=1e-5)


def test_draws_are_the_regression_plus_a_deviation_and_share_the_backbone_pass():
    net = _net().eval()
    calls = []
    net.backbone.input_blocks[0].register_forward_hook(lambda m, i, o: calls.append(o.shape[0]))
    x, t, _ = _batch()
    eta_image = torch.randn(4 * 6, 8, generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        draws, mu = net(x, t, eta_image=eta_image, num_eta_samples=4, with_regression=True)
        assert calls == [6]  # one backbone pass for the 4 draws
        torch.testing.assert_close(mu, net.backbone(x, t))
        one = net(x, t, eta_image=eta_image[6:12])  # the plain call: draw 1 of the rows
    assert draws.shape == (24, 1, 16, 16)
    torch.testing.assert_close(draws[6:12], one)
    assert float((draws[:6] - draws[6:12]).abs().mean()) > 0  # the draws differ
    with torch.no_grad():  # odd in eta: a draw and its mirror average to the regression exactly
        mirror = net(x, t, eta_image=-eta_image[6:12])
    torch.testing.assert_close((one + mirror) / 2, mu, rtol=1e-5, atol=1e-6)
    assert float((one - mu).abs().mean()) > 1e-3


def test_the_deviation_path_is_refused_where_it_would_train_wrong():
    with pytest.raises(ValueError, match="needs placement='none' and image_latent_dim > 0"):
        SMDNetwork(backbone=_net().backbone, placement="output", image_latent_dim=8,
                   draw_path="deviation")
    with pytest.raises(ValueError, match="draw_path='sideways' is not one of"):
        SMDNetwork(backbone=_net().backbone, placement="none", image_latent_dim=8,
                   draw_path="sideways")
    schedule = NoiseSchedule(kind="cosine", num_timesteps=2)
    x0 = _batch()[0]
    net = _net()
    # the squared error of one draw would never train the regression
    with pytest.raises(UsageError, match="use ldm_smd.diffusion.objectives.EnergyObjective"):
        DenoisingObjective(parameterization="v")(net, x0, schedule=schedule, generator=None)
    with pytest.raises(UsageError, match="MixtureObjective does not: use EnergyObjective"):
        MixtureObjective(parameterization="v", num_eta_samples=2)(
            net, x0, schedule=schedule, generator=None)
    with pytest.raises(UsageError, match="needs draw_path='deviation'"):
        SMDNetwork(backbone=_net().backbone, placement="none", image_latent_dim=8)(
            x0, torch.zeros(6, dtype=torch.long), with_regression=True)
    with pytest.raises(ValueError, match="divisible by 4"):
        DeviationHead(in_channels=3, out_channels=1, code_channels=8)(
            torch.randn(1, 3, 6, 6), torch.randn(1, 8))
