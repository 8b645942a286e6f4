"""SiDA and SiD2A in the trainer: two iterations against a hand-written published loop, the warm-up gates,
metrics, bitwise resume with the real-data position, SiD2A's start, and the user errors."""
import json
import os
import signal

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from sidfast import reference
from sidfast.models.io import CheckpointError, load_checkpoint
from sidfast.training.data import DataError, RealData
from sidfast.utils.runtime import seed_everything
from sidfast.training.loop import TrainConfig, distill
from torch import nn

from nets import SHAPE, TinyEDM, tiny_teacher
from runs import LAYER, assert_bitwise, assert_same_run, quiet, real_images, resolved, sida, states
from utils import run_main, user_error



def encoder_logits(net, x, sigma, labels):
    """TinyEDM's discriminator logits by hand: the feature mean of ``inp``'s output."""
    s = sigma.reshape(-1, 1)
    parts = [x.flatten(1) / (s ** 2 + 0.25).sqrt(), s.log() / 4] + ([labels] if net.num_classes else [])
    return net.inp(torch.cat(parts, 1)).mean(1, keepdim=True)


def _published_sida_iteration(teacher, G, fake, cfg, opt_g, opt_f, stream, num_classes, nimg):
    """One iteration as the published ``sida_training_loop.py`` and ``sida_loss.py`` run it, with one
    micro-batch, each update taking the next batch of the data loader ``stream``; returns the (clipped)
    fake-score gradients and the generator's gradients."""
    real, real_idx = next(stream)
    cfg = resolved(cfg, teacher)
    B = cfg.batch
    onehot = (lambda idx: F.one_hot(idx, num_classes).float()) if num_classes else (lambda idx: None)
    c = onehot(real_idx)
    # (1) fake score + discriminator: G in eval without grad, for the real batch's labels
    G.eval()
    fake.train()
    z = torch.randn(B, *SHAPE)
    with torch.no_grad():
        images = G(cfg.sigma_init * z, torch.full((B,), cfg.sigma_init), c)
    sigma = (torch.randn(B) * cfg.p_std + cfg.p_mean).exp()
    weight = (sigma ** 2 + cfg.sigma_data ** 2) / (sigma * cfg.sigma_data) ** 2
    n = torch.randn_like(images) * sigma.view(-1, 1, 1, 1)
    y_fake = fake(images + n, sigma, c)
    logit_fake = encoder_logits(fake, images + n, sigma, c)
    logit_real = encoder_logits(fake, real + n, sigma, c)  # the same noise and sigma
    loss_f = (weight.view(-1, 1, 1, 1) * (y_fake - images) ** 2).sum() / B
    loss_d = reference.sida_discriminator_loss(logit_real, logit_fake, sigma, cfg.sigma_data)
    opt_f.zero_grad(set_to_none=True)
    (loss_f + loss_d).backward()
    for p in fake.parameters():
        torch.nan_to_num(p.grad, nan=0, posinf=1e5, neginf=-1e5, out=p.grad)
    torch.nn.utils.clip_grad_value_(fake.parameters(), 1)
    grads_f = [p.grad.clone() for p in fake.parameters()]
    opt_f.step()
    # (2) generator: the labels of the next real batch (its images unused), the logits D from the fake score
    G.train()
    fake.eval()
    _, gen_idx = next(stream)
    c = onehot(gen_idx)
    z = torch.randn(B, *SHAPE)
    images = G(cfg.sigma_init * z, torch.full((B,), cfg.sigma_init), c)
    sigma = reference.generator_sigma(B, cfg.tmax)
    x_t = images + torch.randn_like(images) * sigma.view(-1, 1, 1, 1)
    y_real = teacher(x_t, sigma, c)
    y_fake = fake(x_t, sigma, c)
    logits = encoder_logits(fake, x_t, sigma, c)
    loss_sid, loss_gan = reference.sida_generator_loss(y_real, y_fake, images, logits, alpha=1.0)
    loss_g = 100 * loss_sid
    if nimg > cfg.gan_start_kimg * 1000:
        loss_g = 0.5 * loss_g + 0.5 * 0.01 * loss_gan
    grads_g = torch.autograd.grad(loss_g, list(G.parameters()))
    if nimg > cfg.g_start_kimg * 1000:
        for p, g in zip(G.parameters(), grads_g):
            p.grad = g
        opt_g.step()
    return grads_f, list(grads_g)


