"""The tiny test networks shared by several test modules, in one place; a test keeps a local network only where
its shape is the point of the test (an EDM U-Net's block layout, LoRA's layer classes, a recording stand-in).

EDM calling convention ``net(x, sigma, class_labels) -> x0``; ``SmallUNet`` and ``tiny_diffusers_unet`` are in
utils.py. Entry points for ``--teacher`` / ``teacher=``: ``nets:tiny_teacher``, ``nets:build_tiny``,
``nets:conditional_teacher``. The text components need transformers and diffusers; their callers skip without them.
"""
import copy
import math

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from sidfast.models.text import TextConditioner

try:
    import diffusers
    import transformers
except ImportError:  # the text components below need both; test_text and their callers skip without them
    diffusers = transformers = None

# ---------- TinyEDM: an EDM-preconditioned MLP on 1x4x4 images ----------

SHAPE = (1, 4, 4)


class TinyEDM(nn.Module):
    """An EDM-preconditioned two-layer MLP with dropout and optional one-hot labels (test network)."""

    def __init__(self, image_shape=SHAPE, hidden=32, num_classes=0, dropout=0.1, gain=False):
        super().__init__()
        self.image_shape, self.num_classes = tuple(image_shape), num_classes
        d = math.prod(image_shape)
        self.inp = nn.Linear(d + 1 + num_classes, hidden)
        self.out = nn.Linear(hidden, d)
        self.drop = nn.Dropout(dropout)
        # ``gain``: a parameter outside the two layers, held by the network's root module once FSDP shards it
        # per block (as a real network's embeddings and output layers are)
        self.gain = nn.Parameter(torch.ones(d)) if gain else None

    def forward(self, x, sigma, class_labels=None):
        s = sigma.reshape(-1, 1).float()
        c_in, c_skip = 1 / (s ** 2 + 0.25).sqrt(), 0.25 / (s ** 2 + 0.25)
        c_out = 0.5 * s / (s ** 2 + 0.25).sqrt()
        parts = [x.flatten(1).float() * c_in, s.log() / 4]
        if self.num_classes:
            parts.append(class_labels.float() if class_labels is not None
                         else torch.zeros(x.shape[0], self.num_classes, device=x.device))
        f = self.out(self.drop(F.silu(self.inp(torch.cat(parts, 1)))))
        if self.gain is not None:
            f = f * self.gain
        return (c_skip * x.flatten(1).float() + c_out * f).view(x.shape).to(x.dtype)


def tiny_teacher(num_classes=0, seed=0, hidden=32):
    torch.manual_seed(seed)
    return TinyEDM(num_classes=num_classes, hidden=hidden)


def rooted_teacher(num_classes=0, seed=0, hidden=32):
    """``tiny_teacher`` with a parameter of its root module under FSDP (``TinyEDM(gain=True)``)."""
    torch.manual_seed(seed)
    return TinyEDM(num_classes=num_classes, hidden=hidden, gain=True)


def build_tiny(config):
    return TinyEDM(**config)


# ---------- a class-conditional MLP without dropout (float64-exact guidance checks) ----------

CLASSES = 3


class CondMLP(nn.Module):
    """A class-conditional EDM-preconditioned MLP that computes in its input's dtype (no dropout), so that
    float64 comparisons are exact up to float64 rounding."""

    image_shape = (1, 4, 4)
    num_classes = CLASSES

    def __init__(self, hidden=16, seed=0):
        super().__init__()
        torch.manual_seed(seed)
        d = math.prod(self.image_shape)
        self.inp = nn.Linear(d + 1 + CLASSES, hidden)
        self.out = nn.Linear(hidden, d)

    def forward(self, x, sigma, class_labels=None):
        s = sigma.reshape(-1, 1).to(x.dtype)
        c_in = 1 / (s ** 2 + 0.25).sqrt()
        c_skip = 0.25 / (s ** 2 + 0.25)
        c_out = 0.5 * s / (s ** 2 + 0.25).sqrt()
        labels = class_labels.to(x.dtype) if class_labels is not None else x.new_zeros(x.shape[0], CLASSES)
        h = self.out(F.silu(self.inp(torch.cat([x.flatten(1) * c_in, s.log() / 4, labels], 1))))
        return (c_skip * x.flatten(1) + c_out * h).view(x.shape)


def conditional_nets(seed=0):
    """Teacher, generator and fake score: separate modules starting from the same weights."""
    teacher = CondMLP(seed=seed)
    return teacher, copy.deepcopy(teacher), copy.deepcopy(teacher)


def conditional_teacher():
    """Entry point of a class-conditional test teacher (``nets:conditional_teacher``)."""
    return CondMLP()


