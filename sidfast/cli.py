"""The ``sidfast`` command: demo, train-teacher, distill, sample.

    sidfast demo [--quick] [--out DIR] [--device auto|cpu|cuda]
    sidfast train-teacher --out teacher.pt [--iterations N] [--conditional] ...
    sidfast distill --teacher SRC [--config cfg.yaml|json] [--resume [CKPT]] [--<option> VALUE ...]
    sidfast sample CKPT --out grid.png | --out DIR [--num N] [--steps K]

``--teacher`` accepts a sidfast network checkpoint (``train-teacher`` writes one), a local diffusers
directory (``save_pretrained`` of a ``UNet2DModel`` with its scheduler config), or ``module:function``
returning an EDM-style module ``net(x, sigma, class_labels) -> x0``. Options: defaults < the
checkpoint's options when resuming < ``--config`` file < command line. User errors print one line
``sidfast: error: ...`` and exit 2; a run stopped by SIGINT/SIGTERM saves and exits 130/143.
"""
from __future__ import annotations

import argparse
import os
import re
import sys
from pathlib import Path

EXIT_USAGE = 2
EXIT_SIGNAL = {"SIGINT": 130, "SIGTERM": 143, "callback": 1}

_ENTRY_POINT = re.compile(r"^[A-Za-z_][\w.]*:[A-Za-z_][\w.]*$")


class UserError(Exception):
    """An error the user can fix; printed without a traceback."""


# ---- teachers and generators from what the user has ----

def _check_readable(path: Path, what: str) -> None:
    if not path.exists():
        raise UserError(f"{what} {str(path)!r} does not exist")
    if not os.access(path, os.R_OK) or (path.is_dir() and not os.access(path, os.X_OK)):
        raise UserError(f"{what} {str(path)!r} is not readable (check its permissions)")


def load_teacher(source: str):
    """(denoiser, architecture or None) for ``--teacher``: a network checkpoint, a diffusers dir, module:function."""
    from . import checkpoint, denoisers

    if not isinstance(source, str) or not source:
        raise UserError("--teacher is required: a sidfast checkpoint, a diffusers directory or module:function")
    path = Path(source).expanduser()
    if not path.exists() and _ENTRY_POINT.match(source):
        try:
            return denoisers.load_entry_point(source, name="teacher"), None
        except (ImportError, ValueError, TypeError) as exc:
            raise UserError(f"--teacher {source!r}: {exc}") from None
    _check_readable(path, "teacher path")
    if path.is_dir():
        try:
            import diffusers  # noqa: F401
        except ImportError:
            raise UserError(f"--teacher {source!r} is a directory, read as a diffusers model, but diffusers is not "
                            "installed: pip install 'sidfast[diffusers]'") from None
        try:
            return denoisers.DiffusersDenoiser.from_pretrained(path, name="teacher"), None
        except (FileNotFoundError, ValueError, OSError) as exc:
            raise UserError(f"--teacher {source!r}: {exc}") from None
    try:
        data = checkpoint.load_checkpoint(path, "network")
        net = checkpoint.build_network(data, path).eval()
    except checkpoint.CheckpointError as exc:
        raise UserError(str(exc)) from None
    return net, {"builder": data["builder"], "config": data["config"]}


def build_generator(data: dict, path) -> "object":
    """The EMA generator (a Denoiser in eval mode) of a distillation checkpoint."""
    from . import checkpoint, denoisers

    arch = data.get("architecture")
    if arch:
        try:
            net = checkpoint.import_entry_point(arch["builder"])(arch["config"])
        except Exception as exc:
            raise UserError(f"checkpoint {str(path)!r}: cannot rebuild the generator with {arch.get('builder')!r} "
                            f"({type(exc).__name__}: {exc})") from None
        net = denoisers.as_denoiser(net, name="generator")
    elif data.get("teacher"):
        net, _ = load_teacher(data["teacher"])
        net = denoisers.as_denoiser(net, name="generator")
    else:
        raise UserError(f"checkpoint {str(path)!r} does not say how to rebuild its generator (it was written by "
                        "distill() without architecture= or config.teacher)")
    try:
        net.load_state_dict(data["generator_ema"])
    except RuntimeError as exc:
        raise UserError(f"checkpoint {str(path)!r}: generator weights do not fit the rebuilt network: "
                        f"{str(exc)[:300]}") from None
    return net.eval().requires_grad_(False)


# ---- argument parsing ----

def _option(name: str) -> str:
    return "--" + name.replace("_", "-")


