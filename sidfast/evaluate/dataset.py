"""Reference statistics of a data set (``sidfast eval --make-ref DATA``): the detector's features of every image
of any source ``sidfast.training.data.open_images`` reads (a folder, a ``dataset.zip``, an npz/npy/pt array),
their mean and covariance (EDM's ``fid.py ref``: all images, uint8, grey repeated to RGB), and the features of
up to ``keep_features`` of them for KID and precision/recall.
"""
from __future__ import annotations

from sidfast.evaluate.features import collect_features
from sidfast.evaluate.statistics import FeatureStats, stats_of
from sidfast.training.data import open_images

KEEP_FEATURES = 50000  # the features a reference keeps by default: all of CIFAR-10's training set


def reference_stats(data, detector, batch: int = 64, keep_features: int | None = KEEP_FEATURES,
                    dist_state=None, progress=None) -> FeatureStats:
    """The statistics of every image of ``data`` (``open_images``: DataError naming ``--data`` for a bad source),
    with the features of ``keep_features`` of them (a seeded subset when there are more; None: all)."""
    source = open_images(data)
    count = len(source)

    def make_images(start: int, n: int):
        images, _ = source.read(list(range(start, start + n)))
        return images  # float32 in [-1, 1] of uint8 data: to_uint8 gives back the stored bytes

    features = collect_features(make_images, count, detector, batch, dist_state, progress)
    return stats_of(features, keep_features, image_shape=source.shape)


__all__ = ["reference_stats", "KEEP_FEATURES"]
