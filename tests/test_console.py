"""What the command line shows: our lines and Lightning's bar, nothing else; fast, complete help."""

from __future__ import annotations

import argparse
import re
import subprocess
import sys
import warnings
from types import SimpleNamespace

import pytest
import tiny_configs

from ldm_smd.cli import build_parser
from ldm_smd.cli import main as cli
from ldm_smd.console import HARMLESS_INFO, HARMLESS_WARNINGS
from ldm_smd.progress import StepRichProgressBar, StepTQDMProgressBar, mean_rate

DEMO = tiny_configs.DEMO
TINY_AE = tiny_configs.QUIET + tiny_configs.tiny_data(batch=2, length=8) + [
    "model.params.ddconfig.ch=32", "model.params.ddconfig.resolution=8",
    "model.params.ddconfig.ch_mult=[1]", "checkpoint.every_n_train_steps=2",
]
#: what must never reach the console again (issue 14's list)
NOISE = ("GPU available", "TPU available", "Tip:", "weights_only", "module(s) in eval mode",
         "FLOPs", "Total params", "LeafSpec", "manual optimization", "unreliable results",
         "Trainer.fit` stopped", "Epoch 0/-2", "Restored all states")


def _lightning_warnings(records: list[warnings.WarningMessage]) -> list[str]:
    return [str(w.message) for w in records if "lightning" in (w.filename or "")]


def test_a_stage1_run_and_its_resume_print_only_our_lines(tmp_path, capfd):
    run = tmp_path / "ae"
    with warnings.catch_warnings(record=True) as records:
        warnings.simplefilter("always")
        assert cli(["train", "--config", str(DEMO / "autoencoder.yaml"), *TINY_AE,
                    "trainer.max_steps=3", f"run_dir={run}"]) == 0
        first = capfd.readouterr()
        # mid-epoch (3 of 4 batches), so Lightning would warn that the loader is not resumable
        assert cli(["train", "--resume", str(run), "trainer.max_steps=6"]) == 0
        second = capfd.readouterr()
        # stage 2 on it: the frozen first stage is in eval mode (Lightning would warn)
        net = "model.params.network.params"
        assert cli(["train", "--config", str(DEMO / "ldm-vanilla.yaml"), *tiny_configs.QUIET,
                    *tiny_configs.tiny_data(batch=2, length=8), "trainer.max_steps=2",
                    f"run_dir={tmp_path / 'ldm'}",
                    f"model.params.first_stage={run / 'checkpoints' / 'last.ckpt'}",
                    "model.params.scale_factor=1.0", "model.params.image_size=8",
                    f"{net}.model_channels=32", f"{net}.channel_mult=[1]",
                    f"{net}.attention_resolutions=[]",
                    "model.params.schedule.params.num_timesteps=10",
                    "model.params.sampler.params.steps=10"]) == 0
        third = capfd.readouterr()
    for printed in (first, second, third):
        text = printed.out + printed.err
        for noise in NOISE:
            assert noise not in text, (noise, text)
        lines = [line for line in text.splitlines() if line.strip()]
        assert len(lines) <= 10, text
        assert all(line.startswith("[ldm-smd]") for line in lines), text
    assert "trained 3 steps in this session;" not in first.out  # "in this session in X s"
    assert "trained 3 steps in this session in" in first.out
    assert "final train/rec_loss" in first.out
    assert f"checkpoints: {run / 'checkpoints'} (last.ckpt); logs: " in first.out
    assert "trained 3 steps in this session (step 3 -> 6)" in second.out
    assert f"resumed from {run / 'checkpoints' / 'last.ckpt'} at step 3" in second.out
    assert str(run / "logs" / "resume-1" / "metrics.csv") in second.out
    quiet = [m for m in _lightning_warnings(records)
             if any(re.search(pattern, m) for pattern, _ in HARMLESS_WARNINGS)]
    assert not quiet, quiet
    assert sorted(p.name for p in (run / "checkpoints").iterdir()) == [
        "last.ckpt", "step=6.ckpt"]  # no last-v1.ckpt


def test_harmless_lists_are_specific():
    # filtered by message, never a blanket "ignore"
    assert all(pattern and category is not Warning for pattern, category in HARMLESS_WARNINGS)
    assert all(prefix.strip() for prefix in HARMLESS_INFO)


