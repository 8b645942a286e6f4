"""Every combination of the distill options a user can reach, run through the command line for a few
iterations with what a user leaves on: grids, EMA, checkpoints (two), a resume, then ``sidfast sample`` of
the run folder. A combination the trainer refuses must say so in one line; every other one must train.

Single process: method x fake score x generator x engine x guidance x generator steps. Two processes (gloo):
the same product under DDP and under FSDP (which refuses what it does not shard: SiDA, a LoRA generator, the
fused engine), each rank running the command in a process of the group; and a few torchrun launches, the way
a user starts them.
"""
import itertools
import os
import subprocess
import sys

import pytest

import torch

from runs import LAYER, real_images
from utils import join_gloo_group, run_main, spawn_workers, torchrun

TESTS = os.path.dirname(os.path.abspath(__file__))
RUN = ["--iterations", "3", "--batch", "4", "--log-every", "1", "--grid-size", "4", "--teacher-steps", "2",
       "--sample-every", "2", "--checkpoint-every", "2", "--no-progress", "--device", "cpu", "--lora-rank", "2"]
METHODS, FAKES, GENERATORS, ENGINES, GUIDANCE, STEPS = ("sid", "sida"), ("full", "lora"), ("full", "lora"), \
    ("eager", "fused"), ("none", "lsg"), (1, 4)


def _refused(method, guidance, steps) -> bool:
    """The combinations the trainer refuses by design (SiDA with guidance); the rest must run."""
    return method == "sida" and guidance != "none"


def _options(tmp_path, method, fake, generator, engine, guidance, steps) -> list:
    teacher = "nets:conditional_teacher" if guidance != "none" else "nets:tiny_teacher"
    args = ["--teacher", teacher, "--method", method, "--fake-score", fake, "--generator", generator,
            "--engine", engine, "--gen-steps", str(steps)]
    if guidance != "none":
        args += ["--guidance", guidance, "--cfg", "1.5"]
    if method == "sida":
        data = tmp_path / "real.npz"
        if not data.exists():  # (the ranks of a group find it written)
            real_images(data)
        args += ["--data", str(data), "--disc-layer", LAYER, "--g-start-kimg", "0", "--gan-start-kimg", "0"]
    return args


COMBINATIONS = list(itertools.product(METHODS, FAKES, GENERATORS, ENGINES, GUIDANCE, STEPS))


@pytest.mark.parametrize("method,fake,generator,engine,guidance,steps", COMBINATIONS,
                         ids=["-".join(map(str, c)) for c in COMBINATIONS])
def test_every_single_process_combination_trains_resumes_and_samples(tmp_path, capsys, method, fake, generator,
                                                                     engine, guidance, steps):
    run = tmp_path / "run"
    options = _options(tmp_path, method, fake, generator, engine, guidance, steps)
    code, out, err = run_main(["distill", *options, "--run-dir", run, *RUN], capsys)
    if _refused(method, guidance, steps):
        assert code == 2 and err.count("\n") == 1 and "Traceback" not in err, err
        return
    assert code == 0, err
    for name in ("checkpoint.pt", "checkpoint.prev.pt", "metrics.jsonl", "config.json", "summary.json",
                 "teacher.png", "student_init.png", "student_000002.png", "student.png", "losses.png"):
        assert (run / name).is_file(), name
    # a longer resumed run goes on from the checkpoint
    code, out, err = run_main(["distill", "--resume", run, *RUN[:1], "4", *RUN[2:]], capsys)
    assert code == 0, err
    assert "resuming at iteration 3 of 4" in out
    code, out, err = run_main(["sample", run, "--out", tmp_path / "grid.png", "--num", "4"], capsys)
    assert code == 0, err
    assert (tmp_path / "grid.png").is_file()


def _refused_sharded(method, fake, generator, engine) -> bool:
    """What FSDP refuses by design: SiDA, a LoRA generator (it shares the teacher's weights, which FSDP shards
    as the teacher's), the fused engine."""
    return method != "sid" or generator == "lora" or engine == "fused"


