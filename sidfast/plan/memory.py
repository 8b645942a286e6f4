"""Per-GPU memory of a SiD run, predicted before renting GPUs (``docs/plan.md``).

A run holds the frozen teacher, the trainable generator and fake score (copies of the teacher, or
low-rank updates over its shared weights, ``sidfast.models.lora``), two Adam optimizers (two fp32 moments and a
step count per trainable tensor) and the generator's EMA. ``plan_memory`` counts those bytes exactly
from the parameter shapes, divides what FSDP2 shards by the number of GPUs, and adds the activations
of the two SiD phases, measured as the bytes of the tensors autograd saves for backward during the
networks' real forward at batch 2 and 3 -- by default on the meta device (exact shapes, no compute, no
weights), so that the published large models are measured at their real resolution in seconds.
"""
from __future__ import annotations

import contextlib
import copy
import math
import re
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from sidfast.models.lora import add_lora, lora_parameters

GIB = 1024 ** 3
PRECISIONS = ("fp32", "bf16", "bf16-params")
SHARDINGS = ("ddp", "fsdp")
KINDS = ("full", "lora")
RUNTIME_RESERVE = 2 * GIB   # CUDA context, cuBLAS/NCCL workspaces: outside any tensor we count
ADAM_STEP_BYTES = 4         # torch.optim.Adam keeps a float32 step count per parameter tensor
# containers whose elements diffusers checkpoints one at a time (and FSDP2 would wrap as units)
UNIT_LISTS = ("resnets", "transformer_blocks", "single_transformer_blocks")


# ---- the published large models, built on the meta device (config.json values, no weights) ----

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
        import diffusers

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


# ---- static bytes: weights, gradients, Adam, EMA ----

def lora_parameter_shapes(net: nn.Module, rank: int) -> list[tuple]:
    """The shapes of the ``lora_A``/``lora_B`` factors ``sidfast.models.lora.add_lora(net, rank)`` creates, read off
    the layers it builds (on the meta device for the published models: no memory is allocated)."""
    return [tuple(p.shape) for p in lora_parameters(add_lora(net, rank))]


def shard_numel(shape, gpus: int, sharding: str) -> int:
    """Elements of one tensor on one GPU: FSDP2 splits dim 0 into ``gpus`` padded shards (rank 0 holds the
    largest, ``ceil(dim0 / gpus)`` rows); DDP replicates."""
    shape = tuple(shape) or (1,)
    if sharding == "ddp":
        return math.prod(shape)
    return math.ceil(shape[0] / gpus) * math.prod(shape[1:])


@dataclass
class NetworkMemory:
    name: str
    weights: int    # bytes per GPU
    grads: int = 0
    adam: int = 0
    ema: int = 0

    @property
    def total(self) -> int:
        return self.weights + self.grads + self.adam + self.ema


def _static(teacher: nn.Module, fake: str, generator: str, rank: int, precision: str, sharding: str,
            gpus: int, shard_teacher: bool) -> list[NetworkMemory]:
    """Per-GPU bytes of the teacher, generator (+ EMA) and fake score, as ``sidfast.training.networks.build_networks``
    and the trainer's two ``torch.optim.Adam`` hold them."""
    shapes = [tuple(p.shape) for p in teacher.parameters()]
    weight_bytes = teacher_bytes = next(teacher.parameters()).element_size()
    if precision == "bf16-params":
        teacher_bytes = 2  # frozen: stored in the compute dtype; trainable ones keep fp32 master shards
    t_split = sharding if shard_teacher else "ddp"
    buffers = sum(b.numel() * b.element_size() for b in teacher.buffers())
    teacher_numel = sum(shard_numel(s, gpus, t_split) for s in shapes)
    out = [NetworkMemory("teacher", teacher_numel * teacher_bytes + buffers)]
    lora = None
    for name, kind in (("generator", generator), ("fake score", fake)):
        if kind == "lora":
            lora = lora or lora_parameter_shapes(teacher, rank)
            trainable = lora
        else:
            trainable = shapes
        n = sum(shard_numel(s, gpus, sharding) for s in trainable) * weight_bytes
        # a copy holds its own buffers; a LoRA network shares the teacher's
        copy_buffers = buffers if kind == "full" else 0
        mem = NetworkMemory(name, n + copy_buffers, grads=n, adam=2 * n + ADAM_STEP_BYTES * len(trainable))
        if name == "generator":
            mem.ema = n + copy_buffers  # the EMA copies what trains (a LoRA EMA: the factors only)
        out.append(mem)
    return out


