"""A LightningDataModule over any map-style image dataset of this package.

The train and validation datasets are given as ``{target, params}`` blocks (built here with
:func:`ldm_smd.blocks.instantiate`; the config loader has already validated them against the
dataset's constructor) or as dataset objects when used from Python.

Reproducibility: the training order of epoch ``e`` is a permutation drawn from a generator seeded
``derive_seed(seed, ORDER_STREAM, ORDER, e, 0)`` (:mod:`ldm_smd.rng`; Lightning calls
``set_epoch`` on the sampler), so it is the same in every run.
The DataModule's ``state_dict`` (saved in Lightning checkpoints) records the epoch and the number
of batches done in it, so a run resumed mid-epoch continues with exactly the next batch. Under
multi-process training the sampler shards the order by rank itself. DataLoader workers are
seeded from ``(seed, e, worker_id)`` (torch, numpy and ``random``), so per-item augmentation
inside datasets is reproducible too when workers are re-created each epoch
(``persistent_workers: false``).
Batch-level augmentation (:class:`~ldm_smd.data.transforms.BatchAugment`) runs after the batch
reached the device, in ``on_after_batch_transfer``, during training only; its generator's state
is part of the DataModule's ``state_dict`` and so of Lightning checkpoints.
"""

from __future__ import annotations

import random
from collections.abc import Iterator, Mapping
from typing import Any

import lightning as L
import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset, Sampler

from ldm_smd.data.transforms import BatchAugment
from ldm_smd.rng import derive_seed

#: first key of the data module's seeds (see :mod:`ldm_smd.rng`)
ORDER_STREAM = 4
#: second key: what the seed is for (the epoch's order, a worker, the loader, validation)
ORDER, WORKER, LOADER, VALIDATION = 0, 1, 2, 3


def _epoch_seed(seed: int, epoch: int, purpose: int = ORDER, index: int = 0) -> int:
    return derive_seed(seed, ORDER_STREAM, purpose, epoch, index)


def build_dataset(spec: Mapping[str, Any] | Dataset, *, key: str) -> Dataset:
    """A dataset from a ``{target, params}`` block, or the dataset itself when given one."""
    if isinstance(spec, Dataset):
        return spec
    if not isinstance(spec, Mapping) or "target" not in spec:
        raise ValueError(
            f"{key}: expected a dataset or a {{target, params}} block, got {spec!r}"
        )
    from ldm_smd.blocks import instantiate  # lazy: keeps `import ldm_smd.data` light

    dataset = instantiate(spec)
    if not isinstance(dataset, Dataset) and not hasattr(dataset, "__getitem__"):
        raise TypeError(f"{key}: {spec['target']} did not build a dataset (got {type(dataset)})")
    return dataset


