"""Test oracles: the published SiD ``generator_loss`` arithmetic transcribed as it runs (boolean drop of
NaN samples, float32 normalizer), followed by the published loop's ``loss.sum() / batch``.
And the published SiDA arithmetic (``published_generator``, ``published_discriminator``), SiD-LSG's and
SiD-DiT's losses and their launch scripts' values (the per-family recipes), and the published evaluation's (EDM's
FID, torch-fidelity's KID, SiD's precision/recall, EDM's per-seed latents). Used only to check that sidfast's
reference and fast paths are literal drop-ins, by the tests and the benchmarks."""
import math

import torch
from torch import nn


def published_generator_loss(y_real, y_fake, y, alpha=1.2):
    nan_mask = torch.isnan(y_real).flatten(start_dim=1).any(dim=1)
    nan_mask = nan_mask | torch.isnan(y_fake).flatten(start_dim=1).any(dim=1)
    nan_mask = nan_mask | torch.isnan(y).flatten(start_dim=1).any(dim=1)
    if nan_mask.any():
        keep = ~nan_mask
        y, y_real, y_fake = y[keep], y_real[keep], y_fake[keep]
    with torch.no_grad():
        dims = list(range(1, y.dim()))
        weight_factor = abs(y - y_real).to(torch.float32).mean(dim=dims, keepdim=True).clip(min=0.00001)
    return (y_real - y_fake) * ((y_real - y) - alpha * (y_real - y_fake)) / weight_factor


def published_batchmean(y_real, y_fake, y, alpha=1.2):
    return published_generator_loss(y_real, y_fake, y, alpha).sum() / y.shape[0]


# ---- the published arithmetic (SiD@sida: sida_training/sida_loss.py, sida_training_edm2/sida_loss_edm2.py
# ---- and the loop's sums / batch_gpu_total), boolean-mask NaN drop; float32 casts widened for float64
# ---- inputs and flatten(start_dim=1) written as _rows so that logits of shape (B,) work too

def _rows(t):
    return t.reshape(t.shape[0], -1)


def published_generator(y_real, y_fake, y, y_D, alpha):
    acc = torch.promote_types(y.dtype, torch.float32)
    batch = y.shape[0]
    nan_mask = (torch.isnan(_rows(y)).any(1) | torch.isnan(_rows(y_real)).any(1)
                | torch.isnan(_rows(y_fake)).any(1) | torch.isnan(_rows(y_D)).any(1))
    if nan_mask.any():
        keep = ~nan_mask
        y = y[keep]
        y_real = y_real[keep]
        y_fake = y_fake[keep]
        y_D = y_D[keep]
    dims = list(range(1, y.dim()))
    with torch.no_grad():
        weight_factor = abs(y - y_real).to(acc).mean(dim=dims, keepdim=True).clip(min=0.00001)
    loss = (y_real - y_fake) * ((y_real - y) - alpha * (y_real - y_fake)) / weight_factor
    loss_gan = nn.BCEWithLogitsLoss()(y_D.clamp(-10, 10), torch.ones_like(y_D)).to(acc) / weight_factor
    n_features = y[0].numel()
    loss_gan = loss_gan.mean(dim=dims, keepdim=True) * n_features
    return loss.sum() / batch, loss_gan.sum() / batch


def published_discriminator(logit_real, logit_fake, sigma, sigma_data=0.5, y=None, y_fake=None):
    batch = logit_real.shape[0]
    weight = (sigma ** 2 + sigma_data ** 2) / (sigma * sigma_data) ** 2
    nan_mask = torch.isnan(_rows(logit_fake)).any(1) | torch.isnan(_rows(logit_real)).any(1)
    for t in (y, y_fake):
        if t is not None:
            nan_mask = nan_mask | torch.isnan(_rows(t)).any(1)
    if nan_mask.any():
        keep = ~nan_mask
        logit_fake = logit_fake[keep]
        logit_real = logit_real[keep]
        weight = weight[keep]
    loss_real = nn.BCEWithLogitsLoss()(logit_real, torch.ones_like(logit_real))
    loss_fake = nn.BCEWithLogitsLoss()(logit_fake, torch.zeros_like(logit_fake))
    loss_D = weight * (loss_real + loss_fake) / 2
    return loss_D.sum() / batch


