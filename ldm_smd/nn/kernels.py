"""The measured CPU speed-up of ``ldm_smd.nn``, switched on or off in one place.

The other modules of ``ldm_smd.nn`` are plain PyTorch (modules run as they are declared,
autograd, ``torch.tanh``, ``F.linear``): that is the reference, and what a reader sees first.
Where a measured speed-up exists, the plain code asks :func:`enabled` and, if the kernel is on,
calls the function of this module that computes the same thing another way. Each kernel is
tested equal to its plain path, values and gradients (``tests/nn/test_kernels.py``).

The switch, read once when this module is imported: the environment variable
``LDM_SMD_KERNELS`` = ``all`` (the default) | ``none`` | a comma list of names from
:data:`KERNELS` (``-NAME`` switches one off; see :func:`parse`). In code, :func:`use` sets it for
a ``with`` block (tests, benchmarks), and :func:`active` says which kernels are on.
``python scripts/benchmark.py --kernels SPEC ...`` times the cases under several kernel sets,
interleaved, so a kernel is kept only where it pays.

The kernel kept, ``pointwise_bmm``: 1x1 convolutions and per-position linear maps over flattened
positions as one batched matmul. Measured with ``scripts/benchmark.py --widths 64 --cases vanilla
smd_paper smd_energy_M4 smd_image_M2 --reps 3 --warmup 1 --memory none --kernels all none
all,-pointwise_bmm ...`` (2 quiet cores, fp32, batch 16, 32x32; wall time of a step with the
kernel off over on, train / sample): vanilla 1.04 / 1.09, smd_paper 1.09 / 1.08, smd_image_M2
1.06 / 1.09 (run-to-run noise of such a ratio: about +-5%).

Four more kernels were written, measured the same way and dropped, as none paid beyond the noise
(off over on, train / sample): a hand-written backward for the hypernetwork's chain
``M_L .. M_1 r`` (smd_paper 1.05 / 1.07, smd_image_M2 1.01 / 1.03), ``tanh`` as a scaled sigmoid
(smd_paper 0.97 / 1.04), folding the latent generator's linear head into each site's ``W``
(smd_paper 1.01 / 1.01) and in-place residual additions (vanilla 0.99 / 0.98, smd_paper 1.02 /
1.07).
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from contextlib import contextmanager

import torch

from ldm_smd.errors import UsageError

ENV = "LDM_SMD_KERNELS"
KERNELS = ("pointwise_bmm",)


def parse(spec: str, *, source: str = ENV) -> frozenset[str]:
    """The kernel set named by ``spec``: a comma list of ``all``, ``none``, ``NAME`` (switch
    it on) and ``-NAME`` (switch it off), read left to right from an empty set
    (``all,-pointwise_bmm``: every kernel but that one).

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
