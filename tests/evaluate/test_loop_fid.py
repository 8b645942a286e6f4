"""FID in the training loop (sidfast/evaluate/loop_fid.py) with the stand-in detector (tests/tiny_inception.py)
in sidfast's cache folder: ``--eval fid`` logs ``fid`` and keeps best.pt, whose generator measures the logged
best again through ``sidfast eval``'s feature path and EDM's statistics; missing options refused at setup."""
from pathlib import Path

import pytest
import torch

from detectors import save_torchscript
from nets import SHAPE, tiny_teacher
from runs import quiet, real_images
from sidfast import cli
from sidfast.evaluate.detector import load_detector
from sidfast.evaluate.features import collect_features
from sidfast.evaluate.frechet import frechet_distance
from sidfast.evaluate.loop_metrics import metric_for
from sidfast.evaluate.statistics import read_reference, stats_of
from sidfast.evaluate.teacher_fd import sample_labels, student_samples
from sidfast.models.denoiser import as_denoiser
from sidfast.training import student
from sidfast.training.evaluation import BEST_NAME, EvalRun, read_best_eval
from sidfast.training.loop import distill
from sidfast.training.report import read_metrics
from sidfast.utils import runtime

NUM = 24  # above the stand-in's 8 features


@pytest.fixture()
def cache(tmp_path, monkeypatch):
    """$SIDFAST_CACHE holding the stand-in detector, and a reference of 40 images made with it."""
    folder = tmp_path / "cache"
    folder.mkdir()
    save_torchscript(folder / "inception-2015-12-05.pt")
    monkeypatch.setenv("SIDFAST_CACHE", str(folder))
    ref = tmp_path / "ref.npz"
    assert cli.main(["eval", "--make-ref", real_images(tmp_path / "real.npz", count=40), "--out", str(ref),
                     "--device", "cpu"]) == 0
    return {"folder": folder, "ref": str(ref)}


def test_distill_with_eval_fid_logs_fid_and_keeps_the_best_generator(tmp_path, cache):
    run_dir = tmp_path / "run"
    cfg = quiet(run_dir=str(run_dir), iterations=6, eval="fid", eval_ref=cache["ref"], eval_num=NUM, eval_every=0.016)
    distill(cfg, tiny_teacher(), metric=metric_for(cfg), log=None)
    values = [row["fid"] for row in read_metrics(run_dir / "metrics.jsonl") if "fid" in row]
    assert len(values) >= 2 and all(v > 0 for v in values)
    best = read_best_eval(run_dir / BEST_NAME)
    assert best["value"] == min(values)

    # best.pt's generator, sampled at the loop's latents, through sidfast eval's feature collection and EDM's
    # statistics and FID (other code than the loop's sharded features and centred covariance): the same value
    # up to float64 rounding of the two covariance arithmetics
    net, options = student.from_checkpoint(run_dir / BEST_NAME, teacher="nets:tiny_teacher")
    run = EvalRun(cfg, as_denoiser(tiny_teacher()).eval(), net.eval(), tuple(SHAPE), 0, "onehot",
                  torch.device("cpu"), runtime.Dist(), run_dir, 8)
    detector = load_detector()
    feats = collect_features(lambda start, n: student_samples(run, start, n, sample_labels(run, start, n), {}),
                             NUM, detector, batch=8)
    ref = read_reference(cache["ref"])
    stats = stats_of(feats)
    again = frechet_distance(stats.mu, stats.sigma, ref.mu, ref.sigma)
    scale = float(stats.sigma.trace() + ref.sigma.trace())
    assert again == pytest.approx(best["value"], abs=1e-9 * scale)


def _setup(tmp_path, **kw):
    cfg = quiet(run_dir=str(tmp_path / "run"), eval="fid", **kw)
    run = EvalRun(cfg, as_denoiser(tiny_teacher()).eval(), as_denoiser(tiny_teacher()).eval(), tuple(SHAPE), 0,
                  "onehot", torch.device("cpu"), runtime.Dist(), tmp_path / "run", 8)
    metric_for(cfg).setup(run)


def test_missing_reference_or_detector_is_refused_at_setup_naming_the_option(tmp_path, cache, monkeypatch):
    with pytest.raises(ValueError, match="option eval_ref is required with option eval fid"):
        _setup(tmp_path)
    with pytest.raises(ValueError, match="option eval_num \\(8\\) must exceed the detector's feature dimension"):
        _setup(tmp_path, eval_ref=cache["ref"], eval_num=8)
    _setup(tmp_path, eval_ref=cache["ref"], eval_num=NUM)  # the cache's detector: accepted
    empty = tmp_path / "empty"
    empty.mkdir()
    monkeypatch.setenv("SIDFAST_CACHE", str(empty))
    with pytest.raises(ValueError, match="no Inception weights.*or give the file with option eval_inception PATH"):
        _setup(tmp_path, eval_ref=cache["ref"], eval_num=NUM)
    _setup(tmp_path, eval_ref=cache["ref"], eval_num=NUM,
           eval_inception=str(cache["folder"] / "inception-2015-12-05.pt"))
    with pytest.raises(ValueError, match="option eval_inception .* does not exist"):
        _setup(tmp_path, eval_ref=cache["ref"], eval_num=NUM, eval_inception=str(tmp_path / "nope.pt"))
    with pytest.raises(ValueError, match="option eval_ref .* does not exist"):
        _setup(tmp_path, eval_ref=str(tmp_path / "nope.npz"), eval_num=NUM)
