"""The teacher-feature distance (sidfast/evaluate/teacher_fd.py) and the sharding of its samples
(sidfast/evaluate/shards.py): which features, the reference cached once, options checked, any process count."""
from pathlib import Path

import pytest
import torch
from torch import nn

from nets import SHAPE, TinyEDM, tiny_teacher
from runs import quiet
from sidfast.evaluate import shards, teacher_fd
from sidfast.evaluate.frechet import feature_statistics, frechet_distance
from sidfast.evaluate.loop_metrics import available, metric_for
from sidfast.evaluate.teacher_fd import (DIM, NOISE, REFERENCE_NAME, SIGMA, TeacherFD, TeacherFeatures,
                                         projection)
from sidfast.models.denoiser import as_denoiser
from sidfast.samplers import edm_sample
from sidfast.schedules import VPSchedule
from sidfast.training.evaluation import EvalRun
from sidfast.training.loop import distill
from sidfast.utils import runtime
from utils import tiny_diffusers_unet


def _diffusers_teacher(**kw):
    diffusers = pytest.importorskip("diffusers")
    from sidfast.models.diffusers import DiffusersDenoiser

    unet = tiny_diffusers_unet(**kw).eval().requires_grad_(False)
    return DiffusersDenoiser(unet, VPSchedule.from_diffusers(diffusers.DDPMScheduler()), "epsilon")


def _run(tmp_path, teacher, shape, generator=None, **kw):
    cfg = quiet(run_dir=str(tmp_path), eval="teacher-fd", teacher_steps=3, **kw)
    return EvalRun(cfg, teacher, generator if generator is not None else teacher, tuple(shape), 0, "onehot",
                   torch.device("cpu"), runtime.Dist(), Path(tmp_path), 16)


# ---- the features ----

def test_features_are_the_channel_means_at_the_end_of_the_encoder():
    teacher = _diffusers_teacher()
    feats = TeacherFeatures(teacher)
    assert feats.layer.endswith("down_blocks.1")
    x = torch.randn(3, 3, 8, 8, generator=torch.Generator().manual_seed(0))
    feats.probe(x, None, {})
    assert (feats.raw_dim, feats.dim, feats.matrix) == (16, 16, None)  # 16 channels: no projection
    seen = []
    hook = teacher.unet.down_blocks[1].register_forward_hook(lambda m, a, out: seen.append(out[0]))
    eps = shards.per_sample_normal((3, 8, 8), 5, 3, NOISE)
    with torch.no_grad():
        teacher(x + SIGMA * eps, torch.full((3,), SIGMA))
        got = feats(x, 5, None, {})
    hook.remove()
    torch.testing.assert_close(got, seen[0].mean((2, 3)))
    assert len(seen) == 2  # ... and the features' forward stopped there: the decoder did not run


def test_wide_encoders_are_projected_to_dim_by_a_fixed_orthonormal_matrix():
    q = projection(96, DIM)
    torch.testing.assert_close(q.T @ q, torch.eye(DIM), atol=1e-5, rtol=0)
    assert torch.equal(q, projection(96, DIM)) and projection(DIM, DIM) is None
    teacher = _diffusers_teacher(block_out_channels=(8, 96))
    feats = TeacherFeatures(teacher)
    feats.probe(torch.zeros(2, 3, 8, 8), None, {})
    assert (feats.raw_dim, feats.dim) == (96, DIM)
    assert feats(torch.zeros(2, 3, 8, 8), 0, None, {}).shape == (2, DIM)


class TinyDiT(nn.Module):
    """A transformer's layout: ``transformer_blocks`` and a ``proj_out`` over (B, tokens, width)."""

    def __init__(self, width=6):
        super().__init__()
        self.embed = nn.Linear(1, width)
        self.transformer_blocks = nn.ModuleList([nn.Linear(width, width)])
        self.proj_out = nn.Linear(width, 1)

    def forward(self, x, sigma, class_labels=None):
        tokens = self.embed(x.flatten(1)[..., None]) + sigma.reshape(-1, 1, 1)
        for block in self.transformer_blocks:
            tokens = tokens + block(tokens)
        return self.proj_out(tokens).reshape(x.shape)