# ---- activations: bytes saved for backward ----

class _FlashAttention(torch.autograd.Function):
    """Attention that saves what GPU flash / memory-efficient attention saves (q, k, v, output and an fp32
    log-sum-exp per query), not the (tokens x tokens) probabilities of the math fallback."""

    @staticmethod
    def forward(ctx, q, k, v, mask, dropout_p, is_causal, scale):
        out = _SDPA(q, k, v, attn_mask=mask, dropout_p=dropout_p, is_causal=is_causal, scale=scale)
        lse = q.new_empty(q.shape[:-1], dtype=torch.float32)
        ctx.save_for_backward(q, k, v, out, lse)
        ctx.options = (mask, dropout_p, is_causal, scale)
        return out

    @staticmethod
    def backward(ctx, grad):
        q, k, v, _, _ = ctx.saved_tensors
        mask, dropout_p, is_causal, scale = ctx.options
        with torch.enable_grad():
            qkv = [t.detach().requires_grad_(True) for t in (q, k, v)]
            out = _SDPA(*qkv, attn_mask=mask, dropout_p=dropout_p, is_causal=is_causal, scale=scale)
            grads = torch.autograd.grad(out, qkv, grad)
        return (*grads, None, None, None, None)


_SDPA = F.scaled_dot_product_attention


def _flash_sdpa(query, key, value, attn_mask=None, dropout_p=0.0, is_causal=False, scale=None, **kw):
    if not kw.get("enable_gqa", False):
        kw.pop("enable_gqa", None)
    qkv = (query, key, value)
    if kw or not torch.is_grad_enabled() or not any(t.requires_grad for t in qkv):
        return _SDPA(*qkv, attn_mask=attn_mask, dropout_p=dropout_p, is_causal=is_causal, scale=scale, **kw)
    return _FlashAttention.apply(*qkv, attn_mask, dropout_p, is_causal, scale)


def _key(t: torch.Tensor) -> int:
    return t.untyped_storage()._cdata


def checkpoint_units(net: nn.Module) -> list[nn.Module]:
    """The blocks activation checkpointing recomputes: diffusers' (elements of ``resnets``,
    ``transformer_blocks``, ``single_transformer_blocks`` holding no such element), else the outermost
    elements of any ``nn.ModuleList`` that have parameters."""
    pattern = re.compile(r"(^|\.)(%s)\.\d+$" % "|".join(UNIT_LISTS))
    named = [m for name, m in net.named_modules() if pattern.search(name)]
    ids = {id(m) for m in named}
    units = [m for m in named if not any(id(c) in ids for c in m.modules() if c is not m)]
    if units:
        return units
    found, inside = [], set()
    for m in net.modules():
        if id(m) in inside or not isinstance(m, nn.ModuleList):
            continue
        for child in m:
            if any(True for _ in child.parameters()):
                found.append(child)
                inside.update(id(c) for c in child.modules())
    return found


@dataclass
class SavedBytes:
    """Bytes saved for backward by one forward: ``total`` (each storage once, parameters and buffers left
    out), and ``checkpointed``: what stays with activation checkpointing of the units (everything saved
    outside the units, the units' inputs, and the largest unit's own saved bytes while it is recomputed)."""
    total: int
    checkpointed: int


