"""Build a Lightning Trainer from a config and run (or resume) training.

Everything a run writes goes under its ``run_dir``::

    run_dir/config.yaml            the resolved config (after overrides)
    run_dir/checkpoints/last.ckpt  always complete (written to a temporary name, then renamed)
    run_dir/checkpoints/step=N.ckpt
    run_dir/logs/metrics.csv       CSV metrics (a resume logs to logs/resume-K/metrics.csv)
    run_dir/logs/tb/               TensorBoard events (when installed)
    run_dir/samples/               sample grids written during training
"""

from __future__ import annotations

import importlib.util
import time
from pathlib import Path
from typing import Any

import lightning as L
import torch
from lightning.pytorch.callbacks import ModelCheckpoint
from lightning.pytorch.loggers import CSVLogger, TensorBoardLogger
from lightning.pytorch.utilities.rank_zero import rank_zero_only

from ldm_smd.callbacks import (
    AtomicCheckpointIO,
    FinalCheckpoint,
    NanGuard,
    RngStates,
    SampleGrid,
)
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


def _loggers(config: dict[str, Any], run_dir: Path, *, resuming: bool) -> list[Any]:
    """CSV (and TensorBoard) loggers. Lightning's CSV logger deletes an existing metrics file,
    so each resume logs to a new folder ``logs/resume-K/`` and earlier metrics stay."""
    options = {"csv": True, "tensorboard": True, **(config.get("logging") or {})}
    loggers: list[Any] = []
    if options["csv"]:
        version = ""
        if resuming:
            k = 1
            while (run_dir / "logs" / f"resume-{k}").exists():
                k += 1
            version = f"resume-{k}"
        loggers.append(CSVLogger(save_dir=str(run_dir), name="logs", version=version))
    if options["tensorboard"] and importlib.util.find_spec("tensorboard") is not None:
        loggers.append(TensorBoardLogger(save_dir=str(run_dir), name="logs", version="tb"))
    return loggers


def check_precision(trainer_options: dict[str, Any]) -> None:
    """fp16 autocast needs CUDA: say so naming the key, before Lightning fails obscurely."""
    precision = str(trainer_options.get("precision", "32"))
    if precision not in ("16-mixed", "16", "16-true"):
        return
    accelerator = str(trainer_options.get("accelerator", "auto"))
    if accelerator == "cpu" or (accelerator == "auto" and not torch.cuda.is_available()):
        raise ConfigError(
            f"trainer.precision: {precision!r} needs a CUDA GPU (fp16 autocast with a gradient "
            f"scaler is not supported on {'the CPU' if accelerator == 'cpu' else 'this machine'}"
            "); use trainer.precision=bf16-mixed or trainer.precision=32 on the CPU"
        )


class _SaveConfigOnStart(L.Callback):
    """On resume, write the run's config only once the checkpoint was restored: a resume that
    fails (say, a mismatched EMA) leaves the run folder's ``config.yaml`` as it was."""

    def __init__(self, *, config: dict[str, Any], path: Path) -> None:
        self.config = config
        self.path = path

    def on_train_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if trainer.is_global_zero:
            save_config(self.config, self.path)


def build_trainer(
    config: dict[str, Any], run_dir: Path, *, extra_callbacks: tuple[Any, ...] = (),
    shards_by_rank: bool = False, resuming: bool = False,
) -> L.Trainer:
    """A Trainer with checkpointing, the NaN guard, sample grids and loggers from ``config``.

    ``shards_by_rank``: the DataModule's sampler shards the data by rank itself, so Lightning
    must not wrap it in a ``DistributedSampler``.
    """
    trainer_kwargs = dict(config.get("trainer") or {})
    check_precision(trainer_kwargs)
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
        RngStates(),
        FinalCheckpoint(path=run_dir / "checkpoints" / LAST),
        *extra_callbacks,
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
    if shards_by_rank:
        trainer_kwargs.setdefault("use_distributed_sampler", False)
    return L.Trainer(
        default_root_dir=str(run_dir),
        logger=_loggers(config, run_dir, resuming=resuming),
        callbacks=callbacks,
        plugins=[AtomicCheckpointIO()],
        **trainer_kwargs,
    )


