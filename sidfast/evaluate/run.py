"""``sidfast eval``: the metrics of a checkpoint against reference statistics (``evaluate_checkpoint``), and the
reference statistics of a data set (``make_reference``). Under ``torchrun`` every process runs the same call:
each makes its share of the images, all features are gathered, and rank 0 computes the metrics and writes.

Errors the user can fix are ``EvalError`` (a ValueError) whose message names the option in command-line words;
the loaders' own errors (``DetectorError``, ``ReferenceFileError``, ``DataError``, ``CheckpointError``) pass
through with theirs.
"""
from __future__ import annotations

import json
import sys
import time
from pathlib import Path

from sidfast.evaluate import kernel, manifold
from sidfast.evaluate.dataset import KEEP_FEATURES, reference_stats
from sidfast.evaluate.detector import load_detector
from sidfast.evaluate.features import collect_features
from sidfast.evaluate.generation import StudentImages, parse_seeds
from sidfast.evaluate.metrics import compare
from sidfast.evaluate.statistics import read_reference, stats_of, write_reference
from sidfast.training import student
from sidfast.training.data import open_images
from sidfast.utils import runtime
from sidfast.utils.files import atomic_write

DEFAULT_NUM = 50000  # the published evaluations' sample count
DEFAULT_BATCH = 64   # EDM's generate.py and fid.py


class EvalError(ValueError):
    """Bad input to ``sidfast eval``; the message names the option."""


def _shape_text(shape) -> str:
    return "x".join(str(int(s)) for s in shape)


def _singular(count: int, dim: int, what: str) -> EvalError:
    return EvalError(f"{what} gives {count} samples, not more than the detector's {dim} features: their covariance "
                     f"is singular and FID is not defined; use more than {dim} (the published evaluations use "
                     f"{DEFAULT_NUM})")