@contextlib.contextmanager
def count_saved(units: list[nn.Module], exclude: set[int]):
    """Record the storages autograd saves inside the block; yields a dict filled on exit: ``total``,
    ``checkpointed`` (see ``SavedBytes``)."""
    saved: dict[int, tuple[int, int | None]] = {}   # storage -> (bytes, owning unit or None)
    inputs: dict[int, int] = {}
    stack: list[int] = []
    keep = []   # saved tensors stay referenced so that storage ids stay unique

    def pack(t):
        k = _key(t)
        if k not in exclude and k not in saved:
            keep.append(t)
            saved[k] = (t.untyped_storage().nbytes(), stack[0] if stack else None)
        return t

    def pre(module, args, kwargs):
        if not stack:
            for a in (*args, *kwargs.values()):
                for t in (a if isinstance(a, (tuple, list)) else (a,)):
                    if isinstance(t, torch.Tensor) and t.is_floating_point() and _key(t) not in exclude:
                        keep.append(t)
                        inputs.setdefault(_key(t), t.untyped_storage().nbytes())
        stack.append(id(module))

    def post(module, args, output):
        stack.pop()

    handles = [h for u in units for h in (u.register_forward_pre_hook(pre, with_kwargs=True),
                                          u.register_forward_hook(post))]
    result = {}
    F.scaled_dot_product_attention = _flash_sdpa
    try:
        with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
            yield result
    finally:
        F.scaled_dot_product_attention = _SDPA
        for h in handles:
            h.remove()
    outside = {k: b for k, (b, owner) in saved.items() if owner is None}
    per_unit: dict[int, int] = {}
    for b, owner in saved.values():
        if owner is not None:
            per_unit[owner] = per_unit.get(owner, 0) + b
    kept_inputs = sum(b for k, b in inputs.items() if k not in outside)
    result["total"] = sum(b for b, _ in saved.values())
    result["checkpointed"] = sum(outside.values()) + kept_inputs + max(per_unit.values(), default=0)


class ActivationMeter:
    """Saved-for-backward bytes of one network's forward, per role (``"frozen"``, ``"full"``, ``"lora"``:
    whose parameters train) and input (needing grad or not), at batch ``b``; cached."""

    def __init__(self, teacher: nn.Module, sample_shape: tuple, num_classes: int, label_format: str,
                 rank: int, dtype: torch.dtype, device="meta"):
        self.device = torch.device(device)
        self.base = _detached_copy(teacher, self.device, dtype)
        self.shape = tuple(sample_shape)
        self.num_classes = num_classes
        self.label_format = label_format
        self.rank = rank
        self.dtype = dtype
        self.nets: dict[str, nn.Module] = {}
        self.cache: dict[tuple, SavedBytes] = {}

    def net(self, role: str) -> nn.Module:
        if role not in self.nets:
            if role == "frozen":
                net = self.base
            elif role == "full":
                net = copy.deepcopy(self.base).requires_grad_(True)
            else:
                net = add_lora(self.base, self.rank)
                for p in lora_parameters(net):
                    p.requires_grad_(True)
            self.nets[role] = net
        return self.nets[role]

    def measure(self, role: str, input_grad: bool, b: int) -> SavedBytes:
        key = (role, input_grad, b)
        if key not in self.cache:
            net = self.net(role)
            exclude = {_key(t) for t in (*net.parameters(), *net.buffers())}
            x = torch.zeros((b, *self.shape), device=self.device, dtype=self.dtype, requires_grad=input_grad)
            sigma = torch.ones(b, device=self.device)
            labels = None
            if self.num_classes:
                from sidfast.models.denoiser import draw_labels
                labels = draw_labels(b, self.num_classes, self.label_format, self.device)
            with count_saved(checkpoint_units(net), exclude) as r:
                net(x, sigma, labels)
            self.cache[key] = SavedBytes(r["total"], r["checkpointed"])
        return self.cache[key]


def _detached_copy(net: nn.Module, device: torch.device, dtype: torch.dtype) -> nn.Module:
    """A frozen copy of ``net`` on ``device`` in ``dtype``; on the meta device no weight is copied."""
    if device.type == "meta":
        memo = {id(t): torch.empty_like(t, device="meta") for t in (*net.parameters(), *net.buffers())}
        for p in net.parameters():
            memo[id(p)] = nn.Parameter(memo[id(p)], requires_grad=False)
        net = copy.deepcopy(net, memo)
    else:
        net = copy.deepcopy(net).to(device)
    return net.to(dtype).eval().requires_grad_(False)


