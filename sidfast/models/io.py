"""Checkpoint files: validated reads and network checkpoints.

A bad file raises ``CheckpointError`` saying what it is and what to do. Format: docs/teachers.md,
"Checkpoint files".
"""
from __future__ import annotations

import importlib
import os
import pickle
import zipfile
from pathlib import Path

import torch

from sidfast.utils.files import atomic_save, previous_path

FORMATS = {"network": "sidfast.network", "distill": "sidfast.distill"}
VERSION = 1


class CheckpointError(ValueError):
    """A checkpoint that cannot be used: missing, unreadable, corrupt, or not the expected kind."""


def _what_to_do(path: Path, kinds: tuple) -> str:
    prev = previous_path(path)
    if "distill" not in kinds:
        return f"; the previous version is kept at {str(prev)!r}" if prev.is_file() else ""
    fresh = "start the run again with --overwrite"
    if prev.exists():
        return f"; resume from the previous checkpoint with --resume {prev}, or {fresh}"
    return f"; {fresh}"


def _what_is_wrong(path: Path, exc: Exception) -> str:
    """Why ``torch.load`` failed on ``path``, in words: empty, not a torch file, truncated, corrupt,
    foreign."""
    size = path.stat().st_size
    if size == 0:
        return "is empty (0 bytes): the write that made it did not finish"
    with open(path, "rb") as f:
        head = f.read(4)
    if not zipfile.is_zipfile(path):
        if head == b"PK\x03\x04":
            return (f"is truncated: a torch checkpoint (zip archive) of {size:,} bytes whose end is missing, "
                    "from an interrupted write or copy")
        return f"is not a torch checkpoint (torch.save writes a zip archive; this file starts with {head!r})"
    try:
        with zipfile.ZipFile(path) as archive:
            bad = archive.testzip()
            names = archive.namelist()
    except (OSError, zipfile.BadZipFile, EOFError, RuntimeError) as err:
        return f"is a damaged zip archive ({type(err).__name__}), not a readable torch checkpoint"
    if bad is not None:
        return f"is corrupt: its entry {bad!r} fails the zip CRC check"
    if not any(name.endswith("data.pkl") for name in names):
        return "is a zip archive but not a torch checkpoint (no data.pkl inside)"
    if isinstance(exc, pickle.UnpicklingError):
        return ("holds Python objects other than tensors and plain containers; sidfast reads checkpoints "
                "with torch.load(weights_only=True) and runs no code from a file (not a sidfast checkpoint)")
    return f"cannot be read by this torch {torch.__version__} ({type(exc).__name__})"


def load_checkpoint(path, kind) -> dict:
    """Read a sidfast checkpoint of ``kind`` ("network", "distill", or a tuple of them) to CPU.

    Raises ``CheckpointError`` for a missing, unreadable, corrupt or foreign file. ``data["format"]`` says which.
    """
    kinds = (kind,) if isinstance(kind, str) else tuple(kind)
    if not kinds or any(k not in FORMATS for k in kinds):
        raise ValueError(f"kind must be one of {sorted(FORMATS)} or a tuple of them, got {kind!r}")
    path = Path(path)
    if not path.exists():
        raise CheckpointError(f"checkpoint {str(path)!r} does not exist")
    if path.is_dir():
        held = [name for name in ("checkpoint.pt", "checkpoint.dcp") if (path / name).exists()]
        if not held:
            raise CheckpointError(f"no checkpoint.pt or checkpoint.dcp in {str(path)!r} (a directory, not a "
                                  "file; a run folder holds one once its run saved)")
        raise CheckpointError(f"checkpoint {str(path)!r} is a directory; its checkpoint is "
                              f"{str(path / held[0])!r}")
    if not path.is_file():
        raise CheckpointError(f"checkpoint {str(path)!r} is not a file")
    if not os.access(path, os.R_OK):
        raise CheckpointError(f"checkpoint {str(path)!r} is not readable (permissions)")
    try:
        data = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # torch raises RuntimeError, UnpicklingError, EOFError, ... for bad files
        raise CheckpointError(f"checkpoint {str(path)!r} {_what_is_wrong(path, exc)}"
                              f"{_what_to_do(path, kinds)}") from None
    found = data.get("format") if isinstance(data, dict) else None
    wanted = [FORMATS[k] for k in kinds]
    if found not in wanted:
        what = f"format {found!r}" if found else f"a {type(data).__name__} without a sidfast format marker"
        raise CheckpointError(f"checkpoint {str(path)!r} is {what}, expected a {' or '.join(map(repr, wanted))} "
                              f"checkpoint{_what_to_do(path, kinds)}")
    if data.get("version") != VERSION:
        raise CheckpointError(f"checkpoint {str(path)!r} has version {data.get('version')!r}; this sidfast "
                              f"reads version {VERSION}")
    return data


def kind_of(data: dict) -> str:
    """"network" or "distill" for a checkpoint read by ``load_checkpoint``."""
    return {v: k for k, v in FORMATS.items()}[data["format"]]


def import_entry_point(spec: str):
    """The object named by ``"package.module:attr"`` (attr may be dotted)."""
    module_name, sep, attr = str(spec).partition(":")
    if not sep or not module_name or not attr:
        raise ValueError(f"entry point must look like 'package.module:function', got {spec!r}")
    target = importlib.import_module(module_name)
    for part in attr.split("."):
        target = getattr(target, part)
    return target


def save_network(path, net: torch.nn.Module, builder: str, config: dict, meta: dict | None = None) -> Path:
    """Write ``net`` as a network checkpoint that ``load_network`` rebuilds with ``builder(config)``."""
    state = {k: v.detach().cpu() for k, v in net.state_dict().items()}
    return atomic_save({"format": FORMATS["network"], "version": VERSION, "builder": builder,
                        "config": dict(config), "state_dict": state, "meta": dict(meta or {})}, path)


def build_network(data: dict, path="<checkpoint>") -> torch.nn.Module:
    """Rebuild the module described by a loaded network checkpoint (strict state-dict load)."""
    try:
        builder = import_entry_point(data["builder"])
        net = builder(data["config"])
    except Exception as exc:
        raise CheckpointError(f"checkpoint {str(path)!r}: cannot rebuild the network with builder "
                              f"{data.get('builder')!r} ({type(exc).__name__}: {exc})") from None
    try:
        net.load_state_dict(data["state_dict"])
    except RuntimeError as exc:
        raise CheckpointError(f"checkpoint {str(path)!r}: weights do not fit the network built by "
                              f"{data['builder']!r}: {str(exc)[:300]}") from None
    return net


def load_network(path) -> tuple[torch.nn.Module, dict]:
    """(network in eval mode, the checkpoint's ``meta``) from a network checkpoint."""
    data = load_checkpoint(path, "network")
    return build_network(data, path).eval(), data.get("meta", {})


__all__ = ["CheckpointError", "atomic_save", "load_checkpoint", "previous_path",
           "save_network", "load_network", "build_network", "import_entry_point", "kind_of", "FORMATS",
           "VERSION"]
