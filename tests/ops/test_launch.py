"""Launch plumbing shared by the fused ops (sidfast/ops/backend.py, sidfast/ops/_common.py): the CUDA device
guard, the cross-program reduction counter under CUDA-graph capture, and one compiled kernel per plan
whatever the batch and feature sizes (runtime loop bounds)."""
import contextlib
import inspect

import pytest
import torch

from sidfast.ops import backend, grad_scale
from sidfast.ops import fake_score_loss as F
from sidfast.ops import noise as Nz
from sidfast.ops import sid_loss as S

from utils import DEVICE, requires_cuda, requires_gpus, triton_route

two_gpus = requires_gpus(2, reason="needs a GPU pair (CUDA devices 0 and 1)")

KERNELS = ((S, ("_sid_tile_kernel", "_sid_loop_kernel", "_sid_stats_kernel", "_sid_sample_kernel",
                "_sid_apply_kernel")),
           (grad_scale, ("_scale_inplace_kernel",)),
           (Nz, ("_add_noise_kernel", "_noise_kernel", "_scale_rows_kernel")),
           (F, ("_fake_score_kernel",)))
PLANS = {"tile": dict(kind="tile", BLOCK_N=32, ROWS=2), "loop": dict(kind="loop", BLOCK=16, PROGRAMS=2),
         "split": dict(kind="split", BLOCK=16)}


def _run_every_kernel(plan_kind, monkeypatch, B=3, N=40):
    """Forward and backward (grad_output != 1) of every fused op on (B, N) data: every kernel launches."""
    monkeypatch.setattr(S, "PLAN_OVERRIDE", PLANS[plan_kind])
    ins = [torch.randn(B, N, device=DEVICE, requires_grad=True) for _ in range(3)]
    loss = S.sid_loss(*ins, 1.2, True, "batchmean")
    torch.autograd.grad(loss * 3.0, ins)
    a = torch.rand(B, device=DEVICE) + 0.5
    s = torch.rand(B, device=DEVICE) + 0.5
    x_t, seed = Nz.add_noise(ins[0], a, s)
    torch.autograd.grad(x_t, [ins[0]], torch.ones_like(x_t))
    Nz.regenerate_noise(seed, (B, N))
    fl = F.fake_score_loss(ins[1], ins[2].detach(), None, a, s, seed=seed)
    torch.autograd.grad(fl * 2.0, [ins[1]])


# ---- device guard ---------------------------------------------------------------------------------

def test_device_guard_switches_only_to_another_cuda_device(monkeypatch):
    monkeypatch.setattr(backend, "current_cuda_device", lambda: 0)
    guard = backend.device_guard(torch.device("cuda", 1))
    assert isinstance(guard, torch.cuda.device) and guard.idx == 1
    for same in (torch.device("cuda", 0), torch.device("cpu")):
        assert isinstance(backend.device_guard(same), contextlib.nullcontext)


@triton_route
@pytest.mark.parametrize("plan_kind", list(PLANS))
def test_every_launch_runs_inside_the_device_guard(plan_kind, monkeypatch):
    state = {"inside": [], "launches": []}

    @contextlib.contextmanager
    def guard(device):
        state["inside"].append(device)
        try:
            yield
        finally:
            state["inside"].pop()

    class Checked:
        def __init__(self, name, kernel):
            self.name = name
            self.kernel = kernel

        def __getitem__(self, grid):
            def launch(*args, **kwargs):
                tensor_devices = {a.device for a in args if isinstance(a, torch.Tensor)}
                assert state["inside"] and tensor_devices == {state["inside"][-1]}, self.name
                state["launches"].append(self.name)
                return self.kernel[grid](*args, **kwargs)
            return launch

    monkeypatch.setattr(backend, "device_guard", guard)
    for mod, names in KERNELS:
        for name in names:
            monkeypatch.setattr(mod, name, Checked(name, getattr(mod, name)))
    _run_every_kernel(plan_kind, monkeypatch)
    expected = {"tile": {"_sid_tile_kernel"}, "loop": {"_sid_loop_kernel"},
                "split": {"_sid_stats_kernel", "_sid_sample_kernel", "_sid_apply_kernel"}}[plan_kind]
    others = {"_scale_inplace_kernel", "_add_noise_kernel", "_noise_kernel", "_scale_rows_kernel",
              "_fake_score_kernel"}
    assert set(state["launches"]) == expected | others


@two_gpus
def test_gpu_tensors_on_another_device_than_the_current_one():
    torch.cuda.set_device(0)
    ins = [torch.randn(4, 3, 16, 16, device="cuda:1", dtype=torch.float64, requires_grad=True)
           for _ in range(3)]
    loss = S.sid_loss(*ins, 1.2, True, "batchmean")
    grads = torch.autograd.grad(loss * 2.0, ins)
    ref_ins = [t.detach().cpu().requires_grad_() for t in ins]
    ref = S.reference.sid_generator_loss(*ref_ins, 1.2, "batchmean")
    ref_grads = torch.autograd.grad(ref * 2.0, ref_ins)
    torch.cuda.synchronize(1)
    torch.testing.assert_close(loss.cpu(), ref)
    for got, want in zip(grads, ref_grads):
        torch.testing.assert_close(got.cpu(), want)
    x_t, seed = Nz.add_noise(ins[0].detach(), 1.0, 0.5)
    torch.testing.assert_close(x_t, ins[0].detach() + 0.5 * Nz.regenerate_noise(seed, x_t.shape).double())
    assert torch.cuda.current_device() == 0


# ---- reduction counter -----------------------------------------------------------------------------