@pytest.mark.parametrize("bar", [StepTQDMProgressBar, StepRichProgressBar])
def test_progress_bar_after_a_mid_epoch_resume(bar):
    progress = SimpleNamespace(current=SimpleNamespace(ready=80))
    trainer = SimpleNamespace(
        num_training_batches=3125, max_steps=129, global_step=80, max_epochs=-1,
        fit_loop=SimpleNamespace(epoch_loop=SimpleNamespace(batch_progress=progress)),
    )
    instance = bar()
    instance._trainer = trainer  # what Lightning sets in setup()
    # the bar counts batch index + 1 = 81..129 of this epoch: the total is 129, not 49
    assert instance.total_train_batches == 129
    assert instance._get_train_description(0).strip() == "Epoch 0"
    trainer.max_epochs = 3
    assert instance._get_train_description(1).strip() == "Epoch 1/2"
    trainer.max_steps, trainer.global_step, progress.current.ready = -1, 10, 0
    assert instance.total_train_batches == 3125


def test_the_bar_rate_is_the_mean_over_this_sessions_steps():
    assert mean_rate(0, 5.0) == "" and mean_rate(3, None) == ""
    assert mean_rate(30, 10.0) == "3.00it/s"
    assert mean_rate(10, 30.0) == "3.00s/it"  # 0.33 steps a second reads as seconds a step
    bar = StepRichProgressBar()
    (column,) = [c for c in bar.configure_columns(None) if type(c).__name__ == "MeanRateColumn"]
    # resumed at batch 80 of the epoch, 20 steps done in 40 s since: 0.5 steps a second
    task = SimpleNamespace(completed=100, elapsed=40.0, fields={"done_before": 80})
    assert column.render(task).plain == "2.00s/it"
    assert not [c for c in bar.configure_columns(None)
                if type(c).__name__ == "ProcessingSpeedColumn"]  # Rich's windowed speed


def test_the_tqdm_rate_counts_only_this_sessions_steps():
    progress = SimpleNamespace(current=SimpleNamespace(ready=80))  # resumed at batch 80
    trainer = SimpleNamespace(
        num_training_batches=3125, max_steps=129, global_step=80, max_epochs=-1, current_epoch=0,
        fit_loop=SimpleNamespace(epoch_loop=SimpleNamespace(batch_progress=progress)),
    )
    bar = StepTQDMProgressBar()
    bar._trainer = trainer
    bar.train_progress_bar = bar.init_train_tqdm()
    bar.on_train_epoch_start(trainer)
    tqdm_bar = bar.train_progress_bar
    tqdm_bar.n = 90  # 10 steps of this session in 10 s: 1 step a second, not 9
    line = tqdm_bar.format_meter(**{**tqdm_bar.format_dict, "elapsed": 10.0})
    tqdm_bar.close()
    assert "90/129" in line and "1.00it/s" in line


def _subcommands(parser: argparse.ArgumentParser) -> dict[str, argparse.ArgumentParser]:
    action = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction))
    return dict(action.choices)


def test_every_option_has_help_and_every_command_an_example():
    parser = build_parser()
    commands = _subcommands(parser)
    assert set(commands) == {"train", "sample", "scale-factor", "eval", "bench", "bench-mixture",
                             "train-classifier", "score-images"}
    assert "example:" in parser.epilog
    for name, sub in commands.items():
        assert f"example:\n  {sub.prog} " in sub.epilog, name  # an alias shows its command's
        for action in sub._actions:
            assert action.help and action.help.strip(), (name, action.dest)
        text = sub.format_help()
        # a default is shown where there is one
        for action in sub._actions:
            if action.option_strings and action.default not in (None, False, "==SUPPRESS=="):
                assert f"(default: {action.default})" in " ".join(text.split()), (
                    name, action.dest)
    first = parser.format_help().split("\n\n")[1]
    assert first.startswith("Latent diffusion with Soft Mixture Denoising")


def test_help_exits_zero_and_a_usage_error_is_one_line(capsys):
    assert cli(["--help"]) == 0
    assert "ldm-smd CMD --help" in capsys.readouterr().out
    assert cli(["sample", "--help"]) == 0
    assert "(default: 16)" in capsys.readouterr().out
    assert cli(["sample", "--ckpt", "x", "--out", "y", "--n", "zero"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith("ldm-smd sample: error: argument --n")


def test_the_command_line_module_imports_nothing_heavy():
    code = ("import sys, ldm_smd.cli, ldm_smd.errors; "
            "print(sorted(m for m in ('torch', 'lightning', 'numpy') if m in sys.modules))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         check=True).stdout
    assert out.strip() == "[]"
