"""``sidfast demo --method sida | --conditional | --gen-steps K``: students side by side, several seeds.

One run trains ONE digits teacher, then distills it into each student of the comparison with each seed, all
at the same budget (iterations x batch), and evaluates teacher and students on the same evaluation noise
(and labels) per seed. Reported per seed, with mean and spread (``summary.py``): the Frechet distance to the
digits in the cached classifier's features, and, for conditional comparisons, the classifier's accuracy on
the samples against the requested labels.

- ``sida``: the SiD student and the SiDA student (Zhou et al., ICLR 2025; the real digits as the data, the
  fake score's encoder as the discriminator). Bars: SiDA's FD below the teacher's and below SiD's by more
  than the noise (ratio + 2 SE < 1).
- ``conditional``: a class-conditional teacher trained with label dropout; students distilled without
  guidance and with SiD-LSG at several scales (Zhou et al., ICLR 2025). The teacher is sampled at several
  guidance scales. Bars: the best guided student against the teacher at its best guidance (both by FD),
  non-inferiority: label accuracy not below the teacher's by more than 2 SE, FD ratio - 2 SE <= 1.25.
- ``gen-steps``: the one-step student and a K-step student (Zhou et al. 2025, "Few-Step Diffusion via Score
  identity Distillation"). Bar: the K-step student's FD below the one-step student's by more than the
  noise (ratio + 2 SE < 1).

Beside each FD the teacher-feature distance of the same samples (``sidfast.evaluate.teacher_fd``) against one
reference of the comparison's teacher, which every student's run also measures in its loop (``--eval-ref``),
keeping its ``best.pt`` by it; the report names those checkpoints.

Standard errors: FD ratios from a bootstrap over the evaluated samples' features (``frechet.fd_bootstrap``,
written to ``features.pt``), accuracies from the binomial error counts; ``summary`` defines each statement.

Every comparison also has a time bar: the whole run within ``time_limit`` seconds on the 2-core CPU.
Students are ``StudentSpec``s: a name and the ``TrainConfig`` options that distinguish them; ``_train`` is
the one place where they become a trainer call.
"""
from __future__ import annotations

import dataclasses
import os
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
import torch
from torch import nn

from sidfast._checks import check_int
from sidfast.demo import classifier as clf_mod
from sidfast.demo import summary
from sidfast.demo.digits import IMAGE_SHAPE, NUM_CLASSES, load_digits_tensors
from sidfast.demo.frechet import BOOTSTRAP_RESAMPLES, feature_statistics, fd_bootstrap_seeds, frechet_distance
from sidfast.demo.measure import threads_used, timed, write_json
from sidfast.demo.nets import build_denoiser, count_parameters
from sidfast.demo.recipe import BUILDER, DemoConfig, TeacherConfig
from sidfast.demo.teacher import train_teacher
from sidfast.evaluate.loop_metrics import metric_for
from sidfast.evaluate.teacher_fd import REFERENCE_NAME
from sidfast.generator import generator_sigmas, sample
from sidfast.guidance import guided, null_labels
from sidfast.labels import format_labels
from sidfast.models.denoiser import as_denoiser
from sidfast.models.io import save_network
from sidfast.samplers import edm_sample
from sidfast.training.config import TrainConfig
from sidfast.training.evaluation import EvalRun
from sidfast.training.loop import distill
from sidfast.utils import runtime
from sidfast.utils.images import save_grid
from sidfast.utils.runtime import resolve_device

DEMOS = ("sida", "conditional", "gen-steps")
LABEL_DROPOUT = 0.1       # the conditional teacher's probability of the null label
SIDA_LR = 1e-3           # both students of the SiDA comparison
SIDA_G_START = 0.02       # the SiDA student's generator steps after this fraction of the budget's images
SIDA_GAN_START = 0.05     # and its GAN term joins after this fraction
TIME_LIMITS = {"sida": 20 * 60, "conditional": 15 * 60, "gen-steps": 15 * 60, "quick": 3 * 60}
EVALUATIONS = 10          # each student's run measures its teacher-feature distance this many times


@dataclass
class StudentSpec:
    """One student: its name in the report, its ``TrainConfig`` options over the comparison's ``sid``
    options, and whether the trainer gets the real digits as its data (``data``)."""

    name: str
    options: dict = field(default_factory=dict)
    real_data: bool = False

    @property
    def steps(self) -> int:
        """Generator steps at sampling time (the trainer's ``gen_steps``; 1 for SiD's one step)."""
        return int(self.options.get("gen_steps", 1))


