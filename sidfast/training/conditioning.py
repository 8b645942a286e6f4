"""What a SiD run conditions on: class labels, the prompts of a text-to-image teacher, the null condition.

``Conditioning`` checks once what the teacher takes against what the run was given (a text conditioner,
``prompts``, guidance or condition dropout, which need a null condition), then draws the conditions of each
batch of generator samples. A condition travels in two forms: the trainer's ``(labels, keyword
conditions)`` pair, and ``guidance.guided``'s single form; ``guidance.joined`` and ``guidance.split`` convert.
"""
from __future__ import annotations

import torch

from sidfast import guidance
from sidfast.conditions import to_device
from sidfast.training.config import TrainConfig
from sidfast.labels import draw_labels
from sidfast.models.text import draw_prompts, read_prompts


class Conditioning:
    """The text conditioner and prompts of a text-to-image teacher, and the null condition that guidance and
    condition dropout need (``guidance.guided``'s form; None when neither is used)."""

    def __init__(self, cfg: TrainConfig, teacher, conditioner, num_classes: int, label_format: str, scales,
                 device: torch.device):
        text = text_conditioned(teacher)
        if conditioner is not None and not text:
            raise ValueError(f"a text conditioner was given, but {teacher.label()} takes no text embeddings "
                             "(no cross_attention_dim or joint_attention_dim in its config)")
        if text and conditioner is None:
            raise ValueError(f"{teacher.label()} is text-conditioned, but no text encoder was given: load "
                             "the teacher from its pipeline directory with the text encoders "
                             f"({cfg.option('teacher')} PIPELINE_DIR), or pass "
                             "distill(..., conditioner=TextConditioner(...))")
        if conditioner is not None and cfg.prompts is None:
            raise ValueError(f"{teacher.label()} is a text-to-image teacher: give its prompts, "
                             f"{cfg.option('prompts')} FILE (one prompt per line)")
        if conditioner is None and cfg.prompts is not None:
            raise ValueError(f"{cfg.option('prompts')} is for text-to-image teachers; {teacher.label()} "
                             "takes no prompts")
        self.num_classes = num_classes
        self.label_format = label_format
        self.device = device
        self.conditioner = None
        self.prompts = None
        self.null = None
        if conditioner is not None:
            self.prompts = read_prompts(cfg.prompts)
            self.conditioner = conditioner.to(device)
            self.null = to_device(conditioner.null_condition(1), device)
            return
        if not (scales.active or cfg.condition_dropout):
            return
        what = cfg.option("condition_dropout")
        if scales.active:  # guidance, possibly chosen by --cfg alone (--guidance auto)
            what = cfg.option("guidance") + (f" {cfg.guidance} with {cfg.option('cfg')} {cfg.cfg:g}"
                                              if cfg.cfg is not None else "")
        if not num_classes:
            raise ValueError(f"{what} needs a conditional teacher: {teacher.label()} is "
                             "unconditional (no classes, no text), so there is no unconditional/conditional "
                             "pair to guide between")
        try:
            teacher.null_labels(1, device)  # the adapter's checks: label dropout, a null class
        except ValueError as exc:
            raise ValueError(f"{what}: {exc}") from None
        null_index = getattr(teacher, "null_class", None) if label_format == "index" else None
        self.null = guidance.null_labels(num_classes, label_format, device, null_index=null_index)

    def draw(self, batch: int) -> tuple:
        """(class labels or None, keyword conditions) of ``batch`` samples: uniform labels, or prompts drawn
        from the prompt file and embedded by the text encoders (cached per prompt)."""
        labels = draw_labels(batch, self.num_classes, self.label_format, self.device)
        if self.conditioner is None:
            return labels, {}
        return labels, to_device(self.conditioner.condition(draw_prompts(self.prompts, batch)), self.device)

    def for_grid(self, size: int):
        """The keyword conditions of a sample grid of ``size`` images: the first prompts of the file, cycled
        (None without a text conditioner)."""
        if self.conditioner is None:
            return None
        prompts = [self.prompts[i % len(self.prompts)] for i in range(size)]
        return to_device(self.conditioner.condition(prompts), self.device)


def text_conditioned(teacher) -> bool:
    """Whether the teacher's network takes text embeddings (diffusers' cross- or joint-attention width)."""
    config = getattr(getattr(teacher, "network", None), "config", None)
    return bool(getattr(config, "cross_attention_dim", None) or getattr(config, "joint_attention_dim", None))


