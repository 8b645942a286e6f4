"""Which implementation runs a fused op, and the launch helpers the Triton ops share.

Routing rule (issue 3): CUDA tensors run the Triton kernels; CPU tensors run the Triton kernels
under Triton's interpreter when ``TRITON_INTERPRET=1`` was set *before sidfast was imported*
(that is how CI tests the kernels without a GPU); otherwise CPU tensors run the native C++ op
(``sidfast::sid_loss``) or the plain PyTorch reference (ops without a native kernel).

Triton decides interpreted vs compiled when a kernel is decorated, i.e. when the op module is
imported, so ``INTERPRET`` is read once here. Kernels in interpreter mode keep their loops at
``tl.constexpr`` trip counts: the Triton 3.6 interpreter cannot take runtime loop bounds under
numpy >= 2.4.
"""
from __future__ import annotations

import contextlib
import os

import torch

try:  # triton is optional (no wheels off Linux): every op keeps a non-Triton route
    import triton
    import triton.language as tl  # noqa: F401

    HAS_TRITON = True
except ImportError:  # pragma: no cover - exercised only where triton is absent
    triton = None
    HAS_TRITON = False

#: The kernels are decorated in interpreter mode (TRITON_INTERPRET=1 when sidfast was imported), as Triton reads it.
INTERPRET: bool = HAS_TRITON and bool(triton.knobs.runtime.interpret)

_COUNTERS: dict = {}
_SMS: dict = {}


#: Where CPU tensors go while the kernels are interpreted: "triton" (the default under
#: TRITON_INTERPRET=1) or "native"; set with ``cpu_route`` (tests of the native route use it).
_CPU_ROUTE = "triton"


@contextlib.contextmanager
def cpu_route(route: str):
    """Within the block, CPU tensors take ``route`` ("native" or "triton") under the interpreter."""
    global _CPU_ROUTE
    if route not in ("native", "triton"):
        raise ValueError(f"route must be 'native' or 'triton', got {route!r}")
    previous, _CPU_ROUTE = _CPU_ROUTE, route
    try:
        yield
    finally:
        _CPU_ROUTE = previous


def use_triton(t: torch.Tensor) -> bool:
    """True when ``t``'s device runs the Triton kernels: CUDA, or CPU under the interpreter."""
    if not HAS_TRITON:
        return False
    if t.device.type == "cuda":
        return True  # (interpreted kernels, if TRITON_INTERPRET=1, run CUDA tensors through host copies)
    return t.device.type == "cpu" and INTERPRET and _CPU_ROUTE == "triton"


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


def counter(device: torch.device) -> torch.Tensor:
    """A zeroed int32 semaphore for "the last program finishes the reduction" (single-launch reductions).

    The kernel that uses it resets it to zero, so one buffer per (device, stream) serves every
    launch on that stream; launches on one stream never overlap. Create it (call the op once)
    before capturing a CUDA graph, as with any warm-up.
    """
    key = (device.type, device.index, torch.cuda.current_stream(device).stream_id if device.type == "cuda" else 0)
    buf = _COUNTERS.get(key)
    if buf is None:
        buf = _COUNTERS[key] = torch.zeros(1, dtype=torch.int32, device=device)
    return buf


def next_pow2(n: int) -> int:
    return 1 << max(0, (int(n) - 1).bit_length())


