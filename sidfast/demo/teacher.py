"""Training the demo's teacher: EDM denoising score matching on the digits, from scratch.

Loss (Karras et al. 2022, eq. 2 with Table 1's weighting and noise distribution):
ln sigma ~ N(P_mean, P_std^2), x_t = x0 + sigma * eps, L = lambda(sigma) ||D(x_t; sigma) - x0||^2 with
lambda(sigma) = (sigma^2 + sd^2) / (sigma sd)^2, computed by ``sidfast.loss.fake_score_loss(weighting="edm")``
(the same denoising loss SiD's fake score minimizes, here on real data). The returned teacher is the EMA.
"""
from __future__ import annotations

import copy
import math
import time
from dataclasses import replace
from pathlib import Path

import torch

from sidfast import reference
from sidfast.demo import digits
from sidfast.demo.nets import build_denoiser, count_parameters
from sidfast.demo.recipe import BUILDER, TeacherConfig, demo_config
from sidfast.loss import fake_score_loss
from sidfast.models.io import save_network


def _lr_factor(step: int, cfg: TeacherConfig) -> float:
    """Linear warm-up, then cosine decay from 1 to lr_final_ratio."""
    if step < cfg.warmup:
        return (step + 1) / cfg.warmup
    t = (step - cfg.warmup) / max(cfg.iterations - cfg.warmup, 1)
    return cfg.lr_final_ratio + (1 - cfg.lr_final_ratio) * 0.5 * (1 + math.cos(math.pi * min(t, 1.0)))


def train_teacher(net: torch.nn.Module, images: torch.Tensor, cfg: TeacherConfig,
                  labels: torch.Tensor | None = None, log=None,
                  log_every: int = 500) -> tuple[torch.nn.Module, dict]:
    """Train ``net`` (an EDM denoiser, on images' device) on images (N, 1, 8, 8) in [-1, 1].

    labels: (N,) ints for a class-conditional net, else None; with ``cfg.label_dropout`` each image's label is
    replaced by the null label with that probability, so that the net also learns its unconditional output
    (classifier-free guidance, Ho & Salimans 2022). Returns (EMA copy in eval mode, stats dict with
    the last batch's loss, seconds, images seen). ``net`` itself is left in its last (non-EMA) state.
    """
    if cfg.iterations < 1 or cfg.batch < 1:
        raise ValueError("iterations and batch must be positive")
    if not 0 <= cfg.label_dropout <= 1:
        raise ValueError(f"label_dropout must be in [0, 1], got {cfg.label_dropout}")
    num_classes = getattr(net, "num_classes", 0)
    if cfg.label_dropout and (labels is None or not num_classes):
        raise ValueError("label_dropout needs a class-conditional net and labels")
    device = images.device
    g = torch.Generator(device=device).manual_seed(cfg.seed)
    ema = copy.deepcopy(net).eval().requires_grad_(False)
    opt = torch.optim.Adam(net.parameters(), lr=cfg.lr, betas=(0.9, 0.999))
    net.train()
    start, n = time.perf_counter(), images.shape[0]
    for step in range(cfg.iterations):
        for group in opt.param_groups:
            group["lr"] = cfg.lr * _lr_factor(step, cfg)
        idx = torch.randint(0, n, (cfg.batch,), generator=g, device=device)
        x0 = images[idx]
        y = labels[idx] if labels is not None else None
        if cfg.label_dropout:
            # the null label is a row of zeros, the unconditional input of guidance (guidance.null_labels)
            keep = torch.rand(cfg.batch, generator=g, device=device) >= cfg.label_dropout
            y = torch.nn.functional.one_hot(y, num_classes).float() * keep[:, None]
        sigma = reference.edm_training_sigma(cfg.batch, cfg.p_mean, cfg.p_std, device=device, generator=g)
        noise = torch.randn(x0.shape, generator=g, device=device)
        pred = net(x0 + sigma.view(-1, 1, 1, 1) * noise, sigma, y)
        # EDM loss: lambda(sigma) ||D(x0 + sigma eps; sigma) - x0||^2 (Karras et al. 2022, eq. 2, Table 1)
        loss = fake_score_loss(pred, x0, noise, 1.0, sigma, prediction="x0", weighting="edm",
                               sigma_data=cfg.sigma_data) / x0[0].numel()
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        # EMA with warm-up, decay min(ema_decay, (1 + k) / (10 + k)): the zero-output start fades out quickly
        decay = min(cfg.ema_decay, (1 + step) / (10 + step))
        with torch.no_grad():
            for pe, p in zip(ema.parameters(), net.parameters()):
                pe.lerp_(p, 1 - decay)
        if log is not None and (step + 1) % log_every == 0:
            log(f"teacher step {step + 1}/{cfg.iterations} loss {float(loss.detach()):.4f}")
    for be, b in zip(ema.buffers(), net.buffers()):
        be.copy_(b)
    seconds = time.perf_counter() - start
    return ema, {"seconds": seconds, "final_loss": float(loss.detach()),
                 "images_seen": cfg.iterations * cfg.batch}


def write_teacher(out, iterations: int | None = None, batch: int | None = None, lr: float | None = None,
                  width: int | None = None, depth: int | None = None, dropout: float | None = None,
                  conditional: bool = False, seed: int = 0, device="cpu", log=print) -> dict:
    """``sidfast train-teacher``: the demo's teacher recipe (``demo_config``), with the options given changed,
    trained on the digits and written to ``out`` as a network checkpoint (usable as ``distill --teacher``).

    None keeps the demo's value; ``conditional`` trains a 10-class teacher. Returns the training stats.
    """
    for name, value, lo in (("iterations", iterations, 1), ("batch", batch, 1), ("width", width, 2),
                            ("depth", depth, 1)):
        if value is not None and value < lo:
            raise ValueError(f"option {name} must be >= {lo}, got {value}")
    if dropout is not None and not 0 <= dropout < 1:
        raise ValueError(f"option dropout must be in [0, 1), got {dropout}")
    if lr is not None and not lr > 0:
        raise ValueError(f"option lr must be positive, got {lr}")
    if Path(out).is_dir():
        raise ValueError(f"option out {str(out)!r} is a directory; give a file name such as teacher.pt")

    # the demo's network and schedule, with the options given
    base = demo_config(quick=False, seed=seed)
    net_changes = {"width": width, "depth": depth, "dropout": dropout}
    config = {**base.net, **{k: v for k, v in net_changes.items() if v is not None}}
    config["num_classes"] = digits.NUM_CLASSES if conditional else 0
    run_changes = {"iterations": iterations, "batch": batch, "lr": lr}
    cfg = replace(base.teacher, seed=seed, **{k: v for k, v in run_changes.items() if v is not None})

    torch.manual_seed(seed)
    images, labels = digits.load_digits_tensors(device=device)
    net = build_denoiser(config).to(device)
    ema, stats = train_teacher(net, images, cfg, labels=labels if conditional else None, log=log,
                               log_every=max(1, cfg.iterations // 10))
    save_network(out, ema, BUILDER, config,
                 meta={"trainer": "sidfast train-teacher", "teacher_config": cfg.to_dict(), **stats})
    log(f"wrote {out} ({count_parameters(ema):,} parameters, {stats['seconds']:.1f} s, "
        f"final loss {stats['final_loss']:.4f})")
    return stats
