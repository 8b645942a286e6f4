"""Noising ``x_t = a * x0 + s * eps`` with ``eps`` drawn inside the kernel and never written (SPEC section 1).

The noise is a pure function of a seed tensor and the element's position, so a later kernel (the
fake-score loss, a noise-space loss) can regenerate exactly the same ``eps`` instead of reading it:

    eps[b, l] = component (l % 4) of randn4x(seed, offset + b * ceil(N / 4) + l // 4)

``b`` is the sample, ``l`` the element's *logical* (row-major) index within the sample's N features,
``randn4x`` Triton's Philox4x32-10 + Box-Muller (four normals per counter; one Philox call per four
elements keeps the kernel near memory speed). Logical indexing makes the noise independent of
memory layout (contiguous and channels_last give the same eps; channels_last costs four Philox
calls per four elements). Compiled kernels use the GPU's approximate log/sin/cos in Box-Muller
(absolute error about 1e-6 against ``philox_normal``); the interpreter uses the accurate ones.

Seed handling without a host sync: ``add_noise`` draws ``seed = torch.randint(..., generator)`` as a
device tensor that the kernel ``tl.load``s. So ``torch.manual_seed`` reproduces the noise, and a
captured CUDA graph draws a fresh seed on every replay (torch's Philox offset advances per replay).
``philox_normal`` is the readable PyTorch reference of the same stream (the CPU route and the test
oracle). ``offset`` (a Python int, counter units) selects an independent stream from one seed.

``torch.ops.sidfast.add_noise`` is a custom op with a fake (torch.compile traces it) and autograd:
``d x_t / d x0 = a`` per sample (gradients for a, s or an explicit noise are not provided: the
public function refuses inputs that would need them).
"""
from __future__ import annotations

import numbers

import torch

from .. import reference
from ..schedules import broadcast
from . import backend
from ._layout import batch_major_dense, common_dense_layout, empty_outputs_like
from .backend import HAS_TRITON

SEED_HIGH = 2 ** 62
MAX_COUNTER = 2 ** 31

# Philox4x32-10 constants (Salmon et al. 2011), as in triton.language.random
_KEY_A, _KEY_B = 0x9E3779B9, 0xBB67AE85
_ROUND_A, _ROUND_B = 0xD2511F53, 0xCD9E8D57
_M32 = 0xFFFFFFFF


# ---------------------------------------------------------------------------------------------
# Readable reference of the noise stream (PyTorch, any device)
# ---------------------------------------------------------------------------------------------

