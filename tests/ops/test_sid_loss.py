"""sidfast::sid_loss_triton (Triton kernels; CPU under TRITON_INTERPRET=1, see conftest.py) against the
plain-PyTorch reference in float64, the native op and the published arithmetic."""
import pytest
import torch
from published import published_batchmean
from tracing import RecordingBackend
from utils import DEVICE, requires_cuda, triton_route

import sidfast
from sidfast import reference
from sidfast.ops import backend
from sidfast.ops import sid_loss as S
from sidfast.ops import _native

_native.load()  # torch.ops.sidfast.sid_loss, called directly below

pytestmark = triton_route

SHAPES = [(3, 5), (2, 3, 7, 5), (1, 1, 1, 1), (5, 4, 3, 2, 1), (4, 3, 8, 8)]
# (dtype, atol, rtol) of gradients against float64; losses are float32 and compared with LOSS_TOL
DTYPES = [(torch.float32, 2e-5, 2e-5), (torch.float16, 2e-3, 2e-3)]
LOSS_TOL = dict(atol=1e-4, rtol=1e-5)
# plans forced with tiny blocks so that loops, persistence and chunking run on small tensors
PLANS = {"default": None, "tile": None, "loop": dict(kind="loop", BLOCK=16, PROGRAMS=2),
         "split": dict(kind="split", BLOCK=16)}


def _inputs(shape, dtype, seed=0):
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(shape, generator=g, dtype=torch.float64).to(DEVICE, dtype) for _ in range(3)]


def _reference(y_real, y_fake, x_g, alpha, normalize, reduction, g=None):
    """Loss and gradients of the readable reference in float64, for grad_output g (random if None)."""
    ins = [t.detach().double().requires_grad_() for t in (y_real, y_fake, x_g)]
    fn = reference.sid_generator_loss if normalize else reference.sid_generator_loss_eps
    loss = fn(*ins, alpha, reduction)
    if g is None:
        g = torch.randn_like(loss) if reduction == "none" else torch.tensor(1.7, dtype=torch.float64,
                                                                            device=loss.device)
    g = torch.as_tensor(g, dtype=torch.float64, device=loss.device).expand_as(loss)
    return loss, torch.autograd.grad(loss, ins, g), g


def _fused(y_real, y_fake, x_g, alpha, normalize, reduction, g):
    ins = [t.detach().clone().requires_grad_() for t in (y_real, y_fake, x_g)]
    loss = S.sid_loss(*ins, alpha, normalize, reduction)
    return loss, torch.autograd.grad(loss, ins, g.to(loss.dtype).contiguous())


@pytest.fixture(params=list(PLANS))
def plan(request, monkeypatch):
    if request.param == "tile":
        monkeypatch.setattr(S, "TILE_ELEMS", 16)  # one sample per program
    elif PLANS[request.param] is not None:
        monkeypatch.setattr(S, "PLAN_OVERRIDE", PLANS[request.param])
    return request.param


@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("dtype, atol, rtol", DTYPES)
@pytest.mark.parametrize("reduction", sidfast.reference.REDUCTIONS)
@pytest.mark.parametrize("normalize", [True, False])
def test_matches_reference_forward_and_gradients(shape, dtype, atol, rtol, reduction, normalize):
    y_real, y_fake, x_g = _inputs(shape, dtype)
    ref_loss, ref_grads, g = _reference(y_real, y_fake, x_g, 1.2, normalize, reduction)
    loss, grads = _fused(y_real, y_fake, x_g, 1.2, normalize, reduction, g)
    assert loss.dtype == torch.float32 and loss.shape == ref_loss.shape
    torch.testing.assert_close(loss.double(), ref_loss, **LOSS_TOL)
    for got, want, t in zip(grads, ref_grads, (y_real, y_fake, x_g)):
        assert got.dtype == dtype and got.shape == t.shape
        torch.testing.assert_close(got.double(), want, atol=atol, rtol=rtol)


