"""Turn ``pytest benchmarks/ --benchmark-only --benchmark-json=run.json`` into a markdown table.

    python benchmarks/report.py run.json|run.jsonl [-o benchmarks/results/<name>.md]

One table per op: a row per (shape, dtype), per implementation its median time (the do_bench median
on a GPU, pytest-benchmark's median on CPU), and for sidfast's fused op the achieved bandwidth, its
fraction of the device-to-device copy bandwidth measured in the same run, and the speed-up over the
eager and compiled references. The device and library versions head the page; on a GPU the page ends
with the op targets (``targets``), each PASS, FAIL or UNMEASURED. A ``.jsonl`` file holds one
benchmark per line (benchmarks/conftest.py writes it as the run goes).
"""
from __future__ import annotations

import argparse
import json
import sys
from collections import defaultdict
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from cases import GPU_SIZES, size_key  # noqa: E402

FUSED = ("sidfast", "native", "sidfast-seed", "sidfast-cpu", "plan default")  # the row's subject, by preference
# Op targets on a GPU: the fused op at least SPEEDUP times faster than the eager and the compiled reference
# at every size, and at least BANDWIDTH of the copy bandwidth at the largest sizes (``bandwidth_sizes`` of
# them, by bytes per tensor).
SPEEDUP = 10.0
BANDWIDTH = 0.85
OP_TARGETS = {"sid_loss fwd+bwd": dict(speedup=True, bandwidth_sizes=2),
              "fake_score_loss fwd+bwd": dict(speedup=True, bandwidth_sizes=2),
              "add_noise": dict(speedup=False, bandwidth_sizes=1)}


def load(path: str) -> dict:
    """A ``--benchmark-json`` file, or a ``.jsonl`` of its benchmark entries (a cut-off last line is skipped)."""
    with open(path) as fh:
        text = fh.read()
    if not path.endswith(".jsonl"):
        return json.loads(text)
    benches = []
    for line in text.splitlines():
        try:
            benches.append(json.loads(line))
        except json.JSONDecodeError:
            continue
    return {"benchmarks": benches}


def _median_ms(bench: dict) -> float:
    info = bench.get("extra_info", {})
    if "median_ms" in info:
        return float(info["median_ms"])
    return float(bench["stats"]["median"]) * 1e3


def _fmt_ms(ms: float | None) -> str:
    if ms is None:
        return "-"
    return f"{ms * 1e3:.1f} us" if ms < 1 else f"{ms:.3f} ms"


def _by_op(data: dict) -> dict:
    """{op: {(shape, dtype): {impl: benchmark}}} of the sidfast benchmarks (those with extra_info)."""
    by_op: dict = defaultdict(lambda: defaultdict(dict))
    for b in data.get("benchmarks", []):
        info = b.get("extra_info", {})
        if "op" in info:
            by_op[info["op"]][("x".join(map(str, info["shape"])), info["dtype"])][info["impl"]] = b
    return by_op


def _tensor_bytes(shape: str, dtype: str) -> int:
    numel = 1
    for n in shape.split("x"):
        numel *= int(n)
    return numel * {"float64": 8, "float32": 4, "float16": 2, "bfloat16": 2}.get(dtype, 4)


