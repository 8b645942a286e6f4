"""Noise schedules: the coefficients ``a_t`` and ``s_t`` of ``x_t = a_t * x0 + s_t * eps``.

Every schedule maps a per-sample time tensor ``t`` of shape ``(B,)`` to a pair ``(a, s)`` of
the same shape (docs/math.md, "Forward process and schedules"). ``broadcast`` reshapes such
per-sample scalars to a data tensor.
"""
from __future__ import annotations

import math

import torch


def broadcast(c: torch.Tensor | float, x: torch.Tensor) -> torch.Tensor | float:
    """Reshape a per-sample coefficient ``(B,)`` (or ``(B, 1, ..., 1)``) to broadcast over ``x``."""
    if not isinstance(c, torch.Tensor) or c.dim() == 0:
        return c
    if c.shape[0] != x.shape[0]:
        raise ValueError(f"per-sample coefficient has {c.shape[0]} entries but the batch has {x.shape[0]}")
    return c.reshape(c.shape[0], *([1] * (x.dim() - 1)))


def log_snr(a: torch.Tensor, s: torch.Tensor) -> torch.Tensor:
    """lambda_t = log(a_t^2 / s_t^2), the log-SNR (Kingma et al. 2021, variational diffusion models)."""
    return 2.0 * (torch.log(a) - torch.log(s))


def snr(a: torch.Tensor, s: torch.Tensor) -> torch.Tensor:
    """SNR = a_t^2 / s_t^2; for VP, abar / (1 - abar), as diffusers' ``compute_snr``."""
    return (a / s) ** 2


class Schedule:
    """Base class: ``coefficients(t) -> (a, s)``; subclasses name how ``t`` is read."""

    name = "schedule"

    def coefficients(self, t: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:  # pragma: no cover
        raise NotImplementedError

    def log_snr(self, t: torch.Tensor) -> torch.Tensor:
        a, s = self.coefficients(t)
        return log_snr(a, s)

    def __repr__(self) -> str:
        return f"{type(self).__name__}()"


class EDMSchedule(Schedule):
    """EDM / variance exploding: ``t`` is sigma; a = 1, s = sigma (Karras et al. 2022, section 2)."""

    name = "edm"

    def coefficients(self, t: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return torch.ones_like(t), t


class FlowSchedule(Schedule):
    """Flow matching / rectified flow: ``t`` in [0, 1]; a = 1 - t, s = t.

    Liu et al. 2022 (rectified flow) with time reversed so that t = 1 is noise, as in diffusers.
    """

    name = "flow"

    def coefficients(self, t: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return 1.0 - t, t


class VPSchedule(Schedule):
    """VP / DDPM: ``t`` indexes ``alphas_cumprod``; a = sqrt(abar_t), s = sqrt(1 - abar_t) (Ho et al. 2020, eq. 4).

    Integer ``t`` looks the table up (as diffusers' ``add_noise``); floating ``t`` interpolates
    linearly between neighbouring entries, which is what continuous-time samplers need.
    """

    name = "vp"

    def __init__(self, alphas_cumprod: torch.Tensor):
        if not isinstance(alphas_cumprod, torch.Tensor) or alphas_cumprod.dim() != 1 or alphas_cumprod.numel() < 2:
            raise ValueError("alphas_cumprod must be a 1-D tensor with at least two entries")
        if not alphas_cumprod.is_floating_point():
            raise TypeError("alphas_cumprod must be a floating-point tensor")
        ac = alphas_cumprod.detach().to(torch.float64)
        if not bool(((ac > 0) & (ac < 1)).all()):
            raise ValueError("alphas_cumprod must lie strictly between 0 and 1")
        self.alphas_cumprod = ac

    @classmethod
    def linear(cls, num_train_timesteps: int = 1000, beta_start: float = 1e-4, beta_end: float = 0.02) -> "VPSchedule":
        """The DDPM linear beta schedule (Ho et al. 2020, section 4; diffusers ``beta_schedule="linear"``)."""
        betas = torch.linspace(beta_start, beta_end, num_train_timesteps, dtype=torch.float64)
        return cls(torch.cumprod(1.0 - betas, 0))

    @classmethod
    def cosine(cls, num_train_timesteps: int = 1000, max_beta: float = 0.999) -> "VPSchedule":
        """The cosine schedule (Nichol & Dhariwal 2021, eq. 17; diffusers ``squaredcos_cap_v2``)."""
        f = lambda u: math.cos((u + 0.008) / 1.008 * math.pi / 2) ** 2  # noqa: E731
        betas = [min(1 - f((i + 1) / num_train_timesteps) / f(i / num_train_timesteps), max_beta)
                 for i in range(num_train_timesteps)]
        return cls(torch.cumprod(1.0 - torch.tensor(betas, dtype=torch.float64), 0))

    @classmethod
    def from_diffusers(cls, scheduler) -> "VPSchedule":
        """Build from a diffusers ``DDPMScheduler`` (or any scheduler with ``alphas_cumprod``)."""
        ac = getattr(scheduler, "alphas_cumprod", None)
        if ac is None:
            raise ValueError(f"scheduler {type(scheduler).__name__} has no alphas_cumprod: not a VP schedule")
        return cls(torch.as_tensor(ac))

    @property
    def num_timesteps(self) -> int:
        return self.alphas_cumprod.numel()

    def _alpha_bar64(self, t: torch.Tensor) -> torch.Tensor:
        ac = self.alphas_cumprod.to(t.device)
        if not t.is_floating_point():
            return ac[t.long()]
        tc = t.to(torch.float64).clamp(0, self.num_timesteps - 1)
        lo = tc.floor().long()
        hi = (lo + 1).clamp(max=self.num_timesteps - 1)
        w = tc - lo.to(torch.float64)
        return (1 - w) * ac[lo] + w * ac[hi]

    @staticmethod
    def _out_dtype(t: torch.Tensor) -> torch.dtype:
        return t.dtype if t.is_floating_point() else torch.get_default_dtype()

    def coefficients(self, t: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        abar = self._alpha_bar64(t)
        dt = self._out_dtype(t)
        return abar.sqrt().to(dt), (1 - abar).sqrt().to(dt)

    def __repr__(self) -> str:
        return f"VPSchedule(num_timesteps={self.num_timesteps})"


SCHEDULES = {"edm": EDMSchedule, "vp": VPSchedule, "flow": FlowSchedule}
