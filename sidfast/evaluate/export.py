"""A distilled student as a directory that stock diffusers loads (``sidfast export``): docs/export.md.

The EMA generator of a run distilled from a diffusers teacher is written with ``save_pretrained`` (safetensors
weights) beside a scheduler config with which diffusers' own denoising loop computes the generator's steps:

- a VP model directory teacher (a ``UNet2DModel``, or a ``DDPMPipeline``): the student model and a
  ``scheduler_config.json`` in one directory; a text-to-image pipeline (Stable Diffusion, SDXL, SD3): the
  teacher's pipeline directory with the student's ``unet/`` or ``transformer/`` and the new ``scheduler/``, the
  other components linked or copied file by file (pickled ``.bin`` weights written as ``.safetensors``).
- VP (DDPM) teachers get an ``EulerDiscreteScheduler`` on the teacher's beta schedule: one Euler step from
  sigma to 0 is ``x - sigma * (x - x0) / sigma``, the x0 the U-Net predicts at ``scale_model_input(x) = x /
  sqrt(1 + sigma^2)`` and the continuous timestep of sigma (log-sigma interpolation, as sidfast's adapter), so
  ``sigmas=[sigma_0, ..., sigma_{K-1}, 0]`` is the generator at its levels with DDIM re-noising between them.
- Flow-matching teachers get a ``FlowMatchEulerDiscreteScheduler`` without time shift: one step from t to 0 is
  ``x - t v`` at timestep ``1000 t``, the generator's x0 at ``t = sigma / (1 + sigma)`` on ``x = t z``.

The levels come from ``sidfast.training.student.generator_levels`` (the sampler's), and the call that reproduces
``sidfast sample`` is written into the directory (``sidfast_export.json``) with the Python a user types.
"""
from __future__ import annotations

import inspect
import json
import math
import os
import shutil
from pathlib import Path

import torch

from sidfast import __version__
from sidfast.models import text
from sidfast.models.diffusers import DiffusersDenoiser, scheduler_config_candidates
from sidfast.models.flow import FlowDenoiser
from sidfast.models.introspect import is_diffusers_model
from sidfast.models.io import CheckpointError, kind_of
from sidfast.models.loading import build_generator
from sidfast.training import student
from sidfast.utils.files import atomic_directory

INFO_NAME = "sidfast_export.json"
# the diffusers name of each prediction sidfast's VP adapter knows
PREDICTION_TYPES = {"eps": "epsilon", "v": "v_prediction", "x0": "sample"}
PIPELINE_KINDS = ("sd", "sdxl", "sd3")  # text-to-image pipelines export writes (text.PIPELINES' kinds)
SNIPPET_IMAGES = 4
SNIPPET_PROMPT = "a photo of a cat"


class ExportError(ValueError):
    """A checkpoint or output directory ``sidfast export`` cannot use, in command-line words."""


# ---- the levels, in the scheduler's coordinates ----

def flow_time(sigma: float) -> float:
    """The flow time t = sigma / (1 + sigma) of a level (1 at an infinite level, whose input is z itself)."""
    return 1.0 if math.isinf(sigma) else sigma / (1 + sigma)


def scheduler_levels(family: str, levels: list[float]) -> list[float]:
    """The generator's levels as the exported scheduler's ``sigmas``: EDM's sigma for a VP teacher (diffusers'
    Euler sigma is sqrt((1 - abar) / abar), the same number), the flow time for a flow teacher."""
    if family == "flow":
        return [flow_time(s) for s in levels]
    if not all(math.isfinite(s) for s in levels):
        raise ExportError(f"the generator's levels {levels} include an infinite one, which a VP (DDPM) "
                          "scheduler cannot start from")
    return [float(s) for s in levels]


def call_sigmas(family: str, levels: list[float]) -> list[float]:
    """``sigmas=`` of the diffusers call over all the levels: Euler's list ends with its final 0, the flow
    scheduler appends its own."""
    return levels + [0.0] if family == "vp" else list(levels)


# ---- the scheduler ----

def _config_keys(cls) -> set:
    return set(inspect.signature(cls.__init__).parameters) - {"self"}


def _teacher_scheduler_config(root: Path, model_dir: Path) -> dict:
    found = next((c for c in scheduler_config_candidates(root, model_dir) if c.is_file()), None)
    return json.loads(found.read_text()) if found is not None else {}


