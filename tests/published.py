"""Test oracle: the published SiD ``generator_loss`` arithmetic transcribed as it runs (boolean drop of
NaN samples, float32 normalizer), followed by the published loop's ``loss.sum() / batch``.
Used only to check that sidfast's reference and fast paths are literal drop-ins."""
import torch


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
