"""The feature detector of FID, KID and precision/recall: NVIDIA's port of the TF-Inception network of
2015-12-05 (pool3, 2048 features), loaded from a local file as the published SiD / EDM evaluation loads it.

A detector is called as ``net(images, return_features=True)`` on uint8 RGB images (N, 3, H, W) in [0, 255]
of any resolution (it resizes inside) and returns float32 features (N, D). Two files hold that network:

- ``inception-2015-12-05.pkl``: a Python pickle, what EDM's ``fid.py`` and SiD's training loop load with
  ``pickle.load``. Unpickling runs code from the file, so sidfast unpickles only a file the user named
  (``--inception PATH``) or one in its own cache folder. A pickle that reconstructs its objects through
  NVIDIA's ``torch_utils.persistence`` (a class's source stored beside its state) loads with NVIDIA's
  ``torch_utils`` when it is importable, else with the small stand-in below.
- ``inception-2015-12-05.pt``: the same network as a TorchScript archive (``torch.jit.load``), what SiD's
  metric scripts and StyleGAN2-ADA load.

sidfast never downloads: a missing file is a ``DetectorError`` that says where to put it and where NVIDIA
publishes it. docs/evaluate.md has the choice of this detector over other FID packages.
"""
from __future__ import annotations

import contextlib
import importlib.util
import os
import pickle
import sys
import types
import uuid
import zipfile
from pathlib import Path

import torch

FILE_NAMES = ("inception-2015-12-05.pkl", "inception-2015-12-05.pt")
PKL_URL = ("https://api.ngc.nvidia.com/v2/models/nvidia/research/stylegan3/versions/1/files/metrics/"
           "inception-2015-12-05.pkl")
PT_URL = "https://nvlabs-fi-cdn.nvidia.com/stylegan2-ada-pytorch/pretrained/metrics/inception-2015-12-05.pt"
OPTION = "--inception"


class DetectorError(ValueError):
    """A detector file that is missing or is not a detector; the message names ``--inception``."""


def cache_dir() -> Path:
    """sidfast's own cache folder: ``$SIDFAST_CACHE``, else ``~/.cache/sidfast``."""
    return Path(os.environ.get("SIDFAST_CACHE") or Path.home() / ".cache" / "sidfast").expanduser()


def find_detector(path=None, option: str = OPTION) -> Path:
    """The detector file: ``path`` (``--inception``) when given, else the first of ``FILE_NAMES`` in
    ``cache_dir()``. Raises ``DetectorError`` saying where to put the file when there is none; ``option``: how
    its messages name the option that gives the file."""
    if path is not None:
        path = Path(path).expanduser()
        if not path.is_file():
            raise DetectorError(f"{option} {str(path)!r} does not exist (or is not a file)")
        return path
    folder = cache_dir()
    for name in FILE_NAMES:
        if (folder / name).is_file():
            return folder / name
    raise DetectorError(
        f"no Inception weights: download NVIDIA's {FILE_NAMES[0]} ({PKL_URL}) or {FILE_NAMES[1]} ({PT_URL}) "
        f"into {folder} (or $SIDFAST_CACHE), or give the file with {option} PATH; sidfast never downloads")


# ---- reading the file ----

def _is_torchscript(path: Path) -> bool:
    """A zip archive with TorchScript code in it (``torch.jit.save``), not a ``torch.save`` checkpoint."""
    if not zipfile.is_zipfile(path):
        return False
    with zipfile.ZipFile(path) as zf:
        return any(name.split("/", 1)[-1].startswith(("code/", "constants.pkl")) for name in zf.namelist())


def _importable(name: str) -> bool:
    try:
        return importlib.util.find_spec(name) is not None
    except (ImportError, ValueError):
        return False


class _EasyDict(dict):
    """A dict with attribute access: what NVIDIA's ``dnnlib.EasyDict`` is to the code a pickle stores."""

    def __getattr__(self, name):
        try:
            return self[name]
        except KeyError:
            raise AttributeError(name) from None

    def __setattr__(self, name, value):
        self[name] = value

    def __delattr__(self, name):
        del self[name]


