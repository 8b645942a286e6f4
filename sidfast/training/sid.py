"""SiD's two updates as micro-batch losses: the fake-score step and the generator step.

Each loss takes the score networks behind one interface (``sidfast.engine.scores``) and the generator.
Math: docs/math.md, "Fake-score loss" and "SiD generator loss".
"""
from __future__ import annotations

import dataclasses

import torch

from sidfast import conditions, guidance, reference
from sidfast.engine.scores import edm_noised
from sidfast.generator import draw_k_star, generator_sigmas, rollout
from sidfast.loss import fake_score_loss, sid_generator_loss
from sidfast.models.flow import FlowDenoiser
from sidfast.ops import backend
from sidfast.schedules import broadcast
from sidfast.training.conditioning import Conditioning
from sidfast.utils import runtime


@dataclasses.dataclass(frozen=True)
class MicroBatch:
    """What one micro-batch of a run is: ``size`` samples of ``image_shape`` on ``device``, with labels of
    ``num_classes`` classes in ``label_format``; an update sums ``rounds`` of them."""

    size: int
    image_shape: tuple
    device: torch.device
    num_classes: int
    label_format: str
    rounds: int = 1


def noise_source(option: str, x: torch.Tensor) -> str:
    """Where the trainer's eps for data like ``x`` comes from under option ``noise``: "kernel" (the fused
    noising kernel's Philox stream; its PyTorch reference off the Triton route) or "torch" (torch.randn)."""
    if option == "kernel" or (option == "auto" and backend.use_triton(x)):
        return "kernel"
    return "torch"


