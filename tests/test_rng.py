"""Seeded draws: derive_seed and the per-row generators."""

from __future__ import annotations

import pytest
import torch

from ldm_smd.rng import randn, repeat_generators, row_generators


def test_per_row_generators_are_batch_size_independent():
    whole = randn((6, 3), generator=row_generators(5, 0, 6))
    parts = torch.cat([randn((2, 3), generator=row_generators(5, i, 2)) for i in (0, 2, 4)])
    assert torch.equal(whole, parts)
    assert not torch.equal(whole, randn((6, 3), generator=row_generators(6, 0, 6)))
    with pytest.raises(ValueError, match="3 per-row generators for a batch of 6"):
        randn((6, 3), generator=row_generators(0, 0, 3))


def test_single_generator_is_reproducible_and_repeat():
    a = randn((4, 2), generator=torch.Generator().manual_seed(1))
    b = randn((4, 2), generator=torch.Generator().manual_seed(1))
    assert torch.equal(a, b)
    gens = row_generators(0, 0, 2)
    assert len(repeat_generators(gens, 3)) == 6
    single = torch.Generator()
    assert repeat_generators(single, 3) is single


def test_derive_seed_is_pinned_general_and_keeps_seeds_apart():
    from ldm_smd.rng import derive_seed

    # pinned: files sampled today must be reproducible by later versions
    assert [derive_seed(0, i) for i in range(3)] == [
        8668861027912758289, 4881901421217228719, 7229315352737646089]
    assert derive_seed(7) == 7696923348926885464
    assert derive_seed(0, 1, 2) == 24460892034325468
    assert derive_seed(-1, 2) == derive_seed(2**64 - 1, 2) == 6612112792791866021
    assert all(0 <= derive_seed(s, i) < 2**63 for s in (0, 1, -5, 2**70) for i in (0, 9))
    # distinct streams for distinct coordinates (a tuple key is not a sum or a prefix)
    streams = {derive_seed(5), derive_seed(5, 1), derive_seed(5, 2), derive_seed(5, 1, 2),
               derive_seed(5, 2, 1), derive_seed(6, 0), derive_seed(5, 0)}
    assert len(streams) == 7
    # seed + i made seeds 7 and 10 share 13 of 16 rows; derived seeds share none
    assert not {derive_seed(7, i) for i in range(16)} & {derive_seed(10, i) for i in range(16)}


def test_row_generators_are_seeded_by_derive_seed():
    from ldm_smd.rng import derive_seed

    gens = row_generators(3, 5, 2)
    expected = torch.Generator().manual_seed(derive_seed(3, 6))
    assert torch.equal(torch.randn(4, generator=gens[1]), torch.randn(4, generator=expected))
    rows7 = randn((16, 8), generator=row_generators(7, 0, 16))
    rows10 = randn((16, 8), generator=row_generators(10, 0, 16))
    assert not any(torch.equal(a, b) for a in rows7 for b in rows10)
