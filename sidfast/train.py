"""The SiD training loop: ``distill(TrainConfig(...), teacher) -> DistillResult``.

One iteration, as the published ``sid_training_loop.py`` runs it (``docs/math.md``, "Published recipe"):
the fake score takes an EDM denoising step on fresh generator samples x_g = G(sigma_init z, sigma_init), drawn
without gradient ("Fake-score loss"); the generator takes a step on the SiD loss of new fresh samples, with
gradients into its own parameters only ("SiD generator loss"); the EMA of the generator follows EDM's formula.
Gradients are summed over ``batch_gpu`` micro-batches, scaled by loss_scale / batch, and nan_to_num'd.
The noise eps of both updates comes from ``torch.randn`` or from the fused noising kernel (option ``noise``;
``sidfast.ops.noise``): the kernel draws it from a seed taken from torch's RNG, so runs stay reproducible,
and the fused fake-score loss regenerates it from that seed instead of storing it.

``distill(config, teacher, generator=None, fake=None, callbacks=(), architecture=None, log=print)``:
``teacher``/``generator``/``fake`` are denoisers ``forward(x, sigma, class_labels=None) -> x0_hat`` in EDM
coordinates, or anything ``sidfast.denoisers.as_denoiser`` wraps; generator and fake score default to
copies of the teacher, which is frozen in place. ``callbacks``: ``cb(state) -> bool | None`` after every
iteration (keys: iteration, nimg, loss_g, loss_fake, generator, generator_ema, fake, teacher, rank,
world_size); True stops the run like a signal does. ``architecture``: ``{"builder": "module:function",
"config": {...}}`` that rebuilds the generator for ``sidfast sample``. ``log``: where rank 0's lines go
(None: silent).

Plumbing lives elsewhere: devices, processes, seeds, signals and the console in ``sidfast.runtime``; the
checkpoint format in ``sidfast.checkpoint`` (``save_distill``/``load_distill``); network introspection in
``sidfast.denoisers``. A resumed CPU run reproduces the uninterrupted one bitwise.
"""
from __future__ import annotations

import contextlib
import copy
import dataclasses
import json
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Optional

import torch
from torch import nn

from . import reference, runtime
from .checkpoint import load_checkpoint, load_distill, save_distill, teacher_reference
from .config import CHECKPOINT_NAME, PRECISIONS, TrainConfig
from .denoisers import (DiffusersDenoiser, as_denoiser, draw_labels, format_labels, infer_image_shape,
                        infer_num_classes)
from .engine import edm_noised
from .lora import LoRAFakeScore
from .loss import fake_score_loss, sid_generator_loss
from .ops import backend
from .runtime import resolve_device, seed_everything
from .schedules import broadcast


def ema_beta(nimg: int, batch: int, halflife_kimg: float, rampup_ratio: float | None) -> float:
    """EDM's EMA decay per iteration (Karras et al. 2022, training_loop.py): a half-life in images,
    ramped up."""
    halflife = halflife_kimg * 1000
    if rampup_ratio is not None:
        halflife = min(halflife, nimg * rampup_ratio)
    return 0.5 ** (batch / max(halflife, 1e-8))


@torch.no_grad()
def update_ema(ema: nn.Module, net: nn.Module, beta: float) -> None:
    """ema <- net + beta * (ema - net) for parameters (published arithmetic: ``net.lerp(ema, beta)``, here as
    multi-tensor kernels); buffers copied."""
    ema_params = list(ema.parameters())
    net_params = [p.detach() for p in net.parameters()]
    if ema_params:
        torch._foreach_copy_(ema_params, torch._foreach_lerp(net_params, ema_params, beta))
    for ema_buffer, buffer in zip(ema.buffers(), net.buffers()):
        ema_buffer.copy_(buffer)


def noise_source(option: str, x: torch.Tensor) -> str:
    """Where the trainer's eps for data like ``x`` comes from under option ``noise``: "kernel" (the fused
    noising kernel's Philox stream; its PyTorch reference off the Triton route) or "torch" (torch.randn)."""
    if option == "kernel" or (option == "auto" and backend.use_triton(x)):
        return "kernel"
    return "torch"


def _nan_to_num_(tensors: list) -> None:
    for t in tensors:
        torch.nan_to_num(t, nan=0.0, posinf=1e5, neginf=-1e5, out=t)


