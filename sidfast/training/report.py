"""What a run leaves in its directory: metrics.jsonl, PNG sample grids, the loss-curve plot, a summary table.

Images are (N, C, H, W) tensors in [-1, 1] with C = 1 (grayscale) or 3 (RGB); other channel counts show
their first channel. Every file is written to a temporary name and renamed, so readers never see half a PNG.
"""
from __future__ import annotations

import json
import math
import os
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

import numpy as np
import torch
from torch import nn


def _atomic_write(path: Path, write) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    os.close(fd)
    try:
        write(tmp)
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise
    return path


def to_uint8(images: torch.Tensor) -> np.ndarray:
    """(N, C, H, W) in [-1, 1] -> (N, H, W, 3 or 1) uint8 (first channel when C is neither 1 nor 3)."""
    if not isinstance(images, torch.Tensor) or images.dim() != 4:
        got = tuple(images.shape) if isinstance(images, torch.Tensor) else type(images).__name__
        raise ValueError(f"images must be a tensor of shape (N, C, H, W), got {got}")
    x = images.detach().float().cpu()
    if x.shape[1] not in (1, 3):
        x = x[:, :1]
    x = torch.nan_to_num(x, nan=0.0).clamp(-1, 1).add(1).mul(127.5).round().to(torch.uint8)
    return x.permute(0, 2, 3, 1).numpy()


def tile(images: torch.Tensor, cols: int | None = None, pad: int = 1) -> np.ndarray:
    """One (rows*(H+pad)+pad, cols*(W+pad)+pad, 3 or 1) uint8 canvas with the images in row-major order."""
    arr = to_uint8(images)
    n, h, w, c = arr.shape
    cols = cols or max(1, math.ceil(math.sqrt(n)))
    rows = math.ceil(n / cols)
    canvas = np.full((rows * (h + pad) + pad, cols * (w + pad) + pad, c), 255, dtype=np.uint8)
    for i in range(n):
        r, col = divmod(i, cols)
        top = pad + r * (h + pad)
        left = pad + col * (w + pad)
        canvas[top:top + h, left:left + w] = arr[i]
    return canvas


GRID_FORMATS = {".png": "png", ".jpg": "jpeg", ".jpeg": "jpeg"}  # save_grid's formats, by the name's suffix


def _imsave(path: Path, array: np.ndarray, scale: int = 1, fmt: str = "png") -> Path:
    import matplotlib

    matplotlib.use("Agg", force=False)
    from matplotlib import image as mpimg

    if scale > 1:
        array = np.kron(array, np.ones((scale, scale, 1), dtype=np.uint8))
    img = array[..., 0] if array.shape[-1] == 1 else array
    kw = {"cmap": "gray", "vmin": 0, "vmax": 255} if img.ndim == 2 else {}
    return _atomic_write(path, lambda tmp: mpimg.imsave(tmp, img, format=fmt, **kw))


