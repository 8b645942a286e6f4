"""``sidfast eval`` end to end on tiny runs with the stand-in detector (tests/tiny_inception.py) in both
of NVIDIA's file forms: its metrics equal the published pipeline's (tests/published.py: EDM's per-seed latents and
labels, the uint8 pixels EDM saves, EDM's statistics and FID, torch-fidelity's KID, SiD's precision/recall),
``--make-ref`` reads a folder and an npz alike, the feature API, and 1 process vs 2 gloo processes."""
import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from detectors import save_nvidia_pickle, save_torchscript
from nets import SHAPE, tiny_teacher
from published import (published_fid, published_inception_stats, published_kid, published_latents_and_labels,
                       published_precision_recall, published_uint8)
from runs import real_images
from sidfast import cli
from sidfast.evaluate.detector import load_detector
from sidfast.evaluate.features import collect_features
from sidfast.evaluate.statistics import read_reference, stats_of
from sidfast.models.io import save_network
from sidfast.samplers import one_step_sample
from sidfast.training import student
from utils import run_main

TESTS = Path(__file__).resolve().parents[1]
FAST = ["--iterations", "2", "--batch", "4", "--grid-size", "0", "--teacher-steps", "0", "--no-progress",
        "--device", "cpu", "--checkpoint-every", "0"]


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    """Two finished tiny runs (unconditional, 10-class), the stand-in detector as .pt and .pkl, 40 real images
    as an npz and as a folder of PNGs, and the reference --make-ref writes from the npz."""
    root = tmp_path_factory.mktemp("eval")
    teacher = root / "teacher.pt"
    save_network(teacher, tiny_teacher(), "nets:build_tiny", {"image_shape": list(SHAPE), "hidden": 32})
    assert cli.main(["distill", "--teacher", str(teacher), "--run-dir", str(root / "run"), *FAST]) == 0
    assert cli.main(["distill", "--teacher", "nets:conditional_teacher", "--run-dir", str(root / "cond"),
                     *FAST]) == 0
    files = {"root": root, "run": root / "run", "cond": root / "cond", "pt": save_torchscript(root / "det.pt"),
             "pkl": save_nvidia_pickle(root / "det.pkl"), "npz": Path(real_images(root / "real.npz", count=40))}
    folder = root / "real"
    folder.mkdir()
    with np.load(files["npz"]) as z:
        files["pixels"] = z["images"]  # uint8 (N, H, W, 1)
    for i, image in enumerate(files["pixels"]):
        Image.fromarray(image[:, :, 0], "L").save(folder / f"{i:05d}.png")
    files["folder"] = folder
    files["ref"] = root / "ref.npz"
    assert cli.main(["eval", "--make-ref", str(files["npz"]), "--out", str(files["ref"]), "--inception",
                     str(files["pt"]), "--device", "cpu"]) == 0
    return files


def _eval(args, capsys):
    code, out, err = run_main(["eval", *args, "--device", "cpu"], capsys)
    assert code == 0, err
    return json.loads(out.strip().splitlines()[-1]), err


def test_make_ref_reads_a_folder_and_an_npz_alike_and_keeps_edms_statistics(setup, capsys):
    code, _, err = run_main(["eval", "--make-ref", setup["folder"], "--out", setup["root"] / "ref-folder.npz",
                             "--inception", setup["pkl"], "--device", "cpu"], capsys)
    assert code == 0, err
    a, b = read_reference(setup["ref"]), read_reference(setup["root"] / "ref-folder.npz")
    assert np.array_equal(a.mu, b.mu) and np.array_equal(a.sigma, b.sigma) and np.array_equal(a.features, b.features)
    assert a.count == 40 and a.image_shape == SHAPE and a.features.shape == (40, 8)
    # EDM's fid.py ref: the stored uint8 images, grey repeated to RGB, features summed batch by batch
    detector = load_detector(setup["pt"])
    images = torch.from_numpy(setup["pixels"]).permute(0, 3, 1, 2).repeat(1, 3, 1, 1)
    features = [detector(batch).numpy() for batch in images.split(64)]
    mu, sigma = published_inception_stats(features)
    np.testing.assert_allclose(a.mu, mu, rtol=1e-12, atol=0)
    np.testing.assert_allclose(a.sigma, sigma, rtol=1e-10, atol=1e-14)
    assert np.array_equal(a.features, np.concatenate(features))


