"""sidfast.training.loop: the SiD loop against a hand-written published iteration, resume bitwise, config, outputs."""
import json
import math
import os
import signal

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from published import published_generator_loss
from sidfast import reference
from sidfast.models.io import CheckpointError, load_checkpoint
from sidfast.utils.runtime import seed_everything
from sidfast.training.loop import distill, ema_beta
from nets import SHAPE, tiny_teacher
from runs import assert_bitwise, assert_same_run, quiet, resolved, states, stopped_and_resumed
from utils import requires_cuda, requires_gpus


# ---------------- the iteration against a hand-written published one ----------------

def _published_iteration(teacher, G, fake, cfg, opt_g, opt_f, num_classes):
    """One iteration written out as the published loop does it (sid_training_loop.py + sid_loss.py)."""
    cfg = resolved(cfg, teacher)
    B = cfg.batch

    def labels():
        if not num_classes:
            return None
        return F.one_hot(torch.randint(num_classes, (B,)), num_classes).float()

    # (1) fake score on fresh samples; G in eval, no gradient into G
    G.eval()
    fake.train()
    z = torch.randn(B, *SHAPE)
    c = labels()
    with torch.no_grad():
        images = G(cfg.sigma_init * z, torch.full((B,), cfg.sigma_init), c)
    sigma = (torch.randn(B) * cfg.p_std + cfg.p_mean).exp()
    weight = (sigma ** 2 + cfg.sigma_data ** 2) / (sigma * cfg.sigma_data) ** 2
    n = torch.randn_like(images) * sigma.view(-1, 1, 1, 1)
    y_fake = fake(images + n, sigma, c)
    loss_f = (weight.view(-1, 1, 1, 1) * (y_fake - images) ** 2).sum().mul(cfg.loss_scale_fake / B)
    opt_f.zero_grad(set_to_none=True)
    loss_f.backward()
    grads_f = [p.grad.clone() for p in fake.parameters()]
    opt_f.step()
    # (2) generator on new fresh samples; fake score in eval; published generator_loss
    G.train()
    fake.eval()
    z = torch.randn(B, *SHAPE)
    c = labels()
    images = G(cfg.sigma_init * z, torch.full((B,), cfg.sigma_init), c)
    sigma = reference.generator_sigma(B, cfg.tmax)
    n = torch.randn_like(images) * sigma.view(-1, 1, 1, 1)
    y_real, y_fake = teacher(images + n, sigma, c), fake(images + n, sigma, c)
    loss_g = published_generator_loss(y_real, y_fake, images, cfg.sid_alpha).sum().mul(cfg.loss_scale_g / B)
    grads_g = torch.autograd.grad(loss_g, list(G.parameters()))
    for p, g in zip(G.parameters(), grads_g):
        p.grad = g
    opt_g.step()
    return grads_g, grads_f


@pytest.mark.parametrize("num_classes", [0, 3])
def test_first_iteration_matches_the_published_loop(tmp_path, num_classes):
    # noise "torch": the published torch.randn draws (tests/ops/test_noise.py covers the kernel's noise)
    cfg = quiet(run_dir=str(tmp_path / "r"), iterations=1, batch=6, lr=1e-3, noise="torch")
    seen = {}

    def grab(state):
        seen["g"] = [p.grad.clone() for p in state["generator"].parameters()]
        seen["f"] = [p.grad.clone() for p in state["fake"].parameters()]

    res = distill(cfg, tiny_teacher(num_classes), callbacks=[grab], log=None)

    teacher = tiny_teacher(num_classes).eval().requires_grad_(False)
    G, fake = tiny_teacher(num_classes), tiny_teacher(num_classes)
    opt_g = torch.optim.Adam(G.parameters(), lr=1e-3, betas=(0.0, 0.999), eps=1e-8)
    opt_f = torch.optim.Adam(fake.parameters(), lr=1e-3, betas=(0.0, 0.999), eps=1e-8)
    seed_everything(cfg.seed)
    grads_g, grads_f = _published_iteration(teacher, G, fake, cfg, opt_g, opt_f, num_classes)
    # Both sides run the same network kernels on the same batch; only the loss differs, whose fused sum and
    # normalizer w (a mean over N = 16 features) round in another order: a relative error of about N * 2^-24 in
    # the loss gradient, carried linearly through the networks' backward. 1e-4 of each tensor's scale is 100x that.
    for a, b in list(zip(seen["f"], grads_f)) + list(zip(seen["g"], grads_g)):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-4 * float(b.abs().max()))
    assert any(g.abs().sum() > 0 for g in grads_g)
    # Adam's first step (beta1 = 0) moves each weight by lr * g / (|g| + eps): a gradient difference dg moves it by
    # at most lr * |dg| / eps (capped at 2 lr), plus the rounding of p - step in float32.
    lr = 1e-3  # cfg.lr
    eps = 1e-8  # Adam's eps
    for a, b, ga, gb in zip(res.generator.network.parameters(), G.parameters(), seen["g"], grads_g):
        bound = torch.clamp(lr * (ga - gb).abs() / eps, max=2 * lr) + 4 * 2.0 ** -24 * b.abs() + 1e-12
        assert bool(((a - b).abs() <= bound).all()), float(((a - b).abs() - bound).max())
    # EMA after the first update equals G (EDM: half-life ramps from 0 images)
    assert_bitwise(states(res.generator_ema), states(res.generator))


