"""The noise stream shared by ``add_noise`` and the fake-score loss: Philox4x32-10 + Box-Muller.

``philox_normal`` is the PyTorch reference (CPU route, test oracle); ``noise_tile`` the Triton helpers. The
stream, its offsets and its accuracy: docs/kernels.md, "Noise stream".
"""
from __future__ import annotations

import torch

from sidfast._checks import check_int
from sidfast.ops import backend
from sidfast.ops.backend import HAS_TRITON

SEED_HIGH = 2 ** 62
MAX_COUNTER = 2 ** 31
TILE = 2048  # elements per program of the elementwise (samples x features) tiling

# Philox4x32-10 constants (Salmon et al. 2011), as in triton.language.random
_KEY_A = 0x9E3779B9
_KEY_B = 0xBB67AE85
_ROUND_A = 0xD2511F53
_ROUND_B = 0xCD9E8D57
_M32 = 0xFFFFFFFF


# ---------------------------------------------------------------------------------------------
# PyTorch reference of the stream (any device)
# ---------------------------------------------------------------------------------------------

def _mulhilo32(k: int, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """High and low 32 bits of k * v for k, v < 2^32, in int64 arithmetic that never overflows."""
    hi16 = v >> 16
    lo16 = v & 0xFFFF
    ph = k * hi16  # < 2^48
    pl = k * lo16  # < 2^48
    return (ph + (pl >> 16)) >> 16, (((ph & 0xFFFF) << 16) + pl) & _M32


def philox4x32(seed: int | torch.Tensor, counter: torch.Tensor, rounds: int = 10):
    """Philox4x32 on counters (c0=counter, c1=c2=c3=0) with key = seed (split in low/high words)."""
    seed = torch.as_tensor(seed, dtype=torch.int64, device=counter.device).reshape(())
    k0 = seed & _M32
    k1 = (seed >> 32) & _M32
    c0 = counter.to(torch.int64) & _M32
    c1 = torch.zeros_like(counter, dtype=torch.int64)
    c2 = torch.zeros_like(c1)
    c3 = torch.zeros_like(c1)
    for _ in range(rounds):
        hi_b, lo_b = _mulhilo32(_ROUND_B, c2)
        hi_a, lo_a = _mulhilo32(_ROUND_A, c0)
        c0, c1, c2, c3 = hi_b ^ c1 ^ k0, lo_b, hi_a ^ c3 ^ k1, lo_a  # one Philox round (simultaneous update)
        k0 = (k0 + _KEY_A) & _M32
        k1 = (k1 + _KEY_B) & _M32
    return c0, c1, c2, c3


def _uniform(u32: torch.Tensor) -> torch.Tensor:
    """uint32 -> float32 in [0, 1), as triton.language.random.uint_to_uniform_float."""
    x = torch.where(u32 >= 2 ** 31, u32 - 2 ** 32, u32)
    x = torch.where(x < 0, -x - 1, x)
    return x.to(torch.float32) * 4.6566127342e-10


def _box_muller(u1: torch.Tensor, u2: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    u1 = torch.clamp(u1, min=1.0e-7)
    th = 6.283185307179586 * u2
    r = torch.sqrt(-2.0 * torch.log(u1))
    return r * torch.cos(th), r * torch.sin(th)


def philox_normal(seed: torch.Tensor, shape, offset: int = 0, device=None) -> torch.Tensor:
    """The float32 noise ``add_noise`` draws for ``seed`` and ``offset``, at shape (B, *F) (logical order)."""
    shape = tuple(shape)
    device = seed.device if device is None else torch.device(device)
    B = shape[0]
    N = 1
    for d in shape[1:]:
        N *= d
    nq = backend.cdiv(N, 4)
    l = torch.arange(N, device=device, dtype=torch.int64)
    counter = offset + torch.arange(B, device=device, dtype=torch.int64)[:, None] * nq + (l // 4)[None, :]
    c = philox4x32(seed.to(device), counter)
    n0, n1 = _box_muller(_uniform(c[0]), _uniform(c[1]))
    n2, n3 = _box_muller(_uniform(c[2]), _uniform(c[3]))
    comp = (l % 4)[None, :]
    eps = torch.where(comp == 0, n0, torch.where(comp == 1, n1, torch.where(comp == 2, n2, n3)))
    return eps.reshape(shape)


def draw_seed(device, generator: torch.Generator | None = None) -> torch.Tensor:
    """A (1,) int64 seed tensor drawn on ``device`` from torch's generator: no host sync, graph-replay safe."""
    return torch.randint(0, SEED_HIGH, (1,), dtype=torch.int64, device=device, generator=generator)


def check_counter_range(B: int, N: int, offset: int) -> None:
    check_int("offset", offset, 0, "offset must be a non-negative int, got {value!r}")
    if offset + B * backend.cdiv(N, 4) >= MAX_COUNTER:
        raise ValueError(f"offset + B * ceil(N/4) = {offset + B * backend.cdiv(N, 4)} exceeds the 2^31 Philox "
                         "counters of one seed; draw a new seed instead of a large offset")


# ---------------------------------------------------------------------------------------------
# Host helpers of the elementwise tiling
# ---------------------------------------------------------------------------------------------

def channels_last_order(t: torch.Tensor) -> bool:
    """Memory order is (B, *spatial, C) and differs from the logical order (so the kernels remap indices)."""
    if t.is_contiguous():
        return False
    return ((t.dim() == 4 and t.is_contiguous(memory_format=torch.channels_last))
            or (t.dim() == 5 and t.is_contiguous(memory_format=torch.channels_last_3d)))


def layout_args(t: torch.Tensor) -> dict:
    """Runtime/constexpr arguments of ``noise_tile`` for a batch-major dense tensor ``t``."""
    B = t.shape[0]
    N = t.numel() // B
    cl = channels_last_order(t)
    C = t.shape[1] if cl else 1
    return dict(N=N, NQ=backend.cdiv(N, 4), C_CH=C, HW=N // C, CL=cl)


def tile_shape(B: int, N: int) -> tuple[int, int, int]:
    """(ROWS, BLOCK_N, n_chunks) of an elementwise 2-D tiling over (samples, features)."""
    block_n = min(TILE, max(16, backend.next_pow2(N)))
    rows = max(1, min(backend.next_pow2(B), TILE // block_n))
    return rows, block_n, backend.cdiv(N, block_n)


# ---------------------------------------------------------------------------------------------
# Triton helpers
# ---------------------------------------------------------------------------------------------

if HAS_TRITON:
    import triton
    import triton.language as tl
    from triton.language.extra import libdevice

    #: approximate sin/cos in the noise (compiled kernels only)
    FAST_MATH = not backend.INTERPRET

    @triton.jit
    def _pair_normal(u1, u2, FAST: tl.constexpr):
        """Box-Muller (as tl.pair_uniform_to_normal). The radius always takes the accurate log: near u1 = 1 the
        approximate __logf's absolute error (~4e-7) exceeds -log(u1) itself, which would make the radius
        inaccurate (its error is err / r) or NaN (a positive "log"). FAST uses the GPU's approximate sin/cos
        (absolute error ~1e-6, times a radius below 6); not in the interpreter."""
        u1 = tl.maximum(1.0e-7, u1)
        th = 6.283185307179586 * u2
        r = tl.sqrt(tl.maximum(-2.0 * tl.log(u1), 0.0))
        if FAST:
            return r * libdevice.fast_cosf(th), r * libdevice.fast_sinf(th)
        else:
            return r * tl.cos(th), r * tl.sin(th)

    @triton.jit
    def _normal4(seed, counter, FAST: tl.constexpr):
        """Four standard normals per Philox4x32-10 counter (tl.randn4x with a selectable Box-Muller)."""
        i0, i1, i2, i3 = tl.randint4x(seed, counter)
        n0, n1 = _pair_normal(tl.uint_to_uniform_float(i0), tl.uint_to_uniform_float(i1), FAST)
        n2, n3 = _pair_normal(tl.uint_to_uniform_float(i2), tl.uint_to_uniform_float(i3), FAST)
        return n0, n1, n2, n3

    @triton.jit
    def noise_tile(seed, rows, c0, NQ, C_CH, HW, offset, CL: tl.constexpr, ROWS: tl.constexpr,
                   BLOCK_N: tl.constexpr, FAST: tl.constexpr):
        """eps (float32, [ROWS, BLOCK_N]) for samples ``rows`` and memory positions c0 + [0, BLOCK_N) in each
        sample (c0 a multiple of BLOCK_N, BLOCK_N a multiple of 4). See the module docstring for the stream."""
        base = offset + rows[:, None] * NQ
        if CL:
            m = c0 + tl.arange(0, BLOCK_N)[None, :]          # memory position: spatial-major, channel fastest
            l = (m % C_CH) * HW + m // C_CH                  # logical index channel * HW + spatial
            n0, n1, n2, n3 = _normal4(seed, base + l // 4, FAST)
            comp = l % 4
            return tl.where(comp == 0, n0, tl.where(comp == 1, n1, tl.where(comp == 2, n2, n3)))
        else:
            q = base + c0 // 4 + tl.arange(0, BLOCK_N // 4)[None, :]
            n0, n1, n2, n3 = _normal4(seed, q, FAST)
            # interleave so that position 4q + k holds component k
            return tl.reshape(tl.join(tl.join(n0, n2), tl.join(n1, n3)), (ROWS, BLOCK_N))

    @triton.jit
    def row_tile(pid, n_chunks, B, N, ROWS: tl.constexpr, BLOCK_N: tl.constexpr):
        """The (ROWS samples x BLOCK_N features) tile of program ``pid`` in a grid of row groups times
        ``n_chunks`` feature chunks: (first column, row indices, row mask, element mask, element offsets)."""
        c0 = (pid % n_chunks) * BLOCK_N
        rows = (pid // n_chunks) * ROWS + tl.arange(0, ROWS)
        cols = c0 + tl.arange(0, BLOCK_N)
        row_ok = rows < B
        mask = row_ok[:, None] & (cols < N)[None, :]
        return c0, rows, row_ok, mask, rows.to(tl.int64)[:, None] * N + cols[None, :]
