"""Reference files: EDM's npz (mu and sigma) read as it is, what --make-ref writes read back whole, and the
one-line errors of malformed files."""
import numpy as np
import pytest

from sidfast.evaluate.statistics import (ReferenceFileError, read_reference, stats_of,
                                         write_reference)


def test_edms_reference_is_read_as_it_is(tmp_path):
    rng = np.random.RandomState(0)
    mu, a = rng.rand(16), rng.rand(16, 16)
    np.savez(tmp_path / "cifar10-32x32.npz", mu=mu, sigma=a @ a.T)  # as EDM's fid.py ref writes it
    ref = read_reference(tmp_path / "cifar10-32x32.npz")
    assert np.array_equal(ref.mu, mu) and np.array_equal(ref.sigma, a @ a.T) and ref.dim == 16
    assert ref.features is None and ref.count is None and ref.image_shape is None


def test_what_make_ref_writes_reads_back_whole_and_atomically(tmp_path):
    x = np.random.RandomState(1).rand(50, 8).astype(np.float32)
    stats = stats_of(x, keep_features=20, image_shape=(3, 32, 32))
    path = write_reference(tmp_path / "ref.npz", stats)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ref.npz"]  # no temporary left, no ".npz.npz"
    back = read_reference(path)
    assert np.array_equal(back.mu, stats.mu) and np.array_equal(back.sigma, stats.sigma)
    assert np.array_equal(back.features, stats.features) and back.count == 50 and back.image_shape == (3, 32, 32)
    with np.load(path) as z:  # EDM's readers see their two arrays
        assert z["mu"].dtype == np.float64 and z["sigma"].shape == (8, 8)


@pytest.mark.parametrize("arrays,match", [
    ({"images": np.zeros((2, 2))}, "no 'mu' and 'sigma'"),
    ({"mu": np.zeros((4, 1)), "sigma": np.eye(4)}, "mu has shape"),
    ({"mu": np.zeros(4), "sigma": np.eye(3)}, r"sigma has shape \(3, 3\); expected \(4, 4\)"),
    ({"mu": np.zeros(4), "sigma": np.full((4, 4), np.nan)}, "NaN"),
    ({"mu": np.zeros(4), "sigma": np.eye(4), "features": np.zeros((5, 3))}, r"features has shape \(5, 3\)"),
])
def test_malformed_references_are_one_line_errors_naming_ref(tmp_path, arrays, match):
    np.savez(tmp_path / "bad.npz", **arrays)
    with pytest.raises(ReferenceFileError, match=match) as err:
        read_reference(tmp_path / "bad.npz")
    assert str(err.value).startswith("--ref ") and "\n" not in str(err.value)


def test_missing_and_unreadable_references(tmp_path):
    with pytest.raises(ReferenceFileError, match="does not exist.*--make-ref"):
        read_reference(tmp_path / "nope.npz")
    np.save(tmp_path / "mu.npy", np.zeros(4))
    with pytest.raises(ReferenceFileError, match="cannot be read as an .npz"):
        read_reference(tmp_path / "mu.npy")
    (tmp_path / "text.npz").write_text("hello")
    with pytest.raises(ReferenceFileError, match="cannot be read"):
        read_reference(tmp_path / "text.npz")
