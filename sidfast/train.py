"""The SiD training loop: ``distill(TrainConfig(...), teacher) -> DistillResult``.

One iteration, as the published ``sid_training_loop.py`` runs it (``docs/math.md``, "Published recipe"):
the fake score takes an EDM denoising step on fresh generator samples x_g = G(sigma_init z, sigma_init), drawn
without gradient ("Fake-score loss"); the generator takes a step on the SiD loss of new fresh samples, with
gradients into its own parameters only ("SiD generator loss"); the EMA of the generator follows EDM's formula.
Gradients are summed over ``batch_gpu`` micro-batches, scaled by loss_scale / batch, and nan_to_num'd.
The noise eps of both updates comes from ``torch.randn`` or from the fused noising kernel (option ``noise``;
``sidfast.ops.noise``): the kernel draws it from a seed taken from torch's RNG, so runs stay reproducible,
and the fused fake-score loss regenerates it from that seed instead of storing it.
Plumbing lives in ``runtime`` (devices, processes, seeds, signals, console), ``networks`` (the three networks),
``checkpoint`` (``save_distill``/``load_distill``) and ``updates`` (EMA, gradient sanitizing).
"""
from __future__ import annotations

import contextlib
import dataclasses
import json
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Optional

import torch
from torch import nn

from . import reference, runtime
from .checkpoint import distill_checkpoint_in, load_distill, read_distill, save_distill, teacher_reference
from .config import CHECKPOINT_NAME, PRECISIONS, SHARDED_CHECKPOINT_NAME, TrainConfig
from .denoisers import draw_labels
from .engine import edm_noised
from .loss import fake_score_loss, sid_generator_loss
from .networks import build_networks
from .ops import backend
from .report import save_grid
from .runtime import resolve_device, seed_everything
from .sharding import LoRAOff, checkpoint_blocks, fully_shard_network
from .schedules import broadcast
from .updates import _nan_to_num_, ema_beta, sanitize_grads, update_ema


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


class _Trainer:
    """The networks, optimizers and counters of one SiD run, and its iteration (``step``)."""

    def __init__(self, cfg: TrainConfig, teacher, generator, fake, callbacks, architecture):
        cfg.validate()
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
        self.fake_params = nets.trainable(self.fake)
        self.batch_rank, self.batch_gpu, self.rounds = cfg.split_batch(self.dist.world)

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
        if self.dist.enabled and not cfg.fsdp:
            self.generator_train = runtime.ddp(self.generator, self.device)
            self.fake_train = runtime.ddp(self.fake, self.device)
        self.generator_sample = self.generator
        self.nan_to_num = None
        if cfg.compile:  # the generator's train and no-grad specializations, and the eager fake-score path
            self.generator_train = torch.compile(self.generator_train)
            self.generator_sample = torch.compile(self.generator)
            if self.engine is None or self.dist.enabled:
                self.fake_train = torch.compile(self.fake_train)
            self.nan_to_num = torch.compile(_nan_to_num_)

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
                            label_format=self.label_format, last=last)

    # ---- one iteration ----
    def step(self) -> tuple[torch.Tensor, torch.Tensor]:
        cfg = self.cfg
        # Update the fake score.
        self.generator.eval()
        self.fake.train()
        loss_fake = self._accumulate(self.fake_params, self.opt_fake, self.fake_train, cfg.loss_scale_fake,
                                     self._fake_score_loss)
        # Update the generator.
        self.generator.train()
        self.fake.eval()
        loss_g = self._accumulate(self.g_params, self.opt_g, self.generator_train, cfg.loss_scale_g,
                                  self._generator_loss)
        # Update EMA.
        beta = ema_beta(self.nimg, cfg.batch, cfg.ema_halflife_kimg, cfg.ema_rampup_ratio)
        update_ema(self.generator_ema, self.generator, beta)
        self.nimg += cfg.batch
        self.iteration += 1
        return loss_g, loss_fake

    def _accumulate(self, params, optimizer, ddp_net, loss_scale, micro_batch_loss) -> torch.Tensor:
        """One optimizer step on ``rounds`` micro-batches; each backpropagates loss * loss_scale / rounds into
        ``params`` only (the score networks pass input gradients), DDP averaging on the last.
        ``micro_batch_loss(scale)`` returns (loss, scale * loss to backpropagate). Returns the mean loss
        (detached)."""
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
        optimizer.step()
        return total

    def _generate(self, net):
        z = torch.randn((self.batch_gpu, *self.image_shape), device=self.device)
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
        scaled = sid_generator_loss(y_real.float(), y_fake.float(), x_g, cfg.alpha, reduction="batchmean",
                                    loss_scale=scale)
        # the reported loss: the scale divided back out of the 0-dim result (the unscaled loss within float32
        # rounding; no pass over the data)
        return scaled.detach() / scale, scaled

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
            architecture: dict | None = None, log: Callable[[str], None] | None = print) -> DistillResult:
    """Run SiD from ``teacher``; a resumed CPU run reproduces the uninterrupted one bitwise.

    ``teacher``/``generator``/``fake``: denoisers ``forward(x, sigma, class_labels=None) -> x0_hat`` in EDM
    coordinates, or anything ``sidfast.denoisers.as_denoiser`` wraps; generator and fake score default to
    copies of the teacher, which is frozen in place. ``callbacks``: ``cb(state) -> bool | None`` after every
    iteration (keys: iteration, nimg, loss_g, loss_fake, generator, generator_ema, fake, teacher, rank,
    world_size); True stops the run like a signal does. ``architecture``: ``{"builder": "module:function",
    "config": {...}}`` that rebuilds the generator for ``sidfast sample``. ``log``: where rank 0's lines go
    (None: silent).
    """
    from .report import MetricsLog, plot_losses, read_metrics, summary_table

    if not isinstance(config, TrainConfig):
        raise TypeError(f"config must be a sidfast.train.TrainConfig, got {type(config).__name__}")
    # a teacher given as a path is stored absolute, so that the checkpoint works from any directory
    cfg = dataclasses.replace(config, teacher=teacher_reference(config.teacher)).validate()
    trainer = _Trainer(cfg, teacher, generator, fake, callbacks, architecture)
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
            say(summary_table(rows, "SiD distillation" + stopped))
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
    if complete:
        summary["complete_before_start"] = True
    return DistillResult(generator=trainer.generator, generator_ema=trainer.generator_ema, fake=trainer.fake,
                         iteration=trainer.iteration, nimg=trainer.nimg, seconds=seconds,
                         interrupted=interrupted, checkpoint=checkpoint, run_dir=trainer.run_dir,
                         summary=summary, last=last)


__all__ = ["TrainConfig", "DistillResult", "distill", "ema_beta", "update_ema", "sanitize_grads",
           "CHECKPOINT_NAME", "PRECISIONS"]