def add_train_options(parser: argparse.ArgumentParser) -> None:
    """One command-line option per ``TrainConfig`` field (values are checked by ``TrainConfig.validate``)."""
    from .train import TrainConfig

    group = parser.add_argument_group("SiD options (defaults: the published recipe)")
    for f in TrainConfig.fields():
        if f.name in ("teacher", "resume"):
            continue
        default = f.default
        shown = " ".join(map(str, default)) if isinstance(default, tuple) else default
        help_ = f"{f.metadata['help']} (default: {shown})"
        kw = dict(dest=f.name, default=argparse.SUPPRESS, help=help_)
        if isinstance(default, bool):
            group.add_argument(_option(f.name), action=argparse.BooleanOptionalAction, **kw)
        elif f.name == "betas":
            group.add_argument(_option(f.name), nargs=2, metavar=("BETA1", "BETA2"), **kw)
        elif f.name == "image_shape":
            group.add_argument(_option(f.name), nargs="+", metavar="N", **kw)
        else:
            group.add_argument(_option(f.name), metavar=f.name.upper(), **kw)


def _cli_message(exc: Exception) -> str:
    """Validation messages name options as the command line spells them."""
    return re.sub(r"\boption (\w+)", lambda m: f"option {_option(m.group(1))}", str(exc))


def config_from_args(args: argparse.Namespace):
    """TrainConfig from defaults < resumed checkpoint < --config file < explicit options."""
    from .checkpoint import CheckpointError, load_checkpoint
    from .train import CHECKPOINT_NAME, TrainConfig

    explicit = {f.name: getattr(args, f.name) for f in TrainConfig.fields()
                if hasattr(args, f.name) and f.name not in ("teacher", "resume")}
    cfg = TrainConfig()
    resume = getattr(args, "resume", None)
    if resume is not None:
        if resume == "auto":
            run_dir = explicit.get("run_dir")
            if run_dir is None and getattr(args, "config", None):
                run_dir = TrainConfig.from_file(args.config).run_dir
            resume = str(Path(run_dir or cfg.run_dir) / CHECKPOINT_NAME)
        try:
            saved = load_checkpoint(resume, "distill")
        except CheckpointError as exc:
            raise UserError(f"--resume: {exc}") from None
        known = {f.name for f in TrainConfig.fields()}
        cfg = TrainConfig.from_dict({k: v for k, v in saved.get("config", {}).items() if k in known})
        cfg = cfg.replace(overwrite=False)
        del saved
    if getattr(args, "config", None):
        cfg = TrainConfig.from_file(args.config, base=cfg)
    cfg = TrainConfig.from_dict(explicit, base=cfg)
    if getattr(args, "teacher", None):
        cfg = cfg.replace(teacher=args.teacher)
    if resume is not None:
        cfg = cfg.replace(resume=str(resume))
    return cfg


