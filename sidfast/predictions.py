"""Conversions between what a network predicts: ``x0``, ``eps``, ``v`` and ``flow``.

The formulas are tabulated in docs/math.md, "Predictions".

All functions take ``x_t`` and the per-sample coefficients ``a``, ``s`` (shape ``(B,)`` or
already broadcast); they hold for any schedule, not only the one a prediction is usually paired with.
"""
from __future__ import annotations

import torch

from sidfast.schedules import broadcast

PREDICTIONS = ("x0", "eps", "v", "flow")
_ALIASES = {"sample": "x0", "epsilon": "eps", "v_prediction": "v", "velocity": "v", "flow_prediction": "flow"}


def canonical(kind: str) -> str:
    """Normalise a prediction name (diffusers' ``sample``/``epsilon``/``v_prediction`` accepted)."""
    if not isinstance(kind, str):
        raise TypeError(f"prediction must be a string, got {type(kind).__name__}")
    k = _ALIASES.get(kind, kind)
    if k not in PREDICTIONS:
        raise ValueError(f"prediction must be one of {PREDICTIONS} (or a diffusers alias), got {kind!r}")
    return k


def target(x0: torch.Tensor, eps: torch.Tensor, a, s, kind: str) -> torch.Tensor:
    """What a ``kind`` network is trained to output for clean ``x0`` and noise ``eps``."""
    kind = canonical(kind)
    if kind == "x0":
        return x0
    if kind == "eps":
        return eps
    a, s = broadcast(a, x0), broadcast(s, x0)
    if kind == "v":
        return a * eps - s * x0  # Salimans & Ho 2022, section 4 (diffusers get_velocity)
    return eps - x0  # flow matching velocity d x_t / dt for a = 1 - t, s = t (Liu et al. 2022)


def to_x0(pred: torch.Tensor, x_t: torch.Tensor, a, s, kind: str) -> torch.Tensor:
    """Denoised estimate ``x0_hat`` from a ``kind`` prediction at ``x_t`` (docs/math.md, "Predictions")."""
    kind = canonical(kind)
    if kind == "x0":
        return pred
    a, s = broadcast(a, x_t), broadcast(s, x_t)
    if kind == "eps":
        return (x_t - s * pred) / a
    if kind == "v":
        return (a * x_t - s * pred) / (a * a + s * s)
    # flow: x_t = a x0 + s (pred + x0)  =>  x0 = (x_t - s pred) / (a + s); = x_t - t pred when a + s = 1
    return (x_t - s * pred) / (a + s)


def to_eps(pred: torch.Tensor, x_t: torch.Tensor, a, s, kind: str) -> torch.Tensor:
    """Noise estimate ``eps_hat`` from a ``kind`` prediction at ``x_t`` (docs/math.md, "Predictions")."""
    kind = canonical(kind)
    if kind == "eps":
        return pred
    a, s = broadcast(a, x_t), broadcast(s, x_t)
    if kind == "x0":
        return (x_t - a * pred) / s
    if kind == "v":
        return (s * x_t + a * pred) / (a * a + s * s)
    # flow: eps = pred + x0 = (x_t + a pred) / (a + s); = x_t + (1 - t) pred when a + s = 1
    return (x_t + a * pred) / (a + s)


def convert(pred: torch.Tensor, x_t: torch.Tensor, a, s, src: str, dst: str) -> torch.Tensor:
    """Convert a ``src`` prediction into the ``dst`` parametrization at the same ``x_t``."""
    src, dst = canonical(src), canonical(dst)
    if src == dst:
        return pred
    if dst == "x0":
        return to_x0(pred, x_t, a, s, src)
    if dst == "eps":
        return to_eps(pred, x_t, a, s, src)
    return target(to_x0(pred, x_t, a, s, src), to_eps(pred, x_t, a, s, src), a, s, dst)