def _published_metrics(setup, run, num, ref):
    """The published pipeline on the same checkpoint and seeds: EDM's latents and labels per seed, the
    generator's one step, EDM's uint8 pixels, the detector, EDM's statistics and FID, torch-fidelity's KID and
    SiD's precision/recall against the reference's features."""
    net, options = student.from_checkpoint(run)
    latents, labels = published_latents_and_labels(range(num), options["shape"], options["num_classes"])
    images = one_step_sample(net, latents, options["sigma_init"], labels)
    detector = load_detector(setup["pt"])
    features = [detector(published_uint8(batch).repeat(1, 3, 1, 1)).numpy() for batch in images.split(10)]
    mu, sigma = published_inception_stats(features)
    gen = np.concatenate(features)
    kid, _ = published_kid(gen.astype(np.float64), ref.features.astype(np.float64), 100, min(num, 40))
    precision, recall = published_precision_recall(ref.features, gen, 3)
    return {"fid": published_fid(mu, sigma, ref.mu, ref.sigma), "kid": kid, "precision": precision,
            "recall": recall}


@pytest.mark.parametrize("which", ["run", "cond"])
def test_eval_gives_the_published_pipelines_metrics(setup, which, capsys):
    out = setup["root"] / f"metrics-{which}.json"
    result, _ = _eval([setup[which], "--ref", setup["ref"], "--num", "24", "--batch", "10", "--inception",
                       setup["pt"], "--out", out], capsys)
    assert json.loads(out.read_text()) == result  # the JSON file holds the printed line
    want = _published_metrics(setup, setup[which], 24, read_reference(setup["ref"]))
    assert abs(result["fid"] - want["fid"]) < 1e-3 and abs(result["fid"] - want["fid"]) <= 1e-9 * want["fid"]
    assert abs(result["kid"] - want["kid"]) <= 1e-9 * abs(want["kid"]) + 1e-15
    assert abs(result["precision"] - want["precision"]) <= 1 / 24
    assert abs(result["recall"] - want["recall"]) <= 1 / 40
    assert result["num"] == 24 and result["seeds"] == "0-23" and result["kid_subset_size"] == 24
    assert result["checkpoint"] == str(setup[which]) and result["ref"] == str(setup["ref"])
    assert result["feature_dim"] == 8 and result["processes"] == 1
    # NVIDIA's pickle form of the same network: the same numbers
    again, _ = _eval([setup[which], "--ref", setup["ref"], "--num", "24", "--batch", "10", "--inception",
                      setup["pkl"]], capsys)
    for key in ("fid", "kid", "kid_std", "precision", "recall"):
        assert again[key] == result[key], key


def test_an_edm_reference_gives_fid_and_says_why_kid_and_pr_are_left_out(setup, capsys):
    ref = read_reference(setup["ref"])
    np.savez(setup["root"] / "edm.npz", mu=ref.mu, sigma=ref.sigma)
    result, err = _eval([setup["run"], "--ref", setup["root"] / "edm.npz", "--num", "24", "--inception",
                         setup["pt"], "--seeds", "100-123"], capsys)
    full, _ = _eval([setup["run"], "--ref", setup["ref"], "--num", "24", "--inception", setup["pt"], "--seeds",
                     "100-123"], capsys)
    assert result["fid"] == full["fid"] and "kid" not in result and "precision" not in result
    assert "only mu and sigma" in result["skipped"] and "skipped kid and precision/recall" in err


def test_the_feature_api_takes_a_callable_of_batches(setup):
    detector = load_detector(setup["pkl"])
    pixels = torch.randint(0, 256, (30, 3, 5, 5), dtype=torch.uint8, generator=torch.Generator().manual_seed(3))
    calls = []

    def make_images(start, n):  # what a training loop passes: images start .. start + n - 1, here uint8
        calls.append((start, n))
        return pixels[start:start + n]

    features = collect_features(make_images, 30, detector, batch=8)
    assert calls == [(0, 8), (8, 8), (16, 8), (24, 6)]
    assert torch.equal(features, detector(pixels))
    floats = collect_features(lambda s, n: pixels[s:s + n].float() / 127.5 - 1, 30, detector, batch=8)
    assert torch.equal(floats, features)  # images in [-1, 1] are the same pixels
    stats = stats_of(features)
    assert stats.count == 30 and stats.features.shape == (30, 8)


