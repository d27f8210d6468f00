"""The built-in shapes dataset: determinism, range, any size, and its mixture structure."""

import pytest
import torch

from ldm_smd.data.synthetic import SyntheticShapes


def test_item_format_and_range():
    ds = SyntheticShapes(size=32, length=20)
    item = ds[3]
    assert set(item) == {"image", "label"}
    img = item["image"]
    assert img.shape == (3, 32, 32) and img.dtype == torch.float32
    assert img.min() >= -1.0 and img.max() <= 1.0
    assert img.std() > 0.05  # not a blank image
    assert 0 <= item["label"] < ds.num_prototypes == 48


@pytest.mark.parametrize("size", [8, 17, 48])
def test_any_size_keeps_the_documented_promises(size):
    blocks = 6
    ds = SyntheticShapes(size=size, length=blocks * 48, seed=3)
    p = ds.num_prototypes
    images, labels = ds.render(range(len(ds)))
    # float32 (3, size, size) in [-1, 1], and the range is used: dark backgrounds, bright shapes
    assert images.shape == (blocks * p, 3, size, size) and images.dtype == torch.float32
    assert images.min() >= -1.0 and images.max() <= 1.0
    assert images.min() < -0.5 and images.max() > 0.5
    # balanced labels: every block of num_prototypes indices holds each prototype once
    assert torch.equal(labels.view(blocks, p).sort(dim=1).values,
                       torch.arange(p).expand(blocks, p))
    # the classes differ from each other: the class means of the first half of the items name
    # the class of most items of the second half (chance: 1 in 48)
    flat = images.flatten(1)
    fit, held_out = slice(0, blocks // 2 * p), slice(blocks // 2 * p, None)
    means = torch.stack([flat[fit][labels[fit] == k].mean(0) for k in range(p)])
    named = torch.cdist(flat[held_out], means).argmin(1)
    assert (named == labels[held_out]).float().mean() > 0.5
    # the same seed gives the same images (a new dataset, in a batch and one by one) ...
    again = SyntheticShapes(size=size, length=blocks * 48, seed=3)
    assert torch.equal(again.render(range(len(ds)))[0], images)
    for i in (0, 5, len(ds) - 1):
        item = again[i]
        assert torch.allclose(item["image"], images[i], atol=1e-5) and item["label"] == labels[i]
    # ... and another seed others: every image, and the order of the labels
    other, other_labels = SyntheticShapes(size=size, length=blocks * 48, seed=4).render(
        range(len(ds)))
    assert not any(torch.equal(a, b) for a, b in zip(other, images, strict=True))
    assert not torch.equal(other_labels, labels)


def test_same_seed_and_index_give_the_same_image():
    a = SyntheticShapes(size=24, seed=5)
    b = SyntheticShapes(size=24, seed=5)
    for i in (0, 7, 9999):
        assert torch.equal(a[i]["image"], b[i]["image"])
        assert a[i]["label"] == b[i]["label"]
    # batched rendering gives the same items as one-by-one (up to float rounding of sin/cos)
    batch = a.__getitems__([9999, 0, 7])
    assert torch.allclose(batch[1]["image"], a[0]["image"], atol=1e-5)
    assert batch[0]["label"] == a[9999]["label"]


def test_different_seed_or_index_differs():
    a = SyntheticShapes(size=24, seed=0)
    b = SyntheticShapes(size=24, seed=1)
    assert not torch.equal(a[0]["image"], b[0]["image"])
    assert not torch.equal(a[0]["image"], a[1]["image"])
    labels_a = a.labels(range(48)).tolist()
    labels_b = b.labels(range(48)).tolist()
    assert labels_a != labels_b


def test_labels_are_balanced_and_cover_the_prototypes():
    ds = SyntheticShapes(size=16, length=3 * 48, num_shapes=3, num_colours=4, num_positions=4)
    labels = ds.labels(range(len(ds)))
    counts = torch.bincount(torch.from_numpy(labels), minlength=48)
    assert counts.tolist() == [3] * 48


def test_prototype_decoding():
    ds = SyntheticShapes(size=16, num_shapes=2, num_colours=3, num_positions=4)
    assert ds.num_prototypes == 24
    proto = ds.prototype(23)
    assert proto["shape"] == "square" and proto["colour"] == 2 and proto["position"] == 3
    assert proto["centre"] == (0.75, 0.75)
    with pytest.raises(IndexError):
        ds.prototype(24)


def test_images_of_one_prototype_are_closer_than_images_of_different_prototypes():
    ds = SyntheticShapes(size=24, length=8 * 12, num_shapes=3, num_colours=2, num_positions=2)
    images, labels = ds.render(range(len(ds)))
    flat = images.flatten(1)
    dist = torch.cdist(flat, flat)
    same = labels[:, None] == labels[None, :]
    off_diag = ~torch.eye(len(labels), dtype=torch.bool)
    intra = dist[same & off_diag].mean()
    inter = dist[~same].mean()
    assert intra < 0.75 * inter


def test_shape_is_drawn_where_its_prototype_says():
    ds = SyntheticShapes(size=32, num_shapes=1, num_colours=1, num_positions=4, noise_std=0.0,
                         background="plain")
    for i in range(8):
        item = ds[i]
        cx, cy = ds.prototype(item["label"])["centre"]
        img = (item["image"] + 1) / 2
        red = img[0] - img[1]  # the shape is red on a grey-ish background
        ys, xs = torch.nonzero(red > 0.3, as_tuple=True)
        assert len(xs) > 20
        assert abs((xs.float().mean() + 0.5) / 32 - cx) < 0.06
        assert abs((ys.float().mean() + 0.5) / 32 - cy) < 0.06


def test_anti_aliased_edges():
    ds = SyntheticShapes(size=32, num_shapes=1, noise_std=0.0, background="plain",
                         colour_jitter=0.0, background_jitter=0.0)
    img = ds[0]["image"][0]
    levels = torch.unique((img * 1000).round())
    assert len(levels) > 4  # more than background + fill: partial-coverage edge pixels exist


@pytest.mark.parametrize(
    "kwargs, match",
    [
        ({"size": 4}, "size=4"),
        ({"num_shapes": 7}, "num_shapes=7"),
        ({"num_colours": 0}, "num_colours=0"),
        ({"background": "stripes"}, "background='stripes'"),
        ({"noise_std": -1.0}, "noise_std=-1.0"),
    ],
)
def test_bad_parameters_are_named(kwargs, match):
    with pytest.raises(ValueError, match=match):
        SyntheticShapes(**kwargs)


def test_index_out_of_range():
    ds = SyntheticShapes(size=8, length=5)
    assert torch.equal(ds[-1]["image"], ds[4]["image"])
    with pytest.raises(IndexError, match="out of range"):
        ds[5]
