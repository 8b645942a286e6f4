"""Scaffolding shared by the test modules: the device and skip markers, the test networks, and the rounding
tolerances that fp32 comparisons derive from the computation (so that they hold on any CPU and kernel set).

``pytest`` puts ``tests/`` on the import path (``pythonpath`` in pyproject.toml): ``from utils import ...``.
"""
import contextlib
import weakref

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from sidfast.engine.graphs import GraphCache
from sidfast.ops import backend

HAS_CUDA = torch.cuda.is_available()
DEVICE = "cuda" if HAS_CUDA else "cpu"


# ---------- markers ----------

def cuda_marks(condition=True, reason="needs a CUDA device"):
    """The marks of ``requires_cuda`` as a list, for a parameter: ``pytest.param("cuda", marks=cuda_marks())``."""
    return [pytest.mark.skipif(not (HAS_CUDA and condition), reason=reason), pytest.mark.gpu]


def requires_cuda(test=None, *, condition=True, reason="needs a CUDA device"):
    """Mark a test ``gpu`` (``pytest -m gpu`` selects it) and skip it unless CUDA is present and ``condition``
    holds. Use as ``@requires_cuda`` or ``@requires_cuda(condition=..., reason=...)``."""

    def mark(obj):
        for m in cuda_marks(condition, reason):
            obj = m(obj)
        return obj

    return mark if test is None else mark(test)


def requires_gpus(count=2, reason=None):
    """Mark a test ``multigpu`` (and ``gpu``) and skip it, saying so, unless ``count`` CUDA devices are visible:
    a one-GPU run reports it as skipped, not passed. ``pytest -m multigpu`` selects these tests."""
    reason = reason or f"needs {count} or more CUDA devices ({torch.cuda.device_count()} visible)"

    def mark(obj):
        return pytest.mark.multigpu(requires_cuda(obj, condition=torch.cuda.device_count() >= count, reason=reason))

    return mark


# Triton kernels run on CUDA, or on CPU tensors in Triton's interpreter (TRITON_INTERPRET=1, conftest.py).
triton_route = pytest.mark.skipif(not backend.use_triton(torch.empty(0, device=DEVICE)),
                                  reason="Triton kernels need CUDA, or TRITON_INTERPRET=1 before sidfast is imported")


# ---------- rounding tolerances ----------

def unit_roundoff(dtype) -> float:
    """u = 2^-p for a p-bit significand: every correctly rounded operation has relative error at most u."""
    return torch.finfo(dtype).eps / 2


# Two runs whose generator gradients differ by float32 rounding (summed in another order, or computed in
# closed form instead of by autograd): each gradient is within a handful of roundings of the exact one, taken
# relative to its operands' magnitudes, which can exceed the result's (the teacher's and the fake score's
# terms partly cancel); Adam and the following iterations carry that into the weights.
GRADIENT_ROUNDINGS = 32
LOSS_SCALE_ULP = 1 + 2 * torch.finfo(torch.float32).eps / 2  # a loss scale this much larger: one ulp up (at 1)


def gradient_rounding_tolerance(want: torch.Tensor, nudged: torch.Tensor, iterations: int) -> float:
    """How far a weight tensor of a run may end from ``want`` when its generator gradients differ from
    ``want``'s run by float32 rounding: ``GRADIENT_ROUNDINGS`` times how far one rounding of every generator
    gradient moved it (``nudged``: the same run with its generator loss scale times ``LOSS_SCALE_ULP``), plus
    the rounding of ``p - step`` in each of ``iterations`` Adam steps."""
    u = unit_roundoff(torch.float32)
    one_rounding = float((nudged - want).abs().max())
    return GRADIENT_ROUNDINGS * one_rounding + iterations * 4 * u * float(want.abs().max())


