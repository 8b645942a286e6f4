"""Classifier-free guidance of the score networks: SiD-LSG's four scales (``docs/math.md``, "Guidance
(SiD-LSG)").

SiD-LSG (Zhou et al., ICLR 2025, "Guided Score identity Distillation for Data-Free One-Step Text-to-Image
Generation") guides the fake score while it is trained (k1), the fake score inside the generator loss (k2, k3)
and the teacher inside the generator loss (k4). A guided output is

    f^k(x_t, c) = f(x_t, none) + k * (f(x_t, c) - f(x_t, none))        (reference.cfg_combine)

evaluated as ONE forward over the stacked batch [unconditional; conditional] (``guided``); k = 1 is the
plain conditional call and k = 0 the plain unconditional one, each a single forward of B samples.
While k1 or k2 is not 1, the fake-score step replaces each sample's condition by the null condition with
probability 0.1 (``drop_condition``), so that the fake score learns its unconditional output.

A condition is what the network takes besides (x, sigma): a tensor of class labels (one-hot or indices,
passed as the third positional argument, as the trainer does) or a dict of keyword tensors such as text
embeddings (``{"encoder_hidden_states": ...}``; a ``"class_labels"`` entry goes in third position). The null
condition has the same form, with one row (shared by every sample) or one row per sample.
"""
from __future__ import annotations

import numbers
from dataclasses import dataclass

import torch

from sidfast import reference
from sidfast._checks import check_real, check_same_kind

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

    @classmethod
    def lsg(cls, k: float) -> "GuidanceScales":
        return cls.preset("lsg", k)

    @classmethod
    def long(cls, k: float) -> "GuidanceScales":
        return cls.preset("long", k)

    @classmethod
    def short(cls, k: float) -> "GuidanceScales":
        return cls.preset("short", k)

    @classmethod
    def zero(cls) -> "GuidanceScales":
        return cls.preset("zero")

    @classmethod
    def anti(cls, k: float) -> "GuidanceScales":
        return cls.preset("anti", k)

    @classmethod
    def parse(cls, spec, option: str = "guidance") -> "GuidanceScales":
        """Scales from a command-line value: a preset ("none", "zero", "lsg:2", "long:1.5", "short:0.5",
        "anti:-1") or the four numbers "k1,k2,k3,k4". Errors name ``option``."""
        if isinstance(spec, GuidanceScales):
            return spec
        if not isinstance(spec, str) or not spec.strip():
            raise ValueError(f"{option} must be a preset or four numbers k1,k2,k3,k4, got {spec!r}")
        text = spec.strip().lower()
        try:
            if "," in text:
                values = [float(v) for v in text.split(",")]
                if len(values) != 4:
                    raise ValueError(f"four numbers k1,k2,k3,k4 are needed, got {len(values)}")
                return cls(*values)
            name, _, k = text.partition(":")
            return cls.preset(name, float(k) if k else None)
        except ValueError as exc:
            raise ValueError(f"{option} {spec!r}: {exc} (presets: none, zero, lsg:K, long:K, short:K, "
                             "anti:K; or k1,k2,k3,k4)") from None

    @property
    def active(self) -> bool:
        """Whether any network is guided, i.e. the run needs conditions and the null condition."""
        return (self.k1, self.k2, self.k4) != (1.0, 1.0, 1.0)

    @property
    def condition_dropout(self) -> float:
        """Probability of the null condition in the fake-score step: 0.1 while k1 or k2 is not 1, else 0."""
        return CONDITION_DROPOUT if (self.k1 != 1 or self.k2 != 1) else 0.0


# ---- conditions ----

def flat_condition(cond: dict) -> dict:
    """Keyword conditioning as flat ``{path: value}`` entries, a path being the tuple of keys that reaches a
    value through nested keyword dicts (SDXL's ``added_cond_kwargs``): how guidance pairs each tensor with
    its null, and how the score engine passes conditioning to compiled functions and captured graphs (whose
    arguments are tensors, not dicts)."""
    flat = {}
    for key, value in cond.items():
        if isinstance(value, dict):
            flat.update({(key, *path): v for path, v in flat_condition(value).items()})
        else:
            flat[(key,)] = value
    return flat