def _euler_scheduler(net: DiffusersDenoiser, config: dict, source: str):
    """The teacher's beta schedule in an ``EulerDiscreteScheduler`` whose ``sigmas=`` call runs the generator."""
    from diffusers import EulerDiscreteScheduler

    if net.learned_variance:
        raise ExportError(f"--teacher {source!r}: the U-Net predicts a learned variance beside its mean, which "
                          "diffusers' Euler scheduler does not take; export supports mean-only U-Nets")
    keys = _config_keys(EulerDiscreteScheduler)
    kw = {k: v for k, v in config.items() if k in keys}
    # the timestep of each sigma by log-sigma interpolation, the input scaled by sigma (init_noise_sigma of
    # "linspace" spacing), final sigma 0: what sidfast's adapter and one-step sampler compute
    kw.update(prediction_type=PREDICTION_TYPES[net.prediction], timestep_spacing="linspace",
              interpolation_type="linear", use_karras_sigmas=False, use_exponential_sigmas=False,
              use_beta_sigmas=False, sigma_min=None, sigma_max=None, timestep_type="discrete",
              final_sigmas_type="zero")
    scheduler = EulerDiscreteScheduler(**{k: v for k, v in kw.items() if k in keys})
    table = net.schedule.alphas_cumprod.detach().to("cpu", torch.float64)
    if not torch.equal(scheduler.alphas_cumprod.to(torch.float64), table):
        raise ExportError(f"--teacher {source!r}: its noise schedule has no EulerDiscreteScheduler equivalent "
                          "(an Euler scheduler on its scheduler config has other alphas_cumprod than the schedule "
                          "sidfast evaluated it with)")
    return scheduler


def _flow_scheduler(net: FlowDenoiser, config: dict, source: str):
    """A ``FlowMatchEulerDiscreteScheduler`` without time shift, on the model's time scale."""
    from diffusers import FlowMatchEulerDiscreteScheduler

    if net.pack:
        raise ExportError(f"--teacher {source!r}: FLUX students are not exported yet (FluxPipeline takes packed "
                          "latents and an embedded guidance scale); sample them with sidfast sample")
    scale = net.time_scale
    if scale != round(scale) or scale < 1:
        raise ExportError(f"--teacher {source!r}: the model takes time in units of {scale}, which no "
                          "FlowMatchEulerDiscreteScheduler (timestep = t * num_train_timesteps) gives")
    keys = _config_keys(FlowMatchEulerDiscreteScheduler)
    kw = {k: v for k, v in config.items() if k in keys}
    # sigmas as given (no shift, no resolution-dependent shift, no terminal stretch), deterministic steps
    kw.update(num_train_timesteps=int(round(scale)), shift=1.0, use_dynamic_shifting=False, shift_terminal=None,
              use_karras_sigmas=False, use_exponential_sigmas=False, use_beta_sigmas=False, invert_sigmas=False,
              stochastic_sampling=False)
    return FlowMatchEulerDiscreteScheduler(**{k: v for k, v in kw.items() if k in keys})


# ---- the teacher's other pipeline components ----

def _safetensors_name(name: str) -> str:
    """The safetensors file (or index) of a pickled weights file: ``pytorch_model*.bin`` -> ``model*.safetensors``
    (transformers' names), ``diffusion_pytorch_model*.bin`` -> ``diffusion_pytorch_model*.safetensors``."""
    if name.startswith("pytorch_model"):
        name = "model" + name[len("pytorch_model"):]
    return name.replace(".bin", ".safetensors")


def _pickled(name: str) -> bool:
    return name.endswith(".bin") or name.endswith(".bin.index.json")


def _convert(src: Path, dst: Path) -> None:
    """A pickled weights file (or its shard index) as safetensors: the same tensors, dtypes and names."""
    if src.name.endswith(".index.json"):
        index = json.loads(src.read_text())
        index["weight_map"] = {k: _safetensors_name(v) for k, v in index.get("weight_map", {}).items()}
        dst.write_text(json.dumps(index, indent=2))
        return
    from safetensors.torch import save_file  # comes with diffusers (the diffusers extra)

    state = torch.load(src, map_location="cpu", weights_only=True)
    # clones: safetensors refuses tensors that share memory (tied weights), which torch.save keeps shared
    save_file({k: v.detach().contiguous().clone() for k, v in state.items()}, str(dst), metadata={"format": "pt"})


