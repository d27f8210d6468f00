"""The catalogue of bad inputs and the named error each gets: configs, checkpoints, data files.

Every case asserts that the message names the thing (key, value, file) and, where a command is
involved, that ``ldm-smd`` exits with status 2 and writes nothing it should not.
"""

from __future__ import annotations

import pickle
import shutil
from pathlib import Path

import pytest
import tiny_configs
import torch
import yaml
from PIL import Image

from ldm_smd.checkpoints import CheckpointError, load_checkpoint
from ldm_smd.cli import main as cli
from ldm_smd.config import ConfigError, load_config
from ldm_smd.data.decode import CorruptImageError
from ldm_smd.sample import load_diffusion_checkpoint
from ldm_smd.train import train

DEMO = tiny_configs.DEMO
QUIET = tiny_configs.QUIET + tiny_configs.tiny_data(batch=2, length=4) + ["trainer.max_steps=1"]
PIXEL = QUIET + tiny_configs.tiny_pixel_unet(timesteps=10)


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
])
def test_bad_config_is_named_by_the_cli(tmp_path, capsys, override, named):
    code = cli(["train", "--config", str(DEMO / "ldm-vanilla.yaml"), f"run_dir={tmp_path}/r",
                override])
    err = capsys.readouterr().err
    assert code == 2
    for part in named:
        assert part in err, (part, err)
    assert not (tmp_path / "r").exists()  # nothing written before validation passed


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


def test_missing_first_stage_file_is_named(tmp_path):
    with pytest.raises(FileNotFoundError, match="first stage '/nowhere/ae.ckpt' not found"):
        train(DEMO / "ldm-vanilla.yaml", QUIET + [
            f"run_dir={tmp_path}", "model.params.first_stage=/nowhere/ae.ckpt"])


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
    assert cli(["train", "--resume", str(tmp_path / "run")]) == 2
    assert "refused to load" in capsys.readouterr().err
    assert cli(["sample", "--ckpt", str(bad), "--out", str(tmp_path / "s"), "--no-progress"]) == 2
    assert "refused to load" in capsys.readouterr().err
    assert not marker.exists()
    assert not (tmp_path / "s" / "grid.png").exists()


def test_truncated_checkpoint_is_named_on_resume(tmp_path, stage2, capsys):
    last = _resumable_copy(stage2, tmp_path / "run")
    data = stage2.read_bytes()
    last.write_bytes(data[: len(data) // 3])
    assert cli(["train", "--resume", str(tmp_path / "run")]) == 2
    err = capsys.readouterr().err
    assert "truncated or not a checkpoint" in err and str(last) in err


def test_missing_checkpoint_is_named(tmp_path, capsys):
    (tmp_path / "run").mkdir()
    assert cli(["train", "--resume", str(tmp_path / "run")]) == 2
    assert f"no checkpoint at {tmp_path / 'run' / 'checkpoints' / 'last.ckpt'}" in (
        capsys.readouterr().err)
    assert cli(["train", "--resume", str(tmp_path / "nothing")]) == 2
    assert "no such run folder or checkpoint" in capsys.readouterr().err
    assert cli(["sample", "--ckpt", str(tmp_path / "x.ckpt"), "--out", str(tmp_path)]) == 2
    assert "checkpoint not found" in capsys.readouterr().err


def test_autoencoder_checkpoint_passed_to_sample_is_named(tmp_path, stage1, capsys):
    assert cli(["sample", "--ckpt", str(stage1), "--out", str(tmp_path / "s")]) == 2
    err = capsys.readouterr().err
    assert "not a stage-2 (diffusion) checkpoint" in err and "first_stage" in err


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


def test_resume_with_a_different_network_is_a_named_mismatch(tmp_path, stage2):
    _resumable_copy(stage2, tmp_path / "run").write_bytes(stage2.read_bytes())
    with pytest.raises(RuntimeError, match="model.diffusion_model"):
        train(resume=tmp_path / "run", overrides=["model.params.network.params.model_channels=64",
                                                  "trainer.max_steps=2"])


# ----------------------------------------------------------------------------- data files

def _folder_data(root: Path) -> list[str]:
    return PIXEL + ["data.params.train.target=ldm_smd.data.images.ImageFolder",
                    f"data.params.train.params={{root: {root}, size: 8}}"]


def test_missing_image_folder_is_named(tmp_path, capsys):
    code = cli(["train", "--config", str(DEMO / "ldm-vanilla.yaml"),
                *_folder_data(tmp_path / "no-such-folder"), f"run_dir={tmp_path}/r"])
    assert code == 2
    assert f"image folder not found: {tmp_path / 'no-such-folder'}" in capsys.readouterr().err


def test_empty_image_folder_is_named(tmp_path):
    (tmp_path / "empty").mkdir()
    with pytest.raises(ValueError, match=f"image folder {tmp_path / 'empty'} holds no images"):
        train(DEMO / "ldm-vanilla.yaml", _folder_data(tmp_path / "empty") + [
            f"run_dir={tmp_path}/r"])


def test_corrupt_image_is_named(tmp_path):
    folder = tmp_path / "images"
    folder.mkdir()
    for i in range(3):
        Image.new("RGB", (8, 8), (i * 40, 0, 0)).save(folder / f"ok{i}.png")
    (folder / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\n not really a png")
    with pytest.raises(CorruptImageError, match="broken.png"):
        train(DEMO / "ldm-vanilla.yaml", _folder_data(folder) + [
            f"run_dir={tmp_path}/r", "data.params.shuffle=false", "data.params.batch_size=4"])
