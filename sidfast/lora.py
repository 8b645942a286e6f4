"""A low-rank (LoRA) fake score over the frozen teacher's shared weights.

The SiD fake score starts as a copy of the teacher (``docs/math.md``, "Published recipe"). Here it is
instead the teacher's own weights, shared (never copied) and frozen (``sidfast.views.frozen_view``), plus
a trainable low-rank update on its ``nn.Linear`` and ``nn.Conv2d`` layers (Hu et al. 2021, eq. 3:
``W' = W + (alpha / r) B A``, ``B`` zero-initialised so the fake score starts equal to the teacher).
This removes a full network copy and its optimizer state.

Every LoRA layer has a fixed ``mode``:

- ``"on"``: ``y = W x + (alpha/r) B A x`` (the fake score alone);
- ``"off"``: ``y = W x`` (the teacher);
- ``"split"``: the batch is ``[teacher half; fake half]``; ``W x`` is computed once over the whole doubled
  batch and the low-rank delta only over the fake half, then added to that half. One forward of the
  shared network thus evaluates teacher and fake score together.

Modes are fixed per module tree (``set_lora_mode``) rather than switched per call, so compiled code
and captured CUDA graphs never see a mode change. Layer inputs are assumed batch-first (true of
convolutions and of the linear layers in diffusers' and EDM's U-Nets); ``merge_lora`` gives a plain
network with the merged weights to check that assumption on a new architecture.
"""
from __future__ import annotations

import copy
import math
from collections.abc import Callable, Iterator

import torch
import torch.nn.functional as F
from torch import nn

from .denoisers import Denoiser
from .views import frozen_view

LORA_LAYER_MODES = ("on", "off", "split")


class LoRALayer(nn.Module):
    """Base of the LoRA wrappers: the (shared, frozen) ``base`` layer plus ``lora_A``, ``lora_B``,
    ``scale``."""

    base: nn.Module

    def __init__(self, base: nn.Module, rank: int, alpha: float | None, dropout: float, mode: str):
        super().__init__()
        if isinstance(rank, bool) or not isinstance(rank, int) or rank < 1:
            raise ValueError(f"rank must be a positive integer, got {rank!r}")
        if not 0.0 <= float(dropout) < 1.0:
            raise ValueError(f"dropout must be in [0, 1), got {dropout!r}")
        if mode not in LORA_LAYER_MODES:
            raise ValueError(f"mode must be one of {LORA_LAYER_MODES}, got {mode!r}")
        self.base = base
        self.rank = rank
        # alpha / r (Hu et al. 2021, section 4.1)
        self.scale = float(alpha if alpha is not None else rank) / rank
        self.dropout = float(dropout)
        self.mode = mode

    @property
    def weight(self) -> torch.Tensor:
        return self.base.weight

    @property
    def bias(self) -> torch.Tensor | None:
        return self.base.bias

    def delta(self, x: torch.Tensor) -> torch.Tensor:  # pragma: no cover - overridden
        raise NotImplementedError

    def delta_weight(self) -> torch.Tensor:  # pragma: no cover - overridden
        raise NotImplementedError

    def _drop(self, x: torch.Tensor) -> torch.Tensor:
        return F.dropout(x, self.dropout, self.training) if self.dropout > 0 else x

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.base(x)
        if self.mode == "off":
            return y
        if self.mode == "on":
            return y + self.delta(self._drop(x)).to(y.dtype)
        h = x.shape[0] // 2
        if x.shape[0] != 2 * h:
            raise ValueError(f"LoRA split mode needs a doubled batch [teacher; fake], got batch {x.shape[0]}")
        # base output for the whole doubled batch, low-rank update only on the fake half
        return torch.cat([y[:h], y[h:] + self.delta(self._drop(x[h:])).to(y.dtype)], 0)

    def extra_repr(self) -> str:
        return f"rank={self.rank}, scale={self.scale:g}, dropout={self.dropout:g}, mode={self.mode!r}"


