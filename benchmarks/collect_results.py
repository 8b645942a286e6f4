"""Turn what gpu_session.sh left under $OUT into a results page with every target PASS, FAIL or UNMEASURED.

    python benchmarks/collect_results.py OUTDIR [OUTDIR ...]              (here, on the files that came back)
        -> benchmarks/results/<device-slug>-<date>.md and <device-slug>-<date>-{tests,ops,engine}.json
    python benchmarks/collect_results.py OUTDIR --page OUTDIR/results.md  (on the device: the page alone)
    python benchmarks/collect_results.py --test-line FILE JUNIT_XML LOG SECONDS EXIT_CODE LIMIT   (tests.tsv)

An OUTDIR holds some of: device.json (device, driver, versions, build), tests.tsv (one line per test file),
ops.jsonl (benchmarks/conftest.py, one op benchmark per line), engine.jsonl (engine_session.py, one
whole-iteration row per line). Several OUTDIRs (one per gpu_session.sh run) are merged; a target whose inputs
never came back is UNMEASURED, never dropped.
"""
from __future__ import annotations

import argparse
import csv
import datetime
import json
import os
import re
import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
import report  # noqa: E402

TEST_FIELDS = ["file", "passed", "failed", "errors", "skipped", "seconds", "status"]
ENGINE_CONFIG = "ddpm-cifar10"
# whole-iteration targets (sidfast-full-bf16, the trainer's shipped configuration, at batch 64)
SPEEDUP_FP32 = 4.0
SPEEDUP_BF16 = 2.0
MEMORY_VS_FP32 = 0.5
LORA_MEMORY = 0.7       # LoRA fake score: at least 30% less peak memory than a full one
HOST_SHARE = 0.2        # host time above this share of GPU time: a native capture-and-replay executor would pay
# engine_session.py's errors that say a row was not run to the end (time limits, a killed child), not that it failed
NOT_RUN = ("compile + warmup over", "not measured", "timing timeout", "child exited")


def read_outdirs(dirs: list[str]) -> dict:
    """Everything the OUTDIRs hold, merged: device (first found), tests, ops benchmarks, engine rows."""
    merged = dict(device={}, tests=[], planned=[], ops=[], engine=[])
    for d in map(Path, dirs):
        if not d.is_dir():
            raise SystemExit(f"collect_results: {d} is not a folder")
        if (d / "device.json").is_file() and not merged["device"]:
            merged["device"] = json.loads((d / "device.json").read_text())
        if (d / "tests.tsv").is_file():
            lines = (d / "tests.tsv").read_text().splitlines()
            for line in lines:
                if line.startswith("# plan:"):
                    merged["planned"] += line[len("# plan:"):].split()
            body = [line for line in lines if line and not line.startswith("#")]
            merged["tests"] += list(csv.DictReader(body, fieldnames=TEST_FIELDS, delimiter="\t"))
        for name in ("ops.jsonl", "ops.json"):
            if (d / name).is_file():
                merged["ops"] += report.load(str(d / name)).get("benchmarks", [])
                break
        if (d / "engine.jsonl").is_file():
            for line in (d / "engine.jsonl").read_text().splitlines():
                try:
                    merged["engine"].append(json.loads(line))
                except json.JSONDecodeError:  # a line cut off by the call's time limit
                    continue
    return merged


def test_line(file: str, xml: str, log: str, seconds: str, rc: str, limit: str) -> str:
    """tests.tsv's line for one test file: counts from its junit XML, or, where pytest was killed before
    writing it, from the per-test lines of its ``-v`` log."""
    counts = dict(passed=0, failed=0, errors=0, skipped=0)
    try:
        import xml.etree.ElementTree as ET

        root = ET.parse(xml).getroot()
        for suite in ([root] if root.tag == "testsuite" else root.iter("testsuite")):
            n = {k: int(suite.get(k, 0)) for k in ("tests", "failures", "errors", "skipped")}
            counts["failed"] += n["failures"]
            counts["errors"] += n["errors"]
            counts["skipped"] += n["skipped"]
            counts["passed"] += n["tests"] - n["failures"] - n["errors"] - n["skipped"]
    except (OSError, ET.ParseError):
        words = dict(PASSED="passed", XPASS="passed", FAILED="failed", ERROR="errors", SKIPPED="skipped",
                     XFAIL="skipped")
        text = Path(log).read_text(errors="replace") if Path(log).is_file() else ""
        for line in text.splitlines():
            if "::" not in line or line.startswith(("FAILED ", "ERROR ")):  # the end summary repeats failures
                continue
            found = re.search(r"\b(PASSED|XPASS|FAILED|ERROR|SKIPPED|XFAIL)\b", line)
            if found:
                counts[words[found.group(1)]] += 1
    code = int(rc)
    status = {0: "ok", 1: "ok", 5: "no tests collected"}.get(code)
    if status is None:
        status = f"timeout at {limit} s" if code in (124, 137) else f"pytest exit {code}"
    fields = [file, counts["passed"], counts["failed"], counts["errors"], counts["skipped"], seconds, status]
    return "\t".join(map(str, fields))


