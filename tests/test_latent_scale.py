"""The latent scale factor: its estimate, and writing it into a stage-2 config."""

from __future__ import annotations

import difflib
import shutil

import pytest
import tiny_configs
import torch
import yaml

from ldm_smd.config import ConfigError, load_config
from ldm_smd.errors import UsageError
from ldm_smd.latent_scale import estimate_scale_factor, write_scale_factor
from ldm_smd.nn.autoencoder import DiagonalGaussianDistribution


class _FixedPosterior(torch.nn.Module):
    """encode() gives a posterior with mean 0.5 and std 2 everywhere."""

    def __init__(self):
        super().__init__()
        self.dummy = torch.nn.Parameter(torch.zeros(()))

    def encode(self, x):
        mean = torch.full((x.shape[0], 4, 8, 8), 0.5)
        return DiagonalGaussianDistribution(torch.cat([mean, torch.full_like(mean, 2 * 0.6931472)],
                                                      dim=1))


def test_estimate_scale_factor_is_one_over_latent_std():
    batches = [torch.zeros(16, 3, 8, 8) for _ in range(4)]
    gen = torch.Generator().manual_seed(0)
    value = estimate_scale_factor(_FixedPosterior(), batches, generator=gen)
    assert value == pytest.approx(0.5, rel=0.02)  # sampled latents: std 2
    again = estimate_scale_factor(_FixedPosterior(), batches,
                                  generator=torch.Generator().manual_seed(0))
    assert again == value
    with pytest.raises(ValueError, match="variance"):
        estimate_scale_factor(_FixedPosterior(), batches, sample_posterior=False)
    with pytest.raises(ValueError, match="empty"):
        estimate_scale_factor(_FixedPosterior(), [])



# four-space indentation, comments of every kind, blank lines, flow and block collections
STAGE2 = """\
# Stage 2 of an experiment.
# A second header line.

model:
    target: ldm_smd.models.diffusion.LatentDiffusion   # the model
    params:
        first_stage: a.ckpt      # stage 1
        image_size: 8
        # the schedule, in flow style
        schedule: {target: ldm_smd.diffusion.schedule.NoiseSchedule, params: {kind: cosine}}
        network:
            target: ldm_smd.nn.unet.UNetModel
            params:
                channel_mult: [1, 2]
                attention_resolutions:
                    - 2
                    - 4   # the lowest

        learning_rate: 1.0e-4
data:
    target: d      # data
"""


def test_writing_keeps_comments_key_order_and_layout(tmp_path):
    path = tmp_path / "ldm.yaml"
    path.write_text(STAGE2)
    write_scale_factor(path, 0.18215)
    lines = STAGE2.splitlines(keepends=True)
    at = next(i for i, line in enumerate(lines) if "first_stage:" in line) + 1
    # one line more, right after first_stage, at its indentation; every other line unchanged
    assert path.read_text() == "".join(lines[:at] + ["        scale_factor: 0.18215\n"]
                                       + lines[at:])
    write_scale_factor(path, 0.5)  # a second write replaces the value in place
    assert path.read_text() == STAGE2.replace(
        "stage 1\n", "stage 1\n        scale_factor: 0.5\n")
    # an existing scale_factor keeps its place and its comment
    path.write_text(STAGE2.replace("image_size: 8\n",
                                   "image_size: 8\n        scale_factor: 1.0 # old\n"))
    write_scale_factor(path, 0.25)
    assert path.read_text() == STAGE2.replace(
        "image_size: 8\n", "image_size: 8\n        scale_factor: 0.25 # old\n")
    assert [p.name for p in tmp_path.iterdir()] == ["ldm.yaml"]  # no temporary left behind


@pytest.mark.parametrize("value", [0.18215, 1e-05, 2.5e+20, 3])
def test_the_written_value_reads_back_through_load_config(tmp_path, value):
    path = tmp_path / "ldm-smd.yaml"
    shutil.copy(tiny_configs.DEMO / "ldm-smd.yaml", path)
    before = load_config(path)
    write_scale_factor(path, value)
    after = load_config(path)
    assert after["model"]["params"]["scale_factor"] == value
    assert isinstance(after["model"]["params"]["scale_factor"], float)  # not the string '1e-05'
    after["model"]["params"].pop("scale_factor")
    assert after == before
    old, new = (tiny_configs.DEMO / "ldm-smd.yaml").read_text().splitlines(), path.read_text()
    added = [line for line in difflib.ndiff(old, new.splitlines()) if line[:1] in "+-"]
    assert len(added) == 1 and added[0].startswith("+     scale_factor: "), added


@pytest.mark.parametrize("text,named", [
    ("model:\n  target: ldm_smd.models.diffusion.LatentDiffusion\n# no params\n",
     "model.params.first_stage is 'identity'"),
    ("model:\n  target: ldm_smd.models.diffusion.LatentDiffusion\n  params: [a.ckpt]\n",
     "model.params is not a mapping"),
    ("data: {}\n", "no 'model' block"),
    # PyYAML keeps the last of two equal keys; a round trip cannot say which one to keep
    (STAGE2.replace("image_size: 8\n", "image_size: 8\n        image_size: 16\n"),
     r'found duplicate key "image_size" .*\(line 9\)'),
    ("model:\n  target: ldm_smd.models.autoencoder.AutoencoderKL\n  params: {embed_dim: 4}\n",
     "takes no scale_factor"),
])
def test_a_config_that_cannot_take_the_value_is_named_and_left_alone(tmp_path, text, named):
    path = tmp_path / "bad.yaml"
    path.write_text(text)
    with pytest.raises(ConfigError, match=named) as info:
        write_scale_factor(path, 1.0)
    assert str(path) in str(info.value)
    assert path.read_text() == text


@pytest.mark.parametrize("value", [0.0, -0.5, float("nan"), float("inf")])
def test_a_value_that_is_no_scale_is_refused(tmp_path, value):
    path = tmp_path / "ldm.yaml"
    path.write_text(STAGE2)
    with pytest.raises(UsageError, match="finite number above 0"):
        write_scale_factor(path, value)
    assert path.read_text() == STAGE2
    assert yaml.safe_load(STAGE2)["model"]["params"]["first_stage"] == "a.ckpt"