# ---- SiD-LSG (mingyuanzhou/SiD-LSG @ 709fc22: training/sid_training_loop.py, training/sid_sd_util.py), the
# ---- arithmetic of one micro-batch for an eps- or v-prediction U-Net ``unet(x, t) -> out`` on a DDPM table
# ---- ``ac`` (alphas_cumprod), with diffusers' add_noise / get_velocity / step(...).pred_original_sample written
# ---- out; no guidance (its arithmetic is sidfast.guidance's, checked elsewhere)

def lsg_add_noise(x0, noise, t, ac):
    a, s = ac[t] ** 0.5, (1 - ac[t]) ** 0.5  # DDPMScheduler.add_noise
    return a.view(-1, *[1] * (x0.dim() - 1)) * x0 + s.view(-1, *[1] * (x0.dim() - 1)) * noise


def lsg_x0(out, x_t, t, ac, prediction):
    """DDPMScheduler.step(...).pred_original_sample (clip_sample off, as SD's scheduler config)."""
    a, s = (ac[t] ** 0.5).view(-1, 1, 1, 1), ((1 - ac[t]) ** 0.5).view(-1, 1, 1, 1)
    return (x_t - s * out) / a if prediction == "eps" else a * x_t - s * out


def lsg_generate(unet, z, t_init, ac, prediction):
    """sid_sd_sampler, one step: latents = add_noise(0, z, t_init), x_g = pred_original_sample."""
    t = torch.full((z.shape[0],), t_init, dtype=torch.long)
    latents = lsg_add_noise(torch.zeros_like(z), z, t, ac)
    return lsg_x0(unet(latents, t), latents, t, ac, prediction)


def lsg_fake_loss(fake, images, noise, t, ac, prediction, ls=1.0):
    """loop 413-445: sum((eps_hat - eps)^2) * ls / B; v-prediction: (v_hat - v)^2 * snr / (snr + 1)."""
    x_t = lsg_add_noise(images, noise, t, ac)
    out = fake(x_t, t)
    if prediction == "v":
        a, s = (ac[t] ** 0.5).view(-1, 1, 1, 1), ((1 - ac[t]) ** 0.5).view(-1, 1, 1, 1)
        target = a * noise - s * images  # get_velocity
        snr = (ac[t] / (1 - ac[t])).view(-1, 1, 1, 1)  # compute_snr
        loss = (out - target) ** 2 * snr / (snr + 1)
    else:
        loss = (out - noise) ** 2
    return loss.sum() * ls / images.shape[0]


def lsg_generator_loss(teacher, fake, images, noise, t, ac, prediction, alpha=1.0, lsg=1.0):
    """loop 484-530: y_fake, y_real as x0 at the same x_t, w = mean |x_g - y_real| (no grad), the SiD term."""
    x_t = lsg_add_noise(images, noise, t, ac)
    y_fake = lsg_x0(fake(x_t, t), x_t, t, ac, prediction)
    y_real = lsg_x0(teacher(x_t, t), x_t, t, ac, prediction)
    with torch.no_grad():
        w = (images - y_real).abs().mean(dim=[1, 2, 3], keepdim=True).clip(min=0.00001)
    if alpha == 1:
        loss = (y_real - y_fake) * (y_fake - images) / w
    else:
        loss = (y_real - y_fake) * ((y_real - images) - alpha * (y_real - y_fake)) / w
    return loss.sum() * lsg / images.shape[0]


# ---- SiD-DiT (apple/ml-sid-dit @ 9596ed92: training/sid_dit_sd3_training_loop.py, sid_dit_sd3_util.py), one
# ---- micro-batch for a velocity network ``dit(x, 1000 t) -> v``; t = sigmoid(N(ln 2, 1.6^2)) given as ``t``

def dit_generate(dit, z, t_init=1.0):
    """sid_dit_generate, one step from D_{-1} = 0: x = (1 - t) 0 + t z, D = x - t G(x, 1000 t)."""
    t = torch.full((z.shape[0],), t_init, dtype=z.dtype).view(-1, 1, 1, 1)
    x = t * z
    return x - t * dit(x, 1000 * t.flatten())


def dit_fake_loss(fake, images, noise, t, ls=1.0):
    """loop 1747-1835: x_t = (1 - t) x_g + t n, sum (v_psi - (n - x_g))^2 * ls / B."""
    tt = t.view(-1, 1, 1, 1)
    x_t = (1 - tt) * images + tt * noise
    return ((fake(x_t, 1000 * t) - (noise - images)) ** 2).sum() * ls / images.shape[0]


