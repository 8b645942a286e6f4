"""The drop-in API: SiD generator losses and the fake-score loss, validated and dispatched to fast ops.

``sid_generator_loss`` is a literal replacement for the published ``generator_loss`` arithmetic
followed by the loop's ``loss.sum() / batch`` (``reduction="batchmean"``); multiply by your loss
scale (100 in the published recipe) yourself. All losses are float32 (float64 for float64 inputs)
and accumulate in float32 or wider whatever the input dtype; gradients come back in the input dtype.
"""
from __future__ import annotations

import math
import numbers

import torch

from . import reference
from .ops import fake_score_loss as _fake_op
from .ops import sid_loss as _sid_op

REDUCTIONS = reference.REDUCTIONS
WEIGHTINGS = reference.WEIGHTINGS
FLOAT_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)


def check_tensors(min_dim: int = 2, **named: torch.Tensor) -> None:
    """Raise TypeError/ValueError naming the argument unless all tensors share shape, dtype and device."""
    first_name, first = None, None
    for name, t in named.items():
        if not isinstance(t, torch.Tensor):
            raise TypeError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
        if t.dtype not in FLOAT_DTYPES:
            raise TypeError(f"{name} must be float16, bfloat16, float32 or float64, got {t.dtype}")
        if t.dim() < min_dim:
            raise ValueError(f"{name} must have shape (batch, *features) with rank >= {min_dim}, got {tuple(t.shape)}")
        if t.shape[0] == 0 or t.numel() == 0:
            raise ValueError(f"{name} is empty (shape {tuple(t.shape)})")
        if first is None:
            first_name, first = name, t
            continue
        if t.shape != first.shape:
            raise ValueError(f"{name} has shape {tuple(t.shape)} but {first_name} has shape {tuple(first.shape)}")
        if t.dtype != first.dtype:
            raise TypeError(f"{name} has dtype {t.dtype} but {first_name} has dtype {first.dtype}")
        if t.device != first.device:
            raise ValueError(f"{name} is on {t.device} but {first_name} is on {first.device}")


def check_real(name: str, value, positive: bool = False) -> float:
    """A finite real number (bools refused); ``positive`` also refuses values <= 0."""
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        raise TypeError(f"{name} must be a real number, got {type(value).__name__}")
    value = float(value)
    if not math.isfinite(value) or (positive and value <= 0):
        raise ValueError(f"{name} must be finite{' and positive' if positive else ''}, got {value}")
    return value


def check_reduction(reduction) -> str:
    if reduction not in REDUCTIONS:
        raise ValueError(f"reduction must be one of {REDUCTIONS}, got {reduction!r}")
    return reduction


def sid_generator_loss(y_real: torch.Tensor, y_fake: torch.Tensor, x_g: torch.Tensor, alpha: float = 1.2,
                       reduction: str = "batchmean") -> torch.Tensor:
    """SiD generator loss in denoised space (SPEC section 3), the published arithmetic.

    Args:
        y_real: teacher's x0 estimate f_phi(x_t), (B, *F).
        y_fake: fake score's x0 estimate f_psi(x_t) at the same x_t, (B, *F).
        x_g: generator sample, (B, *F). Gradients reach it directly and, through y_real/y_fake, via x_t.
        alpha: weight of the ||f_phi - f_psi||^2 term (1.2 published).
        reduction: "none" (per-element, NaN samples as rows of zeros), "sum", or "batchmean" (sum / B).
    Returns:
        float32 (float64 for float64 inputs): (B, *F) for "none", else a scalar.
    """
    check_tensors(y_real=y_real, y_fake=y_fake, x_g=x_g)
    alpha = check_real("alpha", alpha)
    return _sid_op.sid_loss(y_real, y_fake, x_g, alpha, True, check_reduction(reduction))