# ---- the plan ----

@dataclass
class MemoryPlan:
    options: dict
    networks: list[NetworkMemory]
    fsdp_gathered: int           # unsharded weights and gradients of the units in flight (FSDP2)
    ddp_buckets: int             # DDP's gradient buckets (a second copy of the gradients)
    weight_casts: dict           # phase -> bf16 copies of weights autocast saves for backward
    activations: dict            # phase -> (bytes at batch 0, bytes per sample)
    usable: int                  # GPU memory less the margin and the runtime reserve
    batch: int
    peak: int = 0
    peak_phase: str = ""
    max_batch: int = 0
    fits: bool = False

    @property
    def static(self) -> int:
        return sum(n.total for n in self.networks) + self.ddp_buckets

    def phase_bytes(self, phase: str, batch: int) -> int:
        fixed, per_sample = self.activations[phase]
        return self.static + self.fsdp_gathered + self.weight_casts[phase] + fixed + per_sample * batch

    def format(self) -> str:
        o = self.options
        head = (f"{o['model']} at {o['resolution']} px, batch {self.batch}/GPU on {o['gpus']} GPU(s) of "
                f"{o['gpu_memory'] / GIB:.0f} GiB: {o['sharding']}, precision {o['precision']}, fake score "
                f"{o['fake_score']}, generator {o['generator']}"
                + (f" (LoRA rank {o['lora_rank']})" if "lora" in (o['fake_score'], o['generator']) else "")
                + f", checkpointing {'on' if o['checkpointing'] else 'off'}")
        rows = [f"{'GiB per GPU':<28}{'weights':>9}{'grads':>9}{'Adam':>9}{'EMA':>9}{'total':>9}"]
        for n in self.networks:
            rows.append(f"{n.name:<28}" + "".join(f"{v / GIB:9.2f}" for v in
                                                  (n.weights, n.grads, n.adam, n.ema, n.total)))
        extra = [("DDP gradient buckets", self.ddp_buckets), ("FSDP gathered units", self.fsdp_gathered)]
        for phase, (fixed, per) in self.activations.items():
            extra.append((f"{phase} activations", fixed + per * self.batch))
            if self.weight_casts[phase]:
                extra.append((f"{phase} bf16 weight casts", self.weight_casts[phase]))
        rows += [f"{name:<28}{v / GIB:45.2f}" for name, v in extra if v]
        verdict = "fits" if self.fits else "does NOT fit"
        rows.append(f"peak ({self.peak_phase}) {self.peak / GIB:.2f} GiB of {self.usable / GIB:.2f} usable: "
                    f"{verdict}; largest batch per GPU {self.max_batch}")
        return "\n".join([head, *rows])


def parse_memory(text) -> int:
    """Bytes of ``80GB``/``80GiB``/``80`` (all GiB: GPU memory is quoted in binary units); numbers pass
    through."""
    if isinstance(text, (int, float)):
        return int(text)
    m = re.fullmatch(r"\s*([0-9.]+)\s*(gib|gb|g|mib|mb|m)?\s*", str(text).lower())
    if not m:
        raise ValueError(f"argument gpu_memory must look like 80GB, 141GiB or 24, got {text!r}")
    scale = GIB if (m[2] or "g").startswith("g") else 1024 ** 2
    return int(float(m[1]) * scale)