DIT_WEIGHTS = {  # weighting_scheme -> scale_factor(t) (loop 2225-2250)
    "1_minus_sigma": lambda t: 1 - t,
    "1_minus_sigma_squared": lambda t: (1 - t) ** 2,
    "1_over_sigma": lambda t: 1 / t.clip(min=0.00001),
    "1_over_sigma2": lambda t: 1 / (t ** 2).clip(min=0.00001),
    "snr": lambda t: 1 / ((t / (1 - t)) ** 2).clip(min=0.00001),
    "snr_sqrt": lambda t: 1 / (t / (1 - t)).clip(min=0.00001),
}


def dit_generator_loss(teacher, fake, images, noise, t, alpha=1.0, lsg=100.0, weighting="1_minus_sigma"):
    """loop 2048-2265: x0 = x_t - t v for both networks, the SiD term times scale_factor(t), * lsg / B."""
    tt = t.view(-1, 1, 1, 1)
    x_t = (1 - tt) * images + tt * noise
    y_fake = x_t - tt * fake(x_t, 1000 * t)
    y_real = x_t - tt * teacher(x_t, 1000 * t)
    with torch.no_grad():
        scale = DIT_WEIGHTS[weighting](t).view(-1, 1, 1, 1)
    if alpha == 1:
        loss = (y_real - y_fake) * (y_fake - images) * scale
    else:
        loss = (y_real - y_fake) * ((y_real - images) - alpha * (y_real - y_fake)) * scale
    return loss.sum() * lsg / images.shape[0]


# ---- the published launch scripts' values, per teacher family, in sidfast's option names ----
LAUNCH = {
    # SiD (mingyuanzhou/SiD run_sid.sh, CIFAR-10 uncond: --batch 256 --lr 1e-5 --alpha 1.2 --init_sigma 2.5
    # --tmax 800, loss scales 1 / 100 (sid_train.py defaults), EMA 0.5 Mimg)
    "edm": {"batch": 256, "lr": 1e-5, "sid_alpha": 1.2, "sigma_init": 2.5, "tmax": 800, "loss_scale_g": 100.0,
            "loss_scale_fake": 1.0, "ema_halflife_kimg": 500.0, "gen_steps": 1},
    # SiD-LSG run_sid.sh sd1.5: --batch 512 --lr 0.000001 --alpha 1 --init_timestep 625 --ema 0.05, cfg 2 2 2;
    # sid_train.py: --ls 1 --lsg 1; the loop: tmin 20, tmax 980 (randint, HI excluded), eps MSE
    "ddpm": {"batch": 512, "lr": 1e-6, "sid_alpha": 1.0, "t_init": 625, "timesteps": (20, 979),
             "loss_scale_g": 1.0, "loss_scale_fake": 1.0, "ema_halflife_kimg": 50.0, "gen_steps": 1,
             "fake_weighting": "eps", "generator_weighting": "sid", "cfg": 2.0},
    # SiD-DiT run_sid_dit.sh: --batch 256 --lr 0.000005 --alpha 1.0 --init_timestep 999 --num_steps 4, cfg 4.5
    # x3, --weighting_scheme 1_minus_sigma; sid_dit_sd3_train.py: --ls 1 --lsg 100 --ema 0; the loop: t =
    # sigmoid(N(ln 2, 1.6^2)), no condition dropout in the fake step
    "flow": {"batch": 256, "lr": 5e-6, "sid_alpha": 1.0, "t_init": 1.0, "gen_steps": 4, "loss_scale_g": 100.0,
             "loss_scale_fake": 1.0, "ema_halflife_kimg": 0.0, "flow_logit_mean": math.log(2),
             "flow_logit_std": 1.6, "fake_weighting": "flow", "generator_weighting": "1-t", "cfg": 4.5,
             "condition_dropout": 0.0},
}


# ---- the published evaluation arithmetic, as plain numpy/scipy: EDM's fid.py (statistics and FID), the KID
# ---- of torch-fidelity's metric_kid.py, the precision/recall of SiD's sid_precision_recall.py (k-th neighbour
# ---- balls; theirs in float16 on the GPU, here float64) and EDM's per-seed latents and labels (generate.py)

