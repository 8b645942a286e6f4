"""The score engine's fake score over its teacher: a trainable full copy, or LoRA factors over the teacher's
shared frozen weights (``sidfast.models.lora.LoRAFakeScore``)."""
from __future__ import annotations

import copy

import torch

from sidfast.models.denoiser import as_denoiser
from sidfast.models.lora import LoRAFakeScore
from sidfast.models.views import same_storage


def fake_score_over(teacher, fake, mode: str, channels_last: bool = False, lora_rank: int = 64,
                    lora_alpha: float | None = None, lora_dropout: float = 0.0, lora_targets=None):
    """The fake score of a score engine over ``teacher``.

    Mode "full": ``fake``, by default a trainable copy of the teacher. Mode "lora": ``fake`` must be a
    ``LoRAFakeScore`` over this teacher's weights; by default a new one of ``lora_rank``, ``lora_alpha``,
    ``lora_dropout`` and ``lora_targets``. ``channels_last``: convert the new fake score's 4-D parameters.
    """
    if mode == "full":
        if fake is None:
            fake = copy.deepcopy(teacher).requires_grad_(True).train()
            fake.name = "fake score"
        else:
            fake = as_denoiser(fake, name="fake score")
        if fake is teacher:
            raise ValueError("fake must be a separate network from the teacher in mode 'full' (use "
                             "mode='lora' to share the teacher's weights)")
        if channels_last:
            fake.to(memory_format=torch.channels_last)
    elif fake is None:
        fake = LoRAFakeScore(teacher, lora_rank, lora_alpha, lora_dropout, lora_targets)
    else:
        if not isinstance(fake, LoRAFakeScore):
            raise ValueError("mode='lora' takes fake=None (the engine builds the LoRA fake score) or a "
                             f"sidfast.models.lora.LoRAFakeScore over this teacher, got {type(fake).__name__}")
        base = [p for n, p in fake.net.named_parameters() if not n.endswith((".lora_A", ".lora_B"))]
        if not same_storage(base, list(teacher.parameters())):
            raise ValueError("fake is a LoRAFakeScore over another network: its frozen weights are not "
                             "this teacher's")
    return fake


__all__ = ["fake_score_over"]