def test_fresh_samples_modes_and_gradients_per_phase(tmp_path):
    """Two generator calls per iteration with different latents (no batch reuse); G in eval without grad for the
    fake update and in train with grad for its own; the score networks get no weight gradients from the SiD loss."""
    calls = []

    class Spy(nn.Module):
        def __init__(self, net, name):
            super().__init__()
            self.net, self.tag = net, name

        def forward(self, x, sigma, class_labels=None):
            calls.append((self.tag, self.training, torch.is_grad_enabled(), x.detach().clone()))
            return self.net(x, sigma, class_labels)

    teacher = tiny_teacher()
    G, fake = Spy(tiny_teacher(), "G"), Spy(tiny_teacher(), "fake")
    fake_hits = []
    for p in fake.parameters():
        p.register_hook(lambda g: fake_hits.append(1))
    res = distill(quiet(run_dir=str(tmp_path / "r"), iterations=2), teacher, generator=G, fake=fake, log=None)
    tags = [(t, tr, ge) for t, tr, ge, _ in calls]
    one = [("G", False, False), ("fake", True, True), ("G", True, True), ("fake", False, True)]
    assert tags == one * 2
    g_inputs = [x for t, _, _, x in calls if t == "G"]
    assert all(not torch.equal(a, b) for i, a in enumerate(g_inputs) for b in g_inputs[i + 1:])
    # fake parameters receive gradients only in their own phase (2 iterations x their 2 parameters tensors x 2)
    assert len(fake_hits) == 2 * len(list(fake.parameters()))
    assert res.iteration == 2
    assert all(p.grad is None and not p.requires_grad for p in teacher.parameters())
    assert not teacher.training


def test_gradient_accumulation_equals_the_full_batch_loss_scale(tmp_path):
    """batch_gpu splits a process's batch into rounds; the loss stays sum / batch (published batch_gpu_total)."""
    seen = {}

    def grab(state):
        seen[state["iteration"]] = [p.grad.clone() for p in state["generator"].parameters()]

    distill(quiet(run_dir=str(tmp_path / "a"), iterations=1, batch=8, batch_gpu=4), tiny_teacher(),
            callbacks=[grab], log=None)
    acc = seen.pop(1)
    distill(quiet(run_dir=str(tmp_path / "b"), iterations=1, batch=4), tiny_teacher(), callbacks=[grab], log=None)
    half = seen.pop(1)
    # different samples, so only the scale can be compared: each round contributes about half a full batch
    ratio = sum(g.norm() for g in acc) / sum(g.norm() for g in half)
    assert 0.2 < ratio < 5
    with pytest.raises(ValueError, match="--batch-gpu .* must divide"):
        distill(quiet(run_dir=str(tmp_path / "c"), batch=8, batch_gpu=3), tiny_teacher(), log=None)


# ---------------- EMA, NaN handling, precision ----------------


def test_ema_follows_the_formula_over_iterations(tmp_path):
    snaps = []
    distill(quiet(run_dir=str(tmp_path / "r"), iterations=3, lr=1e-2), tiny_teacher(),
            callbacks=[lambda s: snaps.append((states(s["generator"]), states(s["generator_ema"])))], log=None)
    for i in (1, 2):
        beta = ema_beta(8 * i, 8, 500, 0.05)
        g, e_prev, e = snaps[i][0], snaps[i - 1][1], snaps[i][1]
        for k in e:
            assert torch.equal(e[k], g[k].lerp(e_prev[k], beta)), k
        assert any(not torch.equal(e[k], g[k]) for k in e)


def test_nan_samples_are_dropped_and_training_continues(tmp_path):
    class SometimesNaN(nn.Module):
        def __init__(self):
            super().__init__()
            self.net = tiny_teacher()
            self.image_shape = SHAPE

        def forward(self, x, sigma, class_labels=None):
            out = self.net(x, sigma, class_labels)
            return torch.cat([torch.full_like(out[:1], float("nan")), out[1:]])

    losses = []
    res = distill(quiet(run_dir=str(tmp_path / "r"), iterations=3, lr=1e-3), tiny_teacher(), generator=SometimesNaN(),
                  callbacks=[lambda s: losses.append((float(s["loss_g"]), float(s["loss_fake"])))], log=None)
    assert all(math.isfinite(a) and math.isfinite(b) for a, b in losses)
    assert all(torch.isfinite(p).all() for p in res.generator.parameters())
    assert all(torch.isfinite(p).all() for p in res.fake.parameters())
    assert any(not torch.equal(a, b) for a, b in zip(res.generator.network.net.parameters(),
                                                      tiny_teacher().parameters()))


@pytest.mark.parametrize("precision", ["bf16", "fp16"])
def test_autocast_keeps_float32_master_weights(tmp_path, precision):
    res = distill(quiet(run_dir=str(tmp_path / "r"), iterations=2, lr=1e-3, precision=precision), tiny_teacher(),
                  log=None)
    for net in (res.generator, res.fake, res.generator_ema):
        assert all(p.dtype == torch.float32 and torch.isfinite(p).all() for p in net.parameters())
    assert math.isfinite(res.last["loss_g"]) and math.isfinite(res.last["loss_fake"])
    assert any(not torch.equal(a, b) for a, b in zip(res.generator.parameters(), tiny_teacher().parameters()))


