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
- ``kill`` of one rank of a two-process run (``Fault.rank``; DDP and FSDP, launched with torchrun, which then
  ends the other rank): at a stage of the second save, or (``save``) as that save starts, after the ranks
  gathered their random states; the resume runs on two processes and is compared with an uninterrupted
  two-process run.
"""
import dataclasses
import json
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
from utils import torchrun

HERE = Path(__file__).resolve().parent  # tests/
ROOT = HERE.parent
CONFIG = dict(iterations=6, checkpoint_every=2, sample_every=2, grid_size=4, teacher_steps=2, lr=1e-3)
SAVE = 2  # the save a kill hits: iteration 4's

FULL_STAGES = ["opened", ("write", 1), ("write", 4096), ("write", 0.5), "written", "synced", "kept-previous",
               "replaced"]
SHARDED_STAGES = ["sharded-dir", "shards-written", "opened", "written", "meta-written", "moved-previous",
                  "renamed"]
TERM_POINTS = ["first-iteration", "ema-update", "first-grid", "grid"]
WORLD = 2  # processes of the runs a rank fault hits


@dataclasses.dataclass
class Fault:
    kind: str  # kill, term, full
    where: str
    fsdp: bool = False
    nbytes: float = 0  # kill at a write: after this many bytes (a fraction: of the file's size)
    rank: int | None = None  # the rank killed in a run of WORLD processes; None: a run of one

    @property
    def name(self) -> str:
        at = f"{self.where}@{self.nbytes:g}B" if self.nbytes else self.where
        ranks = "" if self.rank is None else f":rank{self.rank}of{WORLD}"
        return f"{self.kind}:{'sharded' if self.fsdp else 'file'}:{at}{ranks}"


def matrix() -> list[Fault]:
    faults = []
    for stage in FULL_STAGES:
        where, n = stage if isinstance(stage, tuple) else (stage, 0)
        faults.append(Fault("kill", where, nbytes=n))
    faults += [Fault("kill", stage, fsdp=True) for stage in SHARDED_STAGES]
    faults += [Fault("term", point) for point in TERM_POINTS]
    faults += [Fault("full", "second-save"), Fault("full", "second-save", fsdp=True)]
    # one rank of two killed: rank 0 half-way through the checkpoint file it alone writes, or with every
    # shard and the metadata written; rank 1 as the save starts (the other rank writes or waits for it), or
    # with its shards written
    faults += [Fault("kill", "write", nbytes=0.5, rank=0), Fault("kill", "save", rank=1),
               Fault("kill", "save", fsdp=True, rank=1), Fault("kill", "shards-written", fsdp=True, rank=1),
               Fault("kill", "meta-written", fsdp=True, rank=0)]
    return faults


def cfg(run_dir, fsdp=False, **kw):
    return quiet(run_dir=str(run_dir), fsdp=fsdp, **{**CONFIG, **kw})


def run(run_dir, fsdp=False, **kw):
    """Train (or resume) the run in this process, one of its ranks under torchrun: the whole generator, EMA
    and fake-score states after the last iteration (gathered from the shards under FSDP, on every rank
    while the process group is up; absent when the run stopped before), its iteration, how it stopped."""
    from sidfast.training.loop import distill
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

    full = StateDictOptions(full_state_dict=True)
    get = (lambda n: {k: v.clone() for k, v in get_model_state_dict(n, options=full).items()}) if fsdp else states
    last = {}

    def grab(state):
        if state["iteration"] == CONFIG["iterations"]:
            last.update(G=get(state["generator"]), ema=get(state["generator_ema"]), fake=get(state["fake"]))

    res = distill(cfg(run_dir, fsdp, **kw), tiny_teacher(), callbacks=[grab], log=None)
    return {**last, "iteration": res.iteration, "interrupted": res.interrupted}


def _inject(fault: Fault, size: int):
    """Arm ``fault`` in this (child) process."""
    from sidfast.training import loop
    from sidfast.utils import files

    me = os.getpid()
    if fault.rank is not None and int(os.environ["RANK"]) != fault.rank:
        return
    if fault.where == "save":  # as the second save starts, the random states of every rank gathered
        from sidfast.training import state

        save, seen = state._save, {"saves": 0}

        def die_in_save(*args, **kwargs):
            seen["saves"] += 1
            if seen["saves"] == SAVE:
                os.kill(me, signal.SIGKILL)
            return save(*args, **kwargs)

        state._save = die_in_save
        return
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


def rank_main(spec: dict) -> int:
    """One rank of a run of WORLD processes under torchrun (``launch``): the fault of ``spec`` armed on its
    rank, then ``run``; rank 0 writes what ``run`` returned to ``spec["out"]``. Ends like the sidfast
    command (no interpreter teardown after a process group)."""
    from sidfast.utils.runtime import end_process

    torch.set_num_threads(1)
    if spec["fault"]:
        _inject(Fault(*spec["fault"]), spec["size"])
    result = run(spec["run_dir"], spec["fsdp"], **({"resume": "auto"} if spec["resume"] else {}))
    if int(os.environ["RANK"]) == 0:
        torch.save(result, spec["out"])
    end_process(0, after_group=True)


def launch(run_dir: Path, fsdp: bool, fault: Fault | None = None, size: int = 0, resume: bool = False) -> dict:
    """The run of ``run_dir`` on WORLD processes launched with torchrun (with ``fault`` armed, or resumed):
    {"status": the launch's exit status, "stderr": its end, ...: what ``run`` returned on rank 0}."""
    out = Path(run_dir).with_suffix(".launch.pt")
    spec = {"fault": dataclasses.astuple(fault) if fault else None, "run_dir": str(run_dir), "fsdp": fsdp,
            "size": size, "resume": resume, "out": str(out)}
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}  # the ranks compute alike
    env.update(PYTHONPATH=os.pathsep.join([str(ROOT), str(HERE), env.get("PYTHONPATH", "")]), OMP_NUM_THREADS="1")
    code, _, err = torchrun(["-m", "faults", json.dumps(spec)], env, timeout=300, nproc=WORLD)
    report = torch.load(out) if out.exists() else {}
    out.unlink(missing_ok=True)
    return {**report, "status": code, "stderr": err[-3000:]}


