"""``sidfast demo``: train a digits teacher from scratch, distill it with SiD, compare teacher and student.

Steps (all seeded; on a CPU bitwise repeatable for a given thread count):
1. the digit classifier of ``classifier.py`` (trained once, cached) gives the feature space of the metric;
2. a teacher ``DigitsDenoiser`` is trained with EDM's loss on the 1,797 digits (``teacher.py``);
3. ``sidfast.training.loop.distill`` runs SiD from it (generator and fake score start as copies of the teacher);
4. Frechet distances to the data, in classifier features, of: the teacher with EDM's Heun sampler
   (``teacher_steps`` steps), the one-step student (its EMA), and the generator at initialization
   (the teacher evaluated once at sigma_init = 2.5), each from the same number of samples;
5. a report (``report.json`` and a printed table) and PNG grids (real, teacher, init, student) in ``out_dir``;
   beside each classifier FD the teacher-feature distance of the same samples (``sidfast.evaluate.teacher_fd``,
   which the SiD run also measures in its loop, keeping ``best.pt`` by it), and the checkpoint it kept.

Quality bars checked (``summary.sid_bars``), each with its margin and standard error (a bootstrap over the
evaluated samples' features, ``frechet.fd_bootstrap``): FD(student) / FD(teacher) within 1.25 up to the noise
(``ratio - 2 SE <= 1.25``) and FD(init) / FD(student) above 3 by more than the noise (``ratio - 2 SE >
3``).
"""
from __future__ import annotations

import time
from pathlib import Path

import torch

from sidfast._checks import check_int
from sidfast.demo import classifier as clf_mod
from sidfast.demo import compare
from sidfast.demo.digits import IMAGE_SHAPE, load_digits_tensors
from sidfast.demo import summary
from sidfast.demo.frechet import feature_statistics, fd_bootstrap_seeds, frechet_distance
from sidfast.demo.measure import threads_used, timed, write_json
from sidfast.demo.nets import build_denoiser, count_parameters
from sidfast.demo.recipe import BUILDER, DemoConfig, demo_config
from sidfast.demo.teacher import train_teacher
from sidfast.evaluate.loop_metrics import metric_for
from sidfast.models.io import save_network
from sidfast.samplers import edm_sample, num_evaluations, one_step_sample
from sidfast.models.denoiser import as_denoiser
from sidfast.training.config import TrainConfig
from sidfast.training.evaluation import EvalRun
from sidfast.training.recipe import resolve
from sidfast.training.loop import distill
from sidfast.utils import runtime
from sidfast.training.report import summary_table
from sidfast.utils.images import save_grid
from sidfast.utils.runtime import resolve_device

STUDENT_RATIO_BAR = 1.25   # FD(student) <= 1.25 FD(teacher)
INIT_RATIO_BAR = 3.0       # FD(init) >= 3 FD(student)
EVALUATIONS = 10           # the SiD run measures its teacher-feature distance this many times (and at its start)


METHODS = ("sid", "sida")


def run_demo(quick: bool = False, out_dir="sidfast-demo", device: str = "auto", seed: int = 0,
             cache_dir=None, threads: int | None = 1, config=None, log=print, method: str = "sid",
             conditional: bool = False, gen_steps: int = 1, seeds: int | None = None) -> dict:
    """Run the demo and return its report (also written to ``out_dir/report.json``).

    ``method="sida"``, ``conditional`` or ``gen_steps > 1`` (one at a time) run a comparison of students side
    by side over several seeds instead (``compare.py``; ``seeds``: how many, default 3, quick 1); so does a
    ``config`` that is a ``compare.ComparisonConfig``. The arguments below are those of the SiD demo.

    Args:
        quick: the short CI configuration (``demo_config(True)``).
        out_dir: output directory (created); the SiD run directory is ``out_dir/sid`` (overwritten).
        device: "auto" (CUDA when available), "cpu", "cuda" or "cuda:N".
        seed: seeds the teacher, SiD and the evaluation noise.
        cache_dir: where the classifier is cached (default ``classifier.default_cache_dir()``).
        threads: CPU threads during the demo. Default 1: for networks this small, extra intra-op threads
            mostly wait on each other, which on a busy machine makes them slower than one; None keeps
            torch's setting.
        config: overrides ``demo_config(quick, seed)`` entirely.
    Returns:
        dict with "passed" (both bars met), "fd" (teacher, student, init), "ratios", "times", "config", ...
    """
    check_int("seed", seed, 0, "seed must be a non-negative integer, got {value!r}")
    if method not in METHODS:
        raise ValueError(f"method must be one of {', '.join(METHODS)}, got {method!r}")
    check_int("gen_steps", gen_steps, 1, "gen_steps must be a positive integer, got {value!r}")
    chosen = [name for name, on in (("method sida", method == "sida"), ("conditional", conditional),
                                    ("gen_steps", gen_steps > 1)) if on]
    if len(chosen) > 1:
        raise ValueError(f"choose one comparison at a time, got {' and '.join(chosen)}")
    if isinstance(config, compare.ComparisonConfig) or chosen:
        mode = "custom"
        if config is None:
            demo = "sida" if method == "sida" else ("conditional" if conditional else "gen-steps")
            config = compare.comparison_config(demo, quick, seed, seeds, gen_steps if gen_steps > 1 else 4)
            mode = "quick" if quick else "full"
        elif not isinstance(config, compare.ComparisonConfig):
            raise TypeError(f"config must be a ComparisonConfig for {chosen[0]}, got {type(config).__name__}")
        return compare.run_comparison(config, out_dir, device, cache_dir, threads, mode, log)
    if seeds is not None:
        raise ValueError("seeds is for the comparisons (method sida, conditional, gen_steps > 1); the SiD "
                         "demo runs one seed")
    return _run_sid_demo(quick, out_dir, device, seed, cache_dir, threads, config, log)


