"""sidfast::fake_score_loss (fused noising + weighting + loss + gradient) against reference.fake_score_loss in
float64, for every prediction, weighting and reduction; eps regenerated from add_noise's seed; routing."""
import itertools

import pytest
import torch
from tracing import RecordingBackend
from utils import DEVICE, requires_cuda, triton_route

import sidfast
from sidfast import reference
from sidfast.ops import fake_score_loss as F
from sidfast.ops import noise as Nz
from sidfast.schedules import EDMSchedule, FlowSchedule, VPSchedule

pytestmark = triton_route

PREDICTIONS = list(F.PREDICTION_CODES)
DTYPES = [(torch.float32, 2e-5, 2e-5), (torch.float16, 2e-3, 2e-3)]


def _schedule(name, B, seed=0):
    """(a, s) of a schedule at random times, float32 on DEVICE."""
    g = torch.Generator().manual_seed(seed)
    u = torch.rand(B, generator=g, dtype=torch.float64)
    if name == "edm":
        a, s = EDMSchedule().coefficients(torch.exp(torch.randn(B, generator=g, dtype=torch.float64) * 1.2 - 1.2))
    elif name == "vp":
        a, s = VPSchedule.linear().coefficients(u * 998 + 1)
    else:
        a, s = FlowSchedule().coefficients(u * 0.9 + 0.05)
    return a.to(DEVICE, torch.float32), s.to(DEVICE, torch.float32)


def _data(shape, dtype, seed=1):
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(shape, generator=g, dtype=torch.float64).to(DEVICE, dtype) for _ in range(3)]


def _reference(pred, x0, eps, a, s, prediction, weighting, reduction, g=None):
    p = pred.detach().double().requires_grad_()
    loss = reference.fake_score_loss(p, x0.double(), eps.double(), a.double(), s.double(), prediction, weighting,
                                     reduction=reduction)
    if g is None:
        g = torch.randn_like(loss) if reduction == "none" else torch.tensor(0.7, dtype=torch.float64,
                                                                            device=loss.device)
    g = torch.as_tensor(g, dtype=torch.float64, device=loss.device).expand_as(loss)
    return loss, torch.autograd.grad(loss, [p], g)[0], g


def _fused(pred, x0, noise, a, s, prediction, weighting, reduction, g, **kw):
    p = pred.detach().clone().requires_grad_()
    loss = F.fake_score_loss(p, x0, noise, a, s, prediction, weighting, reduction=reduction, **kw)
    return loss, torch.autograd.grad(loss, [p], g.to(loss.dtype).contiguous())[0]


def _close(got, want, atol, rtol):
    """Compare relative to the scale of the result (weights like min-SNR/edm span orders of magnitude)."""
    scale = want.abs().max().clamp(min=1.0)
    torch.testing.assert_close(got.double() / scale, want / scale, atol=atol, rtol=rtol)


@pytest.mark.parametrize("prediction, weighting", list(itertools.product(PREDICTIONS, reference.WEIGHTINGS)))
@pytest.mark.parametrize("reduction", reference.REDUCTIONS)
@pytest.mark.parametrize("schedule", ["edm", "vp", "flow"])
def test_every_prediction_weighting_reduction(prediction, weighting, reduction, schedule):
    pred, x0, eps = _data((3, 2, 3, 5), torch.float32)
    a, s = _schedule(schedule, 3)
    want, want_grad, g = _reference(pred, x0, eps, a, s, prediction, weighting, reduction)
    got, grad = _fused(pred, x0, eps, a, s, prediction, weighting, reduction, g)
    assert got.dtype == torch.float32 and got.shape == want.shape and grad.dtype == torch.float32
    _close(got, want, 1e-5, 1e-5)
    _close(grad, want_grad, 1e-5, 1e-5)


@pytest.mark.parametrize("shape", [(3, 5), (2, 3, 7, 5), (1, 1, 1, 1), (5, 4, 3, 2, 1)])
@pytest.mark.parametrize("dtype, atol, rtol", DTYPES)
@pytest.mark.parametrize("prediction, weighting", [("x0", "edm"), ("eps", "eps"), ("v", "min_snr_v"),
                                                   ("flow", "flow"), ("eps", "min_snr_eps")])
