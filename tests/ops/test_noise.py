"""sidfast.ops.noise: the in-kernel noise (Philox) against its PyTorch reference, its statistics and seed
semantics, explicit noise against reference.add_noise, layouts, autograd, tracing, and on a GPU CUDA graphs;
the noise as the trainer and the engine use it: add_noise with a = 1 (EDM coordinates) and the public fake-score
loss regenerating eps from add_noise's seed (``sidfast.loss.fake_score_loss(seed=)``)."""
import pytest
import torch
from tracing import RecordingBackend
from utils import DEVICE, requires_cuda, rounding_bound, triton_route

import sidfast
from sidfast import reference
from sidfast.ops import backend
from sidfast.ops import noise as Nz
from sidfast.ops._layout import empty_outputs_like


SHAPES = [(3, 5), (2, 3, 7, 5), (1, 1, 1, 1), (5, 4, 3, 2, 1), (4, 3, 16, 16)]
DTYPES = [(torch.float32, 1e-6, 1e-6), (torch.float16, 1e-3, 1e-3)]
EPS_TOL = dict(atol=2e-5, rtol=1e-5)  # libdevice / fast-math / numpy / torch transcendental functions differ in ulps


def _coeffs(B, dtype=torch.float32, seed=0):
    g = torch.Generator().manual_seed(seed)
    a = (torch.rand(B, generator=g) + 0.5).to(DEVICE, dtype)
    s = (torch.rand(B, generator=g) * 2 + 0.1).to(DEVICE, dtype)
    return a, s


def _eps_of(x_t, x0, a, s):
    return (x_t.double() - reference.broadcast(a.double(), x0) * x0.double()) / reference.broadcast(s.double(), x0)


def test_reference_philox_matches_known_answer():
    """Philox4x32-10 known-answer test (Random123's kat_vectors: counter 0, key 0)."""
    c = Nz.philox4x32(torch.tensor(0), torch.tensor([0]))
    got = [int(v) for v in c]
    # Random123 philox4x32_10 with ctr = key = 0 -> 6627e8d5 e169c58d bc57ac4c 9b00dbd8
    assert got == [0x6627E8D5, 0xE169C58D, 0xBC57AC4C, 0x9B00DBD8]


@triton_route
@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("offset", [0, 7])
def test_kernel_noise_is_the_reference_stream(shape, offset):
    x0 = torch.zeros(shape, device=DEVICE)
    x_t, seed = Nz.add_noise(x0, 0.0, 1.0, offset=offset)
    assert seed.shape == (1,) and seed.dtype == torch.int64 and seed.device == x0.device
    torch.testing.assert_close(x_t, Nz.philox_normal(seed, shape, offset), **EPS_TOL)


@triton_route
@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("dtype, atol, rtol", DTYPES)
def test_explicit_noise_matches_reference(shape, dtype, atol, rtol):
    g = torch.Generator().manual_seed(1)
    x0, eps = (torch.randn(shape, generator=g).to(DEVICE, dtype) for _ in range(2))
    a, s = _coeffs(shape[0])
    x_t, seed = Nz.add_noise(x0, a, s, noise=eps)
    assert seed is None and x_t.dtype == dtype
    want = reference.add_noise(x0.double(), a.double(), s.double(), eps.double())
    torch.testing.assert_close(x_t.double(), want, atol=atol * 10, rtol=rtol * 10)


@triton_route
def test_noise_statistics():
    """Mean 0, variance 1, Gaussian 4th moment, no correlation between samples, neighbours, the four Philox
    components, or with the input."""
    B, N = 16, 2048
    x0 = torch.randn(B, N, device=DEVICE)
    x_t, _ = Nz.add_noise(x0, 1.0, 1.0)
    eps = (x_t - x0).double().cpu()
    n = eps.numel()
    z = 5.0 / n ** 0.5
    assert abs(eps.mean()) < z
    assert abs(eps.var() - 1) < 5 * (2 / n) ** 0.5
    assert abs((eps ** 4).mean() - 3) < 5 * (96 / n) ** 0.5
    corr = torch.corrcoef(eps)  # between samples
    off = corr[~torch.eye(B, dtype=torch.bool)]
    assert off.abs().max() < 5.0 / N ** 0.5
    flat = eps.flatten()
    assert abs(torch.corrcoef(torch.stack([flat[:-1], flat[1:]]))[0, 1]) < z * 1.01  # lag 1 (crosses components)
    comps = flat.reshape(-1, 4).T  # positions 4q + k for k = 0..3
    assert (torch.corrcoef(comps)[~torch.eye(4, dtype=torch.bool)].abs() < 5.0 / (n / 4) ** 0.5).all()
    assert abs(torch.corrcoef(torch.stack([flat, x0.double().cpu().flatten()]))[0, 1]) < z
    # the empirical distribution: P(eps < q) at a few quantiles of N(0, 1)
    for q, p in ((-1.6448536, 0.05), (0.0, 0.5), (1.2815516, 0.9)):
        assert abs((flat < q).double().mean() - p) < 5 * (p * (1 - p) / n) ** 0.5


