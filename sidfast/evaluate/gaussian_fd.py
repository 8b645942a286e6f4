"""Frechet distance between two Gaussians fitted to feature sets (the FID formula, Heusel et al. 2017, eq. 6).

    FD = ||mu1 - mu2||^2 + tr(S1) + tr(S2) - 2 tr((S1^{1/2} S2 S1^{1/2})^{1/2})

The trace of the matrix square root uses symmetric eigendecompositions only (no scipy.linalg.sqrtm):
tr((S1 S2)^{1/2}) = tr((S1^{1/2} S2 S1^{1/2})^{1/2}) and S1^{1/2} S2 S1^{1/2} is symmetric positive
semi-definite, so its square root's trace is the sum of the square roots of its eigenvalues. All in float64.
"""
from __future__ import annotations

import torch


def feature_statistics(features: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(mean (D,), unbiased covariance (D, D)) in float64 of features (N, D), N >= 2."""
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


def sqrt_psd(m: torch.Tensor) -> torch.Tensor:
    """Symmetric square root of a symmetric PSD matrix via eigh (negative round-off eigenvalues clipped to
    0)."""
    vals, vecs = torch.linalg.eigh(0.5 * (m + m.T))
    return (vecs * vals.clamp(min=0).sqrt()) @ vecs.T


def frechet_distance(mu1: torch.Tensor, sigma1: torch.Tensor, mu2: torch.Tensor,
                     sigma2: torch.Tensor) -> float:
    """Frechet distance between N(mu1, sigma1) and N(mu2, sigma2); mu (D,), sigma (D, D) symmetric PSD."""
    mu1, mu2 = mu1.to(torch.float64), mu2.to(torch.float64)
    sigma1, sigma2 = sigma1.to(torch.float64), sigma2.to(torch.float64)
    if mu1.shape != mu2.shape or mu1.dim() != 1:
        raise ValueError(f"mu1 and mu2 must be vectors of one length, got {tuple(mu1.shape)} and "
                         f"{tuple(mu2.shape)}")
    d = mu1.shape[0]
    if sigma1.shape != (d, d) or sigma2.shape != (d, d):
        raise ValueError(f"sigma1 and sigma2 must be ({d}, {d}), got {tuple(sigma1.shape)} and "
                         f"{tuple(sigma2.shape)}")
    return frechet_from_root(mu1, sigma1, sqrt_psd(sigma1), mu2, sigma2)


def frechet_from_root(mu1, sigma1, root1, mu2, sigma2) -> float:
    """``frechet_distance`` given ``root1``, the square root of ``sigma1`` (float64, shapes checked): one
    set's root computed once for many distances to it."""
    inner = root1 @ sigma2 @ root1
    vals = torch.linalg.eigvalsh(0.5 * (inner + inner.T)).clamp(min=0)
    # FD = |mu1 - mu2|^2 + tr(S1 + S2 - 2 (S1 S2)^{1/2}) (Heusel et al. 2017, eq. 6; Dowson & Landau 1982)
    fd = (mu1 - mu2).square().sum() + sigma1.trace() + sigma2.trace() - 2 * vals.sqrt().sum()
    return max(float(fd), 0.0)


def frechet_distance_features(a: torch.Tensor, b: torch.Tensor) -> float:
    """Frechet distance between the Gaussians fitted to two feature sets (N1, D) and (N2, D)."""
    return frechet_distance(*feature_statistics(a), *feature_statistics(b))


__all__ = ["feature_statistics", "frechet_distance", "frechet_distance_features", "frechet_from_root", "sqrt_psd"]
