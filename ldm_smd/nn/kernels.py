"""The measured CPU speed-ups of ``ldm_smd.nn``, each switched on or off in one place.

The other modules of ``ldm_smd.nn`` are plain PyTorch (modules run as they are declared,
autograd, ``torch.tanh``, ``F.linear``): that is the reference, and what a reader sees first.
Where a measured speed-up exists, the plain code asks :func:`enabled` and, if the kernel is on,
calls the function of this module that computes the same thing another way. Each kernel is
tested equal to its plain path, values and gradients (``tests/nn/test_kernels.py``).

The switch, read once when this module is imported: the environment variable
``LDM_SMD_KERNELS`` = ``all`` (the default) | ``none`` | a comma list of names from
:data:`KERNELS` (``-NAME`` switches one off: ``all,-head_fold`` is every kernel but that one; see
:func:`parse`). In code, :func:`use` sets it for a ``with`` block (tests, benchmarks), and
:func:`active` says which kernels are on. ``python scripts/benchmark.py --kernels SPEC ...``
times the cases under one or more kernel sets, interleaved, so each kernel can be kept only where
it pays.

The kernels. Figures: ``scripts/benchmark.py --widths 64 --cases vanilla smd_paper
smd_energy_M4 --reps 3 --warmup 1 --memory none --kernels all none all,-NAME ...`` (2-core CPU
shared with other jobs, load average 4 to 8, fp32, batch 16, 32x32), process CPU time of the
step with the kernel switched off over all kernels on, two runs, train / sample; the noise of
such a ratio there is about +-7% (vanilla, which no SMD kernel touches, moved 0.97-1.08x).
All kernels off: vanilla 1.06-1.13 / 1.08-1.15, smd_paper 1.10-1.14 / 1.07-1.22, smd_energy_M4
1.13-1.19 / 1.07-1.08. To be re-measured on a quiet machine before a kernel is kept or dropped.

- ``rank_one_chain``: ``r <- M_L .. M_1 r`` with a hand-written backward (fewer full-size passes
  than autograd's) and, without autograd, in place. Off: smd_paper 0.97-1.07 / 0.99-1.17,
  smd_energy_M4 0.98-1.05 / 1.01-1.02 (within the noise).
- ``scaled_tanh``: the bounded vectors ``tanh(x) / sqrt(d)`` as ``2 c sigmoid(2 x) - c``: the
  factor 2 goes into the affine map before it, the rest is one fused pass (in place without
  autograd); sigmoid is the faster CPU kernel (about 5x on 3M elements). Off: smd_paper
  0.96-1.03 / 0.95-1.09, smd_energy_M4 0.95-1.05 / 0.97-1.07 (within the noise).
- ``pointwise_bmm``: 1x1 convolutions and per-position linear maps over flattened positions as
  one batched matmul (1.5-2x faster than the 1x1 convolution forward + backward at 64-256
  channels). Off: vanilla 1.08-1.10 / 1.06-1.21, smd_paper 1.04-1.14 / 1.03-1.15,
  smd_energy_M4 1.04-1.29 / 0.96-1.09: the one kernel that pays beyond the noise here.
- ``head_fold``: SMD's vectors ``W_l z + w_l`` at a site computed from the generator's features
  ``h`` with its linear head ``z = G h + g`` folded in, ``(W G) h + (W g + w)``, where that is
  the cheaper (``K F <= d (F + K)`` multiply-adds per position, ``K = L d``); average pooling to a
  coarser site commutes with it. Off: smd_paper 0.94-1.03 / 0.97-1.07, smd_energy_M4
  0.98-1.02 / 0.96-1.03 (within the noise).
- ``inplace_add``: ResBlock's embedding and residual additions written into the fresh output
  of its convolution instead of a new tensor. Off: vanilla 0.98-1.05 / 1.02-1.07, smd_energy_M4
  0.97 / 0.98-1.03 (within the noise); peak memory of a vanilla train step 505 MB off against
  461 MB on, but 884 against 923 MB for smd_energy_M4 (one run each).
"""

from __future__ import annotations

import os
from collections.abc import Iterator, Mapping
from contextlib import contextmanager

import torch
import torch.nn.functional as F
from torch import nn

from ldm_smd.errors import UsageError

ENV = "LDM_SMD_KERNELS"
KERNELS = ("rank_one_chain", "scaled_tanh", "pointwise_bmm", "head_fold", "inplace_add")


