"""The demo's recipe: the teacher's training settings, the networks and SiD options behind its numbers,
and the builder its checkpoints name."""
from __future__ import annotations

import dataclasses
from dataclasses import asdict, dataclass, field

from sidfast.demo.digits import IMAGE_SHAPE, SIGMA_DATA

BUILDER = "sidfast.demo.nets:build_denoiser"


@dataclass
class TeacherConfig:
    iterations: int = 4000      # optimizer steps
    batch: int = 256            # images per step
    lr: float = 2e-3            # Adam learning rate, cosine-decayed to lr_final_ratio * lr
    lr_final_ratio: float = 0.05
    warmup: int = 100           # linear warm-up steps
    ema_decay: float = 0.999    # per-step EMA of the weights; the EMA is the teacher
    p_mean: float = -1.2        # ln sigma ~ N(p_mean, p_std^2) (EDM, Table 1)
    p_std: float = 1.2
    sigma_data: float = 0.5
    label_dropout: float = 0.0  # conditional nets: probability of the null label (a zero one-hot row)
    seed: int = 0

    def to_dict(self) -> dict:
        return asdict(self)


@dataclass
class DemoConfig:
    """Everything that decides the demo's numbers (written into report.json)."""

    net: dict = field(default_factory=lambda: {"image_shape": list(IMAGE_SHAPE), "width": 256, "depth": 3,
                                               "emb_dim": 64, "num_classes": 0, "dropout": 0.0,
                                               "sigma_data": SIGMA_DATA})
    teacher: TeacherConfig = field(default_factory=lambda: TeacherConfig(iterations=2500))
    # sidfast.training.loop.TrainConfig options; the rest keep their published defaults (docs/math.md, "Published
    # recipe"). The published lr 1e-5 and EMA ramp-up 0.05 are tuned for ~400M images; the demo sees under 1M,
    # so it uses a 30x larger lr and an EMA half-life of 10% of the images seen. sigma_max stays at 80.
    sid: dict = field(default_factory=lambda: {"iterations": 3000, "batch": 256, "lr": 3e-4,
                                               "ema_halflife_kimg": 500.0, "ema_rampup_ratio": 0.1})
    teacher_steps: int = 18         # Heun steps of the teacher's sampler (2N - 1 network evaluations)
    eval_samples: int = 2000        # generated samples per Frechet distance (reference: all 1,797 digits)
    grid_size: int = 64

    def to_dict(self) -> dict:
        return asdict(self)


def demo_config(quick: bool, seed: int = 0) -> DemoConfig:
    """The full or quick demo configuration (the quick one trains shorter, for CI)."""
    cfg = DemoConfig()
    cfg.teacher = dataclasses.replace(cfg.teacher, seed=seed)
    if quick:
        cfg.teacher = dataclasses.replace(cfg.teacher, iterations=1200)
        cfg.sid = {**cfg.sid, "iterations": 600, "batch": 128}
    return cfg


__all__ = ["BUILDER", "TeacherConfig", "DemoConfig", "demo_config"]