class LoRALinear(LoRALayer):
    """``nn.Linear`` plus ``scale * B A``; A: (r, in) Kaiming-uniform as nn.Linear, B: (out, r) zeros."""

    def __init__(self, base: nn.Linear, rank: int = 64, alpha: float | None = None, dropout: float = 0.0,
                 mode: str = "on"):
        super().__init__(base, rank, alpha, dropout, mode)
        w = base.weight
        r = min(rank, base.in_features, base.out_features)
        self.lora_A = nn.Parameter(torch.empty(r, base.in_features, device=w.device, dtype=w.dtype))
        self.lora_B = nn.Parameter(torch.zeros(base.out_features, r, device=w.device, dtype=w.dtype))
        nn.init.kaiming_uniform_(self.lora_A, a=math.sqrt(5))

    def delta(self, x: torch.Tensor) -> torch.Tensor:
        return F.linear(F.linear(x, self.lora_A), self.lora_B) * self.scale

    def delta_weight(self) -> torch.Tensor:
        return self.scale * (self.lora_B @ self.lora_A)


class LoRAConv2d(LoRALayer):
    """``nn.Conv2d`` plus ``scale * B A``: A a conv with the base's kernel, stride, padding and dilation to r
    channels, B a 1x1 conv back to the output channels (zeros). Grouped convolutions are not wrapped."""

    def __init__(self, base: nn.Conv2d, rank: int = 64, alpha: float | None = None, dropout: float = 0.0,
                 mode: str = "on"):
        if base.groups != 1:
            raise ValueError(f"LoRAConv2d needs groups=1, got {base.groups}")
        if base.padding_mode != "zeros":
            raise ValueError(f"LoRAConv2d needs padding_mode='zeros', got {base.padding_mode!r}")
        super().__init__(base, rank, alpha, dropout, mode)
        w = base.weight
        kh, kw = base.kernel_size
        r = min(rank, base.in_channels * kh * kw, base.out_channels)
        self.lora_A = nn.Parameter(torch.empty(r, base.in_channels, kh, kw, device=w.device, dtype=w.dtype))
        self.lora_B = nn.Parameter(torch.zeros(base.out_channels, r, 1, 1, device=w.device, dtype=w.dtype))
        nn.init.kaiming_uniform_(self.lora_A, a=math.sqrt(5))

    def delta(self, x: torch.Tensor) -> torch.Tensor:
        b = self.base
        h = F.conv2d(x, self.lora_A, None, b.stride, b.padding, b.dilation)
        return F.conv2d(h, self.lora_B) * self.scale

    def delta_weight(self) -> torch.Tensor:
        # (out, r, 1, 1) o (r, in, kh, kw) -> (out, in, kh, kw)
        return self.scale * torch.einsum("or,rikl->oikl", self.lora_B[:, :, 0, 0], self.lora_A)


def _default_target(name: str, module: nn.Module) -> bool:
    return isinstance(module, nn.Linear) or (isinstance(module, nn.Conv2d) and module.groups == 1
                                            and module.padding_mode == "zeros")


def add_lora(net: nn.Module, rank: int = 64, alpha: float | None = None, dropout: float = 0.0,
             targets: Callable[[str, nn.Module], bool] | None = None, mode: str = "on") -> nn.Module:
    """A new module tree: ``net``'s weights shared and frozen (``frozen_view``), LoRA on the targeted layers.

    Args:
        net: the teacher (any nn.Module, e.g. a ``sidfast.denoisers.Denoiser``); it is not modified.
        rank: r (clamped per layer to the layer's smaller side); alpha: scale numerator (default r, scale 1).
        dropout: dropout on the LoRA branch's input, active in training mode (the shared base runs as in
            ``net``: keep the teacher in eval mode, its dropout cannot apply to the fake half only).
        targets: ``(qualified_name, module) -> bool``; default every ``nn.Linear`` and ungrouped
            ``nn.Conv2d``.
        mode: the LoRA layers' mode (``LORA_LAYER_MODES``).
    Returns:
        the new tree; its only trainable parameters are the ``lora_A`` / ``lora_B`` of its LoRA layers.
    """
    if any(isinstance(m, LoRALayer) for m in net.modules()):
        raise ValueError("net already holds LoRA layers")
    targets = targets or _default_target
    view = frozen_view(net)
    chosen = [(name, m) for name, m in view.named_modules() if name and targets(name, m)]
    if not chosen:
        raise ValueError("no layer of net matched the LoRA targets")
    for name, m in chosen:
        if isinstance(m, nn.Linear):
            wrapped = LoRALinear(m, rank, alpha, dropout, mode)
        elif isinstance(m, nn.Conv2d):
            wrapped = LoRAConv2d(m, rank, alpha, dropout, mode)
        else:
            raise TypeError(f"LoRA target {name} is a {type(m).__name__}; only nn.Linear and nn.Conv2d are "
                            "supported")
        parent_name, _, child = name.rpartition(".")
        setattr(view.get_submodule(parent_name) if parent_name else view, child, wrapped)
    return view


