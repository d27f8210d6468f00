import math

import numpy as np
import pytest
import torch

from ldm_smd.diffusion.schedule import PARAMETERIZATIONS, SCHEDULE_KINDS, NoiseSchedule

SMALL_TS = (2, 3, 5, 10, 50, 1000)


@pytest.mark.parametrize("kind", SCHEDULE_KINDS)
@pytest.mark.parametrize("T", SMALL_TS)
def test_schedule_is_valid_for_any_T(kind, T):
    s = NoiseSchedule(kind=kind, num_timesteps=T)
    betas, abar = s.betas, s.alphas_cumprod
    assert betas.dtype == torch.float64 and betas.shape == (T,)
    assert bool((betas > 0).all()) and bool((betas <= 0.999).all())
    assert bool((abar > 0).all()) and bool((abar < 1).all())
    assert bool((abar[1:] < abar[:-1]).all())
    assert torch.allclose(abar, torch.cumprod(1 - betas, 0), rtol=1e-12, atol=0)
    # x_T is close to pure noise whatever T: signal std sqrt(abar_T) < 0.032
    assert abar[-1].item() < 1e-3
    # and the first step is not already most of the way to noise for moderate T
    if T >= 10:
        assert abar[0].item() > 0.95


def test_linear_matches_compvis_at_1000_and_respaces_below():
    ref = np.linspace(1e-4**0.5, 2e-2**0.5, 1000, dtype=np.float64) ** 2
    s = NoiseSchedule(kind="linear", num_timesteps=1000)
    assert np.array_equal(s.betas.numpy(), ref)
    abar_ref = np.cumprod(1 - ref)
    s100 = NoiseSchedule(kind="linear", num_timesteps=100)
    np.testing.assert_allclose(s100.alphas_cumprod.numpy(), abar_ref[9::10], rtol=1e-10)


def test_cosine_matches_nichol_dhariwal():
    T, cs = 50, 8e-3
    f = [math.cos((i / T + cs) / (1 + cs) * math.pi / 2) ** 2 for i in range(T + 1)]
    betas = np.minimum([1 - f[i + 1] / f[i] for i in range(T)], 0.999)
    s = NoiseSchedule(kind="cosine", num_timesteps=T, cosine_s=cs)
    np.testing.assert_allclose(s.betas.numpy(), betas, rtol=1e-12)


def test_invalid_kind_and_parameterization_name_the_value():
    with pytest.raises(ValueError, match=r"'quadratic'.*linear.*cosine.*sigmoid"):
        NoiseSchedule(kind="quadratic")
    with pytest.raises(ValueError, match="num_timesteps"):
        NoiseSchedule(num_timesteps=1)
    s = NoiseSchedule(num_timesteps=10)
    x, t = torch.zeros(2, 3), torch.tensor([0, 1])
    with pytest.raises(ValueError, match=r"'epsilon'.*'eps', 'x0', 'v'"):
        s.convert(x, x, t, source="epsilon", target="x0")
    with pytest.raises(ValueError, match=r"'noise'.*'eps', 'x0', 'v'"):
        s.convert(x, x, t, source="eps", target="noise")


def test_q_sample_moments():
    s = NoiseSchedule(kind="linear", num_timesteps=1000)
    g = torch.Generator().manual_seed(0)
    n, x0 = 200_000, torch.tensor([[1.5, -0.5]])
    for tv in (0, 300, 999):
        t = torch.full((n,), tv)
        noise = torch.randn(n, 2, generator=g)
        x_t = s.q_sample(x0.expand(n, 2), t, noise)
        a = s.alphas_cumprod[tv].item()
        assert x_t.dtype == torch.float32
        tol = 5 * math.sqrt(1 - a) / math.sqrt(n)
        torch.testing.assert_close(x_t.mean(0), math.sqrt(a) * x0[0], atol=tol, rtol=0)
        torch.testing.assert_close(
            x_t.var(0), torch.full((2,), 1 - a), atol=5 * (1 - a) * math.sqrt(2 / n), rtol=0
        )


@pytest.mark.parametrize("kind", SCHEDULE_KINDS)
def test_conversions_round_trip_all_directions(kind):
    s = NoiseSchedule(kind=kind, num_timesteps=100)
    g = torch.Generator().manual_seed(1)
    x0 = torch.randn(64, 3, 4, generator=g, dtype=torch.float64)
    noise = torch.randn(64, 3, 4, generator=g, dtype=torch.float64)
    t = torch.randint(0, 95, (64,), generator=g)  # avoid abar ~ 0 where eps -> x0 is ill-posed
    x_t = s.q_sample(x0, t, noise)
    truth = {p: s.target(x0, noise, t, p) for p in PARAMETERIZATIONS}
    assert torch.equal(truth["eps"], noise) and torch.equal(truth["x0"], x0)
    for src in PARAMETERIZATIONS:
        for dst in PARAMETERIZATIONS:
            got = s.convert(truth[src], x_t, t, source=src, target=dst)
            torch.testing.assert_close(got, truth[dst], atol=1e-9, rtol=1e-9)
    # float32 tensors get float32 results
    got32 = s.convert(truth["v"].float(), x_t.float(), t, source="v", target="eps")
    assert got32.dtype == torch.float32
    torch.testing.assert_close(got32, noise.float(), atol=1e-4, rtol=1e-4)


def test_posterior_coefficients_satisfy_total_mean_and_variance():
    # x_t = a_t x0 + s_t eps and x_{t-1} | x_t, x0 ~ N(c1 x0 + c2 x_t, var) must give
    # the marginal x_{t-1} | x0 ~ N(sqrt(abar_{t-1}) x0, 1 - abar_{t-1}).
    for kind in SCHEDULE_KINDS:
        s = NoiseSchedule(kind=kind, num_timesteps=20)
        abar, abar_prev = s.alphas_cumprod, s.alphas_cumprod_prev
        c1, c2 = s.posterior_mean_coef1, s.posterior_mean_coef2
        torch.testing.assert_close(c1 + c2 * abar.sqrt(), abar_prev.sqrt(), rtol=1e-12, atol=0)
        torch.testing.assert_close(
            c2**2 * (1 - abar) + s.posterior_variance, 1 - abar_prev, rtol=1e-12, atol=1e-15
        )
        assert s.posterior_variance[0].item() == 0.0
        assert s.posterior_variance_clipped[0].item() == s.posterior_variance[1].item()
    x0, x_t, t = torch.ones(2, 3), torch.zeros(2, 3), torch.tensor([0, 5])
    mean, var = s.posterior_mean_variance(x0, x_t, t)
    assert mean.shape == (2, 3) and var.shape == (2, 1)
    torch.testing.assert_close(mean[:, 0], c1[t].float())


def test_snr_and_gather():
    s = NoiseSchedule(kind="cosine", num_timesteps=10)
    t = torch.arange(10)
    snr = s.snr(t)
    assert snr.dtype == torch.float64
    assert bool((snr[1:] < snr[:-1]).all())
    torch.testing.assert_close(snr / (1 + snr), s.alphas_cumprod)
    with pytest.raises(TypeError, match="integer"):
        s.snr(t.float())
