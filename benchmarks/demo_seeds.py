"""Pass counts of the demo's bars over seeds: ``sidfast demo ... --quick --seed S`` for S in 0..9, one run at a
time, then each run's bars from its own ``report.json`` and ``features.pt`` (``sidfast.demo.summary``).

    python benchmarks/demo_seeds.py run   --out /tmp/bars [--demos conditional sida steps sid] [--seeds 0-9]
    python benchmarks/demo_seeds.py table --out /tmp/bars --json benchmarks/results/cpu-demo-seeds.json \
        --md benchmarks/results/cpu-demo-seeds.md

``run`` skips a demo/seed whose ``report.json`` exists and appends each run's exit status and wall-clock
seconds to ``OUT/runs.jsonl``; ``--snapshot DIR`` runs the package from DIR (a copy of ``sidfast``), so that
editing the work tree does not change the runs in flight. ``table`` evaluates the bars of every finished
run with ``sidfast.demo.summary`` (``bars_from_run``) and writes the per-seed table and the pass counts;
demo/seeds with no report are listed as unmeasured.
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

DEMOS = {"conditional": ["--conditional"], "sida": ["--method", "sida"], "steps": ["--gen-steps", "4"],
         "sid": []}


def _seeds(text: str) -> list:
    if "-" in text:
        a, b = text.split("-")
        return list(range(int(a), int(b) + 1))
    return [int(s) for s in text.split(",")]


def command(demo: str, seed: int, out: Path) -> list:
    return [sys.executable, "-m", "sidfast.cli", "demo", *DEMOS[demo], "--quick", "--seed", str(seed),
            "--out", str(out / f"{demo}-{seed}")]


def run(args) -> None:
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    env = dict(os.environ)
    if args.snapshot:
        env["PYTHONPATH"] = str(Path(args.snapshot).resolve())
    for demo in args.demos:
        for seed in _seeds(args.seeds):
            run_dir = out / f"{demo}-{seed}"
            if (run_dir / "report.json").exists():
                continue
            cmd = command(demo, seed, out)
            t0 = time.time()
            with open(out / f"{demo}-{seed}.log", "w") as logf:
                rc = subprocess.call(cmd, stdout=logf, stderr=subprocess.STDOUT, env=env)
            rec = {"demo": demo, "seed": seed, "rc": rc, "wall_s": round(time.time() - t0, 1),
                   "started": time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(t0)),
                   "command": " ".join(cmd[1:])}
            with open(out / "runs.jsonl", "a") as f:
                f.write(json.dumps(rec) + "\n")
            print(json.dumps(rec), flush=True)


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    sub = p.add_subparsers(dest="what", required=True)
    r = sub.add_parser("run")
    r.add_argument("--out", default="/tmp/bars")
    r.add_argument("--demos", nargs="+", default=list(DEMOS), choices=list(DEMOS))
    r.add_argument("--seeds", default="0-9")
    r.add_argument("--snapshot", default=None)
    t = sub.add_parser("table")
    t.add_argument("--out", default="/tmp/bars")
    t.add_argument("--seeds", default="0-9")
    t.add_argument("--json", default=None)
    t.add_argument("--md", default=None)
    args = p.parse_args(argv)
    if args.what == "run":
        run(args)
    else:
        table(args)


if __name__ == "__main__":
    main()
