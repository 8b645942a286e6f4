"""Activation memory measured, not modelled: the bytes autograd saves for backward during a network's real
forward (on the meta device by default: exact shapes, no compute), with GPU flash attention's saved tensors
standing in for the math fallback's, and what activation checkpointing of the blocks keeps."""
from __future__ import annotations

import contextlib
import copy
import re
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from sidfast.labels import draw_labels
from sidfast.models.lora import add_lora, lora_parameters

# containers whose elements diffusers checkpoints one at a time (and FSDP2 would wrap as units)
UNIT_LISTS = ("resnets", "transformer_blocks", "single_transformer_blocks")


class _FlashAttention(torch.autograd.Function):
    """Attention that saves what GPU flash / memory-efficient attention saves (q, k, v, output and an fp32
    log-sum-exp per query), not the (tokens x tokens) probabilities of the math fallback."""

    @staticmethod
    def forward(ctx, q, k, v, mask, dropout_p, is_causal, scale):
        out = _SDPA(q, k, v, attn_mask=mask, dropout_p=dropout_p, is_causal=is_causal, scale=scale)
        lse = q.new_empty(q.shape[:-1], dtype=torch.float32)
        ctx.save_for_backward(q, k, v, out, lse)
        ctx.options = (mask, dropout_p, is_causal, scale)
        return out

    @staticmethod
    def backward(ctx, grad):
        q, k, v, _, _ = ctx.saved_tensors
        mask, dropout_p, is_causal, scale = ctx.options
        with torch.enable_grad():
            qkv = [t.detach().requires_grad_(True) for t in (q, k, v)]
            out = _SDPA(*qkv, attn_mask=mask, dropout_p=dropout_p, is_causal=is_causal, scale=scale)
            grads = torch.autograd.grad(out, qkv, grad)
        return (*grads, None, None, None, None)


_SDPA = F.scaled_dot_product_attention


def _flash_sdpa(query, key, value, attn_mask=None, dropout_p=0.0, is_causal=False, scale=None, **kw):
    if not kw.get("enable_gqa", False):
        kw.pop("enable_gqa", None)
    qkv = (query, key, value)
    if kw or not torch.is_grad_enabled() or not any(t.requires_grad for t in qkv):
        return _SDPA(*qkv, attn_mask=attn_mask, dropout_p=dropout_p, is_causal=is_causal, scale=scale, **kw)
    return _FlashAttention.apply(*qkv, attn_mask, dropout_p, is_causal, scale)


def _key(t: torch.Tensor) -> int:
    return t.untyped_storage()._cdata


def checkpoint_units(net: nn.Module) -> list[nn.Module]:
    """The blocks activation checkpointing recomputes: diffusers' (elements of ``resnets``,
    ``transformer_blocks``, ``single_transformer_blocks`` holding no such element), else the outermost
    elements of any ``nn.ModuleList`` that have parameters."""
    pattern = re.compile(r"(^|\.)(%s)\.\d+$" % "|".join(UNIT_LISTS))
    named = [m for name, m in net.named_modules() if pattern.search(name)]
    ids = {id(m) for m in named}
    units = [m for m in named if not any(id(c) in ids for c in m.modules() if c is not m)]
    if units:
        return units
    found, inside = [], set()
    for m in net.modules():
        if id(m) in inside or not isinstance(m, nn.ModuleList):
            continue
        for child in m:
            if any(True for _ in child.parameters()):
                found.append(child)
                inside.update(id(c) for c in child.modules())
    return found


@dataclass
class SavedBytes:
    """Bytes saved for backward by one forward: ``total`` (each storage once, parameters and buffers left
    out), and ``checkpointed``: what stays with activation checkpointing of the units (everything saved
    outside the units, the units' inputs, and the largest unit's own saved bytes while it is recomputed)."""
    total: int
    checkpointed: int


