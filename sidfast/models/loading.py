"""Teachers and generators from what the user has (``sidfast distill --teacher``, ``sidfast sample``).

- ``load_teacher(source)``: a sidfast network checkpoint, a local diffusers model or pipeline directory
  (a U-Net with a VP scheduler, a flow-matching transformer, a text-to-image pipeline with its text
  encoders), or ``module:function``; errors are ``CheckpointError`` naming ``--teacher``.
- ``build_generator(data, path)``: the EMA generator of a distillation checkpoint, rebuilt from its recorded
  architecture or from its teacher (a LoRA generator: its factors merged into the teacher's weights).
"""
from __future__ import annotations

import json
import os
from pathlib import Path

from sidfast.models import text
from sidfast.models.denoiser import as_denoiser, load_entry_point
from sidfast.models.diffusers import DiffusersDenoiser, MissingSchedulerConfig
from sidfast.models.flow import FLOW_MODELS, FlowDenoiser
from sidfast.models.io import CheckpointError, build_network, import_entry_point, load_checkpoint
from sidfast.models.lora import load_lora_factors, lora_generator, merge_lora


def _check_readable(path: Path, what: str) -> None:
    if not path.exists():
        raise CheckpointError(f"{what} {str(path)!r} does not exist")
    if not os.access(path, os.R_OK) or (path.is_dir() and not os.access(path, os.X_OK)):
        raise CheckpointError(f"{what} {str(path)!r} is not readable (check its permissions)")


def _pipeline_index(path: Path) -> dict:
    index = path / "model_index.json"
    return json.loads(index.read_text()) if index.is_file() else {}


def _load_diffusers_teacher(path: Path, source: str, with_conditioner: bool, guidance):
    """(denoiser, TextConditioner or None) of a diffusers model or pipeline directory."""
    try:
        import diffusers  # noqa: F401
    except ImportError:
        raise CheckpointError(f"--teacher {source!r} is a directory, read as a diffusers model, but "
                              "diffusers is not installed: pip install 'sidfast[diffusers]'") from None
    index = _pipeline_index(path)
    pipeline = index.get("_class_name")
    is_text = pipeline in text.PIPELINES
    if not is_text and any(k.startswith("text_encoder") for k in index):
        raise CheckpointError(f"--teacher {source!r}: pipeline class {pipeline!r} is not supported; sidfast "
                              f"reads the text-to-image pipelines {', '.join(text.PIPELINES)}")
    if is_text and not with_conditioner:
        raise CheckpointError(f"--teacher {source!r} is a text-to-image pipeline ({pipeline}), which needs "
                              "prompts and its text encoders (sidfast distill --prompts FILE; from Python: "
                              "load_teacher(path, with_conditioner=True))")
    model_config = path / "config.json"
    model_class = json.loads(model_config.read_text()).get("_class_name") if model_config.is_file() else None
    flow = "transformer" in index or model_class in FLOW_MODELS
    try:
        if flow:
            scheduler = index.get("scheduler") or [None, None]
            if scheduler[1] is not None and "FlowMatch" not in str(scheduler[1]):
                raise ValueError(f"its transformer comes with scheduler {scheduler[1]}, not a flow-matching "
                                 "scheduler; sidfast reads transformers trained by flow matching")
            den = FlowDenoiser.from_pretrained(path, guidance=guidance, name="teacher")
        else:
            den = DiffusersDenoiser.from_pretrained(path, name="teacher")
        conditioner = None
        if is_text:
            dtype = next(iter(den.parameters())).dtype
            conditioner = text.TextConditioner.from_pretrained(path, torch_dtype=dtype)
    except MissingSchedulerConfig as exc:
        looked_for = ", ".join(map(repr, exc.looked_for))
        raise CheckpointError(f"--teacher {source!r}: no scheduler config to read the schedule and "
                              f"prediction type from (looked for {looked_for}); save the scheduler the model "
                              f"was trained with into it: scheduler.save_pretrained({source!r})") from None
    except (FileNotFoundError, ValueError, OSError, ImportError) as exc:
        raise CheckpointError(f"--teacher {source!r}: {exc}") from None
    return den, conditioner


