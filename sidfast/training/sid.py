"""The micro-batch losses of SiD's two updates, over the networks of one run (``train._Trainer``).

- The fake-score update (``docs/math.md``, "Fake-score loss"): EDM's denoising loss of the fake score at fresh
  generator samples, drawn without gradient; guided at k1 and with condition dropout under SiD-LSG; for a
  flow-matching teacher the velocity loss at the logit-normal t of its training.
- The generator update ("SiD generator loss"): the SiD loss of fresh samples, the teacher guided at k4 and
  the fake score at k2, with gradients into the generator only; weighted per sample by 1/w (the fused loss)
  or by SiD-DiT's 1 - t.

Samples come from ``generator.rollout`` (k* steps of a few-step generator; one step: x_g = G(sigma_init z,
sigma_init)). The noise eps of both updates comes from ``torch.randn`` or the fused noising kernel (option
``noise``, ``noise_source``). ``sidfast.training.sida.SiDAPhases`` adds SiDA's discriminator and GAN terms.
"""
from __future__ import annotations

import torch

from sidfast import guidance, reference
from sidfast.utils import runtime
from sidfast.training.conditioning import Conditioning, joined, split
from sidfast.models.flow import FlowDenoiser
from sidfast.engine.scores import edm_noised
from sidfast.generator import draw_k_star, generator_sigmas, rollout
from sidfast.loss import fake_score_loss, sid_generator_loss
from sidfast.ops import backend
from sidfast.schedules import broadcast


def noise_source(option: str, x: torch.Tensor) -> str:
    """Where the trainer's eps for data like ``x`` comes from under option ``noise``: "kernel" (the fused
    noising kernel's Philox stream; its PyTorch reference off the Triton route) or "torch" (torch.randn)."""
    if option == "kernel" or (option == "auto" and backend.use_triton(x)):
        return "kernel"
    return "torch"


