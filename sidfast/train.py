"""The thin SiD trainer: SPEC section 5 wired to ``sidfast.loss``, with EMA, checkpoints and DDP.

API (stable; the demo and the command line use it)::

    from sidfast.train import TrainConfig, distill
    cfg = TrainConfig(run_dir="runs/x", iterations=2000, batch=64, lr=1e-5, device="cpu")
    result = distill(cfg, teacher)                 # generator and fake score default to deep copies
    result.generator_ema                          # the one-step student (eval mode), x = G(2.5 z, 2.5)

- ``TrainConfig``: a dataclass, every field with the published default and a one-line help
  (``TrainConfig.help(name)``); ``TrainConfig.from_dict(d)``, ``TrainConfig.from_file("cfg.yaml"|".json")``,
  ``cfg.replace(**changes)``, ``cfg.to_dict()``; ``cfg.validate()`` raises ValueError naming the option.
- ``distill(config, teacher, generator=None, fake=None, callbacks=(), architecture=None) -> DistillResult``.
  ``teacher``/``generator``/``fake``: denoisers ``forward(x, sigma (B,), class_labels=None) -> x0_hat`` in EDM
  (VE) coordinates, or anything ``sidfast.denoisers.as_denoiser`` wraps. The teacher is put in eval mode and
  frozen (in place). ``callbacks``: callables ``cb(state: dict) -> bool | None`` run after every iteration
  (keys: iteration, nimg, loss_g, loss_fake (detached tensors of that iteration), generator, generator_ema,
  fake, teacher, rank, world_size); returning True stops the run like a signal does (checkpoint, then return).
  ``architecture``: ``{"builder": "module:function", "config": {...}}`` that rebuilds the generator's
  network (stored in the checkpoint so ``sidfast sample`` can load it); ``config.teacher`` (a path or
  entry point) serves the same purpose when set.
- ``DistillResult``: generator, generator_ema, fake, iteration, nimg, seconds, interrupted (None, "SIGINT",
  "SIGTERM" or "callback"), checkpoint (path or None), run_dir, summary (dict), last (last logged metrics).

One iteration (SPEC section 5; published ``sid_training_loop.py``):
1. fake-score update on fresh samples x_g = G(sigma_init z, sigma_init) drawn without gradient (G in eval):
   EDM denoising loss (SPEC section 4), sum / batch * loss_scale_fake, nan_to_num on the gradients, Adam;
2. generator update on new fresh samples (G in train mode, fake score in eval, teacher frozen): SiD loss
   (SPEC section 3) at sigma from ``reference.generator_sigma``, sum / batch * loss_scale_g, backward into
   G's parameters only (``backward(inputs=...)``: the score networks pass input gradients, no weight
   gradients), nan_to_num, Adam;
3. EMA of G, EDM's formula: beta = 0.5 ** (batch / max(min(halflife, nimg * rampup), 1e-8)).

Score networks: ``engine="eager"`` calls teacher and fake score one after the other (``evaluate_scores``);
``engine="score_engine"`` hands both phases to ``sidfast.engine.ScoreEngine`` (frozen views, one CUDA graph per
phase on GPU; bitwise the same updates on CPU). Under DDP the fake-score phase stays on the DDP wrapper.

Determinism: every random draw uses the global torch RNG, seeded per rank as published
(numpy seed (seed * world + rank), torch seed drawn from it); checkpoints carry every rank's RNG states,
so a resumed CPU run reproduces the uninterrupted run bitwise. Sample grids use their own generator.
"""
from __future__ import annotations

import contextlib
import copy
import dataclasses
import inspect
import json
import math
import os
import random
import signal
import threading
import time
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Optional

import numpy as np
import torch
from torch import nn

from . import reference
from .checkpoint import FORMATS, VERSION, CheckpointError, atomic_save, load_checkpoint
from .denoisers import DiffusersDenoiser, as_denoiser
from .loss import fake_score_loss, sid_generator_loss

PRECISIONS = ("fp32", "bf16", "fp16")
LABEL_FORMATS = ("auto", "onehot", "index")
ENGINES = ("eager", "score_engine")
CHECKPOINT_NAME = "checkpoint.pt"


def _f(default, help: str, **kw):
    return field(default=default, metadata={"help": help, **kw})


