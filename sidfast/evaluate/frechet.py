"""The Fréchet distance between two Gaussians of features (FID: Heusel et al. 2017, on Inception features).

    FD = ||mu1 - mu2||^2 + tr(S1 + S2 - 2 (S1 S2)^(1/2))

EDM's ``fid.py`` (and SiD's ``sid_frechet_inception_distance.py``) computes (S1 S2)^(1/2) with
``scipy.linalg.sqrtm`` and takes the real part of the result. Only the trace of that square root enters FD,
and S1 S2 is similar to the symmetric S1^(1/2) S2 S1^(1/2), so its trace is the sum of the square roots of the
eigenvalues of that symmetric matrix: two symmetric eigendecompositions in float64 (``torch.linalg.eigh``),
no scipy. tests/evaluate/test_metrics.py holds it against the published scipy arithmetic.
"""
from __future__ import annotations

import numpy as np
import torch


def _float64(value) -> torch.Tensor:
    return torch.as_tensor(np.asarray(value) if not isinstance(value, torch.Tensor) else value).to(
        "cpu", torch.float64)


def _psd_sqrt(sigma: torch.Tensor) -> torch.Tensor:
    """The symmetric square root of a covariance (its eigenvalues below zero, rounding, taken as zero)."""
    w, v = torch.linalg.eigh((sigma + sigma.T) / 2)
    return (v * w.clamp(min=0).sqrt()) @ v.T


def trace_sqrt_product(sigma1, sigma2) -> float:
    """tr((S1 S2)^(1/2)) for covariances S1, S2: sum_i sqrt(lambda_i(S1^(1/2) S2 S1^(1/2)))."""
    s1, s2 = _float64(sigma1), _float64(sigma2)
    half = _psd_sqrt(s1)
    inner = half @ s2 @ half
    return float(torch.linalg.eigvalsh((inner + inner.T) / 2).clamp(min=0).sqrt().sum())


def frechet_distance(mu1, sigma1, mu2, sigma2) -> float:
    """The Fréchet distance of N(mu1, sigma1) and N(mu2, sigma2) (module docstring); arrays or tensors."""
    m1, m2, s1, s2 = (_float64(a) for a in (mu1, mu2, sigma1, sigma2))
    if m1.dim() != 1 or m1.shape != m2.shape:
        raise ValueError(f"mu1 and mu2 must be vectors of one length, got {tuple(m1.shape)} and {tuple(m2.shape)}")
    d = m1.shape[0]
    if s1.shape != (d, d) or s2.shape != (d, d):
        raise ValueError(f"sigma1 and sigma2 must be ({d}, {d}), got {tuple(s1.shape)} and {tuple(s2.shape)}")
    diff = m1 - m2
    return float(diff @ diff + torch.trace(s1) + torch.trace(s2)) - 2 * trace_sqrt_product(s1, s2)


__all__ = ["frechet_distance", "trace_sqrt_product"]
