"""The SiD generator loss with its three gradients computed in the forward pass (SPEC section 3).

``sidfast::sid_loss`` returns ``(loss, grad_real, grad_fake, grad_x)``; autograd's backward only
scales the stored gradients by ``grad_output`` (no host sync, so it can be captured in a CUDA graph).
CPU tensors run the C++ kernel (csrc/cpu/sid_loss.cpp).
"""
from __future__ import annotations

import torch

from .. import _native  # noqa: F401  (loads sidfast._C, which defines the sidfast::sid_loss schema)
from ._layout import empty_outputs_like

REDUCTION_CODES = {"none": 0, "sum": 1, "batchmean": 2}


def loss_dtype(dtype: torch.dtype) -> torch.dtype:
    """The loss is float32 for half, bfloat16 and float32 inputs, float64 for float64."""
    return torch.float64 if dtype == torch.float64 else torch.float32


def sid_loss_fake(y_real, y_fake, x_g, alpha: float, normalize: bool, reduction: int):
    """Shapes, dtypes and layouts of sid_loss's outputs, for FakeTensor tracing (torch.compile, export)."""
    grads = tuple(empty_outputs_like(y_real, y_fake, x_g) for _ in range(3))
    ldt = loss_dtype(x_g.dtype)
    loss = empty_outputs_like(y_real, y_fake, x_g, dtype=ldt) if reduction == 0 else x_g.new_empty((), dtype=ldt)
    return (loss, *grads)


def sid_loss_setup_context(ctx, inputs, output):
    _, grad_real, grad_fake, grad_x = output
    ctx.save_for_backward(grad_real, grad_fake, grad_x)
    ctx.mark_non_differentiable(grad_real, grad_fake, grad_x)


def sid_loss_backward(ctx, grad_loss, *unused):
    """Scale the gradients the forward pass computed: elementwise for "none", by a 0-dim tensor otherwise."""
    return (*((g * grad_loss).to(g.dtype) for g in ctx.saved_tensors), None, None, None)


def register(op_name: str) -> None:
    """Attach the shared fake and autograd formulas to an op with sid_loss's schema."""
    torch.library.register_fake(op_name)(sid_loss_fake)
    torch.library.register_autograd(op_name, sid_loss_backward, setup_context=sid_loss_setup_context)


register("sidfast::sid_loss")


def sid_loss(y_real: torch.Tensor, y_fake: torch.Tensor, x_g: torch.Tensor, alpha: float, normalize: bool,
             reduction: str) -> torch.Tensor:
    """The differentiable loss; arguments are assumed validated (see ``sidfast.loss``)."""
    return torch.ops.sidfast.sid_loss(y_real, y_fake, x_g, float(alpha), bool(normalize),
                                      REDUCTION_CODES[reduction])[0]
