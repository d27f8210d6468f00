"""What a training run prints: Lightning's known-harmless warnings and banners filtered by name,
and the closing lines (steps, final loss, where the checkpoints and logs are)."""

from __future__ import annotations

import logging
import shlex
import warnings
from pathlib import Path

import lightning as L
from lightning.pytorch.loggers import CSVLogger, TensorBoardLogger
from lightning.pytorch.utilities.warnings import PossibleUserWarning

#: Lightning warnings that do not apply to runs built here, ignored by message and category
#: (every other warning is shown):
HARMLESS_WARNINGS: tuple[tuple[str, type[Warning]], ...] = (
    # the frozen first stage (and LPIPS's VGG trunk) are in eval mode on purpose
    (r"Found \d+ module\(s\) in eval mode", PossibleUserWarning),
    # ImageDataModule checkpoints the data position itself (its state_dict: epoch and batches
    # done) and restarts the seeded sampler there, so a mid-epoch resume is exact
    # (tests/test_resume.py); Lightning only looks for that interface on the DataLoader object
    (r"You're resuming from a checkpoint that ended before the epoch ended", PossibleUserWarning),
    # stage 1 optimises manually; its checkpoints hold the state after the step, which is what
    # an exact resume needs (the warning offers a recipe for the state before the step)
    (r"Using ModelCheckpoint with manual optimization", UserWarning),
    # only a resume reaches a checkpoints/ folder that holds checkpoints (train refuses
    # otherwise), and one moved or copied run folder changes the dirpath on purpose
    (r"Checkpoint directory .* exists and is not empty", UserWarning),
    (r"The dirpath has changed from", UserWarning),
    # Lightning's own use of a torch API that torch deprecates; nothing of ours calls it
    (r"`isinstance\(treespec, LeafSpec\)` is deprecated", FutureWarning),
    # a small dataset's epoch is shorter than trainer.log_every_n_steps; the interval counts
    # steps across epochs, so the metrics are logged all the same
    (r"The number of training batches \(\d+\) is smaller than the logging interval",
     PossibleUserWarning),
    # the GPU configs' data.params.pin_memory: true is a no-op on a machine without a GPU
    (r"'pin_memory' argument is set as true but no accelerator is found", UserWarning),
)
#: Lightning's info lines that say nothing about this run (banners, tips, its own stop line:
#: the end of ``train`` prints what ran), dropped by their start
HARMLESS_INFO = (
    "GPU available:", "TPU available:", "HPU available:", "LOCAL_RANK:", "💡 Tip:",
    "`Trainer.fit` stopped:",
    "Restoring states from the checkpoint path", "Restored all states from the checkpoint",
    # a second Ctrl-C: train's own line says where the run stopped and what is kept
    "Detected KeyboardInterrupt, attempting graceful shutdown",
)


class _DropHarmlessInfo(logging.Filter):
    def filter(self, record: logging.LogRecord) -> bool:
        return not str(record.getMessage()).lstrip().startswith(HARMLESS_INFO)


_INFO_FILTER = _DropHarmlessInfo()


def quiet_lightning() -> None:
    """Filter Lightning's known-harmless warnings and banner lines (idempotent).

    Only the entries of :data:`HARMLESS_WARNINGS` and :data:`HARMLESS_INFO` are dropped; the
    model summary is off by default through ``trainer.enable_model_summary`` (see
    :func:`build_trainer`).
    """
    for message, category in HARMLESS_WARNINGS:
        warnings.filterwarnings("ignore", message=message, category=category)
    for name in ("lightning.pytorch.utilities.rank_zero", "lightning.fabric.utilities.rank_zero",
                 "lightning.pytorch.accelerators.cuda"):
        logger = logging.getLogger(name)
        if _INFO_FILTER not in logger.filters:
            logger.addFilter(_INFO_FILTER)


def final_loss(trainer: L.Trainer) -> str:
    """The training loss the progress bar showed last (``train/loss``, stage 1's
    ``train/rec_loss``), or the first ``train/*`` metric."""
    for metrics in (trainer.progress_bar_metrics, trainer.callback_metrics):
        keys = sorted(k for k in metrics if str(k).startswith("train/"))
        if keys:
            key = "train/loss" if "train/loss" in keys else keys[0]
            return f"; final {key} {float(metrics[key]):.4g}"
    return ""


def where(run_dir: Path, trainer: L.Trainer, last: str) -> str:
    """Where the checkpoints and the logs are (a CSV file only once a row was written: a run
    shorter than ``trainer.log_every_n_steps`` writes none)."""
    logs = []
    for logger in trainer.loggers:
        if isinstance(logger, CSVLogger):
            metrics = Path(logger.log_dir) / "metrics.csv"
            logs.append(str(metrics) if metrics.is_file() else
                        f"no CSV rows yet (one every {trainer.log_every_n_steps} steps, "
                        "trainer.log_every_n_steps)")
        elif isinstance(logger, TensorBoardLogger):
            logs.append(f"TensorBoard: tensorboard --logdir {shlex.quote(str(run_dir / 'logs'))}")
    return (f"[ldm-smd] checkpoints: {run_dir / 'checkpoints'} ({last}); logs: "
            + ("; ".join(logs) if logs else "none (logging.csv and logging.tensorboard are off)"))
