"""The ``sidfast`` command: demo, train-teacher, distill, sample, eval, export, plan.

    sidfast demo [--quick] [--method sida | --conditional | --gen-steps K] [--seeds N] [--out DIR]
    sidfast train-teacher --out teacher.pt [--iterations N] [--conditional] ...
    sidfast distill --teacher SRC [--preset NAME] [--config cfg.yaml|json] [--resume [CKPT]] [--OPTION VALUE ...]
    sidfast distill --preset list
    sidfast sample CKPT --out grid.png|grid.jpg|DIR [--num N] [--steps K] [--teacher SRC]
    sidfast eval CKPT --ref STATS.npz [--num 50000] [--inception PATH] [--out metrics.json] ...
    sidfast eval --make-ref DATA --out STATS.npz [--inception PATH]
    sidfast export CKPT --out DIR [--steps K] [--teacher SRC] [--overwrite]
    sidfast plan --teacher SRC|--model NAME [--resolution PX] [--gpus N] [--gpu-memory 80GB] ... | --table

``--teacher`` accepts a sidfast network checkpoint (``train-teacher`` writes one), a local diffusers
directory (``save_pretrained`` of a ``UNet2DModel`` with its scheduler config, or a text-to-image pipeline
with its text encoders, distilled from the prompts of ``--prompts FILE``), or ``module:function``
returning an EDM-style module ``net(x, sigma, class_labels) -> x0``. Guidance: ``--guidance
lsg|long|short|zero|anti --cfg K`` (scales overridden by ``--cfg-fake-train``, ``--cfg-fake``,
``--cfg-teacher``); a few-step generator: ``--gen-steps K``. Options: defaults < ``--preset`` (a published
launch script; the checkpoint's options when resuming) < ``--config`` file < command line. User errors print
one line ``sidfast <command>: error: ...`` and exit 2; a run stopped by SIGINT/SIGTERM saves and exits 130/143.
"""
from __future__ import annotations

import argparse
import difflib
import errno
import json
import os
import re
import shutil
import sys
import tempfile
from pathlib import Path

from sidfast import __version__, samplers
from sidfast.ops._native import NativeExtensionError
from sidfast.demo.run import add_demo_arguments, run_from_args
from sidfast.demo.teacher import write_teacher
from sidfast.evaluate import kernel, manifold
from sidfast.evaluate.dataset import KEEP_FEATURES
from sidfast.evaluate.detector import DetectorError, FILE_NAMES
from sidfast.evaluate.run import DEFAULT_BATCH, DEFAULT_NUM, EvalError, evaluate_checkpoint, make_reference
from sidfast.evaluate.statistics import ReferenceFileError
from sidfast.evaluate.export import ExportError, export_student
from sidfast.evaluate.loop_metrics import metric_for
from sidfast.models import loading
from sidfast.models.family import teacher_family
from sidfast.models.io import CheckpointError
from sidfast.models.lora import NETWORK_KINDS
from sidfast.plan.known import KNOWN_MODELS
from sidfast.plan.memory import PLAN_PRECISIONS, SHARDINGS, plan_memory, predictions_table
from sidfast.training.loop import distill
from sidfast.training import presets, student
from sidfast.training.config import TrainConfig
from sidfast.training.data import DataError
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
    for add_command in (_demo_parser, _train_teacher_parser, _distill_parser, _sample_parser, _eval_parser,
                        _export_parser, _plan_parser):
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


