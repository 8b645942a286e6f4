"""FID in the training loop (``--eval fid``): the Fréchet distance, in the Inception detector's features,
between samples of the run's EMA generator and reference statistics (``--eval-ref STATS.npz``, as
``sidfast eval --make-ref`` writes them or EDM publishes them).

The samples are teacher-fd's (``teacher_fd.student_samples``: sample i at the latent of index i, class i mod
the classes), split over the run's processes by ``shards.sharded``, so the value is the same on every rank
and for any number of processes. They are not ``sidfast eval``'s images of seeds 0 .. N-1 (EDM draws
latent and label from seed i), so the two FIDs of one generator differ by the sampling noise of N samples.
The detector is read from ``--eval-inception`` or sidfast's cache folder (``$SIDFAST_CACHE``,
``~/.cache/sidfast``), as ``sidfast eval`` finds it. Manual: docs/runs.md, "In-loop evaluation".
"""
from __future__ import annotations

import torch

from sidfast.evaluate.detector import DetectorError, load_detector
from sidfast.evaluate.frechet import feature_statistics, frechet_from_root, sqrt_psd
from sidfast.evaluate.shards import sharded
from sidfast.evaluate.statistics import ReferenceFileError, read_reference
from sidfast.evaluate.teacher_fd import sample_cond, sample_labels, student_samples
from sidfast.training.evaluation import EvalRun, Metric

NUM = 10000  # samples per evaluation (default): a fifth of the published 50k's cost, above Inception's 2048
#              features (the covariance of fewer is singular)
REF_OPTION = "option eval_ref"
DETECTOR_OPTION = "option eval_inception"


class LoopFID(Metric):
    """``--eval fid``: FID of ``num`` samples of the EMA generator against the statistics of ``ref``."""

    name = "fid"
    lower_is_better = True

    def __init__(self, num: int | None = None, ref: str | None = None, inception: str | None = None):
        self.num = int(num) if num is not None else NUM
        self.ref = ref
        self.inception = inception
        self.detector = None
        self.reference = None  # {"mu", "sigma", "root" (of sigma)} as float64 tensors

    def setup(self, run: EvalRun) -> None:
        """Read the reference and load the detector, refusing in one line what does not fit: no
        ``--eval-ref``, no detector, a detector of another feature count, samples that are not images,
        ``--eval-num`` not above the feature count."""
        if self.ref is None:
            raise ValueError(f"{REF_OPTION} is required with option eval fid: give reference statistics "
                             f"STATS.npz (sidfast eval --make-ref DATA --out STATS.npz)")
        shape = tuple(run.image_shape)
        if len(shape) != 3 or shape[0] not in (1, 3):
            raise ValueError(f"option eval fid: this run's samples have shape {list(shape)}, not grey or RGB "
                             f"images (the Inception detector takes 1 or 3 channels); use option eval teacher-fd")
        try:
            ref = read_reference(self.ref, REF_OPTION)
            self.detector = load_detector(self.inception, run.device, DETECTOR_OPTION)
        except (ReferenceFileError, DetectorError) as exc:
            raise ValueError(str(exc)) from None
        dim = self.detector.feature_dim
        if ref.dim != dim:
            raise ValueError(f"{REF_OPTION} {self.ref!r} holds statistics of {ref.dim} features but the detector "
                             f"({self.detector.path}) gives {dim}: make the reference with the same detector")
        if ref.image_shape is not None and tuple(ref.image_shape) != shape:
            raise ValueError(f"{REF_OPTION} {self.ref!r} was made from images of shape {list(ref.image_shape)}; "
                             f"this run's are {list(shape)}")
        if self.num <= dim:
            raise ValueError(f"option eval_num ({self.num}) must exceed the detector's feature dimension ({dim}): "
                             f"the covariance of {self.num} samples in {dim} dimensions is singular")
        mu, sigma = (torch.as_tensor(a, dtype=torch.float64) for a in (ref.mu, ref.sigma))
        self.reference = {"mu": mu, "sigma": sigma, "root": sqrt_psd(sigma)}

    def features(self, run: EvalRun):
        """Detector features (num, D) of the EMA generator's samples, over all ranks."""
        def chunk(start, n):
            labels, cond = sample_labels(run, start, n), sample_cond(run, start, n)
            return self.detector(student_samples(run, start, n, labels, cond))
        with torch.no_grad():
            return sharded(run.dist, self.num, run.batch, chunk)

    def compute(self, run: EvalRun) -> float:
        if self.reference is None:
            raise RuntimeError("LoopFID.setup(run) must run before FID is measured")
        mu, sigma = feature_statistics(self.features(run))
        ref = self.reference
        return frechet_from_root(ref["mu"], ref["sigma"], ref["root"], mu, sigma)


__all__ = ["LoopFID", "NUM"]
