"""The score engine's CUDA-graph cache: each phase captured once per input variant, then replayed.

``GraphCache`` enforces the rules under which a replay is correct: docs/engine.md, "CUDA graphs".
"""
from __future__ import annotations

import collections
import gc

import torch
from torch import nn

from sidfast.models.views import StorageSnapshot

MAX_GRAPHS = 8  # room for both phases, in train and eval state, at two batch sizes


def _own_copy(grad: torch.Tensor) -> torch.Tensor:
    """Gradient hook: a replayed backward hands autograd views of its static gradient buffers, which autograd
    would keep as a ``.grad`` that the next replay overwrites (gradients accumulated over micro-batches
    would then be ``2 g_last`` instead of ``g_1 + g_2``)."""
    return grad.clone()


def _with_own_grad(x: torch.Tensor) -> torch.Tensor:
    """A view of ``x`` whose gradient is copied out of the graph's static buffer before it reaches ``x``."""
    v = x.view_as(x)
    v.register_hook(_own_copy)
    return v


class _FakePhaseModule(nn.Module):
    """The fake phase as a module holding the fake score, so that ``make_graphed_callables`` puts the fake's
    parameters in the graph's gradient surface (it replaces this module's forward by the graphed one)."""

    def __init__(self, fn, fake: nn.Module):
        super().__init__()
        self.fake = fake
        self._fn = fn
        self.training = fake.training  # only this flag: make_graphed_callables replays while it is unchanged

    def forward(self, *args):
        return self._fn(*args)


class _Graph:
    """One captured phase: the graphed callable and how many of its replays still await their backward."""

    def __init__(self, replay):
        self.replay = replay
        self.pending = 0


class _PendingBackward:
    """Counts one replay's backward as pending, from the replay until that backward has run or its autograd
    graph is freed unused (the token lives in a hook of the replay's autograd node)."""

    def __init__(self, graph: _Graph, cache: "GraphCache"):
        self._graph = graph
        self._cache = cache
        graph.pending += 1
        cache.pending += 1

    def close(self, *_) -> None:
        if self._graph is not None:
            self._graph.pending -= 1
            self._cache.pending -= 1
            self._graph = None

    __del__ = close


