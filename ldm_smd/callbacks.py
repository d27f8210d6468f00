"""Lightning callbacks and plugins the trainer is built with.

- :class:`AtomicCheckpointIO`: checkpoints written to a temporary name then renamed, and read
  back weights-only, so the ``last`` checkpoint is always complete and never runs code.
- :class:`NanGuard`: a non-finite loss term or gradient stops training with a message naming the
  step and the term (the last good checkpoint stays), or skips the batch and counts it.
- :class:`SampleGrid`: writes (and logs) a grid of samples every ``every_n_steps`` steps.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

import lightning as L
import torch
from lightning.pytorch.plugins.io import TorchCheckpointIO

from ldm_smd.checkpoints import atomic_write, load_checkpoint
from ldm_smd.images import save_grid
from ldm_smd.rng import row_generators


class AtomicCheckpointIO(TorchCheckpointIO):
    """``TorchCheckpointIO`` with rename-on-complete writes and weights-only reads."""

    def save_checkpoint(
        self, checkpoint: dict[str, Any], path: Any, storage_options: Any | None = None
    ) -> None:
        atomic_write(path, lambda handle: torch.save(checkpoint, handle))

    def load_checkpoint(
        self, path: Any, map_location: Any | None = None, weights_only: bool | None = None
    ) -> dict[str, Any]:
        return load_checkpoint(path, map_location=map_location or "cpu")


class NonFiniteError(RuntimeError):
    """Training produced a non-finite loss or gradient."""


class NanGuard(L.Callback):
    """Stop (default) or skip a batch on a non-finite loss term or gradient.

    Args:
        action: ``stop`` raises :class:`NonFiniteError`; ``skip`` drops the update and counts it.
        max_skips: with ``skip``, stop anyway after this many skipped batches.
    """

    def __init__(self, *, action: str = "stop", max_skips: int = 100) -> None:
        if action not in ("stop", "skip"):
            raise ValueError(f"nan_guard.action must be 'stop' or 'skip', got {action!r}")
        self.action = action
        self.max_skips = max_skips
        self.skipped = 0

    def state_dict(self) -> dict[str, Any]:
        return {"skipped": self.skipped}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self.skipped = int(state_dict.get("skipped", 0))

    def _bad_terms(self, trainer: L.Trainer) -> list[str]:
        bad = []
        for name, value in trainer.callback_metrics.items():
            if name.startswith("train/") and torch.is_tensor(value):
                if not bool(torch.isfinite(value).all()):
                    bad.append(name)
        return bad

    def on_before_optimizer_step(
        self, trainer: L.Trainer, pl_module: L.LightningModule, optimizer: Any
    ) -> None:
        bad_grads = [
            name
            for name, p in pl_module.named_parameters()
            if p.grad is not None and not bool(torch.isfinite(p.grad).all())
        ]
        bad_terms = self._bad_terms(trainer)
        if not bad_grads and not bad_terms:
            return
        what = []
        if bad_terms:
            what.append("loss term(s) " + ", ".join(bad_terms))
        if bad_grads:
            what.append(f"gradient of {bad_grads[0]}" + (
                f" (+{len(bad_grads) - 1} more)" if len(bad_grads) > 1 else ""
            ))
        message = f"non-finite {' and '.join(what)} at step {trainer.global_step}"
        if self.action == "stop" or self.skipped >= self.max_skips:
            raise NonFiniteError(
                message + "; training stopped, the last good checkpoint is kept "
                "(set nan_guard.action=skip to skip such batches instead)"
            )
        self.skipped += 1
        print(f"[ldm-smd] {message}: batch skipped ({self.skipped} so far)")
        for group in optimizer.param_groups:
            for p in group["params"]:
                p.grad = None


class SampleGrid(L.Callback):
    """Every ``every_n_steps`` optimizer steps, sample ``n`` images with a fixed seed and save
    ``samples/step_XXXXXX.png`` in the run folder (and log it to TensorBoard when present).

    Args:
        out_dir: the folder the grids are written to.
        every_n_steps: the interval; 0 disables the callback.
        n: number of images in the grid.
        seed: seed of the preview samples (fixed, so grids are comparable across steps).
        steps: sampler steps for the preview (``None``: the model's default).
    """

    def __init__(
        self, *, out_dir: str | Path, every_n_steps: int, n: int = 16, seed: int = 0,
        steps: int | None = None,
    ) -> None:
        self.out_dir = Path(out_dir)
        self.every_n_steps = every_n_steps
        self.n = n
        self.seed = seed
        self.steps = steps

    def _write(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if not hasattr(pl_module, "sample_images") or not trainer.is_global_zero:
            return
        images = pl_module.sample_images(
            self.n, generator=row_generators(self.seed, 0, self.n), steps=self.steps
        )
        path = self.out_dir / f"step_{trainer.global_step:06d}.png"
        save_grid(images, path, nrow=int(math.ceil(math.sqrt(self.n))))
        for logger in trainer.loggers:
            experiment = getattr(logger, "experiment", None)
            if hasattr(experiment, "add_images"):
                experiment.add_images("samples", (images + 1) / 2, trainer.global_step)

    def on_train_batch_end(self, trainer: L.Trainer, pl_module: L.LightningModule,
                           outputs: Any, batch: Any, batch_idx: int) -> None:
        step = trainer.global_step
        if self.every_n_steps > 0 and step > 0 and step % self.every_n_steps == 0:
            self._write(trainer, pl_module)