def plan_memory(teacher=None, *, model: str | None = None, resolution: int | None = None, batch: int = 1,
                gpus: int = 1, sharding: str = "ddp", precision: str = "bf16", fake_score: str = "full",
                generator: str = "full", lora_rank: int = 64, checkpointing: bool = False,
                gpu_memory="80GiB", margin: float = 0.1, shard_teacher: bool = True, measure_device="meta",
                measure_resolution: int | None = None, meter: ActivationMeter | None = None) -> MemoryPlan:
    """Predict the per-GPU memory of a SiD run.

    Args:
        teacher: a ``Denoiser`` (what ``sidfast.models.loading.load_teacher`` returns), or None with ``model``.
        model: a published model by name (``KNOWN_MODELS``), built on the meta device.
        resolution: pixels per side (known models: required; a local teacher: default its own image size).
        batch: samples per GPU per micro-batch. gpus: GPUs the run uses. sharding: "fsdp" (FSDP2: weights,
            gradients, Adam and EMA of every network divided over the GPUs; the teacher too unless
            ``shard_teacher`` is False) or "ddp" (all replicated).
        precision: "fp32"; "bf16": fp32 weights under bf16 autocast (``--precision bf16``); "bf16-params":
            FSDP2 ``MixedPrecisionPolicy(param_dtype=bf16, reduce_dtype=fp32)``, fp32 master shards of the
            trainable networks, the frozen teacher in bf16.
        fake_score, generator: "full" (a trainable copy of the teacher) or "lora" (rank ``lora_rank`` factors
            over the teacher's shared weights).
        checkpointing: activation checkpointing of the networks' blocks (``checkpoint_units``).
        gpu_memory: per GPU (``80GB``, bytes); margin: fraction of it kept free (fragmentation, transients).
        measure_device: where the activations are measured ("meta": no compute); measure_resolution: measure
            there and scale linearly in pixels to ``resolution`` (a local teacher on a real device).
        meter: a cached ``ActivationMeter`` to reuse across plans of one teacher, resolution and precision.
    """
    _check(model, teacher, sharding, precision, fake_score, generator, batch, gpus, lora_rank, margin)
    if model is not None:
        if resolution is None:
            raise ValueError("argument resolution is required with a known model")
        teacher = KnownDenoiser(model)
        shape = teacher.sample_shape(resolution)
        num_classes, label_format = 0, "index"
    else:
        from sidfast.models.denoiser import DiffusersDenoiser, infer_image_shape, infer_num_classes

        shape = infer_image_shape(teacher)
        if shape is None:
            raise ValueError("cannot determine the teacher's image shape; give argument resolution")
        if resolution is not None:
            shape = (shape[0], resolution, resolution)
        num_classes = infer_num_classes(teacher)
        label_format = "index" if isinstance(teacher, DiffusersDenoiser) else "onehot"
    dtype = torch.float32 if precision == "fp32" else torch.bfloat16
    networks = _static(teacher, fake_score, generator, lora_rank, precision, sharding, gpus, shard_teacher)

    # Activations of the two phases, linear in the batch through batch 2 and 3 (at batch 1 some reshapes are
    # views of their input, which would bend the line).
    scale = 1.0
    if meter is None:
        measured = shape
        if measure_resolution is not None and len(shape) == 3:
            measured = (shape[0], measure_resolution, measure_resolution)
            scale = (shape[1] * shape[2]) / (measure_resolution ** 2)
        meter = ActivationMeter(teacher, measured, num_classes, label_format, lora_rank, dtype,
                                measure_device)
    attr = "checkpointed" if checkpointing else "total"

    def line(parts):  # parts: (role, input_grad); returns (bytes at batch 0, bytes per sample)
        at = [scale * sum(getattr(meter.measure(r, g, b), attr) for r, g in parts) for b in (2, 3)]
        return int(round(3 * at[0] - 2 * at[1])), int(round(at[1] - at[0]))

    fake_role = "lora" if fake_score == "lora" else "full"
    # generator step: generator forward with grad, teacher and fake score forward with input gradients;
    # fake step: the generator without grad, the fake score forward with its parameter gradients
    activations = {"generator step": line([("lora" if generator == "lora" else "full", False),
                                           ("frozen", True), (fake_role, True)]),
                   "fake step": line([(fake_role, False)])}

    units = checkpoint_units(teacher)
    largest = max((sum(p.numel() for p in u.parameters()) for u in units), default=0)
    unit_ids = {id(p) for u in units for p in u.parameters()}
    root = sum(p.numel() for p in teacher.parameters() if id(p) not in unit_ids)
    casts = {"generator step": 0, "fake step": 0}
    if precision == "bf16":
        # autocast saves a bf16 copy of every weight a saved matmul needs in backward, in each forward with
        # gradients (3 in the generator step, 1 in the fake step); checkpointing drops the units' copies
        # but the one being recomputed
        p_teacher = sum(p.numel() for p in teacher.parameters())
        for phase, forwards in (("generator step", 3), ("fake step", 1)):
            casts[phase] = 2 * (root * forwards + largest if checkpointing else p_teacher * forwards)
    gathered = 0
    if sharding == "fsdp" and gpus > 1:
        # the root's weights for the whole forward, two units (one prefetched), one unit's fp32 gradients
        gathered = (root + 2 * largest) * dtype.itemsize + (root + largest) * 4
    buckets = sum(n.grads for n in networks) if sharding == "ddp" and gpus > 1 else 0
    name = model or getattr(teacher, "name", None) or type(teacher).__name__
    plan = MemoryPlan(dict(model=name,
                           resolution=resolution or shape[-1], gpus=gpus, sharding=sharding,
                           precision=precision,
                           fake_score=fake_score, generator=generator, lora_rank=lora_rank,
                           checkpointing=checkpointing, gpu_memory=parse_memory(gpu_memory)),
                      networks, gathered, buckets, casts, activations,
                      int(parse_memory(gpu_memory) * (1 - margin)) - RUNTIME_RESERVE, batch)
    plan.peak_phase = max(activations, key=lambda ph: plan.phase_bytes(ph, batch))
    plan.peak = plan.phase_bytes(plan.peak_phase, batch)
    plan.fits = plan.peak <= plan.usable
    plan.max_batch = _max_batch(plan)
    return plan