def _run_sid_demo(quick, out_dir, device, seed, cache_dir, threads, config, log) -> dict:
    """The SiD demo: teacher against one-step student, one seed."""
    say = log if log is not None else (lambda *_: None)
    if threads is not None:
        check_int("threads", threads, 1, "threads must be a positive integer or None, got {value!r}")
    if config is not None and not isinstance(config, DemoConfig):
        raise TypeError(f"config must be a DemoConfig or a ComparisonConfig, got {type(config).__name__}")
    cfg = config if config is not None else demo_config(quick, seed)
    dev = resolve_device(device)
    out = Path(out_dir)
    if out.exists() and not out.is_dir():
        raise ValueError(f"out_dir {str(out)!r} exists and is not a directory")
    out.mkdir(parents=True, exist_ok=True)
    t_start = time.perf_counter()
    with threads_used(threads if dev.type == "cpu" else None):
        # 1. the metric's feature space
        (clf, accuracy, cached), t_clf = timed(
            lambda: clf_mod.load_or_train_classifier(cache_dir, log=say), dev)
        how = "cached" if cached else f"trained in {t_clf:.1f} s"
        say(f"digit classifier: held-out accuracy {accuracy:.4f} ({how})")
        images, _ = load_digits_tensors()
        real_features = clf_mod.extract_features(clf, images)
        real_stats = feature_statistics(real_features)
        features = {}  # name -> features (eval_samples, D): the FD bars' bootstrap resamples them

        def fd_of(samples: torch.Tensor, name: str) -> float:
            f = clf_mod.extract_features(clf, samples)
            features[name] = [f.float().cpu()]
            return frechet_distance(*feature_statistics(f), *real_stats)

        # 2. the teacher, from scratch
        torch.manual_seed(seed)
        net = build_denoiser(cfg.net).to(dev)
        say(f"teacher: {count_parameters(net):,} parameters, {cfg.teacher.iterations} steps of batch "
            f"{cfg.teacher.batch} on {dev}")
        teacher, tstats = train_teacher(net, images.to(dev), cfg.teacher, log=say,
                                        log_every=max(1, cfg.teacher.iterations // 4))
        save_network(out / "teacher.pt", teacher, BUILDER, cfg.net,
                     meta={"trainer": "sidfast demo", "teacher_config": cfg.teacher.to_dict(), **tstats})

        # evaluation noise: fixed, shared by teacher, init and student
        g = torch.Generator().manual_seed(seed + 12345)
        z = torch.randn((cfg.eval_samples, *IMAGE_SHAPE), generator=g).to(dev)
        # the options the SiD run will train with (the EDM recipe over the demo's own)
        sid_opts = resolve(TrainConfig.from_dict(cfg.sid), as_denoiser(teacher)).cfg
        sigma_init = sid_opts.sigma_init
        sampler = {"sigma_min": sid_opts.sigma_min, "sigma_max": sid_opts.sigma_max, "rho": sid_opts.rho}
        edm_sample(teacher, z[:8], 2, **sampler)  # warm-up (first-call allocations, CUDA context)
        teacher_x, t_teacher = timed(lambda: edm_sample(teacher, z, cfg.teacher_steps, **sampler), dev)
        init_x = one_step_sample(teacher, z, sigma_init)
        fd_teacher, fd_init = fd_of(teacher_x, "teacher"), fd_of(init_x, "init")
        say(f"teacher ({cfg.teacher_steps}-step Heun) FD {fd_teacher:.3f}; "
            f"generator at init (one step) FD {fd_init:.3f}")

        # 3. SiD
        kimg = int(cfg.sid["iterations"]) * int(cfg.sid["batch"]) / 1000
        train_cfg = TrainConfig.from_dict({**cfg.sid, "run_dir": str(out / "sid"), "device": str(dev),
                                           "seed": seed, "overwrite": True,
                                           "teacher_steps": cfg.teacher_steps, "grid_size": cfg.grid_size,
                                           "progress": not quick,
                                           "checkpoint_every": 0, "sample_every": 0,
                                           "log_every": max(1, int(cfg.sid["iterations"]) // 20),
                                           "eval": "teacher-fd", "eval_every": kimg / EVALUATIONS})
        metric = metric_for(train_cfg)
        result = distill(train_cfg, teacher, architecture={"builder": BUILDER, "config": cfg.net}, log=say,
                         metric=metric)
        student = result.generator_ema
        one_step_sample(student, z[:8], sigma_init)  # warm-up
        student_x, t_student = timed(lambda: one_step_sample(student, z, sigma_init), dev)
        fd_student = fd_of(student_x, "student")
        # the teacher-feature distance of the same samples, against the run's cached teacher samples
        run = EvalRun(train_cfg, metric.features.teacher, student, IMAGE_SHAPE, 0, "onehot", dev, runtime.Dist(),
                      out / "sid", cfg.eval_samples)
        with torch.no_grad():
            teacher_fd = {name: metric.distance(run, x)
                          for name, x in (("teacher", teacher_x), ("student", student_x), ("init", init_x))}

        # 4. the report
        k = cfg.grid_size
        save_grid(images[:k], out / "real.png")
        save_grid(teacher_x[:k], out / "teacher.png")
        save_grid(init_x[:k], out / "init.png")
        save_grid(student_x[:k], out / "student.png")
    total = time.perf_counter() - t_start
    torch.save({"real": real_features.float().cpu(), "features": features, "seeds": [seed]}, out / "features.pt")
    fd = {"teacher": fd_teacher, "student": fd_student, "init": fd_init}
    best = {"path": result.evaluation.get("best_checkpoint"), "teacher_fd": result.evaluation.get("best_teacher_fd"),
            "iteration": result.evaluation.get("best_iteration"), "images": result.evaluation.get("best_nimg")}
    replicates, t_boot = timed(lambda: fd_bootstrap_seeds(features, real_features, [seed]), torch.device("cpu"))
    bars = summary.sid_bars({n: summary.summarize([v]) for n, v in fd.items()}, replicates, STUDENT_RATIO_BAR,
                            INIT_RATIO_BAR)
    nfe = num_evaluations(cfg.teacher_steps, "heun")
    report = {
        "passed": all(b["passed"] for b in bars.values()),
        "mode": "quick" if (config is None and quick) else ("custom" if config is not None else "full"),
        "device": str(dev), "threads": torch.get_numthreads_used() if threads is None else threads, "seed": seed,
        "fd": fd,
        "teacher_fd": teacher_fd,
        "best_checkpoint": best,
        "bars": bars,
        "sampling_seconds": {"teacher": t_teacher, "student": t_student, "samples": cfg.eval_samples,
                             "teacher_nfe": nfe, "student_nfe": 1},
        "training_seconds": {"classifier": 0.0 if cached else t_clf, "teacher": tstats["seconds"],
                             "sid": result.seconds, "total": total, "fd_bootstrap": t_boot},
        "classifier": {"held_out_accuracy": accuracy, "cached": cached, "feature_dim": clf_mod.FEATURE_DIM,
                       "recipe_hash": clf_mod.recipe_hash()},
        "teacher": {"parameters": count_parameters(teacher), "final_loss": tstats["final_loss"],
                    "images_seen": tstats["images_seen"]},
        "sid": {"iterations": result.iteration, "images": result.nimg, "loss_g": result.last.get("loss_g"),
                "loss_fake": result.last.get("loss_fake"), "run_dir": str(result.run_dir)},
        "config": {**cfg.to_dict(), "sid": result.config.to_dict()},
        "notes": ("Frechet distances in the 64-d penultimate features of the cached digit classifier, each "
                  f"from {cfg.eval_samples} generated samples against all 1,797 digits; teacher: EDM Heun "
                  f"sampler, {cfg.teacher_steps} steps ({nfe} evaluations), sigma_max "
                  f"{sampler['sigma_max']}; "
                  f"student and init: one evaluation at sigma_init {sigma_init}. SiD learning rate "
                  f"{result.config.lr} (published CIFAR "
                  "1e-5 is for ~400M images; the demo sees far fewer). Teacher-FD: the teacher-feature distance "
                  f"of the same samples to {metric.num} of the teacher's own samples cached by the SiD run, in "
                  f"{metric.features.dim}-d features of the teacher's encoder ({metric.features.layer}); the "
                  "run measured it every tenth of its images and kept the best EMA generator as best_checkpoint "
                  "(docs/runs.md)."),
    }
    write_json(out / "report.json", report)
    rows = [("device", report["device"]),
            ("FD teacher (%d-step Heun, %d NFE)" % (cfg.teacher_steps, nfe), fd_teacher),
            ("FD student (1 step)", fd_student),
            ("FD generator at init (1 step)", fd_init),
            ("teacher-FD teacher / student / init", f"{teacher_fd['teacher']:.4g} / {teacher_fd['student']:.4g} / "
                                                      f"{teacher_fd['init']:.4g}"),
            ("best checkpoint (teacher-FD, iteration)", f"{best['path']} ({best['teacher_fd']:.4g}, "
                                                        f"{best['iteration']})"),
            (f"student / teacher (bar {bars['student_vs_teacher']['bar']})", _bar_text(bars["student_vs_teacher"])),
            (f"init / student (bar {bars['init_vs_student']['bar']})", _bar_text(bars["init_vs_student"])),
            (f"teacher sampling, {cfg.eval_samples} images (s)", t_teacher),
            (f"student sampling, {cfg.eval_samples} images (s)", t_student),
            ("teacher training (s)", tstats["seconds"]),
            ("SiD training (s), iterations", f"{result.seconds:.1f}, {result.iteration}"),
            ("total (s)", total),
            ("report", str(out / "report.json"))]
    say(summary_table(rows, f"sidfast demo ({report['mode']})"))
    return report


def _bar_text(b: dict) -> str:
    se = "" if b["se"] is None else f", SE {b['se']:.3f}"
    return f"{b['value']:.3f} (margin {b['margin']:.3f}{se}) {'ok' if b['passed'] else 'FAILED'}"


def report_bars(report: dict, features: dict) -> dict:
    """The SiD demo's bars of a finished run from its ``report.json`` and ``features.pt`` (as loaded)."""
    replicates = fd_bootstrap_seeds(features["features"], features["real"], features["seeds"])
    return summary.sid_bars({n: summary.summarize([v]) for n, v in report["fd"].items()}, replicates,
                            STUDENT_RATIO_BAR, INIT_RATIO_BAR)


# ---- the command line (``sidfast demo``) ----

def add_demo_arguments(parser) -> None:
    """The options of ``sidfast demo`` (the command line adds --device)."""
    parser.add_argument("--quick", action="store_true",
                        help="the short CI version (under 3 minutes on 2 CPU cores; one seed)")
    parser.add_argument("--method", choices=("sid", "sida"), default="sid",
                        help="sida: SiD and SiDA students side by side, the real digits as SiDA's data "
                             "(default: sid)")
    parser.add_argument("--conditional", action="store_true",
                        help="a class-conditional teacher distilled with and without SiD-LSG guidance, compared "
                             "by FD and label accuracy")
    parser.add_argument("--gen-steps", type=int, default=1, metavar="K",
                        help="K >= 2: a K-step student beside the one-step student (default: 1, no comparison)")
    parser.add_argument("--seeds", type=int, default=None, metavar="N",
                        help="seeds of a comparison (--method sida, --conditional, --gen-steps; default: 3, "
                             "--quick 1)")
    parser.add_argument("--out", default="sidfast-demo", help="output directory (default: sidfast-demo)")
    parser.add_argument("--seed", type=int, default=0,
                        help="random seed of the whole demo; a comparison's seeds are SEED, SEED+1, ... "
                             "(default: 0)")
    parser.add_argument("--cache-dir", default=None,
                        help="where the digit classifier is cached (default: $SIDFAST_CACHE or ~/.cache/sidfast)")


def run_from_args(args, device: str) -> dict:
    """``run_demo`` for the parsed ``sidfast demo`` options; a ValueError names the option at fault."""
    if args.gen_steps < 1:
        raise ValueError(f"--gen-steps must be >= 1, got {args.gen_steps}")
    if args.seeds is not None and args.seeds < 1:
        raise ValueError(f"--seeds must be >= 1, got {args.seeds}")
    comparisons = (("--method sida", args.method == "sida"), ("--conditional", args.conditional),
                   (f"--gen-steps {args.gen_steps}", args.gen_steps > 1))
    chosen = [name for name, on in comparisons if on]
    if len(chosen) > 1:
        raise ValueError(f"choose one comparison at a time, got {' and '.join(chosen)}")
    if args.seeds is not None and not chosen:
        raise ValueError("--seeds is for the comparisons (--method sida, --conditional, --gen-steps K)")
    if args.seed < 0:
        raise ValueError(f"--seed must be >= 0, got {args.seed}")
    return run_demo(quick=args.quick, out_dir=args.out, device=device, seed=args.seed,
                    cache_dir=args.cache_dir, method=args.method, conditional=args.conditional,
                    gen_steps=args.gen_steps, seeds=args.seeds)
