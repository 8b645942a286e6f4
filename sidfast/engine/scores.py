"""The scores of a SiD run: what the trainer asks of teacher and fake score, behind one interface.

``EagerScores`` calls the networks one by one (the readable path, and DDP's); ``ScoreEngine`` evaluates them
together over frozen views, one CUDA graph per phase on a GPU; ``PhaseScores`` takes each phase from one of
them. Design: docs/engine.md.
"""
from __future__ import annotations


import torch
from torch import nn

from sidfast import conditions, guidance
from sidfast import loss as _loss
from sidfast.utils import runtime
from sidfast._checks import check_int, check_rows
from sidfast.engine.graphs import MAX_GRAPHS, GraphCache
from sidfast.engine.guided import dispatch, guided_function, null_arguments
from sidfast.models.denoiser import Denoiser, as_denoiser, sigma_per_sample
from sidfast.models.discriminator import DiscriminatorPass, DiscriminatorTap, with_logits
from sidfast.conditions import flat_condition, nested_condition, path_name
from sidfast.engine.fake_score import fake_score_over
from sidfast.models.lora import NETWORK_KINDS as MODES, LoRAFakeScore, lora_parameters, set_lora_mode
from sidfast.ops.noise import add_noise
from sidfast.schedules import broadcast
from sidfast.models.views import FrozenMirror, frozen_view


def _double(t):
    return torch.cat([t, t], 0) if isinstance(t, torch.Tensor) else t


def _flat_arguments(cond: dict) -> tuple[tuple, tuple]:
    """(paths, tensors): keyword conditioning as the tensor arguments of a phase function, in the sorted
    order of their ``flat_condition`` paths (the paths name the function and its graphs)."""
    flat = flat_condition(cond)
    names = tuple(sorted(flat))
    return names, tuple(flat[k] for k in names)


def edm_noised(x: torch.Tensor, sigma: torch.Tensor, noise: torch.Tensor | None = None):
    """``(x_t, seed)`` with x_t = x + sigma * eps in EDM coordinates, gradients reaching ``x``.

    Args:
        x: clean data (B, *F).
        sigma: (B,) noise levels.
        noise: eps itself, or None to draw eps inside the ``add_noise`` kernel from a seed of torch's generator.
    Returns:
        x_t and the (1,) seed that regenerates eps (``sidfast.ops.noise.regenerate_noise``, the fake-score
        loss's ``seed=``); the seed is None when ``noise`` was given.
    """
    if noise is None:
        return add_noise(x, 1.0, sigma)
    return x + broadcast(sigma, x).to(x.dtype) * noise, None