# ---------------- checkpoints and resume ----------------

@pytest.mark.parametrize("num_classes, batch_gpu", [(0, None), (3, 4)])
def test_interrupted_and_resumed_run_is_bitwise_identical(tmp_path, num_classes, batch_gpu):
    kw = dict(iterations=7, batch=8, batch_gpu=batch_gpu, lr=1e-3, checkpoint_every=2, log_every=2)
    full = distill(quiet(run_dir=str(tmp_path / "full"), **kw), tiny_teacher(num_classes), log=None)

    def interrupt(state):
        if state["iteration"] == 3:
            os.kill(os.getpid(), signal.SIGINT)  # handled: finish the iteration, save, return

    before = signal.getsignal(signal.SIGINT)  # Python's default, or SIG_IGN in a background job
    part = distill(quiet(run_dir=str(tmp_path / "part"), **kw), tiny_teacher(num_classes), callbacks=[interrupt],
                   log=None)
    assert part.interrupted == "SIGINT" and part.iteration == 3
    assert signal.getsignal(signal.SIGINT) is before  # handler restored
    resumed = distill(quiet(run_dir=str(tmp_path / "part"), resume="auto", **kw), tiny_teacher(num_classes),
                      log=None)
    assert resumed.iteration == 7 and resumed.nimg == 56 and resumed.interrupted is None
    assert_same_run(full, resumed)
    # the training did move the weights, so equality is not trivial
    assert any(not torch.equal(a, b) for a, b in zip(full.generator.network.parameters(),
                                                      tiny_teacher(num_classes).parameters()))
    # metrics continue where they stopped; the torn run logged iterations 2 (periodic) and 3 (stop is not logged)
    its = [r["iteration"] for r in map(json.loads, (tmp_path / "part" / "metrics.jsonl").read_text().splitlines())]
    assert its == [2, 4, 6, 7]


def _record_optimizer_settings(monkeypatch) -> list:
    """The settings of every Adam step's parameter group (without its parameters), in order (the fake
    score's and the generator's alternate)."""
    seen = []
    step = torch.optim.Adam.step

    def recording_step(self, *args, **kwargs):
        seen.append({k: v for k, v in self.param_groups[0].items() if k != "params"})
        return step(self, *args, **kwargs)

    monkeypatch.setattr(torch.optim.Adam, "step", recording_step)
    return seen


def test_lr_cooldown_lowers_both_learning_rates_linearly_over_the_runs_end(tmp_path, monkeypatch):
    seen = _record_optimizer_settings(monkeypatch)
    distill(quiet(run_dir=str(tmp_path / "r"), lr=1e-3, fake_lr=2e-3, lr_cooldown=0.75), tiny_teacher(), log=None)
    # 4 iterations, the last 3 cooling: factors 1, 3/3, 2/3, 1/3 (min(1, (n - i) / (c n)), n = 4, c n = 3);
    # each iteration steps the fake score first, then the generator
    factors = [1.0, 1.0, 2 / 3, 1 / 3]
    assert [g["lr"] for g in seen[0::2]] == pytest.approx([2e-3 * f for f in factors], rel=1e-12)
    assert [g["lr"] for g in seen[1::2]] == pytest.approx([1e-3 * f for f in factors], rel=1e-12)
    seen.clear()
    distill(quiet(run_dir=str(tmp_path / "constant"), lr=1e-3), tiny_teacher(), log=None)
    assert [g["lr"] for g in seen] == [1e-3] * 8  # the default: the published constant rate


def test_a_run_with_cooldown_resumes_bitwise(tmp_path):
    full, resumed = stopped_and_resumed(tmp_path, tiny_teacher, lr=1e-3, lr_cooldown=0.75)
    assert_same_run(full, resumed)
    constant = distill(quiet(run_dir=str(tmp_path / "constant"), lr=1e-3), tiny_teacher(), log=None)
    assert _differ(full.generator, constant.generator)  # the cooldown is in effect


def test_resuming_with_other_optimizer_options_uses_them(tmp_path, monkeypatch):
    # a checkpoint's optimizer state carries its hyperparameters; the resumed run's options must win
    run = tmp_path / "r"
    distill(quiet(run_dir=str(run), lr=1e-3), tiny_teacher(), callbacks=[lambda s: s["iteration"] == 2],
            log=None)
    # as if written elsewhere: optimizer settings no option of this run asked for
    data = torch.load(run / "checkpoint.pt", weights_only=True)
    for name in ("opt_g", "opt_fake"):
        data[name]["param_groups"][0].update(maximize=True, foreach=True, weight_decay=0.5)
    torch.save(data, run / "checkpoint.pt")
    seen = _record_optimizer_settings(monkeypatch)
    with pytest.warns(UserWarning, match="changed options.*lr.*betas"):
        distill(quiet(run_dir=str(run), resume="auto", lr=5e-4, betas=(0.5, 0.99), adam_eps=1e-7), tiny_teacher(),
                log=None)
    assert len(seen) == 4  # iterations 3 and 4, two optimizers each
    fresh = torch.optim.Adam([nn.Parameter(torch.zeros(1))]).param_groups[0]
    for group in seen:
        assert (group["lr"], tuple(group["betas"]), group["eps"]) == (5e-4, (0.5, 0.99), 1e-7)
        assert (group["maximize"], group["foreach"], group["weight_decay"]) == \
            (fresh["maximize"], fresh["foreach"], fresh["weight_decay"])