def test_a_transformers_features_are_the_token_means_entering_its_output_projection():
    torch.manual_seed(0)
    net = TinyDiT()
    teacher = as_denoiser(net)
    feats = TeacherFeatures(teacher)
    assert feats.layer.endswith("proj_out:input") and feats.pool is teacher_fd.token_means
    x = torch.randn(2, *SHAPE)
    feats.probe(x, None, {})
    assert feats.dim == 6
    seen = []
    hook = net.proj_out.register_forward_pre_hook(lambda m, a: seen.append(a[0]))
    with torch.no_grad():
        got = feats(x, 0, None, {})
    hook.remove()
    torch.testing.assert_close(got, seen[0].mean(1))


def test_a_teacher_without_an_encoder_is_seen_through_its_denoised_output():
    teacher = as_denoiser(tiny_teacher()).eval()  # a run's teacher is in eval mode (TinyEDM has dropout)
    feats = TeacherFeatures(teacher)
    assert feats.layer == "output" and feats.pool is None
    x = torch.randn(4, *SHAPE, generator=torch.Generator().manual_seed(1))
    feats.probe(x, None, {})
    assert feats.dim == 16
    eps = shards.per_sample_normal(SHAPE, 0, 4, NOISE)
    with torch.no_grad():
        expected = teacher(x + SIGMA * eps, torch.full((4,), SIGMA)).flatten(1)
        torch.testing.assert_close(feats(x, 0, None, {}), expected)


# ---- per-sample draws and shards ----

def test_per_sample_draws_do_not_depend_on_the_chunks():
    whole = shards.per_sample_normal((2, 3), 0, 10, 7)
    parts = torch.cat([shards.per_sample_normal((2, 3), 0, 4, 7), shards.per_sample_normal((2, 3), 4, 6, 7)])
    assert torch.equal(whole, parts)
    assert not torch.equal(whole, shards.per_sample_normal((2, 3), 0, 10, 8))  # another role, other draws


@pytest.mark.parametrize("num,batch", [(10, 3), (7, 3), (4, 4)])
def test_two_ranks_compute_their_chunks_and_gather_the_one_process_result(monkeypatch, num, batch):
    def compute(start, n):
        return shards.per_sample_normal((2,), start, n, 1)

    single = shards.sharded(runtime.Dist(), num, batch, compute)
    calls = {0: [], 1: []}
    parts = {}

    class Gathered(Exception):
        pass

    def gather_rank1(dist, mine):  # rank 1's part, kept for rank 0's gather
        parts[1] = mine
        raise Gathered

    monkeypatch.setattr(shards.runtime, "all_gather", gather_rank1)
    with pytest.raises(Gathered):
        shards.sharded(runtime.Dist(rank=1, world=2), num, batch, lambda s, n: calls[1].append(s) or compute(s, n))
    monkeypatch.setattr(shards.runtime, "all_gather", lambda dist, mine: [mine, parts[1]])
    out = shards.sharded(runtime.Dist(rank=0, world=2), num, batch, lambda s, n: calls[0].append(s) or compute(s, n))
    assert torch.equal(out, single)
    assert len(calls[0]) == len(calls[1])  # every rank forwards as often (FSDP)


# ---- the metric ----