@pytest.mark.parametrize("num_classes, gan_start_kimg", [(0, 0.004), (0, 1.0), (3, 0.004)])
def test_two_iterations_match_the_published_loop(tmp_path, num_classes, gan_start_kimg):
    """Batch 6: iteration 1 sees 0 images (no GAN term, no generator step), iteration 2 sees 6 (> 4: the GAN
    term joins and G steps, unless gan_start is 1000 images)."""
    cfg = sida(tmp_path, num_classes=num_classes, iterations=2, batch=6, lr=1e-3, noise="torch",
               gan_start_kimg=gan_start_kimg, g_start_kimg=0.004)
    seen = []

    def grab(state):
        seen.append(([p.grad.clone() for p in state["fake"].parameters()],
                     [p.grad.clone() for p in state["generator"].parameters()],
                     states(state["generator"].network), states(state["fake"].network)))

    res = distill(cfg, tiny_teacher(num_classes), callbacks=[grab], log=None)

    teacher = tiny_teacher(num_classes).eval().requires_grad_(False)
    G = tiny_teacher(num_classes)
    fake = tiny_teacher(num_classes)
    opt_g = torch.optim.Adam(G.parameters(), lr=1e-3, betas=(0.0, 0.999), eps=1e-8)
    opt_f = torch.optim.Adam(fake.parameters(), lr=1e-3, betas=(0.0, 0.999), eps=1e-8)
    stream = RealData(cfg.data, cfg.batch, seed=cfg.seed, num_classes=num_classes or None)
    init = states(G)  # tiny_teacher() reseeds: call it before the loop's draws
    seed_everything(cfg.seed)
    for it, nimg in enumerate((0, 6)):
        grads_f, grads_g = _published_sida_iteration(teacher, G, fake, cfg, opt_g, opt_f, stream, num_classes,
                                                     nimg)
        got_f, got_g, got_state, got_fake = seen[it]
        # Both sides run the same network kernels on the same batch (same CPU, same blocking); only the losses
        # differ, whose fused sums and normalizer w round in another order: a relative error of about
        # N * 2^-24 (N = 16 features) in the loss gradients, carried linearly through the networks' backward.
        # 1e-4 of each tensor's scale is 100x that.
        for a, b in list(zip(got_f, grads_f)) + list(zip(got_g, grads_g)):
            torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-4 * float(b.abs().max()))
        if it == 0:  # before g_start the generator's gradients are computed but not applied
            assert_bitwise(got_state, init)
            # The published loop's second iteration starts from the trainer's state, so that each compared
            # iteration differs by its own loss arithmetic only (Adam, beta1 = 0, after one step: exp_avg = g,
            # exp_avg_sq = (1 - beta2) g^2 of the step's gradient, which the trainer left in p.grad).
            fake.load_state_dict(got_fake)
            for p, g in zip(fake.parameters(), got_f):
                opt_f.state[p] = {"step": torch.tensor(1.0), "exp_avg": g.clone(), "exp_avg_sq": 1e-3 * g * g}
    assert any(g.abs().sum() > 0 for g in grads_g)
    # One Adam step from the same state moves each weight by lr * g / (sqrt(v_hat) + eps), at most about 1.5 lr
    # here (v_hat >= g^2 / 2 at step 2 and g^2 at step 1): a gradient difference dg moves it by at most
    # lr * |dg| / eps, capped at 3 lr, plus the rounding of p - step in float32.
    lr = 1e-3  # cfg.lr
    eps = 1e-8  # Adam's eps
    last_f, last_g = seen[1][0], seen[1][1]
    pairs = list(zip(res.generator.network.parameters(), G.parameters(), last_g, grads_g))
    pairs += list(zip(res.fake.network.parameters(), fake.parameters(), last_f, grads_f))
    for a, b, ga, gb in pairs:
        bound = torch.clamp(lr * (ga - gb).abs() / eps, max=3 * lr) + 4 * 2.0 ** -24 * b.abs() + 1e-12
        assert bool(((a - b).abs() <= bound).all()), float(((a - b).abs() - bound).max())
    assert any(not torch.equal(a, b) for a, b in zip(G.parameters(), tiny_teacher(num_classes).parameters()))


