"""MLPDenoiser alone and wrapped by SMDNetwork on vector data."""

import pytest
import torch

from ldm_smd.nn.mlp import MLPDenoiser
from ldm_smd.nn.smd import SMDNetwork
from ldm_smd.rng import row_generators


def test_mlp_shape_sites_and_modulation_hook():
    net = MLPDenoiser(dim=3, hidden=32, depth=2, time_embed_dim=16)
    x, t = torch.randn(5, 3), torch.randint(0, 100, (5,))
    assert net(x, t, generator=torch.Generator()).shape == (5, 3)
    seen = []
    net(x, t, modulation=lambda h, s: seen.append((s, h.shape[1])) or h)
    assert seen == [("input", 32), ("output", 32)]
    assert net.modulation_sites == {"input": 32, "output": 32}
    with pytest.raises(ValueError, match="expected x"):
        net(torch.randn(5, 4), t)


def test_smd_on_vectors():
    torch.manual_seed(0)
    x, t = torch.randn(4, 2), torch.tensor([0, 1, 2, 3])
    zero = SMDNetwork(backbone=MLPDenoiser(dim=2, hidden=32, depth=2), latent_dim=6,
                      hypernet_init="zero")
    torch.testing.assert_close(zero(x, t, torch.Generator()), zero.backbone(x, t), rtol=0, atol=0)
    net = SMDNetwork(backbone=MLPDenoiser(dim=2, hidden=32, depth=2), latent_dim=6)
    a = net(x, t, torch.Generator().manual_seed(0))
    assert a.shape == (4, 2)
    assert torch.equal(a, net(x, t, torch.Generator().manual_seed(0)))
    assert not torch.allclose(a, net(x, t, torch.Generator().manual_seed(1)))
    rows = net(x, t, row_generators(3, 0, 4))
    torch.testing.assert_close(rows[1:2], net(x[1:2], t[1:2], row_generators(3, 1, 1)))
    a.square().mean().backward()
    assert net.generator.out.weight.grad.abs().sum() > 0
    assert net.hypernets["input"].W.grad.abs().sum() > 0
    assert net.backbone.input_layer.weight.grad.abs().sum() > 0
    assert torch.isfinite(net(x * 1e3, t, torch.Generator().manual_seed(0))).all()


@pytest.mark.parametrize("placement", ["input_output", "every_level"])
def test_vector_placements(placement):
    net = SMDNetwork(backbone=MLPDenoiser(dim=2, hidden=16, depth=1), latent_dim=4,
                     placement=placement, hypernet_bound="none")
    assert set(net.hypernets) == {"input", "output"}
    assert net(torch.randn(3, 2), torch.tensor([1, 2, 3])).shape == (3, 2)
