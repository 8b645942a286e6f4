"""The few-step generator: one network G applied at K decreasing noise levels.

``rollout`` runs steps 1..k* with the gradient on the last only, ``draw_k_star`` draws k* alike on every
process, ``sample`` runs all K steps. Levels, re-noising and the uniform mixture: docs/math.md, "Few-step
generator".
"""
from __future__ import annotations

import math
from typing import Sequence

import torch

from sidfast import reference
from sidfast._checks import check_int, check_real

RENOISE = ("fresh", "fixed", "ddim")
SPACINGS = ("linear", "flow")

_M64 = (1 << 64) - 1
_K_STAR_SALT = 0x5D1D_F00D  # separates the k* stream from any other stream seeded with the run's seed


def generator_sigmas(steps: int, sigma_init: float = 2.5, spacing: str = "linear") -> list[float]:
    """The K noise levels sigma_0 = sigma_init > ... > sigma_{K-1} > 0 as Python floats
    (``reference.generator_step_sigmas``): "linear" in sigma, or "flow", linear in t = sigma / (1 + sigma)."""
    steps = check_int("steps", steps, 1)
    if not (isinstance(sigma_init, (int, float)) and math.isinf(sigma_init) and sigma_init > 0):
        sigma_init = check_real("sigma_init", sigma_init, positive=True)
    if spacing not in SPACINGS:
        raise ValueError(f"spacing must be one of {SPACINGS}, got {spacing!r}")
    return reference.generator_step_sigmas(steps, sigma_init, spacing)


def _splitmix64(x: int) -> int:
    """SplitMix64's finalizer (Steele, Lea & Flood 2014): consecutive inputs give unrelated 64-bit outputs."""
    x = (x + 0x9E3779B97F4A7C15) & _M64
    x = ((x ^ (x >> 30)) * 0xBF58476D1CE4E5B9) & _M64
    x = ((x ^ (x >> 27)) * 0x94D049BB133111EB) & _M64
    return x ^ (x >> 31)


def draw_k_star(steps: int, iteration: int, seed: int) -> int:
    """k* ~ Uniform{1..K} for ``iteration`` of a run seeded with ``seed``.

    A function of (steps, iteration, seed) only: every process draws the same k* without communicating, a
    resumed run draws what the uninterrupted one did, and no global random state is read or advanced.
    """
    steps = check_int("steps", steps, 1)
    iteration = check_int("iteration", iteration, 0)
    seed = check_int("seed", seed, 0)
    if steps == 1:
        return 1
    key = _splitmix64(_splitmix64(seed ^ _K_STAR_SALT) ^ iteration)
    g = torch.Generator().manual_seed(key)
    return int(torch.randint(1, steps + 1, (), generator=g))


def _check(z, sigmas, renoise) -> list[float]:
    if not isinstance(z, torch.Tensor) or not z.is_floating_point():
        raise TypeError(f"z must be a floating-point tensor, got {type(z).__name__}")
    if z.dim() < 2 or z.shape[0] == 0:
        raise ValueError(f"z must have shape (batch, *features) with batch >= 1, got {tuple(z.shape)}")
    if isinstance(sigmas, torch.Tensor) or not isinstance(sigmas, Sequence) or not sigmas:
        raise TypeError("sigmas must be a non-empty sequence of numbers (generator_sigmas)")
    first = [float(sigmas[0])] if isinstance(sigmas[0], (int, float)) and sigmas[0] == math.inf else []
    sigmas = first + [check_real("sigmas", s, positive=True) for s in sigmas[len(first):]]
    if renoise not in RENOISE:
        raise ValueError(f"renoise must be one of {RENOISE}, got {renoise!r}")
    return sigmas


def _step_input(k: int, z, x_prev, d_prev, sigmas, renoise, generator) -> torch.Tensor:
    """x_k: sigma_0 z at k = 0 (z itself at sigma_0 = inf, ``reference.generator_input``), else
    D_{k-1} + sigma_k eps_k."""
    if k == 0:
        return reference.generator_input(z, sigmas[0])
    if renoise == "fresh":
        eps = torch.randn(z.shape, generator=generator, device=z.device, dtype=z.dtype)
    elif renoise == "fixed":
        eps = z
    elif math.isinf(sigmas[k - 1]):  # "ddim" after pure noise: the input was z itself
        eps = x_prev
    else:  # "ddim": the noise the previous step's input and output imply
        eps = (x_prev - d_prev) / sigmas[k - 1]
    return d_prev + sigmas[k] * eps


def _apply(G, x, sigma: float, labels, cond):
    sigma_batch = torch.full((x.shape[0],), sigma, dtype=x.dtype, device=x.device)
    return G(x, sigma_batch, labels, **cond)


def rollout(G, z: torch.Tensor, labels, sigmas: Sequence[float], k_star: int, renoise: str = "fresh",
            generator: torch.Generator | None = None, G_no_grad=None,
            cond: dict | None = None) -> torch.Tensor:
    """D_{k*-1}, the output of k* generator steps, with gradient through the k*-th step only.

    Steps 1..k*-1 run under ``torch.no_grad``; the last step runs in the caller's grad mode on the detached
    (k*-1)-step input. With k* = 1 this is exactly ``G(sigmas[0] * z, sigmas[0], labels)``, the one-step
    generator.

    Args:
        G: ``G(x, sigma, labels, **cond) -> x0_hat`` with sigma of shape (B,).
        z: N(0, I) latents (B, *F); sigma and every x are in z's dtype.
        labels: class labels or None.
        sigmas: the K levels (``generator_sigmas``).
        k_star: the number of steps, in 1..K.
        renoise: "fresh", "fixed" or "ddim" (docs/math.md, "Few-step generator").
        generator: the source of fresh noise; default the global generator of z's device.
        G_no_grad: the network for steps 1..k*-1, e.g. G without its DDP wrapper; default ``G``.
        cond: keyword conditioning passed to ``G``.
    """
    sigmas = _check(z, sigmas, renoise)
    k_star = check_int("k_star", k_star, 1)
    if k_star > len(sigmas):
        raise ValueError(f"k_star ({k_star}) must be at most the number of steps ({len(sigmas)})")
    cond = dict(cond or {})
    lead = G if G_no_grad is None else G_no_grad
    x = None
    d = None
    with torch.no_grad():
        for k in range(k_star - 1):
            x = _step_input(k, z, x, d, sigmas, renoise, generator)
            d = _apply(lead, x, sigmas[k], labels, cond)
        x = _step_input(k_star - 1, z, x, d, sigmas, renoise, generator)
    return _apply(G, x, sigmas[k_star - 1], labels, cond)


@torch.no_grad()
def sample(G, z: torch.Tensor, labels, sigmas: Sequence[float], renoise: str = "fresh",
           generator: torch.Generator | None = None, cond: dict | None = None) -> torch.Tensor:
    """All K steps without gradient: K calls of G (``rollout`` with k* = K). z in G's dtype."""
    return rollout(G, z, labels, sigmas, len(sigmas), renoise, generator, cond=cond)


__all__ = ["generator_sigmas", "draw_k_star", "rollout", "sample", "RENOISE", "SPACINGS"]
