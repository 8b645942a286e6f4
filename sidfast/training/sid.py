"""SiD's two updates as micro-batch losses: the fake-score step and the generator step.

Each loss takes the score networks behind one interface (``sidfast.engine.scores``) and the generator.
Math: docs/math.md, "Fake-score loss" and "SiD generator loss".
"""
from __future__ import annotations

import dataclasses
import inspect

import torch
from torch import nn

from sidfast import conditions, guidance, reference
from sidfast.engine.scores import edm_noised
from sidfast.generator import draw_k_star, rollout
from sidfast.loss import fake_score_loss, sid_generator_loss
from sidfast.models.flow import FlowDenoiser
from sidfast.models.introspect import _modules_of
from sidfast.ops import backend
from sidfast.schedules import broadcast
from sidfast.training.augment import AugmentPipe
from sidfast.training.conditioning import Conditioning
from sidfast.training.recipe import resolve
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

    def __init__(self, cfg, teacher, batch: MicroBatch, conditioner=None, data=None, recipe=None, fake=None):
        """``recipe``: the run's completed recipe (``sidfast.training.recipe.resolve``; default: resolved here
        from ``cfg`` and ``teacher``); ``fake``: the fake score, whose signature says whether it can be told
        about augmentation (option augment_p)."""
        recipe = recipe if recipe is not None else resolve(cfg, teacher, text=conditioner is not None)
        cfg = recipe.cfg
        self.cfg = cfg
        self.recipe = recipe
        self.batch = batch
        self.scales = cfg.guidance_scales()
        self.sigmas = recipe.gen_sigmas
        self.k_star = 1
        self.flow = isinstance(teacher, FlowDenoiser)
        self.weighting = cfg.generator_weighting
        self.conditioning = Conditioning(cfg, teacher, conditioner, batch.num_classes, batch.label_format,
                                         self.scales, batch.device)
        self.null_labels, self.null_cond = conditions.split(self.conditioning.null)
        self.augment = self._augment_pipe(fake if fake is not None else teacher)
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
        """The denoising loss of the fake score at fresh samples of ``generator`` (``docs/math.md``,
        "Fake-score loss"), weighted and at noise levels as the recipe says: (loss, scale * loss)."""
        with torch.no_grad():
            x_g, labels, cond = self.generate(generator, dropout=self.cfg.condition_dropout)
        sigma = self._fake_sigma()
        # the published EDM loss's order: sigma, the augmentation of x_g, the noise
        x_g, augment_cond = self._augmented(x_g)
        cond = {**cond, **augment_cond}
        # kernel noise: the loss regenerates eps from the seed that drew it
        noise = torch.randn_like(x_g) if noise_source(self.cfg.noise, x_g) == "torch" else None
        x_t, seed = edm_noised(x_g, sigma, noise)
        pred = scores.fake_score_forward(x_t, sigma, labels, scale=self.scales.k1, null_labels=self.null_labels,
                                         null_cond=self.null_cond, **cond)
        pred = acc(pred)
        pred, x0 = drop_nan_samples(pred, x_g)
        loss = self._denoising_loss(pred, x0, noise, sigma, seed)
        return loss, loss * scale

    def generator_batch(self, generator, generator_no_grad=None, labels=None) -> tuple:
        """(x_g, labels, cond, sigma, noise) of a generator update: fresh samples with gradient, the published
        generator-loss noise levels, and eps (None: drawn in the noising kernel); ``labels``: the class
        labels to generate for (SiDA: a real batch's), else drawn."""
        cfg = self.cfg
        x_g, labels, cond = self.generate(generator, generator_no_grad, labels=labels)
        sigma = self.recipe.gen_law.draw(self.batch.size, device=self.batch.device)
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
        scaled = self._sid_loss(acc(y_real), acc(y_fake), x_g, sigma, scale)
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
        return acc(x_g), labels, cond

    def _augment_pipe(self, fake) -> AugmentPipe | None:
        """EDM's augmentation of the fake-score step's images at probability option augment_p (published SiD:
        0.12 on CIFAR-10), or None."""
        cfg = self.cfg
        if cfg.augment_p == 0:
            return None
        if not takes_augment_labels(fake):
            raise ValueError(f"{cfg.option('augment_p')} {cfg.augment_p}: the fake score takes no "
                             "augment_labels, so it could not tell augmented images from real ones (EDM's "
                             "augmentation is non-leaking only for networks conditioned on it, e.g. "
                             "augment_dim=9); use 0")
        return AugmentPipe(cfg.augment_p)

    def _augmented(self, images):
        """EDM's augmentation of ``images`` (a fresh draw per call, as published) and the conditioning that
        tells the fake score about it."""
        if self.augment is None:
            return images, {}
        images, augment_labels = self.augment(images)
        return images, {"augment_labels": augment_labels}

    def _fake_sigma(self) -> torch.Tensor:
        """Noise levels of the fake-score loss, drawn by the recipe's law in the teacher's own time
        (``sidfast.noise_levels``)."""
        return self.recipe.fake_law.draw(self.batch.size, device=self.batch.device)

    def _denoising_loss(self, pred, x0, noise, sigma, seed) -> torch.Tensor:
        """The fake score's denoising loss in the recipe's weighting (``docs/math.md``, "Fake-score loss"):
        EDM's weighted x0 error, the unweighted eps MSE (SiD-LSG), or the velocity MSE (SiD-DiT), in the
        teacher's own coordinates x_t = a x0 + s eps (which only the v target's scale depends on)."""
        family = self.recipe.clock.family
        if family == "flow":
            a, s = 1 / (1 + sigma), sigma / (1 + sigma)
        elif family == "ddpm":
            a = torch.rsqrt(1 + sigma * sigma)
            a, s = a, a * sigma
        else:
            a, s = 1.0, sigma
        return fake_score_loss(pred, x0, noise, a, s, prediction="x0", weighting=self.cfg.fake_weighting,
                               sigma_data=self.cfg.sigma_data, reduction="batchmean", seed=seed)

    def _sid_loss(self, y_real, y_fake, x_g, sigma, scale: float) -> torch.Tensor:
        """scale times the SiD loss, weighted per sample by 1/w (the fused loss) or by a SiD-DiT weighting of
        t = sigma / (1 + sigma) (``reference.generator_weight``)."""
        if self.weighting == "sid":
            return sid_generator_loss(y_real, y_fake, x_g, self.cfg.sid_alpha, reduction="batchmean",
                                      loss_scale=scale)
        weight = reference.generator_weight(self.weighting, sigma)
        return reference.weighted_sid_loss(y_real, y_fake, x_g, self.cfg.sid_alpha, weight, scale)


def takes_augment_labels(net: nn.Module) -> bool:
    """Whether ``net`` or a network it wraps names an ``augment_labels`` argument (EDM's SongUNet and
    DhariwalUNet), i.e. can be told which augmentation its input went through."""
    for module in _modules_of(net):
        try:
            if "augment_labels" in inspect.signature(module.forward).parameters:
                return True
        except (AttributeError, TypeError, ValueError):
            continue
    return False


def acc(t: torch.Tensor) -> torch.Tensor:
    """``t`` in the losses' precision: float32, or float64 for float64 networks (as the published code's
    float32 casts widened)."""
    return t.to(torch.promote_types(t.dtype, torch.float32))


def drop_nan_samples(pred: torch.Tensor, x_g: torch.Tensor, *logits: torch.Tensor):
    """(pred, x0) with the samples that hold a NaN in x_g, the prediction or any of ``logits`` zeroed: the
    published loops drop them from the fake-score loss."""
    keep = broadcast(~reference.nan_rows(pred, x_g, *logits), x_g)
    return torch.where(keep, pred, 0.0), torch.where(keep, x_g, 0.0)


__all__ = ["SiDPhases", "MicroBatch", "noise_source", "drop_nan_samples"]
