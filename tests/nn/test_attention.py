"""Attention backends agree; the spatial block keeps CompVis shapes and is the identity at init."""

import pytest
import torch

from ldm_smd.nn.attention import (
    AttentionBlock,
    MultiHeadSelfAttention,
    attention,
    xformers_available,
)


def _qkv(device="cpu"):
    g = torch.Generator().manual_seed(0)
    return [torch.randn(2, 3, 17, 8, generator=g).to(device) for _ in range(3)]


def test_sdpa_matches_math():
    q, k, v = _qkv()
    a = attention(q, k, v, "sdpa")
    b = attention(q, k, v, "math")
    torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(attention(q, k, v, "auto"), b, rtol=1e-5, atol=1e-5)


def test_math_is_softmax_of_scaled_scores():
    q, k, v = _qkv()
    w = torch.softmax(torch.einsum("bhtd,bhsd->bhts", q, k) / 8**0.5, dim=-1)
    torch.testing.assert_close(attention(q, k, v, "math"), w @ v, rtol=1e-5, atol=1e-6)


@pytest.mark.skipif(
    not (torch.cuda.is_available() and xformers_available()),
    reason="xformers backend needs CUDA and an installed xformers",
)
def test_xformers_matches_math_on_cuda():
    q, k, v = _qkv("cuda")
    torch.testing.assert_close(
        attention(q, k, v, "xformers"), attention(q, k, v, "math"), rtol=1e-4, atol=1e-4
    )


def test_xformers_on_cpu_is_a_clear_error():
    q, k, v = _qkv()
    with pytest.raises(RuntimeError, match="xformers"):
        attention(q, k, v, "xformers")


def test_unknown_backend_rejected():
    with pytest.raises(ValueError, match="flash"):
        AttentionBlock(channels=8, attention_backend="flash")


@pytest.mark.parametrize("heads,head_channels", [(1, -1), (2, -1), (1, 4)])
def test_attention_block_backends_agree(heads, head_channels):
    torch.manual_seed(0)
    blocks = {
        b: AttentionBlock(channels=8, num_heads=heads, num_head_channels=head_channels,
                          attention_backend=b)
        for b in ("sdpa", "math")
    }
    state = blocks["sdpa"].state_dict()
    state["proj_out.weight"] = torch.randn_like(state["proj_out.weight"])
    for blk in blocks.values():
        blk.load_state_dict(state)
    x = torch.randn(2, 8, 4, 5)
    out = {b: blk(x) for b, blk in blocks.items()}
    assert out["sdpa"].shape == x.shape
    assert not torch.allclose(out["sdpa"], x)
    torch.testing.assert_close(out["sdpa"], out["math"], rtol=1e-5, atol=1e-5)


def test_attention_block_identity_at_init_and_compvis_shapes():
    blk = AttentionBlock(channels=16, num_heads=2)
    assert blk.qkv.weight.shape == (48, 16, 1)
    assert blk.proj_out.weight.shape == (16, 16, 1)
    x = torch.randn(1, 16, 3, 3)
    torch.testing.assert_close(blk(x), x)


def test_legacy_head_layout():
    """Channels of qkv are grouped per head as [q, k, v] (CompVis QKVAttentionLegacy)."""
    torch.manual_seed(1)
    c, heads = 8, 2
    blk = AttentionBlock(channels=c, num_heads=heads, attention_backend="math")
    torch.nn.init.normal_(blk.proj_out.weight)
    x = torch.randn(1, c, 2, 3)
    qkv = blk.qkv(blk.norm(x.reshape(1, c, -1)))[0]  # (3C, T)
    d = c // heads
    outs = []
    for i in range(heads):
        q, k, v = qkv[i * 3 * d:(i + 1) * 3 * d].split(d, dim=0)
        w = torch.softmax(q.T @ k / d**0.5, dim=-1)  # (T, T)
        outs.append((w @ v.T).T)
    ref = x.reshape(1, c, -1) + blk.proj_out(torch.cat(outs)[None])
    torch.testing.assert_close(blk(x), ref.reshape_as(x), rtol=1e-5, atol=1e-5)


def test_multihead_self_attention_backends_agree():
    torch.manual_seed(0)
    a = MultiHeadSelfAttention(dim=12, num_heads=3, attention_backend="sdpa")
    b = MultiHeadSelfAttention(dim=12, num_heads=3, attention_backend="math")
    b.load_state_dict(a.state_dict())
    x = torch.randn(2, 7, 12)
    torch.testing.assert_close(a(x), b(x), rtol=1e-5, atol=1e-5)
