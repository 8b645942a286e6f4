"""The reference implementation against the paper's identities (docs/math.md) and the published arithmetic."""
import math

import pytest
import torch

from published import published_batchmean, published_generator_loss
from sidfast import predictions as P
from sidfast import reference as R
from sidfast.schedules import EDMSchedule, FlowSchedule, VPSchedule, broadcast
from utils import rounding_bound, sid_loss_magnitudes

SCHEDULES = {
    "edm": (EDMSchedule(), torch.tensor([0.05, 1.0, 20.0, 3.0], dtype=torch.float64)),
    "vp": (VPSchedule.linear(1000), torch.tensor([5.0, 500.0, 990.0, 250.5], dtype=torch.float64)),
    "flow": (FlowSchedule(), torch.tensor([0.1, 0.5, 0.9, 0.33], dtype=torch.float64)),
}


def _rand(*shape, dtype=torch.float64, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(*shape, generator=g, dtype=dtype)


def _published_error(y_real, y_fake, x_g, alpha, summed=0):
    """Bound on the rounding error of the published generator-loss arithmetic (or sidfast.reference's, the same
    steps) on these inputs against its exact value, per element, or for the sum of ``summed`` of them.

    In the input dtype: alpha, d, e, alpha d, the difference, the product, and |x_g - y_real|, which counts twice
    through the reciprocal of w (8 roundings, and in the subnormal range u times the smallest normal number
    each, divided by w). In float32: w's sum of N terms, the division by N and its reciprocal (2N + 2), and
    the final division; then the float32 (float64 for float64) sum of ``summed`` terms."""
    dtype = x_g.dtype
    acc = torch.promote_types(dtype, torch.float32)
    N = x_g[0].numel()
    mag, _ = sid_loss_magnitudes(y_real, y_fake, x_g, alpha)
    keep = ~R.nan_rows(y_real, y_fake, x_g)
    r, x = (torch.where(broadcast(keep, t.double()), t.double(), 0.0) for t in (y_real, x_g))
    underflow = torch.finfo(dtype).tiny / broadcast(R.sid_normalizer(r, x), x)
    if summed:
        mag = mag.sum()
        underflow = underflow.sum()
    return (rounding_bound(dtype, mag + underflow, 8) + rounding_bound(torch.float32, mag, 2 * N + 3)
            + rounding_bound(acc, mag, max(summed, 1)))


@pytest.mark.parametrize("sched", SCHEDULES)
@pytest.mark.parametrize("alpha", [0.0, 1.0, 1.2])
def test_denoised_loss_is_scaled_noise_space_loss(sched, alpha):
    """docs/math.md, "SiD generator loss": d*(e - alpha d) = (s/a)^2 [<e_phi - e_psi, e_phi - eps> - alpha ||e_phi - e_psi||^2]."""
    schedule, t = SCHEDULES[sched]
    a, s = schedule.coefficients(t)
    x_g, eps = _rand(4, 3, 5, 5, seed=1), _rand(4, 3, 5, 5, seed=2)
    x_t = R.add_noise(x_g, a, s, eps)
    eps_phi, eps_psi = _rand(4, 3, 5, 5, seed=3), _rand(4, 3, 5, 5, seed=4)
    f_phi, f_psi = P.to_x0(eps_phi, x_t, a, s, "eps"), P.to_x0(eps_psi, x_t, a, s, "eps")
    denoised = R.sid_generator_loss(f_phi, f_psi, x_g, alpha, reduction="none")
    w = (x_g - f_phi).abs().mean(dim=(1, 2, 3), keepdim=True).clip(min=1e-5)
    noise_space = R.sid_generator_loss_eps(eps_phi, eps_psi, eps, alpha, reduction="none")
    torch.testing.assert_close(denoised * w, broadcast((s / a) ** 2, x_g) * noise_space)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.float64])
def test_matches_published_arithmetic_with_nan_rows(dtype):
    y_real, y_fake, x_g = (_rand(6, 3, 4, 4, seed=i).to(dtype) for i in range(3))
    y_real[1, 0, 0, 0] = float("nan")
    x_g[4, 2, 3, 1] = float("nan")
    ours = R.sid_generator_loss(y_real, y_fake, x_g, 1.2, reduction="none")
    keep = torch.tensor([True, False, True, True, False, True])
    pub = published_generator_loss(y_real, y_fake, x_g, 1.2)
    # two evaluations of the same arithmetic (the normalizer summed in another order): within both bounds
    bound = 2 * _published_error(y_real, y_fake, x_g, 1.2)
    if dtype != torch.float64:  # the published normalizer is float32; sidfast keeps float64 for float64
        assert torch.all((ours[keep].double() - pub.double()).abs() <= bound[keep])
    assert torch.equal(ours[~keep], torch.zeros_like(ours[~keep]))
    ours_mean = R.sid_generator_loss(y_real, y_fake, x_g, 1.2)
    pub_mean = published_batchmean(y_real, y_fake, x_g)
    B = x_g.shape[0]
    assert abs(ours_mean.double() - pub_mean.double()) <= 2 * _published_error(y_real, y_fake, x_g, 1.2,
                                                                                x_g.numel()) / B


def test_nan_rows_get_zero_gradient():
    y_real, y_fake, x_g = (_rand(3, 8, seed=i).requires_grad_() for i in range(3))
    with torch.no_grad():
        y_fake[2, 5] = float("nan")
    R.sid_generator_loss(y_real, y_fake, x_g).backward()
    for t in (y_real, y_fake, x_g):
        assert torch.isfinite(t.grad).all() and torch.equal(t.grad[2], torch.zeros(8, dtype=t.dtype))


