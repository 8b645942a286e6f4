"""Argument checks shared by the public losses and ops: each error names the argument at fault."""
from __future__ import annotations

import math
import numbers

import torch

from sidfast.reference import REDUCTIONS

FLOAT_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)


def check_tensors(min_dim: int = 2, **named: torch.Tensor) -> None:
    """Raise TypeError/ValueError naming the argument unless all tensors share shape, dtype and device."""
    first_name = None
    first = None
    for name, t in named.items():
        if not isinstance(t, torch.Tensor):
            raise TypeError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
        if t.dtype not in FLOAT_DTYPES:
            raise TypeError(f"{name} must be float16, bfloat16, float32 or float64, got {t.dtype}")
        if t.dim() < min_dim:
            raise ValueError(f"{name} must have shape (batch, *features) with rank >= {min_dim}, "
                             f"got {tuple(t.shape)}")
        if t.shape[0] == 0 or t.numel() == 0:
            raise ValueError(f"{name} is empty (shape {tuple(t.shape)})")
        if first is None:
            first_name = name
            first = t
            continue
        if t.shape != first.shape:
            raise ValueError(f"{name} has shape {tuple(t.shape)} but {first_name} has shape "
                             f"{tuple(first.shape)}")
        check_same_kind(name, t, first_name, first)


def check_same_kind(name: str, t: torch.Tensor, other_name: str, other: torch.Tensor) -> None:
    """Raise TypeError/ValueError naming ``name`` unless ``t`` has ``other``'s dtype and device."""
    if t.dtype != other.dtype:
        raise TypeError(f"{name} has dtype {t.dtype} but {other_name} has dtype {other.dtype}")
    if t.device != other.device:
        raise ValueError(f"{name} is on {t.device} but {other_name} is on {other.device}")


def check_real(name: str, value, positive: bool = False) -> float:
    """A finite real number (bools refused); ``positive`` also refuses values <= 0."""
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        raise TypeError(f"{name} must be a real number, got {type(value).__name__}")
    value = float(value)
    if not math.isfinite(value) or (positive and value <= 0):
        raise ValueError(f"{name} must be finite{' and positive' if positive else ''}, got {value}")
    return value


def check_int(name: str, value, low: int | None = None, message: str | None = None) -> int:
    """``value`` as an int: an integer (not a bool) at least ``low``; a ValueError naming ``name`` otherwise.

    ``message``: the error's text in place of the default, ``{value!r}`` formatted in (keeps a caller's
    established wording)."""
    if isinstance(value, bool) or not isinstance(value, numbers.Integral) or (low is not None and value < low):
        if message is not None:
            raise ValueError(message.format(value=value))
        bound = "" if low is None else f" >= {low}"
        raise ValueError(f"{name} must be an integer{bound}, got {value!r}")
    return int(value)


def check_reduction(reduction) -> str:
    if reduction not in REDUCTIONS:
        raise ValueError(f"reduction must be one of {REDUCTIONS}, got {reduction!r}")
    return reduction


def per_sample(name: str, c, x: torch.Tensor, dtype: torch.dtype | None = None) -> torch.Tensor:
    """A per-sample coefficient as a contiguous (B,) tensor on ``x``'s device: a number becomes a tensor of
    ``dtype`` (default float32), a floating-point tensor with one entry per sample, of shape (B,) or
    (B, 1, ..., 1), is reshaped, a 0-d tensor is the same value for every sample; tensors are cast to ``dtype`` when given."""
    B = x.shape[0]
    if isinstance(c, numbers.Real) and not isinstance(c, bool):
        return torch.full((B,), float(c), device=x.device, dtype=dtype or torch.float32)
    if not isinstance(c, torch.Tensor):
        raise TypeError(f"{name} must be a tensor of shape (B,) or a number, got {type(c).__name__}")
    if not c.is_floating_point():
        raise TypeError(f"{name} must be floating point, got {c.dtype}")
    if c.device != x.device:
        raise ValueError(f"{name} is on {c.device} but the data is on {x.device}")
    if c.dim() == 0:
        c = c.expand(B)
    if c.numel() != B or (c.dim() > 1 and any(d != 1 for d in c.shape[1:])):
        raise ValueError(f"{name} must have one entry per sample ({B}), got shape {tuple(c.shape)}")
    c = c.reshape(-1)
    if dtype is not None:
        c = c.to(dtype)
    return c if c.is_contiguous() else c.contiguous()


def check_rows(x: torch.Tensor, labels, cond: dict, what: str, doubled: bool = False) -> None:
    """Raise unless ``labels`` (a tensor or None) has one row per sample of ``x`` (named ``what``) on its
    device, and with ``doubled`` (the score engine's mode "lora", which doubles the batch) every conditioning
    tensor too."""
    if labels is not None:
        if not isinstance(labels, torch.Tensor):
            raise TypeError(f"labels must be a tensor or None, got {type(labels).__name__}")
        if labels.dim() == 0 or labels.shape[0] != x.shape[0]:
            raise ValueError(f"labels must have one row per sample ({x.shape[0]}), got shape "
                             f"{tuple(labels.shape)}")
        if labels.device != x.device:
            raise ValueError(f"labels are on {labels.device} but {what} is on {x.device}")
    if doubled:
        for k, v in cond.items():
            if isinstance(v, torch.Tensor) and (v.dim() == 0 or v.shape[0] != x.shape[0]):
                raise ValueError(f"conditioning {k} must have one row per sample ({x.shape[0]}) to be "
                                 f"doubled in mode 'lora', got shape {tuple(v.shape)}")
