"""Session setup shared by every test module: keep this file to what all of them need.

Triton's interpreter runs sidfast's Triton kernels on CPU tensors (sidfast/ops/backend.py). Triton reads
``TRITON_INTERPRET`` when a kernel is decorated, i.e. when ``sidfast`` is first imported, so it is
set here, before pytest imports any test module. Machines with a CUDA device run the compiled kernels.
Consequence: in a CPU-only test session, sidfast's public losses route CPU tensors through the
Triton kernels (interpreted); tests of the native C++ route use the ``native_cpu_route`` fixture.

Shared helpers (device, markers such as ``requires_cuda``, test networks, tolerances) live in utils.py.
"""
import os

import pytest

if "TRITON_INTERPRET" not in os.environ:
    import torch

    if not torch.cuda.is_available():
        os.environ["TRITON_INTERPRET"] = "1"


@pytest.fixture
def sm90_compile_report():
    """``report(op)``: benchmarks/compile_report.py --json for ``op`` (every kernel configuration compiled for
    sm_90, no GPU needed), run in a fresh interpreter without TRITON_INTERPRET."""
    import json
    import subprocess
    import sys
    from pathlib import Path

    pytest.importorskip("triton.backends.nvidia")
    script = Path(__file__).resolve().parent.parent / "benchmarks" / "compile_report.py"
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}

    def report(op: str) -> list[dict]:
        proc = subprocess.run([sys.executable, str(script), "--json", op], capture_output=True, text=True, env=env,
                              timeout=900)
        assert proc.returncode == 0, proc.stderr[-4000:]
        return json.loads(proc.stdout.splitlines()[-1])

    return report


@pytest.fixture
def native_cpu_route(monkeypatch):
    """CPU tensors take the native C++ op (or the PyTorch reference) even while the kernels are interpreted."""
    from sidfast.ops import backend

    triton_route = backend.use_triton
    monkeypatch.setattr(backend, "use_triton", lambda t: t.device.type != "cpu" and triton_route(t))

