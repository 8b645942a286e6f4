"""The readable specification: every formula of ``docs/math.md`` in plain PyTorch.

Every fast path in sidfast is tested against these functions. They favour clarity over speed
and do no argument checking (``sidfast.loss`` validates before dispatching).
Shapes: ``B`` is the batch, ``*F`` any number of feature dimensions.
"""
from __future__ import annotations

import math

import torch

from sidfast import predictions
from sidfast.schedules import broadcast, snr

REDUCTIONS = ("none", "sum", "batchmean")


def add_noise(x0: torch.Tensor, a, s, noise: torch.Tensor) -> torch.Tensor:
    """x_t = a_t * x0 + s_t * eps (docs/math.md, "Forward process and schedules"). a, s: (B,) or scalars."""
    return broadcast(a, x0) * x0 + broadcast(s, x0) * noise


def nan_rows(*tensors: torch.Tensor) -> torch.Tensor:
    """(B,) bool: samples where any of ``tensors`` holds a NaN (the published code drops these)."""
    mask = torch.zeros(tensors[0].shape[0], dtype=torch.bool, device=tensors[0].device)
    for t in tensors:
        mask = mask | torch.isnan(t).reshape(t.shape[0], -1).any(1)
    return mask


def reduce(loss: torch.Tensor, reduction: str) -> torch.Tensor:
    """"none": the per-element tensor; "sum"; "batchmean": sum / B with B the full batch (published loop)."""
    if reduction == "none":
        return loss
    total = loss.sum(dtype=torch.float64 if loss.dtype == torch.float64 else torch.float32)
    return total if reduction == "sum" else total / loss.shape[0]


def _zero_rows(keep: torch.Tensor, *tensors: torch.Tensor):
    """Replace dropped samples by zeros so that neither values nor gradients carry their NaNs."""
    return [torch.where(broadcast(keep, t), t, torch.zeros((), dtype=t.dtype, device=t.device)) for t in tensors]


def sid_normalizer(y_real: torch.Tensor, x_g: torch.Tensor) -> torch.Tensor:
    """(B,) w = mean |x_g - f_phi| per sample, clipped at 1e-5, a constant (docs/math.md, "SiD generator
    loss"); computed in float32 as published, float64 inputs keep float64."""
    with torch.no_grad():
        acc = torch.promote_types(x_g.dtype, torch.float32)
        return (x_g - y_real).abs().to(acc).mean(dim=list(range(1, x_g.dim()))).clip(min=1e-5)


def sid_generator_loss(y_real: torch.Tensor, y_fake: torch.Tensor, x_g: torch.Tensor, alpha: float = 1.2,
                       reduction: str = "batchmean") -> torch.Tensor:
    """SiD generator loss in denoised space, the published ``generator_loss`` arithmetic.

    y_real, y_fake: teacher and fake-score x0 estimates at the same x_t, (B, *F); x_g: generator sample (B, *F).
    Returns float32 (float64 for float64 inputs): (B, *F) for "none", else a scalar. Samples with a NaN in
    any input contribute zero (rows of zeros for "none"); "batchmean" still divides by the full B.
    """
    keep = ~nan_rows(y_real, y_fake, x_g)
    y_real, y_fake, x_g = _zero_rows(keep, y_real, y_fake, x_g)
    w = broadcast(sid_normalizer(y_real, x_g), x_g)
    # L = (f_phi - f_psi) * ((f_phi - x_g) - alpha (f_phi - f_psi)) / w (Zhou et al. 2024, section 4)
    loss = (y_real - y_fake) * ((y_real - x_g) - alpha * (y_real - y_fake)) / w
    return reduce(loss, reduction)