def test_shapes_and_dtypes(shape, dtype, atol, rtol, prediction, weighting):
    pred, x0, eps = _data(shape, dtype, seed=2)
    a, s = _schedule("vp", shape[0], seed=2)
    want, want_grad, g = _reference(pred, x0, eps, a, s, prediction, weighting, "batchmean")
    got, grad = _fused(pred, x0, eps, a, s, prediction, weighting, "batchmean", g)
    assert grad.dtype == dtype
    _close(got, want, 1e-5, 1e-5)  # float32 arithmetic on the (rounded) inputs
    _close(grad, want_grad, atol, rtol)


@pytest.mark.parametrize("prediction, weighting", [("x0", "edm"), ("eps", "eps"), ("v", "v"), ("flow", "edm")])
@pytest.mark.parametrize("layout", ["contiguous", "channels_last", "strided"])
def test_seed_regenerates_the_noise_of_add_noise(prediction, weighting, layout):
    """x_t from add_noise, then the loss with seed=: equals the loss with the regenerated eps made explicit."""
    x0, pred, _ = _data((3, 4, 5, 6), torch.float32, seed=3)
    if layout == "channels_last":
        x0, pred = (t.to(memory_format=torch.channels_last) for t in (x0, pred))
    elif layout == "strided":
        x0 = torch.cat([x0, x0], -1)[..., ::2]
    a, s = _schedule("flow", 3, seed=3)
    x_t, seed = Nz.add_noise(x0, a, s, offset=5)
    eps = Nz.philox_normal(seed, x0.shape, 5)
    torch.testing.assert_close(x_t, reference.add_noise(x0, a, s, eps), atol=1e-5, rtol=1e-5)
    want, want_grad, g = _reference(pred, x0, eps, a, s, prediction, weighting, "sum")
    got, grad = _fused(pred, x0, None, a, s, prediction, weighting, "sum", g, seed=seed, offset=5)
    _close(got, want, 2e-5, 2e-5)
    _close(grad, want_grad, 2e-5, 2e-5)


def test_outputs_follow_the_fake_and_the_inputs_layout():
    pred, x0, eps = (t.to(memory_format=torch.channels_last) for t in _data((2, 3, 4, 5), torch.float32, seed=4))
    a, s = _schedule("edm", 2)
    args = (pred, x0, eps, None, 0, a, s, 0, 0, 0.5, 5.0, 0)
    loss, grad = torch.ops.sidfast.fake_score_loss(*args)
    fl, fg = F.fake_score_loss_fake(*args)
    assert loss.stride() == fl.stride() and grad.stride() == fg.stride() == pred.stride()


def test_other_inputs_needing_gradients_use_the_reference():
    pred, x0, eps = _data((3, 2, 4), torch.float32, seed=5)
    a, s = _schedule("vp", 3)
    x0.requires_grad_()
    loss = F.fake_score_loss(pred.requires_grad_(), x0, eps, a, s, "eps", "v")
    gp, gx = torch.autograd.grad(loss, [pred, x0])
    want = reference.fake_score_loss(pred, x0, eps, a, s, "eps", "v")
    wp, wx = torch.autograd.grad(want, [pred, x0])
    torch.testing.assert_close(loss, want)
    torch.testing.assert_close(gp, wp)
    torch.testing.assert_close(gx, wx)


@pytest.mark.parametrize("layout", ["contiguous", "channels_last"])
def test_reference_route_regenerates_the_kernels_noise_bit_for_bit(layout):
    """The fallback taken when x0, a or s need gradients sees exactly the eps of add_noise's kernel (the compiled
    kernels' approximate sin/cos included), not the accurate PyTorch stream."""
    x0 = torch.randn(3, 4, 6, 4, device=DEVICE)
    if layout == "channels_last":
        x0 = x0.contiguous(memory_format=torch.channels_last)
    x_t, seed = Nz.add_noise(x0, 1.0, 1.0, offset=5)  # x_t = x0 + eps, one float32 rounding
    eps = Nz.regenerate_noise(seed, x0.shape, offset=5)
    assert eps.dtype == torch.float32 and torch.equal(x_t, x0 + eps)
    pred = torch.randn_like(x0)
    a, s = _schedule("vp", 3)
    x0_grad = x0.clone().requires_grad_()  # forces the reference route
    loss = F.fake_score_loss(pred, x0_grad, None, a, s, "eps", "eps", seed=seed, offset=5)
    assert torch.equal(loss, reference.fake_score_loss(pred, x0, eps, a, s, "eps", "eps"))


