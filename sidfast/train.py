"""The SiD training loop: ``distill(TrainConfig(...), teacher) -> DistillResult``.

One iteration, as the published ``sid_training_loop.py`` runs it (``docs/math.md``, "Published recipe"):
the fake score takes an EDM denoising step on fresh generator samples x_g = G(sigma_init z, sigma_init), drawn
without gradient ("Fake-score loss"); the generator takes a step on the SiD loss of new fresh samples, with
gradients into its own parameters only ("SiD generator loss"); the EMA of the generator follows EDM's formula.
Gradients are summed over ``batch_gpu`` micro-batches, scaled by loss_scale / batch, and nan_to_num'd.
The noise eps of both updates comes from ``torch.randn`` or from the fused noising kernel (option ``noise``;
``sidfast.ops.noise``): the kernel draws it from a seed taken from torch's RNG, so runs stay reproducible,
and the fused fake-score loss regenerates it from that seed instead of storing it.
SiDA and SiD2A (option ``method``; Zhou et al., ICLR 2025, "Adversarial Score identity Distillation";
``docs/math.md``, "SiDA losses"): the fake-score step also trains the fake score's own encoder as a
discriminator between real images (``sidfast.data.RealData``) and generator samples given the same sigma and
noise; the generator step adds a GAN term whose logits come from the fake-score forward it already runs.
Plumbing lives in ``runtime`` (devices, processes, seeds, signals, console), ``networks`` (the three networks),
``checkpoint`` (``save_distill``/``load_distill``) and ``updates`` (EMA, gradient sanitizing).
"""
from __future__ import annotations

import contextlib
import dataclasses
import inspect
import json
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Optional

import torch
from torch import nn

from . import reference, runtime
from .augment import AugmentPipe
from .checkpoint import CheckpointError, load_checkpoint, load_distill, save_distill, teacher_reference
from .config import CHECKPOINT_NAME, PRECISIONS, TrainConfig
from .data import RealData
from .denoisers import _modules_of, draw_labels, format_labels
from .discriminator import DiscriminatorPass, DiscriminatorTap
from .engine import edm_noised
from .loss import fake_score_loss, sid_generator_loss, sida_discriminator_loss, sida_generator_loss
from .networks import build_networks, init_from_sid
from .ops import backend
from .ops.noise import regenerate_noise
from .report import save_grid
from .runtime import resolve_device, seed_everything
from .schedules import broadcast
from .updates import _nan_to_num_, ema_beta, sanitize_grads, update_ema


# SiDA's generator loss once the GAN term is on: SIDA_MIX * loss_scale_g * L_sid + (1 - SIDA_MIX) *
# loss_scale_gan * L_gan (published 0.5 / 0.5); and the value the fake score's gradients are clipped to.
SIDA_MIX = 0.5
SIDA_CLIP = 1.0
METHOD_NAMES = {"sid": "SiD", "sida": "SiDA", "sid2a": "SiD2A"}
SIDA_METRICS = ("loss_d", "loss_gan", "logit_real", "logit_fake")


def noise_source(option: str, x: torch.Tensor) -> str:
    """Where the trainer's eps for data like ``x`` comes from under option ``noise``: "kernel" (the fused
    noising kernel's Philox stream; its PyTorch reference off the Triton route) or "torch" (torch.randn)."""
    if option == "kernel" or (option == "auto" and backend.use_triton(x)):
        return "kernel"
    return "torch"


@dataclass
class DistillResult:
    generator: nn.Module
    generator_ema: nn.Module
    fake: nn.Module
    iteration: int
    nimg: int
    seconds: float
    interrupted: Optional[str]  # None, "SIGINT", "SIGTERM" or "callback"
    checkpoint: Optional[Path]
    run_dir: Path
    summary: dict
    last: dict  # the last metrics record


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


