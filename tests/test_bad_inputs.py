"""The catalogue of bad inputs and the named error each gets, through the command line.

Every command-line case asserts: exit status 2, exactly one ``ldm-smd CMD: error:`` line on
stderr and no traceback, the message names the thing (key, value, file, option), and nothing was
written (the paths it would write are absent, or byte-identical to before). The silent cases of
issue 14 (``--steps 0``, ``--write`` into a stage-1 config, a reused ``--out``, overlapping seeds,
a shipped ``scale_factor``) assert the documented behaviour instead. Issue 21's cases (a second
command into a locked folder, seeds out of range, a swapped first stage, Ctrl-C, NaN weights,
dead ends after a kill or a NaN stop, unreadable pictures, noise) follow at the end; Ctrl-C is
exit status 130 with one ``ldm-smd CMD: interrupted:`` line.
"""

from __future__ import annotations

import errno
import os
import pickle
import shutil
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import tiny_configs
import torch
import yaml
from PIL import Image

from ldm_smd import fileio
from ldm_smd.blocks import instantiate
from ldm_smd.checkpoints import CheckpointError, load_checkpoint
from ldm_smd.cli import main as cli
from ldm_smd.config import ConfigError, load_config
from ldm_smd.data.decode import CorruptImageError
from ldm_smd.errors import LdmSmdError
from ldm_smd.sample import load_diffusion_checkpoint
from ldm_smd.train import train

DEMO = tiny_configs.DEMO
ROOT = tiny_configs.ROOT
QUIET = tiny_configs.QUIET + tiny_configs.tiny_data(batch=2, length=4) + ["trainer.max_steps=1"]
PIXEL = QUIET + tiny_configs.tiny_pixel_unet(timesteps=10)
NO_CUDA = pytest.mark.skipif(torch.cuda.is_available(), reason="needs a machine without CUDA")


class _WritesFile:
    """Unpickling this would create a file: a stand-in for a malicious checkpoint."""

    def __init__(self, path: str) -> None:
        self.path = path

    def __reduce__(self):
        return (open, (self.path, "w"))


@pytest.fixture(scope="module")
def stage2(tmp_path_factory) -> Path:
    run = tmp_path_factory.mktemp("stage2")
    return train(DEMO / "ldm-vanilla.yaml", PIXEL + [f"run_dir={run}"])["checkpoint"]


@pytest.fixture(scope="module")
def stage1(tmp_path_factory) -> Path:
    run = tmp_path_factory.mktemp("stage1")
    return train(DEMO / "autoencoder.yaml", QUIET + [
        f"run_dir={run}", "model.params.ddconfig.ch=32", "model.params.ddconfig.resolution=8",
        "model.params.ddconfig.ch_mult=[1]"])["checkpoint"]


def snapshot(path: Path) -> dict[str, bytes | None]:
    """Every file (bytes) and folder (None) under ``path``; ``{}`` when it does not exist."""
    if not path.exists():
        return {}
    if path.is_file():
        return {".": path.read_bytes()}
    return {str(p.relative_to(path)): (p.read_bytes() if p.is_file() else None)
            for p in sorted(path.rglob("*"))}


def run_cli(capsys, *argv) -> tuple[int, str, str]:
    code = cli([str(a) for a in argv])
    out, err = capsys.readouterr()
    return code, out, err


def assert_named(code: int, err: str, command: str, *parts: str) -> None:
    """Exit 2, one ``ldm-smd COMMAND: error:`` line, no traceback, every part named."""
    assert code == 2, err
    lines = [line for line in err.splitlines() if line.startswith(f"ldm-smd {command}: error:")]
    assert len(lines) == 1, err
    assert "Traceback" not in err, err
    for part in parts:
        assert part in err, (part, err)


def _finished_run(stage2: Path, dst: Path) -> Path:
    """A copy of the fixture's run folder (config.yaml, checkpoints/, logs/)."""
    shutil.copytree(stage2.parent.parent, dst)
    config = yaml.safe_load((dst / "config.yaml").read_text())
    config["run_dir"] = str(dst)
    (dst / "config.yaml").write_text(yaml.safe_dump(config, sort_keys=False))
    return dst


# ----------------------------------------------------------------------------- configs

@pytest.mark.parametrize("override,named", [
    ("model.params.learning_rat=1", ["model.params.learning_rat", "valid:", "learning_rate"]),
    ("model.params.image_size=big", ["model.params.image_size", "expected int", "'big'"]),
    ("model.params.ema_decay=[1]", ["model.params.ema_decay", "expected"]),
    ("model.target=ldm_smd.models.nowhere.Model", ["model.target", "ldm_smd.models.nowhere"]),
    ("model.target=ldm_smd.models.diffusion.Nope", ["model.target", "has no 'Nope'"]),
    ("model.params.network.target=nodots", ["model.params.network.target", "dotted path"]),
    ("model.params.network.params.model_chanels=8", ["model_chanels", "model_channels"]),
    ("data.params.train.params.sise=8", ["data.params.train.params.sise", "size"]),
    ("trainer.max_step=3", ["trainer.max_step", "max_steps"]),
    ("checkpoint.every_n_steps=3", ["checkpoint.every_n_steps", "every_n_train_steps"]),
    ("nan_guard.action=ignore", ["nan_guard.action", "'ignore'", "stop, skip"]),
    ("seed=abc", ["seed", "expected int"]),
    ("extra_section=1", ["unknown top-level key", "extra_section"]),
    ("model.params.learning_rate", ["override", "key.path=value"]),
    ("=3", ["override", "empty key"]),
    # trainer.* values against lightning.Trainer's annotations
    ("trainer.max_steps=abc", ["trainer.max_steps", "expected int", "'abc'"]),
    ("trainer.precision=33", ["trainer.precision", "'bf16-mixed'", "got int 33"]),
    ("trainer.enable_progress_bar=maybe", ["trainer.enable_progress_bar", "bool"]),
    ("trainer.logger=false", ["trainer.logger", "set by ldm-smd itself"]),
    # the component blocks (target/params) against the classes they name
    ("model.params.schedule.params.num_timesteps=abc",
     ["model.params.schedule.params.num_timesteps", "expected int", "'abc'"]),
    ("model.params.schedule.params.kindd=cosine",
     ["model.params.schedule.params.kindd", "num_timesteps"]),
    ("model.params.sampler.params.steps=many", ["model.params.sampler.params.steps",
                                                "expected int"]),
    ("model.params.sampler.params.kind=euler", ["model.params.sampler.params.kind", "'ddim'"]),
    ("model.params.objective.target=ldm_smd.diffusion.objectives.L2Objective",
     ["model.params.objective.target", "EnergyObjective"]),
    ("model.params.objective.params.tau=1",
     ["model.params.objective.params.tau", "DenoisingObjective"]),
    # a value the constructor refuses (before any work) names the block
    ("model.params.parameterization=score", ["model:", "score"]),
    ("data.params.batch_size=0", ["data:", "batch_size=0"]),
])
def test_bad_config_is_named_by_the_cli(tmp_path, capsys, override, named):
    code, _, err = run_cli(capsys, "train", "--config", DEMO / "ldm-vanilla.yaml", *PIXEL,
                           f"run_dir={tmp_path}/r", override)
    assert_named(code, err, "train", *named)
    assert not (tmp_path / "r").exists()  # nothing written before validation passed


@NO_CUDA
def test_gpu_accelerator_without_a_gpu_is_named_before_anything_is_written(tmp_path, capsys):
    code, _, err = run_cli(capsys, "train", "--config", DEMO / "ldm-vanilla.yaml", *PIXEL,
                           f"run_dir={tmp_path}/r", "trainer.accelerator=gpu")
    assert_named(code, err, "train", "trainer:")
    assert not (tmp_path / "r").exists()