def test_nan_propagates_like_the_reference():
    pred, x0, eps = _data((3, 2, 4), torch.float32, seed=6)
    pred[1, 0, 2] = float("nan")
    a, s = _schedule("edm", 3)
    loss = F.fake_score_loss(pred, x0, eps, a, s, "x0", "edm", reduction="none")
    want = reference.fake_score_loss(pred, x0, eps, a, s, "x0", "edm", reduction="none")
    torch.testing.assert_close(loss, want, equal_nan=True)
    assert torch.isnan(F.fake_score_loss(pred, x0, eps, a, s, "x0", "edm"))


def test_public_loss_dispatch_and_validation(monkeypatch):
    pred, x0, eps = _data((3, 2, 4), torch.float32, seed=7)
    a, s = _schedule("vp", 3)
    calls = []
    impl = F.fake_score_loss_triton_impl
    monkeypatch.setattr(F, "fake_score_loss_triton_impl", lambda *args: calls.append(1) or impl(*args))
    loss = sidfast.fake_score_loss(pred, x0, eps, a, s, prediction="v_prediction", weighting="min_snr_v")
    assert calls == [1]
    torch.testing.assert_close(loss, reference.fake_score_loss(pred, x0, eps, a, s, "v", "min_snr_v"))
    loss_num = sidfast.fake_score_loss(pred, x0, eps, 1.0, 0.5)  # numbers for a, s (EDM)
    torch.testing.assert_close(loss_num, reference.fake_score_loss(pred, x0, eps, torch.ones(3, device=DEVICE),
                                                                   torch.full((3,), 0.5, device=DEVICE)))
    with pytest.raises(ValueError, match="give exactly one of noise"):
        F.fake_score_loss(pred, x0, None, a, s)
    with pytest.raises(ValueError, match="weighting must be one of"):
        sidfast.fake_score_loss(pred, x0, eps, a, s, weighting="snr")
    with pytest.raises(ValueError, match="a must have one entry per sample"):
        sidfast.fake_score_loss(pred, x0, eps, a[:2], s)


def test_strided_coefficients():
    pred, x0, eps = _data((3, 2, 4), torch.float32, seed=8)
    a6, s6 = _schedule("flow", 6)
    a, s = a6[::2], s6[::2]
    loss = F.fake_score_loss(pred, x0, eps, a, s, "flow", "flow")
    torch.testing.assert_close(loss, reference.fake_score_loss(pred, x0, eps, a, s, "flow", "flow"))


@pytest.mark.parametrize("first_scale", [1.0, 2.0])
def test_backward_retain_graph(first_scale):
    """First backward scales in place (or not at all for grad_output 1), a second one out of place."""
    pred, x0, eps = _data((3, 2, 4), torch.float32, seed=9)
    a, s = _schedule("edm", 3)
    pred.requires_grad_()
    loss = F.fake_score_loss(pred, x0, eps, a, s, "x0", "edm", reduction="sum")
    (loss if first_scale == 1.0 else first_scale * loss).backward(retain_graph=True)
    first = pred.grad.clone()
    loss.backward()
    want = torch.autograd.grad(reference.fake_score_loss(pred, x0, eps, a, s, "x0", "edm", reduction="sum"), [pred])[0]
    torch.testing.assert_close(first, first_scale * want)
    torch.testing.assert_close(pred.grad, (first_scale + 1) * want)