class _Trainer:
    """The networks, optimizers and counters of one SiD run, and its iteration (``step``)."""

    def __init__(self, cfg: TrainConfig, teacher, generator, fake, callbacks, architecture, data=None):
        cfg.validate()
        cfg.check_method()
        self.cfg = cfg
        self.callbacks = list(callbacks or ())
        self.architecture = architecture
        self.dist = runtime.init_distributed(cfg.device)
        self.rank0 = self.dist.rank == 0
        self.device = resolve_device(cfg.device, self.dist.local_rank)
        self.run_dir = Path(cfg.run_dir)
        self.ckpt_path = self.run_dir / CHECKPOINT_NAME
        self.resume_path = None
        if cfg.resume is not None:
            self.resume_path = self.ckpt_path if cfg.resume == "auto" else Path(cfg.resume)
        elif self.ckpt_path.exists() and not cfg.overwrite:
            raise ValueError(f"run directory {str(self.run_dir)!r} already holds {CHECKPOINT_NAME}; pass "
                             f"{cfg.option('resume')} to continue it, {cfg.option('overwrite')} to start "
                             f"afresh, or choose another {cfg.option('run_dir')}")
        # read before any network is touched, so that a bad file costs nothing
        self.state = load_checkpoint(self.resume_path, "distill") if self.resume_path else None
        init = self._read_init_generator() if self.state is None else None
        nets = build_networks(cfg, teacher, generator, fake, self.device)
        self.teacher = nets.teacher
        self.generator = nets.generator
        self.generator_ema = nets.generator_ema
        self.fake = nets.fake
        self.image_shape = nets.image_shape
        self.num_classes = nets.num_classes
        self.label_format = nets.label_format
        self.g_params = nets.trainable(self.generator)
        self.fake_params = nets.trainable(self.fake)
        self.batch_rank, self.batch_gpu, self.rounds = cfg.split_batch(self.dist.world)
        if init is not None:
            init_from_sid(self.generator, self.generator_ema, init, cfg.init_generator)
        self.real_data = self._open_real_data(data)
        self.augment = self._augment_pipe()
        self._sums: dict = {}  # SiDA's extra metrics summed since the last record
        self._summed = 0

        fused = {"fused": True} if self.device.type == "cuda" else {}  # one kernel per step on CUDA
        adam = dict(betas=cfg.betas, eps=cfg.optimizer_eps, **fused)
        self.opt_g = torch.optim.Adam(self.g_params, lr=cfg.lr, **adam)
        self.opt_fake = torch.optim.Adam(self.fake_params, lr=cfg.fake_lr or cfg.lr, **adam)
        self.iteration = 0
        self.nimg = 0
        seed_everything(cfg.seed, self.dist.rank, self.dist.world)
        if self.state is not None:
            self.iteration, self.nimg = load_distill(self.state, self.resume_path, cfg, self.networks(),
                                                     self.optimizers(), self.dist, self.device)
            if self.real_data is not None and self.state.get("real_data") is not None:
                self.real_data.load_state_dict(self.state["real_data"])
        self._wrap_networks()

    def _wrap_networks(self) -> None:
        """The score engine, DDP wrappers and torch.compile around the networks the optimizers update."""
        cfg = self.cfg
        self.engine = None
        if cfg.engine == "fused":
            from .engine import ScoreEngine

            # teacher and fake score evaluated together over frozen views of the same storage (CUDA graphs on
            # GPU); a LoRA fake score runs as one forward of the shared weights over the doubled batch
            amp_dtype = runtime.AUTOCAST_DTYPES[cfg.precision]
            self.engine = ScoreEngine.over(self.teacher, self.fake, amp_dtype=amp_dtype, compile=cfg.compile)
        self.generator_train = self.generator
        self.fake_train = self.fake
        if cfg.adversarial:
            self._wrap_discriminator()
        if self.dist.enabled:
            self.generator_train = runtime.ddp(self.generator, self.device)
            self.fake_train = runtime.ddp(self.fake_train, self.device)
        self.generator_sample = self.generator
        self.nan_to_num = None
        if cfg.compile:  # the generator's train and no-grad specializations, and the eager fake-score path
            self.generator_train = torch.compile(self.generator_train)
            self.generator_sample = torch.compile(self.generator)
            if self.engine is None or self.dist.enabled:
                self.fake_train = torch.compile(self.fake_train)
            self.nan_to_num = torch.compile(_nan_to_num_)

    def _wrap_discriminator(self) -> None:
        """SiDA: the tap that reads the discriminator's logits off the fake score (the engine's, which it also
        puts on the generator phase's frozen view), and the fake-score step as one module call, f_psi and
        D_fake at x_t and D_real at the real images (``DiscriminatorPass``: one forward per DDP backward)."""
        if self.engine is not None:
            self.tap = self.engine.attach_discriminator(self.cfg.disc_layer)
        else:
            self.tap = DiscriminatorTap(self.fake, self.cfg.disc_layer)
        self.fake_train = DiscriminatorPass(self.tap)

    def _read_init_generator(self) -> dict | None:
        """SiD2A: the SiD checkpoint named by ``init_generator``, read before any network is touched."""
        if self.cfg.method != "sid2a":
            return None
        try:
            return load_checkpoint(self.cfg.init_generator, "distill")
        except CheckpointError as exc:
            raise CheckpointError(f"{self.cfg.option('init_generator')}: {exc}") from None

    def _open_real_data(self, data) -> RealData | None:
        """SiDA's real images (``distill(data=...)``, else option ``data``), this rank's share, checked
        against the teacher's image shape and classes."""
        cfg = self.cfg
        if not cfg.adversarial:
            if data is not None:
                raise ValueError(f"real images are for {cfg.option('method')} sida or sid2a; "
                                 f"{cfg.option('method')} sid is data-free")
            return None
        data = cfg.data if data is None else data
        if data is None:
            raise ValueError(f"{cfg.option('method')} {cfg.method} trains on real images: pass "
                             f"{cfg.option('data')} PATH (a folder of images, a dataset.zip, an .npz/.npy or "
                             ".pt file; docs/data.md)")
        shape = tuple(self.image_shape)
        if len(shape) != 3 or shape[0] not in (1, 3):
            raise ValueError(f"{cfg.option('data')}: real images are C x H x W with 1 or 3 channels, but the "
                             f"teacher's samples have shape {shape}")
        return RealData(data, self.batch_gpu, rank=self.dist.rank, world=self.dist.world, seed=cfg.seed,
                        shape=shape, num_classes=self.num_classes or None)

    def _augment_pipe(self) -> AugmentPipe | None:
        cfg = self.cfg
        if not cfg.adversarial or cfg.augment_p == 0:
            return None
        if not takes_augment_labels(self.fake):
            raise ValueError(f"{cfg.option('augment_p')} {cfg.augment_p}: the fake score takes no "
                             "augment_labels, so it could not tell augmented images from real ones (EDM's "
                             "augmentation is non-leaking only for networks conditioned on it, e.g. "
                             "augment_dim=9); use 0")
        return AugmentPipe(cfg.augment_p)

    def networks(self) -> dict:
        return {"generator": self.generator, "generator_ema": self.generator_ema, "fake": self.fake}

    def optimizers(self) -> dict:
        return {"opt_g": self.opt_g, "opt_fake": self.opt_fake}

    def save(self, last: dict) -> Path | None:
        return save_distill(self.ckpt_path, self.cfg, self.networks(), self.optimizers(), self.iteration,
                            self.nimg, self.dist, self.device, architecture=self.architecture,
                            image_shape=list(self.image_shape), num_classes=self.num_classes,
                            label_format=self.label_format, last=last,
                            **({"real_data": self.real_data.state_dict()} if self.real_data else {}))

    # ---- one iteration ----
    def step(self) -> tuple[torch.Tensor, torch.Tensor]:
        cfg = self.cfg
        # Update the fake score.
        self.generator.eval()
        self.fake.train()
        if cfg.adversarial:  # and its encoder as the discriminator; gradients clipped as published
            loss_fake = self._accumulate(self.fake_params, self.opt_fake, self.fake_train, 1.0,
                                         self._sida_fake_loss, clip=SIDA_CLIP)
        else:
            loss_fake = self._accumulate(self.fake_params, self.opt_fake, self.fake_train, cfg.loss_scale_fake,
                                         self._fake_score_loss)
        # Update the generator.
        self.generator.train()
        self.fake.eval()
        if cfg.adversarial:  # the optimizer steps only after g_start_kimg, as published
            loss_g = self._accumulate(self.g_params, self.opt_g, self.generator_train, 1.0,
                                      self._sida_generator_loss, update=self.nimg > cfg.g_start_kimg * 1000)
            self._summed += 1
        else:
            loss_g = self._accumulate(self.g_params, self.opt_g, self.generator_train, cfg.loss_scale_g,
                                      self._generator_loss)
        # Update EMA.
        beta = ema_beta(self.nimg, cfg.batch, cfg.ema_halflife_kimg, cfg.ema_rampup_ratio)
        update_ema(self.generator_ema, self.generator, beta)
        self.nimg += cfg.batch
        self.iteration += 1
        return loss_g, loss_fake

    def _accumulate(self, params, optimizer, ddp_net, loss_scale, micro_batch_loss, clip: float | None = None,
                    update: bool = True) -> torch.Tensor:
        """One optimizer step on ``rounds`` micro-batches; each backpropagates loss * loss_scale / rounds into
        ``params`` only (the score networks pass input gradients), DDP averaging on the last.
        ``micro_batch_loss(scale)`` returns (loss, scale * loss to backpropagate). ``clip``: clip the
        gradients' values to [-clip, clip] after nan_to_num; ``update`` False: gradients computed, no step.
        Returns the mean loss (detached)."""
        optimizer.zero_grad(set_to_none=True)
        total = torch.zeros((), device=self.device)
        for r in range(self.rounds):
            defer_sync = self.dist.enabled and r < self.rounds - 1
            with ddp_net.no_sync() if defer_sync else contextlib.nullcontext():
                loss, scaled = micro_batch_loss(loss_scale / self.rounds)
                scaled.backward(inputs=params)
                total = total + loss.detach() / self.rounds
        sanitize_grads(params, self.nan_to_num)
        if clip is not None:
            torch.nn.utils.clip_grad_value_(params, clip)
        if update:
            optimizer.step()
        return total

    def _generate(self, net, labels=None):
        z = torch.randn((self.batch_gpu, *self.image_shape), device=self.device)
        if labels is None:
            labels = draw_labels(self.batch_gpu, self.num_classes, self.label_format, self.device)
        sigma = torch.full((self.batch_gpu,), self.cfg.sigma_init, device=self.device)
        with runtime.autocast(self.device, self.cfg.precision):
            x_g = net(self.cfg.sigma_init * z, sigma, labels)
        return x_g.float(), labels

    def _fake_score_loss(self, scale: float) -> tuple[torch.Tensor, torch.Tensor]:
        """EDM's denoising loss of the fake score at fresh samples (``docs/math.md``, "Fake-score loss"):
        (loss, scale * loss)."""
        cfg = self.cfg
        with torch.no_grad():
            x_g, labels = self._generate(self.generator_sample)
        sigma = reference.edm_training_sigma(self.batch_gpu, cfg.p_mean, cfg.p_std, device=self.device)
        # kernel noise: the loss regenerates eps from the seed that drew it
        noise = torch.randn_like(x_g) if noise_source(cfg.noise, x_g) == "torch" else None
        x_t, seed = edm_noised(x_g, sigma, noise)
        if self.engine is not None and not self.dist.enabled:
            pred = self.engine.fake_score_forward(x_t, sigma, labels)
        else:  # DDP: the wrapper's hooks average the fake score's gradients
            with runtime.autocast(self.device, cfg.precision):
                pred = self.fake_train(x_t, sigma, labels)
        pred = pred.float()
        # published: samples with NaN in x_g or the prediction are dropped from the loss
        keep = broadcast(~reference.nan_rows(pred, x_g), x_g)
        pred = torch.where(keep, pred, 0.0)
        x0 = torch.where(keep, x_g, 0.0)
        loss = fake_score_loss(pred, x0, noise, 1.0, sigma, prediction="x0", weighting="edm",
                               sigma_data=cfg.sigma_data, reduction="batchmean", seed=seed)
        return loss, loss * scale

    def _generator_loss(self, scale: float) -> tuple[torch.Tensor, torch.Tensor]:
        """The SiD loss of fresh samples (``docs/math.md``, "SiD generator loss"), fp32: (loss, scale * loss),
        the scale folded into the fused loss so that backward needs no scaling pass."""
        cfg = self.cfg
        x_g, labels = self._generate(self.generator_train)
        sigma = reference.generator_sigma(self.batch_gpu, cfg.tmax, cfg.sigma_min, cfg.sigma_max, cfg.rho,
                                          device=self.device)
        noise = torch.randn_like(x_g) if noise_source(cfg.noise, x_g) == "torch" else None
        if self.engine is not None:
            y_real, y_fake = self.engine.generator_terms(x_g, sigma, labels, noise=noise)
        else:
            x_t, _ = edm_noised(x_g, sigma, noise)
            with runtime.autocast(self.device, cfg.precision):
                y_real = self.teacher(x_t, sigma, labels)
                y_fake = self.fake(x_t, sigma, labels)
        scaled = sid_generator_loss(y_real.float(), y_fake.float(), x_g, cfg.sid_alpha, reduction="batchmean",
                                    loss_scale=scale)
        # the reported loss: the scale divided back out of the 0-dim result (the unscaled loss within float32
        # rounding; no pass over the data)
        return scaled.detach() / scale, scaled

    # ---- SiDA (docs/math.md, "SiDA losses") ----
    def _real_batch(self):
        """The next real micro-batch of this rank and its labels in the networks' format (None for an
        unconditional teacher)."""
        images, idx = next(self.real_data)
        images = images.to(self.device, non_blocking=True)
        if not self.num_classes:
            return images, None
        return images, format_labels(idx.to(self.device), self.num_classes, self.label_format, check=False)

    def _augmented(self, images):
        """EDM's augmentation of ``images`` (a fresh draw per call, as published for the real and the generated
        batch) and the conditioning that tells the fake score about it."""
        if self.augment is None:
            return images, {}
        images, augment_labels = self.augment(images)
        return images, {"augment_labels": augment_labels}

    def _sida_fake_loss(self, scale: float) -> tuple[torch.Tensor, torch.Tensor]:
        """The fake-score loss and the discriminator loss L_D of fresh samples and real images given the same
        sigma and noise: (L_psi, scale * (loss_scale_fake L_psi + loss_scale_d L_D))."""
        cfg = self.cfg
        real, labels = self._real_batch()
        with torch.no_grad():  # published: the generator draws for the real batch's labels
            x_g, labels = self._generate(self.generator_sample, labels)
        sigma = reference.edm_training_sigma(self.batch_gpu, cfg.p_mean, cfg.p_std, device=self.device)
        # the published order: augment x_g, draw the noise, augment the real images
        x_g, cond = self._augmented(x_g)
        noise = torch.randn_like(x_g) if noise_source(cfg.noise, x_g) == "torch" else None
        x_t, seed = edm_noised(x_g, sigma, noise)
        eps = noise if noise is not None else regenerate_noise(seed, x_g.shape).to(x_g.dtype)
        real, real_cond = self._augmented(real)
        x_real_t, _ = edm_noised(real, sigma, eps)
        if self.engine is not None and not self.dist.enabled:
            pred, d_fake, d_real = self.engine.fake_score_with_logits(x_t, x_real_t, sigma, labels, real_cond,
                                                                     **cond)
        else:  # DDP: the wrapper's hooks average the fake score's gradients
            with runtime.autocast(self.device, cfg.precision):
                pred, d_fake, d_real = self.fake_train(x_t, sigma, labels, x_real_t, real_cond=real_cond, **cond)
        pred = pred.float()
        # published: samples with NaN in x_g, the prediction or either logits are dropped from both losses
        loss_d = sida_discriminator_loss(d_real, d_fake, sigma, cfg.sigma_data, x_g=x_g, y_fake=pred)
        keep = broadcast(~reference.nan_rows(pred, x_g, d_fake, d_real), x_g)
        loss = fake_score_loss(torch.where(keep, pred, 0.0), torch.where(keep, x_g, 0.0), noise, 1.0, sigma,
                               prediction="x0", weighting="edm", sigma_data=cfg.sigma_data,
                               reduction="batchmean", seed=seed)
        self._note(loss_d=loss_d, logit_real=d_real.mean(), logit_fake=d_fake.mean())
        return loss, scale * (cfg.loss_scale_fake * loss + cfg.loss_scale_d * loss_d)

    def _sida_generator_loss(self, scale: float) -> tuple[torch.Tensor, torch.Tensor]:
        """L_sid and L_gan of fresh samples, the logits from the same fake-score forward as f_psi:
        (L_sid, scale * loss), loss = loss_scale_g L_sid, mixed with loss_scale_gan L_gan once more than
        gan_start_kimg thousand images were seen."""
        cfg = self.cfg
        x_g, labels = self._generate(self.generator_train)
        sigma = reference.generator_sigma(self.batch_gpu, cfg.tmax, cfg.sigma_min, cfg.sigma_max, cfg.rho,
                                          device=self.device)
        noise = torch.randn_like(x_g) if noise_source(cfg.noise, x_g) == "torch" else None
        if self.engine is not None:
            y_real, y_fake, logits = self.engine.generator_terms_with_logits(x_g, sigma, labels, noise=noise)
        else:
            x_t, _ = edm_noised(x_g, sigma, noise)
            with runtime.autocast(self.device, cfg.precision):
                y_real = self.teacher(x_t, sigma, labels)
                y_fake, logits = self.tap.forward_with_logits(x_t, sigma, labels)
        loss_sid, loss_gan = sida_generator_loss(y_real.float(), y_fake.float(), x_g, logits, cfg.sid_alpha)
        loss = cfg.loss_scale_g * loss_sid
        if self.nimg > cfg.gan_start_kimg * 1000:
            loss = SIDA_MIX * loss + (1 - SIDA_MIX) * cfg.loss_scale_gan * loss_gan
        self._note(loss_gan=loss_gan)
        return loss_sid, scale * loss

    def _note(self, **values: torch.Tensor) -> None:
        """Add one micro-batch's metrics (detached, averaged over the micro-batches of an update)."""
        for name, value in values.items():
            value = value.detach().float() / self.rounds
            self._sums[name] = value if name not in self._sums else self._sums[name] + value

    def take_metrics(self) -> dict:
        """SiDA's metrics averaged over the iterations since the last call (empty for SiD)."""
        out = {name: float(total) / max(self._summed, 1) for name, total in self._sums.items()}
        self._sums = {}
        self._summed = 0
        return out

    def run_callbacks(self, loss_g, loss_fake) -> str | None:
        state = {"iteration": self.iteration, "nimg": self.nimg, "loss_g": loss_g, "loss_fake": loss_fake,
                 "generator": self.generator, "generator_ema": self.generator_ema, "fake": self.fake,
                 "teacher": self.teacher, "rank": self.dist.rank, "world_size": self.dist.world}
        asked = [bool(cb(state)) for cb in self.callbacks]  # every callback runs
        return "callback" if any(asked) else None

    # ---- sample grids (rank 0): the same latents and labels in every grid ----
    def _grid(self, net, one_step: bool):
        from .samplers import sample_images

        cfg = self.cfg
        return sample_images(net, cfg.grid_size, self.image_shape, cfg.sigma_init if one_step else None,
                             1 if one_step else cfg.teacher_steps, self.num_classes, self.label_format,
                             seed=cfg.seed + 20240,
                             batch=cfg.grid_size, device=self.device, sigma_min=cfg.sigma_min,
                             sigma_max=cfg.sigma_max, rho=cfg.rho)

    def write_student_grid(self, name: str) -> None:
        if self.rank0 and self.cfg.grid_size:
            save_grid(self._grid(self.generator_ema, one_step=True), self.run_dir / name)

    def write_teacher_grid(self) -> None:
        path = self.run_dir / "teacher.png"
        if self.rank0 and self.cfg.grid_size and self.cfg.teacher_steps and not path.exists():
            save_grid(self._grid(self.teacher, one_step=False), path)


