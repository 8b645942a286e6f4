"""A torch.compile backend that records which sidfast ops the traced graphs call, then runs aot_eager."""
from __future__ import annotations

import torch


class RecordingBackend:
    """``torch.compile(fn, backend=RecordingBackend())``: ``.code`` holds the generated code of every traced
    graph and subgraph (autograd.Function bodies are subgraphs), so tests can check that tracing went through
    a custom op (and its fake) and not into raw kernel launches."""

    def __init__(self):
        self.code: list[str] = []

    def __call__(self, gm: torch.fx.GraphModule, example_inputs):
        self.code.extend(m.code for m in gm.modules() if isinstance(m, torch.fx.GraphModule))
        from torch._dynamo.backends.common import aot_autograd
        from torch._functorch.aot_autograd import make_boxed_func

        def record(g, _inputs):
            self.code.append(g.code)
            return make_boxed_func(g.forward)

        return aot_autograd(fw_compiler=record, bw_compiler=record)(gm, example_inputs)

    def calls(self, op: str) -> bool:
        return any(op in c for c in self.code)