def test_counter_is_cached_in_eager_mode(monkeypatch):
    monkeypatch.setattr(backend, "_COUNTERS", {})
    first = backend.counter(torch.device("cpu"))
    assert first.dtype == torch.int32 and int(first) == 0
    assert backend.counter(torch.device("cpu")) is first


def test_counter_is_fresh_and_zeroed_per_call_under_capture(monkeypatch):
    monkeypatch.setattr(backend, "_COUNTERS", {})
    monkeypatch.setattr(backend, "capturing", lambda device: True)
    first = backend.counter(torch.device("cpu"))
    first.fill_(5)  # a buffer left non-zero must not be handed out again
    second = backend.counter(torch.device("cpu"))
    assert second is not first and second.data_ptr() != first.data_ptr() and int(second) == 0
    assert backend._COUNTERS == {}


@triton_route
def test_custom_ops_take_a_fresh_counter(monkeypatch):
    """The torch.compile route never caches a counter (CUDA-graph trees' pool; see backend.counter)."""
    monkeypatch.setattr(backend, "_COUNTERS", {})
    ins = [torch.randn(3, 8, device=DEVICE) for _ in range(3)]
    torch.ops.sidfast.sid_loss_triton(*ins, 1.2, True, 2)
    a = torch.ones(3, device=DEVICE)
    torch.ops.sidfast.fake_score_loss(ins[0], ins[1], ins[2], None, 0, a, a, 0, 0, 0.5, 5.0, 2)
    assert backend._COUNTERS == {}
    S.sid_loss(*ins, 1.2, True, "batchmean")
    assert len(backend._COUNTERS) == 1


# ---- one compiled kernel per plan ---------------------------------------------------------------

def _constexpr_names(kernel):
    return {n for n, p in inspect.signature(kernel.fn).parameters.items() if "constexpr" in str(p.annotation)}


@pytest.fixture
def recorded_launches(monkeypatch):
    """Replaces every kernel by a recorder of (kernel name, constexpr arguments, all arguments); no launch."""
    calls = []

    class Recorder:
        def __init__(self, name, kernel):
            self.name = name
            self.fn = kernel.fn

        def __getitem__(self, grid):
            def record(*args, **kwargs):
                kwargs.pop("num_warps", None)
                bound = inspect.signature(self.fn).bind(*args, **kwargs).arguments
                const = {k: v for k, v in bound.items() if k in _constexpr_names(self)}
                calls.append((self.name, const, bound))
            return record

    for mod, names in KERNELS:
        for name in names:
            monkeypatch.setattr(mod, name, Recorder(name, getattr(mod, name)))
    return calls


def _specializations(calls):
    return {(name, tuple(sorted((k, str(v)) for k, v in const.items()))) for name, const, _ in calls}


@triton_route
@pytest.mark.parametrize("plan_kind", list(PLANS))
def test_sid_loss_specialization_does_not_depend_on_shapes(plan_kind, monkeypatch, recorded_launches):
    monkeypatch.setattr(S, "PLAN_OVERRIDE", PLANS[plan_kind])
    for B, N in ((2, 20), (3, 70), (5, 300), (9, 33)):
        ins = [torch.empty(B, N, device=DEVICE) for _ in range(3)]
        S.sid_loss_triton_impl(*ins, 1.2, True, 2)
    assert len(recorded_launches) == 4 * (3 if plan_kind == "split" else 1)
    assert len(_specializations(recorded_launches)) == (3 if plan_kind == "split" else 1)
    # the shapes did reach the kernels, as runtime values: every launch saw a different N
    assert len({int(bound["N"]) for _, _, bound in recorded_launches}) == 4


@triton_route
def test_elementwise_ops_specialization_does_not_depend_on_batch_or_features(recorded_launches):
    for B, N in ((2, 2048), (3, 4096), (5, 6144)):
        x = torch.empty(B, N, device=DEVICE)
        a = torch.ones(B, device=DEVICE)
        seed = Nz.draw_seed(x.device)
        Nz.add_noise_triton_impl(x, a, a, None, seed, 0)
        Nz.noise_triton_impl(seed, (B, N), 0)
        F.fake_score_loss_triton_impl(x, x, None, seed, 0, a, a, 0, 0, 0.5, 5.0, 2)
        grad_scale.scale_inplace((x, x, x), torch.tensor(2.0))
    names = {name for name, _, _ in recorded_launches}
    assert len(_specializations(recorded_launches)) == len(names) == 4


@requires_cuda
def test_gpu_one_compiled_variant_across_batch_and_feature_sizes(monkeypatch):
    """Count compiled kernels: shapes with one plan and alignment (N a multiple of 16, B > 1) reuse one."""
    device = torch.device("cuda", torch.cuda.current_device())
    cases = {"loop": [(4, 4096), (6, 8192), (9, 12288)], "split": [(2, 4096), (3, 8192), (5, 12288)]}
    for kind, shapes in cases.items():
        monkeypatch.setattr(S, "PLAN_OVERRIDE", dict(kind=kind, BLOCK=1024, PROGRAMS=2))
        kernels = [S._sid_loop_kernel] if kind == "loop" else [S._sid_stats_kernel, S._sid_sample_kernel,
                                                                 S._sid_apply_kernel]
        before = [len(k.device_caches[device.index][0]) for k in kernels]
        for B, N in shapes:
            ins = [torch.randn(B, N, device=device) for _ in range(3)]
            S.sid_loss_triton_impl(*ins, 1.2, True, 2)
        after = [len(k.device_caches[device.index][0]) for k in kernels]
        assert all(b2 - b1 <= 1 for b1, b2 in zip(before, after)), (kind, before, after)
