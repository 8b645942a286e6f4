"""Low-rank (LoRA) networks over a frozen network's shared weights: the LoRA fake score and generator.

The fake score, or the generator, is the teacher's own weights, shared and frozen, plus a trainable update
``W + (alpha / r) B A`` (Hu et al. 2021) with ``B = 0`` at the start: no copy of the network and no optimizer
state for one. Which layers, the modes and why not PEFT: docs/lora.md.
"""
from __future__ import annotations

import copy
import math
from collections.abc import Callable, Iterator

import torch
import torch.nn.functional as F
from torch import nn
from torch.func import functional_call

from sidfast._checks import check_int
from sidfast.models.interface import Denoiser
from sidfast.models.views import frozen_view

LORA_LAYER_MODES = ("on", "off", "split")
# how a trainable network (fake score, generator) is held: a full copy, or LoRA factors over shared weights
NETWORK_KINDS = ("full", "lora")


class LoRALayer(nn.Module):
    """Base of the LoRA wrappers: the (shared, frozen) ``base`` layer plus ``lora_A``, ``lora_B``,
    ``scale``; other attributes are read from ``base``."""

    base: nn.Module

    def __init__(self, base: nn.Module, rank: int, alpha: float | None, dropout: float, mode: str):
        super().__init__()
        check_int("rank", rank, 1, "rank must be a positive integer, got {value!r}")
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

    def __getattr__(self, name: str):
        """Attributes the wrapper lacks are the base layer's (``weight``, ``in_features``, ...): the network
        around it may read them, as EDM's ``SongUNet`` reads ``map_label.in_features``."""
        try:
            return super().__getattr__(name)
        except AttributeError:
            if name == "base":
                raise
            return getattr(self.base, name)

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
    channels, B a 1x1 conv back to the output channels (zeros). Grouped or padded-otherwise convolutions
    take ``LoRAWeight``."""

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


def _split_batch(args: tuple, kwargs: dict, n: int, h: int):
    """(teacher-half, fake-half) copies of a call's arguments: tensors with batch ``n`` split at ``h``,
    anything else passed to both halves."""
    def half(v, part):
        if isinstance(v, torch.Tensor) and v.dim() > 0 and v.shape[0] == n:
            return v[:h] if part == 0 else v[h:]
        return v

    return [(tuple(half(v, part) for v in args), {k: half(v, part) for k, v in kwargs.items()})
            for part in (0, 1)]


def _matrix_weight(module: nn.Module) -> nn.Parameter | None:
    """``module.weight`` if it is a parameter of 2 or more dimensions, else None."""
    w = getattr(module, "weight", None)
    return w if isinstance(w, nn.Parameter) and w.dim() >= 2 else None


class LoRAWeight(LoRALayer):
    """Any module holding a ``weight`` (out, ...) that its forward uses as a linear map or convolution, run
    with ``W + scale * B A``: A (r, weight[0].numel()) Kaiming-uniform, B (out, r) zeros, ``B A`` reshaped
    to the weight's shape. The module's own forward does the rest: its stride, padding, groups, resampling,
    bias and casts, so the update is exact for any such class."""

    def __init__(self, base: nn.Module, rank: int = 64, alpha: float | None = None, dropout: float = 0.0,
                 mode: str = "on"):
        w = _matrix_weight(base)
        if w is None:
            raise TypeError(f"LoRAWeight needs a module with a weight parameter of 2 or more dimensions, got "
                            f"{type(base).__name__}")
        if dropout:
            raise ValueError(f"dropout must be 0 for a {type(base).__name__} layer: the update is merged "
                             "into its weight, so there is no low-rank branch input to drop (only "
                             "nn.Linear and nn.Conv2d layers take LoRA dropout)")
        super().__init__(base, rank, alpha, dropout, mode)
        fan_in = w[0].numel()
        r = min(rank, fan_in, w.shape[0])
        self.lora_A = nn.Parameter(torch.empty(r, fan_in, device=w.device, dtype=w.dtype))
        self.lora_B = nn.Parameter(torch.zeros(w.shape[0], r, device=w.device, dtype=w.dtype))
        nn.init.kaiming_uniform_(self.lora_A, a=math.sqrt(5))

    def delta_weight(self) -> torch.Tensor:
        return (self.scale * (self.lora_B @ self.lora_A)).reshape(self.base.weight.shape)

    def _merged(self, args: tuple, kwargs: dict):
        w = self.base.weight
        return functional_call(self.base, {"weight": w + self.delta_weight().to(w.dtype)}, args, kwargs)

    def forward(self, *args, **kwargs):
        if self.mode == "off":
            return self.base(*args, **kwargs)
        if self.mode == "on":
            return self._merged(args, kwargs)
        x = args[0] if args else next(iter(kwargs.values()), None)
        if not isinstance(x, torch.Tensor) or x.dim() == 0 or x.shape[0] % 2:
            raise ValueError("LoRA split mode needs a doubled batch [teacher; fake] as the first argument, "
                             f"got {tuple(x.shape) if isinstance(x, torch.Tensor) else type(x).__name__}")
        teacher, fake = _split_batch(args, kwargs, x.shape[0], x.shape[0] // 2)
        return torch.cat([self.base(*teacher[0], **teacher[1]), self._merged(*fake)], 0)


def _fast_class(module: nn.Module):
    """``LoRALinear`` / ``LoRAConv2d`` for an ``nn.Linear`` / ungrouped zero-padded ``nn.Conv2d`` whose class
    keeps the stock forward (a subclass may resample or rescale around it), else None."""
    if isinstance(module, nn.Linear) and type(module).forward is nn.Linear.forward:
        return LoRALinear
    if (isinstance(module, nn.Conv2d) and type(module).forward is nn.Conv2d.forward
            and type(module)._conv_forward is nn.Conv2d._conv_forward and module.groups == 1
            and module.padding_mode == "zeros"):
        return LoRAConv2d
    return None


def _wrap(name: str, module: nn.Module, rank: int, alpha: float | None, dropout: float,
          mode: str) -> LoRALayer:
    fast = _fast_class(module)
    if fast is not None:
        return fast(module, rank, alpha, dropout, mode)
    if _matrix_weight(module) is None:
        raise TypeError(f"LoRA target {name} is a {type(module).__name__}, which holds no weight parameter "
                        "of 2 or more dimensions")
    return LoRAWeight(module, rank, alpha, dropout, mode)


def default_target(name: str, module: nn.Module) -> bool:
    """Every module holding its own ``weight`` parameter of two or more dimensions, except embeddings (a
    table lookup, not a linear map of the input)."""
    w = module._parameters.get("weight")
    return w is not None and w.dim() >= 2 and not isinstance(module, (nn.Embedding, nn.EmbeddingBag))


def add_lora(net: nn.Module, rank: int = 64, alpha: float | None = None, dropout: float = 0.0,
             targets: Callable[[str, nn.Module], bool] | None = None, mode: str = "on") -> nn.Module:
    """A new module tree: ``net``'s weights shared and frozen (``frozen_view``), LoRA on the targeted layers.

    Args:
        net: the network (any nn.Module, e.g. a ``sidfast.models.denoiser.Denoiser``); it is not modified.
        rank: r (clamped per layer to the layer's smaller side); alpha: scale numerator (default r, scale 1).
        dropout: dropout on the LoRA branch's input, active in training mode (the shared base runs as in
            ``net``: keep the teacher in eval mode, its dropout cannot apply to the fake half only). Only
            ``nn.Linear`` / ``nn.Conv2d`` layers have a branch input; with other targets it must be 0.
        targets: ``(qualified_name, module) -> bool``; default ``default_target`` (every module holding a
            weight of 2 or more dimensions, embeddings aside).
        mode: the LoRA layers' mode (``LORA_LAYER_MODES``).
    Returns:
        the new tree; its only trainable parameters are the ``lora_A`` / ``lora_B`` of its LoRA layers.
    """
    if any(isinstance(m, LoRALayer) for m in net.modules()):
        raise ValueError("net already holds LoRA layers")
    targets = targets or default_target
    view = frozen_view(net)
    chosen = [(name, m) for name, m in view.named_modules() if name and targets(name, m)]
    if not chosen:
        raise ValueError("no layer of net matched the LoRA targets")
    for (outer, _), (inner, _) in zip(chosen, chosen[1:]):
        if inner.startswith(outer + "."):
            # the split mode calls an outer layer once per half, so its inner layers would see one half only
            raise ValueError(f"LoRA targets {outer} and {inner} are nested: target one of them")
    for name, m in chosen:
        wrapped = _wrap(name, m, rank, alpha, dropout, mode)
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


class LoRADenoiser(Denoiser):
    """A Denoiser that is ``add_lora(net)`` in mode "on": ``net``'s weights shared and frozen, the LoRA
    factors its only trainable parameters (``lora_parameters()``).

    ``requires_grad_`` reaches the factors only: the shared weights are ``net``'s, and an optimizer stepping
    them would change ``net``. ``train(mode)`` switches the LoRA layers (their dropout) and, when
    ``base_trains``, the shared base's modules (its dropout) too.
    """

    base_trains = True

    def __init__(self, net: Denoiser, rank: int = 64, alpha: float | None = None, dropout: float = 0.0,
                 targets: Callable[[str, nn.Module], bool] | None = None, name: str | None = None,
                 what: str = "net"):
        super().__init__(name)
        if not isinstance(net, Denoiser):
            raise TypeError(f"{what} must be a sidfast.models.denoiser.Denoiser, got {type(net).__name__}")
        self.net = add_lora(net, rank, alpha, dropout, targets, mode="on")
        self.net.name = name
        self.train(True)

    @property
    def network(self) -> nn.Module:
        return self.net

    def label(self) -> str:
        return self.net.label()

    def train(self, mode: bool = True) -> "LoRADenoiser":
        self.training = bool(mode)
        self.net.train(bool(mode) and self.base_trains)
        for m in lora_layers(self.net):
            m.training = bool(mode)
        return self

    def requires_grad_(self, requires_grad: bool = True) -> "LoRADenoiser":
        for p in lora_parameters(self.net):
            p.requires_grad_(requires_grad)
        return self

    def forward(self, x: torch.Tensor, sigma, class_labels=None, **cond) -> torch.Tensor:
        return self.net(x, sigma, class_labels, **cond)

    def lora_parameters(self) -> list[nn.Parameter]:
        return lora_parameters(self.net)


class LoRAFakeScore(LoRADenoiser):
    """The LoRA fake score: ``LoRADenoiser`` over the teacher.

    Its shared base network always runs in eval mode, as the teacher does, so that one forward over
    [teacher half; fake half] treats both halves alike; ``train(mode)`` switches only the LoRA layers.
    """

    base_trains = False

    def __init__(self, teacher: Denoiser, rank: int = 64, alpha: float | None = None, dropout: float = 0.0,
                 targets: Callable[[str, nn.Module], bool] | None = None, name: str | None = "fake score"):
        super().__init__(teacher, rank, alpha, dropout, targets, name, what="teacher")


class LoRAGenerator(LoRADenoiser):
    """A LoRA generator: ``LoRADenoiser`` over the network SiD initialises the generator from (the teacher),
    sharing its frozen weights; an option to the full trainable copy. Its base runs in train mode when
    the generator does, as the full generator's would (its dropout acts)."""

    base_trains = True

    def __init__(self, net: Denoiser, rank: int = 64, alpha: float | None = None, dropout: float = 0.0,
                 targets: Callable[[str, nn.Module], bool] | None = None, name: str | None = "generator"):
        super().__init__(net, rank, alpha, dropout, targets, name)