def test_missing_required_parameter_is_named(tmp_path):
    config = yaml.safe_load((DEMO / "ldm-vanilla.yaml").read_text())
    del config["model"]["params"]["image_size"]
    path = tmp_path / "c.yaml"
    path.write_text(yaml.safe_dump(config))
    with pytest.raises(ConfigError, match=r"model\.params: missing required.*'image_size'"):
        load_config(path)


def test_exponent_without_a_dot_is_a_number_not_a_type_error():
    config = load_config(DEMO / "ldm-vanilla.yaml", ["model.params.learning_rate=2e-4"])
    assert config["model"]["params"]["learning_rate"] == 2e-4


def test_missing_and_unparsable_config_files_are_named(tmp_path):
    with pytest.raises(ConfigError, match="config file not found: .*absent.yaml"):
        load_config(tmp_path / "absent.yaml")
    bad = tmp_path / "bad.yaml"
    bad.write_text("model: [unclosed\n")
    with pytest.raises(ConfigError, match="bad.yaml could not be parsed"):
        load_config(bad)


def test_missing_first_stage_file_is_named(tmp_path, capsys):
    code, _, err = run_cli(capsys, "train", "--config", DEMO / "ldm-vanilla.yaml", *QUIET,
                           f"run_dir={tmp_path}/r", "model.params.first_stage=/nowhere/ae.ckpt")
    assert_named(code, err, "train", "first stage '/nowhere/ae.ckpt' not found")
    assert not (tmp_path / "r").exists()


# ----------------------------------------------------------------------------- run folders

def test_train_into_a_run_folder_that_holds_a_run_refuses_and_changes_nothing(
        tmp_path, stage2, capsys):
    run = _finished_run(stage2, tmp_path / "run")
    before = snapshot(run)
    code, _, err = run_cli(capsys, "train", "--config", DEMO / "ldm-vanilla.yaml", *PIXEL,
                           f"run_dir={run}")
    assert_named(code, err, "train", str(run), "already holds a run", "--resume", "--overwrite",
                 "checkpoints/", "nothing in it was changed")
    assert snapshot(run) == before


def test_a_failed_resume_leaves_the_run_byte_identical_and_resumable(tmp_path, stage2, capsys):
    run = _finished_run(stage2, tmp_path / "run")
    before = snapshot(run)
    code, _, err = run_cli(capsys, "train", "--resume", run, "trainer.max_steps=abc")
    assert_named(code, err, "train", "trainer.max_steps", "'abc'")
    code, _, err = run_cli(capsys, "train", "--resume", run, "--overwrite")
    assert_named(code, err, "train", "--resume", "--overwrite")
    assert snapshot(run) == before
    # the run's config.yaml was not touched: a plain resume works
    code, out, _ = run_cli(capsys, "train", "--resume", run, "trainer.max_steps=2")
    assert code == 0
    assert "trained 1 steps in this session (step 1 -> 2)" in out
    assert sorted(p.name for p in (run / "checkpoints").iterdir()) == ["last.ckpt"]


def test_overwrite_deletes_the_previous_run_and_says_so(tmp_path, stage2, capsys):
    run = _finished_run(stage2, tmp_path / "run")
    (run / "logs" / "marker.txt").write_text("from the previous run")
    (run / "notes.txt").write_text("the user's, not the run's")
    code, out, _ = run_cli(capsys, "train", "--config", DEMO / "ldm-vanilla.yaml", *PIXEL,
                           f"run_dir={run}", "--overwrite")
    assert code == 0
    assert f"--overwrite: deleted the previous run in {run}" in out
    assert not (run / "logs" / "marker.txt").exists()
    assert (run / "notes.txt").read_text() == "the user's, not the run's"
    assert load_checkpoint(run / "checkpoints" / "last.ckpt")["global_step"] == 1


def test_unwritable_run_dir_is_named_before_any_work(capsys):
    code, _, err = run_cli(capsys, "train", "--config", DEMO / "ldm-vanilla.yaml", *PIXEL,
                           "run_dir=/proc/ldm-smd-test/run")
    assert_named(code, err, "train", "run_dir /proc/ldm-smd-test/run cannot be written")


def _full_disk_for(monkeypatch, name_part: str) -> None:
    """Make every atomic write whose temporary name contains ``name_part`` fail with ENOSPC."""
    real_fsync = os.fsync

    def fsync(fd):
        if name_part in os.readlink(f"/proc/self/fd/{fd}"):
            raise OSError(errno.ENOSPC, "No space left on device")
        return real_fsync(fd)

    monkeypatch.setattr(fileio.os, "fsync", fsync)


def test_disk_full_during_training_names_the_file_and_what_was_kept(
        tmp_path, capsys, monkeypatch):
    _full_disk_for(monkeypatch, ".last.ckpt.")
    run = tmp_path / "run"
    code, _, err = run_cli(capsys, "train", "--config", DEMO / "ldm-vanilla.yaml", *PIXEL,
                           f"run_dir={run}")
    assert_named(code, err, "train", f"could not write {run / 'checkpoints' / 'last.ckpt'}",
                 "No space left on device", "no partial file was left",
                 "no checkpoint of this run was written yet")
    assert not list((run / "checkpoints").glob(".*.tmp"))


def test_disk_full_on_resume_keeps_the_previous_checkpoint(tmp_path, stage2, capsys, monkeypatch):
    run = _finished_run(stage2, tmp_path / "run")
    last = run / "checkpoints" / "last.ckpt"
    before = last.read_bytes()
    _full_disk_for(monkeypatch, ".last.ckpt.")
    code, _, err = run_cli(capsys, "train", "--resume", run, "trainer.max_steps=2")
    assert_named(code, err, "train", f"could not write {last}", "the previous last.ckpt there "
                 "is unchanged", f"the last complete checkpoint {last} is kept", "--resume")
    assert last.read_bytes() == before
    assert not list((run / "checkpoints").glob(".*.tmp"))


# ----------------------------------------------------------------------------- checkpoints

def _resumable_copy(stage2: Path, dst: Path) -> Path:
    (dst / "checkpoints").mkdir(parents=True)
    shutil.copy(stage2.parent.parent / "config.yaml", dst / "config.yaml")
    return dst / "checkpoints" / "last.ckpt"


def test_crafted_pickle_is_refused_by_resume_and_sample(tmp_path, stage2, capsys):
    marker = tmp_path / "pwned.txt"
    bad = _resumable_copy(stage2, tmp_path / "run")
    with open(bad, "wb") as f:
        pickle.dump({"state_dict": _WritesFile(str(marker))}, f)
    code, _, err = run_cli(capsys, "train", "--resume", tmp_path / "run")
    assert_named(code, err, "train", "refused to load", "Unsupported")
    code, _, err = run_cli(capsys, "sample", "--ckpt", bad, "--out", tmp_path / "s",
                           "--no-progress")
    assert_named(code, err, "sample", "refused to load")
    assert not marker.exists()
    assert not (tmp_path / "s").exists()


