"""Checkpoint files: atomic writes, validated reads, and the two formats sidfast writes.

- ``atomic_save(obj, path)``: ``torch.save`` to a temporary file in the same directory, ``fsync``, keep the
  previous file as ``<name>.prev<suffix>`` (hard link), ``os.replace`` onto ``path``, ``fsync`` the directory.
  A crash or a full disk at any point leaves either the old or the new file, never a torn one.
- ``load_checkpoint(path, kind)``: ``torch.load(weights_only=True)`` (no code runs from a foreign pickle),
  then checks the format marker; a missing, unreadable, corrupt or foreign file raises ``CheckpointError``
  (a ValueError) that says what was found and where the previous good checkpoint is.
- Network checkpoints (``kind="network"``, e.g. a teacher trained by ``sidfast train-teacher``):
  ``{"format": "sidfast.network", "version": 1, "builder": "module:function", "config": {...},
  "state_dict": {...}, "meta": {...}}``; ``load_network`` rebuilds the module as ``builder(config)``.
- Distillation checkpoints (``kind="distill"``) are written by ``sidfast.train``; see ``train.py``.
"""
from __future__ import annotations

import importlib
import os
import tempfile
from pathlib import Path

import torch

FORMATS = {"network": "sidfast.network", "distill": "sidfast.distill"}
VERSION = 1


class CheckpointError(ValueError):
    """A checkpoint that cannot be used: missing, unreadable, corrupt, or not the expected kind."""


def previous_path(path) -> Path:
    """Where ``atomic_save`` keeps the file it replaced: ``run/checkpoint.pt`` -> ``run/checkpoint.prev.pt``."""
    path = Path(path)
    return path.with_name(f"{path.stem}.prev{path.suffix}")


