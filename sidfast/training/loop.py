"""The SiD training loop: ``Distiller.step()`` is one iteration, ``distill()`` runs a whole run with it.

One iteration as the published ``sid_training_loop.py`` runs it (``docs/math.md``, "Published recipe"): a
fake-score step on fresh generator samples, a generator step on the SiD loss of new samples, the EMA. The
two steps' losses live in ``sid.py`` (SiDA's in ``sida.py``), the networks they ask in ``sidfast.engine``;
the same iteration in plain PyTorch is ``sidfast.reference.sid_iteration``. How one update crosses the
package: ``docs/architecture.md``.
"""
from __future__ import annotations

import contextlib
import dataclasses
import json
import shutil
import time
from pathlib import Path
from typing import Callable

import torch

from sidfast._checks import check_int
from sidfast.engine.scores import EagerScores, PhaseScores, ScoreEngine
from sidfast.models.discriminator import DiscriminatorPass
from sidfast.training.config import CHECKPOINT_NAME, PRECISIONS, SHARDED_CHECKPOINT_NAME, TrainConfig
from sidfast.training.evaluation import EvalRun, Evaluation, check_metric
from sidfast.training.grids import grid_samples
from sidfast.training.networks import build_networks, init_from_sid
from sidfast.training.recipe import resolve
from sidfast.training.report import LOSS_KEYS, MetricsLog, plot_losses, read_metrics, run_summary, summary_table
from sidfast.training.sharding import reshard, shard_run
from sidfast.training.sid import MicroBatch, SiDPhases
from sidfast.training.sida import SIDA_METRICS, SiDAPhases, read_init_generator
from sidfast.training.state import (finish_interrupted_save, load_distill, read_distill, resume_source,
                                    save_consolidated_generator, save_distill, save_generator_file,
                                    teacher_reference)
from sidfast.training.updates import _nan_to_num_, ema_beta, lr_factor, sanitize_grads, update_ema
from sidfast.utils import runtime
from sidfast.utils.files import remove_stale_temporaries
from sidfast.utils.images import save_grid
from sidfast.utils.runtime import resolve_device, seed_everything

METHOD_NAMES = {"sid": "SiD", "sida": "SiDA", "sid2a": "SiD2A"}


@dataclasses.dataclass
class DistillResult:
    """What ``distill`` returns: the trained networks, where the run stopped and why, its summary."""

    generator: torch.nn.Module
    generator_ema: torch.nn.Module
    fake: torch.nn.Module
    iteration: int
    nimg: int
    seconds: float
    interrupted: str | None  # None, "SIGINT", "SIGTERM" or "callback"
    checkpoint: Path | None
    run_dir: Path
    summary: dict
    last: dict  # the last metrics record
    config: TrainConfig | None = None  # the options the run trained with (the recipe's values filled in)
    evaluation: dict | None = None  # with --eval: the best value, where and when (summary.json's best_*)


