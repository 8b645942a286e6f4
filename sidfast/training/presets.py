"""The published launch scripts as presets: ``sidfast distill --preset NAME`` fills every option a script sets.

One preset per published run: SiD, SiDA and SiD²A on EDM's CIFAR-10 (unconditional, conditional), ImageNet 64,
FFHQ 64 and AFHQv2 64 teachers; SiD-LSG on Stable Diffusion 1.5 and 2.1-base; SiD-DiT on SD3 and SANA. A
preset's values are the script's flags and the defaults its training script fills in, in sidfast's options
(``--duration`` Mimg as iterations of the script's batch); what a script sets that no sidfast option holds is
named in the preset's ``notes`` and printed when a run starts, never dropped in silence. Options the user gives
(``--config`` file, flags) override a preset; the teacher family's recipe (``recipe.py``) fills what neither
sets. The table with its sources: docs/presets.md.
"""
from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import yaml

from sidfast.models.family import FAMILY_WORDS
from sidfast.training.config import TrainConfig

RUN_SETTINGS = ("the scripts' run settings (--outdir, --resume, --tick, --snap, --dump, --metrics, --data_stat, "
                "--seed: random when not given) are sidfast's own options (--run-dir, --log-every, "
                "--checkpoint-every, --sample-every, --seed)")


@dataclasses.dataclass(frozen=True)
class Preset:
    """A published launch script in sidfast's options: ``values`` (TrainConfig field -> value), the teacher
    family it is for, what it expects the user to give (teacher, data, prompts), its source (repository, commit,
    file, lines) and ``notes``: the script's settings that no sidfast option holds."""

    name: str
    paper: str
    family: str
    expects: str
    source: str
    values: dict
    notes: tuple = ()


