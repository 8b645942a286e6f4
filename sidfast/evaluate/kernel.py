"""The kernel distance (KID: Binkowski et al. 2018, "Demystifying MMD GANs", on Inception features).

The unbiased estimate of MMD^2 with the cubic polynomial kernel k(x, y) = (x.y / D + 1)^3, averaged over
``subsets`` random subsets of ``subset_size`` samples from each side, as torch-fidelity's ``metric_kid.py``
defines it (defaults 100 subsets of 1000, both drawn without replacement from ``np.random.RandomState(2020)``,
the generated side first; its std is the population std over the subsets):

    MMD^2 = (sum_{i!=j} k(x_i, x_j) + sum_{i!=j} k(y_i, y_j)) / (m (m - 1)) - 2 sum_{i,j} k(x_i, y_j) / m^2

SiD's ``sid_kernel_inception_distance.py`` (StyleGAN2-ADA's) computes the same mean and, when a side has
fewer samples than ``subset_size``, uses the smaller count as the subset size; so does this function (the
size used is returned). Kernels in float64.
"""
from __future__ import annotations

import numpy as np
import torch

SUBSETS = 100
SUBSET_SIZE = 1000
SEED = 2020


def _mmd2_unbiased(x: torch.Tensor, y: torch.Tensor) -> float:
    m, d = x.shape
    k_xx = (x @ x.T / d + 1) ** 3
    k_yy = (y @ y.T / d + 1) ** 3
    k_xy = (x @ y.T / d + 1) ** 3
    within = (k_xx.sum() - k_xx.diagonal().sum()) + (k_yy.sum() - k_yy.diagonal().sum())
    return float(within / (m * (m - 1)) - 2 * k_xy.sum() / (m * m))


def kernel_distance(gen, ref, subsets: int = SUBSETS, subset_size: int = SUBSET_SIZE, seed: int = SEED,
                    device="cpu") -> dict:
    """KID of generated features ``gen`` (N, D) against reference features ``ref`` (M, D): ``{"kid": mean,
    "kid_std": std over the subsets, "kid_subset_size": the size used, "kid_subsets": subsets}``."""
    x_all = torch.as_tensor(np.asarray(gen) if not isinstance(gen, torch.Tensor) else gen)
    y_all = torch.as_tensor(np.asarray(ref) if not isinstance(ref, torch.Tensor) else ref)
    if x_all.dim() != 2 or y_all.dim() != 2 or x_all.shape[1] != y_all.shape[1]:
        raise ValueError(f"features must be (N, D) and (M, D) of one D, got {tuple(x_all.shape)} and "
                         f"{tuple(y_all.shape)}")
    if subsets < 1 or subset_size < 2:
        raise ValueError(f"need subsets >= 1 and subset_size >= 2, got {subsets} and {subset_size}")
    m = min(x_all.shape[0], y_all.shape[0], subset_size)
    if m < 2:
        raise ValueError(f"KID needs at least 2 features on each side, got {x_all.shape[0]} and {y_all.shape[0]}")
    x_all = x_all.to(device, torch.float64)
    y_all = y_all.to(device, torch.float64)
    rng = np.random.RandomState(seed)
    mmds = np.zeros(subsets)
    for i in range(subsets):
        x = x_all[torch.from_numpy(rng.choice(x_all.shape[0], m, replace=False)).to(device)]
        y = y_all[torch.from_numpy(rng.choice(y_all.shape[0], m, replace=False)).to(device)]
        mmds[i] = _mmd2_unbiased(x, y)
    return {"kid": float(mmds.mean()), "kid_std": float(mmds.std()), "kid_subset_size": int(m),
            "kid_subsets": int(subsets)}


__all__ = ["kernel_distance", "SUBSETS", "SUBSET_SIZE", "SEED"]