def test_opcheck():
    pred, x0, eps = _data((3, 2, 4), torch.float32, seed=10)
    a, s = _schedule("vp", 3)
    pred.requires_grad_()
    for args in ((pred, x0, eps, None, 0, a, s, 2, 6, 0.5, 5.0, 2),
                 (pred, x0, None, Nz.draw_seed(pred.device), 4, a, s, 1, 0, 0.5, 5.0, 0)):
        torch.library.opcheck(torch.ops.sidfast.fake_score_loss.default, args)


def test_compile_fullgraph_with_add_noise():
    x0, pred, _ = _data((3, 2, 4, 4), torch.float32, seed=11)
    a, s = _schedule("edm", 3)
    pred.requires_grad_()

    def step(p):
        x_t, seed = Nz.add_noise(x0, a, s)
        return F.fake_score_loss(p + 0 * x_t, x0, None, a, s, "x0", "edm", seed=seed), seed

    backend_name = "inductor" if DEVICE == "cuda" else RecordingBackend()  # inductor on CPU: slow
    loss, seed = torch.compile(step, fullgraph=True, backend=backend_name)(pred)
    (grad,) = torch.autograd.grad(loss, [pred])
    eps = Nz.philox_normal(seed, x0.shape)
    want, want_grad, _ = _reference(pred, x0, eps, a, s, "x0", "edm", "batchmean", g=1.0)
    _close(loss, want, 1e-5, 1e-5)
    _close(grad, want_grad, 1e-5, 1e-5)
    if isinstance(backend_name, RecordingBackend):  # traced through the custom ops, not into raw launches
        assert backend_name.calls("torch.ops.sidfast.fake_score_loss") and backend_name.calls("torch.ops.sidfast.add_noise")


def test_kernels_compile_for_sm90_without_spills(sm90_compile_report):
    report = sm90_compile_report("fake_score_loss")
    bad = [r for r in report if r["spill_bytes"] > 0 or r["registers"] > 255]
    assert report and not bad, bad


# ---- GPU only ----------------------------------------------------------------------------------

@requires_cuda
@pytest.mark.parametrize("shape, dtype", [((256, 4, 128, 128), torch.bfloat16), ((64, 3, 32, 32), torch.float32)])
@pytest.mark.parametrize("prediction, weighting", [("x0", "edm"), ("eps", "min_snr_eps"), ("v", "v")])
def test_gpu_large_seed_mode_against_float64(shape, dtype, prediction, weighting):
    x0, pred, _ = _data(shape, dtype, seed=12)
    a, s = _schedule("vp", shape[0])
    _, seed = Nz.add_noise(x0, a, s)
    eps = Nz.philox_normal(seed, shape)
    want, want_grad, g = _reference(pred, x0, eps, a, s, prediction, weighting, "batchmean")
    got, grad = _fused(pred, x0, None, a, s, prediction, weighting, "batchmean", g, seed=seed)
    _close(got, want, 1e-4, 1e-4)
    _close(grad, want_grad, 1e-2 if dtype == torch.bfloat16 else 1e-5, 1e-2 if dtype == torch.bfloat16 else 1e-5)


@requires_cuda
def test_gpu_cuda_graph_fake_score_step():
    x0 = torch.randn(8, 3, 16, 16, device="cuda")
    pred = torch.randn(8, 3, 16, 16, device="cuda", requires_grad=True)
    a, s = _schedule("edm", 8)

    def step():
        x_t, seed = Nz.add_noise(x0, a, s)
        loss = F.fake_score_loss(pred, x0, None, a, s, "x0", "edm", seed=seed)
        return loss, torch.autograd.grad(loss, [pred])[0], seed

    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        for _ in range(2):
            step()
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        loss, grad, seed = step()
    seen = set()
    for _ in range(2):
        graph.replay()
        torch.cuda.synchronize()
        seen.add(int(seed))
        want, want_grad, _ = _reference(pred, x0, Nz.philox_normal(seed, x0.shape), a, s, "x0", "edm", "batchmean",
                                        g=1.0)
        _close(loss, want, 1e-5, 1e-5)
        _close(grad, want_grad, 1e-5, 1e-5)
    assert len(seen) == 2