def _torchrun(args, nproc, timeout=240):
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env["PYTHONPATH"] = os.pathsep.join([str(TESTS), env.get("PYTHONPATH", "")])
    env["OMP_NUM_THREADS"] = "1"
    # "--": torchrun's own --numa-binding would take sidfast's --num for an abbreviation of it
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", str(nproc),
               "-m", "sidfast.cli", "--", "eval", *map(str, args), "--device", "cpu"]
    launch = subprocess.Popen(command, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                              start_new_session=True)
    try:
        out, err = launch.communicate(timeout=timeout)
    finally:  # a hung rank must not outlive the test
        if launch.poll() is None:
            os.killpg(launch.pid, signal.SIGKILL)
            launch.communicate()
    assert launch.returncode == 0, err[-3000:]
    return out


@pytest.mark.slow
def test_one_process_and_two_gloo_processes_give_the_same_statistics(setup):
    root = setup["root"]
    for nproc in (1, 2):  # 40 images in batches of 16: the second process gets one batch of three, padded
        _torchrun(["--make-ref", setup["folder"], "--out", root / f"ref-{nproc}.npz", "--inception", setup["pkl"],
                   "--batch", "16"], nproc)
        out = _torchrun([setup["cond"], "--ref", root / "ref-1.npz", "--num", "40", "--batch", "16", "--inception",
                         setup["pkl"], "--out", root / f"m-{nproc}.json"], nproc)
        assert len(out.strip().splitlines()) == 1  # rank 0 prints, the others do not
    one, two = read_reference(root / "ref-1.npz"), read_reference(root / "ref-2.npz")
    assert np.array_equal(one.mu, two.mu) and np.array_equal(one.sigma, two.sigma)
    assert np.array_equal(one.features, two.features)
    m1, m2 = (json.loads((root / f"m-{n}.json").read_text()) for n in (1, 2))
    assert m2["processes"] == 2 and m2["num"] == m1["num"] == 40
    for key in ("fid", "kid", "kid_std", "precision", "recall"):
        assert m1[key] == m2[key], key


def test_a_few_step_student_and_a_teacher_checkpoint_are_evaluated_as_sidfast_sample_samples_them(setup, capsys):
    from sidfast.evaluate.generation import StudentImages, seeded
    from sidfast.samplers import edm_sample

    root = setup["root"]
    assert cli.main(["distill", "--teacher", str(root / "teacher.pt"), "--run-dir", str(root / "k2"),
                     "--gen-steps", "2", *FAST]) == 0
    result, _ = _eval([root / "k2", "--ref", setup["ref"], "--num", "20", "--inception", setup["pt"]], capsys)
    assert result["fid"] > 0 and result["num"] == 20
    # the images of seeds 0-3: the K = 2 steps of the run on per-seed latents; the fresh noise of a batch
    # comes from its first seed, so a batch's images are the same whichever process makes them
    net, options = student.from_checkpoint(root / "k2")
    images = StudentImages(net, options, range(20), "cpu")
    assert options["gen_steps"] == 2 and torch.equal(images(0, 4), images(0, 4))
    assert not torch.equal(images(0, 4), StudentImages(net, {**options, "gen_steps": 1}, range(20), "cpu")(0, 4))
    # a teacher checkpoint: EDM's Heun sampler in --steps steps on the same per-seed latents
    teacher_result, _ = _eval([root / "teacher.pt", "--ref", setup["ref"], "--num", "20", "--steps", "3",
                               "--inception", setup["pt"]], capsys)
    net, options = student.from_checkpoint(root / "teacher.pt")
    z, _ = seeded(range(4), options["shape"])
    torch.testing.assert_close(StudentImages(net, options, range(20), "cpu", steps=3)(0, 4),
                               edm_sample(net, z, 3), rtol=0, atol=0)
    assert teacher_result["fid"] > 0 and teacher_result["fid"] != result["fid"]


