"""Benchmark suite setup: ``pytest benchmarks/ --benchmark-only`` (pytest-benchmark).

On a CUDA machine: Triton ops against the eager PyTorch reference and torch.compile of it at the
sizes below (CIFAR-10 to latent-diffusion images); on CPU: the native ops against the eager reference at
small sizes (the Triton interpreter is not a benchmark, so TRITON_INTERPRET is refused here). Files are
``bench_*.py``.

With ``SIDFAST_BENCH_JSONL=path`` each benchmark is appended to that file as one JSON line (the entry
``--benchmark-json`` writes at the end of the session) as soon as it is measured, so that a run cut off
by a time limit keeps what it measured; benchmarks/report.py reads either file.
"""
import json
import os
import sys
from pathlib import Path

import pytest

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))                       # telemetry.py, cases.py
sys.path.insert(0, str(HERE.parent / "tests"))      # baselines shared with the tests (published.py)

if os.environ.get("TRITON_INTERPRET", "0") not in ("0", ""):
    raise pytest.UsageError("benchmarks time compiled kernels: unset TRITON_INTERPRET")

import cases  # noqa: E402
import torch  # noqa: E402

GPU = torch.cuda.is_available()
DEVICE = torch.device("cuda" if GPU else "cpu")
# (batch, *shape) and dtype, from cases.py (report.py checks the targets at the same sizes)
GPU_CASES = [(shape, getattr(torch, dtype)) for shape, dtype in cases.GPU_SIZES]
CPU_CASES = [(shape, getattr(torch, dtype)) for shape, dtype in cases.CPU_SIZES]
CASES = GPU_CASES if GPU else CPU_CASES


def case_id(case) -> str:
    shape, dtype = case
    return "x".join(map(str, shape)) + "-" + str(dtype).replace("torch.", "")


# bench_*.py files are collected through ``python_files`` in pyproject.toml.


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_makereport(item, call):
    yield
    path = os.environ.get("SIDFAST_BENCH_JSONL")
    bench = getattr(item, "funcargs", {}).get("benchmark")
    if call.when != "call" or not path or bench is None or getattr(bench, "stats", None) is None:
        return
    entry = bench.stats.as_dict(include_data=False)
    with open(path, "a") as fh:  # one short write per line: a cut-off run leaves whole lines before it
        fh.write(json.dumps(entry, default=str) + "\n")
