"""What a network looks like from outside: the modules it wraps, its image shape, its classes, whether it is a
diffusers model."""
from __future__ import annotations


def _modules_of(net) -> list:
    """``net`` and the modules it wraps (``network``, ``module``, ``net``, ``unet``, ``model``), outermost
    first."""
    seen, stack = [], [net]
    while stack:
        module = stack.pop(0)
        if module is None or any(module is s for s in seen):
            continue
        seen.append(module)
        for attr in ("network", "module", "net", "unet", "model"):
            try:
                inner = getattr(module, attr, None)
            except Exception:  # properties that raise
                inner = None
            if inner is not None and not isinstance(inner, (str, int, float)):
                stack.append(inner)
    return seen


def infer_image_shape(net) -> tuple | None:
    """(C, H, W) from ``image_shape``, EDM's ``img_channels``/``img_resolution`` or a diffusers config."""
    for module in _modules_of(net):
        shape = getattr(module, "image_shape", None)
        if shape is not None:
            return tuple(int(s) for s in shape)
        if hasattr(module, "img_channels") and hasattr(module, "img_resolution"):
            resolution = int(module.img_resolution)
            return (int(module.img_channels), resolution, resolution)
        config = getattr(module, "config", None)
        size = getattr(config, "sample_size", None)
        channels = getattr(config, "in_channels", None)
        if size is not None and channels is not None:
            hw = (int(size), int(size)) if isinstance(size, int) else tuple(int(s) for s in size)
            return (int(channels), *hw)
    return None


def infer_num_classes(net) -> int:
    """Classes of a conditional network (``num_classes``, EDM's ``label_dim``, diffusers'
    ``num_class_embeds``)."""
    for module in _modules_of(net):
        for attr in ("num_classes", "label_dim"):
            value = getattr(module, attr, None)
            if isinstance(value, int) and not isinstance(value, bool):
                return value
        value = getattr(getattr(module, "config", None), "num_class_embeds", None)
        if isinstance(value, int):
            return value
    return 0



def is_diffusers_model(obj) -> bool:
    return any(c.__module__.startswith("diffusers.") for c in type(obj).__mro__) and hasattr(obj, "config")



__all__ = ["infer_image_shape", "infer_num_classes", "is_diffusers_model"]