def nested_condition(paths, values) -> dict:
    """The keyword conditioning that ``flat_condition`` flattened: ``paths`` and their ``values`` in order."""
    cond: dict = {}
    for path, value in zip(paths, values):
        inner = cond
        for key in path[:-1]:
            inner = inner.setdefault(key, {})
        inner[path[-1]] = value
    return cond


def path_name(path: tuple) -> str:
    """A flat path as users spell it in errors: ``added_cond_kwargs.time_ids``."""
    return ".".join(map(str, path))


def _tensor_items(cond, what: str):
    """{key: tensor} of a condition: None stands for the third positional argument (class labels), a path of
    ``flat_condition`` for a keyword tensor (nested keyword dicts included)."""
    if isinstance(cond, torch.Tensor):
        return {None: cond}
    if isinstance(cond, dict):
        return {k: v for k, v in flat_condition(cond).items() if isinstance(v, torch.Tensor)}
    raise TypeError(f"{what} must be a tensor of class labels or a dict of keyword tensors, got "
                    f"{type(cond).__name__}")


def _rows(cond) -> int:
    items = _tensor_items(cond, "cond")
    if not items:
        raise ValueError("cond holds no tensor to take the batch size from")
    sizes = {t.shape[0] if t.dim() else 0 for t in items.values()}
    if len(sizes) != 1 or 0 in sizes:
        raise ValueError(f"every tensor of cond needs one row per sample, got leading sizes {sorted(sizes)}")
    return sizes.pop()


def _null_like(null, like: torch.Tensor, batch: int, key) -> torch.Tensor:
    """``null`` (1 or B rows) expanded to ``like``'s B rows, after checking it matches ``like``."""
    name = "null_cond" if key is None else f"null_cond[{path_name(key)!r}]"
    if not isinstance(null, torch.Tensor):
        raise TypeError(f"{name} must be a tensor like the condition, got {type(null).__name__}")
    if null.dim() != like.dim() or null.shape[1:] != like.shape[1:] or null.shape[0] not in (1, batch):
        raise ValueError(f"{name} must have shape (1 or {batch}, {', '.join(map(str, like.shape[1:]))}) like "
                         f"the condition, got {tuple(null.shape)}")
    check_same_kind(name, null, "the condition", like)
    return null.expand(batch, *like.shape[1:])


def _null_items(cond, null_cond, batch: int) -> dict:
    """{key: null tensor with B rows} for each tensor of ``cond``."""
    items = _tensor_items(cond, "cond")
    if isinstance(cond, torch.Tensor):
        return {None: _null_like(null_cond, cond, batch, None)}
    if not isinstance(null_cond, dict):
        raise TypeError(f"null_cond must be a dict like cond (keys {[path_name(k) for k in items]}), got "
                        f"{type(null_cond).__name__}")
    nulls = flat_condition(null_cond)
    missing = [path_name(k) for k in items if nulls.get(k) is None]
    if missing:
        raise ValueError(f"null_cond lacks the keys {missing} of cond")
    return {k: _null_like(nulls[k], v, batch, k) for k, v in items.items()}


def _rebuild(cond, tensors: dict):
    """``cond`` with its tensors replaced by ``tensors`` (same keys; non-tensor entries kept)."""
    if isinstance(cond, torch.Tensor):
        return tensors[None]
    flat = flat_condition(cond)
    return nested_condition(flat, [tensors.get(k, v) for k, v in flat.items()])


def _call(net, x, sigma, cond):
    """``net(x, sigma[, labels], **keywords)`` as the trainer calls a denoiser."""
    if cond is None:
        return net(x, sigma)
    if isinstance(cond, torch.Tensor):
        return net(x, sigma, cond)
    keywords = dict(cond)
    labels = keywords.pop("class_labels", None)
    return net(x, sigma, labels, **keywords) if labels is not None else net(x, sigma, **keywords)


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


def expand_null(cond, null_cond, batch: int):
    """``null_cond`` in ``cond``'s form with ``batch`` rows (non-tensor entries of a dict ``cond`` kept)."""
    return _rebuild(cond, _null_items(cond, null_cond, batch))


def stack_conditions(conds: list):
    """The conditions ``conds`` (all of one form) concatenated along the batch, for one stacked forward."""
    items = [_tensor_items(c, "cond") for c in conds]
    return _rebuild(conds[0], {k: torch.cat([i[k] for i in items], 0) for k in items[0]})


