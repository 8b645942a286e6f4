"""Faults injected on purpose (``tests/faults.py``): a SIGKILL at every stage of a checkpoint save (a file,
and a sharded checkpoint), SIGTERM during the first iteration, the EMA update and the grids, a full disk;
each run leaves its last complete checkpoint, and resuming it reproduces the uninterrupted run bit for bit.
The temporaries a killed save leaves are removed when the run resumes. ``benchmarks/fault_injection.py``
runs the same matrix and writes benchmarks/results/cpu-faults.md."""
import os
import resource
import signal
import subprocess
import sys

import pytest

import faults
from utils import run_main

FAST_SHARDED = {"shards-written", "moved-previous"}  # the rest of the sharded stages: -m slow
FAST_RANKS = {("write", False), ("shards-written", True)}  # the rest of the two-process faults: -m slow


def _param(fault):
    if fault.rank is not None:
        slow = (fault.where, fault.fsdp) not in FAST_RANKS
    else:
        slow = fault.fsdp and fault.kind == "kill" and fault.where not in FAST_SHARDED
    return pytest.param(fault, id=fault.name, marks=[pytest.mark.slow] if slow else [])


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("faults")
    return tmp, {}


def _reference(reference, fsdp, ranks):
    tmp, refs = reference
    if (fsdp, ranks) not in refs:
        refs[fsdp, ranks] = faults.reference(tmp, fsdp, ranks)
    return tmp, refs[fsdp, ranks], faults.checkpoint_size(tmp, fsdp, ranks)


@pytest.mark.parametrize("fault", [_param(f) for f in faults.matrix()])
def test_fault_leaves_a_checkpoint_that_resumes_bitwise(reference, fault, tmp_path):
    _, ref, size = _reference(reference, fault.fsdp, fault.rank is not None)
    ok, what = faults.survived(fault, tmp_path, ref, size)
    assert ok, what


def test_resume_removes_the_temporaries_of_killed_saves_and_nothing_else(tmp_path, capsys):
    """Names of sidfast's own temporaries go (a killed atomic_save's, a kept-previous link's, a sharded
    save's directory, a replaced previous sharded checkpoint), a user's files stay; one line says so."""
    run = tmp_path / "run"
    code, _, err = run_main(["distill", "--teacher", "nets:tiny_teacher", "--run-dir", run, "--iterations", "2",
                             "--batch", "4", "--grid-size", "0", "--no-progress", "--device", "cpu"], capsys)
    assert code == 0, err
    stale = {".checkpoint.pt.k2j_9xq1.tmp": 5000, ".checkpoint.prev.pt.4242.tmp": 300,
             ".student_000100.png.abcdefgh.tmp": 7}
    for name, size in stale.items():
        (run / name).write_bytes(b"x" * size)
    (run / ".checkpoint.dcp.tmp").mkdir()
    (run / ".checkpoint.dcp.tmp" / "__0_0.distcp").write_bytes(b"y" * 1000)
    (run / ".checkpoint.prev.dcp.old").mkdir()
    mine = [".notes.tmp", "notes.tmp", ".checkpoint.pt.backup", "checkpoint.pt.tmp"]
    for name in mine:
        (run / name).write_text("keep")
    code, out, err = run_main(["distill", "--resume", "--run-dir", run, "--iterations", "3", "--no-progress",
                               "--device", "cpu"], capsys)
    assert code == 0, err
    line = [l for l in out.splitlines() if "temporary" in l]
    assert len(line) == 1 and "removed 5 temporary file(s)" in line[0] and "6,307 bytes freed" in line[0], out
    assert not any((run / name).exists() for name in [*stale, ".checkpoint.dcp.tmp", ".checkpoint.prev.dcp.old"])
    assert all((run / name).read_text() == "keep" for name in mine)


def test_a_full_disk_is_one_line_naming_the_run_and_keeps_the_checkpoint(tmp_path, capsys):
    """The file-size limit (RLIMIT_FSIZE, SIGXFSZ ignored: the write fails with EFBIG, as on a full disk)
    below a checkpoint's size: the command says so in one line and the checkpoint before stays whole."""
    from sidfast.training.state import read_distill

    run = tmp_path / "run"
    common = ["--batch", "4", "--grid-size", "0", "--no-progress", "--device", "cpu"]
    code, _, err = run_main(["distill", "--teacher", "nets:tiny_teacher", "--run-dir", run, "--iterations", "2",
                             *common], capsys)
    assert code == 0, err
    before = (run / "checkpoint.pt").read_bytes()
    limit = len(before) // 2

    def small_disk():
        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
        resource.setrlimit(resource.RLIMIT_FSIZE, (limit, limit))

    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(faults.ROOT), str(faults.HERE),
                                                       os.environ.get("PYTHONPATH", "")]))
    proc = subprocess.run([sys.executable, "-m", "sidfast.cli", "distill", "--resume", "--run-dir", str(run),
                           "--iterations", "4", *common], env=env, capture_output=True, text=True, timeout=120,
                          preexec_fn=small_disk)
    assert proc.returncode == 2, proc.stderr[-2000:]
    lines = [l for l in proc.stderr.splitlines() if l.startswith("sidfast distill:")]
    assert len(lines) == 1 and "Traceback" not in proc.stderr, proc.stderr[-2000:]
    assert f"cannot write checkpoint '{run / 'checkpoint.pt'}'" in lines[0] and "File too large" in lines[0]
    assert f"resume with sidfast distill --resume --run-dir {run}" in lines[0] and "is intact" in lines[0]
    assert (run / "checkpoint.pt").read_bytes() == before and read_distill(run / "checkpoint.pt")["iteration"] == 2
    assert not [p.name for p in run.iterdir() if p.name.endswith(".tmp")]
