"""The ``sidfast`` command: distill from every teacher source, sample, resume, signals, and user errors.

User errors must exit with status 2 and one ``sidfast <command>: error: ...`` line, without a traceback.
"""
import json
import os
import re
import signal
import subprocess
import sys
import time

import pytest
import torch

from sidfast import cli
from sidfast.models.io import load_checkpoint
from utils import run_main, tiny_diffusers_unet, user_error

TESTS = os.path.dirname(__file__)
SMALL = ["--iterations", "2", "--batch", "4", "--log-every", "1", "--grid-size", "4", "--teacher-steps", "2",
         "--no-progress", "--device", "cpu"]


def env_without_interpreter():
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env["PYTHONPATH"] = os.pathsep.join([TESTS, env.get("PYTHONPATH", "")])
    return env


# ---------------- teacher sources ----------------

def test_distill_from_an_entry_point_then_sample(tmp_path, capsys):
    run = tmp_path / "run"
    code, out, err = run_main(["distill", "--teacher", "nets:tiny_teacher", "--run-dir", run, *SMALL], capsys)
    assert code == 0, err
    assert "SiD distillation" in out
    data = load_checkpoint(run / "checkpoint.pt", "distill")
    assert data["iteration"] == 2 and data["teacher"] == "nets:tiny_teacher"
    code, out, err = run_main(["sample", run / "checkpoint.pt", "--out", tmp_path / "g.png", "--num", "5"], capsys)
    assert code == 0, err
    assert (tmp_path / "g.png").is_file()
    code, _, err = run_main(["sample", run / "checkpoint.pt", "--out", tmp_path / "imgs", "--num", "3",
                             "--batch", "2"], capsys)
    assert code == 0, err
    assert sorted(p.name for p in (tmp_path / "imgs").iterdir()) == ["000000.png", "000001.png", "000002.png"]


def test_sample_out_is_decided_by_its_suffix(tmp_path, capsys):
    run = tmp_path / "run"
    assert run_main(["distill", "--teacher", "nets:tiny_teacher", "--run-dir", run, *SMALL], capsys)[0] == 0
    ckpt = run / "checkpoint.pt"
    for name in ("a.jpg", "b.JPEG", "c.png"):
        code, _, err = run_main(["sample", ckpt, "--out", tmp_path / name, "--num", "3"], capsys)
        assert code == 0, err
        assert (tmp_path / name).is_file()  # one grid image, not a directory
    assert (tmp_path / "a.jpg").read_bytes()[:3] == b"\xff\xd8\xff"  # JPEG
    assert (tmp_path / "c.png").read_bytes()[:4] == b"\x89PNG"
    user_error(["sample", ckpt, "--out", tmp_path / "a.txt"], capsys, "--out")
    assert not (tmp_path / "a.txt").exists()
    (tmp_path / "dir.png").mkdir()
    user_error(["sample", ckpt, "--out", tmp_path / "dir.png"], capsys, "is a directory")


def test_sample_reproduces_the_ema_generator(tmp_path, capsys):
    """sample rebuilds the generator from the checkpoint and draws x = G_ema(sigma_init z, sigma_init)."""
    from sidfast.utils.images import to_uint8
    from sidfast.samplers import one_step_sample
    from nets import tiny_teacher

    run = tmp_path / "run"
    assert run_main(["distill", "--teacher", "nets:tiny_teacher", "--run-dir", run, *SMALL], capsys)[0] == 0
    assert run_main(["sample", run / "checkpoint.pt", "--out", tmp_path / "s", "--num", "2", "--seed", "3"],
                    capsys)[0] == 0
    data = load_checkpoint(run / "checkpoint.pt", "distill")
    net = tiny_teacher()
    net.load_state_dict({k.removeprefix("net."): v for k, v in data["generator_ema"].items()})
    z = torch.randn((2, 1, 4, 4), generator=torch.Generator().manual_seed(3))
    want = to_uint8(one_step_sample(net.eval(), z, 2.5))  # (2, 4, 4, 1) uint8
    from matplotlib import image as mpimg

    for i in range(2):
        got = mpimg.imread(tmp_path / "s" / f"{i:06d}.png")
        got = got[..., 0] if got.ndim == 3 else got
        diff = (torch.from_numpy(got * 255).round() - torch.from_numpy(want[i, ..., 0]).float()).abs().max()
        assert diff <= 1, diff
    assert want.std() > 0


