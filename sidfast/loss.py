"""The drop-in API: SiD generator losses and the fake-score loss, validated and dispatched to fast ops.

``sid_generator_loss`` is a literal replacement for the published ``generator_loss`` arithmetic
followed by the loop's ``loss.sum() / batch`` (``reduction="batchmean"``); the published loss scale
(100) is ``loss_scale=``, folded into the fused kernels. All losses are float32 (float64 for float64
inputs) and accumulate in float32 or wider whatever the input dtype; gradients come back in the input
dtype.
"""
from __future__ import annotations

import torch

from sidfast import predictions, reference
from sidfast._checks import FLOAT_DTYPES, check_real, check_reduction, check_tensors, per_sample
from sidfast.ops import fake_score_loss as _fake_op
from sidfast.ops import sid_loss as _sid_op
from sidfast.ops import sida_loss as _sida_op

REDUCTIONS = reference.REDUCTIONS
WEIGHTINGS = reference.WEIGHTINGS
__all__ = ["sid_generator_loss", "sid_generator_loss_eps", "fake_score_loss", "sida_generator_loss",
           "sida_discriminator_loss", "SiDGeneratorLoss", "FakeScoreLoss", "check_tensors", "check_real",
           "check_reduction", "FLOAT_DTYPES"]


def sid_generator_loss(y_real: torch.Tensor, y_fake: torch.Tensor, x_g: torch.Tensor, alpha: float = 1.2,
                       reduction: str = "batchmean", loss_scale: float = 1.0) -> torch.Tensor:
    """SiD generator loss in denoised space (Zhou et al. 2024, eqs. 9-10; docs/math.md, "SiD generator
    loss"), the published arithmetic.

    Args:
        y_real: teacher's x0 estimate f_phi(x_t), (B, *F).
        y_fake: fake score's x0 estimate f_psi(x_t) at the same x_t, (B, *F).
        x_g: generator sample, (B, *F). Gradients reach it directly and, through y_real/y_fake, via x_t.
        alpha: weight of the ||f_phi - f_psi||^2 term (1.2 published).
        reduction: "none" (per-element, NaN samples as rows of zeros), "sum", or "batchmean" (sum / B).
        loss_scale: a finite constant the loss is multiplied by (100 in the published recipe); the fused
            kernels write the gradients of ``loss_scale * L`` directly, so ``backward()`` costs nothing extra.
    Returns:
        ``loss_scale`` times the loss, float32 (float64 for float64 inputs): (B, *F) for "none", else a scalar.
    """
    check_tensors(y_real=y_real, y_fake=y_fake, x_g=x_g)
    alpha = check_real("alpha", alpha)
    loss_scale = check_real("loss_scale", loss_scale)
    return _sid_op.sid_loss(y_real, y_fake, x_g, alpha, True, check_reduction(reduction), loss_scale)


def sid_generator_loss_eps(eps_real: torch.Tensor, eps_fake: torch.Tensor, eps: torch.Tensor, lam: float = 1.2,
                           reduction: str = "batchmean", loss_scale: float = 1.0) -> torch.Tensor:
    """SiD generator loss in noise space for eps-predicting teachers (docs/math.md, "SiD generator loss").

    Per element (e_phi - e_psi) * ((e_phi - eps) - lam (e_phi - e_psi)), unnormalized; shapes as
    ``sid_generator_loss`` with ``eps`` the noise used to build x_t, ``loss_scale`` as there. It equals the
    denoised form (before its normalization) divided by (s/a)^2.
    """
    check_tensors(eps_real=eps_real, eps_fake=eps_fake, eps=eps)
    lam = check_real("lam", lam)
    loss_scale = check_real("loss_scale", loss_scale)
    return _sid_op.sid_loss(eps_real, eps_fake, eps, lam, False, check_reduction(reduction), loss_scale)


