"""Every combination of the distill options a user can reach, run through the command line for a few
iterations with what a user leaves on: grids, EMA, checkpoints (two), a resume, then ``sidfast sample`` of
the run folder. A combination the trainer refuses must say so in one line; every other one must train.

Single process: method x fake score x generator x engine x guidance x generator steps. Distributed (DDP and
FSDP over gloo, two processes): the same options users pair with them, in a few launches.
"""
import itertools
import os
import subprocess
import sys

import pytest

from runs import LAYER, real_images
from utils import run_main, torchrun

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
        args += ["--data", real_images(tmp_path / "real.npz"), "--disc-layer", LAYER, "--g-start-kimg", "0",
                 "--gan-start-kimg", "0"]
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
