"""Fused fake-score loss: noising, weighting, loss and the gradient w.r.t. the prediction in one pass.

Math: docs/math.md, "Fake-score loss"; reference ``sidfast/reference.py: fake_score_loss``. Kernel design and
the PyTorch fallback: docs/kernels.md, "Fake-score loss".
"""
from __future__ import annotations

import torch

from sidfast import predictions, reference
from sidfast.ops import backend
from sidfast.ops._common import REDUCTION_CODES, RBLOCK, acc_type, loss_dtype, num_warps, reduce_iters
from sidfast.ops._layout import common_dense_layout, empty_outputs_like
from sidfast.ops._philox import check_counter_range, layout_args, tile_shape
from sidfast.ops.backend import HAS_TRITON
from sidfast.ops.grad_scale import out_of_place, scale_saved_grads
from sidfast.ops.noise import regenerate_noise

# ---------------------------------------------------------------------------------------------
# Constants
# ---------------------------------------------------------------------------------------------

PREDICTION_CODES = {"x0": 0, "eps": 1, "v": 2, "flow": 3}
WEIGHTING_CODES = {w: i for i, w in enumerate(reference.WEIGHTINGS)}  # edm, x0, eps, v, flow, min_snr_eps, min_snr_v
#: the space each weighting measures the error in (reference.fake_score_weight)
SPACE_OF = {"edm": "x0", "x0": "x0", "eps": "eps", "v": "v", "flow": "flow", "min_snr_eps": "eps", "min_snr_v": "v"}

# ---------------------------------------------------------------------------------------------
# Triton kernels
# ---------------------------------------------------------------------------------------------

if HAS_TRITON:
    import triton
    import triton.language as tl

    from sidfast.ops._common import finish_sum, jit_with_loop_bounds
    from sidfast.ops._philox import FAST_MATH, noise_tile, row_tile

    @triton.jit
    def _weight(a, s, WEIGHTING: tl.constexpr, sigma_data, gamma):
        """Per-sample weight of ``reference.fake_score_weight`` (codes in WEIGHTING_CODES order)."""
        if WEIGHTING == 0:
            sigma = s / a
            # lambda(sigma) = (sigma^2 + sd^2) / (sigma sd)^2 (Karras et al. 2022, Table 1)
            w = (sigma * sigma + sigma_data * sigma_data) / ((sigma * sigma_data) * (sigma * sigma_data))
        elif WEIGHTING == 5:
            snr = (a / s) * (a / s)
            w = tl.minimum(snr, gamma) / snr  # Hang et al. 2023, eq. 10 (diffusers compute_snr)
        elif WEIGHTING == 6:
            snr = (a / s) * (a / s)
            w = tl.minimum(snr, gamma) / (snr + 1.0)  # Hang et al. 2023, v-prediction form
        else:
            w = a * 0.0 + 1.0
        return w

    @triton.jit
    def _target(x0, eps, a, s, SPACE: tl.constexpr):
        """What a SPACE network is trained to output (predictions.target)."""
        if SPACE == 0:
            t = x0
        elif SPACE == 1:
            t = eps
        elif SPACE == 2:
            t = a * eps - s * x0  # Salimans & Ho 2022, eq. 9 (diffusers get_velocity)
        else:
            t = eps - x0  # flow matching velocity for a = 1 - t, s = t (Liu et al. 2022)
        return t

    @triton.jit
    def _estimate(p, xt, a, s, PRED: tl.constexpr, SPACE: tl.constexpr):
        """(estimate in SPACE, d estimate / d p) from a PRED prediction p at x_t (sidfast/predictions.py)."""
        if PRED == 0:
            x0h = p
            eh = (xt - a * p) / s
            dx, de = a * 0.0 + 1.0, -a / s
        elif PRED == 1:
            x0h = (xt - s * p) / a
            eh = p
            dx, de = -s / a, a * 0.0 + 1.0
        elif PRED == 2:
            den = a * a + s * s
            x0h = (a * xt - s * p) / den
            eh = (s * xt + a * p) / den
            dx, de = -s / den, a / den
        else:
            den = a + s
            x0h = (xt - s * p) / den
            eh = (xt + a * p) / den
            dx, de = -s / den, a / den
        if SPACE == 0:
            est, d = x0h, dx
        elif SPACE == 1:
            est, d = eh, de
        elif SPACE == 2:
            est, d = a * eh - s * x0h, a * de - s * dx
        else:
            est, d = eh - x0h, de - dx
        return est, d

    @jit_with_loop_bounds("r_iters")
    def _fake_score_kernel(pred_ptr, x0_ptr, noise_ptr, a_ptr, s_ptr, seed_ptr, grad_ptr, loss_ptr, part_ptr,
                           counter_ptr, out_ptr, B, N, NQ, C_CH, HW, offset, n_chunks, sigma_data, gamma, grad_scale,
                           loss_scale, n_programs, r_iters,
                           HAS_NOISE: tl.constexpr, CL: tl.constexpr, PRED: tl.constexpr, SPACE: tl.constexpr,
                           WEIGHTING: tl.constexpr, REDUCE: tl.constexpr, ROWS: tl.constexpr, BLOCK_N: tl.constexpr,
                           ACC: tl.constexpr, FAST: tl.constexpr, RBLOCK: tl.constexpr):
        pid = tl.program_id(0)
        c0, rows, row_ok, mask, offs = row_tile(pid, n_chunks, B, N, ROWS, BLOCK_N)
        a = tl.load(a_ptr + rows, mask=row_ok, other=1.0).to(ACC)
        s = tl.load(s_ptr + rows, mask=row_ok, other=1.0).to(ACC)
        w = _weight(a.to(tl.float32), s.to(tl.float32), WEIGHTING, sigma_data, gamma).to(ACC)[:, None]
        a = a[:, None]
        s = s[:, None]
        p = tl.load(pred_ptr + offs, mask=mask, other=0.0).to(ACC)
        x0 = tl.load(x0_ptr + offs, mask=mask, other=0.0).to(ACC)
        if HAS_NOISE:
            eps = tl.load(noise_ptr + offs, mask=mask, other=0.0).to(ACC)
        else:
            eps = noise_tile(tl.load(seed_ptr), rows, c0, NQ, C_CH, HW, offset, CL, ROWS, BLOCK_N, FAST).to(ACC)
        if PRED == SPACE:
            diff = p - _target(x0, eps, a, s, SPACE)
            dest = 1.0
        else:
            # x_t = a_t x0 + s_t eps (docs/math.md, "Forward process and schedules")
            est, dest = _estimate(p, a * x0 + s * eps, a, s, PRED, SPACE)
            diff = est - _target(x0, eps, a, s, SPACE)
        # L = w(t) * ||target_hat - target||^2 and dL/dpred = 2 w (d target_hat / d pred) (target_hat - target)
        loss = tl.where(mask, w * diff * diff, 0.0)
        grad = (2.0 * grad_scale) * w * dest * diff
        tl.store(grad_ptr + offs, grad.to(grad_ptr.dtype.element_ty), mask=mask)
        if REDUCE:
            tl.store(part_ptr + pid, tl.sum(tl.sum(loss, axis=1), axis=0))
            finish_sum(part_ptr, counter_ptr, out_ptr, loss_scale, n_programs, n_programs, r_iters, RBLOCK)
        else:
            tl.store(loss_ptr + offs, loss.to(loss_ptr.dtype.element_ty), mask=mask)


