"""Noising ``x_t = a * x0 + s * eps`` with ``eps`` drawn inside the kernel and never written.

The noise is a pure function of a seed tensor and the element's position (the stream of
``sidfast/ops/_philox.py``), so a later kernel (the fake-score loss, a noise-space loss) can
regenerate exactly the same ``eps`` instead of reading it.

Seed handling without a host sync: ``add_noise`` draws ``seed = torch.randint(..., generator)`` as a
device tensor that the kernel ``tl.load``s. So ``torch.manual_seed`` reproduces the noise, and a
captured CUDA graph draws a fresh seed on every replay (torch's Philox offset advances per replay).

``torch.ops.sidfast.add_noise`` is a custom op with a fake (torch.compile traces it) and autograd:
``d x_t / d x0 = a`` per sample (gradients for a, s or an explicit noise are not provided: the
public function refuses inputs that would need them). With ``a`` the number 1 (EDM coordinates) the
eager backward hands the incoming gradient through instead of launching a scaling pass.
"""
from __future__ import annotations

import numbers

import torch

from sidfast import reference
from sidfast._checks import per_sample
from sidfast.schedules import broadcast
from sidfast.ops import backend
from sidfast.ops._common import acc_type, num_warps
from sidfast.ops._layout import batch_major_dense, common_dense_layout, empty_outputs_like
from sidfast.ops._philox import philox4x32
from sidfast.ops._philox import check_counter_range, draw_seed, layout_args, philox_normal, tile_shape
from sidfast.ops.backend import HAS_TRITON

# ---------------------------------------------------------------------------------------------
# Triton kernels
# ---------------------------------------------------------------------------------------------

if HAS_TRITON:
    import triton
    import triton.language as tl

    from sidfast.ops._philox import FAST_MATH, noise_tile, row_tile

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
        # x_t = a_t x0 + s_t eps (docs/math.md, "Forward process and schedules")
        tl.store(out_ptr + offs, (a * x + s * eps).to(out_ptr.dtype.element_ty), mask=mask)

    @triton.jit
    def _noise_kernel(seed_ptr, out_ptr, B, N, NQ, offset, n_chunks, ROWS: tl.constexpr, BLOCK_N: tl.constexpr,
                      FAST: tl.constexpr):
        """eps alone (float32, logical order): the noise the kernels above generate, bit for bit."""
        c0, rows, row_ok, mask, offs = row_tile(tl.program_id(0), n_chunks, B, N, ROWS, BLOCK_N)
        eps = noise_tile(tl.load(seed_ptr), rows, c0, NQ, 1, N, offset, False, ROWS, BLOCK_N, FAST)
        tl.store(out_ptr + offs, eps, mask=mask)

    @triton.jit
    def _scale_rows_kernel(g_ptr, a_ptr, out_ptr, B, N, n_chunks, ROWS: tl.constexpr, BLOCK_N: tl.constexpr,
                           ACC: tl.constexpr):
        """out[b] = a[b] * g[b]: the backward of x_t with respect to x0."""
        _, rows, row_ok, mask, offs = row_tile(tl.program_id(0), n_chunks, B, N, ROWS, BLOCK_N)
        a = tl.load(a_ptr + rows, mask=row_ok, other=0.0).to(ACC)[:, None]
        g = tl.load(g_ptr + offs, mask=mask, other=0.0).to(ACC)
        tl.store(out_ptr + offs, (a * g).to(out_ptr.dtype.element_ty), mask=mask)


# ---------------------------------------------------------------------------------------------
# Host launch
# ---------------------------------------------------------------------------------------------

