"""Builds sidfast and its extension sidfast._C with ninja (torch.utils.cpp_extension).

CPU ops always; the CUDA sources too when torch has CUDA and nvcc is found, unless SIDFAST_NO_CUDA=1.
TORCH_CUDA_ARCH_LIST is honoured and defaults to Hopper (9.0). Install with
`pip install --no-build-isolation -e .` so that the extension is compiled against the torch you run.
"""
import importlib.util
import os
from pathlib import Path

from setuptools import setup
from torch.utils import cpp_extension

ROOT = Path(__file__).resolve().parent
_spec = importlib.util.spec_from_file_location("_buildinfo", ROOT / "sidfast" / "_buildinfo.py")
_buildinfo = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(_buildinfo)


def want_cuda() -> bool:
    if os.environ.get("SIDFAST_NO_CUDA", "0") not in ("", "0"):
        return False
    import torch

    return torch.version.cuda is not None and cpp_extension.CUDA_HOME is not None


def extension():
    csrc = ROOT / "csrc"
    sources = [str(p.relative_to(ROOT)) for p in sorted(csrc.glob("*.cpp")) + sorted((csrc / "cpu").glob("*.cpp"))]
    defines = [f'-DSIDFAST_SOURCE_HASH="{_buildinfo.source_hash(csrc)}"']
    cxx = ["-O3", *defines]  # the C++ standard comes from torch (C++17 or C++20, by version)
    if want_cuda():
        os.environ.setdefault("TORCH_CUDA_ARCH_LIST", "9.0")
        sources += [str(p.relative_to(ROOT)) for p in sorted((csrc / "cuda").glob("*.cu"))]
        sources += [str(p.relative_to(ROOT)) for p in sorted((csrc / "cuda").glob("*.cpp"))]
        nvcc = ["-O3", "-DSIDFAST_WITH_CUDA"]
        return cpp_extension.CUDAExtension(
            "sidfast._C", sources, extra_compile_args={"cxx": cxx + ["-DSIDFAST_WITH_CUDA"], "nvcc": nvcc})
    return cpp_extension.CppExtension("sidfast._C", sources, extra_compile_args={"cxx": cxx})


setup(
    ext_modules=[extension()],
    cmdclass={"build_ext": cpp_extension.BuildExtension.with_options(use_ninja=True)},
)
