"""Test oracles: the published SiD ``generator_loss`` arithmetic transcribed as it runs (boolean drop of
NaN samples, float32 normalizer), followed by the published loop's ``loss.sum() / batch``.
And the published SiDA arithmetic (``published_generator``, ``published_discriminator``). Used only to check
that sidfast's reference and fast paths are literal drop-ins, by the tests and the benchmarks."""
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