def _stand_in_modules() -> dict:
    """Modules named as NVIDIA's ``dnnlib`` and ``torch_utils.persistence``, with what a persistent pickle's
    stored source uses of them while it is reconstructed: ``EasyDict`` and the class decorator (which only
    marks classes for pickling, so here it returns the class)."""
    dnnlib = types.ModuleType("dnnlib")
    dnnlib.EasyDict = _EasyDict
    persistence = types.ModuleType("torch_utils.persistence")
    persistence.persistent_class = lambda cls: cls
    persistence.is_persistent = lambda obj: False
    persistence.import_hook = lambda hook: hook
    package = types.ModuleType("torch_utils")
    package.__path__ = []
    package.persistence = persistence
    return {"dnnlib": dnnlib, "torch_utils": package, "torch_utils.persistence": persistence}


@contextlib.contextmanager
def _nvidia_modules():
    """The stand-in modules in ``sys.modules`` for the time of a load, each only where the real one is not
    importable; taken out again afterwards."""
    added = {name: module for name, module in _stand_in_modules().items()
             if name not in sys.modules and not _importable(name.split(".")[0])}
    sys.modules.update(added)
    try:
        yield
    finally:
        for name in added:
            sys.modules.pop(name, None)


def _reconstruct_persistent_obj(meta):
    """What NVIDIA's ``torch_utils.persistence._reconstruct_persistent_obj`` does: run the class's stored module
    source in a fresh module, make an instance without calling ``__init__``, and give it the stored state."""
    if not isinstance(meta, dict) or meta.get("type") != "class" or "module_src" not in meta:
        raise pickle.UnpicklingError("a torch_utils.persistence object of an unknown layout")
    name = "_sidfast_detector_" + uuid.uuid4().hex
    module = types.ModuleType(name)
    sys.modules[name] = module  # as the original registers it: code that looks itself up by module finds it
    with _nvidia_modules():
        exec(compile(meta["module_src"], f"<{meta.get('class_name', 'detector')} source>", "exec"),
             module.__dict__)
    cls = module.__dict__[meta["class_name"]]
    obj = cls.__new__(cls)
    state = meta.get("state") or {}
    setstate = getattr(obj, "__setstate__", None)
    if callable(setstate):
        setstate(state)
    else:
        obj.__dict__.update(state)
    return obj


class _Unpickler(pickle.Unpickler):
    """``pickle.Unpickler`` that reconstructs NVIDIA's persistent objects without NVIDIA's ``torch_utils``
    when that package is not importable (with it, the pickle is read exactly as ``pickle.load`` reads it)."""

    def find_class(self, module, name):
        if (module, name) == ("torch_utils.persistence", "_reconstruct_persistent_obj") and \
                not _importable("torch_utils"):
            return _reconstruct_persistent_obj
        return super().find_class(module, name)


def _first_line(exc: Exception) -> str:
    """An exception as one line (TorchScript's messages run over several, with the code they point at)."""
    lines = [line.strip() for line in str(exc).splitlines() if line.strip()]
    return f"{type(exc).__name__}: {lines[0] if lines else ''}"


def _read(path: Path, option: str = OPTION):
    where = f"{option} {str(path)!r}"
    try:
        if _is_torchscript(path):
            return torch.jit.load(str(path), map_location="cpu")
        if zipfile.is_zipfile(path):  # a torch.save archive: unpickling code, as the user asked by naming it
            return torch.load(path, map_location="cpu", weights_only=False)
        with open(path, "rb") as f:
            return _Unpickler(f).load()
    except ModuleNotFoundError as exc:
        raise DetectorError(
            f"{where} needs the Python module {exc.name!r} to load (NVIDIA's pickles refer to their own code): put "
            f"the repository that has it (NVlabs/edm or the SiD repository) on PYTHONPATH, or use the TorchScript "
            f"file {FILE_NAMES[1]} ({PT_URL})") from None
    except Exception as exc:  # pickle, zip and TorchScript readers raise many types
        raise DetectorError(f"{where} cannot be read as a pickle or TorchScript file: {_first_line(exc)}") from None