def rounding_bound(dtype, magnitude, operations=1):
    """Bound on the accumulated rounding error of ``operations`` chained roundings in ``dtype`` on values of size
    ``magnitude``: gamma_n * magnitude with gamma_n = n u / (1 - n u) (Higham, Accuracy and Stability of
    Numerical Algorithms, 2nd ed., lemma 3.1). For a sum or dot product of n terms, ``magnitude`` is the sum
    of the |terms| and the bound holds for any summation order, blocking or fused multiply-add (eq. 3.5),
    i.e. for every kernel a CPU or GPU may pick. ``magnitude`` may be a number or a tensor (elementwise)."""
    n_u = operations * unit_roundoff(dtype)
    if n_u >= 1:
        raise ValueError(f"{operations} roundings in {dtype} have no error bound (n u >= 1)")
    return n_u / (1 - n_u) * magnitude


# Bound on how much the test networks (a few convolutions, GroupNorm, attention, SiLU) grow rounding: their
# error in a floating-point dtype is at most NETWORK_ERROR_GROWTH unit roundoffs of their largest output. A
# float32 tiny diffusers U-Net is within ~30 u of its float64 evaluation, and a 1-ulp change of its input moves
# its output by ~1 u; 1e6 leaves four orders of magnitude. Used with float64 only: 1e6 u64 = 1.1e-10.
NETWORK_ERROR_GROWTH = 1e6


def float64_network_tolerance(reference: torch.Tensor) -> dict:
    """``assert_close`` tolerances for two float64 evaluations of the same network whose inputs or kernels
    differ by rounding only (NETWORK_ERROR_GROWTH u64 of the largest value); a wrong formula is off at O(1)."""
    if reference.dtype != torch.float64:
        raise TypeError(f"float64_network_tolerance needs a float64 reference, got {reference.dtype}")
    return dict(atol=rounding_bound(torch.float64, reference.abs().max().item(), NETWORK_ERROR_GROWTH), rtol=0.0)


def assert_float64_close(actual: torch.Tensor, expected: torch.Tensor):
    """Two float64 evaluations of the same networks by different computations (another batching, kernel or
    summation order; fused against eager): equal within ``float64_network_tolerance(expected)``."""
    if actual.dtype != torch.float64:
        raise TypeError(f"assert_float64_close needs float64 values, got {actual.dtype}")
    torch.testing.assert_close(actual, expected, **float64_network_tolerance(expected))


def sid_loss_magnitudes(y_real, y_fake, x_g, alpha, normalize=True):
    """Float64 magnitudes of the SiD generator loss and its gradients, per element, for ``rounding_bound``.

    With d = y_real - y_fake, e = y_real - x_g and w the normalizer (1 without normalization), the loss
    l = d (e - alpha d) / w and the gradients (e + (1 - 2 alpha) d) / w, (2 alpha d - e) / w, -d / w
    (sidfast/reference.py: sid_gradients) are products and quotients of sums. Rounding compounds relative
    errors through products and quotients and leaves a sum's error relative to the sum of its operands'
    magnitudes, so an evaluation with k roundings on the way is within rounding_bound(dtype, m, k) of the
    exact value, m the same expression with every operand replaced by its magnitude: returns
    (|d| (|e| + |alpha| |d|) / w, (|e| + (1 + 2 |alpha|) |d|) / w), zero in samples with a NaN."""
    from sidfast import reference

    r, f, x = (t.detach().to(torch.float64) for t in (y_real, y_fake, x_g))
    keep = reference.broadcast(~reference.nan_rows(r, f, x), x)
    r, f, x = (torch.where(keep, t, 0.0) for t in (r, f, x))
    w = reference.broadcast(reference.sid_normalizer(r, x), x) if normalize else 1.0
    d = (r - f).abs()
    e = (r - x).abs()
    return d * (e + abs(alpha) * d) / w, (e + (1 + 2 * abs(alpha)) * d) / w