class SiDPhases:
    """SiD's recipe (guidance scales, generator levels, the teacher's loss conventions, the conditioning) and
    the losses of its two updates, each returning (loss, scale * loss to backpropagate)."""

    real_data = None  # SiD is data-free
    clip = None  # no clipping of the fake score's gradients
    updates_generator = True  # the generator's optimizer steps every iteration

    def __init__(self, cfg, teacher, batch: MicroBatch, conditioner=None, data=None):
        self.cfg = cfg
        self.batch = batch
        self.scales = cfg.guidance_scales()
        self.sigmas = generator_sigmas(cfg.gen_steps, cfg.sigma_init, cfg.step_spacing)
        self.k_star = 1
        # flow-matching teachers: velocity loss for the fake score, SiD-DiT's 1 - t weighting by default
        self.flow = isinstance(teacher, FlowDenoiser)
        weighting = cfg.generator_weighting
        self.weighting = ("1-t" if self.flow else "sid") if weighting == "auto" else weighting
        self.conditioning = Conditioning(cfg, teacher, conditioner, batch.num_classes, batch.label_format,
                                         self.scales, batch.device)
        self.null_labels, self.null_cond = conditions.split(self.conditioning.null)
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

    def add_metrics(self, record: dict) -> dict:
        """A metrics record with this recipe's metrics added."""
        record.update(self.take_metrics())
        return record

    def metrics_state(self) -> dict:
        """This recipe's metrics summed since the last record, for a checkpoint (SiD: none)."""
        return {}

    def load_metrics_state(self, state: dict | None, device) -> None:
        """Go on with the sums of ``metrics_state()`` (a resumed run's first record then averages the same
        iterations as the uninterrupted run's)."""

    def gate_warning(self, start_nimg: int, end_nimg: int) -> str | None:
        """A line for the start of a run that ends before a warm-up gate opens (SiD has no gates)."""
        return None

    def summary_notes(self, end_nimg: int) -> dict:
        """Notes for summary.json about what the run did not train (SiD: none)."""
        return {}

    # ---- the two updates ----
    def fake_score_loss(self, scores, generator, scale: float) -> tuple[torch.Tensor, torch.Tensor]:
        """EDM's denoising loss of the fake score at fresh samples of ``generator`` (``docs/math.md``,
        "Fake-score loss"): (loss, scale * loss)."""
        with torch.no_grad():
            x_g, labels, cond = self.generate(generator, dropout=self.scales.condition_dropout)
        sigma = self._fake_sigma()
        # kernel noise: the loss regenerates eps from the seed that drew it
        noise = torch.randn_like(x_g) if noise_source(self.cfg.noise, x_g) == "torch" else None
        x_t, seed = edm_noised(x_g, sigma, noise)
        pred = scores.fake_score_forward(x_t, sigma, labels, scale=self.scales.k1, null_labels=self.null_labels,
                                         null_cond=self.null_cond, **cond).float()
        pred, x0 = drop_nan_samples(pred, x_g)
        loss = self._denoising_loss(pred, x0, noise, sigma, seed)
        return loss, loss * scale

    def generator_batch(self, generator, generator_no_grad=None, labels=None) -> tuple:
        """(x_g, labels, cond, sigma, noise) of a generator update: fresh samples with gradient, the published
        generator-loss noise levels, and eps (None: drawn in the noising kernel); ``labels``: the class
        labels to generate for (SiDA: a real batch's), else drawn."""
        cfg = self.cfg
        x_g, labels, cond = self.generate(generator, generator_no_grad, labels=labels)
        sigma = reference.generator_sigma(self.batch.size, cfg.tmax, cfg.sigma_min, cfg.sigma_max, cfg.rho,
                                          device=self.batch.device)
        noise = torch.randn_like(x_g) if noise_source(cfg.noise, x_g) == "torch" else None
        return x_g, labels, cond, sigma, noise

    def generator_loss(self, scores, generator, generator_no_grad, scale: float):
        """The SiD loss of fresh samples of ``generator`` (``docs/math.md``, "SiD generator loss"), fp32:
        (loss, scale * loss), the scale folded into the fused loss so that backward needs no scaling pass.
        ``generator_no_grad``: the same network for the steps before k* of a few-step generator."""
        x_g, labels, cond, sigma, noise = self.generator_batch(generator, generator_no_grad)
        y_real, y_fake = scores.generator_terms(x_g, sigma, labels, noise=noise, scale_real=self.scales.k4,
                                                scale_fake=self.scales.k2, null_labels=self.null_labels,
                                                null_cond=self.null_cond, **cond)
        scaled = self._sid_loss(y_real.float(), y_fake.float(), x_g, sigma, scale)
        # the reported loss: the scale divided back out of the 0-dim result (the unscaled loss within float32
        # rounding; no pass over the data)
        return scaled.detach() / scale, scaled

    # ---- their parts ----
    def generate(self, net, net_no_grad=None, dropout: float = 0.0, labels=None):
        """Generator samples of k* steps (``generator.rollout``) with their labels and keyword conditions.

        Args:
            net: the generator; net_no_grad: the same network for the steps before k*.
            dropout: probability of the null condition per sample, applied before generating so that a
                dropped sample is generated and denoised without its condition.
            labels: the class labels to generate for, e.g. SiDA's real batch's; None draws them.
        Returns:
            (x_g, labels, cond).
        """
        b = self.batch
        z = torch.randn((b.size, *b.image_shape), device=b.device)
        if labels is None:
            labels, cond = self.conditioning.draw(b.size)
        else:
            cond = {}
        if dropout:
            labels, cond = conditions.split(guidance.drop_condition(conditions.joined(labels, cond),
                                                                  self.conditioning.null, dropout))
        with runtime.autocast(b.device, self.cfg.precision):
            x_g = rollout(net, z, labels, self.sigmas, self.k_star, self.cfg.renoise, G_no_grad=net_no_grad,
                          cond=cond)
        return x_g.float(), labels, cond

    def _fake_sigma(self) -> torch.Tensor:
        """Noise levels of the fake-score loss: EDM's ln sigma ~ N(p_mean, p_std^2); for flow-matching
        teachers the logit-normal t of their training (Esser et al. 2024, SD3), i.e. ln sigma = logit(t) ~
        N(mean, std^2)."""
        cfg = self.cfg
        if self.flow:
            return reference.edm_training_sigma(self.batch.size, cfg.flow_logit_mean, cfg.flow_logit_std,
                                                device=self.batch.device)
        return reference.edm_training_sigma(self.batch.size, cfg.p_mean, cfg.p_std, device=self.batch.device)

    def _denoising_loss(self, pred, x0, noise, sigma, seed) -> torch.Tensor:
        """EDM's weighted x0 loss, or for flow-matching teachers the velocity MSE at t = sigma / (1 + sigma)
        (``docs/math.md``, "Fake-score loss" and "Predictions", flow row)."""
        if self.flow:
            return fake_score_loss(pred, x0, noise, 1 / (1 + sigma), sigma / (1 + sigma), prediction="x0",
                                   weighting="flow", reduction="batchmean", seed=seed)
        return fake_score_loss(pred, x0, noise, 1.0, sigma, prediction="x0", weighting="edm",
                               sigma_data=self.cfg.sigma_data, reduction="batchmean", seed=seed)

    def _sid_loss(self, y_real, y_fake, x_g, sigma, scale: float) -> torch.Tensor:
        """scale times the SiD loss, weighted per sample by 1/w (the fused loss) or by 1 - t."""
        if self.weighting == "sid":
            return sid_generator_loss(y_real, y_fake, x_g, self.cfg.sid_alpha, reduction="batchmean",
                                      loss_scale=scale)
        return reference.weighted_sid_loss(y_real, y_fake, x_g, self.cfg.sid_alpha, 1 / (1 + sigma), scale)


def drop_nan_samples(pred: torch.Tensor, x_g: torch.Tensor, *logits: torch.Tensor):
    """(pred, x0) with the samples that hold a NaN in x_g, the prediction or any of ``logits`` zeroed: the
    published loops drop them from the fake-score loss."""
    keep = broadcast(~reference.nan_rows(pred, x_g, *logits), x_g)
    return torch.where(keep, pred, 0.0), torch.where(keep, x_g, 0.0)


__all__ = ["SiDPhases", "MicroBatch", "noise_source", "drop_nan_samples"]
