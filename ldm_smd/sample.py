"""Load a stage-2 checkpoint and write samples: a grid PNG, single PNGs and ``samples.npz``.

Sample ``i`` of a run seeded ``S`` is always drawn from the generator seeded
``derive_seed(S, i)`` (see :mod:`ldm_smd.rng`): the same seed gives identical files whatever the
batch size, and two different seeds give unrelated sets.

Every argument is checked before the model is loaded and before anything is written: counts,
sampler steps against the checkpoint's schedule, the device, and the output folder, which must be
new or empty (``overwrite=True`` first removes the previous samples there, and only those).
"""

from __future__ import annotations

import math
import re
import shutil
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch
from tqdm import tqdm

from ldm_smd.checkpoints import (
    CheckpointError,
    atomic_write,
    check_finite_weights,
    check_writable,
    load_checkpoint,
    load_state_dict_strict,
)
from ldm_smd.devices import resolve_device
from ldm_smd.diffusion.samplers import SAMPLERS, SPACINGS
from ldm_smd.errors import Interrupted, OutputError, UsageError
from ldm_smd.images import save_grid, save_singles, to_uint8
from ldm_smd.locks import LOCK_NAME, FolderLock
from ldm_smd.models.diffusion import LatentDiffusion
from ldm_smd.rng import row_generators, seed_problem

#: what :func:`sample_to_dir` writes into its folder (and all that ``overwrite`` removes)
OUTPUTS = ("grid.png", "samples.npz", "images")
#: checkpoint prefixes of the network's weights and of their EMA (the ones sampling uses)
NETWORK_PREFIX, EMA_PREFIX = "model.diffusion_model.", "model_ema."
#: ``grid.png`` shows at most this many samples (an 8 x 8 grid); all are in images/ and the .npz
GRID_TILES = 64
_SINGLE = re.compile(r"\d{6}\.png")


def _check_hparams(ckpt: Any, path: str | Path) -> dict[str, Any]:
    if not isinstance(ckpt, dict) or "state_dict" not in ckpt:
        raise CheckpointError(f"{path} is not a Lightning checkpoint (no 'state_dict')")
    hparams = ckpt.get("hyper_parameters")
    if not isinstance(hparams, dict) or "network" not in hparams:
        raise CheckpointError(
            f"{path} is not a stage-2 (diffusion) checkpoint: its hyper-parameters have no "
            f"'network'; an autoencoder checkpoint is used as model.params.first_stage instead"
        )
    return hparams


def _build(ckpt: dict[str, Any], path: str | Path, *, device: str,
           use_ema: bool | None = None) -> LatentDiffusion:
    """The model of a stage-2 checkpoint; the weights that will sample (``use_ema``: the EMA's
    or the raw network's; ``None``: all) must be finite."""
    hparams = _check_hparams(ckpt, path)
    state = ckpt["state_dict"]
    has_ema = any(k.startswith(EMA_PREFIX) for k in state)
    unused = () if use_ema is None else (
        (NETWORK_PREFIX,) if use_ema and has_ema else (EMA_PREFIX,))
    check_finite_weights(state, source=str(path), ignore_prefixes=unused)
    model = LatentDiffusion(**{**hparams, "load_first_stage_weights": False})
    load_state_dict_strict(model, ckpt["state_dict"], source=str(path))
    return model.to(device).eval()


def load_diffusion_checkpoint(path: str | Path, *, device: str = "cpu") -> LatentDiffusion:
    """Rebuild a :class:`LatentDiffusion` from its checkpoint alone (weights-only, strict)."""
    return _build(load_checkpoint(path), path, device=device)


def pick_device(device: str | None) -> str:
    """``device`` checked against this machine; ``None``: CUDA when available, else CPU."""
    return resolve_device(device)