def sid_generator_loss_eps(eps_real: torch.Tensor, eps_fake: torch.Tensor, eps: torch.Tensor, lam: float = 1.2,
                           reduction: str = "batchmean") -> torch.Tensor:
    """SiD generator loss in noise space for eps-predicting teachers (SPEC section 3).

    Per element (e_phi - e_psi) * ((e_phi - eps) - lam (e_phi - e_psi)), unnormalized; shapes as
    ``sid_generator_loss`` with ``eps`` the noise used to build x_t. It equals the denoised form
    (before its normalization) divided by (s/a)^2.
    """
    check_tensors(eps_real=eps_real, eps_fake=eps_fake, eps=eps)
    lam = check_real("lam", lam)
    return _sid_op.sid_loss(eps_real, eps_fake, eps, lam, False, check_reduction(reduction))


def _check_coefficient(name: str, c, x: torch.Tensor) -> torch.Tensor:
    if isinstance(c, numbers.Real) and not isinstance(c, bool):
        return torch.full((x.shape[0],), float(c), device=x.device, dtype=torch.float32)
    if not isinstance(c, torch.Tensor):
        raise TypeError(f"{name} must be a tensor of shape (B,) or a number, got {type(c).__name__}")
    if not c.is_floating_point():
        raise TypeError(f"{name} must be floating point, got {c.dtype}")
    if c.numel() != x.shape[0] or (c.dim() > 1 and any(d != 1 for d in c.shape[1:])):
        raise ValueError(f"{name} must have one entry per sample ({x.shape[0]}), got shape {tuple(c.shape)}")
    if c.device != x.device:
        raise ValueError(f"{name} is on {c.device} but the data is on {x.device}")
    return c.reshape(-1)


def fake_score_loss(pred: torch.Tensor, x0: torch.Tensor, noise: torch.Tensor, a, s, prediction: str = "x0",
                    weighting: str = "edm", sigma_data: float = 0.5, gamma: float = 5.0,
                    reduction: str = "batchmean") -> torch.Tensor:
    """Fake-score denoising loss on generator samples (SPEC section 4).

    Args:
        pred: the fake score's output at x_t = a*x0 + s*noise, in its ``prediction`` space, (B, *F).
        x0: the detached generator sample, (B, *F); noise: the eps used, (B, *F).
        a, s: per-sample schedule coefficients, (B,) tensors or numbers (EDM: a=1, s=sigma).
        prediction: "x0", "eps", "v" or "flow" (diffusers names accepted).
        weighting: "edm" (x0 error weighted (sigma^2+sd^2)/(sigma sd)^2), plain MSE in "x0", "eps", "v" or
            "flow" space, or "min_snr_eps" / "min_snr_v" (min(SNR, gamma)/SNR or /(SNR+1)).
    Returns:
        float32 (float64 for float64 inputs), (B, *F) for "none", else a scalar.
    """
    from . import predictions

    check_tensors(pred=pred, x0=x0, noise=noise)
    a, s = _check_coefficient("a", a, x0), _check_coefficient("s", s, x0)
    prediction = predictions.canonical(prediction)
    if weighting not in WEIGHTINGS:
        raise ValueError(f"weighting must be one of {WEIGHTINGS}, got {weighting!r}")
    sigma_data = check_real("sigma_data", sigma_data, positive=True)
    gamma = check_real("gamma", gamma, positive=True)
    return _fake_op.fake_score_loss(pred, x0, noise, a, s, prediction, weighting, sigma_data, gamma,
                                    check_reduction(reduction))


class SiDGeneratorLoss:
    """EDM-style loss object: ``loss(y_real, y_fake, x_g)`` with alpha and reduction fixed."""

    def __init__(self, alpha: float = 1.2, reduction: str = "batchmean"):
        self.alpha = check_real("alpha", alpha)
        self.reduction = check_reduction(reduction)

    def __call__(self, y_real, y_fake, x_g):
        return sid_generator_loss(y_real, y_fake, x_g, self.alpha, self.reduction)


class FakeScoreLoss:
    """EDM-style loss object for the fake-score update: ``loss(pred, x0, noise, a, s)``."""

    def __init__(self, prediction: str = "x0", weighting: str = "edm", sigma_data: float = 0.5, gamma: float = 5.0,
                 reduction: str = "batchmean"):
        self.kw = dict(prediction=prediction, weighting=weighting, sigma_data=sigma_data, gamma=gamma,
                       reduction=reduction)

    def __call__(self, pred, x0, noise, a, s):
        return fake_score_loss(pred, x0, noise, a, s, **self.kw)
