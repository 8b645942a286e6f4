"""The networks of one SiD run and what their data looks like (``docs/math.md``, "Published recipe").

The teacher is frozen in eval mode; the generator and the fake score are trainable copies of it unless given.
Either may instead be low-rank updates over the teacher's own frozen weights (``sidfast.models.lora``: options
``fake_score`` / ``generator`` lora, rank ``lora_rank``). The generator's EMA starts as a copy of the
generator; a LoRA generator's EMA shares the same frozen weights and holds its own copy of the factors.
"""
from __future__ import annotations

import copy
from dataclasses import dataclass

import torch
from torch import nn

from sidfast.training.config import TrainConfig
from sidfast.models.denoiser import Denoiser, as_denoiser
from sidfast.models.diffusers import DiffusersDenoiser
from sidfast.models.io import CheckpointError
from sidfast.models.introspect import infer_image_shape, infer_num_classes
from sidfast.models.lora import LoRAFakeScore, LoRAGenerator, load_lora_factors, lora_generator, lora_parameters


@dataclass
class SiDNetworks:
    teacher: Denoiser
    generator: Denoiser
    generator_ema: Denoiser
    fake: nn.Module
    image_shape: tuple       # one generator sample, C H W
    num_classes: int         # 0: unconditional
    label_format: str        # "onehot" (EDM networks) or "index" (diffusers)

    def trainable(self, net: nn.Module) -> list[nn.Parameter]:
        return [p for p in net.parameters() if p.requires_grad]


def _trainable_copy(net, teacher: Denoiser, name: str, device) -> Denoiser:
    net = copy.deepcopy(teacher) if net is None else as_denoiser(net, name=name)
    if net.name == "teacher":
        net.name = name
    net = net.to(device).train().requires_grad_(True)
    if not any(p.requires_grad for p in net.parameters()):
        raise ValueError(f"the {name} has no parameters to train")
    return net


def build_networks(cfg: TrainConfig, teacher, generator, fake, device: torch.device) -> SiDNetworks:
    """The run's networks on ``device``; ``generator``/``fake`` None: copies of the teacher."""
    teacher = as_denoiser(teacher, name="teacher").to(device).eval().requires_grad_(False)
    if cfg.null_class is not None:
        _set_null_class(teacher, cfg)
    if cfg.generator == "lora":
        if generator is not None:
            raise ValueError(f"{cfg.option('generator')} lora builds the generator from the teacher's "
                             f"weights; pass no generator network or use {cfg.option('generator')} full")
        generator = lora_generator(teacher, cfg.lora_rank, cfg.seed).train()
    else:
        generator = _trainable_copy(generator, teacher, "generator", device)
    if cfg.fake_score == "lora":
        if fake is not None:
            raise ValueError(f"{cfg.option('fake_score')} lora builds the fake score from the teacher's "
                             f"weights; pass no fake network or use {cfg.option('fake_score')} full")
        # the teacher's own frozen weights plus trainable low-rank updates: no network copy
        fake = LoRAFakeScore(teacher, rank=cfg.lora_rank).train()
    else:
        fake = _trainable_copy(fake, teacher, "fake score", device)

    shape = cfg.image_shape or infer_image_shape(teacher) or infer_image_shape(generator)
    if shape is None:
        raise ValueError("cannot determine the image shape from the teacher (no image_shape, img_resolution or "
                         f"diffusers sample_size); pass {cfg.option('image_shape')} C H W")
    num_classes = _num_classes(teacher, cfg)
    label_format = cfg.label_format
    if label_format == "auto":
        label_format = "index" if isinstance(teacher, DiffusersDenoiser) else "onehot"
    return SiDNetworks(teacher=teacher, generator=generator, generator_ema=ema_copy(generator), fake=fake,
                       image_shape=tuple(shape), num_classes=num_classes, label_format=label_format)


def ema_copy(generator: nn.Module) -> nn.Module:
    """The generator's EMA at the start: a frozen copy of it. A LoRA generator's copy shares its frozen base
    (the teacher's weights and buffers) and copies only the factors, which are what the EMA averages."""
    memo = {}
    if isinstance(generator, LoRAGenerator):
        factors = {id(p) for p in lora_parameters(generator)}
        memo = {id(t): t for t in (*generator.parameters(), *generator.buffers()) if id(t) not in factors}
    return copy.deepcopy(generator, memo).eval().requires_grad_(False)


def init_from_sid(generator: nn.Module, generator_ema: nn.Module, data: dict, path) -> None:
    """SiD2A's start (Zhou et al., ICLR 2025): G and its EMA both take the EMA generator of a SiD run, the
    distill checkpoint ``data`` read from ``path`` (``--init-generator``), as the published loop loads them.
    A LoRA generator starts from the factors of a LoRA generator's run (a full generator has no factors)."""
    lora = isinstance(generator, LoRAGenerator)
    kind = (data.get("config") or {}).get("generator", "full")
    if lora != (kind == "lora"):
        option = TrainConfig.option("generator")
        raise CheckpointError(f"--init-generator {str(path)!r} holds a {kind} generator ({option} {kind}); "
                              f"this run's is {option} {'lora' if lora else 'full'}: start it from a run "
                              f"with the same {option}")
    try:
        for net in (generator, generator_ema):
            if lora:
                load_lora_factors(net, data["generator_ema"], "generator")
            else:
                net.load_state_dict(data["generator_ema"])
    except (RuntimeError, ValueError, KeyError) as exc:
        raise CheckpointError(f"--init-generator {str(path)!r}: its generator does not fit this teacher's "
                              f"network (another teacher or architecture?): {str(exc).strip()[:300]}") from None


def _set_null_class(teacher: Denoiser, cfg: TrainConfig) -> None:
    """Give an index-label (diffusers) teacher the null class of ``cfg``, checked as ``DiffusersDenoiser``
    does; the generator and fake score, copies of the teacher, inherit it."""
    if not isinstance(teacher, DiffusersDenoiser):
        raise ValueError(f"{cfg.option('null_class')} is for diffusers teachers with class embeddings "
                         f"(index labels); {teacher.label()} takes one-hot labels whose null label is a row "
                         "of zeros")
    embeds = infer_num_classes(teacher.unet)
    if teacher.null_class is not None and teacher.null_class != cfg.null_class:
        raise ValueError(f"{cfg.option('null_class')} {cfg.null_class} differs from the teacher's null class "
                         f"{teacher.null_class}")
    if not embeds or cfg.null_class != embeds - 1:
        raise ValueError(f"{cfg.option('null_class')} must be the teacher's last class embedding "
                         f"({embeds - 1 if embeds else 'it has none'}), got {cfg.null_class}")
    teacher.null_class = cfg.null_class


def _num_classes(teacher: Denoiser, cfg: TrainConfig) -> int:
    """The classes labels are drawn from: the teacher's, or ``cfg.num_classes`` if it names no more."""
    own = teacher.num_classes if isinstance(teacher, Denoiser) else infer_num_classes(teacher)
    if cfg.num_classes is None:
        return own
    if own and cfg.num_classes > own:
        raise ValueError(f"{cfg.option('num_classes')} {cfg.num_classes} exceeds the teacher's {own} "
                         f"classes: labels {own} to {cfg.num_classes - 1} would be out of range")
    return cfg.num_classes


__all__ = ["SiDNetworks", "build_networks", "init_from_sid", "lora_generator", "ema_copy",
           "load_lora_factors"]
