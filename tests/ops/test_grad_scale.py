"""sidfast.ops.grad_scale: the fused losses' backward (saved gradients times grad_output) against plain PyTorch
``(g * grad_loss).to(g.dtype)`` computed in float64: the in-place kernel (Triton; CPU under TRITON_INTERPRET=1,
see conftest.py) for 1 to 3 tensors, its skip at grad 1, the factor it records, the second backward through a
retained graph, and the out-of-place cases."""
from types import SimpleNamespace

import pytest
import torch

from sidfast.ops import grad_scale as GS
from utils import DEVICE, triton_route

# (dtype, atol, rtol) of the scaled gradients against float64: one multiplication in float32 (float64 for
# float64), then one rounding to the gradient's dtype
DTYPES = [(torch.float32, 1e-6, 2e-7), (torch.float16, 1e-3, 1e-3), (torch.bfloat16, 1e-2, 8e-3),
          (torch.float64, 1e-15, 1e-15)]
NUMELS = [1, 5, GS.SCALE_BLOCK + 3]  # one element, a partial block, more than one block


def _grads(count, numel, dtype, seed=0):
    g = torch.Generator().manual_seed(seed)
    return tuple(torch.randn(numel, generator=g, dtype=torch.float64).to(DEVICE, dtype) for _ in range(count))


def _expected(grads, factor):
    return [(g.double() * factor).to(g.dtype) for g in grads]


@triton_route
@pytest.mark.parametrize("dtype, atol, rtol", DTYPES)
@pytest.mark.parametrize("count", [1, 2, 3])
@pytest.mark.parametrize("numel", NUMELS)
def test_scale_inplace_matches_plain_pytorch(count, numel, dtype, atol, rtol):
    grads = _grads(count, numel, dtype)
    want = _expected(grads, -1.75)
    grad_loss = torch.tensor(-1.75, device=DEVICE)
    applied = GS.scale_inplace(grads, grad_loss)
    for got, w in zip(grads, want):
        torch.testing.assert_close(got.double(), w.double(), atol=atol, rtol=rtol)
    assert applied.item() == -1.75
    assert applied.dtype == (torch.float64 if dtype == torch.float64 else torch.float32)


@triton_route
def test_scale_inplace_leaves_the_gradients_untouched_at_grad_one():
    grads = _grads(2, 37, torch.float32)
    before = [g.clone() for g in grads]
    applied = GS.scale_inplace(grads, torch.tensor(1.0, device=DEVICE))
    assert applied.item() == 1.0
    for got, b in zip(grads, before):
        assert torch.equal(got, b)


@pytest.mark.parametrize("dtype, atol, rtol", DTYPES)
def test_out_of_place_keeps_dtype_and_inputs(dtype, atol, rtol):
    grads = _grads(2, 11, dtype)
    before = [g.clone() for g in grads]
    grad_loss = torch.tensor(0.3, device=DEVICE)
    out = GS.out_of_place(grads, grad_loss)
    for o, g, b in zip(out, grads, before):
        assert o.dtype == dtype and torch.equal(g, b)
        torch.testing.assert_close(o.double(), (b.double() * grad_loss.double()).to(dtype).double(), atol=atol,
                                   rtol=rtol)


@triton_route
def test_scale_saved_grads_in_place_then_out_of_place_on_a_second_backward():
    """First backward with a 0-dim grad: in place, the same tensors returned and the factor kept on ctx; a
    second backward (retain_graph) scales saved * (grad / applied) out of place."""
    saved = _grads(3, 50, torch.float32)
    original = [g.clone() for g in saved]
    ctx = SimpleNamespace()
    first = GS.scale_saved_grads(ctx, saved, torch.tensor(2.0, device=DEVICE))
    assert all(f is s for f, s in zip(first, saved)) and ctx.sidfast_applied.item() == 2.0
    for f, o in zip(first, original):
        torch.testing.assert_close(f, o * 2.0, rtol=0, atol=0)  # a multiplication by 2 is exact
    second = GS.scale_saved_grads(ctx, saved, torch.tensor(3.0, device=DEVICE))
    assert all(s is not f for s, f in zip(second, first))
    for s, o in zip(second, original):
        torch.testing.assert_close(s, o * 3.0, atol=1e-6, rtol=2e-7)


@pytest.mark.parametrize("case", ["per-sample grad", "grad needs grad", "not dense"])
def test_scale_saved_grads_out_of_place_cases(case):
    saved = _grads(2, 12, torch.float32)
    if case == "per-sample grad":
        grad_loss = torch.full((12,), 0.5, device=DEVICE)
    elif case == "grad needs grad":
        grad_loss = torch.tensor(0.5, device=DEVICE, requires_grad=True)
    else:
        grad_loss = torch.tensor(0.5, device=DEVICE)
        saved = tuple(torch.randn(12, 2, device=DEVICE)[:, 0] for _ in range(2))  # strided
    original = [g.clone() for g in saved]
    ctx = SimpleNamespace()
    out = GS.scale_saved_grads(ctx, saved, grad_loss)
    assert getattr(ctx, "sidfast_applied", None) is None
    for o, s, orig in zip(out, saved, original):
        assert o is not s and torch.equal(s, orig)
        torch.testing.assert_close(o, (orig * grad_loss).detach(), rtol=0, atol=0)