def reference_dir(tmp: Path, fsdp: bool, ranks: bool) -> Path:
    """Where the uninterrupted run of a fault's kind trains: ``ranks``, on WORLD processes."""
    return tmp / (("full-sharded" if fsdp else "full") + (f"-{WORLD}ranks" if ranks else ""))


def reference(tmp: Path, fsdp: bool, ranks: bool) -> dict:
    """The uninterrupted run the faults of a kind are compared with (``ranks``: on WORLD processes)."""
    run_dir = reference_dir(tmp, fsdp, ranks)
    if not ranks:
        return run(run_dir, fsdp)
    report = launch(run_dir, fsdp)
    assert report["status"] == 0, report["stderr"]
    return report


def checkpoint_size(tmp: Path, fsdp: bool = False, ranks: bool = False) -> int:
    """Bytes of the run's checkpoint file, or of the largest shard file of a sharded run (a kill after half
    of them is half-way through a save; the full disk's limit is 90% of it)."""
    run_dir = reference_dir(tmp, fsdp, ranks)
    if fsdp:
        return max(p.stat().st_size for p in (run_dir / "checkpoint.dcp").iterdir())
    return (run_dir / "checkpoint.pt").stat().st_size


def survived(fault: Fault, tmp: Path, reference: dict, size: int) -> tuple[bool, str]:
    """Inject ``fault``, check what is left, resume; (survived, what happened)."""
    from sidfast.training.state import read_distill
    from sidfast.utils.files import STALE, previous_path

    run_dir = tmp / fault.name.replace(":", "-").replace("@", "-")
    if fault.rank is not None:
        report = launch(run_dir, fault.fsdp, fault, size)
        # torchrun reports the killed rank, and ends the other
        if report["status"] == 0 or "Signal 9 (SIGKILL)" not in report["stderr"]:
            return False, f"the launch ended with {report['status']}, no rank killed: {report['stderr'][-300:]}"
    else:
        report = inject(fault, run_dir, size)
    expected = {"kill": "signal SIGKILL", "term": "exit 0", "full": "exit 0"}[fault.kind]
    if fault.rank is None and report["status"] != expected:
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
    if fault.rank is None:
        resumed = run(run_dir, fault.fsdp, resume="auto")
    else:
        resumed = launch(run_dir, fault.fsdp, resume=True)
        if resumed["status"] != 0:
            return False, f"the resume failed: {resumed['stderr'][-300:]}"
    for key in ("G", "ema", "fake"):
        a, b = resumed[key], reference[key]
        if a.keys() != b.keys() or not all(torch.equal(a[k], b[k]) for k in a):
            return False, f"resumed from iteration {kept}: {key} differs from the uninterrupted run"
    left = [p.name for p in run_dir.iterdir() if STALE.match(p.name)]
    if left:
        return False, f"temporaries left after the resume: {left}"
    return True, f"iteration {kept} readable{' (previous)' if target.name != name else ''}, resumed bitwise equal" + (f"; {report['error'][:60]}..."
                                                                   if report.get("error") else "")



if __name__ == "__main__":  # a rank under torchrun: python -m torch.distributed.run ... -m faults SPEC
    sys.exit(rank_main(json.loads(sys.argv[1])))
