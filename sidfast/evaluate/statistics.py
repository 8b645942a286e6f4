"""Feature statistics: mean and covariance of detector features (EDM's arithmetic), and the reference file
that holds them.

The reference file is EDM's ``.npz``: ``mu`` (D,) and ``sigma`` (D, D), float64, read as they are (EDM's
published ``fid-refs`` work unchanged). ``sidfast eval --make-ref`` writes the same two arrays and adds
``features`` (the features of up to ``--ref-features`` images, which KID and precision/recall need),
``count`` (the images behind mu and sigma) and ``image_shape`` (C, H, W of the data).
"""
from __future__ import annotations

import zipfile
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from sidfast.utils.files import atomic_write


class ReferenceFileError(ValueError):
    """A reference file that is missing or malformed; the message names the option (``--ref``)."""


@dataclass
class FeatureStats:
    """mu (D,) and sigma (D, D) in float64; ``count``: the samples behind them; ``features``: float32 (M, D),
    all of them or a subset (None when only mu and sigma are known); ``image_shape``: (C, H, W) of the images
    when known."""

    mu: np.ndarray
    sigma: np.ndarray
    count: int | None = None
    features: np.ndarray | None = None
    image_shape: tuple | None = None

    @property
    def dim(self) -> int:
        return int(self.mu.shape[0])


def subset_indices(count: int, keep: int | None, seed: int = 0) -> np.ndarray:
    """The indices of ``keep`` of ``count`` samples, drawn without replacement with ``seed`` and sorted (all of
    them when ``keep`` is None or at least ``count``)."""
    if keep is None or keep >= count:
        return np.arange(count)
    return np.sort(np.random.RandomState(seed).choice(count, keep, replace=False))


def stats_of(features, keep_features: int | None = None, image_shape=None) -> FeatureStats:
    """The statistics of features (N, D), as EDM's ``fid.py`` computes them: in float64, mu = sum / N and
    sigma = (sum x x^T - N mu mu^T) / (N - 1). ``keep_features``: how many of the features to keep with them
    (``subset_indices``; None: all; 0: none)."""
    x = torch.as_tensor(features)
    if x.dim() != 2 or x.shape[0] < 2:
        raise ValueError(f"features must be (N, D) with N >= 2, got shape {tuple(x.shape)}")
    n = x.shape[0]
    x64 = x.to(torch.float64)
    mu = x64.sum(0)
    sigma = x64.T @ x64
    mu /= n
    sigma -= torch.outer(mu, mu) * n
    sigma /= n - 1
    kept = None
    if keep_features != 0:
        kept = x.to(torch.float32)[torch.from_numpy(subset_indices(n, keep_features))].numpy()
    return FeatureStats(mu.numpy(), sigma.numpy(), n, kept, None if image_shape is None else tuple(image_shape))


def read_reference(path, option: str = "--ref") -> FeatureStats:
    """The statistics of a reference ``.npz`` (EDM's ``mu`` and ``sigma``, and what ``--make-ref`` adds).
    Raises ``ReferenceFileError`` naming ``option`` for a missing file, missing arrays or wrong shapes."""
    path = Path(path).expanduser()
    where = f"{option} {str(path)!r}"
    if not path.is_file():
        raise ReferenceFileError(f"{where} does not exist (make one with: sidfast eval --make-ref DATA --out "
                             f"STATS.npz)")
    if not zipfile.is_zipfile(path):
        raise ReferenceFileError(f"{where} cannot be read as an .npz file of arrays mu and sigma: it is not an "
                                 f".npz archive")
    try:
        with np.load(path, allow_pickle=False) as loaded:
            arrays = {k: loaded[k] for k in loaded.files}
    except Exception as exc:  # numpy raises many types for a file that is not an .npz
        raise ReferenceFileError(f"{where} cannot be read as an .npz file of arrays mu and sigma: {exc}") from None
    if "mu" not in arrays or "sigma" not in arrays:
        found = ", ".join(sorted(arrays)) or "none"
        raise ReferenceFileError(f"{where} holds no 'mu' and 'sigma' arrays (it has: {found}); use EDM's reference "
                                 f"statistics or make them with sidfast eval --make-ref")
    mu, sigma = arrays["mu"], arrays["sigma"]
    if mu.ndim != 1 or mu.shape[0] < 1 or not np.issubdtype(mu.dtype, np.number):
        raise ReferenceFileError(f"{where}: mu has shape {mu.shape} ({mu.dtype}); expected numbers of shape (D,)")
    dim = mu.shape[0]
    if sigma.shape != (dim, dim) or not np.issubdtype(sigma.dtype, np.number):
        raise ReferenceFileError(f"{where}: sigma has shape {sigma.shape}; expected ({dim}, {dim}) for mu of {dim} "
                             f"features")
    if not (np.isfinite(mu).all() and np.isfinite(sigma).all()):
        raise ReferenceFileError(f"{where}: mu or sigma holds NaN or infinity")
    features = arrays.get("features")
    if features is not None and (features.ndim != 2 or features.shape[1] != dim or features.shape[0] < 2):
        raise ReferenceFileError(f"{where}: features has shape {features.shape}; expected (M, {dim}) with M >= 2")
    shape = arrays.get("image_shape")
    if shape is not None and (shape.shape != (3,) or not np.issubdtype(shape.dtype, np.integer)):
        raise ReferenceFileError(f"{where}: image_shape has shape {shape.shape}; expected 3 integers (C, H, W)")
    count = arrays.get("count")
    return FeatureStats(mu.astype(np.float64), sigma.astype(np.float64),
                        None if count is None else int(count),
                        None if features is None else features.astype(np.float32),
                        None if shape is None else tuple(int(s) for s in shape))


def write_reference(path, stats: FeatureStats) -> Path:
    """Write ``stats`` as a reference ``.npz`` atomically (a reader sees the old file or the whole new one)."""
    arrays = {"mu": np.asarray(stats.mu, np.float64), "sigma": np.asarray(stats.sigma, np.float64)}
    if stats.count is not None:
        arrays["count"] = np.int64(stats.count)
    if stats.features is not None:
        arrays["features"] = np.asarray(stats.features, np.float32)
    if stats.image_shape is not None:
        arrays["image_shape"] = np.asarray(stats.image_shape, np.int64)

    def write(tmp):
        with open(tmp, "wb") as f:  # a file object: np.savez would append .npz to a name
            np.savez(f, **arrays)

    return atomic_write(Path(path), write)


__all__ = ["FeatureStats", "ReferenceFileError", "stats_of", "subset_indices", "read_reference", "write_reference"]