def _group_matrix(rank, init_file, tmp, combinations):
    """Each rank of a gloo group of two runs every combination's command (train, then resume longer) in
    this process, as a torchrun rank would; rank 0 keeps the exit statuses."""
    from pathlib import Path

    from sidfast import cli

    def main(args):
        try:
            return cli.main([str(a) for a in args])
        except SystemExit as exc:  # argparse's
            return exc.code

    join_gloo_group(rank, 2, init_file)
    tmp = Path(tmp)
    codes = {}
    for mode, *combination in combinations:
        name = "-".join(map(str, (mode, *combination)))
        run = tmp / name
        fsdp = ["--fsdp"] if mode == "fsdp" else []
        code = main(["distill", *_options(tmp, *combination), "--run-dir", run, *RUN, *fsdp])
        resumed = main(["distill", "--resume", run, *RUN[:1], "4", *RUN[2:], *fsdp]) if code == 0 else None
        codes[name] = (code, resumed)
    if rank == 0:
        torch.save(codes, tmp / "codes.pt")


GROUP = [(mode, *c) for mode in ("ddp", "fsdp") for c in COMBINATIONS]


@pytest.mark.slow
def test_every_combination_trains_resumes_and_samples_in_a_group_of_two(tmp_path, capsys):
    real_images(tmp_path / "real.npz")
    spawn_workers(_group_matrix, (str(tmp_path / "init"), str(tmp_path), GROUP), 2)
    codes = torch.load(tmp_path / "codes.pt")
    for mode, method, fake, generator, engine, guidance, steps in GROUP:
        name = "-".join(map(str, (mode, method, fake, generator, engine, guidance, steps)))
        refused = _refused(method, guidance, steps) or mode == "fsdp" and _refused_sharded(method, fake,
                                                                                            generator, engine)
        assert codes[name] == ((2, None) if refused else (0, 0)), name
        if refused:
            continue
        run = tmp_path / name
        assert (run / ("checkpoint.dcp" if mode == "fsdp" else "checkpoint.pt")).exists(), name
        for png in ("teacher.png", "student_init.png", "student_000002.png", "student.png"):
            assert (run / png).is_file(), (name, png)
        code, _, err = run_main(["sample", run, "--out", tmp_path / f"{name}.png", "--num", "4"], capsys)
        assert code == 0, (name, err)


DISTRIBUTED = [("ddp", "full", "full", "fused", "lsg", 1), ("ddp", "lora", "lora", "eager", "none", 4),
               ("fsdp", "full", "full", "eager", "lsg", 4), ("fsdp", "lora", "full", "eager", "none", 1)]


@pytest.mark.slow
@pytest.mark.parametrize("mode,fake,generator,engine,guidance,steps", DISTRIBUTED,
                         ids=["-".join(map(str, c)) for c in DISTRIBUTED])
def test_distributed_combinations_train_and_sample(tmp_path, mode, fake, generator, engine, guidance, steps):
    run = tmp_path / "run"
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env["PYTHONPATH"] = os.pathsep.join([TESTS, env.get("PYTHONPATH", "")])
    args = ["distill", *_options(tmp_path, "sid", fake, generator, engine, guidance, steps), "--run-dir",
            str(run), *RUN] + (["--fsdp"] if mode == "fsdp" else [])
    code, _, stderr = torchrun(["-m", "sidfast.cli", *args], env, timeout=240)
    assert code == 0, stderr[-3000:]
    assert (run / ("checkpoint.dcp" if mode == "fsdp" else "checkpoint.pt")).exists()
    assert (run / "student.png").is_file()
    sample = subprocess.run([sys.executable, "-m", "sidfast.cli", "sample", str(run), "--out",
                             str(tmp_path / "grid.png"), "--num", "4"], env=env, capture_output=True, text=True,
                            timeout=240)
    assert sample.returncode == 0, sample.stderr[-3000:]


def test_fsdp_with_a_lora_generator_is_refused_in_one_line(tmp_path, capsys):
    # a LoRA generator shares the teacher's weights, which FSDP shards as the teacher's own
    code, _, err = run_main(["distill", *_options(tmp_path, "sid", "full", "lora", "eager", "none", 1),
                             "--run-dir", tmp_path / "run", "--fsdp", *RUN], capsys)
    assert code == 2 and err.count("\n") == 1 and "--generator full" in err and "Traceback" not in err, err
    assert not (tmp_path / "run" / "checkpoint.dcp").exists()