def sanitize_grads(params, kernel: Callable | None = None) -> None:
    """Published: grad <- nan_to_num(grad, nan=0, posinf=1e5, neginf=-1e5), in place. ``kernel``: the same
    operation compiled (``torch.compile(_nan_to_num_)``: a few fused kernels instead of one per parameter)."""
    (kernel or _nan_to_num_)([p.grad for p in params if p.grad is not None])


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
        self._build_networks(teacher, generator, fake)
        self._read_data_shape()
        self._split_batch()

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
        self._wrap_networks()

    def _build_networks(self, teacher, generator, fake) -> None:
        """Teacher frozen in eval; generator and fake score trainable (copies of the teacher by default)."""
        cfg = self.cfg
        self.teacher = as_denoiser(teacher, name="teacher").to(self.device).eval().requires_grad_(False)
        gen = copy.deepcopy(self.teacher) if generator is None else as_denoiser(generator, name="generator")
        if gen.name == "teacher":
            gen.name = "generator"
        self.generator = gen.to(self.device).train().requires_grad_(True)
        if cfg.fake_score == "lora":
            if fake is not None:
                raise ValueError(f"{cfg.option('fake_score')} lora builds the fake score from the teacher's "
                                 f"weights; pass no fake network or use {cfg.option('fake_score')} full")
            # the teacher's own frozen weights plus trainable low-rank updates (sidfast.lora): no network copy
            self.fake = LoRAFakeScore(self.teacher, rank=cfg.lora_rank).train()
        else:
            score = copy.deepcopy(self.teacher) if fake is None else as_denoiser(fake, name="fake score")
            if score.name == "teacher":
                score.name = "fake score"
            self.fake = score.to(self.device).train().requires_grad_(True)
        for net, name in ((self.generator, "generator"), (self.fake, "fake score")):
            if not any(p.requires_grad for p in net.parameters()):
                raise ValueError(f"the {name} has no parameters to train")
        self.generator_ema = copy.deepcopy(self.generator).eval().requires_grad_(False)
        self.g_params = [p for p in self.generator.parameters() if p.requires_grad]
        self.fake_params = [p for p in self.fake.parameters() if p.requires_grad]

    def _read_data_shape(self) -> None:
        cfg = self.cfg
        shape = cfg.image_shape or infer_image_shape(self.teacher) or infer_image_shape(self.generator)
        if shape is None:
            raise ValueError("cannot determine the image shape from the teacher (no image_shape, "
                             "img_resolution or diffusers sample_size); pass "
                             f"{cfg.option('image_shape')} C H W")
        self.image_shape = tuple(shape)
        self.num_classes = cfg.num_classes if cfg.num_classes is not None else infer_num_classes(self.teacher)
        self.label_format = cfg.label_format
        if self.label_format == "auto":
            self.label_format = "index" if isinstance(self.teacher, DiffusersDenoiser) else "onehot"

    def _split_batch(self) -> None:
        cfg = self.cfg
        world = self.dist.world
        if cfg.batch % world:
            raise ValueError(f"{cfg.option('batch')} ({cfg.batch}) must be divisible by the number of "
                             f"processes ({world})")
        self.batch_rank = cfg.batch // world
        self.batch_gpu = min(cfg.batch_gpu or self.batch_rank, self.batch_rank)
        if self.batch_rank % self.batch_gpu:
            raise ValueError(f"{cfg.option('batch_gpu')} ({self.batch_gpu}) must divide the per-process "
                             f"batch ({self.batch_rank} = {cfg.option('batch')} {cfg.batch} / {world} "
                             "processes)")
        self.rounds = self.batch_rank // self.batch_gpu

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
        if self.dist.enabled:
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

    # ---- sample grids (rank 0) ----
    def _grid_inputs(self):
        n = self.cfg.grid_size
        grid_rng = torch.Generator().manual_seed(self.cfg.seed + 20240)  # the same latents in every grid
        z = torch.randn((n, *self.image_shape), generator=grid_rng)
        labels = None
        if self.num_classes:
            labels = format_labels(torch.arange(n) % self.num_classes, self.num_classes, self.label_format)
            labels = labels.to(self.device)
        return z.to(self.device), labels

    def write_student_grid(self, name: str) -> None:
        if self.rank0 and self.cfg.grid_size:
            from .report import save_grid
            from .samplers import one_step_sample

            z, labels = self._grid_inputs()
            x = one_step_sample(self.generator_ema, z, self.cfg.sigma_init, labels)
            save_grid(x, self.run_dir / name)

    def write_teacher_grid(self) -> None:
        cfg = self.cfg
        path = self.run_dir / "teacher.png"
        if self.rank0 and cfg.grid_size and cfg.teacher_steps and not path.exists():
            from .report import save_grid
            from .samplers import edm_sample

            z, labels = self._grid_inputs()
            x = edm_sample(self.teacher, z, cfg.teacher_steps, cfg.sigma_min, cfg.sigma_max, cfg.rho,
                           class_labels=labels)
            save_grid(x, path)


def distill(config: TrainConfig, teacher, generator=None, fake=None, callbacks=(),
            architecture: dict | None = None, log: Callable[[str], None] | None = print) -> DistillResult:
    """Run SiD from ``teacher``; see the module docstring for the arguments."""
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
