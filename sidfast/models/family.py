"""Teacher families and their clocks: which published recipe a teacher follows (docs/recipes.md) and how its
own time maps to the trainer's EDM sigma.

- ``edm``: EDM-preconditioned networks (``EDMDenoiser``, any sigma-conditioned denoiser): time is sigma.
- ``ddpm``: VP networks on a DDPM table (``DiffusersDenoiser``: Stable Diffusion, DDPM U-Nets): time is the
  integer index t of ``alphas_cumprod``; sigma_t = sqrt((1 - abar_t) / abar_t), defined only on the table.
- ``flow``: flow-matching networks (``FlowDenoiser``: SD3, FLUX, SANA): time t in [0, 1], sigma = t / (1 - t);
  t = 1 is sigma = inf, pure noise.
"""
from __future__ import annotations

import math

import torch

from sidfast import reference
from sidfast.models.diffusers import DiffusersDenoiser
from sidfast.models.flow import FlowDenoiser

FAMILIES = ("edm", "ddpm", "flow")
FAMILY_WORDS = {"edm": "an EDM network", "ddpm": "a DDPM-table (Stable Diffusion style) network",
                "flow": "a flow-matching network"}  # a teacher of each family, in messages


def teacher_family(teacher) -> str:
    """The family of a teacher denoiser (``as_denoiser``'s result)."""
    if isinstance(teacher, FlowDenoiser):
        return "flow"
    if isinstance(teacher, DiffusersDenoiser):
        return "ddpm"
    return "edm"


class TeacherClock:
    """A teacher's own time and the sigmas it was trained on.

    ``sigma(t)``: the trainer's sigma at the teacher's time t; ``range``: the closed interval of sigmas the
    teacher knows ((0, inf) for EDM, the table's ends for DDPM, (0, inf] for flow); ``table``: the DDPM
    table's sigma per timestep (float64), else None.
    """

    def __init__(self, teacher):
        self.family = teacher_family(teacher)
        self.table = None
        if self.family == "ddpm":
            self.table = reference.vp_sigmas(teacher.schedule.alphas_cumprod)
            self.range = (float(self.table[0]), float(self.table[-1]))
        else:
            self.range = (0.0, math.inf)

    @property
    def unit(self) -> str:
        """What the teacher's time is, in words."""
        return {"edm": "sigma", "ddpm": f"integer timestep 0..{self._last()}", "flow": "flow time t in (0, 1]"}[
            self.family]

    def _last(self) -> int:
        return self.table.numel() - 1 if self.table is not None else 0

    def sigma(self, t: float) -> float:
        """The sigma of the teacher's time ``t``; a ValueError names what the teacher's time allows."""
        if self.family == "edm":
            if not (isinstance(t, (int, float)) and math.isfinite(t) and t > 0):
                raise ValueError(f"must be a positive sigma for an EDM teacher, got {t!r}")
            return float(t)
        if self.family == "ddpm":
            if not (isinstance(t, (int, float)) and float(t).is_integer() and 0 <= t <= self._last()):
                raise ValueError(f"must be an integer timestep 0..{self._last()} of the teacher's table, got {t!r}")
            return float(self.table[int(t)])
        if not (isinstance(t, (int, float)) and 0 < t <= 1):
            raise ValueError(f"must be a flow time t in (0, 1] for a flow teacher, got {t!r}")
        return math.inf if t == 1 else t / (1 - t)

    def time(self, sigma: float) -> float:
        """The teacher's time at ``sigma`` (DDPM: continuous, between table entries)."""
        if self.family == "edm":
            return sigma
        if self.family == "flow":
            return 1.0 if math.isinf(sigma) else sigma / (1 + sigma)
        log_table = torch.log(self.table)
        i = int(torch.searchsorted(log_table, torch.tensor(math.log(sigma), dtype=torch.float64)).clamp(1, self._last()))
        w = (math.log(sigma) - float(log_table[i - 1])) / float(log_table[i] - log_table[i - 1])
        return i - 1 + w

    def contains(self, lo: float, hi: float) -> bool:
        """Whether the sigmas [lo, hi] lie within what the teacher knows (a relative 1e-9 for rounding)."""
        a, b = self.range
        return lo >= a * (1 - 1e-9) and hi <= b * (1 + 1e-9)


__all__ = ["FAMILIES", "teacher_family", "TeacherClock"]
