"""Build fingerprint shared by setup.py and the import-time staleness check (stdlib only)."""
from __future__ import annotations

import hashlib
from pathlib import Path

SOURCE_SUFFIXES = (".cpp", ".cu", ".cuh", ".h")


def source_files(csrc: Path) -> list[Path]:
    return sorted(p for p in Path(csrc).rglob("*") if p.suffix in SOURCE_SUFFIXES and p.is_file())


def source_hash(csrc: Path) -> str:
    """sha256 over the relative paths and bytes of every C++/CUDA source under ``csrc``."""
    h = hashlib.sha256()
    for p in source_files(csrc):
        h.update(p.relative_to(csrc).as_posix().encode())
        h.update(b"\0")
        h.update(p.read_bytes())
    return h.hexdigest()[:16]
