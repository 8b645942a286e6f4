"""The SiD generator loss with its three gradients computed in the forward pass.

Math: Zhou et al. 2024, eqs. 9-10, ``sidfast/reference.py: sid_generator_loss`` (docs/math.md, "SiD generator
loss"). Routes, the NaN mask and the kernel plans: docs/kernels.md, "SiD loss".
"""
from __future__ import annotations

import torch

from sidfast.ops import _native
from sidfast import reference
from sidfast.ops import backend
from sidfast.ops._common import (REDUCTION_CODES, RBLOCK, acc_type, loop_bound, loss_dtype, num_warps,
    reduce_iters)
from sidfast.ops._layout import common_dense_layout, empty_outputs_like
from sidfast.ops.backend import HAS_TRITON
from sidfast.ops.grad_scale import out_of_place, scale_saved_grads

# ---------------------------------------------------------------------------------------------
# Constants
# ---------------------------------------------------------------------------------------------

TILE_MAX_N = 8192      # samples up to this many features live in registers (tile plan)
TILE_ELEMS = 4096      # elements per program in the tile plan (ROWS * BLOCK_N), when N is small
LOOP_BYTES = 16384     # bytes per input and iteration in the loop plan (4096 float32, 8192 bfloat16)
SPLIT_BLOCK = 2048     # elements per program in the split plan
CBLOCK = 256           # chunk partials the split plan's per-sample kernel reduces per step
L2_FRACTION = 0.6      # share of L2 the loop plan's samples in flight may occupy

#: Set to a dict like ``{"kind": "split", "BLOCK": 16}`` to force a plan (tests, tuning benchmarks).
PLAN_OVERRIDE: dict | None = None

# ---------------------------------------------------------------------------------------------
# Triton kernels
# ---------------------------------------------------------------------------------------------

