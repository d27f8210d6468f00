"""Sampler update formulas checked against Gaussian data, whose optimal denoiser is exact."""

import math

import pytest
import torch

from ldm_smd import rng
from ldm_smd.diffusion.samplers import SAMPLERS, SPACINGS, sample, timesteps
from ldm_smd.diffusion.schedule import PARAMETERIZATIONS, NoiseSchedule

MU = torch.tensor([0.5, -1.0, 0.3], dtype=torch.float64)
_A = torch.tensor([[0.6, 0.0, 0.0], [0.3, 0.4, 0.0], [-0.2, 0.1, 0.3]], dtype=torch.float64)
SIGMA = _A @ _A.T  # correlated covariance, eigenvalues well below the noise level
N = 4000


class GaussianDenoiser:
    """E[x0 | x_t] for x0 ~ N(MU, SIGMA), returned in ``parameterization``."""

    def __init__(self, schedule: NoiseSchedule, parameterization: str) -> None:
        self.p = parameterization
        eye = torch.eye(3, dtype=torch.float64)
        abar = schedule.alphas_cumprod
        # x0_hat = MU + (x_t - sqrt(a) MU) @ K_t with K_t = (a SIGMA + (1-a) I)^-1 sqrt(a) SIGMA
        a = abar[:, None, None]
        self.K = torch.linalg.solve(a * SIGMA + (1 - a) * eye, a.sqrt() * SIGMA)
        self.abar = abar.tolist()
        self.calls = 0

    def __call__(self, x, t, generator):
        self.calls += 1
        ti = int(t[0])
        assert bool((t == ti).all())
        a = self.abar[ti]
        xd = x.double()
        x0 = MU + (xd - math.sqrt(a) * MU) @ self.K[ti]
        eps = (xd - math.sqrt(a) * x0) / math.sqrt(1 - a)
        out = {"x0": x0, "eps": eps, "v": math.sqrt(a) * eps - math.sqrt(1 - a) * x0}[self.p]
        return out.to(x.dtype)


def true_marginal_x_T(schedule, n, seed=0):
    """x_T from the true marginal N(sqrt(a) MU, a SIGMA + (1-a) I) at t = T-1, so that only the
    update formulas (not the finite abar_T) separate the samples from the data distribution."""
    a = schedule.alphas_cumprod[-1].item()
    cov = a * SIGMA + (1 - a) * torch.eye(3, dtype=torch.float64)
    z = torch.randn(n, 3, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)
    return (math.sqrt(a) * MU + z @ torch.linalg.cholesky(cov).T).float()


def exact_flow(schedule, x_T):
    """Exact probability-flow map x_T -> x_0 for Gaussian data (whitening is preserved)."""
    a = schedule.alphas_cumprod[-1].item()
    ev, U = torch.linalg.eigh(SIGMA)
    M = U @ torch.diag((ev / (a * ev + 1 - a)).sqrt()) @ U.T
    return MU + (x_T.double() - math.sqrt(a) * MU) @ M


def assert_moments(x, bias_mean, bias_cov):
    """Sample moments within 4.5 Monte-Carlo standard errors (plus an allowed bias)."""
    x = x.double()
    n = x.shape[0]
    d = torch.diagonal(SIGMA)
    mean_tol = 4.5 * (d / n).sqrt() + bias_mean
    assert bool(((x.mean(0) - MU).abs() < mean_tol).all()), (x.mean(0), MU)
    cov_se = ((d[:, None] * d[None, :] + SIGMA**2) / n).sqrt()
    cov = torch.cov(x.T)
    assert bool(((cov - SIGMA).abs() < 4.5 * cov_se + bias_cov).all()), (cov, SIGMA)


@pytest.fixture(scope="module")
def linear1000():
    return NoiseSchedule(kind="linear", num_timesteps=1000)


# (schedule kind, T, sampler, steps, spacing, allowed bias of the mean, of the covariance):
# biases measured with 40k samples and doubled (DDPM's beta-tilde variance misses
# c1^2 Cov[x0 | x_t] per step, O(1/T); DDIM is first order in the step size).
MOMENT_CASES = [
    ("linear", 250, "ddpm", 250, "uniform", 0.005, 0.02),
    ("linear", 1000, "ddim", 20, "trailing", 0.01, 0.1),
    ("cosine", 1000, "dpmpp", 12, "trailing", 0.01, 0.03),
    ("sigmoid", 1000, "dpmpp", 20, "quadratic", 0.01, 0.01),
]