def check_sample_arguments(
    *, n: int, batch_size: int, steps: int | None, sampler: str | None, spacing: str | None,
    ddim_eta: float | None,
) -> None:
    """Raise :class:`UsageError` naming the option for an out-of-range argument."""
    if n < 1:
        raise UsageError(f"--n {n}: the number of samples must be at least 1")
    if batch_size < 1:
        raise UsageError(f"--batch-size {batch_size}: must be at least 1")
    if steps is not None and steps < 1:
        raise UsageError(
            f"--steps {steps}: must be at least 1 (leave --steps out for the checkpoint's "
            "default number of steps)"
        )
    if sampler is not None and sampler not in SAMPLERS:
        raise UsageError(f"--sampler {sampler!r} is not one of {', '.join(SAMPLERS)}")
    if spacing is not None and spacing not in SPACINGS:
        raise UsageError(f"--spacing {spacing!r} is not one of {', '.join(SPACINGS)}")
    if ddim_eta is not None and not (ddim_eta >= 0 and math.isfinite(ddim_eta)):
        raise UsageError(
            f"--ddim-eta {ddim_eta}: must be a finite number >= 0 (0: deterministic DDIM, "
            "1: DDPM-like noise)"
        )


def check_steps(steps: int | None, num_timesteps: int, *, source: str) -> None:
    """``steps`` fits the model's schedule of ``num_timesteps`` training steps."""
    if steps is not None and steps > num_timesteps:
        raise UsageError(
            f"--steps {steps}: the model {source} was trained with T={num_timesteps} steps, so "
            f"a sampler takes at most {num_timesteps} steps"
        )


def default_steps_error(model: Any, *, source: str) -> str | None:
    """Why the model's own default sampler steps (``model.params.sampler.params.steps``) cannot
    run on its schedule, or ``None`` when they can (or the model sets none)."""
    schedule = getattr(model, "schedule", None)
    steps = getattr(getattr(model, "sampler", None), "steps", None)
    if steps is None or schedule is None or int(steps) <= schedule.num_timesteps:
        return None
    return (f"{source}: model.params.sampler.params.steps={steps} is more than the schedule's "
            f"T={schedule.num_timesteps} (model.params.schedule.num_timesteps)")


def previous_outputs(out_dir: Path) -> list[Path]:
    """The entries of ``out_dir`` (must exist); refuses if any is not one of our outputs."""
    entries = sorted(p for p in out_dir.iterdir() if p.name != LOCK_NAME)
    foreign = [p.name for p in entries if p.name not in OUTPUTS]
    images = out_dir / "images"
    if images.is_dir():
        foreign += [f"images/{p.name}" for p in sorted(images.iterdir())
                    if not (p.is_file() and _SINGLE.fullmatch(p.name))]
    elif images.exists():
        foreign.append("images")
    if foreign:
        shown = ", ".join(foreign[:5]) + (f", ... (+{len(foreign) - 5})" if len(foreign) > 5
                                          else "")
        raise OutputError(
            f"--out {out_dir} holds files that sampling did not write ({shown}); nothing was "
            "removed: choose a new or empty folder"
        )
    return entries


def check_out_dir(out_dir: Path, *, overwrite: bool) -> list[Path]:
    """Check the output folder before any work; returns what ``overwrite`` will remove."""
    check_writable(out_dir, what="--out", folder=True)
    entries = previous_outputs(out_dir) if out_dir.is_dir() else []
    if not entries:
        return []
    if not overwrite:
        raise OutputError(
            f"--out {out_dir} already holds samples ({', '.join(p.name for p in entries)}); "
            "choose a new folder, or pass --overwrite to replace them"
        )
    return entries