@dataclass
class TrainConfig:
    """SiD distillation options; defaults are the published CIFAR-10 recipe (SPEC section 5)."""

    run_dir: str = _f("runs/sid", "output directory: checkpoint.pt, metrics.jsonl, PNG grids, losses.png")
    teacher: Optional[str] = _f(None, "teacher: sidfast checkpoint, local diffusers directory, or module:function")
    iterations: int = _f(1_580_000, "SiD iterations to run (published CIFAR-10: ~1.58M at batch 256, ~400M images)")
    batch: int = _f(256, "generator samples per update, summed over all processes (published: 256 on CIFAR-10)")
    batch_gpu: Optional[int] = _f(None, "samples per process per forward pass; smaller than batch/world accumulates")
    lr: float = _f(1e-5, "Adam learning rate of the generator (published: 1e-5 CIFAR-10/FFHQ, 4e-6 ImageNet 64)")
    fake_lr: Optional[float] = _f(None, "Adam learning rate of the fake score (default: same as lr)")
    betas: tuple = _f((0.0, 0.999), "Adam betas of both optimizers (published: 0 0.999)")
    adam_eps: Optional[float] = _f(None, "Adam epsilon (default: 1e-8, or 1e-6 with fp16 as published)")
    alpha: float = _f(1.2, "SiD alpha, weight of the ||f_phi - f_psi||^2 term (published: 1.2; 1.0 on AFHQ)")
    sigma_init: float = _f(2.5, "generator input noise level: x_g = G(sigma_init * z, sigma_init)")
    tmax: int = _f(800, "generator-loss noise levels use t ~ U(0, tmax/1000) on EDM's rho schedule (1..1000)")
    sigma_min: float = _f(0.002, "smallest sigma of the rho schedule")
    sigma_max: float = _f(80.0, "largest sigma of the rho schedule")
    rho: float = _f(7.0, "rho of EDM's sigma schedule")
    p_mean: float = _f(-1.2, "fake-score loss: ln sigma ~ N(p_mean, p_std^2)")
    p_std: float = _f(1.2, "fake-score loss: standard deviation of ln sigma")
    sigma_data: float = _f(0.5, "data standard deviation in EDM's loss weighting")
    loss_scale_g: float = _f(100.0, "generator loss scale (published loss_scaling_G = 100)")
    loss_scale_fake: float = _f(1.0, "fake-score loss scale (published loss_scaling = 1)")
    ema_halflife_kimg: float = _f(500.0, "EMA half-life of the generator in thousands of images (0.5 Mimg)")
    ema_rampup_ratio: Optional[float] = _f(0.05, "EMA ramp-up: half-life <= ratio * images seen (none: off)")
    precision: str = _f("fp32", "network precision: fp32, bf16 (autocast) or fp16 (autocast); fp32 losses")
    seed: int = _f(0, "random seed; rank r of w processes seeds with seed * w + r as published")
    num_classes: Optional[int] = _f(None, "classes of a conditional teacher (default: read from the network)")
    label_format: str = _f("auto", "class labels as onehot (EDM) or index (diffusers); auto picks by network")
    image_shape: Optional[tuple] = _f(None, "generator output shape C H W (default: read from the network)")
    device: str = _f("auto", "device: auto, cpu, cuda or cuda:N (auto picks cuda when available)")
    checkpoint_every: int = _f(1000, "write checkpoint.pt every N iterations (0: only at the end and on signals)")
    log_every: int = _f(10, "append averaged losses to metrics.jsonl and refresh the progress bar every N")
    sample_every: int = _f(1000, "write a student sample grid every N iterations (0: start and end only)")
    grid_size: int = _f(64, "images in each sample grid (0: no grids)")
    teacher_steps: int = _f(18, "Heun steps for the teacher's sample grid (0: no teacher grid)")
    progress: bool = _f(True, "show a progress bar")
    resume: Optional[str] = _f(None, "continue from this checkpoint ('auto': run_dir/checkpoint.pt)")
    overwrite: bool = _f(False, "start afresh even if run_dir already holds a checkpoint")
    engine: str = _f("eager", "score networks: eager (plain calls) or score_engine (sidfast.engine, CUDA graphs)")

    # ---- construction ----
    @classmethod
    def fields(cls) -> list[dataclasses.Field]:
        return list(dataclasses.fields(cls))

    @classmethod
    def help(cls, name: str) -> str:
        return {f.name: f.metadata["help"] for f in cls.fields()}[name]

    @classmethod
    def from_dict(cls, values: dict, base: "TrainConfig | None" = None) -> "TrainConfig":
        """A config from a mapping of option names (dashes or underscores) to values, over ``base``."""
        if not isinstance(values, dict):
            raise ValueError(f"a config must be a mapping of option names to values, got {type(values).__name__}")
        known = {f.name for f in cls.fields()}
        clean = {}
        for key, value in values.items():
            name = str(key).replace("-", "_")
            if name not in known:
                raise ValueError(f"unknown option {key!r}; valid options: {', '.join(sorted(known))}")
            clean[name] = value
        cfg = dataclasses.replace(base, **clean) if base is not None else cls(**clean)
        return cfg.validate()

    @classmethod
    def from_file(cls, path, base: "TrainConfig | None" = None) -> "TrainConfig":
        """A config from a YAML (.yaml/.yml) or JSON (.json) file of option names to values."""
        path = Path(path)
        if not path.is_file():
            raise FileNotFoundError(f"config file {str(path)!r} does not exist")
        try:
            text = path.read_text(encoding="utf-8")
        except OSError as exc:
            raise OSError(f"config file {str(path)!r} cannot be read: {exc.strerror or exc}") from None
        suffix = path.suffix.lower()
        try:
            if suffix == ".json":
                data = json.loads(text)
            elif suffix in (".yaml", ".yml"):
                import yaml

                data = yaml.safe_load(text)
            else:
                raise ValueError(f"config file {str(path)!r} must end in .yaml, .yml or .json")
        except (json.JSONDecodeError, ImportError) as exc:
            raise ValueError(f"config file {str(path)!r} is not valid {suffix[1:].upper()}: {exc}") from None
        except Exception as exc:  # yaml.YAMLError
            if type(exc).__module__.startswith("yaml"):
                raise ValueError(f"config file {str(path)!r} is not valid YAML: {exc}") from None
            raise
        if data is None:
            data = {}
        try:
            return cls.from_dict(data, base)
        except ValueError as exc:
            raise ValueError(f"config file {str(path)!r}: {exc}") from None

    def replace(self, **changes) -> "TrainConfig":
        return dataclasses.replace(self, **changes).validate()

    def to_dict(self) -> dict:
        d = dataclasses.asdict(self)
        return {k: (list(v) if isinstance(v, tuple) else v) for k, v in d.items()}

    # ---- validation ----
    def validate(self) -> "TrainConfig":
        """Coerce types and check ranges; raises TypeError/ValueError naming the option. Returns self."""
        def num(name, kind=float, lo=None, hi=None, lo_open=False, optional=False):
            v = getattr(self, name)
            if v is None and optional:
                return
            if isinstance(v, str) and optional and v.strip().lower() in ("none", "null", "off"):
                setattr(self, name, None)
                return
            if isinstance(v, bool) or not isinstance(v, (int, float, str)):
                raise TypeError(f"option {name} must be a number, got {v!r}")
            what = "an integer" if kind is int else "a number"
            try:
                v = float(v)
            except ValueError:
                raise ValueError(f"option {name} must be {what}, got {getattr(self, name)!r}") from None
            if kind is int:
                if not v.is_integer():
                    raise ValueError(f"option {name} must be {what}, got {getattr(self, name)!r}")
                v = int(v)
            if kind is float and not math.isfinite(v):
                raise ValueError(f"option {name} must be finite, got {v}")
            if lo is not None and (v <= lo if lo_open else v < lo):
                raise ValueError(f"option {name} must be {'>' if lo_open else '>='} {lo}, got {v}")
            if hi is not None and v > hi:
                raise ValueError(f"option {name} must be <= {hi}, got {v}")
            setattr(self, name, v)

        num("iterations", int, 0)
        num("batch", int, 1)
        num("batch_gpu", int, 1, optional=True)
        num("lr", float, 0, lo_open=True)
        num("fake_lr", float, 0, lo_open=True, optional=True)
        num("adam_eps", float, 0, lo_open=True, optional=True)
        num("alpha", float)
        num("sigma_init", float, 0, lo_open=True)
        num("tmax", int, 1, 1000)
        num("sigma_min", float, 0, lo_open=True)
        num("sigma_max", float, 0, lo_open=True)
        if self.sigma_min >= self.sigma_max:
            raise ValueError(f"option sigma_min ({self.sigma_min}) must be below sigma_max ({self.sigma_max})")
        num("rho", float, 0, lo_open=True)
        num("p_mean", float)
        num("p_std", float, 0, lo_open=True)
        num("sigma_data", float, 0, lo_open=True)
        num("loss_scale_g", float, 0, lo_open=True)
        num("loss_scale_fake", float, 0, lo_open=True)
        num("ema_halflife_kimg", float, 0)
        num("ema_rampup_ratio", float, 0, lo_open=True, optional=True)
        num("seed", int, 0)
        num("num_classes", int, 0, optional=True)
        for name in ("checkpoint_every", "log_every", "sample_every", "grid_size", "teacher_steps"):
            num(name, int, 0)
        if self.log_every < 1:
            raise ValueError(f"option log_every must be >= 1, got {self.log_every}")
        betas = self.betas
        if isinstance(betas, str):
            betas = betas.replace(",", " ").split()
        try:
            betas = tuple(float(b) for b in betas)
        except (TypeError, ValueError):
            raise ValueError(f"option betas must be two numbers, got {self.betas!r}") from None
        if len(betas) != 2 or not all(0 <= b < 1 for b in betas):
            raise ValueError(f"option betas must be two numbers in [0, 1), got {self.betas!r}")
        self.betas = betas
        if self.image_shape is not None:
            shape = self.image_shape
            if isinstance(shape, str):
                shape = shape.replace(",", " ").replace("x", " ").split()
            try:
                shape = tuple(int(s) for s in shape)
            except (TypeError, ValueError):
                raise ValueError(f"option image_shape must be integers C H W, got {self.image_shape!r}") from None
            if not shape or any(s < 1 for s in shape):
                raise ValueError(f"option image_shape must be positive integers, got {self.image_shape!r}")
            self.image_shape = shape
        for name, choices in (("precision", PRECISIONS), ("label_format", LABEL_FORMATS), ("engine", ENGINES)):
            if getattr(self, name) not in choices:
                raise ValueError(f"option {name} must be one of {', '.join(choices)}, got {getattr(self, name)!r}")
        for name in ("run_dir", "device"):
            if not isinstance(getattr(self, name), str) or not getattr(self, name):
                raise ValueError(f"option {name} must be a non-empty string, got {getattr(self, name)!r}")
        for name in ("teacher", "resume"):
            v = getattr(self, name)
            if v is not None and not isinstance(v, str):
                raise ValueError(f"option {name} must be a string, got {v!r}")
        for name in ("progress", "overwrite"):
            v = getattr(self, name)
            if isinstance(v, str) and v.lower() in ("true", "false", "yes", "no", "1", "0"):
                v = v.lower() in ("true", "yes", "1")
            if not isinstance(v, bool):
                raise ValueError(f"option {name} must be true or false, got {v!r}")
            setattr(self, name, v)
        return self

    @property
    def optimizer_eps(self) -> float:
        return self.adam_eps if self.adam_eps is not None else (1e-6 if self.precision == "fp16" else 1e-8)


