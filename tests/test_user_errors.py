"""User mistakes across the commands, each through the real command line: exit status 2, exactly one line
on stderr (``sidfast <command>: error: ...``) that names the option in command-line words, no traceback.

Paths in the arguments are templates filled from the ``files`` fixture (``{teacher}``, ``{run}``, ...).
"""
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from nets import SHAPE
from detectors import save_torchscript
from sidfast.models.io import save_network
from utils import run_main

TESTS = os.path.dirname(__file__)
FAST = ["--iterations", "1", "--batch", "4", "--grid-size", "0", "--teacher-steps", "0", "--no-progress",
        "--device", "cpu", "--checkpoint-every", "0"]
TINY = ["--teacher", "nets:tiny_teacher", *FAST]
EVAL = ["--inception", "{det}", "--num", "20", "--device", "cpu"]


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    """The files the mistakes are made with: a teacher checkpoint, finished runs, an empty folder, data
    files of the wrong kind and shape, a plain file where a directory is expected."""
    from nets import tiny_teacher
    from sidfast import cli

    root = tmp_path_factory.mktemp("mistakes")
    teacher = root / "teacher.pt"
    save_network(teacher, tiny_teacher(), "nets:build_tiny", {"image_shape": list(SHAPE), "hidden": 32})
    run = root / "run"
    moved_teacher = root / "moved-teacher.pt"
    shutil.copy(teacher, moved_teacher)
    assert cli.main(["distill", "--teacher", str(moved_teacher), "--run-dir", str(run), *FAST]) == 0
    moved_teacher.rename(root / "elsewhere.pt")  # the run's teacher moved after the run
    assert cli.main(["distill", *TINY, "--run-dir", str(root / "entry-run")]) == 0  # a module:function teacher
    (root / "empty").mkdir()
    (root / "notes.txt").write_text("not a checkpoint\n")
    (root / "blocker").write_text("a file where a directory is expected\n")
    np.save(root / "chw.npy", np.zeros((64, 3, 16, 16), dtype=np.uint8))  # channels-first uint8
    (root / "unknown.yaml").write_text("learning_rate: 1e-4\n")
    (root / "config.ini").write_text("[sid]\n")
    (root / "broken.json").write_text("{not json\n")
    (root / "prompts.txt").write_text("a cat\n")
    # sidfast eval: the stand-in detector (8 features) and reference files right and wrong
    save_torchscript(root / "det.pt")
    np.savez(root / "ref8.npz", mu=np.zeros(8), sigma=np.eye(8))
    np.savez(root / "ref16.npz", mu=np.zeros(16), sigma=np.eye(16))
    np.savez(root / "ref-bad-sigma.npz", mu=np.zeros(8), sigma=np.eye(7))
    np.savez(root / "ref-3x8x8.npz", mu=np.zeros(8), sigma=np.eye(8), image_shape=np.array([3, 8, 8]))
    np.savez(root / "five.npz", images=np.zeros((5, 4, 4, 1), dtype=np.uint8))
    (root / "preset.yaml").write_text("preset: cifar-10\n")
    from sidfast.evaluate import teacher_fd  # a teacher-fd reference of 5x5 images (the tiny teacher's are 4x4)
    torch.save({"format": teacher_fd.FORMAT, "version": teacher_fd.VERSION, "features": {},
                "sampling": {"image_shape": [1, 5, 5], "num_classes": 0, "label_format": "onehot", "num": 40},
                "samples": torch.zeros(40, 1, 5, 5)}, root / "ref5x5.pt")
    return {"teacher": str(teacher), "run": str(run), "ckpt": str(run / "checkpoint.pt"),
            "empty": str(root / "empty"), "notes": str(root / "notes.txt"), "blocker": str(root / "blocker"),
            "chw": str(root / "chw.npy"), "root": str(root), "unknown_yaml": str(root / "unknown.yaml"),
            "ini": str(root / "config.ini"), "broken_json": str(root / "broken.json"),
            "prompts": str(root / "prompts.txt"), "det": str(root / "det.pt"), "ref8": str(root / "ref8.npz"),
            "ref16": str(root / "ref16.npz"), "ref_bad": str(root / "ref-bad-sigma.npz"),
            "ref_shape": str(root / "ref-3x8x8.npz"), "five": str(root / "five.npz"),
            "preset_yaml": str(root / "preset.yaml"),
            "entry_run": str(root / "entry-run"), "ref5x5": str(root / "ref5x5.pt")}