def test_resuming_a_cooling_run_with_other_iterations_warns(tmp_path):
    run = str(tmp_path / "r")
    distill(quiet(run_dir=run, lr=1e-3, lr_cooldown=0.75), tiny_teacher(),
            callbacks=[lambda s: s["iteration"] == 3], log=None)
    # iteration 3 of 4 ran at 1/3 of lr; of 8 iterations with the last 6 cooling it runs at 5/6
    with pytest.warns(UserWarning, match=r"cooldown moves to the new end.*iteration 3 are 0.833 x lr.*0.333 x lr"):
        result = distill(quiet(run_dir=run, resume="auto", lr=1e-3, lr_cooldown=0.75, iterations=8), tiny_teacher(),
                         log=None)
    assert result.iteration == 8


def test_resumed_runs_first_metrics_record_equals_the_uninterrupted_runs(tmp_path):
    # stopped at iteration 2 of a 4-iteration window: the resumed record averages iterations 1-4, as the
    # uninterrupted run's does (the partial sums travel in the checkpoint)
    stopped_and_resumed(tmp_path, tiny_teacher, iterations=8, log_every=4)
    full, part = ([json.loads(line) for line in (tmp_path / name / "metrics.jsonl").read_text().splitlines()]
                  for name in ("full", "part"))
    assert [r["iteration"] for r in part] == [r["iteration"] for r in full] == [4, 8]
    for a, b in zip(full, part):
        assert (a["loss_g"], a["loss_fake"]) == (b["loss_g"], b["loss_fake"])


def test_summary_speed_is_the_speed_of_the_iterations_as_in_metrics(tmp_path):
    res = distill(quiet(run_dir=str(tmp_path / "r"), iterations=4, sample_every=2, grid_size=4), tiny_teacher(),
                  log=None)
    summary = json.loads((tmp_path / "r" / "summary.json").read_text())
    assert summary == res.summary
    assert 0 < summary["training_seconds"] < summary["seconds"]  # grids and setup left out
    assert summary["it_per_s"] == pytest.approx(4 / summary["training_seconds"], rel=1e-3)
    records = [json.loads(line) for line in (tmp_path / "r" / "metrics.jsonl").read_text().splitlines()]
    timed = sum(1 / r["it_per_s"] for r in records)  # log_every 1: each record times one iteration
    assert summary["training_seconds"] == pytest.approx(timed, rel=0.05, abs=1e-3)


def test_another_seed_gives_other_weights(tmp_path):
    a = distill(quiet(run_dir=str(tmp_path / "a"), lr=1e-3), tiny_teacher(), log=None)
    b = distill(quiet(run_dir=str(tmp_path / "b"), lr=1e-3, seed=1), tiny_teacher(), log=None)
    assert any(not torch.equal(x, y) for x, y in zip(a.generator.parameters(), b.generator.parameters()))


def test_existing_run_needs_resume_or_overwrite(tmp_path):
    distill(quiet(run_dir=str(tmp_path / "r"), iterations=1), tiny_teacher(), log=None)
    with pytest.raises(ValueError, match="already holds checkpoint.pt.*--resume.*--overwrite.*--run-dir") as err:
        distill(quiet(run_dir=str(tmp_path / "r"), iterations=1), tiny_teacher(), log=None)
    assert "resume='auto'" not in str(err.value) and "overwrite=True" not in str(err.value)
    res = distill(quiet(run_dir=str(tmp_path / "r"), iterations=1, overwrite=True), tiny_teacher(), log=None)
    assert res.iteration == 1


def test_corrupt_checkpoint_is_refused_and_kept(tmp_path):
    run = tmp_path / "r"
    distill(quiet(run_dir=str(run), iterations=2, checkpoint_every=1), tiny_teacher(), log=None)
    ckpt = run / "checkpoint.pt"
    ckpt.write_bytes(ckpt.read_bytes()[:1000])
    torn = ckpt.read_bytes()
    with pytest.raises(CheckpointError, match=r"truncated.*checkpoint\.prev\.pt"):
        distill(quiet(run_dir=str(run), iterations=4, resume="auto"), tiny_teacher(), log=None)
    assert ckpt.read_bytes() == torn
    # the previous good checkpoint resumes; the save that follows keeps it and sets the torn file aside
    res = distill(quiet(run_dir=str(run), iterations=4, resume=str(run / "checkpoint.prev.pt")), tiny_teacher(),
                  log=None)
    assert res.iteration == 4
    assert load_checkpoint(run / "checkpoint.prev.pt", "distill")["iteration"] == 1
    assert (run / "checkpoint.unreadable.pt").read_bytes() == torn
    assert load_checkpoint(ckpt, "distill")["iteration"] == 4


