"""The embedded demo: data, denoiser, Frechet distance, the cached digit classifier, the quick demo end to
end, and the side-by-side comparisons (report format, bars, conditional teacher, tiny end-to-end runs).

The end-to-end runs take the native CPU route for sidfast's losses: conftest.py sets TRITON_INTERPRET=1 on
CPU-only machines, which would route every loss of the demo's thousands of iterations through Triton's
interpreter (the kernels themselves are tested in tests/test_ops_*.py); `sidfast demo` outside pytest takes
the native route anyway.
"""
import json
import math
import os

import pytest
import torch

from sidfast import cli
from sidfast.demo import classifier as clf_mod
from sidfast.demo import compare, summary
from sidfast.demo import run as run_mod
from sidfast.demo.compare import StudentSpec
from sidfast.demo.digits import IMAGE_SHAPE, load_digits_tensors, split
from sidfast.demo.frechet import frechet_distance_features
from sidfast.demo.nets import DigitsDenoiser, build_denoiser
from sidfast.demo.teacher import TeacherConfig, train_teacher
from utils import requires_cuda


# ---- data ----

def test_digits_scaled_to_minus_one_one():
    x, y = load_digits_tensors()
    assert x.shape == (1797, *IMAGE_SHAPE) and y.shape == (1797,)
    assert float(x.min()) == -1.0 and float(x.max()) == 1.0
    assert sorted(torch.unique(y).tolist()) == list(range(10))
    (tx, ty), (vx, vy) = split(x, y, 0.2, seed=0)
    assert tx.shape[0] + vx.shape[0] == 1797 and vx.shape[0] == 359
    (tx2, _), _ = split(x, y, 0.2, seed=0)
    assert torch.equal(tx, tx2)
    with pytest.raises(ValueError, match="held_out"):
        split(x, y, 1.5)


# ---- the denoiser ----

def test_denoiser_preconditioning_and_interface():
    net = DigitsDenoiser(width=32, depth=1, emb_dim=16)
    x = torch.randn(5, *IMAGE_SHAPE)
    sigma = torch.tensor([0.01, 0.1, 1.0, 10.0, 80.0])
    out = net(x, sigma)
    assert out.shape == x.shape and out.dtype == x.dtype
    # the last layer starts at zero, so D(x; sigma) = c_skip x = sd^2 / (sigma^2 + sd^2) x exactly
    c_skip = 0.25 / (sigma ** 2 + 0.25)
    torch.testing.assert_close(out, c_skip.view(-1, 1, 1, 1) * x)
    torch.testing.assert_close(net(x, 0.5), net(x, torch.full((5,), 0.5)))
    out.sum().backward()


def test_conditional_denoiser_accepts_indices_and_onehot():
    net = DigitsDenoiser(width=32, depth=1, emb_dim=16, num_classes=10)
    torch.nn.init.normal_(net.net.fc_out.weight)
    x, s = torch.randn(4, *IMAGE_SHAPE), torch.ones(4)
    idx = torch.tensor([0, 3, 9, 3])
    torch.testing.assert_close(net(x, s, idx), net(x, s, torch.nn.functional.one_hot(idx, 10).float()))
    assert not torch.allclose(net(x, s, idx), net(x, s, (idx + 1) % 10))
    with pytest.raises(ValueError, match="class_labels"):
        net(x, s)


def test_build_denoiser_from_cli_style_config():
    cfg = {"image_shape": [1, 8, 8], "width": 32, "depth": 2, "num_classes": 0, "dropout": 0.1,
           "sigma_data": 0.5}
    net = build_denoiser(cfg)
    assert net.image_shape == (1, 8, 8) and net.num_classes == 0


def _edm_loss(net, x, seed=0, n=512):
    """EDM's weighted denoising loss per pixel on a fixed batch (fixed sigmas and noise)."""
    from sidfast import reference
    from sidfast.loss import fake_score_loss

    g = torch.Generator().manual_seed(seed)
    x0 = x[torch.randint(0, x.shape[0], (n,), generator=g)]
    sigma = reference.edm_training_sigma(n, generator=g)
    noise = torch.randn(x0.shape, generator=g)
    with torch.no_grad():
        pred = net(x0 + sigma.view(-1, 1, 1, 1) * noise, sigma)
    return float(fake_score_loss(pred, x0, noise, 1.0, sigma, weighting="edm")) / x0[0].numel()


def test_teacher_training_reduces_the_loss_and_is_deterministic():
    x, _ = load_digits_tensors()
    cfg = TeacherConfig(iterations=80, batch=64, lr=2e-3, warmup=10, seed=3)

    def run():
        torch.manual_seed(0)
        net = DigitsDenoiser(width=64, depth=1, emb_dim=16)
        before = _edm_loss(net, x)
        ema, stats = train_teacher(net, x, cfg)
        return before, ema, stats

    (before, ema1, s1), (_, ema2, s2) = run(), run()
    for a, b in zip(ema1.parameters(), ema2.parameters()):
        assert torch.equal(a, b)
    assert s1 == {**s2, "seconds": s1["seconds"]}
    assert not any(p.requires_grad for p in ema1.parameters()) and not ema1.training
    assert s1["images_seen"] == 80 * 64
    after = _edm_loss(ema1, x)
    assert after < 0.8 * before, (before, after)
    with pytest.raises(ValueError, match="iterations"):
        train_teacher(DigitsDenoiser(width=8, depth=1, emb_dim=8), x, TeacherConfig(iterations=0))


# ---- the classifier and its cache ----

@pytest.fixture(scope="module")
def classifier_cache(tmp_path_factory):
    """One trained classifier for the module's tests (a few seconds)."""
    d = tmp_path_factory.mktemp("cache")
    model, accuracy, cached = clf_mod.load_or_train_classifier(d)
    assert not cached
    return d, model, accuracy


def test_classifier_accuracy_on_held_out_digits(classifier_cache):
    _, model, accuracy = classifier_cache
    x, y = load_digits_tensors()
    _, (vx, vy) = split(x, y, clf_mod.RECIPE["held_out"], clf_mod.RECIPE["seed"])
    assert accuracy > 0.9
    assert clf_mod.evaluate_accuracy(model, vx, vy) == pytest.approx(accuracy)
    f = clf_mod.extract_features(model, vx)
    assert f.shape == (vx.shape[0], clf_mod.FEATURE_DIM) and f.dtype == torch.float32


