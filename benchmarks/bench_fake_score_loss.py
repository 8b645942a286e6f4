"""Fake-score loss (EDM weighting, x0 prediction), forward + backward into the prediction (GPU only).

sidfast fused op with eps regenerated from add_noise's seed (reads pred and x0, writes the gradient)
and with explicit noise, vs the eager reference (noise given) and torch.compile of it.
"""
import pytest
import torch
from conftest import DEVICE, GPU, GPU_CASES, case_id
from telemetry import record

from sidfast import reference
from sidfast.ops import fake_score_loss as fused
from sidfast.ops import noise

pytestmark = pytest.mark.skipif(not GPU, reason="GPU benchmark (the CPU route is the eager reference itself)")
IMPLS = ["sidfast-seed", "sidfast-noise", "eager", "compiled"]
_compiled = torch.compile(reference.fake_score_loss, dynamic=False) if GPU else None


@pytest.mark.parametrize("case", GPU_CASES, ids=case_id)
@pytest.mark.parametrize("impl", IMPLS)
def test_fake_score_loss_forward_backward(benchmark, case, impl):
    shape, dtype = case
    benchmark.group = f"fake_score_loss fwd+bwd {case_id(case)}"
    x0 = torch.randn(shape, device=DEVICE, dtype=dtype)
    pred = torch.randn(shape, device=DEVICE, dtype=dtype, requires_grad=True)
    a = torch.ones(shape[0], device=DEVICE)
    s = torch.exp(torch.randn(shape[0], device=DEVICE) * 1.2 - 1.2)
    _, seed = noise.add_noise(x0, a, s)
    eps = noise.philox_normal(seed, shape).to(dtype)
    losses = {"sidfast-seed": lambda: fused.fake_score_loss(pred, x0, None, a, s, "x0", "edm", seed=seed),
              "sidfast-noise": lambda: fused.fake_score_loss(pred, x0, eps, a, s, "x0", "edm"),
              "eager": lambda: reference.fake_score_loss(pred, x0, eps, a, s, "x0", "edm"),
              "compiled": lambda: _compiled(pred, x0, eps, a, s, "x0", "edm")}
    loss = losses[impl]

    def step():
        return torch.autograd.grad(loss(), [pred])

    step()
    tensors = 3 if impl == "sidfast-seed" else 4
    record(benchmark, step, device=DEVICE, op="fake_score_loss fwd+bwd", impl=impl, shape=shape, dtype=dtype,
           bytes_moved=tensors * x0.numel() * x0.element_size())
