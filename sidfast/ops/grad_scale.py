"""Backward of the fused losses: scale the gradients their forward already computed by ``grad_output``.

In place where nobody else sees the saved gradients, to save a full read and write of them: docs/kernels.md,
"Gradient scaling".
"""
from __future__ import annotations

import torch

from sidfast.ops import backend
from sidfast.ops._common import loop_bound, num_warps
from sidfast.ops._layout import batch_major_dense
from sidfast.ops.backend import HAS_TRITON

# ---------------------------------------------------------------------------------------------
# Constants
# ---------------------------------------------------------------------------------------------

SCALE_BLOCK = 4096  # elements per program and step

# ---------------------------------------------------------------------------------------------
# Triton kernels
# ---------------------------------------------------------------------------------------------

if HAS_TRITON:
    import triton.language as tl

    from sidfast.ops._common import jit_with_loop_bounds

    @jit_with_loop_bounds("iters")
    def _scale_inplace_kernel(g_ptr, applied_ptr, t0_ptr, t1_ptr, t2_ptr, n, iters, nprog, NUM: tl.constexpr,
                              BLOCK: tl.constexpr):
        pid = tl.program_id(0)
        acc_ty = t0_ptr.dtype.element_ty if t0_ptr.dtype.element_ty == tl.float64 else tl.float32
        g = tl.load(g_ptr).to(acc_ty)
        if pid == 0:
            tl.store(applied_ptr, g)
        if g != 1.0:  # device-side branch: loss.backward() (grad 1) costs one scalar load per program
            for i in range(iters):
                offs = (i * nprog + pid).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
                mask = offs < n
                v = tl.load(t0_ptr + offs, mask=mask)
                tl.store(t0_ptr + offs, (v.to(acc_ty) * g).to(t0_ptr.dtype.element_ty), mask=mask)
                if NUM > 1:
                    v = tl.load(t1_ptr + offs, mask=mask)
                    tl.store(t1_ptr + offs, (v.to(acc_ty) * g).to(t1_ptr.dtype.element_ty), mask=mask)
                if NUM > 2:
                    v = tl.load(t2_ptr + offs, mask=mask)
                    tl.store(t2_ptr + offs, (v.to(acc_ty) * g).to(t2_ptr.dtype.element_ty), mask=mask)


# ---------------------------------------------------------------------------------------------
# Host launch
# ---------------------------------------------------------------------------------------------

def scale_inplace(grads: tuple[torch.Tensor, ...], grad_loss: torch.Tensor) -> torch.Tensor:
    """Multiply 1 to 3 dense tensors of equal numel by the 0-dim ``grad_loss`` in place (skipped on the
    device when it is 1); returns a 0-dim tensor holding the factor applied."""
    t0 = grads[0]
    applied = torch.empty((), dtype=torch.float64 if t0.dtype == torch.float64 else torch.float32, device=t0.device)
    n = t0.numel()
    blocks = backend.cdiv(n, SCALE_BLOCK)
    nprog = max(1, min(blocks, 8 * backend.num_sms(t0.device)))
    ts = tuple(grads) + (t0,) * (3 - len(grads))
    with backend.device_guard(t0.device):
        _scale_inplace_kernel[(nprog,)](grad_loss, applied, *ts, n, loop_bound(backend.cdiv(blocks, nprog)), nprog,
                                        NUM=len(grads), BLOCK=SCALE_BLOCK,
                                        num_warps=num_warps(SCALE_BLOCK, t0.element_size()))
    return applied


# ---------------------------------------------------------------------------------------------
# Backward rules (used by the ops' autograd and their autograd.Functions)
# ---------------------------------------------------------------------------------------------

def out_of_place(grads, grad_loss):
    return tuple((g * grad_loss).to(g.dtype) for g in grads)


def scale_saved_grads(ctx, grads: tuple[torch.Tensor, ...], grad_loss: torch.Tensor) -> tuple[torch.Tensor, ...]:
    """The backward rule of the module docstring; ``grads`` are the gradients saved in ``ctx``."""
    applied = getattr(ctx, "sidfast_applied", None)
    if applied is not None:  # a second backward through a retained graph: the saved grads hold g * applied
        return out_of_place(grads, grad_loss / applied)
    eager_scalar = (grad_loss.dim() == 0 and HAS_TRITON and backend.use_triton(grads[0])
                    and not backend.is_traced(grad_loss, *grads)
                    and not (torch.is_grad_enabled() and grad_loss.requires_grad)
                    and all(batch_major_dense(g) for g in grads))
    if not eager_scalar:
        return out_of_place(grads, grad_loss)
    ctx.sidfast_applied = scale_inplace(grads, grad_loss.detach())
    return tuple(grads)
