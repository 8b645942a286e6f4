"""Does the teacher-feature distance (``--eval teacher-fd``) order the digits demo's models as the demo's
classifier FD does? The models: the generator at initialization, the SiD student along its training, the
SiD, SiDA and 4-step students at the end, and the teacher itself; each measured by both metrics on the same
samples; the Spearman rank correlation of the two orders. Also: how much one in-loop evaluation costs
against one training iteration, and how the order moves with the noise level and the feature dimension.

    python benchmarks/validate_teacher_fd.py [--out DIR] [--md benchmarks/results/cpu-teacher-fd.md]
        [--json benchmarks/results/cpu-teacher-fd.json] [--seed 0] [--threads 1]
    python benchmarks/validate_teacher_fd.py --from-json benchmarks/results/cpu-teacher-fd.json --md OUT.md

The recipes are the quick demos' (``sidfast demo --quick``, ``--method sida --quick``, ``--gen-steps 4
--quick``): one teacher (1,200 steps), the SiD student (600 iterations of batch 128, lr 3e-4) measured in the
loop every 3.2 kimg, the SiDA student (1,000 iterations, lr 1e-3, the demo's gates), the 4-step student (800
iterations). Classifier FD: the demo's (64-d penultimate features of the cached digit classifier, against
all 1,797 digits); both metrics on the teacher-fd's own 2,048 student samples per model (its per-sample
latents), the teacher on fresh samples at those latents (18 Heun steps).
"""
from __future__ import annotations

import argparse
import copy
import json
import platform
import time
from pathlib import Path

import numpy as np
import torch

from sidfast.demo import classifier as clf_mod
from sidfast.demo import compare
from sidfast.demo.digits import load_digits_tensors
from sidfast.demo.measure import threads_used, write_json
from sidfast.demo.nets import build_denoiser
from sidfast.demo.recipe import BUILDER, demo_config
from sidfast.demo.teacher import train_teacher
from sidfast.evaluate.frechet import feature_statistics, frechet_distance, sqrt_psd
from sidfast.evaluate.loop_metrics import metric_for
from sidfast.evaluate.shards import per_sample_normal
from sidfast.evaluate.teacher_fd import DIM, SIGMA, STUDENT, TeacherFD, TeacherFeatures
from sidfast.models.denoiser import as_denoiser
from sidfast.samplers import edm_sample
from sidfast.training.config import TrainConfig
from sidfast.training.evaluation import EvalRun
from sidfast.training.loop import distill
from sidfast.training.report import read_metrics
from sidfast.utils import runtime

SNAPSHOTS = (0, 25, 50, 100, 200, 400)  # SiD iterations measured along training (600: the SiD student)
SIGMAS = (0.25, 0.5, 1.0, 2.0)
DIMS = (16, 32, 64, 128, 256)


def ranks(values) -> np.ndarray:
    """Ranks 1..n, ties averaged."""
    values = np.asarray(values, dtype=np.float64)
    order = values.argsort(kind="stable")
    out = np.empty(len(values))
    out[order] = np.arange(1, len(values) + 1)
    for v in np.unique(values):
        same = values == v
        out[same] = out[same].mean()
    return out


def spearman(a, b) -> float:
    """Spearman's rank correlation: Pearson's correlation of the ranks."""
    ra, rb = ranks(a), ranks(b)
    return float(np.corrcoef(ra, rb)[0, 1])


def eval_run(cfg: TrainConfig, teacher, generator, batch: int = 256) -> EvalRun:
    return EvalRun(cfg, teacher, generator, (1, 8, 8), 0, "onehot", torch.device("cpu"), runtime.Dist(),
                   Path(cfg.run_dir), batch)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default="/tmp/sidfast-teacher-fd")
    parser.add_argument("--md", default=None)
    parser.add_argument("--json", default=None)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--from-json", default=None, help="write --md from this JSON, measure nothing")
    args = parser.parse_args()
    if args.from_json:
        Path(args.md).write_text(markdown(json.loads(Path(args.from_json).read_text())), encoding="utf-8")
        return
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    t_start = time.perf_counter()
    with threads_used(args.threads):
        result = validate(out, args.seed)
    result["wall_seconds"] = time.perf_counter() - t_start
    result["machine"] = {"platform": platform.platform(), "processor": platform.processor() or platform.machine(),
                         "torch": torch.__version__, "threads": args.threads}
    print(json.dumps({k: v for k, v in result.items() if k != "sensitivity"}, indent=1, default=str))
    if args.json:
        write_json(Path(args.json), result)
    if args.md:
        Path(args.md).write_text(markdown(result), encoding="utf-8")