class ScoreEngine:
    """Teacher and fake score of a SiD run, evaluated together.

    Args:
        teacher: the pretrained denoiser (a ``Denoiser`` or anything ``as_denoiser`` wraps); it is put in eval
            mode and never gets gradients from the engine.
        fake: ``mode="full"``: the fake score (default: a trainable copy of the teacher, in train mode);
            ``mode="lora"``: None, and the engine builds ``LoRAFakeScore(teacher, lora_rank, ...)``, or such a
            ``LoRAFakeScore`` built over this teacher (``ScoreEngine.over`` picks the mode from ``fake``'s
            type).
        amp_dtype: None (fp32) or torch.bfloat16 / torch.float16: autocast inside the engine, fp32 weights.
        channels_last: convert both networks' 4-D parameters and the inputs to channels_last.
        compile: torch.compile each phase's function (``dynamic=False``: one specialization per batch size).
        graphs: "auto" (CUDA graphs for CUDA inputs with grad enabled), True (CUDA inputs required), False.
        recapture: capture a new graph when the batch size (or dtype, or train state) changes; False raises.
        share_pool: capture all graphs into one memory pool (less memory). A replay then raises while any
            graph's backward is pending; the SiD order (fake forward, fake backward, generator forward,
            generator backward) never does.
        max_graphs: how many captured graphs to keep (default ``sidfast.engine.graphs.MAX_GRAPHS``, 8), each with
            memory for a whole forward and backward; the least recently used is dropped first.
    Attributes:
        teacher, fake: the two Denoisers; ``fake_parameters()`` is what the fake-score optimizer trains.
    """

    def __init__(self, teacher, fake=None, mode: str = "full", *, lora_rank: int = 64,
                 lora_alpha: float | None = None, lora_dropout: float = 0.0, lora_targets=None,
                 amp_dtype: torch.dtype | None = None, channels_last: bool = False, compile: bool = False,
                 graphs="auto", recapture: bool = True, share_pool: bool = False,
                 max_graphs: int = MAX_GRAPHS):
        if mode not in MODES:
            raise ValueError(f"mode must be one of {MODES}, got {mode!r}")
        if amp_dtype not in (None, torch.bfloat16, torch.float16):
            raise ValueError(f"amp_dtype must be None, torch.bfloat16 or torch.float16, got {amp_dtype!r}")
        if graphs not in ("auto", True, False):
            raise ValueError(f"graphs must be 'auto', True or False, got {graphs!r}")
        check_int("max_graphs", max_graphs, 1, "max_graphs must be a positive integer, got {value!r}")
        self.mode = mode
        self.amp_dtype = amp_dtype
        self.channels_last = bool(channels_last)
        self.compile = bool(compile)
        self.graphs = graphs
        self.recapture = bool(recapture)
        self.share_pool = bool(share_pool)
        self.max_graphs = max_graphs
        self.teacher = as_denoiser(teacher, name="teacher")
        self.teacher.eval()
        if self.channels_last:
            self.teacher.to(memory_format=torch.channels_last)
        fake = fake_score_over(self.teacher, fake, mode, self.channels_last, lora_rank, lora_alpha,
                               lora_dropout, lora_targets)
        self.fake: Denoiser = fake
        self._graphs: GraphCache | None = None
        self._tap: DiscriminatorTap | None = None
        self.refresh()

    @classmethod
    def over(cls, teacher, fake, **kwargs) -> "ScoreEngine":
        """The engine for an existing fake score: mode "lora" for a ``LoRAFakeScore``, "full" otherwise."""
        return cls(teacher, fake, "lora" if isinstance(fake, LoRAFakeScore) else "full", **kwargs)

    # ---- public API ----

    def generator_terms(self, x_g: torch.Tensor, sigma, labels=None, noise: torch.Tensor | None = None,
                        scale_real: float = 1.0, scale_fake: float = 1.0, null_labels=None,
                        null_cond: dict | None = None, **cond):
        """Teacher and fake-score x0 estimates at ``x_t = x_g + sigma * noise`` for the generator update.

        Args:
            x_g: generator sample (B, *F), normally carrying G's autograd graph.
            sigma: (B,) noise levels (``reference.generator_sigma`` in the published recipe).
            labels: class labels in the networks' format, or None.
            noise: eps (B, *F) in x_g's dtype, or None to draw eps inside the noising kernel
                ``sidfast.ops.noise.add_noise``, seeded from torch's default generator on x_g's device.
            scale_real, scale_fake: guidance scales k4 of the teacher and k2 of the fake score, docs/math.md,
                "Guidance (SiD-LSG)"; 1 is the plain conditional call.
            null_labels, null_cond: the unconditional labels and keyword tensors (1 or B rows), needed when a
                scale is not 1.
            cond: further conditioning tensors (B, ...) passed to both networks by keyword.
        Returns:
            (y_real, y_fake), each (B, *F) in x_g's dtype; their backward reaches x_g through x_t, and neither
            network's parameters receive gradients.
        """
        x_t, sig = self._noised(x_g, sigma, labels, noise, cond)
        scales = (float(scale_real), float(scale_fake))
        if scales == (1.0, 1.0):
            return self._evaluate("generator", x_t, sig, labels, cond)
        return self._evaluate_guided("generator", x_t, sig, labels, cond, scales, null_labels, null_cond)

    def fake_score_forward(self, x_t: torch.Tensor, sigma, labels=None, scale: float = 1.0, null_labels=None,
                           null_cond: dict | None = None, **cond) -> torch.Tensor:
        """The fake score's x0 estimate at ``x_t`` (B, *F), with gradients into its trainable parameters;
        guided at ``scale`` (k1) with the unconditional ``null_labels``/``null_cond`` when it is not 1."""
        sig = self._check_inputs(x_t, sigma, labels, cond, "x_t")
        if float(scale) == 1.0:
            return self._evaluate("fake", self._layout(x_t), sig, labels, cond)
        return self._evaluate_guided("fake", self._layout(x_t), sig, labels, cond, (float(scale),),
                                     null_labels, null_cond)

    # ---- SiDA: the discriminator logits from the fake score's encoder ----

    def attach_discriminator(self, layer: str | None = None) -> DiscriminatorTap:
        """Read SiDA's discriminator logits off the fake score at ``layer`` (a ``--disc-layer`` path; None: the
        family default, ``sidfast.models.discriminator.default_layer``). Returns the tap on the fake score."""
        if self._tap is not None:
            self._tap.remove()
        self._tap = DiscriminatorTap(self.fake, layer)
        self.refresh()
        return self._tap

    def generator_terms_with_logits(self, x_g: torch.Tensor, sigma, labels=None,
                                    noise: torch.Tensor | None = None, **cond):
        """``generator_terms`` plus the discriminator logits of the same fake-score forward at x_t:
        (y_real, y_fake, logits), the logits' backward reaching x_g only (``attach_discriminator`` first)."""
        self._need_tap()
        x_t, sig = self._noised(x_g, sigma, labels, noise, cond)
        return self._evaluate("generator", x_t, sig, labels, cond, logits=True)

    def fake_score_with_logits(self, x_t: torch.Tensor, x_real_t: torch.Tensor, sigma, labels=None,
                               real_cond: dict | None = None, **cond):
        """SiDA's fake-score step: ``(f_psi(x_t), D_fake, D_real)``, with gradients into the fake score's
        trainable parameters.

        Args:
            x_t: the noised generated images; f_psi and D_fake come from one forward at them.
            x_real_t: the noised real images, same ``sigma`` and ``labels``; D_real comes from an encoder-only
                forward at them.
            sigma, labels: as for ``fake_score_forward``.
            real_cond: the real images' own conditioning; default ``cond``.
            cond: conditioning tensors of the generated images, by keyword.
        """
        self._need_tap()
        sig = self._check_inputs(x_t, sigma, labels, cond, "x_t")
        real_cond = dict(cond if real_cond is None else real_cond)
        _loss.check_tensors(x_t=x_t, x_real_t=x_real_t)
        self._check_inputs(x_real_t, sig, labels, real_cond, "x_real_t")
        real = (self._layout(x_real_t), real_cond)
        return self._evaluate("fake", self._layout(x_t), sig, labels, cond, logits=True, real=real)

    def _need_tap(self) -> None:
        if self._tap is None:
            raise RuntimeError("no discriminator: call engine.attach_discriminator(layer) first")

    def fake_parameters(self) -> list[nn.Parameter]:
        """The parameters the fake-score optimizer updates (all of the fake in 'full', the LoRA factors in
        'lora')."""
        if self.mode == "lora":
            return lora_parameters(self.fake.net)
        return [p for p in self.fake.parameters() if p.requires_grad]

    def refresh(self) -> None:
        """Rebuild the generator phase's frozen views and drop compiled functions and captured graphs.

        Needed only after a network's parameters were replaced rather than updated in place."""
        if self.mode == "full":
            self._mirrors = [FrozenMirror(self.teacher, frozen_view(self.teacher), "teacher"),
                             FrozenMirror(self.fake, frozen_view(self.fake), "fake score")]
        else:
            tree = self.fake.net
            split = set_lora_mode(frozen_view(tree), "split")
            self._mirrors = [FrozenMirror(tree, split, "fake score", base=self.teacher)]
        # the fake's mirror is the last one in both modes; in 'lora' the tap keeps the split batch's fake half
        self._view_tap = self._tap.on(self._mirrors[-1].view) if self._tap is not None else None
        self._functions: dict = {}
        if self._graphs is not None:
            self._graphs.clear()
        self._graphs = GraphCache(self.fake, self.fake_parameters(), self.max_graphs, self.share_pool,
                                  self.recapture, self.graphs)

    def reset_graphs(self) -> None:
        """Forget every captured CUDA graph (they are captured again on the next call)."""
        self._graphs.clear()

    # ---- inputs ----

    def _autocast(self, device: torch.device):
        return runtime.autocast(device, self.amp_dtype, cache_enabled=False)  # no weight cache: graph capture

    def _noised(self, x_g: torch.Tensor, sigma, labels, noise, cond: dict):
        """The generator phase's checked inputs: (x_t = x_g + sigma * eps in the engine's layout, sigma per
        sample)."""
        if noise is not None:
            _loss.check_tensors(x_g=x_g, noise=noise)
        sig = self._check_inputs(x_g, sigma, labels, cond, "x_g")
        x_t, _ = edm_noised(x_g, sig, noise)
        return self._layout(x_t), sig

    def _layout(self, x: torch.Tensor) -> torch.Tensor:
        if self.channels_last and x.dim() == 4:
            return x.contiguous(memory_format=torch.channels_last)
        return x

    def _check_inputs(self, x: torch.Tensor, sigma, labels, cond, what: str):
        _loss.check_tensors(**{what: x})
        sig = sigma_per_sample(sigma, x)
        check_rows(x, labels, {path_name(k): v for k, v in flat_condition(cond).items()}, what,
                   doubled=self.mode == "lora")
        return sig

    # ---- the two phases ----

    def _function(self, phase: str, names: tuple[tuple, ...], has_labels: bool, logits: bool = False,
                  real_names: tuple[tuple, ...] = ()):
        """The phase as a pure tensor function ``f(x_t, sigma, [labels], *cond)`` (compiled if asked; ``names``:
        the conditioning's paths, ``sidfast.conditions.flat_condition``):
        "fake": the fake score's x0 estimate, with parameter gradients;
        "generator": (y_real, y_fake) over the frozen views, with input gradients only;
        ``logits``: with the discriminator logits as well (``discriminator.with_logits``)."""
        key = (phase, names, has_labels, logits, real_names)
        fn = self._functions.get(key)
        if fn is not None:
            return fn
        fake = self.fake
        views = [mirror.view for mirror in self._mirrors]

        def run(x_t, sigma, *rest):
            labels = rest[0] if has_labels else None
            flat = rest[1:] if has_labels else rest
            cond = nested_condition(names, flat)

            def shared(view):  # one forward of the shared network over [teacher half; fake half]
                y = view(_double(x_t), _double(sigma), _double(labels),
                         **nested_condition(names, [_double(v) for v in flat]))
                return y[: x_t.shape[0]], y[x_t.shape[0]:]

            with self._autocast(x_t.device):
                return dispatch(phase, self.mode, fake, views,
                                lambda net, i: net(x_t, sigma, labels, **cond), shared)

        fn = run
        if logits:
            tap = self._tap if phase == "fake" else self._view_tap
            fn = with_logits(run, tap, phase == "fake", has_labels, len(names), real_names, self._autocast)
        fn = torch.compile(fn, dynamic=False) if self.compile else fn
        self._functions[key] = fn
        return fn

    def _evaluate(self, phase: str, x_t, sig, labels, cond, logits: bool = False, real=None):
        names, tensors = _flat_arguments(cond)
        has_labels = labels is not None
        state = self._phase_state(phase)
        args = (x_t, sig) + ((labels,) if has_labels else ()) + tensors
        variant = (names, has_labels, state, self.amp_dtype)
        real_names = ()
        if real is not None:  # SiDA's fake phase: the noised real images and their conditioning follow
            x_real_t, real_cond = real
            real_names, real_tensors = _flat_arguments(real_cond)
            args += (x_real_t,) + real_tensors
        if logits:
            variant += ("logits", real_names)
        fn = self._function(phase, names, has_labels, logits, real_names)
        return self._graphs.call(phase, variant, fn, args)

    def _evaluate_guided(self, phase: str, x_t, sig, labels, cond, scales: tuple, null_labels, null_cond):
        """``_evaluate`` for guided scales (``sidfast.engine.guided``): the null condition travels as further
        tensor arguments."""
        names, tensors = _flat_arguments(cond)
        has_labels = labels is not None
        nulls = null_arguments(x_t, names, has_labels, scales, null_labels, null_cond)
        state = self._phase_state(phase)
        args = (x_t, sig) + ((labels,) if has_labels else ()) + tensors + nulls
        key = ("guided", phase, names, has_labels, scales)
        if key not in self._functions:
            fn = guided_function(self.fake, [mirror.view for mirror in self._mirrors], self.mode,
                                 self._autocast, phase, names, has_labels, scales)
            self._functions[key] = torch.compile(fn, dynamic=False) if self.compile else fn
        return self._graphs.call(phase, ("guided", scales, names, has_labels, state, self.amp_dtype),
                                 self._functions[key], args)

    def _phase_state(self, phase: str) -> tuple:
        """The train/eval state a phase's graph is captured for, after checking that the networks' storage is
        still the one its views and graphs were built over."""
        if phase == "generator":
            for mirror in self._mirrors:
                mirror.check()
            return tuple(hash(mirror.sync_training()) for mirror in self._mirrors)
        self._graphs.check_fake_storage()
        return (self.fake.training,)