def _status(ok: bool | None) -> str:
    return "UNMEASURED" if ok is None else ("PASS" if ok else "FAIL")


def test_targets(tests: list[dict], planned: list[str]) -> list[dict]:
    """One target per planned test file: ran to the end with no failure or error."""
    by_file = {t["file"]: t for t in tests}
    out = []
    for name in dict.fromkeys(planned + list(by_file)):
        t = by_file.get(name)
        if t is None:
            out.append(dict(name=f"tests {name}: all pass on CUDA", value="did not run", status="UNMEASURED"))
            continue
        bad = int(t["failed"]) + int(t["errors"])
        value = f"{t['passed']} passed, {t['failed']} failed, {t['errors']} errors, {t['skipped']} skipped, " \
                f"{float(t['seconds']):.0f} s" + ("" if t["status"] == "ok" else f" ({t['status']})")
        ok = False if bad else (True if t["status"] == "ok" else None)
        out.append(dict(name=f"tests {name}: all pass on CUDA", value=value, status=_status(ok)))
    return out


def engine_targets(rows: list[dict]) -> list[dict]:
    def row(variant, batch):
        found = [r for r in rows if r.get("variant") == variant and r.get("batch") == batch
                 and r.get("config", ENGINE_CONFIG) == ENGINE_CONFIG]
        return found[-1] if found else None

    def value(r, key):
        return None if r is None or "error" in r else r.get(key)

    def ratio_target(name, a, b, key, want, at_least: bool, fmt):
        if a is None or b is None:
            return dict(name=name, value=None, status="UNMEASURED")
        got = a / b
        return dict(name=name, value=fmt(got), status=_status(got >= want if at_least else got <= want))

    full64 = row("sidfast-full-bf16", 64)
    out = [
        ratio_target(f"engine batch 64: sidfast-full-bf16 images/s >= {SPEEDUP_FP32:g}x published-fp32",
                     value(full64, "images_per_s"), value(row("published-fp32", 64), "images_per_s"),
                     "images_per_s", SPEEDUP_FP32, True, lambda x: f"{x:.2f}x"),
        ratio_target(f"engine batch 64: sidfast-full-bf16 images/s >= {SPEEDUP_BF16:g}x published-bf16",
                     value(full64, "images_per_s"), value(row("published-bf16", 64), "images_per_s"),
                     "images_per_s", SPEEDUP_BF16, True, lambda x: f"{x:.2f}x"),
        ratio_target(f"engine batch 64: sidfast-full-bf16 peak memory <= {MEMORY_VS_FP32:g} x published-fp32",
                     value(full64, "peak_mib"), value(row("published-fp32", 64), "peak_mib"),
                     "peak_mib", MEMORY_VS_FP32, False, lambda x: f"{x:.2f}x"),
        ratio_target(f"engine batch 64: LoRA fake score peak memory <= {LORA_MEMORY:g} x full",
                     value(row("sidfast-lora-bf16", 64), "peak_mib"), value(full64, "peak_mib"),
                     "peak_mib", LORA_MEMORY, False, lambda x: f"{x:.2f}x"),
    ]
    big = row("sidfast-full-bf16", 256)
    if big is None or big.get("error", "").startswith(NOT_RUN):
        fits = dict(value=None if big is None else big["error"], status="UNMEASURED")
    elif "error" in big:  # OOM, or an exception of the run itself
        fits = dict(value=big["error"], status="FAIL")
    else:
        fits = dict(value=f"{big['peak_mib'] / 1024:.1f} GiB peak" if "peak_mib" in big else "ran",
                    status="PASS")
    out.append(dict(name="engine batch 256: sidfast-full-bf16 fits", **fits))
    for batch in (16, 64):
        r = row("sidfast-full-bf16", batch)
        host = value(r, "host_ms")
        gpu = value(r, "gpu_ms")
        name = (f"engine batch {batch}: sidfast-full-bf16 host ms <= {HOST_SHARE:.0%} of GPU ms "
                "(else a native capture-and-replay executor is needed)")
        if host is None or not gpu:
            out.append(dict(name=name, value=None, status="UNMEASURED"))
        else:
            out.append(dict(name=name, value=f"{host:.2f} / {gpu:.2f} ms = {host / gpu:.0%}",
                            status=_status(host / gpu <= HOST_SHARE)))
    return out


