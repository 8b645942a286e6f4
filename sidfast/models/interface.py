"""The one denoiser interface (``Denoiser``) and the checks every adapter applies to its calls
(``docs/teachers.md``; the adapters are in ``sidfast.models.denoiser``, ``.diffusers`` and ``.flow``)."""
from __future__ import annotations

import torch
from torch import nn

from sidfast._checks import per_sample
from sidfast.models.introspect import infer_num_classes
from sidfast.labels import format_labels


def _name_of(net) -> str:
    return type(net).__name__ if not isinstance(net, str) else net


def sigma_per_sample(sigma, x: torch.Tensor) -> torch.Tensor:
    """``sigma`` as a ``(B,)`` tensor on ``x``'s device in float32 (float64 for float64 ``x``).

    Accepts a real number, a 0-d tensor, a ``(B,)`` tensor or one of shape ``(B, 1, ..., 1)``.
    """
    return per_sample("sigma", sigma, x, dtype=torch.promote_types(x.dtype, torch.float32))


def _autocast_dtype(device: torch.device):
    """The autocast dtype active for ``device``'s type, or None when autocast is off there."""
    kind = device.type
    try:
        if torch.is_autocast_enabled(kind):
            return torch.get_autocast_dtype(kind)
    except (TypeError, RuntimeError):  # a device type autocast does not know
        return None
    return None


def check_output(name: str, out, x: torch.Tensor) -> torch.Tensor:
    """Return ``out`` (in ``x``'s dtype) or raise naming the network when it does not match its input.

    Under autocast a lower-precision output in the autocast dtype is accepted and cast back to ``x``'s dtype;
    any other dtype, shape or device difference is a ValueError (a TypeError if ``out`` is not a tensor).
    """
    if not isinstance(out, torch.Tensor):
        raise TypeError(f"network {name} returned {type(out).__name__}, expected a tensor")
    if out.shape != x.shape:
        raise ValueError(f"network {name} returned shape {tuple(out.shape)} for an input of shape {tuple(x.shape)}")
    if out.device != x.device:
        raise ValueError(f"network {name} returned a tensor on {out.device} for an input on {x.device}")
    if out.dtype != x.dtype:
        if out.dtype != _autocast_dtype(x.device):
            raise ValueError(f"network {name} returned dtype {out.dtype} for an input of dtype {x.dtype}")
        out = out.to(x.dtype)
    return out


def _unwrap(out):
    """A diffusers output object (``.sample``) or a ``return_dict=False`` tuple, reduced to its tensor."""
    if isinstance(out, torch.Tensor):
        return out
    sample = getattr(out, "sample", None)
    if isinstance(sample, torch.Tensor):
        return sample
    if isinstance(out, (tuple, list)) and out and isinstance(out[0], torch.Tensor):
        return out[0]
    return out


class Denoiser(nn.Module):
    """Base class: ``forward(x, sigma, class_labels=None, **cond) -> x0_hat`` in EDM (VE) coordinates.

    ``name`` labels the network in error messages (the engine sets "teacher", "fake score", ...).
    """

    def __init__(self, name: str | None = None):
        super().__init__()
        self.name = name

    @property
    def network(self) -> nn.Module:  # pragma: no cover - overridden
        raise NotImplementedError

    def label(self) -> str:
        inner = _name_of(self.network)
        return f"{self.name} ({inner})" if self.name else inner

    label_format = "onehot"

    @property
    def num_classes(self) -> int:
        """Classes a label may name (0 for an unconditional or text-conditioned network)."""
        return infer_num_classes(self.network)

    def labels(self, idx: torch.Tensor) -> torch.Tensor:
        """Class indices ``idx`` (B,) in this network's label format; a ValueError for an index out of range."""
        if not self.num_classes:
            raise ValueError(f"{self.label()} is not class-conditional: it takes no class labels")
        return format_labels(idx, self.num_classes, self.label_format)

    def null_labels(self, batch: int, device=None) -> torch.Tensor:
        """The labels that mean "no class" (B of them), for the unconditional call of guidance."""
        raise ValueError(self._no_guidance())

    def null_condition(self, batch: int, device=None) -> dict:
        """Keywords of the unconditional call: ``den(x, sigma, **den.null_condition(B))``."""
        return {"class_labels": self.null_labels(batch, device)}

    def _no_guidance(self) -> str:
        config = getattr(self.network, "config", None)
        if getattr(config, "cross_attention_dim", None) or getattr(config, "joint_attention_dim", None):
            return (f"{self.label()} is text-conditioned: its null condition is the empty prompt's embedding "
                    "(sidfast.models.text.TextConditioner.null_condition)")
        return f"{self.label()} is unconditional: classifier-free guidance needs a conditional teacher"

    def forward(self, x: torch.Tensor, sigma, class_labels=None, **cond) -> torch.Tensor:  # pragma: no cover
        raise NotImplementedError


__all__ = ["Denoiser", "check_output", "sigma_per_sample"]
