"""Load a stage-2 checkpoint and write samples: a grid PNG, single PNGs and ``samples.npz``.

Sample ``i`` of a run seeded ``S`` is always drawn from the generator seeded ``S + i`` (see
:mod:`ldm_smd.rng`), so the same seed gives identical files whatever the batch size.
"""

from __future__ import annotations

import math
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch
from tqdm import tqdm

from ldm_smd.checkpoints import CheckpointError, load_checkpoint, load_state_dict_strict
from ldm_smd.images import save_grid, save_singles, to_uint8
from ldm_smd.models.diffusion import LatentDiffusion
from ldm_smd.rng import row_generators


def load_diffusion_checkpoint(path: str | Path, *, device: str = "cpu") -> LatentDiffusion:
    """Rebuild a :class:`LatentDiffusion` from its checkpoint alone (weights-only, strict)."""
    ckpt = load_checkpoint(path)
    if not isinstance(ckpt, dict) or "state_dict" not in ckpt:
        raise CheckpointError(f"{path} is not a Lightning checkpoint (no 'state_dict')")
    hparams = ckpt.get("hyper_parameters")
    if not isinstance(hparams, dict) or "network" not in hparams:
        raise CheckpointError(
            f"{path} is not a stage-2 (diffusion) checkpoint: its hyper-parameters have no "
            f"'network'; an autoencoder checkpoint is used as model.params.first_stage instead"
        )
    model = LatentDiffusion(**{**hparams, "load_first_stage_weights": False})
    load_state_dict_strict(model, ckpt["state_dict"], source=str(path))
    return model.to(device).eval()


def pick_device(device: str | None) -> str:
    if device:
        return device
    return "cuda" if torch.cuda.is_available() else "cpu"


def sample_to_dir(
    ckpt_path: str | Path,
    out_dir: str | Path,
    *,
    n: int = 16,
    steps: int | None = None,
    sampler: str | None = None,
    spacing: str | None = None,
    ddim_eta: float | None = None,
    seed: int = 0,
    batch_size: int = 16,
    use_ema: bool = True,
    device: str | None = None,
    progress: bool = True,
    model: LatentDiffusion | None = None,
) -> dict[str, Any]:
    """Sample ``n`` images from ``ckpt_path`` into ``out_dir``; returns the written paths."""
    if n < 1 or batch_size < 1:
        raise ValueError(f"n and batch_size must be positive, got n={n}, batch_size={batch_size}")
    device = pick_device(device)
    model = model if model is not None else load_diffusion_checkpoint(ckpt_path, device=device)
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    start = time.perf_counter()
    chunks = []
    batches = range(0, n, batch_size)
    for first in tqdm(batches, desc="batches", disable=not progress or len(batches) == 1):
        count = min(batch_size, n - first)
        images = model.sample_images(
            count,
            generator=row_generators(seed, first, count),
            sampler=sampler,
            steps=steps,
            spacing=spacing,
            ddim_eta=ddim_eta,
            use_ema=use_ema,
            progress=progress,
        ).cpu()
        save_singles(images, out_dir / "images", start=first)
        chunks.append(images)
    images = torch.cat(chunks)
    grid = save_grid(images, out_dir / "grid.png", nrow=int(math.ceil(math.sqrt(n))))
    npz = out_dir / "samples.npz"
    np.savez(npz, images=to_uint8(images))
    seconds = time.perf_counter() - start
    return {"grid": grid, "npz": npz, "images": out_dir / "images", "seconds": seconds}
