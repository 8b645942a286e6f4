"""Files written whole or not at all.

- ``atomic_save(obj, path)``: ``torch.save`` to a temporary file in the same directory, ``fsync``, keep the
  previous file as ``<name>.prev<suffix>`` (hard link), ``os.replace`` onto ``path``, ``fsync`` the directory.
  A crash or a full disk at any point leaves either the old or the new file, never a torn one. A previous file
  that does not read back (its zip CRCs fail) is set aside as ``<name>.unreadable<suffix>`` instead, so that
  it never replaces a good ``.prev`` file.
- ``atomic_write(path, write)``: any writer (an image, a log) to a temporary name, renamed onto ``path``.
- ``atomic_directory(path, write)``: a whole directory (an exported model) written beside ``path``, its files
  synced, renamed onto ``path``.
- ``remove_stale_temporaries(directory)``: what writes killed part-way (SIGKILL, preemption) left there, by
  the names these functions and sharded checkpoints give their temporaries, and nothing else.
- ``DISK_FULL``: the errnos of a write that found no room (no space, quota, file size limit).
"""
from __future__ import annotations

import errno
import os
import re
import shutil
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


# Fault injection: None, or ``hook(stage, path, nbytes)`` called at the named stages of a save ("opened",
# "write" after each write with the bytes written so far, "written", "synced", "kept-previous", "replaced";
# sharded saves: "sharded-dir", "shards-written", "meta-written", "moved-previous", "renamed"); the tests
# and benchmarks/fault_injection.py kill or stop the process there.
FAULT_HOOK = None


def fault_point(stage: str, path, nbytes: int = 0) -> None:
    """Call ``FAULT_HOOK`` (when set) at a named stage of a save."""
    if FAULT_HOOK is not None:
        FAULT_HOOK(stage, Path(path), nbytes)


class _Writes:
    """The file ``torch.save`` writes through: keeps the ``OSError`` of a failed write (torch reports it as
    a RuntimeError of its zip writer), counts the bytes for ``FAULT_HOOK``."""

    def __init__(self, f, path: Path):
        self.f, self.path, self.nbytes, self.error = f, path, 0, None

    def write(self, data) -> int:
        try:
            n = self.f.write(data)
        except OSError as exc:
            self.error = exc
            raise
        self.nbytes += n
        fault_point("write", self.path, self.nbytes)
        return n

    def flush(self) -> None:
        self.f.flush()


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
        fault_point("opened", tmp)
        with os.fdopen(fd, "wb") as f:
            writes = _Writes(f, Path(tmp))
            try:
                torch.save(obj, writes)
            except RuntimeError:
                if writes.error is not None:  # a full disk: the OSError, not torch's zip writer's message
                    raise writes.error from None
                raise
            fault_point("written", tmp, writes.nbytes)
            f.flush()
            os.fsync(f.fileno())
        fault_point("synced", tmp, writes.nbytes)
        _plain_file_mode(tmp)
        if keep_previous and path.exists():
            if _reads_back(path):
                _keep_as_previous(path)
            else:
                os.replace(path, _unused_name(unreadable_path(path)))
            fault_point("kept-previous", path)
        os.replace(tmp, path)
        fault_point("replaced", path)
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


def _sync_tree(root: Path) -> None:
    """fsync every file and directory under ``root`` (then ``root``), so that a rename of ``root`` publishes
    data that is on disk."""
    for directory, _, files in os.walk(root, topdown=False):
        for name in files:
            fd = os.open(os.path.join(directory, name), os.O_RDONLY)
            try:
                os.fsync(fd)
            finally:
                os.close(fd)
        fsync_dir(Path(directory))


def atomic_directory(path, write, replace: bool = False) -> Path:
    """Call ``write(tmp)`` with a new empty directory beside ``path``, sync what it wrote, then rename it onto
    ``path``: a reader sees no directory (or, with ``replace``, the old one) or the whole new one, never part.

    An empty directory at ``path`` is replaced in one rename. A non-empty one only with ``replace``: it is
    renamed aside first (a hidden ``.NAME.XXXXXXXX.tmp`` sibling, which ``remove_stale_temporaries`` knows)
    and deleted once the new one is in place. Anything else at ``path`` raises ``FileExistsError``.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp"))
    old = None
    try:
        write(tmp)
        os.chmod(tmp, 0o777 & ~_umask())  # mkdtemp's 0700 -> what mkdir would have made
        _sync_tree(tmp)
        if path.is_symlink() or path.exists():
            if not path.is_dir() or path.is_symlink():
                raise FileExistsError(f"{str(path)!r} exists and is not a directory")
            if any(path.iterdir()):
                if not replace:
                    raise FileExistsError(f"{str(path)!r} exists and is not empty")
                old = Path(tempfile.mkdtemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp"))
                os.replace(path, old)  # onto the empty directory just made
        try:
            os.replace(tmp, path)
        except BaseException:
            if old is not None:
                os.replace(old, path)
                old = None
            raise
        fsync_dir(path.parent)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)
    return path


DISK_FULL = {errno.ENOSPC, errno.EFBIG, errno.EDQUOT}

# the temporaries of a write killed part-way: ``.NAME.XXXXXXXX.tmp`` (atomic_save / atomic_write: mkstemp's 8
# characters), ``.NAME.prev.SUFFIX.PID.tmp`` (the link of the kept file), ``.NAME.dcp.tmp`` (a sharded save's
# directory), ``.NAME.prev.dcp.old`` (the replaced previous sharded checkpoint)
STALE = re.compile(r"^\.(?:.+\.[A-Za-z0-9_]{8}\.tmp|.+\.prev\.[^.]+\.\d+\.tmp|.+\.dcp\.tmp|.+\.prev\.dcp\.old)$")


def _size(path: Path) -> int:
    if path.is_dir() and not path.is_symlink():
        return sum(p.stat().st_size for p in path.rglob("*") if p.is_file() and not p.is_symlink())
    return path.lstat().st_size


def remove_stale_temporaries(directory) -> tuple[list[str], int]:
    """Remove from ``directory`` (not below it) the temporary files and directories that an interrupted
    ``atomic_save``, ``atomic_write`` or sharded checkpoint save leaves (names ``STALE``; nothing else is
    touched). Returns (the names removed, the bytes freed). Call it only while no save into ``directory``
    is under way (a run's start)."""
    directory = Path(directory)
    removed, freed = [], 0
    if not directory.is_dir():
        return removed, freed
    for entry in sorted(directory.iterdir()):
        if not STALE.match(entry.name):
            continue
        try:
            size = _size(entry)
            if entry.is_dir() and not entry.is_symlink():
                shutil.rmtree(entry)
            else:
                entry.unlink()
        except OSError:
            continue
        removed.append(entry.name)
        freed += size
    return removed, freed


__all__ = ["atomic_save", "atomic_write", "atomic_directory", "previous_path", "unreadable_path", "fsync_dir",
           "remove_stale_temporaries", "DISK_FULL"]