# ---- devices, processes, seeds ----

def resolve_device(spec: str, local_rank: int = 0) -> torch.device:
    """torch.device for "auto", "cpu", "cuda", "cuda:N" (raises ValueError with the fix when unavailable)."""
    spec = str(spec).strip().lower()
    if spec == "auto":
        spec = "cuda" if torch.cuda.is_available() else "cpu"
    try:
        device = torch.device(spec)
    except RuntimeError:
        raise ValueError(f"device {spec!r} is not a device name; use auto, cpu, cuda or cuda:N") from None
    if device.type == "cuda":
        if not torch.cuda.is_available():
            raise ValueError(f"device {spec!r} was asked but no CUDA GPU is available "
                             f"(torch {torch.__version__}, cuda build {torch.version.cuda}); use --device cpu")
        index = device.index if device.index is not None else local_rank
        if index >= torch.cuda.device_count():
            raise ValueError(f"device cuda:{index} does not exist; {torch.cuda.device_count()} GPU(s) visible")
        device = torch.device("cuda", index)
    elif device.type != "cpu":
        if device.type == "mps" and torch.backends.mps.is_available():
            return device
        raise ValueError(f"device {spec!r} is not supported here; use auto, cpu, cuda or cuda:N")
    return device


@dataclass
class _Dist:
    rank: int = 0
    world: int = 1
    local_rank: int = 0
    owned: bool = False  # this module initialized the process group (and tears it down)
    control: object = None  # a gloo group for stop flags and RNG gathering (CPU collectives, no GPU sync)

    @property
    def enabled(self) -> bool:
        return self.world > 1