def published_inception_stats(feature_batches):
    """EDM fid.py calculate_inception_stats: per-batch float64 sums, then mu and the n - 1 covariance."""
    import numpy as np

    dim = feature_batches[0].shape[1]
    mu = np.zeros([dim], dtype=np.float64)
    sigma = np.zeros([dim, dim], dtype=np.float64)
    count = 0
    for features in feature_batches:
        features = np.asarray(features).astype(np.float64)
        mu += features.sum(0)
        sigma += features.T @ features
        count += features.shape[0]
    mu /= count
    sigma -= np.outer(mu, mu) * count
    sigma /= count - 1
    return mu, sigma


def published_fid(mu, sigma, mu_ref, sigma_ref):
    """EDM fid.py calculate_fid_from_inception_stats."""
    import warnings

    import numpy as np
    import scipy.linalg

    m = np.square(mu - mu_ref).sum()
    with warnings.catch_warnings():  # scipy >= 1.16 deprecates disp, which the published code passes
        warnings.simplefilter("ignore", DeprecationWarning)
        s, _ = scipy.linalg.sqrtm(np.dot(sigma, sigma_ref), disp=False)
    fid = m + np.trace(sigma + sigma_ref - s * 2)
    return float(np.real(fid))


def published_kid(features_1, features_2, kid_subsets=100, kid_subset_size=1000, rng_seed=2020):
    """torch-fidelity metric_kid.py kid_features_to_metric (degree 3, gamma 1/D, coef0 1, unbiased MMD^2):
    (mean, std) over the subsets; features_1 the generated side."""
    import numpy as np

    def polynomial_kernel(x, y):
        return (np.matmul(x, y.T) / x.shape[1] + 1) ** 3

    def mmd2(k_xx, k_xy, k_yy):
        m = k_xx.shape[0]
        kt_xx_sum = (k_xx.sum(axis=1) - np.diagonal(k_xx)).sum()
        kt_yy_sum = (k_yy.sum(axis=1) - np.diagonal(k_yy)).sum()
        return (kt_xx_sum + kt_yy_sum) / (m * (m - 1)) - 2 * k_xy.sum(axis=0).sum() / (m * m)

    mmds = np.zeros(kid_subsets)
    rng = np.random.RandomState(rng_seed)
    for i in range(kid_subsets):
        f1 = features_1[rng.choice(len(features_1), kid_subset_size, replace=False)]
        f2 = features_2[rng.choice(len(features_2), kid_subset_size, replace=False)]
        mmds[i] = mmd2(polynomial_kernel(f1, f1), polynomial_kernel(f1, f2), polynomial_kernel(f2, f2))
    return float(np.mean(mmds)), float(np.std(mmds))


def published_precision_recall(real_features, gen_features, nhood_size=3):
    """SiD sid_precision_recall.py compute_pr: radius = the (k+1)-th smallest distance to the own set (the first
    is the sample itself); a probe counts when some manifold sample's ball holds it."""
    import numpy as np

    def distances(rows, cols):
        return np.sqrt(np.maximum(((rows[:, None, :] - cols[None, :, :]) ** 2).sum(-1), 0))

    results = {}
    for name, manifold, probes in [("precision", real_features, gen_features),
                                   ("recall", gen_features, real_features)]:
        manifold = np.asarray(manifold, np.float64)
        probes = np.asarray(probes, np.float64)
        kth = np.sort(distances(manifold, manifold), axis=1)[:, nhood_size]
        results[name] = float((distances(probes, manifold) <= kth[None, :]).any(axis=1).mean())
    return results["precision"], results["recall"]


def published_latents_and_labels(seeds, shape, label_dim):
    """EDM generate.py / SiD generate_onestep.py: a StackedRandomGenerator of one generator per seed (seed mod
    2^32; here on the CPU) draws the latents, then the labels ``torch.eye(label_dim)[randint]``."""
    generators = [torch.Generator("cpu").manual_seed(int(seed) % (1 << 32)) for seed in seeds]
    latents = torch.stack([torch.randn(list(shape), generator=g) for g in generators])
    labels = None
    if label_dim:
        labels = torch.eye(label_dim)[torch.stack([torch.randint(label_dim, size=[], generator=g)
                                                   for g in generators])]
    return latents, labels


def published_uint8(images):
    """EDM generate.py / SiD generate_onestep.py: images in [-1, 1] as the uint8 pixels they save."""
    return (images.to(torch.float64) * 127.5 + 128).clip(0, 255).to(torch.uint8)