def fake_score_loss(pred: torch.Tensor, x0: torch.Tensor, noise: torch.Tensor | None, a, s,
                    prediction: str = "x0", weighting: str = "edm", sigma_data: float = 0.5,
                    gamma: float = 5.0, reduction: str = "batchmean", seed: torch.Tensor | None = None,
                    offset: int = 0) -> torch.Tensor:
    """Fake-score denoising loss on generator samples (docs/math.md, "Fake-score loss").

    Args:
        pred: the fake score's output at x_t = a*x0 + s*noise, in its ``prediction`` space, (B, *F).
        x0: the detached generator sample, (B, *F); noise: the eps used, (B, *F), or None with ``seed``.
        a, s: per-sample schedule coefficients, (B,) tensors or numbers (EDM: a=1, s=sigma).
        prediction: "x0", "eps", "v" or "flow" (diffusers names accepted).
        weighting: "edm", the x0 error weighted by (sigma^2 + sd^2) / (sigma sd)^2; plain MSE in "x0", "eps",
            "v" or "flow" space; or "min_snr_eps" / "min_snr_v", min(SNR, gamma) / SNR or / (SNR + 1).
        seed, offset: instead of ``noise``, the seed that ``sidfast.ops.noise.add_noise`` returned for x_t
            and the offset it was given: eps is regenerated from them inside the fused kernel, never stored.
    Returns:
        float32 (float64 for float64 inputs), (B, *F) for "none", else a scalar.
    """
    if (noise is None) == (seed is None):
        raise ValueError("give exactly one of noise (a tensor) and seed (from sidfast.ops.noise.add_noise)")
    check_tensors(pred=pred, x0=x0, **({"noise": noise} if noise is not None else {}))
    if seed is not None and (not isinstance(seed, torch.Tensor) or seed.dtype != torch.int64
                             or seed.shape != (1,) or seed.device != x0.device):
        raise ValueError("seed must be the (1,) int64 tensor that sidfast.ops.noise.add_noise returned, on "
                         f"x0's device ({x0.device})")
    a = per_sample("a", a, x0)
    s = per_sample("s", s, x0)
    prediction = predictions.canonical(prediction)
    if weighting not in WEIGHTINGS:
        raise ValueError(f"weighting must be one of {WEIGHTINGS}, got {weighting!r}")
    sigma_data = check_real("sigma_data", sigma_data, positive=True)
    gamma = check_real("gamma", gamma, positive=True)
    return _fake_op.fake_score_loss(pred, x0, noise, a, s, prediction, weighting, sigma_data, gamma,
                                    check_reduction(reduction), seed=seed, offset=offset)


def _check_logits(name: str, logits: torch.Tensor, x: torch.Tensor, x_name: str) -> None:
    """Logits of any shape with the batch first: a float tensor with ``x``'s batch size and device."""
    check_tensors(min_dim=1, **{name: logits})
    if logits.shape[0] != x.shape[0]:
        raise ValueError(f"{name} has batch size {logits.shape[0]} (shape {tuple(logits.shape)}) but "
                         f"{x_name} has {x.shape[0]}")
    if logits.device != x.device:
        raise ValueError(f"{name} is on {logits.device} but {x_name} is on {x.device}")


def sida_generator_loss(y_real: torch.Tensor, y_fake: torch.Tensor, x_g: torch.Tensor, logits: torch.Tensor,
                        alpha: float = 1.0) -> tuple[torch.Tensor, torch.Tensor]:
    """SiDA generator losses L_sid and L_gan, the published arithmetic.

    Zhou et al., ICLR 2025, "Adversarial Score identity Distillation"; docs/math.md, "SiDA losses".

    Args:
        y_real, y_fake, x_g: as ``sid_generator_loss``, (B, *F).
        logits: the fake score encoder's discriminator logits at the same x_t, any shape (B, *P), any float
            dtype. They are clamped to [-10, 10] inside L_gan, whose gradient reaches only them.
        alpha: weight of the ||f_phi - f_psi||^2 term (1 in the published SiDA runs).
    Returns:
        (L_sid, L_gan), 0-dim float32 tensors (float64 for float64 inputs): L_sid = (1/B) sum_i l_i, the
        batchmean SiD loss; L_gan = (1/B) sum_i N * b / w_i with b = BCE(clamp(logits, -10, 10), 1) averaged
        over the whole micro-batch. A sample with a NaN in any input is dropped from both (both still divide
        by the full B; b averages the kept samples). The caller applies the loss scales, e.g.
        ``0.5 * 100 * L_sid + 0.5 * 0.01 * L_gan`` as published.
    """
    check_tensors(y_real=y_real, y_fake=y_fake, x_g=x_g)
    _check_logits("logits", logits, x_g, "x_g")
    alpha = check_real("alpha", alpha)
    return _sida_op.sida_generator_loss(y_real, y_fake, x_g, logits, alpha)


