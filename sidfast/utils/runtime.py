"""Process plumbing for the trainer: device, process group, seeds, RNG state, signals, autocast, and the
console's progress display.

Modelled on NVlabs/edm ``torch_utils/distributed.py``: the training loop asks this module where it runs and
whether to stop, and never touches ``torch.distributed``, ``signal`` or the terminal itself.
"""
from __future__ import annotations

import atexit
import contextlib
import inspect
import os
import random
import signal
import sys
import threading
import time
from dataclasses import dataclass

import numpy as np
import torch
import torch.distributed as dist
from torch.nn.parallel import DistributedDataParallel
from tqdm.auto import tqdm

# ---- devices and processes ----


def resolve_device(spec: str, local_rank: int = 0) -> torch.device:
    """torch.device for "auto", "cpu", "cuda", "cuda:N" (raises ValueError with the fix when unavailable)."""
    spec = str(spec).strip().lower()
    if spec == "auto":
        spec = "cuda" if torch.cuda.is_available() else "cpu"
    try:
        device = torch.device(spec)
    except RuntimeError:
        raise ValueError(f"device {spec!r} is not a device name; use auto, cpu, cuda or cuda:N") from None
    if device.type == "cuda":
        if not torch.cuda.is_available():
            raise ValueError(f"device {spec!r} was asked but no CUDA GPU is available (torch "
                             f"{torch.__version__}, cuda build {torch.version.cuda}); use --device cpu")
        index = device.index if device.index is not None else local_rank
        if index >= torch.cuda.device_count():
            raise ValueError(f"device cuda:{index} does not exist; {torch.cuda.device_count()} GPU(s) "
                             "visible")
        return torch.device("cuda", index)
    if device.type == "cpu" or (device.type == "mps" and torch.backends.mps.is_available()):
        return device
    raise ValueError(f"device {spec!r} is not supported here; use auto, cpu, cuda or cuda:N")


@dataclass
class Dist:
    """Where this process stands in a multi-process run (rank 0 of 1 when there is none)."""

    rank: int = 0
    world: int = 1
    local_rank: int = 0
    owned: bool = False  # this module initialized the process group (and tears it down)
    control: object = None  # a gloo group for stop flags and RNG gathering (CPU collectives, no GPU sync)

    @property
    def enabled(self) -> bool:
        return self.world > 1


def init_distributed(device_spec: str, group_always: bool = False) -> Dist:
    """Join the process group torchrun describes (``WORLD_SIZE`` > 1), or the one the caller initialized.

    ``group_always``: a single process gets a process group of one too (FSDP shards over a device mesh, which
    needs one)."""
    global _created_group
    if not dist.is_available():
        if group_always:
            raise RuntimeError("this torch build has no torch.distributed; --fsdp needs it")
        return Dist()
    owned = False
    if not dist.is_initialized():
        # torch.distributed.nn's functions bind group.WORLD as a default argument when the module is first
        # imported (DDP imports it): imported after the group exists, they would keep the group alive for
        # the life of the process (see end_process). Hence here, just before the group is created.
        import torch.distributed.nn  # noqa: F401

        use_cuda = device_spec.startswith("cuda") or (device_spec == "auto" and torch.cuda.is_available())
        if int(os.environ.get("WORLD_SIZE", "1")) <= 1:
            if not group_always:
                return Dist()
            dist.init_process_group(backend="nccl" if use_cuda else "gloo", store=dist.HashStore(), rank=0,
                                    world_size=1)
            _created_group = True
            control = dist.new_group(backend="gloo") if use_cuda else dist.group.WORLD
            return Dist(owned=True, control=control)
        local_rank = int(os.environ.get("LOCAL_RANK", "0"))
        if use_cuda:
            torch.cuda.set_device(resolve_device(device_spec, local_rank))
        dist.init_process_group(backend="nccl" if use_cuda else "gloo")
        _created_group = True
        owned = True
    rank = dist.get_rank()
    local_rank = int(os.environ.get("LOCAL_RANK", rank))
    control = dist.new_group(backend="gloo") if dist.get_backend() != "gloo" else dist.group.WORLD
    return Dist(rank=rank, world=dist.get_world_size(), local_rank=local_rank, owned=owned, control=control)


_created_group = False  # whether init_distributed created a process group in this process (end_process)