# ---- images in, features out ----

def to_uint8(images: torch.Tensor) -> torch.Tensor:
    """Images as the detector takes them: uint8 (N, 3, H, W) in [0, 255].

    uint8 images pass as they are; float images in [-1, 1] are converted as EDM's ``generate.py`` and SiD's
    ``generate_onestep.py`` save them: ``(x * 127.5 + 128).clip(0, 255).to(uint8)`` in float64. One grey channel
    is repeated to three, as EDM's ``fid.py`` does."""
    if not isinstance(images, torch.Tensor) or images.dim() != 4:
        raise ValueError(f"images must be a tensor (N, C, H, W), got "
                         f"{tuple(images.shape) if isinstance(images, torch.Tensor) else type(images).__name__}")
    if images.shape[1] not in (1, 3):
        raise ValueError(f"images must have 1 or 3 channels (grey or RGB) for the Inception detector, got shape "
                         f"{tuple(images.shape)}")
    if images.dtype != torch.uint8:
        if not images.is_floating_point():
            raise ValueError(f"images must be uint8 in [0, 255] or float in [-1, 1], got {images.dtype}")
        images = (images.to(torch.float64) * 127.5 + 128).clip(0, 255).to(torch.uint8)
    return images.repeat(1, 3, 1, 1) if images.shape[1] == 1 else images


class Detector:
    """A loaded detector: ``detector(images) -> float32 (N, D)`` on ``device``, for uint8 images in [0, 255] or
    float images in [-1, 1] (``to_uint8``). ``feature_dim``: D; ``path``: the file it came from."""

    def __init__(self, net, path: Path | None = None, device="cpu", option: str = OPTION):
        self.net = net
        self.path = path
        self.option = option
        self.device = torch.device(device)
        if isinstance(net, torch.nn.Module):
            net.eval().to(self.device)  # features are computed under inference_mode: no gradients
        probe = torch.zeros(1, 3, 32, 32, dtype=torch.uint8)
        try:  # one small image: a file holding another kind of network fails here, in words
            self.feature_dim = int(self._features(probe).shape[1])
        except (TypeError, RuntimeError) as exc:
            raise DetectorError(f"{self._where} is not a detector called as net(uint8 images, "
                                f"return_features=True), as NVIDIA's Inception is: {_first_line(exc)}") from None

    @property
    def _where(self) -> str:
        return f"{self.option} {str(self.path)!r}" if self.path is not None else "the detector"

    @torch.inference_mode()
    def _features(self, images: torch.Tensor) -> torch.Tensor:
        out = self.net(images.to(self.device), return_features=True)
        where = self._where
        if not isinstance(out, torch.Tensor) or out.dim() != 2 or out.shape[0] != images.shape[0]:
            got = tuple(out.shape) if isinstance(out, torch.Tensor) else type(out).__name__
            raise DetectorError(f"{where} returned {got} for {images.shape[0]} images; a detector returns "
                                f"features (N, D)")
        return out.float()

    def __call__(self, images: torch.Tensor) -> torch.Tensor:
        return self._features(to_uint8(images))


def load_detector(path=None, device="cpu", option: str = OPTION) -> Detector:
    """The detector of ``path`` (``--inception``), or of sidfast's cache folder when None (``find_detector``),
    on ``device``. Raises ``DetectorError`` naming ``option`` (``--inception``; the training loop's
    ``option eval_inception``)."""
    path = find_detector(path, option)
    net = _read(path, option)
    if not callable(net):
        raise DetectorError(f"{option} {str(path)!r} holds a {type(net).__name__}, not a network")
    return Detector(net, path, device, option)


__all__ = ["Detector", "DetectorError", "load_detector", "find_detector", "cache_dir", "to_uint8", "FILE_NAMES",
           "PKL_URL", "PT_URL"]
