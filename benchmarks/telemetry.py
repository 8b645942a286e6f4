"""What every benchmark records in ``benchmark.extra_info``: device, library versions, GPU timing
(``triton.testing.do_bench`` median, CUDA events), bytes/s against a device-to-device copy measured
in the same run, and GPU telemetry through nvidia-ml-py (memory used, SM clock, power; absent on CPU
or without the package)."""
from __future__ import annotations

import functools
import platform

import torch


def versions() -> dict:
    import sidfast

    out = {"torch": torch.__version__, "sidfast": sidfast.__version__, "python": platform.python_version()}
    try:
        import triton

        out["triton"] = triton.__version__
    except ImportError:
        out["triton"] = None
    if torch.cuda.is_available():
        out["cuda"] = torch.version.cuda
    return out


def device_name(device: torch.device) -> str:
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    return f"CPU ({platform.processor() or platform.machine()}, {torch.get_num_threads()} threads)"


def gpu_median_ms(fn, warmup: int = 25, rep: int = 100) -> float:
    """Median time of ``fn`` in ms, CUDA events around each call, L2 flushed between calls."""
    import triton.testing

    return float(triton.testing.do_bench(fn, warmup=warmup, rep=rep, return_mode="median"))


@functools.lru_cache(maxsize=None)
def copy_bandwidth(device_str: str, nbytes: int = 1 << 30) -> float:
    """Device-to-device copy bandwidth in bytes/s, counting bytes read plus bytes written."""
    device = torch.device(device_str)
    src = torch.empty(nbytes // 2, dtype=torch.uint8, device=device)
    dst = torch.empty_like(src)
    ms = gpu_median_ms(lambda: dst.copy_(src))
    return nbytes / (ms * 1e-3)


def _nvml_handle(device: torch.device):
    import pynvml

    pynvml.nvmlInit()
    props = torch.cuda.get_device_properties(device)
    bus = getattr(props, "pci_bus_id", None)
    if bus is not None:
        pci = f"{getattr(props, 'pci_domain_id', 0):08x}:{bus:02x}:{getattr(props, 'pci_device_id', 0):02x}.0"
        try:
            return pynvml, pynvml.nvmlDeviceGetHandleByPciBusId(pci)
        except Exception:  # noqa: BLE001 - fall back to the index
            pass
    return pynvml, pynvml.nvmlDeviceGetHandleByIndex(device.index or 0)


def gpu_telemetry(device: torch.device) -> dict:
    """Memory used (MiB), SM clock (MHz) and power (W) now; {} when unavailable."""
    if device.type != "cuda":
        return {}
    try:
        pynvml, h = _nvml_handle(device)
        return {"nvml_memory_used_mib": pynvml.nvmlDeviceGetMemoryInfo(h).used / 2 ** 20,
                "nvml_sm_clock_mhz": pynvml.nvmlDeviceGetClockInfo(h, pynvml.NVML_CLOCK_SM),
                "nvml_power_w": pynvml.nvmlDeviceGetPowerUsage(h) / 1000.0}
    except Exception as exc:  # noqa: BLE001 - telemetry is optional
        return {"nvml_error": f"{type(exc).__name__}: {exc}"}


def record(benchmark, fn, *, device: torch.device, op: str, impl: str, shape, dtype: torch.dtype,
           bytes_moved: int) -> None:
    """Time ``fn`` and fill ``benchmark.extra_info``.

    On a GPU the reported time is the do_bench median; pytest-benchmark additionally times a few
    synchronised calls (its own table). On CPU pytest-benchmark's own timing is the result.
    """
    info = benchmark.extra_info
    info.update(op=op, impl=impl, shape=list(shape), dtype=str(dtype).replace("torch.", ""),
                device=device_name(device), bytes_moved=int(bytes_moved), **{f"version_{k}": v for k, v in
                                                                              versions().items()})
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
        ms = gpu_median_ms(fn)
        copy = copy_bandwidth(str(device))
        info.update(median_ms=ms, bytes_per_s=bytes_moved / (ms * 1e-3), copy_bytes_per_s=copy,
                    fraction_of_copy=bytes_moved / (ms * 1e-3) / copy,
                    peak_memory_mib=torch.cuda.max_memory_allocated(device) / 2 ** 20, **gpu_telemetry(device))

        def synced():
            fn()
            torch.cuda.synchronize(device)

        benchmark.pedantic(synced, rounds=10, iterations=1, warmup_rounds=2)
    else:
        benchmark(fn)
        median_s = benchmark.stats.stats.median
        info.update(median_ms=median_s * 1e3, bytes_per_s=bytes_moved / median_s)