def cdiv(a: int, b: int) -> int:
    return -(-int(a) // int(b))


if HAS_TRITON:

    @triton.jit
    def finish_sum(part_ptr, counter_ptr, out_ptr, scale, n_programs, n_partials, R_ITERS: tl.constexpr,
                   RBLOCK: tl.constexpr):
        """Called by every program after it stored its partial sums: the last program to arrive sums
        ``part_ptr[0:n_partials]`` in a fixed order (deterministic), writes ``sum * scale`` to ``out_ptr``
        and re-arms the counter. No host sync, no second launch. ``R_ITERS * RBLOCK >= n_partials``."""
        tl.debug_barrier()  # every thread's partial stores precede the release below
        arrived = tl.atomic_add(counter_ptr, 1, sem="acq_rel")
        if arrived == n_programs - 1:
            acc = tl.zeros((RBLOCK,), out_ptr.dtype.element_ty)
            for i in range(R_ITERS):
                idx = i * RBLOCK + tl.arange(0, RBLOCK)
                acc += tl.load(part_ptr + idx, mask=idx < n_partials, other=0.0, cache_modifier=".cg")
            tl.store(out_ptr, tl.sum(acc, 0) * scale)
            tl.atomic_xchg(counter_ptr, 0)


RBLOCK = 1024


def reduce_args(n_partials: int) -> dict:
    """Constexpr arguments of ``finish_sum`` for ``n_partials`` partial sums."""
    rblock = min(RBLOCK, next_pow2(max(n_partials, 16)))
    return dict(R_ITERS=cdiv(n_partials, rblock), RBLOCK=rblock)


def compile_for_gpu(kernel, args: dict, constexprs: dict, num_warps: int = 4, arch: int = 90,
                    divisible: tuple = ()) -> dict:
    """Compile a Triton kernel for an NVIDIA GPU on a machine without one (a development check).

    ``args`` maps every runtime argument to a Triton type ("*bf16", "i32", "fp32", ...), ``constexprs``
    the compile-time ones; ``divisible`` names arguments to specialise as multiples of 16 (what the JIT
    does at run time for such values, enabling vector loads). Returns the cubin's register count, its
    local-memory (spill) bytes and the PTX. Needs kernels decorated without TRITON_INTERPRET.
    """
    import inspect
    import subprocess
    import tempfile

    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    names = list(inspect.signature(kernel.fn).parameters)
    signature = {n: ("constexpr" if n in constexprs else args[n]) for n in names}
    attrs = {(names.index(n),): [["tt.divisibility", 16]] for n in divisible}
    compiled = triton.compile(ASTSource(fn=kernel, signature=signature, constexprs=dict(constexprs), attrs=attrs),
                              target=GPUTarget("cuda", arch, 32), options={"num_warps": num_warps})
    cuobjdump = os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin", "cuobjdump")
    with tempfile.NamedTemporaryFile(suffix=".cubin") as fh:
        fh.write(compiled.asm["cubin"])
        fh.flush()
        usage = subprocess.run([cuobjdump, "-res-usage", fh.name], capture_output=True, text=True, check=True).stdout
    fields = dict(kv.split(":") for line in usage.splitlines() if "REG:" in line for kv in line.split() if ":" in kv)
    return dict(registers=int(fields["REG"]), spill_bytes=int(fields.get("LOCAL", 0)), ptx=compiled.asm["ptx"],
                ttgir=compiled.asm["ttgir"])


TRITON_TYPES = {torch.float16: "fp16", torch.bfloat16: "bf16", torch.float32: "fp32", torch.float64: "fp64"}


def compile_report(module: str, arch: int = 90, timeout: float = 600) -> list[dict]:
    """Compile every kernel configuration ``module.compile_specs()`` lists for an NVIDIA ``arch``, in a
    fresh interpreter without TRITON_INTERPRET (so it works from an interpreted test session, and
    without a GPU). Returns one dict per spec: name, registers, spill_bytes."""
    import json
    import subprocess
    import sys

    code = ("import json, importlib\n"
            "from sidfast.ops import backend\n"
            f"mod = importlib.import_module({module!r})\n"
            "out = []\n"
            "for spec in mod.compile_specs():\n"
            "    r = backend.compile_for_gpu(spec['kernel'], spec['args'], spec['constexprs'], spec['num_warps'],"
            f" {arch}, spec.get('divisible', ()))\n"
            "    out.append(dict(name=spec['name'], registers=r['registers'], spill_bytes=r['spill_bytes']))\n"
            "print('REPORT' + json.dumps(out))\n")
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=timeout)
    if proc.returncode != 0:
        raise RuntimeError(f"compiling {module}'s kernels for sm_{arch} failed:\n{proc.stderr[-4000:]}")
    line = [ln for ln in proc.stdout.splitlines() if ln.startswith("REPORT")][-1]
    return json.loads(line[len("REPORT"):])


if __name__ == "__main__":  # python -m sidfast.ops.backend: register use of every kernel on sm_90
    for mod in ("sidfast.ops.sid_loss", "sidfast.ops.noise", "sidfast.ops.fake_score_loss", "sidfast.ops.grad_scale"):
        for row in compile_report(mod):
            print(f"{row['name']:60s} registers {row['registers']:4d}  spill bytes {row['spill_bytes']}")
