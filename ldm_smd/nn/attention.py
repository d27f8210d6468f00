"""Multi-head self-attention behind one switch: ``attention_backend``.

Backends:
    ``"sdpa"`` (default): ``torch.nn.functional.scaled_dot_product_attention`` (fused kernels where
        torch has them, the math path otherwise).
    ``"xformers"``: ``xformers.ops.memory_efficient_attention``; only on CUDA tensors with xformers
        installed, and a clear error otherwise.
    ``"auto"``: xformers when the tensor is on CUDA and xformers imports, else sdpa.
    ``"math"``: the explicit ``softmax(Q K^T / sqrt(d)) V``, for reference and debugging.

The spatial :class:`AttentionBlock` keeps CompVis' parameter names and shapes (``norm``, ``qkv``
as a 1-D convolution ``C -> 3C``, ``proj_out``) and its legacy head layout, where the ``3C``
channels are grouped per head as ``[q, k, v]``.
"""

from __future__ import annotations

import importlib
import math
from functools import lru_cache

import torch
import torch.nn.functional as F
from torch import nn

from ldm_smd.nn.layers import PointwiseConv1d, normalization, zero_module

ATTENTION_BACKENDS = ("sdpa", "xformers", "auto", "math")


def check_backend(backend: str) -> str:
    """Return ``backend`` if it is a known attention backend, else raise a ValueError naming it."""
    if backend not in ATTENTION_BACKENDS:
        raise ValueError(
            f"attention_backend={backend!r} is not one of {list(ATTENTION_BACKENDS)}"
        )
    return backend


@lru_cache(maxsize=1)
def _xformers_ops():
    """The ``xformers.ops`` module, or None when xformers is not installed."""
    try:
        return importlib.import_module("xformers.ops")
    except ImportError:
        return None


def xformers_available() -> bool:
    """Whether ``xformers.ops`` can be imported."""
    return _xformers_ops() is not None


def attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, backend: str = "sdpa"):
    """Scaled dot-product attention over tensors of shape (B, heads, T, d).

    Args:
        q, k, v: (B, heads, T, d) queries, keys and values (keys/values may have another T).
        backend: one of ``"sdpa"``, ``"xformers"``, ``"auto"``, ``"math"``.

    Returns:
        (B, heads, T, d) tensor.
    """
    if backend == "auto":
        backend = "xformers" if q.is_cuda and xformers_available() else "sdpa"
    if backend == "sdpa":
        return F.scaled_dot_product_attention(q, k, v)
    if backend == "math":
        scale = 1.0 / math.sqrt(q.shape[-1])
        weights = torch.softmax(torch.matmul(q * scale, k.transpose(-2, -1)), dim=-1)
        return torch.matmul(weights, v)
    if backend == "xformers":
        ops = _xformers_ops()
        if ops is None:
            raise RuntimeError(
                "attention_backend='xformers' but xformers is not installed; install the 'cuda' "
                "extra (pip install xformers) or use attention_backend='sdpa' or 'auto'"
            )
        if not q.is_cuda:
            raise RuntimeError(
                f"attention_backend='xformers' needs CUDA tensors, got device {q.device}; "
                "use attention_backend='sdpa' or 'auto'"
            )
        # xformers expects (B, T, heads, d).
        out = ops.memory_efficient_attention(
            q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2)
        )
        return out.transpose(1, 2)
    check_backend(backend)
    raise AssertionError("unreachable")  # pragma: no cover


class MultiHeadSelfAttention(nn.Module):
    """Multi-head self-attention over token sequences (B, T, C).

    Args:
        dim: token width ``C``.
        num_heads: number of heads; ``dim`` must be divisible by it.
        attention_backend: ``"sdpa"`` | ``"xformers"`` | ``"auto"`` | ``"math"``.
    """

    def __init__(self, *, dim: int, num_heads: int = 1, attention_backend: str = "sdpa"):
        super().__init__()
        if dim % num_heads:
            raise ValueError(f"MultiHeadSelfAttention: dim={dim} not divisible by {num_heads=}")
        self.num_heads = num_heads
        self.attention_backend = check_backend(attention_backend)
        self.qkv = nn.Linear(dim, 3 * dim)
        self.proj_out = nn.Linear(dim, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, n, c = x.shape
        qkv = self.qkv(x).view(b, n, 3, self.num_heads, c // self.num_heads)
        q, k, v = qkv.permute(2, 0, 3, 1, 4).unbind(0)  # each (B, heads, T, d)
        out = attention(q, k, v, self.attention_backend)
        return self.proj_out(out.transpose(1, 2).reshape(b, n, c))


class AttentionBlock(nn.Module):
    """Residual spatial self-attention for NCHW feature maps (CompVis ``AttentionBlock``).

    ``x + proj_out(attention(qkv(norm(x))))`` over the ``H * W`` positions; ``proj_out`` is
    zero-initialised so a fresh block is the identity.

    Args:
        channels: feature channels ``C``.
        num_heads: number of heads (used when ``num_head_channels == -1``).
        num_head_channels: channels per head; when not -1 it overrides ``num_heads``.
        attention_backend: ``"sdpa"`` | ``"xformers"`` | ``"auto"`` | ``"math"``.
        norm_groups: GroupNorm groups (reduced to ``gcd(norm_groups, channels)``).
    """

    def __init__(
        self,
        *,
        channels: int,
        num_heads: int = 1,
        num_head_channels: int = -1,
        attention_backend: str = "sdpa",
        norm_groups: int = 32,
    ):
        super().__init__()
        if num_head_channels == -1:
            if num_heads < 1 or channels % num_heads:
                raise ValueError(
                    f"AttentionBlock: channels={channels} not divisible by num_heads={num_heads}"
                )
            self.num_heads = num_heads
        else:
            if num_head_channels < 1 or channels % num_head_channels:
                raise ValueError(
                    f"AttentionBlock: channels={channels} not divisible by "
                    f"num_head_channels={num_head_channels}"
                )
            self.num_heads = channels // num_head_channels
        self.channels = channels
        self.attention_backend = check_backend(attention_backend)
        self.norm = normalization(channels, norm_groups)
        self.qkv = PointwiseConv1d(channels, 3 * channels)
        self.proj_out = zero_module(PointwiseConv1d(channels, channels))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, c, *spatial = x.shape
        x_flat = x.reshape(b, c, -1)
        length = x_flat.shape[-1]
        qkv = self.qkv(self.norm(x_flat))  # (B, 3C, T), legacy layout: per head [q, k, v]
        d = c // self.num_heads
        qkv = qkv.view(b, self.num_heads, 3 * d, length).transpose(-2, -1)  # (B, h, T, 3d)
        q, k, v = qkv.split(d, dim=-1)
        out = attention(q, k, v, self.attention_backend)  # (B, h, T, d)
        out = out.transpose(-2, -1).reshape(b, c, length)
        return (x_flat + self.proj_out(out)).view(b, c, *spatial)