# ---------------------------------------------------------------------------------------------
# Host launch
# ---------------------------------------------------------------------------------------------

def _inputs(pred, x0, noise):
    if noise is not None:
        return common_dense_layout(pred, x0, noise)
    return (*common_dense_layout(pred, x0), None)


def fake_score_loss_triton_impl(pred, x0, noise, seed, offset, a, s, prediction, weighting, sigma_data, gamma,
                                reduction, cache_counter: bool = True):
    """Launch the kernel; returns (loss, dloss/dpred). ``cache_counter``: see ``backend.counter``."""
    pred, x0, noise = _inputs(pred, x0, noise)
    a = a.reshape(-1).contiguous()
    s = s.reshape(-1).contiguous()
    B = pred.shape[0]
    lay = layout_args(pred)
    N = lay["N"]
    ldt = loss_dtype(pred.dtype)
    grad = empty_outputs_like(*((pred, x0) if noise is None else (pred, x0, noise)))
    reduce = reduction != 0
    loss = pred.new_empty((), dtype=ldt) if reduce else torch.empty_like(grad, dtype=ldt)
    rows, block_n, n_chunks = tile_shape(B, N)
    n_programs = backend.cdiv(B, rows) * n_chunks
    part = torch.empty(n_programs, dtype=ldt, device=pred.device)
    scale = 1.0 / B if reduction == 2 else 1.0
    space = PREDICTION_CODES[SPACE_OF[reference.WEIGHTINGS[weighting]]]
    with backend.device_guard(pred.device):
        _fake_score_kernel[(n_programs,)](
            pred, x0, noise if noise is not None else x0, a, s, seed if seed is not None else a, grad, loss, part,
            backend.counter(pred.device, cached=cache_counter), loss, B, N, lay["NQ"], lay["C_CH"], lay["HW"], offset,
            n_chunks, float(sigma_data), float(gamma), scale, scale, n_programs, reduce_iters(n_programs),
            HAS_NOISE=noise is not None, CL=lay["CL"] and noise is None, PRED=prediction, SPACE=space,
            WEIGHTING=weighting, REDUCE=reduce, ROWS=rows, BLOCK_N=block_n, ACC=acc_type(pred.dtype), FAST=FAST_MATH,
            RBLOCK=RBLOCK, num_warps=num_warps(rows * block_n, pred.element_size()))
    return loss, grad


