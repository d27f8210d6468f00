import pytest
import torch
from torch import nn

from ldm_smd import rng
from ldm_smd.diffusion.multi_eta import EnergyObjective, draws_eta
from ldm_smd.diffusion.objectives import (
    DenoisingObjective,
    MixtureObjective,
    build_objective,
    draw_timesteps,
    loss_weights,
)
from ldm_smd.diffusion.schedule import PARAMETERIZATIONS, NoiseSchedule
from ldm_smd.errors import UsageError

T = 50


class TinyNet(nn.Module):
    """Plain network: ignores the generator."""

    def __init__(self, dim: int = 6) -> None:
        super().__init__()
        self.lin = nn.Linear(dim + 1, dim)

    def forward(self, x, t, generator=None):
        flat = x.reshape(x.shape[0], -1)
        h = torch.cat([flat, t.float()[:, None] / T], dim=1)
        return self.lin(h).reshape(x.shape)


class NoisyNet(TinyNet):
    """SMD-like network: its output depends on eta drawn from the generator it is given; with
    ``num_eta_samples = M`` it returns M * B rows, row i + m * B under the m-th draw (the
    SMDNetwork contract, declared by ``draws_eta``)."""

    draws_eta = True

    def forward(self, x, t, generator=None, num_eta_samples=1):
        reps = (num_eta_samples,) + (1,) * (x.dim() - 1)
        x, t = x.repeat(reps), t.repeat(num_eta_samples)
        eta = rng.randn_like(x, generator=rng.repeat_generators(generator, num_eta_samples))
        return super().forward(x, t) + 0.7 * eta


class FixedX0Net(nn.Module):
    """Predicts x0_hat = x0 + delta, expressed in ``parameterization``."""

    draws_eta = True

    def __init__(self, schedule, x0, delta, parameterization):
        super().__init__()
        self.s, self.x0_hat, self.p = schedule, x0 + delta, parameterization

    def forward(self, x, t, generator=None, num_eta_samples=1):
        reps = (num_eta_samples,) + (1,) * (x.dim() - 1)
        x, t = x.repeat(reps), t.repeat(num_eta_samples)
        return self.s.convert(self.x0_hat.repeat(reps), x, t, source="x0", target=self.p)


@pytest.fixture
def schedule():
    return NoiseSchedule(kind="linear", num_timesteps=T)


def _x0(seed=0, shape=(8, 2, 3)):
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed))


@pytest.mark.parametrize("name", ["vanilla", "smd_paper", "smd_mixture", "smd_energy"])
@pytest.mark.parametrize("param", PARAMETERIZATIONS)
@pytest.mark.parametrize("weighting", ["simple", "min_snr"])
def test_loss_finite_scalar_and_gradients_flow(schedule, name, param, weighting):
    torch.manual_seed(0)
    net = NoisyNet()
    obj = build_objective(name, parameterization=param, loss_weighting=weighting)
    loss, logs = obj(net, _x0(), schedule=schedule, generator=torch.Generator().manual_seed(1))
    assert loss.shape == () and torch.isfinite(loss)
    assert "loss" in logs and "loss_simple" in logs
    assert all(v.shape == () and not v.requires_grad for v in logs.values())
    loss.backward()
    grads = [p.grad for p in net.parameters()]
    assert all(g is not None and torch.isfinite(g).all() and g.abs().sum() > 0 for g in grads)


def test_vanilla_and_paper_are_one_computation_and_seeded(schedule):
    torch.manual_seed(0)
    net, x0 = NoisyNet(), _x0()
    a, _ = build_objective("vanilla")(
        net, x0, schedule=schedule, generator=torch.Generator().manual_seed(3)
    )
    b, _ = build_objective("smd_paper")(
        net, x0, schedule=schedule, generator=torch.Generator().manual_seed(3)
    )
    c, _ = build_objective("smd_paper")(
        net, x0, schedule=schedule, generator=torch.Generator().manual_seed(4)
    )
    assert torch.equal(a, b) and not torch.equal(a, c)


@pytest.mark.parametrize("tau", [0.3, "elbo"])
@pytest.mark.parametrize("param", PARAMETERIZATIONS)
def test_mixture_with_one_sample_equals_paper(schedule, tau, param):
    torch.manual_seed(0)
    net, x0 = NoisyNet(), _x0()
    paper = build_objective("smd_paper", parameterization=param, loss_weighting="min_snr")
    mix = build_objective(
        "smd_mixture", parameterization=param, loss_weighting="min_snr", num_eta_samples=1, tau=tau
    )
    a, _ = paper(net, x0, schedule=schedule, generator=torch.Generator().manual_seed(5))
    b, _ = mix(net, x0, schedule=schedule, generator=torch.Generator().manual_seed(5))
    torch.testing.assert_close(a, b, rtol=1e-6, atol=1e-7)


