"""Flow-matching models (SD3, FLUX and any ``eps - x0`` predictor) as EDM denoisers, with FLUX's 2x2 latent
packing."""
from __future__ import annotations

import json
import numbers
from pathlib import Path

import torch
from torch import nn

from sidfast import predictions
from sidfast.models.interface import Denoiser, _name_of, _unwrap, check_output, sigma_per_sample
from sidfast.models.introspect import is_diffusers_model
from sidfast.schedules import broadcast


# How diffusers' flow-matching transformers are called: the time keyword, the scale of the time they take (SD3's
# pipeline passes sigma * 1000; FLUX's passes sigma and the model multiplies by 1000 inside), and whether the
# latents are packed into 2x2 patches outside the model (FLUX's pipeline does that in ``_pack_latents``).
FLOW_MODELS = {
    "SD3Transformer2DModel": {"time_arg": "timestep", "time_scale": 1000.0, "pack": False},
    "FluxTransformer2DModel": {"time_arg": "timestep", "time_scale": 1.0, "pack": True},
}


def pack_latents(x: torch.Tensor) -> torch.Tensor:
    """(B, C, H, W) -> (B, H/2 * W/2, 4C): FLUX's 2x2 patch tokens, in ``FluxPipeline._pack_latents``'s order."""
    b, c, h, w = x.shape
    if h % 2 or w % 2:
        raise ValueError(f"FLUX latents need an even height and width to pack into 2x2 patches, got {h}x{w}")
    x = x.reshape(b, c, h // 2, 2, w // 2, 2).permute(0, 2, 4, 1, 3, 5)
    return x.reshape(b, (h // 2) * (w // 2), c * 4)


def unpack_latents(tokens: torch.Tensor, height: int, width: int) -> torch.Tensor:
    """The inverse of ``pack_latents``: (B, H/2 * W/2, 4C) -> (B, C, H, W)."""
    b, n, d = tokens.shape
    if n != (height // 2) * (width // 2) or d % 4:
        raise ValueError(f"cannot unpack {n} tokens of width {d} into a {height}x{width} latent")
    x = tokens.reshape(b, height // 2, width // 2, d // 4, 2, 2).permute(0, 3, 1, 4, 2, 5)
    return x.reshape(b, d // 4, height, width)


def latent_image_ids(height: int, width: int, device, dtype) -> torch.Tensor:
    """FLUX's (H/2 * W/2, 3) rotary position ids of the packed tokens: (0, row, column) per token."""
    rows = torch.arange(height // 2, device=device, dtype=dtype)
    cols = torch.arange(width // 2, device=device, dtype=dtype)
    ids = torch.stack([torch.zeros(height // 2, width // 2, device=device, dtype=dtype),
                       rows[:, None].expand(-1, width // 2), cols[None, :].expand(height // 2, -1)], dim=-1)
    return ids.reshape(-1, 3)


class FlowDenoiser(Denoiser):
    """A flow-matching network (predicts ``eps - x0`` at ``x_flow = (1 - t) x0 + t eps``) as an EDM denoiser.

    VE -> flow: ``t = sigma / (1 + sigma)``, ``x_flow = x / (1 + sigma)`` (at sigma = inf, t = 1 and the
    input is taken as ``x / sigma``, so ``x_flow = x``: a generator's first step from pure noise); the model is called as
    ``model(x_flow, t * time_scale, **cond)`` (``time_arg`` names the time keyword for models whose second
    positional parameter is not the time, e.g. SD3's ``timestep``), ``.sample`` unwrapped if present, and
    ``x0_hat = x_flow - t * pred`` (``docs/math.md``, "Predictions", flow row).

    diffusers' ``SD3Transformer2DModel`` and ``FluxTransformer2DModel`` get their calling convention from
    ``FLOW_MODELS`` (explicit arguments override it). SD3 takes ``encoder_hidden_states`` and
    ``pooled_projections`` in ``cond``. FLUX takes the same; the adapter packs ``x_flow`` into 2x2 patch tokens
    and unpacks the output, so callers see (B, C, H, W) latents, and supplies ``img_ids`` and ``txt_ids``
    (all zeros, one row per text token) unless ``cond`` has them. A guidance-distilled FLUX
    (``guidance_embeds``) also embeds a guidance scale: ``guidance`` here, or a (B,) ``guidance`` in ``cond``.
    """

    def __init__(self, model, time_scale: float | None = None, time_arg: str | None = None,
                 guidance: float | None = None, pack: bool | None = None, name: str | None = None):
        super().__init__(name)
        if not callable(model):
            raise TypeError(f"model must be an nn.Module or a callable, got {type(model).__name__}")
        known = FLOW_MODELS.get(type(model).__name__, {}) if is_diffusers_model(model) else {}
        time_scale = known.get("time_scale", 1000.0) if time_scale is None else time_scale
        if isinstance(time_scale, bool) or not isinstance(time_scale, numbers.Real) or not time_scale > 0:
            raise ValueError(f"time_scale must be a positive number, got {time_scale!r}")
        if isinstance(model, nn.Module):
            self.model = model
        else:
            self._fn = model
        self.time_scale = float(time_scale)
        self.time_arg = known.get("time_arg") if time_arg is None else time_arg
        self.pack = bool(known.get("pack", False) if pack is None else pack)
        self.embeds_guidance = bool(getattr(getattr(model, "config", None), "guidance_embeds", False))
        if guidance is not None:
            if not self.embeds_guidance:
                raise ValueError(f"guidance={guidance!r} for {_name_of(model)}, which embeds no guidance scale "
                                 "(config.guidance_embeds is not set)")
            if isinstance(guidance, bool) or not isinstance(guidance, numbers.Real):
                raise ValueError(f"guidance must be a number, got {guidance!r}")
        self.guidance = None if guidance is None else float(guidance)

    @property
    def network(self):
        return self.model if "model" in self._modules else self._fn

    @classmethod
    def from_pretrained(cls, path, subfolder: str | None = None, torch_dtype: torch.dtype | None = None,
                        guidance: float | None = None, name: str | None = None) -> "FlowDenoiser":
        """Load a diffusers flow-matching model saved with ``save_pretrained``: a model directory, or a pipeline
        directory whose ``transformer/`` (or ``subfolder``) holds it."""
        import diffusers  # diffusers stays optional: only loading a pretrained model needs it

        root = Path(path)
        model_dir = root / subfolder if subfolder else root
        if subfolder is None and not (root / "config.json").is_file():
            model_dir = root / "transformer"
        config = model_dir / "config.json"
        if not config.is_file():
            raise FileNotFoundError(f"no model config: {str(config)!r} does not exist")
        class_name = json.loads(config.read_text()).get("_class_name")
        model_cls = getattr(diffusers, class_name, None) if isinstance(class_name, str) else None
        if model_cls is None or not hasattr(model_cls, "from_pretrained"):
            raise ValueError(f"{str(config)!r} names model class {class_name!r}, which diffusers does not have")
        from sidfast.models.diffusers import load_options

        return cls(model_cls.from_pretrained(str(model_dir), **load_options(torch_dtype)), guidance=guidance, name=name)

    def _packed_inputs(self, x_flow: torch.Tensor, cond: dict) -> tuple[torch.Tensor, dict]:
        """FLUX's token inputs: the packed latents, and the position ids and guidance ``cond`` lacks."""
        channels = getattr(getattr(self.network, "config", None), "in_channels", None)
        if channels is not None and 4 * x_flow.shape[1] != channels:
            raise ValueError(f"{self.label()} takes {channels} channels per packed 2x2 token, i.e. latents of "
                             f"{channels // 4} channels; got {x_flow.shape[1]}")
        cond = dict(cond)
        if "img_ids" not in cond:
            cond["img_ids"] = latent_image_ids(x_flow.shape[2], x_flow.shape[3], x_flow.device, x_flow.dtype)
        if "txt_ids" not in cond:
            context = cond.get("encoder_hidden_states")
            if context is None:
                raise ValueError(f"{self.label()} needs encoder_hidden_states (the prompt embeddings)")
            cond["txt_ids"] = torch.zeros(context.shape[1], 3, device=x_flow.device, dtype=x_flow.dtype)
        if self.embeds_guidance and "guidance" not in cond:
            if self.guidance is None:
                raise ValueError(f"{self.label()} is guidance-distilled (guidance_embeds): give the guidance "
                                 "scale it embeds, FlowDenoiser(..., guidance=3.5) or guidance= in the call")
            cond["guidance"] = torch.full((x_flow.shape[0],), self.guidance, device=x_flow.device,
                                          dtype=torch.float32)
        return pack_latents(x_flow), cond

    def forward(self, x: torch.Tensor, sigma, class_labels=None, **cond) -> torch.Tensor:
        sig = sigma_per_sample(sigma, x)
        # at sigma = inf (t = 1, pure noise) the input is x / sigma = z, and x_flow = t z = z
        pure = torch.isinf(sig)
        t = torch.where(pure, 1.0, sig / (1 + sig))
        x_flow = torch.where(broadcast(pure, x), x, x / broadcast(1 + sig, x).to(x.dtype))
        if class_labels is not None:
            cond = dict(cond, class_labels=class_labels)
        time = t * self.time_scale
        hidden = x_flow
        if self.pack:
            hidden, cond = self._packed_inputs(x_flow, cond)
        if self.time_arg is None:
            out = self.network(hidden, time, **cond)
        else:
            out = self.network(hidden, **{self.time_arg: time}, **cond)
        out = _unwrap(out)
        if self.pack and isinstance(out, torch.Tensor) and out.dim() == 3:
            out = unpack_latents(out, x.shape[2], x.shape[3])
        out = check_output(self.label(), out, x)
        return predictions.to_x0(out, x_flow, 1 - t, t, "flow").to(x.dtype)



__all__ = ["FlowDenoiser", "FLOW_MODELS", "pack_latents", "unpack_latents", "latent_image_ids"]