# ---------------------------------------------------------------------------------------------
# Custom op (fake, autograd): the torch.compile route
# ---------------------------------------------------------------------------------------------

def fake_score_loss_fake(pred, x0, noise, seed, offset, a, s, prediction, weighting, sigma_data, gamma, reduction):
    """Shapes, dtypes and layouts of the op's (loss, grad_pred), for FakeTensor tracing."""
    ins = (pred, x0) if noise is None else (pred, x0, noise)
    grad = empty_outputs_like(*ins)
    ldt = loss_dtype(pred.dtype)
    loss = empty_outputs_like(*ins, dtype=ldt) if reduction == 0 else pred.new_empty((), dtype=ldt)
    return loss, grad


def _setup(ctx, inputs, output):
    ctx.save_for_backward(output[1])
    ctx.mark_non_differentiable(output[1])


def _backward(ctx, grad_loss, _unused):
    return (*out_of_place(ctx.saved_tensors, grad_loss), *([None] * 11))


if HAS_TRITON:

    @torch.library.custom_op("sidfast::fake_score_loss", mutates_args=())
    def fake_score_loss_op(pred: torch.Tensor, x0: torch.Tensor, noise: torch.Tensor | None,
                           seed: torch.Tensor | None, offset: int, a: torch.Tensor, s: torch.Tensor, prediction: int,
                           weighting: int, sigma_data: float, gamma: float,
                           reduction: int) -> tuple[torch.Tensor, torch.Tensor]:
        """(loss, dloss/dpred); eps = noise, or regenerated from add_noise's seed and offset."""
        return fake_score_loss_triton_impl(pred, x0, noise, seed, offset, a, s, prediction, weighting, sigma_data,
                                           gamma, reduction, cache_counter=False)

    fake_score_loss_op.register_fake(fake_score_loss_fake)
    fake_score_loss_op.register_autograd(_backward, setup_context=_setup)


# ---------------------------------------------------------------------------------------------
# autograd.Function: the eager route
# ---------------------------------------------------------------------------------------------


class FakeScoreLossFunction(torch.autograd.Function):
    """The loss of ``sidfast::fake_score_loss`` with the gradient kept private, so backward may scale it in
    place (``grad_scale.scale_saved_grads``); traced by torch.compile like the op itself (eager mode launches
    the kernel directly: ``backend.launch_or_op``)."""

    @staticmethod
    def forward(ctx, pred, *args):
        run = backend.launch_or_op(torch.ops.sidfast.fake_score_loss, fake_score_loss_triton_impl, pred, *args)
        loss, grad = run(pred, *args)
        ctx.save_for_backward(grad)
        ctx.n_args = len(args)
        return loss

    @staticmethod
    def backward(ctx, grad_loss):
        return (*scale_saved_grads(ctx, ctx.saved_tensors, grad_loss), *([None] * ctx.n_args))


# ---------------------------------------------------------------------------------------------
# Public route
# ---------------------------------------------------------------------------------------------

def fake_score_loss(pred: torch.Tensor, x0: torch.Tensor, noise: torch.Tensor | None, a: torch.Tensor,
                    s: torch.Tensor, prediction: str = "x0", weighting: str = "edm", sigma_data: float = 0.5,
                    gamma: float = 5.0, reduction: str = "batchmean", seed: torch.Tensor | None = None,
                    offset: int = 0) -> torch.Tensor:
    """The fake-score loss, fused where possible; arguments as ``reference.fake_score_loss``.

    pred, x0: (B, *F); a, s: (B,) tensors. Give ``noise`` (B, *F), or ``noise=None`` with the ``seed``
    (and ``offset``) returned by ``sidfast.ops.noise.add_noise`` to regenerate eps in the kernel.
    Routing: the Triton op (CUDA, or CPU under TRITON_INTERPRET=1) unless x0, noise, a or s need a
    gradient; the PyTorch reference otherwise. Arguments are assumed validated (``sidfast.loss``).
    """
    if (noise is None) == (seed is None):
        raise ValueError("give exactly one of noise (a tensor) and seed (from add_noise)")
    prediction = predictions.canonical(prediction)
    B = pred.shape[0]
    N = pred.numel() // B
    if seed is not None:
        check_counter_range(B, N, offset)
    others_need_grad = torch.is_grad_enabled() and any(t is not None and t.requires_grad for t in (x0, noise, a, s))
    if HAS_TRITON and backend.use_triton(pred) and not others_need_grad:
        a = a.reshape(-1).contiguous()
        s = s.reshape(-1).contiguous()
        return FakeScoreLossFunction.apply(pred, x0, noise, seed, int(offset), a, s, PREDICTION_CODES[prediction],
                                           WEIGHTING_CODES[weighting], float(sigma_data), float(gamma),
                                           REDUCTION_CODES[reduction])
    if noise is None:
        noise = regenerate_noise(seed, pred.shape, offset).to(x0.dtype)
    return reference.fake_score_loss(pred, x0, noise, a, s, prediction, weighting, sigma_data, gamma, reduction)

