"""The networks of one SiD run and what their data looks like (``docs/math.md``, "Published recipe").

The teacher is frozen in eval mode; the generator and the fake score are trainable copies of it unless given
(the fake score may instead be low-rank updates over the teacher's own weights, ``sidfast.lora``); the
generator's EMA starts as a copy of the generator.
"""
from __future__ import annotations

import copy
from dataclasses import dataclass

import torch
from torch import nn

from .config import TrainConfig
from .denoisers import Denoiser, DiffusersDenoiser, as_denoiser, infer_image_shape, infer_num_classes
from .lora import LoRAFakeScore


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
    num_classes = cfg.num_classes if cfg.num_classes is not None else infer_num_classes(teacher)
    label_format = cfg.label_format
    if label_format == "auto":
        label_format = "index" if isinstance(teacher, DiffusersDenoiser) else "onehot"
    return SiDNetworks(teacher=teacher, generator=generator,
                       generator_ema=copy.deepcopy(generator).eval().requires_grad_(False), fake=fake,
                       image_shape=tuple(shape), num_classes=num_classes, label_format=label_format)


def init_from_sid(generator: nn.Module, generator_ema: nn.Module, data: dict, path) -> None:
    """SiD2A's start (Zhou et al., ICLR 2025): G and its EMA both take the EMA generator of a SiD run, the
    distill checkpoint ``data`` read from ``path`` (``--init-generator``), as the published loop loads them."""
    from .checkpoint import CheckpointError

    try:
        generator.load_state_dict(data["generator_ema"])
        generator_ema.load_state_dict(data["generator_ema"])
    except (RuntimeError, KeyError) as exc:
        raise CheckpointError(f"--init-generator {str(path)!r}: its generator does not fit this teacher's "
                              f"network (another teacher or architecture?): {str(exc).strip()[:300]}") from None


__all__ = ["SiDNetworks", "build_networks", "init_from_sid"]
