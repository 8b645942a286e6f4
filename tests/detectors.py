"""The stand-in detector (tests/tiny_inception.py) saved in the two forms NVIDIA publishes its Inception in: a
TorchScript archive (``inception-2015-12-05.pt``) and a Python pickle whose object is rebuilt by NVIDIA's
``torch_utils.persistence`` from the class's stored module source and state (``inception-2015-12-05.pkl``,
what EDM's ``fid.py`` unpickles)."""
import contextlib
import inspect
import pickle
import sys
import types

import torch

import tiny_inception


def save_torchscript(path, dim=tiny_inception.DIM, seed=0):
    torch.jit.save(torch.jit.script(tiny_inception.TinyInception(dim, seed)), str(path))
    return path


@contextlib.contextmanager
def _nvidia_persistence():
    """A ``torch_utils.persistence`` in sys.modules while a pickle is written: pickle looks the reconstruct
    function up by module and name, as NVIDIA's pickles name it."""
    persistence = types.ModuleType("torch_utils.persistence")

    def _reconstruct_persistent_obj(meta):  # only its name is written; sidfast supplies its own on load
        raise AssertionError("never called while writing")

    _reconstruct_persistent_obj.__module__ = "torch_utils.persistence"
    _reconstruct_persistent_obj.__qualname__ = "_reconstruct_persistent_obj"
    persistence._reconstruct_persistent_obj = _reconstruct_persistent_obj
    package = types.ModuleType("torch_utils")
    package.persistence = persistence
    saved = {name: sys.modules.get(name) for name in ("torch_utils", "torch_utils.persistence")}
    sys.modules.update({"torch_utils": package, "torch_utils.persistence": persistence})
    try:
        yield persistence
    finally:
        for name, module in saved.items():
            if module is None:
                sys.modules.pop(name, None)
            else:
                sys.modules[name] = module


class _Persistent:
    def __init__(self, reconstruct, meta):
        self.reconstruct, self.meta = reconstruct, meta

    def __reduce__(self):
        return self.reconstruct, (self.meta,)


def save_nvidia_pickle(path, dim=tiny_inception.DIM, seed=0, module_src=None):
    """The stand-in as NVIDIA's persistent pickle: ``_reconstruct_persistent_obj(meta)`` with the module's source,
    the class name and the instance's ``__dict__`` (``module_src`` replaces the source, e.g. to import a module
    that does not exist)."""
    net = tiny_inception.TinyInception(dim, seed)
    meta = {"type": "class", "version": 6, "module_src": module_src or inspect.getsource(tiny_inception),
            "class_name": "TinyInception", "state": dict(net.__dict__)}
    with _nvidia_persistence() as persistence, open(path, "wb") as f:
        pickle.dump(_Persistent(persistence._reconstruct_persistent_obj, meta), f)
    return path