if HAS_TRITON:
    import triton
    import triton.language as tl

    from sidfast.ops._common import finish_sum, jit_with_loop_bounds

    @triton.jit
    def _sid_terms(r, f, x, alpha, inv_w, g):
        """Per element: loss and the three gradients, the gradients times g = scale / w."""
        d = r - f
        e = r - x
        # L = (f_phi - f_psi) * ((f_phi - x_g) - alpha (f_phi - f_psi)) / w (Zhou et al. 2024, eq. 9, denoised form)
        loss = d * (e - alpha * d) * inv_w
        # dL/df_phi = e + (1 - 2 alpha) d, dL/df_psi = 2 alpha d - e, dL/dx_g = -d, each over w with w held
        # constant (sidfast/reference.py: sid_gradients)
        return loss, (e + (1.0 - 2.0 * alpha) * d) * g, (2.0 * alpha * d - e) * g, -d * g

    @triton.jit
    def _isnan3(r, f, x):
        return ((r != r) | (f != f) | (x != x)).to(tl.int32)

    @triton.jit
    def _inv_w(abs_sum, N, NORMALIZE: tl.constexpr):
        """1 / w from a sample's sum |x_g - f_phi|: w = mean |x_g - f_phi| clipped at 1e-5, a constant
        (Zhou et al. 2024, eq. 10 normalizer); 1 without normalization."""
        if NORMALIZE:
            return 1.0 / tl.maximum(abs_sum / N, 1e-5)
        else:
            return 1.0

    @triton.jit
    def _store_grads(gr_ptr, gf_ptr, gx_ptr, offs, gr, gf, gx, keep, mask):
        """Store the three gradients, zero where ``keep`` is false (dropped NaN samples)."""
        tl.store(gr_ptr + offs, tl.where(keep, gr, 0.0).to(gr_ptr.dtype.element_ty), mask=mask)
        tl.store(gf_ptr + offs, tl.where(keep, gf, 0.0).to(gf_ptr.dtype.element_ty), mask=mask)
        tl.store(gx_ptr + offs, tl.where(keep, gx, 0.0).to(gx_ptr.dtype.element_ty), mask=mask)

    @triton.jit
    def _store_per_sample(drop_ptr, inv_w_ptr, idx, keep, inv_w, mask):
        """SiDA's extras: each sample's drop flag (1 dropped) and 1/w (0 when dropped)."""
        tl.store(drop_ptr + idx, tl.where(keep, 0, 1), mask=mask)
        tl.store(inv_w_ptr + idx, tl.where(keep, inv_w, 0.0).to(inv_w_ptr.dtype.element_ty), mask=mask)

    @jit_with_loop_bounds("r_iters")
    def _sid_tile_kernel(r_ptr, f_ptr, x_ptr, gr_ptr, gf_ptr, gx_ptr, loss_ptr, part_ptr, counter_ptr, out_ptr,
                         drop_ptr, inv_w_ptr, B, N, alpha, grad_scale, loss_scale, n_programs, r_iters,
                         NORMALIZE: tl.constexpr, REDUCE: tl.constexpr, ROWS: tl.constexpr, BLOCK_N: tl.constexpr,
                         ACC: tl.constexpr, RBLOCK: tl.constexpr, PER_SAMPLE: tl.constexpr):
        """ROWS whole samples per program, held in registers: one read, one write."""
        pid = tl.program_id(0)
        rows = pid * ROWS + tl.arange(0, ROWS)
        cols = tl.arange(0, BLOCK_N)
        row_ok = rows < B
        mask = row_ok[:, None] & (cols[None, :] < N)
        offs = rows.to(tl.int64)[:, None] * N + cols[None, :]
        r = tl.load(r_ptr + offs, mask=mask, other=0.0).to(ACC)
        f = tl.load(f_ptr + offs, mask=mask, other=0.0).to(ACC)
        x = tl.load(x_ptr + offs, mask=mask, other=0.0).to(ACC)
        keep = tl.max(_isnan3(r, f, x), axis=1, keep_dims=True) == 0
        if PER_SAMPLE:
            keep = keep & (tl.load(drop_ptr + rows, mask=row_ok, other=0)[:, None] == 0)
        inv_w = _inv_w(tl.sum(tl.abs(x - r), axis=1, keep_dims=True), N, NORMALIZE)
        loss, gr, gf, gx = _sid_terms(r, f, x, alpha, inv_w, grad_scale * inv_w)
        _store_grads(gr_ptr, gf_ptr, gx_ptr, offs, gr, gf, gx, keep, mask)
        if PER_SAMPLE:
            _store_per_sample(drop_ptr, inv_w_ptr, rows, tl.sum(keep.to(tl.int32), axis=1) > 0,
                              tl.sum(tl.where(keep, inv_w, 0.0), axis=1), row_ok)
        loss = tl.where(keep & mask, loss, 0.0)
        if REDUCE:
            tl.store(part_ptr + rows, tl.sum(loss, axis=1), mask=row_ok)
            finish_sum(part_ptr, counter_ptr, out_ptr, loss_scale, n_programs, B, r_iters, RBLOCK)
        else:
            tl.store(loss_ptr + offs, (loss * loss_scale).to(loss_ptr.dtype.element_ty), mask=mask)

    @jit_with_loop_bounds("sample_iters", "col_iters", "r_iters")
    def _sid_loop_kernel(r_ptr, f_ptr, x_ptr, gr_ptr, gf_ptr, gx_ptr, loss_ptr, part_ptr, counter_ptr, out_ptr,
                         drop_ptr, inv_w_ptr, B, N, alpha, grad_scale, loss_scale, n_programs, sample_iters,
                         col_iters, r_iters, NORMALIZE: tl.constexpr, REDUCE: tl.constexpr,
                         BLOCK: tl.constexpr, ACC: tl.constexpr, RBLOCK: tl.constexpr,
                         PER_SAMPLE: tl.constexpr):
        """Persistent programs, one sample at a time: pass 1 (x_g, y_real) -> w; pass 2 writes everything."""
        pid = tl.program_id(0)
        cols0 = tl.arange(0, BLOCK)
        for si in range(sample_iters):
            b = pid + si * n_programs
            valid = b < B
            base = b.to(tl.int64) * N
            bad1 = tl.zeros((BLOCK,), tl.int32)
            abs_acc = tl.zeros((BLOCK,), ACC)
            if NORMALIZE:  # pass 1
                for ci in range(col_iters):
                    cols = ci * BLOCK + cols0
                    m = (cols < N) & valid
                    r = tl.load(r_ptr + base + cols, mask=m, other=0.0).to(ACC)
                    x = tl.load(x_ptr + base + cols, mask=m, other=0.0).to(ACC)
                    abs_acc += tl.abs(x - r)
                    bad1 = bad1 | ((r != r) | (x != x)).to(tl.int32)
            inv_w = _inv_w(tl.sum(abs_acc, 0), N, NORMALIZE)
            keep1 = tl.max(bad1, 0) == 0
            if PER_SAMPLE:
                keep1 = keep1 & (tl.load(drop_ptr + b, mask=valid, other=0) == 0)
            g = grad_scale * inv_w
            loss_acc = tl.zeros((BLOCK,), ACC)
            bad2 = tl.zeros((BLOCK,), tl.int32)
            for ci in range(col_iters):  # pass 2
                cols = ci * BLOCK + cols0
                m = (cols < N) & valid
                r = tl.load(r_ptr + base + cols, mask=m, other=0.0).to(ACC)
                f = tl.load(f_ptr + base + cols, mask=m, other=0.0).to(ACC)
                x = tl.load(x_ptr + base + cols, mask=m, other=0.0).to(ACC)
                bad2 = bad2 | _isnan3(r, f, x)
                loss, gr, gf, gx = _sid_terms(r, f, x, alpha, inv_w, g)
                _store_grads(gr_ptr, gf_ptr, gx_ptr, base + cols, gr, gf, gx, keep1, m)
                loss = tl.where(keep1 & m, loss, 0.0)
                loss_acc += loss
                if not REDUCE:
                    scaled = (loss * loss_scale).to(loss_ptr.dtype.element_ty)
                    tl.store(loss_ptr + base + cols, scaled, mask=m)
            late_nan = tl.max(bad2, 0) > 0
            if late_nan & keep1 & valid:  # a NaN first seen in pass 2: drop the whole sample after all
                zero = tl.zeros((BLOCK,), ACC)
                for ci in range(col_iters):
                    cols = ci * BLOCK + cols0
                    m = cols < N
                    _store_grads(gr_ptr, gf_ptr, gx_ptr, base + cols, zero, zero, zero, True, m)
                    if not REDUCE:
                        tl.store(loss_ptr + base + cols, zero.to(loss_ptr.dtype.element_ty), mask=m)
            if PER_SAMPLE:
                _store_per_sample(drop_ptr, inv_w_ptr, b, keep1 & (late_nan == 0), inv_w, valid)
            if REDUCE:
                part = tl.where(late_nan, 0.0, tl.sum(loss_acc, 0))
                tl.store(part_ptr + b, part.to(part_ptr.dtype.element_ty), mask=valid)
        if REDUCE:
            finish_sum(part_ptr, counter_ptr, out_ptr, loss_scale, n_programs, B, r_iters, RBLOCK)

    @triton.jit
    def _sid_stats_kernel(r_ptr, f_ptr, x_ptr, abs_ptr, bad_ptr, N, C, BLOCK: tl.constexpr, ACC: tl.constexpr):
        """split plan, launch 1: per (sample, chunk) sum |x_g - y_real| and a NaN flag over all three inputs."""
        pid = tl.program_id(0)
        b = pid // C
        cols = (pid % C) * BLOCK + tl.arange(0, BLOCK)
        m = cols < N
        offs = b.to(tl.int64) * N + cols
        r = tl.load(r_ptr + offs, mask=m, other=0.0).to(ACC)
        f = tl.load(f_ptr + offs, mask=m, other=0.0).to(ACC)
        x = tl.load(x_ptr + offs, mask=m, other=0.0).to(ACC)
        tl.store(abs_ptr + pid, tl.sum(tl.abs(x - r), 0))
        tl.store(bad_ptr + pid, tl.max(_isnan3(r, f, x), 0))

    @jit_with_loop_bounds("c_iters")
    def _sid_sample_kernel(abs_ptr, bad_ptr, inv_w_ptr, sample_bad_ptr, N, C, c_iters,
                           NORMALIZE: tl.constexpr, CBLOCK: tl.constexpr, ACC: tl.constexpr,
                           PER_SAMPLE: tl.constexpr):
        """split plan, launch 2: one program per sample reduces its C chunk partials to 1/w and a NaN flag.
        PER_SAMPLE: ``sample_bad_ptr`` holds the caller's drop flags on entry; dropped samples get 1/w = 0."""
        b = tl.program_id(0)
        abs_acc = tl.zeros((CBLOCK,), ACC)
        bad = tl.zeros((CBLOCK,), tl.int32)
        for ci in range(c_iters):
            j = ci * CBLOCK + tl.arange(0, CBLOCK)
            jm = j < C
            abs_acc += tl.load(abs_ptr + b * C + j, mask=jm, other=0.0)
            bad = tl.maximum(bad, tl.load(bad_ptr + b * C + j, mask=jm, other=0))
        inv_w = _inv_w(tl.sum(abs_acc, 0), N, NORMALIZE)
        sample_bad = tl.max(bad, 0)
        if PER_SAMPLE:
            sample_bad = tl.maximum(sample_bad, tl.load(sample_bad_ptr + b))
            inv_w = tl.where(sample_bad == 0, inv_w, 0.0)
        tl.store(inv_w_ptr + b, inv_w)
        tl.store(sample_bad_ptr + b, sample_bad)

    @jit_with_loop_bounds("r_iters")
    def _sid_apply_kernel(r_ptr, f_ptr, x_ptr, gr_ptr, gf_ptr, gx_ptr, loss_ptr, part_ptr, counter_ptr, out_ptr,
                          inv_w_ptr, sample_bad_ptr, N, C, alpha, grad_scale, loss_scale, n_programs, r_iters,
                          REDUCE: tl.constexpr, BLOCK: tl.constexpr, ACC: tl.constexpr, RBLOCK: tl.constexpr):
        """split plan, launch 3: write one chunk with its sample's 1/w and NaN flag."""
        pid = tl.program_id(0)
        b = pid // C
        inv_w = tl.load(inv_w_ptr + b)
        keep = tl.load(sample_bad_ptr + b) == 0
        cols = (pid % C) * BLOCK + tl.arange(0, BLOCK)
        m = cols < N
        offs = b.to(tl.int64) * N + cols
        r = tl.load(r_ptr + offs, mask=m, other=0.0).to(ACC)
        f = tl.load(f_ptr + offs, mask=m, other=0.0).to(ACC)
        x = tl.load(x_ptr + offs, mask=m, other=0.0).to(ACC)
        loss, gr, gf, gx = _sid_terms(r, f, x, alpha, inv_w, grad_scale * inv_w)
        _store_grads(gr_ptr, gf_ptr, gx_ptr, offs, gr, gf, gx, keep, m)
        loss = tl.where(keep & m, loss, 0.0)
        if REDUCE:
            tl.store(part_ptr + pid, tl.sum(loss, 0))
            finish_sum(part_ptr, counter_ptr, out_ptr, loss_scale, n_programs, n_programs, r_iters, RBLOCK)
        else:
            tl.store(loss_ptr + offs, (loss * loss_scale).to(loss_ptr.dtype.element_ty), mask=m)