# (id, argv, what the one line must contain: the option in command-line words and the point)
MISTAKES = [
    # ---- distill: option values ----
    ("lr-negative", ["distill", *TINY, "--lr", "-1e-4"], ["--lr", "> 0"]),
    ("lr-not-a-number", ["distill", *TINY, "--lr", "fast"], ["--lr", "number"]),
    ("batch-zero", ["distill", *TINY, "--batch", "0"], ["--batch", ">= 1"]),
    ("iterations-negative", ["distill", *TINY, "--iterations", "-5"], ["--iterations", ">= 0"]),
    ("tmax-too-large", ["distill", *TINY, "--tmax", "2000"], ["--tmax", "<= 1000"]),
    ("betas-out-of-range", ["distill", *TINY, "--betas", "0.9", "1.5"], ["--betas"]),
    ("method-unknown", ["distill", *TINY, "--method", "gan"], ["--method", "sida"]),
    ("precision-unknown", ["distill", *TINY, "--precision", "fp8"], ["--precision", "bf16"]),
    ("sigma-min-above-max", ["distill", *TINY, "--sigma-min", "100"], ["--sigma-min", "--sigma-max"]),
    ("image-shape-zero", ["distill", *TINY, "--image-shape", "0", "4", "4"], ["--image-shape"]),
    ("log-every-zero", ["distill", *TINY, "--log-every", "0"], ["--log-every", ">= 1"]),
    # ---- distill: recipe options (docs/recipes.md) ----
    ("timesteps-for-an-edm-teacher", ["distill", *TINY, "--fake-levels", "timesteps"],
     ["--fake-levels timesteps", "lognormal or rho"]),
    ("timesteps-reversed", ["distill", *TINY, "--timesteps", "900", "100"], ["--timesteps", "LO <= HI"]),
    ("t-init-negative", ["distill", *TINY, "--t-init", "-1"], ["--t-init", "positive"]),
    ("sigma-init-inf-for-edm", ["distill", *TINY, "--sigma-init", "inf"], ["--sigma-init inf", "flow teachers"]),
    ("t-init-disagrees-with-sigma-init", ["distill", *TINY, "--t-init", "2.5", "--sigma-init", "3"],
     ["--t-init 2.5", "--sigma-init"]),
    ("recipe-unknown", ["distill", *TINY, "--recipe", "sdxl"], ["--recipe", "ddpm"]),
    ("fake-weighting-unknown", ["distill", *TINY, "--fake-weighting", "snr"], ["--fake-weighting", "eps"]),
    ("condition-dropout-above-one", ["distill", *TINY, "--condition-dropout", "1.5"], ["--condition-dropout", "<= 1"]),
    ("condition-dropout-unconditional", ["distill", *TINY, "--condition-dropout", "0.1"],
     ["--condition-dropout", "conditional teacher"]),
    ("lora-rank-zero", ["distill", *TINY, "--lora-rank", "0"], ["--lora-rank", ">= 1"]),
    ("null-class-negative", ["distill", *TINY, "--null-class", "-1"], ["--null-class", ">= 0"]),
    ("unknown-option", ["distill", *TINY, "--learning-rate", "1e-4"], ["--learning-rate"]),
    ("option-missing-value", ["distill", *TINY, "--seed"], ["--seed", "expected one argument"]),
    # ---- distill: conflicting options ----
    ("guidance-without-scale", ["distill", *TINY, "--guidance", "lsg"], ["--guidance", "--cfg"]),
    ("scale-without-guidance", ["distill", *TINY, "--cfg", "2"], ["--cfg", "--guidance"]),
    ("fsdp-with-fused-engine", ["distill", *TINY, "--fsdp", "--engine", "fused"], ["--engine", "--fsdp"]),
    ("fsdp-precision-without-fsdp", ["distill", *TINY, "--fsdp-precision", "bf16"], ["--fsdp-precision"]),
    ("batch-gpu-not-dividing", ["distill", *TINY, "--batch", "6", "--batch-gpu", "4"], ["--batch-gpu"]),
    ("data-with-sid", ["distill", *TINY, "--data", "{chw}"], ["--data", "--method"]),
    ("sid2a-without-init", ["distill", *TINY, "--method", "sid2a"], ["--method sid2a", "--init-generator"]),
    ("sida-without-data", ["distill", *TINY, "--method", "sida"], ["--data"]),
    ("guidance-unconditional-teacher", ["distill", *TINY, "--guidance", "lsg", "--cfg", "2"], ["--guidance"]),
    ("preset-unknown", ["distill", *TINY, "--preset", "cifar10"], ["--preset 'cifar10'", "cifar10-uncond", "sd3"]),
    ("preset-of-another-family", ["distill", *TINY, "--preset", "sd15"], ["--preset sd15", "SiD-LSG",
                                                                          "this teacher is an EDM network"]),
    ("preset-flow-for-an-edm-teacher", ["distill", *TINY, "--preset", "sana"], ["--preset sana", "flow-matching"]),
    ("preset-unknown-in-config", ["distill", *TINY, "--config", "{preset_yaml}"], ["--preset 'cifar-10'"]),
    ("preset-other-than-the-resumed-runs", ["distill", "--resume", "{run}", "--preset", "cifar10-uncond"],
     ["--preset cifar10-uncond", "resumed run keeps its checkpoint's options (preset none)"]),
    ("generator-beta1-one", ["distill", *TINY, "--generator-beta1", "1"], ["--generator-beta1", "[0, 1)"]),
    # ---- distill: files ----
    ("no-teacher", ["distill", *FAST, "--run-dir", "{root}/r-no-teacher"], ["--teacher"]),
    ("teacher-missing", ["distill", *FAST, "--teacher", "{root}/nope.pt", "--run-dir", "{root}/r1"],
     ["--teacher", "does not exist"]),
    ("teacher-not-a-checkpoint", ["distill", *FAST, "--teacher", "{notes}", "--run-dir", "{root}/r2"],
     ["--teacher", "not a torch checkpoint"]),
    ("teacher-bad-entry-point", ["distill", *FAST, "--teacher", "no_such_module:f", "--run-dir", "{root}/r3"],
     ["--teacher", "no_such_module"]),
    ("teacher-empty-directory", ["distill", *FAST, "--teacher", "{empty}", "--run-dir", "{root}/r4"],
     ["--teacher"]),
    ("teacher-a-distill-checkpoint", ["distill", *FAST, "--teacher", "{ckpt}", "--run-dir", "{root}/r5"],
     ["--teacher", "sidfast.network"]),
    ("config-missing", ["distill", *TINY, "--config", "{root}/nope.yaml"], ["--config", "does not exist"]),
    ("config-wrong-suffix", ["distill", *TINY, "--config", "{ini}"], ["--config", ".yaml"]),
    ("config-unknown-option", ["distill", *TINY, "--config", "{unknown_yaml}"], ["--config", "learning_rate"]),
    ("config-broken-json", ["distill", *TINY, "--config", "{broken_json}"], ["--config", "not valid JSON"]),
    ("data-missing", ["distill", *TINY, "--method", "sida", "--data", "{root}/nope.npz", "--run-dir",
                      "{root}/r6"], ["--data", "does not exist"]),
    ("data-channels-first-uint8", ["distill", *TINY, "--method", "sida", "--data", "{chw}", "--run-dir",
                                   "{root}/r7"], ["--data", "(64, 3, 16, 16)"]),
    ("prompts-for-a-pixel-teacher", ["distill", *TINY, "--prompts", "{prompts}", "--run-dir", "{root}/r8"],
     ["--prompts"]),
    ("device-unknown", ["distill", *TINY, "--device", "tpu"], ["--device"]),
    # ---- distill: the in-loop metric ----
    ("eval-fid-without-ref", ["distill", *TINY, "--eval", "fid", "--run-dir", "{root}/e1"],
     ["--eval-ref", "--make-ref"]),
    ("eval-fid-detector-missing", ["distill", *TINY, "--eval", "fid", "--eval-ref", "{ref8}", "--eval-inception",
                                   "{root}/nope.pt", "--run-dir", "{root}/e7"], ["--eval-inception", "does not exist"]),
    ("eval-fid-ref-of-other-features", ["distill", *TINY, "--eval", "fid", "--eval-ref", "{ref16}",
                                        "--eval-inception", "{det}", "--run-dir", "{root}/e8"],
     ["--eval-ref", "16 features"]),
    ("eval-unknown", ["distill", *TINY, "--eval", "inception", "--run-dir", "{root}/e2"], ["--eval", "teacher-fd"]),
    ("eval-every-without-eval", ["distill", *TINY, "--eval-every", "10"], ["--eval-every", "--eval"]),
    ("eval-every-negative", ["distill", *TINY, "--eval", "teacher-fd", "--eval-every", "-1"],
     ["--eval-every", ">= 0"]),
    ("eval-num-not-above-the-feature-dimension", ["distill", *TINY, "--eval", "teacher-fd", "--eval-num", "10",
                                                  "--run-dir", "{root}/e3"], ["--eval-num", "singular"]),
    ("distill-eval-ref-missing", ["distill", *TINY, "--eval", "teacher-fd", "--eval-ref", "{root}/nope.pt", "--run-dir",
                          "{root}/e4"], ["--eval-ref", "does not exist"]),
    ("eval-ref-not-a-reference", ["distill", *TINY, "--eval", "teacher-fd", "--eval-ref", "{notes}", "--run-dir",
                                  "{root}/e5"], ["--eval-ref", "not a teacher-fd reference"]),
    ("eval-ref-of-other-images", ["distill", *TINY, "--eval", "teacher-fd", "--eval-ref", "{ref5x5}", "--run-dir",
                                  "{root}/e6"], ["--eval-ref", "image_shape [1, 5, 5]"]),
    # ---- distill: run directories ----
    ("run-dir-under-a-file", ["distill", *TINY, "--run-dir", "{blocker}/run"], ["--run-dir", "is a file"]),
    ("run-dir-under-proc", ["distill", *TINY, "--run-dir", "/proc/sidfast-nope/run"], ["--run-dir"]),
    ("run-dir-name-too-long", ["distill", *TINY, "--run-dir", "{root}/" + "x" * 300 + "/run"],
     ["--run-dir", "File name too long"]),
    ("run-dir-holds-a-run", ["distill", *TINY, "--run-dir", "{run}"], ["--resume", "--overwrite"]),
    ("resume-folder-without-checkpoint", ["distill", "--resume", "{empty}", "--no-progress"],
     ["--resume", "no checkpoint.pt or checkpoint.dcp in"]),
    ("resume-missing-file", ["distill", "--resume", "{root}/nope.pt"], ["--resume", "does not exist"]),
    ("resume-a-teacher-checkpoint", ["distill", "--resume", "{teacher}"], ["--resume", "sidfast.distill"]),
    ("resume-after-the-teacher-moved", ["distill", "--resume", "{run}", "--iterations", "2", "--no-progress"],
     ["--resume", "moved-teacher.pt", "--teacher NEWPATH"]),
    # ---- sample ----
    ("sample-steps-zero", ["sample", "{ckpt}", "--out", "{root}/s.png", "--steps", "0"], ["--steps", ">= 1"]),
    ("sample-num-zero", ["sample", "{ckpt}", "--out", "{root}/s.png", "--num", "0"], ["--num", ">= 1"]),
    ("sample-batch-negative", ["sample", "{ckpt}", "--out", "{root}/s.png", "--batch", "-2"], ["--batch"]),
    ("sample-out-suffix", ["sample", "{ckpt}", "--out", "{root}/s.txt"], ["--out", ".txt"]),
    ("sample-out-under-proc", ["sample", "{ckpt}", "--out", "/proc/sidfast-grid.png"], ["--out"]),
    ("sample-out-is-a-file", ["sample", "{ckpt}", "--out", "{blocker}"], ["--out", "not a directory"]),
    ("sample-missing-checkpoint", ["sample", "{root}/nope.pt", "--out", "{root}/s.png"],
     ["checkpoint", "does not exist"]),
    ("sample-folder-without-checkpoint", ["sample", "{empty}", "--out", "{root}/s.png"],
     ["is a folder without a checkpoint: looked for checkpoint.pt, checkpoint.dcp and generator.pt"]),
    ("sample-not-a-checkpoint", ["sample", "{notes}", "--out", "{root}/s.png"], ["not a torch checkpoint"]),
    ("sample-class-label-unconditional", ["sample", "{ckpt}", "--out", "{root}/s.png", "--class-label", "3"],
     ["--class-label"]),
    ("sample-prompts-for-a-pixel-student", ["sample", "{ckpt}", "--out", "{root}/s.png", "--prompts",
                                            "{prompts}"], ["--prompts"]),
    ("sample-teacher-for-a-network", ["sample", "{teacher}", "--out", "{root}/s.png", "--teacher", "{teacher}"],
     ["--teacher"]),
    ("sample-without-out", ["sample", "{ckpt}"], ["--out"]),
    ("sample-device-unknown", ["sample", "{ckpt}", "--out", "{root}/s.png", "--device", "abacus"], ["--device"]),
    # ---- eval ----
    ("eval-without-checkpoint", ["eval", "--ref", "{ref8}"], ["CHECKPOINT", "--make-ref"]),
    ("eval-without-ref", ["eval", "{ckpt}"], ["--ref STATS"]),
    ("eval-ref-missing", ["eval", "{ckpt}", *EVAL, "--ref", "{root}/nope.npz"], ["--ref", "does not exist"]),
    ("eval-ref-not-npz", ["eval", "{ckpt}", *EVAL, "--ref", "{notes}"], ["--ref", "cannot be read"]),
    ("eval-ref-wrong-shape", ["eval", "{ckpt}", *EVAL, "--ref", "{ref_bad}"], ["--ref", "sigma has shape (7, 7)"]),
    ("eval-ref-other-dimension", ["eval", "{ckpt}", *EVAL, "--ref", "{ref16}"], ["--ref", "16 features", "8"]),
    ("eval-ref-other-resolution", ["eval", "{ckpt}", *EVAL, "--ref", "{ref_shape}"], ["--ref", "3x8x8", "1x4x4"]),
    ("eval-num-below-features", ["eval", "{ckpt}", "--ref", "{ref8}", "--inception", "{det}", "--num", "5"],
     ["--num 5", "singular"]),
    ("eval-num-one", ["eval", "{ckpt}", "--ref", "{ref8}", "--num", "1"], ["--num", ">= 2"]),
    ("eval-seeds-backwards", ["eval", "{ckpt}", "--ref", "{ref8}", "--seeds", "9-1"], ["--seeds", "backwards"]),
    ("eval-seeds-and-num-disagree", ["eval", "{ckpt}", "--ref", "{ref8}", "--seeds", "0-99", "--num", "50"],
     ["--num 50", "--seeds lists 100"]),
    ("eval-inception-missing", ["eval", "{ckpt}", "--ref", "{ref8}", "--inception", "{root}/nope.pkl"],
     ["--inception", "does not exist"]),
    ("eval-inception-not-a-detector", ["eval", "{ckpt}", "--ref", "{ref8}", "--inception", "{notes}"],
     ["--inception", "cannot be read"]),
    ("eval-prompts-for-a-pixel-student", ["eval", "{ckpt}", *EVAL, "--ref", "{ref8}", "--prompts", "{prompts}"],
     ["--prompts"]),
    ("eval-kid-subset-size-one", ["eval", "{ckpt}", *EVAL, "--ref", "{ref8}", "--kid-subset-size", "1"],
     ["--kid-subset-size", ">= 2"]),
    ("eval-batch-zero", ["eval", "{ckpt}", *EVAL, "--ref", "{ref8}", "--batch", "0"], ["--batch", ">= 1"]),
    ("eval-out-suffix", ["eval", "{ckpt}", *EVAL, "--ref", "{ref8}", "--out", "{root}/m.txt"], ["--out", ".json"]),
    ("make-ref-without-out", ["eval", "--make-ref", "{five}"], ["--make-ref", "--out"]),
    ("make-ref-with-a-checkpoint", ["eval", "{ckpt}", "--make-ref", "{five}", "--out", "{root}/r.npz"],
     ["--make-ref", "no CHECKPOINT"]),
    ("make-ref-data-missing", ["eval", "--make-ref", "{root}/nope", "--out", "{root}/r.npz", "--inception",
                               "{det}"], ["--make-ref", "does not exist"]),
    ("make-ref-fewer-images-than-features", ["eval", "--make-ref", "{five}", "--out", "{root}/r.npz",
                                             "--inception", "{det}"], ["--make-ref", "5 samples", "singular"]),
    ("make-ref-out-suffix", ["eval", "--make-ref", "{five}", "--out", "{root}/r.json"], ["--out", ".npz"]),
    # ---- export ----
    ("export-edm-student", ["export", "{ckpt}", "--out", "{root}/x1"],
     ["CHECKPOINT", "not a diffusers model", "sidfast sample {ckpt}"]),
    ("export-entry-point-student", ["export", "{entry_run}", "--out", "{root}/x2"],
     ["CHECKPOINT", "nets:tiny_teacher", "not a diffusers model", "distill --teacher DIFFUSERS_DIR"]),
    ("export-teacher-checkpoint", ["export", "{teacher}", "--out", "{root}/x3"], ["CHECKPOINT", "network (teacher)"]),
    ("export-out-not-empty", ["export", "{ckpt}", "--out", "{run}"], ["--out", "not empty", "--overwrite"]),
    ("export-into-its-run", ["export", "{ckpt}", "--out", "{run}", "--overwrite"],
     ["--out", "holds the checkpoint", "another directory"]),
    ("export-out-is-a-file", ["export", "{ckpt}", "--out", "{notes}"], ["--out", "not a directory"]),
    ("export-steps-zero", ["export", "{ckpt}", "--out", "{root}/x4", "--steps", "0"], ["--steps", ">= 1"]),
    ("export-missing-checkpoint", ["export", "{root}/nope.pt", "--out", "{root}/x5"], ["does not exist"]),
    ("export-without-out", ["export", "{ckpt}"], ["--out"]),
    # ---- train-teacher ----
    ("teacher-iterations-zero", ["train-teacher", "--out", "{root}/t.pt", "--iterations", "0"],
     ["--iterations", ">= 1"]),
    ("teacher-dropout-one", ["train-teacher", "--out", "{root}/t.pt", "--dropout", "1"], ["--dropout"]),
    ("teacher-lr-negative", ["train-teacher", "--out", "{root}/t.pt", "--lr", "-0.1"], ["--lr"]),
    ("teacher-out-a-directory", ["train-teacher", "--out", "{empty}"], ["--out", "directory"]),
    ("teacher-out-under-a-file", ["train-teacher", "--out", "{blocker}/t.pt", "--iterations", "1"],
     ["--out", "is a file"]),
    ("teacher-without-out", ["train-teacher"], ["--out"]),
    # ---- plan ----
    ("plan-model-without-resolution", ["plan", "--model", "sd1.5"], ["--resolution"]),
    ("plan-gpu-memory-words", ["plan", "--model", "sd1.5", "--resolution", "512", "--gpu-memory", "lots"],
     ["--gpu-memory"]),
    ("plan-teacher-missing", ["plan", "--teacher", "{root}/nope.pt"], ["--teacher", "does not exist"]),
    ("plan-batch-zero", ["plan", "--teacher", "nets:tiny_teacher", "--batch", "0"], ["--batch"]),
    ("plan-margin-above-one", ["plan", "--teacher", "nets:tiny_teacher", "--margin", "1.5"], ["--margin"]),
    ("plan-two-sources", ["plan", "--teacher", "nets:tiny_teacher", "--model", "sd1.5"], ["--model", "--teacher"]),
    ("plan-no-source", ["plan"], ["--teacher", "--model", "--table"]),
    # ---- demo ----
    ("demo-gen-steps-zero", ["demo", "--gen-steps", "0", "--out", "{root}/d"], ["--gen-steps"]),
    ("demo-seeds-without-comparison", ["demo", "--seeds", "2", "--out", "{root}/d"], ["--seeds"]),
    ("demo-two-comparisons", ["demo", "--conditional", "--method", "sida", "--out", "{root}/d"],
     ["--conditional", "--method sida"]),
    ("demo-out-a-file", ["demo", "--quick", "--out", "{blocker}"], ["--out"]),
    # ---- the command itself ----
    ("no-command", [], ["COMMAND"]),
    ("unknown-command", ["distil"], ["distil"]),
]