class SeededEpochSampler(Sampler[int]):
    """Indices ``0..n-1``, shuffled by a permutation that depends only on ``(seed, epoch)``.

    With ``num_replicas > 1`` (multi-process training) rank ``r`` takes every ``num_replicas``-th
    index of the permutation starting at ``r``; the tail that does not divide evenly is dropped
    so every rank sees the same number of items. :meth:`resume` makes the next iteration start
    part-way into an epoch (exact mid-epoch resume).

    Args:
        length: number of items.
        seed: seed of the order.
        shuffle: draw a permutation (else sequential order).
        rank: this process's rank among ``num_replicas``.
        num_replicas: number of processes sharing the data.
    """

    def __init__(
        self, *, length: int, seed: int = 0, shuffle: bool = True, rank: int = 0,
        num_replicas: int = 1,
    ) -> None:
        self.length = int(length)
        self.seed = int(seed)
        self.shuffle = shuffle
        self.epoch = 0
        self._resume_at: tuple[int, int] | None = None
        self.set_replicas(rank=rank, num_replicas=num_replicas)

    def set_replicas(self, *, rank: int, num_replicas: int) -> None:
        """Shard the order for process ``rank`` of ``num_replicas``."""
        if num_replicas < 1 or not 0 <= rank < num_replicas:
            raise ValueError(f"SeededEpochSampler: bad rank {rank} of {num_replicas}")
        if self.length < num_replicas:
            raise ValueError(
                f"SeededEpochSampler: {self.length} items cannot be shared by {num_replicas} "
                "processes"
            )
        self.rank = int(rank)
        self.num_replicas = int(num_replicas)

    def set_epoch(self, epoch: int) -> None:
        """Select epoch ``epoch``'s permutation (Lightning calls this before each epoch)."""
        self.epoch = int(epoch)

    def resume(self, *, epoch: int, skip: int) -> None:
        """Make the next pass over epoch ``epoch`` start after its first ``skip`` items."""
        self.epoch = int(epoch)
        self._resume_at = (int(epoch), int(skip))

    def order(self) -> list[int]:
        """This rank's full index order for the current epoch."""
        if self.shuffle:
            g = torch.Generator().manual_seed(_epoch_seed(self.seed, self.epoch))
            indices = torch.randperm(self.length, generator=g).tolist()
        else:
            indices = list(range(self.length))
        return indices[self.rank : len(self) * self.num_replicas : self.num_replicas]

    def __iter__(self) -> Iterator[int]:
        # a generator: the order is fixed at the first draw, after Lightning's set_epoch
        start = 0
        if self._resume_at is not None:
            epoch, skip = self._resume_at
            self._resume_at = None
            if epoch == self.epoch:
                start = skip
        yield from self.order()[start:]

    def __len__(self) -> int:
        return self.length // self.num_replicas


class _WorkerSeeder:
    """worker_init_fn: seeds torch, numpy and random in a worker from (seed, epoch, worker_id)."""

    def __init__(self, sampler: SeededEpochSampler) -> None:
        self.sampler = sampler

    def __call__(self, worker_id: int) -> None:
        s = _epoch_seed(self.sampler.seed, self.sampler.epoch, WORKER, worker_id)
        torch.manual_seed(s)
        np.random.seed(s % (1 << 32))
        random.seed(s)