def _setup_distributed(device_spec: str) -> _Dist:
    import torch.distributed as dist

    if not dist.is_available():
        return _Dist()
    owned = False
    if not dist.is_initialized():
        if int(os.environ.get("WORLD_SIZE", "1")) <= 1:
            return _Dist()
        local_rank = int(os.environ.get("LOCAL_RANK", "0"))
        use_cuda = device_spec.startswith("cuda") or (device_spec == "auto" and torch.cuda.is_available())
        if use_cuda:
            torch.cuda.set_device(resolve_device(device_spec, local_rank))
        dist.init_process_group(backend="nccl" if use_cuda else "gloo")
        owned = True
    world, rank = dist.get_world_size(), dist.get_rank()
    local_rank = int(os.environ.get("LOCAL_RANK", rank))
    control = dist.new_group(backend="gloo") if dist.get_backend() != "gloo" else dist.group.WORLD
    return _Dist(rank=rank, world=world, local_rank=local_rank, owned=owned, control=control)


def seed_everything(seed: int, rank: int = 0, world: int = 1) -> None:
    """Published per-rank seeding: numpy seeded with (seed * world + rank), torch with a draw from numpy."""
    s = (seed * world + rank) % (1 << 31)
    np.random.seed(s)
    torch.manual_seed(int(np.random.randint(1 << 31)))
    random.seed(s)


def rng_state(device: torch.device) -> dict:
    name, keys, pos, has_gauss, cached = np.random.get_state()
    return {"torch": torch.get_rng_state(),
            "cuda": torch.cuda.get_rng_state(device) if device.type == "cuda" else None,
            "numpy": (name, torch.from_numpy(keys.astype(np.int64)), int(pos), int(has_gauss), float(cached)),
            "python": random.getstate()}


def set_rng_state(state: dict, device: torch.device) -> None:
    torch.set_rng_state(state["torch"])
    if device.type == "cuda" and state.get("cuda") is not None:
        torch.cuda.set_rng_state(state["cuda"], device)
    name, keys, pos, has_gauss, cached = state["numpy"]
    np.random.set_state((name, keys.numpy().astype(np.uint32), pos, has_gauss, cached))
    version, internal, gauss = state["python"]
    random.setstate((version, tuple(internal), gauss))


# ---- what the networks look like ----

def _modules_of(net):
    seen, stack = [], [net]
    while stack:
        m = stack.pop(0)
        if m is None or any(m is s for s in seen):
            continue
        seen.append(m)
        for attr in ("network", "module", "net", "unet", "model"):
            try:
                inner = getattr(m, attr, None)
            except Exception:  # properties that raise
                inner = None
            if inner is not None and not isinstance(inner, (str, int, float)):
                stack.append(inner)
    return seen


def infer_image_shape(net) -> tuple | None:
    """(C, H, W) from ``image_shape``, EDM's ``img_channels``/``img_resolution`` or a diffusers config."""
    for m in _modules_of(net):
        shape = getattr(m, "image_shape", None)
        if shape is not None:
            return tuple(int(s) for s in shape)
        if hasattr(m, "img_channels") and hasattr(m, "img_resolution"):
            r = int(m.img_resolution)
            return (int(m.img_channels), r, r)
        cfg = getattr(m, "config", None)
        size, ch = getattr(cfg, "sample_size", None), getattr(cfg, "in_channels", None)
        if size is not None and ch is not None:
            hw = (int(size), int(size)) if isinstance(size, int) else tuple(int(s) for s in size)
            return (int(ch), *hw)
    return None


def infer_num_classes(net) -> int:
    """Classes of a conditional network (``num_classes``, EDM's ``label_dim``, diffusers' ``num_class_embeds``)."""
    for m in _modules_of(net):
        for attr in ("num_classes", "label_dim"):
            v = getattr(m, attr, None)
            if isinstance(v, int) and not isinstance(v, bool):
                return v
        v = getattr(getattr(m, "config", None), "num_class_embeds", None)
        if isinstance(v, int):
            return v
    return 0


def make_labels(n: int, num_classes: int, fmt: str, device, generator: torch.Generator | None = None):
    """Uniform random class labels (n,) indices or (n, K) one-hot float; None for unconditional."""
    if not num_classes:
        return None
    idx = torch.randint(num_classes, (n,), device=device, generator=generator)
    return nn.functional.one_hot(idx, num_classes).float() if fmt == "onehot" else idx


def ema_beta(nimg: int, batch: int, halflife_kimg: float, rampup_ratio: float | None) -> float:
    """EDM's EMA decay per iteration (Karras et al. 2022, training_loop.py): half-life in images, ramped up."""
    halflife = halflife_kimg * 1000
    if rampup_ratio is not None:
        halflife = min(halflife, nimg * rampup_ratio)
    return 0.5 ** (batch / max(halflife, 1e-8))


@torch.no_grad()
def update_ema(ema: nn.Module, net: nn.Module, beta: float) -> None:
    """ema <- net + beta * (ema - net) for parameters (published arithmetic); buffers copied."""
    for pe, p in zip(ema.parameters(), net.parameters()):
        pe.copy_(p.detach().lerp(pe, beta))
    for be, b in zip(ema.buffers(), net.buffers()):
        be.copy_(b)


def sanitize_grads(params) -> None:
    """Published: grad <- nan_to_num(grad, nan=0, posinf=1e5, neginf=-1e5), in place."""
    for p in params:
        if p.grad is not None:
            torch.nan_to_num(p.grad, nan=0.0, posinf=1e5, neginf=-1e5, out=p.grad)


