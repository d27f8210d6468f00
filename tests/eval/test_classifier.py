"""The MNIST-5k domain classifier: accuracy after a short schedule, determinism, strict files."""

import json

import pytest
import torch
from safetensors.torch import load_file, save_file

from ldm_smd.checkpoints import CheckpointError
from ldm_smd.cli import main as cli
from ldm_smd.data.mnist5k import load_split, to_images
from ldm_smd.eval.classifier import (
    DigitClassifier,
    accuracy,
    load_classifier,
    random_affine,
    read_metadata,
    train_classifier,
)


def test_short_training_reaches_90_percent_on_held_out(short_classifier, mnist5k_root):
    model, meta = load_classifier(short_classifier)
    assert meta["options"]["epochs"] == 2 and meta["architecture"]["feature_dim"] == 128
    assert meta["heldout_accuracy"] >= 0.90
    pixels, labels = load_split(mnist5k_root, "heldout")
    again = accuracy(model, to_images(pixels), torch.from_numpy(labels))
    assert again == pytest.approx(meta["heldout_accuracy"])  # the file holds what was measured


def test_training_is_deterministic_and_follows_the_seed(mnist5k_root):
    short = {"epochs": 1, "limit": 96, "batch_size": 32}
    a, meta_a = train_classifier(mnist5k_root, seed=3, **short)
    b, _ = train_classifier(mnist5k_root, seed=3, **short)
    c, _ = train_classifier(mnist5k_root, seed=4, **short)
    for key, value in a.state_dict().items():
        assert torch.equal(value, b.state_dict()[key]), key
    assert not torch.equal(a.head.weight, c.head.weight)
    assert meta_a["options"]["seed"] == 3 and len(meta_a["train_sha256"]) == 64


def test_augmentation_moves_digits_and_keeps_the_black_frame():
    image = -torch.ones(8, 1, 32, 32)
    image[:, :, 12:20, 14:18] = 1.0
    g = torch.Generator().manual_seed(0)
    moved = random_affine(image, g, shift=2, rotation=0, scale=0)
    assert moved.shape == image.shape and moved.min() >= -1 - 1e-5
    assert torch.allclose(moved[:, :, :2], torch.full_like(moved[:, :, :2], -1.0))
    assert not torch.allclose(moved, image)  # some image moved
    still = random_affine(image, g, shift=0, rotation=0, scale=0)
    torch.testing.assert_close(still, image)


def test_a_file_with_a_missing_or_extra_key_is_refused(short_classifier, tmp_path):
    tensors = load_file(str(short_classifier))
    metadata = {"ldm_smd": json.dumps(read_metadata(short_classifier))}
    missing = dict(tensors)
    missing.pop("head.weight")
    save_file(missing, str(tmp_path / "missing.safetensors"), metadata=metadata)
    with pytest.raises(CheckpointError, match=r"missing keys \(1\): head.weight"):
        load_classifier(tmp_path / "missing.safetensors")
    extra = {**tensors, "head.extra": torch.zeros(1)}
    save_file(extra, str(tmp_path / "extra.safetensors"), metadata=metadata)
    with pytest.raises(CheckpointError, match=r"unexpected keys \(1\): head.extra"):
        load_classifier(tmp_path / "extra.safetensors")
    save_file(tensors, str(tmp_path / "bare.safetensors"))
    with pytest.raises(CheckpointError, match="no classifier metadata"):
        load_classifier(tmp_path / "bare.safetensors")


def test_a_missing_classifier_names_the_command(tmp_path):
    with pytest.raises(CheckpointError, match="ldm-smd train-classifier --data DATA --out"):
        load_classifier(tmp_path / "none.safetensors", data="DATA")


def test_the_command_checks_its_data_before_training(tmp_path, capsys):
    assert cli(["train-classifier", "--data", str(tmp_path / "nowhere")]) == 2
    assert "scripts/prepare_mnist5k.py --out" in capsys.readouterr().err


def test_features_have_the_stated_width():
    model = DigitClassifier(generator=torch.Generator().manual_seed(0)).eval()
    features, logits = model.features_and_logits(torch.zeros(3, 1, 32, 32))
    assert features.shape == (3, 128) and logits.shape == (3, 10)
    with pytest.raises(ValueError, match=r"expects \(N, 1, 32, 32\)"):
        model(torch.zeros(3, 1, 28, 28))
