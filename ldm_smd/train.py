"""Build a Lightning Trainer from a config and run (or resume) training.

Everything a run writes goes under its ``run_dir``::

    run_dir/config.yaml            the resolved config (after overrides)
    run_dir/checkpoints/last.ckpt  always complete (written to a temporary name, then renamed)
    run_dir/checkpoints/step=N.ckpt
    run_dir/logs/metrics.csv       CSV metrics (a resume logs to logs/resume-K/metrics.csv)
    run_dir/logs/tb/               TensorBoard events (when installed)
    run_dir/samples/               sample grids written during training

Before anything is written, everything that can be checked is: the config (every key and value
type, ``trainer.*`` included), the run folder (writable; a folder that already holds a run is
refused unless the run is resumed or ``overwrite`` is given), the model (the first stage is
loaded), the data (the dataset is built, so an empty folder is an error here) and the Trainer.
``config.yaml`` is written when training starts.
"""

from __future__ import annotations

import importlib.util
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import lightning as L
import torch
from lightning.fabric.utilities.exceptions import MisconfigurationException
from lightning.pytorch.loggers import CSVLogger, TensorBoardLogger
from lightning.pytorch.utilities.rank_zero import rank_zero_only

from ldm_smd.blocks import instantiate
from ldm_smd.callbacks import (
    AtomicCheckpointIO,
    FinalCheckpoint,
    GracefulStop,
    NanGuard,
    NonFiniteError,
    PeriodicCheckpoint,
    RngStates,
    SampleGrid,
)
from ldm_smd.checkpoints import (
    CheckpointError,
    check_state_dict,
    load_checkpoint,
)
from ldm_smd.config import ConfigError, load_config, save_config
from ldm_smd.console import final_loss, quiet_lightning, where
from ldm_smd.errors import (
    WRITE_ERRNOS,
    DataError,
    Interrupted,
    LdmSmdError,
    OutputError,
    UsageError,
    describe_os_error,
)
from ldm_smd.fileio import check_writable
from ldm_smd.locks import FolderLock
from ldm_smd.progress import progress_bar
from ldm_smd.run_folder import (
    LAST,
    clean_up_after_failure,
    has_checkpoint,
    kept,
    newest_checkpoint,
    remove_new_logs,
    remove_previous_run,
    remove_stale_temporaries,
    resume_command,
    resume_target,
    run_to_replace,
)
from ldm_smd.shapes import check_shapes


def _is_first_process() -> bool:
    """Global rank 0 (Lightning reads RANK / LOCAL_RANK / SLURM_PROCID at import)."""
    return int(getattr(rank_zero_only, "rank", 0) or 0) == 0


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


class _RunStart(L.Callback):
    """When training starts (the checkpoint, if any, restored): write the run's config and note
    the step, so a run that fails before (say, a mismatched EMA on resume) leaves the run
    folder's ``config.yaml`` as it was."""

    def __init__(self, *, config: dict[str, Any], path: Path, resumed_from: Path | None) -> None:
        self.config = config
        self.path = path
        self.resumed_from = resumed_from
        self.start_step: int | None = None  # None: training never started (already at max_steps)

    def on_train_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self.start_step = int(trainer.global_step)
        if trainer.is_global_zero:
            save_config(self.config, self.path)
            if self.resumed_from is not None:
                print(f"[ldm-smd] resumed from {self.resumed_from} at step {self.start_step}")


