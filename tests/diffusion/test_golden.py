"""Golden values: a refactor that changes the samplers' numbers must fail here.

The values were recorded once from this implementation after the Gaussian-data tests in
test_samplers.py passed; the diffusers comparison is an independent check of DDIM / DPM++.
"""

import pytest
import torch
from torch import nn

from ldm_smd import rng
from ldm_smd.diffusion.samplers import sample, timesteps
from ldm_smd.diffusion.schedule import NoiseSchedule


class TinySMDLikeNet(nn.Module):
    """Seeded two-layer MLP over (x, t) that also draws eta from the generator, like SMD."""

    def __init__(self) -> None:
        super().__init__()
        with torch.random.fork_rng():  # seeded weights without touching the global RNG
            torch.manual_seed(1234)
            self.net = nn.Sequential(nn.Linear(5, 16), nn.SiLU(), nn.Linear(16, 4))

    @torch.no_grad()
    def forward(self, x, t, generator=None):
        eta = rng.randn_like(x, generator=generator)
        h = torch.cat([x, t.float()[:, None] / 100.0], dim=1)
        return self.net(h) + 0.1 * eta


GOLDEN = {
    # (sampler, parameterization, ddim_eta, spacing): first row of the 5-step sample
    ("ddpm", "eps", 0.0, "uniform"): [-9.395280, -3.543036, 15.741410, 9.031623],
    ("ddpm", "v", 0.0, "trailing"): [-1.022906, -0.371251, 0.576580, -0.234193],
    ("ddim", "eps", 0.0, "uniform"): [-6.742832, -1.614456, 12.563145, 11.733575],
    ("ddim", "x0", 0.5, "quadratic"): [0.173211, 0.114033, -0.092615, -0.151139],
    ("dpmpp", "eps", 0.0, "trailing"): [-7.059113, -1.881484, 11.795288, 12.304261],
    ("dpmpp", "v", 0.0, "uniform"): [-0.102344, -0.011748, 0.356149, 0.556174],
}

CASES = [
    ("ddpm", "eps", 0.0, "uniform"),
    ("ddpm", "v", 0.0, "trailing"),
    ("ddim", "eps", 0.0, "uniform"),
    ("ddim", "x0", 0.5, "quadratic"),
    ("dpmpp", "eps", 0.0, "trailing"),
    ("dpmpp", "v", 0.0, "uniform"),
]


def run_case(sampler, param, ddim_eta, spacing):
    sch = NoiseSchedule(kind="linear", num_timesteps=100)
    return sample(
        TinySMDLikeNet(),
        (3, 4),
        schedule=sch,
        parameterization=param,
        sampler=sampler,
        steps=5,
        spacing=spacing,
        ddim_eta=ddim_eta,
        generator=torch.Generator().manual_seed(42),
    )


@pytest.mark.parametrize("case", CASES)
def test_golden_values(case):
    got = run_case(*case)
    torch.testing.assert_close(got[0], torch.tensor(GOLDEN[case]), atol=1e-5, rtol=1e-5)


def test_matches_diffusers_reference_implementations():
    diffusers = pytest.importorskip("diffusers")
    sch = NoiseSchedule(kind="linear", num_timesteps=1000)
    x_T = torch.randn(8, 3, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    W = torch.tensor([[0.9, 0.2, -0.1], [0.1, 0.8, 0.3], [0.0, -0.2, 0.7]], dtype=torch.float64)

    def det(x, t, g):  # deterministic, float64
        return torch.tanh(x @ W) * (1 + t.double()[:, None] / 1000)

    for name, cls, extra in [
        ("dpmpp", diffusers.DPMSolverMultistepScheduler, {"final_sigmas_type": "zero"}),
        ("ddim", diffusers.DDIMScheduler, {"set_alpha_to_one": True, "clip_sample": False}),
    ]:
        for steps in (5, 10):
            ref = cls(trained_betas=sch.betas.numpy(), timestep_spacing="trailing", **extra)
            ref.set_timesteps(steps)
            assert ref.timesteps.tolist() == timesteps(1000, steps, "trailing")
            x = x_T.clone()
            for t in ref.timesteps:
                x = ref.step(det(x, torch.full((8,), int(t)), None), t, x).prev_sample
            ours = sample(
                det,
                (8, 3),
                schedule=sch,
                parameterization="eps",
                sampler=name,
                steps=steps,
                spacing="trailing",
                x_T=x_T,
            )
            torch.testing.assert_close(ours, x.to(ours.dtype), atol=2e-5, rtol=1e-5)
