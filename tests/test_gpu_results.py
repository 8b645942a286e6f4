"""benchmarks/collect_results.py on synthetic device output: every target PASS, FAIL or UNMEASURED from the
numbers, test-file lines from junit XML or from a cut-off log, and the files it writes."""
import json
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "benchmarks"))
import collect_results as C  # noqa: E402
from cases import GPU_SIZES, size_key  # noqa: E402

COPY = 4.0e12  # bytes/s


def _bench(op, impl, shape, dtype, ms, fraction=None):
    info = dict(op=op, impl=impl, shape=list(shape), dtype=dtype, device="NVIDIA H200", median_ms=ms,
                bytes_moved=1, copy_bytes_per_s=COPY, version_torch="2.11.0")
    if fraction is not None:
        info["fraction_of_copy"] = fraction
    return dict(name=f"{op}-{impl}", extra_info=info, stats=dict(median=ms / 1e3))


def _ops_lines():
    """sid_loss: 20x eager everywhere, 20x compiled except 5x at the smallest size, 90% of copy bandwidth;
    add_noise: 80% at the largest size; fake_score_loss: not measured."""
    lines = []
    for i, (shape, dtype) in enumerate(GPU_SIZES):
        lines.append(_bench("sid_loss fwd+bwd", "sidfast", shape, dtype, 1.0, fraction=0.9))
        lines.append(_bench("sid_loss fwd+bwd", "eager", shape, dtype, 20.0))
        lines.append(_bench("sid_loss fwd+bwd", "compiled", shape, dtype, 5.0 if i == 0 else 20.0))
        lines.append(_bench("add_noise", "sidfast", shape, dtype, 1.0, fraction=0.8))
    return lines


ENGINE = [dict(variant="published-fp32", config="ddpm-cifar10", batch=64, images_per_s=1000.0, peak_mib=10000.0),
          dict(variant="published-bf16", config="ddpm-cifar10", batch=64, images_per_s=2500.0, peak_mib=7000.0),
          dict(variant="sidfast-full-bf16", config="ddpm-cifar10", batch=64, images_per_s=4500.0, peak_mib=4000.0,
               host_ms=1.0, gpu_ms=14.0, warmup_s=120.0),
          dict(variant="sidfast-lora-bf16", config="ddpm-cifar10", batch=64, error="compile + warmup over 200 s"),
          dict(variant="sidfast-full-bf16", config="ddpm-cifar10", batch=16, images_per_s=1500.0, peak_mib=1200.0,
               host_ms=3.0, gpu_ms=10.0),
          dict(variant="sidfast-full-bf16", config="ddpm-cifar10", batch=256, error="OOM")]


@pytest.fixture
def outdirs(tmp_path):
    call1 = tmp_path / "call1"
    call2 = tmp_path / "call2"
    call1.mkdir()
    call2.mkdir()
    (call1 / "device.json").write_text(json.dumps(dict(name="NVIDIA H200", date="2026-12-01", torch="2.11.0",
                                                       triton="3.6.0", cuda="13.0", extension="with CUDA")))
    (call1 / "tests.tsv").write_text(
        "# plan: tests/test_ops_noise.py tests/test_loss.py tests/test_lora.py \n"
        "tests/test_ops_noise.py\t40\t0\t0\t0\t12\tok\n"
        "tests/test_loss.py\t150\t3\t0\t0\t30\tok\n")
    (call1 / "ops.jsonl").write_text("\n".join(json.dumps(b) for b in _ops_lines()) + "\n{\"cut off")
    (call2 / "engine.jsonl").write_text("\n".join(json.dumps(r) for r in ENGINE) + "\n")
    return [str(call1), str(call2)]


def _targets(outdirs):
    page = C.render(C.read_outdirs(outdirs))
    rows = [line.split(" | ") for line in page.splitlines() if line.startswith("| ") and line.count(" | ") == 2]
    return page, {name.lstrip("| "): status.rstrip(" |") for name, _, status in rows if name != "| target"}


