"""A stand-in for NVIDIA's Inception detector with its calling convention: ``net(images, return_features=True)``
on uint8 RGB images (N, 3, H, W) of any resolution (resized inside) -> float32 features (N, DIM).

This whole file is what the NVIDIA-style pickle stores as its class's source (``detectors.py``), as NVIDIA's
``torch_utils.persistence`` stores a module's source; hence the guarded import below."""
import torch
import torch.nn.functional as F

try:
    from torch_utils import persistence
except ImportError:  # imported by the tests themselves, without NVIDIA's code
    persistence = None

DIM = 8
SIDE = 6  # the resolution the stand-in resizes to (NVIDIA's resizes to 299)


def _persistent(cls):
    return persistence.persistent_class(cls) if persistence is not None else cls


@_persistent
class TinyInception(torch.nn.Module):
    def __init__(self, dim: int = DIM, seed: int = 0):
        super().__init__()
        g = torch.Generator().manual_seed(seed)
        self.weight = torch.nn.Parameter(torch.randn(dim, 3 * SIDE * SIDE, generator=g) / SIDE)
        self.bias = torch.nn.Parameter(torch.rand(dim, generator=g))

    def forward(self, img: torch.Tensor, return_features: bool = False) -> torch.Tensor:
        x = img.to(torch.float32)
        x = F.interpolate(x, size=(6, 6), mode="bilinear", align_corners=False)  # SIDE
        x = x / 127.5 - 1
        features = F.softplus(x.flatten(1) @ self.weight.T + self.bias)
        if return_features:
            return features
        return features.softmax(dim=1)
