"""Run checkpoints: the state of a SiD run, saved by every rank and restored into its networks.

``checkpoint.pt`` (one file, written atomically by rank 0) or, under FSDP, the sharded ``checkpoint.dcp``
directory, which resumes at any number of processes; a sharded run also ends with ``generator.pt``. What each
holds and how it is written: ``docs/runs.md``.
"""
from __future__ import annotations

import os
import shutil
import warnings
from pathlib import Path

import torch

from sidfast.utils import runtime
from sidfast.models.lora import load_lora_factors, lora_state_dict
from sidfast.models.io import FORMATS, VERSION, CheckpointError, _what_to_do, load_checkpoint
from sidfast.utils.files import DISK_FULL, atomic_save, fault_point, fsync_dir, previous_path
from sidfast.training.config import CHECKPOINT_NAME, SHARDED_CHECKPOINT_NAME, TrainConfig
from sidfast.training.updates import lr_factor


def teacher_reference(spec: str | None) -> str | None:
    """How a checkpoint names its teacher: an absolute path for a file or directory that exists (so the
    checkpoint can be sampled from any working directory), an entry point ``module:function`` unchanged."""
    if spec is None:
        return None
    path = Path(spec).expanduser()
    return str(path.resolve()) if path.exists() else spec


def _net_state(net: torch.nn.Module, lora: bool) -> dict:
    """What a checkpoint keeps of a network: all of it, or for a LoRA network (option ``fake_score`` /
    ``generator`` lora) only the factors (the rest is the teacher)."""
    return lora_state_dict(net) if lora else net.state_dict()


def _load_net(net: torch.nn.Module, state: dict, lora: bool, what: str) -> None:
    if lora:
        load_lora_factors(net, state, what)
    else:
        net.load_state_dict(state)


def save_distill(path, config: TrainConfig, networks: dict, optimizers: dict, iteration: int, nimg: int,
                 dist: runtime.Dist, device: torch.device, **meta) -> Path | None:
    """Write a distillation checkpoint from rank 0; every rank calls it (their RNG states are gathered).

    ``networks``: generator, generator_ema, fake; ``optimizers``: opt_g, opt_fake; ``meta``: architecture,
    image_shape, num_classes, label_format, gen_steps, step_spacing, renoise, last (stored as given). Returns
    the path on rank 0, else None.
    """
    rngs = runtime.all_gather(dist, runtime.rng_state(device))
    try:
        return _save(path, config, networks, optimizers, iteration, nimg, rngs, dist, **meta)
    except BaseException as exc:  # DCP's CheckpointException (a BaseException) carries every rank's error
        full = _disk_full_error(exc)
        if full is None:
            raise
        if config.fsdp and dist.rank == 0:  # every rank has failed or finished its writes: free the room
            shutil.rmtree(Path(path).with_name(f".{Path(path).name}.tmp"), ignore_errors=True)
        raise disk_full(path, config, full) from None


def _disk_full_error(exc: BaseException) -> OSError | None:
    """The ``OSError`` of a write that found no room in ``exc``, or in the per-rank failures of DCP's
    ``CheckpointException``; else None."""
    if isinstance(exc, OSError):
        return exc if exc.errno in DISK_FULL else None
    for failure in (getattr(exc, "failures", None) or {}).values():
        inner = failure[0] if isinstance(failure, tuple) else failure
        if isinstance(inner, BaseException) and _disk_full_error(inner) is not None:
            return _disk_full_error(inner)
    return None


def disk_full(path, config: TrainConfig, exc: OSError) -> CheckpointError:
    """The one-line error of a checkpoint write that found no room: the run directory, what is kept, what
    to do."""
    path = Path(path)
    kept = [p for p in (path, previous_path(path)) if p.exists()]
    what = (f"the last complete checkpoint {str(kept[0])!r} is intact" if kept
            else "no checkpoint of this run was written")
    return CheckpointError(f"cannot write checkpoint {str(path)!r}: {os.strerror(exc.errno)} (the disk or a "
                           f"quota or file-size limit is full); {what}; free space in {str(path.parent)!r} "
                           f"(or choose another {TrainConfig.option('run_dir')}) and resume with sidfast "
                           f"distill {TrainConfig.option('resume')} {TrainConfig.option('run_dir')} "
                           f"{path.parent}")