def _fsync_dir(directory: Path) -> None:
    try:
        fd = os.open(directory, os.O_RDONLY)
    except OSError:  # platforms without directory fds
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def atomic_save(obj, path, keep_previous: bool = True) -> Path:
    """``torch.save(obj)`` to ``path`` atomically (temp file in the same dir, fsync, rename, fsync dir).

    With ``keep_previous`` the file being replaced stays available as ``previous_path(path)``.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as f:
            torch.save(obj, f)
            f.flush()
            os.fsync(f.fileno())
        if keep_previous and path.exists():
            prev = previous_path(path)
            link_tmp = prev.with_name(f".{prev.name}.{os.getpid()}.tmp")
            try:
                if link_tmp.exists():
                    link_tmp.unlink()
                os.link(path, link_tmp)  # the old file stays reachable while path is replaced
                os.replace(link_tmp, prev)
            except OSError:
                if link_tmp.exists():
                    link_tmp.unlink()
        os.replace(tmp, path)
        _fsync_dir(path.parent)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise
    return path


def _hint(path: Path) -> str:
    prev = previous_path(path)
    return f"; the previous checkpoint is kept at {str(prev)!r}" if prev.is_file() else ""


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
    if not path.is_file():
        raise CheckpointError(f"checkpoint {str(path)!r} is not a file")
    if not os.access(path, os.R_OK):
        raise CheckpointError(f"checkpoint {str(path)!r} is not readable (permissions)")
    try:
        data = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # torch raises RuntimeError, UnpicklingError, EOFError, ... for bad files
        reason = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise CheckpointError(f"checkpoint {str(path)!r} is corrupt or not a sidfast checkpoint "
                              f"({type(exc).__name__}: {reason[:200]}){_hint(path)}") from None
    found = data.get("format") if isinstance(data, dict) else None
    wanted = [FORMATS[k] for k in kinds]
    if found not in wanted:
        what = f"format {found!r}" if found else f"a {type(data).__name__} without a sidfast format marker"
        raise CheckpointError(f"checkpoint {str(path)!r} is {what}, expected a {' or '.join(map(repr, wanted))} "
                              f"checkpoint{_hint(path)}")
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


__all__ = ["CheckpointError", "atomic_save", "load_checkpoint", "previous_path", "save_network", "load_network",
           "build_network", "import_entry_point", "kind_of", "FORMATS", "VERSION"]


# ---- teachers and generators from what the user has (``sidfast distill --teacher``, ``sidfast sample``) ----

def _check_readable(path: Path, what: str) -> None:
    if not path.exists():
        raise CheckpointError(f"{what} {str(path)!r} does not exist")
    if not os.access(path, os.R_OK) or (path.is_dir() and not os.access(path, os.X_OK)):
        raise CheckpointError(f"{what} {str(path)!r} is not readable (check its permissions)")


def _load_diffusers_teacher(path: Path, source: str):
    from . import denoisers

    try:
        import diffusers  # noqa: F401
    except ImportError:
        raise CheckpointError(f"--teacher {source!r} is a directory, read as a diffusers model, but "
                              "diffusers is not installed: pip install 'sidfast[diffusers]'") from None
    try:
        return denoisers.DiffusersDenoiser.from_pretrained(path, name="teacher")
    except denoisers.MissingSchedulerConfig as exc:
        looked_for = ", ".join(map(repr, exc.looked_for))
        raise CheckpointError(f"--teacher {source!r}: no scheduler config to read the schedule and "
                              f"prediction type from (looked for {looked_for}); save the scheduler the model "
                              f"was trained with into it: scheduler.save_pretrained({source!r})") from None
    except (FileNotFoundError, ValueError, OSError) as exc:
        raise CheckpointError(f"--teacher {source!r}: {exc}") from None


def load_teacher(source: str):
    """(denoiser, architecture or None) for ``--teacher``: network checkpoint, diffusers dir, module:function.

    The architecture (``{"builder", "config"}``) is known for network checkpoints only. Errors are
    ``CheckpointError`` naming ``--teacher``.
    """
    from . import denoisers

    if not isinstance(source, str) or not source:
        raise CheckpointError("--teacher is required: a sidfast checkpoint, a diffusers directory or "
                              "module:function")
    path = Path(source).expanduser()
    if not path.exists() and ":" in source:  # module:function (import_entry_point says what is wrong with it)
        try:
            return denoisers.load_entry_point(source, name="teacher"), None
        except (ImportError, ValueError, TypeError) as exc:
            raise CheckpointError(f"--teacher {source!r}: {exc}") from None
    _check_readable(path, "--teacher")
    if path.is_dir():
        return _load_diffusers_teacher(path, source), None
    data = load_checkpoint(path, "network")
    return build_network(data, path).eval(), {"builder": data["builder"], "config": data["config"]}


def _generator_network(data: dict, path, teacher: str | None):
    """The untrained generator network: its recorded architecture, else a fresh copy of its teacher."""
    arch = data.get("architecture")
    if arch:
        if teacher is not None:
            raise CheckpointError(f"checkpoint {str(path)!r} records its generator's architecture; it needs "
                                  "no --teacher")
        try:
            return import_entry_point(arch["builder"])(arch["config"])
        except Exception as exc:
            raise CheckpointError(f"checkpoint {str(path)!r}: cannot rebuild the generator with "
                                  f"{arch.get('builder')!r} ({type(exc).__name__}: {exc})") from None
    stored = data.get("teacher")
    if teacher is None and not stored:
        raise CheckpointError(f"checkpoint {str(path)!r} does not say how to rebuild its generator (it was "
                              "written by distill() without architecture= or config.teacher); give its "
                              "teacher: sidfast sample --teacher PATH")
    if teacher is None and not Path(stored).expanduser().exists() and ":" not in stored:
        raise CheckpointError(f"checkpoint {str(path)!r} rebuilds its generator from its teacher {stored!r}, "
                              "which does not exist here (a relative path is read from the current "
                              "directory); give the teacher's location: sidfast sample --teacher PATH")
    return load_teacher(teacher or stored)[0]


def build_generator(data: dict, path, teacher: str | None = None) -> torch.nn.Module:
    """The EMA generator (a Denoiser in eval mode) of a distillation checkpoint read by ``load_checkpoint``.

    teacher: where the teacher is now, for checkpoints that rebuild the generator from their teacher (those
    without a recorded architecture) when the teacher they name has moved.
    """
    from . import denoisers

    net = denoisers.as_denoiser(_generator_network(data, path, teacher), name="generator")
    try:
        net.load_state_dict(data["generator_ema"])
    except RuntimeError as exc:
        raise CheckpointError(f"checkpoint {str(path)!r}: generator weights do not fit the rebuilt network: "
                              f"{str(exc)[:300]}") from None
    return net.eval().requires_grad_(False)
