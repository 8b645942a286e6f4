"""The demo's data: scikit-learn's bundled 8x8 digits (1,797 images, no download), scaled to [-1, 1]."""
from __future__ import annotations

import torch

IMAGE_SHAPE = (1, 8, 8)
NUM_CLASSES = 10
# Measured on the 1,797 images scaled to [-1, 1]: mean -0.39, std 0.75. The demo keeps EDM's sigma_data = 0.5
# (the trainer's and sidfast.loss's default); the preconditioning only needs the right order of magnitude.
SIGMA_DATA = 0.5


def load_digits_tensors(device=None, dtype: torch.dtype = torch.float32) -> tuple[torch.Tensor, torch.Tensor]:
    """All 1,797 digits: images (N, 1, 8, 8) in [-1, 1] (pixel values 0..16 mapped by v / 8 - 1), labels (N,)
    int64."""
    try:
        from sklearn.datasets import load_digits
    except ImportError as exc:  # scikit-learn comes with the demo extra
        raise ImportError("the sidfast demo needs scikit-learn: pip install 'sidfast[demo]' "
                          "(or pip install scikit-learn)") from exc
    data = load_digits()
    images = torch.as_tensor(data.images, dtype=torch.float64).div(8.0).sub(1.0)
    images = images.reshape(-1, *IMAGE_SHAPE).to(device=device, dtype=dtype)
    labels = torch.as_tensor(data.target, dtype=torch.int64, device=device)
    return images, labels


def split(images: torch.Tensor, labels: torch.Tensor, held_out: float = 0.2, seed: int = 0):
    """A fixed random split: ((train_x, train_y), (test_x, test_y)), ``held_out`` of the images in the test
    part."""
    if not 0.0 < held_out < 1.0:
        raise ValueError(f"held_out must lie in (0, 1), got {held_out}")
    perm = torch.randperm(images.shape[0], generator=torch.Generator().manual_seed(seed)).to(images.device)
    n_test = int(round(held_out * images.shape[0]))
    test, train = perm[:n_test], perm[n_test:]
    return (images[train], labels[train]), (images[test], labels[test])
