"""sidfast.samplers against exact Gaussian denoisers, whose probability-flow ODE has a closed-form solution.

For x0 ~ N(mu, diag(v)) noised as x = x0 + sigma eps, the exact denoiser is
D(x; sigma) = mu + v / (v + sigma^2) (x - mu), and the ODE dx/dsigma = (x - D)/sigma carries x from sigma_a
to sigma_b as x_b - mu = sqrt((v + sigma_b^2) / (v + sigma_a^2)) (x_a - mu)
(each coordinate's marginal stays Gaussian with variance v + sigma^2 along the flow).
"""
import math

import pytest
import torch
from torch import nn

from sidfast import reference
from sidfast.samplers import edm_sample, num_evaluations, one_step_sample, sample_images
from utils import requires_cuda


class DiagonalGaussianDenoiser(nn.Module):
    """Exact D(x; sigma) for x0 ~ N(mu, diag(var)); counts its calls; records the sigmas it saw."""

    def __init__(self, mu: torch.Tensor, var: torch.Tensor):
        super().__init__()
        self.register_buffer("mu", mu)
        self.register_buffer("var", var)
        self.dummy = nn.Parameter(torch.zeros((), dtype=mu.dtype))  # gives the sampler a dtype to read
        self.calls, self.sigmas = 0, []

    def forward(self, x, sigma, class_labels=None):
        self.calls += 1
        s = sigma.view(-1, *[1] * (x.dim() - 1)).to(x.dtype)
        self.sigmas.append(sigma)
        return self.mu + self.var / (self.var + s ** 2) * (x - self.mu)


def exact_flow(x_a, mu, var, sigma_a, sigma_b):
    return mu + torch.sqrt((var + sigma_b ** 2) / (var + sigma_a ** 2)) * (x_a - mu)


def make(shape=(3, 4), dtype=torch.float64, seed=0):
    g = torch.Generator().manual_seed(seed)
    mu = torch.randn(shape, generator=g, dtype=dtype)
    var = torch.rand(shape, generator=g, dtype=dtype) * 0.8 + 0.05
    return DiagonalGaussianDenoiser(mu, var)


def _exact_endpoint(net, z, num_steps):
    """What the sampler should return: the exact flow from sigma_0 = 80 to sigma_min, then the final Euler
    step to 0, which for a Gaussian lands exactly on D(x; sigma_min)."""
    sigma_last = float(reference.edm_sigma_steps(num_steps)[-2])
    x_min = exact_flow(80.0 * z, net.mu, net.var, 80.0, sigma_last)
    return net.mu + net.var / (net.var + sigma_last ** 2) * (x_min - net.mu)


def _error(net, z, num_steps, method):
    return float((edm_sample(net, z, num_steps, method=method) - _exact_endpoint(net, z, num_steps)).abs().mean())


