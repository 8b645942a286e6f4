"""The detector loader: NVIDIA's two file forms (a persistent pickle, a TorchScript archive) of a stand-in with
the real calling convention, the cache folder, and the one-line errors of missing or wrong files."""
import sys

import pytest
import torch

import tiny_inception
from detectors import save_nvidia_pickle, save_torchscript
from sidfast.evaluate import detector as det
from sidfast.evaluate.detector import DetectorError, load_detector


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    root = tmp_path_factory.mktemp("detectors")
    return {"pt": save_torchscript(root / "inception-2015-12-05.pt"),
            "pkl": save_nvidia_pickle(root / "inception-2015-12-05.pkl"), "root": root}


def test_the_pickle_and_the_torchscript_file_give_the_networks_features(files):
    pt, pkl = load_detector(files["pt"]), load_detector(files["pkl"])
    assert pt.feature_dim == pkl.feature_dim == tiny_inception.DIM
    images = torch.randint(0, 256, (5, 3, 13, 9), dtype=torch.uint8, generator=torch.Generator().manual_seed(0))
    want = tiny_inception.TinyInception()(images, return_features=True)
    assert torch.equal(pt(images), want) and torch.equal(pkl(images), want)
    assert pt(images).dtype == torch.float32 and pt(images).shape == (5, tiny_inception.DIM)
    # float images in [-1, 1] are the same pixels; grey is repeated to RGB
    grey = torch.randint(0, 256, (2, 1, 8, 8), dtype=torch.uint8)
    assert torch.equal(pkl(grey.float() / 127.5 - 1), want_of(grey.repeat(1, 3, 1, 1)))
    # the loader's stand-ins for NVIDIA's modules are gone again
    assert "torch_utils" not in sys.modules and "dnnlib" not in sys.modules


def want_of(images):
    return tiny_inception.TinyInception()(images, return_features=True)


def test_the_cache_folder_is_searched_and_nothing_is_downloaded(files, tmp_path, monkeypatch):
    monkeypatch.setenv("SIDFAST_CACHE", str(files["root"]))
    assert det.find_detector() == files["root"] / "inception-2015-12-05.pkl"  # the published file first
    assert load_detector().feature_dim == tiny_inception.DIM
    monkeypatch.setenv("SIDFAST_CACHE", str(tmp_path))
    with pytest.raises(DetectorError) as err:
        load_detector()
    message = str(err.value)
    assert "\n" not in message and "--inception" in message and str(tmp_path) in message
    assert det.PKL_URL in message and det.PT_URL in message and "never downloads" in message
    monkeypatch.delenv("SIDFAST_CACHE")
    assert det.cache_dir() == det.Path.home() / ".cache" / "sidfast"


def test_wrong_files_are_one_line_errors_naming_the_option(files, tmp_path):
    with pytest.raises(DetectorError, match="--inception .*does not exist"):
        load_detector(tmp_path / "nope.pkl")
    text = tmp_path / "notes.pkl"
    text.write_text("not a pickle\n")
    with pytest.raises(DetectorError, match="--inception .*cannot be read") as err:
        load_detector(text)
    assert "\n" not in str(err.value)
    # a pickle whose stored code needs a module that is not here: which one, and the TorchScript alternative
    needy = save_nvidia_pickle(tmp_path / "needy.pkl", module_src="import no_such_nvidia_module\n")
    with pytest.raises(DetectorError) as err:
        load_detector(needy)
    assert "'no_such_nvidia_module'" in str(err.value) and det.PT_URL in str(err.value)
    # a network that is not called as NVIDIA's detector is
    plain = tmp_path / "plain.pt"
    torch.jit.save(torch.jit.script(torch.nn.Linear(3, 2)), str(plain))
    with pytest.raises(DetectorError, match="return_features=True") as err:
        load_detector(plain)
    assert "\n" not in str(err.value)  # TorchScript's message runs over several lines: its first is kept