def _copy_component(src: Path, dst: Path) -> None:
    """A pipeline component's files: hard links where the file system allows (no second copy on disk), else
    copies; pickled weights as safetensors unless the component has safetensors already."""
    files = sorted(p for p in src.rglob("*") if p.is_file())
    has_safetensors = any(p.name.endswith(".safetensors") for p in files)
    for p in files:
        rel = p.relative_to(src)
        target = dst / rel
        target.parent.mkdir(parents=True, exist_ok=True)
        if _pickled(p.name):
            if not has_safetensors:
                _convert(p, target.with_name(_safetensors_name(p.name)))
            continue
        try:
            os.link(p.resolve(), target)
        except OSError:
            shutil.copy2(p.resolve(), target)


# ---- the snippet a user types ----

def _fmt(values) -> str:
    return "[" + ", ".join(repr(float(v)) for v in values) + "]"


def snippet(info: dict, out) -> str:
    """The Python that loads the exported directory ``out`` and makes ``SNIPPET_IMAGES`` images as
    ``sidfast sample CHECKPOINT --num 4`` (seed 0; ``--prompts`` a file with ``SNIPPET_PROMPT``) does: one
    scheduler call over all levels where that is the generator (``info["exact"]``), else a loop of one-level
    calls with the generator's re-noising between them."""
    n, shape, family = SNIPPET_IMAGES, info["shape"], info["family"]
    levels, exact, fresh = info["scheduler_levels"], info["exact"], info["renoise"] == "fresh"
    lines = ["import torch"]
    z = (f"z = torch.randn({n}, {', '.join(map(str, shape))}, generator=torch.Generator().manual_seed(0))"
         "  # N(0, I) latents")
    eps = "torch.randn(z.shape, generator=noise).to(x0)" if fresh else "z.to(x0)"
    what = "noise levels" if family == "vp" else "flow times t = sigma / (1 + sigma)"
    loop_head = [f"levels = {_fmt(levels)}  # the generator's {what}"]
    loop_head += ["noise = torch.Generator().manual_seed(1)  # fresh noise between the levels"] if fresh else []
    # the VP scheduler multiplies its input by the level (init_noise_sigma); the flow scheduler takes t z as given
    start = "z" if family == "vp" or levels[0] == 1.0 else f"{levels[0]!r} * z"
    if info["layout"] == "pipeline":
        pipe_cls = info["pipeline_class"]
        # SDXL's pipeline watermarks its images when invisible-watermark is installed; sidfast sample does not
        load = ", add_watermarker=False" if pipe_cls == "StableDiffusionXLPipeline" else ""
        lines += [f"from diffusers import {pipe_cls}", "", f"pipe = {pipe_cls}.from_pretrained({str(out)!r}{load})",
                  f"prompts = [{SNIPPET_PROMPT!r}] * {n}", z]
        if exact:
            return "\n".join(lines + [f"images = pipe(prompts, sigmas={_fmt(call_sigmas(family, levels))}, "
                                      f"latents={start}, guidance_scale=1.0).images"]) + "\n"
        one, last = ("[levels[k], 0.0]", "[levels[-1], 0.0]") if family == "vp" else ("[levels[k]]", "[levels[-1]]")
        step = (f"x = x0 / levels[k + 1] + {eps}" if family == "vp"
                else f"x = (1 - levels[k + 1]) * x0 + levels[k + 1] * {eps}")
        lines += [*loop_head, f"x = {start}", "for k in range(len(levels) - 1):",
                  f"    x0 = pipe(prompts, sigmas={one}, latents=x, guidance_scale=1.0, output_type=\"latent\").images",
                  f"    {step}", f"images = pipe(prompts, sigmas={last}, latents=x, guidance_scale=1.0).images"]
        return "\n".join(lines) + "\n"
    model_cls, sched_cls = info["model_class"], info["scheduler_class"]  # a VP model with its scheduler
    lines += [f"from diffusers import {sched_cls}, {model_cls}", "",
              f"model = {model_cls}.from_pretrained({str(out)!r})",
              f"scheduler = {sched_cls}.from_pretrained({str(out)!r})", z]
    labels = ""
    if info["num_classes"]:
        lines.append(f"class_labels = torch.arange({n}) % {info['num_classes']}  # image i: class i mod "
                     f"{info['num_classes']}")
        labels = ", class_labels=class_labels"
    call = f"scheduler.step(model(scheduler.scale_model_input(x, t), t{labels}).sample, t, x).prev_sample"
    if exact:
        lines += [f"scheduler.set_timesteps(sigmas={_fmt(call_sigmas(family, levels))})",
                  "x = z * scheduler.init_noise_sigma", "with torch.no_grad():", "    for t in scheduler.timesteps:",
                  f"        x = {call}", "images = x"]
        return "\n".join(lines) + "\n"
    lines += [*loop_head, "x = levels[0] * z", "with torch.no_grad():", "    for k, level in enumerate(levels):",
              "        scheduler.set_timesteps(sigmas=[level, 0.0])", "        t = scheduler.timesteps[0]",
              f"        x0 = {call}", "        if k + 1 < len(levels):", f"            x = x0 + levels[k + 1] * {eps}",
              "images = x0"]
    return "\n".join(lines) + "\n"


