"""ldm_smd.nn.kernels: the switch, and every kernel equal to the plain path (values, gradients)."""

import os
import subprocess
import sys

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from ldm_smd.errors import UsageError
from ldm_smd.nn import kernels
from ldm_smd.nn.attention import AttentionBlock
from ldm_smd.nn.layers import PointwiseConv1d, PointwiseConv2d, channel_linear
from ldm_smd.nn.mlp import MLPDenoiser
from ldm_smd.nn.smd import SMDNetwork
from ldm_smd.nn.unet import UNetModel

# -- the switch -------------------------------------------------------------------------------


def test_specs_name_kernel_sets():
    every = set(kernels.KERNELS)
    assert kernels.parse("all") == every and kernels.parse("none") == set()
    assert kernels.parse(" pointwise_bmm ") == {"pointwise_bmm"}
    assert kernels.parse("all,-pointwise_bmm") == every - {"pointwise_bmm"}
    assert kernels.parse("all,none,pointwise_bmm") == {"pointwise_bmm"}
    with pytest.raises(UsageError, match=r"\['-head_fold'\]"):  # dropped kernels are unknown
        kernels.parse("all,-head_fold")
    with pytest.raises(UsageError, match=r"LDM_SMD_KERNELS='all,bmm'.*\['bmm'\].*pointwise_bmm"):
        kernels.parse("all,bmm")
    with pytest.raises(KeyError, match="no kernel 'bmm'"):
        kernels.enabled("bmm")


def test_use_switches_inside_the_block_and_restores_after_an_error():
    before = kernels.active()
    with kernels.use("none,pointwise_bmm") as now:
        assert now == ("pointwise_bmm",) == kernels.active()
        assert kernels.enabled("pointwise_bmm")
        with kernels.use([]):
            assert kernels.active() == () and not kernels.enabled("pointwise_bmm")
        assert kernels.active() == ("pointwise_bmm",)
    with pytest.raises(RuntimeError), kernels.use("none"):
        raise RuntimeError
    assert kernels.active() == before


@pytest.mark.parametrize(("value", "printed"), [
    ("none", "()"), ("all,-pointwise_bmm", "()"),
    ("", str(kernels.KERNELS)),
])
def test_the_environment_variable_is_read_at_import(value, printed):
    env = dict(os.environ, LDM_SMD_KERNELS=value)
    out = subprocess.run([sys.executable, "-c", "from ldm_smd.nn import kernels; "
                          "print(kernels.active())"], env=env, capture_output=True, text=True,
                         check=True).stdout
    assert out.strip() == printed


def test_a_bad_environment_variable_is_a_named_error():
    env = dict(os.environ, LDM_SMD_KERNELS="fast")
    proc = subprocess.run([sys.executable, "-c", "import ldm_smd.nn.unet"], env=env,
                          capture_output=True, text=True)
    assert proc.returncode != 0
    assert "UsageError: LDM_SMD_KERNELS='fast': unknown kernel(s) ['fast']" in proc.stderr


# -- each kernel against the plain path -------------------------------------------------------

def _run(spec, fn, inputs, module):
    """``fn(*inputs)`` (with and without autograd) and the gradients of a fixed random
    projection of it with respect to ``inputs`` and ``module``'s parameters, under ``spec``."""
    inputs = [x.detach().clone().requires_grad_() for x in inputs]
    with kernels.use(spec):
        out = fn(*inputs)
        weight = torch.randn(out.shape, generator=torch.Generator().manual_seed(0))
        leaves = inputs + ([] if module is None else list(module.parameters()))
        grads = torch.autograd.grad((out * weight).sum(), leaves, allow_unused=True)
        with torch.no_grad():
            no_grad = fn(*[x.detach() for x in inputs])
    return out.detach(), grads, no_grad