def slug(name: str) -> str:
    return re.sub(r"[^a-z0-9]+", "-", name.lower()).strip("-") or "unknown-device"


def render(merged: dict) -> str:
    from bench_engine import render as render_engine

    dev = merged["device"]
    name = dev.get("name", "unknown device")
    lines = [f"# sidfast on {name} ({dev.get('date', 'date unknown')})", "",
             "| | |", "|---|---|"]
    for key, label in (("name", "device (torch.cuda.get_device_name)"), ("nvidia_smi", "nvidia-smi"),
                       ("driver", "driver"), ("torch", "torch"), ("triton", "triton"),
                       ("cuda", "CUDA (torch.version.cuda)"), ("nvcc", "nvcc"), ("python", "python"),
                       ("extension", "sidfast._C"), ("build", "build")):
        if dev.get(key):
            lines.append(f"| {label} | {dev[key]} |")
    lines.append("")
    ops = {"benchmarks": merged["ops"]}
    on_gpu = any("copy_bytes_per_s" in b.get("extra_info", {}) for b in merged["ops"])
    # op targets need a GPU run (its copy bandwidth); without ops benchmarks each is UNMEASURED
    all_targets = (test_targets(merged["tests"], merged["planned"]) +
                   (report.targets(ops) if on_gpu or not merged["ops"] else []) +
                   engine_targets(merged["engine"]))
    counts = {s: sum(t["status"] == s for t in all_targets) for s in ("PASS", "FAIL", "UNMEASURED")}
    lines += ["## Targets", "", ", ".join(f"{n} {s}" for s, n in counts.items()), "",
              "| target | measured | status |", "|---|---|---|"]
    lines += [f"| {t['name']} | {t['value'] or '-'} | {t['status']} |" for t in all_targets]
    lines.append("")
    if merged["tests"]:
        lines += ["## Tests on CUDA (one line per file)", "", "| " + " | ".join(TEST_FIELDS) + " |",
                  "|" + "---|" * len(TEST_FIELDS)]
        lines += ["| " + " | ".join(str(t[f]) for f in TEST_FIELDS) + " |" for t in merged["tests"]]
        lines.append("")
    if merged["ops"]:
        page = report.render(ops).splitlines()
        lines += ["## Op benchmarks"] + ["#" + line if line.startswith("## ") else line for line in page[1:]]
        lines.append("")
    if merged["engine"]:
        page = render_engine(merged["engine"], name).splitlines()
        lines += ["## Whole SiD iteration"] + ["#" + line if line.startswith("## ") else line for line in page[1:]]
        warm = [r for r in merged["engine"] if "warmup_s" in r]
        if warm:
            lines += ["", "Compile + warm-up seconds (side by side in one process each): " +
                      ", ".join(f"{r['variant']} b{r['batch']} {r['warmup_s']:.0f}" for r in warm)]
        lines.append("")
    return "\n".join(lines)


def write_atomic(path: Path, text: str) -> None:
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(text)
    os.replace(tmp, path)


def main(argv=None) -> int:
    if argv is None:
        argv = sys.argv[1:]
    if argv[:1] == ["--test-line"]:  # gpu_session.sh, as each test file ends
        if len(argv) != 7:
            raise SystemExit("collect_results: --test-line FILE JUNIT_XML LOG SECONDS EXIT_CODE LIMIT")
        print(test_line(*argv[1:]))
        return 0
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("outdirs", nargs="+", help="folders of gpu_session.sh's output (one per gpu_session.sh run)")
    ap.add_argument("--page", help="write only the markdown page, here (what gpu_session.sh does on the device)")
    ap.add_argument("--results-dir", default=str(HERE / "results"))
    ap.add_argument("--date", help="YYYY-MM-DD for the file names (default: the run's, from device.json)")
    args = ap.parse_args(argv)
    merged = read_outdirs(args.outdirs)
    page = render(merged) + "\n"
    if args.page:
        write_atomic(Path(args.page), page)
        return 0
    date = args.date or merged["device"].get("date") or datetime.date.today().isoformat()
    stem = f"{slug(merged['device'].get('name', 'unknown device'))}-{date}"
    results = Path(args.results_dir)
    results.mkdir(parents=True, exist_ok=True)
    written = [results / f"{stem}.md"]
    write_atomic(written[0], page)
    for part, data in (("tests", merged["tests"]), ("ops", {"benchmarks": merged["ops"]} if merged["ops"] else None),
                       ("engine", merged["engine"])):
        if data:
            written.append(results / f"{stem}-{part}.json")
            write_atomic(written[-1], json.dumps(data, indent=1) + "\n")
    if merged["device"]:
        written.append(results / f"{stem}-device.json")
        write_atomic(written[-1], json.dumps(merged["device"], indent=1) + "\n")
    print("\n".join(map(str, written)))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
