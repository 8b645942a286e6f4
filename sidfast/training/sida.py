"""SiDA and SiD2A in the trainer (Zhou et al., ICLR 2025, "Adversarial Score identity Distillation";
``docs/math.md``, "SiDA losses").

The fake-score update also trains the fake score's own encoder as a discriminator between real images
(``sidfast.training.data.RealData``) and generator samples given the same sigma and noise; the generator update adds a
GAN term whose logits come from the fake-score forward it already runs (``sidfast.models.discriminator``). SiD2A
starts the generator from a SiD run's EMA generator (``read_init_generator``).
"""
from __future__ import annotations

import warnings

import torch

from sidfast.models.io import CheckpointError, load_checkpoint
from sidfast.training.data import DataWarning, RealData
from sidfast.labels import format_labels
from sidfast.engine.scores import edm_noised
from sidfast.loss import sida_discriminator_loss, sida_generator_loss
from sidfast.ops.noise import regenerate_noise
from sidfast.training.sid import MicroBatch, SiDPhases, drop_nan_samples, noise_source

# SiDA's generator loss once the GAN term is on: SIDA_MIX * loss_scale_g * L_sid + (1 - SIDA_MIX) *
# loss_scale_gan * L_gan (published 0.5 / 0.5); and the value the fake score's gradients are clipped to.
SIDA_MIX = 0.5
SIDA_CLIP = 1.0
SIDA_METRICS = ("loss_d", "loss_gan", "logit_real", "logit_fake", "loss_g_not_applied", "loss_gan_not_applied")
# a loss the generator's optimizer did not step on in a metrics window is logged under this suffix instead
NOT_APPLIED = "_not_applied"


def read_init_generator(cfg) -> dict | None:
    """SiD2A: the SiD checkpoint named by ``init_generator``, read before any network is touched."""
    if cfg.method != "sid2a":
        return None
    try:
        return load_checkpoint(cfg.init_generator, "distill")
    except CheckpointError as exc:
        raise CheckpointError(f"{cfg.option('init_generator')}: {exc}") from None