@pytest.mark.parametrize("shape", [(3, 70), (5, 3, 7, 5), (2, 1)])
@pytest.mark.parametrize("reduction", sidfast.reference.REDUCTIONS)
@pytest.mark.parametrize("normalize", [True, False])
def test_every_plan_matches_reference(plan, shape, reduction, normalize):
    y_real, y_fake, x_g = _inputs(shape, torch.float32, seed=1)
    ref_loss, ref_grads, g = _reference(y_real, y_fake, x_g, 0.8, normalize, reduction)
    loss, grads = _fused(y_real, y_fake, x_g, 0.8, normalize, reduction, g)
    torch.testing.assert_close(loss.double(), ref_loss, **LOSS_TOL)
    for got, want in zip(grads, ref_grads):
        torch.testing.assert_close(got.double(), want, atol=2e-5, rtol=2e-5)


@pytest.mark.parametrize("normalize", [True, False])
@pytest.mark.parametrize("reduction", sidfast.reference.REDUCTIONS)
def test_nan_samples_are_dropped(plan, normalize, reduction):
    """A NaN in any input drops its sample (zero loss rows and gradients); batchmean divides by the full B.
    The y_fake NaN is the one the loop plan only meets in its second pass (device-side fix-up)."""
    y_real, y_fake, x_g = _inputs((6, 3, 5, 5), torch.float32, seed=2)
    y_real[0, 1, 2, 2] = float("nan")
    y_fake[2, 0, 4, 4] = float("nan")
    x_g[3, 2, 0, 0] = float("nan")
    ref_loss, ref_grads, g = _reference(y_real, y_fake, x_g, 1.2, normalize, reduction)
    loss, grads = _fused(y_real, y_fake, x_g, 1.2, normalize, reduction, g)
    assert torch.isfinite(loss).all()
    torch.testing.assert_close(loss.double(), ref_loss, **LOSS_TOL)
    for got, want in zip(grads, ref_grads):
        assert torch.isfinite(got).all() and (got[[0, 2, 3]] == 0).all()
        torch.testing.assert_close(got.double(), want, atol=2e-5, rtol=2e-5)
    if normalize and reduction == "batchmean":  # the published loop: boolean drop, then sum / full batch
        torch.testing.assert_close(loss.double(), published_batchmean(y_real.double(), y_fake.double(),
                                                                      x_g.double()), **LOSS_TOL)


@pytest.mark.parametrize("loss_scale", [100.0, -0.5])
@pytest.mark.parametrize("reduction", sidfast.reference.REDUCTIONS)
@pytest.mark.parametrize("normalize", [True, False])
def test_loss_scale_is_folded_into_values_and_gradients(plan, loss_scale, reduction, normalize):
    """loss_scale * L with the gradients of loss_scale * L written by the forward, against loss_scale times the
    float64 reference (the float32 tolerances of the unscaled tests, scaled)."""
    y_real, y_fake, x_g = _inputs((3, 70), torch.float32, seed=4)
    ref_loss, ref_grads, g = _reference(y_real, y_fake, x_g, 1.2, normalize, reduction)
    ins = [t.detach().clone().requires_grad_() for t in (y_real, y_fake, x_g)]
    fn = sidfast.sid_generator_loss if normalize else sidfast.sid_generator_loss_eps
    loss = fn(*ins, 1.2, reduction, loss_scale=loss_scale)
    grads = torch.autograd.grad(loss, ins, g.to(loss.dtype).contiguous())
    torch.testing.assert_close(loss.double(), loss_scale * ref_loss, atol=abs(loss_scale) * LOSS_TOL["atol"],
                               rtol=LOSS_TOL["rtol"])
    for got, want in zip(grads, ref_grads):
        torch.testing.assert_close(got.double(), loss_scale * want, atol=abs(loss_scale) * 2e-5, rtol=2e-5)