def images_to_iterations(mimg: float, batch: int) -> int:
    """Iterations of ``--duration mimg`` (millions of images) at ``batch``: the published loops stop at the
    first iteration whose image count reaches ``int(duration * 1000)`` thousand images."""
    total = int(mimg * 1000) * 1000
    return -(-total // batch)


# ---- SiD, SiDA, SiD²A on EDM teachers (mingyuanzhou/SiD; main 01fbb13c: run_sid.sh, sid_train.py; sida a5510fdf:
# ---- run_sida.sh, run_sid_sida.sh, sida_train.py, sida_training/sida_training_loop.py)
# Common to every EDM script: --tmax 800 --init_sigma 2.5 --ls 1 --lsg 100; lr = glr; --fp16 gives Adam eps 1e-6.
# dataset: (teacher, --cond, --arch [--cres], --dropout, --augment, --ema Mimg, SiDA data); SCRIPT_CASES: the
# scripts' names of the datasets
EDM_DATASETS = {
    "cifar10-uncond": ("EDM's CIFAR-10 unconditional teacher (edm-cifar10-32x32-uncond-vp.pkl)", False,
                       "ddpmpp", 0.13, 0.12, 0.5, "CIFAR-10 32x32 (cifar10-32x32.zip)"),
    "cifar10-cond": ("EDM's CIFAR-10 conditional teacher (edm-cifar10-32x32-cond-vp.pkl)", True,
                     "ddpmpp", 0.13, 0.12, 0.5, "CIFAR-10 32x32 with labels (cifar10-32x32.zip)"),
    "imagenet64": ("EDM's ImageNet 64x64 conditional teacher (edm-imagenet-64x64-cond-adm.pkl)", True,
                   "adm", 0.1, 0.0, 2.0, "ImageNet 64x64 with labels (imagenet-64x64.zip)"),
    "ffhq64": ("EDM's FFHQ 64x64 teacher (edm-ffhq-64x64-uncond-vp.pkl)", False,
               "ddpmpp --cres 1,2,2,2", 0.05, 0.15, 0.5, "FFHQ 64x64 (ffhq-64x64.zip)"),
    "afhq64": ("EDM's AFHQv2 64x64 teacher (edm-afhqv2-64x64-uncond-vp.pkl)", False,
               "ddpmpp --cres 1,2,2,2", 0.05, 0.15, 0.5,
               "AFHQv2 64x64 (afhqv2-64x64.zip; both SiDA scripts pass ffhq-64x64.zip here, apparently a slip: "
               "their FID statistics are AFHQv2's)"),
}
SCRIPT_CASES = {"cifar10-uncond": "cifar10-uncond", "cifar10-cond": "cifar10-cond", "imagenet64": "imagenet64-cond",
                "ffhq64": "ffhq64", "afhq64": "afhq64-v2"}
# SiD (run_sid.sh): dataset -> (lines, --batch, --batch-gpu, --lr, --alpha, --fp16, --duration Mimg, more)
SID = {
    "cifar10-uncond": ("25-45", 256, 16, 1e-5, 1.2, False, 500, {}),
    "cifar10-cond": ("50-71", 256, 16, 1e-5, 1.2, False, 800, {}),
    "imagenet64": ("74-98", 8192, 16, 4e-6, 1.2, True, 1000, {}),
    "ffhq64": ("101-125", 512, 32, 1e-5, 1.2, True, 500, {"generator_beta1": 0.9}),  # --g_beta1 0.9
    "afhq64": ("128-151", 512, 32, 5e-6, 1.0, True, 500, {}),
}
# SiDA (run_sida.sh) and SiD²A (run_sid_sida.sh): --alpha 1, --lsd 1, --lsg_gan 0.01, --use_gan 1
# dataset -> (run_sida.sh lines, run_sid_sida.sh lines, --batch, --batch-gpu, --lr, --fp16, SiDA Mimg, SiD²A Mimg)
SIDA = {
    "cifar10-uncond": ("22-49", "22-50", 256, 32, 1e-5, False, 300, 100),
    "cifar10-cond": ("85-113", "85-114", 256, 32, 1e-5, False, 300, 100),
    "imagenet64": ("118-150", "118-151", 8192, 32, 4e-6, True, 300, 100),  # --duration given twice: the last wins
    "ffhq64": ("154-185", "154-186", 512, 64, 1e-5, True, 200, 100),
    "afhq64": ("190-221", "190-222", 512, 64, 5e-6, True, 200, 100),
}
SIDA_GATES = {"gan_start_kimg": 200.0, "g_start_kimg": 100.0}  # sida_training_loop.py 410 and 425: 200k, 100k images


def _edm_values(method, batch, batch_gpu, lr, alpha, fp16, ema_mimg, mimg) -> dict:
    return {"method": method, "batch": batch, "batch_gpu": batch_gpu, "lr": lr, "alpha": alpha, "tmax": 800,
            "t_init": 2.5, "loss_scale_fake": 1.0, "loss_scale_g": 100.0, "ema_halflife_kimg": ema_mimg * 1000,
            "precision": "fp16" if fp16 else "fp32", "iterations": images_to_iterations(mimg, batch)}


def _edm_notes(dataset: str) -> tuple:
    _, cond, arch, dropout, _, _, _ = EDM_DATASETS[dataset]
    notes = [f"--dropout {dropout:g} (the networks keep the teacher network's own dropout)",
             f"--arch {arch} (the teacher's network; --teacher gives it)"]
    if cond:
        notes.append("--cond 1 (sidfast reads the classes from the teacher)")
    return tuple(notes)


def _sid(dataset) -> Preset:
    """SiD's run_sid.sh on ``dataset``."""
    lines, batch, batch_gpu, lr, alpha, fp16, mimg, more = SID[dataset]
    teacher, _, _, _, augment, ema, _ = EDM_DATASETS[dataset]
    return Preset(dataset, "SiD", "edm", f"--teacher {teacher}",
                  f"mingyuanzhou/SiD main 01fbb13c, run_sid.sh {SCRIPT_CASES[dataset]} (lines {lines}), sid_train.py "
                  "defaults",
                  {**_edm_values("sid", batch, batch_gpu, lr, alpha, fp16, ema, mimg), "augment_p": augment, **more},
                  _edm_notes(dataset) + ("--data (read only for FID)",))


def _sida(dataset, method) -> Preset:
    """SiDA (``method`` sida, run_sida.sh) or SiD²A (sid2a, run_sid_sida.sh) on ``dataset``."""
    lines_a, lines_2a, batch, batch_gpu, lr, fp16, mimg_a, mimg_2a = SIDA[dataset]
    teacher, _, _, _, augment, ema, data = EDM_DATASETS[dataset]
    values = {**_edm_values(method, batch, batch_gpu, lr, 1.0, fp16, ema, mimg_a if method == "sida" else mimg_2a),
              "augment_p": augment, "loss_scale_d": 1.0, "loss_scale_gan": 0.01, **SIDA_GATES}
    notes = _edm_notes(dataset) + ("--save_best_and_last 1 (sidfast keeps the last "
                                                           "checkpoint)",)
    expects = f"--teacher {teacher}; --data {data}"
    script = f"run_sida.sh {SCRIPT_CASES[dataset]} (lines {lines_a})"
    if method == "sid2a":
        expects += ("; --init-generator: a sidfast SiD checkpoint of this teacher (published: the released SiD "
                    "generator)")
        script = f"run_sid_sida.sh {SCRIPT_CASES[dataset]} (lines {lines_2a})"
        notes += ("--sid_model URL (the published SiD generator: give --init-generator)",)
    return Preset(f"{method}-{dataset}", "SiDA" if method == "sida" else "SiD²A", "edm", expects,
                  f"mingyuanzhou/SiD sida a5510fdf, {script}, sida_train.py defaults, "
                  "sida_training/sida_training_loop.py lines 410, 425", values, notes)


# ---- SiD-LSG on Stable Diffusion (mingyuanzhou/SiD-LSG 709fc22: run_sid.sh, sid_train.py defaults --ls 1 --lsg 1
# ---- --tmin 20 --tmax 980 (randint: 20..979) --num_steps 1)
def _lsg(name, case, model, lines) -> Preset:
    """SiD-LSG's run_sid.sh ``case`` (lines ``lines``), distilling ``model``."""
    values = {"method": "sid", "batch": 512, "batch_gpu": 1, "lr": 1e-6, "alpha": 1.0, "t_init": 625,
              "guidance": "lsg", "cfg": 2.0, "loss_scale_fake": 1.0, "loss_scale_g": 1.0,
              "ema_halflife_kimg": 50.0, "precision": "fp32", "timesteps": (20, 979), "gen_steps": 1,
              "activation_checkpointing": False, "iterations": images_to_iterations(10, 512)}
    return Preset(name, "SiD-LSG", "ddpm",
                  f"--teacher a local diffusers pipeline of {model}; --prompts FILE (published: Aesthetics 6+ "
                  "prompts, one per line)",
                  f"mingyuanzhou/SiD-LSG 709fc22, run_sid.sh {case} (lines {lines}), sid_train.py defaults", values,
                  ("--enable_xformers 1 (an attention kernel choice)", "--resolution 512 (the teacher's: 4x64x64 "
                   "latents)", "--data_prompt_text (give the prompts with --prompts)", "--data MS-COCO val and "
                   "--metrics (evaluation only)", "--optimizer adam (sidfast's)"))


# ---- SiD-DiT on flow-matching transformers (apple-aiml-research/ml-sid-dit 9596ed92)
_DIT_NOTES = ("FSDP (the published trainer always shards: add --fsdp when launching with torchrun)",
              "--resolution 512 (the teacher's)", "--fp16 0 --bf16 0 (not pure bf16: the AMP variant, "
              "--precision bf16)", "--train_diffusiongan 0 (no Diffusion-GAN, as in sidfast)",
              "--data_prompt_text (give the prompts with --prompts)", "--data MS-COCO val and --metrics "
              "(evaluation only)", "--optimizer adam (sidfast's)")


def _dit(name, model, source, batch_gpu, lr, mimg, notes) -> Preset:
    """SiD-DiT distilling ``model`` as ``source`` launches it: ``--batch-gpu``, ``--lr`` (= glr), ``--duration``."""
    values = {"method": "sid", "batch": 256, "batch_gpu": batch_gpu, "lr": lr, "alpha": 1.0, "t_init": 1.0,
              "gen_steps": 4, "guidance": "lsg", "cfg": 4.5, "loss_scale_fake": 1.0, "loss_scale_g": 100.0,
              "ema_halflife_kimg": 0.0, "precision": "bf16", "activation_checkpointing": True, "renoise": "fresh",
              "generator_weighting": "1-t", "iterations": images_to_iterations(mimg, 256)}
    return Preset(name, "SiD-DiT", "flow",
                  f"--teacher a local diffusers pipeline of {model}; --prompts FILE (published: Aesthetics 6+ or "
                  "midjourney-v6-llava prompts)", source, values, _DIT_NOTES + notes)


PRESETS: dict[str, Preset] = {p.name: p for p in [
    *map(_sid, SID), *(_sida(d, "sida") for d in SIDA), *(_sida(d, "sid2a") for d in SIDA),
    _lsg("sd15", "sd1.5", "runwayml/stable-diffusion-v1-5", "63-88"),
    _lsg("sd21", "sd2.1_base", "stabilityai/stable-diffusion-2-1-base", "95-119"),
    _dit("sd3", "stabilityai/stable-diffusion-3-medium-diffusers",
         "apple-aiml-research/ml-sid-dit 9596ed92, sid_dit_sd3_train.py docstring example (lines 27-60), "
         "README.md 'Training Configurations' (AMP + FSDP: lr = glr = 1e-6)", 16, 1e-6, 2,
         ("--lr/--glr 0.000005 of the sid_dit_sd3_train.py example (a SANA model) give way to the README's "
          "AMP value for SD3, 1e-6",)),
    _dit("sana", "Efficient-Large-Model/Sana_600M_512px_diffusers",
         "apple-aiml-research/ml-sid-dit 9596ed92, run_sid_dit.sh start_training (lines 224-256), sid_dit_train.py "
         "defaults", 8, 5e-6, 1,
         ("--ls, --lsg, --ema: not in the script; its trainer (sid_sdxl_train_fsdp.py) is not in the "
          "repository, so sid_dit_train.py's defaults 1, 100, 0 are used",)),
]}
# a preset's value yields to the option a user gives that sets the same thing another way
SAME_THING = {"t_init": "sigma_init"}
UNSCALED_GUIDANCE = ("none", "zero")  # guidance that takes no --cfg


def option(name: str) -> str:
    return "--" + name.replace("_", "-")


def show(value) -> str:
    """A value as the command line writes it."""
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, tuple):
        return " ".join(map(str, value))
    return f"{value:g}" if isinstance(value, float) else str(value)


