"""The op benchmarks' sizes, without importing torch (benchmarks/report.py and collect_results.py read them
to name the sizes every target must be met at): (batch, *shape) and dtype name. GPU: 32x32 and 64x64
pixels, 64x64 and 128x128 latents; CPU: small sizes only."""
GPU_SIZES = [((64, 3, 32, 32), "float32"), ((64, 3, 64, 64), "float32"), ((16, 4, 64, 64), "bfloat16"),
             ((512, 3, 64, 64), "float32"), ((256, 4, 128, 128), "bfloat16")]
CPU_SIZES = [((8, 3, 32, 32), "float32"), ((16, 3, 64, 64), "float32")]


def size_key(shape, dtype: str) -> tuple[str, str]:
    """How benchmark entries name a size: ("64x3x32x32", "float32")."""
    return "x".join(map(str, shape)), dtype
