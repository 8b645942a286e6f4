"""Samplers for EDM-style denoisers ``net(x, sigma, class_labels) -> x0_hat``.

``edm_sample``: the deterministic probability-flow ODE solver of Karras et al. 2022 (Algorithm 1, no churn),
Heun's second-order method or plain Euler, on the rho-schedule of ``reference.edm_sigma_steps``.
``one_step_sample``: the SiD generator's single step, x_g = G(sigma_init * z, sigma_init) (SPEC section 5).
The state is integrated in float64 as in EDM's ``edm_sampler``; the network runs in its own dtype.
The sigma schedule is read to Python floats once, so the loop has no per-step host syncs.
"""
from __future__ import annotations

import torch

from . import reference

METHODS = ("heun", "euler")


def _sigma_batch(value: float, like: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    return torch.full((like.shape[0],), value, dtype=dtype, device=like.device)


def _net_dtype(net) -> torch.dtype:
    try:
        return next(net.parameters()).dtype
    except (AttributeError, StopIteration):
        return torch.float32


@torch.no_grad()
def edm_sample(net, noise: torch.Tensor, num_steps: int = 18, sigma_min: float = 0.002, sigma_max: float = 80.0,
               rho: float = 7.0, method: str = "heun", class_labels: torch.Tensor | None = None) -> torch.Tensor:
    """Integrate the probability-flow ODE dx/dsigma = (x - D(x; sigma)) / sigma from sigma_max to 0.

    Args:
        net: EDM-style denoiser, ``net(x, sigma (B,), class_labels) -> x0_hat`` of x's shape.
        noise: standard normal latents z, (B, *F); the start is x = sigma_max * z.
        num_steps: N sigmas sigma_0 = sigma_max > ... > sigma_{N-1} = sigma_min, then 0.
            Heun uses 2N - 1 network evaluations (Euler on the last step to 0), Euler N.
        method: "heun" (Karras et al. 2022, Algorithm 1) or "euler".
    Returns:
        samples (B, *F) in noise's dtype.
    """
    if not isinstance(noise, torch.Tensor) or not noise.is_floating_point():
        raise TypeError("noise must be a floating-point tensor")
    if noise.dim() < 2 or noise.shape[0] == 0:
        raise ValueError(f"noise must have shape (batch, *features) with batch >= 1, got {tuple(noise.shape)}")
    if isinstance(num_steps, bool) or not isinstance(num_steps, int) or num_steps < 1:
        raise ValueError(f"num_steps must be a positive integer, got {num_steps!r}")
    if not 0 < sigma_min < sigma_max:
        raise ValueError(f"need 0 < sigma_min < sigma_max, got sigma_min={sigma_min}, sigma_max={sigma_max}")
    if method not in METHODS:
        raise ValueError(f"method must be one of {METHODS}, got {method!r}")
    dtype = _net_dtype(net)
    steps = reference.edm_sigma_steps(num_steps, sigma_min, sigma_max, rho).tolist()  # CPU, once
    x = noise.to(torch.float64) * steps[0]
    for cur, nxt in zip(steps[:-1], steps[1:]):
        # Euler step: d = (x - D(x; sigma)) / sigma (Karras et al. 2022, Algorithm 1, lines 6-8)
        d = (x - net(x.to(dtype), _sigma_batch(cur, x, dtype), class_labels).to(torch.float64)) / cur
        x_next = x + (nxt - cur) * d
        if method == "heun" and nxt > 0:
            # second-order correction (Karras et al. 2022, Algorithm 1, lines 9-11)
            d2 = (x_next - net(x_next.to(dtype), _sigma_batch(nxt, x, dtype), class_labels).to(torch.float64)) / nxt
            x_next = x + (nxt - cur) * (0.5 * d + 0.5 * d2)
        x = x_next
    return x.to(noise.dtype)


def num_evaluations(num_steps: int, method: str = "heun") -> int:
    """Network evaluations per sample of ``edm_sample``: 2N - 1 for Heun, N for Euler."""
    return 2 * num_steps - 1 if method == "heun" else num_steps


@torch.no_grad()
def one_step_sample(generator, noise: torch.Tensor, sigma_init: float = 2.5,
                    class_labels: torch.Tensor | None = None) -> torch.Tensor:
    """SiD's one-step generator: x_g = G(sigma_init * z, sigma_init) (Zhou et al. 2024, section 4; SPEC section 5).

    noise: z ~ N(0, I), (B, *F). Returns (B, *F) in noise's dtype.
    """
    if not isinstance(noise, torch.Tensor) or not noise.is_floating_point():
        raise TypeError("noise must be a floating-point tensor")
    if not sigma_init > 0:
        raise ValueError(f"sigma_init must be positive, got {sigma_init}")
    dtype = _net_dtype(generator)
    z = noise.to(dtype)
    return generator(sigma_init * z, _sigma_batch(sigma_init, z, dtype), class_labels).to(noise.dtype)


__all__ = ["edm_sample", "one_step_sample", "num_evaluations", "METHODS"]