class ImageDataModule(L.LightningDataModule):
    """Train / validation DataLoaders over image datasets, with seeded order and batch augmentation.

    Batches are whatever the dataset's items collate to, e.g. ``{"image": (B, 3, H, W) in
    [-1, 1], "label": (B,)}``.

    Args:
        train: the training dataset's ``{target, params}`` block (or a dataset object).
        validation: the validation dataset's block (or object); ``None`` for no validation.
        batch_size: training batch size.
        val_batch_size: validation batch size; ``None`` uses ``batch_size``.
        num_workers: DataLoader worker processes (0 loads in the main process).
        pin_memory: pin host memory (faster host-to-GPU copies).
        persistent_workers: keep workers alive between epochs (needs ``num_workers > 0``).
        prefetch_factor: batches prefetched per worker; ``None`` keeps PyTorch's default.
        shuffle: shuffle the training set each epoch (seeded).
        drop_last: drop the last incomplete training batch.
        batch_augment: keyword arguments of :class:`~ldm_smd.data.transforms.BatchAugment`
            (e.g. ``{flip_p: 0.5}``), applied to training batches on the device; ``None`` for none.
        image_key: the batch entry that batch augmentation transforms.
        seed: seed of the data order, the worker seeds and (unless it names its own) the batch
            augmentation.
    """

    def __init__(
        self,
        *,
        train: dict[str, Any] | Dataset,
        validation: dict[str, Any] | Dataset | None = None,
        batch_size: int,
        val_batch_size: int | None = None,
        num_workers: int = 0,
        pin_memory: bool = False,
        persistent_workers: bool = False,
        prefetch_factor: int | None = None,
        shuffle: bool = True,
        drop_last: bool = True,
        batch_augment: dict[str, Any] | None = None,
        image_key: str = "image",
        seed: int = 0,
    ) -> None:
        super().__init__()
        if batch_size < 1:
            raise ValueError(f"ImageDataModule: batch_size={batch_size} must be positive")
        if val_batch_size is not None and val_batch_size < 1:
            raise ValueError(f"ImageDataModule: val_batch_size={val_batch_size} must be positive")
        if num_workers < 0:
            raise ValueError(f"ImageDataModule: num_workers={num_workers} must be >= 0")
        if persistent_workers and num_workers == 0:
            raise ValueError("ImageDataModule: persistent_workers=true needs num_workers > 0")
        if prefetch_factor is not None and num_workers == 0:
            raise ValueError("ImageDataModule: prefetch_factor needs num_workers > 0")
        self._train_spec = train
        self._val_spec = validation
        self.batch_size = int(batch_size)
        self.val_batch_size = int(val_batch_size or batch_size)
        self.num_workers, self.pin_memory = int(num_workers), pin_memory
        self.persistent_workers, self.prefetch_factor = persistent_workers, prefetch_factor
        self.shuffle, self.drop_last = shuffle, drop_last
        self.image_key, self.seed = image_key, int(seed)
        aug = dict(batch_augment or {})
        aug.setdefault("seed", self.seed)
        self.augment: BatchAugment | None = BatchAugment(**aug) if batch_augment else None
        self.train_dataset: Dataset | None = None
        self.val_dataset: Dataset | None = None
        self.train_sampler: SeededEpochSampler | None = None
        self._resume_state: dict[str, Any] | None = None

    #: the training sampler shards the data by rank itself (see ``train_dataloader``)
    shards_by_rank = True

    # ------------------------------------------------------------------ datasets

    def setup(self, stage: str | None = None) -> None:
        """Build the datasets (once; later calls are no-ops)."""
        if self.train_dataset is None:
            self.train_dataset = build_dataset(self._train_spec, key="data.params.train")
            n = len(self.train_dataset)  # type: ignore[arg-type]
            if n == 0:
                raise ValueError("ImageDataModule: the training dataset is empty")
            if self.drop_last and n < self.batch_size:
                raise ValueError(
                    f"ImageDataModule: the training dataset has {n} items, fewer than "
                    f"batch_size={self.batch_size} with drop_last=true: no batch would be made"
                )
            self.train_sampler = SeededEpochSampler(length=n, seed=self.seed, shuffle=self.shuffle)
        if self.val_dataset is None and self._val_spec is not None:
            self.val_dataset = build_dataset(self._val_spec, key="data.params.validation")

    def _loader(self, dataset: Dataset, *, batch_size: int, sampler: Sampler[int] | None,
                drop_last: bool, seeder: _WorkerSeeder | None) -> DataLoader:
        kwargs: dict[str, Any] = {}
        if self.num_workers > 0:
            kwargs["persistent_workers"] = self.persistent_workers
            if self.prefetch_factor is not None:
                kwargs["prefetch_factor"] = self.prefetch_factor
            if seeder is not None:
                kwargs["worker_init_fn"] = seeder
        # the loader's own generator draws its worker base seed, so creating an iterator (as a
        # resumed run does mid-epoch) never consumes the global RNG
        return DataLoader(
            dataset,
            batch_size=batch_size,
            sampler=sampler,
            generator=torch.Generator().manual_seed(_epoch_seed(self.seed, 0, LOADER)),
            num_workers=self.num_workers,
            pin_memory=self.pin_memory,
            drop_last=drop_last,
            **kwargs,
        )

    def train_dataloader(self) -> DataLoader:
        self.setup("fit")
        assert self.train_dataset is not None and self.train_sampler is not None
        trainer = self.trainer
        if trainer is not None:
            # each process takes its own shard (the trainer is built with
            # use_distributed_sampler=False for this DataModule, see ``shards_by_rank``)
            self.train_sampler.set_replicas(
                rank=int(trainer.global_rank), num_replicas=int(trainer.world_size)
            )
        self._apply_resume()
        return self._loader(
            self.train_dataset,
            batch_size=self.batch_size,
            sampler=self.train_sampler,
            drop_last=self.drop_last,
            seeder=_WorkerSeeder(self.train_sampler),
        )

    def val_dataloader(self) -> DataLoader | list[DataLoader]:
        self.setup("validate")
        if self.val_dataset is None:
            return []
        order = SeededEpochSampler(length=1, seed=_epoch_seed(self.seed, 0, VALIDATION),
                                   shuffle=False)
        seeder = _WorkerSeeder(order)
        return self._loader(
            self.val_dataset,
            batch_size=self.val_batch_size,
            sampler=None,
            drop_last=False,
            seeder=seeder,
        )

    # ------------------------------------------------------------------ batch augmentation

    def augment_batch(self, batch: Any) -> Any:
        """Apply the batch augmentation to ``batch[image_key]`` (a no-op without one)."""
        if self.augment is None:
            return batch
        if isinstance(batch, Mapping):
            if self.image_key not in batch:
                raise KeyError(
                    f"ImageDataModule: batch has no {self.image_key!r} entry to augment; "
                    f"keys: {sorted(batch)}"
                )
            out = dict(batch)
            out[self.image_key] = self.augment(batch[self.image_key])
            return out
        if isinstance(batch, torch.Tensor):
            return self.augment(batch)
        raise TypeError(f"ImageDataModule: cannot augment a batch of type {type(batch).__name__}")

    def on_after_batch_transfer(self, batch: Any, dataloader_idx: int) -> Any:
        trainer = self.trainer
        if trainer is not None and trainer.training:
            return self.augment_batch(batch)
        return batch

    # ------------------------------------------------------------------ checkpoint state

    def _batches_per_epoch(self) -> int:
        assert self.train_sampler is not None
        n = len(self.train_sampler)
        return n // self.batch_size if self.drop_last else -(-n // self.batch_size)

    def state_dict(self) -> dict[str, Any]:
        """Seed, augmentation RNG and the data position: ``(epoch, batches done in it)``."""
        state: dict[str, Any] = {"seed": self.seed, "batch_size": self.batch_size}
        if self.augment is not None:
            state["augment_rng"] = self.augment.rng_state()
        trainer = self.trainer
        if trainer is not None and self.train_sampler is not None:
            progress = trainer.fit_loop.epoch_loop.batch_progress.current
            state["epoch"] = self.train_sampler.epoch
            state["batches_done"] = int(progress.processed)
            state["num_replicas"] = self.train_sampler.num_replicas
        return state

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        if self.augment is not None and "augment_rng" in state_dict:
            self.augment.set_rng_state(state_dict["augment_rng"])
        if "epoch" in state_dict:
            self._resume_state = dict(state_dict)

    def _apply_resume(self) -> None:
        """Start the next pass where the checkpointed run stopped (once, after a resume)."""
        state, self._resume_state = self._resume_state, None
        if state is None or self.train_sampler is None:
            return
        same = (state.get("seed"), state.get("batch_size"), state.get("num_replicas")) == (
            self.seed, self.batch_size, self.train_sampler.num_replicas
        )
        if not same:
            print(
                "[ldm-smd] warning: the checkpoint's data order was made with seed/batch_size/"
                f"processes {state.get('seed')}/{state.get('batch_size')}/"
                f"{state.get('num_replicas')}, now {self.seed}/{self.batch_size}/"
                f"{self.train_sampler.num_replicas}: the resumed data order is not exact"
            )
        epoch, done = int(state["epoch"]), int(state["batches_done"])
        if done >= self._batches_per_epoch():
            epoch, done = epoch + 1, 0
        self.train_sampler.resume(epoch=epoch, skip=done * self.batch_size if same else 0)