def test_mixture_interpolates_between_mean_and_min(schedule):
    torch.manual_seed(0)
    net, x0 = NoisyNet(), _x0()

    def run(tau):
        obj = MixtureObjective(num_eta_samples=6, tau=tau)
        return obj(net, x0, schedule=schedule, generator=torch.Generator().manual_seed(7))

    big, logs = run(1e6)
    small, logs_small = run(1e-6)
    mid, _ = run(0.5)
    torch.testing.assert_close(logs["loss_paper"], logs_small["loss_paper"])  # same draws
    torch.testing.assert_close(big, logs["loss_paper"], rtol=1e-4, atol=0)
    torch.testing.assert_close(small, logs["loss_min"], rtol=1e-4, atol=0)
    assert logs["loss_min"] < mid < logs["loss_paper"]  # the eta samples really differ
    losses = [run(tau)[0].item() for tau in (0.01, 0.1, 1.0, 10.0)]
    assert losses == sorted(losses)


def test_mixture_matches_hand_written_logsumexp(schedule):
    torch.manual_seed(0)
    net, x0, M, tau = NoisyNet(), _x0(), 3, 0.2
    gen = torch.Generator().manual_seed(11)
    t = torch.randint(0, T, (x0.shape[0],), generator=gen)
    noise = torch.randn(x0.shape, generator=gen)
    loss, _ = MixtureObjective(num_eta_samples=M, tau=tau)(
        net, x0, schedule=schedule, generator=torch.Generator().manual_seed(2), t=t, noise=noise
    )
    x_t = schedule.q_sample(x0, t, noise)
    g2 = torch.Generator().manual_seed(2)
    pred = net(x_t.repeat(M, 1, 1), t.repeat(M), generator=g2).reshape(M, *x0.shape)
    e = (pred - noise).square().flatten(2).mean(2)  # (M, B)
    expected = (-tau * torch.log(torch.exp(-e / tau).mean(0))).mean()
    torch.testing.assert_close(loss, expected, rtol=1e-5, atol=1e-7)


def test_per_row_generators_are_reproducible(schedule):
    torch.manual_seed(0)
    net, x0 = NoisyNet(), _x0()
    obj = MixtureObjective(num_eta_samples=3, tau=0.5)
    a, _ = obj(net, x0, schedule=schedule, generator=rng.row_generators(9, 0, 8))
    b, _ = obj(net, x0, schedule=schedule, generator=rng.row_generators(9, 0, 8))
    c, _ = obj(net, x0, schedule=schedule, generator=rng.row_generators(10, 0, 8))
    assert torch.equal(a, b) and not torch.equal(a, c)
    t = draw_timesteps(8, T, generator=rng.row_generators(9, 0, 8), device="cpu")
    t_first = draw_timesteps(1, T, generator=rng.row_generators(9, 0, 1), device="cpu")
    assert t[0] == t_first[0] and bool(((t >= 0) & (t < T)).all())


@pytest.mark.parametrize("param", PARAMETERIZATIONS)
def test_min_snr_equals_clipped_snr_times_x0_error(schedule, param):
    """Min-SNR makes every parameterization's loss min(snr, gamma) * |x0 - x0_hat|^2."""
    x0, gamma = _x0(), 5.0
    delta = 0.1 * _x0(seed=3)
    gen = torch.Generator().manual_seed(0)
    t = torch.randint(0, T, (x0.shape[0],), generator=gen)
    noise = torch.randn(x0.shape, generator=gen)
    net = FixedX0Net(schedule, x0.double(), delta.double(), param)
    obj = DenoisingObjective(parameterization=param, loss_weighting="min_snr", min_snr_gamma=gamma)
    loss, _ = obj(net, x0.double(), schedule=schedule, generator=None, t=t, noise=noise.double())
    per_ex = delta.double().square().flatten(1).mean(1)
    expected = (schedule.snr(t).clamp(max=gamma) * per_ex).mean()
    torch.testing.assert_close(loss, expected, rtol=1e-9, atol=0)
    w = loss_weights(schedule, t, parameterization=param, loss_weighting="simple", min_snr_gamma=5)
    assert torch.equal(w, torch.ones_like(w))


