"""FID, KID and precision/recall against the published arithmetic (tests/published.py: EDM's fid.py with scipy's
sqrtm, torch-fidelity's KID, SiD's precision/recall), on features shaped like Inception's pool3 features
(non-negative, correlated, full-rank covariance, FIDs of a few units)."""
import numpy as np
import pytest
import torch

from published import (published_fid, published_inception_stats, published_kid, published_latents_and_labels,
                       published_precision_recall, published_uint8)
from sidfast.evaluate.detector import to_uint8
from sidfast.evaluate.frechet import frechet_distance, trace_sqrt_product
from sidfast.evaluate.generation import parse_seeds, seeded
from sidfast.evaluate.kernel import kernel_distance
from sidfast.evaluate.manifold import precision_recall
from sidfast.evaluate.statistics import stats_of

EPS64 = np.finfo(np.float64).eps


def inception_like(n, dim, shift=0.0, seed=0):
    """Softplus of a shared 32-dimensional factor model plus independent noise: features of mean about 0.5
    whose covariance is full rank, as pool3 features of real images are; ``shift`` moves the set."""
    basis = np.random.RandomState(123).randn(32, dim) / np.sqrt(32)
    rng = np.random.RandomState(seed)
    pre = rng.randn(n, 32) @ basis + 0.5 * rng.randn(n, dim) - 0.5 + shift
    return np.logaddexp(0, pre).astype(np.float32)


def _batches(features, size=64):
    return [features[i:i + size] for i in range(0, len(features), size)]


def test_statistics_are_edms_float64_sums_with_n_minus_one():
    x = inception_like(1000, 64)
    stats = stats_of(x)
    mu, sigma = published_inception_stats(_batches(x))
    # float64 sums of float32 values in another order: differences of a few float64 roundings of the sums
    np.testing.assert_allclose(stats.mu, mu, rtol=0, atol=1000 * EPS64 * np.abs(x).max())
    scale = float((x.astype(np.float64) ** 2).max())
    np.testing.assert_allclose(stats.sigma, sigma, rtol=0, atol=10000 * EPS64 * scale)
    assert stats.count == 1000 and stats.features.shape == (1000, 64) and stats.features.dtype == np.float32
    assert stats_of(x, keep_features=0).features is None
    kept = stats_of(x, keep_features=100).features
    assert kept.shape == (100, 64) and len({row.tobytes() for row in kept}) == 100
    assert all(any(np.array_equal(row, y) for y in x) for row in kept[:5])  # rows of the set


@pytest.mark.parametrize("dim,count", [pytest.param(256, 1500, id="256"),
                                       pytest.param(2048, 4096, id="2048", marks=pytest.mark.slow)])
def test_fid_is_edms_fid(dim, count):
    gen = stats_of(inception_like(count, dim, shift=0.05, seed=1))
    ref = stats_of(inception_like(count, dim, shift=0.0, seed=2))
    ours = frechet_distance(gen.mu, gen.sigma, ref.mu, ref.sigma)
    published = published_fid(gen.mu, gen.sigma, ref.mu, ref.sigma)
    assert 0.1 < published < 100  # the scale of the FIDs reported for distilled generators
    assert abs(ours - published) < 1e-3  # the bar
    # and far below it: both are float64 computations of the same trace, roundings of the traces apart
    assert abs(ours - published) <= 1e6 * EPS64 * (np.trace(gen.sigma) + np.trace(ref.sigma))


def test_trace_of_the_square_root_is_scipys():
    import scipy.linalg

    x, y = inception_like(600, 128, seed=3), inception_like(600, 128, shift=0.2, seed=4)
    s1, s2 = stats_of(x).sigma, stats_of(y).sigma
    want = np.trace(scipy.linalg.sqrtm(s1 @ s2)).real
    assert abs(trace_sqrt_product(s1, s2) - want) <= 1e6 * EPS64 * want


def test_fid_of_a_set_with_itself_is_zero_and_fid_is_symmetric():
    a, b = stats_of(inception_like(800, 96, seed=5)), stats_of(inception_like(800, 96, shift=0.1, seed=6))
    scale = np.trace(a.sigma)
    assert abs(frechet_distance(a.mu, a.sigma, a.mu, a.sigma)) <= 1e6 * EPS64 * scale
    ab, ba = frechet_distance(a.mu, a.sigma, b.mu, b.sigma), frechet_distance(b.mu, b.sigma, a.mu, a.sigma)
    assert ab > 0.1 and abs(ab - ba) <= 1e6 * EPS64 * scale
    with pytest.raises(ValueError, match="mu1 and mu2"):
        frechet_distance(a.mu, a.sigma, b.mu[:10], b.sigma)