RGB = (3, 4, 4)


class PixelDropEDM(nn.Module):
    """TinyEDM on RGB images with dropout on its image input: the dropout mask is drawn in the input's memory
    order, so a channels-last batch draws another mask than a contiguous one for the same seed."""

    def __init__(self, num_classes=0):
        super().__init__()
        torch.manual_seed(0)
        self.num_classes = num_classes
        self.pixel_drop = nn.Dropout(0.25)
        self.net = TinyEDM(image_shape=RGB, num_classes=num_classes)
        self.inp = self.net.inp  # the discriminator's tap

    def forward(self, x, sigma, class_labels=None):
        return self.net(self.pixel_drop(x), sigma, class_labels)


@pytest.mark.parametrize("num_classes", [0, 3])
def test_real_image_pass_is_the_published_loops_bitwise(tmp_path, num_classes):
    """The fake score's encoder on the noised real images, as the published loop feeds it (its loader's uint8
    NCHW batch, contiguous, / 127.5 - 1; the same sigma and noise as the generated images): input and output
    of the tapped layer bitwise, dropout on the image included, from an RGB data set stored channels-last
    (uint8 N, H, W, C)."""
    rng = np.random.RandomState(0)
    pixels = rng.randint(0, 256, (12, RGB[1], RGB[2], RGB[0])).astype(np.uint8)
    labels = rng.randint(0, num_classes, 12) if num_classes else None
    path = tmp_path / "rgb.npz"
    np.savez(path, images=pixels, **({"labels": labels} if num_classes else {}))
    cfg = quiet(method="sida", data=str(path), disc_layer="inp", run_dir=str(tmp_path / "run"), iterations=1,
                batch=4, noise="torch", engine="eager")

    def record(net, calls):
        net.inp.register_forward_hook(lambda m, args, out: calls.append((args[0].clone(), out.clone())))

    got = []
    fake = PixelDropEDM(num_classes)
    record(fake, got)
    distill(cfg, PixelDropEDM(num_classes), fake=fake, log=None)
    # the fake-score step's calls: f_psi at the generated images, then the encoder at the real ones
    real_in, real_out = got[1]

    # the published loop: the loader's batch, then z, G (eval), sigma, n; the fake score (train) at images + n,
    # its encoder at real_images + n
    G, published_fake = PixelDropEDM(num_classes), PixelDropEDM(num_classes)
    want = []
    record(published_fake, want)
    cfg = resolved(cfg)
    order = RealData(str(path), cfg.batch, seed=cfg.seed)._batch_indices()
    seed_everything(cfg.seed)
    # EDM's dataset transposes each HWC image to CHW; the loader's collate stacks them (contiguous)
    real_images = torch.stack([torch.from_numpy(pixels[i].transpose(2, 0, 1)) for i in order])
    real_images = real_images.to(torch.float32) / 127.5 - 1
    c = F.one_hot(torch.from_numpy(labels[order]), num_classes).float() if num_classes else None
    z = cfg.sigma_init * torch.randn_like(real_images)
    G.eval()
    published_fake.train()
    with torch.no_grad():
        images = G(z, torch.full((cfg.batch,), cfg.sigma_init), c)
    sigma = (torch.randn(cfg.batch) * cfg.p_std + cfg.p_mean).exp()
    n = torch.randn_like(images) * sigma.view(-1, 1, 1, 1)
    published_fake(images + n, sigma, c)
    published_fake(real_images + n, sigma, c)
    assert torch.equal(got[0][0], want[0][0])  # the generated images' pass: the same draws up to there
    assert torch.equal(real_in, want[1][0]) and torch.equal(real_out, want[1][1])


