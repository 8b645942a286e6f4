"""SiDA's discriminator: logits read off the fake score network's own encoder (no new parameters).

``DiscriminatorTap`` hooks the end of the encoder (``default_layer``, or ``--disc-layer``); the logits are
the mean over dimension 1 of its activation. Default layers per family, LoRA split mode, compile and CUDA
graphs: docs/engine.md, "Discriminator tap".
"""
from __future__ import annotations

import difflib
import re

import torch
from torch import nn

from sidfast.models.introspect import _modules_of
from sidfast.conditions import nested_condition
from sidfast.models.lora import lora_layers

_ENC_ENTRY = re.compile(r"^(\d+)x(\d+)_")


class _EncoderDone(Exception):
    """Raised by the tap's hook to end an encoder-only forward; never leaves ``encoder_logits``."""


class Capture:
    """What one ``DiscriminatorTap.capture()`` recorded: ``logits`` (None until the tap has run)."""

    def __init__(self):
        self.logits: torch.Tensor | None = None


def _submodule(root: nn.Module, path: str) -> nn.Module | None:
    try:
        return root.get_submodule(path)
    except AttributeError:
        return None


def _network_chain(root: nn.Module) -> list[nn.Module]:
    """``root`` and the modules it wraps (``sidfast.models.introspect._modules_of``), outermost first."""
    return [m for m in _modules_of(root) if isinstance(m, nn.Module)]


def _family_tap(net: nn.Module) -> tuple[str, str] | None:
    """(path relative to ``net``, "output" or "input") of ``net``'s family default, or None."""
    enc = getattr(net, "enc", None)
    if isinstance(enc, nn.ModuleDict):
        levels = [(int(m.group(1)) * int(m.group(2)), name) for name in enc.keys()
                  if (m := _ENC_ENTRY.match(name))]
        if levels:
            lowest = min(size for size, _ in levels)
            return f"enc.{[name for size, name in levels if size == lowest][-1]}", "output"
    if isinstance(getattr(net, "down_blocks", None), nn.ModuleList) and hasattr(net, "mid_block"):
        return f"down_blocks.{len(net.down_blocks) - 1}", "output"
    if isinstance(getattr(net, "transformer_blocks", None), nn.ModuleList):
        for proj in ("proj_out_2", "proj_out"):
            if isinstance(getattr(net, proj, None), nn.Module):
                return proj, "input"
    if type(net).__name__ == "DigitsMLP" and type(net).__module__ == "sidfast.demo.nets":
        return f"blocks.{len(net.blocks) - 1}", "output"
    return None


def _qualified_name(root: nn.Module, module: nn.Module) -> str:
    return next(name for name, m in root.named_modules() if m is module)


def default_layer(root: nn.Module) -> str:
    """The family default tap of ``root`` as ``"dotted.path"`` or ``"dotted.path:input"`` relative to
    ``root``; a ValueError when no network ``root`` wraps is of a known family."""
    for net in _network_chain(root):
        found = _family_tap(net)
        if found is not None:
            path, where = found
            name = _qualified_name(root, net.get_submodule(path))
            return name if where == "output" else f"{name}:input"
    raise ValueError(f"no default discriminator layer for {type(root).__name__}: name the encoder's last "
                     f"module with --disc-layer (one of {_top_level_names(root)})")


def _top_level_names(root: nn.Module) -> str:
    """The innermost wrapped network's direct children and their children, relative to ``root``."""
    net = _network_chain(root)[-1]
    prefix = _qualified_name(root, net)
    names = []
    for child, module in net.named_children():
        names.append(child)
        names.extend(f"{child}.{grand}" for grand, _ in module.named_children())
    names = [f"{prefix}.{n}" if prefix else n for n in names]
    shown = ", ".join(names[:40])
    return shown + (f", ... ({len(names) - 40} more)" if len(names) > 40 else "")


def _resolve(root: nn.Module, layer: str) -> tuple[str, str]:
    """(qualified name relative to ``root``, "output" or "input") of a user-named ``layer``."""
    path, sep, where = layer.partition(":")
    if sep and where not in ("input", "output"):
        raise ValueError(f"--disc-layer {layer!r}: the part after ':' must be 'input' or 'output'")
    where = where or "output"
    for net in _network_chain(root):
        module = _submodule(net, path) if path else None
        if module is not None:
            return _qualified_name(root, module), where
    names = [name for net in _network_chain(root) for name, _ in net.named_modules() if name]
    close = difflib.get_close_matches(path, names, n=5, cutoff=0.6)
    hint = f"close matches: {', '.join(close)}" if close else f"candidates: {_top_level_names(root)}"
    raise ValueError(f"--disc-layer {layer!r}: no module {path!r} in {type(root).__name__} or the networks "
                     f"it wraps; {hint}")


