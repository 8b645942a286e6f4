"""The published SiD iteration, step by step in eager PyTorch (``docs/math.md``, "Published recipe"):
the baseline of bench_engine.py.

Three full networks of one architecture: the teacher (frozen, eval), the fake score and the one-step
generator (copies of the teacher, dropout 0.13 active). One iteration:
  (1) fake-score update on fresh generator samples, no gradient into G ("Fake-score loss");
  (2) generator update with the SiD loss, gradients into G directly and through both score networks
      ("SiD generator loss"), ``requires_grad`` of the fake score toggled off as the published loop does;
  then the EMA of G. Adam lr 1e-5, betas (0, 0.999), eps 1e-8; loss scales 1 (fake) and 100 (G);
  gradients nan_to_num'ed before each step. ``precision="bf16"`` wraps the network calls in bf16
  autocast (fp32 weights and loss), the counterpart of the published fp16 mode.

Networks are diffusers ``UNet2DModel``s (random weights: speed and memory do not depend on them) seen
through ``sidfast.models.denoiser.DiffusersDenoiser`` (VP schedule, eps prediction), called in EDM coordinates.
"""
from __future__ import annotations

import contextlib
import copy

import torch
from torch import nn

from sidfast import reference
from sidfast.models.denoiser import DiffusersDenoiser
from sidfast.schedules import VPSchedule

# diffusers UNet2DModel configurations. "ddpm-cifar10": google/ddpm-cifar10-32 (35.7M parameters, 32x32);
# "ddpm-cifar10-64": the same architecture at 64x64 (4x the pixels); "ddpm-256": google/ddpm-ema-church-256's
# architecture (256x256); "tiny": a CPU smoke-test size.
CONFIGS = {
    "ddpm-cifar10": dict(sample_size=32, block_out_channels=(128, 256, 256, 256), layers_per_block=2,
                         down_block_types=("DownBlock2D", "AttnDownBlock2D", "DownBlock2D", "DownBlock2D"),
                         up_block_types=("UpBlock2D", "UpBlock2D", "AttnUpBlock2D", "UpBlock2D"),
                         attention_head_dim=None, downsample_padding=0, flip_sin_to_cos=False, freq_shift=1,
                         norm_eps=1e-6, norm_num_groups=32),
    "ddpm-256": dict(sample_size=256, block_out_channels=(128, 128, 256, 256, 512, 512), layers_per_block=2,
                     down_block_types=("DownBlock2D",) * 4 + ("AttnDownBlock2D", "DownBlock2D"),
                     up_block_types=("UpBlock2D", "AttnUpBlock2D") + ("UpBlock2D",) * 4,
                     attention_head_dim=None, downsample_padding=0, flip_sin_to_cos=False, freq_shift=1,
                     norm_eps=1e-6, norm_num_groups=32),
    "tiny": dict(sample_size=8, block_out_channels=(8, 16), layers_per_block=1, norm_num_groups=4,
                 down_block_types=("DownBlock2D", "AttnDownBlock2D"), up_block_types=("AttnUpBlock2D", "UpBlock2D"),
                 attention_head_dim=4),
}
CONFIGS["ddpm-cifar10-64"] = dict(CONFIGS["ddpm-cifar10"], sample_size=64)

SIGMA_INIT = 2.5
ALPHA = 1.2
LOSS_SCALE_G = 100.0
DROPOUT = 0.13


def make_unet(config: str, dropout: float = 0.0, seed: int = 0):
    import diffusers

    if config not in CONFIGS:
        raise ValueError(f"config must be one of {sorted(CONFIGS)}, got {config!r}")
    torch.manual_seed(seed)
    return diffusers.UNet2DModel(in_channels=3, out_channels=3, dropout=dropout, **CONFIGS[config])


def make_networks(config: str, device, dropout: float = DROPOUT):
    """(teacher, fake, generator) denoisers: the teacher frozen in eval, the other two copies with dropout."""
    schedule = VPSchedule.linear()
    unet = make_unet(config).to(device)
    teacher = DiffusersDenoiser(unet, schedule, "eps", name="teacher").eval().requires_grad_(False)

    def copy_with_dropout(name):
        net = make_unet(config, dropout=dropout).to(device)
        net.load_state_dict(unet.state_dict())
        return DiffusersDenoiser(net, schedule, "eps", name=name).train()

    return teacher, copy_with_dropout("fake score"), copy_with_dropout("generator")