def add_noise_triton_impl(x0: torch.Tensor, a: torch.Tensor, s: torch.Tensor, noise: torch.Tensor | None,
                          seed: torch.Tensor | None, offset: int) -> torch.Tensor:
    if noise is not None:
        x0, noise = common_dense_layout(x0, noise)
        out = empty_outputs_like(x0, noise)
    else:
        (x0,) = common_dense_layout(x0)
        out = empty_outputs_like(x0)
    a = a.reshape(-1).contiguous()
    s = s.reshape(-1).contiguous()
    B = x0.shape[0]
    lay = layout_args(x0)
    rows, block_n, n_chunks = tile_shape(B, lay["N"])
    grid = (backend.cdiv(B, rows) * n_chunks,)
    with backend.device_guard(x0.device):
        _add_noise_kernel[grid](x0, noise if noise is not None else x0, a, s, seed if seed is not None else a, out,
                                B, lay["N"], lay["NQ"], lay["C_CH"], lay["HW"], offset, n_chunks,
                                HAS_NOISE=noise is not None, CL=lay["CL"] and noise is None, ROWS=rows,
                                BLOCK_N=block_n, ACC=acc_type(x0.dtype), FAST=FAST_MATH,
                                num_warps=num_warps(rows * block_n, x0.element_size()))
    return out


def noise_triton_impl(seed: torch.Tensor, shape, offset: int) -> torch.Tensor:
    """float32 eps of shape (B, *F) in logical order, generated by the kernels' own noise functions."""
    B = shape[0]
    N = 1
    for d in shape[1:]:
        N *= d
    out = torch.empty(shape, dtype=torch.float32, device=seed.device)
    rows, block_n, n_chunks = tile_shape(B, N)
    with backend.device_guard(seed.device):
        _noise_kernel[(backend.cdiv(B, rows) * n_chunks,)](seed, out, B, N, backend.cdiv(N, 4), offset, n_chunks,
                                                          ROWS=rows, BLOCK_N=block_n, FAST=FAST_MATH,
                                                          num_warps=num_warps(rows * block_n))
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
    with backend.device_guard(grad.device):
        _scale_rows_kernel[(backend.cdiv(B, rows) * n_chunks,)](grad, a, out, B, N, n_chunks, ROWS=rows,
                                                                 BLOCK_N=block_n, ACC=acc_type(dtype),
                                                                 num_warps=num_warps(rows * block_n,
                                                                                     grad.element_size()))
    return out


# ---------------------------------------------------------------------------------------------
# Custom op (fake, autograd): the torch.compile route
# ---------------------------------------------------------------------------------------------

def _setup(ctx, inputs, output):
    x0 = inputs[0]
    a = inputs[1]
    ctx.save_for_backward(a)
    ctx.x0_dtype = x0.dtype


def _backward(ctx, grad):
    (a,) = ctx.saved_tensors
    return scale_rows(grad, a, ctx.x0_dtype), None, None, None, None, None


if HAS_TRITON:

    @torch.library.custom_op("sidfast::add_noise", mutates_args=())
    def add_noise_op(x0: torch.Tensor, a: torch.Tensor, s: torch.Tensor, noise: torch.Tensor | None,
                     seed: torch.Tensor | None, offset: int) -> torch.Tensor:
        """x_t = a x0 + s eps with eps = noise, or drawn in-kernel from seed (a (1,) int64 tensor) and offset."""
        return add_noise_triton_impl(x0, a, s, noise, seed, offset)

    @add_noise_op.register_fake
    def _(x0, a, s, noise, seed, offset):
        return empty_outputs_like(x0, noise) if noise is not None else empty_outputs_like(x0)

    add_noise_op.register_autograd(_backward, setup_context=_setup)


# ---------------------------------------------------------------------------------------------
# autograd.Function: the eager route
# ---------------------------------------------------------------------------------------------

class AddNoiseFunction(torch.autograd.Function):
    """``sidfast::add_noise`` with the same backward; eager calls launch the kernel directly, tracing goes
    through the op and its fake (``backend.launch_or_op``)."""

    @staticmethod
    def forward(ctx, x0, a, s, noise, seed, offset: int, unit_a: bool = False):
        run = backend.launch_or_op(torch.ops.sidfast.add_noise, add_noise_triton_impl, x0, a, s, noise, seed)
        ctx.save_for_backward(a)
        ctx.x0_dtype = x0.dtype
        ctx.unit_a = unit_a
        return run(x0, a, s, noise, seed, offset)

    @staticmethod
    def backward(ctx, grad):
        if ctx.unit_a and grad.dtype == ctx.x0_dtype:  # d x_t / d x0 = 1: nothing to compute
            return grad, None, None, None, None, None, None
        return (*_backward(ctx, grad), None)