@triton_route
def test_seed_semantics():
    shape = (3, 2, 5, 5)
    x0 = torch.randn(shape, device=DEVICE)
    a, s = _coeffs(3)
    x1, seed1 = Nz.add_noise(x0, a, s)
    x2, seed2 = Nz.add_noise(x0, a, s)
    assert not torch.equal(seed1, seed2) and not torch.allclose(x1, x2)  # each call draws a fresh seed
    same = torch.ops.sidfast.add_noise(x0, a, s, None, seed1, 0)
    torch.testing.assert_close(same, x1, atol=0, rtol=0)  # same seed, same noise
    shifted = torch.ops.sidfast.add_noise(x0, a, s, None, seed1, 1)
    assert not torch.allclose(shifted, x1)  # different offset, different noise
    # the offset moves along the counter space: sample 1 at offset 0 is sample 0 at offset ceil(N/4)
    z, zero, one = torch.zeros(shape, device=DEVICE), torch.zeros(3, device=DEVICE), torch.ones(3, device=DEVICE)
    e0 = torch.ops.sidfast.add_noise(z, zero, one, None, seed1, 0)
    e1 = torch.ops.sidfast.add_noise(z, zero, one, None, seed1, 50 // 4 + 1)  # ceil(N / 4) counters per sample
    torch.testing.assert_close(e1[0], e0[1], atol=0, rtol=0)
    torch.manual_seed(123)
    y1, _ = Nz.add_noise(x0, a, s)
    torch.manual_seed(123)
    y2, _ = Nz.add_noise(x0, a, s)
    torch.testing.assert_close(y1, y2, atol=0, rtol=0)  # torch.manual_seed reproduces the noise
    gen = torch.Generator(device=DEVICE).manual_seed(7)
    z1, _ = Nz.add_noise(x0, a, s, generator=gen)
    gen.manual_seed(7)
    z2, _ = Nz.add_noise(x0, a, s, generator=gen)
    torch.testing.assert_close(z1, z2, atol=0, rtol=0)


def _layouts(shape4=(3, 4, 5, 6), shape5=(2, 3, 4, 2, 5)):
    g = torch.Generator().manual_seed(3)
    x4 = torch.randn(shape4, generator=g)
    x5 = torch.randn(shape5, generator=g)
    wide = torch.randn(shape4[:-1] + (2 * shape4[-1],), generator=g)
    return [("channels_last", x4, x4.to(memory_format=torch.channels_last)),
            ("channels_last_3d", x5, x5.to(memory_format=torch.channels_last_3d)),
            ("strided", wide[..., ::2].contiguous(), wide[..., ::2]),
            ("batch_not_outer", x4, x4.transpose(0, 1).contiguous().transpose(0, 1))]


@triton_route
@pytest.mark.parametrize("name, x, x_other", _layouts(), ids=[c[0] for c in _layouts()])
def test_noise_does_not_depend_on_memory_layout(name, x, x_other):
    x, x_other = x.to(DEVICE), x_other.to(DEVICE)
    a, s = _coeffs(x.shape[0])
    seed = Nz.draw_seed(x.device)
    want = torch.ops.sidfast.add_noise(x, a, s, None, seed, 0)
    got = torch.ops.sidfast.add_noise(x_other, a, s, None, seed, 0)
    torch.testing.assert_close(got, want, atol=1e-6, rtol=1e-6)
    assert got.stride() == empty_outputs_like(x_other).stride()  # the layout the fake promises


@triton_route
@pytest.mark.parametrize("dtype, atol, rtol", DTYPES)
@pytest.mark.parametrize("explicit", [False, True])
def test_backward_is_a_times_grad(dtype, atol, rtol, explicit):
    x0 = torch.randn(4, 3, 5, 2, device=DEVICE, dtype=dtype).to(memory_format=torch.channels_last).requires_grad_()
    a, s = _coeffs(4)
    noise = torch.randn_like(x0).detach() if explicit else None
    x_t, _ = Nz.add_noise(x0, a, s, noise=noise)
    g = torch.randn(4, 3, 5, 2, device=DEVICE, dtype=dtype).transpose(1, 3).contiguous().transpose(1, 3)
    (grad,) = torch.autograd.grad(x_t, [x0], g)
    assert grad.dtype == dtype
    torch.testing.assert_close(grad.double(), g.double() * a.double()[:, None, None, None], atol=atol, rtol=rtol)


def test_validation_errors():
    x0 = torch.randn(3, 4, device=DEVICE)
    with pytest.raises(ValueError, match="a must have one entry per sample"):
        Nz.add_noise(x0, torch.ones(2, device=DEVICE), 1.0)
    with pytest.raises(TypeError, match="s must be floating point"):
        Nz.add_noise(x0, 1.0, torch.ones(3, dtype=torch.int64, device=DEVICE))
    with pytest.raises(ValueError, match="noise must match x0"):
        Nz.add_noise(x0, 1.0, 1.0, noise=torch.randn(3, 5, device=DEVICE))
    with pytest.raises(ValueError, match="differentiates with respect to x0 only"):
        Nz.add_noise(x0, torch.ones(3, device=DEVICE, requires_grad=True), 1.0)
    with pytest.raises(ValueError, match="offset must be a non-negative int"):
        Nz.add_noise(x0, 1.0, 1.0, offset=-1)
    with pytest.raises(ValueError, match="exceeds the 2"):
        Nz.add_noise(x0, 1.0, 1.0, offset=2 ** 31 - 2)
    with pytest.raises(TypeError, match="x0 must be a floating-point"):
        Nz.add_noise(torch.ones(3, 4, dtype=torch.int64), 1.0, 1.0)


@triton_route
def test_non_triton_route_gives_the_same_noise(monkeypatch):
    x0 = torch.randn(3, 2, 6, device=DEVICE, dtype=torch.float16)
    a, s = _coeffs(3)
    torch.manual_seed(5)
    fused, seed = Nz.add_noise(x0, a, s, offset=2)
    monkeypatch.setattr(backend, "use_triton", lambda t: False)
    torch.manual_seed(5)
    plain, seed2 = Nz.add_noise(x0, a, s, offset=2)
    assert torch.equal(seed, seed2) and plain.dtype == fused.dtype
    torch.testing.assert_close(plain, fused, atol=2e-3, rtol=1e-3)


@triton_route
def test_opcheck():
    x0 = torch.randn(3, 2, 4, device=DEVICE, requires_grad=True)
    a, s = _coeffs(3)
    torch.library.opcheck(torch.ops.sidfast.add_noise.default, (x0, a, s, torch.randn(3, 2, 4, device=DEVICE), None, 0))
    torch.library.opcheck(torch.ops.sidfast.add_noise.default, (x0, a, s, None, Nz.draw_seed(x0.device), 3))


@triton_route
def test_compile_fullgraph():
    x0 = torch.randn(3, 2, 4, 4, device=DEVICE, requires_grad=True)
    a, s = _coeffs(3)

    def step(x):
        x_t, seed = Nz.add_noise(x, a, s)
        return (x_t * x_t).sum(), seed

    backend_name = "inductor" if DEVICE == "cuda" else RecordingBackend()  # inductor on CPU: slow
    compiled = torch.compile(step, fullgraph=True, backend=backend_name)
    loss, seed = compiled(x0)
    (grad,) = torch.autograd.grad(loss, [x0])
    eps = Nz.philox_normal(seed, x0.shape)
    x_t = reference.add_noise(x0.detach(), a, s, eps)
    torch.testing.assert_close(loss, (x_t * x_t).sum(), atol=1e-4, rtol=1e-5)
    torch.testing.assert_close(grad, 2 * x_t * a[:, None, None, None], atol=1e-4, rtol=1e-5)
    if isinstance(backend_name, RecordingBackend):  # traced through the custom op, not into raw launches
        assert backend_name.calls("torch.ops.sidfast.add_noise")


@triton_route
def test_kernels_compile_for_sm90_without_spills(sm90_compile_report):
    report = sm90_compile_report("noise")
    bad = [r for r in report if r["spill_bytes"] > 0 or r["registers"] > 255]
    assert report and not bad, bad


# ---- GPU only ----------------------------------------------------------------------------------

@requires_cuda
@pytest.mark.parametrize("shape, dtype", [((256, 4, 128, 128), torch.bfloat16), ((512, 3, 64, 64), torch.float32),
                                          ((16, 4, 64, 64), torch.bfloat16)])
def test_gpu_large_against_reference(shape, dtype):
    x0 = torch.randn(shape, device="cuda", dtype=dtype)
    a, s = _coeffs(shape[0])
    x_t, seed = Nz.add_noise(x0, a, s)
    eps = Nz.philox_normal(seed, shape)
    want = reference.add_noise(x0.double(), a.double(), s.double(), eps.double())
    tol = 1e-2 if dtype == torch.bfloat16 else 1e-5
    torch.testing.assert_close(x_t.double(), want, atol=tol * 3, rtol=tol)
    e = eps.double()
    assert abs(e.mean()) < 5 / e.numel() ** 0.5 and abs(e.var() - 1) < 1e-2


@requires_cuda
def test_gpu_cuda_graph_replay_draws_new_noise():
    x0 = torch.randn(8, 3, 32, 32, device="cuda")
    a, s = _coeffs(8)
    s_ = torch.cuda.Stream()
    s_.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(s_):
        for _ in range(2):
            Nz.add_noise(x0, a, s)
    torch.cuda.current_stream().wait_stream(s_)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        x_t, seed = Nz.add_noise(x0, a, s)
    draws = []
    for _ in range(3):
        graph.replay()
        torch.cuda.synchronize()
        draws.append((x_t.clone(), seed.clone()))
        eps = Nz.philox_normal(seed, x0.shape)  # regenerable from the replay's seed
        torch.testing.assert_close(x_t, reference.add_noise(x0, a, s, eps), **EPS_TOL)
    assert len({int(sd) for _, sd in draws}) == 3
    assert not torch.allclose(draws[0][0], draws[1][0])


# ---- as the trainer and the engine use it (a = 1, the fake-score loss's seed) ----

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