# ---------- text encoders, tokenizers and text-conditioned UNets / transformers ----------

def require_text_components():
    """Skip the calling test unless diffusers and transformers are installed (the components below need both)."""
    pytest.importorskip("diffusers")
    pytest.importorskip("transformers")


def clip_tokenizer(length=8):
    """A character-level CLIP BPE tokenizer (no merges) with CLIP's start/end tokens."""
    vocab = {}
    for suffix in ("", "</w>"):
        for ch in "abcdefghijklmnopqrstuvwxyz":
            vocab[ch + suffix] = len(vocab)
    vocab["<|startoftext|>"] = len(vocab)
    vocab["<|endoftext|>"] = len(vocab)
    return transformers.CLIPTokenizer(vocab=vocab, merges=[], model_max_length=length)


def t5_tokenizer():
    pieces = [("<pad>", 0.0), ("</s>", 0.0), ("<unk>", 0.0)]
    pieces += [("\u2581" + c, -1.0) for c in "abcdefghijklmnopqrstuvwxyz"] + [(c, -2.0) for c in "abcdefghijklmnopqrstuvwxyz"]
    return transformers.T5Tokenizer(vocab=pieces, extra_ids=0)


def clip_encoder(width, projection=False, seed=0):
    torch.manual_seed(seed)
    config = transformers.CLIPTextConfig(vocab_size=54, hidden_size=width, intermediate_size=2 * width,
                                         num_hidden_layers=2, num_attention_heads=2, max_position_embeddings=8,
                                         projection_dim=width, bos_token_id=52, eos_token_id=53, pad_token_id=53)
    cls = transformers.CLIPTextModelWithProjection if projection else transformers.CLIPTextModel
    return cls(config).double().eval()


def t5_encoder(width, seed=1):
    torch.manual_seed(seed)
    config = transformers.T5Config(vocab_size=55, d_model=width, d_kv=4, d_ff=2 * width, num_layers=1,
                                   num_heads=2)
    return transformers.T5EncoderModel(config).double().eval()


def conditioner(kind, **kw):
    if kind == "sd":
        return TextConditioner("sd", [clip_tokenizer()], [clip_encoder(8)], **kw)
    if kind == "sdxl":
        return TextConditioner("sdxl", [clip_tokenizer(), clip_tokenizer()],
                               [clip_encoder(8), clip_encoder(8, projection=True, seed=2)],
                               image_size=(64, 48), **kw)
    if kind == "sd3":
        return TextConditioner("sd3", [clip_tokenizer()] * 2 + [t5_tokenizer()],
                               [clip_encoder(8, True), clip_encoder(8, True, seed=2), t5_encoder(16)], t5_length=6,
                               **kw)
    return TextConditioner("flux", [clip_tokenizer(), t5_tokenizer()], [clip_encoder(8), t5_encoder(16)],
                           t5_length=6, **kw)


def cond_unet(sdxl=False, seed=0):
    torch.manual_seed(seed)
    extra = dict(addition_embed_type="text_time", addition_time_embed_dim=4,
                 projection_class_embeddings_input_dim=8 + 6 * 4) if sdxl else {}
    return diffusers.UNet2DConditionModel(sample_size=8, in_channels=4, out_channels=4, block_out_channels=(8, 16),
                                          layers_per_block=1, norm_num_groups=4,
                                          cross_attention_dim=16 if sdxl else 8, attention_head_dim=4,
                                          down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
                                          up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"), **extra).double()


def sd3_transformer(seed=0):
    torch.manual_seed(seed)
    return diffusers.SD3Transformer2DModel(sample_size=8, patch_size=2, in_channels=4, num_layers=1,
                                           attention_head_dim=8, num_attention_heads=2, joint_attention_dim=16,
                                           caption_projection_dim=16, pooled_projection_dim=16, out_channels=4,
                                           pos_embed_max_size=8).double()


def flux_transformer(guidance_embeds=True, seed=0):
    torch.manual_seed(seed)
    return diffusers.FluxTransformer2DModel(patch_size=1, in_channels=16, num_layers=1, num_single_layers=1,
                                            attention_head_dim=8, num_attention_heads=2, joint_attention_dim=16,
                                            pooled_projection_dim=8, guidance_embeds=guidance_embeds,
                                            axes_dims_rope=(2, 2, 4)).double()


def tiny_vae(**kw):
    """A one-level ``AutoencoderKL`` on 4 latent channels (no downsampling), seeded; ``kw`` extends its config
    (SD3's pipeline needs ``shift_factor``)."""
    torch.manual_seed(0)
    return diffusers.AutoencoderKL(block_out_channels=(4,), norm_num_groups=2, latent_channels=4, sample_size=8, **kw)