def test_real_batches_are_contiguous(tmp_path):
    """uint8 (N, H, W, C) data comes out as contiguous (N, C, H, W) batches, not a channels-last view."""
    np.savez(tmp_path / "rgb.npz", images=np.zeros((4, 4, 4, 3), np.uint8))
    images, _ = next(RealData(str(tmp_path / "rgb.npz"), 2))
    assert images.shape == (2, 3, 4, 4) and images.is_contiguous()


def test_generator_waits_for_g_start(tmp_path):
    kw = dict(iterations=3, batch=4, lr=1e-3, g_start_kimg=0.006)  # more than 6 images seen: iteration 3
    snaps = []
    res = distill(sida(tmp_path, **kw), tiny_teacher(), log=None,
                  callbacks=[lambda s: snaps.append((states(s["generator"].network), states(s["fake"].network)))])
    init = states(tiny_teacher())
    assert_bitwise(snaps[0][0], init)
    assert_bitwise(snaps[1][0], init)
    assert any(not torch.equal(snaps[2][0][k], init[k]) for k in init)
    assert any(not torch.equal(snaps[0][1][k], init[k]) for k in init)  # the fake score trains from the start
    assert res.iteration == 3


def test_sida_run_logs_its_metrics_and_plots_them(tmp_path):
    res = distill(sida(tmp_path, iterations=4, batch=4, log_every=2, gan_start_kimg=0, g_start_kimg=0),
                  tiny_teacher(), log=None)
    records = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert [r["iteration"] for r in records] == [2, 4]
    for r in records:
        for key in ("loss_g", "loss_fake", "loss_d", "loss_gan", "logit_real", "logit_fake"):
            assert np.isfinite(r[key]), key
        assert r["loss_d"] > 0 and r["loss_gan"] > 0
    summary = json.loads((tmp_path / "run" / "summary.json").read_text())
    assert summary["loss_d"] == records[-1]["loss_d"] and summary["loss_gan"] == records[-1]["loss_gan"]
    assert res.summary["logit_real"] == records[-1]["logit_real"]
    assert (tmp_path / "run" / "losses.png").is_file()
    # two batches of 4 per iteration (the generator step's advances the stream too, as published): 32 of 20
    assert load_checkpoint(res.checkpoint, "distill")["real_data"] == {"epoch": 1, "index": 12, "seed": 0,
                                                                       "shuffle": True, "size": 20}


@pytest.mark.parametrize("engine, fake_score", [("eager", "full"), ("fused", "full"), ("fused", "lora")])
def test_interrupted_and_resumed_sida_run_is_bitwise_identical(tmp_path, engine, fake_score):
    """20 real images, 8 per iteration: the stream wraps into a new epoch after the resume point, so a resumed
    run that restarted the data (or lost its position) would train on other images."""
    kw = dict(iterations=5, batch=8, batch_gpu=4, lr=1e-3, checkpoint_every=2, engine=engine,
              fake_score=fake_score, lora_rank=2, gan_start_kimg=0.008, g_start_kimg=0.004)
    full = distill(sida(tmp_path, "full", **kw), tiny_teacher(), log=None)

    def interrupt(state):
        if state["iteration"] == 2:
            os.kill(os.getpid(), signal.SIGINT)

    part = distill(sida(tmp_path, "part", **kw), tiny_teacher(), callbacks=[interrupt], log=None)
    assert part.interrupted == "SIGINT" and part.iteration == 2
    resumed = distill(sida(tmp_path, "part", resume="auto", **kw), tiny_teacher(), log=None)
    assert resumed.iteration == 5
    assert_same_run(full, resumed)
    assert any(not torch.equal(a, b) for a, b in zip(full.generator.network.parameters(),
                                                      tiny_teacher().parameters()))
    full_log = (tmp_path / "full" / "metrics.jsonl").read_text().splitlines()
    part_log = (tmp_path / "part" / "metrics.jsonl").read_text().splitlines()
    assert [json.loads(r)["loss_d"] for r in full_log[-3:]] == [json.loads(r)["loss_d"] for r in part_log[-3:]]


