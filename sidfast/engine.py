"""The score engine: teacher and fake score evaluated together at one noised batch, for both SiD updates.

A SiD iteration (SPEC section 5) evaluates, per sample,
- for the fake-score update: the fake score ``f_psi(x_t)`` at ``x_t = sg(x_g) + sigma * eps``, with gradients
  into the fake score's parameters (``fake_score_forward``);
- for the generator update: teacher ``f_phi(x_t)`` and fake score ``f_psi(x_t)`` at ``x_t = x_g + sigma * eps``,
  back-propagated into ``x_g`` through ``x_t`` only: neither network gets parameter gradients
  (``generator_terms``).

Design (see FACTS.md for the H100 measurements behind it):
- The generator phase runs *frozen views* (``lora.frozen_view``): module trees whose parameters share the
  networks' storage but never require grad. Autograd then computes input gradients only, saves nothing for
  weight gradients, and ``requires_grad`` is never toggled (which made compiled networks recompile).
  Optimizer steps update the shared storage in place, so views (and graphs captured over them) see new weights.
- ``mode="full"`` (the published recipe): teacher and fake score are two networks, called one after the other;
  on CUDA both run inside one captured CUDA graph (measured as fast as one shared-weight network on a doubled
  batch, about 2x two eager networks).
- ``mode="lora"``: the fake score is the teacher's own frozen weights plus a low-rank update
  (``lora.LoRAFakeScore``); the generator phase is ONE forward over the doubled batch ``[x_t; x_t]`` with the
  low-rank update applied only to the second half.
- On CUDA (``graphs="auto"``), each phase is captured per (input shapes, dtypes, train/eval state) with
  ``torch.cuda.make_graphed_callables`` (static input/output buffers, forward and backward graphs), after
  ``torch.compile`` when ``compile=True``; a new batch size is captured anew (``recapture=True``) or refused
  with a ValueError (``recapture=False``). bf16 autocast (``amp_dtype``) runs inside, with fp32 master weights;
  outputs come back in the input dtype, so the loss math stays fp32.

Everything is in EDM coordinates (``sidfast.denoisers``): ``x_t = x0 + sigma * eps``, outputs are x0 estimates.
"""
from __future__ import annotations

import contextlib
import copy

import torch
from torch import nn

from . import loss as _loss
from .denoisers import Denoiser, as_denoiser, sigma_per_sample
from .lora import LoRAFakeScore, frozen_view, lora_parameters, same_storage, set_lora_mode, shares_storage
from .schedules import broadcast

MODES = ("full", "lora")


class _Storage:
    """Where a module's parameters and buffers keep their data, as of construction.

    ``unchanged()`` is the per-call check that every parameter and buffer slot still points at the same
    storage: a replaced tensor (``load_state_dict(assign=True)``, ``module.weight = ...``) or replaced data
    (``.to()``, ``p.data = ...``) would leave a frozen view or a captured graph on the old memory. It reads the
    slots from cached dictionaries instead of walking the module tree (walking a CIFAR U-Net's 289 modules
    cost about 2 ms per call on the development CPU)."""

    def __init__(self, module: nn.Module):
        self._slots = []
        for kind, named in (("_parameters", module.named_parameters()), ("_buffers", module.named_buffers())):
            for name, _ in named:
                owner, _, attr = name.rpartition(".")
                self._slots.append((getattr(module.get_submodule(owner), kind), attr))
        self.ptrs = self._ptrs()

    def _ptrs(self) -> tuple:
        return tuple(d[attr].data_ptr() if d.get(attr) is not None else 0 for d, attr in self._slots)

    def unchanged(self) -> bool:
        return self._ptrs() == self.ptrs


class _Pair:
    """A frozen view and the module it mirrors: storage check and train/eval-state sync, both host-only."""

    def __init__(self, source: nn.Module, view: nn.Module, what: str, base: nn.Module | None = None):
        if not shares_storage(view, source):
            raise ValueError(f"the {what}'s frozen view does not share its parameters' storage")
        self.source, self.view, self.what = source, view, what
        self._src_modules = list(source.modules())
        self._view_modules = list(view.modules())
        self._source = _Storage(source)
        # a LoRA tree's frozen base must stay the teacher's storage
        self._base = _Storage(base) if base is not None else None
        self._flags = None

    def check(self) -> None:
        if not self._source.unchanged():
            raise ValueError(f"the {self.what}'s parameters were replaced after the engine was built (e.g. by .to(), "
                             "load_state_dict(assign=True) or p.data = ...): call engine.refresh()")
        if self._base is not None and not self._base.unchanged():
            raise ValueError("the teacher's parameters were replaced after the engine was built: call "
                             "engine.refresh()")

    def sync_training(self) -> tuple:
        flags = tuple(m.training for m in self._src_modules)
        if flags != self._flags:
            for mv, flag in zip(self._view_modules, flags):
                mv.training = flag
            self._flags = flags
        return flags


