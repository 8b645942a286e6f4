"""What one in-loop teacher-fd evaluation costs against one SiD iteration, on this machine's CPU.

    python benchmarks/bench_teacher_fd_cost.py [--configs digits cifar] [--json OUT.json] [--md OUT.md]

Per config: a ``Distiller`` with ``--eval teacher-fd`` at batch B, its reference sampled with one Euler step
(the reference is made once per run; its cost is N x (2 teacher_steps - 1) teacher forwards and is not what is
measured here), then ``iterations`` timed ``step()`` calls after one warm-up and ``evaluations`` timed
evaluations of N samples (the one-step generator's forward and the teacher's encoder, in chunks of B). Both
scale with the samples they process, so the fraction at the default N = 2048 and the published batch 256 is
given as the measured per-sample costs scaled to those counts (an extrapolation, marked as one).

Configs: ``digits``, the demo's teacher network (an MLP of width 256, 8x8 images); ``cifar``, a diffusers
``UNet2DModel`` of the DDPM CIFAR-10 layout (32x32x3, channels 128-256-256-256, two layers per block,
attention at 16x16; 35.7M parameters), random weights (costs do not depend on them).
"""
from __future__ import annotations

import argparse
import json
import platform
import statistics
import tempfile
import time

import torch

from sidfast.demo.nets import build_denoiser
from sidfast.demo.recipe import DemoConfig
from sidfast.evaluate.loop_metrics import metric_for
from sidfast.training.config import TrainConfig
from sidfast.training.loop import Distiller

CONFIGS = {"digits": dict(batch=128, num=2048, iterations=10, evaluations=3),
           "cifar": dict(batch=4, num=80, iterations=3, evaluations=1)}
DEFAULT_NUM, PUBLISHED_BATCH = 2048, 256


def teacher_of(name: str):
    if name == "digits":
        return build_denoiser(DemoConfig().net)
    import diffusers

    from sidfast.models.diffusers import DiffusersDenoiser
    from sidfast.schedules import VPSchedule

    torch.manual_seed(0)
    unet = diffusers.UNet2DModel(sample_size=32, in_channels=3, out_channels=3, layers_per_block=2,
                                 block_out_channels=(128, 256, 256, 256),
                                 down_block_types=("DownBlock2D", "AttnDownBlock2D", "DownBlock2D", "DownBlock2D"),
                                 up_block_types=("UpBlock2D", "UpBlock2D", "AttnUpBlock2D", "UpBlock2D"))
    return DiffusersDenoiser(unet, VPSchedule.from_diffusers(diffusers.DDPMScheduler()), "epsilon")


