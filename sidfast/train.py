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

from . import guidance, reference, runtime
from .augment import AugmentPipe
from .checkpoint import (CheckpointError, distill_checkpoint_in, load_checkpoint, load_distill, read_distill,
                         save_distill, teacher_reference)
from .config import CHECKPOINT_NAME, PRECISIONS, SHARDED_CHECKPOINT_NAME, TrainConfig
from .data import RealData
from .denoisers import FlowDenoiser, _modules_of, draw_labels, format_labels
from .discriminator import DiscriminatorPass, DiscriminatorTap
from .engine import edm_noised
from .generator import draw_k_star, generator_sigmas, rollout
from .loss import fake_score_loss, sid_generator_loss, sida_discriminator_loss, sida_generator_loss
from .networks import build_networks, init_from_sid
from .ops import backend
from .ops.noise import regenerate_noise
from .report import save_grid
from .runtime import resolve_device, seed_everything
from .sharding import LoRAOff, checkpoint_blocks, fully_shard_network
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

    def __init__(self, cfg: TrainConfig, teacher, generator, fake, callbacks, architecture, data=None,
                 conditioner=None):
        cfg.validate()
        cfg.check_method()
        self.cfg = cfg
        self.callbacks = list(callbacks or ())
        self.architecture = architecture
        self.dist = runtime.init_distributed(cfg.device, group_always=cfg.fsdp)
        self.rank0 = self.dist.rank == 0
        self.device = resolve_device(cfg.device, self.dist.local_rank)
        self.run_dir = Path(cfg.run_dir)
        self.ckpt_path = self.run_dir / (SHARDED_CHECKPOINT_NAME if cfg.fsdp else CHECKPOINT_NAME)
        self.resume_path = None
        held = [name for name in (CHECKPOINT_NAME, SHARDED_CHECKPOINT_NAME) if (self.run_dir / name).exists()]
        if cfg.resume is not None:
            self.resume_path = (distill_checkpoint_in(self.run_dir, cfg.fsdp) if cfg.resume == "auto"
                                else Path(cfg.resume))
        elif held and not cfg.overwrite:
            raise ValueError(f"run directory {str(self.run_dir)!r} already holds {held[0]}; pass "
                             f"{cfg.option('resume')} to continue it, {cfg.option('overwrite')} to start "
                             f"afresh, or choose another {cfg.option('run_dir')}")
        # read before any network is touched, so that a bad file costs nothing
        self.state = read_distill(self.resume_path) if self.resume_path else None
        init = self._read_init_generator() if self.state is None else None
        nets = build_networks(cfg, teacher, generator, fake, self.device)
        self.teacher = nets.teacher
        self.generator = nets.generator
        self.generator_ema = nets.generator_ema
        self.fake = nets.fake
        self.image_shape = nets.image_shape
        self.num_classes = nets.num_classes
        self.label_format = nets.label_format
        self._shard_networks()
        self.g_params = nets.trainable(self.generator)
        self._setup_recipe(conditioner)
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
        # before DDP copies rank 0's weights to every rank; under FSDP into the shards (DCP reads each rank's
        # part, whatever the number of processes that wrote the checkpoint)
        if self.state is not None:
            self.iteration, self.nimg = load_distill(self.state, self.resume_path, cfg, self.networks(),
                                                     self.optimizers(), self.dist, self.device)
            if self.real_data is not None and self.state.get("real_data") is not None:
                self.real_data.load_state_dict(self.state["real_data"])
        self._wrap_networks()

    def _shard_networks(self) -> None:
        """Activation checkpointing per block, and FSDP sharding (in place: each network's parameters become
        this rank's shards, so before the optimizers take them)."""
        cfg = self.cfg
        if cfg.activation_checkpointing:
            for net in self._distinct_networks():
                checkpoint_blocks(net)
        if cfg.fsdp:
            if cfg.fake_score == "lora":  # the teacher's weights live once, sharded, in the fake score
                self.teacher = LoRAOff(self.fake)
            for net in self._distinct_networks():
                fully_shard_network(net, cfg.fsdp_precision)

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
        if self.dist.enabled and not cfg.fsdp:
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

    def _setup_recipe(self, conditioner) -> None:
        """Guidance scales, conditions, the few-step generator's levels and the teacher's loss conventions."""
        cfg = self.cfg
        self.scales = cfg.guidance_scales()
        self.sigmas = generator_sigmas(cfg.gen_steps, cfg.sigma_init, cfg.step_spacing)
        self.k_star = 1
        # flow-matching teachers: velocity loss for the fake score, SiD-DiT's 1 - t weighting by default
        self.flow = isinstance(self.teacher, FlowDenoiser)
        weighting = cfg.generator_weighting
        self.weighting = ("1-t" if self.flow else "sid") if weighting == "auto" else weighting
        setup = _Conditioning(cfg, self.teacher, conditioner, self.num_classes, self.label_format,
                              self.scales, self.device)
        self.conditioner = setup.conditioner
        self.prompts = setup.prompts
        self.null = setup.null
        if cfg.adversarial:  # SiDA's published recipe: EDM teachers, class labels at most, no guidance
            unsupported = [what for what, on in (("guidance", self.scales.active), ("text prompts", self.prompts),
                                                 ("a flow-matching teacher", self.flow),
                                                 (cfg.option("fsdp"), cfg.fsdp)) if on]
            if unsupported:
                raise ValueError(f"{cfg.option('method')} {cfg.method} does not combine with "
                                 f"{', '.join(unsupported)} yet; use {cfg.option('method')} sid for them")

    def _distinct_networks(self) -> list[nn.Module]:
        """The networks that own their weights: a LoRA fake score holds the teacher's."""
        nets = [self.generator, self.generator_ema, self.fake]
        return nets if isinstance(self.teacher, LoRAOff) else nets + [self.teacher]

    def networks(self) -> dict:
        return {"generator": self.generator, "generator_ema": self.generator_ema, "fake": self.fake}

    def optimizers(self) -> dict:
        return {"opt_g": self.opt_g, "opt_fake": self.opt_fake}

    def save(self, last: dict) -> Path | None:
        return save_distill(self.ckpt_path, self.cfg, self.networks(), self.optimizers(), self.iteration,
                            self.nimg, self.dist, self.device, architecture=self.architecture,
                            image_shape=list(self.image_shape), num_classes=self.num_classes,
                            label_format=self.label_format, gen_steps=self.cfg.gen_steps,
                            step_spacing=self.cfg.step_spacing, renoise=self.cfg.renoise, last=last,
                            **({"real_data": self.real_data.state_dict()} if self.real_data else {}))

    # ---- one iteration ----
    def step(self) -> tuple[torch.Tensor, torch.Tensor]:
        cfg = self.cfg
        # The generator steps of this iteration's samples, the same in both phases and on every rank.
        self.k_star = draw_k_star(cfg.gen_steps, self.iteration, cfg.seed)
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
            if self.cfg.fsdp:
                # gradients reach FSDP's all-gathered copies of the parameters, not the shards in ``params``,
                # so backward goes into every trainable weight on its path: in the generator's update also
                # the fake score's, which its own update clears with zero_grad before it accumulates
                ddp_net.set_requires_gradient_sync(not defer_sync)
                loss, scaled = micro_batch_loss(loss_scale / self.rounds)
                scaled.backward()
                total = total + loss.detach() / self.rounds
                continue
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

    def _generate(self, net, net_no_grad=None, dropout: float = 0.0, labels=None):
        """Generator samples of k* steps (``generator.rollout``; k* = 1: x_g = G(sigma_init z, sigma_init))
        with their labels and keyword conditions; ``dropout``: probability of the null condition per sample,
        applied before generating so that a dropped sample is generated and denoised without its condition;
        ``labels``: the class labels to generate for (SiDA: the real batch's), else drawn."""
        z = torch.randn((self.batch_gpu, *self.image_shape), device=self.device)
        if labels is None:
            labels, cond = self._conditions(self.batch_gpu)
        else:
            cond = {}
        if dropout:
            labels, cond = _split(guidance.drop_condition(_joined(labels, cond), self.null, dropout))
        with runtime.autocast(self.device, self.cfg.precision):
            x_g = rollout(net, z, labels, self.sigmas, self.k_star, self.cfg.renoise, G_no_grad=net_no_grad,
                          cond=cond)
        return x_g.float(), labels, cond

    def _conditions(self, batch: int) -> tuple:
        """(class labels or None, keyword conditions) of ``batch`` samples: uniform labels, or prompts drawn
        from the prompt file and embedded by the text encoders (cached per prompt)."""
        labels = draw_labels(batch, self.num_classes, self.label_format, self.device)
        if self.conditioner is None:
            return labels, {}
        from .text import draw_prompts

        return labels, _to_device(self.conditioner.condition(draw_prompts(self.prompts, batch)), self.device)

    def _fake_prediction(self, x_t, sigma, labels, cond) -> torch.Tensor:
        """The fake score at x_t, guided at k1 (``guidance.guided``), with gradients into its parameters."""
        cfg = self.cfg
        k1 = self.scales.k1
        if self.engine is not None and not self.dist.enabled:
            null_labels, null_cond = _split(self.null)
            return self.engine.fake_score_forward(x_t, sigma, labels, scale=k1, null_labels=null_labels,
                                                  null_cond=null_cond, **cond)
        # DDP: the wrapper's hooks average the fake score's gradients
        with runtime.autocast(self.device, cfg.precision):
            return guidance.guided(self.fake_train, x_t, sigma, _joined(labels, cond), self.null, k1)

    def _fake_sigma(self) -> torch.Tensor:
        """Noise levels of the fake-score loss: EDM's ln sigma ~ N(p_mean, p_std^2); for flow-matching
        teachers the logit-normal t of their training (Esser et al. 2024, SD3), i.e. ln sigma = logit(t) ~
        N(mean, std^2)."""
        cfg = self.cfg
        if self.flow:
            return reference.edm_training_sigma(self.batch_gpu, cfg.flow_logit_mean, cfg.flow_logit_std,
                                                device=self.device)
        return reference.edm_training_sigma(self.batch_gpu, cfg.p_mean, cfg.p_std, device=self.device)

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
        k2 = self.scales.k2
        k4 = self.scales.k4
        if self.engine is not None:
            null_labels, null_cond = _split(self.null)
            return self.engine.generator_terms(x_g, sigma, labels, noise=noise, scale_real=k4, scale_fake=k2,
                                               null_labels=null_labels, null_cond=null_cond, **cond)
        x_t, _ = edm_noised(x_g, sigma, noise)
        joined = _joined(labels, cond)
        with runtime.autocast(self.device, self.cfg.precision):
            y_real = guidance.guided(self.teacher, x_t, sigma, joined, self.null, k4)
            y_fake = guidance.guided(self.fake, x_t, sigma, joined, self.null, k2)
        return y_real, y_fake

    def _sid_loss(self, y_real, y_fake, x_g, sigma, scale: float) -> torch.Tensor:
        """scale times the SiD loss, weighted per sample by 1/w (the fused loss) or by 1 - t."""
        if self.weighting == "sid":
            return sid_generator_loss(y_real, y_fake, x_g, self.cfg.sid_alpha, reduction="batchmean",
                                      loss_scale=scale)
        return weighted_sid_loss(y_real, y_fake, x_g, self.cfg.sid_alpha, 1 / (1 + sigma), scale)

    def _fake_score_loss(self, scale: float) -> tuple[torch.Tensor, torch.Tensor]:
        """EDM's denoising loss of the fake score at fresh samples (``docs/math.md``, "Fake-score loss"):
        (loss, scale * loss)."""
        cfg = self.cfg
        with torch.no_grad():
            x_g, labels, cond = self._generate(self.generator_sample, dropout=self.scales.condition_dropout)
        sigma = self._fake_sigma()
        # kernel noise: the loss regenerates eps from the seed that drew it
        noise = torch.randn_like(x_g) if noise_source(cfg.noise, x_g) == "torch" else None
        x_t, seed = edm_noised(x_g, sigma, noise)
        pred = self._fake_prediction(x_t, sigma, labels, cond).float()
        # published: samples with NaN in x_g or the prediction are dropped from the loss
        keep = broadcast(~reference.nan_rows(pred, x_g), x_g)
        pred = torch.where(keep, pred, 0.0)
        x0 = torch.where(keep, x_g, 0.0)
        loss = self._denoising_loss(pred, x0, noise, sigma, seed)
        return loss, loss * scale

    def _generator_loss(self, scale: float) -> tuple[torch.Tensor, torch.Tensor]:
        """The SiD loss of fresh samples (``docs/math.md``, "SiD generator loss"), fp32: (loss, scale * loss),
        the scale folded into the fused loss so that backward needs no scaling pass."""
        cfg = self.cfg
        x_g, labels, cond = self._generate(self.generator_train, self.generator_sample)
        sigma = reference.generator_sigma(self.batch_gpu, cfg.tmax, cfg.sigma_min, cfg.sigma_max, cfg.rho,
                                          device=self.device)
        noise = torch.randn_like(x_g) if noise_source(cfg.noise, x_g) == "torch" else None
        y_real, y_fake = self._score_terms(x_g, sigma, labels, cond, noise)
        scaled = self._sid_loss(y_real.float(), y_fake.float(), x_g, sigma, scale)
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
            x_g, labels, gen_cond = self._generate(self.generator_sample, labels=labels)
        sigma = reference.edm_training_sigma(self.batch_gpu, cfg.p_mean, cfg.p_std, device=self.device)
        # the published order: augment x_g, draw the noise, augment the real images
        x_g, cond = self._augmented(x_g)
        cond = {**gen_cond, **cond}
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
        x_g, labels, _ = self._generate(self.generator_train, self.generator_sample)
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
        cond = None
        if self.conditioner is not None:  # the first prompts of the file, cycled, in every grid
            prompts = [self.prompts[i % len(self.prompts)] for i in range(cfg.grid_size)]
            cond = _to_device(self.conditioner.condition(prompts), self.device)
        return sample_images(net, cfg.grid_size, self.image_shape, cfg.sigma_init if one_step else None,
                             1 if one_step else cfg.teacher_steps, self.num_classes, self.label_format,
                             seed=cfg.seed + 20240,
                             batch=cfg.grid_size, device=self.device, sigma_min=cfg.sigma_min,
                             sigma_max=cfg.sigma_max, rho=cfg.rho, gen_steps=cfg.gen_steps,
                             step_spacing=cfg.step_spacing, renoise=cfg.renoise, cond=cond)

    # (sharded networks run their forward on every rank: each holds a part of the weights)
    def write_student_grid(self, name: str) -> None:
        if (self.rank0 or self.cfg.fsdp) and self.cfg.grid_size:
            grid = self._grid(self.generator_ema, one_step=True)
            if self.rank0:
                save_grid(grid, self.run_dir / name)

    def write_teacher_grid(self) -> None:
        path = self.run_dir / "teacher.png"
        exists = runtime.all_gather(self.dist, path.exists())[0]  # rank 0 decides for all
        if (self.rank0 or self.cfg.fsdp) and self.cfg.grid_size and self.cfg.teacher_steps and not exists:
            grid = self._grid(self.teacher, one_step=False)
            if self.rank0:
                save_grid(grid, path)