def test_closed_form_gradients_match_autograd():
    """sid_gradients (float32) against autograd of the float64 loss, on inputs float32 holds exactly: within the
    float32 rounding of the gradient formula (d, e, alpha, 1 - 2 alpha, a product, a sum and the division by w,
    whose N-term normalizer counts 2N + 2; 16 for the formula) and the float64 rounding of autograd's."""
    y_real, y_fake, x_g = (_rand(3, 2, 6, seed=i).float().double().requires_grad_() for i in range(3))
    loss = R.sid_generator_loss(y_real, y_fake, x_g, 1.2, reduction="sum")
    auto = torch.autograd.grad(loss, (y_real, y_fake, x_g))
    _, mag = sid_loss_magnitudes(y_real, y_fake, x_g, 1.2)
    roundings = 16 + 2 * 12 + 2
    bound = rounding_bound(torch.float32, mag, roundings) + rounding_bound(torch.float64, mag, roundings)
    for g_auto, g_closed in zip(auto, R.sid_gradients(y_real, y_fake, x_g, 1.2)):
        assert g_closed.dtype == torch.float32
        assert torch.all((g_closed.double() - g_auto).abs() <= bound)


def test_normalizer_is_clipped_and_constant():
    x = _rand(2, 10)
    y_real = x.clone().requires_grad_()  # |x_g - y_real| = 0 -> w = 1e-5
    y_fake = torch.zeros_like(x)
    loss = R.sid_generator_loss(y_real, y_fake, x, alpha=0.0, reduction="none")
    expected = y_real.detach() * (y_real.detach() - x) / 1e-5
    torch.testing.assert_close(loss, expected)


def test_reductions():
    y = [_rand(4, 3, 2, seed=i) for i in range(3)]
    full = R.sid_generator_loss(*y, reduction="none")
    torch.testing.assert_close(R.sid_generator_loss(*y, reduction="sum"), full.sum())
    torch.testing.assert_close(R.sid_generator_loss(*y, reduction="batchmean"), full.sum() / 4)


def test_generator_sigma_range_and_formula():
    g = torch.Generator().manual_seed(0)
    sigma = R.generator_sigma(20000, generator=g)
    lo, hi = 0.002 ** (1 / 7), 80 ** (1 / 7)
    smax = (hi + 0.2 * (lo - hi)) ** 7  # u = tmax/1000 = 0.8
    assert sigma.min() >= 0.002 - 1e-9 and sigma.max() <= smax + 1e-6
    g = torch.Generator().manual_seed(0)
    u = torch.rand(20000, generator=g) * 0.8
    torch.testing.assert_close(sigma, (hi + (1 - u) * (lo - hi)) ** 7)


def test_edm_training_sigma_lognormal():
    sigma = R.edm_training_sigma(200000, generator=torch.Generator().manual_seed(0))
    assert abs(sigma.log().mean().item() + 1.2) < 0.02 and abs(sigma.log().std().item() - 1.2) < 0.02


def test_edm_sigma_steps():
    steps = R.edm_sigma_steps(18)
    assert steps.shape == (19,) and steps[-1] == 0
    assert math.isclose(steps[0].item(), 80.0, rel_tol=1e-9) and math.isclose(steps[-2].item(), 0.002, rel_tol=1e-9)
    assert bool((steps[1:] < steps[:-1]).all())


# ---- fake-score loss ----

def test_fake_score_edm_weighting():
    x0, noise = _rand(3, 2, 4, seed=1), _rand(3, 2, 4, seed=2)
    sigma = torch.tensor([0.1, 1.0, 10.0], dtype=torch.float64)
    pred = _rand(3, 2, 4, seed=3)
    loss = R.fake_score_loss(pred, x0, noise, torch.ones(3, dtype=torch.float64), sigma, reduction="none")
    w = ((sigma ** 2 + 0.25) / (sigma * 0.5) ** 2).reshape(3, 1, 1)
    torch.testing.assert_close(loss, w * (pred - x0) ** 2)


@pytest.mark.parametrize("weighting, space", [("eps", "eps"), ("v", "v"), ("x0", "x0"), ("flow", "flow")])
@pytest.mark.parametrize("prediction", ["x0", "eps", "v", "flow"])
def test_fake_score_plain_mse_any_prediction(weighting, space, prediction):
    schedule, t = SCHEDULES["vp"]
    a, s = schedule.coefficients(t)
    x0, noise, raw = _rand(4, 3, 2, seed=1), _rand(4, 3, 2, seed=2), _rand(4, 3, 2, seed=3)
    x_t = R.add_noise(x0, a, s, noise)
    loss = R.fake_score_loss(raw, x0, noise, a, s, prediction=prediction, weighting=weighting, reduction="none")
    est = P.convert(raw, x_t, a, s, prediction, space)
    torch.testing.assert_close(loss, (est - P.target(x0, noise, a, s, space)) ** 2)
    # a perfect prediction gives zero loss
    perfect = P.target(x0, noise, a, s, prediction)
    assert R.fake_score_loss(perfect, x0, noise, a, s, prediction, weighting, reduction="sum").abs() < 1e-20


@pytest.mark.parametrize("gamma", [1.0, 5.0])
def test_min_snr_weights(gamma):
    schedule, t = SCHEDULES["vp"]
    a, s = schedule.coefficients(t)
    snr = (a / s) ** 2
    space, w = R.fake_score_weight(a, s, "min_snr_eps", gamma=gamma)
    assert space == "eps"
    torch.testing.assert_close(w, torch.clamp(snr, max=gamma) / snr)
    space, w = R.fake_score_weight(a, s, "min_snr_v", gamma=gamma)
    assert space == "v"
    torch.testing.assert_close(w, torch.clamp(snr, max=gamma) / (snr + 1))
    with pytest.raises(ValueError, match="weighting"):
        R.fake_score_weight(a, s, "snr")
