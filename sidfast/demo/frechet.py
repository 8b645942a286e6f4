"""The demo's Frechet distances: the Gaussian fit and distance of ``sidfast.evaluate.frechet`` (the FID
formula), and the bootstrap over the evaluated samples that gives the demo's bars their standard errors."""
from __future__ import annotations

import torch

from sidfast._checks import check_int
from sidfast.evaluate.frechet import (feature_statistics, frechet_distance, frechet_distance_features,
                                      frechet_from_root, sqrt_psd)

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
    root_r = sqrt_psd(sigma_r)
    out = {name: [] for name in feats}
    for _ in range(resamples):
        idx = {}
        for name, f in feats.items():
            n = f.shape[0]
            if n not in idx:
                idx[n] = torch.randint(n, (n,), generator=g)
            out[name].append(frechet_from_root(mu_r, sigma_r, root_r, *_stats32(f.index_select(0, idx[n]))))
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


__all__ = ["feature_statistics", "frechet_distance", "frechet_distance_features", "fd_bootstrap",
           "fd_bootstrap_seeds", "BOOTSTRAP_RESAMPLES", "BOOTSTRAP_SEED"]