@contextlib.contextmanager
def count_saved(units: list[nn.Module], exclude: set[int]):
    """Record the storages autograd saves inside the block; yields a dict filled on exit: ``total``,
    ``checkpointed`` (see ``SavedBytes``)."""
    saved: dict[int, tuple[int, int | None]] = {}   # storage -> (bytes, owning unit or None)
    inputs: dict[int, int] = {}
    stack: list[int] = []
    keep = []   # saved tensors stay referenced so that storage ids stay unique

    def pack(t):
        k = _key(t)
        if k not in exclude and k not in saved:
            keep.append(t)
            saved[k] = (t.untyped_storage().nbytes(), stack[0] if stack else None)
        return t

    def pre(module, args, kwargs):
        if not stack:
            for a in (*args, *kwargs.values()):
                for t in (a if isinstance(a, (tuple, list)) else (a,)):
                    if isinstance(t, torch.Tensor) and t.is_floating_point() and _key(t) not in exclude:
                        keep.append(t)
                        inputs.setdefault(_key(t), t.untyped_storage().nbytes())
        stack.append(id(module))

    def post(module, args, output):
        stack.pop()

    handles = [h for u in units for h in (u.register_forward_pre_hook(pre, with_kwargs=True),
                                          u.register_forward_hook(post))]
    result = {}
    F.scaled_dot_product_attention = _flash_sdpa
    try:
        with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
            yield result
    finally:
        F.scaled_dot_product_attention = _SDPA
        for h in handles:
            h.remove()
    outside = {k: b for k, (b, owner) in saved.items() if owner is None}
    per_unit: dict[int, int] = {}
    for b, owner in saved.values():
        if owner is not None:
            per_unit[owner] = per_unit.get(owner, 0) + b
    kept_inputs = sum(b for k, b in inputs.items() if k not in outside)
    result["total"] = sum(b for b, _ in saved.values())
    result["checkpointed"] = sum(outside.values()) + kept_inputs + max(per_unit.values(), default=0)


class ActivationMeter:
    """Saved-for-backward bytes of one network's forward, per role (``"frozen"``, ``"full"``, ``"lora"``:
    whose parameters train) and input (needing grad or not), at batch ``b``; cached."""

    def __init__(self, teacher: nn.Module, sample_shape: tuple, num_classes: int, label_format: str,
                 rank: int, dtype: torch.dtype, device="meta"):
        self.device = torch.device(device)
        self.base = _detached_copy(teacher, self.device, dtype)
        self.shape = tuple(sample_shape)
        self.num_classes = num_classes
        self.label_format = label_format
        self.rank = rank
        self.dtype = dtype
        self.nets: dict[str, nn.Module] = {}
        self.cache: dict[tuple, SavedBytes] = {}

    def net(self, role: str) -> nn.Module:
        if role not in self.nets:
            if role == "frozen":
                net = self.base
            elif role == "full":
                net = copy.deepcopy(self.base).requires_grad_(True)
            else:
                net = add_lora(self.base, self.rank)
                for p in lora_parameters(net):
                    p.requires_grad_(True)
            self.nets[role] = net
        return self.nets[role]

    def measure(self, role: str, input_grad: bool, b: int) -> SavedBytes:
        key = (role, input_grad, b)
        if key not in self.cache:
            net = self.net(role)
            exclude = {_key(t) for t in (*net.parameters(), *net.buffers())}
            x = torch.zeros((b, *self.shape), device=self.device, dtype=self.dtype, requires_grad=input_grad)
            sigma = torch.ones(b, device=self.device)
            labels = None
            if self.num_classes:
                labels = draw_labels(b, self.num_classes, self.label_format, self.device)
            with count_saved(checkpoint_units(net), exclude) as r:
                net(x, sigma, labels)
            self.cache[key] = SavedBytes(r["total"], r["checkpointed"])
        return self.cache[key]


def _detached_copy(net: nn.Module, device: torch.device, dtype: torch.dtype) -> nn.Module:
    """A frozen copy of ``net`` on ``device`` in ``dtype``; on the meta device no weight is copied."""
    if device.type == "meta":
        memo = {id(t): torch.empty_like(t, device="meta") for t in (*net.parameters(), *net.buffers())}
        for p in net.parameters():
            memo[id(p)] = nn.Parameter(memo[id(p)], requires_grad=False)
        net = copy.deepcopy(net, memo)
    else:
        net = copy.deepcopy(net).to(device)
    return net.to(dtype).eval().requires_grad_(False)


__all__ = ["checkpoint_units", "SavedBytes", "count_saved", "ActivationMeter", "UNIT_LISTS"]