def _eval_parser(sub) -> None:
    e = _command(sub, "eval", cmd_eval, "FID, KID and precision/recall of a checkpoint, or a data set's reference",
                 "FID (with KID and precision/recall when the reference keeps features) of the images a checkpoint "
                 "makes, in the features of NVIDIA's TF-Inception as the published SiD/EDM evaluation computes "
                 "them (docs/evaluate.md); or, with --make-ref, the reference statistics of a data set. Under "
                 "torchrun the images are shared among the processes.")
    add = e.add_argument
    add("checkpoint", nargs="?", help="what sidfast sample takes: a distill run folder, its checkpoint, a "
                                      "generator.pt, or a train-teacher checkpoint")
    add("--ref", metavar="STATS", help="reference statistics: EDM's .npz (mu, sigma) or one --make-ref wrote")
    add("--num", type=int, default=None, help=f"images to generate (default: {DEFAULT_NUM}, or the number of "
                                              f"--seeds)")
    add("--seeds", default=None, metavar="LIST",
        help="the images' seeds, as EDM writes them: 0-49999 or 1,2,5-10 (default: 0 .. NUM-1)")
    add("--batch", type=int, default=DEFAULT_BATCH, help=f"images per network call on each process (default: "
                                                         f"{DEFAULT_BATCH})")
    add("--prompts", default=None, metavar="FILE",
        help="for the student of a text-to-image teacher: prompts, one per line; image i gets prompt i mod their "
             "number")
    add("--steps", type=int, default=None, help="generator steps of a distillation checkpoint (default: its K) "
                                                "or Heun steps of a teacher checkpoint (default: 18)")
    add("--teacher", default=None, help=f"the teacher ({TEACHER_HELP}) of a distillation checkpoint that names "
                                        "no architecture (default: the path it stored)")
    add("--inception", default=None, metavar="PATH",
        help=f"the detector: NVIDIA's {FILE_NAMES[0]} or {FILE_NAMES[1]} (default: that file in $SIDFAST_CACHE "
             f"or ~/.cache/sidfast; never downloaded)")
    add("--kid-subsets", type=int, default=kernel.SUBSETS, help=f"KID subsets (default: {kernel.SUBSETS})")
    add("--kid-subset-size", type=int, default=kernel.SUBSET_SIZE,
        help=f"samples per KID subset (default: {kernel.SUBSET_SIZE}, or fewer when fewer features exist)")
    add("--pr-k", type=int, default=manifold.NEIGHBOURS,
        help=f"neighbours of precision/recall (default: {manifold.NEIGHBOURS})")
    add("--make-ref", default=None, metavar="DATA",
        help="write the reference statistics of DATA (a folder of images, dataset.zip, .npz/.npy/.pt) to --out")
    add("--ref-features", type=int, default=KEEP_FEATURES,
        help=f"with --make-ref: the features kept for KID and precision/recall (default: {KEEP_FEATURES}; 0: "
             f"none, as EDM's references)")
    add("--out", default=None, help="with --make-ref: the .npz to write (required); otherwise a .json file for "
                                    "the metrics (they are printed as one JSON line too)")
    _device_arg(e)

def _export_parser(sub) -> None:
    e = _command(sub, "export", cmd_export, "write a student as a directory that diffusers loads",
                 "The EMA generator of a run distilled from a diffusers teacher, with a scheduler config with "
                 "which diffusers' own loop reproduces sidfast sample (docs/export.md); prints the call.")
    e.add_argument("checkpoint", help="a distill run folder, its checkpoint.pt or checkpoint.dcp, or a generator.pt")
    e.add_argument("--out", required=True, help="the directory to write (save_pretrained layout, safetensors)")
    e.add_argument("--steps", type=int, default=None,
                   help="generator steps to export (default: the K it was trained with)")
    e.add_argument("--teacher", default=None,
                   help="where the run's diffusers teacher is now, when it moved (default: the path it stored)")
    e.add_argument("--overwrite", action="store_true", help="replace --out when it exists and is not empty")


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


def _exists(path: Path) -> bool:
    try:
        return path.exists()
    except OSError:  # a name the system refuses (too long, ...): nothing is there
        return False


