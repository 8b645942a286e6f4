"""How the demo's stages run and report: CPU threads, wall-clock timing on a synced device, JSON written
whole."""
from __future__ import annotations

import contextlib
import json
import os
import time
from pathlib import Path

import torch


@contextlib.contextmanager
def threads_used(n: int | None):
    """Temporarily use ``n`` CPU threads for intra-op parallelism (None: leave torch's setting)."""
    old = torch.get_num_threads()
    if n is not None:
        torch.set_num_threads(n)
    try:
        yield
    finally:
        torch.set_num_threads(old)


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def timed(fn, device):
    sync(device)
    start = time.perf_counter()
    out = fn()
    sync(device)
    return out, time.perf_counter() - start


def write_json(path: Path, data: dict) -> None:
    """``data`` as indented JSON, written to a temporary name, fsynced and renamed onto ``path``."""
    tmp = path.with_name(f".{path.name}.tmp")
    with open(tmp, "w", encoding="utf-8") as f:
        json.dump(data, f, indent=2, default=str)
        f.write("\n")
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


__all__ = ["threads_used", "timed", "write_json"]
