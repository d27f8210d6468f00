"""UNetModel: shapes, CompVis names, modulation sites, argument checks."""

import pytest
import torch
from torch import nn

from ldm_smd.nn.layers import ResBlock
from ldm_smd.nn.unet import UNetModel


def _unet(**kw):
    cfg = dict(in_channels=3, out_channels=3, model_channels=16, channel_mult=[1, 2],
               num_res_blocks=1, attention_resolutions=[2], num_heads=2)
    cfg.update(kw)
    return UNetModel(**cfg)


@pytest.mark.parametrize(
    "kw,shape",
    [
        ({}, (2, 3, 8, 8)),
        ({"attention_resolutions": []}, (2, 3, 8, 8)),
        ({"channel_mult": [1, 2, 2], "attention_resolutions": [1, 4], "num_head_channels": 8},
         (1, 3, 8, 8)),
        ({"channel_mult": [1], "num_res_blocks": 2}, (2, 3, 6, 6)),
        ({"resblock_updown": True, "use_scale_shift_norm": True, "dropout": 0.1},
         (2, 3, 8, 8)),
        ({"in_channels": 4, "out_channels": 2, "conv_resample": False}, (2, 4, 8, 8)),
    ],
)
def test_output_shape_rows_and_input_dependence(kw, shape):
    """Shape, and what a denoiser's output must do: depend on its input, and treat every batch
    row on its own (row 0 of a batch equals row 0 alone; GroupNorm and attention are per row)."""
    net = _unet(**kw).eval()
    with torch.no_grad():  # no zero-initialised layer (the output conv), so the output can move
        for p in net.parameters():
            p.normal_(0.0, 0.2, generator=torch.Generator().manual_seed(p.numel()))
    x = torch.randn(*shape, generator=torch.Generator().manual_seed(1))
    t = torch.randint(0, 1000, (shape[0],), generator=torch.Generator().manual_seed(2))
    out = net(x, t, generator=torch.Generator())
    assert out.shape == (shape[0], net.out_channels, *shape[2:])
    assert torch.isfinite(out).all() and out.abs().max() > 1e-3
    torch.testing.assert_close(net(x[:1], t[:1]), out[:1], rtol=1e-4, atol=1e-5)
    moved = x.clone()
    moved[0, :, 0, 0] += 1.0  # one pixel of row 0
    changed = (net(moved, t) - out).abs().flatten(1).amax(dim=1)
    assert changed[0] > 1e-4
    assert (changed[1:] == 0).all()


def test_compvis_parameter_names():
    names = set(dict(_unet().named_parameters()))
    for key in (
        "time_embed.0.weight", "time_embed.2.weight", "input_blocks.0.0.weight",
        "input_blocks.1.0.in_layers.2.weight", "input_blocks.1.0.emb_layers.1.weight",
        "input_blocks.1.0.out_layers.3.weight", "input_blocks.2.0.op.weight",
        "input_blocks.3.1.qkv.weight", "middle_block.1.proj_out.weight",
        "output_blocks.0.0.skip_connection.weight", "output_blocks.1.2.conv.weight",
        "out.0.weight", "out.2.weight",
    ):
        assert key in names, key


def test_attention_placed_at_declared_resolutions():
    from ldm_smd.nn.attention import AttentionBlock

    net = _unet(channel_mult=[1, 2, 2], attention_resolutions=[2])
    attn_in = [i for i, b in enumerate(net.input_blocks) if any(isinstance(m, AttentionBlock)
                                                                 for m in b)]
    assert attn_in == [3]  # the level with ds == 2
    no_attn = _unet(attention_resolutions=[])
    assert sum(isinstance(m, AttentionBlock) for m in no_attn.modules()) == 1  # middle only