TABLE_KINDS = (("full", "full"), ("lora", "full"), ("full", "lora"), ("lora", "lora"))


def predictions_table(models=tuple(KNOWN_MODELS), resolutions=(512, 1024), gpus: int = 8, gpu_memory="80GiB",
                      sharding: str = "fsdp", precision: str = "bf16-params", lora_rank: int = 64) -> str:
    """A Markdown table of the published models: full or LoRA fake score and generator, activation
    checkpointing off and on (``docs/plan.md``)."""
    setup = (f"{gpus} x {parse_memory(gpu_memory) / GIB:.0f} GiB, {sharding}, precision {precision}, "
             f"LoRA rank {lora_rank}, margin 10% + {RUNTIME_RESERVE // GIB} GiB")
    rows = [setup, "",
            "| model | px | fake score | generator | static GiB/GPU | act. GiB/sample (ckpt off / on) "
            "| largest batch/GPU (ckpt off / on) |", "|---|---|---|---|---|---|---|"]
    for model in models:
        for resolution in resolutions:
            teacher = KnownDenoiser(model)
            dtype = torch.float32 if precision == "fp32" else torch.bfloat16
            meter = ActivationMeter(teacher, teacher.sample_shape(resolution), 0, "index", lora_rank, dtype)
            for fake, generator in TABLE_KINDS:
                options = dict(model=model, resolution=resolution, gpus=gpus, sharding=sharding,
                               precision=precision, fake_score=fake, generator=generator, lora_rank=lora_rank,
                               gpu_memory=gpu_memory, meter=meter)
                plans = [plan_memory(checkpointing=ckpt, **options) for ckpt in (False, True)]
                per_sample = " / ".join(f"{max(per for _, per in p.activations.values()) / GIB:.2f}"
                                        for p in plans)
                batches = " / ".join(str(p.max_batch) for p in plans)
                rows.append(f"| {model} | {resolution} | {fake} | {generator} | {plans[0].static / GIB:.1f} "
                            f"| {per_sample} | {batches} |")
    return "\n".join(rows)


