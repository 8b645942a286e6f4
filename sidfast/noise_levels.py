"""Noise-level laws: where each SiD loss draws its noise levels, in the teacher's own time.

The trainer computes in EDM coordinates (``x_t = x0 + sigma * eps``); a teacher family has its own clock: EDM
networks take sigma, DDPM networks an integer index into their ``alphas_cumprod`` table, flow-matching networks
a time t in [0, 1]. A law draws in that clock and returns the (B,) sigmas the trainer uses, so that a teacher
is asked only about noise levels it was trained on (docs/recipes.md).

- ``lognormal``: ln sigma ~ N(mean, std^2) (EDM's training law; Karras et al. 2022, Table 1).
- ``rho``: u ~ U(0, tmax/1000) through EDM's rho schedule (the published SiD generator loss).
- ``timesteps``: integer t ~ U{lo..hi} of a DDPM table, sigma_t = sqrt((1 - abar_t) / abar_t) (SiD-LSG).
- ``logit-normal``: t = sigmoid(u), u ~ N(mean, std^2), sigma = t / (1 - t) = exp(u) (SD3's law; SiD-DiT).

``support()`` is the closed range of sigmas a law can return, which the recipe checks against the teacher's.
"""
from __future__ import annotations

import dataclasses
import math

import torch

from sidfast import reference

LAWS = ("lognormal", "rho", "timesteps", "logit-normal")


@dataclasses.dataclass(frozen=True)
class LogNormal:
    """ln sigma ~ N(mean, std^2)."""

    mean: float
    std: float
    name = "lognormal"

    def draw(self, batch: int, device=None) -> torch.Tensor:
        return reference.edm_training_sigma(batch, self.mean, self.std, device=device)

    def support(self) -> tuple[float, float]:
        return 0.0, math.inf

    def describe(self) -> str:
        return f"ln sigma ~ N({self.mean:g}, {self.std:g}^2)"


@dataclasses.dataclass(frozen=True)
class LogitNormal(LogNormal):
    """t = sigmoid(u), u ~ N(mean, std^2); sigma = t / (1 - t) = exp(u): the same draw as ``LogNormal``,
    named in a flow teacher's time."""

    name = "logit-normal"

    def describe(self) -> str:
        return f"t = sigmoid(N({self.mean:g}, {self.std:g}^2))"


@dataclasses.dataclass(frozen=True)
class RhoSchedule:
    """u ~ U(0, tmax/1000) mapped through EDM's rho schedule (``reference.generator_sigma``)."""

    tmax: int
    sigma_min: float
    sigma_max: float
    rho: float
    name = "rho"

    def draw(self, batch: int, device=None) -> torch.Tensor:
        return reference.generator_sigma(batch, self.tmax, self.sigma_min, self.sigma_max, self.rho, device=device)

    def support(self) -> tuple[float, float]:
        lo, hi = self.sigma_min ** (1 / self.rho), self.sigma_max ** (1 / self.rho)
        return self.sigma_min, (hi + (1 - self.tmax / 1000) * (lo - hi)) ** self.rho

    def describe(self) -> str:
        return (f"EDM rho schedule at u ~ U(0, {self.tmax}/1000) (sigma {self.sigma_min:g}..{self.sigma_max:g}, "
                f"rho {self.rho:g})")


@dataclasses.dataclass(frozen=True, eq=False)
class Timesteps:
    """Integer t ~ U{lo..hi} (both included) of a DDPM table; ``sigmas``: the table's sigma per timestep,
    float64."""

    lo: int
    hi: int
    sigmas: torch.Tensor
    name = "timesteps"

    def __post_init__(self):
        n = self.sigmas.numel()
        if not 0 <= self.lo <= self.hi < n:
            raise ValueError(f"timesteps {self.lo}..{self.hi} must lie in the teacher's table 0..{n - 1}")

    def draw(self, batch: int, device=None) -> torch.Tensor:
        return reference.timestep_sigma(batch, self.lo, self.hi, self.sigmas, device=device)

    def support(self) -> tuple[float, float]:
        return float(self.sigmas[self.lo]), float(self.sigmas[self.hi])

    def describe(self) -> str:
        return f"integer t ~ U{{{self.lo}..{self.hi}}} of the teacher's {self.sigmas.numel()}-step table"


__all__ = ["LAWS", "LogNormal", "LogitNormal", "RhoSchedule", "Timesteps"]
