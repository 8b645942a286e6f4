"""Conditions as trees: class labels (a tensor) or keyword tensors in nested dicts (SDXL's
``added_cond_kwargs``), flattened to ``{path: tensor}`` and back, paired with their null condition, stacked,
moved, and passed to a denoiser as the trainer calls it. Guidance (``sidfast.guidance``) and the score
engine's graph arguments (``sidfast.engine``) are built on these."""
from __future__ import annotations

import torch

from sidfast._checks import check_same_kind


def flat_condition(cond: dict) -> dict:
    """Keyword conditioning as flat ``{path: value}`` entries, a path being the tuple of keys that reaches a
    value through nested keyword dicts (SDXL's ``added_cond_kwargs``): how guidance pairs each tensor with
    its null, and how the score engine passes conditioning to compiled functions and captured graphs (whose
    arguments are tensors, not dicts)."""
    flat = {}
    for key, value in cond.items():
        if isinstance(value, dict):
            flat.update({(key, *path): v for path, v in flat_condition(value).items()})
        else:
            flat[(key,)] = value
    return flat


def nested_condition(paths, values) -> dict:
    """The keyword conditioning that ``flat_condition`` flattened: ``paths`` and their ``values`` in order."""
    cond: dict = {}
    for path, value in zip(paths, values):
        inner = cond
        for key in path[:-1]:
            inner = inner.setdefault(key, {})
        inner[path[-1]] = value
    return cond


def path_name(path: tuple) -> str:
    """A flat path as users spell it in errors: ``added_cond_kwargs.time_ids``."""
    return ".".join(map(str, path))


def tensor_items(cond, what: str):
    """{key: tensor} of a condition: None stands for the third positional argument (class labels), a path of
    ``flat_condition`` for a keyword tensor (nested keyword dicts included)."""
    if isinstance(cond, torch.Tensor):
        return {None: cond}
    if isinstance(cond, dict):
        return {k: v for k, v in flat_condition(cond).items() if isinstance(v, torch.Tensor)}
    raise TypeError(f"{what} must be a tensor of class labels or a dict of keyword tensors, got "
                    f"{type(cond).__name__}")


def rows(cond) -> int:
    items = tensor_items(cond, "cond")
    if not items:
        raise ValueError("cond holds no tensor to take the batch size from")
    sizes = {t.shape[0] if t.dim() else 0 for t in items.values()}
    if len(sizes) != 1 or 0 in sizes:
        raise ValueError(f"every tensor of cond needs one row per sample, got leading sizes {sorted(sizes)}")
    return sizes.pop()


def _null_like(null, like: torch.Tensor, batch: int, key) -> torch.Tensor:
    """``null`` (1 or B rows) expanded to ``like``'s B rows, after checking it matches ``like``."""
    name = "null_cond" if key is None else f"null_cond[{path_name(key)!r}]"
    if not isinstance(null, torch.Tensor):
        raise TypeError(f"{name} must be a tensor like the condition, got {type(null).__name__}")
    if null.dim() != like.dim() or null.shape[1:] != like.shape[1:] or null.shape[0] not in (1, batch):
        raise ValueError(f"{name} must have shape (1 or {batch}, {', '.join(map(str, like.shape[1:]))}) like "
                         f"the condition, got {tuple(null.shape)}")
    check_same_kind(name, null, "the condition", like)
    return null.expand(batch, *like.shape[1:])


def null_items(cond, null_cond, batch: int) -> dict:
    """{key: null tensor with B rows} for each tensor of ``cond``."""
    items = tensor_items(cond, "cond")
    if isinstance(cond, torch.Tensor):
        return {None: _null_like(null_cond, cond, batch, None)}
    if not isinstance(null_cond, dict):
        raise TypeError(f"null_cond must be a dict like cond (keys {[path_name(k) for k in items]}), got "
                        f"{type(null_cond).__name__}")
    nulls = flat_condition(null_cond)
    missing = [path_name(k) for k in items if nulls.get(k) is None]
    if missing:
        raise ValueError(f"null_cond lacks the keys {missing} of cond")
    return {k: _null_like(nulls[k], v, batch, k) for k, v in items.items()}


def rebuild(cond, tensors: dict):
    """``cond`` with its tensors replaced by ``tensors`` (same keys; non-tensor entries kept)."""
    if isinstance(cond, torch.Tensor):
        return tensors[None]
    flat = flat_condition(cond)
    return nested_condition(flat, [tensors.get(k, v) for k, v in flat.items()])


def call(net, x, sigma, cond):
    """``net(x, sigma[, labels], **keywords)`` as the trainer calls a denoiser, for a condition in
    ``sidfast.guidance.guided``'s form (None: none)."""
    if cond is None:
        return net(x, sigma)
    if isinstance(cond, torch.Tensor):
        return net(x, sigma, cond)
    keywords = dict(cond)
    labels = keywords.pop("class_labels", None)
    return net(x, sigma, labels, **keywords) if labels is not None else net(x, sigma, **keywords)


def expand_null(cond, null_cond, batch: int):
    """``null_cond`` in ``cond``'s form with ``batch`` rows (non-tensor entries of a dict ``cond`` kept)."""
    return rebuild(cond, null_items(cond, null_cond, batch))


def stack_conditions(conds: list):
    """The conditions ``conds`` (all of one form) concatenated along the batch, for one stacked forward."""
    items = [tensor_items(c, "cond") for c in conds]
    return rebuild(conds[0], {k: torch.cat([i[k] for i in items], 0) for k in items[0]})


def to_device(cond, device):
    """A condition (a tensor, a dict of them, or another value) on ``device``."""
    if isinstance(cond, dict):
        return {k: to_device(v, device) for k, v in cond.items()}
    return cond.to(device) if isinstance(cond, torch.Tensor) else cond



def joined(labels, cond: dict):
    """The condition in ``guidance.guided``'s form from the trainer's (labels, keyword conditions) pair: the
    labels alone, or the keywords with the labels as "class_labels"."""
    if not cond:
        return labels
    out = dict(cond)
    if labels is not None:
        out["class_labels"] = labels
    return out


def split(condition) -> tuple:
    """(labels, keyword conditions) of a condition in ``guidance.guided``'s form."""
    if isinstance(condition, dict):
        cond = dict(condition)
        return cond.pop("class_labels", None), cond
    return condition, {}

__all__ = ["joined", "split", "flat_condition", "nested_condition", "path_name", "tensor_items", "rows", "null_items", "rebuild",
           "expand_null", "stack_conditions", "call", "to_device"]
