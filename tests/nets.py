"""Small test networks in the EDM calling convention ``net(x, sigma, class_labels) -> x0`` (test helpers only)."""
import torch
import torch.nn.functional as F
from torch import nn


class SmallUNet(nn.Module):
    """A miniature U-Net: time embedding (Linear), convolutions with stride/padding, a token-mixing Linear on
    (B, HW, C) tokens like an attention projection, optional labels, dropout and keyword conditioning, and
    EDM preconditioning so its input gradient is nontrivial."""

    def __init__(self, channels=3, hidden=8, label_dim=0, dropout=0.0, cond_dim=0):
        super().__init__()
        self.emb = nn.Linear(1, hidden)
        self.label = nn.Linear(label_dim, hidden, bias=False) if label_dim else None
        self.cond = nn.Linear(cond_dim, hidden) if cond_dim else None
        self.conv_in = nn.Conv2d(channels, hidden, 3, padding=1)
        self.down = nn.Conv2d(hidden, hidden, 3, stride=2, padding=1)
        self.mid = nn.Conv2d(hidden, hidden, 3, padding=2, dilation=2)
        self.proj = nn.Linear(hidden, hidden)
        self.conv_out = nn.Conv2d(hidden, channels, 1)
        self.drop = nn.Dropout(dropout)

    def forward(self, x, sigma, class_labels=None, context=None):
        sigma = sigma.reshape(-1, 1).to(torch.float32)
        c_in = 1 / (sigma ** 2 + 0.25).sqrt()
        c_skip, c_out = 0.25 / (sigma ** 2 + 0.25), sigma * 0.5 / (sigma ** 2 + 0.25).sqrt()
        e = F.silu(self.emb(sigma.log() / 4))
        if self.label is not None and class_labels is not None:
            e = e + self.label(class_labels.to(e.dtype))
        if self.cond is not None and context is not None:
            e = e + self.cond(context)
        h = F.silu(self.conv_in(x * c_in.reshape(-1, 1, 1, 1).to(x.dtype)) + e[:, :, None, None])
        h = self.drop(h)
        d = F.silu(self.down(h))
        d = d + self.mid(d)
        tokens = d.flatten(2).transpose(1, 2)
        tokens = tokens + self.proj(tokens)
        d = tokens.transpose(1, 2).reshape(d.shape)
        u = F.interpolate(d, scale_factor=2.0) + h
        out = self.conv_out(F.silu(u))
        return c_skip.reshape(-1, 1, 1, 1) * x + c_out.reshape(-1, 1, 1, 1) * out.to(x.dtype)


def randomize_lora(module, seed=0, std=0.05):
    """Give every LoRA B a nonzero value so the fake score differs from the teacher."""
    from sidfast.lora import lora_layers

    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for m in lora_layers(module):
            m.lora_B.copy_(torch.randn(m.lora_B.shape, generator=g) * std)
    return module
