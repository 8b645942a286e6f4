"""The score engine's guided phases: ``guidance.guided`` evaluations as pure tensor functions, which the
engine compiles and captures like its plain phases (``sidfast.engine.scores.ScoreEngine``, scales other than 1).

The null condition travels as further tensor arguments after the condition's, so that one compiled function
or captured graph serves every batch. In mode "full" each network is guided on its own (teacher at k4, fake
score at k2 in the generator phase; fake score at k1 in its own phase); in mode "lora" the generator phase is
ONE forward of the shared network over the rows each half needs (``lora_guided``).
"""
from __future__ import annotations

import torch

from sidfast import conditions, guidance, reference
from sidfast.conditions import flat_condition, nested_condition, path_name


def null_arguments(x_t: torch.Tensor, names: tuple, has_labels: bool, scales: tuple, null_labels,
                   null_cond: dict | None) -> tuple:
    """The null condition's tensors in argument order (labels first, then the keyword tensors at the paths
    ``names`` of ``sidfast.conditions.flat_condition``), each expanded to the batch; raises ValueError when
    guidance has nothing to guide between."""
    if not has_labels and not names:
        raise ValueError(f"guidance at scale {scales} needs a conditional network: no labels and no "
                         "conditioning were given (an unconditional network cannot be guided)")
    null_cond = flat_condition(dict(null_cond or {}))
    if has_labels and null_labels is None:
        raise ValueError("guidance needs null_labels, the unconditional labels of the networks")
    missing = [k for k in names if k not in null_cond]
    if missing:
        raise ValueError("guidance needs null_cond entries for the conditioning "
                         f"{[path_name(k) for k in missing]}")
    batch = x_t.shape[0]
    nulls = ((null_labels,) if has_labels else ()) + tuple(null_cond[k] for k in names)
    return tuple(n.expand(batch, *n.shape[1:]) if n.shape[0] == 1 else n for n in nulls)


def dispatch(phase: str, mode: str, fake, views, one, shared):
    """A phase's evaluation, shared by the plain and the guided phase functions.

    "fake": ``one(fake, 0)``; "generator" in mode "full": ``(one(views[0], 0), one(views[1], 1))``, teacher
    then fake score; in mode "lora": ``shared(views[0])``, one forward of the split-mode tree. The index is the
    scale's position in the guided phase's ``scales``.
    """
    if phase == "fake":
        return one(fake, 0)
    if mode == "full":
        return one(views[0], 0), one(views[1], 1)
    return shared(views[0])


def guided_function(fake, views, mode: str, autocast, phase: str, names: tuple[tuple, ...],
                    has_labels: bool, scales: tuple):
    """A guided phase as a pure tensor function ``f(x_t, sigma, [labels], *cond, [null_labels], *null_cond)``.

    Args:
        fake: the fake score, called in phase "fake".
        views: the generator phase's frozen views, teacher then fake score in mode "full", the split-mode
            tree alone in mode "lora".
        mode: "full" or "lora".
        autocast: ``device -> context manager`` entered around the evaluation.
        phase: "fake" (``guidance.guided`` of the fake score at scales[0]) or "generator" (``guided`` of each
            view at its scale in mode "full", ``lora_guided`` in mode "lora").
        names: the conditioning's paths, ``sidfast.conditions.flat_condition``.
        has_labels: whether labels come first among the condition tensors.
        scales: the guidance scales, one per network evaluated.
    """
    count = len(names) + has_labels

    def run(x_t, sigma, *rest):
        cond = as_condition(names, has_labels, rest[:count])
        null = as_condition(names, has_labels, rest[count:])
        with autocast(x_t.device):
            return dispatch(phase, mode, fake, views,
                            lambda net, i: guidance.guided(net, x_t, sigma, cond, null, scales[i]),
                            lambda view: lora_guided(view, x_t, sigma, cond, null, scales))

    return run


def as_condition(names: tuple, has_labels: bool, tensors: tuple):
    """The condition ``guidance.guided`` takes: the labels tensor alone, or a dict of keyword tensors (nested
    again from their paths ``names``; the labels under "class_labels")."""
    if not names:
        return tensors[0] if has_labels else None
    cond = nested_condition(names, tensors[1:] if has_labels else tensors)
    if has_labels:
        cond["class_labels"] = tensors[0]
    return cond


def _half_rows(scale: float) -> int:
    """Condition blocks one network's half needs: 1 at k = 1 (cond) or k = 0 (null), else 2 ([null; cond])."""
    return 1 if scale in (0.0, 1.0) else 2


def lora_guided(view, x_t, sigma, cond, null, scales: tuple):
    """Teacher guided at scales[0] and LoRA fake score at scales[1] in ONE forward of the split-mode tree:
    the batch is [teacher blocks; fake blocks], each half [null; cond] (or the one block its scale needs, when
    both halves need one) so that the two halves have equal size."""
    batch = x_t.shape[0]
    blocks = max(_half_rows(k) for k in scales)
    null_full = conditions.expand_null(cond, null, batch)

    def half(k):
        if blocks == 1:
            return [null_full if k == 0 else cond]
        return [null_full, cond]

    parts = half(scales[0]) + half(scales[1])
    stacked = conditions.stack_conditions(parts)
    n = len(parts)
    sig = sigma.repeat(n) if isinstance(sigma, torch.Tensor) and sigma.dim() > 0 else sigma
    y = conditions.call(view, x_t.repeat(n, *([1] * (x_t.dim() - 1))), sig, stacked)
    out = []
    for i, k in enumerate(scales):
        if blocks == 1:
            out.append(y[i * batch:(i + 1) * batch])
            continue
        f_null = y[2 * i * batch:(2 * i + 1) * batch]
        f_cond = y[(2 * i + 1) * batch:(2 * i + 2) * batch]
        out.append(f_cond if k == 1 else f_null if k == 0 else reference.cfg_combine(f_null, f_cond, k))
    return tuple(out)