def test_resumed_sida_runs_metrics_record_equals_the_uninterrupted_runs(tmp_path):
    """Stopped at iteration 2 of a 4-iteration metrics window: the resumed run's record of that window
    averages SiDA's metrics (loss_d, loss_gan, the logits) over iterations 1-4 as the uninterrupted run's
    does, bit for bit; the generator's gate opens inside the window (iteration 3)."""
    kw = dict(iterations=8, batch=8, log_every=4, lr=1e-3, checkpoint_every=2, g_start_kimg=0.016,
              gan_start_kimg=0.016)
    distill(sida(tmp_path, "full", **kw), tiny_teacher(), log=None)
    distill(sida(tmp_path, "part", **kw), tiny_teacher(), callbacks=[lambda s: s["iteration"] == 2], log=None)
    distill(sida(tmp_path, "part", resume="auto", **kw), tiny_teacher(), log=None)
    full, part = ([json.loads(line) for line in (tmp_path / name / "metrics.jsonl").read_text().splitlines()]
                  for name in ("full", "part"))
    assert [r["iteration"] for r in part] == [r["iteration"] for r in full] == [4, 8]
    timing = {"it_per_s", "img_per_s", "seconds", "time"}
    for a, b in zip(full, part):
        assert {"loss_d", "loss_gan", "logit_real", "logit_fake"} <= a.keys()
        assert {k: v for k, v in a.items() if k not in timing} == {k: v for k, v in b.items() if k not in timing}


def test_resume_with_other_data_is_refused(tmp_path):
    distill(sida(tmp_path, iterations=1, batch=4), tiny_teacher(), log=None)
    other = real_images(tmp_path / "other.npz", count=12)
    with pytest.raises(DataError, match="resume with the same --data"):
        distill(sida(tmp_path, iterations=2, batch=4, resume="auto", data=other), tiny_teacher(), log=None)


def test_data_given_as_a_tensor(tmp_path):
    images = torch.rand(10, *SHAPE) * 2 - 1
    cfg = quiet(method="sida", disc_layer=LAYER, run_dir=str(tmp_path / "t"), iterations=2, batch=4)
    res = distill(cfg, tiny_teacher(), data=images, log=None)
    assert res.iteration == 2 and "loss_d" in res.last


def test_sid2a_starts_from_a_sid_generator_and_the_teacher_fake(tmp_path):
    sid = distill(quiet(run_dir=str(tmp_path / "sid"), iterations=2, lr=1e-3), tiny_teacher(), log=None)
    init = load_checkpoint(sid.checkpoint, "distill")
    cfg = sida(tmp_path, "sid2a", method="sid2a", init_generator=str(sid.checkpoint), iterations=0)
    res = distill(cfg, tiny_teacher(), log=None)
    assert_bitwise(states(res.generator), init["generator_ema"])
    assert_bitwise(states(res.generator_ema), init["generator_ema"])
    assert any(not torch.equal(init["generator_ema"][f"net.{k}"], v) for k, v in states(tiny_teacher()).items())
    assert_bitwise(states(res.fake.network), states(tiny_teacher()))
    # alpha defaults to SiDA's 1.0; the SiD run used SiD's 1.2
    assert cfg.sid_alpha == 1.0 and TrainConfig().sid_alpha == 1.2 and TrainConfig(alpha=1.5).sid_alpha == 1.5
    with pytest.raises(CheckpointError, match="--init-generator .*does not fit"):
        distill(cfg.replace(run_dir=str(tmp_path / "c3")), tiny_teacher(num_classes=3), log=None)
    with pytest.raises(CheckpointError, match="--init-generator: checkpoint .* does not exist"):
        distill(cfg.replace(run_dir=str(tmp_path / "x"), init_generator=str(tmp_path / "none.pt")),
                tiny_teacher(), log=None)


