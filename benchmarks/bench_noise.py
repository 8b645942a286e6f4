"""Noising x_t = a x0 + s eps with fresh Gaussian noise.

GPU: sidfast add_noise with eps drawn in the kernel (reads x0, writes x_t) and with explicit noise, vs
eager PyTorch (randn_like, then a*x0 + s*eps) and torch.compile of it. CPU: sidfast's CPU route (the
PyTorch Philox reference, so that the noise is regenerable) vs eager PyTorch.
"""
import pytest
import torch
from conftest import CASES, DEVICE, GPU, case_id
from telemetry import record

from sidfast import reference
from sidfast.ops import noise

IMPLS = ["sidfast", "sidfast-explicit", "eager", "compiled"] if GPU else ["sidfast-cpu", "eager"]


def eager_add_noise(x0, a, s):
    return reference.add_noise(x0, a.to(x0.dtype), s.to(x0.dtype), torch.randn_like(x0))


_compiled = torch.compile(eager_add_noise, dynamic=False) if GPU else None


@pytest.mark.parametrize("case", CASES, ids=case_id)
@pytest.mark.parametrize("impl", IMPLS)
def test_add_noise(benchmark, case, impl):
    shape, dtype = case
    benchmark.group = f"add_noise {case_id(case)}"
    x0 = torch.randn(shape, device=DEVICE, dtype=dtype)
    a = torch.rand(shape[0], device=DEVICE)
    s = torch.rand(shape[0], device=DEVICE)
    eps = torch.randn_like(x0)
    fns = {"sidfast": lambda: noise.add_noise(x0, a, s), "sidfast-cpu": lambda: noise.add_noise(x0, a, s),
           "sidfast-explicit": lambda: noise.add_noise(x0, a, s, noise=eps),
           "eager": lambda: eager_add_noise(x0, a, s), "compiled": lambda: _compiled(x0, a, s)}
    fn = fns[impl]
    fn()
    reads_writes = 3 if impl == "sidfast-explicit" else 2
    record(benchmark, fn, device=DEVICE, op="add_noise", impl=impl, shape=shape, dtype=dtype,
           bytes_moved=reads_writes * x0.numel() * x0.element_size())
