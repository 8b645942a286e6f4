"""Definitions every fused op shares: reduction codes, accumulation types, warp counts, loop bounds and
the single-launch reduction."""
from __future__ import annotations

import torch

from sidfast.ops import backend
from sidfast.ops.backend import HAS_TRITON, INTERPRET

REDUCTION_CODES = {"none": 0, "sum": 1, "batchmean": 2}


def loss_dtype(dtype: torch.dtype) -> torch.dtype:
    """The loss is float32 for half, bfloat16 and float32 inputs, float64 for float64."""
    return torch.float64 if dtype == torch.float64 else torch.float32


def acc_type(dtype: torch.dtype):
    """The Triton accumulation type for inputs of ``dtype`` (float32, float64 for float64)."""
    import triton.language as tl  # triton stays optional: called on the Triton route only

    return tl.float64 if dtype == torch.float64 else tl.float32


def num_warps(elems: int, elem_size: int = 4) -> int:
    """Warps for a program that streams ``elems`` values per input: 32 bytes per thread and input
    (8 float32 or 16 bfloat16 values), 4 to 32 warps."""
    return max(4, min(32, elems * elem_size // 1024))


def jit_with_loop_bounds(*names: str):
    """``triton.jit`` for a kernel whose loop trip counts ``names`` are runtime arguments.

    Compiled kernels take them as plain integers that are not specialised (``do_not_specialize``), so
    a new batch or feature size reuses the compiled kernel, also during CUDA-graph capture. Hosts pass
    them through ``loop_bound``.
    """
    import triton  # triton stays optional: called on the Triton route only

    def wrap(fn):
        return triton.jit(fn, do_not_specialize=list(names))

    return wrap


def loop_bound(n: int):
    """A runtime loop trip count as a kernel argument. Triton's interpreter (3.6, numpy >= 2.4) turns an
    int argument into a one-element array that ``range`` cannot take; a ``tl.constexpr`` passes unconverted
    (the compiled kernels get the plain int)."""
    if INTERPRET:
        import triton.language as tl  # triton stays optional: the interpreter is a Triton route

        return tl.constexpr(int(n))
    return int(n)


#: elements the last program of a single-launch reduction sums per step (a fixed block: one compiled
#: kernel for every number of partial sums)
RBLOCK = 1024


def reduce_iters(n_partials: int):
    """Steps of ``finish_sum`` over ``n_partials`` partial sums (a runtime loop bound)."""
    return loop_bound(backend.cdiv(n_partials, RBLOCK))


if HAS_TRITON:
    import triton
    import triton.language as tl

    @triton.jit
    def finish_sum(part_ptr, counter_ptr, out_ptr, scale, n_programs, n_partials, r_iters,
                   RBLOCK: tl.constexpr):
        """Called by every program after it stored its partial sums: the last program to arrive sums
        ``part_ptr[0:n_partials]`` in a fixed order (deterministic), writes ``sum * scale`` to ``out_ptr``
        and re-arms the counter. No host sync, no second launch. ``r_iters * RBLOCK >= n_partials``."""
        tl.debug_barrier()  # every thread's partial stores precede the release below
        arrived = tl.atomic_add(counter_ptr, 1, sem="acq_rel")
        if arrived == n_programs - 1:
            acc = tl.zeros((RBLOCK,), out_ptr.dtype.element_ty)
            for i in range(r_iters):
                idx = i * RBLOCK + tl.arange(0, RBLOCK)
                acc += tl.load(part_ptr + idx, mask=idx < n_partials, other=0.0, cache_modifier=".cg")
            tl.store(out_ptr, tl.sum(acc, 0) * scale)
            tl.atomic_xchg(counter_ptr, 0)