def test_train_teacher_then_distill_then_sample(tmp_path, capsys):
    teacher = tmp_path / "teacher.pt"
    code, out, err = run_main(["train-teacher", "--out", teacher, "--iterations", "3", "--batch", "16", "--width",
                               "16", "--depth", "1", "--dropout", "0.1", "--conditional", "--device", "cpu"], capsys)
    assert code == 0, err
    assert "wrote" in out
    meta = load_checkpoint(teacher, "network")
    assert meta["builder"] == "sidfast.demo.nets:build_denoiser" and meta["config"]["num_classes"] == 10
    run = tmp_path / "run"
    code, _, err = run_main(["distill", "--teacher", teacher, "--run-dir", run, *SMALL], capsys)
    assert code == 0, err
    data = load_checkpoint(run / "checkpoint.pt", "distill")
    assert data["num_classes"] == 10 and data["architecture"]["builder"] == "sidfast.demo.nets:build_denoiser"
    # a distillation checkpoint samples in one step; a teacher checkpoint with the Heun sampler
    assert run_main(["sample", run / "checkpoint.pt", "--out", tmp_path / "s.png", "--num", "4",
                     "--class-label", "7"], capsys)[0] == 0
    assert run_main(["sample", teacher, "--out", tmp_path / "t.png", "--num", "4", "--steps", "2"], capsys)[0] == 0
    user_error(["sample", teacher, "--out", tmp_path / "t.png", "--class-label", "10"], capsys, "--class-label")
    user_error(["sample", teacher, "--out", tmp_path / "t.png", "--teacher", teacher], capsys, "--teacher")
    user_error(["sample", run / "checkpoint.pt", "--out", tmp_path / "t.png", "--teacher", teacher], capsys,
               "needs no --teacher")


def _tiny_diffusers_dir(path, scheduler="ddpm"):
    diffusers = pytest.importorskip("diffusers")
    unet = tiny_diffusers_unet()
    if scheduler == "ddpm":
        sched = diffusers.DDPMScheduler(num_train_timesteps=1000, prediction_type="v_prediction")
        diffusers.DDPMPipeline(unet=unet, scheduler=sched).save_pretrained(path)
    else:
        unet.save_pretrained(path)
        if scheduler == "flow":
            diffusers.FlowMatchEulerDiscreteScheduler().save_config(path)
    return path


def test_distill_a_tiny_random_diffusers_model(tmp_path, capsys):
    teacher = _tiny_diffusers_dir(tmp_path / "ddpm")
    run = tmp_path / "run"
    code, out, err = run_main(["distill", "--teacher", teacher, "--run-dir", run, *SMALL], capsys)
    assert code == 0, err
    data = load_checkpoint(run / "checkpoint.pt", "distill")
    assert data["image_shape"] == [3, 8, 8] and data["architecture"] is None
    assert torch.isfinite(torch.tensor(data["last"]["loss_g"]))
    assert any(not torch.equal(data["generator"][k], data["fake"][k]) for k in data["generator"])
    assert run_main(["sample", run / "checkpoint.pt", "--out", tmp_path / "s.png", "--num", "4"], capsys)[0] == 0
    assert (run / "teacher.png").is_file() and (run / "student.png").is_file()


