"""Precision and recall of a generative model (Kynkäänniemi et al. 2019, "Improved Precision and Recall
Metric for Assessing Generative Models"), in the detector's feature space.

Each sample of a set spans a ball around it whose radius is the distance to its k-th nearest neighbour in the
set (k = 3; the sample itself, at distance 0, is not counted). Precision: the fraction of generated samples
inside some ball of the reference set. Recall: the fraction of reference samples inside some ball of the
generated set. SiD's ``sid_precision_recall.py`` computes these on the Inception features, as
guided-diffusion's evaluation does (StyleGAN2-ADA's original used VGG16 features), in float16; sidfast
computes the Euclidean distances in float64.
"""
from __future__ import annotations

import numpy as np
import torch

NEIGHBOURS = 3
_BLOCK = 1 << 25  # distances per block (256 MiB in float64)


def _as64(value, device) -> torch.Tensor:
    t = torch.as_tensor(np.asarray(value) if not isinstance(value, torch.Tensor) else value)
    return t.to(device, torch.float64)


def _rows(count: int, cols: int) -> int:
    return max(1, min(count, _BLOCK // max(cols, 1)))


def radii(manifold: torch.Tensor, k: int = NEIGHBOURS) -> torch.Tensor:
    """The distance of each sample of ``manifold`` to its k-th nearest other sample."""
    step = _rows(manifold.shape[0], manifold.shape[0])
    return torch.cat([torch.cdist(block, manifold).kthvalue(k + 1, dim=1).values
                      for block in manifold.split(step)])


def coverage(probes: torch.Tensor, manifold: torch.Tensor, radius: torch.Tensor) -> float:
    """The fraction of ``probes`` within ``radius`` (each manifold sample's own) of some manifold sample."""
    step = _rows(probes.shape[0], manifold.shape[0])
    inside = [(torch.cdist(block, manifold) <= radius).any(dim=1) for block in probes.split(step)]
    return float(torch.cat(inside).to(torch.float64).mean())


def precision_recall(gen, ref, k: int = NEIGHBOURS, device="cpu") -> dict:
    """``{"precision", "recall", "pr_k"}`` of generated features ``gen`` (N, D) against reference features
    ``ref`` (M, D)."""
    x, y = _as64(gen, device), _as64(ref, device)
    if x.dim() != 2 or y.dim() != 2 or x.shape[1] != y.shape[1]:
        raise ValueError(f"features must be (N, D) and (M, D) of one D, got {tuple(x.shape)} and {tuple(y.shape)}")
    if min(x.shape[0], y.shape[0]) <= k:
        raise ValueError(f"precision/recall with k = {k} needs more than {k} features on each side, got "
                         f"{x.shape[0]} and {y.shape[0]}")
    return {"precision": coverage(x, y, radii(y, k)), "recall": coverage(y, x, radii(x, k)), "pr_k": int(k)}


__all__ = ["precision_recall", "radii", "coverage", "NEIGHBOURS"]
