"""FSDP2 sharding of the SiD networks, block by block and then at the root, and activation checkpointing.

The teacher and a LoRA fake score share one sharded copy of the teacher's weights (``LoRAOff``); sharding
happens in place. The block layout and why: ``docs/runs.md``, "Sharding".
"""
from __future__ import annotations

import torch
from torch import nn

from sidfast.models.denoiser import Denoiser
from sidfast.models.lora import LoRAFakeScore, set_lora_mode

# containers whose children are a network's blocks: diffusers U-Nets, diffusers DiTs (SD3, FLUX, PixArt),
# EDM's SongUNet/DhariwalUNet, and the common ``blocks``/``layers`` lists
BLOCK_LISTS = ("down_blocks", "up_blocks", "transformer_blocks", "single_transformer_blocks", "enc", "dec",
               "blocks", "layers")
SINGLE_BLOCKS = ("mid_block",)


def shard_blocks(net: nn.Module) -> list[nn.Module]:
    """The blocks of ``net`` that are sharded (and checkpointed) one by one, in module order; a block inside
    another block is not listed again."""
    blocks = []
    inside = set()
    for name, module in net.named_modules():
        if any(name.startswith(prefix + ".") for prefix in inside) or not name:
            continue
        leaf = name.rpartition(".")[2]
        if leaf in BLOCK_LISTS and isinstance(module, (nn.ModuleList, nn.ModuleDict)):
            children = [c for c in module.children() if any(True for _ in c.parameters())]
            blocks.extend(children)
            inside.add(name)
        elif leaf in SINGLE_BLOCKS and any(True for _ in module.parameters()):
            blocks.append(module)
            inside.add(name)
    if blocks:
        return blocks
    # no known container: the top-level children of the innermost network that hold parameters
    inner = net
    while True:
        children = [c for c in inner.children() if any(True for _ in c.parameters())]
        if len(children) != 1:
            return children
        inner = children[0]


def checkpoint_blocks(net: nn.Module) -> None:
    """Recompute each block's activations in backward instead of keeping them (``torch.utils.checkpoint``
    semantics, random state preserved so dropout draws the same masks; the module tree is unchanged, so state
    dict keys stay the same)."""
    # torch.distributed (absent from some torch builds): imported by sharded runs only
    from torch.distributed._composable import checkpoint

    for block in shard_blocks(net):
        checkpoint(block)


def fully_shard_network(net: nn.Module, precision: str = "fp32") -> nn.Module:
    """``fully_shard`` each block of ``net``, then ``net`` itself, over all ranks; ``precision`` "bf16":
    parameters all-gathered and computed in bf16, gradients reduced in fp32 (``MixedPrecisionPolicy``).
    ``net`` is changed in place (its parameters become DTensor shards) and returned."""
    # torch.distributed (absent from some torch builds): imported by sharded runs only
    import torch.distributed as dist
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard

    device_type = next(net.parameters()).device.type
    mesh = init_device_mesh(device_type, (dist.get_world_size(),))
    policy = MixedPrecisionPolicy()
    if precision == "bf16":
        policy = MixedPrecisionPolicy(param_dtype=torch.bfloat16, reduce_dtype=torch.float32)
    for block in shard_blocks(net):
        fully_shard(block, mesh=mesh, mp_policy=policy)
    fully_shard(net, mesh=mesh, mp_policy=policy)
    return net


def shard_run(cfg, teacher: nn.Module, generator: nn.Module, generator_ema: nn.Module,
              fake: nn.Module) -> nn.Module:
    """Activation checkpointing per block (option ``activation_checkpointing``) and FSDP sharding (``fsdp``)
    of a run's networks, in place: each network's parameters become this rank's shards, so this comes before
    the optimizers take them. Returns the teacher: under FSDP with a LoRA fake score, the fake score with its
    LoRA layers off (``LoRAOff``), so that the teacher's weights exist once, sharded."""
    if cfg.activation_checkpointing:
        for net in distinct_networks(teacher, generator, generator_ema, fake):
            checkpoint_blocks(net)
    if cfg.fsdp:
        if cfg.fake_score == "lora":
            teacher = LoRAOff(fake)
        for net in distinct_networks(teacher, generator, generator_ema, fake):
            fully_shard_network(net, cfg.fsdp_precision)
    return teacher


def reshard(*nets: nn.Module) -> None:
    """Free the all-gathered parameters FSDP2 left after a forward outside a training step (a sample grid):
    the root module of a network keeps its parameters unsharded after a forward, expecting the backward that
    a no-grad forward never runs; until resharded, ``net.parameters()`` are full tensors, not this rank's
    shards (the EMA update then meets full tensors on one side and shards on the other). No-op for networks
    that are not sharded."""
    # torch.distributed (absent from some torch builds): imported by sharded runs only
    from torch.distributed.fsdp import FSDPModule

    for net in nets:
        for module in net.modules():
            if isinstance(module, FSDPModule):
                module.reshard()


def distinct_networks(teacher: nn.Module, generator: nn.Module, generator_ema: nn.Module,
                      fake: nn.Module) -> list[nn.Module]:
    """The networks that own their weights: a LoRA fake score holds the teacher's (``LoRAOff``)."""
    nets = [generator, generator_ema, fake]
    return nets if isinstance(teacher, LoRAOff) else nets + [teacher]


class LoRAOff(Denoiser):
    """The teacher as a LoRA fake score with its LoRA layers off: the teacher's own (sharded) weights,
    evaluated with the fake score's network."""

    def __init__(self, fake: LoRAFakeScore):
        super().__init__("teacher")
        # held outside the module tree: the teacher owns no parameters of its own
        self.__dict__["fake"] = fake

    @property
    def network(self) -> nn.Module:
        return self.fake.network

    @property
    def label_format(self) -> str:
        return self.fake.net.label_format

    def null_labels(self, batch: int, device=None) -> torch.Tensor:
        """The teacher's (guidance's unconditional call)."""
        return self.fake.net.null_labels(batch, device)

    def null_condition(self, batch: int, device=None) -> dict:
        return self.fake.net.null_condition(batch, device)

    def forward(self, x: torch.Tensor, sigma, class_labels=None, **cond) -> torch.Tensor:
        set_lora_mode(self.fake, "off")
        try:
            return self.fake(x, sigma, class_labels, **cond)
        finally:
            set_lora_mode(self.fake, "on")


__all__ = ["shard_blocks", "checkpoint_blocks", "fully_shard_network", "shard_run", "reshard", "distinct_networks",
           "LoRAOff", "BLOCK_LISTS"]