def _device_arg(parser):
    parser.add_argument("--device", default="auto", help="auto, cpu, cuda or cuda:N (default: auto)")


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="sidfast", description="Score identity Distillation (SiD): one-step "
                                "generators from diffusion models.")
    sub = p.add_subparsers(dest="command", metavar="COMMAND")
    sub.required = True

    d = sub.add_parser("demo", help="train a digits teacher, distill it, compare teacher and one-step student",
                       description="The embedded demo: scikit-learn's 8x8 digits, no download.")
    d.add_argument("--quick", action="store_true", help="the short CI version (about 2 minutes on 2 CPU cores)")
    d.add_argument("--out", default="sidfast-demo", help="output directory (default: sidfast-demo)")
    d.add_argument("--seed", type=int, default=0, help="random seed of the whole demo (default: 0)")
    d.add_argument("--cache-dir", default=None,
                   help="where the digit classifier is cached (default: $SIDFAST_CACHE or ~/.cache/sidfast)")
    _device_arg(d)

    t = sub.add_parser("train-teacher", help="train a small EDM teacher on the bundled digits",
                       description="Train the demo's EDM-preconditioned MLP on scikit-learn's 8x8 digits and write "
                                   "a sidfast network checkpoint usable as distill --teacher.")
    t.add_argument("--out", required=True, help="checkpoint file to write, e.g. teacher.pt")
    t.add_argument("--iterations", type=int, default=None, help="optimizer steps (default: the demo's)")
    t.add_argument("--batch", type=int, default=None, help="images per step (default: the demo's)")
    t.add_argument("--lr", type=float, default=None, help="peak Adam learning rate (default: the demo's)")
    t.add_argument("--width", type=int, default=None, help="MLP width (default: the demo's)")
    t.add_argument("--depth", type=int, default=None, help="residual blocks (default: the demo's)")
    t.add_argument("--dropout", type=float, default=None, help="dropout probability (default: the demo's)")
    t.add_argument("--conditional", action="store_true", help="class-conditional teacher (10 classes)")
    t.add_argument("--seed", type=int, default=0, help="random seed (default: 0)")
    _device_arg(t)

    s = sub.add_parser("distill", help="distill a teacher into a one-step generator with SiD",
                       description="Run SiD. Under torchrun every process runs this command; rank 0 writes.")
    s.add_argument("--teacher", help="sidfast checkpoint, local diffusers directory, or module:function "
                                     "(default when resuming: the checkpoint's)")
    s.add_argument("--config", help="YAML or JSON file of options (command-line options override it)")
    s.add_argument("--resume", nargs="?", const="auto", default=None, metavar="CKPT",
                   help="continue a run (default CKPT: RUN_DIR/checkpoint.pt)")
    add_train_options(s)

    m = sub.add_parser("sample", help="write images from a distillation or teacher checkpoint",
                       description="One-step samples from a distillation checkpoint (its EMA generator) or "
                                   "multi-step EDM Heun samples from a network checkpoint.")
    m.add_argument("checkpoint", help="checkpoint.pt of a distill run, or a train-teacher checkpoint")
    m.add_argument("--out", required=True, help="a .png file for one grid, or a directory for one PNG per image")
    m.add_argument("--num", type=int, default=64, help="number of images (default: 64)")
    m.add_argument("--seed", type=int, default=0, help="random seed of the latents (default: 0)")
    m.add_argument("--steps", type=int, default=18, help="Heun steps for a teacher checkpoint (default: 18)")
    m.add_argument("--class-label", type=int, default=None, help="one class for all images (default: cycle)")
    m.add_argument("--batch", type=int, default=256, help="images per forward pass (default: 256)")
    _device_arg(m)
    return p


# ---- commands ----

def _device(spec: str):
    from .train import resolve_device

    try:
        return resolve_device(spec)
    except ValueError as exc:
        raise UserError(f"--device: {exc}") from None


def cmd_demo(args) -> int:
    device = _device(args.device)
    from . import demo

    result = demo.run_demo(quick=args.quick, out_dir=args.out, device=str(device), seed=args.seed,
                           cache_dir=args.cache_dir)
    passed = result.get("passed") if isinstance(result, dict) else getattr(result, "passed", None)
    return 0 if passed in (None, True) else 1


