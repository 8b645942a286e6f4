"""Loads the compiled extension ``sidfast._C`` when an op first needs it, and refuses a missing or stale
build, loudly: ``NativeExtensionError`` (an ImportError) names the rebuild command. Importing sidfast (and
``sidfast --help``) works without the extension; ``_native.C`` and ``_native.WITH_CUDA`` load it."""
from __future__ import annotations

from pathlib import Path

import torch

from sidfast._buildinfo import source_hash

REBUILD = "rebuild it with `pip install --no-build-isolation -e .` from the sidfast checkout"


class NativeExtensionError(ImportError):
    """sidfast._C is missing, built against another torch, or stale; the message says how to rebuild it."""


def _load():
    try:
        from sidfast import _C  # here so that a missing build raises the rebuild message (and _load re-checks)
    except ImportError as exc:
        raise NativeExtensionError(f"sidfast's native extension sidfast._C is missing or cannot be loaded "
                                   f"({exc}); {REBUILD}") from exc
    built_for = _C.torch_version()
    if built_for.split("+")[0] != torch.__version__.split("+")[0]:
        raise NativeExtensionError(f"sidfast._C was built against torch {built_for} but torch "
                                   f"{torch.__version__} is running; {REBUILD}")
    csrc = Path(__file__).resolve().parents[2] / "csrc"
    if csrc.is_dir():  # an editable install: the sources beside the package must be what was compiled
        current = source_hash(csrc)
        if current != _C.source_hash():
            raise NativeExtensionError(f"sidfast._C is stale: built from sources {_C.source_hash()} but csrc/ "
                                       f"is now {current}; {REBUILD}")
    return _C


_loaded = None


def load():
    """The extension module, loaded and checked on the first call (its ops are registered from then on)."""
    global _loaded
    if _loaded is None:
        module = _load()
        from sidfast.ops.sid_loss import register  # here: sid_loss imports this module

        register("sidfast::sid_loss")  # its fake and autograd formulas
        _loaded = module
    return _loaded


def __getattr__(name):  # C and WITH_CUDA: loaded on first use
    if name == "C":
        return load()
    if name == "WITH_CUDA":
        return bool(load().with_cuda)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