# ---------------------------------------------------------------------------------------------
# Host launch
# ---------------------------------------------------------------------------------------------

def plan(B: int, N: int, elem_size: int, device: torch.device) -> dict:
    """Kernel plan and block sizes for a (B, N) problem, from shapes only (see the module docstring)."""
    if PLAN_OVERRIDE is not None:
        return dict(PLAN_OVERRIDE)
    if N <= TILE_MAX_N:
        block_n = max(16, backend.next_pow2(N))
        rows = max(1, min(backend.next_pow2(B), TILE_ELEMS // block_n))
        return dict(kind="tile", BLOCK_N=block_n, ROWS=rows)
    sms = backend.num_sms(device)
    if B >= sms:
        # samples in flight (x_g and y_real of each) within L2 but at least one program per SM, and an
        # equal number of samples per program
        in_flight = int(L2_FRACTION * backend.l2_bytes(device)) // max(1, 2 * N * elem_size)
        rounds = backend.cdiv(B, max(1, min(B, max(sms, in_flight))))
        return dict(kind="loop", BLOCK=max(16, LOOP_BYTES // elem_size), PROGRAMS=backend.cdiv(B, rounds))
    return dict(kind="split", BLOCK=SPLIT_BLOCK)


def sid_loss_triton_impl(y_real: torch.Tensor, y_fake: torch.Tensor, x_g: torch.Tensor, alpha: float,
                         normalize: bool, reduction: int, scale: float = 1.0, plan_: dict | None = None,
                         cache_counter: bool = True, drop: torch.Tensor | None = None,
                         inv_w_out: torch.Tensor | None = None):
    """Launch the Triton kernels; returns (scale * loss, grad_real, grad_fake, grad_x) with the gradients of
    ``scale * loss`` (the native op's outputs for scale 1). ``cache_counter``: see ``backend.counter``.

    SiDA's extras (``sidfast/ops/sida_loss.py``), both or neither: ``drop``, a contiguous (B,) int32 tensor of
    per-sample flags, is read (1 drops the sample as a NaN would) and overwritten with the final flags
    (NaN samples included); ``inv_w_out``, a (B,) tensor of the loss dtype, receives each sample's 1/w, 0 for
    dropped samples."""
    r, f, x = common_dense_layout(y_real, y_fake, x_g)
    B = x.shape[0]
    N = x.numel() // B
    if B * N >= 2 ** 31 * 64:
        raise ValueError(f"sid_loss: {B * N} elements is beyond what the Triton kernels index")
    grads = tuple(empty_outputs_like(r, f, x) for _ in range(3))
    ldt = loss_dtype(x.dtype)
    reduce = reduction != 0
    loss = x.new_empty((), dtype=ldt) if reduce else empty_outputs_like(r, f, x, dtype=ldt)
    # the loss and the gradients are multiplied by scale, and divided by B for "batchmean"
    factor = float(scale) / B if reduction == 2 else float(scale)
    p = plan_ or plan(B, N, x.element_size(), x.device)
    acc = acc_type(x.dtype)
    dev = x.device
    per_sample = drop is not None
    with backend.device_guard(dev):
        counter = backend.counter(dev, cached=cache_counter)
        # without SiDA's extras the kernels never touch these pointers: any tensors of the right types
        extras = (drop, inv_w_out) if per_sample else (counter, loss)
        outs = (*grads, loss)
        scalars = (alpha, factor, factor)  # alpha, grad_scale, loss_scale
        if p["kind"] == "tile":
            n_programs = backend.cdiv(B, p["ROWS"])
            part = torch.empty(B, dtype=ldt, device=dev)
            warps = p.get("num_warps", num_warps(p["ROWS"] * p["BLOCK_N"], x.element_size()))
            _sid_tile_kernel[(n_programs,)](r, f, x, *outs, part, counter, loss, *extras, B, N, *scalars,
                                            n_programs, reduce_iters(B), NORMALIZE=bool(normalize),
                                            REDUCE=reduce, ROWS=p["ROWS"], BLOCK_N=p["BLOCK_N"], ACC=acc,
                                            RBLOCK=RBLOCK, PER_SAMPLE=per_sample, num_warps=warps)
        elif p["kind"] == "loop":
            n_programs = min(B, p["PROGRAMS"])
            part = torch.empty(B, dtype=ldt, device=dev)
            warps = p.get("num_warps", num_warps(p["BLOCK"], x.element_size()))
            sample_iters = loop_bound(backend.cdiv(B, n_programs))
            col_iters = loop_bound(backend.cdiv(N, p["BLOCK"]))
            _sid_loop_kernel[(n_programs,)](r, f, x, *outs, part, counter, loss, *extras, B, N, *scalars,
                                            n_programs, sample_iters, col_iters, reduce_iters(B),
                                            NORMALIZE=bool(normalize), REDUCE=reduce, BLOCK=p["BLOCK"],
                                            ACC=acc, RBLOCK=RBLOCK, PER_SAMPLE=per_sample, num_warps=warps)
        elif p["kind"] == "split":
            C = backend.cdiv(N, p["BLOCK"])
            n_programs = B * C
            warps = p.get("num_warps", num_warps(p["BLOCK"], x.element_size()))
            abs_part = torch.empty(n_programs, dtype=ldt, device=dev)
            bad_part = torch.empty(n_programs, dtype=torch.int32, device=dev)
            _sid_stats_kernel[(n_programs,)](r, f, x, abs_part, bad_part, N, C, BLOCK=p["BLOCK"], ACC=acc,
                                             num_warps=warps)
            inv_w = inv_w_out if per_sample else torch.empty(B, dtype=ldt, device=dev)
            sample_bad = drop if per_sample else torch.empty(B, dtype=torch.int32, device=dev)
            _sid_sample_kernel[(B,)](abs_part, bad_part, inv_w, sample_bad, N, C,
                                     loop_bound(backend.cdiv(C, CBLOCK)), NORMALIZE=bool(normalize),
                                     CBLOCK=CBLOCK, ACC=acc, PER_SAMPLE=per_sample, num_warps=4)
            part = torch.empty(n_programs, dtype=ldt, device=dev)
            _sid_apply_kernel[(n_programs,)](r, f, x, *outs, part, counter, loss, inv_w, sample_bad, N, C,
                                             *scalars, n_programs, reduce_iters(n_programs), REDUCE=reduce,
                                             BLOCK=p["BLOCK"], ACC=acc, RBLOCK=RBLOCK, num_warps=warps)
        else:
            raise ValueError(f"unknown sid_loss plan {p!r}")
    return (loss, *grads)


# ---------------------------------------------------------------------------------------------
# Custom ops (fake, autograd): the torch.compile route, and the native op's registration
# ---------------------------------------------------------------------------------------------

def sid_loss_fake(y_real, y_fake, x_g, alpha: float, normalize: bool, reduction: int, scale: float = 1.0):
    """Shapes, dtypes and layouts of sid_loss's outputs, for FakeTensor tracing (torch.compile, export)."""
    grads = tuple(empty_outputs_like(y_real, y_fake, x_g) for _ in range(3))
    ldt = loss_dtype(x_g.dtype)
    loss = empty_outputs_like(y_real, y_fake, x_g, dtype=ldt) if reduction == 0 else x_g.new_empty((), dtype=ldt)
    return (loss, *grads)


def sid_loss_setup_context(ctx, inputs, output):
    _, grad_real, grad_fake, grad_x = output
    ctx.save_for_backward(grad_real, grad_fake, grad_x)
    ctx.mark_non_differentiable(grad_real, grad_fake, grad_x)
    ctx.n_args = len(inputs) - 3


def sid_loss_backward(ctx, grad_loss, *unused):
    """Scale the gradients the forward pass computed: elementwise for "none", by a 0-dim tensor otherwise."""
    return (*out_of_place(ctx.saved_tensors, grad_loss), *([None] * ctx.n_args))


def register(op_name: str) -> None:
    """Attach the shared fake and autograd formulas to an op with sid_loss's schema."""
    torch.library.register_fake(op_name)(sid_loss_fake)
    torch.library.register_autograd(op_name, sid_loss_backward, setup_context=sid_loss_setup_context)


# sidfast::sid_loss (the native op) gets them when sidfast.ops._native loads the extension, on first use

if HAS_TRITON:

    @torch.library.custom_op("sidfast::sid_loss_triton", mutates_args=())
    def sid_loss_triton(y_real: torch.Tensor, y_fake: torch.Tensor, x_g: torch.Tensor, alpha: float,
                        normalize: bool, reduction: int,
                        scale: float = 1.0) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
        """Triton sid_loss (CUDA, or CPU under TRITON_INTERPRET=1): sidfast::sid_loss's outputs for
        ``scale * loss``."""
        return sid_loss_triton_impl(y_real, y_fake, x_g, alpha, normalize, reduction, scale,
                                    cache_counter=False)

    register("sidfast::sid_loss_triton")


# ---------------------------------------------------------------------------------------------
# autograd.Function: the eager route
# ---------------------------------------------------------------------------------------------

class SiDLossFunction(torch.autograd.Function):
    """The loss of ``sidfast::sid_loss_triton`` with its gradients kept private, so that backward may scale
    them in place (``grad_scale.scale_saved_grads``: no extra pass when grad_output is 1). torch.compile
    traces it (the op inside has a fake; the traced backward scales out of place); eager calls launch the
    kernels directly (``backend.launch_or_op``)."""

    @staticmethod
    def forward(ctx, y_real, y_fake, x_g, alpha: float, normalize: bool, reduction: int, scale: float):
        run = backend.launch_or_op(torch.ops.sidfast.sid_loss_triton, sid_loss_triton_impl, y_real, y_fake, x_g)
        loss, *grads = run(y_real, y_fake, x_g, alpha, normalize, reduction, scale)
        ctx.save_for_backward(*grads)
        return loss

    @staticmethod
    def backward(ctx, grad_loss):
        return (*scale_saved_grads(ctx, ctx.saved_tensors, grad_loss), None, None, None, None)


# ---------------------------------------------------------------------------------------------
# Public route
# ---------------------------------------------------------------------------------------------

def sid_loss(y_real: torch.Tensor, y_fake: torch.Tensor, x_g: torch.Tensor, alpha: float, normalize: bool,
             reduction: str, scale: float = 1.0) -> torch.Tensor:
    """``scale`` times the differentiable loss; arguments are assumed validated (see ``sidfast.loss``).

    Dispatch: Triton op for CUDA tensors and for CPU tensors under TRITON_INTERPRET=1 (``scale`` folded
    into the kernels), the native op for other CPU tensors and for CUDA tensors without triton when the
    extension was built with CUDA (csrc/cuda/sid_loss.cu), the plain PyTorch reference elsewhere; these
    two multiply by ``scale`` afterwards (autograd scales their gradients in backward).
    """
    code = REDUCTION_CODES[reduction]
    if backend.use_triton(x_g):
        return SiDLossFunction.apply(y_real, y_fake, x_g, float(alpha), bool(normalize), code, float(scale))
    if x_g.device.type == "cpu" or (x_g.device.type == "cuda" and _native.WITH_CUDA):
        _native.load()  # registers torch.ops.sidfast.sid_loss
        loss = torch.ops.sidfast.sid_loss(y_real, y_fake, x_g, float(alpha), bool(normalize), code)[0]
    elif normalize:
        loss = reference.sid_generator_loss(y_real, y_fake, x_g, alpha, reduction)
    else:
        loss = reference.sid_generator_loss_eps(y_real, y_fake, x_g, alpha, reduction)
    return loss if scale == 1.0 else loss * scale