def build_run(
    config: dict[str, Any], run_dir: Path, *, extra_callbacks: tuple[Any, ...] = (),
    resuming: bool = False,
) -> tuple[L.LightningModule, L.LightningDataModule, L.Trainer]:
    """The model, data and Trainer of a validated config, the global RNGs seeded by its
    ``seed`` first (so the network's initialisation is a function of the seed): what
    :func:`train` fits, and what the benchmark (:mod:`ldm_smd.bench.runner`) fits for each run."""
    L.seed_everything(int(config.get("seed", 0)), workers=True, verbose=False)
    model = instantiate(config["model"])
    datamodule = instantiate(config["data"])
    trainer = build_trainer(
        config, run_dir, extra_callbacks=extra_callbacks,
        shards_by_rank=bool(getattr(datamodule, "shards_by_rank", False)), resuming=resuming,
    )
    return model, datamodule, trainer


@rank_zero_only
def _report_learning_rate(config: dict[str, Any], trainer: L.Trainer) -> None:
    params = config["model"].get("params") or {}
    lr = params.get("learning_rate")
    if lr is None:
        return
    data_params = (config.get("data") or {}).get("params") or {}
    batch = data_params.get("batch_size", "?")
    accumulate = int(trainer.accumulate_grad_batches)
    world = int(trainer.num_nodes) * int(trainer.num_devices)
    effective = batch * accumulate * world if isinstance(batch, int) else "?"
    print(
        f"[ldm-smd] learning rate {lr:g} used as given (never rescaled); "
        f"{world} process(es) x accumulation {accumulate}: lr scaled by devices x accumulation "
        f"would be {lr * world * accumulate:g} (set it yourself if wanted); effective batch "
        f"{effective} = batch {batch} x accumulation {accumulate} x devices*nodes {world}"
    )


def _remove_stale_temporaries(folder: Path) -> None:
    """Delete half-written checkpoint temporaries a killed run left behind."""
    for tmp in sorted(folder.glob(".*.tmp")):
        print(f"[ldm-smd] removing incomplete checkpoint write {tmp}")
        tmp.unlink(missing_ok=True)


def train(
    config_path: str | Path | None = None,
    overrides: list[str] | tuple[str, ...] = (),
    *,
    resume: str | Path | None = None,
) -> dict[str, Any]:
    """Train from ``config_path`` (or resume a run exactly) and return what was written.

    With ``resume`` (a run folder or a checkpoint) the model, EMA, optimisers, LR scheduler,
    loop counters, RNG states and the data position come back from the checkpoint; the config is
    the run folder's ``config.yaml`` (or ``config_path``) with ``overrides`` applied.
    """
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
    if "data" not in config:
        raise ConfigError(f"{config_path}: training needs a 'data' block")
    check_precision(dict(config.get("trainer") or {}))
    run_dir.mkdir(parents=True, exist_ok=True)
    extra: list[Any] = []
    if ckpt_path is None:
        save_config(config, run_dir / "config.yaml")
    else:
        _remove_stale_temporaries(ckpt_path.parent)
        extra.append(_SaveConfigOnStart(config=config, path=run_dir / "config.yaml"))

    model, datamodule, trainer = build_run(
        config, run_dir, extra_callbacks=tuple(extra), resuming=ckpt_path is not None
    )
    _report_learning_rate(config, trainer)
    trainer.fit(model, datamodule=datamodule, ckpt_path=str(ckpt_path) if ckpt_path else None)
    last = run_dir / "checkpoints" / LAST
    # FinalCheckpoint wrote the final state unless no batch ran (every rank takes part)
    if not trainer.strategy.broadcast(last.exists()):
        trainer.save_checkpoint(str(last))
    seconds = time.perf_counter() - start
    if trainer.is_global_zero:
        print(f"[ldm-smd] trained {trainer.global_step} steps in {seconds:.1f} s; "
              f"checkpoint {last}")
    return {"run_dir": run_dir, "checkpoint": last, "seconds": seconds, "trainer": trainer}