def test_the_reference_is_sampled_once_and_reused(tmp_path, monkeypatch):
    teacher = as_denoiser(tiny_teacher()).eval()
    calls = []
    real_sampler = teacher_fd.edm_sample
    monkeypatch.setattr(teacher_fd, "edm_sample", lambda *a, **k: calls.append(1) or real_sampler(*a, **k))
    run = _run(tmp_path, teacher, SHAPE, eval_num=40)
    metric = metric_for(run.cfg)
    metric.setup(run)
    assert calls and (tmp_path / REFERENCE_NAME).is_file()
    ref = torch.load(tmp_path / REFERENCE_NAME, weights_only=True)
    assert ref["samples"].shape == (40, *SHAPE)
    made = len(calls)
    again = metric_for(run.cfg)
    again.setup(run)  # resume: the cached samples and statistics, no teacher sampling
    assert len(calls) == made
    torch.testing.assert_close(again.reference["sigma"], metric.reference["sigma"], rtol=0, atol=0)
    other = _run(tmp_path, teacher, SHAPE, eval_num=48)
    metric_for(other.cfg).setup(other)  # another count: sampled again
    assert len(calls) > made
    assert torch.load(tmp_path / REFERENCE_NAME, weights_only=True)["samples"].shape[0] == 48


def test_the_reference_samples_measure_zero_and_a_broken_generator_far(tmp_path):
    teacher = as_denoiser(tiny_teacher()).eval()
    run = _run(tmp_path, teacher, SHAPE, eval_num=256)
    metric = metric_for(run.cfg)
    metric.setup(run)
    samples = torch.load(tmp_path / REFERENCE_NAME, weights_only=True)["samples"]
    # the same samples at the same indices: the same features, FD 0 up to float64 rounding of the statistics
    _, sigma = feature_statistics(metric.features_of_samples(run, samples))
    scale = float(torch.linalg.eigvalsh(sigma).max())
    assert metric.distance(run, samples) <= 1e-9 * scale
    # the teacher's own fresh samples (the generators' latents, the reference's sampler) against a generator
    # whose output is 0 everywhere
    z = shards.per_sample_normal(SHAPE, 0, 256, teacher_fd.STUDENT)
    with torch.no_grad():
        fresh = metric.distance(run, edm_sample(teacher, z, 3))
    zero = as_denoiser(lambda x, sigma, labels=None: torch.zeros_like(x))
    broken = metric.compute(_run(tmp_path, teacher, SHAPE, generator=zero, eval_num=256))
    assert broken > 4 * fresh  # 256 samples in 16 dimensions: the estimate's own floor is about 1
    # the value is the FD of the features of the generator's samples, computed by hand
    one_step = _run(tmp_path, teacher, SHAPE, eval_num=256)
    with torch.no_grad():
        feats = metric.features_of_samples(run, metric.student_samples(one_step, 0, 256, None, {}))
    ref = metric.reference
    expected = frechet_distance(ref["mu"], ref["sigma"], *feature_statistics(feats))
    assert metric.compute(one_step) == pytest.approx(expected, rel=1e-9)


def test_an_eval_ref_of_another_run_is_used_without_sampling(tmp_path, monkeypatch):
    teacher = as_denoiser(tiny_teacher()).eval()
    first = _run(tmp_path / "a", teacher, SHAPE, eval_num=40)
    metric_for(first.cfg).setup(first)
    monkeypatch.setattr(teacher_fd, "edm_sample", lambda *a, **k: pytest.fail("sampled the teacher again"))
    second = _run(tmp_path / "b", teacher, SHAPE, eval_num=24, eval_ref=str(tmp_path / "a" / REFERENCE_NAME))
    metric = metric_for(second.cfg)
    metric.setup(second)
    assert not (tmp_path / "b" / REFERENCE_NAME).exists()
    assert metric.num == 24 and metric.reference["path"] == str(tmp_path / "a" / REFERENCE_NAME)