@dataclass
class ComparisonConfig:
    """Everything that decides a comparison's numbers (written into report.json)."""

    demo: str
    students: list
    seeds: list
    net: dict = field(default_factory=lambda: dict(DemoConfig().net))
    teacher: TeacherConfig = field(default_factory=lambda: TeacherConfig(iterations=2500))
    sid: dict = field(default_factory=lambda: dict(DemoConfig().sid))  # shared by every student
    teacher_guidance: list = field(default_factory=lambda: [1.0])  # scales the teacher is sampled at
    bar_students: list = field(default_factory=list)  # conditional: the guided students the bars compare
    teacher_steps: int = 18
    eval_samples: int = 2000
    grid_size: int = 64
    time_limit: float = 20 * 60

    def to_dict(self) -> dict:
        return asdict(self)

    def validate(self) -> "ComparisonConfig":
        if self.demo not in DEMOS:
            raise ValueError(f"demo must be one of {', '.join(DEMOS)}, got {self.demo!r}")
        if not self.seeds or len(set(self.seeds)) != len(self.seeds):
            raise ValueError(f"seeds must be distinct, at least one, got {self.seeds}")
        for s in self.seeds:
            if isinstance(s, bool) or not isinstance(s, int) or s < 0:
                raise ValueError(f"seeds must be non-negative integers, got {self.seeds}")
        names = [s.name for s in self.students]
        if len(set(names)) != len(names) or any(n.startswith("teacher") for n in names):
            raise ValueError(f"student names must be distinct and not start with 'teacher', got {names}")
        needed = {"sida": ("sid", "sida"), "gen-steps": ("1-step",), "conditional": tuple(self.bar_students)}
        missing = [n for n in needed[self.demo] if n not in names]
        if missing or (self.demo == "conditional" and not self.bar_students):
            raise ValueError(f"the {self.demo} comparison's bars need the students "
                             f"{missing or 'bar_students'}")
        if self.demo == "gen-steps" and not any(s.steps > 1 for s in self.students):
            raise ValueError("the gen-steps comparison needs a student with gen_steps > 1")
        return self


def _seeds(seed: int, count: int) -> list:
    return [seed + i for i in range(count)]


