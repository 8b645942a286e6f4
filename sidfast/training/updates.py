"""The parameter updates of the published SiD loop besides Adam: the generator's EMA (Karras et al. 2022,
EDM) and nan_to_num of the gradients (``docs/math.md``, "Published recipe"); and the learning-rate cooldown
the trainer offers beside the published constant rate."""
from __future__ import annotations

from typing import Callable

import torch
from torch import nn


def ema_beta(nimg: int, batch: int, halflife_kimg: float, rampup_ratio: float | None) -> float:
    """EDM's EMA decay per iteration (Karras et al. 2022, training_loop.py): a half-life in images,
    ramped up."""
    halflife = halflife_kimg * 1000
    if rampup_ratio is not None:
        halflife = min(halflife, nimg * rampup_ratio)
    return 0.5 ** (batch / max(halflife, 1e-8))


def lr_factor(iteration: int, iterations: int, cooldown: float) -> float:
    """The learning-rate multiplier of 0-based ``iteration`` of a run of ``iterations``:
    ``min(1, (iterations - iteration) / (cooldown * iterations))``: 1, then over the run's last ``cooldown``
    fraction a straight line towards 0, which it would reach at ``iterations``. A fraction shorter than one
    iteration changes nothing. ``cooldown`` 0, or a run of no iterations, gives 1: the published constant
    rate."""
    if cooldown <= 0 or iterations <= 0:
        return 1.0
    return max(0.0, min(1.0, (iterations - iteration) / (cooldown * iterations)))


@torch.no_grad()
def update_ema(ema: nn.Module, net: nn.Module, beta: float) -> None:
    """ema <- net + beta * (ema - net) for parameters (published arithmetic: ``net.lerp(ema, beta)``, here as
    multi-tensor kernels); buffers copied. Tensors both networks share (a LoRA generator's frozen base, the
    teacher's) are left alone: only the factors are averaged."""
    pairs = [(e, p) for e, p in zip(ema.parameters(), net.parameters()) if e is not p]
    ema_params = [_local(e) for e, _ in pairs]
    net_params = [_local(p.detach()) for _, p in pairs]
    if ema_params:
        torch._foreach_copy_(ema_params, torch._foreach_lerp(net_params, ema_params, beta))
    for ema_buffer, buffer in zip(ema.buffers(), net.buffers()):
        if ema_buffer is not buffer:
            ema_buffer.copy_(buffer)


def _local(t: torch.Tensor) -> torch.Tensor:
    """This rank's shard of a parameter sharded by FSDP2 (a DTensor; foreach kernels take plain tensors; the
    shard is a view, so an in-place update reaches the parameter), or ``t`` itself."""
    return t.to_local() if hasattr(t, "to_local") else t


def _nan_to_num_(tensors: list) -> None:
    for t in tensors:
        torch.nan_to_num(t, nan=0.0, posinf=1e5, neginf=-1e5, out=t)


def sanitize_grads(params, kernel: Callable | None = None) -> None:
    """Published: grad <- nan_to_num(grad, nan=0, posinf=1e5, neginf=-1e5), in place. ``kernel``: the same
    operation compiled (``torch.compile(_nan_to_num_)``: a few fused kernels instead of one per parameter)."""
    (kernel or _nan_to_num_)([_local(p.grad) for p in params if p.grad is not None])


__all__ = ["ema_beta", "lr_factor", "update_ema", "sanitize_grads"]
