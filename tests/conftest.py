"""Session setup shared by every test module: keep this file to what all of them need.

Triton's interpreter runs sidfast's Triton kernels on CPU tensors (issue 3). Triton reads
``TRITON_INTERPRET`` when a kernel is decorated, i.e. when ``sidfast`` is first imported, so it is
set here, before pytest imports any test module. Machines with a CUDA device run the compiled kernels.
Consequence: in a CPU-only test session, sidfast's public losses route CPU tensors through the
Triton kernels (interpreted); tests of the native C++ op call ``torch.ops.sidfast.sid_loss`` directly.
"""
import os

if "TRITON_INTERPRET" not in os.environ:
    import torch

    if not torch.cuda.is_available():
        os.environ["TRITON_INTERPRET"] = "1"


def pytest_collection_modifyitems(config, items):
    """Mark the GPU-only tests (those skipped for want of a CUDA device) ``gpu``, so that on a GPU machine
    ``pytest tests -m gpu`` runs exactly them."""
    import pytest

    for item in items:
        if any(str(m.kwargs.get("reason", "")).startswith("needs a ") and
               any(w in str(m.kwargs.get("reason", "")) for w in ("CUDA", "GPU")) for m in item.iter_markers("skipif")):
            item.add_marker(pytest.mark.gpu)