@pytest.mark.parametrize("reduction", ["sum", "batchmean"])
def test_loss_scale_backward_with_grad_one_leaves_the_saved_gradients(reduction, monkeypatch):
    """loss.backward() with the scale folded in: the in-place pass sees grad 1 and skips on the device, so
    the gradients handed to autograd are the forward's, already scaled."""
    y_real, y_fake, x_g = (t.requires_grad_() for t in _inputs((4, 3, 5), torch.float32, seed=5))
    saved = []
    real_scale = S.scale_saved_grads

    def spy(ctx, grads, grad_loss):
        saved.append([g.clone() for g in grads])
        return real_scale(ctx, grads, grad_loss)

    monkeypatch.setattr(S, "scale_saved_grads", spy)
    loss = sidfast.sid_generator_loss(y_real, y_fake, x_g, reduction=reduction, loss_scale=100.0)
    loss.backward()
    for before, t in zip(saved[0], (y_real, y_fake, x_g)):
        assert torch.equal(t.grad, before)
    ref_loss, ref_grads, _ = _reference(y_real, y_fake, x_g, 1.2, True, reduction, g=100.0)
    torch.testing.assert_close(loss.double(), 100.0 * ref_loss, atol=1e-3, rtol=1e-5)
    for t, want in zip((y_real, y_fake, x_g), ref_grads):
        torch.testing.assert_close(t.grad.double(), want, atol=2e-4, rtol=2e-5)


def _layouts():
    base = torch.randn(4, 3, 6, 5, dtype=torch.float64)
    cl = base.to(memory_format=torch.channels_last)
    noncontig = torch.randn(4, 3, 6, 10, dtype=torch.float64)[..., ::2]
    transposed = torch.randn(3, 4, 6, 5, dtype=torch.float64).transpose(0, 1)
    return {"channels_last": (cl, cl.clone(), cl.clone()),
            "mixed": (cl, base.clone(), noncontig),
            "strided": (noncontig, noncontig.clone(), noncontig.clone()),
            "batch_not_outer": (transposed, transposed.clone(), transposed.clone()),
            "channels_last_3d": tuple(torch.randn(2, 3, 4, 2, 5, dtype=torch.float64)
                                      .to(memory_format=torch.channels_last_3d) for _ in range(3))}


@pytest.mark.parametrize("layout", list(_layouts()))
@pytest.mark.parametrize("reduction", ["none", "batchmean"])
def test_layouts_values_and_output_strides_match_the_fake(layout, reduction):
    ins = [t.to(DEVICE, torch.float32) for t in _layouts()[layout]]
    out = torch.ops.sidfast.sid_loss_triton(*ins, 1.2, True, S.REDUCTION_CODES[reduction])
    fake = S.sid_loss_fake(*ins, 1.2, True, S.REDUCTION_CODES[reduction])
    for o, f in zip(out, fake):
        assert o.shape == f.shape and o.dtype == f.dtype and o.stride() == f.stride()
    ref_loss, ref_grads, g = _reference(*ins, 1.2, True, reduction)
    loss, grads = _fused(*ins, 1.2, True, reduction, g)
    torch.testing.assert_close(loss.double(), ref_loss, **LOSS_TOL)
    for got, want in zip(grads, ref_grads):
        torch.testing.assert_close(got.double(), want, atol=2e-5, rtol=2e-5)


@pytest.mark.parametrize("reduction", sidfast.reference.REDUCTIONS)
@pytest.mark.parametrize("normalize", [True, False])
def test_agrees_with_native_op(reduction, normalize):
    y_real, y_fake, x_g = (t.cpu() for t in _inputs((4, 2, 3, 5), torch.float32, seed=3))
    code = S.REDUCTION_CODES[reduction]
    native = torch.ops.sidfast.sid_loss(y_real, y_fake, x_g, 1.2, normalize, code)
    fused = torch.ops.sidfast.sid_loss_triton(y_real, y_fake, x_g, 1.2, normalize, code)
    for a, b in zip(fused, native):
        torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-5)


def test_float64_inputs():
    y_real, y_fake, x_g = _inputs((3, 2, 5), torch.float64, seed=4)
    ref_loss, ref_grads, g = _reference(y_real, y_fake, x_g, 1.2, True, "sum")
    loss, grads = _fused(y_real, y_fake, x_g, 1.2, True, "sum", g)
    assert loss.dtype == torch.float64
    torch.testing.assert_close(loss, ref_loss, atol=1e-12, rtol=1e-6)  # alpha reaches the kernel as float32
    for got, want in zip(grads, ref_grads):
        torch.testing.assert_close(got, want, atol=1e-12, rtol=1e-6)


