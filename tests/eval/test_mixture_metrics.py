"""Exact mixture metrics and the two exact reference samplers (SMD.md section 6)."""

import math

import pytest
import torch

from ldm_smd.data.mixtures import GaussianMixture, ring_mixture
from ldm_smd.diffusion.samplers import sample
from ldm_smd.diffusion.schedule import NoiseSchedule
from ldm_smd.eval.mixture_metrics import (
    PRECISION_MASS,
    best_gaussian_sample,
    exact_posterior_sample,
    excess_sw_removed,
    mixture_metrics,
    oracle_denoiser,
    precision_radius,
    sliced_wasserstein_to_mixture,
)

RING = {"num_components": 8, "radius": 4.0, "std": 0.25}


def g(seed):
    return torch.Generator().manual_seed(seed)


def test_precision_radius_is_3_std_in_2d_and_grows_with_dimension():
    assert math.isclose(precision_radius(1.0, 2), 3.0, rel_tol=1e-9)
    radii = [precision_radius(1.0, d) for d in (2, 16, 64, 256)]
    assert all(a < b for a, b in zip(radii, radii[1:], strict=False))


@pytest.mark.parametrize("dim", [2, 16, 64])
def test_precision_radius_holds_98_9_percent_of_mass(dim):
    z = torch.randn(40000, dim, generator=g(dim), dtype=torch.float64) * 0.3
    inside = (z.norm(dim=1) <= precision_radius(0.3, dim)).double().mean()
    assert abs(float(inside) - PRECISION_MASS) < 0.003
    # a bare "3 std" radius would hold far less in 16-D
    if dim == 16:
        assert float((z.norm(dim=1) <= 3 * 0.3).double().mean()) < 0.2


def test_true_samples_score_as_the_truth():
    mix = ring_mixture(**RING, weights=[1, 1, 1, 1, 2, 2, 2, 2])
    x, _ = mix.sample(8000, generator=g(0))
    m = mixture_metrics(x, mix, seed=0)
    assert abs(m["precision"] - PRECISION_MASS) < 0.005
    assert m["recall"] == 1.0
    assert m["kl"] < 0.005
    assert abs(m["spread"] - 1.0) < 0.02
    assert m["sw"] < 2.5 * m["sw_floor"]
    assert m["nonfinite"] == 0.0
    torch.testing.assert_close(torch.tensor(m["logp_mean"]), mix.log_prob(x).mean().float(),
                               rtol=1e-6, atol=1e-6)


def test_collapse_and_missing_modes_are_caught():
    mix = ring_mixture(**RING)
    collapsed = mix.means[torch.arange(4000) % 4]  # half the modes, no spread
    m = mixture_metrics(collapsed, mix, seed=0)
    assert m["precision"] == 1.0
    assert m["recall"] == 0.5
    assert math.isclose(m["kl"], math.log(2), rel_tol=1e-9)
    assert m["spread"] == 0.0
    assert m["sw"] > 5 * m["sw_floor"]
    bad = collapsed.clone()
    bad[0, 0] = float("nan")
    m2 = mixture_metrics(bad, mix, seed=0)
    assert m2["nonfinite"] == 1 / 4000 and math.isnan(m2["sw"])
    assert m2["precision"] == 3999 / 4000


def test_sliced_wasserstein_to_the_mixture_floor_and_shift():
    mix = GaussianMixture(means=[[0.0, 0.0, 0.0]], stds=1.0)
    x, _ = mix.sample(20000, generator=g(1))
    floor = sliced_wasserstein_to_mixture(x, mix, num_projections=64, seed=2)
    assert floor < 0.03  # a true sample: only its own sampling noise
    shift = torch.tensor([3.0, 0.0, 0.0])
    sw = sliced_wasserstein_to_mixture(x + shift, mix, num_projections=800, seed=2)
    # W1 of a shifted copy is |s . theta|; for directions uniform on the 2-sphere E|theta_1| = 1/2
    assert abs(sw - 1.5) < 0.05 + floor
    # the same seed projects the same way; the distance grows with the error
    assert sliced_wasserstein_to_mixture(x + shift, mix, num_projections=800, seed=2) == sw
    assert sliced_wasserstein_to_mixture(x + 2 * shift, mix, num_projections=64, seed=2) > 2.5


def test_excess_sw_removed():
    assert excess_sw_removed(1.0, 0.4, 0.2) == pytest.approx(0.75)
    assert excess_sw_removed(1.0, 1.0, 0.2) == 0.0
    assert excess_sw_removed(1.0, 1.2, 0.2) < 0
    assert math.isnan(excess_sw_removed(0.2, 0.1, 0.3))


def test_exact_posterior_sampler_reproduces_the_mixture_at_t5():
    mix = ring_mixture(**RING)
    betas = NoiseSchedule(kind="cosine", num_timesteps=5).betas
    x = exact_posterior_sample(mix, betas, 6000, generator=g(3))
    m = mixture_metrics(x, mix, seed=3)
    assert abs(m["precision"] - PRECISION_MASS) < 0.01
    assert m["recall"] == 1.0
    assert abs(m["spread"] - 1.0) < 0.03
    assert m["sw"] < 2.0 * m["sw_floor"] + 0.01


def test_exact_posterior_one_component_1d_is_exact():
    mix = GaussianMixture(means=[[1.5]], stds=0.3)
    betas = NoiseSchedule(kind="cosine", num_timesteps=2).betas
    x = exact_posterior_sample(mix, betas, 40000, generator=g(4))
    assert abs(float(x.mean()) - 1.5) < 0.01
    assert abs(float(x.std()) - 0.3) < 0.01


def test_best_gaussian_is_the_ddpm_sampler_with_a_perfect_denoiser():
    mix = ring_mixture(**RING)
    sched = NoiseSchedule(kind="cosine", num_timesteps=5)
    x_T = torch.randn(300, 2, generator=g(5), dtype=torch.float64)
    ref = best_gaussian_sample(mix, sched.betas, 300, generator=g(6), x_T=x_T)
    for param in ("eps", "x0", "v"):
        out = sample(oracle_denoiser(mix, sched.betas, param), (300, 2), schedule=sched,
                     parameterization=param, sampler="ddpm", generator=g(6), x_T=x_T.clone())
        torch.testing.assert_close(out, ref, rtol=0, atol=1e-9)


def test_best_gaussian_falls_short_of_exact_at_few_steps():
    mix = ring_mixture(**RING)
    betas = NoiseSchedule(kind="cosine", num_timesteps=2).betas
    best = mixture_metrics(best_gaussian_sample(mix, betas, 3000, generator=g(7)), mix, seed=7)
    exact = mixture_metrics(exact_posterior_sample(mix, betas, 3000, generator=g(7)), mix, seed=7)
    assert best["precision"] < 0.5 < exact["precision"]
    assert best["sw"] > exact["sw"]
