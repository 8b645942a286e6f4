"""SiD generator loss, forward + backward (gradients of all three inputs), batchmean reduction.

GPU: sidfast (Triton, via sidfast.sid_generator_loss) vs the eager reference, torch.compile of the
reference, and the published arithmetic (eager, with its host sync). CPU: the native op vs the same
eager baselines. Bytes moved by a fused forward+backward: read three tensors, write three gradients.
"""
import pytest
import torch
from conftest import CASES, DEVICE, GPU, case_id
from published import published_batchmean
from telemetry import record

import sidfast
from sidfast.ops import _native
from sidfast import reference

IMPLS = ["sidfast", "eager", "compiled", "published"] if GPU else ["native", "eager", "published"]
_compiled = torch.compile(reference.sid_generator_loss, dynamic=False) if GPU else None


def loss_fn(impl):
    if impl == "sidfast":
        return lambda r, f, x: sidfast.sid_generator_loss(r, f, x)
    if impl == "native":
        _native.load()  # the extension registers torch.ops.sidfast.sid_loss when it loads
        return lambda r, f, x: torch.ops.sidfast.sid_loss(r, f, x, 1.2, True, 2)[0]
    if impl == "eager":
        return reference.sid_generator_loss
    if impl == "compiled":
        return _compiled
    return published_batchmean


@pytest.mark.parametrize("case", CASES, ids=case_id)
@pytest.mark.parametrize("impl", IMPLS)
def test_sid_loss_forward_backward(benchmark, case, impl):
    shape, dtype = case
    benchmark.group = f"sid_loss fwd+bwd {case_id(case)}"
    ins = [torch.randn(shape, device=DEVICE, dtype=dtype, requires_grad=True) for _ in range(3)]
    fn = loss_fn(impl)

    def step():
        return torch.autograd.grad(fn(*ins), ins)

    step()  # compile / warm up
    numel = ins[0].numel()
    record(benchmark, step, device=DEVICE, op="sid_loss fwd+bwd", impl=impl, shape=shape, dtype=dtype,
           bytes_moved=6 * numel * ins[0].element_size())


PLAN_CASES = [((256, 4, 128, 128), torch.bfloat16), ((512, 3, 64, 64), torch.float32),
              ((16, 4, 128, 128), torch.bfloat16)]
# the default plan and alternatives around it, for tuning sidfast.ops.sid_loss's constants:
# loop plans with one program per SM, two per SM or one per sample, and two block sizes
PLANS = ["default", "split-2048", "split-4096"] + [f"loop-{p}-{b}" for p in ("sms", "2sms", "batch")
                                                   for b in ("half", "full")]


def _plan(name, shape, dtype):
    from sidfast.ops import backend
    from sidfast.ops import sid_loss as op

    if name == "default":
        return None
    kind, arg, *rest = name.split("-")
    if kind == "split":
        return dict(kind="split", BLOCK=int(arg))
    sms = backend.num_sms(DEVICE)
    programs = {"sms": sms, "2sms": 2 * sms, "batch": shape[0]}[arg]
    block = op.LOOP_BYTES // torch.empty((), dtype=dtype).element_size() // (2 if rest == ["half"] else 1)
    return dict(kind="loop", BLOCK=block, PROGRAMS=min(shape[0], programs))


@pytest.mark.skipif(not GPU, reason="plan tuning needs the GPU")
@pytest.mark.parametrize("case", PLAN_CASES, ids=case_id)
@pytest.mark.parametrize("plan", PLANS)
def test_sid_loss_op_plans(benchmark, monkeypatch, case, plan):
    """Forward op alone (loss + three gradients) under each kernel plan: what the fused op costs."""
    from sidfast.ops import sid_loss as op

    shape, dtype = case
    monkeypatch.setattr(op, "PLAN_OVERRIDE", _plan(plan, shape, dtype))
    benchmark.group = f"sid_loss op plans {case_id(case)}"
    ins = [torch.randn(shape, device=DEVICE, dtype=dtype) for _ in range(3)]

    def fwd():
        return torch.ops.sidfast.sid_loss_triton(*ins, 1.2, True, 2)

    fwd()
    record(benchmark, fwd, device=DEVICE, op="sid_loss op (forward: loss + 3 gradients)", impl=f"plan {plan}",
           shape=shape, dtype=dtype, bytes_moved=6 * ins[0].numel() * ins[0].element_size())
