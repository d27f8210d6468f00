"""The image scorer on MNIST-5k: each metric moves the way it should, layouts agree, errors name
the command that fixes them."""

import json

import numpy as np
import pytest
import torch
from PIL import Image, ImageFilter

from ldm_smd.checkpoints import CheckpointError
from ldm_smd.cli import main as cli
from ldm_smd.data.mnist5k import load_split, to_images
from ldm_smd.errors import DataError, UsageError
from ldm_smd.eval.classifier import load_classifier, save_classifier
from ldm_smd.eval.image_scores import ImageScorer


@pytest.fixture(scope="module")
def scorer(mnist5k_root, short_classifier):
    return ImageScorer(data=mnist5k_root, classifier=short_classifier)


@pytest.fixture(scope="module")
def heldout(mnist5k_root):
    return load_split(mnist5k_root, "heldout")


def test_interface(scorer):
    assert scorer.metrics == ("fd", "confident", "class_kl", "nn_dist")
    assert set(scorer.better) == set(scorer.metrics)
    assert set(scorer.better.values()) <= {"lower", "higher", "near the floor"}
    assert scorer.better["nn_dist"] == "near the floor"  # far below it: copies, not better
    assert set(scorer.floor()) == set(scorer.metrics)


def test_blurred_digits_score_worse_than_real_ones(scorer, heldout):
    floor = scorer.floor()
    blurred = np.stack([np.asarray(Image.fromarray(x).filter(ImageFilter.GaussianBlur(1.5)))
                        for x in heldout[0]])
    scores = scorer.score(blurred)
    assert scores["fd"] > 2 * floor["fd"]
    assert scores["confident"] < floor["confident"] - 0.1
    assert 0.5 < floor["confident"] <= 1


def test_a_copy_of_the_train_set_is_flagged_by_nn_dist(scorer, mnist5k_root):
    train = load_split(mnist5k_root, "train")[0]
    assert scorer.score(train[::4])["nn_dist"] < 1e-6
    assert scorer.floor()["nn_dist"] > 0.05


def test_class_kl_rises_when_every_sample_is_one_class(scorer, heldout):
    images, labels = heldout
    floor = scorer.floor()["class_kl"]
    assert floor < 0.1
    assert scorer.score(images[labels == 3])["class_kl"] > floor + 1.0


def test_every_layout_of_the_same_images_scores_the_same(scorer, heldout):
    pixels = heldout[0][:200]
    expected = scorer.score(pixels)
    tensor = to_images(pixels)  # float (N, 1, 32, 32) in [-1, 1]
    layouts = [tensor, tensor.repeat(1, 3, 1, 1), pixels[..., None], pixels[:, None],
               np.repeat(pixels[..., None], 3, axis=-1),
               ((tensor[:, 0] + 1) * 127.5).round().to(torch.uint8).numpy()]
    for layout in layouts:
        assert scorer.score(layout) == pytest.approx(expected, rel=1e-6, abs=1e-9)


def test_samples_npz_and_png_folders(scorer, heldout, tmp_path):
    images = to_images(heldout[0][:50])
    expected = scorer.score(images)
    uint8 = ((images + 1) * 127.5).round().to(torch.uint8).permute(0, 2, 3, 1).numpy()
    np.savez(tmp_path / "samples.npz", images=uint8)  # as `ldm-smd sample` writes it
    assert scorer.score_samples(tmp_path / "samples.npz") == pytest.approx(expected)
    assert scorer.score_samples(tmp_path) == pytest.approx(expected)  # the folder holding it
    pngs = tmp_path / "images"
    pngs.mkdir()
    for i, x in enumerate(uint8):
        Image.fromarray(x[..., 0]).save(pngs / f"{i:06d}.png")
    assert scorer.score_samples(pngs) == pytest.approx(expected)


def test_bad_images_are_refused(scorer, heldout):
    with pytest.raises(UsageError, match="64x64"):
        scorer.score(np.zeros((4, 64, 64), np.uint8))
    with pytest.raises(UsageError, match="uint8"):
        scorer.score(heldout[0].astype(np.float32))
    with pytest.raises(UsageError, match="at least 2 images"):
        scorer.score(heldout[0][:1])


def test_missing_files_name_the_command_that_makes_them(mnist5k_root, tmp_path):
    with pytest.raises(DataError, match="scripts/prepare_mnist5k.py --out"):
        ImageScorer(data=tmp_path / "nowhere")
    with pytest.raises(CheckpointError, match=f"ldm-smd train-classifier --data {mnist5k_root}"):
        ImageScorer(data=mnist5k_root, classifier=tmp_path / "none.safetensors")


def test_the_command_prints_and_writes_scores_beside_the_floor(
        mnist5k_root, short_classifier, heldout, tmp_path, capsys):
    np.savez(tmp_path / "samples.npz", images=heldout[0][:100, :, :, None])
    out = tmp_path / "scores.json"
    assert cli(["score-images", "--samples", str(tmp_path / "samples.npz"), "--data",
                str(mnist5k_root), "--classifier", str(short_classifier), "--out", str(out)]) == 0
    record = json.loads(out.read_text())
    assert record["num_samples"] == 100
    assert set(record["scores"]) == set(record["floor"]) == set(record["better"])
    printed = capsys.readouterr().out
    assert "floor" in printed and "class_kl" in printed


def test_a_classifier_of_another_train_split_is_refused(mnist5k_root, short_classifier, tmp_path):
    model, meta = load_classifier(short_classifier)
    other = tmp_path / "other.safetensors"
    save_classifier(model, {**meta, "train_sha256": "0" * 64}, other)
    with pytest.raises(CheckpointError, match="trained on another train split"):
        ImageScorer(data=mnist5k_root, classifier=other)
