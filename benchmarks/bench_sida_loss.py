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
from published import published_generator
from telemetry import record

import sidfast
from sidfast import reference

IMPLS = ["sidfast", "sid-only", "eager", "compiled", "published"] if GPU else ["native", "sid-only", "eager",
                                                                               "published"]
_compiled = torch.compile(reference.sida_generator_loss, dynamic=False) if GPU else None


def loss_fn(impl):
    if impl in ("sidfast", "native"):
        return sidfast.sida_generator_loss
    if impl == "sid-only":
        return lambda r, f, x, logits: (sidfast.sid_generator_loss(r, f, x, alpha=1.0), logits.sum() * 0)
    if impl == "eager":
        return reference.sida_generator_loss
    if impl == "compiled":
        return _compiled
    return lambda r, f, x, logits: published_generator(r, f, x, logits, alpha=1.0)


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
