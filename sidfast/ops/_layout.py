"""Output layout rule shared by every sid_loss implementation and its fake (mirrors csrc/common.h)."""
from __future__ import annotations

import torch


def batch_major_dense(t: torch.Tensor) -> bool:
    """Contiguous, channels_last (4-D) or channels_last_3d (5-D), with the batch outermost."""
    if t.dim() == 0:
        return False
    dense = (t.is_contiguous() or (t.dim() == 4 and t.is_contiguous(memory_format=torch.channels_last))
             or (t.dim() == 5 and t.is_contiguous(memory_format=torch.channels_last_3d)))
    return dense and (t.shape[0] <= 1 or t.stride(0) == t.numel() // t.shape[0])


def common_dense_layout(*ts: torch.Tensor) -> tuple[torch.Tensor, ...]:
    """The inputs as they are when they share strides and are batch-major dense, else made contiguous."""
    if batch_major_dense(ts[0]) and all(t.stride() == ts[0].stride() for t in ts[1:]):
        return ts
    return tuple(t.contiguous() for t in ts)


def empty_outputs_like(ref: torch.Tensor, *others: torch.Tensor, dtype: torch.dtype | None = None) -> torch.Tensor:
    """An uninitialised tensor with the layout the kernels write for inputs (ref, *others)."""
    if batch_major_dense(ref) and all(t.stride() == ref.stride() for t in others):
        return torch.empty_like(ref, dtype=dtype)
    return torch.empty(ref.shape, dtype=dtype or ref.dtype, device=ref.device)
