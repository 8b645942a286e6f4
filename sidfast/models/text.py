"""Prompts and the text-encoder embeddings that condition text-to-image teachers.

``read_prompts`` / ``draw_prompts`` read and draw prompts; ``TextConditioner`` turns prompts into the
teacher's keywords as diffusers' ``encode_prompt`` does, with an LRU cache per prompt. What each pipeline
kind feeds its denoiser: docs/teachers.md, "Text-to-image teachers".
"""
from __future__ import annotations

import json
from collections import OrderedDict
from pathlib import Path

import torch
from torch import nn

from sidfast._checks import check_int

# pipeline class -> (kind, its text components in order: tokenizer, encoder pairs)
PIPELINES = {
    "StableDiffusionPipeline": ("sd", (("tokenizer", "text_encoder"),)),
    "StableDiffusionXLPipeline": ("sdxl", (("tokenizer", "text_encoder"), ("tokenizer_2", "text_encoder_2"))),
    "StableDiffusion3Pipeline": ("sd3", (("tokenizer", "text_encoder"), ("tokenizer_2", "text_encoder_2"),
                                         ("tokenizer_3", "text_encoder_3"))),
    "FluxPipeline": ("flux", (("tokenizer", "text_encoder"), ("tokenizer_2", "text_encoder_2"))),
}
# T5's token count: diffusers' pipeline defaults (SD3 256, FLUX.1-dev 512)
T5_LENGTH = {"sd3": 256, "flux": 512}


def read_prompts(path) -> list[str]:
    """The prompts of a text file, one per line, surrounding whitespace stripped and blank lines skipped."""
    path = Path(path)
    if not path.is_file():
        what = "is a directory" if path.is_dir() else "does not exist"
        raise FileNotFoundError(f"prompt file {str(path)!r} {what}: give a text file with one prompt per line")
    try:
        lines = path.read_text(encoding="utf-8").splitlines()
    except UnicodeDecodeError as exc:
        raise ValueError(f"prompt file {str(path)!r} is not UTF-8 text ({exc.reason} at byte "
                         f"{exc.start})") from None
    prompts = [line.strip() for line in lines if line.strip()]
    if not prompts:
        raise ValueError(f"prompt file {str(path)!r} holds no prompt (it is empty or only blank lines)")
    return prompts


def draw_prompts(prompts: list[str], n: int, generator: torch.Generator | None = None) -> list[str]:
    """``n`` prompts drawn uniformly with replacement (from ``generator``'s CPU stream)."""
    if not prompts:
        raise ValueError("no prompts to draw from")
    idx = torch.randint(len(prompts), (n,), generator=generator)
    return [prompts[i] for i in idx.tolist()]


def _token_ids(tokenizer, prompts: list[str], length: int, device) -> torch.Tensor:
    ids = tokenizer(prompts, padding="max_length", max_length=length, truncation=True,
                    return_tensors="pt").input_ids
    return ids.to(device)


def _device_of(module: nn.Module) -> torch.device:
    return next(iter(module.parameters()), torch.zeros(())).device