def load_teacher(source: str, with_conditioner: bool = False, guidance: float | None = None):
    """(denoiser, architecture or None) for ``--teacher``: network checkpoint, diffusers dir, module:function.

    A diffusers directory is a model directory or a pipeline directory (``model_index.json``): ``unet/`` with
    a VP scheduler (``DiffusersDenoiser``) or ``transformer/`` with a flow-matching one (``FlowDenoiser``;
    ``guidance`` is the scale a guidance-distilled FLUX embeds). A text-to-image pipeline
    (``sidfast.models.text.PIPELINES``) also needs its text side: with ``with_conditioner`` the result is
    (denoiser, architecture, ``TextConditioner`` or None), and without it such a pipeline is an error.
    The architecture (``{"builder", "config"}``) is known for network checkpoints only. Errors are
    ``CheckpointError`` naming ``--teacher``.
    """
    if not isinstance(source, str) or not source:
        raise CheckpointError("--teacher is required: a sidfast checkpoint, a diffusers directory or "
                              "module:function")
    path = Path(source).expanduser()
    conditioner = None
    architecture = None
    if not path.exists() and ":" in source:  # module:function (import_entry_point says what is wrong with it)
        try:
            den = load_entry_point(source, name="teacher")
        except (ImportError, ValueError, TypeError) as exc:
            raise CheckpointError(f"--teacher {source!r}: {exc}") from None
    else:
        _check_readable(path, "--teacher")
        if path.is_dir():
            den, conditioner = _load_diffusers_teacher(path, source, with_conditioner, guidance)
        else:
            data = load_checkpoint(path, "network")
            den = build_network(data, path).eval()
            architecture = {"builder": data["builder"], "config": data["config"]}
    return (den, architecture, conditioner) if with_conditioner else (den, architecture)


def _generator_network(data: dict, path, teacher: str | None):
    """(the untrained generator network, the teacher's TextConditioner or None): its recorded architecture,
    else a fresh copy of its teacher."""
    arch = data.get("architecture")
    if arch:
        if teacher is not None:
            raise CheckpointError(f"checkpoint {str(path)!r} records its generator's architecture; it needs "
                                  "no --teacher")
        try:
            return import_entry_point(arch["builder"])(arch["config"]), None
        except Exception as exc:
            raise CheckpointError(f"checkpoint {str(path)!r}: cannot rebuild the generator with "
                                  f"{arch.get('builder')!r} ({type(exc).__name__}: {exc})") from None
    return _teacher_network(data, path, teacher)


def _teacher_network(data: dict, path, teacher: str | None):
    """(the teacher a checkpoint's generator was distilled from, its TextConditioner or None): ``teacher``
    (where it is now) or the one the checkpoint names."""
    stored = data.get("teacher")
    if teacher is None and not stored:
        raise CheckpointError(f"checkpoint {str(path)!r} does not say how to rebuild its generator (it was "
                              "written by distill() without architecture= or config.teacher); give its "
                              "teacher: sidfast sample --teacher PATH")
    if teacher is None and not Path(stored).expanduser().exists() and ":" not in stored:
        raise CheckpointError(f"checkpoint {str(path)!r} rebuilds its generator from its teacher {stored!r}, "
                              "which does not exist here (a relative path is read from the current "
                              "directory); give the teacher's location: sidfast sample --teacher PATH")
    den, _, conditioner = load_teacher(teacher or stored, with_conditioner=True)
    return den, conditioner


def build_generator(data: dict, path, teacher: str | None = None, with_conditioner: bool = False):
    """The EMA generator (a Denoiser in eval mode) of a distillation checkpoint read by ``load_checkpoint``.

    teacher: where the teacher is now, for checkpoints that rebuild the generator from their teacher (those
    without a recorded architecture, and a LoRA generator's) when the teacher they name has moved.
    with_conditioner: return (generator, the teacher's ``TextConditioner`` or None), for a text-to-image
    student's prompts.
    """
    config = data.get("config") or {}
    if config.get("generator") == "lora":
        net, conditioner = _lora_generator(data, path, teacher, int(config.get("lora_rank", 64)))
        return (net, conditioner) if with_conditioner else net
    net, conditioner = _generator_network(data, path, teacher)
    net = as_denoiser(net, name="generator")
    try:
        net.load_state_dict(data["generator_ema"])
    except RuntimeError as exc:
        raise CheckpointError(f"checkpoint {str(path)!r}: generator weights do not fit the rebuilt network: "
                              f"{str(exc)[:300]}") from None
    net = net.eval().requires_grad_(False)
    return (net, conditioner) if with_conditioner else net


def _lora_generator(data: dict, path, teacher: str | None, rank: int):
    """(the EMA generator of a run with ``generator="lora"``, the teacher's TextConditioner or None): its
    factors over the teacher's weights, merged into a plain network (``sidfast.models.lora.merge_lora``) that owns
    its weights, as a sampler may move it."""
    net, conditioner = _teacher_network(data, path, teacher)
    net = as_denoiser(net, name="teacher")
    generator = lora_generator(net, rank, seed=0)  # its factors are the checkpoint's
    try:
        load_lora_factors(generator, data["generator_ema"], "generator")
    except (RuntimeError, ValueError) as exc:
        raise CheckpointError(f"checkpoint {str(path)!r}: generator factors do not fit the rebuilt teacher "
                              f"(another teacher?): {str(exc)[:300]}") from None
    return merge_lora(generator.net).eval().requires_grad_(False), conditioner


__all__ = ["load_teacher", "build_generator"]