def _remove(entries: list[Path], out_dir: Path) -> None:
    singles = len(list((out_dir / "images").glob("*.png"))) if (out_dir / "images").is_dir() else 0
    for entry in entries:
        if entry.is_dir():
            shutil.rmtree(entry)
        else:
            entry.unlink()
    print(f"[ldm-smd] --overwrite: removed the previous samples in {out_dir} "
          f"({', '.join(p.name for p in entries)}; {singles} single images)")


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
    overwrite: bool = False,
) -> dict[str, Any]:
    """Sample ``n`` images from ``ckpt_path`` into ``out_dir``; returns the written paths.

    ``out_dir`` must be new or empty; with ``overwrite=True`` a previous run's outputs there
    (``grid.png``, ``samples.npz``, ``images/``) are removed first, and a folder holding anything
    else is refused. Nothing is written before every argument was checked. The folder is locked
    while sampling (:class:`~ldm_smd.locks.FolderLock`). ``grid.png`` shows the first
    :data:`GRID_TILES` samples at a readable size. Ctrl-C keeps the complete single images and
    raises :class:`~ldm_smd.errors.Interrupted` saying how many.
    """
    check_sample_arguments(n=n, batch_size=batch_size, steps=steps, sampler=sampler,
                           spacing=spacing, ddim_eta=ddim_eta)
    if problem := seed_problem(seed):
        raise UsageError(f"--seed: {problem}")
    device = pick_device(device)
    if model is None and not Path(ckpt_path).is_file():
        load_checkpoint(ckpt_path)  # raises the named error for a missing path or a folder
    out_dir = Path(out_dir)
    check_writable(out_dir, what="--out", folder=True)
    with FolderLock(out_dir, what="--out"):
        to_remove = check_out_dir(out_dir, overwrite=overwrite)
        if model is None:
            ckpt = load_checkpoint(ckpt_path)
            hparams = _check_hparams(ckpt, ckpt_path)
            schedule = hparams.get("schedule") or {}
            if "num_timesteps" in schedule:
                check_steps(steps, int(schedule["num_timesteps"]), source=str(ckpt_path))
            model = _build(ckpt, ckpt_path, device=device, use_ema=use_ema)
            del ckpt
        check_steps(steps, model.schedule.num_timesteps, source=str(ckpt_path))
        if steps is None and (reason := default_steps_error(model, source=str(ckpt_path))):
            raise UsageError(f"{reason}: give --steps 1..{model.schedule.num_timesteps}")
        kind = sampler or model.sampler.kind
        if ddim_eta is not None and kind != "ddim":
            raise UsageError(f"--ddim-eta {ddim_eta} applies to the DDIM sampler only, and this "
                             f"run samples with {kind!r}: add --sampler ddim, or leave --ddim-eta "
                             "out")
        if to_remove:
            _remove(to_remove, out_dir)
        options = {"sampler": sampler, "steps": steps, "spacing": spacing, "ddim_eta": ddim_eta,
                   "use_ema": use_ema, "progress": progress}
        return _sample(model, out_dir, n=n, seed=seed, batch_size=batch_size, options=options)


def _sample(model: LatentDiffusion, out_dir: Path, *, n: int, seed: int, batch_size: int,
            options: dict[str, Any]) -> dict[str, Any]:
    """Draw the samples batch by batch into ``out_dir/images``, then the grid and the arrays."""
    start = time.perf_counter()
    chunks = []
    batches = range(0, n, batch_size)
    try:
        for first in tqdm(batches, desc="batches",
                          disable=not options["progress"] or len(batches) == 1):
            count = min(batch_size, n - first)
            images = model.sample_images(
                count, generator=row_generators(seed, first, count), **options).cpu()
            save_singles(images, out_dir / "images", start=first)
            chunks.append(images)
    except KeyboardInterrupt:
        folder = out_dir / "images"
        done = len(list(folder.glob("*.png"))) if folder.is_dir() else 0
        names = f" (000000.png .. {done - 1:06d}.png)" if done else ""
        raise Interrupted(
            f"{done} of {n} samples are complete in {out_dir / 'images'}{names}; grid.png and "
            "samples.npz were not written (sample again with --overwrite for the whole set)"
        ) from None
    images = torch.cat(chunks)
    kept = f"; the {n} single images are in {out_dir / 'images'}"
    shown = images[:GRID_TILES]
    try:
        grid = save_grid(shown, out_dir / "grid.png", nrow=int(math.ceil(math.sqrt(len(shown)))))
        arrays = to_uint8(images)
        npz = atomic_write(out_dir / "samples.npz", lambda handle: np.savez(handle, images=arrays))
    except OutputError as exc:
        raise OutputError(f"{exc}{kept}") from exc
    seconds = time.perf_counter() - start
    return {"grid": grid, "grid_count": len(shown), "npz": npz, "images": out_dir / "images",
            "seconds": seconds}