def evaluate_scores(teacher: nn.Module, fake: nn.Module, x_t: torch.Tensor, sigma: torch.Tensor, labels):
    """(y_real, y_fake): teacher and fake-score x0 estimates at x_t, (B, *F) each.

    The eager path (``engine="eager"``); ``engine="score_engine"`` uses ``sidfast.engine.ScoreEngine`` instead.
    """
    return teacher(x_t, sigma, labels), fake(x_t, sigma, labels)


# ---- signals ----

class _StopRequest:
    """SIGINT/SIGTERM set a flag (the loop finishes its iteration, saves, returns); a second SIGINT aborts."""

    SIGNALS = ("SIGINT", "SIGTERM")

    def __init__(self):
        self.reason: str | None = None
        self._old = {}

    def __enter__(self):
        if threading.current_thread() is threading.main_thread():
            for name in self.SIGNALS:
                sig = getattr(signal, name, None)
                if sig is not None:
                    self._old[sig] = signal.signal(sig, self._handle)
        return self

    def _handle(self, signum, frame):
        name = signal.Signals(signum).name
        if self.reason is not None and name == "SIGINT":
            raise KeyboardInterrupt
        self.reason = name

    def __exit__(self, *exc):
        for sig, old in self._old.items():
            signal.signal(sig, old)
        return False


# ---- the result ----

@dataclass
class DistillResult:
    generator: nn.Module
    generator_ema: nn.Module
    fake: nn.Module
    iteration: int
    nimg: int
    seconds: float
    interrupted: Optional[str]
    checkpoint: Optional[Path]
    run_dir: Path
    summary: dict
    last: dict


def _resume_path(cfg: TrainConfig) -> Path | None:
    if cfg.resume is None:
        return None
    return Path(cfg.run_dir) / CHECKPOINT_NAME if cfg.resume == "auto" else Path(cfg.resume)


TRAJECTORY_OPTIONS = ("batch", "batch_gpu", "lr", "fake_lr", "betas", "adam_eps", "alpha", "sigma_init", "tmax",
                      "sigma_min", "sigma_max", "rho", "p_mean", "p_std", "sigma_data", "loss_scale_g",
                      "loss_scale_fake", "ema_halflife_kimg", "ema_rampup_ratio", "precision", "seed",
                      "num_classes", "label_format", "image_shape", "engine")


