"""The images a checkpoint's network makes for evaluation, one per seed, as EDM's ``generate.py`` and SiD's
``generate_onestep.py`` draw them: image i of the set comes from a generator seeded with its seed, which draws
the latent z (C, H, W) and then, for a class-conditional network, the class label (uniform over the classes).
An image depends only on its seed (and, for text students, its place in the set), so the set does not depend
on the number of processes or the batch size. The generators are CPU generators (EDM seeds them on the GPU):
the same seeds give the same latents on any device.

A K-step generator that re-noises with fresh noise draws it from a generator seeded from the first seed of
each batch (on the sampling device), so its images also depend on ``--batch``. Text students: image i gets
prompt i mod the number of prompts (``sidfast.training.student``), and the pipeline's VAE decodes the latents.
"""
from __future__ import annotations

import re

import torch

from sidfast import samplers
from sidfast.conditions import to_device
from sidfast.generator import generator_sigmas
from sidfast.labels import format_labels

_RANGE = re.compile(r"^(\d+)-(\d+)$")
_FRESH_SALT = 0x5EED_F4E5  # separates the fresh-noise seeds of K-step generators from the latents' seeds


def parse_seeds(text: str) -> list[int]:
    """Seeds written as EDM writes them: ``0-49999``, ``1,2,5-10`` (ranges include both ends)."""
    seeds = []
    for part in str(text).split(","):
        part = part.strip()
        match = _RANGE.match(part)
        if match:
            lo, hi = int(match[1]), int(match[2])
            if hi < lo:
                raise ValueError(f"argument seeds: range {part!r} runs backwards")
            seeds.extend(range(lo, hi + 1))
        elif part.isdigit():
            seeds.append(int(part))
        else:
            raise ValueError(f"argument seeds: {part!r} is not a seed (>= 0) or a range such as 0-49999")
    if len(set(seeds)) != len(seeds):
        raise ValueError("argument seeds lists a seed twice; each image needs its own")
    return seeds


def seeded(seeds, shape, num_classes: int = 0) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Latents (n, *shape) float32 and class indices (n,) int64 (None for ``num_classes`` 0) of ``seeds``: per
    seed, a CPU generator seeded with ``seed mod 2^32`` draws the latent, then the label."""
    latents, labels = [], []
    for seed in seeds:
        g = torch.Generator().manual_seed(int(seed) % (1 << 32))
        latents.append(torch.randn(tuple(shape), generator=g))
        if num_classes:
            labels.append(torch.randint(num_classes, (), generator=g))
    return torch.stack(latents), torch.stack(labels) if num_classes else None


class StudentImages:
    """``make_images(start, n)`` (``sidfast.evaluate.features``) for a checkpoint's network: the images of
    ``seeds[start:start + n]``.

    net, options: what ``sidfast.training.student.from_checkpoint`` returns (a SiD generator, with
        ``sigma_init`` and its generator steps, or a diffusion denoiser, sampled with EDM's Heun solver in
        ``steps`` steps); ``options["decode"]`` must already be on ``device``.
    """

    def __init__(self, net, options: dict, seeds, device, steps: int = 18):
        self.net = net
        self.seeds = list(seeds)
        self.device = torch.device(device)
        self.shape = tuple(options["shape"])
        self.num_classes = int(options.get("num_classes") or 0)
        self.label_format = options.get("label_format", "onehot")
        self.sigma_init = options.get("sigma_init")
        self.steps = steps
        gen_steps = int(options.get("gen_steps", 1))
        self.levels = (generator_sigmas(gen_steps, self.sigma_init, options.get("step_spacing", "linear"))
                       if self.sigma_init is not None and gen_steps > 1 else None)
        self.renoise = options.get("renoise", "fresh")
        self.cond = options.get("cond")
        self.decode = options.get("decode")

    def __call__(self, start: int, n: int) -> torch.Tensor:
        seeds = self.seeds[start:start + n]
        z, idx = seeded(seeds, self.shape, self.num_classes)
        labels = None if idx is None else format_labels(idx.to(self.device), self.num_classes, self.label_format)
        cond = to_device(self.cond(start, n), self.device) if callable(self.cond) else self.cond
        fresh = None
        if self.levels is not None:
            fresh = torch.Generator(device=self.device).manual_seed((seeds[0] ^ _FRESH_SALT) % (1 << 63))
        x = samplers.sample_batch(self.net, z.to(self.device), labels, self.sigma_init, self.steps, self.levels,
                                  self.renoise, fresh, cond)
        return self.decode(x) if self.decode is not None else x


__all__ = ["StudentImages", "parse_seeds", "seeded"]