def test_classifier_cache_is_reused(classifier_cache, monkeypatch):
    d, model, accuracy = classifier_cache

    def no_training(*args, **kwargs):
        raise AssertionError("the cached classifier was trained again")

    monkeypatch.setattr(clf_mod, "train_classifier", no_training)  # reused: loaded, not retrained
    again, acc2, cached = clf_mod.load_or_train_classifier(d)
    assert cached and acc2 == accuracy
    for a, b in zip(model.state_dict().values(), again.state_dict().values()):
        assert torch.equal(a, b)


def test_corrupt_or_foreign_cache_is_retrained(classifier_cache, tmp_path):
    d, model, accuracy = classifier_cache
    path = clf_mod._cache_path(d, clf_mod.RECIPE)
    good = path.read_bytes()
    logs = []
    target = tmp_path / path.name
    target.write_bytes(b"not a torch file")
    assert clf_mod._load_cached(target, clf_mod.RECIPE) is None
    target.write_bytes(good[: len(good) // 2])  # truncated, as by a crash mid-write without the atomic rename
    assert clf_mod._load_cached(target, clf_mod.RECIPE) is None
    again, acc, cached = clf_mod.load_or_train_classifier(tmp_path, log=logs.append)
    assert not cached and acc == pytest.approx(accuracy)  # the same seeded recipe trains the same model
    assert clf_mod._load_cached(target, clf_mod.RECIPE) is not None  # rewritten, now valid
    assert any("retraining" in m for m in logs)
    # a file of another recipe under this name is ignored
    torch.save({"recipe_hash": "0" * 16, "state_dict": {}, "accuracy": 1.0}, tmp_path / path.name)
    assert clf_mod._load_cached(tmp_path / path.name, clf_mod.RECIPE) is None


@pytest.mark.parametrize("umask", [0o022, 0o027], ids=["022", "027"])
def test_classifier_cache_file_follows_the_umask(tmp_path, monkeypatch, umask):
    """Like every file sidfast writes: 0666 less the umask, not a temporary file's 0600."""
    untrained = clf_mod.DigitClassifier(clf_mod.RECIPE["channels"], clf_mod.RECIPE["feature_dim"])
    monkeypatch.setattr(clf_mod, "train_classifier", lambda recipe: (untrained, 0.5))
    old = os.umask(umask)
    try:
        clf_mod.load_or_train_classifier(tmp_path)
    finally:
        os.umask(old)
    path = clf_mod._cache_path(tmp_path, clf_mod.RECIPE)
    assert path.stat().st_mode & 0o777 == 0o666 & ~umask
    assert [p.name for p in tmp_path.iterdir()] == [path.name]  # no temporary left beside it


def test_recipe_change_changes_the_cache_key():
    assert clf_mod.recipe_hash({**clf_mod.RECIPE, "epochs": 31}) != clf_mod.recipe_hash()


def test_classifier_features_separate_real_digits_from_noise(classifier_cache):
    _, model, _ = classifier_cache
    x, _ = load_digits_tensors()
    f_real = clf_mod.extract_features(model, x)
    half = frechet_distance_features(f_real[::2], f_real[1::2])
    uniform = torch.rand(1797, *IMAGE_SHAPE) * 2 - 1
    noise = frechet_distance_features(f_real, clf_mod.extract_features(model, uniform))
    assert noise > 20 * half


# ---- the demo end to end ----

@pytest.fixture
def native_losses(native_cpu_route):
    """The demo's losses take the native C++ route for CPU tensors."""


def test_demo_configs_are_explicit():
    full, quick = run_mod.demo_config(False), run_mod.demo_config(True)
    assert quick.teacher.iterations < full.teacher.iterations
    assert quick.sid["iterations"] < full.sid["iterations"]
    assert full.teacher_steps >= 18 and quick.teacher_steps >= 18
    json.dumps(full.to_dict())


def _check_report(report, out):
    fd = report["fd"]
    assert all(math.isfinite(v) and v > 0 for v in fd.values())
    assert report["bars"]["student_vs_teacher"]["value"] == pytest.approx(fd["student"] / fd["teacher"])
    assert report["bars"]["init_vs_student"]["value"] == pytest.approx(fd["init"] / fd["student"])
    assert json.loads((out / "report.json").read_text())["fd"] == fd
    for name in ("real.png", "teacher.png", "init.png", "student.png", "teacher.pt", "sid/metrics.jsonl"):
        assert (out / name).is_file(), name
    assert report["sampling_seconds"]["student"] < report["sampling_seconds"]["teacher"]
    # the teacher-feature distance beside each FD (the teacher nearest its own cached samples), and the
    # checkpoint the SiD run kept by it
    tfd = report["teacher_fd"]
    assert set(tfd) == set(fd) and all(math.isfinite(v) and v >= 0 for v in tfd.values())
    assert tfd["teacher"] < tfd["init"]
    best = report["best_checkpoint"]
    assert best["path"] == str(out / "sid" / "best.pt") and (out / "sid" / "best.pt").is_file()
    logged = [r["teacher_fd"] for r in map(json.loads, (out / "sid" / "metrics.jsonl").read_text().splitlines())
              if "teacher_fd" in r]
    assert best["teacher_fd"] == min(logged)


@pytest.mark.slow
def test_quick_demo_meets_the_quality_bars(tmp_path, classifier_cache, native_losses):
    """The CI demo: the one-step student within 1.25x the 18-step teacher's FD, and >= 3x better than at
    init."""
    out = tmp_path / "demo"
    report = run_mod.run_demo(quick=True, out_dir=out, device="cpu", seed=0, cache_dir=classifier_cache[0],
                              log=None)
    _check_report(report, out)
    assert report["mode"] == "quick"
    assert report["fd"]["student"] <= run_mod.STUDENT_RATIO_BAR * report["fd"]["teacher"], report["fd"]
    assert report["fd"]["init"] >= run_mod.INIT_RATIO_BAR * report["fd"]["student"], report["fd"]
    assert report["passed"] is True


def test_tiny_demo_runs_end_to_end_and_is_deterministic(tmp_path, classifier_cache, native_losses):
    """A seconds-long configuration through the real trainer: report, files, same numbers twice."""
    cfg = run_mod.demo_config(True)
    cfg.net = {**cfg.net, "width": 32, "depth": 1, "emb_dim": 16}
    cfg.teacher.iterations, cfg.teacher.batch, cfg.teacher.warmup = 40, 64, 5
    cfg.sid = {**cfg.sid, "iterations": 6, "batch": 16}
    cfg.eval_samples, cfg.grid_size = 200, 16
    reports = [run_mod.run_demo(out_dir=tmp_path / f"d{i}", device="cpu", cache_dir=classifier_cache[0],
                                config=cfg, log=None) for i in range(2)]
    for i, r in enumerate(reports):
        _check_report(r, tmp_path / f"d{i}")
        assert r["mode"] == "custom" and r["sid"]["iterations"] == 6
    assert reports[0]["fd"] == reports[1]["fd"] and reports[0]["teacher_fd"] == reports[1]["teacher_fd"]
    bars = reports[0]["bars"]
    assert all(b["se"] > 0 and "margin" in b for b in bars.values())
    features = torch.load(tmp_path / "d0" / "features.pt", weights_only=True)
    assert run_mod.report_bars(reports[0], features) == bars


def test_demo_bad_arguments(tmp_path):
    (tmp_path / "file").write_text("x")
    with pytest.raises(ValueError, match="out_dir"):
        run_mod.run_demo(out_dir=tmp_path / "file", device="cpu", log=None)
    with pytest.raises(ValueError, match="seed"):
        run_mod.run_demo(out_dir=tmp_path, seed=-1, log=None)
    with pytest.raises(ValueError, match="threads"):
        run_mod.run_demo(out_dir=tmp_path, threads=0, log=None)
    with pytest.raises(TypeError, match="config"):
        run_mod.run_demo(out_dir=tmp_path, config={"quick": True}, log=None)
    with pytest.raises(ValueError, match="device"):
        run_mod.run_demo(out_dir=tmp_path, device="tpu", log=None)


@requires_cuda
def test_demo_uses_the_gpu(tmp_path, classifier_cache):
    cfg = run_mod.demo_config(True)
    cfg.teacher.iterations, cfg.sid = 50, {**cfg.sid, "iterations": 5}
    r = run_mod.run_demo(out_dir=tmp_path, device="cuda", cache_dir=classifier_cache[0], config=cfg, log=None)
    assert r["device"].startswith("cuda")


# ---- comparisons: the multi-seed report and its bars (synthetic numbers) ----



def _stats(*values):
    return summary.summarize(values)


def test_summarize_mean_spread_and_bad_input():
    s = summary.summarize([1.0, 2.0, 4.0])
    assert s["per_seed"] == [1.0, 2.0, 4.0] and s["mean"] == pytest.approx(7 / 3)
    assert s["std"] == pytest.approx(math.sqrt(((1 - 7 / 3) ** 2 + (2 - 7 / 3) ** 2 + (4 - 7 / 3) ** 2) / 2))
    assert (s["min"], s["max"]) == (1.0, 4.0)
    assert summary.summarize([3.5])["std"] == 0.0
    with pytest.raises(ValueError, match="at least one"):
        summary.summarize([])
    with pytest.raises(ValueError, match="finite"):
        summary.summarize([1.0, float("nan")])


def test_sida_bars_on_synthetic_numbers():
    fd = {"teacher": _stats(10, 12), "sid": _stats(11, 13), "sida": _stats(9, 10)}
    bars = summary.sida_bars(fd, seconds=100, time_limit=1200)
    assert all(b["passed"] for b in bars.values())
    assert bars["sida_vs_teacher"]["value"] == pytest.approx(9.5 / 11)
    assert bars["sida_vs_sid"]["value"] == pytest.approx(9.5 / 12)
    # below the SiD student but not below the teacher: one bar fails
    fd["sida"] = _stats(11.5, 11.5)
    bars = summary.sida_bars(fd, seconds=100, time_limit=1200)
    assert not bars["sida_vs_teacher"]["passed"] and bars["sida_vs_sid"]["passed"]
    # equal is not below; too slow fails the time bar
    fd["sida"] = _stats(11, 11)
    assert not summary.sida_bars(fd, 100, 1200)["sida_vs_teacher"]["passed"]
    assert not summary.sida_bars(fd, 1201, 1200)["time"]["passed"]
    with pytest.raises(ValueError, match="sida"):
        summary.sida_bars({"teacher": fd["teacher"], "sid": fd["sid"]}, 1, 2)


def test_conditional_bars_compare_best_student_with_teacher_at_its_best_guidance():
    fd = {"teacher cfg 1": _stats(10, 10), "teacher cfg 2": _stats(8, 8), "k=1": _stats(30, 30),
          "lsg:1.5": _stats(9, 9), "lsg:2": _stats(9.5, 9.5)}
    acc = {"teacher cfg 1": _stats(0.8, 0.8), "teacher cfg 2": _stats(0.9, 0.9), "k=1": _stats(0.1, 0.1),
           "lsg:1.5": _stats(0.9, 0.92), "lsg:2": _stats(0.99, 0.99)}
    teachers = ["teacher cfg 1", "teacher cfg 2"]
    students = ["lsg:1.5", "lsg:2"]
    bars = summary.conditional_bars(fd, acc, teachers, students, 10, 900)
    assert "lsg:1.5" in bars["accuracy_vs_teacher"]["what"]
    assert "teacher cfg 2" in bars["fd_vs_teacher"]["what"]
    assert bars["accuracy_vs_teacher"]["value"] == pytest.approx(0.91)
    assert bars["accuracy_vs_teacher"]["passed"]
    assert bars["fd_vs_teacher"]["value"] == pytest.approx(9 / 8) and bars["fd_vs_teacher"]["passed"]
    acc["lsg:1.5"] = _stats(0.85, 0.85)  # below the teacher's accuracy at its best guidance (0.9)
    fd["lsg:1.5"] = _stats(10.5, 10.5)   # and beyond 1.25x its FD, while still the best student
    fd["lsg:2"] = _stats(11, 11)
    bars = summary.conditional_bars(fd, acc, teachers, students, 10, 900)
    assert not bars["accuracy_vs_teacher"]["passed"] and not bars["fd_vs_teacher"]["passed"]
    # with the number of samples: both error counts and the standard error of the difference,
    # sqrt((0.85 * 0.15 + 0.9 * 0.1) / 2000) = 0.0104; the verdict is the same
    bars = summary.conditional_bars(fd, acc, teachers, students, 10, 900, samples=2000)
    b = bars["accuracy_vs_teacher"]
    assert "300 vs 200 errors in 2000 samples" in b["what"] and b["bar"] == ">= 0.9 within 2 SE"
    assert b["se"] == pytest.approx(math.sqrt((0.85 * 0.15 + 0.9 * 0.1) / 2000))
    assert b["margin"] == pytest.approx(-0.05) and not b["passed"]  # 0.05 below: about 5 SE
    with pytest.raises(ValueError, match="samples"):
        summary.conditional_bars(fd, acc, teachers, students, 10, 900, samples=0)
    # equal error counts are equal accuracies, although the float means over seeds differ in the last bit
    acc["lsg:1.5"] = summary.summarize([4987 / 5000, 4999 / 5000, 4992 / 5000])
    acc["teacher cfg 2"] = summary.summarize([4999 / 5000, 4988 / 5000, 4991 / 5000])
    assert acc["lsg:1.5"]["mean"] < acc["teacher cfg 2"]["mean"]
    fd["lsg:1.5"] = _stats(9, 9)
    bar = summary.conditional_bars(fd, acc, teachers, students, 10, 900, samples=15000)["accuracy_vs_teacher"]
    assert bar["passed"] and "22 vs 22 errors in 15000" in bar["what"]


def test_steps_bars_on_synthetic_numbers():
    fd = {"teacher": _stats(10), "1-step": _stats(12, 14), "4-step": _stats(11, 12)}
    assert summary.steps_bars(fd, "1-step", "4-step", 10, 900)["steps_vs_one_step"]["passed"]
    fd["4-step"] = _stats(13, 13)
    bar = summary.steps_bars(fd, "1-step", "4-step", 10, 900)["steps_vs_one_step"]
    assert not bar["passed"] and bar["value"] == pytest.approx(1.0) and bar["bar"] == "< 1 (SE not measured)"


# ---- the bars as statistical statements (synthetic numbers) ----


def test_non_inferiority_passes_a_tie_and_a_deficit_within_the_noise_and_fails_a_clear_one():
    # "at least the teacher's": not below by more than 2 SE
    tie = summary.noise_bar("acc", 0.9, "not_below", 0.9, se=0.01)
    assert tie["passed"] and tie["margin"] == 0.0 and tie["bar"] == ">= 0.9 within 2 SE"
    assert summary.noise_bar("acc", 0.9 - 0.019, "not_below", 0.9, se=0.01)["passed"]
    deficit = summary.noise_bar("acc", 0.9 - 0.021, "not_below", 0.9, se=0.01)
    assert not deficit["passed"] and deficit["margin"] == pytest.approx(-0.021)
    # "within 1.25x": not above by more than 2 SE
    assert summary.noise_bar("r", 1.25, "not_above", 1.25, se=0.05)["passed"]
    assert summary.noise_bar("r", 1.34, "not_above", 1.25, se=0.05)["passed"]
    assert not summary.noise_bar("r", 1.36, "not_above", 1.25, se=0.05)["passed"]
    # with no SE the value alone decides, a tie included
    assert summary.noise_bar("r", 1.25, "not_above", 1.25, se=None)["passed"]
    assert not summary.noise_bar("r", 1.2501, "not_above", 1.25, se=None)["passed"]
    with pytest.raises(ValueError, match="kind"):
        summary.noise_bar("r", 1, "less", 1, se=0.1)
    with pytest.raises(ValueError, match="se"):
        summary.noise_bar("r", 1, "below", 1, se=-0.1)


def test_superiority_needs_more_than_the_noise():
    # "below": ratio + 2 SE < 1; an improvement within the noise does not pass, a tie does not pass
    assert not summary.noise_bar("r", 1.0, "below", 1, se=0.02)["passed"]
    within = summary.noise_bar("r", 0.97, "below", 1, se=0.02)
    assert not within["passed"] and within["margin"] == pytest.approx(0.03) and within["se"] == 0.02
    assert within["bar"] == "< 1 by more than 2 SE"
    assert summary.noise_bar("r", 0.95, "below", 1, se=0.02)["passed"]
    # "above" (the generator at init at least 3x the student): ratio - 2 SE >= 3
    assert summary.noise_bar("r", 3.5, "above", 3, se=0.2)["passed"]
    assert not summary.noise_bar("r", 3.3, "above", 3, se=0.2)["passed"]
    # with no SE: strictly below / at least
    assert summary.noise_bar("r", 0.999, "below", 1, se=None)["passed"]
    assert not summary.noise_bar("r", 1.0, "below", 1, se=None)["passed"]
    assert summary.noise_bar("r", 3.0, "above", 3, se=None)["passed"]


def test_the_reported_coin_toss_passes_and_a_clear_accuracy_deficit_fails():
    # a reported one-seed run: 14 against 12 errors in 5,000 samples failed ">= the teacher's"; the difference is 0.4 of an SE
    fd = {"teacher cfg 2": _stats(8.0), "lsg:1.5": _stats(8.5)}
    acc = {"teacher cfg 2": _stats(4988 / 5000), "lsg:1.5": _stats(4986 / 5000)}
    b = summary.conditional_bars(fd, acc, ["teacher cfg 2"], ["lsg:1.5"], 10, 900,
                                 samples=5000)["accuracy_vs_teacher"]
    se = math.sqrt((0.9972 * 0.0028 + 0.9976 * 0.0024) / 5000)
    assert b["passed"] and b["margin"] == pytest.approx(-0.0004) and b["se"] == pytest.approx(se)
    assert "14 vs 12 errors in 5000 samples" in b["what"]
    acc["lsg:1.5"] = _stats(4950 / 5000)  # 50 against 12 errors: about 5 SE below
    b = summary.conditional_bars(fd, acc, ["teacher cfg 2"], ["lsg:1.5"], 10, 900,
                                 samples=5000)["accuracy_vs_teacher"]
    assert not b["passed"] and b["margin"] < -2 * b["se"]


def _replicates(mean: float, se: float, seeds: int, b: int = 400, seed: int = 0) -> list:
    g = torch.Generator().manual_seed(seed)
    return [(mean + se * torch.randn(b, generator=g, dtype=torch.float64)).tolist() for _ in range(seeds)]


def test_replicate_se_of_a_ratio_and_over_seeds():
    # one seed: the ratio's SE is the replicates' spread (den fixed: se / den)
    reps = {"a": _replicates(9.0, 0.3, 1), "b": [[10.0] * 400]}
    assert summary.replicate_se(reps, lambda m: m["a"] / m["b"]) == pytest.approx(0.03, rel=0.1)
    # four seeds resampled independently: the mean over seeds has half the per-seed SE
    reps = {"a": _replicates(9.0, 0.3, 4), "b": [[10.0] * 400] * 4}
    assert summary.replicate_se(reps, lambda m: m["a"] / m["b"]) == pytest.approx(0.015, rel=0.12)
    # perfectly correlated numerator and denominator: a ratio of no noise
    same = _replicates(9.0, 0.3, 1)
    assert summary.replicate_se({"a": same, "b": same}, lambda m: m["a"] / m["b"]) == pytest.approx(0, abs=1e-12)
    with pytest.raises(ValueError, match="one length"):
        summary.replicate_se({"a": [[1.0, 2.0]], "b": [[1.0, 2.0, 3.0]]}, lambda m: m["a"])


def test_fd_bars_use_the_bootstrap_se():
    fd = {"teacher": _stats(10.0), "1-step": _stats(12.0), "4-step": _stats(11.4)}
    # 4-step / 1-step = 0.95; with an SE of about 0.05 the improvement is within the noise
    noisy = {"1-step": [[12.0] * 400], "4-step": _replicates(11.4, 0.6, 1), "teacher": [[10.0] * 400]}
    bar = summary.steps_bars(fd, "1-step", "4-step", 10, 900, replicates=noisy)["steps_vs_one_step"]
    assert bar["value"] == pytest.approx(0.95) and bar["se"] == pytest.approx(0.05, rel=0.1)
    assert not bar["passed"] and bar["margin"] == pytest.approx(0.05)
    quiet = {**noisy, "4-step": _replicates(11.4, 0.1, 1)}  # SE about 0.008: clearly below
    assert summary.steps_bars(fd, "1-step", "4-step", 10, 900, replicates=quiet)["steps_vs_one_step"]["passed"]
    # SiDA: the same statement against the teacher and SiD
    fd = {"teacher": _stats(10.0), "sid": _stats(10.0), "sida": _stats(9.0)}
    reps = {"teacher": [[10.0] * 400], "sid": [[10.0] * 400], "sida": _replicates(9.0, 0.6, 1)}
    bars = summary.sida_bars(fd, 100, 1200, replicates=reps)  # 0.9 + 2 x 0.06 > 1
    assert not bars["sida_vs_teacher"]["passed"] and not bars["sida_vs_sid"]["passed"]
    reps["sida"] = _replicates(9.0, 0.2, 1)                    # 0.9 + 2 x 0.02 < 1
    bars = summary.sida_bars(fd, 100, 1200, replicates=reps)
    assert bars["sida_vs_teacher"]["passed"] and bars["sida_vs_sid"]["passed"]
    with pytest.raises(ValueError, match="replicates"):
        summary.sida_bars(fd, 100, 1200, replicates={"sida": reps["sida"]})
    # SiD demo: the student at 1.3x the teacher with an SE of 0.05 is within 1.25x up to the noise; init 4x
    fd = {"teacher": _stats(10.0), "student": _stats(13.0), "init": _stats(52.0)}
    reps = {"teacher": [[10.0] * 400], "student": _replicates(13.0, 0.5, 1), "init": [[52.0] * 400]}
    bars = summary.sid_bars(fd, reps)
    assert bars["student_vs_teacher"]["passed"] and bars["init_vs_student"]["passed"]
    fd["student"] = _stats(14.0)  # 1.4: 3 SE above 1.25
    reps["student"] = _replicates(14.0, 0.5, 1)
    assert not summary.sid_bars(fd, reps)["student_vs_teacher"]["passed"]
    # conditional FD: within 1.25x up to the noise
    fd = {"teacher cfg 2": _stats(8.0), "lsg:1.5": _stats(10.4)}  # 1.3
    acc = {"teacher cfg 2": _stats(0.99), "lsg:1.5": _stats(0.99)}
    reps = {"teacher cfg 2": [[8.0] * 400], "lsg:1.5": _replicates(10.4, 0.4, 1)}  # SE 0.05
    bars = summary.conditional_bars(fd, acc, ["teacher cfg 2"], ["lsg:1.5"], 10, 900, replicates=reps)
    assert bars["fd_vs_teacher"]["passed"] and bars["fd_vs_teacher"]["bar"] == "<= 1.25 within 2 SE"
    reps["lsg:1.5"] = _replicates(10.4, 0.1, 1)
    bars = summary.conditional_bars(fd, acc, ["teacher cfg 2"], ["lsg:1.5"], 10, 900, replicates=reps)
    assert not bars["fd_vs_teacher"]["passed"]


def test_fd_bootstrap_se_matches_the_spread_over_fresh_samples_and_pairs_rows():
    from sidfast.demo.frechet import fd_bootstrap, frechet_distance_features
    g = torch.Generator().manual_seed(1)
    real = torch.randn(600, 6, generator=g)
    def draw():
        return torch.randn(600, 6, generator=g) * 1.3 + 0.3
    # the spread of FD over fresh sample sets (the real set fixed, as in the demo) against one set's bootstrap SE
    fresh = [frechet_distance_features(draw(), real) for _ in range(60)]
    spread = summary.summarize(fresh)["std"]
    reps = fd_bootstrap({"x": draw()}, real, resamples=200, seed=3)
    se = summary.summarize(reps["x"])["std"]
    assert 0.6 * spread < se < 1.6 * spread
    # paired rows: two sets that are the same samples have a ratio of exactly 1 in every replicate
    x = draw()
    reps = fd_bootstrap({"a": x, "b": x.clone()}, real, resamples=20, seed=0)
    assert all(a == b for a, b in zip(reps["a"], reps["b"]))
    assert fd_bootstrap({"a": x}, real, resamples=20, seed=0) == fd_bootstrap({"a": x}, real, resamples=20, seed=0)
    with pytest.raises(ValueError, match="resamples"):
        fd_bootstrap({"a": x}, real, resamples=1)
    with pytest.raises(ValueError, match="finite"):
        fd_bootstrap({"a": x[:, :5]}, real)


def test_markdown_report_lists_every_seed_and_bar():
    fd = {"teacher cfg 1": _stats(10.0, 12.0, 11.0), "k=1": _stats(20.0, 21.0, 22.0)}
    acc = {"teacher cfg 1": _stats(0.9, 0.8, 0.85), "k=1": _stats(0.5, 0.6, 0.7)}
    bars = summary.conditional_bars(fd, acc, ["teacher cfg 1"], ["k=1"], 5.0, 900)
    text = summary.markdown("title", fd, acc, {"k=1": _stats(1.0, 2.0, 3.0)}, bars)
    assert "| teacher cfg 1 | 11.000 ± 1.000 | 10.000, 12.000, 11.000 | 0.8500 ± 0.0500 |" in text
    row = ("| k=1 | 21.000 ± 1.000 | 20.000, 21.000, 22.000 | 0.6000 ± 0.1000 | 0.5000, 0.6000, 0.7000 | "
           "2.0 |")
    assert row in text
    assert text.count("FAILED") == 2 and "| time: " in text and text.count("| ok |") == 1


def test_a_failed_bar_is_exit_1_and_comparison_options_reach_the_demo(tmp_path, capsys, monkeypatch):
    import sidfast.demo.run

    seen = []

    def fake_run_demo(**kw):
        seen.append(kw)
        return {"passed": len(seen) > 1}

    monkeypatch.setattr(sidfast.demo.run, "run_demo", fake_run_demo)
    base = ["demo", "--out", str(tmp_path / "d"), "--device", "cpu"]
    assert cli.main(base + ["--method", "sida", "--seeds", "4"]) == 1
    assert cli.main(base + ["--gen-steps", "4", "--quick"]) == 0
    assert (seen[0]["method"], seen[0]["seeds"]) == ("sida", 4)
    assert (seen[1]["gen_steps"], seen[1]["quick"]) == (4, True)
    for args, match in ((["--method", "sida", "--conditional"], "one comparison at a time"),
                        (["--gen-steps", "0"], "--gen-steps must be >= 1"),
                        (["--seeds", "3"], "--seeds is for the comparisons"),
                        (["--conditional", "--seeds", "0"], "--seeds must be >= 1")):
        with pytest.raises(SystemExit) as exc:
            cli.main(base + args)
        assert exc.value.code == 2 and match in capsys.readouterr().err


def test_comparison_configs_full_and_quick():
    for demo in compare.DEMOS:
        full = compare.comparison_config(demo, False, seed=5)
        quick = compare.comparison_config(demo, True, seed=5)
        assert full.seeds == [5, 6, 7] and quick.seeds == [5]
        assert quick.sid["iterations"] * quick.sid["batch"] < full.sid["iterations"] * full.sid["batch"]
        assert quick.time_limit == 180 and full.time_limit == (1200 if demo == "sida" else 900)
        json.dumps(full.to_dict())
    sida = compare.comparison_config("sida", False)
    assert [s.name for s in sida.students] == ["sid", "sida"] and sida.students[1].real_data
    options = sida.students[1].options
    images_kimg = sida.sid["iterations"] * sida.sid["batch"] / 1000
    assert options["method"] == "sida" and "alpha" not in options  # the method's published alpha
    # the warm-up gates open within the budget, so that the GAN term trains
    assert 0 < options["g_start_kimg"] < options["gan_start_kimg"] < 0.5 * images_kimg
    cond = compare.comparison_config("conditional", False)
    assert cond.net["num_classes"] == 10 and cond.teacher.label_dropout == compare.LABEL_DROPOUT
    assert cond.bar_students and all(s.options["guidance"] == "lsg" and s.options["cfg"] > 1
                                      for s in cond.students[1:])
    steps = compare.comparison_config("gen-steps", False, gen_steps=3)
    assert [s.steps for s in steps.students] == [1, 3]
    assert compare.comparison_config("sida", True, seeds=2).seeds == [0, 1]
    with pytest.raises(ValueError, match="gen_steps"):
        compare.comparison_config("gen-steps", False, gen_steps=1)
    with pytest.raises(ValueError, match="demo"):
        compare.comparison_config("dmd", False)
    bad = compare.comparison_config("sida", True)
    bad.seeds = [1, 1]
    with pytest.raises(ValueError, match="seeds"):
        bad.validate()
    bad = compare.comparison_config("sida", True)
    bad.students = bad.students[:1]
    with pytest.raises(ValueError, match="sida"):
        bad.validate()


# ---- the conditional teacher ----

def test_label_dropout_trains_the_null_label():
    x, y = load_digits_tensors()

    def label_weights(p):
        torch.manual_seed(0)
        net = DigitsDenoiser(width=32, depth=1, emb_dim=16, num_classes=10)
        before = net.net.embed_label.weight.detach().clone()
        cfg = TeacherConfig(iterations=5, batch=32, warmup=1, label_dropout=p)
        ema, _ = train_teacher(net, x, cfg, labels=y)
        return before, ema.net.embed_label.weight

    before, after = label_weights(1.0)  # every label null: the label embedding gets no gradient
    assert torch.equal(before, after)
    before, after = label_weights(0.1)
    assert not torch.equal(before, after)
    with pytest.raises(ValueError, match="label_dropout"):
        train_teacher(DigitsDenoiser(width=8, depth=1, emb_dim=8), x, TeacherConfig(label_dropout=0.1))
    with pytest.raises(ValueError, match="label_dropout"):
        train_teacher(DigitsDenoiser(width=8, depth=1, emb_dim=8, num_classes=10), x,
                      TeacherConfig(label_dropout=1.5), labels=y)


def test_guided_teacher_combines_the_conditional_and_null_outputs():
    torch.manual_seed(0)
    net = DigitsDenoiser(width=32, depth=1, emb_dim=16, num_classes=10)
    torch.nn.init.normal_(net.net.fc_out.weight, std=0.1)
    x, s = torch.randn(6, *IMAGE_SHAPE), torch.full((6,), 1.3)
    labels = torch.nn.functional.one_hot(torch.arange(6) % 10, 10).float()
    cond = net(x, s, labels)
    uncond = net(x, s, torch.zeros(6, 10))
    torch.testing.assert_close(compare.GuidedTeacher(net, 2.0, 10)(x, s, labels), 2 * cond - uncond)
    torch.testing.assert_close(compare.GuidedTeacher(net, 0.0, 10)(x, s, labels), uncond)


def test_label_accuracy_of_the_classifier(classifier_cache):
    _, model, _ = classifier_cache
    x, y = load_digits_tensors()
    expected = clf_mod.evaluate_accuracy(model, x, y)
    assert clf_mod.label_accuracy(model, x, y, batch=500) == pytest.approx(expected)
    assert clf_mod.label_accuracy(model, x, y) > 0.95
    assert clf_mod.label_accuracy(model, x, (y + 1) % 10) < 0.05
    with pytest.raises(ValueError, match="labels"):
        clf_mod.label_accuracy(model, x, y[:5])


@pytest.fixture
def one_thread():
    """One intra-op thread, as the demo runs: on a busy 2-core machine two threads of these small networks
    wait on each other far longer than they compute."""
    old = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(old)


def test_conditional_teacher_honours_labels(classifier_cache, one_thread):
    """After a short training (a few seconds), the teacher's samples at requested labels are classified as
    those labels far above chance (0.1; about 0.7 measured)."""
    from sidfast.samplers import edm_sample

    _, model, _ = classifier_cache
    x, y = load_digits_tensors()
    torch.manual_seed(0)
    net = DigitsDenoiser(width=128, depth=2, emb_dim=32, num_classes=10)
    ema, _ = train_teacher(net, x, TeacherConfig(iterations=600, batch=128, warmup=20, label_dropout=0.1),
                           labels=y)
    requested = torch.arange(300) % 10
    z = torch.randn(300, *IMAGE_SHAPE, generator=torch.Generator().manual_seed(1))
    onehot = torch.nn.functional.one_hot(requested, 10).float()
    samples = edm_sample(ema, z, 18, class_labels=onehot)
    assert clf_mod.label_accuracy(model, samples, requested) > 0.4


# ---- comparisons end to end (tiny budgets) ----

def _tiny(cfg, seeds=2):
    cfg.seeds = list(range(seeds))
    cfg.net = {**cfg.net, "width": 32, "depth": 1, "emb_dim": 16}
    cfg.teacher.iterations, cfg.teacher.batch, cfg.teacher.warmup = 40, 64, 5
    cfg.sid = {**cfg.sid, "iterations": 4, "batch": 16}
    cfg.eval_samples, cfg.grid_size = 200, 16
    return cfg


def _check_comparison(report, out, teachers, students, seeds, accuracy):
    assert json.loads((out / "report.json").read_text())["fd"] == report["fd"]
    assert list(report["fd"]) == teachers + students and report["seeds"] == seeds
    for name, s in report["fd"].items():
        assert len(s["per_seed"]) == len(seeds) and all(math.isfinite(v) and v > 0 for v in s["per_seed"])
        assert s["mean"] == pytest.approx(sum(s["per_seed"]) / len(seeds))
    assert (set(report["accuracy"]) == set(teachers + students)) if accuracy else report["accuracy"] == {}
    assert set(report["seconds"]["students"]) == set(students)
    assert report["passed"] == all(b["passed"] for b in report["bars"].values())
    assert "time" in report["bars"] and report["seconds"]["total"] <= report["bars"]["time"]["value"] + 1e-6
    text = (out / "report.md").read_text()
    assert all(f"| {name} |" in text for name in teachers + students)
    for name in ("real.png", "teacher.pt") + tuple(f"student_{compare._safe(n)}.png" for n in students):
        assert (out / name).is_file(), name
    for name in students:
        for seed in seeds:
            assert (out / "runs" / compare._safe(name) / f"seed{seed}" / "metrics.jsonl").is_file()
    # the teacher-feature distance beside each FD, and each student run's best.pt kept by it
    assert list(report["teacher_fd"]) == list(report["fd"])
    assert all(len(s["per_seed"]) == len(seeds) and all(math.isfinite(v) and v >= 0 for v in s["per_seed"])
               for s in report["teacher_fd"].values())
    assert set(report["best_checkpoints"]) == set(students)
    for name, kept in report["best_checkpoints"].items():
        assert [k["seed"] for k in kept] == seeds and all(os.path.isfile(k["path"]) for k in kept)
    assert "teacher-FD (mean ± std)" in text and "best.pt kept by each student's run" in text


def test_multi_seed_comparison_runs_end_to_end_and_is_deterministic(tmp_path, classifier_cache,
                                                                     native_losses):
    """The runner with two plain-SiD students under the SiDA comparison's names: report, bars, files, and the
    same numbers twice."""
    cfg = _tiny(compare.comparison_config("sida", True))
    cfg.students = [StudentSpec("sid"), StudentSpec("sida", {"alpha": 1.0})]
    reports = [compare.run_comparison(cfg, tmp_path / f"c{i}", "cpu", classifier_cache[0], log=None)
               for i in range(2)]
    for i, r in enumerate(reports):
        _check_comparison(r, tmp_path / f"c{i}", ["teacher"], ["sid", "sida"], [0, 1], accuracy=False)
        assert set(r["bars"]) == {"sida_vs_teacher", "sida_vs_sid", "time"}
        assert r["students"]["sida"]["options"]["alpha"] == 1.0 and r["students"]["sid"]["images"] == 4 * 16
    assert reports[0]["fd"] == reports[1]["fd"] and reports[0]["teacher_fd"] == reports[1]["teacher_fd"]


def test_conditional_comparison_end_to_end(tmp_path, classifier_cache, native_losses):
    """A conditional teacher sampled at two guidance scales and an unguided conditional student, two seeds."""
    cfg = _tiny(compare.comparison_config("conditional", True))
    cfg.students = [StudentSpec("k=1")]
    cfg.bar_students = ["k=1"]
    cfg.teacher_guidance = [1.0, 2.0]
    report = run_mod.run_demo(out_dir=tmp_path, device="cpu", cache_dir=classifier_cache[0], config=cfg,
                              log=None)
    _check_comparison(report, tmp_path, ["teacher cfg 1", "teacher cfg 2"], ["k=1"], [0, 1], accuracy=True)
    assert report["mode"] == "custom" and report["teacher"]["guidance"] == {"teacher cfg 1": 1.0,
                                                                           "teacher cfg 2": 2.0}
    assert all(0 <= v <= 1 for s in report["accuracy"].values() for v in s["per_seed"])
    assert set(report["bars"]) == {"accuracy_vs_teacher", "fd_vs_teacher", "time"}
    # every comparative bar carries its margin and standard error; features.pt recomputes the same bars
    assert all(report["bars"][n]["se"] > 0 for n in ("accuracy_vs_teacher", "fd_vs_teacher"))
    features = torch.load(tmp_path / "features.pt", weights_only=True)
    assert features["features"]["k=1"][1].shape == (cfg.eval_samples, clf_mod.FEATURE_DIM)
    again = compare.report_bars(json.loads((tmp_path / "report.json").read_text()), features)
    assert again == report["bars"]


def test_sida_comparison_end_to_end(tmp_path, classifier_cache, native_losses):
    cfg = _tiny(compare.comparison_config("sida", True), seeds=1)
    # the tiny budget (64 images) is below the demo's gates: open them so that the GAN term trains
    cfg.students[1].options.update(g_start_kimg=0, gan_start_kimg=0)
    report = compare.run_comparison(cfg, tmp_path, "cpu", classifier_cache[0], log=None)
    _check_comparison(report, tmp_path, ["teacher"], ["sid", "sida"], [0], accuracy=False)
    options = report["students"]["sida"]["options"]
    assert options["method"] == "sida" and options["data"] == str(tmp_path / "digits.npz")
    metrics = [json.loads(line) for line in (tmp_path / "runs" / "sida" / "seed0" / "metrics.jsonl").open()]
    metrics = [m for m in metrics if "teacher_fd" not in m]  # the loss records (the run also measures teacher-fd)
    # the first iteration (0 images seen) is before the gates open: its GAN loss is logged as not applied
    assert all(math.isfinite(m.get("loss_gan", m.get("loss_gan_not_applied"))) and math.isfinite(m["loss_d"])
               for m in metrics)
    assert "loss_gan" in metrics[-1]
    assert "loss_gan" not in (tmp_path / "runs" / "sid" / "seed0" / "metrics.jsonl").read_text()


def test_guided_conditional_comparison_end_to_end(tmp_path, classifier_cache, native_losses):
    cfg = _tiny(compare.comparison_config("conditional", True), seeds=1)
    report = compare.run_comparison(cfg, tmp_path, "cpu", classifier_cache[0], log=None)
    names = [s.name for s in cfg.students]
    _check_comparison(report, tmp_path, [f"teacher cfg {k:g}" for k in cfg.teacher_guidance], names, [0],
                      accuracy=True)
    for spec in cfg.students[1:]:
        options = report["students"][spec.name]["options"]
        assert (options["guidance"], options["cfg"]) == ("lsg", spec.options["cfg"])


def test_gen_steps_comparison_end_to_end(tmp_path, classifier_cache, native_losses):
    cfg = _tiny(compare.comparison_config("gen-steps", True, gen_steps=3), seeds=1)
    report = compare.run_comparison(cfg, tmp_path, "cpu", classifier_cache[0], log=None)
    _check_comparison(report, tmp_path, ["teacher"], ["1-step", "3-step"], [0], accuracy=False)
    assert report["students"]["3-step"]["steps"] == 3
    assert report["students"]["3-step"]["options"]["gen_steps"] == 3


def test_comparison_bad_arguments(tmp_path):
    with pytest.raises(ValueError, match="one comparison at a time"):
        run_mod.run_demo(out_dir=tmp_path, method="sida", conditional=True, log=None)
    with pytest.raises(ValueError, match="method"):
        run_mod.run_demo(out_dir=tmp_path, method="dmd", log=None)
    with pytest.raises(ValueError, match="seeds"):
        run_mod.run_demo(out_dir=tmp_path, seeds=3, log=None)
    with pytest.raises(TypeError, match="ComparisonConfig"):
        run_mod.run_demo(out_dir=tmp_path, conditional=True, config=run_mod.demo_config(True), log=None)
    with pytest.raises(TypeError, match="ComparisonConfig"):
        compare.run_comparison(run_mod.demo_config(True), tmp_path, log=None)


def test_a_freshly_trained_classifier_is_reported_once(tmp_path, monkeypatch, capsys):
    # train_classifier's own line and the demo's line said the same thing twice on a first demo
    def quick_training(recipe=clf_mod.RECIPE, log=None):
        if log:
            log("digit classifier trained: held-out accuracy 0.500")
        return clf_mod.DigitClassifier(recipe["channels"], recipe["feature_dim"]).eval(), 0.5

    monkeypatch.setattr(clf_mod, "train_classifier", quick_training)
    logs = []
    _, accuracy, cached = clf_mod.load_or_train_classifier(tmp_path, log=logs.append)
    assert not cached and accuracy == 0.5
    assert not any("accuracy" in line for line in logs)  # the caller reports it, once
