"""The published large models ``sidfast plan`` knows by name, built on the meta device from their
config.json values (no weights) and called with conditioning of the published shapes."""
from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn


@dataclass(frozen=True)
class KnownModel:
    builder: str             # diffusers class
    config: dict
    published_params: float  # the published parameter count of the denoiser
    latent_channels: int
    text_tokens: int         # length of encoder_hidden_states
    text_dim: int
    pooled_dim: int = 0      # pooled text embedding (SDXL: text_embeds; SD3, FLUX: pooled_projections)


_SDXL_BLOCKS = dict(block_out_channels=(320, 640, 1280), transformer_layers_per_block=(1, 2, 10),
                    down_block_types=("DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
                    up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"))
KNOWN_MODELS = {
    "sd1.5": KnownModel("UNet2DConditionModel",
                        dict(sample_size=64, cross_attention_dim=768, attention_head_dim=8),
                        0.86e9, 4, 77, 768),
    "sdxl": KnownModel("UNet2DConditionModel",
                       dict(sample_size=128, **_SDXL_BLOCKS, attention_head_dim=(5, 10, 20),
                            cross_attention_dim=2048, use_linear_projection=True,
                            addition_embed_type="text_time", addition_time_embed_dim=256,
                            projection_class_embeddings_input_dim=2816),
                       2.6e9, 4, 77, 2048, 1280),
    "sd3.5-large": KnownModel("SD3Transformer2DModel",
                              dict(sample_size=128, patch_size=2, in_channels=16, out_channels=16,
                                   num_layers=38, attention_head_dim=64, num_attention_heads=38,
                                   joint_attention_dim=4096,
                                   caption_projection_dim=2432, pooled_projection_dim=2048,
                                   pos_embed_max_size=192, qk_norm="rms_norm"),
                              8.1e9, 16, 77 + 256, 4096, 2048),
    "flux.1-dev": KnownModel("FluxTransformer2DModel",
                             dict(patch_size=1, in_channels=64, num_layers=19, num_single_layers=38,
                                  attention_head_dim=128, num_attention_heads=24, joint_attention_dim=4096,
                                  pooled_projection_dim=768, guidance_embeds=True,
                                  axes_dims_rope=(16, 56, 56)),
                             11.9e9, 16, 512, 4096, 768),
}


class KnownDenoiser(nn.Module):
    """A published diffusers model called as ``net(x, sigma)`` with conditioning of the published shapes
    (zeros: only shapes matter for memory). FLUX's ``x`` is its packed latent: (B, tokens, 64)."""

    def __init__(self, name: str, device="meta"):
        super().__init__()
        import diffusers  # only the published models need diffusers


        self.spec = KNOWN_MODELS[name]
        with torch.device(device):
            self.net = getattr(diffusers, self.spec.builder)(**self.spec.config)

    def sample_shape(self, resolution: int) -> tuple:
        """One latent sample at ``resolution`` pixels (VAE factor 8; FLUX packs 2x2 latent patches)."""
        if resolution % 16:
            raise ValueError(f"argument resolution must be a multiple of 16, got {resolution}")
        side = resolution // 8
        if self.spec.builder == "FluxTransformer2DModel":
            return ((side // 2) ** 2, 4 * self.spec.latent_channels)
        return (self.spec.latent_channels, side, side)

    def forward(self, x, sigma, class_labels=None):
        b = x.shape[0]
        spec = self.spec
        text = x.new_zeros(b, spec.text_tokens, spec.text_dim)
        t = sigma.to(x.dtype)
        if spec.builder == "UNet2DConditionModel":
            extra = {}
            if spec.pooled_dim:
                extra["added_cond_kwargs"] = {"text_embeds": x.new_zeros(b, spec.pooled_dim),
                                              "time_ids": x.new_zeros(b, 6)}
            return self.net(x, t, encoder_hidden_states=text, return_dict=False, **extra)[0]
        pooled = x.new_zeros(b, spec.pooled_dim)
        if spec.builder == "SD3Transformer2DModel":
            return self.net(hidden_states=x, encoder_hidden_states=text, pooled_projections=pooled,
                            timestep=t, return_dict=False)[0]
        ids = dict(img_ids=x.new_zeros(x.shape[1], 3, dtype=torch.float32),
                   txt_ids=x.new_zeros(spec.text_tokens, 3, dtype=torch.float32))
        return self.net(hidden_states=x, encoder_hidden_states=text, pooled_projections=pooled, timestep=t,
                        guidance=t, return_dict=False, **ids)[0]


__all__ = ["KnownModel", "KNOWN_MODELS", "KnownDenoiser"]