@pytest.mark.parametrize("param", PARAMETERIZATIONS)
@pytest.mark.parametrize("kind, T, sampler, steps, spacing, bias_mean, bias_cov", MOMENT_CASES)
def test_gaussian_data_moments(param, kind, T, sampler, steps, spacing, bias_mean, bias_cov):
    sch = NoiseSchedule(kind=kind, num_timesteps=T)
    den = GaussianDenoiser(sch, param)
    x = sample(
        den,
        (N, 3),
        schedule=sch,
        parameterization=param,
        sampler=sampler,
        steps=steps,
        spacing=spacing,
        generator=torch.Generator().manual_seed(1),
        x_T=true_marginal_x_T(sch, N),
    )
    assert den.calls == steps and x.dtype == torch.float32 and torch.isfinite(x).all()
    assert_moments(x, bias_mean, bias_cov)


def test_ddpm_from_pure_noise_with_all_steps_matches_data():
    sch = NoiseSchedule(kind="cosine", num_timesteps=250)  # abar_T ~ 1e-8: x_T ~ N(0, I) is fine
    x = sample(
        GaussianDenoiser(sch, "eps"),
        (N, 3),
        schedule=sch,
        parameterization="eps",
        generator=torch.Generator().manual_seed(5),
    )
    assert_moments(x, 0.005, 0.02)


def test_ddim_eta_one_with_all_steps_is_ddpm_in_distribution():
    sch = NoiseSchedule(kind="linear", num_timesteps=250)
    x = sample(
        GaussianDenoiser(sch, "eps"),
        (N, 3),
        schedule=sch,
        parameterization="eps",
        sampler="ddim",
        ddim_eta=1.0,
        steps=250,
        generator=torch.Generator().manual_seed(2),
        x_T=true_marginal_x_T(sch, N),
    )
    assert_moments(x, 0.005, 0.02)


@pytest.mark.parametrize("sampler, order", [("ddim", 1), ("dpmpp", 2)])
@pytest.mark.parametrize("spacing", SPACINGS)
def test_deterministic_samplers_converge_to_the_exact_flow(linear1000, sampler, order, spacing):
    x_T = true_marginal_x_T(linear1000, 200, seed=3)
    target = exact_flow(linear1000, x_T)
    den = GaussianDenoiser(linear1000, "v")
    errs = []
    for steps in (10, 20, 40, 80):
        x = sample(
            den,
            (200, 3),
            schedule=linear1000,
            parameterization="v",
            sampler=sampler,
            steps=steps,
            spacing=spacing,
            x_T=x_T,
        )
        errs.append((x.double() - target).square().mean().sqrt().item())
    ratios = [errs[i] / errs[i + 1] for i in range(3)]
    assert all(r > 1.6 for r in ratios), errs
    assert errs[-1] < (0.03 if order == 1 else 0.005), errs
    if spacing != "trailing":
        # each doubling of the steps divides the error by about 2 ** order (trailing's last
        # stride jumps from t = T / steps - 1 straight to x0_hat, a first-order term)
        assert min(ratios[1:]) > 0.75 * 2**order, (errs, ratios)


def test_ddim_is_deterministic_given_x_T(linear1000):
    den = GaussianDenoiser(linear1000, "eps")
    x_T = torch.randn(16, 3, generator=torch.Generator().manual_seed(0))
    kw = dict(schedule=linear1000, parameterization="eps", sampler="ddim", steps=7)
    a = sample(den, (16, 3), generator=torch.Generator().manual_seed(1), x_T=x_T, **kw)
    b = sample(den, (16, 3), generator=torch.Generator().manual_seed(2), x_T=x_T, **kw)
    c = sample(
        den, (16, 3), generator=torch.Generator().manual_seed(2), ddim_eta=0.5, x_T=x_T, **kw
    )
    assert torch.equal(a, b) and not torch.allclose(a, c)


class NoisyDenoiser:
    """SMD-like: draws eta from the generator it receives at every call."""

    def __init__(self, parameterization="eps"):
        self.W = torch.tensor([[0.9, 0.2, -0.1], [0.1, 0.8, 0.3], [0.0, -0.2, 0.7]])

    def __call__(self, x, t, generator):
        eta = rng.randn_like(x, generator=generator)
        return torch.tanh(x @ self.W) * (1 + t.float()[:, None] / 10) + 0.3 * eta