def save_grid(images: torch.Tensor, path, cols: int | None = None, scale: int | None = None) -> Path:
    """Write ``images`` (N, C, H, W) in [-1, 1] as one grid image; small images are upscaled to be visible.

    The format follows the suffix of ``path``: one of ``GRID_FORMATS`` (PNG or JPEG).
    """
    path = Path(path)
    fmt = GRID_FORMATS.get(path.suffix.lower())
    if fmt is None:
        raise ValueError(f"path {str(path)!r}: a grid is written as {', '.join(GRID_FORMATS)}; "
                         f"got suffix {path.suffix!r}")
    h = images.shape[-1]
    scale = scale if scale is not None else max(1, 64 // max(h, 1))
    return _imsave(path, tile(images, cols), scale, fmt)


def save_images(images: torch.Tensor, directory, start: int = 0) -> list[Path]:
    """Write each image as ``directory/000123.png``; returns the paths."""
    directory = Path(directory)
    return [_imsave(directory / f"{start + i:06d}.png", a) for i, a in enumerate(to_uint8(images))]


def check_samples_path(path, name: str = "path") -> None:
    """Raise ValueError (naming the argument ``name``) unless ``save_samples`` can write to ``path``:
    a name with an image suffix (``GRID_FORMATS``) not a directory, or a name without a suffix not a file."""
    path = Path(path)
    if path.suffix.lower() in GRID_FORMATS:
        if path.is_dir():
            raise ValueError(f"{name} {str(path)!r} is a directory; an image name ({path.suffix}) writes "
                             "one grid")
    elif path.suffix:
        raise ValueError(f"{name} {str(path)!r}: {path.suffix!r} is not an image suffix; give "
                         f"{' or '.join(GRID_FORMATS)} for one grid, or a name without a suffix for a "
                         "directory of PNGs")
    elif path.exists() and not path.is_dir():
        raise ValueError(f"{name} {str(path)!r} exists and is not a directory (use a .png name for a grid)")


def save_samples(images: torch.Tensor, path) -> str:
    """One grid (``save_grid``) for a name with an image suffix, else one PNG per image in the directory
    ``path`` (``save_images``); returns what was written, in words."""
    check_samples_path(path)
    if Path(path).suffix:
        save_grid(images, path)
        return f"a grid of {len(images)} images to {path}"
    save_images(images, path)
    return f"{len(images)} images to {path}/"


class MetricsLog:
    """Appends one JSON object per line to ``path`` (rank 0 only in distributed runs)."""

    def __init__(self, path, enabled: bool = True):
        self.path = Path(path)
        self.enabled = enabled
        if enabled:
            self.path.parent.mkdir(parents=True, exist_ok=True)

    def append(self, record: dict) -> None:
        if not self.enabled:
            return
        with open(self.path, "a", encoding="utf-8") as f:
            f.write(json.dumps(record, sort_keys=True) + "\n")
            f.flush()

    def read(self) -> list[dict]:
        return read_metrics(self.path)


def read_metrics(path) -> list[dict]:
    """The records of a metrics.jsonl file (a torn last line, e.g. after a kill, is skipped)."""
    path = Path(path)
    if not path.is_file():
        return []
    out = []
    for line in path.read_text(encoding="utf-8").splitlines():
        try:
            out.append(json.loads(line))
        except json.JSONDecodeError:
            continue
    return out


LOSS_KEYS = ("loss_g", "loss_fake", "loss_gan", "loss_d", "logit_real", "logit_fake")


def plot_losses(records: list[dict], path, keys=LOSS_KEYS) -> Path | None:
    """Loss curves (one panel per key, against the iteration) as a PNG; None when there is nothing to plot.
    Keys no record holds get no panel (a SiD run has no GAN loss, discriminator loss or logits)."""
    series = {k: [(r["iteration"], r[k]) for r in records if k in r and "iteration" in r] for k in keys}
    series = {k: v for k, v in series.items() if v}
    if not series:
        return None
    import matplotlib

    matplotlib.use("Agg", force=False)
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, len(series), figsize=(5 * len(series), 3.5), squeeze=False)
    for ax, (k, pts) in zip(axes[0], series.items()):
        it, val = zip(*pts)
        ax.plot(it, val, lw=1)
        ax.set_xlabel("iteration")
        ax.set_title(k)
        ax.grid(alpha=0.3)
    fig.tight_layout()
    try:
        return _atomic_write(Path(path), lambda tmp: fig.savefig(tmp, format="png", dpi=100))
    finally:
        plt.close(fig)


def run_summary(iteration: int, ran: int, nimg: int, batch: int, seconds: float, last: dict, processes: int,
                device, checkpoint, interrupted, complete: bool = False, extra_keys=()) -> dict:
    """summary.json of a distill run: counters, speed of this process's part (``ran`` iterations in
    ``seconds``), the last averaged losses (and ``extra_keys`` of the last metrics record), where it saved."""
    summary = {"iterations": iteration, "iterations_this_run": ran, "images": nimg, "seconds": round(seconds, 3),
               "it_per_s": ran / max(seconds, 1e-9), "img_per_s": ran * batch / max(seconds, 1e-9),
               "loss_g": last.get("loss_g"), "loss_fake": last.get("loss_fake"), "processes": processes,
               "device": str(device), "checkpoint": str(checkpoint) if checkpoint else None,
               "interrupted": interrupted}
    summary.update({k: last[k] for k in extra_keys if k in last})
    if complete:
        summary["complete_before_start"] = True
    return summary


def summary_table(rows: list[tuple[str, object]], title: str = "summary") -> str:
    """A two-column plain-text table."""
    cells = [(str(k), v if isinstance(v, str) else _fmt(v)) for k, v in rows]
    kw = max([len(k) for k, _ in cells] + [len(title)])
    vw = max([len(v) for _, v in cells] + [1])
    line = f"+{'-' * (kw + 2)}+{'-' * (vw + 2)}+"
    out = [line, f"| {title.ljust(kw)} | {''.ljust(vw)} |", line]
    out += [f"| {k.ljust(kw)} | {v.ljust(vw)} |" for k, v in cells]
    out.append(line)
    return "\n".join(out)


def _fmt(v) -> str:
    if isinstance(v, float):
        return f"{v:.4g}"
    return str(v)


__all__ = ["GRID_FORMATS", "save_grid", "save_images", "save_samples", "check_samples_path", "tile",
           "to_uint8", "MetricsLog", "read_metrics", "plot_losses", "summary_table", "LOSS_KEYS"]