def test_sample_finds_a_moved_teacher_with_the_teacher_option(tmp_path, capsys, monkeypatch):
    """A checkpoint without an architecture rebuilds its generator from the teacher path it stored."""
    monkeypatch.chdir(tmp_path)
    _tiny_diffusers_dir(tmp_path / "tiny_flat")
    assert run_main(["distill", "--teacher", "tiny_flat", "--run-dir", "run", *SMALL], capsys)[0] == 0
    (tmp_path / "tiny_flat").rename(tmp_path / "moved")
    sample = ["sample", "run/checkpoint.pt", "--out", "s.png", "--num", "2"]
    err = user_error(sample, capsys, "does not exist")
    assert "--teacher" in err and "teacher=" not in err.replace("--teacher", "")
    code, _, err = run_main([*sample, "--teacher", "moved"], capsys)
    assert code == 0, err
    assert (tmp_path / "s.png").is_file()


def test_guidance_without_a_null_class_names_the_option(tmp_path, capsys):
    diffusers = pytest.importorskip("diffusers")
    path = tmp_path / "classes"
    sched = diffusers.DDPMScheduler(num_train_timesteps=1000)
    diffusers.DDPMPipeline(unet=tiny_diffusers_unet(num_class_embeds=3), scheduler=sched).save_pretrained(path)
    err = user_error(["distill", "--teacher", path, "--run-dir", tmp_path / "run", "--guidance", "lsg", "--cfg",
                      "2", *SMALL], capsys, "pass --null-class")
    assert "null_class=" not in err


def test_loading_a_diffusers_teacher_prints_no_accelerate_notice(tmp_path):
    teacher = _tiny_diffusers_dir(tmp_path / "ddpm")
    code = f"from sidfast.models.loading import load_teacher; load_teacher({str(teacher)!r})"
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300,
                          env=env_without_interpreter())
    assert done.returncode == 0, done.stderr
    assert "accelerate" not in done.stderr, done.stderr