def adam(params, fused: bool = False):
    kw = {"fused": True} if fused else {}
    return torch.optim.Adam(params, lr=1e-5, betas=(0.0, 0.999), eps=1e-8, **kw)


def sanitize(params) -> None:
    """Published: grad <- nan_to_num(grad, nan=0, posinf=1e5, neginf=-1e5)."""
    for p in params:
        if p.grad is not None:
            torch.nan_to_num(p.grad, nan=0.0, posinf=1e5, neginf=-1e5, out=p.grad)


def published_generator_loss(y_real, y_fake, y, alpha=ALPHA):
    """The published ``generator_loss`` arithmetic (boolean NaN drop, float32 normalizer), per element."""
    nan_mask = torch.isnan(y_real).flatten(1).any(1) | torch.isnan(y_fake).flatten(1).any(1) | \
        torch.isnan(y).flatten(1).any(1)
    if nan_mask.any():  # host sync, as published
        keep = ~nan_mask
        y, y_real, y_fake = y[keep], y_real[keep], y_fake[keep]
    with torch.no_grad():
        w = (y - y_real).abs().to(torch.float32).mean(dim=list(range(1, y.dim())), keepdim=True).clip(min=1e-5)
    return (y_real - y_fake) * ((y_real - y) - alpha * (y_real - y_fake)) / w


class PublishedSiD:
    """The published loop, eager: ``step()`` runs one iteration (fake-score update, generator update, EMA)."""

    def __init__(self, config: str, batch: int, device, precision: str = "fp32", ema_beta: float = 0.999):
        if precision not in ("fp32", "bf16"):
            raise ValueError(f"precision must be 'fp32' or 'bf16', got {precision!r}")
        self.device, self.batch, self.precision = torch.device(device), batch, precision
        self.teacher, self.fake, self.G = make_networks(config, self.device)
        self.G_ema = copy.deepcopy(self.G).eval().requires_grad_(False)
        self.opt_fake, self.opt_G = adam(self.fake.parameters()), adam(self.G.parameters())
        self.shape = (batch, 3, CONFIGS[config]["sample_size"], CONFIGS[config]["sample_size"])
        self.ema_beta = ema_beta

    def autocast(self):
        if self.precision == "bf16":
            return torch.autocast(self.device.type, dtype=torch.bfloat16)
        return contextlib.nullcontext()

    def generate(self):
        z = torch.randn(self.shape, device=self.device)
        sigma = torch.full((self.batch,), SIGMA_INIT, device=self.device)
        with self.autocast():
            return self.G(SIGMA_INIT * z, sigma).float()  # x_g = G(sigma_init z, sigma_init)

    def fake_step(self):
        self.fake.requires_grad_(True)
        self.G.requires_grad_(False)
        with torch.no_grad():
            x_g = self.generate()
        sigma = reference.edm_training_sigma(self.batch, device=self.device)
        noise = torch.randn_like(x_g)
        with self.autocast():
            pred = self.fake(x_g + sigma.view(-1, 1, 1, 1) * noise, sigma)
        loss = reference.fake_score_loss(pred.float(), x_g, noise, torch.ones_like(sigma), sigma, "x0", "edm",
                                         reduction="batchmean")
        self.opt_fake.zero_grad(set_to_none=True)
        loss.backward()
        sanitize(self.fake.parameters())
        self.opt_fake.step()
        return loss.detach()

    def generator_step(self):
        self.fake.requires_grad_(False)
        self.G.requires_grad_(True)
        x_g = self.generate()
        sigma = reference.generator_sigma(self.batch, device=self.device)
        noise = torch.randn_like(x_g)
        x_t = x_g + sigma.view(-1, 1, 1, 1) * noise
        with self.autocast():
            y_real, y_fake = self.teacher(x_t, sigma), self.fake(x_t, sigma)
        loss = published_generator_loss(y_real.float(), y_fake.float(), x_g).sum() * (LOSS_SCALE_G / self.batch)
        self.opt_G.zero_grad(set_to_none=True)
        loss.backward()
        sanitize(self.G.parameters())
        self.opt_G.step()
        return loss.detach()

    @torch.no_grad()
    def ema(self):
        for pe, p in zip(self.G_ema.parameters(), self.G.parameters()):
            pe.copy_(p.detach().lerp(pe, self.ema_beta))

    def step(self):
        loss_fake = self.fake_step()
        loss_g = self.generator_step()
        self.ema()
        return loss_g, loss_fake


def parameter_count(net: nn.Module) -> int:
    return sum(p.numel() for p in net.parameters())
