"""The SMD authors' HyperNet weights in our O(d) Hypernetwork (convert.hypernet_from_official)."""

import pytest
import torch
import torch.nn.functional as F

from ldm_smd.checkpoints import CheckpointError
from ldm_smd.convert import hypernet_from_official
from ldm_smd.nn.smd import Hypernetwork


def _official_state(channels=6, d=5, layers=2, seed=0, eye=True):
    g = torch.Generator().manual_seed(seed)
    sd = {
        "in_proj.weight": torch.randn(d, channels, generator=g),
        "in_proj.bias": torch.randn(d, generator=g),
        "out_proj.weight": torch.randn(channels, d, generator=g),
        "out_proj.bias": torch.randn(channels, generator=g),
        "scales": torch.randn(layers, generator=g),
    }
    for i in range(layers):
        sd[f"param_projs.{i}.weight"] = torch.randn(d, d, generator=g) * 0.5
        sd[f"param_projs.{i}.bias"] = torch.randn(d, generator=g) * 0.5
    if eye:
        sd["eye"] = torch.eye(d)
    return sd


def _their_forward(sd, h, z):
    """Their HyperNet, in our words: per pixel, r = in_proj(h); for each layer l in order
    r <- (p_l p_l^T + softplus(scale_l) I) r with p_l = param_projs[l](z) (a d x d matrix built
    explicitly, as they do); the result is out_proj(r) (the caller adds h)."""
    layers = len(sd["scales"])
    hp = h.permute(0, 2, 3, 1).double()  # (B, H, W, C)
    zp = z.permute(0, 2, 3, 1).double()
    r = hp @ sd["in_proj.weight"].double().T + sd["in_proj.bias"].double()
    d = r.shape[-1]
    eye = torch.eye(d, dtype=torch.float64)
    for i in range(layers):
        p = zp @ sd[f"param_projs.{i}.weight"].double().T + sd[f"param_projs.{i}.bias"].double()
        mat = p[..., :, None] * p[..., None, :] + F.softplus(sd["scales"][i].double()) * eye
        r = (mat @ r[..., None])[..., 0]
    out = r @ sd["out_proj.weight"].double().T + sd["out_proj.bias"].double()
    return out.permute(0, 3, 1, 2)


@pytest.mark.parametrize("layers", [1, 2, 3])
def test_module_minus_h_equals_their_hypernet(layers):
    sd = _official_state(layers=layers, seed=layers)
    module = hypernet_from_official(sd)
    assert isinstance(module, Hypernetwork) and module.bound == "none"
    g = torch.Generator().manual_seed(10)
    h = torch.randn(2, 6, 4, 3, generator=g)
    z = torch.randn(2, 5, 4, 3, generator=g)
    ours = (module(h, z) - h).double()
    ref = _their_forward(sd, h, z)
    assert ((ours - ref).norm() / ref.norm()).item() <= 1e-5
    # and the weights are theirs, not a re-initialisation
    torch.testing.assert_close(module.B.detach(), sd["out_proj.weight"])


def test_bounded_variant_differs_from_theirs():
    sd = _official_state()
    h, z = torch.randn(1, 6, 2, 2), torch.randn(1, 5, 2, 2) * 3
    bounded = hypernet_from_official(sd, bound="tanh")
    assert not torch.allclose((bounded(h, z) - h).double(), _their_forward(sd, h, z), atol=1e-3)


@pytest.mark.parametrize(
    "edit,match",
    [
        (lambda sd: sd.pop("in_proj.bias"), r"missing keys \['in_proj.bias'\]"),
        (lambda sd: sd.pop("param_projs.1.weight"), r"missing keys \['param_projs.1.weight'\]"),
        (lambda sd: sd.update({"extra.weight": torch.zeros(1)}),
         r"missing keys \[\], unexpected keys \['extra"),
        (lambda sd: sd.update({"out_proj.bias": torch.zeros(7)}), r"out_proj.bias \(7,\)"),
        (lambda sd: sd.update({"scales": torch.zeros(3)}), r"scales \(3,\)"),
        (lambda sd: sd.update({"param_projs.0.weight": torch.zeros(5, 4)}),
         r"param_projs.0.weight \(5, 4\)"),
        (lambda sd: sd.update({"eye": torch.zeros(5, 5)}), "not the identity"),
    ],
)
def test_bad_state_dicts_name_the_keys(edit, match):
    sd = _official_state()
    edit(sd)
    with pytest.raises(CheckpointError, match=match):
        hypernet_from_official(sd)


def test_eye_is_optional():
    sd = _official_state(eye=False)
    assert hypernet_from_official(sd).num_layers == 2
