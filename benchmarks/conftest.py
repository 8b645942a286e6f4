"""Benchmark suite setup: ``pytest benchmarks/ --benchmark-only`` (pytest-benchmark).

On a CUDA machine: Triton ops against the eager PyTorch reference and torch.compile of it at the
sizes below (CIFAR-10 to latent-diffusion images); on CPU: the native ops against the eager reference at small sizes (the Triton
interpreter is not a benchmark, so TRITON_INTERPRET is refused here). Files are ``bench_*.py``.
"""
import os
import sys
from pathlib import Path

import pytest

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))                       # telemetry.py
sys.path.insert(0, str(HERE.parent / "tests"))      # baselines shared with the tests (published.py)

if os.environ.get("TRITON_INTERPRET", "0") not in ("0", ""):
    raise pytest.UsageError("benchmarks time compiled kernels: unset TRITON_INTERPRET")

import torch  # noqa: E402

GPU = torch.cuda.is_available()
DEVICE = torch.device("cuda" if GPU else "cpu")
# (batch, *shape) and dtype: 32x32 and 64x64 pixels, 64x64 and 128x128 latents; CPU: small sizes only
GPU_CASES = [((64, 3, 32, 32), torch.float32), ((64, 3, 64, 64), torch.float32), ((16, 4, 64, 64), torch.bfloat16),
             ((512, 3, 64, 64), torch.float32), ((256, 4, 128, 128), torch.bfloat16)]
CPU_CASES = [((8, 3, 32, 32), torch.float32), ((16, 3, 64, 64), torch.float32)]
CASES = GPU_CASES if GPU else CPU_CASES


def case_id(case) -> str:
    shape, dtype = case
    return "x".join(map(str, shape)) + "-" + str(dtype).replace("torch.", "")


# bench_*.py files are collected through ``python_files`` in pyproject.toml.
