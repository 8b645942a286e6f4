"""Which implementation runs a fused op, and the launch helpers the Triton ops share.

Routing rule: CUDA tensors run the Triton kernels; CPU tensors run the Triton kernels under
Triton's interpreter when ``TRITON_INTERPRET=1`` was set *before sidfast was imported* (that is how
the tests run the kernels without a GPU, tests/conftest.py); otherwise CPU tensors run the native
C++ op (``sidfast::sid_loss``) or the plain PyTorch reference (ops without a native kernel).

Triton decides interpreted vs compiled when a kernel is decorated, i.e. when the op module is
imported, so ``INTERPRET`` is read once here.
"""
from __future__ import annotations

import contextlib

import torch

try:  # triton is optional (no wheels off Linux): every op keeps a non-Triton route
    import triton
    import triton.language as tl  # noqa: F401

    HAS_TRITON = True
except ImportError:  # pragma: no cover - exercised only where triton is absent
    triton = None
    HAS_TRITON = False

#: The kernels are decorated in interpreter mode (TRITON_INTERPRET=1 when sidfast was imported).
INTERPRET: bool = HAS_TRITON and bool(triton.knobs.runtime.interpret)

_COUNTERS: dict = {}
_SMS: dict = {}


def use_triton(t: torch.Tensor) -> bool:
    """True when ``t``'s device runs the Triton kernels: CUDA, or CPU under the interpreter."""
    if not HAS_TRITON:
        return False
    if t.device.type == "cuda":
        return True  # (interpreted kernels, if TRITON_INTERPRET=1, run CUDA tensors through host copies)
    return t.device.type == "cpu" and INTERPRET


def backend(t: torch.Tensor) -> str:
    """"triton" (compiled), "triton-interpret" or "native" for tensors on ``t``'s device."""
    if not use_triton(t):
        return "native"
    return "triton-interpret" if INTERPRET else "triton"


def is_traced(*ts: torch.Tensor) -> bool:
    """True while torch.compile / export traces (Dynamo, or FakeTensor/FunctionalTensor/proxy tensors in
    AOTAutograd): launch no raw kernels then."""
    if torch.compiler.is_compiling():
        return True
    return any(type(t) is not torch.Tensor and not isinstance(t, torch.nn.Parameter) for t in ts)


def launch_or_op(op, launch, *args):
    """What a fused op's autograd.Function calls: the custom ``op`` while tracing (torch.compile traces it through
    its fake), else the direct ``launch`` (eager calls skip the custom-op dispatcher's host cost, about 40 us per
    call; benchmarks/bench_host_overhead.py). ``args`` may hold non-tensors and None."""
    return op if is_traced(*(a for a in args if isinstance(a, torch.Tensor))) else launch


def current_cuda_device() -> int:
    """The current CUDA device index (the device Triton launches on)."""
    return torch.cuda.current_device()


def device_guard(device: torch.device):
    """Context for launching kernels on ``device``'s tensors.

    Triton launches on the current CUDA device and its current stream, whatever device the pointers
    belong to; so kernels for cuda:1 tensors switch the current device first. The switch is entered
    only when the devices differ (a device switch costs a driver call; the usual single-GPU call
    pays one integer comparison).
    """
    if device.type != "cuda" or device.index is None or device.index == current_cuda_device():
        return contextlib.nullcontext()
    return torch.cuda.device(device.index)


def num_sms(device: torch.device) -> int:
    """Streaming multiprocessors of a CUDA device (4 for the interpreter), cached: no query per call."""
    if device.type != "cuda":
        return 4
    idx = device.index if device.index is not None else torch.cuda.current_device()
    if idx not in _SMS:
        _SMS[idx] = torch.cuda.get_device_properties(idx).multi_processor_count
    return _SMS[idx]


def l2_bytes(device: torch.device) -> int:
    """L2 cache size of a CUDA device (a small stand-in for the interpreter)."""
    if device.type != "cuda":
        return 1 << 16
    props = torch.cuda.get_device_properties(device)
    return int(getattr(props, "L2_cache_size", 50 << 20) or (50 << 20))


def capturing(device: torch.device) -> bool:
    """True while the current stream of CUDA ``device`` is being captured into a CUDA graph."""
    return device.type == "cuda" and torch.cuda.is_current_stream_capturing()


def counter(device: torch.device, cached: bool = True) -> torch.Tensor:
    """A zeroed int32 semaphore for "the last program finishes the reduction" (single-launch reductions).

    The kernel that uses it resets it to zero, so in eager mode one buffer per (device, stream) serves
    every launch on that stream: launches on one stream never overlap. The stream is the current
    stream of ``device``, the one the launch runs on inside ``device_guard(device)``.

    A fresh zeroed buffer is returned instead (``torch.zeros``, one memset) when ``cached`` is False
    or the stream is being captured into a CUDA graph: a buffer cached during capture would come
    from that graph's private memory pool and its zero-fill would be recorded in that graph only, so
    a second graph (or an eager call) could find it in use or non-zero. Under capture the memset
    becomes part of the graph and the buffer belongs to it.

    The custom ops (the torch.compile route) always pass ``cached=False``: with
    ``mode="reduce-overhead"`` their eager warm-up runs allocate from the CUDA-graph trees' pool,
    whose allocator state is checkpointed and restored between recordings, so a cached buffer
    created there could be handed out again while still in use. A fresh buffer per call is owned
    by the compiled graph like any temporary; the cost is one memset per call.
    """
    if not cached or capturing(device):
        return torch.zeros(1, dtype=torch.int32, device=device)
    key = (device.type, device.index, torch.cuda.current_stream(device).stream_id if device.type == "cuda" else 0)
    buf = _COUNTERS.get(key)
    if buf is None:
        buf = _COUNTERS[key] = torch.zeros(1, dtype=torch.int32, device=device)
    return buf


def next_pow2(n: int) -> int:
    return 1 << max(0, (int(n) - 1).bit_length())


def cdiv(a: int, b: int) -> int:
    return -(-int(a) // int(b))
