"""The sample grid a distill run saves: the generator's (or the teacher's) images from fixed latents and
labels, drawn with ``sidfast.samplers.sample_images`` at the run's settings."""
from __future__ import annotations

import math

import torch

from sidfast import samplers


def grid_samples(net, cfg, image_shape, num_classes: int, label_format: str, device, cond=None,
                 one_step: bool = True, sigma_range: tuple = (0.0, math.inf)) -> torch.Tensor:
    """A distill run's sample grid (``cfg``: its ``TrainConfig``): ``cfg.grid_size`` images of the generator
    (``one_step``; all ``cfg.gen_steps`` steps) or of the teacher (Heun, ``cfg.teacher_steps`` steps), from
    the same latents and labels at every call. ``sigma_range``: the sigmas the teacher knows (a DDPM table's
    ends); the teacher's sampler runs from ``cfg.sigma_max`` to ``cfg.sigma_min`` within it."""
    sigma_min = max(cfg.sigma_min, sigma_range[0])
    sigma_max = min(cfg.sigma_max, sigma_range[1])
    return samplers.sample_images(net, cfg.grid_size, image_shape, cfg.sigma_init if one_step else None,
                                  1 if one_step else cfg.teacher_steps, num_classes, label_format,
                                  seed=cfg.seed + 20240, batch=cfg.grid_size, device=device,
                                  sigma_min=sigma_min, sigma_max=sigma_max, rho=cfg.rho,
                                  gen_steps=cfg.gen_steps, step_spacing=cfg.step_spacing, renoise=cfg.renoise,
                                  cond=cond)


__all__ = ["grid_samples"]
