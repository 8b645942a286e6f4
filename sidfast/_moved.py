"""Where the modules of the flat layout live now: ``import sidfast.train`` keeps working.

Each old name resolves to its module in the layered packages (the same module object, not a copy), so
code and pickles written against the flat layout need no change.
"""
from __future__ import annotations

import importlib
import importlib.abc
import importlib.util
import sys

MOVED = {
    "augment": "training.augment", "checkpoint": "models.io", "conditioning": "training.conditioning",
    "config": "training.config", "data": "training.data", "denoisers": "models.denoiser",
    "discriminator": "models.discriminator", "distill_options": "training.options",
    "loading": "models.loading", "lora": "models.lora", "networks": "training.networks",
    "phases": "training.sid", "report": "training.report", "run_checkpoint": "training.state",
    "runtime": "utils.runtime", "sharding": "training.sharding", "sida": "training.sida",
    "text": "models.text", "train": "training.loop", "updates": "training.updates", "vae": "models.vae",
    "views": "models.views",
}


class _Alias(importlib.abc.MetaPathFinder, importlib.abc.Loader):
    def find_spec(self, fullname, path=None, target=None):
        if fullname.startswith("sidfast.") and fullname[len("sidfast."):] in MOVED:
            return importlib.util.spec_from_loader(fullname, self)
        return None

    def create_module(self, spec):
        return importlib.import_module("sidfast." + MOVED[spec.name[len("sidfast."):]])

    def exec_module(self, module):
        pass  # the target module is already executed


def install() -> None:
    if not any(isinstance(f, _Alias) for f in sys.meta_path):
        sys.meta_path.append(_Alias())