def sida_discriminator_loss(logits_real: torch.Tensor, logits_fake: torch.Tensor, sigma,
                            sigma_data: float = 0.5, *, x_g: torch.Tensor | None = None,
                            y_fake: torch.Tensor | None = None) -> torch.Tensor:
    """SiDA discriminator loss L_D (Zhou et al., ICLR 2025; docs/math.md, "SiDA losses"), the published
    arithmetic: (1/B) sum_i lambda(sigma_i) (BCE(D_real, 1) + BCE(D_fake, 0)) / 2, each BCE one mean over the
    whole micro-batch, lambda(sigma) = (sigma^2 + sd^2) / (sigma sd)^2.

    Args:
        logits_real, logits_fake: the encoder's logits on noised real and generated samples, with the same
            noise; equal shapes (B, *P) with the batch first, not clamped.
        sigma: the per-sample noise levels, a (B,) or (B, 1, ..., 1) tensor, or a number.
        sigma_data: the data standard deviation in lambda (0.5 published).
        x_g, y_fake: optionally the step's generated sample and the fake score's x0 estimate of it, (B, *F):
            samples with a NaN there are dropped too, as the published step does.
    Returns:
        0-dim float32, float64 for float64 logits or sigma. Dropped samples contribute zero; L_D still
        divides by the full B and each BCE mean covers the kept samples' logits only.
    """
    check_tensors(min_dim=1, logits_real=logits_real, logits_fake=logits_fake)
    sigma = per_sample("sigma", sigma, logits_real)
    sigma_data = check_real("sigma_data", sigma_data, positive=True)
    samples = {name: t for name, t in (("x_g", x_g), ("y_fake", y_fake)) if t is not None}
    if samples:
        check_tensors(**samples)
        name = next(iter(samples))
        _check_logits("logits_real", logits_real, samples[name], name)
    return reference.sida_discriminator_loss(logits_real, logits_fake, sigma, sigma_data, x_g=x_g,
                                             y_fake=y_fake)


class SiDGeneratorLoss:
    """EDM-style loss object: ``loss(y_real, y_fake, x_g)`` with alpha and reduction fixed."""

    def __init__(self, alpha: float = 1.2, reduction: str = "batchmean", loss_scale: float = 1.0):
        self.alpha = check_real("alpha", alpha)
        self.reduction = check_reduction(reduction)
        self.loss_scale = check_real("loss_scale", loss_scale)

    def __call__(self, y_real, y_fake, x_g):
        return sid_generator_loss(y_real, y_fake, x_g, self.alpha, self.reduction, self.loss_scale)


class FakeScoreLoss:
    """EDM-style loss object for the fake-score update: ``loss(pred, x0, noise, a, s)``."""

    def __init__(self, prediction: str = "x0", weighting: str = "edm", sigma_data: float = 0.5, gamma: float = 5.0,
                 reduction: str = "batchmean"):
        self.kw = dict(prediction=prediction, weighting=weighting, sigma_data=sigma_data, gamma=gamma,
                       reduction=reduction)

    def __call__(self, pred, x0, noise, a, s):
        return fake_score_loss(pred, x0, noise, a, s, **self.kw)
