"""The metrics ``sidfast distill --eval NAME`` can measure in the loop, by name.

A metric implements ``sidfast.training.evaluation.Metric`` (``name``, ``lower_is_better``, ``setup(run)``,
``compute(run)``); ``METRICS`` maps each ``--eval`` value to the function that builds it from the run's
options (``eval_num``, ``eval_ref``, ``eval_inception``). A name of ``sidfast.training.config.EVAL_METRICS``
without an entry here is refused in one line: a metric is added by adding its entry.
"""
from __future__ import annotations

from sidfast.evaluate.loop_fid import LoopFID
from sidfast.evaluate.teacher_fd import TeacherFD
from sidfast.training.config import EVAL_METRICS, TrainConfig
from sidfast.training.evaluation import Metric

METRICS = {
    "teacher-fd": lambda cfg: TeacherFD(num=cfg.eval_num, ref=cfg.eval_ref),
    "fid": lambda cfg: LoopFID(num=cfg.eval_num, ref=cfg.eval_ref, inception=cfg.eval_inception),
}

_MISSING: dict = {}  # a metric of EVAL_METRICS this installation lacks: why, in words


def metric_for(cfg: TrainConfig) -> Metric | None:
    """The metric option ``eval`` names, built from the run's options; None when ``eval`` is off. A
    ValueError naming the option for a metric this installation does not have."""
    if cfg.eval is None:
        return None
    if cfg.eval not in METRICS:
        why = _MISSING.get(cfg.eval, f"not a metric of this sidfast ({', '.join(METRICS)})")
        raise ValueError(f"option eval {cfg.eval}: {why}")
    return METRICS[cfg.eval](cfg)


def available() -> tuple[str, ...]:
    """The ``--eval`` values this installation measures."""
    return tuple(name for name in EVAL_METRICS if name in METRICS)


__all__ = ["METRICS", "metric_for", "available"]
