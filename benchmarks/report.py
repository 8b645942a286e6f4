"""Turn ``pytest benchmarks/ --benchmark-only --benchmark-json=run.json`` into a markdown table.

    python benchmarks/report.py run.json [-o benchmarks/results/<name>.md]

One table per op: a row per (shape, dtype), per implementation its median time (the do_bench median
on a GPU, pytest-benchmark's median on CPU), and for sidfast's fused op the achieved bandwidth, its
fraction of the device-to-device copy bandwidth measured in the same run, and the speed-up over the
eager and compiled references. The device and library versions head the page.
"""
from __future__ import annotations

import argparse
import json
import sys
from collections import defaultdict

FUSED = ("sidfast", "native", "sidfast-seed", "sidfast-cpu", "plan default")  # the row's subject, by preference


def _median_ms(bench: dict) -> float:
    info = bench.get("extra_info", {})
    if "median_ms" in info:
        return float(info["median_ms"])
    return float(bench["stats"]["median"]) * 1e3


def _fmt_ms(ms: float | None) -> str:
    if ms is None:
        return "-"
    return f"{ms * 1e3:.1f} us" if ms < 1 else f"{ms:.3f} ms"


def render(data: dict) -> str:
    benches = [b for b in data.get("benchmarks", []) if "op" in b.get("extra_info", {})]
    if not benches:
        raise ValueError("no sidfast benchmarks (with extra_info) in this JSON")
    first = benches[0]["extra_info"]
    versions = {k[len("version_"):]: v for k, v in first.items() if k.startswith("version_")}
    lines = [f"# sidfast benchmarks on {first['device']}", "",
             "Versions: " + ", ".join(f"{k} {v}" for k, v in sorted(versions.items()) if v), ""]
    if "copy_bytes_per_s" in first:
        lines += [f"Device-to-device copy bandwidth measured in this run: {first['copy_bytes_per_s'] / 1e9:.0f} GB/s "
                  "(bytes read + written). Times: triton.testing.do_bench median (CUDA events).", ""]
    else:
        lines += ["Times: pytest-benchmark median (wall clock, CPU).", ""]
    machine = data.get("machine_info", {})
    if machine.get("cpu", {}).get("brand_raw"):
        lines += [f"Host CPU: {machine['cpu']['brand_raw']}", ""]

    by_op: dict = defaultdict(lambda: defaultdict(dict))
    for b in benches:
        info = b["extra_info"]
        key = ("x".join(map(str, info["shape"])), info["dtype"])
        by_op[info["op"]][key][info["impl"]] = b
    for op, rows in by_op.items():
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
    return "\n".join(lines)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("json_file")
    parser.add_argument("-o", "--output", help="write the markdown here instead of stdout")
    args = parser.parse_args(argv)
    with open(args.json_file) as fh:
        text = render(json.load(fh))
    if args.output:
        with open(args.output, "w") as fh:
            fh.write(text + "\n")
    else:
        sys.stdout.write(text + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