def lora_layers(module: nn.Module) -> Iterator[LoRALayer]:
    return (m for m in module.modules() if isinstance(m, LoRALayer))


def set_lora_mode(module: nn.Module, mode: str) -> nn.Module:
    """Set every LoRA layer of ``module`` to ``mode``; returns ``module``."""
    if mode not in LORA_LAYER_MODES:
        raise ValueError(f"mode must be one of {LORA_LAYER_MODES}, got {mode!r}")
    for m in lora_layers(module):
        m.mode = mode
    return module


def lora_parameters(module: nn.Module) -> list[nn.Parameter]:
    """The ``lora_A`` / ``lora_B`` parameters of every LoRA layer (what the fake-score optimizer trains)."""
    return [p for m in lora_layers(module) for p in (m.lora_A, m.lora_B)]


def lora_state_dict(module: nn.Module) -> dict[str, torch.Tensor]:
    """Only the LoRA entries of ``module.state_dict()`` (the shared base weights are the teacher's)."""
    return {k: v for k, v in module.state_dict().items() if k.endswith((".lora_A", ".lora_B"))}


def merge_lora(module: nn.Module) -> nn.Module:
    """A plain copy of ``module`` (weights copied, not shared) with each LoRA layer replaced by its base layer
    holding ``W + scale * B A``: the network a LoRA layer in mode "on" computes."""
    out = copy.deepcopy(module)
    for name, m in list(out.named_modules()):
        if not isinstance(m, LoRALayer):
            continue
        base = m.base
        with torch.no_grad():
            merged = nn.Parameter(base.weight.detach() + m.delta_weight().to(base.weight.dtype),
                                  requires_grad=base.weight.requires_grad)
        base.weight = merged
        parent_name, _, child = name.rpartition(".")
        setattr(out.get_submodule(parent_name) if parent_name else out, child, base)
    return out


class LoRAFakeScore(Denoiser):
    """The LoRA fake score as a Denoiser: ``add_lora(teacher)`` in mode "on".

    ``train(mode)`` switches only the LoRA layers (their dropout); the shared base network always runs in
    eval mode, as the teacher does, so that one forward over [teacher half; fake half] treats both halves
    alike.
    """

    def __init__(self, teacher: Denoiser, rank: int = 64, alpha: float | None = None, dropout: float = 0.0,
                 targets: Callable[[str, nn.Module], bool] | None = None, name: str | None = "fake score"):
        super().__init__(name)
        if not isinstance(teacher, Denoiser):
            raise TypeError(f"teacher must be a sidfast.denoisers.Denoiser, got {type(teacher).__name__}")
        self.net = add_lora(teacher, rank, alpha, dropout, targets, mode="on")
        self.net.name = name
        self.train(True)

    @property
    def network(self) -> nn.Module:
        return self.net

    def label(self) -> str:
        return self.net.label()

    def train(self, mode: bool = True) -> "LoRAFakeScore":
        self.training = bool(mode)
        self.net.train(False)
        for m in lora_layers(self.net):
            m.training = bool(mode)
        return self

    def forward(self, x: torch.Tensor, sigma, class_labels=None, **cond) -> torch.Tensor:
        return self.net(x, sigma, class_labels, **cond)

    def lora_parameters(self) -> list[nn.Parameter]:
        return lora_parameters(self.net)


__all__ = ["LoRAFakeScore", "LoRALayer", "LoRALinear", "LoRAConv2d", "add_lora", "lora_layers",
           "set_lora_mode", "lora_parameters", "lora_state_dict", "merge_lora", "LORA_LAYER_MODES"]
