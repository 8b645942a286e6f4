"""Class labels in a network's own format: one-hot (EDM) or indices (diffusers)."""
from __future__ import annotations

import torch
from torch import nn


def format_labels(idx: torch.Tensor, num_classes: int, fmt: str, check: bool = True) -> torch.Tensor:
    """Class indices ``idx`` (n,) as the network takes them: (n, K) one-hot float (EDM) or the indices.

    ``check`` raises a ValueError for an index outside ``[0, num_classes)`` (a host sync on a GPU tensor).
    """
    if check:
        if not isinstance(idx, torch.Tensor) or idx.dtype.is_floating_point or idx.dtype.is_complex:
            raise TypeError(f"class labels must be an integer tensor of class indices, got {idx!r}")
        if idx.numel() and (int(idx.min()) < 0 or int(idx.max()) >= num_classes):
            bad = idx[(idx < 0) | (idx >= num_classes)].flatten()[0].item()
            raise ValueError(f"class label {bad} is out of range: the network has {num_classes} classes "
                             f"(0 to {num_classes - 1})")
    if fmt == "onehot":
        return nn.functional.one_hot(idx, num_classes).float()
    if fmt == "index":
        return idx
    raise ValueError(f"label_format must be 'onehot' or 'index', got {fmt!r}")


def draw_labels(n: int, num_classes: int, fmt: str, device, generator: torch.Generator | None = None):
    """Uniform random class labels in ``format_labels``'s form; None for an unconditional network."""
    if not num_classes:
        return None
    idx = torch.randint(num_classes, (n,), device=device, generator=generator)
    return format_labels(idx, num_classes, fmt, check=False)  # in range by construction, no host sync



__all__ = ["format_labels", "draw_labels"]
