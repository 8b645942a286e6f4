"""A metric inside the training loop (``--eval``): when it runs, what it logs, ``best.pt`` kept by it.

The metric itself (``sidfast.evaluate.loop_metrics``: the teacher-feature distance, FID) is built above this layer
and handed to the trainer; this module only drives it: at the run's start (when this metric has no value
yet), every ``--eval-every`` thousand images and at the end. Each evaluation runs with every random stream
the trainer checkpoints saved and restored around it, so that a run's weights are the same with and without
it, and writes ``best.pt`` (the EMA generator, atomically) when the value beats the best so far; the best
is stored in the run's checkpoints and read back from ``best.pt`` itself on resume. Manual: docs/runs.md.
"""
from __future__ import annotations

import dataclasses
import math
import time
import warnings
from pathlib import Path
from typing import Callable

import torch

from sidfast.training.config import TrainConfig
from sidfast.training.recipe import resolve
from sidfast.utils import runtime

BEST_NAME = "best.pt"


@dataclasses.dataclass
class EvalRun:
    """What a metric sees of the run it measures: the networks, the samples' shape and conditions, where
    the run writes, its processes. ``batch``: samples per forward pass (the run's ``batch_gpu``);
    ``conditioning``: the run's ``sidfast.training.conditioning.Conditioning`` (text prompts, the null
    condition of guidance)."""

    cfg: TrainConfig
    teacher: torch.nn.Module
    generator: torch.nn.Module  # the EMA generator
    image_shape: tuple
    num_classes: int
    label_format: str
    device: torch.device
    dist: runtime.Dist
    run_dir: Path
    batch: int
    conditioning: object = None

    def __post_init__(self):
        # the options the run trains with: a config left to the recipe is completed for the teacher
        text = getattr(self.conditioning, "conditioner", None) is not None
        self.cfg = resolve(self.cfg, self.teacher, text=text).cfg


class Metric:
    """The interface the loop drives (implementations: ``sidfast.evaluate.loop_metrics``).

    ``name``: the ``--eval`` value; ``lower_is_better``; ``setup(run)``: once per run, before the first
    ``compute`` (a reference set made or read, the options checked: a ValueError naming the option);
    ``compute(run)``: the value for ``run.generator``, called on every rank, equal on every rank."""

    name: str = ""
    lower_is_better: bool = True

    @property
    def key(self) -> str:
        """The metric's key in metrics.jsonl and summary.json: its name with underscores."""
        return self.name.replace("-", "_")

    def setup(self, run: EvalRun) -> None:  # pragma: no cover - overridden
        raise NotImplementedError

    def compute(self, run: EvalRun) -> float:  # pragma: no cover - overridden
        raise NotImplementedError


def read_best_eval(path) -> dict:
    """The ``eval`` entry of a best.pt (its metric's key, value, images, iteration); {} for a file that does
    not read. Memory-mapped: the weights are not read."""
    try:
        data = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
    except Exception:  # a torn or foreign file: as if there were none (the next best replaces it)
        return {}
    held = data.get("eval") if isinstance(data, dict) else None
    return dict(held) if isinstance(held, dict) else {}


def eval_key(cfg: TrainConfig, metric=None) -> dict:
    """What makes two values of a run's metric comparable: the metric, its sample count (the metric's own
    default when ``eval_num`` is not given), its reference."""
    return {"metric": cfg.eval, "num": getattr(metric, "num", None) or cfg.eval_num, "ref": cfg.eval_ref}


def check_metric(cfg: TrainConfig, metric) -> None:
    """A ValueError unless ``metric`` is what option ``eval`` names (None when it is off)."""
    if cfg.eval is None and metric is not None:
        raise ValueError(f"a metric ({getattr(metric, 'name', type(metric).__name__)}) was given but option "
                         f"eval is off; set {cfg.option('eval')} {getattr(metric, 'name', 'NAME')}")
    if cfg.eval is not None and metric is None:
        raise ValueError(f"option eval {cfg.eval}: give the trainer its metric, distill(..., "
                         f"metric=sidfast.evaluate.loop_metrics.metric_for(config)) (sidfast distill builds it)")
    if metric is not None and getattr(metric, "name", None) != cfg.eval:
        raise ValueError(f"option eval {cfg.eval}: the metric given measures {getattr(metric, 'name', None)!r}")