def build_trainer(
    config: dict[str, Any], run_dir: Path, *, extra_callbacks: tuple[Any, ...] = (),
    shards_by_rank: bool = False, resuming: bool = False,
) -> L.Trainer:
    """A Trainer with checkpointing, the NaN guard, sample grids and loggers from ``config``.

    ``shards_by_rank``: the DataModule's sampler shards the data by rank itself, so Lightning
    must not wrap it in a ``DistributedSampler``. Lightning's own complaints about the
    arguments are :class:`ConfigError` naming ``trainer``.
    """
    quiet_lightning()
    trainer_kwargs = dict(config.get("trainer") or {})
    check_precision(trainer_kwargs)
    ckpt_opts = {"every_n_train_steps": 500, "save_top_k": 1, **(config.get("checkpoint") or {})}
    guard = config.get("nan_guard") or {}
    logging_opts = config.get("logging") or {}
    callbacks: list[Any] = [
        PeriodicCheckpoint(
            dirpath=str(run_dir / "checkpoints"),
            filename="step={step}",
            auto_insert_metric_name=False,
            every_n_train_steps=ckpt_opts["every_n_train_steps"],
            save_top_k=ckpt_opts["save_top_k"],
            monitor=None,
            save_last=True,
            enable_version_counter=False,  # one last.ckpt, never last-v1.ckpt beside it
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
    trainer_kwargs.setdefault("enable_model_summary", False)
    if trainer_kwargs.get("enable_progress_bar", True) is not False:
        callbacks.append(progress_bar())
    if shards_by_rank:
        trainer_kwargs.setdefault("use_distributed_sampler", False)
    try:
        return L.Trainer(
            default_root_dir=str(run_dir),
            logger=_loggers(config, run_dir, resuming=resuming),
            callbacks=callbacks,
            plugins=[AtomicCheckpointIO()],
            **trainer_kwargs,
        )
    except LdmSmdError:
        raise
    except (MisconfigurationException, ValueError, TypeError) as exc:
        raise ConfigError(f"trainer: {_first_line(exc)}") from exc


def build_run(
    config: dict[str, Any], run_dir: Path, *, extra_callbacks: tuple[Any, ...] = (),
    resume_from: Path | None = None,
) -> tuple[L.LightningModule, L.LightningDataModule, L.Trainer]:
    """The model, data and Trainer of a validated config, every check done and nothing written:
    the global RNGs are seeded by the config's ``seed`` first (so the network's initialisation is
    a function of the seed), the model is built (its first stage loaded) and checked against the
    checkpoint to resume from, the datasets are built (an empty folder is an error here). What
    :func:`train` fits, and what the benchmark (:mod:`ldm_smd.bench.runner`) fits for each run."""
    L.seed_everything(int(config.get("seed", 0)), workers=True, verbose=False)
    model = build_block("model", config["model"])
    _check_preview_sampler(model, config)
    if resume_from is not None:
        check_resume(model, resume_from)
    datamodule = build_block("data", config["data"])
    setup_data(datamodule)
    check_shapes(config, model, datamodule)
    trainer = build_trainer(
        config, run_dir, extra_callbacks=extra_callbacks,
        shards_by_rank=bool(getattr(datamodule, "shards_by_rank", False)),
        resuming=resume_from is not None,
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


def _first_line(exc: BaseException) -> str:
    lines = str(exc).strip().splitlines()
    return lines[0] if lines else type(exc).__name__


def build_block(block: str, spec: dict[str, Any]) -> Any:
    """``instantiate(spec)``; a constructor's complaint about a value becomes a ConfigError
    naming the block (our named errors pass through unchanged)."""
    try:
        return instantiate(spec)
    except LdmSmdError:
        raise
    except (ValueError, FileNotFoundError, NotADirectoryError) as exc:
        raise ConfigError(f"{block}: {_first_line(exc)}") from exc


def setup_data(datamodule: Any) -> None:
    """Build the datasets now (an empty or missing folder is an error before any work)."""
    setup = getattr(datamodule, "setup", None)
    if setup is None:
        return
    try:
        setup("fit")
    except LdmSmdError:
        raise
    except (ValueError, FileNotFoundError, NotADirectoryError) as exc:
        raise DataError(f"data: {_first_line(exc)}") from exc


def check_resume(model: L.LightningModule, ckpt_path: Path) -> None:
    """Before anything is written: the checkpoint reads (weights-only), the module's own
    ``on_load_checkpoint`` checks pass (our modules' hooks only check, e.g. the EMA decay), and
    its weights fit the config's model (names and shapes)."""
    ckpt = load_checkpoint(ckpt_path, mmap=True)
    if not isinstance(ckpt, dict) or "state_dict" not in ckpt:
        raise CheckpointError(f"--resume {ckpt_path} is not a Lightning checkpoint (no "
                              "'state_dict')")
    model.on_load_checkpoint(dict(ckpt))
    try:
        check_state_dict(model, ckpt["state_dict"], source=f"--resume {ckpt_path}")
    except CheckpointError as exc:
        raise CheckpointError(
            f"{exc} (the config's model differs from the run's: drop the override that "
            "changed it)"
        ) from exc


def _check_preview_sampler(model: Any, config: dict[str, Any]) -> None:
    """Sample grids during training use the model's default sampler: one that cannot run on the
    model's schedule is an error now, not at the first grid."""
    from ldm_smd.sample import default_steps_error

    every = int((config.get("logging") or {}).get("sample_every_n_steps", 0))
    max_steps = int((config.get("trainer") or {}).get("max_steps", -1) or -1)
    if every <= 0 or (max_steps > 0 and every > max_steps):
        return
    reason = default_steps_error(model, source="config")
    if reason:
        raise ConfigError(f"{reason}, so the sample grid every {every} steps "
                          "(logging.sample_every_n_steps) cannot be drawn; lower "
                          "model.params.sampler.steps")


def _fit(trainer: L.Trainer, model: Any, datamodule: Any, *, ckpt_path: Path | None,
         run_dir: Path) -> None:
    """``trainer.fit``; a failed write is a named error. A checkpoint to resume from was checked
    against the model by :func:`check_resume` (in :func:`build_run`, before anything was
    written: missing, unexpected and mis-shaped keys named), so Lightning's strict load of it
    here meets the same keys and shapes."""
    try:
        trainer.fit(model, datamodule=datamodule, ckpt_path=str(ckpt_path) if ckpt_path else None)
    except OutputError as exc:
        raise OutputError(f"{exc}; {kept(run_dir)}") from exc
    except OSError as exc:
        if exc.errno not in WRITE_ERRNOS:
            raise
        raise OutputError(
            f"could not write {describe_os_error(exc, exc.filename or run_dir)}; {kept(run_dir)}"
        ) from exc


def train(
    config_path: str | Path | None = None,
    overrides: list[str] | tuple[str, ...] = (),
    *,
    resume: str | Path | None = None,
    overwrite: bool = False,
) -> dict[str, Any]:
    """Train from ``config_path`` (or resume a run exactly) and return what was written.

    With ``resume`` (a run folder or a checkpoint) the model, EMA, optimisers, LR scheduler,
    loop counters, RNG states and the data position come back from the checkpoint (of a run
    folder: the newest complete one, :func:`~ldm_smd.run_folder.newest_checkpoint`); the config
    is the run folder's ``config.yaml`` (or ``config_path``) with ``overrides`` applied.

    The run folder is locked for the whole command (:class:`~ldm_smd.locks.FolderLock`): a
    second command into it is refused, naming this one. A new run into a ``run_dir`` that
    already holds a run (checkpoints, logs, a config) is refused; ``overwrite=True`` deletes
    that run once every check has passed (so does a new run where the previous attempt's process
    died before its first checkpoint: nothing there could be resumed). Ctrl-C stops after the
    current step with a checkpoint and raises :class:`~ldm_smd.errors.Interrupted` naming the
    resume command.
    """
    start = time.perf_counter()
    quiet_lightning()
    if resume is not None and overwrite:
        raise UsageError("--resume continues a run and --overwrite deletes it: give one of them")
    ckpt_path = None
    if resume is not None:
        run_dir, ckpt_path = resume_target(resume)
        if ckpt_path is None and not has_checkpoint(run_dir):
            newest_checkpoint(run_dir)  # raises: names what is missing, before the config
        config_path = config_path or run_dir / "config.yaml"
    if config_path is None:
        raise UsageError("train: give --config FILE or --resume RUN_DIR")
    config = load_config(config_path, overrides)
    if resume is None:
        run_dir = Path(config.get("run_dir") or Path("runs") / Path(config_path).stem)
    if "data" not in config:
        raise ConfigError(f"{config_path}: training needs a 'data' block")
    check_precision(dict(config.get("trainer") or {}))
    if not _is_first_process():  # rank 0 holds the lock and checks the folder for every rank
        if resume is not None and ckpt_path is None:
            ckpt_path = newest_checkpoint(run_dir)[0]
        return _train(config, run_dir, ckpt_path=ckpt_path, start=start)
    check_writable(run_dir, what="run_dir", folder=True)
    with FolderLock(run_dir, what="run_dir") as lock:
        previous: list[str] = []
        replaced = ""
        if resume is not None and ckpt_path is None:
            ckpt_path, why = newest_checkpoint(run_dir)
            if why:
                print(f"[ldm-smd] --resume {run_dir}: {why}; resuming from {ckpt_path}, the "
                      "newest complete checkpoint")
        elif ckpt_path is None:
            previous, replaced = run_to_replace(run_dir, overwrite=overwrite, stale=lock.stale)
        return _train(config, run_dir, ckpt_path=ckpt_path, start=start, previous=previous,
                      replaced=replaced)


def _train(config: dict[str, Any], run_dir: Path, *, ckpt_path: Path | None, start: float,
           previous: Sequence[str] = (), replaced: str = "") -> dict[str, Any]:
    """Build, check and fit a run whose folder was checked (``previous``: the entries of an
    earlier run there to delete once every check passed, ``replaced`` says why)."""
    first = _is_first_process()
    run_start = _RunStart(config=config, path=run_dir / "config.yaml", resumed_from=ckpt_path)
    stop = GracefulStop(path=run_dir / "checkpoints" / LAST)
    model, datamodule, trainer = build_run(
        config, run_dir, extra_callbacks=(run_start, stop), resume_from=ckpt_path
    )
    # every check passed: from here on the run folder is written
    if previous:
        remove_previous_run(run_dir, list(previous), why=replaced)
    if ckpt_path is not None and first:
        remove_stale_temporaries(ckpt_path.parent)
    _report_learning_rate(config, trainer)
    before = set(run_dir.rglob("*")) if run_dir.is_dir() else set()
    try:
        _fit(trainer, model, datamodule, ckpt_path=ckpt_path, run_dir=run_dir)
    except BaseException as exc:
        if first:
            outcome = clean_up_after_failure(run_dir, before, new_run=ckpt_path is None)
        else:
            outcome = kept(run_dir)
        if isinstance(exc, SystemExit) and trainer.interrupted:  # a second Ctrl-C
            step = trainer.global_step + 1
            raise Interrupted(f"stopped during step {step}; {outcome}") from None
        if isinstance(exc, NonFiniteError):
            raise NonFiniteError(f"{exc}; {outcome}") from exc
        raise
    last = run_dir / "checkpoints" / LAST
    # FinalCheckpoint wrote the final state unless no batch ran (every rank takes part)
    if not trainer.strategy.broadcast(last.exists()):
        trainer.save_checkpoint(str(last), weights_only=False)
    seconds = time.perf_counter() - start
    if run_start.start_step is None:  # a resumed run already at trainer.max_steps
        if first:
            remove_new_logs(run_dir, before)
        if trainer.is_global_zero:
            print(f"[ldm-smd] nothing trained: the run is already at step {trainer.global_step}, "
                  f"trainer.max_steps={trainer.max_steps}; to train on, raise it: "
                  f"`{resume_command(run_dir)} trainer.max_steps=N`")
        _end_process_group()
        return {"run_dir": run_dir, "checkpoint": last, "seconds": seconds, "trainer": trainer}
    if trainer.is_global_zero:
        steps = trainer.global_step - run_start.start_step
        session = (f" (step {run_start.start_step} -> {trainer.global_step})"
                   if ckpt_path is not None else "")
        print(f"[ldm-smd] trained {steps} steps in this session{session} in {seconds:.1f} s"
              f"{final_loss(trainer)}")
        print(where(run_dir, trainer, LAST))
    _end_process_group()
    if stop.stopped_at is not None:
        raise Interrupted(f"stopped by Ctrl-C after step {stop.stopped_at}, its checkpoint {last} "
                          f"written; continue with `{resume_command(run_dir)}`")
    return {"run_dir": run_dir, "checkpoint": last, "seconds": seconds, "trainer": trainer}


def _end_process_group() -> None:
    """Destroy the process group a DDP run started, once every rank is done: left to the
    interpreter's exit, gloo's threads were seen to abort a finished run (``terminate called
    without an active exception``, exit status -6)."""
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        torch.distributed.barrier()
        torch.distributed.destroy_process_group()