def measure(name: str, run_dir: str) -> dict:
    spec = CONFIGS[name]
    teacher = teacher_of(name)
    params = sum(p.numel() for p in teacher.parameters())
    cfg = TrainConfig(batch=spec["batch"], iterations=10 ** 6, device="cpu", run_dir=run_dir, grid_size=0,
                      teacher_steps=1, progress=False, eval="teacher-fd", eval_num=spec["num"])
    trainer = Distiller(cfg, teacher, metric=metric_for(cfg))
    setup = trainer.evaluation.setup()
    trainer.step()  # warm-up
    steps = []
    for _ in range(spec["iterations"]):
        start = time.perf_counter()
        trainer.step()
        steps.append(time.perf_counter() - start)
    evals = [trainer.evaluation.evaluate(trainer.iteration, trainer.nimg)["eval_seconds"]
             for _ in range(spec["evaluations"])]
    t_iter, t_eval = statistics.median(steps), statistics.median(evals)
    per_image_iter, per_sample_eval = t_iter / spec["batch"], t_eval / spec["num"]
    return {"config": name, "parameters": params, "batch": spec["batch"], "num": spec["num"],
            "feature_layer": trainer.evaluation.metric.features.layer,
            "feature_dim": trainer.evaluation.metric.features.dim,
            "raw_dim": trainer.evaluation.metric.features.raw_dim,
            "iteration_seconds": t_iter, "iterations_timed": len(steps),
            "evaluation_seconds": t_eval, "evaluations_timed": len(evals), "setup_seconds_1_step": setup,
            "fraction_measured": t_eval / t_iter,
            "fraction_at_2048_samples_batch_256": (per_sample_eval * DEFAULT_NUM) / (per_image_iter * PUBLISHED_BATCH)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--configs", nargs="+", default=list(CONFIGS), choices=list(CONFIGS))
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--json", default=None)
    parser.add_argument("--md", default=None)
    parser.add_argument("--from-json", default=None, help="write --md from the rows of this JSON, measure nothing")
    args = parser.parse_args()
    if args.from_json:
        with open(args.from_json, encoding="utf-8") as f:
            out = json.load(f)
        if args.md:
            with open(args.md, "w", encoding="utf-8") as f:
                f.write(markdown(out))
        return
    torch.set_num_threads(args.threads)
    rows = []
    for name in args.configs:
        with tempfile.TemporaryDirectory(prefix="sidfast-tfd-cost-") as tmp:
            rows.append(measure(name, tmp))
        print(json.dumps(rows[-1]), flush=True)
    out = {"date": "2026-12-06", "machine": platform.processor() or platform.machine(), "torch": torch.__version__,
           "threads": args.threads, "rows": rows}
    if args.json:
        with open(args.json, "w", encoding="utf-8") as f:
            json.dump(out, f, indent=1)
            f.write("\n")
    if args.md:
        with open(args.md, "w", encoding="utf-8") as f:
            f.write(markdown(out))


def markdown(out: dict) -> str:
    lines = ["# What one teacher-fd evaluation costs against one SiD iteration (CPU)", "",
             f"Date: {out['date']}. Machine: the shared 2-core development CPU ({out['machine']}), torch "
             f"{out['torch']}, {out['threads']} thread(s), other jobs running beside it (timings vary with their "
             "load). Command: `python benchmarks/bench_teacher_fd_cost.py --json "
             "benchmarks/results/cpu-teacher-fd-cost.json --md benchmarks/results/cpu-teacher-fd-cost.md`.", "",
             "Per config: a `Distiller` with `--eval teacher-fd` at batch B; the median of timed `step()` calls "
             "(after one warm-up) and of timed evaluations of N samples (the one-step EMA generator and the "
             "teacher's encoder, in chunks of B). The last column scales the measured per-sample costs to the "
             "default N = 2048 and the published batch 256 (an extrapolation: both costs grow with the samples "
             "they process). The reference, sampled once per run, is N x (2 x teacher steps - 1) teacher "
             "forwards (18 steps: 35 per sample) and is not in these numbers.", "",
             "| config | parameters | features | B | N | iteration (s) | evaluation (s) | evaluation / iteration, "
             "measured | at N 2048, batch 256 (extrapolated) |", "|---|---|---|---|---|---|---|---|---|"]
    for r in out["rows"]:
        lines.append(f"| {r['config']} | {r['parameters'] / 1e6:.2f}M | `{r['feature_layer']}`, {r['raw_dim']} -> "
                     f"{r['feature_dim']} | {r['batch']} | {r['num']} | {r['iteration_seconds']:.3f} "
                     f"({r['iterations_timed']} timed) | {r['evaluation_seconds']:.3f} ({r['evaluations_timed']} "
                     f"timed) | {r['fraction_measured']:.2f} | {r['fraction_at_2048_samples_batch_256']:.2f} |")
    lines += ["", "Configs: `digits`, the demo's teacher network (an MLP of width 256 on 8x8 images); `cifar`, a "
              "diffusers `UNet2DModel` of the DDPM CIFAR-10 layout (32x32x3, channels 128-256-256-256, two layers "
              "per block, attention at 16x16), random weights."]
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    main()
