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
import platform
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


def evaluate(run_dir: Path) -> dict:
    """The bars of one finished run, recomputed from its report.json and features.pt by the demo's own
    functions (``compare.report_bars``, ``run.report_bars``), with the run's own verdicts as it printed them
    (``printed``: the bars of the code that ran)."""
    import torch

    from sidfast.demo import compare
    from sidfast.demo import run as run_mod

    report = json.loads((run_dir / "report.json").read_text())
    features = torch.load(run_dir / "features.pt", weights_only=True)
    t0 = time.perf_counter()
    bars = compare.report_bars(report, features) if "demo" in report else run_mod.report_bars(report, features)
    seconds = time.perf_counter() - t0
    keep = ("what", "value", "bar", "passed", "margin", "se")
    return {"bars": {n: {k: b.get(k) for k in keep} for n, b in bars.items()},
            "printed": {n: bool(b["passed"]) for n, b in report["bars"].items()},
            "total_s": report.get("seconds", report.get("training_seconds", {})).get("total"),
            "bootstrap_s": round(seconds, 2)}


def table(args) -> None:
    out = Path(args.out)
    runs = {}
    if (out / "runs.jsonl").exists():
        for line in (out / "runs.jsonl").read_text().splitlines():
            rec = json.loads(line)
            runs[(rec["demo"], rec["seed"])] = rec
    seeds = _seeds(args.seeds)
    rows, counts = [], {}
    for demo in DEMOS:
        c = counts.setdefault(demo, {"seeds_measured": [], "seeds_unmeasured": [], "comparative_passed": 0,
                                     "bars": {}})
        for seed in seeds:
            run_dir = out / f"{demo}-{seed}"
            if not (run_dir / "report.json").exists() or not (run_dir / "features.pt").exists():
                c["seeds_unmeasured"].append(seed)
                continue
            ev = evaluate(run_dir)
            rec = runs.get((demo, seed), {})
            comparative = {n: b for n, b in ev["bars"].items() if n != "time"}
            # wall_s: the driver's clock around the run; a run it did not start has its report's total
            row = {"demo": demo, "seed": seed, "wall_s": rec.get("wall_s", ev["total_s"]),
                   "command": rec.get("command"),
                   **ev, "comparative_passed": all(b["passed"] for b in comparative.values())}
            rows.append(row)
            c["seeds_measured"].append(seed)
            c["comparative_passed"] += row["comparative_passed"]
            for n, b in ev["bars"].items():
                bc = c["bars"].setdefault(n, {"passed": 0, "measured": 0, "passed_as_printed": 0})
                bc["measured"] += 1
                bc["passed"] += bool(b["passed"])
                bc["passed_as_printed"] += bool(ev["printed"].get(n))
    result = {"setup": setup(out), "runs": rows, "counts": counts}
    if args.json:
        Path(args.json).write_text(json.dumps(result, indent=2) + "\n")
    text = markdown(result)
    if args.md:
        Path(args.md).write_text(text)
    print(text)


def setup(out: Path) -> dict:
    snap = out / "snapshot" / "COMMIT"
    model = platform.machine()
    try:
        model = next(line.split(":", 1)[1].strip() for line in open("/proc/cpuinfo") if line.startswith("model name"))
    except (OSError, StopIteration):
        pass
    return {"machine": f"{os.cpu_count()} CPU cores ({model}), shared with 4 other workers' jobs (load average "
                       "4-10 during the runs), torch threads 1 (the demo's default)",
            "date": "2026-12-06", "runs_commit": snap.read_text().strip() if snap.exists() else None,
            "bars_commit": subprocess.run(["git", "rev-parse", "HEAD"], capture_output=True, text=True,
                                          cwd=Path(__file__).resolve().parent).stdout.strip(),
            "command": "python -m sidfast.cli demo <variant> --quick --seed S --out /tmp/bars/<demo>-S",
            "variants": {d: " ".join(a) or "(plain SiD)" for d, a in DEMOS.items()}}


def _f(x, digits=4):
    return "" if x is None else f"{x:.{digits}g}"


def markdown(result: dict) -> str:
    st = result["setup"]
    lines = ["# Demo bars over seeds (quick demos, CPU)", "",
             f"- Date: {st['date']}. Machine: {st['machine']}.",
             f"- Runs: `{st['command']}`, one at a time, package at commit `{st['runs_commit']}`; variants: "
             + ", ".join(f"{d}: `{v}`" for d, v in st["variants"].items()) + ".",
             f"- Bars: recomputed from each run's `report.json` and `features.pt` by `sidfast.demo` at commit "
             f"`{st['bars_commit']}` (`benchmarks/demo_seeds.py table`); the statements are defined in "
             "`sidfast/demo/summary.py` and `benchmarks/results/cpu-demo.md`. \"printed\": the verdict the run "
             "itself printed (the previous bars: value against limit, no noise).",
             "- Time bars are reported apart from the comparative bars: the machine was shared, so they measure "
             "the load as much as the demo.",
             "- Only `--quick` demos are measured here. The full demos (3 default seeds each, 15-20 minutes "
             "per demo on a quiet machine) were not run: UNMEASURED. Seeds listed as unmeasured were not run "
             "(time ran out); nothing is extrapolated to them.", "",
             "## Pass counts", "",
             "| demo | seeds measured | seeds unmeasured | all comparative bars pass | per bar: passed / measured "
             "(printed) |", "|---|---|---|---|---|"]
    for demo, c in result["counts"].items():
        per = "; ".join(f"{n} {b['passed']}/{b['measured']} ({b['passed_as_printed']})" for n, b in c["bars"].items())
        lines.append(f"| {demo} | {', '.join(map(str, c['seeds_measured'])) or 'none'} | "
                     f"{', '.join(map(str, c['seeds_unmeasured'])) or 'none'} | "
                     f"{c['comparative_passed']}/{len(c['seeds_measured'])} | {per or 'UNMEASURED'} |")
    lines += ["", "## Per seed", "",
              "| demo | seed | bar | value | needs | margin | SE | verdict | printed | run s | bootstrap s |",
              "|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in result["runs"]:
        for n, b in r["bars"].items():
            lines.append(f"| {r['demo']} | {r['seed']} | {n}: {b['what']} | {_f(b['value'])} | {b['bar']} | "
                         f"{_f(b['margin'], 3)} | {_f(b['se'], 3)} | {'ok' if b['passed'] else 'FAILED'} | "
                         f"{'ok' if r['printed'].get(n) else 'FAILED'} | {_f(r['wall_s'], 4)} | "
                         f"{r['bootstrap_s']} |")
    return "\n".join(lines) + "\n"


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
