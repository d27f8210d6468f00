"""The training progress bar: Lightning's own (Rich when installed, else tqdm) with a total that
counts the steps still to run (also after a mid-epoch resume), no ``Epoch 0/-2``, and a rate
that is the mean over the steps run so far in this epoch.

Rich's own speed column estimates the rate from the last updates it saw (a 30-second window),
which on a busy machine, whose step times swing, read 6.87 it/s at the end of a stage that ran
at 0.33 it/s on average; tqdm's is the mean already (``smoothing=0``), but it counted the steps
done before a mid-epoch resume as if run in this session.
"""

from __future__ import annotations

from typing import Any

import lightning as L
from lightning.pytorch.callbacks import RichProgressBar, TQDMProgressBar
from lightning.pytorch.callbacks.progress.progress_bar import ProgressBar


def mean_rate(steps: float, seconds: float | None) -> str:
    """``steps`` over ``seconds`` as ``X.XXit/s``, or ``X.XXs/it`` when slower than one a
    second; empty before the first step."""
    if not seconds or steps <= 0:
        return ""
    rate = steps / seconds
    return f"{rate:.2f}it/s" if rate >= 1 else f"{1 / rate:.2f}s/it"


def _batches_done(trainer: L.Trainer) -> int:
    """Batches of the current epoch run before this session (a mid-epoch resume)."""
    return int(trainer.fit_loop.epoch_loop.batch_progress.current.ready)


class _StepTotals:
    """Progress-bar fixes for step-limited runs (``max_steps`` set, ``max_epochs = -1``).

    Lightning's bar sizes an epoch as ``min(batches per epoch, max_steps - global_step)`` but
    counts from the batch index inside the epoch, so after a mid-epoch resume at step 80 it reads
    ``81/49``; and the Rich bar labels the epoch ``0/-2`` (``max_epochs - 1``). Here the total
    adds the batches already done in the epoch, the label is ``Epoch N`` when there is no epoch
    limit, and the logger version (``v_num``) is not shown.
    """

    trainer: L.Trainer

    @property
    def total_train_batches(self) -> int | float:
        trainer = self.trainer
        total = trainer.num_training_batches
        if trainer.max_steps is not None and trainer.max_steps > 0:
            remaining = max(0, trainer.max_steps - trainer.global_step)
            total = min(total, _batches_done(trainer) + remaining)
        return total

    def _get_train_description(self, current_epoch: int) -> str:
        max_epochs = self.trainer.max_epochs
        label = f"Epoch {current_epoch}"
        if max_epochs is not None and max_epochs > 0:
            label += f"/{max_epochs - 1}"
        width = len(getattr(self, "validation_description", ""))
        return f"{label:{width}}" if width > len(label) else label

    def get_metrics(self, trainer: L.Trainer, pl_module: L.LightningModule) -> dict[str, Any]:
        items = super().get_metrics(trainer, pl_module)  # type: ignore[misc]
        items.pop("v_num", None)
        return items


class StepTQDMProgressBar(_StepTotals, TQDMProgressBar):
    """Lightning's tqdm bar with :class:`_StepTotals`' fixes; its rate (the mean, tqdm's
    ``smoothing=0``) counts only the steps of this session."""

    def on_train_epoch_start(self, trainer: L.Trainer, *args: Any) -> None:
        super().on_train_epoch_start(trainer, *args)
        self.train_progress_bar.initial = _batches_done(trainer)


class StepRichProgressBar(_StepTotals, RichProgressBar):
    """Lightning's Rich bar with :class:`_StepTotals`' fixes and a mean rate (see the module
    docstring) in place of Rich's windowed speed."""

    def configure_columns(self, trainer: L.Trainer) -> list:
        from rich.progress import ProgressColumn
        from rich.text import Text

        style = self.theme.processing_speed

        class MeanRateColumn(ProgressColumn):
            def render(self, task: Any) -> Text:
                done = task.completed - task.fields.get("done_before", 0)
                return Text(mean_rate(done, task.elapsed), style=style)

        columns = super().configure_columns(trainer)
        kept = [c for c in columns if type(c).__name__ != "ProcessingSpeedColumn"]
        return [*kept, MeanRateColumn()]

    def on_train_epoch_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        super().on_train_epoch_start(trainer, pl_module)
        if self.progress is not None and self.train_progress_bar_id is not None:
            self.progress.update(self.train_progress_bar_id, done_before=_batches_done(trainer))


def progress_bar() -> ProgressBar:
    """The bar Lightning would pick (Rich when installed, else tqdm), with the fixes above."""
    from lightning.pytorch.callbacks.progress.rich_progress import _RICH_AVAILABLE

    return StepRichProgressBar() if _RICH_AVAILABLE else StepTQDMProgressBar()
