import itertools

import pytest
import torch

from sidfast import predictions as P
from sidfast.reference import add_noise
from sidfast.schedules import EDMSchedule, FlowSchedule, VPSchedule

from utils import rounding_bound

SCHEDULES = {
    "edm": (EDMSchedule(), torch.tensor([0.05, 1.0, 20.0], dtype=torch.float64)),
    "vp": (VPSchedule.linear(1000), torch.tensor([5.0, 500.0, 990.0], dtype=torch.float64)),
    "flow": (FlowSchedule(), torch.tensor([0.1, 0.5, 0.9], dtype=torch.float64)),
}


def _data(shape=(3, 2, 4, 4)):
    g = torch.Generator().manual_seed(0)
    return torch.randn(shape, generator=g, dtype=torch.float64), torch.randn(shape, generator=g, dtype=torch.float64)


@pytest.mark.parametrize("sched", SCHEDULES)
@pytest.mark.parametrize("kind", P.PREDICTIONS)
def test_exact_prediction_recovers_x0_and_eps(sched, kind):
    schedule, t = SCHEDULES[sched]
    a, s = schedule.coefficients(t)
    x0, eps = _data()
    x_t = add_noise(x0, a, s, eps)
    pred = P.target(x0, eps, a, s, kind)
    torch.testing.assert_close(P.to_x0(pred, x_t, a, s, kind), x0)
    torch.testing.assert_close(P.to_eps(pred, x_t, a, s, kind), eps)


@pytest.mark.parametrize("sched", SCHEDULES)
@pytest.mark.parametrize("src, dst", list(itertools.permutations(P.PREDICTIONS, 2)))
def test_round_trips(sched, src, dst):
    schedule, t = SCHEDULES[sched]
    a, s = schedule.coefficients(t)
    x0, eps = _data()
    x_t = add_noise(x0, a, s, eps)
    pred = torch.randn_like(x0)  # an arbitrary (imperfect) prediction converts losslessly too
    there = P.convert(pred, x_t, a, s, src, dst)
    torch.testing.assert_close(P.convert(there, x_t, a, s, dst, src), pred)


def test_vp_velocity_matches_diffusers_formula():
    vp = VPSchedule.linear(1000)
    t = torch.tensor([10, 500, 900])
    a, s = vp.coefficients(t)
    x0, eps = _data()
    abar = vp.alphas_cumprod[t].reshape(-1, 1, 1, 1)
    # diffusers get_velocity: sqrt(abar) eps - sqrt(1 - abar) x0
    expected = abar.sqrt() * eps - (1 - abar).sqrt() * x0
    torch.testing.assert_close(P.target(x0, eps, abar.sqrt().flatten(), (1 - abar).sqrt().flatten(), "v"), expected)
    diffusers = pytest.importorskip("diffusers")
    sched = diffusers.DDPMScheduler(num_train_timesteps=1000)
    ours = P.target(x0.float(), eps.float(), a, s, "v")
    # diffusers' abar is a float32 cumulative product of t + 1 rounded factors 1 - beta (2 roundings each; the
    # square root halves the relative error and adds one), ours rounds float64 roots once; then each side's
    # products and difference: 2 + 2 roundings of |a eps| + |s x0|
    magnitude = a.double().reshape(-1, 1, 1, 1) * eps.abs() + s.double().reshape(-1, 1, 1, 1) * x0.abs()
    error = (ours.double() - sched.get_velocity(x0.float(), eps.float(), t).double()).abs()
    assert bool((error <= rounding_bound(torch.float32, magnitude, int(t.max()) + 1 + 1 + 1 + 4)).all())


def test_flow_matches_table_form():
    t = torch.tensor([0.2, 0.7], dtype=torch.float64)
    a, s = FlowSchedule().coefficients(t)
    x_t, pred = torch.randn(2, 3, dtype=torch.float64), torch.randn(2, 3, dtype=torch.float64)
    # docs/math.md, "Predictions", flow row: x0 = x_t - t pred, eps = x_t + (1 - t) pred
    torch.testing.assert_close(P.to_x0(pred, x_t, a, s, "flow"), x_t - t[:, None] * pred)
    torch.testing.assert_close(P.to_eps(pred, x_t, a, s, "flow"), x_t + (1 - t[:, None]) * pred)


def test_diffusers_names_and_errors():
    assert P.canonical("epsilon") == "eps" and P.canonical("v_prediction") == "v" and P.canonical("sample") == "x0"
    with pytest.raises(ValueError, match="prediction"):
        P.canonical("score")
    with pytest.raises(TypeError, match="prediction"):
        P.canonical(3)
