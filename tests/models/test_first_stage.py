"""The latent scale factor's precedence (resolve_scale_factor) and the model that uses it."""

from __future__ import annotations

import math

import pytest
import tiny_configs
import torch

from ldm_smd.blocks import instantiate
from ldm_smd.config import ConfigError, load_config
from ldm_smd.convert import RecordedScales, build_autoencoder
from ldm_smd.models.first_stage import IDENTITY, resolve_scale_factor

ALL = RecordedScales(diffusers=0.18215, stage2=0.3, config_yaml=0.7)
VAE = "models/first_stage_models/kl/model.ckpt"

# (first stage, model.params.scale_factor, what the first stage's files record) -> (value, named)
PRECEDENCE = [
    # 0. pixel space is always 1, whatever is configured
    (IDENTITY, 0.5, ALL, 1.0, "identity"),
    (IDENTITY, None, None, 1.0, "identity"),
    # 1. the config wins over everything the first stage records
    (VAE, 0.5, ALL, 0.5, "model.params.scale_factor"),
    (VAE, 2, None, 2.0, "model.params.scale_factor"),  # a YAML integer; a rebuilt checkpoint
    # 2. else the first stage's own: diffusers, then a stage-2 checkpoint, then config.yaml
    (VAE, None, ALL, 0.18215, "config.json"),
    (VAE, None, RecordedScales(stage2=0.3, config_yaml=0.7), 0.3, "stage-2 checkpoint"),
    (VAE, None, RecordedScales(config_yaml=0.7), 0.7, "config.yaml beside"),
]


@pytest.mark.parametrize("first_stage,configured,recorded,value,named", PRECEDENCE)
def test_the_precedence_table(first_stage, configured, recorded, value, named):
    got, source = resolve_scale_factor(first_stage, configured=configured, recorded=recorded)
    assert got == value and isinstance(got, float)
    assert named in source


@pytest.mark.parametrize("recorded", [None, RecordedScales()])
def test_3_nothing_set_names_the_command_that_estimates_it(recorded):
    with pytest.raises(ConfigError) as info:
        resolve_scale_factor(VAE, configured=None, recorded=recorded)
    message = str(info.value)
    assert "model.params.scale_factor is not set" in message
    assert f"ldm-smd scale-factor --ckpt {VAE}" in message


@pytest.mark.parametrize("configured,recorded,named", [
    (0.0, None, "model.params.scale_factor"),
    (-1.0, ALL, "model.params.scale_factor"),
    (math.inf, None, "model.params.scale_factor"),
    (None, RecordedScales(diffusers=math.nan), "config.json"),
    (None, RecordedScales(stage2=0.0, config_yaml=0.7), "stage-2 checkpoint"),
])
def test_a_winning_value_that_is_no_scale_is_named_with_its_source(configured, recorded, named):
    with pytest.raises(ConfigError, match="must be a finite number above 0") as info:
        resolve_scale_factor(VAE, configured=configured, recorded=recorded)
    assert named in str(info.value)


DDCONFIG = dict(ch=32, ch_mult=[1, 2], num_res_blocks=1, attn_resolutions=[], z_channels=4,
                double_z=True, resolution=16, in_channels=3, out_ch=3, dropout=0.0)


def _model(first_stage, *overrides):
    net = "model.params.network.params"
    config = load_config(tiny_configs.DEMO / "ldm-vanilla.yaml", [
        f"model.params.first_stage={first_stage}", "model.params.image_size=8",
        f"{net}.model_channels=32", f"{net}.channel_mult=[1]", f"{net}.attention_resolutions=[]",
        *overrides])
    return instantiate(config["model"])


def test_the_model_uses_the_resolved_value_and_records_it(tmp_path, capsys):
    torch.manual_seed(0)
    autoencoder = build_autoencoder(ddconfig=DDCONFIG, embed_dim=4)
    stage1 = tmp_path / "stage1.ckpt"
    torch.save({"state_dict": autoencoder.state_dict(),
                "hyper_parameters": {"ddconfig": DDCONFIG, "embed_dim": 4}}, stage1)
    with pytest.raises(ConfigError, match=f"ldm-smd scale-factor --ckpt {stage1}"):
        _model(stage1)
    given = _model(stage1, "model.params.scale_factor=0.25")
    assert given.first_stage_model.scale_factor == 0.25
    assert given.hparams["scale_factor"] == 0.25  # what a rebuilt checkpoint is given
    # a stage-2 checkpoint used as first stage brings the value it recorded
    stage2 = tmp_path / "stage2.ckpt"
    state = {f"first_stage_model.autoencoder.{k}": v for k, v in autoencoder.state_dict().items()}
    torch.save({"state_dict": state, "hyper_parameters": {
        "first_stage_config": {"ddconfig": DDCONFIG, "embed_dim": 4}, "scale_factor": 0.3}},
        stage2)
    capsys.readouterr()
    own = _model(stage2)
    assert own.first_stage_model.scale_factor == pytest.approx(0.3)
    assert "latent scale factor 0.3 (scale_factor recorded in the stage-2 checkpoint" in (
        capsys.readouterr().out)
    assert _model(stage2, "model.params.scale_factor=0.5").first_stage_model.scale_factor == 0.5