def cmd_train_teacher(args) -> int:
    """The demo's teacher recipe (``sidfast.demo.demo_config``) with the given options changed."""
    import dataclasses

    from . import checkpoint
    from .demo import demo_config, digits, nets, teacher

    base = demo_config(quick=False, seed=args.seed)
    for name, lo in (("iterations", 1), ("batch", 1), ("width", 2), ("depth", 1)):
        if getattr(args, name) is not None and getattr(args, name) < lo:
            raise UserError(f"--{name} must be >= {lo}, got {getattr(args, name)}")
    if args.dropout is not None and not 0 <= args.dropout < 1:
        raise UserError(f"--dropout must be in [0, 1), got {args.dropout}")
    if args.lr is not None and not args.lr > 0:
        raise UserError(f"--lr must be positive, got {args.lr}")
    out = Path(args.out)
    if out.is_dir():
        raise UserError(f"--out {str(out)!r} is a directory; give a file name such as teacher.pt")
    device = _device(args.device)
    import torch

    torch.manual_seed(args.seed)
    images, labels = digits.load_digits_tensors(device=device)
    config = dict(base.net)
    config.update({k: getattr(args, k) for k in ("width", "depth", "dropout") if getattr(args, k) is not None})
    config["num_classes"] = digits.NUM_CLASSES if args.conditional else 0
    net = nets.build_denoiser(config).to(device)
    tcfg = dataclasses.replace(base.teacher, seed=args.seed,
                               **{k: getattr(args, k) for k in ("iterations", "batch", "lr")
                                  if getattr(args, k) is not None})
    ema, stats = teacher.train_teacher(net, images, tcfg, labels=labels if args.conditional else None,
                                       log=print, log_every=max(1, tcfg.iterations // 10))
    checkpoint.save_network(out, ema, "sidfast.demo.nets:build_denoiser", config,
                            meta={"trainer": "sidfast train-teacher", "teacher_config": tcfg.to_dict(), **stats})
    print(f"wrote {out} ({nets.count_parameters(ema):,} parameters, {stats['seconds']:.1f} s, "
          f"final loss {stats['final_loss']:.4f})")
    return 0


def cmd_distill(args) -> int:
    from .checkpoint import CheckpointError
    from .train import distill

    try:
        cfg = config_from_args(args)
    except (ValueError, TypeError, FileNotFoundError) as exc:
        raise UserError(_cli_message(exc)) from None
    if not cfg.teacher:
        raise UserError("--teacher is required: a sidfast checkpoint, a diffusers directory or module:function")
    _device(cfg.device)
    teacher, architecture = load_teacher(cfg.teacher)
    try:
        result = distill(cfg, teacher, architecture=architecture)
    except CheckpointError as exc:
        raise UserError(str(exc)) from None
    except ValueError as exc:
        raise UserError(_cli_message(exc)) from None
    if result.interrupted:
        print(f"stopped by {result.interrupted} at iteration {result.iteration}; resume with: sidfast distill "
              f"--resume --run-dir {cfg.run_dir}", file=sys.stderr)
        return EXIT_SIGNAL.get(result.interrupted, 1)
    return 0


def cmd_sample(args) -> int:
    import torch

    from . import checkpoint, report, samplers

    if args.num < 1:
        raise UserError(f"--num must be >= 1, got {args.num}")
    if args.steps < 1:
        raise UserError(f"--steps must be >= 1, got {args.steps}")
    if args.batch < 1:
        raise UserError(f"--batch must be >= 1, got {args.batch}")
    path = Path(args.checkpoint)
    try:
        data = checkpoint.load_checkpoint(path, ("distill", "network"))
    except checkpoint.CheckpointError as exc:
        raise UserError(str(exc)) from None
    device = _device(args.device)
    kind = checkpoint.kind_of(data)
    from .denoisers import as_denoiser
    from .train import infer_image_shape, infer_num_classes

    if kind == "distill":
        net = build_generator(data, path)
        shape = tuple(data["image_shape"])
        num_classes, fmt = int(data.get("num_classes") or 0), data.get("label_format", "onehot")
        sigma_init = float(data.get("sigma_init", 2.5))
    else:
        try:
            net = as_denoiser(checkpoint.build_network(data, path)).eval()
        except checkpoint.CheckpointError as exc:
            raise UserError(str(exc)) from None
        shape = infer_image_shape(net)
        if shape is None:
            raise UserError(f"checkpoint {str(path)!r}: cannot tell the image shape of its network")
        num_classes, fmt = infer_num_classes(net), "onehot"
    if args.class_label is not None and not 0 <= args.class_label < max(num_classes, 1):
        raise UserError(f"--class-label must be in [0, {num_classes}) for this network"
                        if num_classes else "--class-label given but the network is unconditional")
    net = net.to(device)
    g = torch.Generator().manual_seed(args.seed)
    outs = []
    for start in range(0, args.num, args.batch):
        n = min(args.batch, args.num - start)
        z = torch.randn((n, *shape), generator=g).to(device)
        labels = None
        if num_classes:
            idx = (torch.full((n,), args.class_label) if args.class_label is not None
                   else torch.arange(start, start + n) % num_classes).to(device)
            labels = torch.nn.functional.one_hot(idx, num_classes).float() if fmt == "onehot" else idx
        if kind == "distill":
            x = samplers.one_step_sample(net, z, sigma_init, labels)
        else:
            x = samplers.edm_sample(net, z, args.steps, class_labels=labels)
        outs.append(x.cpu())
    images = torch.cat(outs)
    out = Path(args.out)
    if out.suffix.lower() == ".png":
        report.save_grid(images, out)
        print(f"wrote a grid of {args.num} images to {out}")
    else:
        if out.exists() and not out.is_dir():
            raise UserError(f"--out {str(out)!r} exists and is not a directory (use a .png name for a grid)")
        report.save_images(images, out)
        print(f"wrote {args.num} images to {out}/")
    return 0


COMMANDS = {"demo": cmd_demo, "train-teacher": cmd_train_teacher, "distill": cmd_distill, "sample": cmd_sample}


def main(argv=None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        return COMMANDS[args.command](args)
    except UserError as exc:
        parser.exit(EXIT_USAGE, f"sidfast {args.command}: error: {exc}\n")
    except KeyboardInterrupt:
        print("sidfast: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