def comparison_config(demo: str, quick: bool, seed: int = 0, seeds: int | None = None,
                      gen_steps: int = 4) -> ComparisonConfig:
    """The full or quick configuration of comparison ``demo``: 3 seeds (quick: 1) from ``seed`` unless
    ``seeds`` says how many.

    Budgets, from the SiD demo's cost on the 2-core CPU with one thread (about 40 ms per iteration at batch
    128 and 60 ms at 256, the teacher's 1200 steps 15-30 s, one Heun sampling of 2000 images about 1 s):
    SiDA adds an encoder pass over real images to each fake-score step, guidance doubles the batch through
    teacher and fake score, and a K-step student runs on average (K + 1) / 2 generator steps per sample; the
    iterations are chosen so that all seeds of a comparison fit its time limit with room for a busy machine.
    """
    if demo not in DEMOS:
        raise ValueError(f"demo must be one of {', '.join(DEMOS)}, got {demo!r}")
    check_int("gen_steps", gen_steps, 2, "gen_steps must be an integer >= 2, got {value!r}")
    count = seeds if seeds is not None else (1 if quick else 3)
    check_int("seeds", count, 1, f"seeds must be a positive integer, got {seeds!r}")
    cfg = ComparisonConfig(demo=demo, students=[], seeds=_seeds(seed, count))
    cfg.teacher = dataclasses.replace(cfg.teacher, seed=seed)
    cfg.time_limit = TIME_LIMITS["quick" if quick else demo]
    if quick:
        cfg.teacher = dataclasses.replace(cfg.teacher, iterations=1200)
    if demo == "sida":
        budget = {"iterations": 1000 if quick else 2000, "batch": 128}
        # Both students at lr 1e-3 (the SiD demo's 3e-4 x 3.3): SiD stays near the teacher at either, and
        # SiDA's real-data term needs the larger steps to pull ahead within the demo's budget.
        cfg.sid = {**cfg.sid, **budget, "lr": SIDA_LR}
        kimg = cfg.sid["iterations"] * cfg.sid["batch"] / 1000
        # SiDA's published alpha (1.0) is the trainer's default for method sida. Its warm-up gates (the
        # generator steps after 100k images, the GAN term joins after 200k, of ~400M) would leave the demo's
        # budget (128k quick, 512k full) with no GAN term: the demo opens them at the same small fractions
        # of its own budget. No augmentation: digits are neither flip- nor rotation-invariant and an 8x8 grid
        # leaves no room to translate.
        sida = {"method": "sida", "augment_p": 0.0, "g_start_kimg": SIDA_G_START * kimg,
                "gan_start_kimg": SIDA_GAN_START * kimg}
        cfg.students = [StudentSpec("sid"), StudentSpec("sida", sida, real_data=True)]
    elif demo == "conditional":
        cfg.net = {**cfg.net, "num_classes": NUM_CLASSES}
        cfg.teacher = dataclasses.replace(cfg.teacher, label_dropout=LABEL_DROPOUT)
        cfg.teacher_guidance = [1.0, 1.5, 2.0, 3.0]
        # A one-step LSG student at scale k lands near the teacher sampled at a larger scale, so the guided
        # student takes a scale below the teacher's best (1.5 for the full teacher, 2 for the quick one).
        # Full: lr 1e-3 (as the SiDA comparison), 4000 iterations, the last half cooling the learning rates
        # to 0: the students measured on samples apart from the demo's (benchmarks/results/cpu-demo.md)
        # matched the teacher's FD at k = 1.3 with this cooldown (at k = 1.2 without), label accuracy above.
        scale = 1.5 if quick else 1.3
        cfg.students = [StudentSpec("k=1"), StudentSpec(f"lsg:{scale:g}", {"guidance": "lsg", "cfg": scale})]
        cfg.bar_students = [f"lsg:{scale:g}"]
        cfg.sid = {**cfg.sid, "iterations": 1500, "batch": 128} if quick else \
            {**cfg.sid, "iterations": 4000, "batch": 128, "lr": 1e-3, "lr_cooldown": 0.5}
        # The students' and the teacher's label accuracies lie near 0.998, where the difference of two such
        # estimates from 2000 samples per seed (6000 in all) has a binomial standard error of about 0.0008;
        # 5000 per seed bring it to about 0.0005, for about 10 s more teacher sampling per seed (accuracies
        # measured on more samples: benchmarks/results/cpu-demo.md).
        cfg.eval_samples = 5000
    else:
        many = StudentSpec(f"{gen_steps}-step", {"gen_steps": gen_steps})
        cfg.students = [StudentSpec("1-step"), many]
        budget = {"iterations": 800, "batch": 128} if quick else {"iterations": 1500}
        cfg.sid = {**cfg.sid, **budget}
    return cfg.validate()


class GuidedTeacher(nn.Module):
    """The teacher under classifier-free guidance at scale k, for sampling: ``sidfast.guidance.guided`` with
    the null label of one-hot networks (a row of zeros, what the teacher's label dropout trained)."""

    def __init__(self, net: nn.Module, scale: float, num_classes: int):
        super().__init__()
        self.net = net
        self.scale = float(scale)
        self.register_buffer("null", null_labels(num_classes, "onehot"), persistent=False)

    def forward(self, x, sigma, class_labels=None):
        return guided(self.net, x, sigma, class_labels, self.null.to(x.device), self.scale)


def _save_npz(path: Path, images: torch.Tensor) -> Path:
    """The real digits as an .npz of float images (N, 1, 8, 8) in [-1, 1] (what ``sidfast.training.data`` reads)."""
    tmp = path.with_name(f".{path.name}.tmp.npz")
    np.savez(tmp, images=images.cpu().numpy())
    os.replace(tmp, path)
    return path


