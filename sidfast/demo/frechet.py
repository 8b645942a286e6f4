"""Frechet distance between two Gaussians fitted to feature sets (the FID formula, Heusel et al. 2017, eq. 6).

    FD = ||mu1 - mu2||^2 + tr(S1) + tr(S2) - 2 tr((S1^{1/2} S2 S1^{1/2})^{1/2})

The trace of the matrix square root uses symmetric eigendecompositions only (no scipy.linalg.sqrtm):
tr((S1 S2)^{1/2}) = tr((S1^{1/2} S2 S1^{1/2})^{1/2}) and S1^{1/2} S2 S1^{1/2} is symmetric positive
semi-definite, so its square root's trace is the sum of the square roots of its eigenvalues. All in float64.
"""
from __future__ import annotations

import torch

from sidfast._checks import check_int


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


def _sqrt_psd(m: torch.Tensor) -> torch.Tensor:
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
    return _frechet(mu1, sigma1, _sqrt_psd(sigma1), mu2, sigma2)


def _frechet(mu1, sigma1, root1, mu2, sigma2) -> float:
    """``frechet_distance`` given ``root1``, the square root of ``sigma1`` (float64, shapes checked)."""
    inner = root1 @ sigma2 @ root1
    vals = torch.linalg.eigvalsh(0.5 * (inner + inner.T)).clamp(min=0)
    # FD = |mu1 - mu2|^2 + tr(S1 + S2 - 2 (S1 S2)^{1/2}) (Heusel et al. 2017, eq. 6; Dowson & Landau 1982)
    fd = (mu1 - mu2).square().sum() + sigma1.trace() + sigma2.trace() - 2 * vals.sqrt().sum()
    return max(float(fd), 0.0)


def frechet_distance_features(a: torch.Tensor, b: torch.Tensor) -> float:
    """Frechet distance between the Gaussians fitted to two feature sets (N1, D) and (N2, D)."""
    return frechet_distance(*feature_statistics(a), *feature_statistics(b))


BOOTSTRAP_RESAMPLES = 200   # resamples of the FD bars' bootstrap
BOOTSTRAP_SEED = 20261206   # its generator's seed (plus the evaluation seed)


def fd_bootstrap(features: dict, real: torch.Tensor, resamples: int = BOOTSTRAP_RESAMPLES,
                 seed: int = BOOTSTRAP_SEED) -> dict:
    """Bootstrap replicates of the FD of each feature set in ``features`` ({name: (N, D)}) to ``real``
    (M, D): ``{name: [resamples floats]}``.

    Each replicate draws N rows with replacement from the generated sets and recomputes every FD against
    the real set's statistics, which are not resampled: the reference is the demo's whole data set (all
    1,797 digits, the same in every run), and the noise the bars ask about is that of the evaluated samples.
    Sets of one size share their row indices (the demo's teacher and students are sampled from the same
    latents and labels, row by row, so their FDs are paired); a statistic of several FDs (a ratio)
    computed within each replicate then carries their correlation, and the standard deviation of its
    replicates is its standard error (the replicates' mean sits above the estimate: FD's small-sample bias;
    only their spread is used). Cost: one 64-d covariance (summed in float32) and one 64x64
    eigendecomposition per FD, 200 x 6 of them in about 10-40 s on the shared 2-core CPU
    (``benchmarks/results/cpu-demo-seeds.md``).
    """
    check_int("resamples", resamples, 2)
    if not features:
        raise ValueError("fd_bootstrap needs at least one feature set")
    g = torch.Generator().manual_seed(int(seed))
    feats = {name: f.detach().to(torch.float32) for name, f in features.items()}
    for f in (real, *feats.values()):
        if f.dim() != 2 or f.shape[0] < 2 or f.shape[1] != real.shape[1] or not torch.isfinite(f).all():
            raise ValueError(f"features must be finite (N >= 2, D) tensors of one D, got {tuple(f.shape)}")
    # FD is symmetric: the real set first, its square root once
    mu_r, sigma_r = feature_statistics(real)
    root_r = _sqrt_psd(sigma_r)
    out = {name: [] for name in feats}
    for _ in range(resamples):
        idx = {}
        for name, f in feats.items():
            n = f.shape[0]
            if n not in idx:
                idx[n] = torch.randint(n, (n,), generator=g)
            out[name].append(_frechet(mu_r, sigma_r, root_r, *_stats32(f.index_select(0, idx[n]))))
    return out


def fd_bootstrap_seeds(features: dict, real: torch.Tensor, seeds, resamples: int = BOOTSTRAP_RESAMPLES) -> dict:
    """``fd_bootstrap`` per seed of a run: ``features`` {name: [per-seed (N, D)]} -> {name: [per-seed
    [resamples floats]]}, the resamples of seed s drawn with seed ``BOOTSTRAP_SEED + s``."""
    seeds = list(seeds)
    for name, per_seed in features.items():
        if len(per_seed) != len(seeds):
            raise ValueError(f"{name!r} has features of {len(per_seed)} seeds, expected {len(seeds)}")
    out = {name: [] for name in features}
    for i, s in enumerate(seeds):
        reps = fd_bootstrap({name: f[i] for name, f in features.items()}, real, resamples, BOOTSTRAP_SEED + s)
        for name, r in reps.items():
            out[name].append(r)
    return out


def _stats32(f: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """``feature_statistics`` of a resample, its sums in float32 (half the cost of float64 on a CPU; relative
    error about 1e-6 of the covariance, far below the spread of the resamples), returned in float64."""
    mu = f.mean(0)
    c = f - mu
    return mu.to(torch.float64), (c.T @ c).to(torch.float64) / (f.shape[0] - 1)