def _null_condition(null_labels, null_cond):
    """The null condition in ``guidance.guided``'s form (None when there is none)."""
    return conditions.joined(null_labels, null_cond) if null_labels is not None or null_cond else None


class EagerScores:
    """The score interface over plain module calls, one network at a time, with ``ScoreEngine``'s methods.

    Args:
        teacher, fake: the two denoisers.
        fake_train: the module the fake-score phase calls, default ``fake``: a DDP wrapper, whose hooks
            average the fake score's gradients, or a compiled copy.
        precision: autocast, as ``runtime.autocast`` takes it.
    """

    def __init__(self, teacher, fake, fake_train=None, precision="fp32"):
        self.teacher = teacher
        self.fake = fake
        self.fake_train = fake if fake_train is None else fake_train
        self.precision = precision
        self.tap: DiscriminatorTap | None = None

    def _autocast(self, device: torch.device):
        return runtime.autocast(device, self.precision)

    def fake_score_forward(self, x_t, sigma, labels=None, scale: float = 1.0, null_labels=None,
                           null_cond: dict | None = None, **cond) -> torch.Tensor:
        null = _null_condition(null_labels, null_cond)
        with self._autocast(x_t.device):
            return guidance.guided(self.fake_train, x_t, sigma, conditions.joined(labels, cond), null, scale)

    def generator_terms(self, x_g, sigma, labels=None, noise=None, scale_real: float = 1.0,
                        scale_fake: float = 1.0, null_labels=None, null_cond: dict | None = None, **cond):
        x_t, _ = edm_noised(x_g, sigma, noise)
        condition = conditions.joined(labels, cond)
        null = _null_condition(null_labels, null_cond)
        with self._autocast(x_t.device):
            y_real = guidance.guided(self.teacher, x_t, sigma, condition, null, scale_real)
            y_fake = guidance.guided(self.fake, x_t, sigma, condition, null, scale_fake)
        return y_real, y_fake

    def attach_discriminator(self, layer: str | None = None) -> DiscriminatorTap:
        """Read SiDA's logits off the fake score at ``layer``; the fake-score phase then calls
        ``DiscriminatorPass(tap)`` (wrap ``fake_train`` around that)."""
        self.tap = DiscriminatorTap(self.fake, layer)
        self.fake_train = DiscriminatorPass(self.tap)
        return self.tap

    def fake_score_with_logits(self, x_t, x_real_t, sigma, labels=None, real_cond: dict | None = None,
                               **cond):
        with self._autocast(x_t.device):
            return self.fake_train(x_t, sigma, labels, x_real_t, real_cond=real_cond, **cond)

    def generator_terms_with_logits(self, x_g, sigma, labels=None, noise=None, **cond):
        x_t, _ = edm_noised(x_g, sigma, noise)
        with self._autocast(x_t.device):
            y_real = self.teacher(x_t, sigma, labels, **cond)
            y_fake, logits = self.tap.forward_with_logits(x_t, sigma, labels, **cond)
        return y_real, y_fake, logits


class PhaseScores:
    """The fake-score phase from one implementation and the generator phase from another: under DDP the fake
    score's update runs through the DDP wrapper (``EagerScores``) while the engine still evaluates the
    generator phase, whose frozen networks get no gradients to average."""

    def __init__(self, fake_phase, generator_phase):
        self.fake_score_forward = fake_phase.fake_score_forward
        self.fake_score_with_logits = fake_phase.fake_score_with_logits
        self.generator_terms = generator_phase.generator_terms
        self.generator_terms_with_logits = generator_phase.generator_terms_with_logits


__all__ = ["ScoreEngine", "EagerScores", "PhaseScores", "MODES", "edm_noised"]
