"""Loads the compiled extension ``sidfast._C`` and refuses a missing or stale build, loudly."""
from __future__ import annotations

from pathlib import Path

import torch

from sidfast._buildinfo import source_hash

REBUILD = "rebuild it with `pip install --no-build-isolation -e .` from the sidfast checkout"


def _load():
    try:
        from sidfast import _C  # here so that a missing build raises the rebuild message (and _load re-checks)
    except ImportError as exc:
        raise ImportError(f"sidfast's native extension sidfast._C is missing or cannot be loaded ({exc}); {REBUILD}") from exc
    built_for = _C.torch_version()
    if built_for.split("+")[0] != torch.__version__.split("+")[0]:
        raise ImportError(f"sidfast._C was built against torch {built_for} but torch {torch.__version__} is "
                          f"running; {REBUILD}")
    csrc = Path(__file__).resolve().parent.parent / "csrc"
    if csrc.is_dir():  # an editable install: the sources beside the package must be what was compiled
        current = source_hash(csrc)
        if current != _C.source_hash():
            raise ImportError(f"sidfast._C is stale: built from sources {_C.source_hash()} but csrc/ is now "
                              f"{current}; {REBUILD}")
    return _C


C = _load()
WITH_CUDA: bool = bool(C.with_cuda)