def parse(spec: str, *, source: str = ENV) -> frozenset[str]:
    """The kernel set named by ``spec``: a comma list of ``all``, ``none``, ``NAME`` (switch
    it on) and ``-NAME`` (switch it off), read left to right from an empty set
    (``all,-head_fold``: every kernel but that one).

    Raises :class:`~ldm_smd.errors.UsageError` naming ``source`` and the unknown name.
    """
    items = [item.strip() for item in spec.lower().split(",") if item.strip()]
    unknown = [item for item in items
               if item not in ("all", "none") and item.lstrip("-") not in KERNELS]
    if unknown:
        raise UsageError(f"{source}={spec!r}: unknown kernel(s) {unknown}; use 'all', 'none', "
                         f"names and -names from {list(KERNELS)}, comma-separated")
    chosen: set[str] = set()
    for item in items:
        if item in ("all", "none"):
            chosen = set(KERNELS) if item == "all" else set()
        elif item.startswith("-"):
            chosen.discard(item[1:])
        else:
            chosen.add(item)
    return frozenset(chosen)


_enabled: frozenset[str] = parse(os.environ.get(ENV) or "all")  # unset or empty: all


def enabled(name: str) -> bool:
    """Whether kernel ``name`` (one of :data:`KERNELS`) is switched on."""
    if name not in KERNELS:
        raise KeyError(f"no kernel {name!r}; kernels are {list(KERNELS)}")
    return name in _enabled


def active() -> tuple[str, ...]:
    """The kernels switched on now, in the order of :data:`KERNELS`."""
    return tuple(name for name in KERNELS if name in _enabled)


@contextmanager
def use(spec: str | frozenset[str] | tuple | list) -> Iterator[tuple[str, ...]]:
    """Switch the kernels to ``spec`` (as :func:`parse`, or a collection of names) inside a
    ``with`` block; the previous set comes back afterwards. Yields :func:`active`."""
    global _enabled
    wanted = parse(spec if isinstance(spec, str) else ",".join(spec) or "none",
                   source="kernels.use")
    previous, _enabled = _enabled, wanted
    try:
        yield active()
    finally:
        _enabled = previous


# -- pointwise_bmm ---------------------------------------------------------------------------

def pointwise_bmm(x: torch.Tensor, weight: torch.Tensor,
                  bias: torch.Tensor | None = None) -> torch.Tensor:
    """``weight @ x + bias`` over dim 1 at every position of ``x`` (B, K, *spatial), as one
    batched matmul over the flattened positions.

    ``weight`` is (J, K) (a 1x1 convolution's weight may keep its trailing 1s); ``bias`` is
    (J,), one per row (B, J), or None. Same result as the plain ``F.linear`` over dim 1 or the
    1x1 convolution.
    """
    b, k = x.shape[:2]
    w = weight.reshape(weight.shape[0], k).expand(b, -1, -1)
    flat = x.reshape(b, k, -1)
    if bias is None:
        out = torch.bmm(w, flat)
    else:
        rows = bias[None, :, None] if bias.dim() == 1 else bias[:, :, None]
        out = torch.baddbmm(rows, w, flat)
    return out.view(b, -1, *x.shape[2:])


# -- rank_one_chain --------------------------------------------------------------------------

def rank_one_chain(r: torch.Tensor, v_all: torch.Tensor, scales: torch.Tensor) -> torch.Tensor:
    """``M_L .. M_1 r``, ``M_l r = scales[l] r + v_l (v_l . r)`` over dim 1 (``v_l`` the l-th
    block of ``d`` channels of ``v_all``): with the hand-written backward under autograd, in
    place on ``r`` (a fresh tensor of the caller's) without it."""
    if torch.is_grad_enabled():
        return _RankOneChain.apply(r, v_all, scales)
    d = r.shape[1]
    for layer in range(scales.shape[0]):
        v = v_all[:, layer * d:(layer + 1) * d]
        dot = (v * r).sum(dim=1, keepdim=True)
        r = r.mul_(scales[layer]).addcmul_(v, dot)
    return r


