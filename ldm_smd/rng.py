"""Seeded random draws shared by every layer.

Every random draw in the package goes through :func:`randn`, which takes either one
``torch.Generator`` for the whole batch or a sequence of generators, one per batch row.
The per-row form makes sampling independent of the batch size: sample ``i`` of a run seeded
``S`` always comes from ``torch.Generator().manual_seed(derive_seed(S, i))``, however the samples
are split into batches. :func:`derive_seed` hashes ``(S, i)`` (numpy's ``SeedSequence``), so
the sets of two seeds share no sample (``S + i`` would make seeds 7 and 10 share 13 of 16).

Draws happen on the generator's device and are then moved, so a CPU generator gives the same
numbers whatever device the model runs on.

Seeds: every seed the package derives from a run's seed ``S`` comes from :func:`derive_seed`,
``derive_seed(S, *keys)``, never from ``S + offset`` (two runs whose seeds differ by the offset
would share a stream). One key is a sample row (:func:`row_generators`); every other stream has
two keys or more, the first naming its purpose with a constant of its module, so no two purposes
can meet:

- ``(TRAIN_STREAM = 1, step, rank, stream)``: a stage-2 training step; ``(VALIDATION_STREAM = 2,
  batch)``: a validation batch (:mod:`ldm_smd.models.diffusion`);
- ``(MIXTURE_STREAM = 3, k, rank)``: batch ``k`` of a Gaussian mixture
  (:mod:`ldm_smd.data.mixture_data`);
- ``(ORDER_STREAM = 4, purpose, epoch, index)``: the image data's order, worker and loader seeds
  (:mod:`ldm_smd.data.datamodule`);
- ``(SAMPLE_STREAM = 11, T)``: a benchmark's sampling noise, shared by every method
  and reference row of a seed and T (:mod:`ldm_smd.bench.runs`); ``(FRESH_STREAM = 12, 0)``:
  the true sample behind its ``sw_floor`` (:mod:`ldm_smd.eval.mixture_metrics`);
  ``(SCALE_STREAM = 13, 0)``: the posterior samples behind a benchmark's latent scale factor
  (:mod:`ldm_smd.bench.first_stage`).
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch

GeneratorLike = torch.Generator | Sequence[torch.Generator] | None

_MASK64 = (1 << 64) - 1
_MASK63 = (1 << 63) - 1

#: The seeds a command takes (a config's ``seed`` keys, ``sample --seed``) are the integers
#: ``0 .. SEED_MAX``: the range numpy's legacy seeding, and so Lightning's ``seed_everything``,
#: accepts unchanged. Nothing outside it is reduced into it, so no two seeds a person can give
#: share samples (``derive_seed`` alone would take ``2**64`` and ``-1`` modulo ``2**64``).
SEED_MAX = 2**32 - 1


def seed_problem(seed: object) -> str | None:
    """Why ``seed`` is not a seed a command takes (see :data:`SEED_MAX`), or ``None``."""
    if isinstance(seed, int) and not isinstance(seed, bool) and 0 <= seed <= SEED_MAX:
        return None
    return f"{seed!r} is not a seed: give an integer from 0 to {SEED_MAX} (2**32 - 1)"


def derive_seed(seed: int, *keys: int) -> int:
    """A seed for stream ``keys`` of a run seeded ``seed``: one place for every derived seed.

    The result is a deterministic, well-mixed function of ``(seed, *keys)`` in ``[0, 2**63)``
    (usable by ``torch.Generator.manual_seed``, ``numpy.random.default_rng`` and ``random.seed``):
    numpy's ``SeedSequence(seed, spawn_key=keys)``, the scheme numpy uses for independent child
    streams, reduced to 63 bits. Different ``(seed, keys)`` give unrelated streams, so unlike
    ``seed + i`` no two seeds share a stream, and ``derive_seed(s, a, b)`` is a stream of its
    own, distinct from ``derive_seed(s, a)`` and ``derive_seed(s, b)``. Negative numbers are
    taken modulo ``2**64``. Stable across versions: the values are pinned by a test.

    Args:
        seed: the run's seed (any integer).
        keys: the stream's coordinates, e.g. the sample index, or (step, rank, purpose).
    """
    entropy = int(seed) & _MASK64
    spawn_key = tuple(int(k) & _MASK64 for k in keys)
    words = np.random.SeedSequence(entropy, spawn_key=spawn_key).generate_state(2, np.uint32)
    return ((int(words[1]) << 32) | int(words[0])) & _MASK63


def generator(seed: int, *keys: int) -> torch.Generator:
    """A CPU ``torch.Generator`` seeded ``derive_seed(seed, *keys)``."""
    return torch.Generator().manual_seed(derive_seed(seed, *keys))


def row_generators(seed: int, start: int, count: int) -> list[torch.Generator]:
    """CPU generators for rows ``start .. start + count - 1`` of a run seeded with ``seed``:
    row ``i`` is seeded ``derive_seed(seed, i)``, whatever batch it falls in."""
    return [generator(seed, i) for i in range(start, start + count)]


def randn(
    shape: Sequence[int],
    *,
    generator: GeneratorLike,
    device: torch.device | str | None = None,
    dtype: torch.dtype = torch.float32,
) -> torch.Tensor:
    """Standard normal draw of ``shape``.

    ``generator`` is one generator (or ``None`` for torch's global one) for the whole tensor, or a
    sequence with one generator per row, in which case ``len(generator)`` must equal ``shape[0]``.
    """
    shape = tuple(int(s) for s in shape)
    if generator is None or isinstance(generator, torch.Generator):
        gen_device = generator.device if generator is not None else device
        out = torch.randn(shape, generator=generator, device=gen_device, dtype=dtype)
        return out.to(device) if device is not None else out
    generators = list(generator)
    if len(generators) != shape[0]:
        raise ValueError(
            f"randn: got {len(generators)} per-row generators for a batch of {shape[0]} rows"
        )
    rows = [torch.randn(shape[1:], generator=g, device=g.device, dtype=dtype) for g in generators]
    out = torch.stack(rows) if rows else torch.empty(shape, dtype=dtype)
    return out.to(device) if device is not None else out


def randn_like(x: torch.Tensor, *, generator: GeneratorLike) -> torch.Tensor:
    """Standard normal draw with the shape, dtype and device of ``x``."""
    return randn(x.shape, generator=generator, device=x.device, dtype=x.dtype)


def repeat_rows(x: torch.Tensor, times: int) -> torch.Tensor:
    """``x`` tiled ``times`` times along the batch: row ``i + k * B`` is row ``i`` (the layout
    of SMD's ``M`` draws per example, which :func:`repeat_generators` follows)."""
    return x.repeat((times,) + (1,) * (x.dim() - 1))


def repeat_generators(generator: GeneratorLike, times: int) -> GeneratorLike:
    """Generators for a batch whose rows were repeated with :func:`repeat_rows`.

    A single generator (or None) is returned unchanged; a per-row list is tiled the same way
    the rows were, so row ``i + k * B`` draws from the generator of row ``i`` (consecutive draws).
    """
    if generator is None or isinstance(generator, torch.Generator):
        return generator
    return list(generator) * times
