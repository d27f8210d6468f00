"""Build a Lightning Trainer from a config and run (or resume) training.

Everything a run writes goes under its ``run_dir``::

    run_dir/config.yaml            the resolved config (after overrides)
    run_dir/checkpoints/last.ckpt  always complete (written to a temporary name, then renamed)
    run_dir/checkpoints/step=N.ckpt
    run_dir/logs/                  CSV metrics (always), TensorBoard events (when installed)
    run_dir/samples/               sample grids written during training
"""

from __future__ import annotations

import importlib.util
import time
from pathlib import Path
from typing import Any

import lightning as L
from lightning.pytorch.callbacks import ModelCheckpoint
from lightning.pytorch.loggers import CSVLogger, TensorBoardLogger

from ldm_smd.callbacks import AtomicCheckpointIO, NanGuard, SampleGrid
from ldm_smd.config import ConfigError, instantiate, load_config, save_config

LAST = "last.ckpt"


def resolve_resume(resume: str | Path) -> tuple[Path, Path]:
    """``(run_dir, checkpoint)`` from a run folder or a checkpoint path."""
    resume = Path(resume)
    if resume.is_dir():
        ckpt = resume / "checkpoints" / LAST
        if not ckpt.is_file():
            raise FileNotFoundError(f"--resume {resume}: no checkpoint at {ckpt}")
        return resume, ckpt
    if resume.is_file():
        run_dir = resume.parent.parent if resume.parent.name == "checkpoints" else resume.parent
        return run_dir, resume
    raise FileNotFoundError(f"--resume {resume}: no such run folder or checkpoint")


def _loggers(config: dict[str, Any], run_dir: Path) -> list[Any]:
    options = {"csv": True, "tensorboard": True, **(config.get("logging") or {})}
    loggers: list[Any] = []
    if options["csv"]:
        loggers.append(CSVLogger(save_dir=str(run_dir), name="logs", version=""))
    if options["tensorboard"] and importlib.util.find_spec("tensorboard") is not None:
        loggers.append(TensorBoardLogger(save_dir=str(run_dir), name="logs", version="tb"))
    return loggers


def build_trainer(config: dict[str, Any], run_dir: Path) -> L.Trainer:
    """A Trainer with checkpointing, the NaN guard, sample grids and loggers from ``config``."""
    trainer_kwargs = dict(config.get("trainer") or {})
    ckpt_opts = {"every_n_train_steps": 500, "save_top_k": 1, **(config.get("checkpoint") or {})}
    guard = config.get("nan_guard") or {}
    logging_opts = config.get("logging") or {}
    callbacks: list[Any] = [
        ModelCheckpoint(
            dirpath=str(run_dir / "checkpoints"),
            filename="step={step}",
            auto_insert_metric_name=False,
            every_n_train_steps=ckpt_opts["every_n_train_steps"],
            save_top_k=ckpt_opts["save_top_k"],
            monitor=None,
            save_last=True,
        ),
        NanGuard(action=guard.get("action", "stop"), max_skips=guard.get("max_skips", 100)),
    ]
    sample_every = int(logging_opts.get("sample_every_n_steps", 0))
    if sample_every:
        callbacks.append(
            SampleGrid(out_dir=run_dir / "samples", every_n_steps=sample_every,
                       n=int(logging_opts.get("sample_n", 16)), seed=int(config.get("seed", 0)))
        )
    trainer_kwargs.setdefault("accelerator", "auto")
    trainer_kwargs.setdefault("devices", 1)
    trainer_kwargs.setdefault("num_sanity_val_steps", 0)
    return L.Trainer(
        default_root_dir=str(run_dir),
        logger=_loggers(config, run_dir),
        callbacks=callbacks,
        plugins=[AtomicCheckpointIO()],
        **trainer_kwargs,
    )


def _report_learning_rate(config: dict[str, Any], trainer: L.Trainer) -> None:
    params = config["model"].get("params") or {}
    lr = params.get("learning_rate")
    if lr is None:
        return
    data_params = (config.get("data") or {}).get("params") or {}
    batch = data_params.get("batch_size", "?")
    accumulate = int(trainer.accumulate_grad_batches)
    world = int(trainer.world_size)
    effective = batch * accumulate * world if isinstance(batch, int) else "?"
    print(
        f"[ldm-smd] learning rate {lr:g} used as given (no automatic scaling); effective batch "
        f"{effective} = batch {batch} x accumulation {accumulate} x devices*nodes {world}"
    )


def train(
    config_path: str | Path | None = None,
    overrides: list[str] | tuple[str, ...] = (),
    *,
    resume: str | Path | None = None,
) -> dict[str, Any]:
    """Train from ``config_path`` (or resume a run) and return what was written."""
    start = time.perf_counter()
    ckpt_path = None
    if resume is not None:
        run_dir, ckpt_path = resolve_resume(resume)
        config_path = config_path or run_dir / "config.yaml"
    if config_path is None:
        raise ConfigError("train: give --config FILE or --resume RUN_DIR")
    config = load_config(config_path, overrides)
    if resume is None:
        run_dir = Path(config.get("run_dir") or Path("runs") / Path(config_path).stem)
    run_dir.mkdir(parents=True, exist_ok=True)
    save_config(config, run_dir / "config.yaml")

    L.seed_everything(int(config.get("seed", 0)), workers=True, verbose=False)
    model = instantiate(config["model"])
    if "data" not in config:
        raise ConfigError(f"{config_path}: training needs a 'data' block")
    datamodule = instantiate(config["data"])
    trainer = build_trainer(config, run_dir)
    _report_learning_rate(config, trainer)
    trainer.fit(model, datamodule=datamodule, ckpt_path=str(ckpt_path) if ckpt_path else None)
    last = run_dir / "checkpoints" / LAST
    if trainer.is_global_zero and not last.exists():
        trainer.save_checkpoint(str(last))
    seconds = time.perf_counter() - start
    if trainer.is_global_zero:
        print(f"[ldm-smd] trained {trainer.global_step} steps in {seconds:.1f} s; "
              f"checkpoint {last}")
    return {"run_dir": run_dir, "checkpoint": last, "seconds": seconds, "trainer": trainer}