def _tensor_of(value, layer: str) -> torch.Tensor:
    """The activation in a hooked module's output or input: a tensor, a tuple's first element (diffusers'
    down blocks return ``(hidden_states, skips)``) or ``.sample``."""
    if isinstance(value, (tuple, list)) and value:
        value = value[0]
    value = getattr(value, "sample", value)
    if not isinstance(value, torch.Tensor) or value.dim() < 2:
        raise TypeError(f"discriminator layer {layer} gives {type(value).__name__}"
                        f"{tuple(value.shape) if isinstance(value, torch.Tensor) else ''}, expected a tensor "
                        "(B, C, ...)")
    return value


def logits_of(activation: torch.Tensor) -> torch.Tensor:
    """SiDA's logits: the mean over dimension 1, kept (channels of an image map, tokens of a sequence), at
    least float32 whatever the autocast dtype of ``activation``."""
    dtype = torch.promote_types(activation.dtype, torch.float32)
    return activation.mean(dim=1, keepdim=True, dtype=dtype)


def _split_mode(root: nn.Module) -> bool:
    return any(m.mode == "split" for m in lora_layers(root))


class DiscriminatorTap:
    """The discriminator logits of ``denoiser`` (SiDA), read at one layer by a forward hook.

    Args:
        denoiser: the fake score network (a ``Denoiser``, a ``LoRAFakeScore``, a frozen view of either, or
            any ``nn.Module``); it is called as ``denoiser(x, sigma, labels, **cond)``.
        layer: dotted path of the tapped module, relative to ``denoiser`` or a network it wraps, optionally
            ending in ``:input``; None: the family default (``default_layer``).
        split: keep only the second half of the batch's logits (a LoRA tree in split mode runs
            ``[teacher half; fake half]``); None: True exactly when ``denoiser`` holds LoRA layers in mode
            "split".
        reduce: what is kept of the tapped activation (B, C, ...): SiDA's ``logits_of``; the teacher-feature
            distance (``sidfast.evaluate.teacher_fd``) keeps per-channel means instead.
    Attributes:
        layer: the tap as ``"qualified.name"`` (or ``"...:input"``) relative to ``denoiser``.
        module: the hooked module.
    """

    def __init__(self, denoiser: nn.Module, layer: str | None = None, *, split: bool | None = None,
                 reduce=logits_of):
        if not isinstance(denoiser, nn.Module):
            raise TypeError(f"denoiser must be an nn.Module, got {type(denoiser).__name__}")
        if layer is not None and not isinstance(layer, str):
            raise TypeError(f"--disc-layer must be a dotted module path, got {type(layer).__name__}")
        self.denoiser = denoiser
        self.spec = layer
        name, where = _resolve(denoiser, layer) if layer else _resolve(denoiser, default_layer(denoiser))
        self.layer = name if where == "output" else f"{name}:input"
        self.module = denoiser.get_submodule(name)
        self.split = _split_mode(denoiser) if split is None else bool(split)
        self.reduce = reduce
        self._record: Capture | None = None  # the capture in progress, None when the hook is idle
        self._stop = False  # end the forward at the tap (encoder-only pass)
        self._fired = 0
        # a plain closure, not a bound method: deepcopy (frozen views) copies it by reference, and the
        # `module is` check keeps its copies on other trees inert
        tap_module = self.module

        def on_output(module, args, output):
            if module is tap_module and self._record is not None:
                self._seen(output)

        def on_input(module, args):
            if module is tap_module and self._record is not None:
                self._seen(args)

        if where == "output":
            self._handle = self.module.register_forward_hook(on_output)
        else:
            self._handle = self.module.register_forward_pre_hook(on_input)

    def on(self, denoiser: nn.Module, *, split: bool | None = None) -> "DiscriminatorTap":
        """The same tap (the same ``layer`` argument) on another tree: a frozen view or the LoRA split view
        of this tap's network."""
        return DiscriminatorTap(denoiser, self.spec, split=split, reduce=self.reduce)

    def remove(self) -> None:
        """Unregister the hook."""
        self._handle.remove()

    def _seen(self, value) -> None:
        self._fired += 1
        if self._fired > 1:
            raise RuntimeError(f"discriminator layer {self.layer} ran twice in one forward; name a module "
                               "that runs once (--disc-layer)")
        logits = self.reduce(_tensor_of(value, self.layer))
        if self.split:
            half = logits.shape[0] // 2
            if logits.shape[0] != 2 * half:
                raise ValueError("split mode needs a doubled batch [teacher; fake], got batch "
                                 f"{logits.shape[0]}")
            logits = logits[half:]
        self._record.logits = logits
        if self._stop:
            raise _EncoderDone

    def _arm(self, stop: bool) -> Capture:
        if self._record is not None:
            raise RuntimeError("DiscriminatorTap: a capture is already in progress")
        self._record = Capture()
        self._stop = stop
        self._fired = 0
        return self._record

    def _disarm(self) -> None:
        self._record = None
        self._stop = False

    def _missing(self) -> RuntimeError:
        return RuntimeError(f"discriminator layer {self.layer} did not run in the forward of "
                            f"{type(self.denoiser).__name__}")

    def capture(self):
        """Context manager recording the logits of the forwards inside: ``with tap.capture() as out: ...``;
        ``out.logits`` after the block (a RuntimeError at exit if the tap did not run)."""
        return _CaptureContext(self)

    def forward_with_logits(self, x: torch.Tensor, sigma, labels=None, **cond):
        """``(denoiser(x, sigma, labels, **cond), logits)`` from one forward."""
        record = self._arm(stop=False)
        try:
            y = self.denoiser(x, sigma, labels, **cond)
        finally:
            self._disarm()
        if record.logits is None:
            raise self._missing()
        return y, record.logits

    def encoder_logits(self, x: torch.Tensor, sigma, labels=None, **cond) -> torch.Tensor:
        """The logits from a forward that stops at the tap: nothing after it (middle blocks, decoder, output
        layers, the denoiser's output check) runs."""
        record = self._arm(stop=True)
        try:
            self.denoiser(x, sigma, labels, **cond)
        except _EncoderDone:
            pass
        else:
            # the hook never raised: the tap did not run, or something in the network swallowed the exception
            raise self._missing() if record.logits is None else RuntimeError(
                f"the forward of {type(self.denoiser).__name__} went on past the discriminator layer "
                f"{self.layer}: an exception handler in the network caught the early exit")
        finally:
            self._disarm()
        return record.logits


