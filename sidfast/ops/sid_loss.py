"""The SiD generator loss with its three gradients computed in the forward pass (SPEC section 3).

``sidfast::sid_loss`` (native C++, CPU) and ``sidfast::sid_loss_triton`` (Triton: CUDA, or CPU under
``TRITON_INTERPRET=1``) share one schema, one fake and one autograd formula: they return
``(loss, grad_real, grad_fake, grad_x)`` and backward only scales the stored gradients by
``grad_output`` (no host sync, so a step can be captured in a CUDA graph). ``sid_loss`` (what
``sidfast.loss`` calls) wraps the Triton op in ``SiDLossFunction``, whose backward scales the
private gradients in place when it can (see ``grad_scale``). Reductions: code 0
"none" (per-element fp32 loss, unscaled gradients), 1 "sum", 2 "batchmean" (0-dim loss, gradients
scaled by 1 or 1/B). Samples with a NaN in any input are dropped by a mask: zero loss, zero
gradients, and "batchmean" still divides by the full batch.

Triton design. Per sample, the loss needs the normalizer ``w = max(mean|x_g - y_real|, 1e-5)``
before any gradient can be written, so the minimum is one pass that reads all three inputs when a
sample fits in registers, and otherwise two reads of (x_g, y_real). Three kernel plans, chosen on
the host from shapes only (no sync):

* ``tile`` (N <= 8192 features): a program holds ROWS whole samples in registers, reduces the
  normalizer and the NaN flag per row, then writes the loss/gradients: one read, one write.
  Small N packs many samples per program.
* ``loop`` (larger N, batch >= #SMs): a persistent program per group of samples walks each sample
  twice: pass 1 reads (x_g, y_real) for w, pass 2 reads all three and writes. The number of
  programs is capped so that the samples in flight fit in L2, so pass 2 re-reads from L2 and HBM
  traffic stays close to 3 reads + 3 writes. A NaN first seen in pass 2 (in y_fake) triggers a
  device-side branch that rewrites that sample's outputs as zeros (rare path, no host involvement).
* ``split`` (larger N, small batch, e.g. 16 x 65536): samples are cut into chunks so every SM
  works: a stats kernel writes per-chunk |x_g - y_real| sums and NaN flags (reading all three
  inputs), an apply kernel reduces its sample's chunk partials and writes its chunk. Two launches;
  the apply kernel's reads hit L2 when the batch is small enough (16 x 65536 bf16 is 6 MB).

The plan constants below are first guesses from register counts (``backend.compile_report``) and
bandwidth arithmetic, not measurements; ``PLAN_OVERRIDE`` and benchmarks/bench_sid_loss.py's plan
benchmark exist to tune them on the target GPU.

Scalar losses are reduced in the same launch: each program stores a per-sample (or per-chunk)
partial sum, and the last program to arrive (an atomic counter) adds them in a fixed order, so
results are deterministic and no torch.sum launch follows. Accumulation is fp32 (fp64 for fp64).
"""
from __future__ import annotations

import torch

from .. import _native  # noqa: F401  (loads sidfast._C, which defines the sidfast::sid_loss schema)
from .. import reference
from . import backend
from ._layout import common_dense_layout, empty_outputs_like
from .backend import HAS_TRITON
from .grad_scale import out_of_place, scale_saved_grads

REDUCTION_CODES = {"none": 0, "sum": 1, "batchmean": 2}


def loss_dtype(dtype: torch.dtype) -> torch.dtype:
    """The loss is float32 for half, bfloat16 and float32 inputs, float64 for float64."""
    return torch.float64 if dtype == torch.float64 else torch.float32


def sid_loss_fake(y_real, y_fake, x_g, alpha: float, normalize: bool, reduction: int):
    """Shapes, dtypes and layouts of sid_loss's outputs, for FakeTensor tracing (torch.compile, export)."""
    grads = tuple(empty_outputs_like(y_real, y_fake, x_g) for _ in range(3))
    ldt = loss_dtype(x_g.dtype)
    loss = empty_outputs_like(y_real, y_fake, x_g, dtype=ldt) if reduction == 0 else x_g.new_empty((), dtype=ldt)
    return (loss, *grads)


def sid_loss_setup_context(ctx, inputs, output):
    _, grad_real, grad_fake, grad_x = output
    ctx.save_for_backward(grad_real, grad_fake, grad_x)
    ctx.mark_non_differentiable(grad_real, grad_fake, grad_x)