@pytest.mark.parametrize("param", PARAMETERIZATIONS)
@pytest.mark.parametrize("variance", ["posterior", "beta"])
def test_elbo_tau_gives_the_gaussian_kl_of_the_step(schedule, param, variance):
    """loss / tau = |mu_tilde(x0) - mu(x0_hat)|^2 / (2 sigma_t^2), DDPM's KL term, for every t."""
    x0 = _x0(shape=(4, 3, 2)).double()
    delta = 0.2 * _x0(seed=4, shape=(4, 3, 2)).double()
    noise = _x0(seed=5, shape=(4, 3, 2)).double()
    net = FixedX0Net(schedule, x0, delta, param)
    obj = MixtureObjective(parameterization=param, num_eta_samples=2, elbo_variance=variance)
    for tv in (0, 1, 17, T - 1):
        t = torch.full((4,), tv)
        loss, logs = obj(net, x0, schedule=schedule, generator=None, t=t, noise=noise)
        x_t = schedule.q_sample(x0, t, noise)
        mu_true, _ = schedule.posterior_mean_variance(x0, x_t, t)
        mu_model, _ = schedule.posterior_mean_variance(x0 + delta, x_t, t)
        table = schedule.posterior_variance_clipped if variance == "posterior" else schedule.betas
        kl = (mu_true - mu_model).square().flatten(1).sum(1) / (2 * table[tv])
        torch.testing.assert_close(loss / logs["tau"], kl.mean(), rtol=1e-9, atol=0)


def test_bad_params_are_named():
    with pytest.raises(ValueError, match=r"'ddpm'.*vanilla.*smd_paper.*smd_mixture"):
        build_objective("ddpm")
    with pytest.raises(ValueError, match=r"unknown params \['taux'\]"):
        build_objective("smd_mixture", taux=1.0)
    with pytest.raises(ValueError, match="loss_weighting='snr'"):
        build_objective("vanilla", loss_weighting="snr")
    with pytest.raises(ValueError, match="tau=-1"):
        build_objective("smd_mixture", tau=-1.0)
    with pytest.raises(ValueError, match="tau='elbo' needs loss_type='l2'"):
        build_objective("smd_mixture", loss_type="l1")
    with pytest.raises(ValueError, match="parameterization='eps2'"):
        build_objective("smd_paper", parameterization="eps2")
    with pytest.raises(ValueError, match="at least 2 draws"):
        build_objective("smd_energy", num_eta_samples=1)
    with pytest.raises(ValueError, match=r"beta=2\.0"):
        build_objective("smd_energy", beta=2.0)
    with pytest.raises(ValueError, match="mean_weight=-1"):
        build_objective("smd_energy", mean_weight=-1)
    with pytest.raises(ValueError, match="marginal_weight=-1"):
        build_objective("smd_energy", marginal_weight=-1)


@pytest.mark.parametrize("name", ["smd_mixture", "smd_energy"])
def test_multi_eta_objective_over_a_network_without_latent_is_an_error(schedule, name):
    with pytest.raises(UsageError, match="needs an SMD network.*TinyNet has no latent"):
        build_objective(name)(TinyNet(), _x0(), schedule=schedule, generator=None)


class AnyKwargsNet(TinyNet):
    """Would accept num_eta_samples (and anything else) but does not declare draws_eta."""

    calls = 0

    def forward(self, x, t, generator=None, **kwargs):
        self.calls += 1
        return super().forward(x, t)


class BrokenSMDNet(NoisyNet):
    """Declares draws_eta, then fails inside its call with a TypeError of its own."""

    def forward(self, x, t, generator=None, num_eta_samples=1):
        raise TypeError("unsupported operand inside the network (num_eta_samples)")


def test_the_declaration_decides_not_the_signature_or_an_exception(schedule):
    """The objective reads draws_eta before calling: an undeclared network is never called with
    M draws, and a declared network's own TypeError is not reworded into "no latent"."""
    net = AnyKwargsNet()
    with pytest.raises(UsageError, match="does not declare draws_eta"):
        build_objective("smd_energy")(net, _x0(), schedule=schedule, generator=None)
    assert net.calls == 0
    assert not draws_eta(net) and draws_eta(NoisyNet) and draws_eta(NoisyNet())
    with pytest.raises(TypeError, match="unsupported operand inside the network"):
        build_objective("smd_energy")(BrokenSMDNet(), _x0(), schedule=schedule, generator=None)


