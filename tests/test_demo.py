"""The embedded demo: data, denoiser, Frechet distance, the cached digit classifier, and the quick demo end to end.

The end-to-end runs take the native CPU route for sidfast's losses: conftest.py sets TRITON_INTERPRET=1 on
CPU-only machines, which would route every loss of the demo's thousands of iterations through Triton's
interpreter (the kernels themselves are tested in tests/test_ops_*.py); `sidfast demo` outside pytest takes
the native route anyway.
"""
import json
import math
import time

import pytest
import torch

from sidfast.demo import classifier as clf_mod
from sidfast.demo import run as run_mod
from sidfast.demo.digits import IMAGE_SHAPE, load_digits_tensors, split
from sidfast.demo.frechet import feature_statistics, frechet_distance, frechet_distance_features
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
    cfg = {"image_shape": [1, 8, 8], "width": 32, "depth": 2, "num_classes": 0, "dropout": 0.1, "sigma_data": 0.5}
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


# ---- Frechet distance ----

def test_frechet_distance_of_identical_sets_is_zero():
    f = torch.randn(500, 16, generator=torch.Generator().manual_seed(0))
    assert frechet_distance_features(f, f) == pytest.approx(0.0, abs=1e-8)
    assert frechet_distance_features(f, f.clone().flip(0)) == pytest.approx(0.0, abs=1e-8)


def test_frechet_distance_closed_forms():
    d = 6
    g = torch.Generator().manual_seed(1)
    mu1, mu2 = torch.randn(d, generator=g, dtype=torch.float64), torch.randn(d, generator=g, dtype=torch.float64)
    # commuting (diagonal) covariances: FD = |mu1-mu2|^2 + sum (sqrt(a) - sqrt(b))^2
    a, b = torch.rand(d, generator=g, dtype=torch.float64) + 0.1, torch.rand(d, generator=g, dtype=torch.float64) + 0.1
    expected = float((mu1 - mu2).square().sum() + (a.sqrt() - b.sqrt()).square().sum())
    assert frechet_distance(mu1, torch.diag(a), mu2, torch.diag(b)) == pytest.approx(expected, rel=1e-10)
    # scaled covariance S2 = c^2 S1: FD = |dmu|^2 + (1 - c)^2 tr(S1), for a dense S1
    m = torch.randn(d, d, generator=g, dtype=torch.float64)
    s1 = m @ m.T + 0.1 * torch.eye(d, dtype=torch.float64)
    c = 1.7
    expected = float((mu1 - mu2).square().sum() + (1 - c) ** 2 * s1.trace())
    assert frechet_distance(mu1, s1, mu2, c ** 2 * s1) == pytest.approx(expected, rel=1e-9)
    # symmetric in its arguments, and a rotated copy of a non-commuting pair
    q, _ = torch.linalg.qr(torch.randn(d, d, generator=g, dtype=torch.float64))
    s2 = q @ torch.diag(torch.rand(d, generator=g, dtype=torch.float64) + 0.2) @ q.T
    assert frechet_distance(mu1, s1, mu2, s2) == pytest.approx(frechet_distance(mu2, s2, mu1, s1), rel=1e-9)
    # against the definition with an eigendecomposition-free square root (Newton-Schulz on S1 S2)
    prod = s1 @ s2
    y, z = prod / prod.norm(), torch.eye(d, dtype=torch.float64)
    for _ in range(60):
        t = 0.5 * (3 * torch.eye(d, dtype=torch.float64) - z @ y)
        y, z = y @ t, t @ z
    tr_sqrt = float(y.trace() * prod.norm().sqrt())
    expected = float((mu1 - mu2).square().sum() + s1.trace() + s2.trace()) - 2 * tr_sqrt
    assert frechet_distance(mu1, s1, mu2, s2) == pytest.approx(expected, rel=1e-8)


def test_frechet_distance_of_samples_estimates_the_gaussian_value():
    g = torch.Generator().manual_seed(2)
    a = torch.randn(20000, 4, generator=g, dtype=torch.float64)
    b = 2.0 * torch.randn(20000, 4, generator=g, dtype=torch.float64) + 1.0
    # N(0, I) vs N(1, 4I) in 4 dims: |dmu|^2 = 4, (1 - 2)^2 * 4 = 4
    assert frechet_distance_features(a, b) == pytest.approx(8.0, rel=0.03)


def test_frechet_bad_input():
    with pytest.raises(ValueError, match="features"):
        feature_statistics(torch.randn(1, 4))
    with pytest.raises(ValueError, match="features"):
        feature_statistics(torch.randn(4))
    with pytest.raises(ValueError, match="NaN"):
        feature_statistics(torch.tensor([[0.0, float("nan")], [1.0, 2.0]]))
    with pytest.raises(ValueError, match="mu1"):
        frechet_distance(torch.zeros(3), torch.eye(3), torch.zeros(4), torch.eye(4))
    with pytest.raises(ValueError, match="sigma1"):
        frechet_distance(torch.zeros(3), torch.eye(2), torch.zeros(3), torch.eye(3))


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


def test_classifier_cache_is_reused(classifier_cache):
    d, model, accuracy = classifier_cache
    start = time.perf_counter()
    again, acc2, cached = clf_mod.load_or_train_classifier(d)
    assert cached and acc2 == accuracy and time.perf_counter() - start < 2.0
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


def test_recipe_change_changes_the_cache_key():
    assert clf_mod.recipe_hash({**clf_mod.RECIPE, "epochs": 31}) != clf_mod.recipe_hash()


def test_classifier_features_separate_real_digits_from_noise(classifier_cache):
    _, model, _ = classifier_cache
    x, _ = load_digits_tensors()
    f_real = clf_mod.extract_features(model, x)
    half = frechet_distance_features(f_real[::2], f_real[1::2])
    noise = frechet_distance_features(f_real, clf_mod.extract_features(model, torch.rand(1797, *IMAGE_SHAPE) * 2 - 1))
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


@pytest.mark.slow
def test_quick_demo_meets_the_quality_bars(tmp_path, classifier_cache, native_losses):
    """The CI demo: the one-step student within 1.25x the 18-step teacher's FD, and >= 3x better than at init."""
    out = tmp_path / "demo"
    report = run_mod.run_demo(quick=True, out_dir=out, device="cpu", seed=0, cache_dir=classifier_cache[0], log=None)
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
    reports = [run_mod.run_demo(out_dir=tmp_path / f"d{i}", device="cpu", cache_dir=classifier_cache[0], config=cfg,
                                log=None) for i in range(2)]
    for i, r in enumerate(reports):
        _check_report(r, tmp_path / f"d{i}")
        assert r["mode"] == "custom" and r["sid"]["iterations"] == 6
    assert reports[0]["fd"] == reports[1]["fd"]


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
