"""Exact resume: an interrupted and resumed run equals an uninterrupted one, bit for bit on CPU.

Stage 2 (pixel-space diffusion, tiny UNet; 6 batches per epoch) is resumed from a checkpoint
written mid-epoch, one written on an epoch's last batch, and one written when a run stopped at
``max_steps``; stage 1 (tiny autoencoder, global-RNG posterior sampling) mid-epoch. EMA decay and
update counter survive; a mismatched EMA config is refused.
"""

from __future__ import annotations

import csv
import shutil
from pathlib import Path

import pytest
import tiny_configs
import torch

from ldm_smd.checkpoints import CheckpointError, load_checkpoint
from ldm_smd.train import train

DEMO = tiny_configs.DEMO
QUIET = tiny_configs.QUIET
TINY_DATA = tiny_configs.tiny_data(batch=4, length=24)  # 6 batches per epoch
PIXEL = TINY_DATA + QUIET + tiny_configs.tiny_pixel_unet() + [
    "model.params.lr_warmup_steps=3",
    "model.params.ema_decay=0.9",
    "data.params.batch_augment={flip_p: 0.5}",
]
AE = TINY_DATA + QUIET + [
    "model.params.ddconfig.ch=32",
    "model.params.ddconfig.resolution=8",
    "model.params.ddconfig.ch_mult=[1,1]",
]
STEPS = 9


def pixel_run(run_dir: Path, *extra: str) -> list[str]:
    return PIXEL + [f"run_dir={run_dir}", *extra]


def losses(run_dir: Path, key: str) -> dict[int, str]:
    """``step -> logged value`` (as written, so equality is exact) from the CSV logs of the
    first launch and of every resume (``logs/resume-K/``), later launches last."""
    out: dict[int, str] = {}
    files = [run_dir / "logs" / "metrics.csv"]
    files += sorted((run_dir / "logs").glob("resume-*/metrics.csv"),
                    key=lambda p: int(p.parent.name.split("-")[1]))
    for path in files:
        if path.is_file():
            with open(path) as f:
                for row in csv.DictReader(f):
                    if row.get(key):
                        out[int(row["step"])] = row[key]
    return out


def final_state(ckpt: Path) -> dict:
    state = load_checkpoint(ckpt)
    return {"weights": state["state_dict"], "optimizers": state["optimizer_states"],
            "schedulers": state.get("lr_schedulers"), "step": state["global_step"]}


def assert_same(a: dict, b: dict) -> None:
    assert a["step"] == b["step"]
    assert a["weights"].keys() == b["weights"].keys()
    for k in a["weights"]:
        assert torch.equal(a["weights"][k], b["weights"][k]), k
    assert repr(a["schedulers"]) == repr(b["schedulers"])
    for oa, ob in zip(a["optimizers"], b["optimizers"], strict=True):
        for pid, sa in oa["state"].items():
            for name, value in sa.items():
                assert torch.equal(torch.as_tensor(value), torch.as_tensor(ob["state"][pid][name]))


def resume_copy(ckpt: Path, src_run: Path, dst_run: Path) -> Path:
    """A fresh run folder holding only ``src_run``'s config and ``ckpt`` as its last checkpoint."""
    (dst_run / "checkpoints").mkdir(parents=True)
    shutil.copy(src_run / "config.yaml", dst_run / "config.yaml")
    shutil.copy(ckpt, dst_run / "checkpoints" / "last.ckpt")
    return dst_run


@pytest.fixture(scope="module")
def reference(tmp_path_factory) -> Path:
    """An uninterrupted stage-2 run keeping a checkpoint after every step."""
    run = tmp_path_factory.mktemp("ref")
    train(DEMO / "ldm-vanilla.yaml", pixel_run(
        run, f"trainer.max_steps={STEPS}", "checkpoint.every_n_train_steps=1",
        "checkpoint.save_top_k=-1"))
    return run


@pytest.mark.parametrize("step", [4, 6])  # mid-epoch; after the last batch of epoch 0
def test_resume_from_a_step_checkpoint_is_exact(reference, tmp_path, step):
    run = resume_copy(reference / "checkpoints" / f"step={step}.ckpt", reference, tmp_path / "r")
    train(resume=run, overrides=[f"run_dir={run}"])
    assert_same(final_state(run / "checkpoints" / "last.ckpt"),
                final_state(reference / "checkpoints" / "last.ckpt"))
    ref, resumed = losses(reference, "train/loss"), losses(run, "train/loss")
    assert len(ref) == STEPS and all(ref[s] == v for s, v in resumed.items())
    assert sorted(resumed) == list(range(step, STEPS))


