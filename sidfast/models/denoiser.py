"""One denoiser interface for teacher, fake score and generator, with adapters for what users have.

A denoiser is called as ``forward(x, sigma, class_labels=None, **cond) -> x0_hat`` in EDM coordinates,
``x = x0 + sigma * eps``. Adapters: ``EDMDenoiser``, ``DiffusersDenoiser`` (VP, eps/v/x0 targets),
``FlowDenoiser`` (flow matching). Contract and table: docs/teachers.md, "The denoiser interface".
"""
from __future__ import annotations

import inspect
import numbers

import torch
from torch import nn

from sidfast.models.diffusers import DiffusersDenoiser, MissingSchedulerConfig
from sidfast.models.flow import FLOW_MODELS, FlowDenoiser, latent_image_ids, pack_latents, unpack_latents
from sidfast.models.interface import Denoiser, check_output, sigma_per_sample
from sidfast.models.introspect import _modules_of, infer_image_shape, infer_num_classes, is_diffusers_model
from sidfast.models.io import import_entry_point
from sidfast.labels import draw_labels, format_labels


def _accepts_third_argument(fn) -> bool:
    """Whether ``fn(x, sigma, labels)`` is a valid call (a third positional parameter or ``*args``)."""
    try:
        params = list(inspect.signature(fn).parameters.values())
    except (TypeError, ValueError):
        return True
    positional = [p for p in params if p.kind in (p.POSITIONAL_ONLY, p.POSITIONAL_OR_KEYWORD)]
    return len(positional) >= 3 or any(p.kind == p.VAR_POSITIONAL for p in params)


class EDMDenoiser(Denoiser):
    """An EDM-style network ``net(x, sigma, class_labels) -> x0`` called unchanged.

    ``class_labels`` is passed (positionally, as EDM's ``EDMPrecond``) when it is not None or when the
    network takes a third argument; networks ``net(x, sigma)`` work too. ``cond`` goes through as keywords.
    """

    def __init__(self, net, name: str | None = None):
        super().__init__(name)
        if isinstance(net, Denoiser):
            raise TypeError("net is already a Denoiser; use it directly (or as_denoiser)")
        if not callable(net):
            raise TypeError(f"net must be an nn.Module or a callable, got {type(net).__name__}")
        if isinstance(net, nn.Module):
            self.net = net
        else:
            self._fn = net
        self._takes_labels = _accepts_third_argument(net.forward if isinstance(net, nn.Module) else net)

    @property
    def network(self):
        return self.net if "net" in self._modules else self._fn

    def null_labels(self, batch: int, device=None) -> torch.Tensor:
        """All-zero one-hot labels: what EDM's label dropout feeds the network for a dropped label.

        A network that says it was trained without label dropout (``label_dropout == 0``) has never seen them,
        so it has no unconditional model to guide with: that is a ValueError.
        """
        classes = self.num_classes
        if not classes:
            raise ValueError(self._no_guidance())
        for module in _modules_of(self.network):
            dropout = getattr(module, "label_dropout", None)
            if isinstance(dropout, numbers.Real) and not isinstance(dropout, bool) and dropout == 0:
                raise ValueError(f"{self.label()} was trained without label dropout (label_dropout=0): its "
                                 "all-zero label is no unconditional model, so classifier-free guidance is "
                                 "impossible with it")
        return torch.zeros(batch, classes, device=device)

    def forward(self, x: torch.Tensor, sigma, class_labels=None, **cond) -> torch.Tensor:
        net = self.network
        if class_labels is not None or self._takes_labels:
            out = net(x, sigma, class_labels, **cond)
        else:
            out = net(x, sigma, **cond)
        return check_output(self.label(), out, x)


def as_denoiser(obj, name: str | None = None, **kw) -> Denoiser:
    """``obj`` if it is already a Denoiser; a diffusers model wrapped in ``DiffusersDenoiser`` (``schedule=`` and
    ``prediction=`` required in ``kw``); anything else callable wrapped in ``EDMDenoiser``."""
    if isinstance(obj, Denoiser):
        if kw:
            raise TypeError(f"{type(obj).__name__} is already a Denoiser; unexpected options {sorted(kw)}")
        if name is not None and obj.name is None:
            obj.name = name
        return obj
    if is_diffusers_model(obj):
        missing = [k for k in ("schedule", "prediction") if k not in kw]
        if missing:
            raise ValueError(f"{type(obj).__name__} is a diffusers model: pass {' and '.join(missing)} "
                             "(or wrap it yourself with DiffusersDenoiser / FlowDenoiser)")
        return DiffusersDenoiser(obj, name=name, **kw)
    if kw:
        raise TypeError(f"unexpected options {sorted(kw)} for an EDM-style network")
    if not callable(obj):
        raise TypeError(f"cannot make a denoiser from {type(obj).__name__}: not callable")
    return EDMDenoiser(obj, name=name)


def load_entry_point(spec: str, *args, name: str | None = None, **kwargs) -> Denoiser:
    """Import ``"package.module:function"`` (the attribute may be dotted), call it with ``args``/``kwargs``
    and return its network as a Denoiser (``as_denoiser``)."""
    if not isinstance(spec, str):
        raise TypeError(f"entry point must be a string 'module:function', got {type(spec).__name__}")
    try:
        target = import_entry_point(spec)
    except ImportError as exc:
        raise ImportError(f"entry point {spec!r}: cannot import module ({exc})") from exc
    except AttributeError as exc:
        raise ValueError(f"entry point {spec!r}: {exc}") from None
    if not callable(target):
        raise TypeError(f"entry point {spec!r} is a {type(target).__name__}, not callable")
    net = target(*args, **kwargs)
    if net is None:
        raise ValueError(f"entry point {spec!r} returned None, expected a network")
    return as_denoiser(net, name=name)



# the adapters and helpers that moved to their own modules still import from here (the flat ``sidfast.denoisers``)
__all__ = ["Denoiser", "EDMDenoiser", "DiffusersDenoiser", "FlowDenoiser", "MissingSchedulerConfig", "FLOW_MODELS",
           "pack_latents", "unpack_latents", "latent_image_ids",
           "as_denoiser", "load_entry_point", "check_output", "sigma_per_sample", "infer_image_shape",
           "infer_num_classes", "format_labels", "draw_labels"]
