"""The ``sidfast`` command: demo, train-teacher, distill, sample, plan.

    sidfast demo [--quick] [--method sida | --conditional | --gen-steps K] [--seeds N] [--out DIR]
    sidfast train-teacher --out teacher.pt [--iterations N] [--conditional] ...
    sidfast distill --teacher SRC [--config cfg.yaml|json] [--resume [CKPT]] [--<option> VALUE ...]
    sidfast sample CKPT --out grid.png|grid.jpg|DIR [--num N] [--steps K] [--teacher SRC]
    sidfast plan --teacher SRC|--model NAME [--resolution PX] [--gpus N] [--gpu-memory 80GB] ... | --table

``--teacher`` accepts a sidfast network checkpoint (``train-teacher`` writes one), a local diffusers
directory (``save_pretrained`` of a ``UNet2DModel`` with its scheduler config, or a text-to-image pipeline
with its text encoders, distilled from the prompts of ``--prompts FILE``), or ``module:function``
returning an EDM-style module ``net(x, sigma, class_labels) -> x0``. Guidance: ``--guidance
lsg|long|short|zero|anti --cfg K`` (scales overridden by ``--cfg-fake-train``, ``--cfg-fake``,
``--cfg-teacher``); a few-step generator: ``--gen-steps K``. Options: defaults < the
checkpoint's options when resuming < ``--config`` file < command line. User errors print one line
``sidfast <command>: error: ...`` and exit 2; a run stopped by SIGINT/SIGTERM saves and exits 130/143.
"""
from __future__ import annotations

import argparse
import difflib
import os
import re
import sys
import tempfile
from pathlib import Path

from sidfast import __version__, samplers
from sidfast.ops._native import NativeExtensionError
from sidfast.demo.run import add_demo_arguments, run_from_args
from sidfast.demo.teacher import write_teacher
from sidfast.evaluate.loop_metrics import metric_for
from sidfast.models import loading
from sidfast.models.io import CheckpointError
from sidfast.models.lora import NETWORK_KINDS
from sidfast.plan.known import KNOWN_MODELS
from sidfast.plan.memory import PLAN_PRECISIONS, SHARDINGS, plan_memory, predictions_table
from sidfast.training.loop import distill
from sidfast.training import student
from sidfast.training.config import TrainConfig
from sidfast.training.options import add_train_options, config_from_args, option_name
from sidfast.utils import images, runtime

EXIT_USAGE = 2
EXIT_SIGNAL = {"SIGINT": 130, "SIGTERM": 143, "callback": 1}
TEACHER_HELP = "sidfast checkpoint, local diffusers directory, or module:function"
TEACHER_OPTIONS = (("iterations", int, "optimizer steps"), ("batch", int, "images per step"),
                   ("lr", float, "peak Adam learning rate"), ("width", int, "MLP width"),
                   ("depth", int, "residual blocks"), ("dropout", float, "dropout probability"))


class UserError(Exception):
    """An error the user can fix; printed without a traceback."""


_FIELDS = {f.name for f in TrainConfig.fields()}


def _cli_message(exc: Exception) -> str:
    """A library message in command-line words: ``option lr`` -> ``option --lr``, ``argument num`` ->
    ``argument --num``, ``resume='auto' (--resume)`` -> ``--resume``, ``pass null_class=`` -> ``pass
    --null-class`` (a keyword argument that is an option of ``sidfast distill``)."""
    text = re.sub(r"\b\w+=\S+ \((--[\w-]+)\)", r"\1", str(exc))
    text = re.sub(r"\b(option|argument) (\w+)", lambda m: f"{m[1]} {option_name(m[2])}", text)
    return re.sub(r"(?<![\w.-])([a-z][a-z0-9_]*)=(\S*)",
                  lambda m: f"{option_name(m[1])} {m[2]}".rstrip() if m[1] in _FIELDS else m[0], text)


# numbers argparse would take for options ("-1e-4" is not in its pattern of negative numbers): accepted as
# values, so that the option's own range check answers
_NUMBER = re.compile(r"^-(\d+\.?\d*|\.\d+)([eE][-+]?\d+)?$|^-(inf|infinity|nan)$", re.IGNORECASE)


