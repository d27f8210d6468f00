"""Batch augmentation: seeded flips, resize and crops on NCHW tensors."""

import pytest
import torch

from ldm_smd.data.transforms import BatchAugment


def _batch(b=6, h=8, w=8):
    return torch.linspace(-1, 1, b * 3 * h * w).view(b, 3, h, w)


def test_flip_is_seeded_and_equals_torch_flip():
    x = _batch()
    aug = BatchAugment(flip_p=0.5, seed=1)
    mask = BatchAugment(flip_p=0.5, seed=1).flip_mask(6)
    assert 0 < mask.sum() < 6  # seed 1 flips some rows, not all
    y = aug(x)
    for i in range(6):
        expected = torch.flip(x[i], dims=[-1]) if mask[i] else x[i]
        assert torch.equal(y[i], expected)
    assert torch.equal(BatchAugment(flip_p=0.5, seed=1)(x), y)


def test_flip_probabilities_zero_and_one():
    x = _batch()
    assert torch.equal(BatchAugment(flip_p=0.0)(x), x)
    assert torch.equal(BatchAugment(flip_p=1.0)(x), torch.flip(x, dims=[-1]))


def test_rng_state_round_trip():
    x = _batch()
    aug = BatchAugment(flip_p=0.5, seed=1)
    state = aug.rng_state()
    first = aug(x)
    aug.set_rng_state(state)
    assert torch.equal(aug(x), first)


def test_resize_short_side_and_crop():
    x = _batch(2, 8, 12)
    y = BatchAugment(flip_p=0.0, resize=4)(x)
    assert y.shape == (2, 3, 4, 6)
    z = BatchAugment(flip_p=0.0, resize=4, crop="center", crop_size=4)(x)
    assert torch.equal(z, y[..., :, 1:5])
    r = BatchAugment(flip_p=0.0, crop="random", crop_size=5, seed=0)(x)
    assert r.shape == (2, 3, 5, 5)
    assert y.min() >= -1 and y.max() <= 1


def test_random_crop_is_a_window_of_the_input():
    x = torch.arange(2 * 1 * 6 * 6, dtype=torch.float32).view(2, 1, 6, 6)
    y = BatchAugment(flip_p=0.0, crop="random", crop_size=3, clamp=False, seed=4)(x)
    for i in range(2):
        top = int(y[i, 0, 0, 0] - x[i, 0, 0, 0]) // 6
        left = int(y[i, 0, 0, 0] - x[i, 0, 0, 0]) % 6
        assert torch.equal(y[i], x[i, :, top : top + 3, left : left + 3])


@pytest.mark.parametrize(
    "kwargs, match",
    [
        ({"flip_p": 1.5}, "flip_p"),
        ({"crop": "middle"}, "crop='middle'"),
        ({"crop": "random"}, "crop_size"),
        ({"interpolation": "spline"}, "interpolation"),
    ],
)
def test_bad_parameters(kwargs, match):
    with pytest.raises(ValueError, match=match):
        BatchAugment(**kwargs)


def test_crop_larger_than_batch_is_an_error():
    with pytest.raises(ValueError, match="crop_size=9"):
        BatchAugment(crop="center", crop_size=9)(_batch())
