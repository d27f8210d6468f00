"""ImageDataModule: batches, seeded and resumable order, batch augmentation, checkpoint state."""

from types import SimpleNamespace

import lightning as L
import pytest
import torch

from ldm_smd.data.datamodule import ImageDataModule, SeededEpochSampler
from ldm_smd.data.synthetic import SyntheticShapes

SPEC = {"target": "ldm_smd.data.synthetic.SyntheticShapes", "params": {"size": 16, "length": 40}}


def _labels(loader):
    return torch.cat([b["label"] for b in loader]).tolist()


def test_batches_from_a_spec_have_the_right_shape():
    dm = ImageDataModule(train=SPEC, validation=SPEC, batch_size=8, val_batch_size=16)
    dm.setup("fit")
    batches = list(dm.train_dataloader())
    assert len(batches) == 5
    assert batches[0]["image"].shape == (8, 3, 16, 16)
    assert batches[0]["image"].dtype == torch.float32
    assert batches[0]["label"].shape == (8,)
    val = list(dm.val_dataloader())
    assert [len(b["label"]) for b in val] == [16, 16, 8]
    # validation is in dataset order
    expected = dm.val_dataset.labels(range(40)).tolist()
    assert torch.cat([b["label"] for b in val]).tolist() == expected


def test_order_is_reproducible_and_changes_with_epoch_and_seed():
    a = ImageDataModule(train=SPEC, batch_size=8, seed=3)
    b = ImageDataModule(train=SPEC, batch_size=8, seed=3)
    c = ImageDataModule(train=SPEC, batch_size=8, seed=4)
    la, lb, lc = (_labels(dm.train_dataloader()) for dm in (a, b, c))
    assert la == lb
    assert la != lc
    a.train_sampler.set_epoch(1)
    assert _labels(a.train_dataloader()) != la
    # a run resumed at epoch 1 sees the same order as one that got there
    fresh = ImageDataModule(train=SPEC, batch_size=8, seed=3)
    fresh.setup("fit")
    fresh.train_sampler.set_epoch(1)
    assert _labels(fresh.train_dataloader()) == _labels(a.train_dataloader())


def test_sampler_is_a_permutation():
    s = SeededEpochSampler(length=10, seed=0)
    assert sorted(s) == list(range(10))
    assert list(SeededEpochSampler(length=4, shuffle=False)) == [0, 1, 2, 3]


def test_dataset_objects_are_accepted():
    dm = ImageDataModule(train=SyntheticShapes(size=8, length=6), batch_size=3, drop_last=False)
    assert len(list(dm.train_dataloader())) == 2


def test_batch_augmentation_only_while_training():
    dm = ImageDataModule(train=SPEC, batch_size=4, batch_augment={"flip_p": 1.0})
    batch = next(iter(dm.train_dataloader()))
    assert dm.on_after_batch_transfer(batch, 0) is batch  # no trainer: untouched
    dm.trainer = SimpleNamespace(training=False)
    assert torch.equal(dm.on_after_batch_transfer(batch, 0)["image"], batch["image"])
    dm.trainer = SimpleNamespace(training=True)
    out = dm.on_after_batch_transfer(batch, 0)
    assert torch.equal(out["image"], torch.flip(batch["image"], dims=[-1]))
    assert torch.equal(out["label"], batch["label"])


def test_augmentation_state_round_trips():
    dm = ImageDataModule(train=SPEC, batch_size=4, batch_augment={"flip_p": 0.5}, seed=2)
    x = torch.zeros(16, 3, 2, 2)
    x[..., 0] = 1.0
    state = dm.state_dict()
    first = dm.augment_batch({"image": x})["image"]
    dm.load_state_dict(state)
    assert torch.equal(dm.augment_batch({"image": x})["image"], first)


def test_errors_name_the_problem():
    with pytest.raises(ValueError, match="batch_size=0"):
        ImageDataModule(train=SPEC, batch_size=0)
    with pytest.raises(ValueError, match="persistent_workers"):
        ImageDataModule(train=SPEC, batch_size=2, persistent_workers=True)
    with pytest.raises(ValueError, match="target, params"):
        ImageDataModule(train={"params": {}}, batch_size=2).setup("fit")
    with pytest.raises(ValueError, match="fewer than batch_size=64"):
        ImageDataModule(train=SPEC, batch_size=64).setup("fit")


class _Recorder(L.LightningModule):
    def __init__(self):
        super().__init__()
        self.w = torch.nn.Parameter(torch.zeros(()))
        self.seen = []

    def training_step(self, batch, batch_idx):
        self.seen.append((self.current_epoch, batch["label"].tolist(), batch["image"].clone()))
        return (self.w - batch["image"].mean()) ** 2

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.0)


def test_lightning_sets_the_epoch_and_applies_augmentation():
    dm = ImageDataModule(train=SPEC, batch_size=20, batch_augment={"flip_p": 1.0}, seed=1)
    model = _Recorder()
    trainer = L.Trainer(max_epochs=2, accelerator="cpu", logger=False, enable_checkpointing=False,
                        enable_progress_bar=False, enable_model_summary=False)
    trainer.fit(model, datamodule=dm)
    epochs = [e for e, _, _ in model.seen]
    assert epochs == [0, 0, 1, 1]
    order0 = sum((lab for e, lab, _ in model.seen if e == 0), [])
    order1 = sum((lab for e, lab, _ in model.seen if e == 1), [])
    ref = ImageDataModule(train=SPEC, batch_size=20, seed=1)
    assert order0 == _labels(ref.train_dataloader())
    ref.train_sampler.set_epoch(1)
    assert order1 == _labels(ref.train_dataloader())
    # the images the model saw were flipped
    ref.train_sampler.set_epoch(0)
    plain = next(iter(ref.train_dataloader()))["image"]
    assert torch.equal(model.seen[0][2], torch.flip(plain, dims=[-1]))