def lora_generator(teacher: Denoiser, rank: int, seed: int) -> LoRAGenerator:
    """``LoRAGenerator(teacher, rank)`` over the teacher's frozen weights as they lie (moving it with
    ``.to()`` would copy them and end the sharing), its factors drawn from ``seed`` and the caller's random
    streams left as they were, so that a run's start depends on its seed only."""
    device = next(teacher.parameters()).device
    with torch.random.fork_rng(devices=[device] if device.type == "cuda" else []):
        torch.manual_seed(seed)
        return LoRAGenerator(teacher, rank=rank)


def load_lora_factors(net: nn.Module, state: dict, what: str) -> None:
    """Load ``state``, the LoRA factors of a checkpoint (``sidfast.models.lora.lora_state_dict``), into the LoRA
    network ``net``; ValueError unless they are exactly its factors (the rest of ``net`` is the teacher's)."""
    missing, unexpected = net.load_state_dict(state, strict=False)
    lora_missing = [k for k in missing if k.endswith((".lora_A", ".lora_B"))]
    if unexpected or lora_missing or not state:
        raise ValueError(f"the checkpoint's {what} is not a LoRA {what} of this teacher and rank "
                         f"(missing {lora_missing[:3]}, unexpected {unexpected[:3]})")


__all__ = ["LoRADenoiser", "LoRAFakeScore", "LoRAGenerator", "LoRALayer", "LoRALinear", "LoRAConv2d",
           "LoRAWeight", "add_lora", "default_target", "lora_layers", "set_lora_mode", "lora_parameters",
           "lora_state_dict", "merge_lora", "lora_generator", "load_lora_factors", "LORA_LAYER_MODES",
           "NETWORK_KINDS"]