# ---- the published launch scripts flag by flag, as written (the presets' oracle: tests/training/test_presets.py).
# ---- SCRIPTS: preset -> (the training script it launches, the flags the launch script passes that bear on
# ---- training; paths, logging, snapshots and metrics left out). A flag given twice counts once, with its last
# ---- value (click keeps the last). TRAIN_DEFAULTS: what each training script fills in for the flags left out.
TRAIN_DEFAULTS = {
    # mingyuanzhou/SiD main 01fbb13c, sid_train.py lines 57-103 (click options); Adam betas (0, 0.999) with
    # --g_beta1 for the generator's beta1, eps 1e-6 under --fp16 (lines 152-153)
    "sid_train.py": {"cond": False, "arch": "ddpmpp", "duration": 200, "batch": 512, "ema": 0.5, "dropout": 0.13,
                     "augment": 0.12, "init_sigma": 2.5, "fp16": False, "ls": 1, "lsg": 100, "alpha": 1.2,
                     "tmax": 800, "lr": 1e-5, "glr": 1e-5, "g_beta1": 0},
    # mingyuanzhou/SiD sida a5510fdf, sida_train.py lines 95-152
    "sida_train.py": {"cond": False, "arch": "ddpmpp", "duration": 200, "batch": 512, "ema": 0.5, "dropout": 0.13,
                      "augment": 0.12, "init_sigma": 2.5, "fp16": False, "ls": 1, "lsg": 100, "alpha": 1.2,
                      "tmax": 800, "lr": 1e-5, "glr": 1e-5, "g_beta1": 0, "lsd": 1, "lsg_gan": 0.01,
                      "sid_model": None, "use_gan": True, "save_best_and_last": True},
    # mingyuanzhou/SiD-LSG 709fc22, sid_train.py lines 91-157 (the loop draws torch.randint(tmin, tmax): HI
    # excluded, training/sid_training_loop.py line 413)
    "SiD-LSG sid_train.py": {"duration": 200, "batch": 512, "ema": 0.5, "resolution": 512, "init_timestep": 625,
                             "fp16": False, "ls": 1, "lsg": 1, "alpha": 1, "tmax": 980, "tmin": 20, "lr": 1e-6,
                             "glr": 1e-6, "cfg_train_fake": 1, "cfg_eval_fake": 1, "cfg_eval_real": 1,
                             "enable_xformers": True, "gradient_checkpointing": False, "optimizer": "adam",
                             "num_steps": 1},
    # apple-aiml-research/ml-sid-dit 9596ed92, sid_dit_sd3_train.py and sid_dit_train.py click options (the same
    # defaults in both)
    "sid_dit_train.py": {"duration": 10, "batch": 512, "lr": 1e-5, "glr": 1e-5, "ema": 0, "fp16": False,
                         "bf16": False, "autocast_bf16": True, "gradient_checkpointing": True, "resolution": 256,
                         "init_timestep": 50, "alpha": 1.0, "ls": 1, "lsg": 100, "num_steps": 4, "optimizer": "adam",
                         "cfg_train_fake": 1, "cfg_eval_fake": 1, "cfg_eval_real": 1, "noise_type": "fresh",
                         "weighting_scheme": "1_minus_sigma", "train_diffusiongan": False},
}
# constants of the published loops that the presets also set: SiDA's warm-up gates, sida_training/
# sida_training_loop.py line 410 (`cur_nimg>200*1000`: the GAN term) and line 425 (`cur_nimg>100*1000`: G steps)
SIDA_LOOP = {"gan_start_kimg": 200, "g_start_kimg": 100}

_SID_CIFAR = {"alpha": 1.2, "tmax": 800, "init_sigma": 2.5, "batch": 256, "batch-gpu": 16, "arch": "ddpmpp",
              "lr": 1e-5, "glr": 1e-5, "fp16": 0, "ls": 1, "lsg": 100}
_SIDA = {"alpha": 1, "tmax": 800, "init_sigma": 2.5, "ls": 1, "lsg": 100, "lsd": 1, "lsg_gan": 0.01, "use_gan": 1,
         "save_best_and_last": 1}
_SID2A_MODEL = "https://huggingface.co/UT-Austin-PML/SiD/resolve/main/"
_LSG = {"train_mode": 1, "cfg_train_fake": 2, "cfg_eval_fake": 2, "cfg_eval_real": 2, "optimizer": "adam",
        "resolution": 512, "alpha": 1, "init_timestep": 625, "batch": 512, "fp16": 0, "batch-gpu": 1, "lr": 0.000001,
        "glr": 0.000001, "duration": 10, "enable_xformers": 1, "gradient_checkpointing": 0, "ema": 0.05}