def flags(values: dict) -> str:
    """``--batch 256 --lr 1e-05 --no-compile ...``: values as command-line flags."""
    return " ".join((option(k) if v else "--no-" + option(k)[2:]) if isinstance(v, bool) else f"{option(k)} {show(v)}"
                    for k, v in values.items())


def get(name) -> Preset:
    """The preset ``name``; an unknown name is an error that lists them."""
    if name not in PRESETS:
        raise ValueError(f"option preset {name!r} is not a preset; choose one of {', '.join(PRESETS)} (--preset "
                         "list prints their options)")
    return PRESETS[name]


def check_family(name, family: str) -> None:
    """An error when preset ``name`` was published for another teacher family than ``family``."""
    preset = get(name)
    if preset.family != family:
        fits = [n for n, p in PRESETS.items() if p.family == family]
        raise ValueError(f"option preset {name} is {preset.paper}'s launch script for {FAMILY_WORDS[preset.family]}, "
                         f"but this teacher is {FAMILY_WORDS[family]}: use one of {', '.join(fits)}, or no preset")


def apply(cfg: TrainConfig, name, given=None) -> TrainConfig:
    """``cfg`` with preset ``name``'s values over it and ``preset`` set to ``name``. ``given``: the options the
    user sets (a ``--config`` file's and the flags, name -> value), which the caller lays over the result; a
    preset value they set another way yields to them (``--sigma-init`` the preset's ``--t-init``; ``--guidance
    none`` or ``zero`` its ``--cfg``)."""
    preset = get(name)
    given = {str(k).replace("-", "_"): v for k, v in (given or {}).items()}
    values = {k: v for k, v in preset.values.items() if SAME_THING.get(k) not in given}
    if "guidance" in given:  # the user's guidance (laid over this) with the preset's scale, or none
        values.pop("guidance", None)
        if str(given["guidance"]).lower() in UNSCALED_GUIDANCE and "cfg" not in given:
            values.pop("cfg", None)
    return TrainConfig.from_dict({**values, "preset": name}, base=cfg)