class TextConditioner:
    """Frozen tokenizers and text encoders of one pipeline ``kind`` ("sd", "sdxl", "sd3", "flux").

    Args:
        kind: which pipeline's embedding recipe (module docstring's table).
        tokenizers, encoders: in the pipeline's order (``PIPELINES``); SD3's T5 pair may be None (diffusers
            then feeds zeros of ``t5_length`` x ``joint_attention_dim`` in its place).
        dtype: the teacher's dtype, which the embeddings are cast to (default: the first encoder's).
        cache_size: how many prompts' embeddings to keep (least recently used dropped first); 0 keeps none.
        t5_length: T5's token count (default ``T5_LENGTH``).
        image_size: SDXL's (height, width) in pixels for ``time_ids`` (no crop: original = target size).
        joint_attention_dim: SD3 without T5: the width of the zeros that replace T5's tokens.
        zero_null: the null condition is all zeros, not the empty prompt's embedding (SDXL's
            ``force_zeros_for_empty_prompt``).
    """

    def __init__(self, kind: str, tokenizers, encoders, dtype: torch.dtype | None = None,
                 cache_size: int = 1024, t5_length: int | None = None, image_size: tuple | None = None,
                 joint_attention_dim: int | None = None, zero_null: bool = False):
        kinds = {k for k, _ in PIPELINES.values()}
        if kind not in kinds:
            raise ValueError(f"kind must be one of {sorted(kinds)}, got {kind!r}")
        wanted = len(PIPELINES[next(n for n, (k, _) in PIPELINES.items() if k == kind)][1])
        tokenizers, encoders = list(tokenizers), list(encoders)
        if len(tokenizers) != wanted or len(encoders) != wanted:
            raise ValueError(f"a {kind!r} conditioner takes {wanted} tokenizer(s) and text encoder(s), got "
                             f"{len(tokenizers)} and {len(encoders)}")
        optional = {2} if kind == "sd3" else set()
        for i, (tok, enc) in enumerate(zip(tokenizers, encoders)):
            if (tok is None or enc is None) and i not in optional:
                raise ValueError(f"a {kind!r} conditioner needs text encoder {i + 1} and its tokenizer")
        if kind == "sd3" and encoders[2] is None and joint_attention_dim is None:
            raise ValueError("SD3 without its T5 encoder needs joint_attention_dim (the zeros' width)")
        if kind == "sdxl" and image_size is None:
            raise ValueError("an SDXL conditioner needs image_size=(height, width) in pixels for its time ids")
        check_int("cache_size", cache_size, 0, "cache_size must be a non-negative integer, got {value!r}")
        self.kind = kind
        self.tokenizers = tokenizers
        self.encoders = [None if e is None else e.eval().requires_grad_(False) for e in encoders]
        self.dtype = dtype or next(e for e in self.encoders if e is not None).dtype
        self.t5_length = T5_LENGTH.get(kind) if t5_length is None else int(t5_length)
        self.image_size = None if image_size is None else tuple(int(s) for s in image_size)
        self.joint_attention_dim = joint_attention_dim
        self.zero_null = bool(zero_null)
        self.cache_size = cache_size
        self._cache: OrderedDict[str, dict] = OrderedDict()
        self.encoded = 0  # prompts run through the encoders (cache misses), for callers that watch the cache

    @property
    def device(self) -> torch.device:
        return _device_of(next(e for e in self.encoders if e is not None))

    def to(self, device=None, dtype: torch.dtype | None = None) -> "TextConditioner":
        """Move the encoders (and cast the embeddings to ``dtype``); the cache is cleared."""
        for enc in self.encoders:
            if enc is not None:
                enc.to(device=device)
        if dtype is not None:
            self.dtype = dtype
        self._cache.clear()
        return self

    # ---- the recipes ----

    def _clip(self, i: int, prompts: list[str], layer: int | None):
        """The hidden states of ``layer``, the first output and the pooler output of CLIP encoder ``i``.

        ``layer`` None means the last hidden state, after the final norm."""
        tok, enc = self.tokenizers[i], self.encoders[i]
        out = enc(_token_ids(tok, prompts, tok.model_max_length, _device_of(enc)), output_hidden_states=True)
        hidden = out[0] if layer is None else out.hidden_states[layer]
        return hidden, out[0], getattr(out, "pooler_output", None)

    def _t5(self, i: int, prompts: list[str]) -> torch.Tensor:
        enc = self.encoders[i]
        return enc(_token_ids(self.tokenizers[i], prompts, self.t5_length, _device_of(enc)))[0]

    def _encode(self, prompts: list[str]) -> dict:
        """Per-batch embeddings (B leading) by ``kind``'s recipe, in float of the encoders."""
        if self.kind == "sd":
            return {"encoder_hidden_states": self._clip(0, prompts, None)[0]}
        if self.kind == "sdxl":
            hidden_l = self._clip(0, prompts, -2)[0]
            hidden_g, projected, _ = self._clip(1, prompts, -2)
            return {"encoder_hidden_states": torch.cat([hidden_l, hidden_g.to(hidden_l.device)], dim=-1),
                    "text_embeds": projected}
        if self.kind == "sd3":
            hidden_l, pooled_l, _ = self._clip(0, prompts, -2)
            hidden_g, pooled_g, _ = self._clip(1, prompts, -2)
            clip = torch.cat([hidden_l, hidden_g.to(hidden_l.device)], dim=-1)
            if self.encoders[2] is None:
                t5 = clip.new_zeros(len(prompts), self.t5_length, self.joint_attention_dim)
            else:
                t5 = self._t5(2, prompts).to(clip.device)
            clip = nn.functional.pad(clip.to(t5.dtype), (0, t5.shape[-1] - clip.shape[-1]))
            return {"encoder_hidden_states": torch.cat([clip, t5], dim=-2),
                    "pooled_projections": torch.cat([pooled_l, pooled_g.to(pooled_l.device)], dim=-1)}
        pooled = self._clip(0, prompts, None)[2]  # flux
        return {"encoder_hidden_states": self._t5(1, prompts), "pooled_projections": pooled}

    def _as_keywords(self, emb: dict, batch: int) -> dict:
        """The adapter's keywords from stacked embeddings (SDXL's go into ``added_cond_kwargs``)."""
        if self.kind != "sdxl":
            return emb
        height, width = self.image_size
        time_ids = torch.tensor([[height, width, 0, 0, height, width]], dtype=self.dtype,
                                device=emb["text_embeds"].device).expand(batch, -1)
        return {"encoder_hidden_states": emb["encoder_hidden_states"],
                "added_cond_kwargs": {"text_embeds": emb["text_embeds"], "time_ids": time_ids}}

    # ---- what callers use ----

    @torch.no_grad()
    def embed(self, prompts: list[str]) -> dict:
        """Embeddings of ``prompts``: a dict of (B, ...) tensors in ``dtype``; only uncached prompts are encoded."""
        if isinstance(prompts, str):
            raise TypeError("prompts must be a list of strings, got one string (wrap it in a list)")
        prompts = list(prompts)
        if not prompts or not all(isinstance(p, str) for p in prompts):
            raise ValueError("prompts must be a non-empty list of strings")
        missing = list(dict.fromkeys(p for p in prompts if p not in self._cache))
        fresh = {}
        if missing:
            emb = {k: v.to(self.dtype) for k, v in self._encode(missing).items()}
            self.encoded += len(missing)
            fresh = {p: {k: v[i] for k, v in emb.items()} for i, p in enumerate(missing)}
        rows = []
        for p in prompts:
            row = fresh.get(p)
            if row is None:
                row = self._cache[p]
                self._cache.move_to_end(p)
            rows.append(row)
        if self.cache_size:
            for p, row in fresh.items():
                self._cache[p] = row
                self._cache.move_to_end(p)
            while len(self._cache) > self.cache_size:
                self._cache.popitem(last=False)
        return {k: torch.stack([r[k] for r in rows]) for k in rows[0]}

    def condition(self, prompts: list[str]) -> dict:
        """The denoiser's keywords for ``prompts``: ``den(x, sigma, **conditioner.condition(prompts))``."""
        return self._as_keywords(self.embed(prompts), len(prompts))

    def null_condition(self, batch: int) -> dict:
        """The keywords of the unconditional call of guidance: the empty prompt's embedding for every sample
        (all zeros with ``zero_null``)."""
        emb = self.embed([""])
        if self.zero_null:
            emb = {k: torch.zeros_like(v) for k, v in emb.items()}
        return self._as_keywords({k: v.expand(batch, *v.shape[1:]).contiguous() for k, v in emb.items()}, batch)

    # ---- loading ----

    @classmethod
    def from_pretrained(cls, path, torch_dtype: torch.dtype | None = None, cache_size: int = 1024,
                        image_size: tuple | None = None, t5_length: int | None = None) -> "TextConditioner":
        """The text side of a local pipeline directory (``model_index.json``), each component loaded with
        transformers' ``from_pretrained(path, subfolder=...)``.

        SDXL's ``image_size`` defaults to the UNet's ``sample_size`` times the VAE's scale factor.
        """
        root = Path(path)
        index_file = root / "model_index.json"
        if not index_file.is_file():
            raise FileNotFoundError(f"{str(root)!r} is not a diffusers pipeline directory (no model_index.json)")
        index = json.loads(index_file.read_text())
        pipeline = index.get("_class_name")
        if pipeline not in PIPELINES:
            raise ValueError(f"pipeline class {pipeline!r} in {str(index_file)!r} is not a text-to-image pipeline "
                             f"sidfast reads; supported: {', '.join(PIPELINES)}")
        try:
            import transformers  # transformers stays optional: only text-to-image pipelines need it
        except ImportError:
            raise ImportError(f"{pipeline} needs its text encoders, which need transformers: "
                              "pip install transformers") from None
        kind, pairs = PIPELINES[pipeline]
        tokenizers, encoders = [], []
        for pair in pairs:
            loaded = [_load_component(transformers, root, index, name, pipeline, torch_dtype,
                                      optional=kind == "sd3" and name.endswith("_3")) for name in pair]
            tokenizers.append(loaded[0])
            encoders.append(loaded[1])
        model_config = _read_config(root, "transformer" if kind in ("sd3", "flux") else "unet")
        if kind == "sdxl" and image_size is None:
            scale = 2 ** (len(_read_config(root, "vae").get("block_out_channels", [0] * 4)) - 1)
            size = model_config.get("sample_size", 128)
            image_size = (size * scale, size * scale) if isinstance(size, int) else tuple(s * scale for s in size)
        return cls(kind, tokenizers, encoders, dtype=torch_dtype, cache_size=cache_size, t5_length=t5_length,
                   image_size=image_size, joint_attention_dim=model_config.get("joint_attention_dim"),
                   zero_null=kind == "sdxl" and bool(index.get("force_zeros_for_empty_prompt", True)))