# ---------------------------------------------------------------------------------------------
# Public functions
# ---------------------------------------------------------------------------------------------

def regenerate_noise(seed: torch.Tensor, shape, offset: int = 0) -> torch.Tensor:
    """The float32 eps that ``add_noise`` drew with ``seed`` and ``offset`` for data of ``shape``, bit for bit:
    generated by the same kernel functions on the Triton route (the compiled kernels' approximate sin/cos
    included), by ``philox_normal`` elsewhere (which is then the route ``add_noise`` took too)."""
    if HAS_TRITON and backend.use_triton(seed) and not backend.is_traced(seed):
        return noise_triton_impl(seed, tuple(shape), int(offset))
    return philox_normal(seed, shape, offset)


def add_noise(x0: torch.Tensor, a, s, noise: torch.Tensor | None = None, generator: torch.Generator | None = None,
              offset: int = 0) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Noise a batch: ``x_t = a * x0 + s * eps`` (docs/math.md, "Forward process and schedules").

    Args:
        x0: clean data, (B, *F), float16/bfloat16/float32/float64. Gradients flow to it (d x_t/d x0 = a).
        a, s: per-sample coefficients, (B,) tensors or numbers (EDM: a = 1, s = sigma); no gradients.
        noise: an explicit eps (B, *F) of x0's dtype, or None to draw eps inside the kernel.
        generator: torch generator for the seed (on x0's device); None uses the default one. Inside a CUDA-graph
            capture only the default generator advances per replay unless yours is registered with the graph
            (``graph.register_generator_state(generator)``); torch refuses an unregistered one.
        offset: Philox counter offset (non-negative int). This draw uses the counters
            [offset, offset + B * ceil(N / 4)) of the seed (N features per sample); draws from one seed are
            independent only when those ranges do not overlap (see ``sidfast/ops/_philox.py``).
    Returns:
        (x_t in x0's dtype and layout, seed): seed is the (1,) int64 tensor that regenerates eps
        (``regenerate_noise(seed, x0.shape, offset)``, or ``seed=`` of the fake-score loss); None when
        ``noise`` was given.
    """
    if not isinstance(x0, torch.Tensor) or not x0.is_floating_point():
        raise TypeError(f"x0 must be a floating-point torch.Tensor, got {type(x0).__name__}")
    if x0.dim() < 1 or x0.numel() == 0:
        raise ValueError(f"x0 must have shape (batch, *features) and be non-empty, got {tuple(x0.shape)}")
    unit_a = isinstance(a, numbers.Real) and not isinstance(a, bool) and float(a) == 1.0
    a = per_sample("a", a, x0)
    s = per_sample("s", s, x0)
    if noise is not None:
        if not isinstance(noise, torch.Tensor):
            raise TypeError(f"noise must be a torch.Tensor, got {type(noise).__name__}")
        if noise.shape != x0.shape or noise.dtype != x0.dtype or noise.device != x0.device:
            raise ValueError(f"noise must match x0 in shape, dtype and device: got {tuple(noise.shape)} "
                             f"{noise.dtype} {noise.device} for x0 {tuple(x0.shape)} {x0.dtype} {x0.device}")
    B = x0.shape[0]
    check_counter_range(B, x0.numel() // B, offset)
    if torch.is_grad_enabled() and any(t is not None and t.requires_grad for t in (a, s, noise)):
        raise ValueError("add_noise differentiates with respect to x0 only; detach a, s and noise")
    seed = None if noise is not None else draw_seed(x0.device, generator)
    if HAS_TRITON and backend.use_triton(x0):
        return AddNoiseFunction.apply(x0, a, s, noise, seed, int(offset), unit_a), seed
    eps = noise if noise is not None else philox_normal(seed, x0.shape, offset)
    acc = torch.float64 if x0.dtype == torch.float64 else torch.float32
    x_t = reference.add_noise(x0.to(acc), a.to(acc), s.to(acc), eps.to(acc)).to(x0.dtype)
    return x_t, seed