def test_modulation_called_at_declared_sites_with_declared_channels():
    net = _unet(channel_mult=[1, 2, 3])
    assert net.modulation_sites == {"input": 16, "level_0": 16, "level_1": 32, "level_2": 48,
                                    "output": 16}
    assert net.modulation_site_strides == {"input": 1, "level_0": 1, "level_1": 2, "level_2": 4,
                                           "output": 1}
    seen = []

    def modulation(h, site):
        seen.append((site, h.shape[1], 16 // h.shape[-1]))
        return h

    x = torch.randn(2, 3, 16, 16)
    net(x, torch.tensor([1, 2]), modulation=modulation)
    assert [s for s, _, _ in seen] == ["input", "level_0", "level_1", "level_2", "output"]
    for site, ch, stride in seen:
        assert ch == net.modulation_sites[site]
        assert stride == net.modulation_site_strides[site]


def test_modulation_changes_the_output():
    torch.manual_seed(0)
    net = _unet()
    torch.nn.init.normal_(net.out[2].weight)
    x, t = torch.randn(1, 3, 8, 8), torch.tensor([5])
    base = net(x, t)
    torch.testing.assert_close(net(x, t, modulation=lambda h, s: h), base)
    out = net(x, t, modulation=lambda h, s: h * 2 if s == "output" else h)
    assert not torch.allclose(out, base)


def test_timestep_changes_the_output_and_scalar_t_broadcasts():
    torch.manual_seed(0)
    net = _unet()
    for p in net.parameters():
        torch.nn.init.normal_(p, std=0.2)
    x = torch.randn(2, 3, 8, 8)
    assert not torch.allclose(net(x, torch.tensor([1, 1])), net(x, torch.tensor([900, 900])))
    torch.testing.assert_close(net(x, torch.tensor([7])), net(x, torch.tensor([7, 7])))


def test_bad_input_is_a_clear_error():
    net = _unet()
    with pytest.raises(ValueError, match="divisible"):
        net(torch.randn(1, 3, 7, 7), torch.tensor([0]))
    with pytest.raises(ValueError, match="expected x"):
        net(torch.randn(1, 4, 8, 8), torch.tensor([0]))
    with pytest.raises(ValueError, match="attention_backend"):
        _unet(attention_backend="nope")


def _randomised(module, seed=0):
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in module.parameters():
            p.normal_(0.0, 0.3, generator=g)
    return module


@pytest.mark.parametrize(("kw", "path", "replacement"), [
    ({}, "in_layers.1", nn.Identity()), ({}, "in_layers.2", nn.Identity()),
    ({}, "emb_layers.0", nn.Identity()), ({}, "out_layers.1", nn.Identity()),
    ({}, "out_layers.3", nn.Identity()),
    ({"out_channels": 12}, "skip_connection", nn.Conv2d(8, 12, 1)),
    ({"use_scale_shift_norm": True}, "out_layers.0", nn.Identity()),
    ({"use_scale_shift_norm": True}, "out_layers.1", nn.Identity()),
    ({"down": True}, "in_layers.1", nn.Identity()), ({"down": True}, "in_layers.2", nn.Identity()),
    ({"down": True}, "h_upd", nn.MaxPool2d(2)), ({"down": True}, "x_upd", nn.MaxPool2d(2)),
    ({"up": True}, "h_upd", nn.Upsample(scale_factor=2.0, mode="bilinear")),
])
def test_resblock_runs_its_declared_layers(kw, path, replacement):
    """Replacing any declared layer of a ResBlock changes its output: forward runs them."""
    block = _randomised(ResBlock(channels=8, emb_channels=6, norm_groups=4, **kw))
    x = torch.randn(2, 8, 4, 4, generator=torch.Generator().manual_seed(0))
    emb = torch.randn(2, 6, generator=torch.Generator().manual_seed(1))
    before = block(x, emb)
    _replace(block, path, _randomised(replacement, seed=1))
    assert not torch.allclose(block(x, emb), before, atol=1e-4)


def _replace(module, path, replacement):
    """Put ``replacement`` at ``path`` (a Sequential's index included: setattr "1" replaces it)."""
    parent, _, name = path.rpartition(".")
    setattr(module.get_submodule(parent), name, replacement)


@pytest.mark.parametrize(("path", "replacement"), [
    ("out.0", nn.Identity()), ("out.1", nn.Identity()), ("out.2", nn.Conv2d(16, 3, 1)),
    ("input_blocks.3.1.qkv", nn.Conv1d(32, 96, 1)), ("middle_block.1.proj_out", nn.Identity()),
])
def test_unet_runs_its_declared_layers_with_the_output_site_before_the_last_conv(path,
                                                                                replacement):
    net = _randomised(_unet())
    x, t = torch.randn(2, 3, 8, 8, generator=torch.Generator().manual_seed(0)), torch.tensor([1, 9])
    seen = {}

    def record(h, site):
        seen[site] = h
        return torch.zeros_like(h) if site == "output" else h

    silenced = net(x, t, modulation=record)
    # the site is after the activation (SiLU >= -0.279) and only the last conv follows it
    assert seen["output"].min() >= -0.28 and seen["output"].min() < 0
    torch.testing.assert_close(silenced, net.out[2].bias[None, :, None, None].expand_as(silenced))
    before = net(x, t)
    _replace(net, path, _randomised(replacement, seed=1))
    assert not torch.allclose(net(x, t), before, atol=1e-4)
