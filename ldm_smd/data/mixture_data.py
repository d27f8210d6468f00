"""Training batches drawn from a Gaussian mixture: the ``data`` of the known-truth benchmark.

Batch ``k`` of rank ``r`` is ``mixture.sample(batch_size)`` drawn with a generator seeded
``derive_seed(seed, MIXTURE_STREAM, k, r)`` (:mod:`ldm_smd.rng`): an endless stream of fresh
samples that is a function of the seed and the batch index only, so a resumed run continues with
exactly the batch an uninterrupted one would have drawn (the DataModule's ``state_dict``, saved in
Lightning checkpoints, records how many batches were used). Batches are
``{"image": (B, *shape)}``: ``(B, D)`` vectors, or ``(B, C, H, W)`` for an image mixture.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import lightning as L
import torch
from torch.utils.data import DataLoader, IterableDataset

from ldm_smd import rng
from ldm_smd.data.mixtures import GaussianMixture

#: first key of the seeds of mixture batches (see :mod:`ldm_smd.rng`)
MIXTURE_STREAM = 3


class MixtureBatches(IterableDataset):
    """Endless batches from ``mixture``, batch ``k`` seeded by ``(seed, k, rank)``.

    Args:
        mixture: the mixture to sample.
        batch_size: samples per batch.
        seed: seed of the stream.
        rank: the process's rank (each rank draws its own batches).
        start: index of the first batch (a resumed run starts after the batches it used).
    """

    def __init__(self, *, mixture: GaussianMixture, batch_size: int, seed: int, rank: int = 0,
                 start: int = 0) -> None:
        self.mixture = mixture
        self.batch_size = int(batch_size)
        self.seed = int(seed)
        self.rank = int(rank)
        self.start = int(start)

    def batch(self, k: int) -> dict[str, torch.Tensor]:
        """Batch number ``k``."""
        g = rng.generator(self.seed, MIXTURE_STREAM, k, self.rank)
        x = self.mixture.sample(self.batch_size, generator=g)[0]
        if self.mixture.image_shape is not None:
            x = self.mixture.to_images(x)
        return {"image": x}

    def __iter__(self) -> Iterator[dict[str, torch.Tensor]]:
        k = self.start
        while True:
            yield self.batch(k)
            k += 1


class MixtureDataModule(L.LightningDataModule):
    """Training batches of fresh samples of a Gaussian mixture (no validation set).

    Args:
        mixture: the mixture: a ``target`` / ``params`` block in a config, e.g.
            ``{target: ldm_smd.data.mixtures.ring_mixture, params: {num_components: 8}}``.
        batch_size: samples per batch.
        seed: seed of the batches (the benchmark sets it to the run's seed).
    """

    #: each rank draws its own batches; Lightning must not wrap the loader in a sampler
    shards_by_rank = True

    def __init__(self, *, mixture: GaussianMixture, batch_size: int, seed: int = 0) -> None:
        super().__init__()
        if batch_size < 1:
            raise ValueError(f"MixtureDataModule: batch_size={batch_size} must be positive")
        self.mixture = mixture
        self.batch_size = int(batch_size)
        self.seed = int(seed)
        self._start = 0

    def train_dataloader(self) -> DataLoader:
        rank = int(self.trainer.global_rank) if self.trainer is not None else 0
        batches = MixtureBatches(mixture=self.mixture, batch_size=self.batch_size,
                                 seed=self.seed, rank=rank, start=self._start)
        return DataLoader(batches, batch_size=None)

    def state_dict(self) -> dict[str, Any]:
        """Seed, batch size and the number of batches used so far."""
        state: dict[str, Any] = {"seed": self.seed, "batch_size": self.batch_size}
        if self.trainer is not None:
            state["batches_done"] = int(self.trainer.fit_loop.epoch_loop.batch_progress
                                        .total.processed)
        return state

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        same = (state_dict.get("seed"), state_dict.get("batch_size")) == (self.seed,
                                                                          self.batch_size)
        if not same:
            print("[ldm-smd] warning: the checkpoint's mixture batches were drawn with another "
                  "seed or batch size: the resumed batches are not those of an uninterrupted run")
        self._start = int(state_dict.get("batches_done", 0))
