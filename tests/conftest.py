"""Session setup shared by every test module: keep this file to what all of them need.

Triton's interpreter runs sidfast's Triton kernels on CPU tensors. Triton reads ``TRITON_INTERPRET`` when a
kernel is decorated, i.e. when ``sidfast`` is first imported, so it is set here, before pytest imports any
test module. Machines with a CUDA device run the compiled kernels.
Consequence: in a CPU-only test session, sidfast's public losses route CPU tensors through the
Triton kernels (interpreted); tests of the native C++ op call ``torch.ops.sidfast.sid_loss`` directly.

Shared helpers (device, markers such as ``requires_cuda``, test networks, tolerances) live in utils.py.
"""
import os

if "TRITON_INTERPRET" not in os.environ:
    import torch

    if not torch.cuda.is_available():
        os.environ["TRITON_INTERPRET"] = "1"