def _save(path, config, networks, optimizers, iteration, nimg, rngs, dist, **meta) -> Path | None:
    if config.fsdp:
        return _save_sharded(path, config, networks, optimizers, iteration, nimg, rngs, dist, **meta)
    written = None
    if dist.rank == 0:
        data = {"format": FORMATS["distill"], "version": VERSION, "iteration": iteration, "nimg": nimg,
                "world_size": dist.world, "config": config.to_dict(), "rng": rngs,
                "generator": _net_state(networks["generator"], config.generator == "lora"),
                "generator_ema": _net_state(networks["generator_ema"], config.generator == "lora"),
                "fake": _net_state(networks["fake"], config.fake_score == "lora"),
                "opt_g": optimizers["opt_g"].state_dict(), "opt_fake": optimizers["opt_fake"].state_dict(),
                "teacher": teacher_reference(config.teacher), "sigma_init": config.sigma_init, **meta}
        written = atomic_save(data, path)
    runtime.barrier(dist)
    return written


def load_distill(data: dict, path, config: TrainConfig, networks: dict, optimizers: dict,
                 dist: runtime.Dist, device: torch.device) -> tuple[int, int]:
    """Restore a distillation checkpoint read by ``load_checkpoint(path, "distill")`` into ``networks`` and
    ``optimizers`` (as in ``save_distill``) and this rank's random streams; returns (iteration, nimg).

    Options that change the run's trajectory and differ from the checkpoint's are warned about. The
    optimizers keep the settings they were built with (learning rate, betas, eps, fused, ...): a checkpoint's
    optimizer state carries its own, and the run's options apply. A checkpoint written by another number of
    processes re-seeds the streams from seed + iteration.
    """
    old = data.get("config", {})
    iteration = int(data["iteration"])
    changed = [TrainConfig.option(name) for name in TrainConfig.trajectory_options()
               if name in old and _plain(old[name]) != _plain(getattr(config, name))]
    if changed and dist.rank == 0:
        warnings.warn(f"resuming {str(path)!r} with changed options {', '.join(changed)}: the run will not "
                      "match an uninterrupted one", stacklevel=3)
    old_n = old.get("iterations")
    if config.lr_cooldown and old_n is not None and int(old_n) != config.iterations and dist.rank == 0:
        was = lr_factor(iteration, int(old_n), float(old.get("lr_cooldown") or 0.0))
        now = lr_factor(iteration, config.iterations, config.lr_cooldown)
        warnings.warn(f"resuming {str(path)!r} with {TrainConfig.option('iterations')} {config.iterations} "
                      f"(was {old_n}) and {TrainConfig.option('lr_cooldown')} {config.lr_cooldown}: the "
                      f"cooldown moves to the new end; the learning rates at iteration {iteration} are "
                      f"{now:.3g} x lr (the old run's schedule: {was:.3g} x lr)", stacklevel=3)
    if data.get("consolidated"):
        if data.get("eval") is not None:  # best.pt, the EMA generator kept by --eval
            raise CheckpointError(f"{str(path)!r} holds only the EMA generator that measured best by "
                                  f"{TrainConfig.option('eval')} (written for sampling), not the state of the "
                                  f"run; resume from the run's checkpoint: {TrainConfig.option('resume')} "
                                  f"{Path(path).parent}")
        raise CheckpointError(f"{str(path)!r} holds only the EMA generator of a sharded run (written for "
                              f"sampling), not the state of the run; resume from its "
                              f"{SHARDED_CHECKPOINT_NAME}: {TrainConfig.option('resume')} "
                              f"{Path(path).with_name(SHARDED_CHECKPOINT_NAME)}")
    settings = {name: [{k: v for k, v in group.items() if k != "params"} for group in opt.param_groups]
                for name, opt in optimizers.items()}
    if data.get("sharded"):
        _load_sharded(path, config, networks, optimizers)
    else:
        _load_full(data, path, config, networks, optimizers)
    for name, opt in optimizers.items():
        for group, kept in zip(opt.param_groups, settings[name]):
            group.update(kept)
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
        lora_g = config.generator == "lora"
        _load_net(networks["generator"], data["generator"], lora_g, "generator")
        _load_net(networks["generator_ema"], data["generator_ema"], lora_g, "generator")
        _load_net(networks["fake"], data["fake"], config.fake_score == "lora", "fake score")
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
    # torch.distributed (absent from some torch builds): imported by runs that shard or read shards only
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
GENERATOR_NAME = "generator.pt"  # the consolidated EMA generator a sharded run writes at its end


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


