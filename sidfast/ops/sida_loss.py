"""SiDA's generator losses: the SiD loss with its gradients in the forward pass, plus the GAN term.

Math: ``sidfast/reference.py: sida_generator_loss`` (docs/math.md, "SiDA losses"). How the SiD kernels supply
the GAN term's 1/w, and the routes: docs/kernels.md, "SiDA loss".
"""
from __future__ import annotations

import torch

from sidfast.ops import _native
from sidfast import reference
from sidfast.schedules import broadcast
from sidfast.ops import backend
from sidfast.ops._common import loss_dtype
from sidfast.ops.grad_scale import scale_saved_grads
from sidfast.ops.sid_loss import sid_loss_triton_impl

BATCHMEAN = 2  # sid_loss's reduction code

# ---------------------------------------------------------------------------------------------
# autograd.Function: the Triton route
# ---------------------------------------------------------------------------------------------


class SiDALossFunction(torch.autograd.Function):
    """L_sid (batchmean) with its gradients kept private, as ``sid_loss.SiDLossFunction``; also returns the
    non-differentiable per-sample 1/w (0 for dropped samples) and keep mask the GAN term needs."""

    @staticmethod
    def forward(ctx, y_real, y_fake, x_g, drop, alpha: float):
        B = x_g.shape[0]
        flags = drop.to(torch.int32)  # the kernels overwrite it with the final flags
        inv_w = torch.empty(B, dtype=loss_dtype(x_g.dtype), device=x_g.device)
        loss, *grads = sid_loss_triton_impl(y_real, y_fake, x_g, alpha, True, BATCHMEAN, drop=flags,
                                            inv_w_out=inv_w)
        ctx.save_for_backward(*grads)
        keep = flags == 0
        ctx.mark_non_differentiable(inv_w, keep)
        return loss, inv_w, keep

    @staticmethod
    def backward(ctx, grad_loss, _grad_inv_w, _grad_keep):
        return (*scale_saved_grads(ctx, ctx.saved_tensors, grad_loss), None, None)


# ---------------------------------------------------------------------------------------------
# Host functions
# ---------------------------------------------------------------------------------------------

def _native_sid_terms(y_real, y_fake, x_g, logits, alpha):
    """(L_sid, 1/w, keep) on the native op: a sample whose only NaN is in the logits is handed to the op with
    a NaN in y_fake, so the op drops it (a copy of y_fake, only when such a sample exists)."""
    keep = ~reference.nan_rows(y_real, y_fake, x_g, logits)
    logit_nan = reference.nan_rows(logits)
    if bool(logit_nan.any()):
        y_fake = torch.where(broadcast(logit_nan, y_fake), float("nan"), y_fake)
    _native.load()  # registers torch.ops.sidfast.sid_loss
    loss = torch.ops.sidfast.sid_loss(y_real, y_fake, x_g, float(alpha), True, BATCHMEAN)[0]
    inv_w = torch.where(keep, 1.0 / reference.sid_normalizer(y_real, x_g).to(loss.dtype), 0.0)
    return loss, inv_w, keep


def sida_generator_loss(y_real: torch.Tensor, y_fake: torch.Tensor, x_g: torch.Tensor, logits: torch.Tensor,
                        alpha: float) -> tuple[torch.Tensor, torch.Tensor]:
    """(L_sid, L_gan), differentiable; arguments are assumed validated (see ``sidfast.loss``)."""
    triton_route = backend.use_triton(x_g)
    if triton_route and backend.is_traced(y_real, y_fake, x_g, logits):
        return reference.sida_generator_loss(y_real, y_fake, x_g, logits, alpha)
    if triton_route:
        drop = reference.nan_rows(logits)
        loss_sid, inv_w, keep = SiDALossFunction.apply(y_real, y_fake, x_g, drop, float(alpha))
    elif x_g.device.type == "cpu" or (x_g.device.type == "cuda" and _native.WITH_CUDA):
        loss_sid, inv_w, keep = _native_sid_terms(y_real, y_fake, x_g, logits, alpha)
    else:
        return reference.sida_generator_loss(y_real, y_fake, x_g, logits, alpha)
    # L_gan = (1/B) sum_i N * b / w_i (docs/math.md, "SiDA losses")
    b = reference.bce_mean(logits.clamp(-10, 10), 1.0, keep)
    n_features = x_g.numel() // x_g.shape[0]
    loss_gan = n_features * b * inv_w.sum() / x_g.shape[0]
    return loss_sid, loss_gan