def test_resuming_a_finished_run_says_so_writes_nothing_and_extends_with_more_iterations(tmp_path):
    run = tmp_path / "r"
    distill(quiet(run_dir=str(run), iterations=3, checkpoint_every=1), tiny_teacher(), log=None)
    before = {p.name: (p.read_bytes(), p.stat().st_mtime_ns) for p in run.iterdir()}
    lines = []
    res = distill(quiet(run_dir=str(run), iterations=3, resume="auto"), tiny_teacher(), log=lines.append)
    assert res.iteration == 3 and res.summary["iterations_this_run"] == 0 and res.interrupted is None
    assert len(lines) == 1 and "is complete (iteration 3 of 3)" in lines[0]
    assert "--resume" in lines[0] and "--iterations 6" in lines[0] and "resuming at" not in lines[0]
    assert {p.name: (p.read_bytes(), p.stat().st_mtime_ns) for p in run.iterdir()} == before
    # a larger --iterations continues the run exactly as a longer uninterrupted run
    lines.clear()
    extended = distill(quiet(run_dir=str(run), iterations=5, resume="auto"), tiny_teacher(), log=lines.append)
    assert "resuming at iteration 3 of 5" in lines[0]
    longer = distill(quiet(run_dir=str(tmp_path / "long"), iterations=5), tiny_teacher(), log=None)
    assert extended.iteration == 5
    assert_same_run(longer, extended)


def test_teacher_path_is_stored_absolute_and_entry_points_unchanged(tmp_path, monkeypatch):
    from sidfast.models.io import load_network, save_network

    (tmp_path / "a").mkdir()
    (tmp_path / "b").mkdir()
    monkeypatch.chdir(tmp_path / "a")
    save_network("teacher.pt", tiny_teacher(), "nets:build_tiny", {})
    distill(quiet(run_dir="r", iterations=1, teacher="teacher.pt"), tiny_teacher(), log=None)
    data = torch.load("r/checkpoint.pt", weights_only=True)
    where = str((tmp_path / "a" / "teacher.pt").resolve())
    assert data["teacher"] == where and data["config"]["teacher"] == where
    monkeypatch.chdir(tmp_path / "b")
    load_network(data["teacher"])  # another working directory still finds it
    distill(quiet(run_dir="e", iterations=1, teacher="nets:tiny_teacher"), tiny_teacher(), log=None)
    assert torch.load("e/checkpoint.pt", weights_only=True)["teacher"] == "nets:tiny_teacher"


def test_plain_progress_lines_off_a_terminal(tmp_path, monkeypatch):
    """Under pytest stderr is not a terminal: no bar, a log line per metrics record (at most one per interval)."""
    from sidfast.utils import runtime

    monkeypatch.setattr(runtime.Progress, "interval_s", 0.0)
    lines = []
    distill(quiet(run_dir=str(tmp_path / "a"), iterations=4, log_every=2, progress=True), tiny_teacher(),
            log=lines.append)
    progress = [x for x in lines if x.startswith("iteration ")]
    assert [x.split()[1] for x in progress] == ["2/4", "4/4"]
    for word in ("kimg 0.0", "loss_g", "loss_fake", "img/s", "ETA"):
        assert word in progress[0], word
    monkeypatch.setattr(runtime.Progress, "interval_s", 3600.0)
    lines.clear()
    distill(quiet(run_dir=str(tmp_path / "b"), iterations=5, log_every=1), tiny_teacher(), log=lines.append)
    assert [x.split()[1] for x in lines if x.startswith("iteration ")] == ["1/5", "5/5"]  # first, then the end
    # on a terminal the bar shows the progress instead
    monkeypatch.setattr(runtime.sys.stderr, "isatty", lambda: True, raising=False)
    lines.clear()
    distill(quiet(run_dir=str(tmp_path / "c"), iterations=2, log_every=1, progress=True), tiny_teacher(),
            log=lines.append)
    assert not [x for x in lines if x.startswith("iteration ")]


def test_checkpoint_of_another_architecture_is_refused(tmp_path):
    distill(quiet(run_dir=str(tmp_path / "r"), iterations=1), tiny_teacher(hidden=16), log=None)
    with pytest.raises(CheckpointError, match="does not fit these networks"):
        distill(quiet(run_dir=str(tmp_path / "r"), iterations=2, resume="auto"), tiny_teacher(hidden=32), log=None)
    with pytest.raises(CheckpointError, match="does not exist"):
        distill(quiet(run_dir=str(tmp_path / "x"), resume="auto"), tiny_teacher(), log=None)


def test_checkpoint_contents(tmp_path):
    distill(quiet(run_dir=str(tmp_path / "r"), iterations=2), tiny_teacher(2),
            architecture={"builder": "nets:build_tiny", "config": {"num_classes": 2}}, log=None)
    data = torch.load(tmp_path / "r" / "checkpoint.pt", weights_only=True)
    assert data["format"] == "sidfast.distill" and data["iteration"] == 2 and data["nimg"] == 16
    assert data["world_size"] == 1 and len(data["rng"]) == 1
    assert data["num_classes"] == 2 and data["label_format"] == "onehot" and data["image_shape"] == [1, 4, 4]
    assert data["architecture"]["builder"] == "nets:build_tiny"
    assert set(data) >= {"generator", "generator_ema", "fake", "opt_g", "opt_fake", "config"}