def _own_copy(grad: torch.Tensor) -> torch.Tensor:
    return grad.clone()


class _OwnGrad(torch.autograd.Function):
    """Identity whose backward copies the gradient (see ``ScoreEngine._evaluate``)."""

    @staticmethod
    def forward(ctx, x):
        return x.view_as(x)

    @staticmethod
    def backward(ctx, grad):
        return grad.clone()


def _double(t):
    return torch.cat([t, t], 0) if isinstance(t, torch.Tensor) else t


class ScoreEngine:
    """Teacher and fake score of a SiD run, evaluated together.

    Args:
        teacher: the pretrained denoiser (a ``Denoiser`` or anything ``as_denoiser`` wraps, with ``teacher_kw``);
            it is put in eval mode and never gets gradients from the engine.
        fake: ``mode="full"``: the fake score (default: a trainable copy of the teacher, in train mode);
            ``mode="lora"``: None, and the engine builds ``LoRAFakeScore(teacher, lora_rank, ...)``, or such a
            ``LoRAFakeScore`` built over this teacher (``ScoreEngine.over`` picks the mode from ``fake``'s type).
        amp_dtype: None (fp32) or torch.bfloat16 / torch.float16: autocast inside the engine, fp32 weights.
        channels_last: convert both networks' 4-D parameters and the inputs to channels_last.
        compile: torch.compile each phase's function (``dynamic=False``: one specialization per batch size).
        graphs: "auto" (CUDA graphs for CUDA inputs with grad enabled), True (CUDA inputs required), False.
        recapture: capture a new graph when the batch size (or dtype, or train state) changes; False raises.
        share_pool: capture all graphs into one memory pool (less memory). Safe only when every phase's backward
            runs before the next phase's forward, as in a SiD iteration (fake forward, fake backward, generator
            forward, generator backward); otherwise a replay can overwrite activations another graph still needs.
    Attributes:
        teacher, fake: the two Denoisers; ``fake_parameters()`` is what the fake-score optimizer trains.
    """

    def __init__(self, teacher, fake=None, mode: str = "full", *, lora_rank: int = 64, lora_alpha: float | None = None,
                 lora_dropout: float = 0.0, lora_targets=None, amp_dtype: torch.dtype | None = None,
                 channels_last: bool = False, compile: bool = False, graphs="auto", recapture: bool = True,
                 share_pool: bool = False, teacher_kw: dict | None = None):
        if mode not in MODES:
            raise ValueError(f"mode must be one of {MODES}, got {mode!r}")
        if amp_dtype not in (None, torch.bfloat16, torch.float16):
            raise ValueError(f"amp_dtype must be None, torch.bfloat16 or torch.float16, got {amp_dtype!r}")
        if graphs not in ("auto", True, False):
            raise ValueError(f"graphs must be 'auto', True or False, got {graphs!r}")
        self.mode = mode
        self.amp_dtype = amp_dtype
        self.channels_last = bool(channels_last)
        self.compile = bool(compile)
        self.graphs = graphs
        self.recapture = bool(recapture)
        self.share_pool = bool(share_pool)
        self._pool = None
        self.teacher = as_denoiser(teacher, name="teacher", **(teacher_kw or {}))
        self.teacher.eval()
        if self.channels_last:
            self.teacher.to(memory_format=torch.channels_last)
        if mode == "full":
            if fake is None:
                fake = copy.deepcopy(self.teacher).requires_grad_(True).train()
                fake.name = "fake score"
            else:
                fake = as_denoiser(fake, name="fake score")
            if fake is self.teacher:
                raise ValueError("fake must be a separate network from the teacher in mode 'full' (use mode='lora' "
                                 "to share the teacher's weights)")
            if self.channels_last:
                fake.to(memory_format=torch.channels_last)
        elif fake is None:
            fake = LoRAFakeScore(self.teacher, lora_rank, lora_alpha, lora_dropout, lora_targets)
        else:
            if not isinstance(fake, LoRAFakeScore):
                raise ValueError("mode='lora' takes fake=None (the engine builds the LoRA fake score) or a "
                                 f"sidfast.lora.LoRAFakeScore over this teacher, got {type(fake).__name__}")
            base = [p for n, p in fake.net.named_parameters() if not n.endswith((".lora_A", ".lora_B"))]
            if not same_storage(base, list(self.teacher.parameters())):
                raise ValueError("fake is a LoRAFakeScore over another network: its frozen weights are not this "
                                 "teacher's")
        self.fake: Denoiser = fake
        self.refresh()

    @classmethod
    def over(cls, teacher, fake, **kwargs) -> "ScoreEngine":
        """The engine for an existing fake score: mode "lora" for a ``LoRAFakeScore``, "full" otherwise."""
        return cls(teacher, fake, "lora" if isinstance(fake, LoRAFakeScore) else "full", **kwargs)

    # ---- views, graphs, bookkeeping ----

    def refresh(self) -> None:
        """Rebuild the generator phase's frozen views and drop compiled functions and captured graphs.

        Needed only after a network's parameters were replaced rather than updated in place."""
        if self.mode == "full":
            self._pairs = [_Pair(self.teacher, frozen_view(self.teacher), "teacher"),
                           _Pair(self.fake, frozen_view(self.fake), "fake score")]
        else:
            tree = self.fake.net
            self._pairs = [_Pair(tree, set_lora_mode(frozen_view(tree), "split"), "fake score", base=self.teacher)]
        self._graphs: dict = {}
        self._compiled: dict = {}
        self._fake_state: _Storage | None = None  # the fake's tensors as its captured graph holds them
        self._drop_grad_hooks()

    def fake_parameters(self) -> list[nn.Parameter]:
        """The parameters the fake-score optimizer updates (all of the fake in 'full', the LoRA factors in 'lora')."""
        if self.mode == "lora":
            return lora_parameters(self.fake.net)
        return [p for p in self.fake.parameters() if p.requires_grad]

    def reset_graphs(self) -> None:
        """Forget every captured CUDA graph (they are captured again on the next call)."""
        self._graphs.clear()
        self._fake_state = None
        self._drop_grad_hooks()

    def _drop_grad_hooks(self) -> None:
        for h in getattr(self, "_grad_hooks", ()):
            h.remove()
        self._grad_hooks = []

    def _autocast(self, device: torch.device):
        if self.amp_dtype is None:
            return contextlib.nullcontext()
        return torch.autocast(device.type, dtype=self.amp_dtype, cache_enabled=False)

    def _layout(self, x: torch.Tensor) -> torch.Tensor:
        if self.channels_last and x.dim() == 4:
            return x.contiguous(memory_format=torch.channels_last)
        return x

    def _use_graphs(self, x: torch.Tensor) -> bool:
        if self.graphs is False:
            return False
        if x.device.type != "cuda":
            if self.graphs is True:
                raise ValueError(f"graphs=True needs CUDA tensors, got x on {x.device} (use graphs='auto' or False)")
            return False
        return torch.is_grad_enabled()

    def _check_inputs(self, x: torch.Tensor, sigma, labels, cond, what: str):
        _loss.check_tensors(**{what: x})
        sig = sigma_per_sample(sigma, x)
        if labels is not None:
            if not isinstance(labels, torch.Tensor):
                raise TypeError(f"labels must be a tensor or None, got {type(labels).__name__}")
            if labels.dim() == 0 or labels.shape[0] != x.shape[0]:
                raise ValueError(f"labels must have one row per sample ({x.shape[0]}), got shape {tuple(labels.shape)}")
            if labels.device != x.device:
                raise ValueError(f"labels are on {labels.device} but {what} is on {x.device}")
        if self.mode == "lora":
            for k, v in cond.items():
                if isinstance(v, torch.Tensor) and (v.dim() == 0 or v.shape[0] != x.shape[0]):
                    raise ValueError(f"conditioning {k} must have one row per sample ({x.shape[0]}) to be doubled "
                                     f"in mode 'lora', got shape {tuple(v.shape)}")
        return sig

    # ---- the two phases as pure tensor functions ----

    def _generator_fn(self, names: tuple[str, ...], has_labels: bool):
        """f(x_t, sigma, [labels], *cond) -> (y_real, y_fake) over the frozen views (input gradients only)."""
        pairs = self._pairs

        def run(x_t, sigma, *rest):
            labels = rest[0] if has_labels else None
            cond = dict(zip(names, rest[1:] if has_labels else rest))
            with self._autocast(x_t.device):
                if self.mode == "full":
                    return pairs[0].view(x_t, sigma, labels, **cond), pairs[1].view(x_t, sigma, labels, **cond)
                # one forward of the shared network over [teacher half; fake half]
                y = pairs[0].view(_double(x_t), _double(sigma), _double(labels),
                                  **{k: _double(v) for k, v in cond.items()})
                return y[: x_t.shape[0]], y[x_t.shape[0]:]

        return run

    def _fake_fn(self, names: tuple[str, ...], has_labels: bool):
        fake = self.fake

        def run(x_t, sigma, *rest):
            labels = rest[0] if has_labels else None
            cond = dict(zip(names, rest[1:] if has_labels else rest))
            with self._autocast(x_t.device):
                return fake(x_t, sigma, labels, **cond)

        return run

    def _function(self, phase: str, names, has_labels: bool):
        key = (phase, names, has_labels)
        fn = self._compiled.get(key)
        if fn is None:
            fn = (self._generator_fn if phase == "generator" else self._fake_fn)(names, has_labels)
            if self.compile:
                fn = torch.compile(fn, dynamic=False)
            self._compiled[key] = fn
        return fn

    def _graphed(self, phase: str, names, has_labels: bool, args: tuple, state: tuple):
        key = (phase, names, has_labels, tuple((a.shape, a.dtype, a.requires_grad) for a in args), state,
               self.amp_dtype)
        g = self._graphs.get(key)
        if g is not None:
            return g
        if not self.recapture:
            held = [k for k in self._graphs if k[0] == phase]
            if held:
                shapes = sorted({tuple(k[3][0][0]) for k in held})
                raise ValueError(f"{phase} inputs of shape {tuple(args[0].shape)} (dtype {args[0].dtype}) differ from "
                                 f"the captured graph's {shapes}: build the engine with recapture=True or call "
                                 "engine.reset_graphs() first")
        fn = self._function(phase, names, has_labels)
        sample = tuple(a.detach().clone().requires_grad_(a.requires_grad) for a in args)
        if phase == "fake":
            callable_ = _Surface(fn, self.fake)  # the fake's parameters get gradients from the graph's backward
        else:
            callable_ = fn  # a function: no parameter in its gradient surface
        if self.share_pool and self._pool is None:
            self._pool = torch.cuda.graph_pool_handle()
        with torch.autocast("cuda", enabled=False):  # our own autocast (cache disabled) runs inside
            g = torch.cuda.make_graphed_callables(callable_, sample, allow_unused_input=True, pool=self._pool)
        self._graphs[key] = g
        if phase == "fake":  # the fake phase's graph holds the fake's parameters themselves
            self._fake_state = _Storage(self.fake)
            if not self._grad_hooks:
                # a replayed backward hands autograd views of its static gradient buffers, which autograd would
                # keep as p.grad (p.grad None) and the next replay would overwrite: accumulation over micro-batches
                # would then give 2 g_last instead of g_1 + g_2. Each parameter keeps a copy instead.
                self._grad_hooks = [p.register_hook(_own_copy) for p in self.fake_parameters()]
        return g

    # ---- public API ----

    def generator_terms(self, x_g: torch.Tensor, sigma, labels=None, noise: torch.Tensor | None = None, **cond):
        """Teacher and fake-score x0 estimates at ``x_t = x_g + sigma * noise`` for the generator update.

        Args:
            x_g: generator sample (B, *F), normally carrying G's autograd graph.
            sigma: (B,) noise levels (``reference.generator_sigma`` in the published recipe).
            labels: class labels in the networks' format, or None; noise: eps (B, *F), required.
            cond: further conditioning tensors (B, ...) passed to both networks by keyword.
        Returns:
            (y_real, y_fake), each (B, *F) in x_g's dtype; their backward reaches x_g through x_t, and neither
            network's parameters receive gradients.
        """
        if noise is None:
            raise ValueError("noise is required: x_t = x_g + sigma * noise")
        _loss.check_tensors(x_g=x_g, noise=noise)
        sig = self._check_inputs(x_g, sigma, labels, cond, "x_g")
        x_t = self._layout(x_g + broadcast(sig, x_g).to(x_g.dtype) * noise)  # x_t = x_g + sigma eps (EDM, a = 1)
        return self._evaluate("generator", x_t, sig, labels, cond)

    def scores(self, x_t: torch.Tensor, sigma, labels=None, **cond):
        """Teacher and fake-score x0 estimates at a given ``x_t`` (B, *F), as ``generator_terms`` (input gradients
        only): for callers that build ``x_t`` themselves."""
        sig = self._check_inputs(x_t, sigma, labels, cond, "x_t")
        return self._evaluate("generator", self._layout(x_t), sig, labels, cond)

    def fake_score_forward(self, x_t: torch.Tensor, sigma, labels=None, **cond) -> torch.Tensor:
        """The fake score's x0 estimate at ``x_t`` (B, *F), with gradients into its trainable parameters."""
        sig = self._check_inputs(x_t, sigma, labels, cond, "x_t")
        return self._evaluate("fake", self._layout(x_t), sig, labels, cond)

    def _evaluate(self, phase: str, x_t, sig, labels, cond):
        names = tuple(sorted(cond))
        has_labels = labels is not None
        if phase == "generator":
            for pair in self._pairs:
                pair.check()
            state = tuple(hash(pair.sync_training()) for pair in self._pairs)
        else:
            state = (self.fake.training,)
            if self._fake_state is not None and not self._fake_state.unchanged():
                raise ValueError("the fake score's parameters were replaced after its graph was captured (e.g. by "
                                 ".to(), load_state_dict(assign=True) or p.data = ...): call engine.refresh()")
        args = (x_t, sig) + ((labels,) if has_labels else ()) + tuple(cond[k] for k in names)
        if self._use_graphs(x_t) and (phase == "fake" or x_t.requires_grad):
            if not all(isinstance(a, torch.Tensor) for a in args):
                raise ValueError("CUDA graphs need tensor conditioning; pass graphs=False for other values")
            graphed = self._graphed(phase, names, has_labels, args, state)
            # the input gradient a replay returns lies in a static buffer too: copy it before anyone keeps it
            out = graphed(*(_OwnGrad.apply(a) if a.requires_grad else a for a in args))
            # graph outputs are static buffers overwritten by the next replay: hand out copies
            return tuple(o.clone() for o in out) if isinstance(out, tuple) else out.clone()
        return self._function(phase, names, has_labels)(*args)

    def generator_loss(self, x_g: torch.Tensor, sigma, labels=None, noise: torch.Tensor | None = None,
                       alpha: float = 1.2, reduction: str = "batchmean", **cond) -> torch.Tensor:
        """``sidfast.loss.sid_generator_loss`` of ``generator_terms`` (SPEC section 3); scale it yourself (100)."""
        y_real, y_fake = self.generator_terms(x_g, sigma, labels, noise, **cond)
        return _loss.sid_generator_loss(y_real, y_fake, x_g, alpha, reduction)

    def fake_score_loss(self, x0: torch.Tensor, sigma, labels=None, noise: torch.Tensor | None = None,
                        weighting: str = "edm", sigma_data: float = 0.5, reduction: str = "batchmean",
                        **cond) -> torch.Tensor:
        """Denoising loss of the fake score on generator samples ``x0`` (detached here; SPEC section 4)."""
        if noise is None:
            raise ValueError("noise is required: x_t = x0 + sigma * noise")
        x0 = x0.detach()
        _loss.check_tensors(x0=x0, noise=noise)
        sig = sigma_per_sample(sigma, x0)
        x_t = x0 + broadcast(sig, x0).to(x0.dtype) * noise  # x_t = x0 + sigma eps (EDM, a = 1)
        pred = self.fake_score_forward(x_t, sig, labels, **cond)
        return _loss.fake_score_loss(pred, x0, noise, 1.0, sig, prediction="x0", weighting=weighting,
                                     sigma_data=sigma_data, reduction=reduction)


class _Surface(nn.Module):
    """The fake phase as a module, so that ``make_graphed_callables`` puts the fake's parameters in the graph's
    gradient surface (its forward is replaced by the graphed one)."""

    def __init__(self, fn, fake: nn.Module):
        super().__init__()
        self.fake = fake
        self._fn = fn
        self.training = fake.training  # only this flag: make_graphed_callables replays while it is unchanged

    def forward(self, *args):
        return self._fn(*args)


__all__ = ["ScoreEngine", "MODES"]
