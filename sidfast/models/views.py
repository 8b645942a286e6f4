"""Frozen views of networks and the storage checks that keep them honest (shared by ``engine`` and ``lora``).

A frozen view is a second module tree over a network's own parameter storage whose parameters never require
grad: autograd through it computes input gradients only, and in-place optimizer steps on the network are seen
by the view at once. Anything that replaces a parameter's storage instead (``.to()``, ``p.data = ...``,
``load_state_dict(assign=True)``) breaks the sharing; ``StorageSnapshot`` and ``FrozenMirror`` detect it.
"""
from __future__ import annotations

import copy

import torch
from torch import nn


def frozen_view(module: nn.Module) -> nn.Module:
    """A copy of ``module``'s structure whose parameters share storage with ``module``'s but never need grad.

    Every parameter ``p`` becomes ``nn.Parameter(p.detach(), requires_grad=False)`` (same storage, so in-place
    optimizer updates of ``p`` are seen at once); buffers are the same tensors. Nothing is copied but Python
    objects. Gradients flow through the view to its *inputs* only, with no parameter gradient computed, and
    ``requires_grad`` is never toggled (which would make compiled code recompile).
    Replacing a parameter's storage later (``p.data = ...``, ``module.to(...)``) breaks the sharing;
    ``shares_storage`` detects it.
    """
    if not isinstance(module, nn.Module):
        raise TypeError(f"module must be an nn.Module, got {type(module).__name__}")
    memo: dict[int, object] = {}
    for p in module.parameters():
        memo[id(p)] = nn.Parameter(p.detach(), requires_grad=False)
    for b in module.buffers():
        memo[id(b)] = b
    return copy.deepcopy(module, memo)


def shares_storage(view: nn.Module, module: nn.Module) -> bool:
    """Whether every parameter of ``view`` still lies on the storage of the matching parameter of
    ``module``."""
    return same_storage(list(view.parameters()), list(module.parameters()))


def same_storage(a: list[torch.Tensor], b: list[torch.Tensor]) -> bool:
    """Whether the tensors of ``a`` and ``b`` pair up on the same data with the same shapes."""
    return len(a) == len(b) and all(x.data_ptr() == y.data_ptr() and x.shape == y.shape for x, y in zip(a, b))


class StorageSnapshot:
    """Where a module's parameters and buffers keep their data, as of construction.

    ``unchanged()`` is a per-call check that every parameter and buffer slot still points at the same storage:
    a replaced tensor (``load_state_dict(assign=True)``, ``module.weight = ...``) or replaced data (``.to()``,
    ``p.data = ...``) would leave a frozen view or a captured graph on the old memory. It reads the slots from
    dictionaries gathered once, so a call costs one ``data_ptr()`` per tensor instead of a walk of the module
    tree."""

    def __init__(self, module: nn.Module):
        self._slots = []
        for kind, named in (("_parameters", module.named_parameters()), ("_buffers", module.named_buffers())):
            for name, _ in named:
                owner, _, attr = name.rpartition(".")
                self._slots.append((getattr(module.get_submodule(owner), kind), attr))
        self.ptrs = self._ptrs()

    def _ptrs(self) -> tuple:
        return tuple(d[attr].data_ptr() if d.get(attr) is not None else 0 for d, attr in self._slots)

    def unchanged(self) -> bool:
        return self._ptrs() == self.ptrs


class FrozenMirror:
    """A frozen view of ``source`` kept in step with it: storage check and train/eval state, both host-only.

    Args:
        source: the network the view mirrors; view: ``frozen_view(source)`` (possibly modified, e.g. LoRA
            layers set to another mode); what: the network's name in error messages;
        base: for a LoRA tree, the teacher whose frozen weights it shares, checked as well.
    """

    def __init__(self, source: nn.Module, view: nn.Module, what: str, base: nn.Module | None = None):
        if not shares_storage(view, source):
            raise ValueError(f"the {what}'s frozen view does not share its parameters' storage")
        self.source = source
        self.view = view
        self.what = what
        self._source_modules = list(source.modules())
        self._view_modules = list(view.modules())
        self._source_storage = StorageSnapshot(source)
        self._base_storage = StorageSnapshot(base) if base is not None else None
        self._flags = None

    def check(self) -> None:
        """Raise if ``source`` (or ``base``) no longer holds the storage the view was built over."""
        if not self._source_storage.unchanged():
            raise ValueError(f"the {self.what}'s parameters were replaced after the engine was built (e.g. "
                             "by .to(), load_state_dict(assign=True) or p.data = ...): call engine.refresh()")
        if self._base_storage is not None and not self._base_storage.unchanged():
            raise ValueError("the teacher's parameters were replaced after the engine was built: call "
                             "engine.refresh()")

    def sync_training(self) -> tuple:
        """Copy every source module's ``training`` flag to the view; returns the flags."""
        flags = tuple(m.training for m in self._source_modules)
        if flags != self._flags:
            for mv, flag in zip(self._view_modules, flags):
                mv.training = flag
            self._flags = flags
        return flags


__all__ = ["frozen_view", "shares_storage", "same_storage", "StorageSnapshot", "FrozenMirror"]