class SiDAPhases(SiDPhases):
    """SiDA's two updates: the fake-score step with the discriminator loss L_D (gradients clipped to
    ``SIDA_CLIP``), the generator step with L_gan (its optimizer stepping only after ``g_start_kimg``).
    Holds the real images, the augmentation, the discriminator tap and SiDA's metrics."""

    clip = SIDA_CLIP

    def __init__(self, cfg, teacher, fake, batch: MicroBatch, conditioner=None, data=None, rank: int = 0,
                 world: int = 1, recipe=None):
        """``fake``: the fake score (its signature says whether it can be told about augmentation); ``data``:
        the real images (default option ``data``), of which this process reads share ``rank`` of ``world``."""
        super().__init__(cfg, teacher, batch, conditioner, recipe=recipe, fake=fake)
        cfg = self.cfg
        # SiDA's published recipe: EDM teachers, class labels at most, no guidance
        unsupported = [what for what, on in (("guidance", self.scales.active),
                                             ("text prompts", self.conditioning.prompts),
                                             ("a flow-matching teacher", self.flow),
                                             (cfg.option("fsdp"), cfg.fsdp)) if on]
        if unsupported:
            raise ValueError(f"{cfg.option('method')} {cfg.method} does not combine with "
                             f"{', '.join(unsupported)} yet; use {cfg.option('method')} sid for them")
        # the loss scales are applied inside the losses (the terms have their own)
        self.loss_scale_fake = 1.0
        self.loss_scale_g = 1.0
        self.real_data = self._open_real_data(data, rank, world)
        self.nimg = 0
        self._sums: dict = {}  # metrics summed since the last record
        self._summed = 0
        self._g_steps = 0  # iterations since the last record in which the generator's optimizer stepped
        self._gan_steps = 0  # ... and stepped with the GAN term in its loss

    def _open_real_data(self, data, rank: int, world: int) -> RealData:
        """SiDA's real images (``distill(data=...)``, else option ``data``), this rank's share, checked
        against the teacher's image shape and classes."""
        cfg = self.cfg
        b = self.batch
        data = cfg.data if data is None else data
        if data is None:
            raise ValueError(f"{cfg.option('method')} {cfg.method} trains on real images: pass "
                             f"{cfg.option('data')} PATH (a folder of images, a dataset.zip, an .npz/.npy or "
                             ".pt file; docs/data.md)")
        shape = tuple(b.image_shape)
        if len(shape) != 3 or shape[0] not in (1, 3):
            raise ValueError(f"{cfg.option('data')}: real images are C x H x W with 1 or 3 channels, but the "
                             f"teacher's samples have shape {shape}")
        real = RealData(data, b.size, rank=rank, world=world, seed=cfg.seed, shape=shape,
                        num_classes=b.num_classes or None)
        if not b.num_classes and real.source.has_labels:
            warnings.warn(f"{cfg.option('data')}: the real images have class labels, but the teacher is "
                          "unconditional: the labels are ignored (a class-conditional teacher needs "
                          f"{cfg.option('num_classes')} or a network with class labels)", DataWarning,
                          stacklevel=2)
        return real

    def begin(self, iteration: int, nimg: int) -> None:
        super().begin(iteration, nimg)
        self.nimg = nimg
        self._summed += 1
        self._g_steps += self.updates_generator
        self._gan_steps += self.updates_generator and self.gan_on

    @property
    def updates_generator(self) -> bool:
        """The generator's optimizer steps only after ``g_start_kimg`` thousand images, as published."""
        return self.nimg > self.cfg.g_start_kimg * 1000

    @property
    def gan_on(self) -> bool:
        """The GAN term is in the generator's loss only after ``gan_start_kimg`` thousand images, as published."""
        return self.nimg > self.cfg.gan_start_kimg * 1000

    def closed_gates(self, last_nimg: int) -> list[str]:
        """The warm-up gates still closed at the iteration that starts at ``last_nimg`` images (the last of a
        run): one phrase each, naming the gate, where it opens and the option that moves it."""
        cfg = self.cfg
        gates = (("the generator's optimizer steps", "g_start_kimg"), ("the GAN term joins the generator loss",
                                                                        "gan_start_kimg"))
        return [f"{what} only after {getattr(cfg, name):g} kimg ({cfg.option(name)})"
                for what, name in gates if last_nimg <= getattr(cfg, name) * 1000]

    def gate_warning(self, start_nimg: int, end_nimg: int) -> str | None:
        """One line for the start of a run that ends (at ``end_nimg`` images) before a warm-up gate opens."""
        last = end_nimg - self.cfg.batch
        if end_nimg <= start_nimg or not self.closed_gates(last):
            return None
        frozen = self.closed_gates(last)[0].startswith("the generator's")
        effect = ("the generator never trains (its weights stay as they start)" if frozen else
                  "the generator trains on the SiD loss alone")
        return (f"warning: this run ends at {end_nimg / 1000:g} kimg, but {'; '.join(self.closed_gates(last))}: "
                f"{effect}; lower the option to start sooner")

    def summary_notes(self, end_nimg: int) -> dict:
        """summary.json's note of the gates a finished run (at ``end_nimg`` images) never opened."""
        closed = self.closed_gates(end_nimg - self.cfg.batch)
        return {"generator_trained": not any(g.startswith("the generator's") for g in closed),
                **({"gates_not_reached": "; ".join(closed)} if closed else {})}

    # ---- the two updates (docs/math.md, "SiDA losses") ----
    def fake_score_loss(self, scores, generator, scale: float) -> tuple[torch.Tensor, torch.Tensor]:
        """The fake-score loss and the discriminator loss L_D of fresh samples and real images given the same
        sigma and noise: (L_psi, scale * (loss_scale_fake L_psi + loss_scale_d L_D))."""
        cfg = self.cfg
        real, labels = self._real_batch()
        with torch.no_grad():  # published: the generator draws for the real batch's labels
            x_g, labels, gen_cond = self.generate(generator, labels=labels)
        sigma = self._fake_sigma()
        # the published order: augment x_g, draw the noise, augment the real images
        x_g, cond = self._augmented(x_g)
        cond = {**gen_cond, **cond}
        noise = torch.randn_like(x_g) if noise_source(cfg.noise, x_g) == "torch" else None
        x_t, seed = edm_noised(x_g, sigma, noise)
        eps = noise if noise is not None else regenerate_noise(seed, x_g.shape).to(x_g.dtype)
        real, real_cond = self._augmented(real)
        x_real_t, _ = edm_noised(real, sigma, eps)
        pred, d_fake, d_real = scores.fake_score_with_logits(x_t, x_real_t, sigma, labels, real_cond, **cond)
        pred = pred.float()
        # published: samples with NaN in x_g, the prediction or either logits are dropped from both losses
        loss_d = sida_discriminator_loss(d_real, d_fake, sigma, cfg.sigma_data, x_g=x_g, y_fake=pred)
        pred, x0 = drop_nan_samples(pred, x_g, d_fake, d_real)
        loss = self._denoising_loss(pred, x0, noise, sigma, seed)
        self._note(loss_d=loss_d, logit_real=d_real.mean(), logit_fake=d_fake.mean())
        return loss, scale * (cfg.loss_scale_fake * loss + cfg.loss_scale_d * loss_d)

    def generator_loss(self, scores, generator, generator_no_grad, scale: float):
        """L_sid and L_gan of fresh samples, the logits from the same fake-score forward as f_psi:
        (L_sid, scale * loss), loss = loss_scale_g L_sid, mixed with loss_scale_gan L_gan once more than
        gan_start_kimg thousand images were seen."""
        cfg = self.cfg
        # published: the labels of the next real batch (the loader's class frequencies); images unused
        labels = self._real_labels() if cfg.gen_labels == "data" else None
        x_g, labels, _, sigma, noise = self.generator_batch(generator, generator_no_grad, labels)
        y_real, y_fake, logits = scores.generator_terms_with_logits(x_g, sigma, labels, noise=noise)
        loss_sid, loss_gan = sida_generator_loss(y_real.float(), y_fake.float(), x_g, logits, cfg.sid_alpha)
        loss = cfg.loss_scale_g * loss_sid
        if self.gan_on:
            loss = SIDA_MIX * loss + (1 - SIDA_MIX) * cfg.loss_scale_gan * loss_gan
        self._note(loss_gan=loss_gan)
        return loss_sid, scale * loss

    # ---- their parts ----
    def _real_batch(self):
        """The next real micro-batch of this rank and its labels in the networks' format (None for an
        unconditional teacher)."""
        b = self.batch
        images, idx = next(self.real_data)
        images = images.to(b.device, non_blocking=True)
        if not b.num_classes:
            return images, None
        return images, format_labels(idx.to(b.device), b.num_classes, b.label_format, check=False)

    def _real_labels(self):
        """The labels of the next real micro-batch of this rank in the networks' format, its images not
        decoded (None for an unconditional teacher; the stream advances either way, as the published loop
        draws a batch)."""
        b = self.batch
        idx = self.real_data.next_labels()
        if not b.num_classes:
            return None
        return format_labels(idx.to(b.device), b.num_classes, b.label_format, check=False)

    def _note(self, **values: torch.Tensor) -> None:
        """Add one micro-batch's metrics (detached, averaged over the micro-batches of an update)."""
        for name, value in values.items():
            value = value.detach().float() / self.batch.rounds
            self._sums[name] = value if name not in self._sums else self._sums[name] + value

    def take_metrics(self) -> dict:
        """SiDA's metrics averaged over the iterations since the last call."""
        out = {name: float(total) / max(self._summed, 1) for name, total in self._sums.items()}
        self._sums = {}
        self._summed = 0
        return out

    def metrics_state(self) -> dict:
        return {"sums": dict(self._sums), "summed": self._summed, "g_steps": self._g_steps,
                "gan_steps": self._gan_steps}

    def load_metrics_state(self, state: dict | None, device) -> None:
        if not state:
            return
        self._sums = {name: value.to(device) for name, value in state["sums"].items()}
        self._summed, self._g_steps, self._gan_steps = state["summed"], state["g_steps"], state["gan_steps"]

    def add_metrics(self, record: dict) -> dict:
        """``record`` with SiDA's metrics; a generator loss no optimizer step used in the window (before the
        gates: ``loss_g`` before g_start_kimg, ``loss_gan`` before gan_start_kimg too) moves to
        ``<name>_not_applied``, so that logs and plots show only losses the generator trained on."""
        stepped, gan = self._g_steps, self._gan_steps
        self._g_steps = self._gan_steps = 0
        record.update(self.take_metrics())
        for name, applied in (("loss_g", stepped), ("loss_gan", gan)):
            if not applied and name in record:
                record[name + NOT_APPLIED] = record.pop(name)
        return record


__all__ = ["SiDAPhases", "SIDA_METRICS", "read_init_generator"]
