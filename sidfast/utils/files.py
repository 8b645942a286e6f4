"""Files written whole or not at all.

- ``atomic_save(obj, path)``: ``torch.save`` to a temporary file in the same directory, ``fsync``, keep the
  previous file as ``<name>.prev<suffix>`` (hard link), ``os.replace`` onto ``path``, ``fsync`` the directory.
  A crash or a full disk at any point leaves either the old or the new file, never a torn one. A previous file
  that does not read back (its zip CRCs fail) is set aside as ``<name>.unreadable<suffix>`` instead, so that
  it never replaces a good ``.prev`` file.
- ``atomic_write(path, write)``: any writer (an image, a log) to a temporary name, renamed onto ``path``.
"""
from __future__ import annotations

import os
import tempfile
import zipfile
from pathlib import Path

import torch


def previous_path(path) -> Path:
    """Where ``atomic_save`` keeps the file it replaced: ``run/checkpoint.pt`` ->
    ``run/checkpoint.prev.pt``."""
    path = Path(path)
    return path.with_name(f"{path.stem}.prev{path.suffix}")


def fsync_dir(directory: Path) -> None:
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


def unreadable_path(path) -> Path:
    """Where ``atomic_save`` sets aside a file it would replace that does not read back:
    ``run/checkpoint.pt`` -> ``run/checkpoint.unreadable.pt``."""
    path = Path(path)
    return path.with_name(f"{path.stem}.unreadable{path.suffix}")


def _unused_name(path: Path) -> Path:
    """``path``, or ``path`` with a number before its suffix when that name is taken."""
    candidate, n = path, 1
    while candidate.exists():
        candidate = path.with_name(f"{path.stem}.{n}{path.suffix}")
        n += 1
    return candidate


def _reads_back(path: Path) -> bool:
    """Whether ``path`` is a whole zip archive (what ``torch.save`` writes) whose entries pass their CRCs."""
    try:
        with zipfile.ZipFile(path) as archive:
            return archive.testzip() is None
    except (OSError, zipfile.BadZipFile, EOFError, RuntimeError):
        return False


def _keep_as_previous(path: Path) -> None:
    """Hard-link ``path`` to ``previous_path(path)``: the old file stays reachable while ``path`` is
    replaced."""
    prev = previous_path(path)
    link_tmp = prev.with_name(f".{prev.name}.{os.getpid()}.tmp")
    try:
        if link_tmp.exists():
            link_tmp.unlink()
        os.link(path, link_tmp)
        os.replace(link_tmp, prev)
    except OSError:
        if link_tmp.exists():
            link_tmp.unlink()


def _umask() -> int:
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def _plain_file_mode(tmp) -> None:
    """Give a ``mkstemp`` file (0600) the mode ``open()`` would: 0666 less the umask."""
    os.chmod(tmp, 0o666 & ~_umask())


def atomic_save(obj, path, keep_previous: bool = True) -> Path:
    """``torch.save(obj)`` to ``path`` atomically (temp file in the same dir, fsync, rename, fsync dir).

    With ``keep_previous`` the file being replaced stays available as ``previous_path(path)`` when it reads
    back, and is moved to ``unreadable_path(path)`` (never deleted) when it does not.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as f:
            torch.save(obj, f)
            f.flush()
            os.fsync(f.fileno())
        _plain_file_mode(tmp)
        if keep_previous and path.exists():
            if _reads_back(path):
                _keep_as_previous(path)
            else:
                os.replace(path, _unused_name(unreadable_path(path)))
        os.replace(tmp, path)
        fsync_dir(path.parent)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise
    return path


def atomic_write(path: Path, write) -> Path:
    """Call ``write(tmp)`` with a temporary name in ``path``'s directory, then rename it onto ``path``: a reader
    sees the old file or the whole new one (no fsync: for images and logs, not checkpoints)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    os.close(fd)
    try:
        write(tmp)
        _plain_file_mode(tmp)
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise
    return path


__all__ = ["atomic_save", "atomic_write", "previous_path", "unreadable_path", "fsync_dir"]