def test_truncated_checkpoint_is_named_on_resume(tmp_path, stage2, capsys):
    last = _resumable_copy(stage2, tmp_path / "run")
    data = stage2.read_bytes()
    last.write_bytes(data[: len(data) // 3])
    code, _, err = run_cli(capsys, "train", "--resume", tmp_path / "run")
    assert_named(code, err, "train", "truncated or not a checkpoint", str(last))


def test_garbage_checkpoint_is_named(tmp_path, capsys):
    bad = tmp_path / "garbage.ckpt"
    bad.write_bytes(b"hello, not a checkpoint " * 20)
    code, _, err = run_cli(capsys, "sample", "--ckpt", bad, "--out", tmp_path / "s")
    assert_named(code, err, "sample", "truncated or not a checkpoint", str(bad))
    assert not (tmp_path / "s").exists()


def test_missing_checkpoint_is_named(tmp_path, capsys):
    (tmp_path / "run").mkdir()
    code, _, err = run_cli(capsys, "train", "--resume", tmp_path / "run")
    assert_named(code, err, "train", f"--resume {tmp_path / 'run'}: no complete checkpoint in "
                 f"{tmp_path / 'run' / 'checkpoints'} (last.ckpt is missing")
    code, _, err = run_cli(capsys, "train", "--resume", tmp_path / "nothing")
    assert_named(code, err, "train", "no such run folder or checkpoint")
    code, _, err = run_cli(capsys, "sample", "--ckpt", tmp_path / "x.ckpt", "--out",
                           tmp_path / "s")
    assert_named(code, err, "sample", "checkpoint not found")
    assert not (tmp_path / "s").exists()


def test_autoencoder_checkpoint_passed_to_sample_is_named(tmp_path, stage1, capsys):
    code, _, err = run_cli(capsys, "sample", "--ckpt", stage1, "--out", tmp_path / "s")
    assert_named(code, err, "sample", "not a stage-2 (diffusion) checkpoint", "first_stage")
    assert not (tmp_path / "s").exists()


def test_checkpoint_missing_keys_are_listed(tmp_path, stage2):
    state = load_checkpoint(stage2)
    dropped = next(k for k in state["state_dict"] if k.startswith("model.diffusion_model."))
    del state["state_dict"][dropped]
    state["state_dict"]["model.unexpected"] = torch.zeros(1)
    path = tmp_path / "broken.ckpt"
    torch.save(state, path)
    with pytest.raises(CheckpointError) as err:
        load_diffusion_checkpoint(path)
    assert "missing keys (1)" in str(err.value) and dropped in str(err.value)
    assert "model.unexpected" in str(err.value) and "broken.ckpt" in str(err.value)


def test_resume_with_a_different_network_is_a_named_mismatch(tmp_path, stage2, capsys):
    run = _finished_run(stage2, tmp_path / "run")
    before = snapshot(run)
    code, _, err = run_cli(capsys, "train", "--resume", run, "trainer.max_steps=2",
                           "model.params.network.params.model_channels=64")
    assert_named(code, err, "train", "the config's model differs from the run's",
                 "model.diffusion_model")
    assert snapshot(run) == before


# ----------------------------------------------------------------------------- data files

def _folder_data(root: Path) -> list[str]:
    return PIXEL + ["data.params.train.target=ldm_smd.data.images.ImageFolder",
                    f"data.params.train.params={{root: {root}, size: 8}}"]


def test_missing_image_folder_is_named(tmp_path, capsys):
    code, _, err = run_cli(capsys, "train", "--config", DEMO / "ldm-vanilla.yaml",
                           *_folder_data(tmp_path / "no-such-folder"), f"run_dir={tmp_path}/r")
    assert_named(code, err, "train", f"image folder not found: {tmp_path / 'no-such-folder'}")
    assert not (tmp_path / "r").exists()


def test_empty_image_folder_is_named(tmp_path, capsys):
    (tmp_path / "empty").mkdir()
    code, _, err = run_cli(capsys, "train", "--config", DEMO / "ldm-vanilla.yaml",
                           *_folder_data(tmp_path / "empty"), f"run_dir={tmp_path}/r")
    assert_named(code, err, "train", f"image folder {tmp_path / 'empty'} holds no images")
    assert not (tmp_path / "r").exists()


def test_corrupt_image_is_named(tmp_path, capsys):
    folder = tmp_path / "images"
    folder.mkdir()
    for i in range(3):
        Image.new("RGB", (8, 8), (i * 40, 0, 0)).save(folder / f"ok{i}.png")
    (folder / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\n not really a png")
    code, _, err = run_cli(capsys, "train", "--config", DEMO / "ldm-vanilla.yaml",
                           *_folder_data(folder), f"run_dir={tmp_path}/r",
                           "data.params.shuffle=false", "data.params.batch_size=4")
    assert_named(code, err, "train", "broken.png")
    # found in the first batch: the failed start leaves nothing, so the same command can rerun
    assert not (tmp_path / "r").exists()


# ----------------------------------------------------------------------------- sample

@pytest.mark.parametrize("args,named", [
    (["--n", "0"], ["argument --n", "at least 1"]),
    (["--steps", "0"], ["argument --steps", "at least 1"]),
    (["--batch-size", "0"], ["argument --batch-size", "at least 1"]),
    (["--ddim-eta", "-1"], ["argument --ddim-eta", ">= 0"]),
    (["--ddim-eta", "0.5"], ["--ddim-eta 0.5", "DDIM sampler only", "--sampler ddim"]),
    (["--steps", "11"], ["--steps 11", "T=10"]),
    (["--device", "toaster"], ["--device 'toaster'", "not a torch device"]),
])
def test_bad_sample_arguments_are_named_before_anything_is_written(
        tmp_path, stage2, capsys, args, named):
    code, _, err = run_cli(capsys, "sample", "--ckpt", stage2, "--out", tmp_path / "s",
                           "--no-progress", *args)
    assert_named(code, err, "sample", *named)
    assert not (tmp_path / "s").exists()


@NO_CUDA
def test_cuda_device_without_a_gpu_is_named(tmp_path, stage2, capsys):
    code, _, err = run_cli(capsys, "sample", "--ckpt", stage2, "--out", tmp_path / "s",
                           "--device", "cuda")
    assert_named(code, err, "sample", "--device cuda", "no CUDA GPU")
    assert not (tmp_path / "s").exists()


def test_sample_out_naming_a_file_is_named(tmp_path, stage2, capsys):
    target = tmp_path / "notes.txt"
    target.write_text("keep me")
    code, _, err = run_cli(capsys, "sample", "--ckpt", stage2, "--out", target)
    assert_named(code, err, "sample", f"--out {target} is a file")
    assert target.read_text() == "keep me"


def _sample(capsys, stage2, out, *args):
    return run_cli(capsys, "sample", "--ckpt", stage2, "--out", out, "--no-progress", *args)


def test_a_reused_out_folder_is_refused_or_cleared_with_overwrite(tmp_path, stage2, capsys):
    out = tmp_path / "s"
    assert _sample(capsys, stage2, out, "--n", "4")[0] == 0
    before = snapshot(out)
    code, _, err = _sample(capsys, stage2, out, "--n", "2")
    assert_named(code, err, "sample", f"--out {out} already holds samples", "--overwrite")
    assert snapshot(out) == before
    code, printed, _ = _sample(capsys, stage2, out, "--n", "2", "--overwrite")
    assert code == 0
    assert f"--overwrite: removed the previous samples in {out}" in printed
    assert sorted(p.name for p in (out / "images").iterdir()) == ["000000.png", "000001.png"]
    assert np.load(out / "samples.npz")["images"].shape[0] == 2
    # a folder holding anything else is never cleared
    (out / "mine.txt").write_text("the user's")
    before = snapshot(out)
    code, _, err = _sample(capsys, stage2, out, "--n", "2", "--overwrite")
    assert_named(code, err, "sample", "mine.txt", "nothing was removed")
    assert snapshot(out) == before


def test_disk_full_while_sampling_names_the_file(tmp_path, stage2, capsys, monkeypatch):
    def full(self, fp, *args, **kwargs):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(Image.Image, "save", full)
    out = tmp_path / "s"
    code, _, err = _sample(capsys, stage2, out, "--n", "2")
    assert_named(code, err, "sample", f"could not write {out / 'images' / '000000.png'}",
                 "No space left on device", "kept")
    assert not list((out / "images").glob("*.png"))


def test_different_seeds_give_disjoint_sample_sets(tmp_path, stage2, capsys):
    sets = {}
    for seed in (7, 10):
        out = tmp_path / f"seed{seed}"
        assert _sample(capsys, stage2, out, "--n", "16", "--seed", seed)[0] == 0
        sets[seed] = {img.tobytes() for img in np.load(out / "samples.npz")["images"]}
        assert len(sets[seed]) == 16
    assert not sets[7] & sets[10]  # with seed + i, seeds 7 and 10 shared 13 of 16


# ----------------------------------------------------------------------------- scale factor

def test_scale_factor_zero_batches_is_named(tmp_path, stage1, capsys):
    code, _, err = run_cli(capsys, "scale-factor", "--ckpt", stage1, "--config",
                           DEMO / "autoencoder.yaml", "--batches", "0")
    assert_named(code, err, "scale-factor", "argument --batches", "at least 1")


@pytest.mark.parametrize("source,named", [
    ("autoencoder.yaml", ["not a stage-2", "takes no scale_factor"]),
    ("pixel", ["first_stage is 'identity'"]),
])
def test_scale_factor_write_refuses_a_config_without_a_stage2_first_stage(
        tmp_path, stage1, capsys, source, named):
    target = tmp_path / "target.yaml"
    if source == "pixel":
        text = (DEMO / "ldm-vanilla.yaml").read_text().replace(
            "first_stage: runs/demo/autoencoder/checkpoints/last.ckpt", "first_stage: identity")
        target.write_text(text)
    else:
        shutil.copy(DEMO / source, target)
    before = target.read_bytes()
    code, _, err = run_cli(capsys, "scale-factor", "--ckpt", stage1, "--config",
                           DEMO / "autoencoder.yaml", "--batches", "1", "--write", target)
    assert_named(code, err, "scale-factor", f"--write {target}", *named)
    assert target.read_bytes() == before


def test_shipped_configs_leave_the_scale_factor_to_the_first_stage():
    for folder in ("demo", "latent-diffusion", "pixel-diffusion"):
        for path in sorted((ROOT / "configs" / folder).glob("*.yaml")):
            params = (yaml.safe_load(path.read_text())["model"].get("params")) or {}
            assert "scale_factor" not in params, path


def test_scale_factor_precedence_config_over_first_stage_own(tmp_path):
    from ldm_smd.convert import build_autoencoder, export_diffusers

    ddconfig = dict(ch=32, ch_mult=[1, 2], num_res_blocks=1, attn_resolutions=[], z_channels=4,
                    double_z=True, resolution=16, in_channels=3, out_ch=3, dropout=0.0)
    export_diffusers(build_autoencoder(ddconfig=ddconfig, embed_dim=4), tmp_path / "vae",
                     scaling_factor=0.18215)
    base = [f"model.params.first_stage={tmp_path / 'vae'}", "model.params.image_size=8",
            "model.params.network.params.model_channels=32",
            "model.params.network.params.channel_mult=[1]",
            "model.params.network.params.attention_resolutions=[]"]
    own = instantiate(load_config(DEMO / "ldm-vanilla.yaml", base)["model"])
    assert own.first_stage_model.scale_factor == pytest.approx(0.18215)
    given = instantiate(load_config(DEMO / "ldm-vanilla.yaml", base + [
        "model.params.scale_factor=0.5"])["model"])
    assert given.first_stage_model.scale_factor == 0.5


# ----------------------------------------------------------------------------- eval

@pytest.fixture(scope="module")
def inception_weights(tmp_path_factory) -> Path:
    from ldm_smd.eval.inception import WEIGHTS_NAME, build_fid_inception

    torch.manual_seed(0)
    path = tmp_path_factory.mktemp("inception") / WEIGHTS_NAME
    torch.save(build_fid_inception().state_dict(), path)
    return path


def _pngs(folder: Path, n: int, seed: int) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    for i in range(n):
        Image.fromarray(rng.integers(0, 256, (16, 16, 3), dtype=np.uint8)).save(
            folder / f"{i:03d}.png")
    return folder


def test_eval_with_too_few_samples_is_named(tmp_path, capsys):
    samples, ref = _pngs(tmp_path / "s", 3, 0), _pngs(tmp_path / "r", 3, 1)
    code, _, err = run_cli(capsys, "eval", "--samples", samples, "--ref", ref,
                           "--out", tmp_path / "fid.json")
    assert_named(code, err, "eval", "FID needs at least 2048 samples", "got 3", "--min-samples")
    assert not (tmp_path / "fid.json").exists()


def test_eval_missing_samples_or_reference_is_named(tmp_path, capsys):
    samples = _pngs(tmp_path / "s", 3, 0)
    code, _, err = run_cli(capsys, "eval", "--samples", tmp_path / "none", "--ref", samples)
    assert_named(code, err, "eval", f"image folder not found: {tmp_path / 'none'}")
    code, _, err = run_cli(capsys, "eval", "--samples", samples, "--ref", tmp_path / "none",
                           "--min-samples", "2")
    assert_named(code, err, "eval", f"--ref {tmp_path / 'none'}")


def test_eval_bad_inception_weights_are_named(tmp_path, capsys):
    samples, ref = _pngs(tmp_path / "s", 3, 0), _pngs(tmp_path / "r", 3, 1)
    weights = tmp_path / "weights.pth"
    weights.write_bytes(b"not a state dict at all" * 100)
    code, _, err = run_cli(capsys, "eval", "--samples", samples, "--ref", ref, "--min-samples",
                           "2", "--inception-weights", weights, "--out", tmp_path / "fid.json")
    assert_named(code, err, "eval", "FID Inception weights:", str(weights),
                 "pt_inception-2015-12-05")
    assert not (tmp_path / "fid.json").exists()


@pytest.mark.parametrize("out", ["/proc/ldm-smd-test/fid.json", "folder"])
def test_eval_unwritable_out_is_named_before_any_feature(tmp_path, capsys, out):
    samples, ref = _pngs(tmp_path / "s", 3, 0), _pngs(tmp_path / "r", 3, 1)
    if out == "folder":
        out = tmp_path / "a-folder"
        out.mkdir()
    # no weights exist: the --out check must come first
    code, _, err = run_cli(capsys, "eval", "--samples", samples, "--ref", ref, "--min-samples",
                           "2", "--inception-weights", tmp_path / "absent.pth", "--out", out)
    assert_named(code, err, "eval", f"--out {out}")
    assert "absent.pth" not in err


@NO_CUDA
def test_eval_cuda_device_without_a_gpu_is_named(tmp_path, capsys):
    samples = _pngs(tmp_path / "s", 3, 0)
    code, _, err = run_cli(capsys, "eval", "--samples", samples, "--ref", samples,
                           "--device", "cuda")
    assert_named(code, err, "eval", "--device cuda", "no CUDA GPU")


def test_eval_prints_the_metrics_even_when_writing_them_fails(
        tmp_path, capsys, monkeypatch, inception_weights):
    monkeypatch.setenv("LDM_SMD_CACHE", str(tmp_path / "cache"))
    samples, ref = _pngs(tmp_path / "s", 3, 0), _pngs(tmp_path / "r", 3, 1)
    _full_disk_for(monkeypatch, ".fid.json.")
    out = tmp_path / "fid.json"
    code, printed, err = run_cli(
        capsys, "eval", "--samples", samples, "--ref", ref, "--min-samples", "2",
        "--batch-size", "3", "--inception-weights", inception_weights, "--out", out)
    assert_named(code, err, "eval", f"could not write {out}", "the metrics were printed above")
    assert "fid:" in printed and "samples: 3" in printed
    assert not out.exists()


# ----------------------------------------------------------------------------- bench-mixture

def test_bench_mixture_bad_config_or_out_is_named(tmp_path, capsys):
    code, _, err = run_cli(capsys, "bench-mixture", "--config", DEMO / "ldm-smd.yaml",
                           "--quick", "--out", tmp_path / "b")
    assert_named(code, err, "bench-mixture", str(DEMO / "ldm-smd.yaml"), "needs a 'bench' block")
    target = tmp_path / "a-file"
    target.write_text("keep")
    code, _, err = run_cli(capsys, "bench-mixture", "--config",
                           ROOT / "configs" / "mixture" / "ring8.yaml", "--quick", "--out", target)
    assert_named(code, err, "bench-mixture", f"--out {target} is a file")
    assert not (tmp_path / "b").exists() and target.read_text() == "keep"


# ----------------------------------------------------------------------------- the CLI itself

def test_debug_flag_and_environment_variable_show_the_traceback(tmp_path, capsys, monkeypatch):
    argv = ["sample", "--ckpt", tmp_path / "x.ckpt", "--out", tmp_path / "s"]
    code, _, err = run_cli(capsys, *argv)
    assert_named(code, err, "sample", "checkpoint not found")
    code, _, err = run_cli(capsys, argv[0], "--debug", *argv[1:])
    assert code == 2 and "Traceback" in err and "ldm-smd sample: error:" in err
    monkeypatch.setenv("LDM_SMD_DEBUG", "1")
    code, _, err = run_cli(capsys, *argv)
    assert code == 2 and "Traceback" in err


def test_every_named_error_derives_from_the_family():
    from ldm_smd.callbacks import NonFiniteError
    from ldm_smd.errors import DataError, OutputError, UsageError
    from ldm_smd.eval.fid import EvalInputError, EvalInputMissing, TooFewSamples
    from ldm_smd.eval.inception import InceptionWeightsError, InceptionWeightsMissing

    for cls in (ConfigError, CheckpointError, CorruptImageError, NonFiniteError, DataError,
                OutputError, UsageError, TooFewSamples, EvalInputError, EvalInputMissing,
                InceptionWeightsMissing, InceptionWeightsError):
        assert issubclass(cls, LdmSmdError), cls


def test_sample_to_dir_checks_its_arguments_too(tmp_path, stage2):
    from ldm_smd.errors import UsageError
    from ldm_smd.sample import sample_to_dir

    for kwargs, match in (({"steps": 0}, "--steps 0"), ({"n": 0}, "--n 0"),
                          ({"ddim_eta": -1.0}, "--ddim-eta"), ({"steps": 11}, "T=10"),
                          ({"sampler": "euler"}, "--sampler 'euler'")):
        with pytest.raises(UsageError, match=match):
            sample_to_dir(stage2, tmp_path / "s", progress=False, **kwargs)
    assert not (tmp_path / "s").exists()


def test_a_models_own_steps_above_its_T_are_named(tmp_path, stage2):
    from ldm_smd.errors import UsageError
    from ldm_smd.sample import load_diffusion_checkpoint, sample_to_dir

    model = load_diffusion_checkpoint(stage2)
    T = model.schedule.num_timesteps
    model.sampler = model.sampler.replace(steps=T + 5)
    with pytest.raises(UsageError,
                       match=rf"sampler\.params\.steps={T + 5} .* give --steps 1\.\.{T}"):
        sample_to_dir(stage2, tmp_path / "s", progress=False, model=model)
    assert not (tmp_path / "s").exists()


# ----------------------------------------------------------------------------- issue 21
# A shared machine, a second command, a second look: no silent loss, no traceback, no cliff.

def assert_interrupted(code: int, err: str, command: str, *parts: str) -> None:
    """Exit 130 (Ctrl-C), one ``ldm-smd COMMAND: interrupted:`` line, no traceback."""
    assert code == 130, err
    lines = [line for line in err.splitlines()
             if line.startswith(f"ldm-smd {command}: interrupted:")]
    assert len(lines) == 1, err
    assert "Traceback" not in err, err
    for part in parts:
        assert part in err, (part, err)


def _child_env() -> dict[str, str]:
    return {**os.environ, "PYTHONPATH": str(ROOT)}


class _LockHolder:
    """Another process holding ``folder``'s lock as ``command`` until closed."""

    def __init__(self, folder: Path, command: str) -> None:
        code = ("import sys; from ldm_smd.locks import FolderLock\n"
                "with FolderLock(sys.argv[1], what='run_dir', command=sys.argv[2]):\n"
                "    print('locked', flush=True); sys.stdin.read()")
        self.process = subprocess.Popen([sys.executable, "-c", code, str(folder), command],
                                        stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                                        text=True, env=_child_env())
        assert self.process.stdout.readline().strip() == "locked"

    def close(self) -> None:
        self.process.stdin.close()
        self.process.wait(timeout=60)


def _dead_pid() -> int:
    """The pid of a process that has ended."""
    child = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"],
                           capture_output=True, text=True, check=True)
    return int(child.stdout)


def _stale_lock(folder: Path) -> int:
    """A lock file left by a process that was killed (its pid no longer runs)."""
    from ldm_smd.locks import LOCK_NAME, LockOwner

    pid = _dead_pid()
    owner = LockOwner(pid=pid, host=socket.gethostname(), command="ldm-smd train --config c.yaml",
                      started="2024-01-01T00:00:00")
    folder.mkdir(parents=True, exist_ok=True)
    (folder / LOCK_NAME).write_text(owner.to_text())
    return pid


@pytest.mark.parametrize("resume", [False, True])
def test_a_second_command_into_a_locked_run_dir_is_refused_naming_the_owner(
        tmp_path, stage2, capsys, resume):
    run = _finished_run(stage2, tmp_path / "run")
    holder = _LockHolder(run, "ldm-smd train --config demo.yaml seed=0")
    try:
        before = snapshot(run)
        argv = (["train", "--resume", run, "trainer.max_steps=3"] if resume else
                ["train", "--config", DEMO / "ldm-vanilla.yaml", *PIXEL, f"run_dir={run}",
                 "seed=1", "--overwrite"])
        code, _, err = run_cli(capsys, *argv)
        assert_named(code, err, "train", f"run_dir {run} is in use by another command",
                     f"pid {holder.process.pid}", "`ldm-smd train --config demo.yaml seed=0`",
                     "nothing was changed")
        assert snapshot(run) == before
    finally:
        holder.close()
    # the owner gone, the folder is free (and its lock file gone with it)
    assert not (run / ".ldm-smd.lock").exists()
    code, out, _ = run_cli(capsys, "train", "--resume", run, "trainer.max_steps=2")
    assert code == 0 and "trained 1 steps in this session" in out


def test_two_train_commands_at_once_one_runs_the_other_is_refused(tmp_path, capsys):
    run = tmp_path / "run"
    first = subprocess.Popen(
        [sys.executable, "-m", "ldm_smd", "train", "--config", str(DEMO / "ldm-vanilla.yaml"),
         *PIXEL, f"run_dir={run}", "seed=0", "trainer.max_steps=100000"],
        env=_child_env(), stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    try:
        for _ in range(1200):  # the first command owns the folder once its lock file is there
            if (run / "config.yaml").exists() or first.poll() is not None:
                break
            time.sleep(0.1)
        assert (run / "config.yaml").exists(), first.stderr.read() if first.poll() else ""
        before_config = (run / "config.yaml").read_bytes()
        code, _, err = run_cli(capsys, "train", "--config", DEMO / "ldm-vanilla.yaml", *PIXEL,
                               f"run_dir={run}", "seed=1", "--overwrite")
        assert_named(code, err, "train", "is in use by another command",
                     f"pid {first.pid}", "seed=0")
        assert (run / "config.yaml").read_bytes() == before_config  # still the first run's
    finally:
        time.sleep(2)  # the first command's Ctrl-C handler is set just after config.yaml
        first.send_signal(signal.SIGINT)  # Ctrl-C: it stops cleanly after its step
        _, first_err = first.communicate(timeout=120)
    assert first.returncode == 130, first_err
    assert "ldm-smd train: interrupted: stopped by Ctrl-C after step" in first_err
    assert "Traceback" not in first_err
    assert yaml.safe_load((run / "config.yaml").read_text())["seed"] == 0
    assert load_checkpoint(run / "checkpoints" / "last.ckpt")["global_step"] >= 1


def test_a_stale_lock_of_a_killed_run_is_named_and_taken_over(tmp_path, stage2, capsys):
    run = _finished_run(stage2, tmp_path / "run")
    pid = _stale_lock(run)
    code, out, _ = run_cli(capsys, "train", "--resume", run, "trainer.max_steps=2")
    assert code == 0
    assert f"took over the stale lock of a command that is no longer running (pid {pid}" in out
    assert not (run / ".ldm-smd.lock").exists()


def test_an_attempt_killed_before_its_first_checkpoint_does_not_block_the_same_command(
        tmp_path, stage2, capsys):
    run = _finished_run(stage2, tmp_path / "run")
    shutil.rmtree(run / "checkpoints")  # kill -9 before the first checkpoint: config, logs only
    pid = _stale_lock(run)
    code, out, _ = run_cli(capsys, "train", "--config", DEMO / "ldm-vanilla.yaml", *PIXEL,
                           f"run_dir={run}")
    assert code == 0, out
    assert (f"the attempt of pid {pid} here ended before its first checkpoint: deleted the "
            f"previous run in {run} (config.yaml, logs/; no checkpoint yet)") in out
    # without a dead owner, a folder without checkpoints is still refused (only --overwrite)
    shutil.rmtree(run / "checkpoints")
    code, _, err = run_cli(capsys, "train", "--config", DEMO / "ldm-vanilla.yaml", *PIXEL,
                           f"run_dir={run}")
    assert_named(code, err, "train", "it has no checkpoint to continue from", "--overwrite")
    assert "--resume" not in err


# ----------------------------------------------------------------------------- seeds

@pytest.mark.parametrize("override", ["seed=-1", f"seed={2**70}", f"seed={2**32}",
                                      "data.params.seed=-1"])
def test_a_seed_out_of_range_is_named_before_any_work(tmp_path, capsys, override):
    code, _, err = run_cli(capsys, "train", "--config", DEMO / "ldm-vanilla.yaml", *PIXEL,
                           f"run_dir={tmp_path}/r", override)
    key, value = override.split("=")
    assert_named(code, err, "train", f"{key}: {value} is not a seed", "0 to 4294967295")
    assert not (tmp_path / "r").exists()


@pytest.mark.parametrize("seed", [-1, 2**64, 2**70])
def test_sample_seed_out_of_range_is_named(tmp_path, stage2, capsys, seed):
    code, _, err = _sample(capsys, stage2, tmp_path / "s", "--seed", seed)
    assert_named(code, err, "sample", f"--seed: {seed} is not a seed", "2**32 - 1")
    assert not (tmp_path / "s").exists()


def test_the_largest_seed_samples_a_set_unrelated_to_seed_zero(tmp_path, stage2, capsys):
    sets = []
    for seed in (0, 2**32 - 1):
        assert _sample(capsys, stage2, tmp_path / str(seed), "--n", "4", "--seed", seed)[0] == 0
        sets.append({a.tobytes() for a in np.load(tmp_path / str(seed) / "samples.npz")["images"]})
    assert not sets[0] & sets[1]


# ----------------------------------------------------------------------------- shapes

def test_swapping_in_the_identity_first_stage_names_every_shape_key(tmp_path, capsys):
    code, _, err = run_cli(capsys, "train", "--config", DEMO / "ldm-smd.yaml",
                           *QUIET, "data.params.train.params.size=32", f"run_dir={tmp_path}/r",
                           "model.params.first_stage=identity")
    net = "model.params.network.params.backbone.params"
    assert_named(code, err, "train", "the data's images are 3x32x32",
                 "the first stage is 'identity'", "model.params.channels=4",
                 "model.params.image_size=8", f"{net}.in_channels=4", f"{net}.out_channels=4",
                 f"set model.params.channels=3 model.params.image_size=32 {net}.in_channels=3 "
                 f"{net}.out_channels=3")
    assert not (tmp_path / "r").exists()


def test_a_network_whose_channels_differ_from_the_latents_is_named(tmp_path, capsys):
    code, _, err = run_cli(capsys, "train", "--config", DEMO / "ldm-vanilla.yaml", *PIXEL,
                           f"run_dir={tmp_path}/r", "model.params.network.params.out_channels=4")
    assert_named(code, err, "train", "model.params.network.params.out_channels=4",
                 "set model.params.network.params.out_channels=3")
    assert not (tmp_path / "r").exists()


# ----------------------------------------------------------------------------- Ctrl-C

def _interrupt_training(monkeypatch, *, at_step: int, presses: int = 1) -> None:
    """Ctrl-C (SIGINT to this process) ``presses`` times in the training step of ``at_step``."""
    from ldm_smd.models.diffusion import LatentDiffusion

    real = LatentDiffusion.training_step

    def training_step(self, batch, batch_idx):
        if self.global_step == at_step:
            for _ in range(presses):
                os.kill(os.getpid(), signal.SIGINT)
        return real(self, batch, batch_idx)

    monkeypatch.setattr(LatentDiffusion, "training_step", training_step)


def test_ctrl_c_in_train_stops_with_a_checkpoint_and_the_resume_is_exact(
        tmp_path, capsys, monkeypatch):
    straight = tmp_path / "straight"
    assert run_cli(capsys, "train", "--config", DEMO / "ldm-vanilla.yaml", *PIXEL,
                   f"run_dir={straight}", "trainer.max_steps=5")[0] == 0
    run = tmp_path / "my run"  # a space: the suggested command is shell-quoted
    with monkeypatch.context() as patch:
        _interrupt_training(patch, at_step=2)
        code, _, err = run_cli(capsys, "train", "--config", DEMO / "ldm-vanilla.yaml", *PIXEL,
                               f"run_dir={run}", "trainer.max_steps=5")
    assert_interrupted(code, err, "train", "stopped by Ctrl-C after step 3",
                       f"its checkpoint {run / 'checkpoints' / 'last.ckpt'} written",
                       f"continue with `ldm-smd train --resume '{run}'`")
    assert signal.getsignal(signal.SIGINT) is signal.default_int_handler
    assert load_checkpoint(run / "checkpoints" / "last.ckpt")["global_step"] == 3
    assert run_cli(capsys, "train", "--resume", run, "trainer.max_steps=5")[0] == 0
    a = load_checkpoint(straight / "checkpoints" / "last.ckpt")["state_dict"]
    b = load_checkpoint(run / "checkpoints" / "last.ckpt")["state_dict"]
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_a_second_ctrl_c_before_the_first_checkpoint_leaves_nothing_behind(
        tmp_path, capsys, monkeypatch):
    run = tmp_path / "run"
    argv = ["train", "--config", DEMO / "ldm-vanilla.yaml", *PIXEL, f"run_dir={run}",
            "trainer.max_steps=5"]
    with monkeypatch.context() as patch:
        _interrupt_training(patch, at_step=2, presses=2)
        code, _, err = run_cli(capsys, *argv)
    assert_interrupted(code, err, "train", "stopped during step 3",
                       "no checkpoint had been written, so nothing of this attempt was kept")
    assert signal.getsignal(signal.SIGINT) is signal.default_int_handler
    assert not run.exists()
    assert run_cli(capsys, *argv)[0] == 0  # the same command runs again


def test_ctrl_c_in_sample_keeps_the_complete_images_and_says_how_many(
        tmp_path, stage2, capsys, monkeypatch):
    from ldm_smd.models.diffusion import LatentDiffusion

    real, calls = LatentDiffusion.sample_images, []

    def sample_images(self, n, **kwargs):
        calls.append(n)
        if len(calls) == 3:
            raise KeyboardInterrupt
        return real(self, n, **kwargs)

    monkeypatch.setattr(LatentDiffusion, "sample_images", sample_images)
    out = tmp_path / "s"
    code, _, err = _sample(capsys, stage2, out, "--n", "10", "--batch-size", "4")
    assert_interrupted(code, err, "sample", f"8 of 10 samples are complete in {out / 'images'}",
                       "000000.png .. 000007.png", "--overwrite")
    assert sorted(p.name for p in out.iterdir()) == ["images"]
    assert sorted(p.name for p in (out / "images").iterdir()) == [f"{i:06d}.png" for i in range(8)]


def test_ctrl_c_while_a_png_is_written_removes_the_half_written_file(tmp_path, monkeypatch):
    from ldm_smd.images import save_singles

    real_save, calls = Image.Image.save, []

    def save(self, fp, *args, **kwargs):
        calls.append(fp)
        if len(calls) == 2:
            Path(fp).write_bytes(b"\x89PNG half")
            raise KeyboardInterrupt
        return real_save(self, fp, *args, **kwargs)

    monkeypatch.setattr(Image.Image, "save", save)
    with pytest.raises(KeyboardInterrupt):
        save_singles(torch.zeros(3, 3, 4, 4), tmp_path / "images")
    assert [p.name for p in (tmp_path / "images").iterdir()] == ["000000.png"]


# ----------------------------------------------------------------------------- silently wrong

@pytest.mark.parametrize("poisoned,refused_with,samples_with", [
    ("model_ema.", [], ["--no-ema"]),  # the EMA samples by default
    ("model.diffusion_model.", ["--no-ema"], []),
])
def test_a_checkpoint_with_nan_weights_is_refused_before_sampling(
        tmp_path, stage2, capsys, poisoned, refused_with, samples_with):
    state = load_checkpoint(stage2)
    name = next(k for k, v in state["state_dict"].items()
                if k.startswith(poisoned) and v.is_floating_point() and v.dim() > 1)
    state["state_dict"][name] = torch.full_like(state["state_dict"][name], float("nan"))
    bad = tmp_path / "nan.ckpt"
    torch.save(state, bad)
    code, _, err = _sample(capsys, bad, tmp_path / "s", *refused_with)
    assert_named(code, err, "sample", str(bad), "1 weight tensor(s) hold NaN or infinite values",
                 name)
    assert not (tmp_path / "s").exists()
    assert _sample(capsys, bad, tmp_path / "s", *samples_with)[0] == 0  # the others are finite


def test_an_image_smaller_than_the_data_size_is_named_when_enlarged(tmp_path, capsys):
    folder = tmp_path / "images"
    folder.mkdir()
    Image.new("RGB", (1, 1), (200, 0, 0)).save(folder / "tiny.png")
    for i in range(3):
        Image.new("RGB", (8, 8), (0, i * 40, 0)).save(folder / f"ok{i}.png")
    with pytest.warns(UserWarning, match=r"tiny\.png is 1x1 pixels .* smaller than size=8, and "
                                         r"is enlarged 8 times"):
        code, _, _ = run_cli(capsys, "train", "--config", DEMO / "ldm-vanilla.yaml",
                             *_folder_data(folder), f"run_dir={tmp_path}/r",
                             "data.params.shuffle=false", "data.params.batch_size=4")
    assert code == 0


def test_scale_factor_of_a_stage2_checkpoint_says_which_first_stage_it_estimates(
        tmp_path, stage1, capsys):
    net = "model.params.network.params"
    latent = train(DEMO / "ldm-vanilla.yaml", QUIET + [
        f"run_dir={tmp_path / 'ldm'}", f"model.params.first_stage={stage1}",
        "model.params.scale_factor=0.5", "model.params.image_size=8",
        f"{net}.model_channels=32", f"{net}.channel_mult=[1]", f"{net}.attention_resolutions=[]",
        "model.params.schedule.params.num_timesteps=10", "model.params.sampler.params.steps=10",
    ])["checkpoint"]
    code, out, _ = run_cli(capsys, "scale-factor", "--ckpt", latent, "--config",
                           DEMO / "autoencoder.yaml", "--batches", "1")
    assert code == 0
    assert (f"{latent} is a stage-2 (diffusion) checkpoint: the estimate below is for the first "
            "stage it holds; that model was trained with scale_factor 0.5") in out
    code, out, _ = run_cli(capsys, "scale-factor", "--ckpt", stage1, "--config",
                           DEMO / "autoencoder.yaml", "--batches", "1")
    assert code == 0 and "stage-2" not in out


@pytest.mark.parametrize("value,traceback", [("false", False), ("0", False), ("off", False),
                                             ("true", True), ("1", True)])
def test_ldm_smd_debug_reads_true_and_false(tmp_path, capsys, monkeypatch, value, traceback):
    monkeypatch.setenv("LDM_SMD_DEBUG", value)
    code, _, err = run_cli(capsys, "sample", "--ckpt", tmp_path / "x.ckpt", "--out",
                           tmp_path / "s")
    assert code == 2 and ("Traceback" in err) is traceback


def test_an_unknown_ldm_smd_debug_value_is_named(tmp_path, capsys, monkeypatch):
    monkeypatch.setenv("LDM_SMD_DEBUG", "maybe")
    code, _, err = run_cli(capsys, "sample", "--ckpt", tmp_path / "x.ckpt", "--out",
                           tmp_path / "s")
    assert_named(code, err, "sample", "LDM_SMD_DEBUG='maybe'", "1 (or true, yes, on)")


# ----------------------------------------------------------------------------- dead ends

def _run_with_step_checkpoints(stage2: Path, dst: Path, capsys) -> Path:
    """A finished run with ``step=2.ckpt`` and ``last.ckpt`` (both step 2)."""
    run = _finished_run(stage2, dst)
    assert run_cli(capsys, "train", "--resume", run, "trainer.max_steps=2",
                   "checkpoint.every_n_train_steps=1")[0] == 0
    assert (run / "checkpoints" / "step=2.ckpt").is_file()
    return run


@pytest.mark.parametrize("damage", ["cut off", "truncated", "older"])
def test_resume_uses_the_newest_complete_checkpoint_when_last_is_missing_or_damaged(
        tmp_path, stage2, capsys, damage):
    run = _run_with_step_checkpoints(stage2, tmp_path / "run", capsys)
    last = run / "checkpoints" / "last.ckpt"
    data = last.read_bytes()
    if damage == "cut off":  # kill -9 during the first write of last.ckpt
        last.unlink()
        (run / "checkpoints" / ".last.ckpt.abc123.tmp").write_bytes(data[: len(data) // 2])
        why = "last.ckpt is missing (its write was cut off: .last.ckpt.abc123.tmp)"
    elif damage == "truncated":
        last.write_bytes(data[: len(data) // 2])
        why = "last.ckpt is damaged (checkpoint"
    else:  # stopped after writing step=2.ckpt, before last.ckpt (still step 1's)
        shutil.copy(stage2, last)
        why = "step=2.ckpt is newer than last.ckpt (step 1)"
    # a fresh train into it recommends --resume, which now works
    code, _, err = run_cli(capsys, "train", "--config", DEMO / "ldm-vanilla.yaml", *PIXEL,
                           f"run_dir={run}")
    assert_named(code, err, "train", f"continue it with `ldm-smd train --resume {run}`")
    code, out, _ = run_cli(capsys, "train", "--resume", run, "trainer.max_steps=3")
    assert code == 0, out
    assert f"--resume {run}: {why}" in out
    assert f"resuming from {run / 'checkpoints' / 'step=2.ckpt'}, the newest complete" in out
    assert "trained 1 steps in this session (step 2 -> 3)" in out
    assert load_checkpoint(last)["global_step"] == 3


def test_resume_with_no_complete_checkpoint_names_what_it_found(tmp_path, stage2, capsys):
    run = _finished_run(stage2, tmp_path / "run")
    last = run / "checkpoints" / "last.ckpt"
    last.write_bytes(last.read_bytes()[:100])
    code, _, err = run_cli(capsys, "train", "--resume", run)
    assert_named(code, err, "train", f"no complete checkpoint in {run / 'checkpoints'}",
                 "last.ckpt is damaged", "no step=N.ckpt either")


def _nan_from_step(monkeypatch, step: int) -> None:
    from ldm_smd.models.diffusion import LatentDiffusion

    real = LatentDiffusion.forward_loss

    def forward_loss(self, images, generator):
        loss, logs = real(self, images, generator)
        return (loss * float("nan"), logs) if self.global_step >= step else (loss, logs)

    monkeypatch.setattr(LatentDiffusion, "forward_loss", forward_loss)


@pytest.mark.parametrize("action", ["stop", "skip"])
def test_a_nan_stop_before_the_first_checkpoint_claims_nothing_and_blocks_nothing(
        tmp_path, capsys, monkeypatch, action):
    run = tmp_path / "run"
    argv = ["train", "--config", DEMO / "ldm-vanilla.yaml", *PIXEL, f"run_dir={run}",
            "trainer.max_steps=6", f"nan_guard.action={action}", "nan_guard.max_skips=1"]
    with monkeypatch.context() as patch:
        _nan_from_step(patch, 2)
        code, out, err = run_cli(capsys, *argv)
    assert_named(code, err, "train", "non-finite", f"at step {2 if action == 'stop' else 3}",
                 "no checkpoint had been written, so nothing of this attempt was kept: the "
                 "same command starts it again")
    assert "checkpoint is kept" not in err
    assert ("action=skip" in err) is (action == "stop")
    if action == "skip":
        assert "training stopped after 1 skipped batches (nan_guard.max_skips=1" in err
        assert "batch skipped" in out
    assert not run.exists()
    assert run_cli(capsys, *argv)[0] == 0


def test_a_nan_stop_after_a_checkpoint_names_it(tmp_path, capsys, monkeypatch):
    run = tmp_path / "run"
    with monkeypatch.context() as patch:
        _nan_from_step(patch, 3)
        code, _, err = run_cli(capsys, "train", "--config", DEMO / "ldm-vanilla.yaml", *PIXEL,
                               f"run_dir={run}", "trainer.max_steps=6",
                               "checkpoint.every_n_train_steps=2")
    assert_named(code, err, "train", "at step 3",
                 f"the last complete checkpoint {run / 'checkpoints' / 'last.ckpt'} is kept",
                 f"`ldm-smd train --resume {run}`")


@pytest.mark.parametrize("override", ["data.params.mixture.params.std=.nan",
                                      "data.params.mixture.params.radius=.inf",
                                      "data.params.mixture.params.weights=[1, 1, 1, 1, 1, 1, 1, "
                                      ".nan]"])
def test_a_mixture_with_non_finite_parameters_is_refused_at_load(tmp_path, capsys, override):
    key = override.split("=")[0]
    for command in ("train", "bench-mixture"):
        argv = ([command, "--config", ROOT / "configs" / "mixture" / "ring8.yaml", override]
                + ([f"run_dir={tmp_path}/r"] if command == "train" else
                   ["--quick", "--out", tmp_path / "b"]))
        code, _, err = run_cli(capsys, *argv)
        assert_named(code, err, command, key, "is not a finite number")
    assert not (tmp_path / "r").exists() and not (tmp_path / "b").exists()


# ----------------------------------------------------------------------------- what is printed

def test_sample_grid_shows_64_readable_tiles_and_images_hold_them_all(tmp_path, stage2, capsys):
    out = tmp_path / "s"
    code, printed, _ = _sample(capsys, stage2, out, "--n", "70", "--batch-size", "35")
    assert code == 0
    assert f"grid: {out / 'grid.png'} (the first 64 of 70 samples)" in printed
    with Image.open(out / "grid.png") as grid:
        assert grid.size == (8 * (96 + 2) + 2, 8 * (96 + 2) + 2)  # 8 x 8 tiles of 96 px
    assert len(list((out / "images").glob("*.png"))) == 70
    assert np.load(out / "samples.npz")["images"].shape[0] == 70


def test_stage1_reconstructions_are_readable(stage1):
    pictures = sorted((stage1.parent.parent / "reconstructions").glob("*.png"))
    assert pictures
    with Image.open(pictures[0]) as picture:  # 2 inputs above 2 reconstructions, 8 px each
        assert picture.size == (2 * (96 + 2) + 2, 2 * (96 + 2) + 2)  # tiles of 96 px


def test_the_printed_logs_exist_and_small_datasets_raise_no_lightning_warning(
        tmp_path, capsys, recwarn):
    run = tmp_path / "run"
    code, out, err = run_cli(capsys, "train", "--config", DEMO / "ldm-vanilla.yaml", *PIXEL,
                             f"run_dir={run}", "trainer.log_every_n_steps=25",
                             "data.params.pin_memory=true")
    assert code == 0
    assert "metrics.csv" not in out and "no CSV rows yet (one every 25 steps" in out
    assert not (run / "logs" / "metrics.csv").exists()
    shown = [str(w.message) for w in recwarn]
    assert not [m for m in shown if "logging interval" in m or "pin_memory" in m], shown


def test_sample_help_names_the_sampler_key():
    text = subprocess.run([sys.executable, "-m", "ldm_smd", "sample", "--help"], env=_child_env(),
                          capture_output=True, text=True, check=True).stdout
    text = " ".join(text.split())
    assert "the checkpoint's model.params.sampler.params.kind" in text
    assert "the checkpoint's model.params.sampler.params.steps" in text
    assert "sampler.name" not in text and "checkpoint's sampler.steps" not in text


def test_a_missing_config_is_named_before_torch_is_imported_with_polite_openmp(tmp_path):
    code = ("import os, sys; from ldm_smd.cli import main; "
            "status = main(['train', '--config', sys.argv[1]]); "
            "print(status, 'torch' in sys.modules, os.environ.get('OMP_WAIT_POLICY'))")
    env = {k: v for k, v in _child_env().items() if k != "OMP_WAIT_POLICY"}
    done = subprocess.run([sys.executable, "-c", code, str(tmp_path / "absent.yaml")], env=env,
                          capture_output=True, text=True, check=True)
    assert done.stdout.split() == ["2", "False", "PASSIVE"]
    assert f"--config {tmp_path / 'absent.yaml'}: config file not found" in done.stderr


def test_share_cores_politely_keeps_a_policy_the_user_set():
    from ldm_smd.cpu import share_cores_politely

    env = {}
    assert share_cores_politely(env) == {"OMP_WAIT_POLICY": "PASSIVE"} == env
    env = {"OMP_WAIT_POLICY": "ACTIVE"}
    assert share_cores_politely(env) == {} and env == {"OMP_WAIT_POLICY": "ACTIVE"}
