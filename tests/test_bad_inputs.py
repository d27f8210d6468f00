"""The catalogue of bad inputs and the named error each gets, through the command line.

Every command-line case asserts: exit status 2, exactly one ``ldm-smd CMD: error:`` line on
stderr and no traceback, the message names the thing (key, value, file, option), and nothing was
written (the paths it would write are absent, or byte-identical to before). The silent cases of
issue 14 (``--steps 0``, ``--write`` into a stage-1 config, a reused ``--out``, overlapping seeds,
a shipped ``scale_factor``) assert the documented behaviour instead.
"""

from __future__ import annotations

import errno
import os
import pickle
import shutil
from pathlib import Path

import numpy as np
import pytest
import tiny_configs
import torch
import yaml
from PIL import Image

from ldm_smd import fileio
from ldm_smd.checkpoints import CheckpointError, load_checkpoint
from ldm_smd.cli import main as cli
from ldm_smd.config import ConfigError, instantiate, load_config
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
    assert_named(code, err, "train",
                 f"no checkpoint at {tmp_path / 'run' / 'checkpoints' / 'last.ckpt'}")
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
