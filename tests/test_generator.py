"""The few-step generator (sidfast/generator.py; docs/math.md, "Few-step generator"): step levels, the rollout
with gradient through its last step only, re-noising, k* shared by every process, and sampling."""
import math

import pytest
import torch
from torch import nn

from sidfast.utils import runtime
from sidfast.generator import draw_k_star, generator_sigmas, rollout, sample
from sidfast.samplers import one_step_sample


class SmallG(nn.Module):
    """A conditional conv net G(x, sigma, labels) -> x0_hat; records (batch, grad enabled, sigma) per call."""

    def __init__(self, num_classes=3):
        super().__init__()
        torch.manual_seed(0)
        self.conv = nn.Conv2d(2, 2, 3, padding=1)
        self.embed = nn.Linear(num_classes, 2)
        self.calls = []

    def forward(self, x, sigma, class_labels=None):
        self.calls.append((x.shape[0], torch.is_grad_enabled(), sigma.clone()))
        h = self.conv(x / (1 + sigma.reshape(-1, 1, 1, 1) ** 2) ** 0.5)
        if class_labels is not None:
            h = h + self.embed(class_labels)[:, :, None, None]
        return torch.tanh(h)


class Halve(nn.Module):
    """G(x, sigma) = x / 2: re-noising is read off its recorded inputs."""

    def __init__(self):
        super().__init__()
        self.inputs = []

    def forward(self, x, sigma, class_labels=None):
        self.inputs.append(x.clone())
        return x / 2


def _latents(batch=4, seed=1):
    g = torch.Generator().manual_seed(seed)
    z = torch.randn(batch, 2, 5, 5, generator=g)
    labels = nn.functional.one_hot(torch.randint(3, (batch,), generator=g), 3).float()
    return z, labels


# ---- levels ----

def test_generator_sigmas():
    assert generator_sigmas(4, 2.5) == [2.5, 1.875, 1.25, 0.625]
    for spacing in ("linear", "flow"):
        assert generator_sigmas(1, 2.7, spacing) == [2.7]
        for steps in (2, 3, 7):
            levels = generator_sigmas(steps, 2.7, spacing)
            assert len(levels) == steps and levels[0] == 2.7
            assert all(a > b > 0 for a, b in zip(levels, levels[1:]))
    # "flow": equally spaced in t = sigma / (1 + sigma), from t_init down to t_init / K
    t = torch.tensor([s / (1 + s) for s in generator_sigmas(4, 2.5, "flow")], dtype=torch.float64)
    torch.testing.assert_close(t, (2.5 / 3.5) * torch.tensor([1.0, 0.75, 0.5, 0.25], dtype=torch.float64))
    with pytest.raises(ValueError, match="steps must be an integer >= 1"):
        generator_sigmas(0, 2.5)
    with pytest.raises(ValueError, match="spacing must be one of"):
        generator_sigmas(2, 2.5, "karras")
    with pytest.raises(ValueError, match="sigma_init must be finite and positive"):
        generator_sigmas(2, -1.0)


# ---- one step ----

def test_one_step_is_todays_generator_bitwise():
    """K = 1 (and k* = 1 of any K) is x_g = G(sigma_init * z, sigma_init), values and gradients."""
    G = SmallG()
    z, labels = _latents()
    sigma_init = 2.5
    expected = G(sigma_init * z, torch.full((4,), sigma_init), labels)
    expected.square().sum().backward()
    grads = [p.grad.clone() for p in G.parameters()]
    for levels in (generator_sigmas(1, sigma_init), generator_sigmas(4, sigma_init)):
        G.zero_grad()
        x_g = rollout(G, z, labels, levels, 1)
        assert torch.equal(x_g, expected)
        x_g.square().sum().backward()
        assert all(torch.equal(p.grad, g) for p, g in zip(G.parameters(), grads))
    assert torch.equal(sample(G, z, labels, [sigma_init]), one_step_sample(G, z, sigma_init, labels))


# ---- gradient through the last step only ----

@pytest.mark.parametrize("renoise", ["fresh", "fixed", "ddim"])
def test_rollout_gradient_is_that_of_one_call_on_the_detached_input(renoise):
    G = SmallG()
    z, labels = _latents()
    levels = generator_sigmas(4, 2.5)
    k_star = 3
    z.requires_grad_(True)
    x_g = rollout(G, z, labels, levels, k_star, renoise, generator=torch.Generator().manual_seed(5))
    x_g.square().sum().backward()
    assert z.grad is None  # z enters only through the steps without gradient
    assert [grad for _, grad, _ in G.calls] == [False, False, True]
    assert [c[2][0].item() for c in G.calls] == levels[:3]
    rollout_grads = [p.grad.clone() for p in G.parameters()]

    # the same k* - 1 steps by hand, then one call with gradient on their detached output
    G.zero_grad()
    g = torch.Generator().manual_seed(5)
    with torch.no_grad():
        x = levels[0] * z
        for k in range(1, k_star):
            d = G(x, torch.full((4,), levels[k - 1]), labels)
            eps = {"fresh": lambda: torch.randn(z.shape, generator=g), "fixed": lambda: z,
                   "ddim": lambda: (x - d) / levels[k - 1]}[renoise]()
            x = d + levels[k] * eps
    out = G(x.detach(), torch.full((4,), levels[k_star - 1]), labels)
    assert torch.equal(out, x_g)
    out.square().sum().backward()
    assert all(torch.equal(p.grad, r) for p, r in zip(G.parameters(), rollout_grads))


