"""The samples of an evaluation, split over a run's processes: per-sample random draws and chunks gathered in
order, so that the set measured does not depend on the number of processes.

Sample i's draws (its latent, its noise) come from a generator seeded by ``sample_seed(role, i)`` alone; the
N samples are cut into chunks of ``batch``, rank r computes chunks r, r + world, ... (every rank the same
number of forwards, a repeated last chunk where the count does not divide: FSDP's sharded networks forward
together), and every rank receives all chunks in order.
"""
from __future__ import annotations

import math
from typing import Callable

import torch

from sidfast.utils import runtime

_MASK = (1 << 64) - 1


def sample_seed(role: int, index: int) -> int:
    """The seed of sample ``index``'s draws of kind ``role`` (splitmix64 of both: distinct roles and indices
    give unrelated streams)."""
    x = ((role & 0xFFFF) << 48 | (index & ((1 << 48) - 1))) & _MASK
    x = (x + 0x9E3779B97F4A7C15) & _MASK
    x = ((x ^ (x >> 30)) * 0xBF58476D1CE4E5B9) & _MASK
    x = ((x ^ (x >> 27)) * 0x94D049BB133111EB) & _MASK
    return (x ^ (x >> 31)) & ((1 << 63) - 1)


def per_sample_normal(shape, start: int, n: int, role: int) -> torch.Tensor:
    """Standard normal draws (n, *shape) on the CPU for samples start .. start + n - 1, each from its own
    seed: the same values whichever chunk or process draws them."""
    out = torch.empty((n, *shape))
    for j in range(n):
        out[j].normal_(generator=torch.Generator().manual_seed(sample_seed(role, start + j)))
    return out


def sharded(dist: runtime.Dist, num: int, batch: int, compute: Callable[[int, int], torch.Tensor]) -> torch.Tensor:
    """``compute(start, n)`` (a tensor of n rows) over samples 0 .. num - 1 in chunks of ``batch``, the chunks
    split over the processes of ``dist``; every rank returns all ``num`` rows, in order, on the CPU."""
    chunks = math.ceil(num / batch)
    per_rank = math.ceil(chunks / dist.world)
    mine = []
    for k in range(per_rank):
        c = min(dist.rank + k * dist.world, chunks - 1)  # past the end: the last chunk again, dropped below
        start = c * batch
        out = compute(start, min(batch, num - start)).detach().cpu()
        if dist.rank + k * dist.world < chunks:
            mine.append((c, out))
    gathered = sorted((pair for part in runtime.all_gather(dist, mine) for pair in part), key=lambda p: p[0])
    return torch.cat([out for _, out in gathered])


__all__ = ["sample_seed", "per_sample_normal", "sharded"]