class GraphCache:
    """Captured CUDA graphs of the score engine's two phases, keyed by phase, variant and input specs.

    Args:
        fake: the fake score: the "fake" phase's graphs hold its parameters and train them;
        trainable: the fake's parameters that the optimizer updates (their replayed gradients are copied);
        max_graphs: how many captured graphs to keep; the least recently used is dropped first.
        share_pool: capture every graph into one memory pool (less memory); replays then wait for every
            pending backward, not only their own graph's (see the module docstring).
        recapture: capture a new graph for new input specs of a phase; False raises instead.
        graphs: when ``call`` uses a graph: "auto" (CUDA inputs with grad enabled), True (CUDA inputs
            required), False (never).
    Attributes:
        pending: how many replays (of any graph, dropped ones included) still await their backward.
    """

    def __init__(self, fake: nn.Module, trainable: list[nn.Parameter], max_graphs: int = MAX_GRAPHS,
                 share_pool: bool = False, recapture: bool = True, graphs="auto"):
        self.fake = fake
        self.graphs = graphs
        self.trainable = trainable
        self.max_graphs = max_graphs
        self.share_pool = share_pool
        self.recapture = recapture
        self.pending = 0
        self._graphs: collections.OrderedDict = collections.OrderedDict()
        self._pool = None
        # the fake's tensors as its captured graphs hold them
        self._fake_storage: StorageSnapshot | None = None
        self._grad_hooks: list = []

    def __len__(self) -> int:
        return len(self._graphs)

    def __iter__(self):
        """The keys ``(phase, variant, input specs)`` of the graphs held, least recently used first."""
        return iter(list(self._graphs))

    def clear(self) -> None:
        """Drop every graph and the gradient-copy hooks."""
        self._graphs.clear()
        self._fake_storage = None
        for h in self._grad_hooks:
            h.remove()
        self._grad_hooks = []

    def check_fake_storage(self) -> None:
        """Raise if the fake's parameters were replaced after a fake-phase graph captured them."""
        if self._fake_storage is not None and not self._fake_storage.unchanged():
            raise ValueError("the fake score's parameters were replaced after its graph was captured (e.g. "
                             "by .to(), load_state_dict(assign=True) or p.data = ...): call engine.refresh()")

    def applies(self, x: torch.Tensor) -> bool:
        """Whether calls with input ``x`` may go through a graph: "auto": CUDA inputs with grad enabled."""
        if self.graphs is False:
            return False
        if x.device.type != "cuda":
            if self.graphs is True:
                raise ValueError(f"graphs=True needs CUDA tensors, got x on {x.device} (use graphs='auto' or "
                                 "False)")
            return False
        return torch.is_grad_enabled()

    def call(self, phase: str, variant: tuple, fn, args: tuple):
        """``fn(*args)``, through a captured graph (``run``) where graphs apply, in the "fake" phase or with an
        input that needs a gradient (the generator phase's x_t)."""
        x_t = args[0]
        if not self.applies(x_t) or not (phase == "fake" or x_t.requires_grad):
            return fn(*args)
        if not all(isinstance(a, torch.Tensor) for a in args):
            raise ValueError("CUDA graphs need tensor conditioning (nested keyword dicts of tensors are "
                             "flattened); pass graphs=False for other values")
        return self.run(phase, variant, fn, args)

    def run(self, phase: str, variant: tuple, fn, args: tuple):
        """``fn(*args)`` through the graph of (phase, variant, input specs), captured on first use.

        ``variant`` holds what else changes the captured work (conditioning names, train state, dtypes).
        Returns copies of the outputs; autograd reaches ``args`` and, in the "fake" phase, ``self.trainable``.
        """
        key = (phase, variant, tuple((a.shape, a.dtype, a.device, a.requires_grad) for a in args))
        with torch.cuda.device(args[0].device):
            graph = self._graphs.get(key)
            self._check_no_pending(phase, graph)
            if graph is None:
                graph = self._capture(key, fn, args)
            else:
                self._graphs.move_to_end(key)
            out = graph.replay(*(_with_own_grad(a) if a.requires_grad else a for a in args))
        outs = out if isinstance(out, tuple) else (out,)
        node = next((o.grad_fn for o in outs if o.grad_fn is not None), None)
        if node is not None:
            # the hook runs once the graph's backward has run; freeing the node frees the token as well
            node.register_hook(_PendingBackward(graph, self).close)
        copies = tuple(o.clone() for o in outs)
        return copies if isinstance(out, tuple) else copies[0]

    def _check_no_pending(self, phase: str, graph: _Graph | None) -> None:
        if graph is not None and graph.pending:
            raise RuntimeError(f"the {phase} phase's CUDA graph was called again before the backward of "
                               "its previous call: the replay would overwrite the activations that backward "
                               "needs. Run that backward (or drop its outputs) first, or build the engine "
                               "with graphs=False")
        if self.share_pool and self.pending:
            raise RuntimeError(f"a {phase} phase CUDA graph was called while the backward of another graph "
                               "in the shared pool is pending: it would overwrite that backward's "
                               "activations. Run that backward first, or build the engine with "
                               "share_pool=False")

    def _capture(self, key: tuple, fn, args: tuple) -> _Graph:
        phase = key[0]
        if not self.recapture:
            held = [k for k in self._graphs if k[0] == phase]
            if held:
                shapes = sorted({tuple(k[2][0][0]) for k in held})
                raise ValueError(f"{phase} inputs of shape {tuple(args[0].shape)} (dtype {args[0].dtype}) "
                                 f"differ from the captured graph's {shapes}: build the engine with "
                                 "recapture=True or call engine.reset_graphs() first")
        sample = tuple(a.detach().clone().requires_grad_(a.requires_grad) for a in args)
        # a module puts the fake's parameters in the gradient surface; the generator phase's function has none
        callable_ = _FakePhaseModule(fn, self.fake) if phase == "fake" else fn
        if self.share_pool and self._pool is None:
            self._pool = torch.cuda.graph_pool_handle()
        with torch.autocast("cuda", enabled=False):  # the phase's own autocast (cache disabled) runs inside
            replay = torch.cuda.make_graphed_callables(callable_, sample, allow_unused_input=True,
                                                       pool=self._pool)
        if phase == "fake":
            self._fake_storage = StorageSnapshot(self.fake)
            if not self._grad_hooks:
                self._grad_hooks = [p.register_hook(_own_copy) for p in self.trainable]
        graph = _Graph(replay)
        self._graphs[key] = graph
        if len(self._graphs) > self.max_graphs:
            while len(self._graphs) > self.max_graphs:
                self._graphs.popitem(last=False)
            # a graphed callable's state sits in classes, which only the cycle collector frees
            gc.collect()
        return graph


__all__ = ["GraphCache", "MAX_GRAPHS"]