def test_resume_with_the_run_folder_continues_its_checkpoint(tmp_path, capsys):
    run = tmp_path / "runs" / "intr"
    args = ["distill", "--teacher", "nets:tiny_teacher", "--run-dir", run, "--iterations", "2", "--no-progress",
            "--grid-size", "0"]
    assert run_main(args, capsys)[0] == 0
    for extra in (["--run-dir", run], []):  # with or without --run-dir: the folder is the run's
        code, _, err = run_main(["distill", "--resume", run, *extra, "--iterations", str(4 - len(extra) // 2)],
                                capsys)
        assert code == 0, err
        assert "--overwrite" not in err
    assert load_checkpoint(run / "checkpoint.pt", "distill")["iteration"] == 4


def test_version(capsys):
    from sidfast import __version__

    code, out, _ = run_main(["--version"], capsys)
    assert code == 0 and out.strip() == f"sidfast {__version__}"


def test_diffusers_teacher_errors(tmp_path, capsys):
    err = user_error(["distill", "--teacher", _tiny_diffusers_dir(tmp_path / "bare", scheduler=None), *SMALL],
                     capsys, "no scheduler config")
    looked_for = re.findall(r"'([^']*scheduler_config\.json)'", err)
    assert len(looked_for) == len(set(looked_for)) >= 2, err  # each path once
    assert "schedule=" not in err and "prediction=" not in err and "save_pretrained" in err  # CLI words
    user_error(["distill", "--teacher", _tiny_diffusers_dir(tmp_path / "flow", scheduler="flow"), *SMALL], capsys,
               "cannot determine a VP schedule")
    (tmp_path / "empty").mkdir()
    user_error(["distill", "--teacher", tmp_path / "empty", *SMALL], capsys, "no model config")


# ---------------- options, config files, resume ----------------

def test_help_lists_every_option_with_its_default(capsys):
    from sidfast.training.loop import TrainConfig

    with pytest.raises(SystemExit) as exc:
        cli.main(["distill", "--help"])
    assert exc.value.code == 0
    text = " ".join(capsys.readouterr().out.split())
    for f in TrainConfig.fields():
        if f.name not in ("teacher", "resume"):
            assert "--" + f.name.replace("_", "-") in text, f.name
    assert "(default: 800)" in text and "(default: 0.0 0.999)" in text
    assert "(default: the recipe's: edm 1e-5" in text  # options the teacher family decides say so


def test_help_shows_one_default_per_option_and_the_choices(capsys):
    from sidfast.training.loop import TrainConfig

    with pytest.raises(SystemExit):
        cli.main(["distill", "--help"])
    out = capsys.readouterr().out
    entries = re.split(r"\n  (?=-)", out.split("SiD options", 1)[1])
    assert len(entries) > 30
    for entry in entries:
        assert " ".join(entry.split()).count("(default:") <= 1, entry
    with_choices = [f for f in TrainConfig.fields() if f.metadata.get("choices")]
    assert len(with_choices) >= 4
    for f in with_choices:
        assert f"--{f.name.replace('_', '-')} {{{','.join(f.metadata['choices'])}}}" in out, f.name


def test_config_file_and_command_line_precedence(tmp_path, capsys):
    cfg = tmp_path / "c.yaml"
    cfg.write_text(f"run_dir: {tmp_path / 'run'}\nbatch: 6\nalpha: 1.0\niterations: 5\n")
    code, _, err = run_main(["distill", "--teacher", "nets:tiny_teacher", "--config", cfg, "--iterations", "1",
                             "--no-progress", "--grid-size", "0"], capsys)
    assert code == 0, err
    saved = load_checkpoint(tmp_path / "run" / "checkpoint.pt", "distill")["config"]
    assert (saved["batch"], saved["alpha"], saved["iterations"]) == (6, 1.0, 1)


def test_resume_takes_the_checkpoint_options(tmp_path, capsys):
    run = tmp_path / "run"
    args = ["distill", "--teacher", "nets:tiny_teacher", "--run-dir", run, "--batch", "6", "--lr", "1e-3",
            "--iterations", "2", "--no-progress", "--grid-size", "0"]
    assert run_main(args, capsys)[0] == 0
    code, _, err = run_main(["distill", "--resume", "--run-dir", run, "--iterations", "3"], capsys)
    assert code == 0, err
    data = load_checkpoint(run / "checkpoint.pt", "distill")
    assert data["iteration"] == 3 and data["nimg"] == 18 and data["config"]["lr"] == 1e-3
    code, _, err = run_main(["distill", "--resume", run / "checkpoint.pt", "--iterations", "4"], capsys)
    assert code == 0, err
    assert load_checkpoint(run / "checkpoint.pt", "distill")["iteration"] == 4
    # without --resume an existing run is not overwritten; the error speaks command-line options
    err = user_error(args, capsys, "already holds checkpoint.pt")
    assert "--resume" in err and "--overwrite" in err and "resume=" not in err and "overwrite=" not in err


@pytest.mark.parametrize("extra, match", [
    (["--tmax", "2000"], "option --tmax must be <= 1000"),
    (["--lr", "-1"], "option --lr must be > 0"),
    (["--lr-cooldown", "2"], "option --lr-cooldown must be <= 1"),
    (["--batch", "many"], "option --batch must be an integer"),
    (["--precision", "fp8"], "option --precision must be one of"),
    (["--betas", "0.9", "1.5"], "option --betas must be two numbers in [0, 1)"),
])
def test_options_out_of_range(tmp_path, capsys, extra, match):
    user_error(["distill", "--teacher", "nets:tiny_teacher", "--run-dir", tmp_path / "r", *extra], capsys, match)


def test_user_errors(tmp_path, capsys):
    user_error(["distill", "--run-dir", tmp_path / "r"], capsys, "--teacher is required")
    user_error(["distill", "--teacher", tmp_path / "missing.pt"], capsys, "does not exist")
    user_error(["distill", "--teacher", "no_such_module_xyz:make"], capsys, "cannot import module")
    user_error(["distill", "--teacher", "nets:no_such_function"], capsys, "has no attribute")
    user_error(["distill", "--teacher", "nets:tiny_teacher", "--config", tmp_path / "c.yaml"], capsys,
               "does not exist")
    bad = tmp_path / "bad.json"
    bad.write_text('{"lrr": 1}')
    user_error(["distill", "--teacher", "nets:tiny_teacher", "--config", bad], capsys, "unknown option 'lrr'")
    user_error(["distill", "--resume", "--run-dir", tmp_path / "nothing"], capsys, "--resume: checkpoint")
    junk = tmp_path / "junk.pt"
    junk.write_bytes(b"not a checkpoint")
    user_error(["distill", "--teacher", junk], capsys, "is not a torch checkpoint")
    user_error(["sample", junk, "--out", tmp_path / "x.png"], capsys, "is not a torch checkpoint")
    user_error(["sample", tmp_path / "none.pt", "--out", tmp_path / "x.png"], capsys, "does not exist")
    user_error(["train-teacher", "--out", tmp_path, "--iterations", "1"], capsys, "is a directory")
    user_error(["train-teacher", "--out", tmp_path / "t.pt", "--iterations", "0"], capsys, "--iterations must be")
    if os.geteuid() != 0:
        locked = tmp_path / "locked.pt"
        locked.write_bytes(b"x")
        locked.chmod(0)
        user_error(["distill", "--teacher", locked], capsys, "not readable")


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the error when no GPU is present")
def test_cuda_without_a_gpu_is_a_clear_error(tmp_path, capsys):
    for cmd in (["distill", "--teacher", "nets:tiny_teacher", "--run-dir", tmp_path / "r"],
                ["demo", "--quick"], ["train-teacher", "--out", tmp_path / "t.pt"]):
        user_error([*cmd, "--device", "cuda"], capsys, "no CUDA GPU is available")


def test_demo_delegates_to_the_demo_package(tmp_path, capsys, monkeypatch):
    import sidfast.demo.run

    seen = {}

    def fake_run_demo(quick, out_dir, device, seed, cache_dir, method, conditional, gen_steps, seeds):
        seen.update(quick=quick, out_dir=out_dir, device=device, seed=seed, cache_dir=cache_dir)
        assert (method, conditional, gen_steps, seeds) == ("sid", False, 1, None)  # the SiD demo by default
        return {"passed": False}

    monkeypatch.setattr(sidfast.demo.run, "run_demo", fake_run_demo)
    code, _, _ = run_main(["demo", "--quick", "--out", tmp_path / "d", "--device", "cpu", "--seed", "3",
                           "--cache-dir", tmp_path / "c"], capsys)
    assert seen == {"quick": True, "out_dir": str(tmp_path / "d"), "device": "cpu", "seed": 3,
                    "cache_dir": str(tmp_path / "c")}
    assert code == 1  # a failed quality bar is a failed command


def test_usage_errors_exit_2(capsys):
    code, _, err = run_main([], capsys)
    assert code == 2 and "COMMAND" in err
    code, _, err = run_main(["distill", "--no-such-flag"], capsys)
    assert code == 2 and "unrecognized arguments" in err


def test_an_unknown_option_names_the_near_option_and_the_commands_help(capsys):
    code, _, err = run_main(["distill", "--batch-size", "8"], capsys)
    assert code == 2
    assert err.count("\n") == 1 and err.startswith("sidfast distill: error:")  # one line, no usage dump
    assert "unrecognized arguments: --batch-size 8" in err and "did you mean --batch?" in err
    assert "sidfast distill --help" in err
    code, _, err = run_main(["sample", "c.pt", "--out", "x.png", "--stepz", "4"], capsys)
    assert code == 2 and err.startswith("sidfast sample: error:") and "did you mean --steps?" in err


def test_demo_output_is_ignored_by_git():
    root = os.path.dirname(TESTS)
    if subprocess.run(["git", "-C", root, "rev-parse"], capture_output=True).returncode != 0:
        pytest.skip("not a git checkout")
    default = cli.build_parser().parse_args(["demo"]).out
    ignored = subprocess.run(["git", "-C", root, "check-ignore", "-q", f"{default}/report.json"])
    assert ignored.returncode == 0, f"{default}/ is not in .gitignore"


# ---------------- signals (a real process) ----------------

def test_sigterm_saves_and_exits_143_then_resumes(tmp_path):
    run = tmp_path / "run"
    cmd = [sys.executable, "-m", "sidfast.cli", "distill", "--teacher", "nets:tiny_teacher", "--run-dir",
           str(run), "--iterations", "1000000", "--batch", "4", "--log-every", "1", "--checkpoint-every", "0",
           "--grid-size", "0", "--no-progress", "--device", "cpu"]
    proc = subprocess.Popen(cmd, env=env_without_interpreter(), stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            text=True)
    try:
        deadline = time.time() + 120
        while not (run / "metrics.jsonl").is_file() or not (run / "metrics.jsonl").read_text().strip():
            assert proc.poll() is None, proc.communicate()
            assert time.time() < deadline, "no progress within 120 s"
            time.sleep(0.2)
        proc.send_signal(signal.SIGTERM)
        out, err = proc.communicate(timeout=120)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode == 143, err
    assert "stopped by SIGTERM" in err and "--resume" in err and "Traceback" not in err
    data = load_checkpoint(run / "checkpoint.pt", "distill")
    stopped = data["iteration"]
    assert stopped >= 1 and data["nimg"] == 4 * stopped
    resumed = subprocess.run([sys.executable, "-m", "sidfast.cli", "distill", "--resume", "--run-dir", str(run),
                              "--iterations", str(stopped + 2)], env=env_without_interpreter(), capture_output=True,
                             text=True, timeout=120)
    assert resumed.returncode == 0, resumed.stderr
    assert load_checkpoint(run / "checkpoint.pt", "distill")["iteration"] == stopped + 2
    summary = json.loads((run / "summary.json").read_text())
    assert summary["iterations"] == stopped + 2 and summary["iterations_this_run"] == 2


# ---------------- guidance, prompts and few-step generators ----------------

def test_guidance_and_few_step_options_map_onto_the_config(tmp_path):
    parser = cli.build_parser()
    args = parser.parse_args(["distill", "--teacher", "t", "--guidance", "lsg", "--cfg", "2",
                              "--cfg-fake-train", "1.5", "--cfg-fake", "-1", "--cfg-teacher", "3",
                              "--gen-steps", "4", "--prompts", str(tmp_path / "p.txt")])
    cfg = cli.config_from_args(args)
    assert (cfg.guidance, cfg.cfg) == ("lsg", 2)
    assert (cfg.cfg_fake_train, cfg.cfg_fake, cfg.cfg_teacher) == (1.5, -1, 3)
    assert cfg.gen_steps == 4 and cfg.prompts == str(tmp_path / "p.txt")
    scales = cfg.guidance_scales()
    assert (scales.k1, scales.k2, scales.k3, scales.k4) == (1.5, -1, -1, 3)


def test_guided_few_step_distill_then_sample_runs_its_steps(tmp_path, capsys, monkeypatch):
    from sidfast.training import student

    run = tmp_path / "run"
    code, _, err = run_main(["distill", "--teacher", "nets:conditional_teacher",
                             "--run-dir", run, "--guidance", "lsg", "--cfg", "2", "--gen-steps", "4", *SMALL],
                            capsys)
    assert code == 0, err
    calls = []
    real = student.from_checkpoint

    def counted(*a, **kw):
        net, options = real(*a, **kw)
        net.register_forward_pre_hook(lambda m, args: calls.append(args[0].shape[0]))
        return net, options

    monkeypatch.setattr(student, "from_checkpoint", counted)
    images = {}
    for steps in (None, 4, 1):
        extra = [] if steps is None else ["--steps", steps]
        calls.clear()
        out = tmp_path / f"s{steps}.png"
        assert run_main(["sample", run / "checkpoint.pt", "--out", out, "--num", "3", *extra], capsys)[0] == 0
        assert calls == [3] * (steps or 4)  # default: the 4 steps the student was trained with
        images[steps] = out.read_bytes()
    assert images[None] == images[4] and images[1] != images[4]


def test_guidance_and_prompt_errors(tmp_path, capsys):
    teacher = ["distill", "--teacher", "nets:tiny_teacher", "--run-dir", tmp_path / "r"]
    user_error([*teacher, "--guidance", "lsg"], capsys, "option --guidance lsg needs its scale: option --cfg")
    user_error([*teacher, "--guidance", "zero", "--cfg", "2"], capsys, "option --cfg is the scale")
    user_error([*teacher, "--guidance", "fancy"], capsys, "option --guidance must be one of")
    user_error([*teacher, "--guidance", "lsg", "--cfg", "2"], capsys,
               "--guidance lsg with --cfg 2 needs a conditional teacher")
    user_error([*teacher, "--gen-steps", "0"], capsys, "option --gen-steps must be >= 1")
    prompts = tmp_path / "p.txt"
    prompts.write_text("a cat\n")
    user_error([*teacher, "--prompts", prompts], capsys, "--prompts is for text-to-image teachers")


# ---------------- sharded runs (--fsdp) ----------------

def test_sample_reads_a_sharded_run_folder_like_its_unsharded_resume(tmp_path, capsys):
    """``sidfast sample RUN`` of an --fsdp run (one process: a process group of one) reads its checkpoint.dcp
    without a process group; the folder, the checkpoint.dcp and the consolidated generator.pt written at the
    end give the same images, and so does the checkpoint.pt of the run resumed without --fsdp."""
    from nets import tiny_teacher

    from runs import quiet
    from sidfast.training import student
    from sidfast.training.loop import Distiller, distill
    from sidfast.utils import runtime

    run = tmp_path / "run"
    distill(quiet(run_dir=str(run), fsdp=True, iterations=3, checkpoint_every=2, teacher="nets:tiny_teacher"),
            tiny_teacher(), log=None)
    assert (run / "checkpoint.dcp").is_dir() and (run / "generator.pt").is_file()
    assert not (run / "checkpoint.pt").exists()
    # the same run resumed without --fsdp: its weights the full way, saved as a checkpoint file
    plain = tmp_path / "plain"
    trainer = Distiller(quiet(run_dir=str(plain), resume=str(run / "checkpoint.dcp"), teacher="nets:tiny_teacher"),
                        tiny_teacher())
    assert trainer.iteration == 3
    trainer.save()
    runtime.shutdown(trainer.dist)
    net, _ = student.from_checkpoint(run)
    want = trainer.generator_ema.state_dict()
    got = net.state_dict()
    assert want.keys() == got.keys() and all(torch.equal(want[k], got[k]) for k in want)
    images = {}
    for name, source in (("folder", run), ("dcp", run / "checkpoint.dcp"), ("generator", run / "generator.pt"),
                         ("plain", plain), ("plain-file", plain / "checkpoint.pt")):
        out = tmp_path / f"{name}.png"
        code, _, err = run_main(["sample", source, "--out", out, "--num", "6", "--seed", "1"], capsys)
        assert code == 0, err
        images[name] = out.read_bytes()
    assert len(set(images.values())) == 1, [k for k in images if images[k] != images["folder"]]
    # the consolidated file is for sampling: resuming from it says where the run's state is
    user_error(["distill", "--resume", run / "generator.pt", "--run-dir", tmp_path / "again",
                "--device", "cpu", "--no-progress"], capsys, "checkpoint.dcp")


def test_sample_of_a_folder_without_a_checkpoint_names_what_it_looked_for(tmp_path, capsys):
    (tmp_path / "run").mkdir()
    err = user_error(["sample", tmp_path / "run", "--out", tmp_path / "x.png"], capsys, "without a checkpoint")
    assert "checkpoint.pt, checkpoint.dcp and generator.pt" in err and err.count("\n") == 1
