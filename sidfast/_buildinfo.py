"""Build fingerprint shared by setup.py and the import-time staleness check (stdlib only)."""
from __future__ import annotations

import hashlib
import os
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


# --- Build helpers for setup.py (stdlib only, so tests/test_build.py checks them without building) ---

# Architectures built when TORCH_CUDA_ARCH_LIST is unset and no GPU is visible (a build machine, a CI
# runner, a container built without --gpus): Ampere (sm_80), Hopper (sm_90), Blackwell (sm_100), plus
# compute_100 PTX that the driver JIT-compiles for newer GPUs. nvcc 12.8 or newer knows sm_100.
DEFAULT_CUDA_ARCH_LIST = "8.0;9.0;10.0+PTX"


def cuda_arch_list(env, visible_gpus: int) -> str | None:
    """The TORCH_CUDA_ARCH_LIST a CUDA build should use, or None to leave it to torch.

    A non-empty ``TORCH_CUDA_ARCH_LIST`` in ``env`` is honoured verbatim. Unset (or empty, which torch
    treats as unset) with ``visible_gpus`` > 0: None, so that torch's own rule applies (build for the
    visible GPUs). Unset with no GPU visible, where torch's rule has nothing to go on:
    ``DEFAULT_CUDA_ARCH_LIST``.
    """
    given = env.get("TORCH_CUDA_ARCH_LIST", "")
    if given:
        return given
    if visible_gpus > 0:
        return None
    return DEFAULT_CUDA_ARCH_LIST


def nvidia_include_dirs(site_dirs) -> list[str]:
    """The ``include`` folders of the ``nvidia`` wheel packages installed under any of ``site_dirs``.

    torch's CUDA wheels depend on NVIDIA's library wheels (nvidia-cusparse, nvidia-cublas, nvidia-cudnn-cu13,
    ...), which install headers a CUDA toolkit may lack (cusparse.h, which ATen/cuda/CUDAContextLight.h
    includes) in ``site-packages/nvidia/<name>/include`` (CUDA 12 wheels: nvidia/cusparse/include, ...;
    CUDA 13: nvidia/cu13/include for the toolkit libraries, nvidia/cudnn/include, ...). Only existing folders,
    each once, in the order of ``site_dirs`` and then by name.
    """
    found: list[str] = []
    seen: set[Path] = set()
    for site in site_dirs:
        root = Path(site) / "nvidia"
        if not root.is_dir():
            continue
        for inc in sorted(root.glob("*/include")):
            key = inc.resolve()
            if inc.is_dir() and key not in seen:
                seen.add(key)
                found.append(str(inc))
    return found


def werror_flags(env) -> dict[str, list[str]]:
    """Extra compile flags that make warnings in sidfast's sources errors, when ``SIDFAST_WERROR`` is set to
    anything but "" or "0" (CI's CUDA build sets it): ``cxx`` for g++, ``nvcc`` for nvcc and, through
    ``-Xcompiler``, the host compiler it runs. Empty lists otherwise."""
    if env.get("SIDFAST_WERROR", "0") in ("", "0"):
        return {"cxx": [], "nvcc": []}
    return {"cxx": ["-Wall", "-Wextra", "-Werror"],
            "nvcc": ["-Werror", "all-warnings", "-Xcompiler", "-Wall,-Wextra,-Werror"]}


def toolkit_from_nvcc_dryrun(text: str) -> str | None:
    """The CUDA toolkit folder that nvcc reports in ``nvcc -dryrun`` output (its ``#$ TOP=...`` line), or None.

    torch takes CUDA_HOME to be the folder above the first ``nvcc`` on PATH; for an nvcc that is a wrapper
    script elsewhere (/usr/local/bin/nvcc running /usr/local/cuda-13.0/bin/nvcc) that folder has neither the
    toolkit's headers nor libcudart, and the link fails with ``cannot find -lcudart``. nvcc itself knows.
    """
    for line in text.splitlines():
        line = line.strip()
        if line.startswith("#$ TOP="):
            top = line[len("#$ TOP="):].strip()
            return os.path.normpath(top) if top else None
    return None
