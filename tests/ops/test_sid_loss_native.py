"""The native extension: op registration (opcheck), gradcheck, compile, and the build checks."""
import pytest
import torch
from torch.library import opcheck

import sidfast
from sidfast.ops import _native

_native.load()  # the ops under test
from sidfast import reference as R
from utils import requires_cuda


def _args(shape=(3, 2, 4, 4), dtype=torch.float32, layout=torch.contiguous_format):
    g = torch.Generator().manual_seed(0)
    return [torch.randn(shape, generator=g, dtype=dtype).contiguous(memory_format=layout).requires_grad_()
            for _ in range(3)]


@pytest.mark.parametrize("reduction", [0, 1, 2])
@pytest.mark.parametrize("normalize", [True, False])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
def test_opcheck(reduction, normalize, dtype):
    opcheck(torch.ops.sidfast.sid_loss.default, (*_args(dtype=dtype), 1.2, normalize, reduction))


def test_opcheck_channels_last_and_noncontiguous():
    opcheck(torch.ops.sidfast.sid_loss.default, (*_args(layout=torch.channels_last), 1.2, True, 0))
    a, b, c = _args()
    opcheck(torch.ops.sidfast.sid_loss.default, (a.transpose(2, 3), b, c.transpose(2, 3), 0.5, True, 2))


@pytest.mark.parametrize("reduction", ["none", "sum", "batchmean"])
def test_gradcheck_noise_space(reduction):
    args = _args((3, 2, 3), torch.float64)
    assert torch.autograd.gradcheck(lambda *x: sidfast.sid_generator_loss_eps(*x, reduction=reduction), args)


@pytest.mark.parametrize("reduction", ["none", "sum", "batchmean"])
def test_gradcheck_denoised(reduction):
    """w depends on y_real and x_g but is a constant by definition: gradcheck where that is exact (y_fake),
    and compare all three analytic gradients with autograd of the reference, which detaches w."""
    y_real, y_fake, x_g = _args((3, 2, 3), torch.float64)
    assert torch.autograd.gradcheck(lambda f: sidfast.sid_generator_loss(y_real, f, x_g, reduction=reduction), (y_fake,))
    out = sidfast.sid_generator_loss(y_real, y_fake, x_g, reduction=reduction)
    ref = R.sid_generator_loss(y_real, y_fake, x_g, reduction=reduction)
    go = torch.randn_like(ref)
    for g, rg in zip(torch.autograd.grad(out, (y_real, y_fake, x_g), go),
                     torch.autograd.grad(ref, (y_real, y_fake, x_g), go)):
        torch.testing.assert_close(g, rg, rtol=1e-12, atol=1e-12)


def test_backward_scales_without_recomputing():
    """grad_output only scales the stored gradients: twice the grad_output gives twice the gradients."""
    a, b, c = _args()
    loss = sidfast.sid_generator_loss(a, b, c)
    g1 = torch.autograd.grad(loss, (a, b, c), torch.tensor(1.0), retain_graph=True)
    g2 = torch.autograd.grad(loss, (a, b, c), torch.tensor(2.0))
    for x, y in zip(g1, g2):
        torch.testing.assert_close(2 * x, y)


def test_compile_fullgraph():
    a, b, c = _args()
    fn = torch.compile(lambda a, b, c: sidfast.sid_generator_loss(a, b, c) * 100.0, fullgraph=True, backend="aot_eager")
    out = fn(a, b, c)
    torch.testing.assert_close(out, R.sid_generator_loss(a, b, c) * 100.0)
    grads = torch.autograd.grad(out, (a, b, c))
    ref = torch.autograd.grad(R.sid_generator_loss(a, b, c) * 100.0, (a, b, c))
    for g, r in zip(grads, ref):
        torch.testing.assert_close(g, r)


def test_direct_op_call_validates():
    a, b, c = _args()
    with pytest.raises(ValueError, match="same shape"):
        torch.ops.sidfast.sid_loss(a, b[:1], c, 1.2, True, 2)
    with pytest.raises(ValueError, match="reduction"):
        torch.ops.sidfast.sid_loss(a, b, c, 1.2, True, 7)
    with pytest.raises(TypeError, match="dtype"):
        torch.ops.sidfast.sid_loss(a, b.double(), c, 1.2, True, 2)


# ---- build checks: a missing or stale extension fails loudly at import ----

def test_build_info():
    assert _native.C.torch_version().split("+")[0] == torch.__version__.split("+")[0]
    assert len(_native.C.source_hash()) == 16
    assert isinstance(_native.WITH_CUDA, bool)


def test_stale_sources_refused(monkeypatch):
    monkeypatch.setattr(_native.C, "source_hash", lambda: "0000000000000000")
    with pytest.raises(ImportError, match="stale.*pip install --no-build-isolation -e"):
        _native._load()


def test_other_torch_refused(monkeypatch):
    monkeypatch.setattr(_native.C, "torch_version", lambda: "1.0.0")
    with pytest.raises(ImportError, match="built against torch 1.0.0"):
        _native._load()


def test_missing_extension_refused(monkeypatch):
    import sys

    monkeypatch.setitem(sys.modules, "sidfast._C", None)
    monkeypatch.delattr(sidfast, "_C")
    with pytest.raises(ImportError, match="missing or cannot be loaded.*pip install --no-build-isolation -e"):
        _native._load()


def test_version_exported():
    assert sidfast.__version__


# ---- the CUDA kernel of the native op (csrc/cuda/sid_loss.cu): only where the extension has CUDA ----

needs_native_cuda = requires_cuda(condition=_native.WITH_CUDA, reason="needs a GPU and sidfast._C built with CUDA")


@needs_native_cuda
@pytest.mark.parametrize("dtype, atol, rtol", [(torch.float32, 1e-6, 1e-6), (torch.bfloat16, 1.6e-2, 1.6e-2),
                                               (torch.float16, 2e-3, 2e-3), (torch.float64, 1e-12, 1e-12)])
@pytest.mark.parametrize("reduction", [0, 1, 2])
@pytest.mark.parametrize("shape", [(3, 5), (16, 4, 64, 64), (7, 3, 33, 31)])
def test_native_cuda_matches_cpu(dtype, atol, rtol, reduction, shape):
    args = [t.detach().to(dtype) for t in _args(shape)]
    with torch.no_grad():
        args[1][1].view(-1)[3] = float("nan")
    cpu = torch.ops.sidfast.sid_loss(*args, 1.2, True, reduction)
    gpu = torch.ops.sidfast.sid_loss(*(t.cuda() for t in args), 1.2, True, reduction)
    for c, g in zip(cpu, gpu):
        scale = c.abs().max().clamp(min=1).item()
        torch.testing.assert_close(g.cpu().to(c.dtype), c, atol=atol * scale, rtol=rtol)


@needs_native_cuda
def test_native_cuda_opcheck():
    args = [t.detach().cuda().requires_grad_() for t in _args()]
    opcheck(torch.ops.sidfast.sid_loss.default, (*args, 1.2, True, 2))
