"""Detector features of images that a callable makes, sharded over the processes of a run: the API that
``sidfast eval`` uses and that a training loop can call.

    feats = collect_features(make_images, num, detector, batch=64, dist_state=dist_state)
    stats = stats_of(feats)                       # sidfast.evaluate.statistics
    fid = frechet_distance(stats.mu, stats.sigma, ref.mu, ref.sigma)

``make_images(start, n)`` returns the images start .. start + n - 1 of the set, (n, C, H, W), uint8 in [0, 255]
or float in [-1, 1], on any device. The set is cut into batches of ``batch`` images in order, batch b goes to
rank b mod world, and every rank ends with all ``num`` features in the set's order: a batch holds the same
images whatever the number of processes, so 1 process and 2 give the same features and statistics.
"""
from __future__ import annotations

import torch
import torch.distributed as dist

from sidfast.utils.runtime import Dist


def batches(num: int, batch: int) -> list[tuple[int, int]]:
    """(start, count) of each batch of a set of ``num`` images cut into ``batch``-sized pieces, in order."""
    if num < 1 or batch < 1:
        raise ValueError(f"need num >= 1 and batch >= 1, got {num} and {batch}")
    return [(start, min(batch, num - start)) for start in range(0, num, batch)]


def _gather(local: torch.Tensor, pieces: list[tuple[int, int]], dist_state: Dist) -> torch.Tensor:
    """Every rank's features, in the set's order, on every rank (a CPU collective on the control group)."""
    world = dist_state.world
    counts = [sum(n for _, n in pieces[r::world]) for r in range(world)]
    padded = local.new_zeros(max(counts), local.shape[1])
    padded[:local.shape[0]] = local
    parts = [torch.empty_like(padded) for _ in range(world)]
    dist.all_gather(parts, padded, group=dist_state.control)
    ordered = [None] * len(pieces)
    for r in range(world):
        offset = 0
        for b in range(r, len(pieces), world):
            n = pieces[b][1]
            ordered[b] = parts[r][offset:offset + n]
            offset += n
    return torch.cat(ordered)


def collect_features(make_images, num: int, detector, batch: int = 64, dist_state: Dist | None = None,
                     progress=None) -> torch.Tensor:
    """float32 (num, D) features on the CPU of the ``num`` images that ``make_images(start, n)`` makes (module
    docstring), each rank making its share of the batches. ``detector``: a ``sidfast.evaluate.detector.Detector``
    (or any ``images -> (n, D)``); ``dist_state``: the run's process group (``runtime.init_distributed``; None: one
    process); ``progress(n)``: called with each batch's size as it is done."""
    dist_state = dist_state or Dist()
    pieces = batches(num, batch)
    local = []
    with torch.inference_mode():
        for start, n in pieces[dist_state.rank::dist_state.world]:
            images = make_images(start, n)
            if not isinstance(images, torch.Tensor) or images.shape[0] != n:
                got = tuple(images.shape) if isinstance(images, torch.Tensor) else type(images).__name__
                raise ValueError(f"make_images({start}, {n}) returned {got}; expected {n} images (n, C, H, W)")
            local.append(detector(images).to("cpu", torch.float32))
            if progress is not None:
                progress(n)
    dim = local[0].shape[1] if local else int(detector.feature_dim)
    mine = torch.cat(local) if local else torch.zeros(0, dim)
    return _gather(mine, pieces, dist_state) if dist_state.enabled else mine


__all__ = ["collect_features", "batches"]