def test_method_errors(tmp_path):
    with pytest.raises(ValueError, match="--method sida trains on real images: pass --data PATH"):
        distill(quiet(method="sida", run_dir=str(tmp_path / "a")), tiny_teacher(), log=None)
    with pytest.raises(ValueError, match="--method sid2a starts from a SiD generator: pass --init-generator"):
        distill(quiet(method="sid2a", data="x.npz", run_dir=str(tmp_path / "b")), tiny_teacher(), log=None)
    with pytest.raises(ValueError, match="--init-generator initialises the generator of --method sid2a"):
        distill(sida(tmp_path, init_generator="x.pt"), tiny_teacher(), log=None)
    with pytest.raises(ValueError, match="--data, --disc-layer belong to --method sida or sid2a"):
        distill(quiet(data="x.npz", disc_layer="inp", run_dir=str(tmp_path / "c")), tiny_teacher(), log=None)
    with pytest.raises(ValueError, match="real images are for --method sida"):
        distill(quiet(run_dir=str(tmp_path / "d")), tiny_teacher(), data=torch.zeros(2, *SHAPE), log=None)
    with pytest.raises(ValueError, match="--augment-p 0.12: the fake score takes no augment_labels"):
        distill(sida(tmp_path, augment_p=0.12), tiny_teacher(), log=None)
    with pytest.raises(ValueError, match="--disc-layer 'nope'"):
        distill(sida(tmp_path, disc_layer="nope"), tiny_teacher(), log=None)
    with pytest.raises(ValueError, match="no default discriminator layer"):
        distill(sida(tmp_path, disc_layer=None), tiny_teacher(), log=None)
    with pytest.raises(ValueError, match="option method must be one of sid, sida, sid2a"):
        TrainConfig.from_dict({"method": "gan"})
    with pytest.raises(DataError, match="--data has no labels, but 3 classes are expected"):
        distill(sida(tmp_path), tiny_teacher(num_classes=3), log=None)


def test_cli_sida_runs_and_errors(tmp_path, capsys):
    data = real_images(tmp_path / "real.npz")
    base = ["distill", "--teacher", "nets:tiny_teacher", "--iterations", "2", "--batch", "4",
            "--log-every", "1", "--grid-size", "0", "--teacher-steps", "0", "--no-progress", "--device", "cpu"]
    code, out, err = run_main([*base, "--run-dir", tmp_path / "ok", "--method", "sida", "--data", data,
                               "--disc-layer", LAYER], capsys)
    assert code == 0, err
    assert "SiDA distillation" in out and "loss_d" in out
    user_error([*base, "--run-dir", tmp_path / "a", "--method", "sida"], capsys, "pass --data PATH")
    user_error([*base, "--run-dir", tmp_path / "b", "--method", "sida", "--data", tmp_path / "missing.npz",
                "--disc-layer", LAYER], capsys, "--data")
    (tmp_path / "empty").mkdir()
    user_error([*base, "--run-dir", tmp_path / "c", "--method", "sida", "--data", tmp_path / "empty",
                "--disc-layer", LAYER], capsys, "holds no images")
    np.savez(tmp_path / "big.npz", images=np.zeros((4, 8, 8, 1), np.uint8))
    user_error([*base, "--run-dir", tmp_path / "d", "--method", "sida", "--data", tmp_path / "big.npz",
                "--disc-layer", LAYER], capsys, "--data images are 1x8x8 (C x H x W) but 1x4x4 is expected")
    user_error([*base, "--run-dir", tmp_path / "e", "--method", "sid2a", "--data", data], capsys,
               "--method sid2a starts from a SiD generator: pass --init-generator CKPT")
    user_error([*base, "--run-dir", tmp_path / "f", "--method", "sid2a", "--data", data, "--init-generator",
                tmp_path / "none.pt"], capsys, "--init-generator: checkpoint")
    user_error([*base, "--run-dir", tmp_path / "g", "--method", "gan"], capsys,
               "option --method must be one of sid, sida, sid2a")