def distill(config: TrainConfig, teacher, generator=None, fake=None, callbacks=(),
            architecture: dict | None = None, log: Callable[[str], None] | None = print,
            data=None) -> DistillResult:
    """Run SiD (or SiDA, SiD2A: ``config.method``) from ``teacher``; a resumed CPU run reproduces the
    uninterrupted one bitwise.

    ``teacher``/``generator``/``fake``: denoisers ``forward(x, sigma, class_labels=None) -> x0_hat`` in EDM
    coordinates, or anything ``sidfast.denoisers.as_denoiser`` wraps; generator and fake score default to
    copies of the teacher, which is frozen in place. ``callbacks``: ``cb(state) -> bool | None`` after every
    iteration (keys: iteration, nimg, loss_g, loss_fake, generator, generator_ema, fake, teacher, rank,
    world_size); True stops the run like a signal does. ``architecture``: ``{"builder": "module:function",
    "config": {...}}`` that rebuilds the generator for ``sidfast sample``. ``log``: where rank 0's lines go
    (None: silent). ``data``: SiDA's real images, anything ``sidfast.data.open_images`` reads (a path, an
    image tensor or array, a torch Dataset); default ``config.data``.
    """
    from .report import MetricsLog, plot_losses, read_metrics, summary_table

    if not isinstance(config, TrainConfig):
        raise TypeError(f"config must be a sidfast.train.TrainConfig, got {type(config).__name__}")
    # a teacher given as a path is stored absolute, so that the checkpoint works from any directory
    cfg = dataclasses.replace(config, teacher=teacher_reference(config.teacher)).validate()
    trainer = _Trainer(cfg, teacher, generator, fake, callbacks, architecture, data)
    say = log if (log is not None and trainer.rank0) else None
    start_iteration = trainer.iteration
    start_time = time.perf_counter()
    resumed = trainer.state is not None
    last = dict(trainer.state.get("last") or {}) if resumed else {}
    trainer.state = None  # free the loaded tensors

    if resumed and trainer.iteration >= cfg.iterations:
        if say:
            say(f"sidfast distill: the run in {str(trainer.run_dir)!r} is complete (iteration "
                f"{trainer.iteration} of {cfg.iterations}); nothing to train, no file written. To train "
                f"longer, resume with a larger {cfg.option('iterations')}: sidfast distill "
                f"{cfg.option('resume')} {trainer.resume_path} {cfg.option('run_dir')} {cfg.run_dir} "
                f"{cfg.option('iterations')} {2 * trainer.iteration}")
        runtime.shutdown(trainer.dist)
        return _result(trainer, cfg, 0.0, start_iteration, last, trainer.resume_path, None, complete=True)

    metrics = MetricsLog(trainer.run_dir / "metrics.jsonl", enabled=trainer.rank0)
    if trainer.rank0:
        trainer.run_dir.mkdir(parents=True, exist_ok=True)
        if not resumed:
            (trainer.run_dir / "config.json").write_text(json.dumps(cfg.to_dict(), indent=2) + "\n")
            trainer.write_teacher_grid()
            trainer.write_student_grid("student_init.png")
    if say:
        say(f"sidfast distill: {trainer.dist.world} process(es) on {trainer.device}, batch {cfg.batch} "
            f"({trainer.batch_gpu} x {trainer.rounds} per process), image {trainer.image_shape}, classes "
            f"{trainer.num_classes}, " + (f"resuming at iteration {trainer.iteration} of {cfg.iterations}"
                                          if resumed else f"fresh start, {cfg.iterations} iterations"))

    progress = runtime.Progress(cfg.iterations, trainer.iteration, cfg.batch, bar=cfg.progress, log=say)
    window = runtime.LossWindow(trainer.iteration)
    checkpoint = None
    interrupted = None
    try:
        with runtime.StopRequest() as stop:
            while trainer.iteration < cfg.iterations:
                loss_g, loss_fake = trainer.step()
                window.add(loss_g, loss_fake)
                requested = trainer.run_callbacks(loss_g, loss_fake)
                done = trainer.iteration >= cfg.iterations

                # Log the losses averaged since the last record.
                record = None
                if trainer.iteration % cfg.log_every == 0 or done:
                    seconds = time.perf_counter() - start_time
                    record = window.record(trainer.iteration, trainer.nimg, cfg.batch, seconds)
                    record.update(trainer.take_metrics())
                    metrics.append(record)
                    last = record
                progress.update(record, done)
                upkeep = time.perf_counter()  # grids and checkpoints are left out of the measured speed

                # Write a sample grid.
                if cfg.sample_every and trainer.iteration % cfg.sample_every == 0 and not done:
                    trainer.write_student_grid(f"student_{trainer.iteration:06d}.png")
                    if trainer.rank0:
                        plot_losses(read_metrics(metrics.path), trainer.run_dir / "losses.png")

                # Stop when any rank got a signal or a callback asked to.
                reason = runtime.agree_stop(trainer.dist, stop.reason or requested)
                if reason is not None and not done:
                    interrupted = reason
                    break

                # Save a checkpoint.
                if cfg.checkpoint_every and trainer.iteration % cfg.checkpoint_every == 0 and not done:
                    checkpoint = trainer.save(last)
                window.start += time.perf_counter() - upkeep
            checkpoint = trainer.save(last)
    finally:
        progress.close()
        runtime.shutdown(trainer.dist)

    # Write the summary.
    seconds = time.perf_counter() - start_time
    result = _result(trainer, cfg, seconds, start_iteration, last, checkpoint, interrupted)
    if trainer.rank0:
        if interrupted is None:
            trainer.write_student_grid("student.png")
        plot_losses(read_metrics(metrics.path), trainer.run_dir / "losses.png")
        (trainer.run_dir / "summary.json").write_text(json.dumps(result.summary, indent=2) + "\n")
        if say:
            rows = [(k, v) for k, v in result.summary.items() if v is not None]
            stopped = f" (stopped by {interrupted})" if interrupted else ""
            say(summary_table(rows, f"{METHOD_NAMES[cfg.method]} distillation" + stopped))
    return result


