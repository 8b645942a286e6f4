"""The Fréchet distance between two Gaussians of features: FID's (Heusel et al. 2017, on Inception features),
and the teacher-feature distance's and the demo's (the same formula on other features).

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


def feature_statistics(features: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(mean (D,), unbiased covariance (D, D)) in float64 of features (N, D), N >= 2 (centred before the
    product: ``sidfast.evaluate.statistics.stats_of`` is EDM's own arithmetic for FID's reference files)."""
    if not isinstance(features, torch.Tensor) or features.dim() != 2:
        got = getattr(features, "shape", type(features))
        raise ValueError(f"features must be a 2-D tensor (N, D), got {got}")
    if features.shape[0] < 2:
        raise ValueError(f"features needs at least 2 rows to estimate a covariance, got {features.shape[0]}")
    f = features.detach().to(torch.float64)
    if not torch.isfinite(f).all():
        raise ValueError("features contain NaN or infinite values")
    mu = f.mean(0)
    c = f - mu
    return mu, c.T @ c / (f.shape[0] - 1)


def sqrt_psd(sigma: torch.Tensor) -> torch.Tensor:
    """The symmetric square root of a covariance (its eigenvalues below zero, rounding, taken as zero)."""
    w, v = torch.linalg.eigh((sigma + sigma.T) / 2)
    return (v * w.clamp(min=0).sqrt()) @ v.T


def _trace_sqrt_from_root(root1: torch.Tensor, sigma2: torch.Tensor) -> torch.Tensor:
    inner = root1 @ sigma2 @ root1
    return torch.linalg.eigvalsh((inner + inner.T) / 2).clamp(min=0).sqrt().sum()


def trace_sqrt_product(sigma1, sigma2) -> float:
    """tr((S1 S2)^(1/2)) for covariances S1, S2: sum_i sqrt(lambda_i(S1^(1/2) S2 S1^(1/2)))."""
    s1, s2 = _float64(sigma1), _float64(sigma2)
    return float(_trace_sqrt_from_root(sqrt_psd(s1), s2))


def frechet_distance(mu1, sigma1, mu2, sigma2) -> float:
    """The Fréchet distance of N(mu1, sigma1) and N(mu2, sigma2) (module docstring); arrays or tensors."""
    m1, m2, s1, s2 = (_float64(a) for a in (mu1, mu2, sigma1, sigma2))
    if m1.dim() != 1 or m1.shape != m2.shape:
        raise ValueError(f"mu1 and mu2 must be vectors of one length, got {tuple(m1.shape)} and {tuple(m2.shape)}")
    d = m1.shape[0]
    if s1.shape != (d, d) or s2.shape != (d, d):
        raise ValueError(f"sigma1 and sigma2 must be ({d}, {d}), got {tuple(s1.shape)} and {tuple(s2.shape)}")
    return frechet_from_root(m1, s1, sqrt_psd(s1), m2, s2)


def frechet_from_root(mu1, sigma1, root1, mu2, sigma2) -> float:
    """``frechet_distance`` given ``root1 = sqrt_psd(sigma1)`` (float64 tensors of checked shapes): one set's
    root computed once for many distances to it. A value below zero (rounding of a zero FD) is returned as 0."""
    diff = mu1 - mu2
    fd = diff @ diff + sigma1.trace() + sigma2.trace() - 2 * _trace_sqrt_from_root(root1, sigma2)
    return max(float(fd), 0.0)


def frechet_distance_features(a: torch.Tensor, b: torch.Tensor) -> float:
    """The Fréchet distance between the Gaussians fitted to two feature sets (N1, D) and (N2, D)."""
    return frechet_distance(*feature_statistics(a), *feature_statistics(b))


__all__ = ["feature_statistics", "frechet_distance", "frechet_distance_features", "frechet_from_root", "sqrt_psd",
           "trace_sqrt_product"]