@pytest.mark.parametrize("param", PARAMETERIZATIONS)
def test_ddpm_with_all_steps_equals_hand_written_chain(param):
    sch = NoiseSchedule(kind="cosine", num_timesteps=12)
    den = NoisyDenoiser()
    g = torch.Generator().manual_seed(4)
    x = torch.randn(5, 3, generator=g)
    for tv in reversed(range(12)):
        t = torch.full((5,), tv)
        a, s = sch.alphas_cumprod[tv].sqrt().item(), (1 - sch.alphas_cumprod[tv]).sqrt().item()
        out = den(x, t, g)  # x_t = a x0 + s eps, v = a eps - s x0, written out by hand
        x0 = {"eps": (x - s * out) / a, "x0": out, "v": a * x - s * out}[param]
        mean, var = sch.posterior_mean_variance(x0, x, t)
        x = mean + var.sqrt() * torch.randn(5, 3, generator=g) if tv > 0 else mean
    got = sample(
        den,
        (5, 3),
        schedule=sch,
        parameterization=param,
        sampler="ddpm",
        steps=12,
        generator=torch.Generator().manual_seed(4),
    )
    torch.testing.assert_close(got, x, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("sampler", SAMPLERS)
def test_per_row_generators_are_batch_independent(sampler):
    sch = NoiseSchedule(kind="linear", num_timesteps=20)
    kw = dict(schedule=sch, parameterization="eps", sampler=sampler, steps=6, ddim_eta=0.5)
    whole = sample(NoisyDenoiser(), (6, 3), generator=rng.row_generators(7, 0, 6), **kw)
    first = sample(NoisyDenoiser(), (3, 3), generator=rng.row_generators(7, 0, 3), **kw)
    second = sample(NoisyDenoiser(), (3, 3), generator=rng.row_generators(7, 3, 3), **kw)
    assert torch.equal(whole, torch.cat([first, second]))
    again = sample(NoisyDenoiser(), (6, 3), generator=rng.row_generators(8, 0, 6), **kw)
    assert not torch.allclose(whole, again)


@pytest.mark.parametrize("spacing", SPACINGS)
@pytest.mark.parametrize("T", [2, 5, 10, 37, 1000])
def test_timesteps_are_valid(spacing, T):
    for steps in sorted({1, 2, 3, T // 3, T - 1, T} & set(range(1, T + 1))):
        ts = timesteps(T, steps, spacing)
        assert len(ts) == steps and all(isinstance(t, int) for t in ts)
        assert ts[0] == T - 1 and ts[-1] >= 0
        assert all(a > b for a, b in zip(ts, ts[1:], strict=False))
        if steps == T:
            assert ts == list(range(T - 1, -1, -1))
        if steps >= 2 and spacing in ("uniform", "quadratic"):
            assert ts[-1] == 0
        if spacing == "trailing" and T % steps == 0:
            stride = T // steps
            assert ts == list(range(T - 1, -1, -stride))


def test_timesteps_known_values_and_errors():
    assert timesteps(1000, 4, "uniform") == [999, 666, 333, 0]
    assert timesteps(1000, 4, "trailing") == [999, 749, 499, 249]
    assert timesteps(1000, 4, "quadratic") == [999, 444, 111, 0]
    assert timesteps(10, 6, "quadratic") == [9, 6, 3, 2, 1, 0]
    with pytest.raises(ValueError, match="steps=0"):
        timesteps(10, 0)
    with pytest.raises(ValueError, match="steps=11"):
        timesteps(10, 11)
    with pytest.raises(ValueError, match=r"spacing='leading'.*uniform"):
        timesteps(10, 3, "leading")


def test_sampler_options_and_errors():
    sch = NoiseSchedule(kind="linear", num_timesteps=10)
    den = GaussianDenoiser(sch, "x0")
    g = torch.Generator().manual_seed(0)
    one = sample(den, (4, 3), schedule=sch, parameterization="x0", steps=1, generator=g)
    x0_first = den(
        torch.randn(4, 3, generator=torch.Generator().manual_seed(0)), torch.full((4,), 9), None
    )
    torch.testing.assert_close(one, x0_first)  # one step returns the x0 estimate at T-1
    clipped = sample(
        den,
        (64, 3),
        schedule=sch,
        parameterization="x0",
        steps=10,
        generator=g,
        clip_x0=True,
        progress=True,
    )
    assert clipped.abs().max() <= 1.0
    unclipped = sample(den, (64, 3), schedule=sch, parameterization="x0", generator=g)
    assert unclipped.abs().max() > 1.0  # latents are never clipped by default
    with pytest.raises(ValueError, match=r"sampler='euler'.*ddpm"):
        sample(den, (4, 3), schedule=sch, parameterization="x0", sampler="euler", generator=g)
    with pytest.raises(ValueError, match="parameterization='score'"):
        sample(den, (4, 3), schedule=sch, parameterization="score", generator=g)
    with pytest.raises(ValueError, match="x_T has shape"):
        sample(den, (4, 3), schedule=sch, parameterization="x0", x_T=torch.zeros(2, 3))