def test_short_run_says_the_generator_never_trains(tmp_path):
    """A run that ends before g_start_kimg: one line at the start naming the gate, its kimg and option; the
    summary says so; the records carry loss_g and loss_gan as not applied, not as training losses."""
    lines = []
    res = distill(sida(tmp_path, iterations=3, batch=4, log_every=1, g_start_kimg=0.1, gan_start_kimg=0.2),
                  tiny_teacher(), log=lines.append)
    warning = [line for line in lines if line.startswith("warning:")]
    assert len(warning) == 1, lines
    assert "ends at 0.012 kimg" in warning[0] and "only after 0.1 kimg (--g-start-kimg)" in warning[0]
    assert "only after 0.2 kimg (--gan-start-kimg)" in warning[0] and "never trains" in warning[0]
    assert_bitwise(states(res.generator.network), states(tiny_teacher()))
    assert res.summary["generator_trained"] is False and "--g-start-kimg" in res.summary["gates_not_reached"]
    assert "generator_trained" in lines[-1] and "gates_not_reached" in lines[-1]  # the summary table
    records = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    for r in records:
        assert "loss_g" not in r and "loss_gan" not in r
        assert np.isfinite(r["loss_g_not_applied"]) and np.isfinite(r["loss_gan_not_applied"])
        assert np.isfinite(r["loss_fake"]) and np.isfinite(r["loss_d"])  # the fake score trains


def test_gates_in_the_logs_and_without_a_warning(tmp_path):
    """g_start at 4 images, gan_start at 8: iteration 1 (0 seen) logs loss_g as not applied, iterations 2 and
    3 (4, 8 seen) log loss_g, and loss_gan only from iteration 4 (12 seen); the run opens both gates: no
    warning, the summary says the generator trained."""
    lines = []
    res = distill(sida(tmp_path, iterations=4, batch=4, log_every=1, g_start_kimg=0.0039, gan_start_kimg=0.008),
                  tiny_teacher(), log=lines.append)
    assert not [line for line in lines if line.startswith("warning:")]
    records = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert [("loss_g" in r, "loss_gan" in r) for r in records] == [(False, False), (True, False), (True, False),
                                                                   (True, True)]
    assert "loss_g_not_applied" in records[0] and "loss_gan_not_applied" in records[2]
    assert res.summary["generator_trained"] is True and "gates_not_reached" not in res.summary
    # a run that opens g_start but not gan_start: the line says the generator trains on the SiD loss alone
    lines = []
    distill(sida(tmp_path, "b", iterations=2, batch=4, g_start_kimg=0, gan_start_kimg=1), tiny_teacher(),
            log=lines.append)
    warning = [line for line in lines if line.startswith("warning:")]
    assert len(warning) == 1 and "--gan-start-kimg" in warning[0] and "--g-start-kimg" not in warning[0]
    assert "SiD loss alone" in warning[0]