def test_targets_from_the_numbers(outdirs):
    page, status = _targets(outdirs)
    assert "# sidfast on NVIDIA H200 (2026-12-01)" in page
    small, large, largest = (size_key(*GPU_SIZES[0]), size_key(*GPU_SIZES[3]), size_key(*GPU_SIZES[4]))
    assert status[f"sid_loss fwd+bwd {small[0]} {small[1]}: >= 10x eager"] == "PASS"
    assert status[f"sid_loss fwd+bwd {small[0]} {small[1]}: >= 10x compiled"] == "FAIL"
    assert status[f"sid_loss fwd+bwd {large[0]} {large[1]}: >= 85% of copy bandwidth"] == "PASS"
    assert status[f"add_noise {largest[0]} {largest[1]}: >= 85% of copy bandwidth"] == "FAIL"
    assert status[f"fake_score_loss fwd+bwd {largest[0]} {largest[1]}: >= 10x eager"] == "UNMEASURED"
    assert status["tests tests/test_ops_noise.py: all pass on CUDA"] == "PASS"
    assert status["tests tests/test_loss.py: all pass on CUDA"] == "FAIL"
    assert status["tests tests/test_lora.py: all pass on CUDA"] == "UNMEASURED"
    assert status["engine batch 64: sidfast-full-bf16 images/s >= 4x published-fp32"] == "PASS"     # 4.5x
    assert status["engine batch 64: sidfast-full-bf16 images/s >= 2x published-bf16"] == "FAIL"     # 1.8x
    assert status["engine batch 64: sidfast-full-bf16 peak memory <= 0.5 x published-fp32"] == "PASS"
    assert status["engine batch 64: LoRA fake score peak memory <= 0.7 x full"] == "UNMEASURED"
    assert status["engine batch 256: sidfast-full-bf16 fits"] == "FAIL"
    host = "sidfast-full-bf16 host ms <= 20% of GPU ms (else a native capture-and-replay executor is needed)"
    assert status[f"engine batch 64: {host}"] == "PASS"     # 1 / 14 ms
    assert status[f"engine batch 16: {host}"] == "FAIL"     # 3 / 10 ms
    assert "3.00 / 10.00 ms = 30%" in page


def test_nothing_came_back_is_unmeasured_not_dropped(tmp_path):
    page, status = _targets([str(tmp_path)])
    assert status and set(status.values()) == {"UNMEASURED"}
    assert any(name.startswith("engine batch 256") for name in status)
    assert sum(name.startswith("sid_loss fwd+bwd") for name in status) == 2 * len(GPU_SIZES) + 2


def test_files_written_under_the_device_slug_and_date(outdirs, tmp_path):
    results = tmp_path / "results"
    assert C.main(outdirs + ["--results-dir", str(results)]) == 0
    names = sorted(p.name for p in results.iterdir())
    assert names == ["nvidia-h200-2026-12-01-device.json", "nvidia-h200-2026-12-01-engine.json",
                     "nvidia-h200-2026-12-01-ops.json", "nvidia-h200-2026-12-01-tests.json",
                     "nvidia-h200-2026-12-01.md"]
    ops = json.loads((results / "nvidia-h200-2026-12-01-ops.json").read_text())
    assert len(ops["benchmarks"]) == len(_ops_lines())  # the cut-off last line is left out


def test_test_line_from_junit_and_from_a_cut_off_log(tmp_path):
    xml = tmp_path / "t.xml"
    xml.write_text('<testsuites><testsuite tests="10" failures="1" errors="2" skipped="3" time="4"/></testsuites>')
    assert C.test_line("tests/t.py", str(xml), "none", "5", "1", "240").split("\t") == \
        ["tests/t.py", "4", "1", "2", "3", "5", "ok"]
    log = tmp_path / "t.log"
    log.write_text("tests/t.py::a PASSED [ 10%]\ntests/t.py::b[x] FAILED [ 20%]\n"
                   "[gw1] [ 30%] SKIPPED tests/t.py::c\nFAILED tests/t.py::b[x] - AssertionError\n")
    assert C.test_line("tests/t.py", str(tmp_path / "missing.xml"), str(log), "240", "124", "240").split("\t") == \
        ["tests/t.py", "1", "1", "0", "1", "240", "timeout at 240 s"]