class DiscriminatorPass(nn.Module):
    """The fake network's discriminator-step forward as one module call: ``(f_psi(x_t), D_fake, D_real)``.

    ``forward(x_t, sigma, labels, x_real_t, real_labels=None, real_cond=None, **cond)``: one full forward at
    the noised generated images ``x_t``, giving the fake-score loss's ``f_psi`` and ``D_fake``, and one
    encoder-only forward at the real images noised with the same ``sigma``, giving ``D_real``.
    ``real_labels`` and ``real_cond`` are the real images' own labels and conditioning, such as their
    augment_labels; they default to ``labels`` and ``cond``.
    One call per backward, so the module can be wrapped in DistributedDataParallel (which expects one
    forward per backward) or captured as one CUDA graph; its parameters are the fake network's.
    """

    def __init__(self, tap: DiscriminatorTap):
        super().__init__()
        if tap.split:
            raise ValueError("DiscriminatorPass needs the fake network's own tap, not a split-mode view's")
        self.tap = tap
        self.net = tap.denoiser

    def forward(self, x_t: torch.Tensor, sigma, labels, x_real_t: torch.Tensor, real_labels=None,
                real_cond: dict | None = None, **cond):
        y_fake, d_fake = self.tap.forward_with_logits(x_t, sigma, labels, **cond)
        real_labels = labels if real_labels is None else real_labels
        real_cond = cond if real_cond is None else real_cond
        d_real = self.tap.encoder_logits(x_real_t, sigma, real_labels, **real_cond)
        return y_fake, d_fake, d_real


def with_logits(run, tap: DiscriminatorTap, fake_phase: bool, has_labels: bool, n_cond: int,
                real_names: tuple[tuple, ...], autocast):
    """A score-engine phase function ``run(x_t, sigma, [labels], *cond)`` that returns ``tap``'s logits as
    well, read off the same forward: the generator phase's (y_real, y_fake, D) (``tap`` on the fake score's
    frozen view); the fake phase's (f_psi, D_fake, D_real), whose arguments after ``run``'s are x_real_t and
    the real images' conditioning tensors (at the paths ``real_names``, ``sidfast.conditions.flat_condition``),
    D_real from an encoder-only forward under ``autocast(device)``."""
    n_args = 2 + has_labels + n_cond  # x_t, sigma, [labels], *cond

    def run_with_logits(*args):
        with tap.capture() as out:
            y = run(*args[:n_args])
        if not fake_phase:
            return (*y, out.logits)
        x_real_t = args[n_args]
        labels = args[2] if has_labels else None
        real_cond = nested_condition(real_names, args[n_args + 1:])
        with autocast(x_real_t.device):
            d_real = tap.encoder_logits(x_real_t, args[1], labels, **real_cond)
        return y, out.logits, d_real

    return run_with_logits


class _CaptureContext:
    def __init__(self, tap: DiscriminatorTap):
        self.tap = tap

    def __enter__(self) -> Capture:
        self.record = self.tap._arm(stop=False)
        return self.record

    def __exit__(self, exc_type, exc, tb):
        self.tap._disarm()
        if exc_type is None and self.record.logits is None:
            raise self.tap._missing()
        return False


__all__ = ["DiscriminatorTap", "DiscriminatorPass", "Capture", "default_layer", "logits_of", "with_logits"]
