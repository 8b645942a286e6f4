"""Classifier-free guidance of the score networks: SiD-LSG's four scales.

``guided`` evaluates ``f(none) + k * (f(c) - f(none))`` in one forward over the stacked batch
[unconditional; conditional]; ``drop_condition`` is the fake-score step's condition dropout. A condition
is a tensor of class labels or a dict of keyword tensors. Scales, presets and why: docs/math.md, "Guidance
(SiD-LSG)".
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

from sidfast import conditions, reference
from sidfast._checks import check_int, check_real

# Published probability of replacing a condition by the null one in the fake-score step, used while k1 or
# k2 is not 1 (Zhou et al., ICLR 2025, SiD-LSG).
CONDITION_DROPOUT = 0.1

# The named settings: (k1, k2, k3, k4) from the setting's scale k, and the range k must lie in.
#   lsg:   long and short guidance at one scale (published k: 1.5, 2, 3, 4.5)        SiD-LSG
#   long:  the teacher guided inside the generator loss only                           SiD-LSG
#   short: the fake score guided while trained only                                    SiD-LSG
#   zero:  Zero-CFG: teacher unguided, fake score without condition (k = 0) throughout  few-step SiD
#   anti:  Anti-CFG: negative guidance on the fake score inside the generator loss      few-step SiD
PRESETS = {
    #        (k1, k2, k3, k4)               condition on k
    "none": (lambda k: (1.0, 1.0, 1.0, 1.0), None),
    "lsg": (lambda k: (k, k, k, k), None),
    "long": (lambda k: (1.0, 1.0, 1.0, k), (lambda k: k > 1, "> 1")),
    "short": (lambda k: (k, 1.0, 1.0, 1.0), (lambda k: k < 1, "< 1")),
    "zero": (lambda k: (0.0, 0.0, 0.0, 1.0), None),
    "anti": (lambda k: (1.0, k, k, 1.0), (lambda k: k < 0, "< 0")),
}
_WITHOUT_SCALE = ("none", "zero")


@dataclass(frozen=True)
class GuidanceScales:
    """SiD-LSG's guidance scales; all 1 is plain SiD.

    k1: the fake score while it is trained (its target stays the generator sample);
    k2, k3: the fake score inside the generator loss. The published code evaluates the fake score once for
        both of its places in the loss, so k3 must equal k2 (None: k2); the SiD loss with alpha != 1 has no
        separate place for a second fake-score scale;
    k4: the teacher inside the generator loss.
    """

    k1: float = 1.0
    k2: float = 1.0
    k3: float | None = None
    k4: float = 1.0

    def __post_init__(self):
        for name in ("k1", "k2", "k4"):
            object.__setattr__(self, name, check_real(name, getattr(self, name)))
        k3 = self.k2 if self.k3 is None else check_real("k3", self.k3)
        if k3 != self.k2:
            raise ValueError(f"k3 ({k3}) must equal k2 ({self.k2}): the fake score is evaluated once inside "
                             "the generator loss, at one scale for both of its places (SiD-LSG)")
        object.__setattr__(self, "k3", k3)

    @classmethod
    def preset(cls, name: str, k: float | None = None) -> "GuidanceScales":
        """The named setting ``name`` (``PRESETS``) at scale ``k``; "none" and "zero" take no scale."""
        if name not in PRESETS:
            raise ValueError(f"guidance preset must be one of {', '.join(PRESETS)}, got {name!r}")
        scales, condition = PRESETS[name]
        if name in _WITHOUT_SCALE:
            if k is not None:
                raise ValueError(f"guidance preset {name!r} takes no scale, got {k!r}")
            return cls(*scales(None))
        if k is None:
            raise ValueError(f"guidance preset {name!r} needs a scale k")
        k = check_real("k", k)
        if condition is not None and not condition[0](k):
            raise ValueError(f"guidance preset {name!r} needs k {condition[1]}, got {k}")
        return cls(*scales(k))

    @property
    def active(self) -> bool:
        """Whether any network is guided, i.e. the run needs conditions and the null condition."""
        return (self.k1, self.k2, self.k4) != (1.0, 1.0, 1.0)

    @property
    def condition_dropout(self) -> float:
        """Probability of the null condition in the fake-score step: 0.1 while k1 or k2 is not 1, else 0."""
        return CONDITION_DROPOUT if (self.k1 != 1 or self.k2 != 1) else 0.0


def _twice(sigma):
    """sigma for the stacked batch: per-sample tensors repeated, numbers and 0-d tensors as they are."""
    if isinstance(sigma, torch.Tensor) and sigma.dim() > 0:
        return torch.cat([sigma, sigma], 0)
    return sigma


def _need_condition(cond, null_cond, scale: float) -> None:
    if cond is None:
        raise ValueError(f"guidance at scale {scale} needs a conditional network: cond is None (an "
                         "unconditional network has no unconditional/conditional pair to guide between)")
    if null_cond is None:
        raise ValueError(f"guidance at scale {scale} needs null_cond, the network's unconditional input "
                         "(for EDM one-hot labels a row of zeros, guidance.null_labels; for text the empty "
                         "prompt's embedding)")


# ---- guided evaluation and condition dropout ----

def guided(denoiser, x: torch.Tensor, sigma, cond, null_cond, scale: float) -> torch.Tensor:
    """The guided output f^k(x, c) = f(x, none) + k * (f(x, c) - f(x, none)) of ``denoiser`` at scale k.

    k = 1 calls ``denoiser(x, sigma, cond)``, k = 0 ``denoiser(x, sigma, null)``; any other k makes ONE call
    over the 2B samples [x; x] with conditions [null; cond] and combines the halves with
    ``reference.cfg_combine``.

    Args:
        denoiser: called as ``denoiser(x, sigma[, labels], **keywords)``, see ``conditions.call``.
        x: (B, *F).
        sigma: what the denoiser takes: (B,), (B, 1, ..., 1), 0-d or a number.
        cond: class labels or a dict of keyword tensors, B rows each; None for an unconditional network,
            allowed only at k = 1.
        null_cond: the unconditional input in cond's form, 1 or B rows.
        scale: k, the guidance scale.
    """
    scale = check_real("scale", scale)
    if scale == 1:
        return conditions.call(denoiser, x, sigma, cond)
    _need_condition(cond, null_cond, scale)
    batch = x.shape[0]
    if conditions.rows(cond) != batch:
        raise ValueError(f"cond has {conditions.rows(cond)} rows but x has {batch} samples")
    nulls = conditions.null_items(cond, null_cond, batch)
    if scale == 0:
        return conditions.call(denoiser, x, sigma, conditions.rebuild(cond, nulls))
    items = conditions.tensor_items(cond, "cond")
    stacked = {k: torch.cat([nulls[k], v], 0) for k, v in items.items()}
    out = conditions.call(denoiser, torch.cat([x, x], 0), _twice(sigma), conditions.rebuild(cond, stacked))
    return reference.cfg_combine(out[:batch], out[batch:], scale)


def drop_condition(cond, null_cond, p: float, generator: torch.Generator | None = None):
    """``cond`` with each sample's condition replaced by the null condition with probability ``p``.

    One uniform draw per sample, on ``generator``'s device (default: the global generator of cond's
    device); every tensor of a dict condition drops the same samples. p = 0 returns ``cond`` itself and
    draws nothing.
    """
    p = check_real("p", p)
    if not 0 <= p <= 1:
        raise ValueError(f"p must be in [0, 1], got {p}")
    if p == 0:
        return cond
    if cond is None or null_cond is None:
        raise ValueError("condition dropout needs a condition and the null condition, got "
                         f"cond={'None' if cond is None else 'given'}, null_cond="
                         f"{'None' if null_cond is None else 'given'} (an unconditional network has none)")
    batch = conditions.rows(cond)
    nulls = conditions.null_items(cond, null_cond, batch)
    items = conditions.tensor_items(cond, "cond")
    device = next(iter(items.values())).device
    draw_on = generator.device if generator is not None else device
    dropped = (torch.rand(batch, generator=generator, device=draw_on) < p).to(device)
    out = {k: torch.where(dropped.reshape(batch, *([1] * (v.dim() - 1))), nulls[k], v)
           for k, v in items.items()}
    return conditions.rebuild(cond, out)


def null_labels(num_classes: int, label_format: str, device=None,
                null_index: int | None = None) -> torch.Tensor:
    """The unconditional class label, one row: EDM's one-hot networks take a row of zeros (the input their
    label dropout trains); index labels need the network's own null class, ``null_index``."""
    check_int("num_classes", num_classes, 1, "guidance needs a conditional network (num_classes >= 1), got "
              "num_classes={value!r}")
    if label_format == "onehot":
        if null_index is not None:
            raise ValueError("null_index is for index labels; one-hot labels use a row of zeros")
        return torch.zeros(1, int(num_classes), device=device)
    if label_format == "index":
        check_int("null_index", null_index, message="index labels need null_index, the class the network was "
                  "trained to read as 'no condition', got {value!r}")
        return torch.full((1,), int(null_index), dtype=torch.long, device=device)
    raise ValueError(f"label_format must be 'onehot' or 'index', got {label_format!r}")


__all__ = ["GuidanceScales", "PRESETS", "CONDITION_DROPOUT", "guided", "drop_condition", "null_labels"]
