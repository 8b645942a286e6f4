"""Checkpoint files: atomic writes, validated reads, and the two formats sidfast writes.

- ``atomic_save(obj, path)``: ``torch.save`` to a temporary file in the same directory, ``fsync``, keep the
  previous file as ``<name>.prev<suffix>`` (hard link), ``os.replace`` onto ``path``, ``fsync`` the directory.
  A crash or a full disk at any point leaves either the old or the new file, never a torn one. A previous file
  that does not read back (its zip CRCs fail) is set aside as ``<name>.unreadable<suffix>`` instead, so that
  it never replaces a good ``.prev`` file.
- ``load_checkpoint(path, kind)``: ``torch.load(weights_only=True)`` (no code runs from a foreign pickle),
  then checks the format marker; a missing, empty, truncated, corrupt or foreign file raises
  ``CheckpointError`` (a ValueError) that says what the file is and what to do.
- Network checkpoints (``kind="network"``, e.g. a teacher trained by ``sidfast train-teacher``):
  ``{"format": "sidfast.network", "version": 1, "builder": "module:function", "config": {...},
  "state_dict": {...}, "meta": {...}}``; ``load_network`` rebuilds the module as ``builder(config)``.
- Distillation checkpoints (``kind="distill"``): ``save_distill`` / ``load_distill`` below, one file holding
  the generator, its EMA, the fake score (only its LoRA factors with ``fake_score="lora"``), both optimizers,
  every rank's RNG state, the config, and what ``sidfast sample`` needs to rebuild the generator
  (``architecture`` or ``teacher``, ``image_shape``, ``num_classes``, ``label_format``, ``sigma_init``,
  and the few-step generator's ``gen_steps``, ``step_spacing`` and ``renoise``).
- Sharded distillation checkpoints (runs with ``fsdp``): a directory ``checkpoint.dcp`` written by every rank
  with ``torch.distributed.checkpoint`` (DCP: each rank its shards, rank 0 the index) plus ``meta.pt`` (the
  same file as above without tensors of the networks: counters, config, every rank's RNG state). Written
  into a temporary directory, fsynced, then renamed into place, the previous one kept as
  ``checkpoint.prev.dcp``; DCP reshards on load, so a run resumes at any number of processes.
"""
from __future__ import annotations

import importlib
import json
import os
import pickle
import shutil
import tempfile
import warnings
import zipfile
from pathlib import Path

import torch

from . import runtime
from .config import CHECKPOINT_NAME, SHARDED_CHECKPOINT_NAME, TrainConfig

FORMATS = {"network": "sidfast.network", "distill": "sidfast.distill"}
VERSION = 1


class CheckpointError(ValueError):
    """A checkpoint that cannot be used: missing, unreadable, corrupt, or not the expected kind."""


def previous_path(path) -> Path:
    """Where ``atomic_save`` keeps the file it replaced: ``run/checkpoint.pt`` ->
    ``run/checkpoint.prev.pt``."""
    path = Path(path)
    return path.with_name(f"{path.stem}.prev{path.suffix}")


def _fsync_dir(directory: Path) -> None:
    try:
        fd = os.open(directory, os.O_RDONLY)
    except OSError:  # platforms without directory fds
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def unreadable_path(path) -> Path:
    """Where ``atomic_save`` sets aside a file it would replace that does not read back:
    ``run/checkpoint.pt`` -> ``run/checkpoint.unreadable.pt``."""
    path = Path(path)
    return path.with_name(f"{path.stem}.unreadable{path.suffix}")


def _unused_name(path: Path) -> Path:
    """``path``, or ``path`` with a number before its suffix when that name is taken."""
    candidate, n = path, 1
    while candidate.exists():
        candidate = path.with_name(f"{path.stem}.{n}{path.suffix}")
        n += 1
    return candidate


