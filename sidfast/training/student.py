"""A run's student for sampling: the network and sampling options of a checkpoint, a sharded checkpoint
or a run folder (what ``sidfast sample`` samples)."""
from __future__ import annotations

from sidfast.generator import generator_sigmas
from sidfast.models import text
from sidfast.models.denoiser import as_denoiser
from sidfast.models.introspect import infer_image_shape, infer_num_classes
from sidfast.models.io import build_network, kind_of, load_checkpoint
from sidfast.models.loading import build_generator
from sidfast.models.vae import LatentDecoder
from sidfast.training.state import read_sharded_generator, sample_source


def from_checkpoint(path, teacher: str | None = None, prompts=None):
    """(network, keyword arguments of ``sample_images``) for a sidfast checkpoint: the EMA generator of a
    distillation checkpoint (the K generator steps it was trained with), or the network of a network
    checkpoint (a diffusion denoiser). ``path``: a checkpoint file, a sharded checkpoint directory
    (``checkpoint.dcp``) or a run folder (its newer checkpoint, else its ``generator.pt``).

    teacher: where the teacher of a distillation checkpoint is now (``build_generator``).
    prompts: a text file of prompts, one per line, for the student of a text-to-image teacher (required
        there, refused elsewhere): image i gets prompt i mod their number, its embedding from the teacher
        pipeline's text encoders, and the latents are decoded by the pipeline's VAE (``sidfast.models.vae``).
    """
    path, data = read(path)
    if kind_of(data) == "distill":
        net, conditioner = build_generator(data, path, teacher=teacher, with_conditioner=True)
        prompt_options = _text_options(conditioner, prompts, teacher or data.get("teacher"))
        return net, {**prompt_options, **sampling_options(data)}
    if teacher is not None:
        raise ValueError("argument teacher is for distillation checkpoints; this is a network checkpoint")
    if prompts is not None:
        raise ValueError("argument prompts is for students of text-to-image teachers; this is a network "
                         "checkpoint")
    net = as_denoiser(build_network(data, path)).eval()
    shape = infer_image_shape(net)
    if shape is None:
        raise ValueError(f"checkpoint {str(path)!r}: cannot tell the image shape of its network")
    return net, {"shape": shape, "num_classes": infer_num_classes(net)}


def read(path):
    """(the file or sharded directory read, its data as ``load_checkpoint`` returns it) for a checkpoint file,
    a sharded checkpoint directory or a run folder (its newer checkpoint, else its ``generator.pt``)."""
    path = sample_source(path)
    if path.is_dir():
        return path, read_sharded_generator(path)  # a sharded checkpoint, read without a process group
    return path, load_checkpoint(path, ("distill", "network"))


def sampling_options(data: dict) -> dict:
    """The keyword arguments of ``sample_images`` that a distillation checkpoint's data fixes: the sample
    shape, labels and the generator's steps (``generator_levels`` turns these into its noise levels)."""
    config = data.get("config") or {}
    return {"shape": tuple(data["image_shape"]), "sigma_init": float(data.get("sigma_init", 2.5)),
            "num_classes": int(data.get("num_classes") or 0),
            "label_format": data.get("label_format", "onehot"),
            "gen_steps": int(data.get("gen_steps", config.get("gen_steps", 1))),
            "step_spacing": data.get("step_spacing", config.get("step_spacing", "linear")),
            "renoise": data.get("renoise", config.get("renoise", "fresh"))}


def generator_levels(options: dict) -> list[float]:
    """The noise levels sigma_0 > ... > sigma_{K-1} of a student's K generator steps, from its
    ``sampling_options``: the levels ``sample_images`` runs (``sidfast.generator.generator_sigmas``), in one
    place for whatever else needs them (``sidfast export`` writes them into a diffusers scheduler)."""
    return generator_sigmas(options["gen_steps"], options["sigma_init"], options["step_spacing"])


def _text_options(conditioner, prompts, pipeline) -> dict:
    """``sample_images``'s ``cond`` (the prompts cycled, embedded by ``conditioner``) and ``decode`` (the
    pipeline's VAE) for a text-to-image student; nothing for other students."""
    if conditioner is None:
        if prompts is not None:
            raise ValueError("argument prompts is for students of text-to-image teachers; this student's "
                             "teacher takes no prompts")
        return {}
    if prompts is None:
        raise ValueError("this student's teacher is a text-to-image pipeline: give the prompts to sample, "
                         "argument prompts FILE (one prompt per line)")
    try:
        texts = text.read_prompts(prompts)
    except (FileNotFoundError, ValueError) as exc:
        raise ValueError(f"argument prompts: {exc}") from None

    def cond(start: int, n: int) -> dict:
        return conditioner.condition([texts[(start + i) % len(texts)] for i in range(n)])

    return {"cond": cond, "decode": LatentDecoder.from_pretrained(pipeline)}


__all__ = ["from_checkpoint", "read", "sampling_options", "generator_levels"]