def _fill(argv, files):
    return [a.format(**files) for a in argv]


def test_eval_without_inception_weights_says_where_to_put_them(files, tmp_path, monkeypatch, capsys):
    from sidfast.evaluate.detector import PKL_URL

    monkeypatch.setenv("SIDFAST_CACHE", str(tmp_path))
    code, _, err = run_main(_fill(["eval", "{ckpt}", "--ref", "{ref8}", "--device", "cpu"], files), capsys)
    assert code == 2 and err.count("\n") == 1 and "Traceback" not in err, err
    assert "--inception" in err and str(tmp_path) in err and PKL_URL in err and "never downloads" in err


def _tree(folder) -> list:
    return sorted(str(p) for p in Path(folder).rglob("*"))


@pytest.mark.parametrize("argv,expected", [pytest.param(a, e, id=i) for i, a, e in MISTAKES])
def test_user_mistake_gives_one_line_naming_the_option(argv, expected, files, capsys, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)  # where the default --run-dir (runs/sid) would go
    before = _tree(files["root"])
    code, _, err = run_main(_fill(argv, files), capsys)
    # a command that did not start leaves nothing behind (no run folder for a teacher that does not load)
    assert _tree(files["root"]) == before and _tree(tmp_path) == []
    assert code == 2, err
    assert "Traceback" not in err
    lines = err.rstrip("\n").split("\n")
    assert len(lines) == 1, err
    assert lines[0].startswith("sidfast"), err
    assert ": error: " in lines[0], err
    for part in expected:
        assert part.format(**files) in lines[0], err