# ---------------- outputs ----------------

def test_run_directory_outputs(tmp_path):
    lines = []
    run = tmp_path / "r"
    res = distill(quiet(run_dir=str(run), iterations=4, log_every=2, sample_every=2, grid_size=8, teacher_steps=2,
                        checkpoint_every=2), tiny_teacher(), log=lines.append)
    names = {p.name for p in run.iterdir()}
    assert {"teacher.png", "student_init.png", "student_000002.png", "student.png", "losses.png", "metrics.jsonl",
            "summary.json", "config.json", "checkpoint.pt"} <= names
    recs = [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines()]
    assert [r["iteration"] for r in recs] == [2, 4]
    assert {"loss_g", "loss_fake", "it_per_s", "img_per_s", "nimg", "seconds"} <= set(recs[0])
    assert json.loads((run / "summary.json").read_text())["iterations"] == 4
    assert any("SiD distillation" in x and "img_per_s" in x for x in lines)
    assert res.summary["images"] == 32
    from matplotlib import image as mpimg

    assert mpimg.imread(run / "student.png").ndim in (2, 3)


def test_image_shape_must_be_known(tmp_path):
    class Bare(nn.Module):
        def __init__(self):
            super().__init__()
            self.w = nn.Parameter(torch.ones(()))

        def forward(self, x, sigma, class_labels=None):
            return x * self.w

    with pytest.raises(ValueError, match="cannot determine the image shape.*--image-shape"):
        distill(quiet(run_dir=str(tmp_path / "r")), Bare(), log=None)
    res = distill(quiet(run_dir=str(tmp_path / "r"), iterations=1, image_shape=(2, 3)), Bare(), log=None)
    assert res.iteration == 1


@requires_cuda
@pytest.mark.parametrize("engine", ["eager", "fused"])
def test_cuda_run_is_a_device_switch(tmp_path, engine):
    res = distill(quiet(run_dir=str(tmp_path / "r"), iterations=2, device="cuda", precision="bf16", engine=engine,
                        grid_size=4, teacher_steps=2), tiny_teacher(), log=None)
    assert next(res.generator.parameters()).is_cuda and math.isfinite(res.last["loss_g"])


@requires_gpus(2)
@pytest.mark.parametrize("engine", ["eager", "fused"])
def test_a_run_on_the_second_gpu_makes_it_the_current_device(tmp_path, engine):
    torch.cuda.set_device(0)
    res = distill(quiet(run_dir=str(tmp_path / "r"), iterations=2, device="cuda:1", engine=engine, grid_size=4,
                        teacher_steps=2), tiny_teacher(), log=None)
    assert next(res.generator.parameters()).device == torch.device("cuda", 1)
    assert torch.cuda.current_device() == 1 and math.isfinite(res.last["loss_g"])


@pytest.mark.parametrize("num_classes", [0, 3])
def test_fused_engine_path_matches_the_eager_path(tmp_path, num_classes):
    """engine="fused" (sidfast.engine.scores over frozen views) trains bitwise like two eager calls on CPU."""
    kw = dict(iterations=3, lr=1e-3)
    eager = distill(quiet(run_dir=str(tmp_path / "e"), **kw), tiny_teacher(num_classes), log=None)
    fused = distill(quiet(run_dir=str(tmp_path / "s"), engine="fused", **kw), tiny_teacher(num_classes),
                    log=None)
    for name in ("generator", "generator_ema", "fake"):
        a, b = states(getattr(eager, name)), states(getattr(fused, name))
        for k in a:
            assert torch.equal(a[k], b[k]), (name, k)
    assert any(not torch.equal(a, b) for a, b in zip(fused.generator.network.parameters(),
                                                      tiny_teacher(num_classes).parameters()))


# ---------------- LoRA fake score and torch.compile options ----------------

@pytest.mark.parametrize("engine", ["eager", "fused"])
def test_lora_fake_score_trains_low_rank_factors_over_the_frozen_teacher(tmp_path, engine):
    teacher = tiny_teacher(3)
    before = states(teacher)
    res = distill(quiet(run_dir=str(tmp_path / "r"), iterations=3, lr=1e-3, fake_score="lora", lora_rank=4,
                        engine=engine, checkpoint_every=3), teacher, log=None)
    assert_bitwise(before, states(teacher))  # the shared weights are never trained
    trainable = {n for n, p in res.fake.named_parameters() if p.requires_grad}
    assert trainable and all(n.endswith((".lora_A", ".lora_B")) for n in trainable)
    assert any(p.abs().sum() > 0 for n, p in res.fake.named_parameters() if n.endswith(".lora_B"))  # B left zero
    saved = torch.load(tmp_path / "r" / "checkpoint.pt", weights_only=True)["fake"]
    assert saved and all(k.endswith((".lora_A", ".lora_B")) for k in saved)  # no copy of the teacher