def _imbalanced(tmp_path, count=60):
    """An .npz with 3 classes at 80/15/5 percent."""
    rng = np.random.RandomState(0)
    labels = np.array([0] * (count * 80 // 100) + [1] * (count * 15 // 100) + [2] * (count * 5 // 100))
    images = rng.randint(0, 256, (len(labels), SHAPE[1], SHAPE[2], SHAPE[0])).astype(np.uint8)
    np.savez(tmp_path / "imbalanced.npz", images=images, labels=labels)
    return str(tmp_path / "imbalanced.npz"), labels


@pytest.mark.parametrize("gen_labels", ["data", "uniform"])
def test_generator_labels_follow_the_data_or_are_uniform(tmp_path, monkeypatch, gen_labels):
    """Class-imbalanced data (80/15/5): by default the generator step trains on the labels of the next real
    batch (the data's frequencies, each batch the stream's next, as published); --gen-labels uniform draws them
    uniformly and leaves the stream to the fake-score step."""
    import sidfast.training.sida as sida_phases

    path, labels = _imbalanced(tmp_path)
    seen = []
    real = []
    original = sida_phases.SiDAPhases.generator_batch

    def spy(self, generator, generator_no_grad=None, labels=None):
        out = original(self, generator, generator_no_grad, labels)
        seen.append(out[1].argmax(1))
        return out

    monkeypatch.setattr(sida_phases.SiDAPhases, "generator_batch", spy)
    original_real = sida_phases.SiDAPhases._real_batch

    def real_spy(self):
        out = original_real(self)
        real.append(out[1].argmax(1))
        return out

    monkeypatch.setattr(sida_phases.SiDAPhases, "_real_batch", real_spy)
    iterations, batch = 30, 12
    cfg = sida(tmp_path, num_classes=3, data=path, iterations=iterations, batch=batch, gen_labels=gen_labels)
    distill(cfg, tiny_teacher(3), log=None)
    got = torch.cat(seen)
    freq = torch.bincount(got, minlength=3).float() / len(got)
    if gen_labels == "data":
        # the stream's batches in order: fake step, generator step, fake step, ... (images of the generator's
        # batches unused)
        stream = RealData(path, batch, seed=cfg.seed, num_classes=3)
        batches = [next(stream)[1] for _ in range(2 * iterations)]
        assert torch.equal(got, torch.cat(batches[1::2])) and torch.equal(torch.cat(real), torch.cat(batches[::2]))
        assert torch.allclose(freq, torch.tensor([0.8, 0.15, 0.05]), atol=0.02)
    else:
        assert freq.min() > 0.25  # uniform over 3 classes (360 draws)
        stream = RealData(path, batch, seed=cfg.seed, num_classes=3)
        assert torch.equal(torch.cat(real), torch.cat([next(stream)[1] for _ in range(iterations)]))


def test_gen_labels_option(tmp_path):
    assert TrainConfig().gen_labels == "data"
    with pytest.raises(ValueError, match="option gen_labels must be one of data, uniform"):
        TrainConfig(gen_labels="balanced").validate()
    with pytest.raises(ValueError, match="--gen-labels belong to --method sida or sid2a"):
        distill(quiet(gen_labels="uniform", run_dir=str(tmp_path / "a")), tiny_teacher(), log=None)


def test_data_warnings(tmp_path):
    """Float images in [0, 1] and labels for an unconditional teacher are accepted with one warning each."""
    from sidfast.training.data import DataWarning

    with pytest.warns(DataWarning, match=r"--data: the float images .* look.* like \[0, 1\].*\[-1, 1\]"):
        distill(quiet(method="sida", disc_layer=LAYER, run_dir=str(tmp_path / "a"), iterations=1, batch=4),
                tiny_teacher(), data=torch.rand(10, *SHAPE), log=None)
    with pytest.warns(DataWarning, match="--data: the real images have class labels, but the teacher is "
                                         "unconditional"):
        distill(sida(tmp_path, "b", iterations=1, batch=4, data=real_images(tmp_path / "l.npz", num_classes=3)),
                tiny_teacher(), log=None)
    import warnings
    with warnings.catch_warnings():
        warnings.simplefilter("error", DataWarning)
        distill(sida(tmp_path, "c", iterations=1, batch=4), tiny_teacher(), log=None)  # uint8, no labels
        distill(quiet(method="sida", disc_layer=LAYER, run_dir=str(tmp_path / "d"), iterations=1, batch=4),
                tiny_teacher(), data=torch.rand(10, *SHAPE) * 2 - 1, log=None)
