"""The options of ``sidfast distill``: one command-line option per ``TrainConfig`` field, and the
``TrainConfig`` they make: defaults < ``--preset`` < ``--config`` file < command line for a new run; defaults <
the resumed checkpoint's options (its preset's included) < ``--config`` file < command line for a resumed one.
"""
from __future__ import annotations

import argparse
import os

from sidfast.models.io import CheckpointError
from sidfast.training import presets
from sidfast.training.config import TrainConfig


def option_name(name: str) -> str:
    """The command-line spelling of a field or argument: ``batch_gpu`` -> ``--batch-gpu``."""
    return "--" + name.replace("_", "-")


def add_train_options(parser: argparse.ArgumentParser) -> None:
    """One command-line option per ``TrainConfig`` field (values are checked by ``TrainConfig.validate``)."""
    group = parser.add_argument_group("SiD options (defaults: the published recipe)")
    for f in TrainConfig.fields():
        if f.name in ("teacher", "resume"):
            continue
        default = f.default
        help_ = f.metadata["help"]
        if "(default:" not in help_:  # fields whose default is decided later say so in their help
            shown = " ".join(map(str, default)) if isinstance(default, tuple) else default
            help_ = f"{help_} (default: {shown})"
        kw = dict(dest=f.name, default=argparse.SUPPRESS, help=help_)
        choices = f.metadata.get("choices")
        if isinstance(default, bool):
            group.add_argument(option_name(f.name), action=argparse.BooleanOptionalAction, **kw)
        elif f.name == "betas":
            group.add_argument(option_name(f.name), nargs=2, metavar=("BETA1", "BETA2"), **kw)
        elif f.name == "timesteps":
            group.add_argument(option_name(f.name), nargs=2, metavar=("LO", "HI"), **kw)
        elif f.name == "image_shape":
            group.add_argument(option_name(f.name), nargs="+", metavar="N", **kw)
        else:  # choices are shown, not enforced here: TrainConfig.validate checks file and command line alike
            metavar = "{" + ",".join(choices) + "}" if choices else f.name.upper()
            group.add_argument(option_name(f.name), metavar=metavar, **kw)


def _is_run_dir(path) -> bool:
    """Whether ``--resume PATH`` names a run folder (a directory that is not itself a sharded checkpoint,
    i.e. has no ``.metadata``) rather than a checkpoint."""
    from pathlib import Path

    path = Path(path)
    return path.is_dir() and not (path / ".metadata").exists()


def config_from_args(args: argparse.Namespace):
    """TrainConfig from defaults < --preset (or the --config file's preset) < --config file < explicit options;
    when resuming, the checkpoint's options take the preset's place, and a --preset must be the checkpoint's."""
    from sidfast.training.state import distill_checkpoint_in, read_distill
    from sidfast.training.config import TrainConfig

    explicit = {f.name: getattr(args, f.name) for f in TrainConfig.fields()
                if hasattr(args, f.name) and f.name not in ("teacher", "resume")}
    cfg = TrainConfig()
    resume = getattr(args, "resume", None)
    if resume is not None:
        if resume == "auto":
            run_dir = explicit.get("run_dir")
            if run_dir is None and getattr(args, "config", None):
                try:
                    run_dir = TrainConfig.from_file(args.config).run_dir
                except (ValueError, OSError) as exc:
                    raise type(exc)(f"--config: {exc}") from None
            resume = str(distill_checkpoint_in(run_dir or cfg.run_dir, bool(explicit.get("fsdp", False))))
        elif _is_run_dir(resume):  # a run folder: the checkpoint in it, and the folder as the run's directory
            from sidfast.training.config import CHECKPOINT_NAME, SHARDED_CHECKPOINT_NAME

            folder = resume
            resume = str(distill_checkpoint_in(folder, bool(explicit.get("fsdp", False))))
            if not os.path.exists(resume):
                raise CheckpointError(f"--resume: no {CHECKPOINT_NAME} or {SHARDED_CHECKPOINT_NAME} in "
                                      f"{folder!r}; give a checkpoint or the folder of a run that saved one")
            explicit.setdefault("run_dir", folder)
        try:
            saved = read_distill(resume)
        except CheckpointError as exc:
            raise CheckpointError(f"--resume: {exc}") from None
        known = {f.name for f in TrainConfig.fields()}
        values = {k: v for k, v in saved.get("config", {}).items() if k in known}
        if str(explicit.get("eval", "")).lower() in ("none", "off", "null"):  # the metric turned off: its options too
            values.update({name: None for name in ("eval_num", "eval_ref", "eval_inception")
                           if name not in explicit})
            values.update({"eval_every": 0.0} if "eval_every" not in explicit else {})
        cfg = TrainConfig.from_dict(values)
        cfg = cfg.replace(overwrite=False)
        del saved
    in_file = presets.read_options(args.config) if getattr(args, "config", None) else {}
    preset = explicit.get("preset", in_file.get("preset"))
    if preset is not None and resume is not None and preset != cfg.preset:
        raise ValueError(f"option preset {preset}: a resumed run keeps its checkpoint's options (preset "
                         f"{cfg.preset or 'none'}); resume without --preset, and give the single options to change")
    if preset is not None and resume is None:
        cfg = presets.apply(cfg, preset, {**in_file, **explicit})
    if getattr(args, "config", None):
        try:
            cfg = TrainConfig.from_file(args.config, base=cfg)
        except (ValueError, OSError) as exc:  # the file's own problem, said as the option that named it
            raise type(exc)(f"--config: {exc}") from None
    cfg = TrainConfig.from_dict(explicit, base=cfg)
    if getattr(args, "teacher", None):
        cfg = cfg.replace(teacher=args.teacher)
    if resume is not None:
        cfg = cfg.replace(resume=str(resume))
    return cfg


__all__ = ["add_train_options", "config_from_args", "option_name"]
