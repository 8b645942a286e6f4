"""bench_engine.py's rows inside a time limit: compile in parallel, measure one at a time, append as measured.

    python benchmarks/engine_session.py --out OUT/engine --budget-s 360 [--config ddpm-cifar10]
                                        [--plan 64:published-fp32 64:sidfast-full-bf16 ...]

Each (batch, variant) of ``--plan`` runs in its own process. All start at once and warm up side by side
(torch.compile of the sidfast variants' networks takes minutes; one process each lets them share the CPU
cores). Once every variant is warm, has failed, or has run out of compile time (the budget less a few
seconds per entry), each process in ``--plan`` order times its iterations alone on an idle machine
(bench_engine.time_iterations) and exits, so that host times are not inflated by another process's
compilation and the last variants (batch 256) find the memory of the earlier ones freed. Every entry
of the plan gets a row in ``<out>.jsonl`` as soon as it is known, a
measurement or the reason there is none (``error``: OOM, the exception, "compile + warmup over N s",
"out of time"), and the table ``<out>.md`` is rewritten after each row.
"""
from __future__ import annotations

import argparse
import json
import os
import queue
import subprocess
import sys
import threading
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
from bench_engine import VARIANTS  # noqa: E402

# The targets' rows first (collect_results.py: batch-64 speed and memory, LoRA memory, host vs GPU time at 16
# and 64, batch 256), then the rest of the batch-16 side.
DEFAULT_PLAN = ["64:published-fp32", "64:published-bf16", "64:sidfast-full-bf16", "64:sidfast-lora-bf16",
                "16:sidfast-full-bf16", "16:published-fp32", "256:sidfast-full-bf16", "16:published-bf16",
                "16:sidfast-lora-bf16"]
MEASURE_S = 60.0  # most one warm variant's timing may take (about 25 iterations of a few ms to 0.5 s)
MEASURE_RESERVE_S = 8.0  # kept per plan entry for its timing when the compile time limit is set
PROTOCOL = "@@engine_session "


def parse_plan(entries: list[str]) -> list[tuple[int, str]]:
    plan = []
    for entry in entries:
        batch, _, variant = entry.partition(":")
        if not batch.isdigit() or variant not in VARIANTS:
            raise SystemExit(f"engine_session: --plan entries are BATCH:VARIANT with VARIANT one of {VARIANTS}; "
                             f"got {entry!r}")
        plan.append((int(batch), variant))
    return plan


def compiled(variant: str) -> bool:
    return variant.startswith("sidfast-")


# ---- the child: one variant, warm up, wait for its turn, time, exit ----

def child(args) -> int:
    import torch

    from bench_engine import prepare, record_error, release, time_iterations

    device = torch.device(args.device)
    torch.backends.cuda.matmul.allow_tf32 = args.tf32
    torch.backends.cudnn.allow_tf32 = args.tf32
    row = dict(variant=args.variant, config=args.config, batch=args.batch)
    runner = None
    try:
        runner = prepare(row, device, args.warmup, not args.no_compile)
        print(PROTOCOL + "READY " + json.dumps(row), flush=True)
        if sys.stdin.readline().strip() != "GO":  # the parent is gone or gave up on this variant
            return 1
        time_iterations(runner, row, device, args.iters)
    except Exception as exc:  # reported as the row's error, read by the parent
        record_error(row, exc)
    finally:
        del runner
        release(device)
    print(PROTOCOL + "ROW " + json.dumps(row), flush=True)
    return 0


# ---- the parent ----

class Variant:
    """A child process and the protocol lines it printed (a reader thread queues them)."""

    def __init__(self, batch: int, variant: str, args, log_dir: Path, threads: int):
        self.batch = batch
        self.variant = variant
        self.row = dict(variant=variant, config=args.config, batch=batch)
        cmd = [sys.executable, str(Path(__file__).resolve()), "--child", "--variant", variant,
               "--batch", str(batch),
               "--config", args.config, "--device", args.device, "--iters", str(args.iters),
               "--warmup", str(args.warmup)] + (["--no-compile"] if args.no_compile else []) + \
            (["--tf32"] if args.tf32 else [])
        env = dict(os.environ, TORCHINDUCTOR_COMPILE_THREADS=str(threads), PYTHONUNBUFFERED="1")
        self.log_path = log_dir / f"engine-{args.config}-{batch}-{variant}.log"
        self.log = open(self.log_path, "w")
        self.started = time.monotonic()
        self.proc = subprocess.Popen(cmd, env=env, stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                                     stderr=self.log, text=True)
        self.lines: queue.Queue = queue.Queue()
        threading.Thread(target=self._read, daemon=True).start()

    def _read(self):
        for line in self.proc.stdout:
            if line.startswith(PROTOCOL):
                self.lines.put(line[len(PROTOCOL):].rstrip("\n"))
            else:
                self.log.write(line)
                self.log.flush()
        self.lines.put(None)  # the child's stdout closed: it exited

    def wait_for(self, word: str, until: float) -> dict | None:
        """The JSON of the child's next ``word`` line before the monotonic time ``until``; None if the child
        exited or the time ran out first (``self.why`` says which)."""
        while True:
            try:
                line = self.lines.get(timeout=max(0.0, until - time.monotonic()))
            except queue.Empty:
                self.why = "timeout"
                return None
            if line is None:
                self.why = f"exited with code {self.proc.wait()} (log {self.log_path.name})"
                return None
            kind, _, payload = line.partition(" ")
            if kind == word or kind == "ROW":  # a ROW before READY carries the failure to prepare
                return json.loads(payload) | {"_kind": kind}

    def send(self, text: str):
        try:
            self.proc.stdin.write(text + "\n")
            self.proc.stdin.flush()
        except (BrokenPipeError, OSError):
            pass

    def stop(self):
        if self.proc.poll() is None:
            self.proc.kill()
        self.proc.wait()
        self.log.close()