class SiDPhases:
    """SiD's recipe (guidance scales, generator levels, the teacher's loss conventions, the conditioning) and
    the losses of its two updates, ``fake_score_loss(scale)`` and ``generator_loss(scale)``: each returns
    (loss, scale * loss to backpropagate). Reads the networks, shapes and device of ``trainer``."""

    real_data = None  # SiD is data-free
    clip = None  # no clipping of the fake score's gradients
    updates_generator = True  # the generator's optimizer steps every iteration

    def __init__(self, trainer, conditioner, data=None):
        cfg = trainer.cfg
        self.trainer = trainer
        self.cfg = cfg
        self.scales = cfg.guidance_scales()
        self.sigmas = generator_sigmas(cfg.gen_steps, cfg.sigma_init, cfg.step_spacing)
        self.k_star = 1
        # flow-matching teachers: velocity loss for the fake score, SiD-DiT's 1 - t weighting by default
        self.flow = isinstance(trainer.teacher, FlowDenoiser)
        weighting = cfg.generator_weighting
        self.weighting = ("1-t" if self.flow else "sid") if weighting == "auto" else weighting
        self.conditioning = Conditioning(cfg, trainer.teacher, conditioner, trainer.num_classes,
                                         trainer.label_format, self.scales, trainer.device)
        self.null = self.conditioning.null
        self.loss_scale_fake = cfg.loss_scale_fake
        self.loss_scale_g = cfg.loss_scale_g
        if data is not None:
            raise ValueError(f"real images are for {cfg.option('method')} sida or sid2a; "
                             f"{cfg.option('method')} sid is data-free")

    def begin(self, iteration: int, nimg: int) -> None:
        """Start an iteration: the generator steps k* of its samples, the same in both updates and on every
        rank."""
        self.k_star = draw_k_star(self.cfg.gen_steps, iteration, self.cfg.seed)

    def take_metrics(self) -> dict:
        """Metrics besides the two losses, averaged since the last call (SiD has none)."""
        return {}

    # ---- the two updates ----
    def fake_score_loss(self, scale: float) -> tuple[torch.Tensor, torch.Tensor]:
        """EDM's denoising loss of the fake score at fresh samples (``docs/math.md``, "Fake-score loss"):
        (loss, scale * loss)."""
        t = self.trainer
        with torch.no_grad():
            x_g, labels, cond = self.generate(t.generator_sample, dropout=self.scales.condition_dropout)
        sigma = self._fake_sigma()
        # kernel noise: the loss regenerates eps from the seed that drew it
        noise = torch.randn_like(x_g) if noise_source(self.cfg.noise, x_g) == "torch" else None
        x_t, seed = edm_noised(x_g, sigma, noise)
        pred = self._fake_prediction(x_t, sigma, labels, cond).float()
        # published: samples with NaN in x_g or the prediction are dropped from the loss
        keep = broadcast(~reference.nan_rows(pred, x_g), x_g)
        pred = torch.where(keep, pred, 0.0)
        x0 = torch.where(keep, x_g, 0.0)
        loss = self._denoising_loss(pred, x0, noise, sigma, seed)
        return loss, loss * scale

    def generator_batch(self) -> tuple:
        """(x_g, labels, cond, sigma, noise) of a generator update: fresh samples with gradient, the published
        generator-loss noise levels, and eps (None: drawn in the noising kernel)."""
        cfg = self.cfg
        t = self.trainer
        x_g, labels, cond = self.generate(t.generator_train, t.generator_sample)
        sigma = reference.generator_sigma(t.batch_gpu, cfg.tmax, cfg.sigma_min, cfg.sigma_max, cfg.rho,
                                          device=t.device)
        noise = torch.randn_like(x_g) if noise_source(cfg.noise, x_g) == "torch" else None
        return x_g, labels, cond, sigma, noise

    def generator_loss(self, scale: float) -> tuple[torch.Tensor, torch.Tensor]:
        """The SiD loss of fresh samples (``docs/math.md``, "SiD generator loss"), fp32: (loss, scale * loss),
        the scale folded into the fused loss so that backward needs no scaling pass."""
        x_g, labels, cond, sigma, noise = self.generator_batch()
        y_real, y_fake = self._score_terms(x_g, sigma, labels, cond, noise)
        scaled = self._sid_loss(y_real.float(), y_fake.float(), x_g, sigma, scale)
        # the reported loss: the scale divided back out of the 0-dim result (the unscaled loss within float32
        # rounding; no pass over the data)
        return scaled.detach() / scale, scaled

    # ---- their parts ----
    def generate(self, net, net_no_grad=None, dropout: float = 0.0, labels=None):
        """Generator samples of k* steps (``generator.rollout``; k* = 1: x_g = G(sigma_init z, sigma_init))
        with their labels and keyword conditions; ``dropout``: probability of the null condition per sample,
        applied before generating so that a dropped sample is generated and denoised without its condition;
        ``labels``: the class labels to generate for (SiDA: the real batch's), else drawn."""
        t = self.trainer
        z = torch.randn((t.batch_gpu, *t.image_shape), device=t.device)
        if labels is None:
            labels, cond = self.conditioning.draw(t.batch_gpu)
        else:
            cond = {}
        if dropout:
            labels, cond = split(guidance.drop_condition(joined(labels, cond), self.null, dropout))
        with runtime.autocast(t.device, self.cfg.precision):
            x_g = rollout(net, z, labels, self.sigmas, self.k_star, self.cfg.renoise, G_no_grad=net_no_grad,
                          cond=cond)
        return x_g.float(), labels, cond

    def _fake_prediction(self, x_t, sigma, labels, cond) -> torch.Tensor:
        """The fake score at x_t, guided at k1 (``guidance.guided``), with gradients into its parameters."""
        t = self.trainer
        k1 = self.scales.k1
        if t.engine is not None and not t.dist.enabled:
            null_labels, null_cond = split(self.null)
            return t.engine.fake_score_forward(x_t, sigma, labels, scale=k1, null_labels=null_labels,
                                               null_cond=null_cond, **cond)
        # DDP: the wrapper's hooks average the fake score's gradients
        with runtime.autocast(t.device, self.cfg.precision):
            return guidance.guided(t.fake_train, x_t, sigma, joined(labels, cond), self.null, k1)

    def _fake_sigma(self) -> torch.Tensor:
        """Noise levels of the fake-score loss: EDM's ln sigma ~ N(p_mean, p_std^2); for flow-matching
        teachers the logit-normal t of their training (Esser et al. 2024, SD3), i.e. ln sigma = logit(t) ~
        N(mean, std^2)."""
        cfg = self.cfg
        t = self.trainer
        if self.flow:
            return reference.edm_training_sigma(t.batch_gpu, cfg.flow_logit_mean, cfg.flow_logit_std,
                                                device=t.device)
        return reference.edm_training_sigma(t.batch_gpu, cfg.p_mean, cfg.p_std, device=t.device)

    def _denoising_loss(self, pred, x0, noise, sigma, seed) -> torch.Tensor:
        """EDM's weighted x0 loss, or for flow-matching teachers the velocity MSE at t = sigma / (1 + sigma)
        (``docs/math.md``, "Fake-score loss" and "Predictions", flow row)."""
        if self.flow:
            return fake_score_loss(pred, x0, noise, 1 / (1 + sigma), sigma / (1 + sigma), prediction="x0",
                                   weighting="flow", reduction="batchmean", seed=seed)
        return fake_score_loss(pred, x0, noise, 1.0, sigma, prediction="x0", weighting="edm",
                               sigma_data=self.cfg.sigma_data, reduction="batchmean", seed=seed)

    def _score_terms(self, x_g, sigma, labels, cond, noise) -> tuple[torch.Tensor, torch.Tensor]:
        """Teacher (guided at k4) and fake score (at k2) at x_t = x_g + sigma * eps, input gradients only."""
        t = self.trainer
        k2 = self.scales.k2
        k4 = self.scales.k4
        if t.engine is not None:
            null_labels, null_cond = split(self.null)
            return t.engine.generator_terms(x_g, sigma, labels, noise=noise, scale_real=k4, scale_fake=k2,
                                            null_labels=null_labels, null_cond=null_cond, **cond)
        x_t, _ = edm_noised(x_g, sigma, noise)
        condition = joined(labels, cond)
        with runtime.autocast(t.device, self.cfg.precision):
            y_real = guidance.guided(t.teacher, x_t, sigma, condition, self.null, k4)
            y_fake = guidance.guided(t.fake, x_t, sigma, condition, self.null, k2)
        return y_real, y_fake

    def _sid_loss(self, y_real, y_fake, x_g, sigma, scale: float) -> torch.Tensor:
        """scale times the SiD loss, weighted per sample by 1/w (the fused loss) or by 1 - t."""
        if self.weighting == "sid":
            return sid_generator_loss(y_real, y_fake, x_g, self.cfg.sid_alpha, reduction="batchmean",
                                      loss_scale=scale)
        return reference.weighted_sid_loss(y_real, y_fake, x_g, self.cfg.sid_alpha, 1 / (1 + sigma), scale)


__all__ = ["SiDPhases", "noise_source"]
