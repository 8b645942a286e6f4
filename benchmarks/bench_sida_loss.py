"""SiDA generator losses (L_sid, L_gan), forward + backward (gradients of y_real, y_fake, x_g and the logits).

GPU: sidfast (Triton, the GAN term's 1/w written by the SiD kernels) vs the eager reference, torch.compile of
the reference, the plain SiD loss alone (what the GAN term adds) and the published arithmetic (eager, boolean
NaN filtering). CPU: the native op route vs the same eager baselines. Logits: one 8x8 map per sample, as the
published discriminator gives. Bytes moved by a fused forward+backward: read three tensors, write three
gradients (the logits are negligible).
"""
import pytest
import torch
from conftest import CASES, DEVICE, GPU, case_id
from telemetry import record

import sidfast
from sidfast import reference

IMPLS = ["sidfast", "sid-only", "eager", "compiled", "published"] if GPU else ["native", "sid-only", "eager",
                                                                               "published"]
_compiled = torch.compile(reference.sida_generator_loss, dynamic=False) if GPU else None


def published(y_real, y_fake, y, y_D, alpha=1.0):
    """The published generator_share_encoder_loss arithmetic (sida_loss_edm2.py), the loop's sums / batch."""
    batch = y.shape[0]
    nan_mask = (torch.isnan(y).flatten(1).any(1) | torch.isnan(y_real).flatten(1).any(1)
                | torch.isnan(y_fake).flatten(1).any(1) | torch.isnan(y_D).flatten(1).any(1))
    if nan_mask.any():
        keep = ~nan_mask
        y = y[keep]
        y_real = y_real[keep]
        y_fake = y_fake[keep]
        y_D = y_D[keep]
    with torch.no_grad():
        weight_factor = abs(y - y_real).to(torch.float32).mean(dim=[1, 2, 3], keepdim=True).clip(min=1e-5)
    loss = (y_real - y_fake) * ((y_real - y) - alpha * (y_real - y_fake)) / weight_factor
    bce = torch.nn.BCEWithLogitsLoss()(y_D.clamp(-10, 10), torch.ones_like(y_D)).to(torch.float32)
    loss_gan = bce / weight_factor * y[0].numel()
    return loss.sum() / batch, loss_gan.sum() / batch


def loss_fn(impl):
    if impl in ("sidfast", "native"):
        return sidfast.sida_generator_loss
    if impl == "sid-only":
        return lambda r, f, x, logits: (sidfast.sid_generator_loss(r, f, x, alpha=1.0), logits.sum() * 0)
    if impl == "eager":
        return reference.sida_generator_loss
    if impl == "compiled":
        return _compiled
    return published


@pytest.mark.parametrize("case", CASES, ids=case_id)
@pytest.mark.parametrize("impl", IMPLS)
def test_sida_generator_loss_forward_backward(benchmark, case, impl):
    shape, dtype = case
    benchmark.group = f"sida_loss fwd+bwd {case_id(case)}"
    ins = [torch.randn(shape, device=DEVICE, dtype=dtype, requires_grad=True) for _ in range(3)]
    logits = (4 * torch.randn(shape[0], 1, 8, 8, device=DEVICE)).requires_grad_()
    fn = loss_fn(impl)

    def step():
        loss_sid, loss_gan = fn(*ins, logits)
        return torch.autograd.grad(0.5 * loss_sid + 0.5 * loss_gan, [*ins, logits])

    step()  # compile / warm up
    record(benchmark, step, device=DEVICE, op="sida_loss fwd+bwd", impl=impl, shape=shape, dtype=dtype,
           bytes_moved=6 * ins[0].numel() * ins[0].element_size())