def _writable_dir(path, option: str, shown=None) -> None:
    """Check that a file can be written in the directory ``path``, or that it can be created (with its
    parents) where it is missing; a UserError naming ``option`` (given as ``shown``) otherwise. Leaves
    nothing behind: the folder is made by what writes into it, so that a command that fails later (a
    teacher that does not load) leaves no empty folder."""
    path = Path(path)
    shown = str(shown if shown is not None else path)
    try:
        there = next(p for p in (path, *path.parents) if _exists(p))  # the deepest part that exists
        if not there.is_dir():
            raise NotADirectoryError(errno.ENOTDIR, os.strerror(errno.ENOTDIR), str(there))
        if there == path:
            with tempfile.TemporaryFile(dir=path):
                pass
        else:  # the missing folders, made in a temporary folder where they go and removed at once
            probe = tempfile.mkdtemp(dir=there)
            try:
                (Path(probe) / path.relative_to(there)).mkdir(parents=True)
            finally:
                shutil.rmtree(probe, ignore_errors=True)
    except OSError as exc:
        blocker = next((p for p in (path, *path.parents) if _exists(p) and not p.is_dir()), None)
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
    if getattr(args, "preset", None) == "list":
        print(presets.table())
        return 0
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
        if cfg.preset is not None:  # before the networks are copied: a preset of another family is a mistake
            presets.check_family(cfg.preset, teacher_family(teacher))
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


def _eval_out(path: str | None, suffix: str, what: str) -> None:
    if path is None:
        return
    if Path(path).suffix.lower() != suffix:
        raise UserError(f"--out {path!r}: {what} is written as {suffix}; name the file NAME{suffix}")
    if Path(path).is_dir():
        raise UserError(f"--out {path!r} is a directory; name a {suffix} file")
    _writable_dir(Path(path).parent, "--out", path)


def cmd_eval(args) -> int:
    try:
        if args.make_ref is not None:
            if args.checkpoint is not None or args.ref is not None:
                raise UserError("--make-ref DATA writes a reference: it takes no CHECKPOINT and no --ref")
            if args.out is None:
                raise UserError("--make-ref DATA needs --out STATS.npz, the file to write")
            _eval_out(args.out, ".npz", "a reference")
            result = make_reference(args.make_ref, args.out, batch=args.batch, keep_features=args.ref_features,
                                    inception=args.inception, device=args.device)
        else:
            if args.checkpoint is None:
                raise UserError("give the CHECKPOINT to evaluate (and --ref STATS), or --make-ref DATA --out "
                                "STATS.npz")
            if args.ref is None:
                raise UserError("--ref STATS is required: EDM's reference .npz of the data set, or one made with "
                                "sidfast eval --make-ref DATA --out STATS.npz")
            _eval_out(args.out, ".json", "the metrics")
            result = evaluate_checkpoint(args.checkpoint, args.ref, args.num, batch=args.batch, seeds=args.seeds,
                                         prompts=args.prompts, inception=args.inception, teacher=args.teacher,
                                         steps=args.steps, kid_subsets=args.kid_subsets,
                                         kid_subset_size=args.kid_subset_size, pr_k=args.pr_k,
                                         device=args.device, out=args.out)
    except (EvalError, DetectorError, ReferenceFileError) as exc:
        raise UserError(str(exc)) from None
    except DataError as exc:  # data.py names the option of distill
        raise UserError(str(exc).replace("--data", "--make-ref")) from None
    except ValueError as exc:
        raise UserError(_cli_message(exc)) from None
    if result is not None:  # rank 0
        if "skipped" in result:
            print(f"sidfast eval: skipped {result['skipped']}", file=sys.stderr)
        print(json.dumps(result), flush=True)
    return 0


def cmd_export(args) -> int:
    if args.steps is not None and args.steps < 1:
        raise UserError(f"argument --steps must be an integer >= 1, got {args.steps}")
    try:
        info = export_student(args.checkpoint, args.out, teacher=args.teacher, steps=args.steps,
                              overwrite=args.overwrite)
    except (ExportError, CheckpointError) as exc:  # in command-line words already
        raise UserError(str(exc)) from None
    except ValueError as exc:
        raise UserError(_cli_message(exc)) from None
    except ImportError as exc:  # diffusers (and safetensors) come with the diffusers extra
        raise UserError(f"sidfast export needs diffusers: pip install 'sidfast[diffusers]' ({exc})") from None
    how = ("reproduces sidfast sample" if info["exact"]
           else f"runs the {info['gen_steps']} steps with {info['renoise']} noise between them, as sidfast sample")
    print(f"wrote {args.out}; with diffusers ({how}, seed 0):\n\n{info['snippet']}")
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
