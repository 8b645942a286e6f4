"""A whole SiD iteration (fake-score update + generator update + EMA): sidfast's engine vs the published loop.

    python benchmarks/bench_engine.py [--config ddpm-cifar10 ddpm-cifar10-64] [--batch 16 64 256]
                                      [--out benchmarks/results/engine_<device>]

Side by side in one run, per network configuration and batch size: images/s (generator images per
iteration / iteration time) and peak GPU memory of
  published-fp32 / published-bf16  the published recipe step by step in eager PyTorch (baseline_sid.py);
  sidfast-full-bf16                the trainer ``sidfast distill`` runs (sidfast.train): ScoreEngine (frozen
                                   views, CUDA graphs), torch.compile, bf16 autocast with fp32 weights, fused
                                   Adam, the published NaN handling (--engine fused --precision bf16
                                   --compile);
  sidfast-lora-bf16                the same with the LoRA fake score over the teacher's shared weights
                                   (--fake-score lora).
Without CUDA the script says so and exits 0 (``--device cpu --config tiny`` runs a smoke test), and as a
pytest module (``pytest benchmarks/``) it is skipped while the CPU benchmarks of other files still run.
"""
from __future__ import annotations

import argparse
import gc
import json
import sys
import tempfile
import time
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from baseline_sid import CONFIGS, PublishedSiD, make_networks, parameter_count  # noqa: E402

VARIANTS = ("published-fp32", "published-bf16", "sidfast-full-bf16", "sidfast-lora-bf16")


class TrainerSiD:
    """The iteration users run: ``sidfast.train``'s trainer (``sidfast distill``) with the score engine, bf16
    autocast over fp32 weights, torch.compile, fused Adam; ``fake_score`` "full" or "lora"."""

    def __init__(self, config: str, batch: int, device, fake_score: str = "full", precision: str = "bf16",
                 compile: bool = True):
        from sidfast.train import TrainConfig, _Trainer

        teacher, fake, G = make_networks(config, torch.device(device))
        if fake_score == "lora":
            del fake
            fake = None
        self._dir = tempfile.TemporaryDirectory(prefix="sidfast-bench-")
        cfg = TrainConfig(run_dir=self._dir.name, batch=batch, device=str(device), precision=precision,
                          engine="fused", fake_score=fake_score, compile=compile, progress=False,
                          grid_size=0, teacher_steps=0, checkpoint_every=0, sample_every=0, iterations=1)
        self.trainer = _Trainer(cfg, teacher, G, fake, callbacks=None, architecture=None)

    def step(self):
        return self.trainer.step()


def make_runner(variant: str, config: str, batch: int, device, compile: bool = True):
    if variant == "published-fp32":
        return PublishedSiD(config, batch, device, "fp32")
    if variant == "published-bf16":
        return PublishedSiD(config, batch, device, "bf16")
    kind, mode, precision = variant.split("-")
    if kind != "sidfast" or mode not in ("full", "lora"):
        raise ValueError(f"unknown variant {variant!r}; choose from {VARIANTS}")
    return TrainerSiD(config, batch, device, fake_score=mode, precision=precision, compile=compile)


def _sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def measure(variant: str, config: str, batch: int, device, iters: int = 10, warmup: int = 3,
            compile: bool = True) -> dict:
    """images/s and peak memory of ``iters`` iterations after ``warmup`` (compilation and capture excluded)."""
    device = torch.device(device)
    row = dict(variant=variant, config=config, batch=batch)
    runner = None
    try:
        runner = prepare(row, device, warmup, compile)
        time_iterations(runner, row, device, iters)
    except Exception as exc:  # one failing variant must not lose the other rows of a run
        record_error(row, exc)
    finally:
        del runner
        release(device)
    return row


