"""Faults injected on purpose into short CPU distill runs, each followed by a resume that must reproduce the
uninterrupted run bit for bit (``tests/training/test_faults.py``, ``benchmarks/fault_injection.py``).

Every fault runs in a child process (a SIGKILL or an unhandled SIGTERM ends only the child): the child trains
the run of ``CONFIG`` (6 iterations, a checkpoint every 2, grids every 2) and is hit at a deterministic point,
named by ``sidfast.utils.files.FAULT_HOOK`` stages or by a patched function; the parent then checks that the
run directory holds a readable checkpoint, resumes it with ``--resume auto`` and compares the generator, its
EMA and the fake score with those of the uninterrupted run, and that no temporary file is left.

- ``kill``: SIGKILL at a stage of the second checkpoint save (iteration 4), or after N bytes of its file.
- ``term``: SIGTERM during the first iteration, the EMA update, the first grid, a grid in the run.
- ``full``: the file-size limit (RLIMIT_FSIZE, SIGXFSZ ignored: the write fails with EFBIG) set after the
  first save, so the second finds no room: a one-line CheckpointError, the first checkpoint intact.
"""
import dataclasses
import os
import resource
import signal
import subprocess
import sys
import traceback
from pathlib import Path

import torch

from nets import tiny_teacher
from runs import quiet, states

HERE = Path(__file__).resolve().parent  # tests/
ROOT = HERE.parent
CONFIG = dict(iterations=6, checkpoint_every=2, sample_every=2, grid_size=4, teacher_steps=2, lr=1e-3)
SAVE = 2  # the save a kill hits: iteration 4's

FULL_STAGES = ["opened", ("write", 1), ("write", 4096), ("write", 0.5), "written", "synced", "kept-previous",
               "replaced"]
SHARDED_STAGES = ["sharded-dir", "shards-written", "opened", "written", "meta-written", "moved-previous",
                  "renamed"]
TERM_POINTS = ["first-iteration", "ema-update", "first-grid", "grid"]


@dataclasses.dataclass
class Fault:
    kind: str  # kill, term, full
    where: str
    fsdp: bool = False
    nbytes: float = 0  # kill at a write: after this many bytes (a fraction: of the file's size)

    @property
    def name(self) -> str:
        at = f"{self.where}@{self.nbytes:g}B" if self.nbytes else self.where
        return f"{self.kind}:{'sharded' if self.fsdp else 'file'}:{at}"


def matrix() -> list[Fault]:
    faults = []
    for stage in FULL_STAGES:
        where, n = stage if isinstance(stage, tuple) else (stage, 0)
        faults.append(Fault("kill", where, nbytes=n))
    faults += [Fault("kill", stage, fsdp=True) for stage in SHARDED_STAGES]
    faults += [Fault("term", point) for point in TERM_POINTS]
    faults += [Fault("full", "second-save"), Fault("full", "second-save", fsdp=True)]
    return faults


def cfg(run_dir, fsdp=False, **kw):
    return quiet(run_dir=str(run_dir), fsdp=fsdp, **{**CONFIG, **kw})


def run(run_dir, fsdp=False, **kw):
    from sidfast.training.loop import distill
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

    res = distill(cfg(run_dir, fsdp, **kw), tiny_teacher(), log=None)
    full = StateDictOptions(full_state_dict=True)
    get = (lambda n: {k: v.clone() for k, v in get_model_state_dict(n, options=full).items()}) if fsdp else states
    return {"G": get(res.generator), "ema": get(res.generator_ema), "fake": get(res.fake),
            "iteration": res.iteration, "interrupted": res.interrupted}


def _inject(fault: Fault, size: int):
    """Arm ``fault`` in this (child) process."""
    from sidfast.training import loop
    from sidfast.utils import files

    me = os.getpid()
    if fault.kind == "kill" or fault.kind == "full":
        seen = {"saves": 0}
        checkpoint = "checkpoint.dcp" if fault.fsdp else "checkpoint.pt"

        def hook(stage, path, nbytes):
            if stage == ("sharded-dir" if fault.fsdp else "opened") and checkpoint in path.name:
                seen["saves"] += 1
            if seen["saves"] != SAVE:
                if fault.kind == "full" and seen["saves"] == 1 and stage == "renamed" or (
                        fault.kind == "full" and not fault.fsdp and seen["saves"] == 1 and stage == "replaced"):
                    signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
                    resource.setrlimit(resource.RLIMIT_FSIZE, (int(size * 0.9), resource.RLIM_INFINITY))
                return
            if fault.kind != "kill" or stage != fault.where:
                return
            limit = fault.nbytes * size if 0 < fault.nbytes < 1 else fault.nbytes
            if stage == "write" and nbytes < limit:
                return
            os.kill(me, signal.SIGKILL)

        files.FAULT_HOOK = hook
        return
    term = lambda: os.kill(me, signal.SIGTERM)  # noqa: E731
    if fault.where == "first-iteration":
        step = loop.Distiller.step

        def first(self):
            if self.iteration == 0:
                term()
            return step(self)

        loop.Distiller.step = first
    elif fault.where == "ema-update":
        update = loop.update_ema

        def ema(*a):
            term()
            return update(*a)

        loop.update_ema = ema
    else:
        save_grid = loop.save_grid
        name = "student_init.png" if fault.where == "first-grid" else "student_000002.png"

        def grid(images, path):
            if Path(path).name == name:
                term()
            return save_grid(images, path)

        loop.save_grid = grid