# mean |error| relative to mean |x - mu|, measured 0.051 (18 steps) and 0.0027 (72 steps) for this Gaussian
@pytest.mark.parametrize("num_steps,rtol", [(18, 0.08), (72, 0.005)])
def test_heun_follows_the_exact_flow_map(num_steps, rtol):
    net = make()
    z = torch.randn(256, 3, 4, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    scale = float((_exact_endpoint(net, z, num_steps) - net.mu).abs().mean())
    assert _error(net, z, num_steps, "heun") / scale < rtol


@pytest.mark.parametrize("method,order", [("heun", 2), ("euler", 1)])
def test_convergence_order(method, order):
    """Doubling the steps divides the error by about 2^order (Heun second order, Euler first order)."""
    net = make(seed=3)
    z = torch.randn(128, 3, 4, generator=torch.Generator().manual_seed(2), dtype=torch.float64)
    errors = [_error(net, z, n, method) for n in (36, 72, 144)]
    for coarse, fine in zip(errors, errors[1:]):
        assert 2 ** order * 0.8 < coarse / fine < 2 ** order * 1.25


def test_heun_is_more_accurate_than_euler():
    net = make(seed=3)
    z = torch.randn(128, 3, 4, generator=torch.Generator().manual_seed(2), dtype=torch.float64)
    assert _error(net, z, 18, "heun") < _error(net, z, 18, "euler") / 2


def test_heun_reproduces_the_target_mean_and_variance():
    net = make(shape=(8,), dtype=torch.float64, seed=5)
    z = torch.randn(20000, 8, generator=torch.Generator().manual_seed(4), dtype=torch.float64)
    out = edm_sample(net, z, 40)
    # sampling error of the moments at n = 20000: ~0.7% of the std for the mean, ~1% relative for the variance;
    # discretization: at 18 steps the variances come out 8-13% high for this Gaussian, at 40 steps about 2%
    assert torch.allclose(out.mean(0), net.mu, atol=0.03 * float(net.var.sqrt().max()))
    assert torch.allclose(out.var(0), net.var, rtol=0.05)


@pytest.mark.parametrize("method", ["heun", "euler"])
@pytest.mark.parametrize("num_steps", [1, 2, 18])
def test_number_of_evaluations_and_sigmas(method, num_steps):
    net = make()
    out = edm_sample(net, torch.randn(5, 3, 4, dtype=torch.float64), num_steps, sigma_max=10.0, method=method)
    assert out.shape == (5, 3, 4) and out.dtype == torch.float64
    assert net.calls == num_evaluations(num_steps, method)
    assert all(s.shape == (5,) for s in net.sigmas)
    assert float(net.sigmas[0][0]) == pytest.approx(10.0)
    assert all(float(s.min()) > 0 for s in net.sigmas)


def test_network_dtype_and_input_dtype():
    net = make(dtype=torch.float32)
    z = torch.randn(4, 3, 4, dtype=torch.float16)
    out = edm_sample(net, z, 3)
    assert out.dtype == torch.float16  # returned in the noise's dtype; the state is integrated in float64


def test_class_labels_are_passed_through():
    seen = []

    class Net(nn.Module):
        def forward(self, x, sigma, class_labels=None):
            seen.append(class_labels)
            return torch.zeros_like(x)

    labels = torch.eye(3)[[0, 1, 2, 0]]
    edm_sample(Net(), torch.randn(4, 2), 2, class_labels=labels)
    one_step_sample(Net(), torch.randn(4, 2), 2.5, class_labels=labels)
    assert len(seen) == num_evaluations(2) + 1 and all(s is labels for s in seen)


def test_one_step_sample_is_g_of_sigma_init_z():
    net = make(dtype=torch.float32)
    z = torch.randn(6, 3, 4)
    out = one_step_sample(net, z, 2.5)
    expected = net.mu + net.var / (net.var + 2.5 ** 2) * (2.5 * z - net.mu)
    torch.testing.assert_close(out, expected)
    assert float(net.sigmas[0][0]) == 2.5 and net.calls == 1


@pytest.mark.parametrize("kwargs,err,match", [
    ({"num_steps": 0}, ValueError, "num_steps"),
    ({"num_steps": 2.5}, ValueError, "num_steps"),
    ({"sigma_min": 0.0}, ValueError, "sigma_min"),
    ({"sigma_min": 90.0}, ValueError, "sigma_min"),
    ({"method": "rk4"}, ValueError, "method"),
])
def test_bad_arguments(kwargs, err, match):
    with pytest.raises(err, match=match):
        edm_sample(make(), torch.randn(2, 3, 4, dtype=torch.float64), **kwargs)


def test_bad_noise():
    with pytest.raises(TypeError, match="noise"):
        edm_sample(make(), torch.zeros(2, 3, dtype=torch.int64))
    with pytest.raises(ValueError, match="noise"):
        edm_sample(make(), torch.zeros(5))
    with pytest.raises(ValueError, match="sigma_init"):
        one_step_sample(make(), torch.zeros(2, 3, 4), 0.0)


class LabelRecorder(nn.Module):
    """A conditional Gaussian denoiser (make()'s) that records the class labels of every call."""

    def __init__(self):
        super().__init__()
        self.gaussian = make(dtype=torch.float32)
        self.labels = []

    def forward(self, x, sigma, class_labels=None):
        self.labels.append(class_labels)
        return self.gaussian(x, sigma)


def _seeded_latents(seed, sizes, shape):
    g = torch.Generator().manual_seed(seed)
    return [torch.randn((n, *shape), generator=g) for n in sizes]


def test_sample_images_one_step_in_batches_with_cycling_one_hot_labels():
    net = LabelRecorder()
    out = sample_images(net, 5, (3, 4), sigma_init=2.5, num_classes=3, seed=7, batch=2)
    zs = _seeded_latents(7, (2, 2, 1), (3, 4))  # one generator, drawn batch after batch
    want = torch.cat([one_step_sample(net.gaussian, z, 2.5) for z in zs])
    assert torch.equal(out, want) and out.device.type == "cpu"
    assert torch.equal(torch.cat(net.labels), torch.eye(3)[[0, 1, 2, 0, 1]])


def test_sample_images_heun_with_one_index_label():
    net = LabelRecorder()
    out = sample_images(net, 3, (3, 4), steps=4, num_classes=10, label_format="index", class_label=7, seed=1)
    (z,) = _seeded_latents(1, (3,), (3, 4))
    assert torch.equal(out, edm_sample(net.gaussian, z, 4))
    assert len(net.labels) == num_evaluations(4)
    assert all(torch.equal(y, torch.full((3,), 7)) for y in net.labels)
    assert sample_images(net, 2, (3, 4), steps=2).shape == (2, 3, 4)  # unconditional: no labels


@pytest.mark.parametrize("kwargs,match", [
    ({"num": 0}, "argument num"), ({"steps": 0}, "argument steps"), ({"batch": 0}, "argument batch"),
    ({"num_classes": 10, "class_label": 10}, "argument class_label must be in"),
    ({"class_label": 0}, "unconditional"), ({"num_classes": 3, "label_format": "text"}, "label_format"),
])
def test_sample_images_bad_arguments(kwargs, match):
    with pytest.raises(ValueError, match=match):
        sample_images(make(dtype=torch.float32), **{"num": 2, "shape": (3, 4), **kwargs})


@requires_cuda
def test_sampler_on_cuda_matches_cpu():
    net = make(dtype=torch.float32)
    z = torch.randn(64, 3, 4)
    cpu = edm_sample(net, z, 18)
    gpu = edm_sample(net.cuda(), z.cuda(), 18)
    torch.testing.assert_close(gpu.cpu(), cpu, atol=1e-4, rtol=1e-4)
    assert math.isfinite(float(gpu.abs().max()))