def _read_config(root: Path, subfolder: str) -> dict:
    config = root / subfolder / "config.json"
    return json.loads(config.read_text()) if config.is_file() else {}


def _load_component(transformers, root: Path, index: dict, name: str, pipeline: str, torch_dtype,
                    optional: bool = False):
    """Component ``name`` of the pipeline at ``root``: the transformers class ``model_index.json`` names."""
    entry = index.get(name)
    library, class_name = entry if isinstance(entry, list) and len(entry) == 2 else (None, None)
    if class_name is None:
        if optional:
            return None
        raise ValueError(f"{pipeline} at {str(root)!r} has no {name} (model_index.json lists {entry!r}); the "
                         "text encoders and tokenizers are needed to embed prompts")
    if not (root / name).is_dir():
        raise FileNotFoundError(f"{pipeline} at {str(root)!r} names {name} ({class_name}) but has no {name}/ "
                                "subfolder: save the whole pipeline with save_pretrained")
    component_cls = getattr(transformers, class_name, None)
    if library != "transformers" or component_cls is None:
        raise ValueError(f"{pipeline} at {str(root)!r}: {name} is {library}.{class_name}, which this "
                         f"transformers {transformers.__version__} does not have")
    kw = {"dtype": torch_dtype} if torch_dtype is not None and not name.startswith("tokenizer") else {}
    return component_cls.from_pretrained(str(root), subfolder=name, **kw)


__all__ = ["PIPELINES", "T5_LENGTH", "read_prompts", "draw_prompts", "TextConditioner"]