def finish_interrupted_save(run_dir) -> Path | None:
    """Complete a sharded save killed between its two renames (``_replace_dir``): ``checkpoint.dcp`` gone
    (moved to ``checkpoint.prev.dcp``), the new one whole in its temporary directory (``meta.pt``, written
    last, is there): rename it into place, before the temporaries are cleared. Returns the checkpoint put
    in place, or None. Rank 0 only, before any rank reads the run's checkpoint."""
    path = Path(run_dir) / SHARDED_CHECKPOINT_NAME
    tmp = path.with_name(f".{path.name}.tmp")
    if path.exists() or not (tmp / ".metadata").is_file() or not (tmp / META_NAME).is_file():
        return None
    try:
        load_checkpoint(tmp / META_NAME, "distill")
    except CheckpointError:
        return None
    os.replace(tmp, path)
    fsync_dir(path.parent)
    return path


def resume_source(config: TrainConfig, run_dir) -> Path | None:
    """The checkpoint a run continues from (option ``resume``; "auto": ``distill_checkpoint_in``), or None
    for a fresh start; a fresh start refuses a run directory that holds a checkpoint unless ``overwrite``."""
    run_dir = Path(run_dir)
    held = [name for name in (CHECKPOINT_NAME, SHARDED_CHECKPOINT_NAME) if (run_dir / name).exists()]
    if config.resume is not None:
        source = Path(config.resume)
        if config.resume == "auto" or (source.is_dir() and not (source / ".metadata").exists()):
            return distill_checkpoint_in(run_dir if config.resume == "auto" else source, config.fsdp)
        return source  # a checkpoint file or a sharded checkpoint; a run folder stands for the one it holds
    if held and not config.overwrite:
        raise ValueError(f"run directory {str(run_dir)!r} already holds {held[0]}; pass "
                         f"{config.option('resume')} to continue it, {config.option('overwrite')} to start "
                         f"afresh, or choose another {config.option('run_dir')}")
    return None


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
    fault_point("sharded-dir", tmp)
    writer = dcp.FileSystemWriter(tmp, sync_files=True)  # every rank fsyncs its shard files
    dcp.save(_sharded_state(networks, optimizers), storage_writer=writer)
    fault_point("shards-written", tmp)
    written = None
    if dist.rank == 0:
        data = {"format": FORMATS["distill"], "version": VERSION, "iteration": iteration, "nimg": nimg,
                "world_size": dist.world, "config": config.to_dict(), "rng": rngs,
                "teacher": teacher_reference(config.teacher), "sigma_init": config.sigma_init, **meta}
        atomic_save(data, tmp / META_NAME, keep_previous=False)
        fault_point("meta-written", tmp)
        written = _replace_dir(tmp, path)
    runtime.barrier(dist)
    return written


def _replace_dir(tmp: Path, path: Path) -> Path:
    """Rename the finished directory ``tmp`` onto ``path``, the replaced one kept as
    ``previous_path(path)``. ``path`` names a whole checkpoint at every instant but one: between its two
    renames only ``previous_path(path)`` (complete) and ``tmp`` (complete) exist."""
    fsync_dir(tmp)
    prev = previous_path(path)
    old_prev = prev.with_name(f".{prev.name}.old")
    shutil.rmtree(old_prev, ignore_errors=True)
    if path.exists():
        if prev.exists():
            os.replace(prev, old_prev)
        os.replace(path, prev)
        fault_point("moved-previous", prev)
    os.replace(tmp, path)
    fault_point("renamed", path)
    fsync_dir(path.parent)
    shutil.rmtree(old_prev, ignore_errors=True)
    return path


def _load_sharded(path, config: TrainConfig, networks: dict, optimizers: dict) -> None:
    """Read a sharded checkpoint into ``networks`` and ``optimizers`` (after ``fully_shard`` under FSDP: DCP
    reads each rank's part of every tensor, whatever the number of processes that wrote it)."""
    import torch.distributed.checkpoint as dcp
    # torch.distributed (absent from some torch builds): imported by runs that shard or read shards only
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


def save_consolidated_generator(run_dir, config: TrainConfig, generator_ema: torch.nn.Module, iteration: int,
                                nimg: int, dist: runtime.Dist, **meta) -> Path | None:
    """``run_dir/generator.pt`` from rank 0: the EMA generator's whole weights gathered from every rank's
    shards (only its LoRA factors with ``generator="lora"``), with what sampling needs (the checkpoint file's
    layout, ``consolidated`` True, without the training state), written atomically. Every rank calls it (the
    gather is collective). Returns the path on rank 0, else None."""
    return save_generator_file(Path(run_dir) / GENERATOR_NAME, config, generator_ema, iteration, nimg, dist,
                               **meta)