def test_the_list_is_long_enough():
    assert len(MISTAKES) >= 40
    assert len({i for i, _, _ in MISTAKES}) == len(MISTAKES)


def _subprocess(argv, files, prelude=""):
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env["PYTHONPATH"] = os.pathsep.join([TESTS, env.get("PYTHONPATH", "")])
    code = prelude + "from sidfast.cli import console_main; import sys; sys.argv = ['sidfast'] + %r; console_main()"
    return subprocess.run([sys.executable, "-c", code % (_fill(argv, files),)], capture_output=True, text=True,
                          env=env, timeout=300)


@pytest.mark.parametrize("argv,expected", [
    pytest.param(["distill", *TINY, "--lr", "-1e-4"], "--lr", id="negative-lr"),
    pytest.param(["distill", *TINY, "--run-dir", "{blocker}/run"], "--run-dir", id="run-dir-under-a-file"),
    pytest.param(["sample", "{ckpt}", "--out", "/proc/sidfast-grid.png"], "--out", id="out-under-proc"),
])
def test_user_mistakes_in_a_process_of_their_own(argv, expected, files):
    done = _subprocess(argv, files)
    assert done.returncode == 2, done.stderr
    assert len(done.stderr.strip().splitlines()) == 1, done.stderr
    assert expected in done.stderr and "Traceback" not in done.stderr


NO_EXTENSION = "import sys; sys.modules['sidfast._C'] = None\n"  # import sidfast._C fails, as when it is missing


def test_help_works_without_the_native_extension(files):
    done = _subprocess(["--help"], files, NO_EXTENSION)
    assert done.returncode == 0, done.stderr
    assert "distill" in done.stdout and done.stderr == ""


def test_a_command_that_needs_the_native_extension_says_how_to_rebuild_it(files, tmp_path):
    done = _subprocess(["distill", *TINY, "--run-dir", str(tmp_path / "run")], files, NO_EXTENSION)
    assert done.returncode == 2, done.stderr
    lines = done.stderr.strip().splitlines()
    assert len(lines) == 1, done.stderr
    assert "pip install --no-build-isolation -e ." in lines[0] and "Traceback" not in done.stderr


def test_an_internal_error_still_shows_its_traceback(files, monkeypatch, capsys):
    from sidfast import cli

    def broken(*args, **kwargs):
        raise RuntimeError("an internal bug")

    monkeypatch.setattr(cli, "plan_memory", broken)
    with pytest.raises(RuntimeError, match="an internal bug"):
        cli.main(["plan", "--teacher", "nets:tiny_teacher"])