# ---- export ----

def _check_out(out: Path, overwrite: bool) -> None:
    if out.is_symlink() or (out.exists() and not out.is_dir()):
        raise ExportError(f"--out {str(out)!r} exists and is not a directory; give a directory to create")
    if out.is_dir() and any(out.iterdir()) and not overwrite:
        raise ExportError(f"--out {str(out)!r} exists and is not empty; give a new directory, or --overwrite to "
                          "replace it")


def _check_not_inside(out: Path, sources) -> None:
    """Refuse an ``--out`` that is, or holds, what export reads (``--overwrite`` would delete it)."""
    target = out.expanduser().resolve()
    for what, source in sources:
        if not source or (isinstance(source, str) and ":" in source and not Path(source).exists()):
            continue
        where = Path(source).expanduser().resolve()
        if where == target or target in where.parents:
            raise ExportError(f"--out {str(out)!r} holds {what} ({str(source)!r}); export into another directory")


def _not_diffusers(checkpoint, what: str) -> ExportError:
    return ExportError(f"CHECKPOINT {str(checkpoint)!r}: its generator is {what}, not a diffusers model; sidfast "
                       "export writes diffusers directories, for runs distilled from a diffusers teacher (distill "
                       f"--teacher DIFFUSERS_DIR); sample this student with: sidfast sample {checkpoint}")


def _check_teacher(checkpoint, data: dict, teacher) -> None:
    """Refuse, before loading any weights, a generator that cannot be a diffusers model: one with a recorded
    architecture, or a copy of a teacher (the one the run names, or ``--teacher``) that is a network checkpoint
    or ``module:function``."""
    if data.get("architecture"):
        raise _not_diffusers(checkpoint, f"a sidfast network ({data['architecture'].get('builder')})")
    for source in (data.get("teacher"), teacher):
        if not isinstance(source, str) or not source:
            continue  # build_generator says how to name the teacher
        path = Path(source).expanduser()
        if path.is_file():
            raise _not_diffusers(checkpoint, f"a copy of its teacher {source!r}, a sidfast network checkpoint")
        if not path.exists() and ":" in source:
            raise _not_diffusers(checkpoint, f"a copy of its teacher {source!r}, a module:function network")