def config(name: str, **options) -> TrainConfig:
    """The ``TrainConfig`` of preset ``name`` with ``options`` over it: what ``sidfast distill --preset NAME``
    builds from its flags, for Python callers."""
    return TrainConfig.from_dict(options, base=apply(TrainConfig(), name, options))


def read_options(path) -> dict:
    """The options a ``--config`` file sets, name -> value, to see its preset and what it overrides before
    ``TrainConfig.from_file`` reads it over them; {} for a file it cannot read, whose problem ``from_file``
    then reports in full."""
    try:
        text = Path(path).read_text(encoding="utf-8")
        data = json.loads(text) if Path(path).suffix.lower() == ".json" else yaml.safe_load(text)
        return dict(data or {})
    except (OSError, ValueError, TypeError, yaml.YAMLError):
        return {}


def lines(cfg: TrainConfig) -> list[str]:
    """What ``sidfast distill`` prints for ``cfg.preset`` when a run starts: the preset and its source, the
    options of it that the run's options override, and the script's settings that no sidfast option holds."""
    preset = get(cfg.preset)
    out = [f"sidfast distill: preset {preset.name} ({preset.paper}: {preset.source}): {flags(preset.values)}"]
    changed = [f"{option(k)} {show(getattr(cfg, k))} (preset {show(v)})" for k, v in preset.values.items()
               if not _same(getattr(cfg, k), v)]
    if changed:
        out.append("  overridden by your options: " + ", ".join(changed))
    if preset.notes:
        out.append("  not set by sidfast: " + "; ".join(preset.notes))
    return out


def _same(a, b) -> bool:
    if isinstance(a, float) or isinstance(b, float):
        return a is not None and b is not None and float(a) == float(b)
    return a == b


def table() -> str:
    """``sidfast distill --preset list``: each preset, what it expects, its options and its source."""
    out = []
    for p in PRESETS.values():
        out += [f"{p.name}  ({p.paper}, {p.family} teachers)", f"    expects: {p.expects}",
                f"    options: {flags(p.values)}", f"    from: {p.source}"]
        if p.notes:
            out.append(f"    not set by sidfast: {'; '.join(p.notes)}")
    return "\n".join(out + ["", f"Options you give override a preset's. Every preset: {RUN_SETTINGS}."])


__all__ = ["PRESETS", "Preset", "apply", "config", "check_family", "get", "lines", "table",
           "images_to_iterations"]