def _result(trainer: _Trainer, cfg: TrainConfig, seconds: float, start_iteration: int, last: dict,
            checkpoint, interrupted, complete: bool = False) -> DistillResult:
    ran = trainer.iteration - start_iteration
    summary = {"iterations": trainer.iteration, "iterations_this_run": ran, "images": trainer.nimg,
               "seconds": round(seconds, 3), "it_per_s": ran / max(seconds, 1e-9),
               "img_per_s": ran * cfg.batch / max(seconds, 1e-9), "loss_g": last.get("loss_g"),
               "loss_fake": last.get("loss_fake"), "processes": trainer.dist.world,
               "device": str(trainer.device),
               "checkpoint": str(checkpoint) if checkpoint else None, "interrupted": interrupted}
    summary.update({k: last[k] for k in SIDA_METRICS if k in last})
    if complete:
        summary["complete_before_start"] = True
    return DistillResult(generator=trainer.generator, generator_ema=trainer.generator_ema, fake=trainer.fake,
                         iteration=trainer.iteration, nimg=trainer.nimg, seconds=seconds,
                         interrupted=interrupted, checkpoint=checkpoint, run_dir=trainer.run_dir,
                         summary=summary, last=last)


__all__ = ["TrainConfig", "DistillResult", "distill", "ema_beta", "update_ema", "sanitize_grads",
           "CHECKPOINT_NAME", "PRECISIONS"]
