"""sidfast.training.updates: the EMA decay and update, the learning-rate cooldown factor and the gradient
sanitizer, against their formulas."""
import pytest
import torch
from torch import nn

from sidfast.training.updates import ema_beta, lr_factor, sanitize_grads, update_ema


def test_ema_beta_is_edms_formula():
    assert ema_beta(0, 256, 500, 0.05) == 0.0
    assert ema_beta(10_000, 256, 500, 0.05) == 0.5 ** (256 / 500)
    assert ema_beta(10 ** 9, 256, 500, 0.05) == 0.5 ** (256 / 500_000)
    assert ema_beta(0, 256, 500, None) == 0.5 ** (256 / 500_000)


def test_sanitize_grads_matches_published_nan_to_num():
    p = nn.Parameter(torch.zeros(4))
    p.grad = torch.tensor([float("nan"), float("inf"), -float("inf"), 2.0])
    sanitize_grads([p, nn.Parameter(torch.zeros(1))])
    assert torch.equal(p.grad, torch.tensor([0.0, 1e5, -1e5, 2.0]))


def test_lr_factor():
    from sidfast.training.updates import lr_factor

    assert [lr_factor(i, 10, 0.0) for i in range(10)] == [1.0] * 10
    assert [lr_factor(i, 10, 0.5) for i in range(10)] == pytest.approx(
        [1, 1, 1, 1, 1, 1, 0.8, 0.6, 0.4, 0.2])
    assert [lr_factor(i, 4, 1.0) for i in range(4)] == pytest.approx([1, 0.75, 0.5, 0.25])


def test_ema_beta_ramps_the_half_life_up_with_the_images_seen():
    """Half-life min(halflife_kimg * 1000, rampup_ratio * nimg) images; beta = 0.5 ** (batch / half-life)."""
    for nimg in (1, 1000, 200_000, 10_000_000, 10 ** 9):
        halflife = min(500 * 1000, 0.05 * nimg)
        assert ema_beta(nimg, 64, 500, 0.05) == pytest.approx(0.5 ** (64 / halflife), rel=1e-12)
    assert ema_beta(10, 64, 500, None) == ema_beta(10 ** 9, 64, 500, 0.05)


def test_lr_factor_against_its_formula_and_its_edges():
    for iterations, cooldown in [(100, 0.3), (7, 1.0), (10, 0.05)]:
        for i in range(iterations):
            expected = max(0.0, min(1.0, (iterations - i) / (cooldown * iterations)))
            assert lr_factor(i, iterations, cooldown) == pytest.approx(expected, rel=1e-12)
    assert lr_factor(12, 10, 0.5) == 0.0  # past the run's end: never negative
    assert lr_factor(0, 0, 0.5) == 1.0 and lr_factor(3, 10, -1.0) == 1.0  # no iterations, no cooldown


def test_update_ema_is_the_lerp_towards_the_network_and_copies_buffers():
    torch.manual_seed(0)
    net, ema = nn.BatchNorm1d(3), nn.BatchNorm1d(3)  # parameters and buffers
    with torch.no_grad():
        for p in (*net.parameters(), *ema.parameters()):
            p.normal_()
        net.running_mean.normal_()
        net.num_batches_tracked.fill_(5)
    beta = 0.25
    expected = [(n + beta * (e - n)).detach() for n, e in zip(net.parameters(), ema.parameters())]
    update_ema(ema, net, beta)
    for got, want in zip(ema.parameters(), expected):
        torch.testing.assert_close(got, want, rtol=2e-7, atol=2e-7)  # float32: lerp rounds once or twice
    for got, want in zip(ema.buffers(), net.buffers()):
        assert torch.equal(got, want)


def test_update_ema_leaves_shared_tensors_alone():
    shared = nn.Linear(2, 2)
    net, ema = nn.Sequential(shared, nn.Linear(2, 2)), nn.Sequential(shared, nn.Linear(2, 2))
    before = shared.weight.detach().clone()
    expected = net[1].weight.detach().lerp(ema[1].weight.detach(), 0.5)
    update_ema(ema, net, 0.5)
    assert torch.equal(shared.weight, before)
    torch.testing.assert_close(ema[1].weight.detach(), expected, rtol=0, atol=0)
