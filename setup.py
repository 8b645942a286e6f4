"""Builds sidfast and its extension sidfast._C with ninja (torch.utils.cpp_extension).

CPU ops always; the CUDA sources too when torch has CUDA and nvcc is found, unless SIDFAST_NO_CUDA=1.
Install with `pip install --no-build-isolation -e .` so that the extension is compiled against the torch you run.

CUDA architectures (sidfast/_buildinfo.py, cuda_arch_list): TORCH_CUDA_ARCH_LIST is honoured as given. Unset,
torch's own rule applies when a GPU is visible (build for the visible GPUs); with no GPU visible, the
documented default DEFAULT_CUDA_ARCH_LIST, "8.0;9.0;10.0+PTX" (sm_80, sm_90, sm_100, and PTX for newer GPUs).

CUDA headers: the include folders of the `nvidia` wheel packages that torch's CUDA wheels install
(site-packages/nvidia/*/include: cusparse.h and the other library headers a CUDA toolkit may lack) are
searched after the toolkit's own, for g++ and nvcc, with no CPATH needed (nvidia_include_dirs).

SIDFAST_WERROR=1 makes warnings in sidfast's sources errors (-Wall -Wextra -Werror for g++; -Werror
all-warnings and the same host flags for nvcc); CI's CUDA build sets it. torch's and the CUDA wheels' headers
are searched as system headers, so only warnings of csrc/ count.
"""
import importlib.util
import os
import shutil
import subprocess
import sys
from pathlib import Path

from setuptools import setup

ROOT = Path(__file__).resolve().parent
_spec = importlib.util.spec_from_file_location("_buildinfo", ROOT / "sidfast" / "_buildinfo.py")
_buildinfo = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(_buildinfo)


def find_cuda_home() -> None:
    """Sets CUDA_HOME to the toolkit nvcc runs from when torch's guess (the folder above the nvcc on PATH)
    holds no CUDA headers, as for a wrapper script in /usr/local/bin. An explicit CUDA_HOME or CUDA_PATH wins."""
    if os.environ.get("CUDA_HOME") or os.environ.get("CUDA_PATH") or os.environ.get("SIDFAST_NO_CUDA", "0") not in ("", "0"):
        return
    import torch

    if torch.version.cuda is None:
        return
    nvcc = shutil.which("nvcc")
    if nvcc is None or (Path(nvcc).parent.parent / "include" / "cuda_runtime.h").is_file():
        return
    try:  # -dryrun prints the toolkit's paths and compiles nothing; the source need not exist
        out = subprocess.run([nvcc, "-dryrun", "-c", "sidfast_probe.cu", "-o", "sidfast_probe.o"],
                             capture_output=True, text=True, timeout=60)
    except (OSError, subprocess.SubprocessError):
        return
    top = _buildinfo.toolkit_from_nvcc_dryrun(out.stdout + out.stderr)
    if top is not None and (Path(top) / "include" / "cuda_runtime.h").is_file():
        os.environ["CUDA_HOME"] = top


find_cuda_home()  # before torch.utils.cpp_extension reads CUDA_HOME at import
from torch.utils import cpp_extension  # noqa: E402


def want_cuda() -> bool:
    if os.environ.get("SIDFAST_NO_CUDA", "0") not in ("", "0"):
        return False
    import torch

    return torch.version.cuda is not None and cpp_extension.CUDA_HOME is not None


def site_dirs() -> list[str]:
    """Where installed packages live: the folder holding torch first, then every sys.path entry."""
    import torch

    return [str(Path(torch.__file__).resolve().parent.parent), *(p for p in sys.path if p)]


def torch_include_dirs(cuda: bool) -> list[str]:
    try:
        return cpp_extension.include_paths(device_type="cuda" if cuda else "cpu")
    except TypeError:  # torch < 2.6: include_paths(cuda: bool)
        return cpp_extension.include_paths(cuda=cuda)


def system_includes(dirs) -> list[str]:
    # -isystem: searched after the -I folders (the toolkit's own headers win), and their warnings are not ours
    return [flag for d in dirs for flag in ("-isystem", d)]


def extension():
    csrc = ROOT / "csrc"
    sources = [str(p.relative_to(ROOT)) for p in sorted(csrc.glob("*.cpp")) + sorted((csrc / "cpu").glob("*.cpp"))]
    defines = [f'-DSIDFAST_SOURCE_HASH="{_buildinfo.source_hash(csrc)}"']
    werror = _buildinfo.werror_flags(os.environ)
    cuda = want_cuda()
    # Under SIDFAST_WERROR, torch's headers as system headers too (the extension classes pass them with -I;
    # a folder given with both counts as a system one), else -Wextra finds unused parameters in them
    torch_includes = system_includes(torch_include_dirs(cuda)) if werror["cxx"] else []
    # the C++ standard comes from torch (C++17 or C++20, by version)
    cxx = ["-O3", *defines, *torch_includes, *werror["cxx"]]
    if cuda:
        import torch

        arch = _buildinfo.cuda_arch_list(os.environ, torch.cuda.device_count())
        if arch is not None:
            os.environ["TORCH_CUDA_ARCH_LIST"] = arch  # the given list, or the default without a visible GPU
        wheel_includes = system_includes(_buildinfo.nvidia_include_dirs(site_dirs()))
        sources += [str(p.relative_to(ROOT)) for p in sorted((csrc / "cuda").glob("*.cu"))]
        sources += [str(p.relative_to(ROOT)) for p in sorted((csrc / "cuda").glob("*.cpp"))]
        nvcc = ["-O3", "-DSIDFAST_WITH_CUDA", *torch_includes, *wheel_includes, *werror["nvcc"]]
        return cpp_extension.CUDAExtension(
            "sidfast._C", sources,
            extra_compile_args={"cxx": cxx + ["-DSIDFAST_WITH_CUDA", *wheel_includes], "nvcc": nvcc})
    return cpp_extension.CppExtension("sidfast._C", sources, extra_compile_args={"cxx": cxx})


setup(
    ext_modules=[extension()],
    cmdclass={"build_ext": cpp_extension.BuildExtension.with_options(use_ninja=True)},
)