def end_process(code: int, after_group: bool = False):
    """End the process with exit status ``code`` (the ``sidfast`` command's last step).

    After a process group (one that ``init_distributed`` created, one still initialized, or with
    ``after_group`` one the caller ran and destroyed itself), the interpreter is not torn down: torch keeps
    a gloo group, and its worker threads, alive past ``destroy_process_group`` while DTensor's caches refer
    to the device mesh of FSDP's sharded tensors, and a worker that releases a finished collective's tensors
    after interpreter finalization began cannot take the GIL and aborts the process ("terminate called
    without an active exception"). Exit handlers run and the standard streams are flushed first; every file
    a run writes is closed before the trainer returns. Otherwise a plain ``sys.exit``."""
    if not (after_group or _created_group or (dist.is_available() and dist.is_initialized())):
        sys.exit(code)
    atexit._run_exitfuncs()
    for stream in (sys.stdout, sys.stderr):
        try:
            stream.flush()
        except (OSError, ValueError):  # a closed stream: nothing left to flush
            pass
    os._exit(code)


def shutdown(dist_state: Dist) -> None:
    """Destroy the process group if ``init_distributed`` created it."""
    if dist_state.owned:
        dist.destroy_process_group()


def barrier(dist_state: Dist) -> None:
    if dist_state.enabled:
        dist.barrier(group=dist_state.control)


def all_gather(dist_state: Dist, obj) -> list:
    """``obj`` of every rank, in rank order (a CPU collective on the control group)."""
    if not dist_state.enabled:
        return [obj]
    out = [None] * dist_state.world
    dist.all_gather_object(out, obj, group=dist_state.control)
    return out


def ddp(module: torch.nn.Module, device: torch.device) -> torch.nn.Module:
    """``module`` in DistributedDataParallel; buffers are not broadcast in forward, as published."""
    kwargs = {"device_ids": [device.index] if device.type == "cuda" else None}
    # newer torch renamed the option
    if "forward_sync_buffers" in inspect.signature(DistributedDataParallel.__init__).parameters:
        kwargs["forward_sync_buffers"] = False
    else:
        kwargs["broadcast_buffers"] = False
    return DistributedDataParallel(module, **kwargs)


# ---- seeds and random state ----

def seed_everything(seed: int, rank: int = 0, world: int = 1) -> None:
    """Published per-rank seeding: numpy seeded with (seed * world + rank), torch with a draw from numpy."""
    rank_seed = (seed * world + rank) % (1 << 31)
    np.random.seed(rank_seed)
    torch.manual_seed(int(np.random.randint(1 << 31)))
    random.seed(rank_seed)


def rng_state(device: torch.device) -> dict:
    """Every random stream the trainer draws from, as tensors and plain values (``weights_only`` loadable)."""
    name, keys, pos, has_gauss, cached = np.random.get_state()
    return {"torch": torch.get_rng_state(),
            "cuda": torch.cuda.get_rng_state(device) if device.type == "cuda" else None,
            "numpy": (name, torch.from_numpy(keys.astype(np.int64)), int(pos), int(has_gauss), float(cached)),
            "python": random.getstate()}


def set_rng_state(state: dict, device: torch.device) -> None:
    torch.set_rng_state(state["torch"])
    if device.type == "cuda" and state.get("cuda") is not None:
        torch.cuda.set_rng_state(state["cuda"], device)
    name, keys, pos, has_gauss, cached = state["numpy"]
    np.random.set_state((name, keys.numpy().astype(np.uint32), pos, has_gauss, cached))
    version, internal, gauss = state["python"]
    random.setstate((version, tuple(internal), gauss))


# ---- precision ----

AUTOCAST_DTYPES = {"fp32": None, "bf16": torch.bfloat16, "fp16": torch.float16}


def autocast(device: torch.device, precision, cache_enabled: bool | None = None):
    """The autocast context of ``precision`` on ``device``: "fp32", "bf16", "fp16" or a dtype (None, "fp32":
    no autocast). ``cache_enabled`` False: no cache of cast weights, which CUDA-graph capture needs (None:
    torch's default)."""
    dtype = AUTOCAST_DTYPES[precision] if isinstance(precision, str) else precision
    if dtype is None:
        return contextlib.nullcontext()
    return torch.autocast(device.type, dtype=dtype, cache_enabled=cache_enabled)


# ---- stop requests ----

STOP_REASONS = (None, "SIGINT", "SIGTERM", "callback")


class StopRequest:
    """SIGINT/SIGTERM set ``reason`` (the loop finishes its iteration, saves, returns); a second SIGINT
    aborts."""

    SIGNALS = ("SIGINT", "SIGTERM")

    def __init__(self):
        self.reason: str | None = None
        self._old = {}

    def __enter__(self):
        if threading.current_thread() is threading.main_thread():
            for name in self.SIGNALS:
                sig = getattr(signal, name, None)
                if sig is not None:
                    self._old[sig] = signal.signal(sig, self._handle)
        return self

    def _handle(self, signum, frame):
        name = signal.Signals(signum).name
        if self.reason is not None and name == "SIGINT":
            raise KeyboardInterrupt
        self.reason = name

    def __exit__(self, *exc):
        for sig, old in self._old.items():
            signal.signal(sig, old)
        return False