def export_student(checkpoint, out, teacher: str | None = None, steps: int | None = None,
                   overwrite: bool = False) -> dict:
    """Write the EMA generator of a distillation checkpoint as a diffusers directory ``out``; returns what
    ``out/sidfast_export.json`` holds (with the ``snippet`` a user types).

    checkpoint: a run folder, ``checkpoint.pt``, ``checkpoint.dcp`` (sharded) or ``generator.pt``.
    teacher: where the teacher is now, when it moved since the run (its pipeline's other components are
        copied from there).
    steps: the generator steps to export (default: the K it was trained with), as ``sidfast sample --steps``.
    overwrite: replace a non-empty ``out``; either way ``out`` appears whole or not at all.
    """
    out = Path(out)
    _check_out(out, overwrite)
    path, data = student.read(checkpoint)
    if kind_of(data) != "distill":
        raise ExportError(f"CHECKPOINT {str(checkpoint)!r} is a network (teacher) checkpoint; sidfast export takes "
                          "a distill run: its folder, checkpoint.pt, checkpoint.dcp or generator.pt")
    source = teacher or data.get("teacher")
    _check_not_inside(out, [("the checkpoint", Path(checkpoint)), ("the teacher", source)])
    _check_teacher(checkpoint, data, teacher)
    try:
        net, conditioner = build_generator(data, path, teacher=teacher, with_conditioner=True)
    except CheckpointError as exc:
        raise CheckpointError(str(exc).replace("sidfast sample --teacher", "sidfast export --teacher")) from None
    model = getattr(net, "network", None)
    if isinstance(net, DiffusersDenoiser) and is_diffusers_model(model):
        family = "vp"
    elif isinstance(net, FlowDenoiser) and is_diffusers_model(model):
        family = "flow"
    else:
        raise _not_diffusers(checkpoint, f"a {type(net).__name__} around {type(model).__name__}")
    options = student.sampling_options(data)
    if steps is not None:
        options["gen_steps"] = steps
    levels = scheduler_levels(family, student.generator_levels(options))
    root = Path(source).expanduser()
    index = json.loads((root / "model_index.json").read_text()) if (root / "model_index.json").is_file() else {}
    key = next((k for k in ("unet", "transformer") if (root / k / "config.json").is_file()), None)
    model_dir = root if (root / "config.json").is_file() or key is None else root / key
    config = _teacher_scheduler_config(root, model_dir)
    scheduler = (_euler_scheduler(net, config, source) if family == "vp" else _flow_scheduler(net, config, source))
    layout = "model"
    if conditioner is None and family == "flow":
        raise ExportError(f"--teacher {source!r}: a flow-matching model outside a text-to-image pipeline is not "
                          "exported (export writes SD3 pipelines); sample it with sidfast sample")
    if conditioner is not None:
        layout = "pipeline"
        kind = text.PIPELINES[index["_class_name"]][0]
        if kind not in PIPELINE_KINDS:
            written = ", ".join(n for n, (k, _) in text.PIPELINES.items() if k in PIPELINE_KINDS)
            raise ExportError(f"--teacher {source!r}: {index['_class_name']} students are not exported yet "
                              f"(export writes {written}); sample them with sidfast sample")
    exact = options["gen_steps"] == 1 or options["renoise"] == "ddim"
    info = {"format": "sidfast.export", "version": 1, "sidfast": __version__, "checkpoint": str(path),
            "teacher": str(source), "family": family, "layout": layout,
            "pipeline_class": index.get("_class_name") if layout == "pipeline" else None,
            "model_class": type(model).__name__, "scheduler_class": type(scheduler).__name__,
            "shape": list(options["shape"]),
            "num_classes": options["num_classes"], "gen_steps": options["gen_steps"],
            "step_spacing": options["step_spacing"], "renoise": options["renoise"],
            "levels": [float(s) for s in student.generator_levels(options)], "scheduler_levels": levels,
            "exact": exact, "call_sigmas": call_sigmas(family, levels) if exact else None}
    info["snippet"] = snippet(info, out)

    def write(tmp: Path) -> None:
        if layout == "model":
            model.save_pretrained(tmp, safe_serialization=True)
            scheduler.save_config(tmp)
        else:
            _write_pipeline(tmp, root, index, key, model, scheduler, source)
        (tmp / INFO_NAME).write_text(json.dumps(info, indent=2) + "\n")

    try:
        atomic_directory(out, write, replace=overwrite)
    except FileExistsError as exc:  # made meanwhile by another process
        raise ExportError(f"--out {str(out)!r}: {exc}; give a new directory, or --overwrite") from None
    except OSError as exc:  # a full disk, no permission: nothing was written (atomic_directory)
        where = f": {exc.filename}" if exc.filename else ""
        raise ExportError(f"--out {str(out)!r}: cannot write the export ({exc.strerror or exc}{where}); nothing "
                          "was written: choose another location or free space") from exc
    return info


def _write_pipeline(tmp: Path, root: Path, index: dict, key: str, model, scheduler, source: str) -> None:
    """The teacher's pipeline with the student as ``key`` and the export's scheduler."""
    for name, entry in index.items():
        if name.startswith("_") or not (isinstance(entry, list) and len(entry) == 2) or entry[1] is None:
            continue
        if name == key:
            model.save_pretrained(tmp / name, safe_serialization=True)
        elif name == "scheduler":
            scheduler.save_pretrained(tmp / name)
        elif not (root / name).is_dir():
            raise ExportError(f"--teacher {source!r}: model_index.json names {name} but the pipeline has no "
                              f"{name}/ folder to copy")
        else:
            _copy_component(root / name, tmp / name)
    new_index = dict(index, scheduler=["diffusers", type(scheduler).__name__])
    (tmp / "model_index.json").write_text(json.dumps(new_index, indent=2, sort_keys=True) + "\n")


__all__ = ["export_student", "snippet", "flow_time", "scheduler_levels", "call_sigmas", "ExportError",
           "INFO_NAME"]