class _RankOneChain(torch.autograd.Function):
    """``M_L .. M_1 r`` with a hand-written backward (fewer full-size passes than autograd's).

    Forward per layer: ``a = v . r``, ``r' = s r + a v``. Backward, with ``g = dL/dr'``:
    ``e = v . g``, ``dL/dv = a g + e r``, ``dL/ds = <g, r>``, ``dL/dr = s g + e v``
    (``M_l`` is symmetric).
    """

    @staticmethod
    def forward(ctx, r, v_all, scales):
        d = r.shape[1]
        saved = []
        for layer in range(scales.shape[0]):
            v = v_all[:, layer * d:(layer + 1) * d]
            dot = (v * r).sum(dim=1, keepdim=True)
            saved += [r, dot]
            r = torch.mul(r, scales[layer]).addcmul_(v, dot)
        ctx.save_for_backward(v_all, scales, *saved)
        return r

    @staticmethod
    def backward(ctx, grad):
        v_all, scales, *saved = ctx.saved_tensors
        d = grad.shape[1]
        grad_v = torch.empty(v_all.shape, dtype=v_all.dtype, device=v_all.device)
        grad_s = torch.empty_like(scales)
        g = grad
        for layer in reversed(range(scales.shape[0])):
            r_prev, dot = saved[2 * layer], saved[2 * layer + 1]
            v = v_all[:, layer * d:(layer + 1) * d]
            e = (v * g).sum(dim=1, keepdim=True)
            gv = grad_v[:, layer * d:(layer + 1) * d]
            torch.mul(g, dot, out=gv)
            gv.addcmul_(r_prev, e)
            grad_s[layer] = (g * r_prev).sum()
            g = torch.mul(g, scales[layer]).addcmul_(v, e)
        return g, grad_v, grad_s


# -- scaled_tanh ----------------------------------------------------------------------------

def scaled_tanh_of_doubled(doubled: torch.Tensor, scale: float) -> torch.Tensor:
    """``scale * tanh(x)`` from ``doubled = 2 x``, as ``2 scale sigmoid(2 x) - scale``: one
    sigmoid and one fused add (in place on ``doubled``, a fresh tensor, without autograd)."""
    offset = torch.full((), -scale, dtype=doubled.dtype, device=doubled.device)
    if torch.is_grad_enabled():
        return torch.add(offset, torch.sigmoid(doubled), alpha=2.0 * scale)
    return torch.add(offset, doubled.sigmoid_(), alpha=2.0 * scale, out=doubled)


# -- head_fold -------------------------------------------------------------------------------

def head_fold_pays(head: nn.Module, vector_rows: int) -> bool:
    """Whether folding ``head`` (a linear map ``F -> d``) into a site's ``W`` (``K = vector_rows``
    by ``d``) costs fewer multiply-adds per position: ``K F <= d (F + K)``. Only an ``nn.Linear``
    or a 1x1 ``nn.Conv2d`` (stride 1, no padding, one group) with a bias can be folded."""
    if isinstance(head, nn.Conv2d):
        if (head.kernel_size, head.stride, head.padding, head.dilation, head.groups) != (
                (1, 1), (1, 1), (0, 0), (1, 1), 1):
            return False
    elif not isinstance(head, nn.Linear):
        return False
    d, f = head.weight.shape[:2]
    return head.bias is not None and vector_rows * f <= d * (f + vector_rows)


def head_fold_vectors(hypernets: Mapping[str, nn.Module], strides: Mapping[str, int],
                      features: torch.Tensor, head: nn.Module,
                      shift: torch.Tensor | None) -> dict[str, torch.Tensor]:
    """Every site's vectors ``v_l`` from the generator's ``features`` ``h`` (B, F[, H, W]), its
    linear ``head`` (``z = G h + g``) and its per-row ``shift`` (B, d) or None, without forming
    ``z``: ``W z + w = (W G) pool(h) + (W (g + shift) + w)``. Each hypernetwork's
    ``vectors(x, weight=, bias=)`` applies its bound to that affine map."""
    weight = head.weight.flatten(1)  # G (d, F)
    rows = head.bias.expand(features.shape[0], -1) if shift is None else head.bias + shift
    pooled: dict[int, torch.Tensor] = {}
    out = {}
    for site, hypernet in hypernets.items():
        stride = strides[site]
        if stride not in pooled:
            pooled[stride] = (F.avg_pool2d(features, stride) if stride > 1 and features.dim() == 4
                              else features)
        out[site] = hypernet.vectors(pooled[stride], weight=hypernet.W @ weight,
                                     bias=torch.addmm(hypernet.w, rows, hypernet.W.t()))
    return out


# -- inplace_add -----------------------------------------------------------------------------

def add_into(fresh: torch.Tensor, other: torch.Tensor) -> torch.Tensor:
    """``fresh + other`` written into ``fresh``: only for a tensor that nothing else holds and
    autograd has not saved (a convolution's output)."""
    return fresh.add_(other)