class Distiller:
    """One SiD (SiDA, SiD2A) run that a loop drives: ``step()`` runs one iteration, the fake-score update,
    the generator update and the EMA, and returns ``(loss_g, loss_fake)``. ``distill()`` drives it with
    logging, grids, checkpoints and signals; a trainer of its own may instead call ``step()`` itself::

        d = Distiller(TrainConfig(batch=64, device="cuda"), teacher)
        while d.nimg < 10_000_000:
            loss_g, loss_fake = d.step()

    ``nimg`` and ``iteration`` count the images and iterations seen; ``start_nimg`` starts the run at that
    image count (the EMA ramp-up, SiDA's gates, the learning-rate cooldown and the few-step k* follow it, as
    when a published run is resumed from its weights). The networks are ``generator``, ``generator_ema``,
    ``fake`` and ``teacher``; ``save()`` writes a checkpoint that ``--resume`` continues. ``evaluation``: the
    in-loop metric's driver (``sidfast.training.evaluation``) with ``metric``, else None. Arguments as
    ``distill``'s."""

    def __init__(self, cfg: TrainConfig, teacher, generator=None, fake=None, *, data=None, conditioner=None,
                 callbacks=(), architecture: dict | None = None, start_nimg: int | None = None, metric=None):
        cfg.validate()
        cfg.check_method()
        check_metric(cfg, metric)
        self.cfg = cfg
        self.callbacks = list(callbacks or ())
        self.architecture = architecture
        self.dist = runtime.init_distributed(cfg.device, group_always=cfg.fsdp)
        try:
            self._build(cfg, teacher, generator, fake, data, conditioner, start_nimg)
            self.evaluation = self._evaluation(metric)
        except BaseException:  # a run that cannot start leaves no process group behind
            runtime.shutdown(self.dist)
            raise

    def _build(self, cfg, teacher, generator, fake, data, conditioner, start_nimg) -> None:
        """Everything after the process group: networks, recipe, optimizers, a restored checkpoint."""
        self.rank0 = self.dist.rank == 0
        self.device = resolve_device(cfg.device, self.dist.local_rank)
        if self.device.type == "cuda":  # kernels launch on the current device: make it the run's (cuda:N)
            torch.cuda.set_device(self.device)
        self.run_dir = Path(cfg.run_dir)
        self.ckpt_path = self.run_dir / (SHARDED_CHECKPOINT_NAME if cfg.fsdp else CHECKPOINT_NAME)
        # what saves killed part-way (SIGKILL, preemption) left in the run directory: a sharded save killed
        # between its renames is finished, the other temporaries removed (a FLUX checkpoint's are tens of GB
        # each); rank 0, before any rank looks for the checkpoint
        self.finished = finish_interrupted_save(self.run_dir) if self.rank0 else None
        self.stale = remove_stale_temporaries(self.run_dir) if self.rank0 else ([], 0)
        runtime.barrier(self.dist)
        self.resume_path = resume_source(cfg, self.run_dir)
        if start_nimg is not None:
            start_nimg = check_int("start_nimg", start_nimg, 0, "start_nimg must be a non-negative integer "
                                   "(images seen), got {value!r}")
            if self.resume_path is not None:
                raise ValueError(f"start_nimg is for a run that starts from given weights; {cfg.option('resume')}"
                                 " continues at the checkpoint's own image count")
        # read before any network is touched, so that a bad file costs nothing
        self.state = read_distill(self.resume_path) if self.resume_path else None
        init = read_init_generator(cfg) if self.state is None else None

        # Build the networks (sharded in place under FSDP, before the optimizers take their parameters).
        # LoRA factors start from the run's seed, not from whatever the global generator holds.
        with torch.random.fork_rng(devices=[self.device] if self.device.type == "cuda" else []):
            torch.manual_seed(cfg.seed)
            nets = build_networks(cfg, teacher, generator, fake, self.device)
        self.generator = nets.generator
        self.generator_ema = nets.generator_ema
        self.fake = nets.fake
        self.image_shape = nets.image_shape
        self.num_classes = nets.num_classes
        self.label_format = nets.label_format
        self.teacher = shard_run(cfg, nets.teacher, self.generator, self.generator_ema, self.fake)
        self.g_params = nets.trainable(self.generator)
        self.fake_params = nets.trainable(self.fake)
        # The teacher family's published recipe fills every option left unset (docs/recipes.md).
        self.recipe = resolve(cfg, nets.teacher, text=conditioner is not None)
        self.cfg = cfg = self.recipe.cfg
        self.batch_rank, self.batch_gpu, self.rounds = cfg.split_batch(self.dist.world)
        if init is not None:  # SiD2A: generator and EMA start from a SiD run's EMA generator
            init_from_sid(self.generator, self.generator_ema, init, cfg.init_generator)

        # The recipe: guidance, conditions, the teacher's loss conventions; SiDA's real images.
        batch = MicroBatch(self.batch_gpu, tuple(self.image_shape), self.device, self.num_classes,
                           self.label_format, self.rounds)
        if cfg.adversarial:
            self.phases = SiDAPhases(cfg, self.teacher, self.fake, batch, conditioner, data,
                                     self.dist.rank, self.dist.world, recipe=self.recipe)
        else:
            self.phases = SiDPhases(cfg, self.teacher, batch, conditioner, data, recipe=self.recipe, fake=self.fake)

        # Set up the optimizers and random streams, then restore a checkpoint over them.
        fused = {"fused": True} if self.device.type == "cuda" else {}  # one kernel per step on CUDA
        adam = dict(betas=cfg.betas, eps=cfg.optimizer_eps, **fused)
        g_betas = cfg.betas if cfg.generator_beta1 is None else (cfg.generator_beta1, cfg.betas[1])
        self.opt_g = torch.optim.Adam(self.g_params, lr=cfg.lr, **{**adam, "betas": g_betas})
        self.opt_fake = torch.optim.Adam(self.fake_params, lr=cfg.fake_lr or cfg.lr, **adam)
        self.nimg = start_nimg or 0
        self.iteration = self.nimg // cfg.batch
        seed_everything(cfg.seed, self.dist.rank, self.dist.world)
        # before DDP copies rank 0's weights to every rank; under FSDP into the shards (DCP reads each rank's
        # part, whatever the number of processes that wrote the checkpoint)
        if self.state is not None:
            self.iteration, self.nimg = load_distill(self.state, self.resume_path, cfg, self.networks(),
                                                     self.optimizers(), self.dist, self.device)
            if self.phases.real_data is not None and self.state.get("real_data") is not None:
                self.phases.real_data.load_state_dict(self.state["real_data"])
            self.phases.load_metrics_state((self.state.get("window") or {}).get("metrics"), self.device)
        self._wrap_networks()

    def _wrap_networks(self) -> None:
        """The score interface, DDP wrappers and torch.compile around the networks the optimizers update."""
        cfg = self.cfg
        self.generator_train = self.generator
        self.generator_sample = self.generator
        eager = EagerScores(self.teacher, self.fake, precision=cfg.precision)
        engine = None
        if cfg.engine == "fused":
            # teacher and fake score evaluated together over frozen views of the same storage (CUDA graphs on
            # GPU); a LoRA fake score runs as one forward of the shared weights over the doubled batch
            engine = ScoreEngine.over(self.teacher, self.fake, amp_dtype=runtime.AUTOCAST_DTYPES[cfg.precision],
                                      compile=cfg.compile)
        self.fake_train = self.fake
        if cfg.adversarial:  # SiDA: one module call for f_psi, D_fake and D_real
            tap = (engine or eager).attach_discriminator(cfg.disc_layer)
            self.fake_train = DiscriminatorPass(tap)
            eager.tap = tap
        if self.dist.enabled and not cfg.fsdp:
            self.generator_train = runtime.ddp(self.generator, self.device)
            self.fake_train = runtime.ddp(self.fake_train, self.device)
        self.nan_to_num = None
        if cfg.compile:  # the generator's train and no-grad specializations, and the eager fake-score path
            self.generator_train = torch.compile(self.generator_train)
            self.generator_sample = torch.compile(self.generator)
            if engine is None or self.dist.enabled:
                self.fake_train = torch.compile(self.fake_train)
            self.nan_to_num = torch.compile(_nan_to_num_)
        eager.fake_train = self.fake_train
        # one object answers both phases; under DDP the fake score's update goes through the DDP wrapper
        if engine is None:
            self.scores = eager
        elif self.dist.enabled:
            self.scores = PhaseScores(fake_phase=eager, generator_phase=engine)
        else:
            self.scores = engine

    def close(self) -> None:
        """End the run's distributed part: its DDP wrappers, then the process group if the run made it. In this
        order because a DDP reducer that outlives the group is its last owner, and freeing the reducer
        destroys the group with the GIL held, waiting for gloo's worker threads, one of which may be waiting
        for the GIL to free a finished collective's tensors (a deadlock). A closed Distiller does not step."""
        self.generator_train = self.fake_train = self.scores = None
        runtime.shutdown(self.dist)

    def _evaluation(self, metric) -> Evaluation | None:
        """The in-loop metric's driver, its best so far restored from the checkpoint; None without one."""
        if metric is None:
            return None
        run = EvalRun(self.cfg, self.teacher, self.generator_ema, tuple(self.image_shape), self.num_classes,
                      self.label_format, self.device, self.dist, self.run_dir, self.batch_gpu,
                      self.phases.conditioning)
        after = (lambda: reshard(*self.networks().values(), self.teacher)) if self.cfg.fsdp else None
        return Evaluation(metric, run, self.state.get("eval") if self.state else None, self._save_best,
                          after_forwards=after, rank0=self.rank0)

    def _save_best(self, path, extra: dict) -> None:
        # one best.pt: the best it replaces is worse, not kept (a large generator twice on disk otherwise)
        save_generator_file(path, self.cfg, self.generator_ema, self.iteration, self.nimg, self.dist,
                            keep_previous=False, **self._sample_meta(), **extra)

    def networks(self) -> dict:
        return {"generator": self.generator, "generator_ema": self.generator_ema, "fake": self.fake}

    def optimizers(self) -> dict:
        return {"opt_g": self.opt_g, "opt_fake": self.opt_fake}

    def save(self, last: dict | None = None, window: dict | None = None) -> Path | None:
        """Write the run's checkpoint (``checkpoint.pt``, or ``checkpoint.dcp`` under FSDP) in ``run_dir``;
        ``last``: the latest metrics record, kept for the summary of a resumed run; ``window``: the losses
        summed since it (``runtime.LossWindow.state``), which the resumed run's first record goes on with
        (with the recipe's own metrics summed since it)."""
        real_data = self.phases.real_data
        if window:
            window = {**window, "metrics": self.phases.metrics_state()}
        return save_distill(self.ckpt_path, self.cfg, self.networks(), self.optimizers(), self.iteration,
                            self.nimg, self.dist, self.device, **self._sample_meta(), last=last or {},
                            **({"window": window} if window else {}),
                            **({"real_data": real_data.state_dict()} if real_data else {}),
                            **({"eval": self.evaluation.state()} if self.evaluation else {}))

    def save_generator(self) -> Path | None:
        """Write ``run_dir/generator.pt``: the EMA generator's whole weights (gathered from the shards under
        FSDP), for ``sidfast sample``; every rank calls it."""
        return save_consolidated_generator(self.run_dir, self.cfg, self.generator_ema, self.iteration, self.nimg,
                                           self.dist, **self._sample_meta())

    def _sample_meta(self) -> dict:
        return dict(architecture=self.architecture, image_shape=list(self.image_shape),
                    num_classes=self.num_classes, label_format=self.label_format, gen_steps=self.cfg.gen_steps,
                    step_spacing=self.cfg.step_spacing, renoise=self.cfg.renoise)

    # ---- one iteration ----
    def set_learning_rates(self) -> None:
        """This iteration's learning rates: the configured ones, times the cooldown's factor."""
        factor = lr_factor(self.iteration, self.cfg.iterations, self.cfg.lr_cooldown)
        for opt, lr in ((self.opt_g, self.cfg.lr), (self.opt_fake, self.cfg.fake_lr or self.cfg.lr)):
            for group in opt.param_groups:
                group["lr"] = lr * factor

    def step(self) -> tuple[torch.Tensor, torch.Tensor]:
        """One iteration: (loss_g, loss_fake), each the mean over the micro-batches (detached)."""
        cfg = self.cfg
        phases = self.phases
        scores = self.scores
        phases.begin(self.iteration, self.nimg)
        self.set_learning_rates()
        # Update the fake score (SiDA: and its encoder as the discriminator; gradients clipped as published).
        self.generator.eval()
        self.fake.train()
        loss_fake = self._accumulate(self.fake_params, self.opt_fake, self.fake_train, phases.loss_scale_fake,
                                     lambda scale: phases.fake_score_loss(scores, self.generator_sample, scale),
                                     clip=phases.clip)
        # Update the generator (SiDA: its optimizer steps only after g_start_kimg, as published).
        self.generator.train()
        self.fake.eval()
        loss_g = self._accumulate(
            self.g_params, self.opt_g, self.generator_train, phases.loss_scale_g,
            lambda scale: phases.generator_loss(scores, self.generator_train, self.generator_sample, scale),
            update=phases.updates_generator)
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

    def run_callbacks(self, loss_g, loss_fake) -> str | None:
        state = {"iteration": self.iteration, "nimg": self.nimg, "loss_g": loss_g, "loss_fake": loss_fake,
                 "generator": self.generator, "generator_ema": self.generator_ema, "fake": self.fake,
                 "teacher": self.teacher, "rank": self.dist.rank, "world_size": self.dist.world}
        asked = [bool(cb(state)) for cb in self.callbacks]  # every callback runs
        return "callback" if any(asked) else None

    # ---- sample grids: the same latents and labels in every grid; sharded networks run their forward on
    # every rank (each holds a part of the weights), rank 0 writes ----
    def _grid(self, net, one_step: bool):
        cond = self.phases.conditioning.for_grid(self.cfg.grid_size)
        grid = grid_samples(net, self.cfg, self.image_shape, self.num_classes, self.label_format, self.device,
                            cond, one_step, sigma_range=self.recipe.clock.range)
        if self.cfg.fsdp:  # a forward without backward leaves FSDP's root parameters gathered
            reshard(*self.networks().values(), self.teacher)
        return grid

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
            data=None, conditioner=None, metric=None) -> DistillResult:
    """Run SiD (or SiDA, SiD2A: ``config.method``) from ``teacher``; a resumed CPU run reproduces the
    uninterrupted one bitwise.

    ``teacher``/``generator``/``fake``: denoisers ``forward(x, sigma, class_labels=None) -> x0_hat`` in EDM
    coordinates, or anything ``sidfast.models.denoiser.as_denoiser`` wraps; generator and fake score default to
    copies of the teacher, which is frozen in place. ``callbacks``: ``cb(state) -> bool | None`` after every
    iteration (keys: iteration, nimg, loss_g, loss_fake, generator, generator_ema, fake, teacher, rank,
    world_size); True stops the run like a signal does. ``architecture``: ``{"builder": "module:function",
    "config": {...}}`` that rebuilds the generator for ``sidfast sample``. ``log``: where rank 0's lines go
    (None: silent). ``data``: SiDA's real images, anything ``sidfast.training.data.open_images`` reads (a path, an
    image tensor or array, a torch Dataset); default ``config.data``.
    ``conditioner``: the ``sidfast.models.text.TextConditioner`` of a text-to-image teacher
    (``loading.load_teacher(..., with_conditioner=True)``); its prompts come from ``config.prompts``.
    ``metric``: what ``config.eval`` names, built by ``sidfast.evaluate.loop_metrics.metric_for(config)``: measured
    at the start, every ``config.eval_every`` kimg and at the end, logged to metrics.jsonl and losses.png,
    the best EMA generator kept as ``run_dir/best.pt`` (``sidfast.training.evaluation``).
    """
    if not isinstance(config, TrainConfig):
        raise TypeError(f"config must be a sidfast.training.loop.TrainConfig, got {type(config).__name__}")
    # a teacher given as a path is stored absolute, so that the checkpoint works from any directory
    cfg = dataclasses.replace(config, teacher=teacher_reference(config.teacher)).validate()
    trainer = Distiller(cfg, teacher, generator, fake, data=data, conditioner=conditioner, callbacks=callbacks,
                        architecture=architecture, metric=metric)
    cfg = trainer.cfg  # with the recipe's values
    say = log if (log is not None and trainer.rank0) else None
    start_iteration = trainer.iteration
    start_time = time.perf_counter()
    resumed = trainer.state is not None
    last = dict(trainer.state.get("last") or {}) if resumed else {}
    saved_window = trainer.state.get("window") if resumed else None

    if resumed and trainer.iteration >= cfg.iterations:
        if say:
            say(f"sidfast distill: the run in {str(trainer.run_dir)!r} is complete (iteration "
                f"{trainer.iteration} of {cfg.iterations}); nothing to train, no file written. To train "
                f"longer, resume with a larger {cfg.option('iterations')}: sidfast distill "
                f"{cfg.option('resume')} {trainer.resume_path} {cfg.option('run_dir')} {cfg.run_dir} "
                f"{cfg.option('iterations')} {2 * trainer.iteration}")
        trainer.state = None
        trainer.close()
        return _result(trainer, 0.0, start_iteration, last, trainer.resume_path, None, complete=True)

    created = trainer.rank0 and not trainer.run_dir.exists()  # a start that fails below removes only this
    metrics = MetricsLog(trainer.run_dir / "metrics.jsonl", enabled=trainer.rank0)
    if trainer.rank0:
        trainer.run_dir.mkdir(parents=True, exist_ok=True)
        if not resumed:
            (trainer.run_dir / "config.json").write_text(json.dumps(cfg.to_dict(), indent=2) + "\n")
    if say and trainer.finished:
        say(f"sidfast distill: finished the save of {str(trainer.finished)!r} that was interrupted between its "
            f"renames (its temporary directory was whole)")
    if say and trainer.stale[0]:
        removed, freed = trainer.stale
        say(f"sidfast distill: removed {len(removed)} temporary file(s) of interrupted saves from "
            f"{str(trainer.run_dir)!r} ({', '.join(removed[:3])}{', ...' if len(removed) > 3 else ''}), "
            f"{freed:,} bytes freed")
    # from here a SIGINT/SIGTERM (during the first grids too) stops the run after a whole iteration
    handlers = contextlib.ExitStack()
    stop = handlers.enter_context(runtime.StopRequest())
    evaluation = trainer.evaluation
    plot_keys = LOSS_KEYS + ((evaluation.metric.key,) if evaluation else ())
    with contextlib.ExitStack() as on_error:
        on_error.push(handlers)  # closed on an error here, else by the training loop's ``with``
        if created:  # a run that cannot start (its metric's setup refused) leaves no folder behind
            on_error.callback(shutil.rmtree, trainer.run_dir, ignore_errors=True)
        if evaluation is not None:  # every rank: the reference set is sampled over all of them
            evaluation.say = say
            seconds = evaluation.setup()
            if say:
                say(f"sidfast distill: {evaluation.metric.name} ready ({seconds:.1f} s)")
            if evaluation.due_at_start(trainer.nimg):
                metrics.append(evaluation.evaluate(trainer.iteration, trainer.nimg))
        if not resumed:  # every rank: sharded networks sample together
            trainer.write_teacher_grid()
            trainer.write_student_grid("student_init.png")
        on_error.pop_all()
    if say:
        if not resumed:  # a resumed run goes on with the options its checkpoint holds
            for line in trainer.recipe.lines():
                say(line)
        say(f"sidfast distill: {trainer.dist.world} process(es) on {trainer.device}, batch {cfg.batch} "
            f"({trainer.batch_gpu} x {trainer.rounds} per process), image {trainer.image_shape}, classes "
            f"{trainer.num_classes}, " + (f"resuming at iteration {trainer.iteration} of {cfg.iterations}"
                                          if resumed else f"fresh start, {cfg.iterations} iterations"))
        gates = trainer.phases.gate_warning(trainer.nimg, cfg.iterations * cfg.batch)  # SiDA's warm-up gates
        if gates:
            say(gates)

    progress = runtime.Progress(cfg.iterations, trainer.iteration, cfg.batch, bar=cfg.progress, log=say)
    window = runtime.LossWindow(trainer.iteration)
    window.load_state(saved_window, trainer.device)
    trainer.state = saved_window = None  # free the loaded tensors
    checkpoint = None
    interrupted = None
    try:
        with handlers:
            while trainer.iteration < cfg.iterations:
                nimg_before = trainer.nimg
                loss_g, loss_fake = trainer.step()
                window.add(loss_g, loss_fake)
                requested = trainer.run_callbacks(loss_g, loss_fake)
                done = trainer.iteration >= cfg.iterations

                # Log the losses averaged since the last record.
                record = None
                if trainer.iteration % cfg.log_every == 0 or done:
                    seconds = time.perf_counter() - start_time
                    record = window.record(trainer.iteration, trainer.nimg, cfg.batch, seconds)
                    trainer.phases.add_metrics(record)
                    metrics.append(record)
                    last = record
                progress.update(record, done)
                upkeep = time.perf_counter()  # grids and checkpoints are left out of the measured speed

                # Write a sample grid.
                if cfg.sample_every and trainer.iteration % cfg.sample_every == 0 and not done:
                    trainer.write_student_grid(f"student_{trainer.iteration:06d}.png")
                    if trainer.rank0:
                        plot_losses(read_metrics(metrics.path), trainer.run_dir / "losses.png", plot_keys)

                # Stop when any rank got a signal or a callback asked to.
                reason = runtime.agree_stop(trainer.dist, stop.reason or requested)
                if reason is not None and not done:
                    interrupted = reason
                    break

                # Measure the EMA generator (--eval); best.pt when it is the best so far.
                if evaluation is not None and evaluation.due(nimg_before, trainer.nimg, done):
                    metrics.append(evaluation.evaluate(trainer.iteration, trainer.nimg))
                    if trainer.rank0:
                        plot_losses(read_metrics(metrics.path), trainer.run_dir / "losses.png", plot_keys)

                # Save a checkpoint.
                if cfg.checkpoint_every and trainer.iteration % cfg.checkpoint_every == 0 and not done:
                    checkpoint = trainer.save(last, window.state())
                window.start += time.perf_counter() - upkeep
            checkpoint = trainer.save(last, window.state())
            if cfg.fsdp:  # the EMA generator gathered into one file, for sampling and copying
                trainer.save_generator()
            # every rank, before the process group ends: sharded networks sample together
            if interrupted is None:
                trainer.write_student_grid("student.png")
    finally:
        progress.close()
        trainer.close()

    # Write the summary.
    seconds = time.perf_counter() - start_time
    result = _result(trainer, seconds, start_iteration, last, checkpoint, interrupted,
                     training_seconds=window.training_seconds())
    if evaluation is not None:
        result.evaluation = evaluation.summary()
        result.summary.update(result.evaluation)
    if trainer.rank0:
        plot_losses(read_metrics(metrics.path), trainer.run_dir / "losses.png", plot_keys)
        (trainer.run_dir / "summary.json").write_text(json.dumps(result.summary, indent=2) + "\n")
        if say:
            rows = [(k, v) for k, v in result.summary.items() if v is not None]
            stopped = f" (stopped by {interrupted})" if interrupted else ""
            say(summary_table(rows, f"{METHOD_NAMES[cfg.method]} distillation" + stopped))
    return result


def _result(trainer: Distiller, seconds: float, start_iteration: int, last: dict, checkpoint, interrupted,
            complete: bool = False, training_seconds: float | None = None) -> DistillResult:
    summary = run_summary(trainer.iteration, trainer.iteration - start_iteration, trainer.nimg, trainer.cfg.batch,
                          seconds, last, trainer.dist.world, trainer.device, checkpoint, interrupted, complete,
                          extra_keys=SIDA_METRICS, training_seconds=training_seconds)
    if trainer.nimg > 0:  # SiDA: the warm-up gates the run never opened
        summary.update(trainer.phases.summary_notes(trainer.nimg))
    return DistillResult(generator=trainer.generator, generator_ema=trainer.generator_ema, fake=trainer.fake,
                         iteration=trainer.iteration, nimg=trainer.nimg, seconds=seconds,
                         interrupted=interrupted, checkpoint=checkpoint, run_dir=trainer.run_dir,
                         summary=summary, last=last, config=trainer.cfg)


__all__ = ["TrainConfig", "Distiller", "DistillResult", "distill", "ema_beta", "update_ema", "sanitize_grads",
           "CHECKPOINT_NAME", "PRECISIONS"]