def test_kid_is_torch_fidelitys():
    gen, ref = inception_like(1300, 256, shift=0.05, seed=7), inception_like(1200, 256, seed=8)
    ours = kernel_distance(gen, ref, subsets=8, subset_size=1000, seed=2020)
    # the same subsets (RandomState(2020), generated side first) and the same formula, in float64
    mean64, std64 = published_kid(gen.astype(np.float64), ref.astype(np.float64), 8, 1000)
    assert ours["kid_subset_size"] == 1000 and ours["kid_subsets"] == 8
    assert ours["kid"] > 0 and abs(ours["kid"] - mean64) <= 1e-9 * abs(mean64)
    assert abs(ours["kid_std"] - std64) <= 1e-9 * std64
    # torch-fidelity itself computes the kernels of float32 features in float32
    mean32, _ = published_kid(gen, ref, 8, 1000)
    assert abs(ours["kid"] - mean32) < 1e-3 * abs(mean64) + 1e-6


def test_kid_uses_the_smaller_set_size_when_a_side_is_small():
    gen, ref = inception_like(300, 32, seed=9), inception_like(200, 32, seed=10)
    out = kernel_distance(gen, ref, subsets=3)
    assert out["kid_subset_size"] == 200
    mean, _ = published_kid(gen.astype(np.float64), ref.astype(np.float64), 3, 200)
    assert abs(out["kid"] - mean) <= 1e-9 * abs(mean) + 1e-15


def test_precision_recall_is_sids():
    gen, ref = inception_like(300, 48, shift=0.3, seed=11), inception_like(280, 48, seed=12)
    ours = precision_recall(gen, ref, k=3)
    precision, recall = published_precision_recall(ref, gen, 3)
    # float64 distances computed two ways: a sample exactly on a ball's edge could flip, one sample at most
    assert abs(ours["precision"] - precision) <= 1 / 300 and abs(ours["recall"] - recall) <= 1 / 280
    assert 0 < ours["precision"] < 1 and 0 < ours["recall"] < 1 and ours["pr_k"] == 3
    same = precision_recall(ref, ref)
    assert same["precision"] == 1.0 and same["recall"] == 1.0
    with pytest.raises(ValueError, match="more than 3"):
        precision_recall(gen[:3], ref)


def test_images_become_the_uint8_pixels_edm_saves():
    x = torch.cat([torch.linspace(-1.2, 1.2, 4001), torch.tensor([-1.0, 1.0, 0.0, 1 / 127.5, -1 / 255])])
    x = x.reshape(1, 1, -1, 1).float()
    assert torch.equal(to_uint8(x), published_uint8(x).repeat(1, 3, 1, 1))  # grey repeated to RGB
    # data read as sidfast's data sources read uint8 (u / 127.5 - 1 in float32) converts back to the bytes
    u = torch.arange(256, dtype=torch.uint8).reshape(1, 1, 16, 16).repeat(1, 3, 1, 1)
    assert torch.equal(to_uint8(u.float() / 127.5 - 1), u)
    assert torch.equal(to_uint8(u), u)
    with pytest.raises(ValueError, match="1 or 3 channels"):
        to_uint8(torch.zeros(1, 4, 8, 8))


@pytest.mark.parametrize("label_dim", [0, 10])
def test_latents_and_labels_are_drawn_per_seed_as_edm_draws_them(label_dim):
    seeds = [0, 1, 7, 123456, (1 << 32) + 5]
    z, idx = seeded(seeds, (3, 4, 4), label_dim)
    want_z, want_labels = published_latents_and_labels(seeds, (3, 4, 4), label_dim)
    assert torch.equal(z, want_z)
    if label_dim:
        assert torch.equal(torch.eye(label_dim)[idx], want_labels)
    else:
        assert idx is None and want_labels is None
    # an image depends on its seed only, not on the others drawn with it
    z2, _ = seeded(seeds[2:4], (3, 4, 4), label_dim)
    assert torch.equal(z2, z[2:4])


def test_seeds_are_written_as_edm_writes_them():
    assert parse_seeds("0-3") == [0, 1, 2, 3]
    assert parse_seeds("1,2,5-7") == [1, 2, 5, 6, 7]
    for bad, match in (("3-1", "backwards"), ("a", "not a seed"), ("1,1", "twice"), ("-2", "not a seed")):
        with pytest.raises(ValueError, match=match):
            parse_seeds(bad)
