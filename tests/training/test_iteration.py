"""``reference.sid_iteration`` (one SiD / SiDA iteration on one screen) against the trainer, ``distill``.

Both run from the same seed on CPU (single process, ``batch_gpu == batch``, ``noise="torch"``, eager
engine, fp32) and draw the same random numbers in the same order, so four iterations of each are compared
weight by weight: generator, generator_ema and fake score.

- Bitwise: the trainer with the losses it calls swapped for the reference formulas
  (``sidfast.training.sid`` / ``sidfast.training.sida``: ``sid_generator_loss``, ``sida_generator_loss``,
  ``fake_score_loss``, monkeypatched; the trainer's files untouched). The reported losses match too.
- Within a tolerance: the trainer as it runs, on the native CPU route. Its SiD generator loss is the fused
  C++ op (``sidfast.ops.sid_loss``), whose gradients come in closed form from the kernel, not from autograd
  through ``reference.sid_generator_loss``: they differ from the reference's by float32 rounding only (a few
  roundings per element), and Adam and the following iterations carry that difference into the weights. The
  tolerance is derived from the same computation: the reference run again with its generator loss scale
  moved by one float32 ulp (every generator gradient moved by about one rounding) shows how far one
  rounding of the generator gradients moves each weight tensor over the run; the trainer may differ by
  ``GRADIENT_ROUNDINGS`` times that (both gradients are within a handful of roundings of the exact one,
  taken relative to their operands' magnitudes, which can exceed the result's), plus the rounding of
  ``p - step`` in each Adam step. The fake-score step is the reference formula on this route; where the
  generator never steps (SiDA before ``g_start_kimg``) the run is bitwise.
"""
import copy

import pytest
import torch
import torch.nn.functional as F

import sidfast.training.sid as sid_phases
import sidfast.training.sida as sida_phases
from sidfast import reference
from sidfast.models.discriminator import DiscriminatorTap
from sidfast.train import distill
from sidfast.training.data import RealData
from sidfast.utils.runtime import seed_everything
from runs import resolved
from test_train import SHAPE, quiet, states, tiny_teacher
from utils import LOSS_SCALE_ULP, gradient_rounding_tolerance

ITERATIONS = 4
BATCH = 6
LAYER = "inp"  # TinyEDM's first layer: the discriminator's tap
NETWORKS = ("generator", "generator_ema", "fake")

CASES = {
    "sid": ("sid", 0, {}),
    "sid-class-conditional": ("sid", 3, {}),
    # gates at 0: iteration 1 (0 images seen) without the GAN term and generator step, then both on
    "sida": ("sida", 0, dict(gan_start_kimg=0.0, g_start_kimg=0.0)),
    "sida-class-conditional": ("sida", 3, dict(gan_start_kimg=0.0, g_start_kimg=0.0)),
    "sida-uniform-labels": ("sida", 3, dict(gan_start_kimg=0.0, g_start_kimg=0.0, gen_labels="uniform")),
    "sida-generator-frozen": ("sida", 0, dict(gan_start_kimg=0.0, g_start_kimg=1.0)),  # 1000 images: never
}


def real_data(num_classes):
    """20 real images in [-1, 1] as a tensor, or with labels as a Dataset of (image, label)."""
    g = torch.Generator().manual_seed(1)
    images = torch.rand(20, *SHAPE, generator=g) * 2 - 1
    if not num_classes:
        return images
    return torch.utils.data.TensorDataset(images, torch.randint(num_classes, (20,), generator=g))


def config(tmp_path, method, extra):
    sida = dict(method="sida", disc_layer=LAYER, augment_p=0.0) if method == "sida" else {}
    return resolved(quiet(run_dir=str(tmp_path / "run"), iterations=ITERATIONS, batch=BATCH, lr=1e-3,
                          noise="torch", engine="eager", **sida, **extra))


def trainer_run(cfg, num_classes, data):
    """(networks, per-iteration losses) of ``distill``."""
    losses = []
    res = distill(cfg, tiny_teacher(num_classes), data=data, log=None,
                  callbacks=[lambda s: losses.append((s["loss_g"].clone(), s["loss_fake"].clone()))])
    return {name: states(getattr(res, name).network) for name in NETWORKS}, losses


