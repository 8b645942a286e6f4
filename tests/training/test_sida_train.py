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
from nets import SHAPE, tiny_teacher
from runs import LAYER, assert_bitwise, assert_same_run, quiet, real_images, sida, states
from utils import run_main, user_error



def encoder_logits(net, x, sigma, labels):
    """TinyEDM's discriminator logits by hand: the feature mean of ``inp``'s output."""
    s = sigma.reshape(-1, 1)
    parts = [x.flatten(1) / (s ** 2 + 0.25).sqrt(), s.log() / 4] + ([labels] if net.num_classes else [])
    return net.inp(torch.cat(parts, 1)).mean(1, keepdim=True)


def _published_sida_iteration(teacher, G, fake, cfg, opt_g, opt_f, real, real_idx, num_classes, nimg):
    """One iteration as the published ``sida_training_loop.py`` and ``sida_loss.py`` run it, with one
    micro-batch; returns the (clipped) fake-score gradients and the generator's gradients."""
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
    # (2) generator: the logits D from the fake score at x_t
    G.train()
    fake.eval()
    z = torch.randn(B, *SHAPE)
    c = onehot(torch.randint(num_classes, (B,))) if num_classes else None
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
        real, idx = next(stream)
        grads_f, grads_g = _published_sida_iteration(teacher, G, fake, cfg, opt_g, opt_f, real, idx, num_classes,
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
    res = distill(sida(tmp_path, iterations=4, batch=4, log_every=2, gan_start_kimg=0), tiny_teacher(),
                  log=None)
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
    assert load_checkpoint(res.checkpoint, "distill")["real_data"] == {"epoch": 0, "index": 16, "seed": 0,
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