def _train(cfg: ComparisonConfig, student: StudentSpec, seed: int, teacher, run_dir: Path, dev, data,
           log, reference: Path | None = None):
    """Distill ``teacher`` into ``student`` with ``seed``: the one place a student becomes a trainer call.
    ``reference``: the comparison's teacher-fd reference, measured against in the run's loop."""
    options = {**cfg.sid, **student.options, "run_dir": str(run_dir), "device": str(dev), "seed": seed,
               "overwrite": True, "teacher_steps": 0, "grid_size": 0, "progress": False,
               "checkpoint_every": 0, "sample_every": 0,
               "log_every": max(1, int(cfg.sid["iterations"]) // 10)}
    if student.real_data:
        options["data"] = str(data)
    if reference is not None:
        kimg = int(options["iterations"]) * int(options["batch"]) / 1000
        options.update({"eval": "teacher-fd", "eval_every": kimg / EVALUATIONS, "eval_ref": str(reference)})
    train_cfg = TrainConfig.from_dict(options)
    result = distill(train_cfg, teacher, architecture={"builder": BUILDER, "config": cfg.net}, log=log,
                     metric=metric_for(train_cfg))
    return result, result.config


@torch.no_grad()
def _student_samples(generator, z, labels, train_cfg, seed: int):
    """The student's samples at latents z: all of its ``gen_steps`` steps at the run's noise levels
    (``step_spacing``) and re-noising (``renoise``; fresh noise seeded by ``seed``), one step for SiD."""
    sigmas = generator_sigmas(train_cfg.gen_steps, train_cfg.sigma_init, train_cfg.step_spacing)
    g = torch.Generator(device=z.device).manual_seed(seed + 777)
    return sample(generator, z, labels, sigmas, renoise=train_cfg.renoise, generator=g)


def _safe(name: str) -> str:
    return "".join(c if c.isalnum() or c in "-_." else "_" for c in name)


def comparison_bars(demo: str, fd: dict, accuracy: dict, teachers, bar_students, steps: dict, seconds: float,
                    time_limit: float, samples: int, replicates: dict | None) -> dict:
    """The bars of comparison ``demo`` from its summaries (``fd``, ``accuracy``: {name: summary}), the
    teachers' names, the conditional guided students (``bar_students``), each student's generator steps
    (``steps``), the run's seconds and limit, the samples each accuracy is measured on in all, and the FD
    bootstrap replicates ({name: [per-seed [B floats]]}; ``summary`` says what each bar states)."""
    if demo == "sida":
        return summary.sida_bars(fd, seconds, time_limit, replicates=replicates)
    if demo == "conditional":
        return summary.conditional_bars(fd, accuracy, list(teachers), list(bar_students), seconds, time_limit,
                                        samples=samples, replicates=replicates)
    if demo == "gen-steps":
        many = next(name for name, k in steps.items() if k > 1)
        return summary.steps_bars(fd, "1-step", many, seconds, time_limit, replicates=replicates)
    raise ValueError(f"demo must be one of {', '.join(DEMOS)}, got {demo!r}")


def report_bars(report: dict, features: dict) -> dict:
    """``comparison_bars`` of a finished run from its ``report.json`` and ``features.pt`` (as loaded): what
    ``run_comparison`` computed, recomputed (``benchmarks/demo_seeds.py``)."""
    cfg = report["config"]
    replicates = fd_bootstrap_seeds(features["features"], features["real"], report["seeds"])
    steps = {s["name"]: int(s.get("options", {}).get("gen_steps", 1)) for s in cfg["students"]}
    return comparison_bars(report["demo"], report["fd"], report["accuracy"], report["teacher"]["guidance"],
                           cfg["bar_students"], steps, report["seconds"]["total"], report["seconds"]["limit"],
                           cfg["eval_samples"] * len(report["seeds"]), replicates)


def run_comparison(cfg: ComparisonConfig, out_dir="sidfast-demo", device: str = "auto", cache_dir=None,
                   threads: int | None = 1, mode: str = "custom", log=print) -> dict:
    """Run comparison ``cfg`` and return its report (also ``out_dir/report.json`` and ``report.md``).

    threads: CPU threads during the run (default 1, as ``run_demo``); None keeps torch's setting.
    mode: "full", "quick" or "custom", recorded in the report.
    """
    say = log if log is not None else (lambda *_: None)
    if not isinstance(cfg, ComparisonConfig):
        raise TypeError(f"config must be a ComparisonConfig, got {type(cfg).__name__}")
    cfg.validate()
    if threads is not None:
        check_int("threads", threads, 1, "threads must be a positive integer or None, got {value!r}")
    dev = resolve_device(device)
    out = Path(out_dir)
    if out.exists() and not out.is_dir():
        raise ValueError(f"out_dir {str(out)!r} exists and is not a directory")
    out.mkdir(parents=True, exist_ok=True)
    conditional = bool(cfg.net.get("num_classes"))
    base = {**TrainConfig().to_dict(), **cfg.sid}
    sampler = {"sigma_min": float(base["sigma_min"]), "sigma_max": float(base["sigma_max"]),
               "rho": float(base["rho"])}
    t_start = time.perf_counter()
    fd = {}
    accuracy = {}
    teacher_fd = {}
    best = {}
    train_seconds = {}
    runs = {}
    with threads_used(threads if dev.type == "cpu" else None):
        # 1. the metric's feature space
        (clf, clf_accuracy, cached), t_clf = timed(
            lambda: clf_mod.load_or_train_classifier(cache_dir, log=say), dev)
        if say:
            how = "cached" if cached else f"trained in {t_clf:.1f} s"
            say(f"digit classifier: held-out accuracy {clf_accuracy:.4f} ({how})")
        images, labels = load_digits_tensors()
        real_features = clf_mod.extract_features(clf, images)
        real_stats = feature_statistics(real_features)
        data = _save_npz(out / "digits.npz", images) if any(s.real_data for s in cfg.students) else None

        features = {}  # name -> per-seed features (eval_samples, D): the FD bars' bootstrap resamples them

        def evaluate(name: str, x: torch.Tensor, requested) -> None:
            f = clf_mod.extract_features(clf, x)
            features.setdefault(name, []).append(f.float().cpu())
            fd.setdefault(name, []).append(frechet_distance(*feature_statistics(f), *real_stats))
            with torch.no_grad():  # sample i with label i mod 10: the labels ``requested`` holds
                teacher_fd.setdefault(name, []).append(tfd.distance(tfd_run, x))
            if requested is not None:
                accuracy.setdefault(name, []).append(clf_mod.label_accuracy(clf, x, requested))

        # 2. one teacher, from scratch
        torch.manual_seed(cfg.teacher.seed)
        net = build_denoiser(cfg.net).to(dev)
        say(f"teacher: {count_parameters(net):,} parameters, {cfg.teacher.iterations} steps of batch "
            f"{cfg.teacher.batch} on {dev}" + (f", label dropout {cfg.teacher.label_dropout}" if conditional
                                               else ""))
        teacher, tstats = train_teacher(net, images.to(dev), cfg.teacher, labels=labels.to(dev) if conditional
                                        else None, log=say, log_every=max(1, cfg.teacher.iterations // 4))
        save_network(out / "teacher.pt", teacher, BUILDER, cfg.net,
                     meta={"trainer": "sidfast demo", "teacher_config": cfg.teacher.to_dict(), **tstats})
        scales = cfg.teacher_guidance if conditional else [1.0]
        teachers = {(f"teacher cfg {k:g}" if conditional else "teacher"): k for k in scales}
        # one teacher-fd reference of the (unguided) teacher for the whole comparison
        tfd_cfg = TrainConfig.from_dict({**cfg.sid, "run_dir": str(out), "device": str(dev),
                                         "teacher_steps": cfg.teacher_steps, "eval": "teacher-fd"})
        tfd = metric_for(tfd_cfg)
        den = as_denoiser(teacher).eval()
        tfd_run = EvalRun(tfd_cfg, den, den, IMAGE_SHAPE, NUM_CLASSES if conditional else 0, "onehot", dev,
                          runtime.Dist(), out, cfg.eval_samples)
        with torch.no_grad():
            tfd.setup(tfd_run)

        # 3. per seed: the same evaluation noise and labels for the teacher and every student
        for i, seed in enumerate(cfg.seeds):
            g = torch.Generator().manual_seed(seed + 12345)
            z = torch.randn((cfg.eval_samples, *IMAGE_SHAPE), generator=g).to(dev)
            requested = torch.arange(cfg.eval_samples) % NUM_CLASSES if conditional else None
            onehot = format_labels(requested.to(dev), NUM_CLASSES, "onehot") if conditional else None
            for name, k in teachers.items():
                sampler_net = GuidedTeacher(teacher, k, NUM_CLASSES) if k != 1 else teacher
                x = edm_sample(sampler_net, z, cfg.teacher_steps, **sampler, class_labels=onehot)
                evaluate(name, x, requested)
                if i == 0:
                    save_grid(x[:cfg.grid_size], out / f"{_safe(name)}.png")
            for student in cfg.students:
                run_dir = out / "runs" / _safe(student.name) / f"seed{seed}"
                say(f"seed {seed}: distilling student {student.name!r}")
                result, train_cfg = _train(cfg, student, seed, teacher, run_dir, dev, data, log=None,
                                           reference=out / REFERENCE_NAME)
                best.setdefault(student.name, []).append(
                    {"seed": seed, "path": result.evaluation.get("best_checkpoint"),
                     "teacher_fd": result.evaluation.get("best_teacher_fd"),
                     "iteration": result.evaluation.get("best_iteration")})
                x = _student_samples(result.generator_ema, z, onehot, train_cfg, seed)
                evaluate(student.name, x, requested)
                train_seconds.setdefault(student.name, []).append(result.seconds)
                options = {k: v for k, v in train_cfg.to_dict().items() if k not in ("seed", "run_dir")}
                runs[student.name] = {"options": options, "iterations": result.iteration,
                                      "images": result.nimg, "steps": student.steps}
                say(f"seed {seed}: {student.name} FD {fd[student.name][-1]:.3f}"
                    + (f", label accuracy {accuracy[student.name][-1]:.3f}" if conditional else "")
                    + f" ({result.seconds:.1f} s)")
                if i == 0:
                    save_grid(x[:cfg.grid_size], out / f"student_{_safe(student.name)}.png")
        save_grid(images[:cfg.grid_size], out / "real.png")
    total = time.perf_counter() - t_start
    torch.save({"real": real_features.float().cpu(), "features": features, "seeds": list(cfg.seeds)},
               out / "features.pt")

    # 4. the report
    fd_s = {name: summary.summarize(v) for name, v in fd.items()}
    tfd_s = {name: summary.summarize(v) for name, v in teacher_fd.items()}
    acc_s = {name: summary.summarize(v) for name, v in accuracy.items()}
    sec_s = {name: summary.summarize(v) for name, v in train_seconds.items()}
    (replicates, t_boot) = timed(lambda: fd_bootstrap_seeds(features, real_features, cfg.seeds), torch.device("cpu"))
    steps = {s.name: s.steps for s in cfg.students}
    bars = comparison_bars(cfg.demo, fd_s, acc_s, list(teachers), cfg.bar_students, steps, total,
                           cfg.time_limit, cfg.eval_samples * len(cfg.seeds), replicates)
    with_labels = " and labels (balanced, i mod 10)" if conditional else ""
    report = {
        "demo": cfg.demo, "mode": mode, "passed": all(b["passed"] for b in bars.values()),
        "device": str(dev), "threads": torch.get_numthreads_used() if threads is None else threads,
        "seeds": list(cfg.seeds), "fd": fd_s, "accuracy": acc_s, "teacher_fd": tfd_s,
        "best_checkpoints": best, "bars": bars,
        "seconds": {"classifier": 0.0 if cached else t_clf, "teacher": tstats["seconds"],
                    "students": sec_s, "total": total, "limit": cfg.time_limit, "fd_bootstrap": t_boot},
        "students": runs,
        "classifier": {"held_out_accuracy": clf_accuracy, "cached": cached,
                       "feature_dim": clf_mod.FEATURE_DIM, "recipe_hash": clf_mod.recipe_hash()},
        "teacher": {"parameters": count_parameters(teacher), "final_loss": tstats["final_loss"],
                    "images_seen": tstats["images_seen"], "guidance": teachers},
        "config": cfg.to_dict(),
        "notes": (f"Frechet distances in the {clf_mod.FEATURE_DIM}-d penultimate features of the cached "
                  f"digit classifier, each from {cfg.eval_samples} samples against all 1,797 digits; per "
                  f"seed the same latents{with_labels} for teacher and students. Teacher: EDM Heun, "
                  f"{cfg.teacher_steps} steps. Spread: sample standard deviation over seeds. FD bars' standard "
                  f"errors: {BOOTSTRAP_RESAMPLES} bootstrap resamples of the evaluated features per seed "
                  "(sidfast.demo.summary). "
                  f"Teacher-FD: the teacher-feature distance of the same samples to {tfd.num} samples of the "
                  f"unguided teacher ({REFERENCE_NAME}), in {tfd.features.dim}-d features of its encoder; each "
                  "student's run measured it every tenth of its images and kept best.pt by it "
                  "(best_checkpoints; docs/runs.md). "
                  "Students distilled from the one teacher with "
                  f"{cfg.sid['iterations']} iterations of batch {cfg.sid['batch']} each."
                  + (" Conditional bars: the teacher at its guidance of lowest mean FD against the guided "
                     "student of lowest mean FD; label accuracy is the classifier's agreement with the "
                     "requested labels." if conditional else "")),
    }
    title = f"sidfast demo {cfg.demo} ({mode}), seeds {', '.join(map(str, cfg.seeds))}, {dev}"
    table = summary.markdown(title, fd_s, acc_s, sec_s, bars, teacher_fd=tfd_s, best=best)
    table += f"\ntotal {total:.1f} s (limit {cfg.time_limit:.0f} s); report {out / 'report.json'}\n"
    write_json(out / "report.json", report)
    tmp = out / ".report.md.tmp"
    tmp.write_text(table, encoding="utf-8")
    os.replace(tmp, out / "report.md")
    say(table)
    return report
