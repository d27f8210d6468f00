"""draw_calibration on Gaussian data, where q(x0 | x_t) is known exactly."""

import math

import pytest
import torch

from ldm_smd.diffusion.schedule import NoiseSchedule
from ldm_smd.eval.draws import draw_calibration

T = 5


@pytest.fixture(scope="module")
def schedule():
    return NoiseSchedule(kind="cosine", num_timesteps=T)


def posterior_draws(schedule, width):
    """For x0 ~ N(0, I): q(x0 | x_t) = N(a x_t, s^2 I) with a = sqrt(abar), s = sqrt(1 - abar).
    ``width`` scales the draws' spread around that mean (1: exact draws, 0: the mean only)."""

    def denoiser(x_t, t, generator):
        abar = schedule.gather("alphas_cumprod", t).float().view(-1, 1)
        a, s = abar.sqrt(), (1 - abar).sqrt()
        return a * x_t + width * s * torch.randn(x_t.shape, generator=generator)

    return denoiser


def _rows(schedule, width, num_draws=8):
    x0 = torch.randn(4000, 16, generator=torch.Generator().manual_seed(1))
    return draw_calibration(posterior_draws(schedule, width), x0, schedule=schedule,
                            parameterization="x0", generator=torch.Generator().manual_seed(2),
                            num_draws=num_draws)


def test_exact_draws_are_calibrated_at_every_step(schedule):
    rows = _rows(schedule, 1.0)
    assert [r["t"] for r in rows] == list(range(T))
    for r in rows:
        s = math.sqrt(1 - r["abar"])
        assert r["calibration"] == pytest.approx(1.0, abs=0.03), r
        assert r["err_mean"] == pytest.approx(s * math.sqrt(9 / 8), rel=0.03), r
        assert r["err_draw"] == pytest.approx(s * math.sqrt(2), rel=0.03), r


def test_narrow_draws_and_a_mean_alone_are_told_apart(schedule):
    narrow = _rows(schedule, 0.5)
    mean_only = _rows(schedule, 0.0)
    # spread^2 = 0.25 s^2 7/8 and err_mean^2 = s^2 (1 + 0.25 / 8), whatever the step
    expected = 0.5 * math.sqrt(9 / 8) / math.sqrt(1 + 0.25 / 8)
    for n, m in zip(narrow, mean_only, strict=True):
        assert n["calibration"] == pytest.approx(expected, abs=0.02), n
        assert m["calibration"] == 0.0 and m["spread"] == 0.0
        assert m["err_mean"] == pytest.approx(math.sqrt(1 - m["abar"]), rel=0.03)


def test_bad_arguments_are_named(schedule):
    with pytest.raises(ValueError, match="num_draws=1"):
        _rows(schedule, 1.0, num_draws=1)
    with pytest.raises(ValueError, match="timestep 5 is outside 0 .. 4"):
        draw_calibration(posterior_draws(schedule, 1.0), torch.zeros(2, 3), schedule=schedule,
                         parameterization="x0", generator=torch.Generator(), timesteps=[5])