@pytest.mark.slow
def test_a_text_student_is_evaluated_on_its_prompts_through_the_vae(tmp_path, capsys):
    """The student of a tiny Stable Diffusion pipeline (tests/models/test_text.py builds it): --prompts gives
    image i prompt i mod their number, the pipeline's VAE decodes the latents, and the detector sees RGB."""
    import importlib.util

    pytest.importorskip("diffusers")
    pytest.importorskip("transformers")
    spec = importlib.util.spec_from_file_location("text_pipelines", TESTS / "models" / "test_text.py")
    pipelines = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(pipelines)  # its pipeline builders, not its tests
    from sidfast.evaluate.generation import StudentImages, seeded

    pipe_dir = tmp_path / "sd"
    pipelines.save_sd_pipeline(pipe_dir)
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("a red cat\na dog\n")
    run = tmp_path / "run"
    code, _, err = run_main(["distill", "--teacher", pipe_dir, "--prompts", prompts, "--run-dir", run,
                             "--iterations", "1", "--batch", "2", "--grid-size", "0", "--teacher-steps", "0",
                             "--no-progress", "--device", "cpu"], capsys)
    assert code == 0, err
    pixels = np.random.RandomState(0).randint(0, 256, (20, 8, 8, 3)).astype(np.uint8)
    np.savez(tmp_path / "real.npz", images=pixels)
    det = save_torchscript(tmp_path / "det.pt")
    assert cli.main(["eval", "--make-ref", str(tmp_path / "real.npz"), "--out", str(tmp_path / "ref.npz"),
                     "--inception", str(det), "--device", "cpu"]) == 0
    capsys.readouterr()
    result, _ = _eval([run, "--ref", tmp_path / "ref.npz", "--num", "12", "--batch", "5", "--prompts", prompts,
                       "--inception", det], capsys)
    assert result["fid"] > 0 and result["num"] == 12
    net, options = student.from_checkpoint(run, prompts=str(prompts))
    images = StudentImages(net, options, range(12), "cpu")(0, 3)
    z, _ = seeded(range(3), options["shape"])
    cond = options["cond"](0, 3)  # prompts 0, 1, 0
    want = options["decode"](one_step_sample(net, z, options["sigma_init"], cond=cond))
    assert images.shape == (3, 3, 8, 8) and torch.equal(images, want)
    code, _, err = run_main(["eval", run, "--ref", tmp_path / "ref.npz", "--num", "12", "--inception", det,
                             "--device", "cpu"], capsys)
    last = err.strip().splitlines()[-1]  # (transformers draws its loading bar on stderr before it)
    assert code == 2 and last.startswith("sidfast eval: error:") and "--prompts FILE" in last, err


def test_a_sharded_run_is_evaluated_from_its_folder_its_dcp_and_its_generator_file(tmp_path, capsys):
    """An --fsdp run (one process: a group of one) leaves checkpoint.dcp and generator.pt; sidfast eval of the run
    folder, the .dcp and the generator file gives the same metrics."""
    from runs import quiet
    from sidfast.training.loop import distill

    run = tmp_path / "run"
    distill(quiet(run_dir=str(run), fsdp=True, iterations=2, teacher="nets:tiny_teacher"), tiny_teacher(), log=None)
    assert (run / "checkpoint.dcp").is_dir() and not (run / "checkpoint.pt").exists()
    det = save_torchscript(tmp_path / "det.pt")
    pixels = np.random.RandomState(0).randint(0, 256, (40, 4, 4, 1)).astype(np.uint8)
    np.savez(tmp_path / "real.npz", images=pixels)
    assert cli.main(["eval", "--make-ref", str(tmp_path / "real.npz"), "--out", str(tmp_path / "ref.npz"),
                     "--inception", str(det), "--device", "cpu"]) == 0
    got = []
    for source in (run, run / "checkpoint.dcp", run / "generator.pt"):
        out = tmp_path / "m.json"
        assert cli.main(["eval", str(source), "--ref", str(tmp_path / "ref.npz"), "--inception", str(det), "--num",
                         "20", "--device", "cpu", "--out", str(out)]) == 0
        got.append(json.loads(out.read_text()))
    capsys.readouterr()
    assert got[0]["fid"] == got[1]["fid"] == got[2]["fid"] and got[0]["kid"] == got[2]["kid"]