def add_plan_arguments(parser, teacher_help: str) -> None:
    """The options of ``sidfast plan`` (``teacher_help``: what ``--teacher`` accepts)."""
    add = parser.add_argument
    source = parser.add_mutually_exclusive_group(required=True)
    source.add_argument("--teacher", help=teacher_help)
    source.add_argument("--model", choices=list(KNOWN_MODELS),
                        help="a published model, built without weights")
    source.add_argument("--table", action="store_true", help="the README table of the published models")
    add("--resolution", type=int, help="pixels per side (default: the teacher's; required with --model)")
    add("--batch", type=int, default=1, help="samples per GPU (default: 1)")
    add("--gpus", type=int, default=1, help="GPUs of the run (default: 1)")
    add("--gpu-memory", default="80GiB", help="memory of one GPU, e.g. 80GB, 141GiB (default: 80GiB)")
    add("--margin", type=float, default=0.1, help="fraction of GPU memory kept free (default: 0.1)")
    add("--sharding", choices=SHARDINGS, default="ddp", help="(default: ddp)")
    add("--precision", choices=PRECISIONS, default="bf16",
        help="fp32; bf16: fp32 weights under bf16 autocast; bf16-params: FSDP2 mixed precision "
             "(default: bf16)")
    add("--fake-score", choices=KINDS, default="full", help="(default: full)")
    add("--generator", choices=KINDS, default="full", help="(default: full)")
    add("--lora-rank", type=int, default=64, help="(default: 64)")
    add("--checkpointing", action="store_true", help="activation checkpointing of every block")
    add("--no-shard-teacher", dest="shard_teacher", action="store_false",
        help="replicate the frozen teacher under FSDP")
    add("--measure-device", default="meta", help="where activations are measured (default: meta)")


def plan_from_args(args, teacher=None) -> str:
    """The text ``sidfast plan`` prints for its parsed options: the plan of ``teacher`` (loaded from
    ``--teacher``) or ``--model``, or the table of the published models (``--table``)."""
    if args.table:
        return predictions_table()
    plan = plan_memory(teacher, model=args.model, resolution=args.resolution, batch=args.batch,
                       gpus=args.gpus, sharding=args.sharding, precision=args.precision,
                       fake_score=args.fake_score, generator=args.generator, lora_rank=args.lora_rank,
                       checkpointing=args.checkpointing, gpu_memory=args.gpu_memory, margin=args.margin,
                       shard_teacher=args.shard_teacher, measure_device=args.measure_device)
    return plan.format()


def _max_batch(plan: MemoryPlan) -> int:
    best = None
    for phase, (_, per_sample) in plan.activations.items():
        room = plan.usable - plan.phase_bytes(phase, 0)
        b = room // per_sample if per_sample > 0 else (10 ** 9 if room >= 0 else 0)
        best = b if best is None else min(best, b)
    return max(int(best), 0)


def _check(model, teacher, sharding, precision, fake_score, generator, batch, gpus, rank, margin):
    if (model is None) == (teacher is None):
        raise ValueError("give either argument teacher or argument model")
    if model is not None and model not in KNOWN_MODELS:
        raise ValueError(f"argument model must be one of {', '.join(KNOWN_MODELS)}, got {model!r}")
    for name, value, choices in (("sharding", sharding, SHARDINGS), ("precision", precision, PRECISIONS),
                                 ("fake_score", fake_score, KINDS), ("generator", generator, KINDS)):
        if value not in choices:
            raise ValueError(f"argument {name} must be one of {', '.join(choices)}, got {value!r}")
    if precision == "bf16-params" and sharding != "fsdp":
        raise ValueError("argument precision bf16-params is FSDP2's mixed precision: use argument "
                         "sharding fsdp")
    for name, value in (("batch", batch), ("gpus", gpus), ("lora_rank", rank)):
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise ValueError(f"argument {name} must be a positive integer, got {value!r}")
    if not 0 <= margin < 1:
        raise ValueError(f"argument margin must be in [0, 1), got {margin!r}")


__all__ = ["plan_memory", "MemoryPlan", "NetworkMemory", "KNOWN_MODELS", "KnownDenoiser", "ActivationMeter",
           "count_saved", "checkpoint_units", "lora_parameter_shapes", "shard_numel", "parse_memory",
           "predictions_table", "add_plan_arguments", "plan_from_args", "PRECISIONS", "SHARDINGS"]