def _mulhilo32(k: int, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """High and low 32 bits of k * v for k, v < 2^32, in int64 arithmetic that never overflows."""
    hi16, lo16 = v >> 16, v & 0xFFFF
    ph, pl = k * hi16, k * lo16  # each < 2^48
    return (ph + (pl >> 16)) >> 16, (((ph & 0xFFFF) << 16) + pl) & _M32


def philox4x32(seed: int | torch.Tensor, counter: torch.Tensor, rounds: int = 10):
    """Philox4x32 on counters (c0=counter, c1=c2=c3=0) with key = seed (split in low/high words)."""
    seed = torch.as_tensor(seed, dtype=torch.int64, device=counter.device).reshape(())
    k0, k1 = seed & _M32, (seed >> 32) & _M32
    c0, c1 = counter.to(torch.int64) & _M32, torch.zeros_like(counter, dtype=torch.int64)
    c2, c3 = torch.zeros_like(c1), torch.zeros_like(c1)
    for _ in range(rounds):
        hi_b, lo_b = _mulhilo32(_ROUND_B, c2)
        hi_a, lo_a = _mulhilo32(_ROUND_A, c0)
        c0, c1, c2, c3 = hi_b ^ c1 ^ k0, lo_b, hi_a ^ c3 ^ k1, lo_a
        k0, k1 = (k0 + _KEY_A) & _M32, (k1 + _KEY_B) & _M32
    return c0, c1, c2, c3


def _uniform(u32: torch.Tensor) -> torch.Tensor:
    """uint32 -> float32 in [0, 1), as triton.language.random.uint_to_uniform_float."""
    x = torch.where(u32 >= 2 ** 31, u32 - 2 ** 32, u32)
    x = torch.where(x < 0, -x - 1, x)
    return x.to(torch.float32) * 4.6566127342e-10


def _box_muller(u1: torch.Tensor, u2: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    u1 = torch.clamp(u1, min=1.0e-7)
    th = 6.283185307179586 * u2
    r = torch.sqrt(-2.0 * torch.log(u1))
    return r * torch.cos(th), r * torch.sin(th)


def philox_normal(seed: torch.Tensor, shape, offset: int = 0, device=None) -> torch.Tensor:
    """The float32 noise ``add_noise`` draws for ``seed`` and ``offset``, at shape (B, *F) (logical order)."""
    shape = tuple(shape)
    device = seed.device if device is None else torch.device(device)
    B = shape[0]
    N = 1
    for d in shape[1:]:
        N *= d
    nq = backend.cdiv(N, 4)
    l = torch.arange(N, device=device, dtype=torch.int64)
    counter = offset + torch.arange(B, device=device, dtype=torch.int64)[:, None] * nq + (l // 4)[None, :]
    c = philox4x32(seed.to(device), counter)
    n0, n1 = _box_muller(_uniform(c[0]), _uniform(c[1]))
    n2, n3 = _box_muller(_uniform(c[2]), _uniform(c[3]))
    comp = (l % 4)[None, :]
    eps = torch.where(comp == 0, n0, torch.where(comp == 1, n1, torch.where(comp == 2, n2, n3)))
    return eps.reshape(shape)


def draw_seed(device, generator: torch.Generator | None = None) -> torch.Tensor:
    """A (1,) int64 seed tensor drawn on ``device`` from torch's generator: no host sync, graph-replay safe."""
    return torch.randint(0, SEED_HIGH, (1,), dtype=torch.int64, device=device, generator=generator)


def check_counter_range(B: int, N: int, offset: int) -> None:
    if isinstance(offset, bool) or not isinstance(offset, numbers.Integral) or offset < 0:
        raise ValueError(f"offset must be a non-negative int, got {offset!r}")
    if offset + B * backend.cdiv(N, 4) >= MAX_COUNTER:
        raise ValueError(f"offset + B * ceil(N/4) = {offset + B * backend.cdiv(N, 4)} exceeds the 2^31 Philox "
                         "counters of one seed; draw a new seed instead of a large offset")


def channels_last_order(t: torch.Tensor) -> bool:
    """Memory order is (B, *spatial, C) and differs from the logical order (so the kernels remap indices)."""
    if t.is_contiguous():
        return False
    return ((t.dim() == 4 and t.is_contiguous(memory_format=torch.channels_last))
            or (t.dim() == 5 and t.is_contiguous(memory_format=torch.channels_last_3d)))


def layout_args(t: torch.Tensor) -> dict:
    """Runtime/constexpr arguments of ``noise_tile`` for a batch-major dense tensor ``t``."""
    B = t.shape[0]
    N = t.numel() // B
    cl = channels_last_order(t)
    C = t.shape[1] if cl else 1
    return dict(N=N, NQ=backend.cdiv(N, 4), C_CH=C, HW=N // C, CL=cl)


# ---------------------------------------------------------------------------------------------
# Triton kernels
# ---------------------------------------------------------------------------------------------

if HAS_TRITON:
    import triton
    import triton.language as tl
    from triton.language.extra import libdevice

    #: approximate transcendental functions in the noise (compiled kernels only)
    FAST_MATH = not backend.INTERPRET

    @triton.jit
    def _pair_normal(u1, u2, FAST: tl.constexpr):
        """Box-Muller (as tl.pair_uniform_to_normal). The radius always takes the accurate log: near u1 = 1 the
        approximate __logf's absolute error (~4e-7) exceeds -log(u1) itself, which would make the radius
        inaccurate (its error is err / r) or NaN (a positive "log"). FAST uses the GPU's approximate sin/cos
        (absolute error ~1e-6, times a radius below 6); not in the interpreter."""
        u1 = tl.maximum(1.0e-7, u1)
        th = 6.283185307179586 * u2
        r = tl.sqrt(tl.maximum(-2.0 * tl.log(u1), 0.0))
        if FAST:
            return r * libdevice.fast_cosf(th), r * libdevice.fast_sinf(th)
        else:
            return r * tl.cos(th), r * tl.sin(th)

    @triton.jit
    def _normal4(seed, counter, FAST: tl.constexpr):
        """Four standard normals per Philox4x32-10 counter (tl.randn4x with a selectable Box-Muller)."""
        i0, i1, i2, i3 = tl.randint4x(seed, counter)
        n0, n1 = _pair_normal(tl.uint_to_uniform_float(i0), tl.uint_to_uniform_float(i1), FAST)
        n2, n3 = _pair_normal(tl.uint_to_uniform_float(i2), tl.uint_to_uniform_float(i3), FAST)
        return n0, n1, n2, n3

    @triton.jit
    def noise_tile(seed, rows, c0, NQ, C_CH, HW, offset, CL: tl.constexpr, ROWS: tl.constexpr,
                   BLOCK_N: tl.constexpr, FAST: tl.constexpr):
        """eps (float32, [ROWS, BLOCK_N]) for samples ``rows`` and memory positions c0 + [0, BLOCK_N) in each
        sample (c0 a multiple of BLOCK_N, BLOCK_N a multiple of 4). See the module docstring for the stream."""
        base = offset + rows[:, None] * NQ
        if CL:
            m = c0 + tl.arange(0, BLOCK_N)[None, :]          # memory position: spatial-major, channel fastest
            l = (m % C_CH) * HW + m // C_CH                  # logical index channel * HW + spatial
            n0, n1, n2, n3 = _normal4(seed, base + l // 4, FAST)
            comp = l % 4
            return tl.where(comp == 0, n0, tl.where(comp == 1, n1, tl.where(comp == 2, n2, n3)))
        else:
            q = base + c0 // 4 + tl.arange(0, BLOCK_N // 4)[None, :]
            n0, n1, n2, n3 = _normal4(seed, q, FAST)
            # interleave so that position 4q + k holds component k
            return tl.reshape(tl.join(tl.join(n0, n2), tl.join(n1, n3)), (ROWS, BLOCK_N))

    @triton.jit
    def row_tile(pid, n_chunks, B, N, ROWS: tl.constexpr, BLOCK_N: tl.constexpr):
        """The (ROWS samples x BLOCK_N features) tile of program ``pid`` in a grid of row groups times
        ``n_chunks`` feature chunks: (first column, row indices, row mask, element mask, element offsets)."""
        c0 = (pid % n_chunks) * BLOCK_N
        rows = (pid // n_chunks) * ROWS + tl.arange(0, ROWS)
        cols = c0 + tl.arange(0, BLOCK_N)
        row_ok = rows < B
        mask = row_ok[:, None] & (cols < N)[None, :]
        return c0, rows, row_ok, mask, rows.to(tl.int64)[:, None] * N + cols[None, :]

    @triton.jit
    def _add_noise_kernel(x_ptr, noise_ptr, a_ptr, s_ptr, seed_ptr, out_ptr, B, N, NQ, C_CH, HW, offset, n_chunks,
                          HAS_NOISE: tl.constexpr, CL: tl.constexpr, ROWS: tl.constexpr, BLOCK_N: tl.constexpr,
                          ACC: tl.constexpr, FAST: tl.constexpr):
        c0, rows, row_ok, mask, offs = row_tile(tl.program_id(0), n_chunks, B, N, ROWS, BLOCK_N)
        a = tl.load(a_ptr + rows, mask=row_ok, other=0.0).to(ACC)[:, None]
        s = tl.load(s_ptr + rows, mask=row_ok, other=0.0).to(ACC)[:, None]
        x = tl.load(x_ptr + offs, mask=mask, other=0.0).to(ACC)
        if HAS_NOISE:
            eps = tl.load(noise_ptr + offs, mask=mask, other=0.0).to(ACC)
        else:
            eps = noise_tile(tl.load(seed_ptr), rows, c0, NQ, C_CH, HW, offset, CL, ROWS, BLOCK_N, FAST).to(ACC)
        # x_t = a_t * x0 + s_t * eps (SPEC section 1)
        tl.store(out_ptr + offs, (a * x + s * eps).to(out_ptr.dtype.element_ty), mask=mask)

    @triton.jit
    def _scale_rows_kernel(g_ptr, a_ptr, out_ptr, B, N, n_chunks, ROWS: tl.constexpr, BLOCK_N: tl.constexpr,
                           ACC: tl.constexpr):
        """out[b] = a[b] * g[b]: the backward of x_t with respect to x0."""
        _, rows, row_ok, mask, offs = row_tile(tl.program_id(0), n_chunks, B, N, ROWS, BLOCK_N)
        a = tl.load(a_ptr + rows, mask=row_ok, other=0.0).to(ACC)[:, None]
        g = tl.load(g_ptr + offs, mask=mask, other=0.0).to(ACC)
        tl.store(out_ptr + offs, (a * g).to(out_ptr.dtype.element_ty), mask=mask)


TILE = 2048  # elements per program


def tile_shape(B: int, N: int) -> tuple[int, int, int]:
    """(ROWS, BLOCK_N, n_chunks) of an elementwise 2-D tiling over (samples, features)."""
    block_n = min(TILE, max(16, backend.next_pow2(N)))
    rows = max(1, min(backend.next_pow2(B), TILE // block_n))
    return rows, block_n, backend.cdiv(N, block_n)


def acc_type(dtype: torch.dtype):
    return tl.float64 if dtype == torch.float64 else tl.float32


def _num_warps(elems: int) -> int:
    return 4 if elems <= 1024 else 8


def add_noise_triton_impl(x0: torch.Tensor, a: torch.Tensor, s: torch.Tensor, noise: torch.Tensor | None,
                          seed: torch.Tensor | None, offset: int) -> torch.Tensor:
    if noise is not None:
        x0, noise = common_dense_layout(x0, noise)
        out = empty_outputs_like(x0, noise)
    else:
        (x0,) = common_dense_layout(x0)
        out = empty_outputs_like(x0)
    a, s = a.reshape(-1).contiguous(), s.reshape(-1).contiguous()
    B = x0.shape[0]
    lay = layout_args(x0)
    rows, block_n, n_chunks = tile_shape(B, lay["N"])
    grid = (backend.cdiv(B, rows) * n_chunks,)
    _add_noise_kernel[grid](x0, noise if noise is not None else x0, a, s, seed if seed is not None else a, out, B,
                            lay["N"], lay["NQ"], lay["C_CH"], lay["HW"], offset, n_chunks,
                            HAS_NOISE=noise is not None, CL=lay["CL"] and noise is None, ROWS=rows, BLOCK_N=block_n,
                            ACC=acc_type(x0.dtype), FAST=FAST_MATH, num_warps=_num_warps(rows * block_n))
    return out


def scale_rows(grad: torch.Tensor, a: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """a[b] * grad[b] in ``dtype`` (Triton when possible, PyTorch while tracing or off the Triton route)."""
    if not (HAS_TRITON and backend.use_triton(grad)) or backend.is_traced(grad, a):
        acc = torch.float64 if dtype == torch.float64 else torch.float32
        return (grad.to(acc) * broadcast(a.reshape(-1).to(acc), grad)).to(dtype)
    a = a.reshape(-1).contiguous()
    if not batch_major_dense(grad):
        grad = grad.contiguous()
    out = torch.empty_like(grad, dtype=dtype)
    B = grad.shape[0]
    N = grad.numel() // B
    rows, block_n, n_chunks = tile_shape(B, N)
    _scale_rows_kernel[(backend.cdiv(B, rows) * n_chunks,)](grad, a, out, B, N, n_chunks, ROWS=rows, BLOCK_N=block_n,
                                                             ACC=acc_type(dtype), num_warps=_num_warps(rows * block_n))
    return out


# ---------------------------------------------------------------------------------------------
# Custom op, autograd, public function
# ---------------------------------------------------------------------------------------------

if HAS_TRITON:

    @torch.library.custom_op("sidfast::add_noise", mutates_args=())
    def add_noise_op(x0: torch.Tensor, a: torch.Tensor, s: torch.Tensor, noise: torch.Tensor | None,
                     seed: torch.Tensor | None, offset: int) -> torch.Tensor:
        """x_t = a x0 + s eps with eps = noise, or drawn in-kernel from seed (a (1,) int64 tensor) and offset."""
        return add_noise_triton_impl(x0, a, s, noise, seed, offset)

    @add_noise_op.register_fake
    def _(x0, a, s, noise, seed, offset):
        return empty_outputs_like(x0, noise) if noise is not None else empty_outputs_like(x0)

    def _setup(ctx, inputs, output):
        x0, a = inputs[0], inputs[1]
        ctx.save_for_backward(a)
        ctx.x0_dtype = x0.dtype

    def _backward(ctx, grad):
        (a,) = ctx.saved_tensors
        return scale_rows(grad, a, ctx.x0_dtype), None, None, None, None, None

    add_noise_op.register_autograd(_backward, setup_context=_setup)


class AddNoiseFunction(torch.autograd.Function):
    """``sidfast::add_noise`` with the same backward; eager calls launch the kernel directly, tracing goes
    through the op and its fake (``backend.launch_or_op``)."""

    @staticmethod
    def forward(ctx, x0, a, s, noise, seed, offset: int):
        run = backend.launch_or_op(torch.ops.sidfast.add_noise, add_noise_triton_impl, x0, a, s, noise, seed)
        ctx.save_for_backward(a)
        ctx.x0_dtype = x0.dtype
        return run(x0, a, s, noise, seed, offset)

    @staticmethod
    def backward(ctx, grad):
        (a,) = ctx.saved_tensors
        return scale_rows(grad, a, ctx.x0_dtype), None, None, None, None, None


def per_sample(name: str, c, x: torch.Tensor) -> torch.Tensor:
    """A per-sample coefficient as a (B,) tensor on x's device (numbers broadcast)."""
    B = x.shape[0]
    if isinstance(c, numbers.Real) and not isinstance(c, bool):
        return torch.full((B,), float(c), device=x.device, dtype=torch.float32)
    if not isinstance(c, torch.Tensor):
        raise TypeError(f"{name} must be a tensor of shape (B,) or a number, got {type(c).__name__}")
    if not c.is_floating_point():
        raise TypeError(f"{name} must be floating point, got {c.dtype}")
    if c.numel() != B or (c.dim() > 1 and any(d != 1 for d in c.shape[1:])):
        raise ValueError(f"{name} must have one entry per sample ({B}), got shape {tuple(c.shape)}")
    if c.device != x.device:
        raise ValueError(f"{name} is on {c.device} but x0 is on {x.device}")
    c = c.reshape(-1)
    return c if c.is_contiguous() else c.contiguous()


def add_noise(x0: torch.Tensor, a, s, noise: torch.Tensor | None = None, generator: torch.Generator | None = None,
              offset: int = 0) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Noise a batch: ``x_t = a * x0 + s * eps`` (SPEC section 1).

    Args:
        x0: clean data, (B, *F), float16/bfloat16/float32/float64. Gradients flow to it (d x_t/d x0 = a).
        a, s: per-sample coefficients, (B,) tensors or numbers (EDM: a = 1, s = sigma); no gradients.
        noise: an explicit eps (B, *F) of x0's dtype, or None to draw eps inside the kernel.
        generator: torch generator for the seed (on x0's device); None uses the default one. Inside a CUDA-graph
            capture only the default generator advances per replay unless yours is registered with the graph
            (``graph.register_generator_state(generator)``); torch refuses an unregistered one.
        offset: Philox counter offset, to draw independent streams from one seed.
    Returns:
        (x_t in x0's dtype and layout, seed): seed is the (1,) int64 tensor that regenerates eps
        (``philox_normal(seed, x0.shape, offset)``, or ``seed=`` of the fake-score loss); None when
        ``noise`` was given.
    """
    if not isinstance(x0, torch.Tensor) or not x0.is_floating_point():
        raise TypeError(f"x0 must be a floating-point torch.Tensor, got {type(x0).__name__}")
    if x0.dim() < 1 or x0.numel() == 0:
        raise ValueError(f"x0 must have shape (batch, *features) and be non-empty, got {tuple(x0.shape)}")
    a, s = per_sample("a", a, x0), per_sample("s", s, x0)
    if noise is not None:
        if not isinstance(noise, torch.Tensor):
            raise TypeError(f"noise must be a torch.Tensor, got {type(noise).__name__}")
        if noise.shape != x0.shape or noise.dtype != x0.dtype or noise.device != x0.device:
            raise ValueError(f"noise must match x0 in shape, dtype and device: got {tuple(noise.shape)} "
                             f"{noise.dtype} {noise.device} for x0 {tuple(x0.shape)} {x0.dtype} {x0.device}")
    B, N = x0.shape[0], x0.numel() // x0.shape[0]
    check_counter_range(B, N, offset)
    if torch.is_grad_enabled() and any(t is not None and t.requires_grad for t in (a, s, noise)):
        raise ValueError("add_noise differentiates with respect to x0 only; detach a, s and noise")
    seed = None if noise is not None else draw_seed(x0.device, generator)
    if HAS_TRITON and backend.use_triton(x0):
        return AddNoiseFunction.apply(x0, a, s, noise, seed, int(offset)), seed
    eps = noise if noise is not None else philox_normal(seed, x0.shape, offset)
    acc = torch.float64 if x0.dtype == torch.float64 else torch.float32
    x_t = reference.add_noise(x0.to(acc), a.to(acc), s.to(acc), eps.to(acc)).to(x0.dtype)
    return x_t, seed


def compile_specs() -> list[dict]:
    """Representative kernel configurations for ``backend.compile_report`` (GPU compile checks)."""
    specs = []
    for dt in (torch.float32, torch.bfloat16, torch.float64):
        t = "*" + backend.TRITON_TYPES[dt]
        acc = acc_type(dt)
        args = dict(x_ptr=t, noise_ptr=t, a_ptr="*fp32", s_ptr="*fp32", seed_ptr="*i64", out_ptr=t, B="i32", N="i32",
                    NQ="i32", C_CH="i32", HW="i32", offset="i32", n_chunks="i32")
        for n in (16, 12288):
            rows, block_n, _ = tile_shape(64, n)
            for has_noise, cl in ((True, False), (False, False), (False, True)):
                specs.append(dict(name=f"add_noise {backend.TRITON_TYPES[dt]} N={n} noise={has_noise} cl={cl}",
                                  kernel=_add_noise_kernel, args=args,
                                  constexprs=dict(HAS_NOISE=has_noise, CL=cl, ROWS=rows, BLOCK_N=block_n, ACC=acc,
                                                  FAST=True),
                                  num_warps=_num_warps(rows * block_n), divisible=("x_ptr", "noise_ptr", "out_ptr", "N",
                                                                                   "NQ")))
        rows, block_n, _ = tile_shape(64, 12288)
        specs.append(dict(name=f"scale_rows {backend.TRITON_TYPES[dt]}", kernel=_scale_rows_kernel,
                          args=dict(g_ptr=t, a_ptr="*fp32", out_ptr=t, B="i32", N="i32", n_chunks="i32"),
                          constexprs=dict(ROWS=rows, BLOCK_N=block_n, ACC=acc), num_warps=_num_warps(rows * block_n),
                          divisible=("g_ptr", "out_ptr", "N")))
    return specs