class _Parser(argparse.ArgumentParser):
    """argparse with one-line errors (``sidfast distill: error: ...``, the usage left to ``--help``) that
    takes negative numbers, ``-1e-4`` included, as option values."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self._negative_number_matcher = _NUMBER

    def error(self, message):
        self.exit(EXIT_USAGE, f"{self.prog}: error: {message} (see {self.prog} --help)\n")


# ---- the parser: one function per command ----

def build_parser() -> argparse.ArgumentParser:
    p = _Parser(prog="sidfast", description="Score identity Distillation (SiD): one-step "
                                "generators from diffusion models.")
    p.add_argument("--version", action="version", version=f"sidfast {__version__}")
    sub = p.add_subparsers(dest="command", metavar="COMMAND")
    sub.required = True
    for add_command in (_demo_parser, _train_teacher_parser, _distill_parser, _sample_parser, _plan_parser):
        add_command(sub)
    return p


def _command(sub, name: str, handler, help_: str, description: str) -> argparse.ArgumentParser:
    p = sub.add_parser(name, help=help_, description=description)
    p.set_defaults(handler=handler, command_parser=p)
    return p


def _device_arg(parser):
    parser.add_argument("--device", default="auto", help="auto, cpu, cuda or cuda:N (default: auto)")


def _demo_parser(sub) -> None:
    d = _command(sub, "demo", cmd_demo,
                 "train a digits teacher, distill it, compare teacher and one-step student",
                 "The embedded demo: scikit-learn's 8x8 digits, no download.")
    add_demo_arguments(d)
    _device_arg(d)


def _train_teacher_parser(sub) -> None:
    t = _command(sub, "train-teacher", cmd_train_teacher, "train a small EDM teacher on the bundled digits",
                 "Train the demo's EDM-preconditioned MLP on scikit-learn's 8x8 digits and write a sidfast "
                 "network checkpoint usable as distill --teacher.")
    t.add_argument("--out", required=True, help="checkpoint file to write, e.g. teacher.pt")
    for name, kind, what in TEACHER_OPTIONS:
        t.add_argument(option_name(name), type=kind, default=None, help=f"{what} (default: the demo's)")
    t.add_argument("--conditional", action="store_true", help="class-conditional teacher (10 classes)")
    t.add_argument("--seed", type=int, default=0, help="random seed (default: 0)")
    _device_arg(t)


def _distill_parser(sub) -> None:
    s = _command(sub, "distill", cmd_distill, "distill a teacher into a one-step generator with SiD",
                 "Run SiD. Under torchrun every process runs this command; rank 0 writes.")
    s.add_argument("--teacher", help=f"{TEACHER_HELP} (default when resuming: the checkpoint's)")
    s.add_argument("--config", help="YAML or JSON file of options (command-line options override it)")
    s.add_argument("--resume", nargs="?", const="auto", default=None, metavar="CKPT",
                   help="continue a run from CKPT, or from the checkpoint in the run folder CKPT (default: "
                        "RUN_DIR/checkpoint.pt)")
    add_train_options(s)


def _sample_parser(sub) -> None:
    m = _command(sub, "sample", cmd_sample, "write images from a distillation or teacher checkpoint",
                 "One-step samples from a distillation checkpoint (its EMA generator) or multi-step EDM Heun "
                 "samples from a network checkpoint.")
    m.add_argument("checkpoint", help="a distill run folder (its checkpoint.pt, or checkpoint.dcp of an --fsdp "
                                      "run), one of those, a generator.pt, or a train-teacher checkpoint")
    m.add_argument("--out", required=True, help="an image name (.png, .jpg) for one grid, or a name "
                                                "without a suffix for a directory of PNGs, one per image")
    m.add_argument("--num", type=int, default=64, help="number of images (default: 64)")
    m.add_argument("--seed", type=int, default=0, help="random seed of the latents (default: 0)")
    m.add_argument("--steps", type=int, default=None,
                   help="generator steps of a distillation checkpoint (default: the K it was trained "
                        "with) or Heun steps of a teacher checkpoint (default: 18)")
    m.add_argument("--class-label", type=int, default=None, help="one class for all images (default: cycle)")
    m.add_argument("--prompts", default=None, metavar="FILE",
                   help="for the student of a text-to-image teacher: a text file of prompts, one per line, image "
                        "i gets prompt i mod their number; the latents are decoded by the pipeline's VAE")
    m.add_argument("--batch", type=int, default=256, help="images per forward pass (default: 256)")
    m.add_argument("--teacher", default=None,
                   help=f"the teacher ({TEACHER_HELP}) of a distillation checkpoint that names no "
                        "architecture (default: the path it stored)")
    _device_arg(m)


def _plan_parser(sub) -> None:
    n = _command(sub, "plan", cmd_plan, "predict the per-GPU memory of a distill run before renting GPUs",
                 "Weights, gradients, Adam and EMA counted exactly; activations measured on the meta device "
                 "(docs/plan.md). Give --teacher or --model, or --table for the published models.")
    add = n.add_argument
    source = n.add_mutually_exclusive_group(required=True)
    source.add_argument("--teacher", help=TEACHER_HELP)
    source.add_argument("--model", choices=list(KNOWN_MODELS),
                        help="a published model, built without weights")
    source.add_argument("--table", action="store_true", help="the README table of the published models")
    add("--resolution", type=int, help="pixels per side (default: the teacher's; required with --model)")
    add("--batch", type=int, default=1, help="samples per GPU (default: 1)")
    add("--gpus", type=int, default=1, help="GPUs of the run (default: 1)")
    add("--gpu-memory", default="80GiB", help="memory of one GPU, e.g. 80GB, 141GiB (default: 80GiB)")
    add("--margin", type=float, default=0.1, help="fraction of GPU memory kept free (default: 0.1)")
    add("--sharding", choices=SHARDINGS, default="ddp", help="(default: ddp)")
    add("--precision", choices=PLAN_PRECISIONS, default="bf16",
        help="fp32; bf16: fp32 weights under bf16 autocast; bf16-params: FSDP2 mixed precision "
             "(default: bf16)")
    add("--fake-score", choices=NETWORK_KINDS, default="full", help="(default: full)")
    add("--generator", choices=NETWORK_KINDS, default="full", help="(default: full)")
    add("--lora-rank", type=int, default=64, help="(default: 64)")
    add("--checkpointing", action="store_true", help="activation checkpointing of every block")
    add("--no-shard-teacher", dest="shard_teacher", action="store_false",
        help="replicate the frozen teacher under FSDP")
    add("--measure-device", default="meta", help="where activations are measured (default: meta)")


# ---- commands ----

def _user_error(exc: Exception) -> UserError:
    """A library error for the command line: a checkpoint's message as it is (it names its option), any
    other in command-line words."""
    return UserError(str(exc) if isinstance(exc, CheckpointError) else _cli_message(exc))


def _writable_dir(path, option: str, shown=None) -> None:
    """Create the directory ``path`` (with its parents) and check that a file can be written in it; a
    UserError naming ``option`` (given as ``shown``) otherwise."""
    path = Path(path)
    shown = str(shown if shown is not None else path)
    try:
        path.mkdir(parents=True, exist_ok=True)
        with tempfile.TemporaryFile(dir=path):
            pass
    except OSError as exc:
        blocker = next((p for p in (path, *path.parents) if p.exists() and not p.is_dir()), None)
        why = f"{str(blocker)!r} is a file, not a directory" if blocker else (exc.strerror or str(exc))
        raise UserError(f"{option} {shown!r}: cannot write into {str(path)!r} ({why}); choose a writable "
                        f"location") from None


def _device(spec: str):
    try:
        return runtime.resolve_device(spec)
    except ValueError as exc:
        raise UserError(f"--device: {exc}") from None


_DEMO_NAMES = {"out_dir": "--out", "gen_steps": "--gen-steps", "seeds": "--seeds", "seed": "--seed",
               "method": "--method", "conditional": "--conditional", "quick": "--quick"}


def cmd_demo(args) -> int:
    device = _device(args.device)
    try:
        result = run_from_args(args, str(device))
    except ValueError as exc:  # the demo's messages name its arguments as Python does: out_dir, gen_steps
        raise UserError(re.sub(r"\b(" + "|".join(_DEMO_NAMES) + r")\b", lambda m: _DEMO_NAMES[m[1]],
                               str(exc))) from None
    return 0 if result["passed"] else 1  # a failed quality bar is a failed command


def cmd_train_teacher(args) -> int:
    options = {name: getattr(args, name) for name, _, _ in TEACHER_OPTIONS}
    if not Path(args.out).is_dir():  # (a directory is refused below, in words)
        _writable_dir(Path(args.out).parent, "--out", args.out)
    try:
        write_teacher(args.out, conditional=args.conditional, seed=args.seed, device=_device(args.device),
                      **options)
    except ValueError as exc:
        raise UserError(_cli_message(exc)) from None
    return 0


def cmd_distill(args) -> int:
    try:
        cfg = config_from_args(args)
    except (ValueError, TypeError, FileNotFoundError) as exc:
        raise _user_error(exc) from None
    _device(cfg.device)
    try:
        metric = metric_for(cfg)
    except ValueError as exc:
        raise _user_error(exc) from None
    _writable_dir(cfg.run_dir, cfg.option("run_dir"))
    try:
        teacher, architecture, conditioner = loading.load_teacher(cfg.teacher, with_conditioner=True)
    except CheckpointError as exc:
        if cfg.resume is None or args.teacher:
            raise _named_teacher(exc) from None
        # the teacher's path came from the checkpoint, not from the command line
        stored = cfg.teacher
        what = ("does not exist (moved or deleted?)" if ":" not in stored and not Path(stored).expanduser().exists()
                else f"cannot be loaded ({exc})")
        raise UserError(f"--resume {cfg.resume}: the teacher stored in the checkpoint, {stored!r}, {what}; give "
                        f"its location with --teacher NEWPATH") from None
    try:
        result = distill(cfg, teacher, architecture=architecture, conditioner=conditioner, metric=metric)
    except ValueError as exc:
        raise _user_error(exc) from None
    if result.interrupted:
        print(f"stopped by {result.interrupted} at iteration {result.iteration}; resume with: "
              f"sidfast distill --resume --run-dir {cfg.run_dir}", file=sys.stderr)
        return EXIT_SIGNAL.get(result.interrupted, 1)
    return 0


def cmd_sample(args) -> int:
    try:
        images.check_samples_path(args.out, name="--out")
        for name in ("num", "steps", "batch"):
            value = getattr(args, name)
            if value is not None and value < 1:
                raise UserError(f"argument --{name} must be an integer >= 1, got {value}")
        out = Path(args.out)
        _writable_dir(out.parent if out.suffix else out, "--out", args.out)
        net, options = student.from_checkpoint(args.checkpoint, teacher=args.teacher, prompts=args.prompts)
        device = _device(args.device)
        if "decode" in options:
            options["decode"].to(device)
        steps = 18
        if args.steps is not None and "gen_steps" in options:
            options["gen_steps"] = args.steps
        elif args.steps is not None:
            steps = args.steps
        samples = samplers.sample_images(net.to(device), args.num, steps=steps, seed=args.seed,
                                         class_label=args.class_label, batch=args.batch, device=device,
                                         **options)
    except ValueError as exc:
        raise UserError(_cli_message(exc)) from None
    print("wrote " + images.save_samples(samples, args.out))
    return 0


def _named_teacher(exc: CheckpointError) -> CheckpointError:
    """A teacher's checkpoint error that names ``--teacher``, which the checkpoint reader does not know."""
    return exc if "--teacher" in str(exc) else CheckpointError(f"--teacher: {exc}")