class _Trainer:
    def __init__(self, cfg, teacher, generator, fake, callbacks, architecture):
        cfg.validate()
        self.cfg = cfg
        self.callbacks = list(callbacks or ())
        self.dist = _setup_distributed(cfg.device)
        self.rank0 = self.dist.rank == 0
        self.device = resolve_device(cfg.device, self.dist.local_rank)
        self.run_dir = Path(cfg.run_dir)
        self.ckpt_path = self.run_dir / CHECKPOINT_NAME

        resume = _resume_path(cfg)
        if resume is None and self.ckpt_path.exists() and not cfg.overwrite:
            raise ValueError(f"run directory {str(self.run_dir)!r} already holds {CHECKPOINT_NAME}; pass "
                             "resume='auto' (--resume) to continue it, overwrite=True (--overwrite) to start "
                             "afresh, or choose another run_dir")
        # checkpoint read before any network is touched, so a bad file costs nothing
        self.state = load_checkpoint(resume, "distill") if resume is not None else None

        # networks: teacher frozen in eval; generator and fake score trainable copies (SPEC section 5)
        self.teacher = as_denoiser(teacher, name="teacher").to(self.device).eval().requires_grad_(False)
        G = copy.deepcopy(self.teacher) if generator is None else as_denoiser(generator, name="generator")
        F = copy.deepcopy(self.teacher) if fake is None else as_denoiser(fake, name="fake score")
        if G.name == "teacher":
            G.name = "generator"
        if F.name == "teacher":
            F.name = "fake score"
        self.G = G.to(self.device).train().requires_grad_(True)
        self.fake = F.to(self.device).train().requires_grad_(True)
        for net, name in ((self.G, "generator"), (self.fake, "fake score")):
            if not any(True for _ in net.parameters()):
                raise ValueError(f"the {name} has no parameters to train")
        self.G_ema = copy.deepcopy(self.G).eval().requires_grad_(False)
        self.g_params = [p for p in self.G.parameters() if p.requires_grad]
        self.fake_params = [p for p in self.fake.parameters() if p.requires_grad]

        shape = cfg.image_shape or infer_image_shape(self.teacher) or infer_image_shape(self.G)
        if shape is None:
            raise ValueError("cannot determine the image shape from the teacher (no image_shape, img_resolution or "
                             "diffusers sample_size); set image_shape (--image-shape C H W)")
        self.image_shape = tuple(shape)
        self.num_classes = cfg.num_classes if cfg.num_classes is not None else infer_num_classes(self.teacher)
        fmt = cfg.label_format
        if fmt == "auto":
            fmt = "index" if isinstance(self.teacher, DiffusersDenoiser) else "onehot"
        self.label_format = fmt

        d = self.dist
        if cfg.batch % d.world:
            raise ValueError(f"option batch ({cfg.batch}) must be divisible by the number of processes ({d.world})")
        self.batch_rank = cfg.batch // d.world
        self.batch_gpu = min(cfg.batch_gpu or self.batch_rank, self.batch_rank)
        if self.batch_rank % self.batch_gpu:
            raise ValueError(f"option batch_gpu ({self.batch_gpu}) must divide the per-process batch "
                             f"({self.batch_rank} = batch {cfg.batch} / {d.world} processes)")
        self.rounds = self.batch_rank // self.batch_gpu

        self.architecture = architecture
        eps = cfg.optimizer_eps
        self.opt_g = torch.optim.Adam(self.g_params, lr=cfg.lr, betas=cfg.betas, eps=eps)
        self.opt_fake = torch.optim.Adam(self.fake_params, lr=cfg.fake_lr or cfg.lr, betas=cfg.betas, eps=eps)
        self.iteration, self.nimg = 0, 0
        seed_everything(cfg.seed, d.rank, d.world)
        if self.state is not None:
            self._restore(self.state, resume)

        self.autocast_dtype = {"fp32": None, "bf16": torch.bfloat16, "fp16": torch.float16}[cfg.precision]
        self.engine = None
        if cfg.engine == "score_engine":
            from .engine import ScoreEngine

            # teacher and fake score evaluated together over frozen views of the same storage (CUDA graphs on GPU)
            self.engine = ScoreEngine(self.teacher, self.fake, mode="full", amp_dtype=self.autocast_dtype)
        if d.enabled:
            from torch.nn.parallel import DistributedDataParallel as DDP

            kw = {"device_ids": [self.device.index] if self.device.type == "cuda" else None}
            # published: buffers are not broadcast in forward (the name changed in newer torch)
            if "forward_sync_buffers" in inspect.signature(DDP.__init__).parameters:
                kw["forward_sync_buffers"] = False
            else:
                kw["broadcast_buffers"] = False
            self.G_train = DDP(self.G, **kw)
            self.fake_train = DDP(self.fake, **kw)
        else:
            self.G_train, self.fake_train = self.G, self.fake

    # ---- checkpoint state ----
    def _restore(self, data: dict, path: Path) -> None:
        old = data.get("config", {})
        if self.rank0:
            changed = [k for k in TRAJECTORY_OPTIONS
                       if k in old and _norm(old[k]) != _norm(getattr(self.cfg, k))]
            if changed:
                warnings.warn(f"resuming {str(path)!r} with changed options {changed}: the run will not match an "
                              "uninterrupted one", stacklevel=3)
        try:
            self.G.load_state_dict(data["generator"])
            self.G_ema.load_state_dict(data["generator_ema"])
            self.fake.load_state_dict(data["fake"])
            self.opt_g.load_state_dict(data["opt_g"])
            self.opt_fake.load_state_dict(data["opt_fake"])
        except (RuntimeError, ValueError, KeyError) as exc:
            raise CheckpointError(f"checkpoint {str(path)!r} does not fit these networks (another teacher or "
                                  f"architecture?): {str(exc).strip()[:400]}") from None
        self.iteration, self.nimg = int(data["iteration"]), int(data["nimg"])
        states = data.get("rng") or []
        if int(data.get("world_size", 1)) == self.dist.world and len(states) == self.dist.world:
            set_rng_state(states[self.dist.rank], self.device)
        else:
            if self.rank0:
                warnings.warn(f"checkpoint {str(path)!r} was written by {data.get('world_size')} process(es), this "
                              f"run has {self.dist.world}: random streams are re-seeded from seed + iteration",
                              stacklevel=3)
            seed_everything(self.cfg.seed + self.iteration, self.dist.rank, self.dist.world)

    def _gather_rng(self) -> list:
        mine = rng_state(self.device)
        if not self.dist.enabled:
            return [mine]
        import torch.distributed as dist

        out = [None] * self.dist.world
        dist.all_gather_object(out, mine, group=self.dist.control)
        return out

    def save(self, last: dict) -> Path | None:
        rngs = self._gather_rng()
        path = None
        if self.rank0:
            path = atomic_save({
                "format": FORMATS["distill"], "version": VERSION,
                "iteration": self.iteration, "nimg": self.nimg, "world_size": self.dist.world,
                "config": self.cfg.to_dict(),
                "generator": self.G.state_dict(), "generator_ema": self.G_ema.state_dict(),
                "fake": self.fake.state_dict(),
                "opt_g": self.opt_g.state_dict(), "opt_fake": self.opt_fake.state_dict(),
                "rng": rngs, "architecture": self.architecture, "teacher": self.cfg.teacher,
                "image_shape": list(self.image_shape), "num_classes": self.num_classes,
                "label_format": self.label_format, "sigma_init": self.cfg.sigma_init, "last": last,
            }, self.ckpt_path)
        self._barrier()
        return path

    def _barrier(self):
        if self.dist.enabled:
            import torch.distributed as dist

            dist.barrier(group=self.dist.control)

    # ---- one iteration ----
    def _autocast(self):
        if self.autocast_dtype is None:
            return contextlib.nullcontext()
        return torch.autocast(self.device.type, dtype=self.autocast_dtype)

    def _generate(self, net, n):
        z = torch.randn((n, *self.image_shape), device=self.device)
        labels = make_labels(n, self.num_classes, self.label_format, self.device)
        sig = torch.full((n,), self.cfg.sigma_init, device=self.device)
        with self._autocast():
            x_g = net(self.cfg.sigma_init * z, sig, labels)  # x_g = G(sigma_init z, sigma_init) (SPEC section 5)
        return x_g.float(), labels

    def scores(self, x_g, sigma, noise, labels):
        """(y_real, y_fake) at x_t = x_g + sigma * noise: teacher and fake score, input gradients only."""
        if self.engine is not None:
            return self.engine.generator_terms(x_g, sigma, labels, noise=noise)
        x_t = x_g + sigma.view(-1, *[1] * (x_g.dim() - 1)) * noise
        with self._autocast():
            return evaluate_scores(self.teacher, self.fake, x_t, sigma, labels)

    def fake_step(self) -> torch.Tensor:
        """Fake-score update on fresh generator samples (SPEC section 4); returns the mean loss (detached)."""
        cfg, total = self.cfg, torch.zeros((), device=self.device)
        self.G.eval()
        self.fake.train()
        self.opt_fake.zero_grad(set_to_none=True)
        for r in range(self.rounds):
            sync = self.dist.enabled and r < self.rounds - 1
            with self.fake_train.no_sync() if sync else contextlib.nullcontext():
                with torch.no_grad():
                    x_g, labels = self._generate(self.G, self.batch_gpu)
                sigma = reference.edm_training_sigma(self.batch_gpu, cfg.p_mean, cfg.p_std, device=self.device)
                noise = torch.randn_like(x_g)
                x_t = x_g + sigma.view(-1, *[1] * (x_g.dim() - 1)) * noise
                if self.engine is not None and not self.dist.enabled:
                    pred = self.engine.fake_score_forward(x_t, sigma, labels)
                else:  # DDP: the wrapper's hooks average the fake score's gradients
                    with self._autocast():
                        pred = self.fake_train(x_t, sigma, labels)
                pred = pred.float()
                # published: samples with NaN in x_g or the prediction are dropped from the loss
                keep = (~reference.nan_rows(pred, x_g)).view(-1, *[1] * (x_g.dim() - 1))
                pred, x0 = torch.where(keep, pred, 0.0), torch.where(keep, x_g, 0.0)
                loss = fake_score_loss(pred, x0, noise, 1.0, sigma, prediction="x0", weighting="edm",
                                       sigma_data=cfg.sigma_data, reduction="batchmean")
                (loss * (cfg.loss_scale_fake / self.rounds)).backward()
                total = total + loss.detach() / self.rounds
        sanitize_grads(self.fake_params)
        self.opt_fake.step()
        return total

    def generator_step(self) -> torch.Tensor:
        """Generator update with the SiD loss on fresh samples (SPEC section 3); returns the mean loss."""
        cfg, total = self.cfg, torch.zeros((), device=self.device)
        self.G.train()
        self.fake.eval()
        self.opt_g.zero_grad(set_to_none=True)
        for r in range(self.rounds):
            sync = self.dist.enabled and r < self.rounds - 1
            with self.G_train.no_sync() if sync else contextlib.nullcontext():
                x_g, labels = self._generate(self.G_train, self.batch_gpu)
                sigma = reference.generator_sigma(self.batch_gpu, cfg.tmax, cfg.sigma_min, cfg.sigma_max, cfg.rho,
                                                  device=self.device)
                noise = torch.randn_like(x_g)
                y_real, y_fake = self.scores(x_g, sigma, noise, labels)
                loss = sid_generator_loss(y_real.float(), y_fake.float(), x_g, cfg.alpha, reduction="batchmean")
                # gradients for G's parameters only; teacher and fake score pass input gradients
                (loss * (cfg.loss_scale_g / self.rounds)).backward(inputs=self.g_params)
                total = total + loss.detach() / self.rounds
        sanitize_grads(self.g_params)
        self.opt_g.step()
        return total

    def step(self) -> tuple[torch.Tensor, torch.Tensor]:
        loss_fake = self.fake_step()
        loss_g = self.generator_step()
        cfg = self.cfg
        update_ema(self.G_ema, self.G, ema_beta(self.nimg, cfg.batch, cfg.ema_halflife_kimg, cfg.ema_rampup_ratio))
        self.nimg += cfg.batch
        self.iteration += 1
        return loss_g, loss_fake

    def stop_agreed(self, local: str | None) -> str | None:
        """In a multi-process run every rank stops when any rank got a signal (a CPU collective)."""
        if not self.dist.enabled:
            return local
        import torch.distributed as dist

        flag = torch.tensor([0 if local is None else (1 if local == "SIGINT" else 2 if local == "SIGTERM" else 3)])
        dist.all_reduce(flag, op=dist.ReduceOp.MAX, group=self.dist.control)
        return {0: None, 1: "SIGINT", 2: "SIGTERM", 3: "callback"}[int(flag)]

    # ---- outputs ----
    def grid_inputs(self):
        g = torch.Generator().manual_seed(self.cfg.seed + 20240)
        n = self.cfg.grid_size
        z = torch.randn((n, *self.image_shape), generator=g).to(self.device)
        labels = None
        if self.num_classes:
            idx = (torch.arange(n) % self.num_classes).to(self.device)
            labels = nn.functional.one_hot(idx, self.num_classes).float() if self.label_format == "onehot" else idx
        return z, labels

    def write_student_grid(self, name: str) -> Path | None:
        if not (self.rank0 and self.cfg.grid_size):
            return None
        from .report import save_grid
        from .samplers import one_step_sample

        z, labels = self.grid_inputs()
        x = one_step_sample(self.G_ema, z, self.cfg.sigma_init, labels)
        return save_grid(x, self.run_dir / name)

    def write_teacher_grid(self) -> Path | None:
        path = self.run_dir / "teacher.png"
        if not (self.rank0 and self.cfg.grid_size and self.cfg.teacher_steps) or path.exists():
            return path if path.exists() else None
        from .report import save_grid
        from .samplers import edm_sample

        z, labels = self.grid_inputs()
        x = edm_sample(self.teacher, z, self.cfg.teacher_steps, self.cfg.sigma_min, self.cfg.sigma_max,
                       self.cfg.rho, class_labels=labels)
        return save_grid(x, path)