def save_generator_file(path, config: TrainConfig, generator_ema: torch.nn.Module, iteration: int, nimg: int,
                        dist: runtime.Dist, keep_previous: bool = True, **meta) -> Path | None:
    """The EMA generator alone in the checkpoint file's layout (``consolidated`` True: what ``sidfast sample``
    reads, not a state to resume), written atomically by rank 0 to ``path``: ``generator.pt`` of a sharded
    run, ``best.pt`` of a run with ``--eval``. Under FSDP its weights are gathered from every rank's shards
    (every rank calls it); LoRA generators keep their factors only. ``keep_previous``: the replaced file kept
    as ``<name>.prev.pt`` (``atomic_save``). Returns the path on rank 0, else None."""
    lora = config.generator == "lora"
    if config.fsdp:
        from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

        full = get_model_state_dict(generator_ema, options=StateDictOptions(full_state_dict=True,
                                                                            cpu_offload=True))
        if lora:
            full = {k: v for k, v in full.items() if k.endswith((".lora_A", ".lora_B"))}
    else:
        full = _net_state(generator_ema, lora) if dist.rank == 0 else None
    written = None
    if dist.rank == 0:
        data = {"format": FORMATS["distill"], "version": VERSION, "consolidated": True, "iteration": iteration,
                "nimg": nimg, "world_size": dist.world, "config": config.to_dict(), "generator_ema": full,
                "teacher": teacher_reference(config.teacher), "sigma_init": config.sigma_init, **meta}
        written = atomic_save(data, Path(path), keep_previous=keep_previous)
    runtime.barrier(dist)
    return written


def read_sharded_generator(path) -> dict:
    """A sharded checkpoint directory read for sampling in one process, without a process group: its
    ``meta.pt`` with ``generator_ema`` the EMA generator's whole weights (only the LoRA factors with
    ``generator="lora"``), as in a checkpoint file."""
    import torch.distributed.checkpoint as dcp

    path = Path(path)
    data = read_distill(path)
    reader = dcp.FileSystemReader(str(path))
    prefix = "generator_ema."
    state = {key[len(prefix):]: torch.empty(md.size, dtype=md.properties.dtype)
             for key, md in reader.read_metadata().state_dict_metadata.items()
             if key.startswith(prefix) and hasattr(md, "size")}
    if (data.get("config") or {}).get("generator") == "lora":
        state = {k: v for k, v in state.items() if k.endswith((".lora_A", ".lora_B"))}
    if not state:
        raise CheckpointError(f"checkpoint {str(path)!r} holds no EMA generator weights")
    try:
        with warnings.catch_warnings():  # DCP's note that it reads in a single process: what is meant here
            warnings.simplefilter("ignore", UserWarning)
            dcp.load({"generator_ema": state}, storage_reader=reader, no_dist=True)
    except Exception as exc:  # DCP's CheckpointException, or a torn shard file
        raise CheckpointError(f"checkpoint {str(path)!r}: cannot read its EMA generator: "
                              f"{str(exc).strip()[:400]}") from None
    data["generator_ema"] = state
    return data


def sample_source(path) -> Path:
    """What ``sidfast sample PATH`` reads: a checkpoint file or a sharded checkpoint directory as given; for a
    run folder, the newer of its ``checkpoint.pt`` and ``checkpoint.dcp``, else its ``generator.pt``."""
    path = Path(path)
    if not path.is_dir() or (path / ".metadata").exists() or (path / META_NAME).exists():
        return path
    found = [path / name for name in (CHECKPOINT_NAME, SHARDED_CHECKPOINT_NAME) if (path / name).exists()]
    if found:
        def written(p: Path) -> float:
            return (p / META_NAME if p.is_dir() and (p / META_NAME).exists() else p).stat().st_mtime

        return max(found, key=written)
    if (path / GENERATOR_NAME).is_file():
        return path / GENERATOR_NAME
    raise CheckpointError(f"{str(path)!r} is a folder without a checkpoint: looked for {CHECKPOINT_NAME}, "
                          f"{SHARDED_CHECKPOINT_NAME} and {GENERATOR_NAME} in it")


def _plain(value):
    return list(value) if isinstance(value, (tuple, list)) else value


__all__ = ["save_distill", "load_distill", "read_distill", "distill_checkpoint_in", "resume_source",
           "teacher_reference", "save_consolidated_generator", "save_generator_file", "read_sharded_generator",
           "sample_source", "finish_interrupted_save",
           "META_NAME", "GENERATOR_NAME"]