def test_lora_engine_path_matches_the_eager_lora_path(tmp_path):
    """One forward over [x_t; x_t] with the update on the fake half trains like two separate eager calls."""
    kw = dict(iterations=1, lr=1e-3, fake_score="lora", lora_rank=4)
    seen = {}

    def grab(name):
        def callback(state):
            seen[name] = [[p.grad.clone() for p in state[net].parameters() if p.grad is not None]
                          for net in ("generator", "fake")]
        return callback

    eager = distill(quiet(run_dir=str(tmp_path / "e"), **kw), tiny_teacher(3), callbacks=[grab("e")], log=None)
    fused = distill(quiet(run_dir=str(tmp_path / "s"), engine="fused", **kw), tiny_teacher(3),
                    callbacks=[grab("s")], log=None)
    # Same networks and batch; the doubled batch may take another matmul blocking, a relative rounding difference
    # of about K * 2^-24 (K <= 64 terms per dot product here) carried linearly into the gradients: 1e-4 of each
    # tensor's scale is far above it, and far below what a wrong fake half changes (the whole fake term).
    for grads_e, grads_s in zip(seen["e"], seen["s"]):
        assert len(grads_e) == len(grads_s) > 0
        for a, b in zip(grads_e, grads_s):
            torch.testing.assert_close(b, a, rtol=1e-4, atol=1e-4 * float(a.abs().max()))
    # Adam's first step (beta1 = 0) moves each weight by lr * g / (|g| + eps): a gradient difference dg moves it
    # by at most lr * |dg| / eps, capped at 2 lr, plus the rounding of p - step in float32.
    lr = kw["lr"]
    eps = 1e-8  # Adam's eps
    for name, index in (("generator", 0), ("fake", 1)):
        params_e = [p for p in getattr(eager, name).parameters() if p.requires_grad]
        params_s = [p for p in getattr(fused, name).parameters() if p.requires_grad]
        for pe, ps, ge, gs in zip(params_e, params_s, seen["e"][index], seen["s"][index]):
            bound = torch.clamp(lr * (ge - gs).abs() / eps, max=2 * lr) + 4 * 2.0 ** -24 * pe.abs() + 1e-12
            assert bool(((pe - ps).abs() <= bound).all()), float(((pe - ps).abs() - bound).max())
    moved = [(a - b).abs().max() for a, b in zip(fused.generator.network.parameters(), tiny_teacher(3).parameters())]
    assert max(moved) > 0.5 * kw["lr"]  # the generator did train


def test_lora_run_resumes_bitwise_and_refuses_a_full_checkpoint(tmp_path):
    kw = dict(iterations=5, lr=1e-3, fake_score="lora", lora_rank=4, checkpoint_every=2, log_every=2)
    assert_same_run(*stopped_and_resumed(tmp_path, tiny_teacher, **kw))
    distill(quiet(run_dir=str(tmp_path / "plain"), iterations=1, checkpoint_every=1), tiny_teacher(), log=None)
    with pytest.raises(CheckpointError, match="LoRA"), pytest.warns(UserWarning, match="--fake-score"):
        distill(quiet(run_dir=str(tmp_path / "plain"), resume="auto", **kw), tiny_teacher(), log=None)


def test_lora_option_errors(tmp_path):
    with pytest.raises(ValueError, match="fake_score"):
        quiet(fake_score="half").validate()
    with pytest.raises(ValueError, match="lora_rank"):
        quiet(fake_score="lora", lora_rank=0).validate()
    with pytest.raises(ValueError, match="no fake network"):
        distill(quiet(run_dir=str(tmp_path / "r"), fake_score="lora"), tiny_teacher(), fake=tiny_teacher(), log=None)


def test_compile_option_compiles_generator_and_score_networks(tmp_path, monkeypatch):
    compiled = []

    def recording_compile(fn, *args, **kwargs):  # stands in for torch.compile: records, runs eagerly
        compiled.append(fn)
        return fn

    monkeypatch.setattr(torch, "compile", recording_compile)
    res = distill(quiet(run_dir=str(tmp_path / "r"), iterations=2, compile=True, engine="fused"),
                  tiny_teacher(), log=None)
    assert res.generator in compiled  # the generator (training forward and sampling)
    names = [getattr(f, "__name__", "") for f in compiled]
    assert "_nan_to_num_" in names and names.count("run") == 2  # gradient clean-up, both engine phases
    compiled.clear()
    distill(quiet(run_dir=str(tmp_path / "e"), iterations=1, compile=True), tiny_teacher(), log=None)
    assert sum(isinstance(f, nn.Module) for f in compiled) == 3  # G (train), G (sampling), fake score


# ---------------- noise sources (option noise) and the folded generator loss scale ----------------


def _differ(net_a, net_b) -> bool:
    return any(not torch.equal(a, b) for a, b in zip(net_a.parameters(), net_b.parameters()))


def _philox_randn_like(drawn):
    """torch.randn_like's stand-in: the kernel's eps for the seed that the kernel route draws at the same
    point of torch's RNG stream (``sidfast.ops.noise``: draw_seed, regenerate_noise)."""
    from sidfast.ops.noise import draw_seed, regenerate_noise

    def randn_like(x, **_):
        seed = draw_seed(x.device)
        drawn.append(seed)
        return regenerate_noise(seed, x.shape).to(x.dtype)

    return randn_like