def _norm(v):
    return list(v) if isinstance(v, (tuple, list)) else v


def distill(config: TrainConfig, teacher, generator=None, fake=None, callbacks=(), architecture: dict | None = None,
            log: Callable[[str], None] | None = print) -> DistillResult:
    """Run SiD (SPEC section 5) from ``teacher``; see the module docstring for the arguments and the result."""
    from .report import MetricsLog, plot_losses, read_metrics, summary_table

    if not isinstance(config, TrainConfig):
        raise TypeError(f"config must be a sidfast.train.TrainConfig, got {type(config).__name__}")
    cfg = dataclasses.replace(config).validate()
    tr = _Trainer(cfg, teacher, generator, fake, callbacks, architecture)
    rank0 = tr.rank0
    say = (log if (log is not None and rank0) else (lambda *_: None))
    metrics = MetricsLog(tr.run_dir / "metrics.jsonl", enabled=rank0)
    start_iter, start_time = tr.iteration, time.perf_counter()
    if rank0:
        tr.run_dir.mkdir(parents=True, exist_ok=True)
        if tr.state is None:
            (tr.run_dir / "config.json").write_text(json.dumps(cfg.to_dict(), indent=2) + "\n")
            tr.write_teacher_grid()
            tr.write_student_grid("student_init.png")
    say(f"sidfast distill: {tr.dist.world} process(es) on {tr.device}, batch {cfg.batch} "
        f"({tr.batch_gpu} x {tr.rounds} per process), image {tr.image_shape}, classes {tr.num_classes}, "
        f"{'resuming at iteration ' + str(tr.iteration) if tr.state is not None else 'fresh start'}")
    tr.state = None  # free the loaded tensors

    from tqdm.auto import tqdm

    bar = tqdm(total=cfg.iterations, initial=min(tr.iteration, cfg.iterations), unit="it", dynamic_ncols=True,
               disable=not (cfg.progress and rank0), desc="SiD")
    last, ckpt, interrupted = {}, None, None
    acc_g = acc_f = None
    acc_n, window_start, window_iter = 0, time.perf_counter(), tr.iteration
    try:
        with _StopRequest() as stop:
            while tr.iteration < cfg.iterations:
                loss_g, loss_fake = tr.step()
                acc_g = loss_g if acc_g is None else acc_g + loss_g
                acc_f = loss_fake if acc_f is None else acc_f + loss_fake
                acc_n += 1
                bar.update(1)
                requested = None
                for cb in tr.callbacks:
                    if cb({"iteration": tr.iteration, "nimg": tr.nimg, "loss_g": loss_g, "loss_fake": loss_fake,
                           "generator": tr.G, "generator_ema": tr.G_ema, "fake": tr.fake, "teacher": tr.teacher,
                           "rank": tr.dist.rank, "world_size": tr.dist.world}):
                        requested = "callback"
                done = tr.iteration >= cfg.iterations
                if tr.iteration % cfg.log_every == 0 or done:
                    now = time.perf_counter()
                    its = (tr.iteration - window_iter) / max(now - window_start, 1e-9)
                    last = {"iteration": tr.iteration, "nimg": tr.nimg, "loss_g": float(acc_g) / acc_n,
                            "loss_fake": float(acc_f) / acc_n, "it_per_s": its, "img_per_s": its * cfg.batch,
                            "seconds": now - start_time, "time": time.time()}
                    metrics.append(last)
                    bar.set_postfix(img_s=f"{last['img_per_s']:.1f}", loss_g=f"{last['loss_g']:.4g}",
                                    loss_fake=f"{last['loss_fake']:.4g}", refresh=False)
                    acc_g = acc_f = None
                    acc_n, window_start, window_iter = 0, now, tr.iteration
                upkeep = time.perf_counter()  # grids and checkpoints are left out of the measured speed
                if cfg.sample_every and tr.iteration % cfg.sample_every == 0 and not done:
                    tr.write_student_grid(f"student_{tr.iteration:06d}.png")
                    if rank0:
                        plot_losses(read_metrics(metrics.path), tr.run_dir / "losses.png")
                reason = tr.stop_agreed(stop.reason or requested)
                if reason is not None and not done:
                    interrupted = reason
                    break
                if cfg.checkpoint_every and tr.iteration % cfg.checkpoint_every == 0 and not done:
                    ckpt = tr.save(last)
                window_start += time.perf_counter() - upkeep
            ckpt = tr.save(last)
    finally:
        bar.close()
        if tr.dist.owned:
            import torch.distributed as dist

            dist.destroy_process_group()
    seconds = time.perf_counter() - start_time
    ran = tr.iteration - start_iter
    summary = {"iterations": tr.iteration, "iterations_this_run": ran, "images": tr.nimg,
               "seconds": round(seconds, 3), "it_per_s": ran / max(seconds, 1e-9),
               "img_per_s": ran * cfg.batch / max(seconds, 1e-9), "loss_g": last.get("loss_g"),
               "loss_fake": last.get("loss_fake"), "processes": tr.dist.world, "device": str(tr.device),
               "checkpoint": str(ckpt) if ckpt else None, "interrupted": interrupted}
    if rank0:
        if interrupted is None:
            tr.write_student_grid("student.png")
        plot_losses(read_metrics(metrics.path), tr.run_dir / "losses.png")
        (tr.run_dir / "summary.json").write_text(json.dumps(summary, indent=2) + "\n")
        rows = [(k, v) for k, v in summary.items() if v is not None]
        say(summary_table(rows, "SiD distillation" + (f" (stopped by {interrupted})" if interrupted else "")))
    return DistillResult(generator=tr.G, generator_ema=tr.G_ema, fake=tr.fake, iteration=tr.iteration,
                         nimg=tr.nimg, seconds=seconds, interrupted=interrupted, checkpoint=ckpt,
                         run_dir=tr.run_dir, summary=summary, last=last)


__all__ = ["TrainConfig", "DistillResult", "distill", "evaluate_scores", "ema_beta", "update_ema", "sanitize_grads",
           "seed_everything", "resolve_device", "infer_image_shape", "infer_num_classes", "make_labels",
           "CHECKPOINT_NAME", "PRECISIONS"]