def prepare(row: dict, device, warmup: int = 3, compile: bool = True):
    """The runner of ``row``'s variant, config and batch, after ``warmup`` iterations (compilation and graph
    capture); their time goes to ``row["warmup_s"]``."""
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats(device)
    t0 = time.perf_counter()
    runner = make_runner(row["variant"], row["config"], row["batch"], device, compile)
    for _ in range(warmup):
        runner.step()
    _sync(device)
    row["warmup_s"] = time.perf_counter() - t0
    return runner


def time_iterations(runner, row: dict, device, iters: int = 10) -> None:
    """ms per iteration, images/s, peak memory and host vs GPU time of ``iters`` iterations, into ``row``."""
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    t0 = time.perf_counter()
    for _ in range(iters):
        runner.step()
    _sync(device)
    dt = (time.perf_counter() - t0) / iters
    row.update(ms_per_iter=dt * 1e3, images_per_s=row["batch"] / dt)
    if device.type == "cuda":
        row["peak_mib"] = torch.cuda.max_memory_allocated(device) / 2 ** 20
        row.update(host_vs_gpu(runner, device, iters))


def record_error(row: dict, exc: BaseException) -> None:
    """``row["error"]``: "OOM", or the exception's type and first line (the traceback goes to stderr)."""
    if isinstance(exc, torch.OutOfMemoryError):
        row["error"] = "OOM"
        return
    row["error"] = f"{type(exc).__name__}: {str(exc).splitlines()[0][:200] if str(exc) else ''}"
    import traceback

    traceback.print_exception(exc)


def release(device) -> None:
    """Free what a finished variant left behind (cached blocks, compiled code)."""
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()
    torch._dynamo.reset()


