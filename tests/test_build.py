"""setup.py's build decisions (sidfast/_buildinfo.py): the CUDA architecture list, the header folders of
torch's CUDA wheels, SIDFAST_WERROR and the toolkit nvcc reports. The helpers are stdlib only and are loaded
by path, as setup.py loads them, so these tests need no build, no GPU and no CUDA torch."""
import importlib.util
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent


def _load_buildinfo():
    spec = importlib.util.spec_from_file_location("_sidfast_buildinfo_under_test", ROOT / "sidfast" / "_buildinfo.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


bi = _load_buildinfo()


# --- TORCH_CUDA_ARCH_LIST ---

@pytest.mark.parametrize("given", ["9.0", "8.0;9.0;10.0", "7.5 8.6+PTX", "native", "Hopper"])
@pytest.mark.parametrize("gpus", [0, 1, 4])
def test_arch_list_given_is_honoured_verbatim(given, gpus):
    assert bi.cuda_arch_list({"TORCH_CUDA_ARCH_LIST": given}, gpus) == given


@pytest.mark.parametrize("env", [{}, {"TORCH_CUDA_ARCH_LIST": ""}, {"OTHER": "1"}])
@pytest.mark.parametrize("gpus", [1, 2, 8])
def test_arch_list_unset_with_gpus_visible_is_left_to_torch(env, gpus):
    assert bi.cuda_arch_list(env, gpus) is None


@pytest.mark.parametrize("env", [{}, {"TORCH_CUDA_ARCH_LIST": ""}])
def test_arch_list_unset_without_gpus_is_the_documented_default(env):
    assert bi.cuda_arch_list(env, 0) == bi.DEFAULT_CUDA_ARCH_LIST


def test_default_arch_list_covers_ampere_hopper_blackwell_and_ptx_for_newer():
    archs = bi.DEFAULT_CUDA_ARCH_LIST.split(";")
    assert [a.removesuffix("+PTX") for a in archs] == ["8.0", "9.0", "10.0"]
    assert archs[-1].endswith("+PTX")  # the newest as PTX too, JIT-compiled by the driver for later GPUs


def test_default_arch_list_is_documented_in_readme():
    assert f"`{bi.DEFAULT_CUDA_ARCH_LIST}`" in (ROOT / "README.md").read_text()


def test_setup_py_uses_the_helpers_and_sets_no_arch_default_of_its_own():
    text = (ROOT / "setup.py").read_text()
    assert "setdefault(\"TORCH_CUDA_ARCH_LIST\"" not in text and "setdefault('TORCH_CUDA_ARCH_LIST'" not in text
    for helper in ("cuda_arch_list(", "nvidia_include_dirs(", "werror_flags(", "toolkit_from_nvcc_dryrun("):
        assert f"_buildinfo.{helper}" in text, helper


# --- headers of the nvidia wheel packages ---

def _mkdirs(*paths):
    for p in paths:
        p.mkdir(parents=True)


def test_nvidia_include_dirs_finds_the_wheels_include_folders(tmp_path):
    site = tmp_path / "venv" / "lib" / "python3.11" / "site-packages"
    _mkdirs(site / "nvidia" / "cu13" / "include", site / "nvidia" / "cudnn" / "include",
            site / "nvidia" / "nccl" / "lib",  # no include folder
            site / "torch" / "include")  # not an nvidia package
    (site / "nvidia" / "nvshmem").mkdir()
    (site / "nvidia" / "nvshmem" / "include").write_text("a file, not a folder")
    (site / "nvidia" / "cu13" / "include" / "cusparse.h").write_text("")
    got = bi.nvidia_include_dirs([str(site)])
    assert got == [str(site / "nvidia" / "cu13" / "include"), str(site / "nvidia" / "cudnn" / "include")]
    assert (Path(got[0]) / "cusparse.h").is_file()


def test_nvidia_include_dirs_cuda12_layout(tmp_path):
    site = tmp_path / "site-packages"
    names = ["cublas", "cuda_runtime", "cusparse"]
    _mkdirs(*(site / "nvidia" / n / "include" for n in names))
    assert bi.nvidia_include_dirs([site]) == [str(site / "nvidia" / n / "include") for n in names]


def test_nvidia_include_dirs_keeps_site_order_skips_missing_and_repeats(tmp_path):
    first, second, empty = tmp_path / "a", tmp_path / "b", tmp_path / "c"
    _mkdirs(first / "nvidia" / "cusparse" / "include", second / "nvidia" / "cu13" / "include", empty)
    got = bi.nvidia_include_dirs([str(first), str(tmp_path / "missing"), str(empty), str(second), str(first)])
    assert got == [str(first / "nvidia" / "cusparse" / "include"), str(second / "nvidia" / "cu13" / "include")]


def test_nvidia_include_dirs_none_installed(tmp_path):
    assert bi.nvidia_include_dirs([str(tmp_path)]) == []
    assert bi.nvidia_include_dirs([]) == []


# --- SIDFAST_WERROR ---

@pytest.mark.parametrize("env", [{}, {"SIDFAST_WERROR": "0"}, {"SIDFAST_WERROR": ""}])
def test_werror_off_by_default(env):
    assert bi.werror_flags(env) == {"cxx": [], "nvcc": []}


def test_werror_on():
    flags = bi.werror_flags({"SIDFAST_WERROR": "1"})
    assert "-Werror" in flags["cxx"]
    nvcc = flags["nvcc"]
    assert nvcc[nvcc.index("-Werror") + 1] == "all-warnings"  # nvcc's own and its front end's warnings
    host = nvcc[nvcc.index("-Xcompiler") + 1].split(",")
    assert "-Werror" in host  # the host compiler's warnings in .cu files


# --- the toolkit nvcc runs from ---

def test_toolkit_from_nvcc_dryrun():
    text = ("#$ _HERE_=/usr/local/cuda-13.0/bin\n#$ _THERE_=/usr/local/cuda-13.0/bin\n"
            "#$ _TARGET_DIR_=targets/x86_64-linux\n#$ TOP=/usr/local/cuda-13.0/bin/..\n"
            "#$ CICC_PATH=/usr/local/cuda-13.0/bin/../nvvm/bin\n")
    assert bi.toolkit_from_nvcc_dryrun(text) == "/usr/local/cuda-13.0"


@pytest.mark.parametrize("text", ["", "nvcc fatal   : No input files specified\n", "#$ TOP=\n"])
def test_toolkit_from_nvcc_dryrun_without_top(text):
    assert bi.toolkit_from_nvcc_dryrun(text) is None
