"""Host-side cost of the fused ops' Python routes, with every Triton launch replaced by a no-op.

At CIFAR sizes the fused loss moves about 5 MB, 1.6 us of H100 bandwidth: its wall time is the host
work around the launch. These benchmarks time that host work alone, on CPU tensors routed to the
Triton wrappers, so they run on any machine (the outputs' allocations are CPU mallocs here, noisier
than CUDA's caching allocator; "meta" tensors would be slower, their shape functions run in
Python): the public function forward+backward, and the forward through the custom-op dispatcher
(what torch.compile traces) against the direct launch the eager route uses. The numbers are the
host's (this machine's CPU), not the GPU's; compare rows measured in one run.
"""
import pytest
import torch
from conftest import case_id
from telemetry import device_name, versions

import sidfast
from sidfast.ops import backend, grad_scale
from sidfast.ops import fake_score_loss as F
from sidfast.ops import noise as Nz
from sidfast.ops import sid_loss as S

pytestmark = pytest.mark.skipif(not backend.HAS_TRITON, reason="needs triton (the routes under test)")

CASE = ((64, 3, 32, 32), torch.float32)  # the smallest benchmark size (conftest.GPU_CASES): host time dominates


class _NoLaunch:
    """Stands in for a Triton kernel: ``kernel[grid](*args)`` does nothing."""

    def __getitem__(self, grid):
        return lambda *args, **kwargs: None


@pytest.fixture
def no_launch(monkeypatch):
    for mod, names in ((S, ("_sid_tile_kernel", "_sid_loop_kernel", "_sid_stats_kernel", "_sid_sample_kernel",
                            "_sid_apply_kernel")),
                       (grad_scale, ("_scale_inplace_kernel",)),
                       (Nz, ("_add_noise_kernel", "_noise_kernel", "_scale_rows_kernel")),
                       (F, ("_fake_score_kernel",))):
        for name in names:
            monkeypatch.setattr(mod, name, _NoLaunch())
    monkeypatch.setattr(backend, "use_triton", lambda t: True)  # CPU tensors take the Triton wrappers


def _inputs():
    shape, dtype = CASE
    x, r, f = (torch.zeros(shape, dtype=dtype, requires_grad=True) for _ in range(3))
    a, s = torch.ones(shape[0]), torch.ones(shape[0])
    return x, r, f, a, s


def _calls(op):
    x, r, f, a, s = _inputs()
    seed = Nz.draw_seed(x.device)
    codes = (F.PREDICTION_CODES["x0"], F.WEIGHTING_CODES["edm"], 0.5, 5.0, 2)
    if op == "sid_loss":
        return {"public fwd+bwd": lambda: torch.autograd.grad(sidfast.sid_generator_loss(r, f, x), [r, f, x]),
                "dispatcher fwd": lambda: torch.ops.sidfast.sid_loss_triton(r, f, x, 1.2, True, 2),
                "direct fwd": lambda: S.sid_loss_triton_impl(r, f, x, 1.2, True, 2)}
    if op == "add_noise":
        ones = torch.ones_like(x)
        return {"public fwd+bwd": lambda: torch.autograd.grad(Nz.add_noise(x, a, s)[0], [x], ones),
                "dispatcher fwd": lambda: torch.ops.sidfast.add_noise(x, a, s, None, seed, 0),
                "direct fwd": lambda: Nz.add_noise_triton_impl(x, a, s, None, seed, 0)}
    x0 = x.detach()
    return {"public fwd+bwd": lambda: torch.autograd.grad(F.fake_score_loss(r, x0, None, a, s, seed=seed), [r]),
            "dispatcher fwd": lambda: torch.ops.sidfast.fake_score_loss(r, x0, None, seed, 0, a, s, *codes),
            "direct fwd": lambda: F.fake_score_loss_triton_impl(r, x0, None, seed, 0, a, s, *codes)}


@pytest.mark.parametrize("route", ["public fwd+bwd", "dispatcher fwd", "direct fwd"])
@pytest.mark.parametrize("op", ["sid_loss", "add_noise", "fake_score_loss"])
def test_host_overhead(benchmark, no_launch, op, route):
    fn = _calls(op)[route]
    fn()
    benchmark.group = f"host overhead {op} {case_id(CASE)}"
    benchmark.extra_info.update(op=f"host overhead, launches stubbed: {op}", impl=route, shape=list(CASE[0]),
                                dtype=str(CASE[1]).replace("torch.", ""), device=device_name(torch.device("cpu")),
                                **{f"version_{k}": v for k, v in versions().items()})
    benchmark(fn)
