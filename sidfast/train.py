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
import os
import random
import signal
import threading
import time
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Optional

import numpy as np
import torch
from torch import nn

from . import reference
from .checkpoint import FORMATS, VERSION, CheckpointError, atomic_save, load_checkpoint
from .denoisers import DiffusersDenoiser, as_denoiser
from .lora import LoRAFakeScore, lora_state_dict
from .loss import fake_score_loss, sid_generator_loss

from .config import CHECKPOINT_NAME, PRECISIONS, TrainConfig


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
    """ema <- net + beta * (ema - net) for parameters (published arithmetic: ``net.lerp(ema, beta)``, here as
    multi-tensor kernels); buffers copied."""
    pe, pn = list(ema.parameters()), [p.detach() for p in net.parameters()]
    if pe:
        torch._foreach_copy_(pe, torch._foreach_lerp(pn, pe, beta))
    for be, b in zip(ema.buffers(), net.buffers()):
        be.copy_(b)


def sanitize_grads(params) -> None:
    """Published: grad <- nan_to_num(grad, nan=0, posinf=1e5, neginf=-1e5), in place."""
    _nan_to_num_(_grads(params))


def _grads(params) -> list:
    return [p.grad for p in params if p.grad is not None]


def _nan_to_num_(tensors: list) -> None:
    for t in tensors:
        torch.nan_to_num(t, nan=0.0, posinf=1e5, neginf=-1e5, out=t)


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
                      "num_classes", "label_format", "image_shape", "engine", "fake_score", "lora_rank")


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
        if G.name == "teacher":
            G.name = "generator"
        self.G = G.to(self.device).train().requires_grad_(True)
        if cfg.fake_score == "lora":
            if fake is not None:
                raise ValueError("fake_score 'lora' builds the fake score from the teacher's weights; pass no fake "
                                 "network (or use fake_score 'full')")
            # the teacher's own frozen weights plus trainable low-rank updates (sidfast.lora): no network copy
            self.fake = LoRAFakeScore(self.teacher, rank=cfg.lora_rank).train()
        else:
            F = copy.deepcopy(self.teacher) if fake is None else as_denoiser(fake, name="fake score")
            if F.name == "teacher":
                F.name = "fake score"
            self.fake = F.to(self.device).train().requires_grad_(True)
        for net, name in ((self.G, "generator"), (self.fake, "fake score")):
            if not any(p.requires_grad for p in net.parameters()):
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
        fused = {"fused": True} if self.device.type == "cuda" else {}  # one kernel per step on CUDA, same math
        self.opt_g = torch.optim.Adam(self.g_params, lr=cfg.lr, betas=cfg.betas, eps=eps, **fused)
        self.opt_fake = torch.optim.Adam(self.fake_params, lr=cfg.fake_lr or cfg.lr, betas=cfg.betas, eps=eps, **fused)
        self.iteration, self.nimg = 0, 0
        seed_everything(cfg.seed, d.rank, d.world)
        if self.state is not None:
            self._restore(self.state, resume)

        self.autocast_dtype = {"fp32": None, "bf16": torch.bfloat16, "fp16": torch.float16}[cfg.precision]
        self.engine = None
        if cfg.engine == "score_engine":
            from .engine import ScoreEngine

            # teacher and fake score evaluated together over frozen views of the same storage (CUDA graphs on GPU);
            # a LoRA fake score runs as one forward of the shared weights over the doubled batch
            self.engine = ScoreEngine.over(self.teacher, self.fake, amp_dtype=self.autocast_dtype, compile=cfg.compile)
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
        # torch.compile of the generator (train and eval/no-grad specializations) and the eager fake-score path
        self.G_sample, self._nan_to_num_ = self.G, _nan_to_num_
        if cfg.compile:
            self.G_train, self.G_sample = torch.compile(self.G_train), torch.compile(self.G)
            if self.engine is None or self.dist.enabled:
                self.fake_train = torch.compile(self.fake_train)
            self._nan_to_num_ = torch.compile(_nan_to_num_)  # a few fused kernels instead of one per parameter

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
            self._load_fake(data["fake"])
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

    def _fake_state(self) -> dict:
        """What a checkpoint keeps of the fake score: all of it, or only the LoRA factors (the rest is the teacher)."""
        return lora_state_dict(self.fake) if self.cfg.fake_score == "lora" else self.fake.state_dict()

    def _load_fake(self, state: dict) -> None:
        if self.cfg.fake_score != "lora":
            self.fake.load_state_dict(state)
            return
        missing, unexpected = self.fake.load_state_dict(state, strict=False)
        lora_missing = [k for k in missing if k.endswith((".lora_A", ".lora_B"))]
        if unexpected or lora_missing or not state:
            raise ValueError(f"the checkpoint's fake score is not a LoRA fake score of this teacher and rank (missing "
                             f"{lora_missing[:3]}, unexpected {unexpected[:3]})")

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
                "fake": self._fake_state(),
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
                    x_g, labels = self._generate(self.G_sample, self.batch_gpu)
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
        self._nan_to_num_(_grads(self.fake_params))
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
        self._nan_to_num_(_grads(self.g_params))
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
