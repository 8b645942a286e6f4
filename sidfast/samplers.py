"""Samplers for EDM-style denoisers ``net(x, sigma, class_labels) -> x0_hat``.

``edm_sample``: EDM's deterministic Heun or Euler ODE solver (Karras et al. 2022, Algorithm 1).
``one_step_sample``: the SiD generator's single step (docs/math.md, "Published recipe"). ``sample_images``:
many images in batches with seeded latents; ``sidfast.training.student.from_checkpoint``: the network and
options of a checkpoint.
"""
from __future__ import annotations

import torch

from sidfast import reference
from sidfast._checks import check_int
from sidfast.conditions import to_device
from sidfast.generator import generator_sigmas, sample
from sidfast.labels import format_labels

METHODS = ("heun", "euler")


def _sigma_batch(value: float, like: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    return torch.full((like.shape[0],), value, dtype=dtype, device=like.device)


def _net_dtype(net) -> torch.dtype:
    try:
        return next(net.parameters()).dtype
    except (AttributeError, StopIteration):
        return torch.float32


@torch.no_grad()
def edm_sample(net, noise: torch.Tensor, num_steps: int = 18, sigma_min: float = 0.002,
               sigma_max: float = 80.0, rho: float = 7.0, method: str = "heun",
               class_labels: torch.Tensor | None = None, cond: dict | None = None) -> torch.Tensor:
    """Integrate the probability-flow ODE dx/dsigma = (x - D(x; sigma)) / sigma from sigma_max to 0.

    Args:
        net: EDM-style denoiser ``net(x, sigma, class_labels) -> x0_hat`` of x's shape, sigma of shape (B,).
        noise: standard normal latents z, (B, *F); the start is x = sigma_max * z.
        num_steps: N sigmas sigma_0 = sigma_max > ... > sigma_{N-1} = sigma_min, then 0.
            Heun uses 2N - 1 network evaluations (Euler on the last step to 0), Euler N.
        method: "heun" (Karras et al. 2022, Algorithm 1) or "euler".
        cond: further conditioning passed to ``net`` by keyword, such as prompt embeddings, B rows.
    Returns:
        samples (B, *F) in noise's dtype.
    """
    if not isinstance(noise, torch.Tensor) or not noise.is_floating_point():
        raise TypeError("noise must be a floating-point tensor")
    if noise.dim() < 2 or noise.shape[0] == 0:
        raise ValueError(f"noise must have shape (batch, *features) with batch >= 1, "
                         f"got {tuple(noise.shape)}")
    check_int("num_steps", num_steps, 1, "num_steps must be a positive integer, got {value!r}")
    if not 0 < sigma_min < sigma_max:
        raise ValueError(f"need 0 < sigma_min < sigma_max, got sigma_min={sigma_min}, sigma_max={sigma_max}")
    if method not in METHODS:
        raise ValueError(f"method must be one of {METHODS}, got {method!r}")
    dtype = _net_dtype(net)
    cond = cond or {}
    steps = reference.edm_sigma_steps(num_steps, sigma_min, sigma_max, rho).tolist()  # CPU, once
    x = noise.to(torch.float64) * steps[0]
    for cur, nxt in zip(steps[:-1], steps[1:]):
        # Euler step: d = (x - D(x; sigma)) / sigma (Karras et al. 2022, Algorithm 1, lines 6-8)
        d = (x - net(x.to(dtype), _sigma_batch(cur, x, dtype), class_labels, **cond).to(torch.float64)) / cur
        x_next = x + (nxt - cur) * d
        if method == "heun" and nxt > 0:
            # second-order correction (Karras et al. 2022, Algorithm 1, lines 9-11)
            d_next = net(x_next.to(dtype), _sigma_batch(nxt, x, dtype), class_labels, **cond)
            d_next = d_next.to(torch.float64)
            d2 = (x_next - d_next) / nxt
            x_next = x + (nxt - cur) * (0.5 * d + 0.5 * d2)
        x = x_next
    return x.to(noise.dtype)


def num_evaluations(num_steps: int, method: str = "heun") -> int:
    """Network evaluations per sample of ``edm_sample``: 2N - 1 for Heun, N for Euler."""
    return 2 * num_steps - 1 if method == "heun" else num_steps


@torch.no_grad()
def one_step_sample(generator, noise: torch.Tensor, sigma_init: float = 2.5,
                    class_labels: torch.Tensor | None = None, cond: dict | None = None) -> torch.Tensor:
    """SiD's one-step generator: x_g = G(sigma_init * z, sigma_init) (Zhou et al. 2024, section 4); at
    sigma_init = inf (a flow teacher's t = 1) G(z, inf) (``reference.generator_input``).

    noise: z ~ N(0, I), (B, *F); cond: further keyword conditioning of G. Returns (B, *F) in noise's dtype.
    """
    if not isinstance(noise, torch.Tensor) or not noise.is_floating_point():
        raise TypeError("noise must be a floating-point tensor")
    if not sigma_init > 0:
        raise ValueError(f"sigma_init must be positive, got {sigma_init}")
    dtype = _net_dtype(generator)
    z = noise.to(dtype)
    x_g = generator(reference.generator_input(z, sigma_init), _sigma_batch(sigma_init, z, dtype), class_labels,
                    **(cond or {}))
    return x_g.to(noise.dtype)


@torch.no_grad()
def sample_images(net, num: int, shape, sigma_init: float | None = None, steps: int = 18,
                  num_classes: int = 0, label_format: str = "onehot", class_label: int | None = None,
                  seed: int = 0, batch: int = 256, device="cpu", sigma_min: float = 0.002,
                  sigma_max: float = 80.0, rho: float = 7.0, gen_steps: int = 1, step_spacing: str = "linear",
                  renoise: str = "fresh", cond=None, decode=None) -> torch.Tensor:
    """``num`` samples (num, *shape) on the CPU, ``batch`` per network call.

    sigma_init: a SiD generator, sampled in ``gen_steps`` steps (1: ``one_step_sample``; K: all K steps of
        ``sidfast.generator.sample`` at the levels ``generator_sigmas(K, sigma_init, step_spacing)``, fresh
        noise from a generator seeded with ``seed + 1`` on ``device``); None: a diffusion denoiser, sampled
        with
        ``edm_sample`` (Heun, ``steps`` steps from sigma_max to sigma_min on the rho schedule).
    cond: keyword conditioning of every call (e.g. prompt embeddings): a dict of ``batch`` rows (so
        ``num <= batch``), or a function ``cond(start, n)`` giving the dict of images start .. start + n - 1.
    decode: a function of each batch of samples on ``device`` (a pipeline's ``sidfast.models.vae.LatentDecoder``
        for latent samples); None keeps the samples.
    num_classes: 0 for an unconditional network; otherwise image i gets class ``class_label``, or i mod
        num_classes when class_label is None, in ``label_format`` ("onehot" or "index").
    The latents come from one CPU generator seeded with ``seed``, drawn batch after batch.
    """
    for name, value in (("num", num), ("steps", steps), ("batch", batch), ("gen_steps", gen_steps)):
        check_int(f"argument {name}", value, low=1)
    if class_label is not None and not 0 <= class_label < num_classes:
        raise ValueError(f"argument class_label must be in [0, {num_classes}) for this network" if num_classes
                         else "argument class_label given, but the network is unconditional")
    if isinstance(cond, dict) and cond and num > batch:
        raise ValueError(f"argument cond holds one batch of conditions: num ({num}) must be at most batch "
                         f"({batch})")
    g = torch.Generator().manual_seed(seed)
    levels = None
    fresh = None
    if sigma_init is not None and gen_steps > 1:
        levels = generator_sigmas(gen_steps, sigma_init, step_spacing)
        fresh = torch.Generator(device=device).manual_seed(seed + 1)
    outs = []
    for start in range(0, num, batch):
        n = min(batch, num - start)
        z = torch.randn((n, *shape), generator=g).to(device)
        labels = None
        conditions = to_device(cond(start, n), device) if callable(cond) else cond
        if num_classes:
            idx = torch.full((n,), class_label) if class_label is not None else torch.arange(start, start + n)
            labels = format_labels(idx.to(device) % num_classes, num_classes, label_format)
        x = sample_batch(net, z, labels, sigma_init, steps, levels, renoise, fresh, conditions, sigma_min, sigma_max,
                         rho)
        outs.append((decode(x) if decode is not None else x).cpu())
    return torch.cat(outs)


@torch.no_grad()
def sample_batch(net, z: torch.Tensor, labels=None, sigma_init: float | None = None, steps: int = 18,
                 levels=None, renoise: str = "fresh", fresh: torch.Generator | None = None, cond: dict | None = None,
                 sigma_min: float = 0.002, sigma_max: float = 80.0, rho: float = 7.0) -> torch.Tensor:
    """Samples of one batch of latents ``z`` (B, *shape) on the network's device: a SiD generator in the K
    steps ``levels`` (``generator_sigmas``; fresh noise from ``fresh``) or in one step (``levels`` None), or a
    diffusion denoiser with ``edm_sample`` (``sigma_init`` None). ``labels``: the network's class labels or
    None; ``cond``: keyword conditioning of B rows. What ``sample_images`` does for each of its batches."""
    if levels is not None:
        return sample(net, z.to(_net_dtype(net)), labels, levels, renoise, fresh, cond=cond).to(z.dtype)
    if sigma_init is not None:
        return one_step_sample(net, z, sigma_init, labels, cond=cond)
    return edm_sample(net, z, steps, sigma_min, sigma_max, rho, class_labels=labels, cond=cond)


__all__ = ["edm_sample", "one_step_sample", "sample_images", "sample_batch", "num_evaluations", "METHODS"]