def weighted_sid_loss(y_real, y_fake, x_g, alpha: float, weight: torch.Tensor, loss_scale: float):
    """loss_scale / B * sum_i weight_i * sum_pixels d * ((f_phi - x_g) - alpha d), d = f_phi - f_psi: the SiD
    loss with a per-sample weight in place of 1/w (SiD-DiT's 1 - t; docs/math.md, "SiD generator loss").
    A few passes over the data where the fused loss (weight 1/w) makes one. Samples with a NaN contribute
    zero, as in ``sid_generator_loss``."""
    keep = broadcast(~nan_rows(y_real, y_fake, x_g), x_g)
    y_real = torch.where(keep, y_real, 0.0)
    y_fake = torch.where(keep, y_fake, 0.0)
    x_g = torch.where(keep, x_g, 0.0)
    d = y_real - y_fake
    per_sample = (d * ((y_real - x_g) - alpha * d)).flatten(1).sum(1)
    return loss_scale * (weight.detach().to(per_sample.dtype) * per_sample).sum() / x_g.shape[0]


GENERATOR_WEIGHTS = ("1-t", "(1-t)^2", "1/t", "1/t^2", "snr", "sqrt-snr")


def generator_weight(name: str, sigma: torch.Tensor) -> torch.Tensor:
    """SiD-DiT's per-sample weights of the SiD loss in the flow time t = sigma / (1 + sigma) (so t / (1 - t) =
    sigma), each 1 / clip(w, 1e-5) where published as a division: 1-t (``1_minus_sigma``), (1-t)^2
    (``1_minus_sigma_squared``), 1/t (``1_over_sigma``), 1/t^2 (``1_over_sigma2``), snr = 1/(t/(1-t))^2
    (``snr``), sqrt-snr = 1/(t/(1-t)) (``snr_sqrt``)."""
    one_minus_t = 1 / (1 + sigma)
    if name == "1-t":
        return one_minus_t
    if name == "(1-t)^2":
        return one_minus_t ** 2
    t = sigma / (1 + sigma)
    if name == "1/t":
        return 1 / t.clamp(min=1e-5)
    if name == "1/t^2":
        return 1 / (t ** 2).clamp(min=1e-5)
    if name == "snr":
        return 1 / (sigma ** 2).clamp(min=1e-5)
    if name == "sqrt-snr":
        return 1 / sigma.clamp(min=1e-5)
    raise ValueError(f"generator weighting must be one of {GENERATOR_WEIGHTS}, got {name!r}")


def sid_generator_loss_eps(eps_real: torch.Tensor, eps_fake: torch.Tensor, eps: torch.Tensor, lam: float = 1.2,
                           reduction: str = "batchmean") -> torch.Tensor:
    """SiD generator loss in noise space: <e_phi - e_psi, e_phi - eps> - lam ||e_phi - e_psi||^2.

    eps_real, eps_fake: teacher and fake-score noise estimates, (B, *F); eps: the noise used for x_t.
    Per element, unnormalized; NaN samples contribute zero, as in the denoised form. Equal to the denoised
    form before its normalization, divided by (s/a)^2 (docs/math.md, "SiD generator loss").
    """
    keep = ~nan_rows(eps_real, eps_fake, eps)
    eps_real, eps_fake, eps = _zero_rows(keep, eps_real, eps_fake, eps)
    d = eps_real - eps_fake
    # inner product minus lam times the squared score difference (Zhou et al. 2024, section 4; lam = alpha)
    loss = d * ((eps_real - eps) - lam * d)
    return reduce(loss.to(torch.promote_types(loss.dtype, torch.float32)), reduction)


def sid_gradients(y_real: torch.Tensor, y_fake: torch.Tensor, x_g: torch.Tensor, alpha: float = 1.2,
                  normalize: bool = True):
    """Closed-form gradients of the per-element loss, each divided by w (or 1).

    The fused ops evaluate these in their forward pass (docs/math.md, "SiD generator loss"). Returns
    (dL/dy_real, dL/dy_fake, dL/dx_g) in float32, NaN samples zeroed; used to document and test.
    """
    keep = ~nan_rows(y_real, y_fake, x_g)
    y_real, y_fake, x_g = (t.float() for t in _zero_rows(keep, y_real, y_fake, x_g))
    d, e = y_real - y_fake, y_real - x_g
    if normalize:
        w = (x_g - y_real).abs().mean(dim=list(range(1, x_g.dim())), keepdim=True).clip(min=1e-5)
    else:
        w = 1.0
    return (e + (1 - 2 * alpha) * d) / w, (-e + 2 * alpha * d) / w, -d / w