def child(fault: Fault, run_dir: Path, size: int, out: Path) -> int:
    """The faulty run: train, hit the fault, report into ``out``; the exit status."""
    try:
        torch.set_num_threads(1)
        _inject(fault, size)
        result = {"error": None}
        try:
            result["interrupted"] = run(run_dir, fault.fsdp)["interrupted"]
        except Exception as exc:  # a full disk
            result["error"] = f"{type(exc).__name__}: {exc}"
        torch.save(result, out)
    except BaseException:
        traceback.print_exc()
        return 1
    return 0


def inject(fault: Fault, run_dir: Path, size: int) -> dict:
    """Run the faulty run in a new interpreter (not a fork: a process that had a gloo group, as an FSDP run
    in this one, can hang in a forked child): {"status": how it ended, "error": its exception's message}."""
    out = run_dir.with_suffix(".child.pt")
    env = dict(os.environ)  # TRITON_INTERPRET as here: the child computes what the resume here computes
    env.update(PYTHONPATH=os.pathsep.join([str(ROOT), str(HERE), env.get("PYTHONPATH", "")]), OMP_NUM_THREADS="1")
    code = (f"import sys, faults; sys.exit(faults.child(faults.Fault(*{dataclasses.astuple(fault)!r}), "
            f"faults.Path({str(run_dir)!r}), {size}, faults.Path({str(out)!r})))")
    proc = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=300)
    status = (f"signal {signal.Signals(-proc.returncode).name}" if proc.returncode < 0
              else f"exit {proc.returncode}")
    report = torch.load(out) if out.exists() else {"stderr": proc.stderr[-2000:]}
    out.unlink(missing_ok=True)
    report["status"] = status
    return report


def checkpoint_size(tmp: Path, fsdp: bool = False) -> int:
    """Bytes of the run's checkpoint file, or of the largest shard file of a sharded run (a kill after half
    of them is half-way through a save; the full disk's limit is 90% of it)."""
    if fsdp:
        return max(p.stat().st_size for p in (tmp / "full-sharded" / "checkpoint.dcp").iterdir())
    return (tmp / "full" / "checkpoint.pt").stat().st_size


def survived(fault: Fault, tmp: Path, reference: dict, size: int) -> tuple[bool, str]:
    """Inject ``fault``, check what is left, resume; (survived, what happened)."""
    from sidfast.training.state import read_distill
    from sidfast.utils.files import STALE, previous_path

    run_dir = tmp / fault.name.replace(":", "-").replace("@", "-")
    report = inject(fault, run_dir, size)
    expected = {"kill": "signal SIGKILL", "term": "exit 0", "full": "exit 0"}[fault.kind]
    if report["status"] != expected:
        return False, f"child ended with {report['status']}, expected {expected}"
    if fault.kind == "term" and report.get("interrupted") != "SIGTERM":
        return False, f"run not stopped by SIGTERM: {report}"
    if fault.kind == "full":
        error = report.get("error") or ""
        if "CheckpointError" not in error or "\n" in error or str(run_dir) not in error or "resume" not in error:
            return False, f"not a one-line error naming the run dir: {error!r}"
    name = "checkpoint.dcp" if fault.fsdp else "checkpoint.pt"
    target = run_dir / name
    if fault.fsdp and not target.exists():  # killed between the two renames of a sharded save: the previous
        target = previous_path(target)      # checkpoint, and the new one whole in its temporary directory
    kept = read_distill(target)["iteration"]  # the last complete checkpoint reads back
    if fault.kind == "full" and kept != 2:
        return False, f"the full disk left iteration {kept}, not the previous checkpoint (2)"
    resumed = run(run_dir, fault.fsdp, resume="auto")
    for key in ("G", "ema", "fake"):
        a, b = resumed[key], reference[key]
        if a.keys() != b.keys() or not all(torch.equal(a[k], b[k]) for k in a):
            return False, f"resumed from iteration {kept}: {key} differs from the uninterrupted run"
    left = [p.name for p in run_dir.iterdir() if STALE.match(p.name)]
    if left:
        return False, f"temporaries left after the resume: {left}"
    return True, f"iteration {kept} readable{' (previous)' if target.name != name else ''}, resumed bitwise equal" + (f"; {report['error'][:60]}..."
                                                                   if report.get("error") else "")


def references(tmp: Path) -> dict:
    return {False: run(tmp / "full"), True: run(tmp / "full-sharded", fsdp=True)}