def _progress(total: int, rank: int, world: int, log):
    """``progress(n)`` for ``collect_features``: rank 0 logs every tenth of the set (its own batches, times the
    number of processes)."""
    if rank != 0 or log is None:
        return None
    state = {"done": 0, "next": max(1, total // 10), "start": time.perf_counter()}

    def progress(n: int) -> None:
        state["done"] = min(total, state["done"] + n * world)
        if state["done"] >= state["next"] or state["done"] >= total:
            state["next"] += max(1, total // 10)
            rate = state["done"] / max(time.perf_counter() - state["start"], 1e-9)
            log(f"{state['done']}/{total} images ({rate:.1f} img/s)")

    return progress


def _stderr(line: str) -> None:
    print(f"sidfast eval: {line}", file=sys.stderr, flush=True)


def _seeds(seeds, num):
    """(the seed list, num): ``--seeds`` parsed (EDM's syntax) or 0 .. num - 1; ``--num`` defaults to the number
    of seeds, else to DEFAULT_NUM."""
    if seeds is None:
        num = DEFAULT_NUM if num is None else num
        if num < 2:
            raise EvalError(f"argument --num must be an integer >= 2, got {num}")
        return list(range(num)), num
    try:
        listed = parse_seeds(seeds)
    except ValueError as exc:
        raise EvalError(str(exc).replace("argument seeds", "argument --seeds")) from None
    if num is not None and num != len(listed):
        raise EvalError(f"argument --num {num} but --seeds lists {len(listed)} seeds: give one of them, or make "
                        f"them agree")
    if len(listed) < 2:
        raise EvalError(f"argument --seeds lists {len(listed)} seed; FID needs at least 2 images")
    return listed, len(listed)


def evaluate_checkpoint(checkpoint, ref, num: int | None = None, *, batch: int = DEFAULT_BATCH, seeds=None,
                        prompts=None, inception=None, teacher=None, steps: int | None = None,
                        kid_subsets: int = kernel.SUBSETS, kid_subset_size: int = kernel.SUBSET_SIZE,
                        pr_k: int = manifold.NEIGHBOURS, device: str = "auto", out=None,
                        log=_stderr) -> dict | None:
    """The metrics (``sidfast.evaluate.metrics.compare``) of ``num`` images of ``checkpoint``'s network (what
    ``sidfast sample`` samples: a distillation checkpoint's EMA generator, or a network checkpoint's denoiser
    with ``steps`` Heun steps) against the reference ``ref``, with the numbers that name the evaluation. Rank 0
    returns them (and writes them as JSON to ``out`` when given); other ranks return None."""
    for name, value, low in (("batch", batch, 1), ("kid-subsets", kid_subsets, 1),
                             ("kid-subset-size", kid_subset_size, 2), ("pr-k", pr_k, 1), ("steps", steps, 1)):
        if value is not None and value < low:
            raise EvalError(f"argument --{name} must be an integer >= {low}, got {value}")
    seed_list, num = _seeds(seeds, num)
    reference = read_reference(ref)
    start = time.perf_counter()
    dist_state = runtime.init_distributed(device)
    try:
        dev = runtime.resolve_device(device, dist_state.local_rank)
        detector = load_detector(inception, dev)
        dim = detector.feature_dim
        if reference.dim != dim:
            raise EvalError(f"--ref {str(ref)!r} holds statistics of {reference.dim} features but the detector "
                            f"({detector.path}) gives {dim}: make the reference with the same detector "
                            f"(sidfast eval --make-ref DATA --inception ...)")
        if num <= dim:
            raise _singular(num, dim, f"argument --num {num}")
        net, options = student.from_checkpoint(checkpoint, teacher=teacher, prompts=prompts)
        if steps is not None and "gen_steps" in options:
            options["gen_steps"] = steps
        heun_steps = steps if steps is not None and "gen_steps" not in options else 18
        decode = options.get("decode")
        shape = tuple(options["shape"])
        if decode is None and shape[0] not in (1, 3):
            raise EvalError(f"checkpoint {str(checkpoint)!r} makes samples of shape {_shape_text(shape)}, not grey "
                            f"or RGB images: the Inception detector takes images of 1 or 3 channels")
        if decode is None and reference.image_shape is not None and reference.image_shape != shape:
            raise EvalError(f"--ref {str(ref)!r} was made from {_shape_text(reference.image_shape)} images but "
                            f"checkpoint {str(checkpoint)!r} makes {_shape_text(shape)}: use the reference of "
                            f"the data set the checkpoint models")
        if decode is not None:
            decode.to(dev)
        images = StudentImages(net.to(dev), options, seed_list, dev, heun_steps)
        if log is not None and dist_state.rank == 0:
            log(f"{num} images of {checkpoint} on {dist_state.world} process(es), {dev}, batch {batch}")
        features = collect_features(images, num, detector, batch, dist_state,
                                    _progress(num, dist_state.rank, dist_state.world, log))
    finally:
        runtime.shutdown(dist_state)
    if dist_state.rank != 0:
        return None
    result = compare(stats_of(features, keep_features=None), reference, kid_subsets, kid_subset_size, pr_k,
                     device=dev)
    result.update({"num": num, "seeds": f"{seed_list[0]}-{seed_list[-1]}" if seeds is None else str(seeds),
                   "checkpoint": str(checkpoint), "ref": str(ref), "inception": str(detector.path),
                   "feature_dim": dim, "processes": dist_state.world, "device": str(dev),
                   "seconds": round(time.perf_counter() - start, 3)})
    if out is not None:
        text = json.dumps(result) + "\n"
        atomic_write(Path(out), lambda tmp: Path(tmp).write_text(text))
    return result


def make_reference(data, out, *, batch: int = DEFAULT_BATCH, keep_features: int | None = KEEP_FEATURES,
                   inception=None, device: str = "auto", log=_stderr) -> dict | None:
    """Write the reference statistics of every image of ``data`` to ``out`` (``.npz``: EDM's ``mu`` and
    ``sigma`` with ``features`` of ``keep_features`` images, ``count`` and ``image_shape``). Rank 0 returns a
    summary; other ranks None."""
    if batch < 1:
        raise EvalError(f"argument --batch must be an integer >= 1, got {batch}")
    if keep_features is not None and keep_features < 0:
        raise EvalError(f"argument --ref-features must be an integer >= 0, got {keep_features}")
    source = open_images(data)
    dist_state = runtime.init_distributed(device)
    try:
        dev = runtime.resolve_device(device, dist_state.local_rank)
        detector = load_detector(inception, dev)
        if len(source) <= detector.feature_dim:
            raise _singular(len(source), detector.feature_dim, f"--make-ref {str(data)!r}")
        if log is not None and dist_state.rank == 0:
            log(f"features of {len(source)} images of {data} on {dist_state.world} process(es), {dev}")
        stats = reference_stats(source, detector, batch, keep_features, dist_state,
                                _progress(len(source), dist_state.rank, dist_state.world, log))
    finally:
        runtime.shutdown(dist_state)
    if dist_state.rank != 0:
        return None
    write_reference(out, stats)
    kept = 0 if stats.features is None else int(stats.features.shape[0])
    return {"out": str(out), "count": stats.count, "feature_dim": stats.dim, "features": kept,
            "image_shape": list(stats.image_shape), "inception": str(detector.path)}


__all__ = ["evaluate_checkpoint", "make_reference", "EvalError", "DEFAULT_NUM", "DEFAULT_BATCH"]
