"""NaN guard: a NaN injected into one training batch stops training with a message naming the
step and the loss term (the last good checkpoint stays), or, with ``nan_guard.action=skip``, the
batch is skipped without an optimizer update and counted. Stage 1 (manual optimisation) too."""

from __future__ import annotations

from pathlib import Path

import pytest
import tiny_configs
import torch

from ldm_smd.callbacks import NonFiniteError
from ldm_smd.checkpoints import load_checkpoint
from ldm_smd.data.synthetic import SyntheticShapes
from ldm_smd.train import train

ROOT = Path(__file__).resolve().parents[1]
DEMO = ROOT / "configs" / "demo"
NAN_AT = 2  # the batch (= step, unshuffled, batch size 4) whose first image is NaN


class NanShapes(SyntheticShapes):
    """Synthetic shapes whose item ``nan_index`` is all NaN.

    Args:
        nan_index: the poisoned item.
        size: image size.
        length: number of items.
    """

    def __init__(self, *, nan_index: int, size: int = 8, length: int = 24) -> None:
        super().__init__(size=size, length=length)
        self.nan_index = nan_index

    def __getitems__(self, indices):
        items = super().__getitems__(indices)
        for i, item in zip(indices, items, strict=True):
            if i == self.nan_index:
                item["image"] = torch.full_like(item["image"], float("nan"))
        return items

    def __getitem__(self, index):
        return self.__getitems__([index])[0]


COMMON = [
    "data.params.batch_size=4", "data.params.shuffle=false",
    f"data.params.train.target={__name__}.NanShapes",
    f"data.params.train.params={{nan_index: {4 * NAN_AT}, size: 8, length: 24}}",
    *tiny_configs.QUIET,
    "checkpoint.every_n_train_steps=1", "checkpoint.save_top_k=-1",
]
PIXEL = COMMON + tiny_configs.tiny_pixel_unet()
AE = COMMON + ["model.params.ddconfig.ch=32", "model.params.ddconfig.resolution=8",
               "model.params.ddconfig.ch_mult=[1,1]"]


def _finite(state: dict) -> bool:
    return all(torch.isfinite(v).all() for v in state.values() if v.is_floating_point())


def test_nan_stops_with_step_and_term_and_keeps_last_good_checkpoint(tmp_path):
    with pytest.raises(NonFiniteError) as err:
        train(DEMO / "ldm-vanilla.yaml", PIXEL + [f"run_dir={tmp_path}", "trainer.max_steps=5"])
    message = str(err.value)
    assert f"at step {NAN_AT}" in message and "loss term(s) loss" in message
    assert f"the last complete checkpoint {tmp_path / 'checkpoints' / 'last.ckpt'} is kept" \
        in message
    last = load_checkpoint(tmp_path / "checkpoints" / "last.ckpt")
    assert last["global_step"] == NAN_AT and _finite(last["state_dict"])
    assert not (tmp_path / "checkpoints" / f"step={NAN_AT + 1}.ckpt").exists()


def test_skip_drops_the_update_and_counts_it(tmp_path):
    train(DEMO / "ldm-vanilla.yaml", PIXEL + [f"run_dir={tmp_path}", "trainer.max_steps=4",
                                              "nan_guard.action=skip"])
    ckpts = tmp_path / "checkpoints"
    before = load_checkpoint(ckpts / f"step={NAN_AT}.ckpt")
    after = load_checkpoint(ckpts / f"step={NAN_AT + 1}.ckpt")
    final = load_checkpoint(ckpts / "last.ckpt")
    assert final["global_step"] == 4 and _finite(final["state_dict"])
    net = [k for k in before["state_dict"] if k.startswith("model.diffusion_model.")]
    assert all(torch.equal(before["state_dict"][k], after["state_dict"][k]) for k in net)
    assert not all(torch.equal(after["state_dict"][k], final["state_dict"][k]) for k in net)
    adam_steps = {int(s["step"]) for s in after["optimizer_states"][0]["state"].values()}
    assert adam_steps == {NAN_AT}  # the optimizer did not step on the poisoned batch
    guard = next(v for k, v in final["callbacks"].items() if k.startswith("NanGuard"))
    assert guard == {"skipped": 1}
    assert "train/nan_skipped" in (tmp_path / "logs" / "metrics.csv").read_text()


def test_skip_stops_after_max_skips(tmp_path):
    with pytest.raises(NonFiniteError, match="after 0 skipped batches"):
        train(DEMO / "ldm-vanilla.yaml", PIXEL + [f"run_dir={tmp_path}", "trainer.max_steps=4",
                                                  "nan_guard.action=skip", "nan_guard.max_skips=0"])


def test_stage1_manual_optimisation_is_guarded(tmp_path):
    with pytest.raises(NonFiniteError) as err:
        train(DEMO / "autoencoder.yaml", AE + [f"run_dir={tmp_path}", "trainer.max_steps=5"])
    assert f"at step {NAN_AT}" in str(err.value) and "gradient of" in str(err.value)
    last = load_checkpoint(tmp_path / "checkpoints" / "last.ckpt")
    assert last["global_step"] == NAN_AT and _finite(last["state_dict"])


def test_gradient_check_is_exact_where_the_fast_norm_overflows():
    from ldm_smd.callbacks import _all_finite

    ok = [torch.ones(3), torch.zeros(2, 2), None, torch.ones(2, dtype=torch.float64)]
    assert _all_finite(ok)
    huge = [torch.full((4,), 3e38)]  # finite, but its norm overflows float32 to inf
    assert _all_finite(huge)
    for bad in (float("nan"), float("inf")):
        grads = [torch.ones(3), torch.tensor([1.0, bad]), torch.ones(2, dtype=torch.float64)]
        assert not _all_finite(grads)


def test_graceful_stop_leaves_an_ignored_or_foreign_sigint_alone():
    import signal

    from ldm_smd.callbacks import GracefulStop

    def foreign(signum, frame):
        return None

    for handler in (signal.SIG_IGN, foreign):  # a script's background job; someone else's
        previous = signal.signal(signal.SIGINT, handler)
        try:
            stop = GracefulStop(path="unused.ckpt")
            stop.on_train_start(None, None)
            assert signal.getsignal(signal.SIGINT) is handler
        finally:
            signal.signal(signal.SIGINT, previous)
    stop = GracefulStop(path="unused.ckpt")
    stop.on_train_start(None, None)  # Python's default: Ctrl-C now stops after the step
    assert signal.getsignal(signal.SIGINT) == stop._on_sigint
    stop.teardown(None, None, "fit")
    assert signal.getsignal(signal.SIGINT) is signal.default_int_handler