def cmd_plan(args) -> int:
    try:
        teacher = loading.load_teacher(args.teacher)[0] if args.teacher else None
    except CheckpointError as exc:
        raise _named_teacher(exc) from None
    try:
        print(_plan_text(args, teacher))
    except ValueError as exc:
        raise UserError(_cli_message(exc)) from None
    return 0


def _plan_text(args, teacher=None) -> str:
    """The text ``sidfast plan`` prints for its parsed options: the plan of ``teacher`` (loaded from
    ``--teacher``) or ``--model``, or the table of the published models (``--table``)."""
    if args.table:
        return predictions_table(progress=lambda line: print(f"sidfast plan: {line}", file=sys.stderr, flush=True))
    plan = plan_memory(teacher, model=args.model, resolution=args.resolution, batch=args.batch,
                       gpus=args.gpus, sharding=args.sharding, precision=args.precision,
                       fake_score=args.fake_score, generator=args.generator, lora_rank=args.lora_rank,
                       checkpointing=args.checkpointing, gpu_memory=args.gpu_memory, margin=args.margin,
                       shard_teacher=args.shard_teacher, measure_device=args.measure_device)
    return plan.format()


def _unrecognized(parser: argparse.ArgumentParser, extras: list[str]) -> None:
    """Exit with the command's usage, the unknown arguments, and the nearest option of that command."""
    options = [o for action in parser._actions for o in action.option_strings]
    hints = []
    for arg in extras:
        near = difflib.get_close_matches(arg.split("=")[0], options, n=1) if arg.startswith("--") else []
        hints += [f"did you mean {near[0]}?"] if near else []
    parser.error(f"unrecognized arguments: {' '.join(extras)}" + (f" ({'; '.join(hints)})" if hints else ""))


def main(argv=None) -> int:
    parser = build_parser()
    args, extras = parser.parse_known_args(argv)
    if extras:
        _unrecognized(args.command_parser, extras)
    try:
        return args.handler(args)
    except (UserError, CheckpointError, NativeExtensionError) as exc:
        parser.exit(EXIT_USAGE, f"sidfast {args.command}: error: {exc}\n")
    except KeyboardInterrupt:
        print("sidfast: interrupted", file=sys.stderr)
        return 130


def console_main() -> None:
    """The ``sidfast`` command (and ``python -m sidfast.cli``): ``main`` with the command line, then the end
    of the process (``sidfast.utils.runtime.end_process``: no interpreter teardown after a process group)."""
    runtime.end_process(main())


if __name__ == "__main__":  # pragma: no cover
    console_main()