def test_rollout_runs_the_leading_steps_through_G_no_grad():
    G = SmallG()
    lead = SmallG()
    z, labels = _latents()
    rollout(G, z, labels, generator_sigmas(4, 2.5), 4, G_no_grad=lead)
    assert [c[1] for c in lead.calls] == [False, False, False]
    assert [c[1] for c in G.calls] == [True]


def test_rollout_in_no_grad_mode_builds_no_graph():
    """The fake-score step draws its mixture sample without gradient."""
    G = SmallG()
    z, labels = _latents()
    with torch.no_grad():
        x_g = rollout(G, z, labels, generator_sigmas(4, 2.5), 2)
    assert x_g.grad_fn is None and [c[1] for c in G.calls] == [False, False]


# ---- re-noising ----

def test_renoise_semantics():
    z, _ = _latents()
    levels = generator_sigmas(4, 2.5)

    def inputs(renoise, generator=None):
        G = Halve()
        rollout(G, z, None, levels, 4, renoise, generator)
        return G.inputs

    # fixed: x_k = D_{k-1} + sigma_k z with D_{k-1} = x_{k-1} / 2
    xs = inputs("fixed")
    assert torch.equal(xs[0], 2.5 * z)
    for k in range(1, 4):
        assert torch.equal(xs[k], xs[k - 1] / 2 + levels[k] * z)
    # fresh: new noise at every step, drawn from the given generator in step order
    xs = inputs("fresh", torch.Generator().manual_seed(3))
    g = torch.Generator().manual_seed(3)
    for k in range(1, 4):
        eps = torch.randn(z.shape, generator=g)
        assert torch.equal(xs[k], xs[k - 1] / 2 + levels[k] * eps)
        assert not torch.equal(eps, z)
    assert not torch.equal(xs[1], inputs("fresh", torch.Generator().manual_seed(4))[1])
    # fresh without a generator: the global generator
    torch.manual_seed(11)
    xs = inputs("fresh")
    torch.manual_seed(11)
    eps = torch.randn(z.shape)
    assert torch.equal(xs[1], xs[0] / 2 + levels[1] * eps)
    # ddim: eps_k = (x_{k-1} - D_{k-1}) / sigma_{k-1}, the deterministic step to sigma_k
    xs = inputs("ddim")
    for k in range(1, 4):
        eps = (xs[k - 1] - xs[k - 1] / 2) / levels[k - 1]
        assert torch.equal(xs[k], xs[k - 1] / 2 + levels[k] * eps)


def test_rollout_errors():
    G = SmallG()
    z, labels = _latents()
    with pytest.raises(ValueError, match=r"k_star \(3\) must be at most the number of steps \(2\)"):
        rollout(G, z, labels, [2.5, 1.0], 3)
    with pytest.raises(ValueError, match="k_star must be an integer >= 1"):
        rollout(G, z, labels, [2.5, 1.0], 0)
    with pytest.raises(ValueError, match="renoise must be one of"):
        rollout(G, z, labels, [2.5, 1.0], 1, "churn")
    with pytest.raises(TypeError, match="sigmas must be a non-empty sequence"):
        rollout(G, z, labels, torch.tensor([2.5]), 1)


# ---- k* ----

def test_k_star_is_identical_across_ranks_and_leaves_the_global_stream_alone():
    world = 4
    draws = []
    for rank in range(world):
        runtime.seed_everything(3, rank, world)  # every rank's global generators differ
        torch.randn(rank + 1)
        state = torch.get_rng_state()
        draws.append([draw_k_star(4, it, 3) for it in range(200)])
        assert torch.equal(torch.get_rng_state(), state)
    assert all(d == draws[0] for d in draws)
    assert draws[0] != [draw_k_star(4, it, 4) for it in range(200)]  # the seed matters
    assert [draw_k_star(1, it, 3) for it in range(5)] == [1] * 5


def test_k_star_is_uniform():
    n = 8000
    counts = torch.bincount(torch.tensor([draw_k_star(4, it, 0) for it in range(n)]), minlength=5)
    assert counts[0] == 0
    # each count ~ Binomial(n, 1/4): 6 standard deviations
    assert (counts[1:].double() - n / 4).abs().max() < 6 * math.sqrt(n * 0.25 * 0.75)


# ---- sampling ----

@pytest.mark.parametrize("renoise", ["fixed", "ddim"])
def test_sample_runs_all_steps_without_gradient(renoise):
    G = SmallG()
    z, labels = _latents()
    levels = generator_sigmas(4, 2.5)
    x = sample(G, z, labels, levels, renoise)
    assert [c[1] for c in G.calls] == [False] * 4
    assert x.grad_fn is None
    with torch.no_grad():
        assert torch.equal(x, rollout(G, z, labels, levels, 4, renoise))