def validate(out: Path, seed: int) -> dict:
    say = print
    cfg = demo_config(quick=True, seed=seed)
    clf, accuracy, _ = clf_mod.load_or_train_classifier(log=say)
    images, _ = load_digits_tensors()
    real_stats = feature_statistics(clf_mod.extract_features(clf, images))

    def classifier_fd(x: torch.Tensor) -> float:
        return frechet_distance(*feature_statistics(clf_mod.extract_features(clf, x)), *real_stats)

    torch.manual_seed(seed)
    net = build_denoiser(cfg.net)
    t0 = time.perf_counter()
    teacher, tstats = train_teacher(net, images, cfg.teacher, log=say, log_every=cfg.teacher.iterations // 4)
    say(f"teacher trained in {time.perf_counter() - t0:.1f} s")

    # 1. SiD with the teacher-fd in the loop, the EMA generator kept at SNAPSHOTS
    base = {**cfg.sid, "device": "cpu", "seed": seed, "overwrite": True, "teacher_steps": cfg.teacher_steps,
            "grid_size": 0, "progress": False, "checkpoint_every": 0, "sample_every": 0,
            "log_every": max(1, int(cfg.sid["iterations"]) // 20)}
    sid_cfg = TrainConfig.from_dict({**base, "run_dir": str(out / "sid"), "eval": "teacher-fd",
                                     "eval_every": 25 * cfg.sid["batch"] / 1000})
    snapshots = {0: copy.deepcopy(teacher)}  # the generator and its EMA start as copies of the teacher

    def keep(state):
        if state["iteration"] in SNAPSHOTS:
            snapshots[state["iteration"]] = copy.deepcopy(state["generator_ema"])

    metric = metric_for(sid_cfg)
    arch = {"builder": BUILDER, "config": cfg.net}
    sid = distill(sid_cfg, teacher, architecture=arch, callbacks=[keep], metric=metric, log=say)
    records = read_metrics(out / "sid" / "metrics.jsonl")
    logged = {r["iteration"]: r["teacher_fd"] for r in records if "teacher_fd" in r}
    eval_seconds = [r["eval_seconds"] for r in records if "teacher_fd" in r]
    iteration_seconds = sid.summary["training_seconds"] / sid.summary["iterations_this_run"]
    reference_cost = sid.summary["eval_setup_seconds"]

    # 2. SiDA and the 4-step student, the quick comparisons' recipes
    sida_spec = compare.comparison_config("sida", quick=True, seed=seed)
    npz = compare._save_npz(out / "digits.npz", images)
    sida_student = next(s for s in sida_spec.students if s.name == "sida")
    sida_cfg = TrainConfig.from_dict({**base, **sida_spec.sid, **sida_student.options, "data": str(npz),
                                      "run_dir": str(out / "sida"),
                                      "log_every": max(1, int(sida_spec.sid["iterations"]) // 10)})
    sida = distill(sida_cfg, teacher, architecture=arch, log=None)
    steps_spec = compare.comparison_config("gen-steps", quick=True, seed=seed, gen_steps=4)
    many = next(s for s in steps_spec.students if s.steps > 1)
    steps_cfg = TrainConfig.from_dict({**base, **steps_spec.sid, **many.options, "run_dir": str(out / "steps"),
                                       "log_every": max(1, int(steps_spec.sid["iterations"]) // 10)})
    steps = distill(steps_cfg, teacher, architecture=arch, log=None)

    # 3. every model's samples at the teacher-fd's student latents; both metrics on them
    den = as_denoiser(teacher, name="teacher").eval()
    models = {}
    for it in SNAPSHOTS:
        name = "generator at init" if it == 0 else f"SiD student, iteration {it}"
        models[name] = (sid_cfg, snapshots[it])
    models["SiD student (600 iterations)"] = (sid_cfg, sid.generator_ema)
    models[f"SiDA student ({sida.iteration} iterations)"] = (sida_cfg, sida.generator_ema)
    models[f"4-step student ({steps.iteration} iterations)"] = (steps_cfg, steps.generator_ema)
    samples = {}
    with torch.no_grad():
        for name, (train_cfg, gen) in models.items():
            run = eval_run(train_cfg, den, as_denoiser(gen).eval())
            samples[name] = metric.student_samples(run, 0, metric.num, None, {})
        z = per_sample_normal((1, 8, 8), 0, metric.num, STUDENT)
        samples["teacher (18-step Heun)"] = edm_sample(den, z, cfg.teacher_steps, sid_cfg.sigma_min,
                                                       sid_cfg.sigma_max, sid_cfg.rho)
    run = eval_run(sid_cfg, den, None)
    ref_samples = torch.load(out / "sid" / "teacher_fd_reference.pt", weights_only=True)["samples"]
    torch.save({"samples": samples, "reference": ref_samples}, out / "samples.pt")
    # diagnostics: each metric with the other's reference (the classifier against the teacher's samples, the
    # teacher's features against the digits)
    teacher_stats = feature_statistics(clf_mod.extract_features(clf, ref_samples))
    on_digits = TeacherFD(num=metric.num)
    on_digits.features = metric.features
    mu, cov = feature_statistics(on_digits.features_of_samples(run, images))
    on_digits.reference = {"mu": mu, "sigma": cov, "root": sqrt_psd(cov)}
    rows = []
    for name, x in samples.items():
        f = clf_mod.extract_features(clf, x)
        rows.append({"model": name, "classifier_fd": classifier_fd(x), "teacher_fd": metric.distance(run, x),
                     "classifier_fd_to_teacher": frechet_distance(*feature_statistics(f), *teacher_stats),
                     "teacher_fd_to_digits": on_digits.distance(run, x)})
    # the loop's logged values are the same measurement of the same EMA weights
    for it in SNAPSHOTS:
        name = "generator at init" if it == 0 else f"SiD student, iteration {it}"
        row = next(r for r in rows if r["model"] == name)
        row["logged_teacher_fd"] = logged.get(it)
    rho = spearman([r["classifier_fd"] for r in rows], [r["teacher_fd"] for r in rows])
    diagnostics = {"classifier FD to the teacher's samples vs teacher-FD":
                   spearman([r["classifier_fd_to_teacher"] for r in rows], [r["teacher_fd"] for r in rows]),
                   "teacher-FD to the digits vs classifier FD":
                   spearman([r["classifier_fd"] for r in rows], [r["teacher_fd_to_digits"] for r in rows])}

    # 4. sensitivity: the noise level and the feature dimension (the reference samples re-featured)
    sensitivity = []
    for sigma, dim in [(s, DIM) for s in SIGMAS] + [(SIGMA, d) for d in DIMS if d != DIM]:
        alt = TeacherFD(num=metric.num, sigma=sigma, dim=dim)
        alt.features = TeacherFeatures(den, sigma, dim)
        alt.features.probe(ref_samples[:2], None, {})
        mu, cov = feature_statistics(alt.features_of_samples(run, ref_samples))
        alt.reference = {"mu": mu, "sigma": cov, "root": sqrt_psd(cov)}
        values = [alt.distance(run, x) for x in samples.values()]
        sensitivity.append({"sigma": sigma, "dim": alt.features.dim, "values": values,
                            "spearman": spearman([r["classifier_fd"] for r in rows], values)})

    return {"date": "2026-12-06", "seed": seed, "spearman": rho, "passed": rho >= 0.9, "rows": rows,
            "diagnostics": diagnostics,
            "samples_per_model": metric.num, "feature_dim": metric.features.dim,
            "feature_raw_dim": metric.features.raw_dim, "feature_layer": metric.features.layer,
            "sigma": metric.sigma, "classifier_accuracy": accuracy,
            "cost": {"eval_seconds_median": float(np.median(eval_seconds)), "evaluations": len(eval_seconds),
                     "iteration_seconds": iteration_seconds, "batch": sid_cfg.batch,
                     "fraction_of_iteration": float(np.median(eval_seconds)) / iteration_seconds,
                     "reference_seconds": reference_cost,
                     "reference_in_iterations": reference_cost / iteration_seconds},
            "budgets": {"teacher_steps": cfg.teacher.iterations, "sid": [sid.iteration, sid_cfg.batch, sid_cfg.lr],
                        "sida": [sida.iteration, sida_cfg.batch, sida_cfg.lr],
                        "4-step": [steps.iteration, steps_cfg.batch, steps_cfg.lr]},
            "sensitivity": {"names": list(samples), "rows": sensitivity}}


def markdown(r: dict) -> str:
    c = r["cost"]
    teacher = next(row for row in r["rows"] if row["model"].startswith("teacher"))
    better = [row["model"] for row in r["rows"] if row["classifier_fd"] < teacher["classifier_fd"]]
    lines = [
        "# The teacher-feature distance on the digits demo (CPU)",
        "",
        f"Date: {r['date']}. Machine: {r['machine']['processor']} ({r['machine']['platform']}), torch "
        f"{r['machine']['torch']}, {r['machine']['threads']} thread(s), shared with other jobs. Command: "
        "`python benchmarks/validate_teacher_fd.py --md benchmarks/results/cpu-teacher-fd.md --json "
        "benchmarks/results/cpu-teacher-fd.json` (seed " + str(r["seed"]) + f"; {r['wall_seconds']:.0f} s).",
        "",
        "Setup: the quick demos' recipes from one teacher (" + str(r["budgets"]["teacher_steps"]) + " steps): "
        f"SiD {r['budgets']['sid'][0]} iterations of batch {r['budgets']['sid'][1]} (lr {r['budgets']['sid'][2]:g}) "
        "with `--eval teacher-fd --eval-every 3.2`, its EMA generator kept at the iterations below; SiDA "
        f"{r['budgets']['sida'][0]} iterations (lr {r['budgets']['sida'][2]:g}, the demo's gates); the 4-step "
        f"student {r['budgets']['4-step'][0]} iterations. Each model: {r['samples_per_model']} samples at the "
        "teacher-fd's per-sample latents (the teacher: 18 Heun steps from the same latents), measured by both "
        "metrics. Classifier FD: the demo's (64-d penultimate features of the cached digit classifier, held-out "
        f"accuracy {r['classifier_accuracy']:.4f}, against all 1,797 digits). Teacher-FD: "
        f"`{r['feature_layer']}` of the teacher at sigma {r['sigma']:g}, {r['feature_raw_dim']} channels "
        f"projected to {r['feature_dim']}, against {r['samples_per_model']} cached teacher samples.",
        "",
        "| model | classifier FD | teacher-FD | teacher-FD logged in the loop | classifier FD to the teacher's "
        "samples | teacher-FD to the digits |",
        "|---|---|---|---|---|---|",
    ]
    for row in r["rows"]:
        logged = row.get("logged_teacher_fd")
        lines.append(f"| {row['model']} | {row['classifier_fd']:.4f} | {row['teacher_fd']:.4f} | "
                     f"{'' if logged is None else f'{logged:.4f}'} | {row['classifier_fd_to_teacher']:.4f} | "
                     f"{row['teacher_fd_to_digits']:.4f} |")
    lines += ["", f"Spearman rank correlation over the {len(r['rows'])} models: **{r['spearman']:.4f}** "
              f"(bar >= 0.9: {'met' if r['passed'] else 'NOT met'}).", "",
              "Diagnostics (Spearman): " + "; ".join(f"{k}: {v:.4f}" for k, v in r["diagnostics"].items())
              + ".", "",
              "Models with a lower classifier FD than the teacher's (closer to the digits than the teacher): "
              + (", ".join(better) if better else "none") + ". The teacher-FD measures against the teacher's "
              "own samples, so it ranks the teacher first whatever the data say.", "",
              "## Cost", "",
              f"One in-loop evaluation ({r['samples_per_model']} one-step samples and their teacher features): "
              f"median {c['eval_seconds_median']:.3f} s over {c['evaluations']} evaluations; one training "
              f"iteration (batch {c['batch']}): {c['iteration_seconds']:.4f} s (the run's training seconds over "
              f"its iterations): **{c['fraction_of_iteration']:.2f} iterations** per evaluation. The reference "
              f"(sampled once per run, 18 Heun steps = 35 teacher evaluations per sample, then its features): "
              f"{c['reference_seconds']:.1f} s, {c['reference_in_iterations']:.0f} iterations.", "",
              "## Sensitivity (not used to choose the defaults)", "",
              "Teacher-FD of the same samples with another noise level or feature dimension (the reference "
              "samples featured again); the Spearman correlation with the classifier FD.", "",
              "| sigma | dim | Spearman | " + " | ".join(r["sensitivity"]["names"]) + " |",
              "|---|---|---|" + "---|" * len(r["sensitivity"]["names"])]
    for s in r["sensitivity"]["rows"]:
        lines.append(f"| {s['sigma']:g} | {s['dim']} | {s['spearman']:.4f} | "
                     + " | ".join(f"{v:.4g}" for v in s["values"]) + " |")
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    main()