# ---- SiDA: the SiD loss plus a GAN term from the fake score's encoder: docs/math.md, "SiDA losses" ----

def bce_mean(logits: torch.Tensor, target: float, keep: torch.Tensor) -> torch.Tensor:
    """BCEWithLogits(logits, target) averaged over every logit of the kept samples: one scalar for the batch.

    logits: (B, *P); keep: (B,) bool. Float32 or wider. Dropped rows are zeroed before the loss, so neither
    the value nor the gradient carries their NaNs; with no sample kept the mean is 0 (it only ever
    multiplies a sum over kept samples, which is then empty).
    """
    acc = torch.promote_types(logits.dtype, torch.float32)
    (logits,) = _zero_rows(keep, logits.to(acc))
    per_logit = torch.nn.functional.binary_cross_entropy_with_logits(
        logits, torch.full_like(logits, float(target)), reduction="none")
    kept_logits = keep.sum() * (logits.numel() // logits.shape[0])
    return torch.where(broadcast(keep, per_logit), per_logit, 0.0).sum() / kept_logits.clamp(min=1)


def sida_generator_loss(y_real: torch.Tensor, y_fake: torch.Tensor, x_g: torch.Tensor, logits: torch.Tensor,
                        alpha: float = 1.0) -> tuple[torch.Tensor, torch.Tensor]:
    """SiDA generator losses (L_sid, L_gan), the published ``generator_share_encoder_loss`` arithmetic
    followed by the loop's sums over the micro-batch divided by B (Zhou et al., ICLR 2025, "Adversarial
    Score identity Distillation"; docs/math.md, "SiDA losses").

    y_real, y_fake, x_g: as ``sid_generator_loss``; logits: the fake score encoder's logits at the same x_t,
    (B, *P). A sample with a NaN in any of the four is dropped from both losses; both still divide by the full
    B, and b averages the logits of the kept samples only.
    """
    keep = ~nan_rows(y_real, y_fake, x_g, logits)
    y_real, y_fake, x_g = _zero_rows(keep, y_real, y_fake, x_g)
    # L_sid = (1/B) sum_i l_i, the SiD loss with alpha (Zhou et al. 2024, section 4)
    loss_sid = sid_generator_loss(y_real, y_fake, x_g, alpha, "batchmean")
    # b = BCE(clamp(D, -10, 10), 1), one mean over the kept samples' logits (SiDA, G step)
    b = bce_mean(logits.clamp(-10, 10), 1.0, keep)
    # L_gan = (1/B) sum_i N * b / w_i, w_i the SiD normalizer held constant (SiDA, G step)
    inv_w = torch.where(keep, 1.0 / sid_normalizer(y_real, x_g), 0.0)
    n_features = x_g.numel() // x_g.shape[0]
    loss_gan = n_features * b * inv_w.sum() / x_g.shape[0]
    return loss_sid, loss_gan


def sida_discriminator_loss(logits_real: torch.Tensor, logits_fake: torch.Tensor, sigma: torch.Tensor,
                            sigma_data: float = 0.5, x_g: torch.Tensor | None = None,
                            y_fake: torch.Tensor | None = None) -> torch.Tensor:
    """SiDA discriminator loss L_D, the published ``fakescore_discriminator_share_encoder_loss`` arithmetic
    followed by the loop's sum over the micro-batch divided by B (Zhou et al., ICLR 2025; docs/math.md,
    "SiDA losses").

    A sample with a NaN in any input is dropped: L_D still divides by the full B, and each BCE mean covers
    the kept samples' logits only.

    Args:
        logits_real, logits_fake: the encoder's logits on noised real and generated samples, (B, *P), not
            clamped.
        sigma: noise levels, (B,) or (B, 1, ..., 1).
        sigma_data: the data standard deviation in lambda.
        x_g, y_fake: optionally the step's generated sample and the fake score's x0 estimate of it, (B, *F).
    """
    keep = ~nan_rows(logits_real, logits_fake, *(t for t in (x_g, y_fake) if t is not None))
    sigma = sigma.reshape(-1)
    acc = torch.promote_types(torch.promote_types(logits_real.dtype, sigma.dtype), torch.float32)
    sigma = sigma.to(acc)
    # lambda(sigma) = (sigma^2 + sd^2) / (sigma sd)^2 (Karras et al. 2022, Table 1), as SiDA weights L_D
    lam = torch.where(keep, (sigma ** 2 + sigma_data ** 2) / (sigma * sigma_data) ** 2, 0.0)
    # L_D = (1/B) sum_i lambda_i (BCE(D_real, 1) + BCE(D_fake, 0)) / 2, each BCE one batch mean (SiDA, D step)
    bce = (bce_mean(logits_real, 1.0, keep) + bce_mean(logits_fake, 0.0, keep)) / 2
    return (lam * bce).sum() / logits_real.shape[0]


# ---- guidance (SiD-LSG): docs/math.md, "Guidance (SiD-LSG)" ----

def cfg_combine(f_uncond: torch.Tensor, f_cond: torch.Tensor, k) -> torch.Tensor:
    """Classifier-free guidance at scale k: f^k = f(x_t, none) + k * (f(x_t, c) - f(x_t, none)).

    f_uncond, f_cond: one network's outputs at the same x_t and sigma without and with the condition, in any
    prediction space: x0, eps, v or flow. Each is affine in the others with coefficients that depend only on
    x_t and sigma, so guiding one guides them all. Classifier-free guidance is Ho & Salimans 2022, whose w is
    k - 1; SiD-LSG applies it to both score networks (docs/math.md, "Guidance (SiD-LSG)").
    """
    return f_uncond + k * (f_cond - f_uncond)


# ---- fake-score (denoising score matching) loss: docs/math.md, "Fake-score loss" ----

WEIGHTINGS = ("edm", "x0", "eps", "v", "flow", "min_snr_eps", "min_snr_v")


def fake_score_weight(a: torch.Tensor, s: torch.Tensor, weighting: str, sigma_data: float = 0.5,
                      gamma: float = 5.0) -> tuple[str, torch.Tensor]:
    """The target space and the (B,) per-sample weight of a weighting; a, s: (B,)."""
    if weighting == "edm":
        sigma = s / a
        # lambda(sigma) = (sigma^2 + sd^2) / (sigma sd)^2 (Karras et al. 2022, Table 1)
        return "x0", (sigma ** 2 + sigma_data ** 2) / (sigma * sigma_data) ** 2
    if weighting in ("x0", "eps", "v", "flow"):
        return weighting, torch.ones_like(s)
    r = snr(a, s)
    if weighting == "min_snr_eps":
        return "eps", torch.clamp(r, max=gamma) / r  # min-SNR-gamma for eps errors (Hang et al. 2023)
    if weighting == "min_snr_v":
        return "v", torch.clamp(r, max=gamma) / (r + 1)  # min-SNR-gamma for v errors (Hang et al. 2023)
    raise ValueError(f"weighting must be one of {WEIGHTINGS}, got {weighting!r}")


def fake_score_loss(pred: torch.Tensor, x0: torch.Tensor, noise: torch.Tensor, a: torch.Tensor, s: torch.Tensor,
                    prediction: str = "x0", weighting: str = "edm", sigma_data: float = 0.5, gamma: float = 5.0,
                    reduction: str = "batchmean") -> torch.Tensor:
    """Denoising score matching on generator samples: w(t) * ||target_hat - target||^2 (docs/math.md).

    pred: the fake score's output at x_t = a x0 + s noise, in its own ``prediction`` space, (B, *F);
    x0: the (detached) generator sample; noise: the eps used; a, s: (B,). Float32 result, per element for "none".
    """
    acc = torch.promote_types(pred.dtype, torch.float32)
    space, w = fake_score_weight(a.to(acc), s.to(acc), weighting, sigma_data, gamma)
    x_t = add_noise(x0, a, s, noise)
    est = predictions.convert(pred, x_t, a, s, prediction, space)
    tgt = predictions.target(x0, noise, a, s, space)
    loss = broadcast(w, est) * (est.to(acc) - tgt.to(acc)) ** 2
    return reduce(loss, reduction)


# ---- noise levels: docs/math.md, "Noise levels" ----

def generator_sigma(batch: int, tmax: int = 800, sigma_min: float = 0.002, sigma_max: float = 80.0,
                    rho: float = 7.0, device=None, generator: torch.Generator | None = None) -> torch.Tensor:
    """(B,) sigmas of the published generator loss: u ~ U(0, tmax/1000) mapped through EDM's rho-schedule."""
    u = torch.rand(batch, device=device, generator=generator) * (tmax / 1000)
    lo, hi = sigma_min ** (1 / rho), sigma_max ** (1 / rho)
    return (hi + (1 - u) * (lo - hi)) ** rho  # EDM rho-schedule (Karras et al. 2022, eq. 5) at 1 - u


def edm_training_sigma(batch: int, p_mean: float = -1.2, p_std: float = 1.2, device=None,
                       generator: torch.Generator | None = None) -> torch.Tensor:
    """(B,) sigmas with ln sigma ~ N(P_mean, P_std^2) (Karras et al. 2022, Table 1)."""
    return torch.exp(torch.randn(batch, device=device, generator=generator) * p_std + p_mean)


def timestep_sigma(batch: int, lo: int, hi: int, sigmas: torch.Tensor, device=None) -> torch.Tensor:
    """(B,) sigmas of integer timesteps t ~ U{lo..hi} of a DDPM table (SiD-LSG: ``torch.randint(20, 980)``);
    ``sigmas``: the table's sigma_t = sqrt((1 - abar_t) / abar_t) per timestep. In the default dtype."""
    t = torch.randint(lo, hi + 1, (batch,), device=device)
    return sigmas.to(device)[t].to(torch.get_default_dtype())


def vp_sigmas(alphas_cumprod: torch.Tensor) -> torch.Tensor:
    """sigma_t = sqrt((1 - abar_t) / abar_t) per timestep of a DDPM table, float64: x_t / sqrt(abar_t) =
    x0 + sigma_t eps."""
    ac = alphas_cumprod.to(torch.float64)
    return ((1 - ac) / ac).sqrt()


def generator_step_sigmas(steps: int, sigma_init: float = 2.5, spacing: str = "linear") -> list[float]:
    """The K noise levels sigma_0 = sigma_init > ... > sigma_{K-1} > 0 of a few-step generator (Zhou et al.
    2025, "Few-Step Diffusion via Score identity Distillation"; docs/math.md, "Few-step generator").

    "linear": sigma_k = sigma_init * (K - k) / K; "flow": linear in the flow time t = sigma / (1 + sigma),
    t_k = t_init * (K - k) / K (SiD-DiT's grid). sigma_0 is sigma_init exactly, so one step is the one-step
    generator. sigma_init = inf is t_init = 1, pure noise (flow spacing only; ``generator_input``).
    """
    if spacing not in ("linear", "flow"):
        raise ValueError(f"spacing must be 'linear' or 'flow', got {spacing!r}")
    if math.isinf(sigma_init) and spacing != "flow" and steps > 1:
        raise ValueError("an infinite first noise level (t_init = 1) needs the flow spacing of the steps")
    t_init = 1.0 if math.isinf(sigma_init) else sigma_init / (1 + sigma_init)
    levels = []
    for k in range(steps):
        frac = (steps - k) / steps
        if k == 0:
            levels.append(float(sigma_init))
        elif spacing == "linear":
            levels.append(sigma_init * frac)
        else:
            t = t_init * frac
            levels.append(t / (1 - t))
    return levels


def generator_input(z: torch.Tensor, sigma: float) -> torch.Tensor:
    """The first generator step's input sigma * z, or z itself at sigma = inf: a network evaluated at an
    infinite noise level takes its input divided by sigma (only flow teachers define it: their input there is
    t z = z, ``FlowDenoiser``)."""
    return z if math.isinf(sigma) else sigma * z


def edm_sigma_steps(num_steps: int = 18, sigma_min: float = 0.002, sigma_max: float = 80.0, rho: float = 7.0,
                    device=None) -> torch.Tensor:
    """EDM's sampling sigmas sigma_0 > ... > sigma_{N-1}, then 0 (Karras et al. 2022, eq. 5)."""
    i = torch.arange(num_steps, dtype=torch.float64, device=device)
    lo, hi = sigma_min ** (1 / rho), sigma_max ** (1 / rho)
    steps = (hi + i / max(num_steps - 1, 1) * (lo - hi)) ** rho
    return torch.cat([steps, torch.zeros(1, dtype=torch.float64, device=device)])



# ---- one iteration of SiD and SiDA: docs/math.md, "One iteration in code" ----

def sid_iteration(generator, generator_ema, fake, teacher, opt_g, opt_fake, *, nimg: int, batch: int, image_shape,
                  method: str = "sid", num_classes: int = 0, alpha: float = 1.2, sigma_init: float = 2.5,
                  tmax: int = 800, p_mean: float = -1.2, p_std: float = 1.2, sigma_data: float = 0.5,
                  loss_scale_g: float = 100.0, loss_scale_fake: float = 1.0, ema_halflife_kimg: float = 500.0,
                  ema_rampup_ratio: float | None = 0.05, real_images=None, real_labels=None, discriminator=None,
                  loss_scale_d: float = 1.0, loss_scale_gan: float = 0.01, gan_start_kimg: float = 0.0,
                  g_start_kimg: float = 0.0, gen_labels=None) -> dict:
    """One iteration of SiD (Zhou et al., ICML 2024, Algorithm 1) or SiDA (``method="sida"``, ICLR 2025).

    The trainer's order with one fp32 micro-batch and torch.randn noise (docs/math.md, "One iteration in
    code"). Draws per step: z, uniform one-hot labels, dropout, sigma, eps.

    Args:
        generator, generator_ema, fake, teacher: EDM denoisers ``net(x, sigma, labels) -> x0``; the teacher
            stays frozen.
        opt_g, opt_fake: the Adam optimizers of generator and fake score.
        nimg: images seen before this iteration.
        real_images, real_labels: SiDA's real batch for this iteration.
        gen_labels: SiDA's labels for the generator step; published: those of the next real batch, drawn
            after the fake-score update. None draws them uniformly.
        discriminator: SiDA's D on ``fake``'s encoder, a ``sidfast.models.discriminator.DiscriminatorTap``.
        The other keywords are the published hyperparameters, named as in ``TrainConfig``.
    Returns:
        The losses, by name.
    """
    sida = method == "sida"
    device = next(generator.parameters()).device

    def sample(labels):  # x_g = G(sigma_init z, sigma_init); labels drawn after z
        z = torch.randn(batch, *image_shape, device=device)
        if labels is None and num_classes:
            labels = torch.nn.functional.one_hot(torch.randint(num_classes, (batch,), device=device),
                                                 num_classes).float()
        return generator(sigma_init * z, torch.full((batch,), sigma_init, device=device), labels), labels

    def step(opt, params, loss, clip=None, update=True):  # gradients into params only, nan_to_num'd
        opt.zero_grad(set_to_none=True)
        loss.backward(inputs=params)
        for p in params:
            torch.nan_to_num(p.grad, nan=0.0, posinf=1e5, neginf=-1e5, out=p.grad)
        if clip is not None:
            torch.nn.utils.clip_grad_value_(params, clip)
        if update:
            opt.step()

    # Update the fake score: EDM's denoising loss at fresh samples; SiDA: and L_D of its encoder, real vs fake
    generator.eval()
    fake.train()
    with torch.no_grad():
        x_g, labels = sample(real_labels)
    sigma = edm_training_sigma(batch, p_mean, p_std, device=device)
    eps = torch.randn_like(x_g)
    x_t = x_g + broadcast(sigma, x_g) * eps
    logits, out = (), {}
    if sida:  # D_fake from the same forward as f_psi, D_real from an encoder-only one at the same sigma, eps
        pred, d_fake = discriminator.forward_with_logits(x_t, sigma, labels)
        d_real = discriminator.encoder_logits(real_images + broadcast(sigma, x_g) * eps, sigma, labels)
        out["loss_d"] = sida_discriminator_loss(d_real, d_fake, sigma, sigma_data, x_g=x_g, y_fake=pred)
        logits = (d_fake, d_real)
    else:
        pred = fake(x_t, sigma, labels)
    keep = broadcast(~nan_rows(pred, x_g, *logits), x_g)  # published: samples with a NaN are dropped
    out["loss_fake"] = fake_score_loss(torch.where(keep, pred, 0.0), torch.where(keep, x_g, 0.0), eps,
                                       torch.ones_like(sigma), sigma, sigma_data=sigma_data)
    loss = loss_scale_fake * out["loss_fake"] + (loss_scale_d * out["loss_d"] if sida else 0.0)
    step(opt_fake, list(fake.parameters()), loss, clip=1.0 if sida else None)  # SiDA clips to [-1, 1]

    # Update the generator: the SiD loss of fresh samples (SiDA: mixed with L_gan after gan_start_kimg)
    generator.train()
    fake.eval()
    x_g, labels = sample(gen_labels)
    sigma = generator_sigma(batch, tmax, device=device)
    x_t = x_g + broadcast(sigma, x_g) * torch.randn_like(x_g)
    y_real = teacher(x_t, sigma, labels)
    if sida:
        y_fake, d = discriminator.forward_with_logits(x_t, sigma, labels)
        out["loss_g"], out["loss_gan"] = sida_generator_loss(y_real, y_fake, x_g, d, alpha)
    else:
        out["loss_g"] = sid_generator_loss(y_real, fake(x_t, sigma, labels), x_g, alpha)
    loss = loss_scale_g * out["loss_g"]
    if sida and nimg > gan_start_kimg * 1000:
        loss = 0.5 * loss + 0.5 * loss_scale_gan * out["loss_gan"]
    # SiDA: the generator's optimizer steps only after g_start_kimg
    step(opt_g, list(generator.parameters()), loss, update=not sida or nimg > g_start_kimg * 1000)

    # Update EMA: EDM's half-life in images, ramped up over the first ones
    halflife = ema_halflife_kimg * 1000
    if ema_rampup_ratio is not None:
        halflife = min(halflife, nimg * ema_rampup_ratio)
    beta = 0.5 ** (batch / max(halflife, 1e-8))
    with torch.no_grad():
        for p_ema, p in zip(generator_ema.parameters(), generator.parameters()):
            p_ema.copy_(p.lerp(p_ema, beta))
        for b_ema, b in zip(generator_ema.buffers(), generator.buffers()):
            b_ema.copy_(b)
    return {name: value.detach() for name, value in out.items()}

__all__ = [n for n in dir() if not n.startswith("_") and n not in ("annotations", "torch")]