def agree_stop(dist_state: Dist, local: str | None) -> str | None:
    """In a multi-process run every rank stops when any rank asked to (a CPU collective)."""
    if not dist_state.enabled:
        return local
    flag = torch.tensor([STOP_REASONS.index(local)])
    dist.all_reduce(flag, op=dist.ReduceOp.MAX, group=dist_state.control)
    return STOP_REASONS[int(flag)]


# ---- console progress ----

class Progress:
    """A tqdm bar on a terminal; elsewhere (a pipe, a file, or the bar switched off) a plain line per logged
    interval, at most one every ``interval_s`` seconds, so that a log file stays readable."""

    interval_s = 30.0

    def __init__(self, total: int, initial: int, batch: int, bar: bool, log):
        self.total = total
        self.batch = batch
        self.log = log
        self.use_bar = bar and log is not None and sys.stderr.isatty()
        self.last_line = None
        self.bar = tqdm(total=total, initial=min(initial, total), unit="it", dynamic_ncols=True,
                        disable=not self.use_bar, desc="SiD")

    def update(self, record: dict | None, done: bool) -> None:
        """One iteration finished; ``record``: the metrics logged at this iteration, if any."""
        self.bar.update(1)
        if record is None:
            return
        # SiDA before its gate: no loss_g (the generator did not step), logged as loss_g_not_applied
        loss_g = f"{record['loss_g']:.4g}" if "loss_g" in record else "- (generator not stepping yet)"
        if self.use_bar:
            self.bar.set_postfix(img_s=f"{record['img_per_s']:.1f}", loss_g=loss_g,
                                 loss_fake=f"{record['loss_fake']:.4g}", refresh=False)
            return
        now = time.monotonic()
        due = done or self.last_line is None or now - self.last_line >= self.interval_s
        if self.log is None or not due:
            return
        self.last_line = now
        left = (self.total - record["iteration"]) / max(record["it_per_s"], 1e-9)
        eta = time.strftime("%H:%M:%S", time.gmtime(left)) if left < 86400 else f"{left / 86400:.1f} days"
        self.log(f"iteration {record['iteration']}/{self.total}  kimg {record['nimg'] / 1000:.1f}  "
                 f"loss_g {loss_g}  loss_fake {record['loss_fake']:.4g}  "
                 f"img/s {record['img_per_s']:.1f}  ETA {eta}")

    def close(self) -> None:
        self.bar.close()


class LossWindow:
    """Losses summed since the last metrics record and the training time they took (upkeep left out).

    ``training_seconds()``: the time of every iteration added so far (grids, checkpoints and the run's
    setup left out): the ``seconds`` of the speed that both metrics.jsonl and summary.json report.
    ``state()``/``load_state()``: the partial sums a checkpoint keeps, so that a resumed run's first record
    averages the same iterations, bit for bit, as the uninterrupted run's (its speed covers only the
    iterations timed since the resume)."""

    def __init__(self, iteration: int):
        self.total_seconds = 0.0
        self.reset(iteration, time.perf_counter())
        self.last_add = self.start

    def reset(self, iteration: int, now: float) -> None:
        self.loss_g = None
        self.loss_fake = None
        self.count = 0
        self.iteration = iteration
        self.start = now

    def add(self, loss_g: torch.Tensor, loss_fake: torch.Tensor) -> None:
        self.loss_g = loss_g if self.loss_g is None else self.loss_g + loss_g
        self.loss_fake = loss_fake if self.loss_fake is None else self.loss_fake + loss_fake
        self.count += 1
        self.last_add = time.perf_counter()

    def training_seconds(self) -> float:
        """Seconds spent in the iterations added so far (upkeep between them left out)."""
        return self.total_seconds + max(self.last_add - self.start, 0.0)

    def state(self) -> dict:
        """The losses summed since the last record (tensors, as summed) and their number."""
        return {"count": self.count, "loss_g": self.loss_g, "loss_fake": self.loss_fake}

    def load_state(self, state: dict | None, device) -> None:
        """Continue the sums of ``state()`` (a checkpoint's); speed is timed from now on."""
        if not state or not state.get("count"):
            return
        self.count = int(state["count"])
        self.loss_g = state["loss_g"].to(device)
        self.loss_fake = state["loss_fake"].to(device)

    def record(self, iteration: int, nimg: int, batch: int, seconds: float) -> dict:
        now = time.perf_counter()
        it_per_s = (iteration - self.iteration) / max(now - self.start, 1e-9)
        record = {"iteration": iteration, "nimg": nimg, "loss_g": float(self.loss_g) / self.count,
                  "loss_fake": float(self.loss_fake) / self.count, "it_per_s": it_per_s,
                  "img_per_s": it_per_s * batch, "seconds": seconds, "time": time.time()}
        self.total_seconds += now - self.start
        self.reset(iteration, now)
        self.last_add = now
        return record
