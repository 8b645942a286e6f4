"""The VAE decoder of a latent text-to-image pipeline: a student's samples (latents, in the coordinates its
teacher denoises) as images in [-1, 1].

The latents a pipeline's denoiser models are the VAE's, shifted and scaled: ``z = (vae_latent - shift) *
scaling`` (``vae/config.json``: ``scaling_factor``, and ``shift_factor`` for SD3 and FLUX, 0 otherwise), so
an image is ``vae.decode(z / scaling + shift)``, as diffusers' pipelines decode. FLUX's denoiser packs 2x2
latent patches internally (``sidfast.models.denoiser.FlowDenoiser``): its samples are unpacked latents already.
The decoder runs in float32 (SDXL's VAE overflows in fp16, which its pipeline avoids by upcasting too).
"""
from __future__ import annotations

from pathlib import Path

import torch


class LatentDecoder:
    """``decoder(latents) -> images``: the VAE of a pipeline directory, frozen, in float32.

    Args:
        vae: a diffusers ``AutoencoderKL`` (or any module with ``decode(z).sample``).
        scaling_factor, shift_factor: the pipeline's latent scaling (module docstring).
    """

    def __init__(self, vae: torch.nn.Module, scaling_factor: float, shift_factor: float = 0.0):
        if not scaling_factor:
            raise ValueError(f"scaling_factor must be non-zero, got {scaling_factor!r}")
        self.vae = vae.float().eval().requires_grad_(False)
        self.scaling_factor = float(scaling_factor)
        self.shift_factor = float(shift_factor or 0.0)

    @classmethod
    def from_pretrained(cls, path) -> "LatentDecoder":
        """The ``vae/`` subfolder of a local pipeline directory."""
        root = Path(path)
        if not (root / "vae" / "config.json").is_file():
            raise FileNotFoundError(f"pipeline {str(root)!r} has no vae/ subfolder to decode its latents with")
        from diffusers import AutoencoderKL  # diffusers stays optional: only loading a VAE needs it

        from sidfast.models.diffusers import load_options

        vae = AutoencoderKL.from_pretrained(root, subfolder="vae", **load_options())
        return cls(vae, vae.config.scaling_factor, getattr(vae.config, "shift_factor", None))

    def to(self, device) -> "LatentDecoder":
        self.vae.to(device)
        return self

    @torch.no_grad()
    def __call__(self, latents: torch.Tensor) -> torch.Tensor:
        """Images (B, 3, H * f, W * f) in [-1, 1], float32, on the latents' device."""
        device = next(self.vae.parameters()).device
        z = latents.to(device, torch.float32) / self.scaling_factor + self.shift_factor
        return self.vae.decode(z).sample.clamp(-1, 1).to(latents.device)


__all__ = ["LatentDecoder"]