def sid_loss_backward(ctx, grad_loss, *unused):
    """Scale the gradients the forward pass computed: elementwise for "none", by a 0-dim tensor otherwise."""
    return (*out_of_place(ctx.saved_tensors, grad_loss), None, None, None)


def register(op_name: str) -> None:
    """Attach the shared fake and autograd formulas to an op with sid_loss's schema."""
    torch.library.register_fake(op_name)(sid_loss_fake)
    torch.library.register_autograd(op_name, sid_loss_backward, setup_context=sid_loss_setup_context)


register("sidfast::sid_loss")


# ---------------------------------------------------------------------------------------------
# Triton kernels
# ---------------------------------------------------------------------------------------------

if HAS_TRITON:
    import triton
    import triton.language as tl

    from .backend import finish_sum

    @triton.jit
    def _sid_terms(r, f, x, alpha, inv_w, g):
        """Per element: loss and the three gradients (SPEC section 3), the gradients times g = scale / w."""
        d = r - f
        e = r - x
        # L = (f_phi - f_psi) * ((f_phi - x_g) - alpha (f_phi - f_psi)) / w (Zhou et al. 2024, eq. 9, denoised form)
        loss = d * (e - alpha * d) * inv_w
        # dL/df_phi = e + (1 - 2 alpha) d, dL/df_psi = 2 alpha d - e, dL/dx_g = -d (SPEC section 3)
        return loss, (e + (1.0 - 2.0 * alpha) * d) * g, (2.0 * alpha * d - e) * g, -d * g

    @triton.jit
    def _isnan3(r, f, x):
        return ((r != r) | (f != f) | (x != x)).to(tl.int32)

    @triton.jit
    def _sid_tile_kernel(r_ptr, f_ptr, x_ptr, gr_ptr, gf_ptr, gx_ptr, loss_ptr, part_ptr, counter_ptr, out_ptr,
                         B, N, alpha, grad_scale, loss_scale, n_programs,
                         NORMALIZE: tl.constexpr, REDUCE: tl.constexpr, ROWS: tl.constexpr, BLOCK_N: tl.constexpr,
                         ACC: tl.constexpr, R_ITERS: tl.constexpr, RBLOCK: tl.constexpr):
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
        keep = tl.max(_isnan3(r, f, x), axis=1) == 0
        if NORMALIZE:
            # w = mean |x_g - f_phi| per sample, clipped at 1e-5, a constant (Zhou et al. 2024, eq. 10 normalizer)
            w = tl.maximum(tl.sum(tl.abs(x - r), axis=1) / N, 1e-5)
        else:
            w = tl.full((ROWS,), 1.0, ACC)
        inv_w = 1.0 / w
        loss, gr, gf, gx = _sid_terms(r, f, x, alpha, inv_w[:, None], (grad_scale * inv_w)[:, None])
        k = keep[:, None]
        tl.store(gr_ptr + offs, tl.where(k, gr, 0.0).to(gr_ptr.dtype.element_ty), mask=mask)
        tl.store(gf_ptr + offs, tl.where(k, gf, 0.0).to(gf_ptr.dtype.element_ty), mask=mask)
        tl.store(gx_ptr + offs, tl.where(k, gx, 0.0).to(gx_ptr.dtype.element_ty), mask=mask)
        loss = tl.where(k & mask, loss, 0.0)
        if REDUCE:
            tl.store(part_ptr + rows, tl.sum(loss, axis=1), mask=row_ok)
            finish_sum(part_ptr, counter_ptr, out_ptr, loss_scale, n_programs, B, R_ITERS, RBLOCK)
        else:
            tl.store(loss_ptr + offs, loss.to(loss_ptr.dtype.element_ty), mask=mask)

    @triton.jit
    def _sid_loop_kernel(r_ptr, f_ptr, x_ptr, gr_ptr, gf_ptr, gx_ptr, loss_ptr, part_ptr, counter_ptr, out_ptr,
                         B, N, alpha, grad_scale, loss_scale, n_programs,
                         NORMALIZE: tl.constexpr, REDUCE: tl.constexpr, SAMPLE_ITERS: tl.constexpr,
                         COL_ITERS: tl.constexpr, BLOCK: tl.constexpr, ACC: tl.constexpr,
                         R_ITERS: tl.constexpr, RBLOCK: tl.constexpr):
        """Persistent programs, one sample at a time: pass 1 (x_g, y_real) -> w; pass 2 writes everything."""
        pid = tl.program_id(0)
        cols0 = tl.arange(0, BLOCK)
        for si in range(SAMPLE_ITERS):
            b = pid + si * n_programs
            valid = b < B
            base = b.to(tl.int64) * N
            bad1 = tl.zeros((BLOCK,), tl.int32)
            if NORMALIZE:
                abs_acc = tl.zeros((BLOCK,), ACC)
                for ci in range(COL_ITERS):
                    cols = ci * BLOCK + cols0
                    m = (cols < N) & valid
                    r = tl.load(r_ptr + base + cols, mask=m, other=0.0).to(ACC)
                    x = tl.load(x_ptr + base + cols, mask=m, other=0.0).to(ACC)
                    abs_acc += tl.abs(x - r)
                    bad1 = bad1 | ((r != r) | (x != x)).to(tl.int32)
                # w = mean |x_g - f_phi| per sample, clipped at 1e-5, a constant (Zhou et al. 2024, eq. 10 normalizer)
                inv_w = 1.0 / tl.maximum(tl.sum(abs_acc, 0) / N, 1e-5)
            else:
                inv_w = 1.0
            keep1 = tl.max(bad1, 0) == 0
            g = grad_scale * inv_w
            loss_acc = tl.zeros((BLOCK,), ACC)
            bad2 = tl.zeros((BLOCK,), tl.int32)
            for ci in range(COL_ITERS):
                cols = ci * BLOCK + cols0
                m = (cols < N) & valid
                r = tl.load(r_ptr + base + cols, mask=m, other=0.0).to(ACC)
                f = tl.load(f_ptr + base + cols, mask=m, other=0.0).to(ACC)
                x = tl.load(x_ptr + base + cols, mask=m, other=0.0).to(ACC)
                bad2 = bad2 | _isnan3(r, f, x)
                loss, gr, gf, gx = _sid_terms(r, f, x, alpha, inv_w, g)
                tl.store(gr_ptr + base + cols, tl.where(keep1, gr, 0.0).to(gr_ptr.dtype.element_ty), mask=m)
                tl.store(gf_ptr + base + cols, tl.where(keep1, gf, 0.0).to(gf_ptr.dtype.element_ty), mask=m)
                tl.store(gx_ptr + base + cols, tl.where(keep1, gx, 0.0).to(gx_ptr.dtype.element_ty), mask=m)
                loss = tl.where(keep1 & m, loss, 0.0)
                loss_acc += loss
                if not REDUCE:
                    tl.store(loss_ptr + base + cols, loss.to(loss_ptr.dtype.element_ty), mask=m)
            late_nan = tl.max(bad2, 0) > 0
            if late_nan & keep1 & valid:  # a NaN first seen in pass 2: drop the whole sample after all
                zero = tl.zeros((BLOCK,), ACC)
                for ci in range(COL_ITERS):
                    cols = ci * BLOCK + cols0
                    m = cols < N
                    tl.store(gr_ptr + base + cols, zero.to(gr_ptr.dtype.element_ty), mask=m)
                    tl.store(gf_ptr + base + cols, zero.to(gf_ptr.dtype.element_ty), mask=m)
                    tl.store(gx_ptr + base + cols, zero.to(gx_ptr.dtype.element_ty), mask=m)
                    if not REDUCE:
                        tl.store(loss_ptr + base + cols, zero.to(loss_ptr.dtype.element_ty), mask=m)
            if REDUCE:
                part = tl.where(late_nan, 0.0, tl.sum(loss_acc, 0))
                tl.store(part_ptr + b, part.to(part_ptr.dtype.element_ty), mask=valid)
        if REDUCE:
            finish_sum(part_ptr, counter_ptr, out_ptr, loss_scale, n_programs, B, R_ITERS, RBLOCK)

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

    @triton.jit
    def _sid_apply_kernel(r_ptr, f_ptr, x_ptr, gr_ptr, gf_ptr, gx_ptr, loss_ptr, part_ptr, counter_ptr, out_ptr,
                          abs_ptr, bad_ptr, N, C, alpha, grad_scale, loss_scale, n_programs,
                          NORMALIZE: tl.constexpr, REDUCE: tl.constexpr, BLOCK: tl.constexpr, C_ITERS: tl.constexpr,
                          CBLOCK: tl.constexpr, ACC: tl.constexpr, R_ITERS: tl.constexpr, RBLOCK: tl.constexpr):
        """split plan, launch 2: reduce the sample's chunk partials to w and the NaN flag, write one chunk."""
        pid = tl.program_id(0)
        b = pid // C
        abs_acc = tl.zeros((CBLOCK,), ACC)
        bad = tl.zeros((CBLOCK,), tl.int32)
        for ci in range(C_ITERS):
            j = ci * CBLOCK + tl.arange(0, CBLOCK)
            jm = j < C
            abs_acc += tl.load(abs_ptr + b * C + j, mask=jm, other=0.0)
            bad = tl.maximum(bad, tl.load(bad_ptr + b * C + j, mask=jm, other=0))
        keep = tl.max(bad, 0) == 0
        if NORMALIZE:
            # w = mean |x_g - f_phi| per sample, clipped at 1e-5, a constant (Zhou et al. 2024, eq. 10 normalizer)
            inv_w = 1.0 / tl.maximum(tl.sum(abs_acc, 0) / N, 1e-5)
        else:
            inv_w = 1.0
        cols = (pid % C) * BLOCK + tl.arange(0, BLOCK)
        m = cols < N
        offs = b.to(tl.int64) * N + cols
        r = tl.load(r_ptr + offs, mask=m, other=0.0).to(ACC)
        f = tl.load(f_ptr + offs, mask=m, other=0.0).to(ACC)
        x = tl.load(x_ptr + offs, mask=m, other=0.0).to(ACC)
        loss, gr, gf, gx = _sid_terms(r, f, x, alpha, inv_w, grad_scale * inv_w)
        tl.store(gr_ptr + offs, tl.where(keep, gr, 0.0).to(gr_ptr.dtype.element_ty), mask=m)
        tl.store(gf_ptr + offs, tl.where(keep, gf, 0.0).to(gf_ptr.dtype.element_ty), mask=m)
        tl.store(gx_ptr + offs, tl.where(keep, gx, 0.0).to(gx_ptr.dtype.element_ty), mask=m)
        loss = tl.where(keep & m, loss, 0.0)
        if REDUCE:
            tl.store(part_ptr + pid, tl.sum(loss, 0))
            finish_sum(part_ptr, counter_ptr, out_ptr, loss_scale, n_programs, n_programs, R_ITERS, RBLOCK)
        else:
            tl.store(loss_ptr + offs, loss.to(loss_ptr.dtype.element_ty), mask=m)