def reference_run(cfg, num_classes, data, loss_scale_g=None):
    """(networks, per-iteration losses) of ``reference.sid_iteration`` from the trainer's start: the
    teacher's copies, Adam as the trainer builds it on CPU, the trainer's seeding and real-image stream."""
    teacher = tiny_teacher(num_classes).eval().requires_grad_(False)
    cfg = resolved(cfg, teacher)
    generator, fake = tiny_teacher(num_classes), tiny_teacher(num_classes)
    generator_ema = copy.deepcopy(generator).eval().requires_grad_(False)
    adam = dict(lr=cfg.lr, betas=cfg.betas, eps=cfg.optimizer_eps)
    opt_g = torch.optim.Adam(generator.parameters(), **adam)
    opt_fake = torch.optim.Adam(fake.parameters(), **adam)
    kw = dict(method=cfg.method, num_classes=num_classes, alpha=cfg.sid_alpha, sigma_init=cfg.sigma_init,
              tmax=cfg.tmax, p_mean=cfg.p_mean, p_std=cfg.p_std, sigma_data=cfg.sigma_data,
              loss_scale_g=cfg.loss_scale_g if loss_scale_g is None else loss_scale_g,
              loss_scale_fake=cfg.loss_scale_fake, ema_halflife_kimg=cfg.ema_halflife_kimg,
              ema_rampup_ratio=cfg.ema_rampup_ratio)
    stream = None
    if cfg.method == "sida":
        stream = RealData(data, cfg.batch, seed=cfg.seed, shape=SHAPE, num_classes=num_classes or None)
        kw.update(discriminator=DiscriminatorTap(fake, cfg.disc_layer), loss_scale_d=cfg.loss_scale_d,
                  loss_scale_gan=cfg.loss_scale_gan, gan_start_kimg=cfg.gan_start_kimg,
                  g_start_kimg=cfg.g_start_kimg)
    seed_everything(cfg.seed)
    losses = []
    for it in range(cfg.iterations):
        if stream is not None:  # the fake-score step's real batch, then the generator step's (its labels only)
            onehot = (lambda i: F.one_hot(i, num_classes).float()) if num_classes else (lambda i: None)
            images, idx = next(stream)
            gen_labels = onehot(next(stream)[1]) if cfg.gen_labels == "data" else None
            kw.update(real_images=images, real_labels=onehot(idx), gen_labels=gen_labels)
        out = reference.sid_iteration(generator, generator_ema, fake, teacher, opt_g, opt_fake, nimg=it * cfg.batch,
                                      batch=cfg.batch, image_shape=SHAPE, **kw)
        losses.append((out["loss_g"], out["loss_fake"]))
    nets = dict(generator=generator, generator_ema=generator_ema, fake=fake)
    return {name: states(net) for name, net in nets.items()}, losses


def reference_losses(monkeypatch):
    """Swap the trainer's fused losses for the reference formulas, in the modules that call them."""

    def sid_loss(y_real, y_fake, x_g, alpha, reduction="batchmean", loss_scale=1.0):
        return reference.sid_generator_loss(y_real, y_fake, x_g, alpha, reduction) * loss_scale

    def fake_loss(pred, x0, noise, a, s, prediction="x0", weighting="edm", sigma_data=0.5, gamma=5.0,
                  reduction="batchmean", seed=None):
        assert noise is not None and seed is None  # noise "torch"
        return reference.fake_score_loss(pred, x0, noise, torch.full_like(s, a), s, prediction, weighting,
                                         sigma_data, gamma, reduction)

    monkeypatch.setattr(sid_phases, "sid_generator_loss", sid_loss)
    monkeypatch.setattr(sid_phases, "fake_score_loss", fake_loss)
    monkeypatch.setattr(sida_phases, "sida_generator_loss", reference.sida_generator_loss)


@pytest.mark.parametrize("case", CASES)
def test_trainer_with_the_reference_losses_is_the_reference_iteration_bitwise(tmp_path, monkeypatch,
                                                                             native_cpu_route, case):
    method, num_classes, extra = CASES[case]
    cfg = config(tmp_path, method, extra)
    data = real_data(num_classes) if method == "sida" else None
    reference_losses(monkeypatch)
    got, got_losses = trainer_run(cfg, num_classes, data)
    want, want_losses = reference_run(cfg, num_classes, data)
    for name in NETWORKS:
        for key, value in want[name].items():
            assert torch.equal(got[name][key], value), (name, key)
    for (loss_g, loss_fake), (ref_g, ref_fake) in zip(got_losses, want_losses, strict=True):
        assert torch.equal(loss_fake, ref_fake)
        if method == "sida":  # SiD reports its fused loss divided back by the scale: within rounding
            assert torch.equal(loss_g, ref_g)
    init = states(tiny_teacher(num_classes))
    moved = any(not torch.equal(want["generator"][k], init[k]) for k in init)
    assert moved == (case != "sida-generator-frozen")
    assert any(not torch.equal(want["fake"][k], init[k]) for k in init)


@pytest.mark.parametrize("case", CASES)
def test_trainer_is_the_reference_iteration_within_gradient_rounding(tmp_path, native_cpu_route, case):
    method, num_classes, extra = CASES[case]
    cfg = config(tmp_path, method, extra)
    data = real_data(num_classes) if method == "sida" else None
    got, _ = trainer_run(cfg, num_classes, data)
    want, _ = reference_run(cfg, num_classes, data)
    if case == "sida-generator-frozen":  # the SiD loss's gradients reach no weight
        for name in NETWORKS:
            assert all(torch.equal(got[name][k], v) for k, v in want[name].items()), name
        return
    # one rounding of every generator gradient: the loss scale one ulp up
    nudged, _ = reference_run(cfg, num_classes, data, loss_scale_g=cfg.loss_scale_g * LOSS_SCALE_ULP)
    for name in NETWORKS:
        for key, value in want[name].items():
            tol = gradient_rounding_tolerance(value, nudged[name][key], ITERATIONS)
            diff = float((got[name][key] - value).abs().max())
            assert diff <= tol, (name, key, diff, tol)
