"""Per-GPU bytes a run holds whatever its batch: weights, gradients, Adam moments and EMA of the teacher,
generator and fake score, counted exactly from the parameter shapes, sharded or replicated."""
from __future__ import annotations

import math
from dataclasses import dataclass

from torch import nn

from sidfast.models.lora import add_lora, lora_parameters

ADAM_STEP_BYTES = 4         # torch.optim.Adam keeps a float32 step count per parameter tensor


def lora_parameter_shapes(net: nn.Module, rank: int) -> list[tuple]:
    """The shapes of the ``lora_A``/``lora_B`` factors ``sidfast.models.lora.add_lora(net, rank)`` creates, read off
    the layers it builds (on the meta device for the published models: no memory is allocated)."""
    return [tuple(p.shape) for p in lora_parameters(add_lora(net, rank))]


def shard_numel(shape, gpus: int, sharding: str) -> int:
    """Elements of one tensor on one GPU: FSDP2 splits dim 0 into ``gpus`` padded shards (rank 0 holds the
    largest, ``ceil(dim0 / gpus)`` rows); DDP replicates."""
    shape = tuple(shape) or (1,)
    if sharding == "ddp":
        return math.prod(shape)
    return math.ceil(shape[0] / gpus) * math.prod(shape[1:])


@dataclass
class NetworkMemory:
    name: str
    weights: int    # bytes per GPU
    grads: int = 0
    adam: int = 0
    ema: int = 0

    @property
    def total(self) -> int:
        return self.weights + self.grads + self.adam + self.ema


def static_bytes(teacher: nn.Module, fake: str, generator: str, rank: int, precision: str, sharding: str,
            gpus: int, shard_teacher: bool) -> list[NetworkMemory]:
    """Per-GPU bytes of the teacher, generator (+ EMA) and fake score, as ``sidfast.training.networks.build_networks``
    and the trainer's two ``torch.optim.Adam`` hold them."""
    shapes = [tuple(p.shape) for p in teacher.parameters()]
    weight_bytes = teacher_bytes = next(teacher.parameters()).element_size()
    if precision == "bf16-params":
        teacher_bytes = 2  # frozen: stored in the compute dtype; trainable ones keep fp32 master shards
    t_split = sharding if shard_teacher else "ddp"
    buffers = sum(b.numel() * b.element_size() for b in teacher.buffers())
    teacher_numel = sum(shard_numel(s, gpus, t_split) for s in shapes)
    out = [NetworkMemory("teacher", teacher_numel * teacher_bytes + buffers)]
    lora = None
    for name, kind in (("generator", generator), ("fake score", fake)):
        if kind == "lora":
            lora = lora or lora_parameter_shapes(teacher, rank)
            trainable = lora
        else:
            trainable = shapes
        n = sum(shard_numel(s, gpus, sharding) for s in trainable) * weight_bytes
        # a copy holds its own buffers; a LoRA network shares the teacher's
        copy_buffers = buffers if kind == "full" else 0
        mem = NetworkMemory(name, n + copy_buffers, grads=n, adam=2 * n + ADAM_STEP_BYTES * len(trainable))
        if name == "generator":
            mem.ema = n + copy_buffers  # the EMA copies what trains (a LoRA EMA: the factors only)
        out.append(mem)
    return out


__all__ = ["lora_parameter_shapes", "shard_numel", "NetworkMemory", "static_bytes", "ADAM_STEP_BYTES"]