class Evaluation:
    """The metric of one run in its loop: the schedule, the metrics records, the best value and best.pt.

    ``state``: what the run's checkpoint holds of it (``state()``), None for a fresh run; ``save_best``:
    ``save_best(path, extra) -> None``, called on every rank, writes the EMA generator to ``path`` (rank 0)
    with ``extra`` in the file; ``after_forwards``: called on every rank after the metric's forwards
    (FSDP's reshard)."""

    def __init__(self, metric, run: EvalRun, state: dict | None, save_best: Callable,
                 after_forwards: Callable[[], None] | None = None, rank0: bool = True, say=None):
        self.metric = metric
        self.run = run
        self.cfg = run.cfg
        self.key = eval_key(run.cfg, metric)
        self.every = round(self.cfg.eval_every * 1000)  # images between evaluations (0: start and end only)
        self.save_best_file = save_best
        self.after_forwards = after_forwards or (lambda: None)
        self.rank0 = rank0
        self.say = say
        self.best_path = Path(run.run_dir) / BEST_NAME
        self.best: dict | None = None  # {"value", "nimg", "iteration"}
        self.evaluated_nimg: int | None = None  # the images seen at the last evaluation
        self.setup_seconds: float | None = None
        if state is not None and state.get("key") == self.key:
            self.best = state.get("best")
            self.evaluated_nimg = state.get("evaluated_nimg")
        elif state is not None and state.get("key") is not None and rank0:
            warnings.warn(f"resuming with {self.cfg.option('eval')} {self.cfg.eval} (samples "
                          f"{self.cfg.eval_num}, reference {self.cfg.eval_ref}); the checkpoint's best was "
                          f"measured as {state['key']}: the best starts afresh and {BEST_NAME} is replaced at "
                          "the next evaluation", stacklevel=3)
        self._adopt_best_file()

    # ---- the best so far ----
    def better(self, value: float, than: float | None) -> bool:
        if than is None:
            return math.isfinite(value)
        return value < than if self.metric.lower_is_better else value > than

    def _adopt_best_file(self) -> None:
        """The value best.pt holds, when it beats the checkpoint's best: a run killed after writing best.pt
        and before its next checkpoint forgets nothing. Every rank reads rank 0's finding."""
        found = None
        if self.rank0 and self.best_path.is_file():
            held = read_best_eval(self.best_path)
            if held.get("key") == self.key and held.get("value") is not None:
                found = {k: held[k] for k in ("value", "nimg", "iteration")}
        found = runtime.all_gather(self.run.dist, found)[0]
        if found is not None and self.better(found["value"], None if self.best is None else self.best["value"]):
            self.best = found

    def state(self) -> dict:
        """What the run's checkpoint keeps: the comparability key, the best so far, the last evaluation."""
        return {"key": self.key, "best": self.best, "evaluated_nimg": self.evaluated_nimg}

    # ---- when ----
    def due(self, nimg_before: int, nimg_after: int, done: bool) -> bool:
        """Whether to evaluate after the iteration that went from ``nimg_before`` to ``nimg_after`` images:
        a multiple of ``--eval-every`` crossed, or the run's last iteration."""
        if done:
            return True
        return bool(self.every) and nimg_before // self.every < nimg_after // self.every

    def due_at_start(self, nimg: int) -> bool:
        """Whether to evaluate before the first iteration, at ``nimg`` images: the run has no value of its
        metric yet (a fresh run, or eval turned on now), or the run stopped where an evaluation was due (a
        stop skips it)."""
        if self.evaluated_nimg is None:
            return True
        return self.due(self.evaluated_nimg, nimg, False)

    # ---- what ----
    def setup(self) -> float:
        """The metric's setup (its reference set), random streams untouched; returns its seconds."""
        start = time.perf_counter()
        self._isolated(lambda: self.metric.setup(self.run))
        self.setup_seconds = time.perf_counter() - start
        return self.setup_seconds

    def evaluate(self, iteration: int, nimg: int) -> dict:
        """Measure the EMA generator now; write best.pt when it is the best so far. Returns the metrics
        record ``{"iteration", "nimg", "kimg", KEY, "eval_seconds", "best"}``."""
        start = time.perf_counter()
        value = float(self._isolated(lambda: self.metric.compute(self.run)))
        seconds = time.perf_counter() - start
        improved = self.better(value, None if self.best is None else self.best["value"])
        record = {"iteration": iteration, "nimg": nimg, "kimg": nimg / 1000, self.metric.key: value,
                  "eval_seconds": seconds, "best": improved}
        self.evaluated_nimg = nimg
        if improved:
            self.best = {"value": value, "nimg": nimg, "iteration": iteration}
            self.save_best_file(self.best_path, {"eval": {"key": self.key, **self.best}})
        if self.say:
            best = "" if self.best is None else f" (best {self.best['value']:.5g} at {self.best['nimg'] / 1000:g} kimg)"
            self.say(f"sidfast distill: {self.metric.name} {value:.5g} at {nimg / 1000:g} kimg, "
                     f"{seconds:.1f} s{best}")
        return record

    def _isolated(self, fn):
        """``fn()`` with every random stream of the trainer (torch CPU, the device's, numpy, Python) as it
        was before, the EMA generator in eval mode, and FSDP's networks resharded after."""
        run = self.run
        saved = runtime.rng_state(run.device)
        mode = run.generator.training
        run.generator.eval()
        try:
            with torch.no_grad():
                return fn()
        finally:
            run.generator.train(mode)
            runtime.set_rng_state(saved, run.device)
            self.after_forwards()

    def summary(self) -> dict:
        """summary.json's entries: the best value, where and when."""
        out = {} if self.setup_seconds is None else {"eval_setup_seconds": round(self.setup_seconds, 3)}
        if self.best is None:
            return out
        key = self.metric.key
        return {**out, f"best_{key}": self.best["value"], "best_nimg": self.best["nimg"],
                "best_iteration": self.best["iteration"], "best_checkpoint": str(self.best_path)}


__all__ = ["EvalRun", "Metric", "Evaluation", "check_metric", "eval_key", "read_best_eval", "BEST_NAME"]