def test_backward_scaling_retain_graph_and_create_graph():
    """Backward scales in place on the first call (skipped on the device when grad_output is 1); a second
    backward through a retained graph and a differentiable (create_graph) backward stay correct."""
    y_real, y_fake, x_g = (t.requires_grad_() for t in _inputs((4, 6), torch.float32, seed=5))
    native = torch.ops.sidfast.sid_loss(y_real.detach().cpu(), y_fake.detach().cpu(), x_g.detach().cpu(), 1.2, True, 1)
    loss = sidfast.sid_generator_loss(y_real, y_fake, x_g, reduction="sum")
    (loss * 3).backward(retain_graph=True)
    first = [t.grad.clone() for t in (y_real, y_fake, x_g)]
    (loss * 5).backward(retain_graph=True)
    loss.backward()
    for t, n, f in zip((y_real, y_fake, x_g), native[1:], first):
        torch.testing.assert_close(f.cpu(), 3 * n)
        torch.testing.assert_close(t.grad.cpu(), 9 * n)
    scale = torch.tensor(2.0, device=DEVICE, requires_grad=True)
    loss2 = sidfast.sid_generator_loss(y_real, y_fake, x_g, reduction="sum") * scale
    (gx,) = torch.autograd.grad(loss2, [x_g], create_graph=True)
    torch.testing.assert_close(gx.detach().cpu(), 2 * native[3])
    (dscale,) = torch.autograd.grad(gx.sum(), [scale])  # d/dscale of scale * g = sum(g)
    torch.testing.assert_close(dscale.cpu(), native[3].sum(), atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("reduction", ["sum", "batchmean"])
def test_unit_grad_output_leaves_the_gradients_as_computed(plan, reduction):
    """loss.backward(): grad_output 1, the in-place scaling kernel returns without touching memory."""
    y_real, y_fake, x_g = (t.requires_grad_() for t in _inputs((5, 2, 7), torch.float32, seed=12))
    sidfast.sid_generator_loss(y_real, y_fake, x_g, reduction=reduction).backward()
    _, ref_grads, _ = _reference(y_real, y_fake, x_g, 1.2, True, reduction, g=1.0)
    for t, want in zip((y_real, y_fake, x_g), ref_grads):
        torch.testing.assert_close(t.grad.double(), want, atol=2e-5, rtol=2e-5)


def test_loss_api_dispatches_to_triton_route(monkeypatch):
    y_real, y_fake, x_g = _inputs((3, 4), torch.float32, seed=6)
    calls = []
    impl = S.sid_loss_triton_impl
    monkeypatch.setattr(S, "sid_loss_triton_impl", lambda *a, **k: calls.append(1) or impl(*a, **k))
    loss = sidfast.sid_generator_loss(y_real, y_fake, x_g)
    assert calls == [1] and backend.backend(x_g) in ("triton", "triton-interpret")
    torch.testing.assert_close(loss.detach().double(), reference.sid_generator_loss(
        y_real.double(), y_fake.double(), x_g.detach().double()), **LOSS_TOL)


def test_opcheck():
    y_real, y_fake, x_g = (t.requires_grad_() for t in _inputs((3, 2, 4), torch.float32, seed=7))
    for code in (0, 2):
        torch.library.opcheck(torch.ops.sidfast.sid_loss_triton.default, (y_real, y_fake, x_g, 1.2, True, code))


def test_compile_fullgraph_matches_eager():
    y_real, y_fake, x_g = (t.requires_grad_() for t in _inputs((3, 2, 4, 4), torch.float32, seed=8))

    def step(a, b, c):
        return sidfast.sid_generator_loss(a, b, c) * 100 + sidfast.sid_generator_loss_eps(a, b, c, reduction="sum")

    backend_name = "inductor" if DEVICE == "cuda" else RecordingBackend()  # inductor on CPU: slow
    compiled = torch.compile(step, fullgraph=True, backend=backend_name)
    out = compiled(y_real, y_fake, x_g)
    grads = torch.autograd.grad(out, [y_real, y_fake, x_g])
    want = step(y_real, y_fake, x_g)
    want_grads = torch.autograd.grad(want, [y_real, y_fake, x_g])
    torch.testing.assert_close(out, want)
    for a, b in zip(grads, want_grads):
        torch.testing.assert_close(a, b)
    if isinstance(backend_name, RecordingBackend):  # traced through the custom op, not into raw launches
        assert backend_name.calls("torch.ops.sidfast.sid_loss_triton")


def test_kernels_compile_for_sm90_without_spills(sm90_compile_report):
    report = sm90_compile_report("sid_loss") + sm90_compile_report("grad_scale")  # the loss and its backward
    assert len(report) > 10
    bad = [r for r in report if r["spill_bytes"] > 0 or r["registers"] > 255]
    assert not bad, bad


# ---- GPU only ----------------------------------------------------------------------------------

@requires_cuda
@pytest.mark.parametrize("shape, dtype", [((16, 4, 64, 64), torch.bfloat16), ((64, 3, 32, 32), torch.float32),
                                          ((16, 4, 128, 128), torch.bfloat16), ((256, 4, 128, 128), torch.bfloat16),
                                          ((512, 3, 64, 64), torch.float32), ((8, 4, 64, 64), torch.float16)])
@pytest.mark.parametrize("reduction", ["none", "batchmean"])
def test_gpu_large_against_float64(shape, dtype, reduction):
    y_real, y_fake, x_g = _inputs(shape, dtype, seed=9)
    y_fake[1].fill_(float("nan"))
    ref_loss, ref_grads, g = _reference(y_real, y_fake, x_g, 1.2, True, reduction)
    loss, grads = _fused(y_real, y_fake, x_g, 1.2, True, reduction, g)
    tol = dict(atol=2e-5, rtol=2e-5) if dtype == torch.float32 else dict(atol=1e-2 / shape[0], rtol=1e-2)
    torch.testing.assert_close(loss.double(), ref_loss, atol=1e-3, rtol=1e-4)
    for got, want in zip(grads, ref_grads):
        torch.testing.assert_close(got.double(), want, **tol)


@requires_cuda
@pytest.mark.parametrize("kind", ["tile", "loop", "split"])
def test_gpu_each_plan(monkeypatch, kind):
    p = {"tile": None, "loop": dict(kind="loop", BLOCK=2048, PROGRAMS=37), "split": dict(kind="split", BLOCK=2048)}
    monkeypatch.setattr(S, "PLAN_OVERRIDE", p[kind])
    shape = (40, 4, 32, 32) if kind == "tile" else (40, 4, 64, 64)
    y_real, y_fake, x_g = _inputs(shape, torch.float32, seed=10)
    ref_loss, ref_grads, g = _reference(y_real, y_fake, x_g, 1.2, True, "batchmean")
    loss, grads = _fused(y_real, y_fake, x_g, 1.2, True, "batchmean", g)
    torch.testing.assert_close(loss.double(), ref_loss, atol=1e-4, rtol=1e-5)
    for got, want in zip(grads, ref_grads):
        torch.testing.assert_close(got.double(), want, atol=2e-5, rtol=2e-5)


@requires_cuda
def test_gpu_cuda_graph_capture_and_replay():
    y_real, y_fake, x_g = (t.requires_grad_() for t in _inputs((16, 3, 32, 32), torch.float32, seed=11))
    static = [t.detach().clone() for t in (y_real, y_fake, x_g)]

    def step():
        ins = [t.requires_grad_() for t in static]
        loss = sidfast.sid_generator_loss(*ins) * 100
        return (loss, *torch.autograd.grad(loss, ins))

    s = torch.cuda.Stream()
    s.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(s):
        for _ in range(3):
            step()
    torch.cuda.current_stream().wait_stream(s)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        outs = step()
    for seed in (12, 13):
        new = _inputs((16, 3, 32, 32), torch.float32, seed=seed)
        for dst, src in zip(static, new):
            dst.copy_(src)
        graph.replay()
        torch.cuda.synchronize()
        ref_loss, ref_grads, _ = _reference(*new, 1.2, True, "batchmean", g=100.0)
        torch.testing.assert_close(outs[0].double(), 100 * ref_loss, atol=1e-3, rtol=1e-5)
        for got, want in zip(outs[1:], ref_grads):
            torch.testing.assert_close(got.double(), want, atol=1e-4, rtol=1e-4)