def test_stop_at_max_steps_then_resume_is_exact(reference, tmp_path):
    run = tmp_path / "half"
    train(DEMO / "ldm-vanilla.yaml", pixel_run(run, "trainer.max_steps=5"))
    first = losses(run, "train/loss")
    train(resume=run, overrides=[f"trainer.max_steps={STEPS}"])
    assert_same(final_state(run / "checkpoints" / "last.ckpt"),
                final_state(reference / "checkpoints" / "last.ckpt"))
    assert losses(run, "train/loss") == losses(reference, "train/loss")
    assert sorted(first) == list(range(5))
    # the resume's override was kept for the next resume
    assert f"max_steps: {STEPS}" in (run / "config.yaml").read_text()


def test_resume_of_a_finished_run_trains_nothing_and_says_so(reference, tmp_path, capsys):
    run = resume_copy(reference / "checkpoints" / "last.ckpt", reference, tmp_path / "done")
    files = {p: p.read_bytes() for p in run.rglob("*") if p.is_file()}
    capsys.readouterr()
    train(resume=run, overrides=[f"run_dir={run}"])  # already at trainer.max_steps
    said = capsys.readouterr().out
    assert f"nothing trained: the run is already at step {STEPS}" in said
    assert "trained" not in said.replace("nothing trained", "")
    assert {p: p.read_bytes() for p in run.rglob("*") if p.is_file()} == files
    assert not (run / "logs").exists()  # no empty logs/resume-1 left behind


def test_ema_decay_and_counter_survive_a_checkpoint(reference):
    state = load_checkpoint(reference / "checkpoints" / "step=4.ckpt")["state_dict"]
    assert float(state["model_ema.decay"]) == pytest.approx(0.9)
    assert int(state["model_ema.num_updates"]) == 4
    last = load_checkpoint(reference / "checkpoints" / "last.ckpt")["state_dict"]
    assert int(last["model_ema.num_updates"]) == STEPS
    # the EMA really differs from the raw weights (so "sampling uses the EMA" means something)
    name = next(k for k in last if k.startswith("model.diffusion_model.") and "weight" in k)
    shadow = "model_ema." + name[len("model.diffusion_model."):].replace(".", "__")
    assert not torch.equal(last[name], last[shadow])


def test_sampling_uses_the_ema_weights_by_default(reference):
    from ldm_smd.sample import load_diffusion_checkpoint

    model = load_diffusion_checkpoint(reference / "checkpoints" / "last.ckpt")

    def draw(**kwargs):
        return model.sample_latents(2, generator=torch.Generator().manual_seed(0), steps=3,
                                    **kwargs)

    default, raw = draw(), draw(use_ema=False)
    assert not torch.equal(default, raw)
    model.model_ema.copy_to(model.model.diffusion_model)
    assert torch.equal(draw(use_ema=False), default)


@pytest.mark.parametrize("override,message", [
    ("model.params.ema_decay=0.5", "EMA decay is 0.9"),
    ("model.params.ema_decay=null", "has an EMA"),
])
def test_resume_with_a_different_ema_config_is_refused(reference, tmp_path, override, message):
    run = resume_copy(reference / "checkpoints" / "step=2.ckpt", reference, tmp_path / "r")
    config_before = (run / "config.yaml").read_text()
    with pytest.raises(CheckpointError, match=message):
        train(resume=run, overrides=[override])
    assert (run / "config.yaml").read_text() == config_before  # nothing lost


def test_resume_without_ema_into_a_config_with_ema_is_refused(tmp_path):
    run = tmp_path / "no-ema"
    train(DEMO / "ldm-vanilla.yaml", pixel_run(run, "trainer.max_steps=1",
                                               "model.params.ema_decay=null"))
    with pytest.raises(CheckpointError, match="has no EMA"):
        train(resume=run, overrides=["model.params.ema_decay=0.99", "trainer.max_steps=2"])


def test_stage1_mid_epoch_resume_is_exact(tmp_path):
    ref, half = tmp_path / "ref", tmp_path / "half"
    train(DEMO / "autoencoder.yaml", AE + [f"run_dir={ref}", "trainer.max_steps=8"])
    train(DEMO / "autoencoder.yaml", AE + [f"run_dir={half}", "trainer.max_steps=3"])
    train(resume=half, overrides=["trainer.max_steps=8"])
    assert_same(final_state(half / "checkpoints" / "last.ckpt"),
                final_state(ref / "checkpoints" / "last.ckpt"))
    assert losses(half, "train/rec_loss") == losses(ref, "train/rec_loss")