def distill(config: TrainConfig, teacher, generator=None, fake=None, callbacks=(),
            architecture: dict | None = None, log: Callable[[str], None] | None = print,
            data=None, conditioner=None) -> DistillResult:
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
    ``conditioner``: the ``sidfast.text.TextConditioner`` of a text-to-image teacher
    (``checkpoint.load_teacher(..., with_conditioner=True)``); its prompts come from ``config.prompts``.
    """
    from .report import MetricsLog, plot_losses, read_metrics, summary_table

    if not isinstance(config, TrainConfig):
        raise TypeError(f"config must be a sidfast.train.TrainConfig, got {type(config).__name__}")
    # a teacher given as a path is stored absolute, so that the checkpoint works from any directory
    cfg = dataclasses.replace(config, teacher=teacher_reference(config.teacher)).validate()
    trainer = _Trainer(cfg, teacher, generator, fake, callbacks, architecture, data, conditioner)
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
    if not resumed:  # every rank: sharded networks sample together
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
            # every rank, before the process group ends: sharded networks sample together
            if interrupted is None:
                trainer.write_student_grid("student.png")
    finally:
        progress.close()
        runtime.shutdown(trainer.dist)

    # Write the summary.
    seconds = time.perf_counter() - start_time
    result = _result(trainer, cfg, seconds, start_iteration, last, checkpoint, interrupted)
    if trainer.rank0:
        plot_losses(read_metrics(metrics.path), trainer.run_dir / "losses.png")
        (trainer.run_dir / "summary.json").write_text(json.dumps(result.summary, indent=2) + "\n")
        if say:
            rows = [(k, v) for k, v in result.summary.items() if v is not None]
            stopped = f" (stopped by {interrupted})" if interrupted else ""
            say(summary_table(rows, f"{METHOD_NAMES[cfg.method]} distillation" + stopped))
    return result


class _Conditioning:
    """What the run conditions on, checked once: the text conditioner and prompts of a text-to-image teacher,
    and the null condition that guidance and condition dropout need (``guidance.guided``'s form)."""

    def __init__(self, cfg: TrainConfig, teacher, conditioner, num_classes: int, label_format: str, scales,
                 device: torch.device):
        text = _text_conditioned(teacher)
        if conditioner is not None and not text:
            raise ValueError(f"a text conditioner was given, but {teacher.label()} takes no text embeddings "
                             "(no cross_attention_dim or joint_attention_dim in its config)")
        if text and conditioner is None:
            raise ValueError(f"{teacher.label()} is text-conditioned, but no text encoder was given: load "
                             "the teacher from its pipeline directory with the text encoders "
                             f"({cfg.option('teacher')} PIPELINE_DIR), or pass "
                             "distill(..., conditioner=TextConditioner(...))")
        if conditioner is not None and cfg.prompts is None:
            raise ValueError(f"{teacher.label()} is a text-to-image teacher: give its prompts, "
                             f"{cfg.option('prompts')} FILE (one prompt per line)")
        if conditioner is None and cfg.prompts is not None:
            raise ValueError(f"{cfg.option('prompts')} is for text-to-image teachers; {teacher.label()} "
                             "takes no prompts")
        self.conditioner = None
        self.prompts = None
        self.null = None
        if conditioner is not None:
            from .text import read_prompts

            self.prompts = read_prompts(cfg.prompts)
            self.conditioner = conditioner.to(device)
            self.null = _to_device(conditioner.null_condition(1), device)
            return
        if not (scales.active or scales.condition_dropout):
            return
        if not num_classes:
            raise ValueError(f"{cfg.option('guidance')} needs a conditional teacher: {teacher.label()} is "
                             "unconditional (no classes, no text), so there is no unconditional/conditional "
                             "pair to guide between")
        try:
            teacher.null_labels(1, device)  # the adapter's checks: label dropout, a null class
        except ValueError as exc:
            raise ValueError(f"{cfg.option('guidance')}: {exc}") from None
        null_index = getattr(teacher, "null_class", None) if label_format == "index" else None
        self.null = guidance.null_labels(num_classes, label_format, device, null_index=null_index)


def _text_conditioned(teacher) -> bool:
    """Whether the teacher's network takes text embeddings (diffusers' cross- or joint-attention width)."""
    config = getattr(getattr(teacher, "network", None), "config", None)
    return bool(getattr(config, "cross_attention_dim", None) or getattr(config, "joint_attention_dim", None))


def _to_device(cond, device):
    if isinstance(cond, dict):
        return {k: _to_device(v, device) for k, v in cond.items()}
    return cond.to(device) if isinstance(cond, torch.Tensor) else cond


def _joined(labels, cond: dict):
    """The condition in ``guidance.guided``'s form: the labels alone, or the keywords with the labels as
    "class_labels"."""
    if not cond:
        return labels
    joined = dict(cond)
    if labels is not None:
        joined["class_labels"] = labels
    return joined


def _split(joined) -> tuple:
    """(labels, keyword conditions) of a condition in ``guidance.guided``'s form."""
    if isinstance(joined, dict):
        cond = dict(joined)
        return cond.pop("class_labels", None), cond
    return joined, {}


def weighted_sid_loss(y_real, y_fake, x_g, alpha: float, weight: torch.Tensor, loss_scale: float):
    """loss_scale / B * sum_i weight_i * sum_pixels d * ((f_phi - x_g) - alpha d), d = f_phi - f_psi: the SiD
    loss with a per-sample weight in place of 1/w (SiD-DiT's 1 - t; ``docs/math.md``, "SiD generator loss").
    Plain PyTorch: a few passes over the data where the fused loss (weight 1/w) makes one. Samples with a NaN
    contribute zero, as in ``reference.sid_generator_loss``."""
    keep = broadcast(~reference.nan_rows(y_real, y_fake, x_g), x_g)
    y_real = torch.where(keep, y_real, 0.0)
    y_fake = torch.where(keep, y_fake, 0.0)
    x_g = torch.where(keep, x_g, 0.0)
    d = y_real - y_fake
    per_sample = (d * ((y_real - x_g) - alpha * d)).flatten(1).sum(1)
    return loss_scale * (weight.detach().to(per_sample.dtype) * per_sample).sum() / x_g.shape[0]


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