_DIT = {"optimizer": "adam", "resolution": 512, "batch": 256, "lr": 0.000005, "glr": 0.000005, "cfg_train_fake": 4.5,
        "cfg_eval_fake": 4.5, "cfg_eval_real": 4.5, "alpha": 1.0, "init_timestep": 999, "num_steps": 4, "fp16": 0,
        "bf16": 0, "autocast_bf16": 1, "gradient_checkpointing": 1}

SCRIPTS = {
    # ---- SiD: mingyuanzhou/SiD main 01fbb13c, run_sid.sh
    # lines 25-45
    "cifar10-uncond": ("sid_train.py", {**_SID_CIFAR, "duration": 500}),
    # lines 50-71
    "cifar10-cond": ("sid_train.py", {**_SID_CIFAR, "cond": 1, "duration": 800}),
    # lines 74-98
    "imagenet64": ("sid_train.py", {"alpha": 1.2, "cond": 1, "tmax": 800, "init_sigma": 2.5, "batch": 8192,
                                    "batch-gpu": 16, "arch": "adm", "lr": 4e-6, "glr": 4e-6, "fp16": 1, "ls": 1,
                                    "lsg": 100, "dropout": 0.1, "augment": 0, "ema": 2, "duration": 1000}),
    # lines 101-125
    "ffhq64": ("sid_train.py", {"alpha": 1.2, "tmax": 800, "init_sigma": 2.5, "batch": 512, "batch-gpu": 32,
                                "arch": "ddpmpp", "lr": 1e-5, "glr": 1e-5, "fp16": 1, "ls": 1, "lsg": 100,
                                "dropout": 0.05, "augment": 0.15, "cres": "1,2,2,2", "g_beta1": 0.9, "duration": 500}),
    # lines 128-151
    "afhq64": ("sid_train.py", {"alpha": 1.0, "tmax": 800, "init_sigma": 2.5, "batch": 512, "batch-gpu": 32,
                                "arch": "ddpmpp", "lr": 5e-6, "glr": 5e-6, "fp16": 1, "ls": 1, "lsg": 100,
                                "dropout": 0.05, "augment": 0.15, "cres": "1,2,2,2", "duration": 500}),
    # ---- SiDA: mingyuanzhou/SiD sida a5510fdf, run_sida.sh
    # lines 22-49
    "sida-cifar10-uncond": ("sida_train.py", {**_SIDA, "batch": 256, "batch-gpu": 32, "arch": "ddpmpp",
                                              "lr": 1e-5, "glr": 1e-5, "fp16": 0, "duration": 300}),
    # lines 85-113
    "sida-cifar10-cond": ("sida_train.py", {**_SIDA, "cond": 1, "batch": 256, "batch-gpu": 32,
                                            "arch": "ddpmpp", "lr": 1e-5, "glr": 1e-5, "fp16": 0, "duration": 300}),
    # lines 118-150
    "sida-imagenet64": ("sida_train.py", {**_SIDA, "cond": 1, "batch": 8192, "batch-gpu": 32, "arch": "adm",
                                          "lr": 4e-6, "glr": 4e-6, "fp16": 1, "dropout": 0.1, "augment": 0, "ema": 2,
                                          "duration": 300}),  # --duration 300 at lines 142 and 150
    # lines 154-185
    "sida-ffhq64": ("sida_train.py", {**_SIDA, "batch": 512, "batch-gpu": 64, "arch": "ddpmpp", "lr": 1e-5,
                                      "glr": 1e-5, "fp16": 1, "dropout": 0.05, "augment": 0.15, "cres": "1,2,2,2",
                                      "duration": 200}),  # --duration 200 at lines 177 and 185
    # lines 190-221
    "sida-afhq64": ("sida_train.py", {**_SIDA, "batch": 512, "batch-gpu": 64, "arch": "ddpmpp", "lr": 5e-6,
                                      "glr": 5e-6, "fp16": 1, "dropout": 0.05, "augment": 0.15, "cres": "1,2,2,2",
                                      "duration": 200}),  # line 196 passes --data ffhq-64x64.zip
    # ---- SiD²A: mingyuanzhou/SiD sida a5510fdf, run_sid_sida.sh (the same flags plus --sid_model)
    # lines 22-50
    "sid2a-cifar10-uncond": ("sida_train.py", {**_SIDA, "batch": 256, "batch-gpu": 32, "arch": "ddpmpp",
                                               "lr": 1e-5, "glr": 1e-5, "fp16": 0, "duration": 100,
                                               "sid_model": _SID2A_MODEL + "cifar10-uncond/alpha1.2/"
                                                                           "network-snapshot-1.200000-403968.pkl"}),
    # lines 85-114
    "sid2a-cifar10-cond": ("sida_train.py", {**_SIDA, "cond": 1, "batch": 256, "batch-gpu": 32,
                                             "arch": "ddpmpp", "lr": 1e-5, "glr": 1e-5, "fp16": 0, "duration": 100,
                                             "sid_model": _SID2A_MODEL + "cifar10-cond/alpha1.2/"
                                                                         "network-snapshot-1.200000-713312.pkl"}),
    # lines 118-151
    "sid2a-imagenet64": ("sida_train.py", {**_SIDA, "cond": 1, "batch": 8192, "batch-gpu": 32, "arch": "adm",
                                           "lr": 4e-6, "glr": 4e-6, "fp16": 1, "dropout": 0.1, "augment": 0,
                                           "ema": 2, "duration": 100,  # --duration 300 at line 142, 100 at line 150
                                           "sid_model": _SID2A_MODEL + "imagenet64/alpha1.2/"
                                                                       "network-snapshot-1.200000-939176.pkl"}),
    # lines 154-186
    "sid2a-ffhq64": ("sida_train.py", {**_SIDA, "batch": 512, "batch-gpu": 64, "arch": "ddpmpp", "lr": 1e-5,
                                       "glr": 1e-5, "fp16": 1, "dropout": 0.05, "augment": 0.15, "cres": "1,2,2,2",
                                       "duration": 100,  # --duration 300 at line 177, 100 at line 185
                                       "sid_model": _SID2A_MODEL + "ffhq64/alpha1.2/"
                                                                   "network-snapshot-1.200000-498176.pkl"}),
    # lines 190-222
    "sid2a-afhq64": ("sida_train.py", {**_SIDA, "batch": 512, "batch-gpu": 64, "arch": "ddpmpp", "lr": 5e-6,
                                       "glr": 5e-6, "fp16": 1, "dropout": 0.05, "augment": 0.15, "cres": "1,2,2,2",
                                       "duration": 100,  # --duration 300 at line 213, 100 at line 221
                                       "sid_model": _SID2A_MODEL + "afhq64/alpha1/"
                                                                   "network-snapshot-1.000000-371712.pkl"}),
    # ---- SiD-LSG: mingyuanzhou/SiD-LSG 709fc22, run_sid.sh
    "sd15": ("SiD-LSG sid_train.py", {**_LSG, "sd_model": "runwayml/stable-diffusion-v1-5"}),  # sd1.5, lines 63-88
    # lines 95-119
    "sd21": ("SiD-LSG sid_train.py", {**_LSG, "sd_model": "stabilityai/stable-diffusion-2-1-base"}),
    # ---- SiD-DiT: apple-aiml-research/ml-sid-dit 9596ed92
    # sid_dit_sd3_train.py, the module docstring's torchrun example (lines 27-60), with the README's learning rate
    # for SD3 under AMP ("Training Configurations": "AMP + FSDP ... Uses: lr = glr = 1e-6")
    "sd3": ("sid_dit_train.py", {**_DIT, "batch-gpu": 16, "duration": 2, "ls": 1, "lsg": 100,
                                 "noise_type": "fresh", "weighting_scheme": "1_minus_sigma", "train_diffusiongan": 0,
                                 "lr": 1e-6, "glr": 1e-6}),
    # run_sid_dit.sh, start_training() (lines 224-256), its defaults WEIGHTING_SCHEME=1_minus_sigma and
    # NOISE_TYPE=fresh (lines 21, 23); it launches sid_sdxl_train_fsdp.py, which is not in the repository:
    # sid_dit_train.py's defaults stand for it
    "sana": ("sid_dit_train.py", {**_DIT, "batch-gpu": 8, "duration": 1, "noise_type": "fresh",
                                  "weighting_scheme": "1_minus_sigma"}),
}