@pytest.mark.parametrize("engine", ["eager", "fused"])
def test_kernel_noise_iterations_equal_torch_noise_iterations_fed_the_same_eps(tmp_path, monkeypatch, engine):
    """noise kernel (x_t noised in-kernel, the fake-score loss regenerating eps from the seed) trains exactly
    like the torch.randn path fed the kernel's eps: both compute x_g + sigma * eps with one rounding of the
    product and one of the sum (a = 1 is exact), and the networks and losses see the same tensors."""
    kw = dict(iterations=2, lr=1e-3, engine=engine, batch=8, batch_gpu=4)
    kernel = distill(quiet(run_dir=str(tmp_path / "k"), noise="kernel", **kw), tiny_teacher(3), log=None)
    drawn = []
    with monkeypatch.context() as m:
        m.setattr(torch, "randn_like", _philox_randn_like(drawn))
        fed = distill(quiet(run_dir=str(tmp_path / "f"), noise="torch", **kw), tiny_teacher(3), log=None)
    assert len(drawn) == 2 * 2 * 2  # iterations x phases x micro-batches
    plain = distill(quiet(run_dir=str(tmp_path / "t"), noise="torch", **kw), tiny_teacher(3), log=None)
    assert_same_run(kernel, fed)
    # the option is in effect: torch.randn's own noise trains other weights
    assert _differ(kernel.generator, plain.generator)


def test_kernel_noise_runs_are_reproducible_and_resume_bitwise(tmp_path):
    kw = dict(iterations=5, lr=1e-3, noise="kernel", checkpoint_every=2, log_every=2)
    full = distill(quiet(run_dir=str(tmp_path / "full"), **kw), tiny_teacher(), log=None)
    again = distill(quiet(run_dir=str(tmp_path / "again"), **kw), tiny_teacher(), log=None)
    other = distill(quiet(run_dir=str(tmp_path / "other"), seed=1, **kw), tiny_teacher(), log=None)

    def interrupt(state):
        if state["iteration"] == 3:
            os.kill(os.getpid(), signal.SIGINT)

    part = distill(quiet(run_dir=str(tmp_path / "part"), **kw), tiny_teacher(), callbacks=[interrupt],
                   log=None)
    assert part.iteration == 3
    resumed = distill(quiet(run_dir=str(tmp_path / "part"), resume="auto", **kw), tiny_teacher(), log=None)
    assert_same_run(full, again)
    assert_same_run(full, resumed)
    assert _differ(full.generator, other.generator)


def test_default_noise_on_the_native_cpu_route_is_torch_randn(tmp_path, native_cpu_route):
    kw = dict(iterations=2, lr=1e-3)
    auto = distill(quiet(run_dir=str(tmp_path / "a"), **kw), tiny_teacher(), log=None)
    plain = distill(quiet(run_dir=str(tmp_path / "t"), noise="torch", **kw), tiny_teacher(), log=None)
    kernel = distill(quiet(run_dir=str(tmp_path / "k"), noise="kernel", **kw), tiny_teacher(), log=None)
    assert_same_run(auto, plain)
    # off the Triton route, noise kernel is the same Philox stream computed in PyTorch: other draws
    assert _differ(kernel.generator, plain.generator)


@pytest.mark.parametrize("route", ["native", "triton"])
def test_folded_generator_loss_scale_gives_the_unfolded_gradients(tmp_path, monkeypatch, request, route):
    """loss_scale_g / rounds passed into the fused generator loss gives the gradients of scaling its result
    (bitwise on the native CPU route, where the op multiplies its result the same way; within float32
    rounding of the gradients on the Triton route, where the scale enters the kernel's gradient factor), and
    the reported loss_g is the unscaled mean within float32 rounding."""
    import sidfast.training.sid as phases_module
    from sidfast.loss import sid_generator_loss

    if route == "native":
        request.getfixturevalue("native_cpu_route")
    kw = dict(iterations=1, batch=8, batch_gpu=4, lr=1e-3, noise="torch")
    seen = {}

    def grab(state):
        seen[state["generator"]] = [p.grad.clone() for p in state["generator"].parameters()]

    folded = distill(quiet(run_dir=str(tmp_path / "f"), **kw), tiny_teacher(), callbacks=[grab], log=None)
    unscaled = []

    scales = []

    def unfolded(y_real, y_fake, x_g, alpha, reduction, loss_scale):
        loss = sid_generator_loss(y_real, y_fake, x_g, alpha, reduction)
        unscaled.append(loss.detach())
        scales.append(loss_scale)
        return loss * loss_scale

    with monkeypatch.context() as m:
        m.setattr(phases_module, "sid_generator_loss", unfolded)
        plain = distill(quiet(run_dir=str(tmp_path / "u"), **kw), tiny_teacher(), callbacks=[grab], log=None)
    assert scales == [100.0 / 2] * 2  # the trainer hands loss_scale_g / rounds to the loss
    for a, b in zip(seen[folded.generator], seen[plain.generator]):
        if route == "native":
            assert torch.equal(a, b)
        else:
            torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5 * float(b.abs().max()))
    assert any(g.abs().sum() > 0 for g in seen[folded.generator])
    exact = sum(float(u) for u in unscaled) / 2
    # per micro-batch: the scale applied and divided back (a few float32 roundings), then the mean of two
    bound = 8 * 2.0 ** -24 * sum(abs(float(u)) for u in unscaled)
    assert abs(folded.last["loss_g"] - exact) <= bound
