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

import re
from dataclasses import dataclass

import torch

from sidfast._checks import check_int
from sidfast.models.diffusers import DiffusersDenoiser
from sidfast.models.introspect import infer_image_shape, infer_num_classes
from sidfast.models.lora import NETWORK_KINDS
from sidfast.plan.activations import ActivationMeter, checkpoint_units
from sidfast.plan.known import KNOWN_MODELS, KnownDenoiser
from sidfast.plan.static import NetworkMemory, static_bytes

GIB = 1024 ** 3
# the parameter precisions a plan counts (not the trainer's --precision choices, training.config.PRECISIONS):
# bf16-params is FSDP2's mixed precision, the frozen teacher stored in bf16
PLAN_PRECISIONS = ("fp32", "bf16", "bf16-params")
SHARDINGS = ("ddp", "fsdp")
RUNTIME_RESERVE = 2 * GIB   # CUDA context, cuBLAS/NCCL workspaces: outside any tensor we count


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
        extra = [("DDP gradient buckets", self.ddp_buckets), ("FSDP gathered units", self.fsdp_gathered)]
        for phase, (fixed, per) in self.activations.items():
            extra.append((f"{phase} activations", fixed + per * self.batch))
            if self.weight_casts[phase]:
                extra.append((f"{phase} bf16 weight casts", self.weight_casts[phase]))
        extra = [(name, v) for name, v in extra if v]
        # one unit for the table, the largest in which its largest entry is at least 1 (a tiny model: KiB)
        largest = max([n.total for n in self.networks] + [v for _, v in extra] + [self.peak, 1])
        unit, size = next((u, b) for u, b in UNITS if largest >= b)
        width = max([28] + [len(n.name) + 1 for n in self.networks] + [len(name) + 1 for name, _ in extra])
        rows = [f"{unit + ' per GPU':<{width}}{'weights':>9}{'grads':>9}{'Adam':>9}{'EMA':>9}{'total':>9}"]
        for n in self.networks:
            rows.append(f"{n.name:<{width}}" + "".join(f"{v / size:9.2f}" for v in
                                                     (n.weights, n.grads, n.adam, n.ema, n.total)))
        rows += [f"{name:<{width}}{v / size:45.2f}" for name, v in extra]
        verdict = "fits" if self.fits else "does NOT fit"
        rows.append(f"peak ({self.peak_phase}) {_amount(self.peak)} of {_amount(self.usable)} usable: "
                    f"{verdict}; largest batch per GPU {self.max_batch}")
        return "\n".join([head, *rows])


UNITS = (("GiB", 2 ** 30), ("MiB", 2 ** 20), ("KiB", 2 ** 10), ("bytes", 1))


def _amount(nbytes: float) -> str:
    """``nbytes`` in the largest binary unit that keeps it at least 1: ``1.50 GiB``, ``12.00 KiB``."""
    unit, size = next(((u, b) for u, b in UNITS if nbytes >= b), UNITS[-1])
    return f"{nbytes / size:.2f} {unit}"


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
        shape = infer_image_shape(teacher)
        if shape is None:
            raise ValueError("cannot determine the teacher's image shape; give argument resolution")
        if resolution is not None:
            shape = (shape[0], resolution, resolution)
        num_classes = infer_num_classes(teacher)
        label_format = "index" if isinstance(teacher, DiffusersDenoiser) else "onehot"
    dtype = torch.float32 if precision == "fp32" else torch.bfloat16
    networks = static_bytes(teacher, fake_score, generator, lora_rank, precision, sharding, gpus, shard_teacher)

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
                      sharding: str = "fsdp", precision: str = "bf16-params", lora_rank: int = 64,
                      progress=None) -> str:
    """A Markdown table of the published models: full or LoRA fake score and generator, activation
    checkpointing off and on (``docs/plan.md``). ``progress``: called with a line before each model and
    resolution is measured (the whole table takes about a minute on a CPU)."""
    setup = (f"{gpus} x {parse_memory(gpu_memory) / GIB:.0f} GiB, {sharding}, precision {precision}, "
             f"LoRA rank {lora_rank}, margin 10% + {RUNTIME_RESERVE // GIB} GiB")
    rows = [setup, "",
            "| model | px | fake score | generator | static GiB/GPU | act. GiB/sample (ckpt off / on) "
            "| largest batch/GPU (ckpt off / on) |", "|---|---|---|---|---|---|---|"]
    done = 0
    for model in models:
        for resolution in resolutions:
            done += 1
            if progress is not None:
                progress(f"measuring {model} at {resolution} px ({done}/{len(models) * len(resolutions)})")
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
    for name, value, choices in (("sharding", sharding, SHARDINGS), ("precision", precision, PLAN_PRECISIONS),
                                 ("fake_score", fake_score, NETWORK_KINDS),
                                 ("generator", generator, NETWORK_KINDS)):
        if value not in choices:
            raise ValueError(f"argument {name} must be one of {', '.join(choices)}, got {value!r}")
    if precision == "bf16-params" and sharding != "fsdp":
        raise ValueError("argument precision bf16-params is FSDP2's mixed precision: use argument "
                         "sharding fsdp")
    for name, value in (("batch", batch), ("gpus", gpus), ("lora_rank", rank)):
        check_int(name, value, 1, f"argument {name} must be a positive integer, got {{value!r}}")
    if not 0 <= margin < 1:
        raise ValueError(f"argument margin must be in [0, 1), got {margin!r}")


__all__ = ["plan_memory", "MemoryPlan", "parse_memory", "predictions_table", "PLAN_PRECISIONS", "SHARDINGS", "GIB"]