# ---------- test networks (EDM calling convention ``net(x, sigma, class_labels) -> x0``) ----------

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
        sigma = sigma.reshape(-1, 1).to(self.emb.weight.dtype)
        c_in = 1 / (sigma ** 2 + 0.25).sqrt()
        c_skip = 0.25 / (sigma ** 2 + 0.25)
        c_out = sigma * 0.5 / (sigma ** 2 + 0.25).sqrt()
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
    from sidfast.models.lora import lora_layers

    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for m in lora_layers(module):
            m.lora_B.copy_(torch.randn(m.lora_B.shape, generator=g) * std)
    return module


def tiny_diffusers_unet(sample_size=8, channels=3, seed=0, **kw):
    """A diffusers ``UNet2DModel`` small enough for CPU tests (two levels, one attention level), seeded.
    Skips the calling test when diffusers is not installed; ``kw`` overrides or extends the config."""
    diffusers = pytest.importorskip("diffusers")
    torch.manual_seed(seed)
    config = dict(sample_size=sample_size, in_channels=channels, out_channels=channels, block_out_channels=(8, 16),
                  layers_per_block=1, norm_num_groups=4, attention_head_dim=4,
                  down_block_types=("DownBlock2D", "AttnDownBlock2D"), up_block_types=("AttnUpBlock2D", "UpBlock2D"))
    config.update(kw)
    return diffusers.UNet2DModel(**config)


# ---------- the command line ----------

def run_main(args, capsys):
    """(exit code, stdout, stderr) of ``sidfast ARGS`` in this process."""
    from sidfast import cli

    try:
        code = cli.main([str(a) for a in args])
    except SystemExit as exc:
        code = exc.code
    out = capsys.readouterr()
    return code, out.out, out.err


def user_error(args, capsys, match):
    code, _, err = run_main(args, capsys)
    assert code == 2, err
    assert "Traceback" not in err
    assert err.startswith(f"sidfast {args[0]}: error:"), err
    assert match in err, err
    return err

# ---------- worker processes ----------

def _ended_worker(rank, fn, args):
    fn(rank, *args)
    from sidfast.utils.runtime import end_process

    end_process(0, after_group=True)  # no interpreter teardown with gloo's threads alive


def torchrun(args, env, timeout, nproc=2):
    """``python -m torch.distributed.run --standalone --nproc_per_node nproc ARGS``: (exit status, stdout,
    stderr). A launch that outlives ``timeout`` seconds is ended with SIGKILL, its ranks with it (torchrun
    starts them in sessions of their own, out of reach of a kill of the launcher's process group), and
    reported as a failed test."""
    import os
    import signal
    import subprocess
    import sys

    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", str(nproc),
           *map(str, args)]
    proc = subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            start_new_session=True)
    try:
        out, err = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        for pid in [*descendants(proc.pid), proc.pid]:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
        out, err = proc.communicate()
        pytest.fail(f"torchrun did not finish within {timeout} s: {' '.join(map(str, args))}\n{err[-2000:]}")
    return proc.returncode, out, err


def descendants(pid: int) -> list:
    """The ids of the processes below ``pid`` (children, theirs, ...), read from /proc (none where there is
    no /proc)."""
    from pathlib import Path

    children = {}
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            ppid = int(stat.read_text().rsplit(")", 1)[1].split()[1])
        except (OSError, IndexError, ValueError):  # a process that ended meanwhile
            continue
        children.setdefault(ppid, []).append(int(stat.parent.name))
    found, todo = [], [pid]
    while todo:
        for child in children.get(todo.pop(), []):
            found.append(child)
            todo.append(child)
    return found


def join_gloo_group(rank, world, init_file):
    """A spawned test worker's start: one CPU thread, and the gloo group of ``world`` processes that meet
    at ``init_file``."""
    import torch.distributed as dist

    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world)