def test_bad_eval_options_are_errors_naming_the_option(tmp_path):
    teacher = as_denoiser(tiny_teacher()).eval()
    run = _run(tmp_path / "a", teacher, SHAPE, eval_num=16)  # 16 features: 16 samples are too few
    with pytest.raises(ValueError, match=r"option eval_num \(16\) must exceed the teacher-fd feature dimension "
                                         r"\(16\)"):
        metric_for(run.cfg).setup(run)
    run = _run(tmp_path / "b", teacher, SHAPE, eval_ref=str(tmp_path / "nope.pt"))
    with pytest.raises(ValueError, match="option eval_ref .* does not exist"):
        metric_for(run.cfg).setup(run)
    (tmp_path / "notes.pt").write_text("not torch")
    run = _run(tmp_path / "c", teacher, SHAPE, eval_ref=str(tmp_path / "notes.pt"))
    with pytest.raises(ValueError, match="option eval_ref .* is not a teacher-fd reference"):
        metric_for(run.cfg).setup(run)
    wide = _run(tmp_path / "d", as_denoiser(TinyEDM(image_shape=(1, 5, 5))).eval(), (1, 5, 5), eval_num=40)
    metric_for(wide.cfg).setup(wide)
    run = _run(tmp_path / "e", teacher, SHAPE, eval_ref=str(tmp_path / "d" / REFERENCE_NAME))
    with pytest.raises(ValueError, match=r"option eval_ref .* holds samples of image_shape \[1, 5, 5\]"):
        metric_for(run.cfg).setup(run)


def test_each_eval_value_builds_its_metric():
    from sidfast.evaluate.loop_fid import LoopFID

    assert available() == ("teacher-fd", "fid")
    assert metric_for(quiet()) is None and isinstance(metric_for(quiet(eval="teacher-fd")), TeacherFD)
    assert isinstance(metric_for(quiet(eval="fid")), LoopFID)


def test_a_run_on_non_image_data_measures_its_teacher_fd(tmp_path):
    # vectors of 3 numbers, a teacher of no known family: features are its denoised output (3 dimensions)
    torch.manual_seed(0)
    teacher = TinyEDM(image_shape=(3,), dropout=0.0)
    cfg = quiet(run_dir=str(tmp_path / "run"), iterations=4, eval="teacher-fd", eval_every=0.016, eval_num=32,
                teacher_steps=4, image_shape=(3,))
    metric = metric_for(cfg)
    result = distill(cfg, teacher, metric=metric, log=None)
    assert metric.features.layer == "output" and metric.features.dim == 3
    assert result.summary["best_teacher_fd"] >= 0 and (tmp_path / "run" / "best.pt").is_file()


def test_a_guided_run_measures_against_the_teacher_guided_at_its_scale(tmp_path, monkeypatch):
    from nets import CLASSES, conditional_teacher

    seen = []
    real = teacher_fd.guidance.guided
    monkeypatch.setattr(teacher_fd.guidance, "guided", lambda *a: seen.append(a[-1]) or real(*a))
    cfg = quiet(run_dir=str(tmp_path / "run"), iterations=2, guidance="lsg", cfg=1.5, eval="teacher-fd",
                eval_num=40, teacher_steps=2)
    metric = metric_for(cfg)
    result = distill(cfg, conditional_teacher(), metric=metric, log=None)
    ref = torch.load(tmp_path / "run" / REFERENCE_NAME, weights_only=True)
    assert ref["sampling"]["guidance"] == 1.5 and ref["sampling"]["num_classes"] == CLASSES
    assert seen and set(seen) == {1.5}  # the reference's Heun steps, guided at k4
    assert result.summary["best_teacher_fd"] >= 0


def test_a_text_to_image_teacher_is_measured_with_its_prompts(tmp_path):
    from nets import cond_unet, conditioner, require_text_components
    from sidfast.models.diffusers import DiffusersDenoiser

    require_text_components()
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("a red cat\na blue dog\nthe sea\n", encoding="utf-8")
    text = conditioner("sd", dtype=torch.float32)
    teacher = DiffusersDenoiser(cond_unet().float(), VPSchedule.linear(), "eps")
    cfg = quiet(run_dir=str(tmp_path / "run"), iterations=2, batch=2, prompts=str(prompts), guidance="lsg", cfg=2,
                eval="teacher-fd", eval_num=20, teacher_steps=2)
    metric = metric_for(cfg)
    result = distill(cfg, teacher, conditioner=text, metric=metric, log=None)
    assert metric.features.layer.endswith("down_blocks.1") and metric.features.dim == 16
    assert result.summary["best_teacher_fd"] >= 0 and (tmp_path / "run" / "best.pt").is_file()
