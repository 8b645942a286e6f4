import math

import pytest
import torch

from sidfast import schedules
from sidfast.schedules import EDMSchedule, FlowSchedule, VPSchedule, broadcast, log_snr

from utils import rounding_bound


def test_edm_and_flow_coefficients():
    t = torch.tensor([0.002, 0.5, 80.0])
    a, s = EDMSchedule().coefficients(t)
    assert torch.equal(a, torch.ones(3)) and torch.equal(s, t)
    t = torch.tensor([0.1, 0.5, 0.9])
    a, s = FlowSchedule().coefficients(t)
    torch.testing.assert_close(a + s, torch.ones(3))
    torch.testing.assert_close(s, t)


def test_vp_lookup_matches_ddpm_linear_betas():
    vp = VPSchedule.linear(1000)
    betas = torch.linspace(1e-4, 0.02, 1000, dtype=torch.float64)
    abar = torch.cumprod(1 - betas, 0)
    t = torch.tensor([0, 10, 999])
    a, s = vp.coefficients(t)
    torch.testing.assert_close(a.double(), abar[t].sqrt(), rtol=1e-6, atol=1e-7)
    torch.testing.assert_close(s.double(), (1 - abar[t]).sqrt(), rtol=1e-6, atol=1e-7)
    # a^2 + s^2 = 1 for VP (docs/math.md, "Predictions")
    torch.testing.assert_close(a ** 2 + s ** 2, torch.ones(3), rtol=1e-6, atol=1e-6)


def test_vp_fractional_t_interpolates():
    vp = VPSchedule.linear(1000)
    def alpha_bar(t):  # a^2 = abar (VP)
        return vp.coefficients(torch.tensor([t], dtype=torch.float64))[0] ** 2

    torch.testing.assert_close(alpha_bar(10.5), (alpha_bar(10.0) + alpha_bar(11.0)) / 2, rtol=1e-6, atol=1e-7)


def test_vp_cosine_is_monotone():
    ac = VPSchedule.cosine(1000).alphas_cumprod
    assert bool((ac[1:] < ac[:-1]).all())


def test_vp_from_diffusers():
    diffusers = pytest.importorskip("diffusers")
    sched = diffusers.DDPMScheduler(num_train_timesteps=1000)
    vp = VPSchedule.from_diffusers(sched)
    x0, eps = torch.randn(3, 2, 4, 4), torch.randn(3, 2, 4, 4)
    t = torch.tensor([3, 400, 999])
    a, s = vp.coefficients(t)
    ours = broadcast(a, x0) * x0 + broadcast(s, x0) * eps
    # as for v in test_predictions: 2 roundings per diffusers coefficient, 1 per ours, then products and sum
    magnitude = broadcast(a, x0) * x0.abs() + broadcast(s, x0) * eps.abs()
    error = (ours - sched.add_noise(x0, eps, t)).abs()
    assert bool((error <= rounding_bound(torch.float32, magnitude, 6)).all())


@pytest.mark.parametrize("bad, err", [(torch.tensor([0.5]), ValueError), (torch.tensor([[0.5, 0.4]]), ValueError),
                                      (torch.tensor([1, 0]), TypeError), (torch.tensor([0.5, 1.0]), ValueError)])
def test_vp_rejects_bad_tables(bad, err):
    with pytest.raises(err, match="alphas_cumprod"):
        VPSchedule(bad)


def test_vp_from_scheduler_without_table():
    with pytest.raises(ValueError, match="alphas_cumprod"):
        VPSchedule.from_diffusers(object())


def test_log_snr():
    a, s = torch.tensor([0.6]), torch.tensor([0.8])
    torch.testing.assert_close(log_snr(a, s), torch.tensor([math.log(0.36 / 0.64)]))
    torch.testing.assert_close(schedules.snr(a, s), torch.tensor([0.36 / 0.64]))
    t = torch.tensor([0.3])
    torch.testing.assert_close(FlowSchedule().log_snr(t), log_snr(torch.tensor([0.7]), t))


def test_broadcast_checks_batch():
    x = torch.zeros(3, 2, 5)
    assert broadcast(torch.ones(3), x).shape == (3, 1, 1)
    with pytest.raises(ValueError, match="batch"):
        broadcast(torch.ones(4), x)
