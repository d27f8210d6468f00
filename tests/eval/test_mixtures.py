"""Gaussian-mixture specs: generators, weights, sampling and exact log-density."""

import math

import numpy as np
import pytest
import torch
from scipy import stats

from ldm_smd.blocks import instantiate, validate_spec
from ldm_smd.config import ConfigError
from ldm_smd.data.mixtures import (
    GaussianMixture,
    grid_mixture,
    image_mixture,
    image_prototypes,
    random_mixture,
    ring_mixture,
)


def test_ring_means_on_circle_and_equal_weights():
    mix = instantiate({"target": "ldm_smd.data.mixtures.ring_mixture",
                       "params": {"num_components": 8, "radius": 2.0, "std": 0.1}})
    assert mix.means.shape == (8, 2)
    torch.testing.assert_close(mix.means.norm(dim=1), torch.full((8,), 2.0, dtype=torch.float64))
    torch.testing.assert_close(mix.means[2], torch.tensor([0.0, 2.0], dtype=torch.float64))
    torch.testing.assert_close(mix.weights, torch.full((8,), 1 / 8, dtype=torch.float64))
    assert mix.stds.tolist() == [0.1] * 8


def test_grid_means_centered_and_spaced():
    mix = grid_mixture(side=5, spacing=2.0, std=0.2)
    assert mix.num_components == 25
    xs = sorted(set(mix.means[:, 0].tolist()))
    assert xs == [-4.0, -2.0, 0.0, 2.0, 4.0]
    torch.testing.assert_close(mix.means.mean(0), torch.zeros(2, dtype=torch.float64))


def test_random_prototypes_seeded_and_weights_normalised():
    spec = {"num_components": 6, "dim": 32, "scale": 1.0, "seed": 3, "std": 0.5,
            "weights": [1, 1, 2, 2, 3, 3]}
    a, b = random_mixture(**spec), random_mixture(**spec)
    assert not torch.equal(a.means, random_mixture(**{**spec, "seed": 4}).means)
    assert a.means.shape == (6, 32)
    torch.testing.assert_close(a.means, b.means)
    torch.testing.assert_close(a.weights, torch.tensor([1, 1, 2, 2, 3, 3.0],
                                                       dtype=torch.float64) / 12)


def test_images_prototypes_distinct_and_in_range():
    protos = image_prototypes(12, image_size=16, channels=1)
    assert protos.shape == (12, 256)
    assert protos.min() >= -1 and protos.max() <= 1
    assert torch.cdist(protos, protos).add(torch.eye(12) * 1e9).min() > 1.0
    mix = image_mixture(num_components=4, image_size=32, channels=3, std=0.1)
    assert mix.image_shape == (3, 32, 32) and mix.dim == 3 * 32 * 32
    x, _ = mix.sample(5, generator=torch.Generator().manual_seed(0))
    assert mix.to_images(x).shape == (5, 3, 32, 32)


def test_sampling_frequencies_follow_weights():
    mix = GaussianMixture(means=[[0.0], [10.0], [20.0]], stds=0.5, weights=[0.2, 0.3, 0.5])
    x, labels = mix.sample(20000, generator=torch.Generator().manual_seed(1))
    freq = torch.bincount(labels, minlength=3).double() / 20000
    torch.testing.assert_close(freq, mix.weights, atol=0.015, rtol=0)
    # samples sit around their own component
    assert (x[:, 0] - mix.means[labels, 0]).abs().max() < 5 * 0.5
    x2, labels2 = mix.sample(20000, generator=torch.Generator().manual_seed(1))
    torch.testing.assert_close(x, x2)
    assert torch.equal(labels, labels2)


def test_log_density_matches_scipy_single_component():
    mean = torch.tensor([[0.5, -1.0, 2.0]], dtype=torch.float64)
    mix = GaussianMixture(means=mean, stds=0.7)
    x = torch.randn(50, 3, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    ref = stats.multivariate_normal(mean[0].numpy(), 0.7**2 * np.eye(3)).logpdf(x.numpy())
    torch.testing.assert_close(mix.log_prob(x), torch.from_numpy(ref), rtol=0, atol=1e-10)


def test_log_density_two_components_matches_explicit_sum():
    mix = GaussianMixture(means=[[0.0, 0.0], [3.0, 0.0]], stds=[1.0, 0.5], weights=[0.25, 0.75])
    x = torch.tensor([[0.1, 0.2], [2.5, -0.3]], dtype=torch.float64)
    p = sum(
        w * stats.multivariate_normal(m, s**2 * np.eye(2)).pdf(x.numpy())
        for w, m, s in [(0.25, [0, 0], 1.0), (0.75, [3, 0], 0.5)]
    )
    torch.testing.assert_close(mix.log_prob(x), torch.log(torch.from_numpy(p)), atol=1e-10,
                               rtol=0)
    assert math.isclose(float(mix.log_prob(x).exp().sum()), float(p.sum()), rel_tol=1e-10)


def test_bad_specs_are_named():
    with pytest.raises(ConfigError, match=r"mix\.params\.radiuss: unknown parameter"):
        validate_spec({"target": "ldm_smd.data.mixtures.ring_mixture",
                       "params": {"num_components": 8, "radiuss": 1.0}}, key="mix")
    with pytest.raises(ConfigError, match="has no 'spiral_mixture'"):
        validate_spec({"target": "ldm_smd.data.mixtures.spiral_mixture"}, key="mix")
    with pytest.raises(ValueError, match="stds must be 8 positive"):
        ring_mixture(num_components=8, std=[0.1, 0.2])
    with pytest.raises(ValueError, match="weights"):
        GaussianMixture(means=[[0.0], [1.0]], weights=[1.0])