def targets(data: dict) -> list[dict]:
    """The op targets, one entry per (op, target, size): name, status PASS/FAIL/UNMEASURED and the value
    measured. Meaningful on a GPU only (the copy bandwidth is measured there): [] for a CPU run."""
    by_op = _by_op(data)
    out = []
    for op, spec in OP_TARGETS.items():
        rows = by_op.get(op, {})
        sizes = sorted((size_key(*c) for c in GPU_SIZES), key=lambda key: _tensor_bytes(*key))
        checks = [(key, base) for key in sizes for base in ("eager", "compiled")] if spec["speedup"] else []
        checks += [(key, "copy") for key in sizes[-spec["bandwidth_sizes"]:]]
        for key, what in checks:
            r = rows.get(key, {})
            fused = next((r[i] for i in FUSED if i in r), None)
            if what == "copy":
                name = f"{op} {key[0]} {key[1]}: >= {BANDWIDTH:.0%} of copy bandwidth"
                frac = fused["extra_info"].get("fraction_of_copy") if fused else None
                entry = dict(name=name, value=None if frac is None else f"{frac:.0%}",
                             status="UNMEASURED" if frac is None else ("PASS" if frac >= BANDWIDTH else "FAIL"))
            else:
                name = f"{op} {key[0]} {key[1]}: >= {SPEEDUP:g}x {what}"
                ratio = _median_ms(r[what]) / _median_ms(fused) if fused and what in r else None
                entry = dict(name=name, value=None if ratio is None else f"{ratio:.3g}x",
                             status="UNMEASURED" if ratio is None else ("PASS" if ratio >= SPEEDUP else "FAIL"))
            out.append(entry)
    return out


def render(data: dict) -> str:
    benches = [b for b in data.get("benchmarks", []) if "op" in b.get("extra_info", {})]
    if not benches:
        raise ValueError("no sidfast benchmarks (with extra_info) in this JSON")
    first = benches[0]["extra_info"]
    versions = {k[len("version_"):]: v for k, v in first.items() if k.startswith("version_")}
    lines = [f"# sidfast benchmarks on {first['device']}", "",
             "Versions: " + ", ".join(f"{k} {v}" for k, v in sorted(versions.items()) if v), ""]
    on_gpu = "copy_bytes_per_s" in first
    if on_gpu:
        lines += [f"Device-to-device copy bandwidth measured in this run: {first['copy_bytes_per_s'] / 1e9:.0f} GB/s "
                  "(bytes read + written). Times: triton.testing.do_bench median (CUDA events).", ""]
    else:
        lines += ["Times: pytest-benchmark median (wall clock, CPU).", ""]
    machine = data.get("machine_info", {})
    if machine.get("cpu", {}).get("brand_raw"):
        lines += [f"Host CPU: {machine['cpu']['brand_raw']}", ""]

    for op, rows in _by_op(data).items():
        impls = sorted({impl for r in rows.values() for impl in r}, key=lambda i: (i not in FUSED, i))
        fused = next((i for i in FUSED if i in impls), None)
        head = ["shape", "dtype"] + [f"{i} median" for i in impls]
        if fused:
            head += [f"{fused} GB/s", "of copy BW", "vs eager", "vs compiled"]
        lines += [f"## {op}", "", "| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
        for (shape, dtype), r in rows.items():
            cells = [shape, dtype] + [_fmt_ms(_median_ms(r[i])) if i in r else "-" for i in impls]
            if fused and fused in r:
                info = r[fused]["extra_info"]
                t = _median_ms(r[fused])
                gbs = info["bytes_moved"] / (t * 1e-3) / 1e9
                frac = info.get("fraction_of_copy")
                cells += [f"{gbs:.3g}", f"{frac:.0%}" if frac is not None else "-"]
                for base in ("eager", "compiled"):
                    cells.append(f"{_median_ms(r[base]) / t:.2g}x" if base in r else "-")
            lines.append("| " + " | ".join(cells) + " |")
        lines.append("")
    if on_gpu:
        lines += [f"## Op targets (fused op >= {SPEEDUP:g}x eager and compiled at every size; >= {BANDWIDTH:.0%} "
                  "of copy bandwidth at the largest sizes)", "", "| target | measured | status |", "|---|---|---|"]
        lines += [f"| {t['name']} | {t['value'] or '-'} | {t['status']} |" for t in targets(data)]
        lines.append("")
    return "\n".join(lines)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("json_file", help="--benchmark-json output, or the .jsonl of SIDFAST_BENCH_JSONL")
    parser.add_argument("-o", "--output", help="write the markdown here instead of stdout")
    args = parser.parse_args(argv)
    text = render(load(args.json_file))
    if args.output:
        with open(args.output, "w") as fh:
            fh.write(text + "\n")
    else:
        sys.stdout.write(text + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