def _reads_back(path: Path) -> bool:
    """Whether ``path`` is a whole zip archive (what ``torch.save`` writes) whose entries pass their CRCs."""
    try:
        with zipfile.ZipFile(path) as archive:
            return archive.testzip() is None
    except (OSError, zipfile.BadZipFile, EOFError, RuntimeError):
        return False


def _keep_as_previous(path: Path) -> None:
    """Hard-link ``path`` to ``previous_path(path)``: the old file stays reachable while ``path`` is
    replaced."""
    prev = previous_path(path)
    link_tmp = prev.with_name(f".{prev.name}.{os.getpid()}.tmp")
    try:
        if link_tmp.exists():
            link_tmp.unlink()
        os.link(path, link_tmp)
        os.replace(link_tmp, prev)
    except OSError:
        if link_tmp.exists():
            link_tmp.unlink()


def atomic_save(obj, path, keep_previous: bool = True) -> Path:
    """``torch.save(obj)`` to ``path`` atomically (temp file in the same dir, fsync, rename, fsync dir).

    With ``keep_previous`` the file being replaced stays available as ``previous_path(path)`` when it reads
    back, and is moved to ``unreadable_path(path)`` (never deleted) when it does not.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as f:
            torch.save(obj, f)
            f.flush()
            os.fsync(f.fileno())
        if keep_previous and path.exists():
            if _reads_back(path):
                _keep_as_previous(path)
            else:
                os.replace(path, _unused_name(unreadable_path(path)))
        os.replace(tmp, path)
        _fsync_dir(path.parent)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise
    return path


def _what_to_do(path: Path, kinds: tuple) -> str:
    prev = previous_path(path)
    if "distill" not in kinds:
        return f"; the previous version is kept at {str(prev)!r}" if prev.is_file() else ""
    fresh = f"start the run again with {TrainConfig.option('overwrite')}"
    if prev.exists():
        return f"; resume from the previous checkpoint with {TrainConfig.option('resume')} {prev}, or {fresh}"
    return f"; {fresh}"


def _what_is_wrong(path: Path, exc: Exception) -> str:
    """Why ``torch.load`` failed on ``path``, in words: empty, not a torch file, truncated, corrupt,
    foreign."""
    size = path.stat().st_size
    if size == 0:
        return "is empty (0 bytes): the write that made it did not finish"
    with open(path, "rb") as f:
        head = f.read(4)
    if not zipfile.is_zipfile(path):
        if head == b"PK\x03\x04":
            return (f"is truncated: a torch checkpoint (zip archive) of {size:,} bytes whose end is missing, "
                    "from an interrupted write or copy")
        return f"is not a torch checkpoint (torch.save writes a zip archive; this file starts with {head!r})"
    try:
        with zipfile.ZipFile(path) as archive:
            bad = archive.testzip()
            names = archive.namelist()
    except (OSError, zipfile.BadZipFile, EOFError, RuntimeError) as err:
        return f"is a damaged zip archive ({type(err).__name__}), not a readable torch checkpoint"
    if bad is not None:
        return f"is corrupt: its entry {bad!r} fails the zip CRC check"
    if not any(name.endswith("data.pkl") for name in names):
        return "is a zip archive but not a torch checkpoint (no data.pkl inside)"
    if isinstance(exc, pickle.UnpicklingError):
        return ("holds Python objects other than tensors and plain containers; sidfast reads checkpoints "
                "with torch.load(weights_only=True) and runs no code from a file (not a sidfast checkpoint)")
    return f"cannot be read by this torch {torch.__version__} ({type(exc).__name__})"


def load_checkpoint(path, kind) -> dict:
    """Read a sidfast checkpoint of ``kind`` ("network", "distill", or a tuple of them) to CPU.

    Raises ``CheckpointError`` for a missing, unreadable, corrupt or foreign file. ``data["format"]`` says which.
    """
    kinds = (kind,) if isinstance(kind, str) else tuple(kind)
    if not kinds or any(k not in FORMATS for k in kinds):
        raise ValueError(f"kind must be one of {sorted(FORMATS)} or a tuple of them, got {kind!r}")
    path = Path(path)
    if not path.exists():
        raise CheckpointError(f"checkpoint {str(path)!r} does not exist")
    if not path.is_file():
        raise CheckpointError(f"checkpoint {str(path)!r} is not a file")
    if not os.access(path, os.R_OK):
        raise CheckpointError(f"checkpoint {str(path)!r} is not readable (permissions)")
    try:
        data = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # torch raises RuntimeError, UnpicklingError, EOFError, ... for bad files
        raise CheckpointError(f"checkpoint {str(path)!r} {_what_is_wrong(path, exc)}"
                              f"{_what_to_do(path, kinds)}") from None
    found = data.get("format") if isinstance(data, dict) else None
    wanted = [FORMATS[k] for k in kinds]
    if found not in wanted:
        what = f"format {found!r}" if found else f"a {type(data).__name__} without a sidfast format marker"
        raise CheckpointError(f"checkpoint {str(path)!r} is {what}, expected a {' or '.join(map(repr, wanted))} "
                              f"checkpoint{_what_to_do(path, kinds)}")
    if data.get("version") != VERSION:
        raise CheckpointError(f"checkpoint {str(path)!r} has version {data.get('version')!r}; this sidfast "
                              f"reads version {VERSION}")
    return data


def kind_of(data: dict) -> str:
    """"network" or "distill" for a checkpoint read by ``load_checkpoint``."""
    return {v: k for k, v in FORMATS.items()}[data["format"]]


# ---- distillation checkpoints ----

def teacher_reference(spec: str | None) -> str | None:
    """How a checkpoint names its teacher: an absolute path for a file or directory that exists (so the
    checkpoint can be sampled from any working directory), an entry point ``module:function`` unchanged."""
    if spec is None:
        return None
    path = Path(spec).expanduser()
    return str(path.resolve()) if path.exists() else spec


def _fake_state(fake: torch.nn.Module, config: TrainConfig) -> dict:
    """What a checkpoint keeps of the fake score: all of it, or only the LoRA factors (the rest is the
    teacher)."""
    from .lora import lora_state_dict

    return lora_state_dict(fake) if config.fake_score == "lora" else fake.state_dict()


def _load_fake(fake: torch.nn.Module, state: dict, config: TrainConfig) -> None:
    if config.fake_score != "lora":
        fake.load_state_dict(state)
        return
    missing, unexpected = fake.load_state_dict(state, strict=False)
    lora_missing = [k for k in missing if k.endswith((".lora_A", ".lora_B"))]
    if unexpected or lora_missing or not state:
        raise ValueError(f"the checkpoint's fake score is not a LoRA fake score of this teacher and rank "
                         f"(missing {lora_missing[:3]}, unexpected {unexpected[:3]})")


def save_distill(path, config: TrainConfig, networks: dict, optimizers: dict, iteration: int, nimg: int,
                 dist: runtime.Dist, device: torch.device, **meta) -> Path | None:
    """Write a distillation checkpoint from rank 0; every rank calls it (their RNG states are gathered).

    ``networks``: generator, generator_ema, fake; ``optimizers``: opt_g, opt_fake; ``meta``: architecture,
    image_shape, num_classes, label_format, gen_steps, step_spacing, renoise, last (stored as given). Returns
    the path on rank 0, else None.
    """
    rngs = runtime.all_gather(dist, runtime.rng_state(device))
    if config.fsdp:
        return _save_sharded(path, config, networks, optimizers, iteration, nimg, rngs, dist, **meta)
    written = None
    if dist.rank == 0:
        data = {"format": FORMATS["distill"], "version": VERSION, "iteration": iteration, "nimg": nimg,
                "world_size": dist.world, "config": config.to_dict(), "rng": rngs,
                "generator": networks["generator"].state_dict(),
                "generator_ema": networks["generator_ema"].state_dict(),
                "fake": _fake_state(networks["fake"], config),
                "opt_g": optimizers["opt_g"].state_dict(), "opt_fake": optimizers["opt_fake"].state_dict(),
                "teacher": teacher_reference(config.teacher), "sigma_init": config.sigma_init, **meta}
        written = atomic_save(data, path)
    runtime.barrier(dist)
    return written


def load_distill(data: dict, path, config: TrainConfig, networks: dict, optimizers: dict,
                 dist: runtime.Dist, device: torch.device) -> tuple[int, int]:
    """Restore a distillation checkpoint read by ``load_checkpoint(path, "distill")`` into ``networks`` and
    ``optimizers`` (as in ``save_distill``) and this rank's random streams; returns (iteration, nimg).

    Options that change the run's trajectory and differ from the checkpoint's are warned about. A checkpoint
    written by another number of processes re-seeds the streams from seed + iteration.
    """
    old = data.get("config", {})
    changed = [TrainConfig.option(name) for name in TrainConfig.trajectory_options()
               if name in old and _plain(old[name]) != _plain(getattr(config, name))]
    if changed and dist.rank == 0:
        warnings.warn(f"resuming {str(path)!r} with changed options {', '.join(changed)}: the run will not "
                      "match an uninterrupted one", stacklevel=3)
    if data.get("sharded"):
        _load_sharded(path, config, networks, optimizers)
    else:
        _load_full(data, path, config, networks, optimizers)
    iteration = int(data["iteration"])
    states = data.get("rng") or []
    if int(data.get("world_size", 1)) == dist.world and len(states) == dist.world:
        runtime.set_rng_state(states[dist.rank], device)
    else:
        # weights, optimizer states and the counters (iteration, nimg; the trainer draws its samples, it reads
        # no data set) continue exactly; the per-rank random streams cannot, there are more or fewer of them
        if dist.rank == 0:
            warnings.warn(f"checkpoint {str(path)!r} was written by {data.get('world_size')} process(es), "
                          f"this run has {dist.world}: weights, optimizer states and counters continue; "
                          f"the random streams are re-seeded from seed + iteration, so the run goes on "
                          f"with other draws than an uninterrupted one", stacklevel=3)
        runtime.seed_everything(config.seed + iteration, dist.rank, dist.world)
    return iteration, int(data["nimg"])


def _load_full(data: dict, path, config: TrainConfig, networks: dict, optimizers: dict) -> None:
    if config.fsdp:
        _load_full_into_shards(data, path, config, networks, optimizers)
        return
    try:
        networks["generator"].load_state_dict(data["generator"])
        networks["generator_ema"].load_state_dict(data["generator_ema"])
        _load_fake(networks["fake"], data["fake"], config)
        optimizers["opt_g"].load_state_dict(data["opt_g"])
        optimizers["opt_fake"].load_state_dict(data["opt_fake"])
    except (RuntimeError, ValueError, KeyError) as exc:
        raise CheckpointError(f"checkpoint {str(path)!r} does not fit these networks (another teacher or "
                              f"architecture?): {str(exc).strip()[:400]}") from None


def _by_name(net: torch.nn.Module, optim_state: dict) -> dict:
    """A ``torch.optim`` state dict (parameters numbered in the optimizer's order: the network's trainable
    parameters) keyed by parameter names instead, as ``set_state_dict`` takes it."""
    names = [name for name, p in net.named_parameters() if p.requires_grad]
    groups = [{**group, "params": [names[i] for i in group["params"]]}
              for group in optim_state["param_groups"]]
    return {"state": {names[i]: state for i, state in optim_state["state"].items()}, "param_groups": groups}


def _load_full_into_shards(data: dict, path, config: TrainConfig, networks: dict, optimizers: dict) -> None:
    """A checkpoint file of an unsharded run into FSDP-sharded networks: each rank keeps its part."""
    from torch.distributed.checkpoint.state_dict import StateDictOptions, set_model_state_dict, set_state_dict

    full = StateDictOptions(full_state_dict=True)
    try:
        set_state_dict(networks["generator"], optimizers["opt_g"], model_state_dict=data["generator"],
                       optim_state_dict=_by_name(networks["generator"], data["opt_g"]), options=full)
        set_model_state_dict(networks["generator_ema"], data["generator_ema"], options=full)
        lora = config.fake_score == "lora"
        set_state_dict(networks["fake"], optimizers["opt_fake"], model_state_dict=data["fake"],
                       optim_state_dict=_by_name(networks["fake"], data["opt_fake"]),
                       options=StateDictOptions(full_state_dict=True, strict=not lora))
    except (RuntimeError, ValueError, KeyError, IndexError) as exc:
        raise CheckpointError(f"checkpoint {str(path)!r} does not fit these networks (another teacher or "
                              f"architecture?): {str(exc).strip()[:400]}") from None


# ---- sharded distillation checkpoints (torch.distributed.checkpoint) ----

META_NAME = "meta.pt"


def distill_checkpoint_in(run_dir, sharded: bool) -> Path:
    """The checkpoint ``--resume auto`` continues in ``run_dir``: the kind this run writes (sharded or
    not) when it exists, else the other kind when that exists, else the kind this run writes."""
    names = (CHECKPOINT_NAME, SHARDED_CHECKPOINT_NAME)
    if sharded:
        names = names[::-1]
    for name in names:
        if (Path(run_dir) / name).exists():
            return Path(run_dir) / name
    return Path(run_dir) / names[0]


def read_distill(path) -> dict:
    """``load_checkpoint(path, "distill")`` for a checkpoint file, or the ``meta.pt`` of a sharded checkpoint
    directory (then ``data["sharded"]`` is True and the tensors stay on disk until ``load_distill``)."""
    path = Path(path)
    if not path.exists() and previous_path(path).exists():
        raise CheckpointError(f"checkpoint {str(path)!r} does not exist{_what_to_do(path, ('distill',))}")
    if not path.is_dir():
        return load_checkpoint(path, "distill")
    if not (path / ".metadata").is_file() or not (path / META_NAME).is_file():
        raise CheckpointError(f"checkpoint {str(path)!r} is a directory but not a whole sharded checkpoint "
                              f"(.metadata or {META_NAME} missing){_what_to_do(path, ('distill',))}")
    data = load_checkpoint(path / META_NAME, "distill")
    data["sharded"] = True
    return data


def _sharded_state(networks: dict, optimizers: dict) -> dict:
    """Model and optimizer state dicts keyed by parameter names (``torch.distributed.checkpoint.state_dict``):
    DTensor shards under FSDP, plain tensors otherwise, so that one layout loads at any world size. The frozen
    weights a LoRA fake score shares with the teacher are left out."""
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict, get_state_dict

    trainable = StateDictOptions(ignore_frozen_params=True)
    g_model, g_optim = get_state_dict(networks["generator"], optimizers["opt_g"])
    fake_model, fake_optim = get_state_dict(networks["fake"], optimizers["opt_fake"], options=trainable)
    return {"generator": g_model, "generator_ema": get_model_state_dict(networks["generator_ema"]),
            "fake": fake_model, "opt_g": g_optim, "opt_fake": fake_optim}


def _save_sharded(path, config: TrainConfig, networks: dict, optimizers: dict, iteration: int, nimg: int,
                  rngs: list, dist: runtime.Dist, **meta) -> Path | None:
    import torch.distributed.checkpoint as dcp

    path = Path(path)
    tmp = path.with_name(f".{path.name}.tmp")
    if dist.rank == 0:  # a save that died part-way left this behind
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir(parents=True)
    runtime.barrier(dist)
    writer = dcp.FileSystemWriter(tmp, sync_files=True)  # every rank fsyncs its shard files
    dcp.save(_sharded_state(networks, optimizers), storage_writer=writer)
    written = None
    if dist.rank == 0:
        data = {"format": FORMATS["distill"], "version": VERSION, "iteration": iteration, "nimg": nimg,
                "world_size": dist.world, "config": config.to_dict(), "rng": rngs,
                "teacher": teacher_reference(config.teacher), "sigma_init": config.sigma_init, **meta}
        atomic_save(data, tmp / META_NAME, keep_previous=False)
        written = _replace_dir(tmp, path)
    runtime.barrier(dist)
    return written


def _replace_dir(tmp: Path, path: Path) -> Path:
    """Rename the finished directory ``tmp`` onto ``path``, the replaced one kept as
    ``previous_path(path)``. ``path`` names a whole checkpoint at every instant but one: between its two
    renames only ``previous_path(path)`` (complete) and ``tmp`` (complete) exist."""
    _fsync_dir(tmp)
    prev = previous_path(path)
    old_prev = prev.with_name(f".{prev.name}.old")
    shutil.rmtree(old_prev, ignore_errors=True)
    if path.exists():
        if prev.exists():
            os.replace(prev, old_prev)
        os.replace(path, prev)
    os.replace(tmp, path)
    _fsync_dir(path.parent)
    shutil.rmtree(old_prev, ignore_errors=True)
    return path


def _load_sharded(path, config: TrainConfig, networks: dict, optimizers: dict) -> None:
    """Read a sharded checkpoint into ``networks`` and ``optimizers`` (after ``fully_shard`` under FSDP: DCP
    reads each rank's part of every tensor, whatever the number of processes that wrote it)."""
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import StateDictOptions, set_model_state_dict, set_state_dict

    state = _sharded_state(networks, optimizers)
    try:
        dcp.load(state, checkpoint_id=str(path))
    except Exception as exc:  # DCP raises CheckpointException, RuntimeError, KeyError for a mismatch
        raise CheckpointError(f"checkpoint {str(path)!r} does not fit these networks (another teacher, "
                              f"architecture or {TrainConfig.option('fake_score')}?): "
                              f"{str(exc).strip()[:400]}") from None
    set_state_dict(networks["generator"], optimizers["opt_g"], model_state_dict=state["generator"],
                   optim_state_dict=state["opt_g"])
    set_model_state_dict(networks["generator_ema"], state["generator_ema"])
    set_state_dict(networks["fake"], optimizers["opt_fake"], model_state_dict=state["fake"],
                   optim_state_dict=state["opt_fake"],
                   options=StateDictOptions(ignore_frozen_params=True, strict=False))


def _plain(value):
    return list(value) if isinstance(value, (tuple, list)) else value


def import_entry_point(spec: str):
    """The object named by ``"package.module:attr"`` (attr may be dotted)."""
    module_name, sep, attr = str(spec).partition(":")
    if not sep or not module_name or not attr:
        raise ValueError(f"entry point must look like 'package.module:function', got {spec!r}")
    target = importlib.import_module(module_name)
    for part in attr.split("."):
        target = getattr(target, part)
    return target


def save_network(path, net: torch.nn.Module, builder: str, config: dict, meta: dict | None = None) -> Path:
    """Write ``net`` as a network checkpoint that ``load_network`` rebuilds with ``builder(config)``."""
    state = {k: v.detach().cpu() for k, v in net.state_dict().items()}
    return atomic_save({"format": FORMATS["network"], "version": VERSION, "builder": builder,
                        "config": dict(config), "state_dict": state, "meta": dict(meta or {})}, path)


def build_network(data: dict, path="<checkpoint>") -> torch.nn.Module:
    """Rebuild the module described by a loaded network checkpoint (strict state-dict load)."""
    try:
        builder = import_entry_point(data["builder"])
        net = builder(data["config"])
    except Exception as exc:
        raise CheckpointError(f"checkpoint {str(path)!r}: cannot rebuild the network with builder "
                              f"{data.get('builder')!r} ({type(exc).__name__}: {exc})") from None
    try:
        net.load_state_dict(data["state_dict"])
    except RuntimeError as exc:
        raise CheckpointError(f"checkpoint {str(path)!r}: weights do not fit the network built by "
                              f"{data['builder']!r}: {str(exc)[:300]}") from None
    return net


def load_network(path) -> tuple[torch.nn.Module, dict]:
    """(network in eval mode, the checkpoint's ``meta``) from a network checkpoint."""
    data = load_checkpoint(path, "network")
    return build_network(data, path).eval(), data.get("meta", {})


# ---- teachers and generators from what the user has (``sidfast distill --teacher``, ``sidfast sample``) ----

def _check_readable(path: Path, what: str) -> None:
    if not path.exists():
        raise CheckpointError(f"{what} {str(path)!r} does not exist")
    if not os.access(path, os.R_OK) or (path.is_dir() and not os.access(path, os.X_OK)):
        raise CheckpointError(f"{what} {str(path)!r} is not readable (check its permissions)")


def _pipeline_index(path: Path) -> dict:
    index = path / "model_index.json"
    return json.loads(index.read_text()) if index.is_file() else {}


def _load_diffusers_teacher(path: Path, source: str, with_conditioner: bool, guidance):
    """(denoiser, TextConditioner or None) of a diffusers model or pipeline directory."""
    from . import denoisers, text

    try:
        import diffusers  # noqa: F401
    except ImportError:
        raise CheckpointError(f"--teacher {source!r} is a directory, read as a diffusers model, but "
                              "diffusers is not installed: pip install 'sidfast[diffusers]'") from None
    index = _pipeline_index(path)
    pipeline = index.get("_class_name")
    is_text = pipeline in text.PIPELINES
    if not is_text and any(k.startswith("text_encoder") for k in index):
        raise CheckpointError(f"--teacher {source!r}: pipeline class {pipeline!r} is not supported; sidfast "
                              f"reads the text-to-image pipelines {', '.join(text.PIPELINES)}")
    if is_text and not with_conditioner:
        raise CheckpointError(f"--teacher {source!r} is a text-to-image pipeline ({pipeline}), which needs "
                              "prompts and its text encoders (sidfast distill --prompts FILE; from Python: "
                              "load_teacher(path, with_conditioner=True))")
    model_config = path / "config.json"
    model_class = json.loads(model_config.read_text()).get("_class_name") if model_config.is_file() else None
    flow = "transformer" in index or model_class in denoisers.FLOW_MODELS
    try:
        if flow:
            scheduler = index.get("scheduler") or [None, None]
            if scheduler[1] is not None and "FlowMatch" not in str(scheduler[1]):
                raise ValueError(f"its transformer comes with scheduler {scheduler[1]}, not a flow-matching "
                                 "scheduler; sidfast reads transformers trained by flow matching")
            den = denoisers.FlowDenoiser.from_pretrained(path, guidance=guidance, name="teacher")
        else:
            den = denoisers.DiffusersDenoiser.from_pretrained(path, name="teacher")
        conditioner = None
        if is_text:
            dtype = next(iter(den.parameters())).dtype
            conditioner = text.TextConditioner.from_pretrained(path, torch_dtype=dtype)
    except denoisers.MissingSchedulerConfig as exc:
        looked_for = ", ".join(map(repr, exc.looked_for))
        raise CheckpointError(f"--teacher {source!r}: no scheduler config to read the schedule and "
                              f"prediction type from (looked for {looked_for}); save the scheduler the model "
                              f"was trained with into it: scheduler.save_pretrained({source!r})") from None
    except (FileNotFoundError, ValueError, OSError, ImportError) as exc:
        raise CheckpointError(f"--teacher {source!r}: {exc}") from None
    return den, conditioner


def load_teacher(source: str, with_conditioner: bool = False, guidance: float | None = None):
    """(denoiser, architecture or None) for ``--teacher``: network checkpoint, diffusers dir, module:function.

    A diffusers directory is a model directory or a pipeline directory (``model_index.json``): ``unet/`` with
    a VP scheduler (``DiffusersDenoiser``) or ``transformer/`` with a flow-matching one (``FlowDenoiser``;
    ``guidance`` is the scale a guidance-distilled FLUX embeds). A text-to-image pipeline
    (``sidfast.text.PIPELINES``) also needs its text side: with ``with_conditioner`` the result is
    (denoiser, architecture, ``TextConditioner`` or None), and without it such a pipeline is an error.
    The architecture (``{"builder", "config"}``) is known for network checkpoints only. Errors are
    ``CheckpointError`` naming ``--teacher``.
    """
    from . import denoisers

    if not isinstance(source, str) or not source:
        raise CheckpointError("--teacher is required: a sidfast checkpoint, a diffusers directory or "
                              "module:function")
    path = Path(source).expanduser()
    conditioner = None
    architecture = None
    if not path.exists() and ":" in source:  # module:function (import_entry_point says what is wrong with it)
        try:
            den = denoisers.load_entry_point(source, name="teacher")
        except (ImportError, ValueError, TypeError) as exc:
            raise CheckpointError(f"--teacher {source!r}: {exc}") from None
    else:
        _check_readable(path, "--teacher")
        if path.is_dir():
            den, conditioner = _load_diffusers_teacher(path, source, with_conditioner, guidance)
        else:
            data = load_checkpoint(path, "network")
            den = build_network(data, path).eval()
            architecture = {"builder": data["builder"], "config": data["config"]}
    return (den, architecture, conditioner) if with_conditioner else (den, architecture)


def _generator_network(data: dict, path, teacher: str | None):
    """The untrained generator network: its recorded architecture, else a fresh copy of its teacher."""
    arch = data.get("architecture")
    if arch:
        if teacher is not None:
            raise CheckpointError(f"checkpoint {str(path)!r} records its generator's architecture; it needs "
                                  "no --teacher")
        try:
            return import_entry_point(arch["builder"])(arch["config"])
        except Exception as exc:
            raise CheckpointError(f"checkpoint {str(path)!r}: cannot rebuild the generator with "
                                  f"{arch.get('builder')!r} ({type(exc).__name__}: {exc})") from None
    stored = data.get("teacher")
    if teacher is None and not stored:
        raise CheckpointError(f"checkpoint {str(path)!r} does not say how to rebuild its generator (it was "
                              "written by distill() without architecture= or config.teacher); give its "
                              "teacher: sidfast sample --teacher PATH")
    if teacher is None and not Path(stored).expanduser().exists() and ":" not in stored:
        raise CheckpointError(f"checkpoint {str(path)!r} rebuilds its generator from its teacher {stored!r}, "
                              "which does not exist here (a relative path is read from the current "
                              "directory); give the teacher's location: sidfast sample --teacher PATH")
    return load_teacher(teacher or stored)[0]


def build_generator(data: dict, path, teacher: str | None = None) -> torch.nn.Module:
    """The EMA generator (a Denoiser in eval mode) of a distillation checkpoint read by ``load_checkpoint``.

    teacher: where the teacher is now, for checkpoints that rebuild the generator from their teacher (those
    without a recorded architecture) when the teacher they name has moved.
    """
    from . import denoisers

    net = denoisers.as_denoiser(_generator_network(data, path, teacher), name="generator")
    try:
        net.load_state_dict(data["generator_ema"])
    except RuntimeError as exc:
        raise CheckpointError(f"checkpoint {str(path)!r}: generator weights do not fit the rebuilt network: "
                              f"{str(exc)[:300]}") from None
    return net.eval().requires_grad_(False)


__all__ = ["CheckpointError", "atomic_save", "load_checkpoint", "previous_path", "unreadable_path",
           "save_network", "load_network", "build_network", "import_entry_point", "kind_of", "save_distill",
           "load_distill", "read_distill",
           "distill_checkpoint_in", "teacher_reference", "load_teacher", "build_generator", "FORMATS", "VERSION"]