# ---------------------------------------------------------------------------------------------
# Host side: plan, launch, custom op
# ---------------------------------------------------------------------------------------------

TILE_MAX_N = 8192      # samples up to this many features live in registers (tile plan)
TILE_ELEMS = 4096      # elements per program in the tile plan (ROWS * BLOCK_N), when N is small
LOOP_BYTES = 16384     # bytes per input and iteration in the loop plan (4096 float32, 8192 bfloat16)
SPLIT_BLOCK = 2048     # elements per program in the split plan
L2_FRACTION = 0.6      # share of L2 the loop plan's samples in flight may occupy

#: Set to a dict like ``{"kind": "split", "BLOCK": 16}`` to force a plan (tests, tuning benchmarks).
PLAN_OVERRIDE: dict | None = None


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


def _num_warps(elems: int, elem_size: int = 4) -> int:
    """32 bytes per thread and input (8 float32 or 16 bfloat16 values), 4 to 32 warps."""
    return max(4, min(32, elems * elem_size // 1024))


def sid_loss_triton_impl(y_real: torch.Tensor, y_fake: torch.Tensor, x_g: torch.Tensor, alpha: float,
                         normalize: bool, reduction: int, plan_: dict | None = None):
    """Launch the Triton kernels; returns (loss, grad_real, grad_fake, grad_x) like the native op."""
    r, f, x = common_dense_layout(y_real, y_fake, x_g)
    B = x.shape[0]
    N = x.numel() // B
    if B * N >= 2 ** 31 * 64:
        raise ValueError(f"sid_loss: {B * N} elements is beyond what the Triton kernels index")
    grads = tuple(empty_outputs_like(r, f, x) for _ in range(3))
    ldt = loss_dtype(x.dtype)
    reduce = reduction != 0
    loss = x.new_empty((), dtype=ldt) if reduce else empty_outputs_like(r, f, x, dtype=ldt)
    acc = tl.float64 if x.dtype == torch.float64 else tl.float32
    grad_scale = 1.0 / B if reduction == 2 else 1.0
    p = plan_ or plan(B, N, x.element_size(), x.device)
    counter = backend.counter(x.device)
    common = dict(NORMALIZE=bool(normalize), REDUCE=reduce, ACC=acc)
    if p["kind"] == "tile":
        n_programs = backend.cdiv(B, p["ROWS"])
        part = torch.empty(B, dtype=ldt, device=x.device)
        _sid_tile_kernel[(n_programs,)](r, f, x, *grads, loss, part, counter, loss, B, N, alpha, grad_scale,
                                        grad_scale, n_programs, ROWS=p["ROWS"], BLOCK_N=p["BLOCK_N"],
                                        **backend.reduce_args(B), **common,
                                        num_warps=p.get("num_warps",
                                                        _num_warps(p["ROWS"] * p["BLOCK_N"], x.element_size())))
    elif p["kind"] == "loop":
        n_programs = min(B, p["PROGRAMS"])
        part = torch.empty(B, dtype=ldt, device=x.device)
        _sid_loop_kernel[(n_programs,)](r, f, x, *grads, loss, part, counter, loss, B, N, alpha, grad_scale,
                                        grad_scale, n_programs, SAMPLE_ITERS=backend.cdiv(B, n_programs),
                                        COL_ITERS=backend.cdiv(N, p["BLOCK"]), BLOCK=p["BLOCK"],
                                        **backend.reduce_args(B), **common,
                                        num_warps=p.get("num_warps", _num_warps(p["BLOCK"], x.element_size())))
    elif p["kind"] == "split":
        C = backend.cdiv(N, p["BLOCK"])
        n_programs = B * C
        abs_part = torch.empty(n_programs, dtype=ldt, device=x.device)
        bad_part = torch.empty(n_programs, dtype=torch.int32, device=x.device)
        num_warps = p.get("num_warps", _num_warps(p["BLOCK"], x.element_size()))
        _sid_stats_kernel[(n_programs,)](r, f, x, abs_part, bad_part, N, C, BLOCK=p["BLOCK"], ACC=acc,
                                         num_warps=num_warps)
        part = torch.empty(n_programs, dtype=ldt, device=x.device)
        cblock = min(1024, backend.next_pow2(max(C, 16)))
        _sid_apply_kernel[(n_programs,)](r, f, x, *grads, loss, part, counter, loss, abs_part, bad_part, N, C,
                                         alpha, grad_scale, grad_scale, n_programs, BLOCK=p["BLOCK"],
                                         C_ITERS=backend.cdiv(C, cblock), CBLOCK=cblock,
                                         **backend.reduce_args(n_programs), **common, num_warps=num_warps)
    else:
        raise ValueError(f"unknown sid_loss plan {p!r}")
    return (loss, *grads)


if HAS_TRITON:

    @torch.library.custom_op("sidfast::sid_loss_triton", mutates_args=())
    def sid_loss_triton(y_real: torch.Tensor, y_fake: torch.Tensor, x_g: torch.Tensor, alpha: float,
                        normalize: bool, reduction: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor,
                                                                  torch.Tensor]:
        """Triton sid_loss (CUDA, or CPU under TRITON_INTERPRET=1); same schema and outputs as sidfast::sid_loss."""
        return sid_loss_triton_impl(y_real, y_fake, x_g, alpha, normalize, reduction)

    register("sidfast::sid_loss_triton")


class SiDLossFunction(torch.autograd.Function):
    """The loss of ``sidfast::sid_loss_triton`` with its gradients kept private, so that backward may scale
    them in place (``grad_scale.scale_saved_grads``: no extra pass when grad_output is 1). torch.compile
    traces it (the op inside has a fake; the traced backward scales out of place); eager calls launch the
    kernels directly (``backend.launch_or_op``)."""

    @staticmethod
    def forward(ctx, y_real, y_fake, x_g, alpha: float, normalize: bool, reduction: int):
        run = backend.launch_or_op(torch.ops.sidfast.sid_loss_triton, sid_loss_triton_impl, y_real, y_fake, x_g)
        loss, *grads = run(y_real, y_fake, x_g, alpha, normalize, reduction)
        ctx.save_for_backward(*grads)
        return loss

    @staticmethod
    def backward(ctx, grad_loss):
        return (*scale_saved_grads(ctx, ctx.saved_tensors, grad_loss), None, None, None)


def sid_loss(y_real: torch.Tensor, y_fake: torch.Tensor, x_g: torch.Tensor, alpha: float, normalize: bool,
             reduction: str) -> torch.Tensor:
    """The differentiable loss; arguments are assumed validated (see ``sidfast.loss``).

    Dispatch: Triton op for CUDA tensors and for CPU tensors under TRITON_INTERPRET=1, the native op
    for other CPU tensors and for CUDA tensors without triton when the extension was built with CUDA
    (csrc/cuda/sid_loss.cu), the plain PyTorch reference elsewhere.
    """
    code = REDUCTION_CODES[reduction]
    if backend.use_triton(x_g):
        return SiDLossFunction.apply(y_real, y_fake, x_g, float(alpha), bool(normalize), code)
    if x_g.device.type == "cpu" or (x_g.device.type == "cuda" and _native.WITH_CUDA):
        return torch.ops.sidfast.sid_loss(y_real, y_fake, x_g, float(alpha), bool(normalize), code)[0]
    if normalize:
        return reference.sid_generator_loss(y_real, y_fake, x_g, alpha, reduction)
    return reference.sid_generator_loss_eps(y_real, y_fake, x_g, alpha, reduction)


def compile_specs() -> list[dict]:
    """Representative kernel configurations for ``backend.compile_report`` (GPU compile checks)."""
    specs = []
    div = ("r_ptr", "f_ptr", "x_ptr", "gr_ptr", "gf_ptr", "gx_ptr", "loss_ptr", "N")
    for dt in (torch.float32, torch.bfloat16, torch.float64):
        t = "*" + backend.TRITON_TYPES[dt]
        lt = "*fp64" if dt == torch.float64 else "*fp32"
        acc = tl.float64 if dt == torch.float64 else tl.float32
        io = dict(r_ptr=t, f_ptr=t, x_ptr=t, gr_ptr=t, gf_ptr=t, gx_ptr=t, loss_ptr=lt, part_ptr=lt,
                  counter_ptr="*i32", out_ptr=lt, B="i32", N="i32", alpha="fp32", grad_scale="fp32",
                  loss_scale="fp32", n_programs="i32")
        for normalize in (True, False):
            for reduce in (True, False):
                flags = dict(NORMALIZE=normalize, REDUCE=reduce, ACC=acc, R_ITERS=1, RBLOCK=1024)
                tag = f"{backend.TRITON_TYPES[dt]} normalize={normalize} reduce={reduce}"
                for n in (16, 8192):
                    p = plan(64, n, 4, torch.device("cpu"))
                    specs.append(dict(name=f"sid tile N={n} {tag}", kernel=_sid_tile_kernel, args=io,
                                      constexprs=dict(ROWS=p["ROWS"], BLOCK_N=p["BLOCK_N"], **flags),
                                      num_warps=_num_warps(p["ROWS"] * p["BLOCK_N"], dt.itemsize), divisible=div))
                block = LOOP_BYTES // dt.itemsize
                specs.append(dict(name=f"sid loop {tag}", kernel=_sid_loop_kernel, args=io,
                                  constexprs=dict(SAMPLE_ITERS=2, COL_ITERS=65536 // block, BLOCK=block, **flags),
                                  num_warps=_num_warps(block, dt.itemsize), divisible=div))
                specs.append(dict(name=f"sid split-apply {tag}", kernel=_sid_apply_kernel,
                                  args={**{k: v for k, v in io.items() if k != "B"}, "abs_ptr": lt, "bad_ptr": "*i32",
                                        "C": "i32"},
                                  constexprs=dict(BLOCK=SPLIT_BLOCK, C_ITERS=1, CBLOCK=32, **flags),
                                  num_warps=_num_warps(SPLIT_BLOCK, dt.itemsize), divisible=div))
        specs.append(dict(name=f"sid split-stats {backend.TRITON_TYPES[dt]}", kernel=_sid_stats_kernel,
                          args=dict(r_ptr=t, f_ptr=t, x_ptr=t, abs_ptr=lt, bad_ptr="*i32", N="i32", C="i32"),
                          constexprs=dict(BLOCK=SPLIT_BLOCK, ACC=acc), num_warps=_num_warps(SPLIT_BLOCK, dt.itemsize),
                          divisible=div[:3] + ("N",)))
    return specs