def run(args) -> int:
    import torch

    from bench_engine import render

    t0 = time.monotonic()
    deadline = t0 + args.budget_s
    plan = parse_plan(args.plan)
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    jsonl = out.with_suffix(".jsonl")
    log_dir = Path(args.log_dir or out.parent)
    log_dir.mkdir(parents=True, exist_ok=True)
    name = torch.cuda.get_device_name(0) if args.device.startswith("cuda") else "CPU"
    rows: list[dict] = []

    def emit(row: dict):
        row = {k: v for k, v in row.items() if not k.startswith("_")}
        row.update(device=name, torch=torch.__version__, tf32=args.tf32)
        rows.append(row)
        with open(jsonl, "a") as fh:
            fh.write(json.dumps(row) + "\n")
        tmp = out.with_suffix(".md.tmp")
        tmp.write_text(render(rows, name) + "\n")
        os.replace(tmp, out.with_suffix(".md"))
        print(json.dumps(row), flush=True)

    n_compiled = sum(compiled(v) for _, v in plan)
    threads = max(1, (os.cpu_count() or 1) // max(1, n_compiled))
    # every variant starts now and warms up (compiles); what is left after compile_until times the entries
    compile_until = deadline - MEASURE_RESERVE_S * len(plan) - 10
    running = {(b, v): Variant(b, v, args, log_dir, threads) for b, v in plan}
    print(f"engine_session: {len(plan)} variants ({n_compiled} compiled) warming up side by side until "
          f"{compile_until - t0:.0f} s, then timed one at a time within {args.budget_s:.0f} s", flush=True)
    ready: dict = {}
    for key, child in running.items():
        msg = child.wait_for("READY", compile_until)
        if msg is not None and msg["_kind"] == "READY":
            ready[key] = msg
            print(f"engine_session: {key[1]} batch {key[0]} warm after {msg['warmup_s']:.0f} s", flush=True)
            continue
        child.stop()
        why = f"compile + warmup over {compile_until - child.started:.0f} s" if child.why == "timeout" else \
            f"child {child.why}"
        ready[key] = msg if msg is not None else dict(child.row, error=why, _kind="ROW")
    # one at a time, in plan order, on an otherwise idle machine; each child exits after its timing
    for key, child in running.items():
        msg = ready[key]
        if msg["_kind"] == "ROW":
            emit(msg)
            continue
        if time.monotonic() > deadline - 5:
            child.stop()
            emit(dict(msg, error="not measured: out of time"))
            continue
        child.send("GO")
        row = child.wait_for("ROW", min(deadline, time.monotonic() + MEASURE_S))
        child.stop()
        emit(row if row is not None else dict(msg, error=f"timing {child.why}"))
    print(render(rows, name))
    return 0


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", help="write <out>.jsonl (row by row) and <out>.md")
    ap.add_argument("--budget-s", type=float, default=360.0, help="seconds for the whole plan, compiles included")
    ap.add_argument("--plan", nargs="+", default=DEFAULT_PLAN, help="BATCH:VARIANT entries, in measuring order")
    ap.add_argument("--config", default="ddpm-cifar10")
    ap.add_argument("--device", default="cuda")
    ap.add_argument("--iters", type=int, default=10)
    ap.add_argument("--warmup", type=int, default=3)
    ap.add_argument("--no-compile", action="store_true", help="sidfast variants without torch.compile")
    ap.add_argument("--tf32", action="store_true", help="allow TF32 matmuls/convolutions in every variant")
    ap.add_argument("--log-dir", help="the children's logs (default: beside --out)")
    ap.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    ap.add_argument("--variant", help=argparse.SUPPRESS)
    ap.add_argument("--batch", type=int, help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args.child:
        return child(args)
    if not args.out:
        ap.error("--out is required")
    parse_plan(args.plan)
    if args.device.startswith("cuda"):
        import torch

        if not torch.cuda.is_available():
            print("engine_session: no CUDA device; nothing measured (--device cpu --config tiny --no-compile "
                  "runs a smoke test)")
            return 0
    return run(args)


if __name__ == "__main__":
    sys.exit(main())