def call(denoiser, x, sigma, cond):
    """``denoiser(x, sigma[, labels], **keywords)`` for a condition in ``guided``'s form (None: none)."""
    return _call(denoiser, x, sigma, cond)


# ---- guided evaluation and condition dropout ----

def guided(denoiser, x: torch.Tensor, sigma, cond, null_cond, scale: float) -> torch.Tensor:
    """The guided output f^k(x, c) = f(x, none) + k * (f(x, c) - f(x, none)) of ``denoiser`` at scale k.

    denoiser: called as ``denoiser(x, sigma[, labels], **keywords)`` (``_call``); x: (B, *F); sigma: what
    the denoiser takes ((B,), (B, 1, ..., 1), 0-d or a number); cond: class labels or a dict of keyword
    tensors, B rows each (None for an unconditional network, allowed only at k = 1); null_cond: the
    unconditional input in cond's form, 1 or B rows. k = 1 calls ``denoiser(x, sigma, cond)``, k = 0
    ``denoiser(x, sigma, null)``; any other k makes ONE call over the 2B samples [x; x] with conditions
    [null; cond] and combines the halves with ``reference.cfg_combine``.
    """
    scale = check_real("scale", scale)
    if scale == 1:
        return _call(denoiser, x, sigma, cond)
    _need_condition(cond, null_cond, scale)
    batch = x.shape[0]
    if _rows(cond) != batch:
        raise ValueError(f"cond has {_rows(cond)} rows but x has {batch} samples")
    nulls = _null_items(cond, null_cond, batch)
    if scale == 0:
        return _call(denoiser, x, sigma, _rebuild(cond, nulls))
    items = _tensor_items(cond, "cond")
    stacked = {k: torch.cat([nulls[k], v], 0) for k, v in items.items()}
    out = _call(denoiser, torch.cat([x, x], 0), _twice(sigma), _rebuild(cond, stacked))
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
    batch = _rows(cond)
    nulls = _null_items(cond, null_cond, batch)
    items = _tensor_items(cond, "cond")
    device = next(iter(items.values())).device
    draw_on = generator.device if generator is not None else device
    dropped = (torch.rand(batch, generator=generator, device=draw_on) < p).to(device)
    out = {k: torch.where(dropped.reshape(batch, *([1] * (v.dim() - 1))), nulls[k], v)
           for k, v in items.items()}
    return _rebuild(cond, out)


def null_labels(num_classes: int, label_format: str, device=None,
                null_index: int | None = None) -> torch.Tensor:
    """The unconditional class label, one row: EDM's one-hot networks take a row of zeros (the input their
    label dropout trains); index labels need the network's own null class, ``null_index``."""
    if isinstance(num_classes, bool) or not isinstance(num_classes, numbers.Integral) or num_classes < 1:
        raise ValueError("guidance needs a conditional network (num_classes >= 1), got "
                         f"num_classes={num_classes!r}")
    if label_format == "onehot":
        if null_index is not None:
            raise ValueError("null_index is for index labels; one-hot labels use a row of zeros")
        return torch.zeros(1, int(num_classes), device=device)
    if label_format == "index":
        if isinstance(null_index, bool) or not isinstance(null_index, numbers.Integral):
            raise ValueError("index labels need null_index, the class the network was trained to read as "
                             f"'no condition', got {null_index!r}")
        return torch.full((1,), int(null_index), dtype=torch.long, device=device)
    raise ValueError(f"label_format must be 'onehot' or 'index', got {label_format!r}")


# ---- the two forms of a condition ----

def joined(labels, cond: dict):
    """The condition in ``guided``'s form: the labels alone, or the keywords with the labels as
    "class_labels"."""
    if not cond:
        return labels
    out = dict(cond)
    if labels is not None:
        out["class_labels"] = labels
    return out


def split(condition) -> tuple:
    """(labels, keyword conditions) of a condition in ``guided``'s form."""
    if isinstance(condition, dict):
        cond = dict(condition)
        return cond.pop("class_labels", None), cond
    return condition, {}


__all__ = ["GuidanceScales", "PRESETS", "CONDITION_DROPOUT", "guided", "drop_condition", "null_labels",
           "expand_null", "stack_conditions", "call", "joined", "split"]