class DrawNet(nn.Module):
    """Predicts a draw from N(mu, sd^2 I) (mu, sd learnable), whatever the input."""

    draws_eta = True

    def __init__(self, dim, mu=0.0, sd=1.0):
        super().__init__()
        self.mu = nn.Parameter(torch.full((dim,), float(mu)))
        self.log_sd = nn.Parameter(torch.tensor(float(sd)).log())

    def forward(self, x, t, generator=None, num_eta_samples=1):
        n = x.shape[0] * num_eta_samples
        eta = torch.randn((n, x.shape[1]), generator=generator, dtype=x.dtype)
        return self.mu + self.log_sd.exp() * eta


@pytest.mark.parametrize("marginal_weight", [0.0, 0.5])
def test_energy_score_matches_hand_written_formula(schedule, marginal_weight):
    torch.manual_seed(0)
    net, x0, M = NoisyNet(), _x0(), 3
    gen = torch.Generator().manual_seed(11)
    t = torch.randint(0, T, (x0.shape[0],), generator=gen)
    noise = torch.randn(x0.shape, generator=gen)
    obj = build_objective("smd_energy", num_eta_samples=M, marginal_weight=marginal_weight)
    loss, logs = obj(net, x0, schedule=schedule, generator=torch.Generator().manual_seed(2),
                     t=t, noise=noise)
    x_t = schedule.q_sample(x0, t, noise)
    pred = net(x_t, t, generator=torch.Generator().manual_seed(2), num_eta_samples=M)
    pred = pred.reshape(M, x0.shape[0], -1)
    y = noise.reshape(x0.shape[0], -1)
    per_ex = []
    for i in range(x0.shape[0]):
        fit = sum(((pred[m, i] - y[i]).square().mean() + 1e-8).sqrt() for m in range(M)) / M
        pairs = [((pred[m, i] - pred[k, i]).square().mean() + 1e-8).sqrt()
                 for m in range(M) for k in range(M) if m != k]
        score = fit - sum(pairs) / (2 * M * (M - 1))
        # the marginal score: each coordinate on its own, then the mean over coordinates
        fit1 = sum((pred[m, i] - y[i]).abs().mean() for m in range(M)) / M
        pairs1 = [(pred[m, i] - pred[k, i]).abs().mean()
                  for m in range(M) for k in range(M) if m != k]
        per_ex.append(score + marginal_weight * (fit1 - sum(pairs1) / (2 * M * (M - 1))))
    torch.testing.assert_close(loss, torch.stack(per_ex).mean(), rtol=1e-5, atol=1e-6)
    assert logs["energy_spread"] > 0


def test_the_marginal_score_charges_noise_on_a_certain_background(schedule):
    """Draws of the exact posterior (one of two strokes, varied, on a blank background), then the
    same draws with independent noise of size 0.05 on the background: scored over the whole
    picture the noise costs far less than the marginal score charges for it (second against
    first order in its size)."""
    gen = torch.Generator().manual_seed(0)
    D, B, M = 256, 2000, 4
    picture = torch.zeros(D)
    picture[:32] = 1.0

    def draw():
        sign = torch.randint(0, 2, (B, 1), generator=gen).float() * 2 - 1
        return (sign + 0.3 * torch.randn(B, D, generator=gen)) * picture

    target = draw()
    exact = torch.stack([draw() for _ in range(M)])
    noisy = exact + 0.05 * torch.randn(M, B, D, generator=gen) * (picture == 0)
    cost = {}
    for weight in (0.0, 1.0):
        obj = EnergyObjective(num_eta_samples=M, marginal_weight=weight)
        t = torch.zeros(B, dtype=torch.long)
        cost[weight] = (obj.loss(noisy, target, t, schedule)[0]
                        - obj.loss(exact, target, t, schedule)[0]).item()
    assert 0 < cost[0.0] and cost[1.0] - cost[0.0] > 20 * cost[0.0], cost


def test_energy_score_is_minimised_by_the_true_spread(schedule):
    """Targets ~ N(0, I) (eps of the data-free eps objective): over model draws N(0, sd^2 I),
    the expected score is lowest at sd = 1, not at the collapsed sd = 0 that MSE prefers."""
    dim, n = 4, 20000
    x0 = torch.zeros(n, dim, dtype=torch.float64)  # then the eps target is exactly N(0, I)
    scores = {}
    for sd in (0.05, 0.5, 1.0, 1.5):
        net = DrawNet(dim, sd=sd).double()
        obj = build_objective("smd_energy", num_eta_samples=4)
        loss, _ = obj(net, x0, schedule=schedule, generator=torch.Generator().manual_seed(0))
        scores[sd] = loss.item()
    assert min(scores, key=scores.get) == 1.0, scores
    # collapse (what the MSE of one draw would prefer) is clearly worse
    assert scores[0.05] > scores[1.0] + 0.05