def spawn_workers(fn, args, nprocs):
    """``torch.multiprocessing.spawn(fn, args, nprocs)`` whose workers, once ``fn`` returns, end like the
    sidfast command (``runtime.end_process``); an exception in ``fn`` still fails the spawn with its
    traceback. The workers start without TRITON_INTERPRET (they import sidfast, and with it Triton, before
    ``fn`` runs): they train through the native CPU ops, not the kernel interpreter."""
    import os

    import torch.multiprocessing as mp

    interpret = os.environ.pop("TRITON_INTERPRET", None)
    try:
        mp.spawn(_ended_worker, args=(fn, tuple(args)), nprocs=nprocs, join=True)
    finally:
        if interpret is not None:
            os.environ["TRITON_INTERPRET"] = interpret

# ---------- CUDA graphs on CPU ----------

class DeviceGuard:
    """Stands in for torch.cuda.device (which refuses CPU devices): records the device it is entered with."""

    def __init__(self):
        self.stack = []

    @property
    def current(self):
        return self.stack[-1] if self.stack else None

    @contextlib.contextmanager
    def __call__(self, device):
        self.stack.append(torch.device(device))
        try:
            yield
        finally:
            self.stack.pop()


def graphs_on_cpu(monkeypatch, capture):
    """The engine's graph path for CPU inputs, with ``capture`` standing in for make_graphed_callables."""
    guard = DeviceGuard()
    monkeypatch.setattr(torch.cuda, "make_graphed_callables", capture)
    monkeypatch.setattr(torch.cuda, "device", guard)
    monkeypatch.setattr(GraphCache, "applies", lambda self, x: self.graphs is not False and torch.is_grad_enabled())
    return guard


class StandInGraphs:
    """Replaces torch.cuda.make_graphed_callables on CPU: records captures, returns the callable unchanged.
    Exercises the engine's graph bookkeeping (keys, recapture, parameter surface, output copies) without a
    GPU."""

    def __init__(self):
        self.captures = []

    def __call__(self, callable_, sample, allow_unused_input=False, pool=None):
        self.captures.append((callable_, [(t.shape, t.requires_grad) for t in sample]))
        return callable_


class StaticGradGraphs:
    """Replaces torch.cuda.make_graphed_callables on CPU with its replay semantics: outputs, input gradients
    and parameter gradients come back as detached views of static buffers that the next replay overwrites,
    and a backward reads the activations of the latest replay (a graph's static memory), not those of its
    own call."""

    def __init__(self):
        self.made = []  # weak references to each capture's state (its Replay class)
        self.pools = []

    def __call__(self, callable_, sample, allow_unused_input=False, pool=None):
        params = []
        if isinstance(callable_, nn.Module):
            params = [p for p in callable_.parameters() if p.requires_grad]
        n_in = len(sample)
        static: dict = {}

        def buffer(key, value):
            buf = static.get(key)
            if buf is None:
                buf = static[key] = torch.empty_like(value)
            return buf.copy_(value).detach()

        class Replay(torch.autograd.Function):
            @staticmethod
            def forward(ctx, *args):
                xs = [a.detach().requires_grad_(a.requires_grad) for a in args[:n_in]]
                with torch.enable_grad():
                    out = callable_(*xs)
                outs = out if isinstance(out, tuple) else (out,)
                static["saved"] = (xs, outs)
                copies = tuple(buffer(("out", i), o) for i, o in enumerate(outs))
                return copies if isinstance(out, tuple) else copies[0]

            @staticmethod
            def backward(ctx, *grads):
                xs, outs = static["saved"]
                need = [x for x in xs if x.requires_grad] + params
                got = list(torch.autograd.grad(outs, need, grads, allow_unused=True, retain_graph=True))
                res = []
                for x in xs:
                    res.append(buffer(("in", len(res)), got.pop(0)) if x.requires_grad else None)
                param_grads = (buffer(("param", i), g) if g is not None else None for i, g in enumerate(got))
                return (*res, *param_grads)

        def graphed(*args):
            return Replay.apply(*args, *params)

        self.made.append(weakref.ref(Replay))
        self.pools.append(pool)
        return graphed
