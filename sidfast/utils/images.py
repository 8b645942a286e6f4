"""Images out: tensors in [-1, 1] to uint8, tiled grids, PNG/JPEG files (``sidfast sample --out``, the
trainer's grids)."""
from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import torch

from sidfast.utils.files import atomic_write


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
    import matplotlib  # matplotlib stays optional: only writing images needs it

    matplotlib.use("Agg", force=False)
    from matplotlib import image as mpimg

    if scale > 1:
        array = np.kron(array, np.ones((scale, scale, 1), dtype=np.uint8))
    img = array[..., 0] if array.shape[-1] == 1 else array
    kw = {"cmap": "gray", "vmin": 0, "vmax": 255} if img.ndim == 2 else {}
    return atomic_write(path, lambda tmp: mpimg.imsave(tmp, img, format=fmt, **kw))


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


__all__ = ["to_uint8", "tile", "save_grid", "save_images", "check_samples_path", "save_samples", "GRID_FORMATS"]