def _assert_kernel_equals_plain(name, fn, inputs, module=None, rtol=1e-5, atol=1e-6,
                                calls=None):
    """The kernel set ``name`` against no kernel: values (with and without autograd) and the
    gradients of ``inputs`` and ``module``'s parameters. ``calls``: a function of
    :mod:`ldm_smd.nn.kernels` that must have run (so the comparison is not vacuous)."""
    module = getattr(fn, "__self__", fn) if module is None else module
    module = module if isinstance(module, nn.Module) else None
    plain, plain_grads, plain_ng = _run("none", fn, inputs, module)
    count = []
    with pytest.MonkeyPatch.context() as mp:
        if calls is not None:
            original = getattr(kernels, calls)
            mp.setattr(kernels, calls, lambda *a, **k: count.append(1) or original(*a, **k))
        fast, fast_grads, fast_ng = _run(name, fn, inputs, module)
    assert calls is None or count, f"kernel {name} never ran"
    torch.testing.assert_close(fast, plain, rtol=rtol, atol=atol)
    torch.testing.assert_close(fast_ng, plain, rtol=rtol, atol=atol)
    torch.testing.assert_close(plain_ng, plain, rtol=rtol, atol=atol)
    for got, want in zip(fast_grads, plain_grads, strict=True):
        assert (got is None) == (want is None)
        if want is not None:
            torch.testing.assert_close(got, want, rtol=rtol, atol=atol)
    assert any(g is not None and g.abs().sum() > 0 for g in plain_grads)


def _randomised(module: nn.Module, seed: int = 0, std: float = 0.3) -> nn.Module:
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in module.parameters():
            p.copy_(torch.randn(p.shape, generator=g) * std)
    return module


G = torch.Generator().manual_seed(3)


@pytest.mark.parametrize("conv", [PointwiseConv2d(6, 4), PointwiseConv1d(6, 4)])
def test_pointwise_bmm_equals_the_convolution(conv):
    x = torch.randn((2, 6, 3, 5) if isinstance(conv, nn.Conv2d) else (2, 6, 7), generator=G)
    _assert_kernel_equals_plain("pointwise_bmm", conv, [x], calls="pointwise_bmm")
    with kernels.use("none"):
        torch.testing.assert_close(conv(x), F.conv2d(x, conv.weight, conv.bias) if x.dim() == 4
                                   else F.conv1d(x, conv.weight, conv.bias))


@pytest.mark.parametrize("bias", ["none", "shared", "per_row"])
@pytest.mark.parametrize("shape", [(3, 5, 4, 2), (3, 5, 6)])
def test_pointwise_bmm_equals_channel_linear(bias, shape):
    x = torch.randn(shape, generator=G)
    weight = torch.randn(7, 5, generator=G)
    b = {"none": None, "shared": torch.randn(7, generator=G),
         "per_row": torch.randn(3, 7, generator=G)}[bias]

    def fn(x, weight, *b):
        return channel_linear(x, weight, *b)

    _assert_kernel_equals_plain("pointwise_bmm", fn, [x, weight] + ([] if b is None else [b]),
                                calls="pointwise_bmm")
    # and the plain path is the maths: weight @ x[:, :, pos] + bias at every position
    with kernels.use("none"):
        out = channel_linear(x, weight, b)
    flat = x.reshape(3, 5, -1)
    want = torch.einsum("jk,bkn->bjn", weight, flat)
    if b is not None:
        want = want + (b[None, :, None] if b.dim() == 1 else b[:, :, None])
    torch.testing.assert_close(out.reshape(3, 7, -1), want, rtol=1e-5, atol=1e-6)


def _smd(placement="input_output", global_context=False, spatial=True, seed=0):
    torch.manual_seed(seed)
    backbone = (UNetModel(in_channels=2, out_channels=2, model_channels=16, channel_mult=[1, 2],
                          num_res_blocks=1, attention_resolutions=[2], num_heads=2)
                if spatial else MLPDenoiser(dim=3, hidden=16, depth=1, time_embed_dim=8))
    net = SMDNetwork(backbone=backbone, latent_dim=16, placement=placement,
                     generator_global_context=global_context)
    return _randomised(net, seed, std=0.2)


@pytest.mark.parametrize("placement", ["input_output", "output"])
def test_all_kernels_together_equal_the_plain_network(placement):
    """The whole SMD network, with every kernel against none: outputs and every gradient."""
    net = _smd(placement, global_context=True)
    x, t = torch.randn(2, 2, 8, 8, generator=G), torch.tensor([3, 600])
    eta = torch.randn((6, 2, 8, 8), generator=G)

    def call(x):
        return net(x, t, eta=eta, num_eta_samples=3)

    _assert_kernel_equals_plain("all", call, [x], module=net, rtol=1e-4, atol=1e-5)


def test_attention_block_equal_under_all_kernels():
    block = _randomised(AttentionBlock(channels=8, num_heads=2, norm_groups=4))
    x = torch.randn(2, 8, 4, 4, generator=G)
    _assert_kernel_equals_plain("all", block, [x], calls="pointwise_bmm")