def host_vs_gpu(runner, device, iters: int) -> dict:
    """Host time to issue one iteration (from an idle GPU, so the launch queue never blocks the host) against
    the GPU time of that iteration (CUDA events), medians over ``iters``. host_ms well below gpu_ms means the
    iteration is GPU-bound: moving host work into C++ (a native graph executor) cannot raise images/s."""
    host, gpu = [], []
    for _ in range(iters):
        torch.cuda.synchronize(device)
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        t0 = time.perf_counter()
        runner.step()
        host.append((time.perf_counter() - t0) * 1e3)
        end.record()
        torch.cuda.synchronize(device)
        gpu.append(start.elapsed_time(end))
    return dict(host_ms=sorted(host)[len(host) // 2], gpu_ms=sorted(gpu)[len(gpu) // 2])


def render(rows: list[dict], device_name: str) -> str:
    lines = [f"# SiD iteration: sidfast engine vs the published loop ({device_name})", "",
             "images/s = generator images per iteration / iteration time (fake-score update + generator update + "
             "EMA); peak = torch.cuda.max_memory_allocated over the timed iterations; host ms = host time to issue "
             "one iteration from an idle GPU, GPU ms = that iteration's CUDA-event time (medians); host/GPU above "
             "about 20% at batch 16..64 is where a native capture-and-replay executor would pay.", ""]
    for config in dict.fromkeys(r["config"] for r in rows):
        lines += [f"## {config}", "",
                  "| batch | variant | images/s | peak GiB | vs published-fp32 | vs published-bf16 | host ms | GPU ms "
                  "| host/GPU |", "|---|---|---|---|---|---|---|---|---|"]
        for batch in sorted({r["batch"] for r in rows if r["config"] == config}):
            sel = {r["variant"]: r for r in rows if r["config"] == config and r["batch"] == batch}
            base32 = sel.get("published-fp32", {}).get("images_per_s")
            base16 = sel.get("published-bf16", {}).get("images_per_s")
            for variant, r in sel.items():
                if "error" in r:
                    lines.append(f"| {batch} | {variant} | {r['error']} | - | - | - | - | - | - |")
                    continue
                ips = r["images_per_s"]
                peak = f"{r['peak_mib'] / 1024:.2f}" if "peak_mib" in r else "-"
                s32 = f"{ips / base32:.2f}x" if base32 else "-"
                s16 = f"{ips / base16:.2f}x" if base16 else "-"
                host = f"{r['host_ms']:.2f}" if "host_ms" in r else "-"
                gpu = f"{r['gpu_ms']:.2f}" if "gpu_ms" in r else "-"
                ratio = f"{r['host_ms'] / r['gpu_ms']:.0%}" if r.get("gpu_ms") and "host_ms" in r else "-"
                lines.append(f"| {batch} | {variant} | {ips:.1f} | {peak} | {s32} | {s16} | {host} | {gpu} | {ratio} |")
        lines.append("")
    return "\n".join(lines)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--config", nargs="+", default=["ddpm-cifar10", "ddpm-cifar10-64"], choices=sorted(CONFIGS))
    ap.add_argument("--batch", nargs="+", type=int, default=[16, 64, 256])
    ap.add_argument("--variants", nargs="+", default=list(VARIANTS), choices=VARIANTS)
    ap.add_argument("--iters", type=int, default=10)
    ap.add_argument("--warmup", type=int, default=3)
    ap.add_argument("--device", default="cuda")
    ap.add_argument("--no-compile", action="store_true", help="sidfast variants without torch.compile")
    ap.add_argument("--tf32", action="store_true", help="allow TF32 matmuls/convolutions in every variant")
    ap.add_argument("--out", help="write <out>.json and <out>.md")
    args = ap.parse_args(argv)
    device = torch.device(args.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        print("bench_engine: no CUDA device; nothing measured (use --device cpu --config tiny for a smoke test)")
        return 0
    torch.backends.cuda.matmul.allow_tf32 = args.tf32
    torch.backends.cudnn.allow_tf32 = args.tf32
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else "CPU"
    rows = []
    partial = None
    if args.out:  # each row is appended as soon as it is measured: a run cut off by a time limit keeps its rows
        partial = Path(args.out).with_suffix(".jsonl")
        partial.parent.mkdir(parents=True, exist_ok=True)
    for config in args.config:
        print(f"{config}: {parameter_count(make_networks(config, 'cpu')[0]):,} parameters per network", flush=True)
        for batch in args.batch:
            for variant in args.variants:
                row = measure(variant, config, batch, device, args.iters, args.warmup, not args.no_compile)
                row.update(device=name, torch=torch.__version__, tf32=args.tf32)
                rows.append(row)
                print(json.dumps(row), flush=True)
                if partial is not None:
                    with open(partial, "a") as fh:
                        fh.write(json.dumps(row) + "\n")
    table = render(rows, name)
    print(table)
    if args.out:
        out = Path(args.out)
        out.parent.mkdir(parents=True, exist_ok=True)
        out.with_suffix(".json").write_text(json.dumps(rows, indent=1))
        out.with_suffix(".md").write_text(table + "\n")
    return 0


# ---- pytest entry (pytest benchmarks/ --benchmark-only): GPU only ----

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="a whole SiD iteration is benchmarked on CUDA")


@pytest.mark.parametrize("batch", [16, 64])
@pytest.mark.parametrize("variant", VARIANTS)
def test_sid_iteration(benchmark, variant, batch):
    device = torch.device("cuda")
    torch.cuda.reset_peak_memory_stats(device)
    runner = make_runner(variant, "ddpm-cifar10", batch, device)
    for _ in range(3):
        runner.step()

    def step():
        runner.step()
        torch.cuda.synchronize(device)

    benchmark.group = f"SiD iteration ddpm-cifar10 batch {batch}"
    benchmark.pedantic(step, rounds=5, iterations=1, warmup_rounds=1)
    median = benchmark.stats.stats.median
    benchmark.extra_info.update(variant=variant, batch=batch, images_per_s=batch / median,
                                peak_mib=torch.cuda.max_memory_allocated(device) / 2 ** 20,
                                device=torch.cuda.get_device_name(device))


if __name__ == "__main__":
    sys.exit(main())
