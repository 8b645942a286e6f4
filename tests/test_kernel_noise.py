"""The in-kernel noise as the trainer and the engine use it: add_noise with a = 1 (EDM coordinates) and the
public fake-score loss regenerating eps from add_noise's seed (``sidfast.loss.fake_score_loss(seed=)``)."""
import pytest
import torch

import sidfast
from sidfast.ops import noise as Nz
from utils import rounding_bound


def _batch(seed=0, shape=(3, 2, 4, 4)):
    g = torch.Generator().manual_seed(seed)
    x0 = torch.randn(shape, generator=g)
    pred = x0 + 0.3 * torch.randn(shape, generator=g)
    sigma = torch.rand(shape[0], generator=g) * 3 + 0.1
    return x0, pred, sigma


@pytest.mark.parametrize("a", [1.0, 2.0])
def test_add_noise_with_a_equal_to_one_passes_the_gradient_through(a, monkeypatch):
    """d x_t / d x0 = a: for the number 1 the backward hands the incoming gradient on without a scaling pass
    (which would cost a full read and write); any other a is still scaled."""
    x0, _, sigma = _batch()
    calls = []
    scale_rows = Nz.scale_rows
    monkeypatch.setattr(Nz, "scale_rows", lambda *args: calls.append(1) or scale_rows(*args))
    x = x0.clone().requires_grad_()
    x_t, seed = Nz.add_noise(x, a, sigma)
    g = torch.randn_like(x0)
    x_t.backward(g)
    torch.testing.assert_close(x.grad, a * g, rtol=0, atol=0)
    assert len(calls) == (0 if a == 1.0 else 1)
    eps = Nz.regenerate_noise(seed, x0.shape)
    # each side rounds a * x0, s * eps and their sum once (3 roundings of values of size |a x0| + |s eps|; the
    # kernel may fuse a multiply-add, which only removes a rounding)
    s_eps = sigma.reshape(-1, 1, 1, 1) * eps
    bound = 2 * rounding_bound(torch.float32, (a * x0).abs() + s_eps.abs(), 3)
    assert bool(((x_t - (a * x0 + s_eps)).abs() <= bound).all())


@pytest.mark.parametrize("weighting", ["edm", "eps", "v"])
def test_fake_score_loss_regenerates_the_noise_from_the_seed(weighting):
    x0, pred, sigma = _batch(1)
    x_t, seed = Nz.add_noise(x0, 1.0, sigma, offset=3)
    eps = Nz.regenerate_noise(seed, x0.shape, offset=3)
    losses = []
    grads = []
    for kw in (dict(noise=None, seed=seed, offset=3), dict(noise=eps)):
        p = pred.clone().requires_grad_()
        loss = sidfast.fake_score_loss(p, x0, a=1.0, s=sigma, weighting=weighting, **kw)
        loss.backward()
        losses.append(loss)
        grads.append(p.grad)
    torch.testing.assert_close(losses[0], losses[1], rtol=0, atol=0)
    torch.testing.assert_close(grads[0], grads[1], rtol=0, atol=0)


def test_fake_score_loss_seed_errors():
    x0, pred, sigma = _batch(2)
    _, seed = Nz.add_noise(x0, 1.0, sigma)
    with pytest.raises(ValueError, match="exactly one of noise .* and seed"):
        sidfast.fake_score_loss(pred, x0, None, 1.0, sigma)
    with pytest.raises(ValueError, match="exactly one of noise .* and seed"):
        sidfast.fake_score_loss(pred, x0, torch.randn_like(x0), 1.0, sigma, seed=seed)
    with pytest.raises(ValueError, match="seed must be the \\(1,\\) int64 tensor"):
        sidfast.fake_score_loss(pred, x0, None, 1.0, sigma, seed=torch.zeros(1))
    with pytest.raises(ValueError, match="offset"):
        sidfast.fake_score_loss(pred, x0, None, 1.0, sigma, seed=seed, offset=-1)
