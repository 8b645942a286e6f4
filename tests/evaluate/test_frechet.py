"""The Frechet distance of Gaussians fitted to features (sidfast/evaluate/frechet.py): closed forms, zero for the
same samples, a shift's exact value, bad input."""
import pytest
import torch

from sidfast.evaluate.frechet import feature_statistics, frechet_distance, frechet_distance_features

EPS64 = torch.finfo(torch.float64).eps


def test_frechet_distance_of_identical_sets_is_zero():
    f = torch.randn(500, 16, generator=torch.Generator().manual_seed(0))
    assert frechet_distance_features(f, f) == pytest.approx(0.0, abs=1e-8)
    assert frechet_distance_features(f, f.clone().flip(0)) == pytest.approx(0.0, abs=1e-8)


def test_frechet_distance_closed_forms():
    d = 6
    g = torch.Generator().manual_seed(1)
    mu1 = torch.randn(d, generator=g, dtype=torch.float64)
    mu2 = torch.randn(d, generator=g, dtype=torch.float64)
    # commuting (diagonal) covariances: FD = |mu1-mu2|^2 + sum (sqrt(a) - sqrt(b))^2
    a = torch.rand(d, generator=g, dtype=torch.float64) + 0.1
    b = torch.rand(d, generator=g, dtype=torch.float64) + 0.1
    expected = float((mu1 - mu2).square().sum() + (a.sqrt() - b.sqrt()).square().sum())
    assert frechet_distance(mu1, torch.diag(a), mu2, torch.diag(b)) == pytest.approx(expected, rel=1e-10)
    # scaled covariance S2 = c^2 S1: FD = |dmu|^2 + (1 - c)^2 tr(S1), for a dense S1
    m = torch.randn(d, d, generator=g, dtype=torch.float64)
    s1 = m @ m.T + 0.1 * torch.eye(d, dtype=torch.float64)
    c = 1.7
    expected = float((mu1 - mu2).square().sum() + (1 - c) ** 2 * s1.trace())
    assert frechet_distance(mu1, s1, mu2, c ** 2 * s1) == pytest.approx(expected, rel=1e-9)
    # symmetric in its arguments, and a rotated copy of a non-commuting pair
    q, _ = torch.linalg.qr(torch.randn(d, d, generator=g, dtype=torch.float64))
    s2 = q @ torch.diag(torch.rand(d, generator=g, dtype=torch.float64) + 0.2) @ q.T
    assert frechet_distance(mu1, s1, mu2, s2) == pytest.approx(frechet_distance(mu2, s2, mu1, s1), rel=1e-9)
    # against the definition with an eigendecomposition-free square root (Newton-Schulz on S1 S2)
    prod = s1 @ s2
    y, z = prod / prod.norm(), torch.eye(d, dtype=torch.float64)
    for _ in range(60):
        t = 0.5 * (3 * torch.eye(d, dtype=torch.float64) - z @ y)
        y, z = y @ t, t @ z
    tr_sqrt = float(y.trace() * prod.norm().sqrt())
    expected = float((mu1 - mu2).square().sum() + s1.trace() + s2.trace()) - 2 * tr_sqrt
    assert frechet_distance(mu1, s1, mu2, s2) == pytest.approx(expected, rel=1e-8)


def test_frechet_distance_of_samples_estimates_the_gaussian_value():
    g = torch.Generator().manual_seed(2)
    a = torch.randn(20000, 4, generator=g, dtype=torch.float64)
    b = 2.0 * torch.randn(20000, 4, generator=g, dtype=torch.float64) + 1.0
    # N(0, I) vs N(1, 4I) in 4 dims: |dmu|^2 = 4, (1 - 2)^2 * 4 = 4
    assert frechet_distance_features(a, b) == pytest.approx(8.0, rel=0.03)


def test_frechet_bad_input():
    with pytest.raises(ValueError, match="features"):
        feature_statistics(torch.randn(1, 4))
    with pytest.raises(ValueError, match="features"):
        feature_statistics(torch.randn(4))
    with pytest.raises(ValueError, match="NaN"):
        feature_statistics(torch.tensor([[0.0, float("nan")], [1.0, 2.0]]))
    with pytest.raises(ValueError, match="mu1"):
        frechet_distance(torch.zeros(3), torch.eye(3), torch.zeros(4), torch.eye(4))
    with pytest.raises(ValueError, match="sigma1"):
        frechet_distance(torch.zeros(3), torch.eye(2), torch.zeros(3), torch.eye(3))




def _rounding(features: torch.Tensor) -> float:
    """What float64 rounding can leave of an FD that is 0 in exact arithmetic: each of the D eigenvalues of
    the (D, D) product S^1/2 S S^1/2 is good to about D eps lmax^2, its square root then to that over
    2 lambda >= 2 lmin; D of them summed (a factor 10 for the constants of eigh)."""
    _, sigma = feature_statistics(features)
    d = sigma.shape[0]
    vals = torch.linalg.eigvalsh(sigma)
    return 10 * d * d * EPS64 * float(vals.max()) ** 2 / float(vals.min())


def test_the_same_samples_give_zero_within_rounding():
    g = torch.Generator().manual_seed(3)
    m = torch.randn(12, 12, generator=g, dtype=torch.float64)
    f = torch.randn(3000, 12, generator=g, dtype=torch.float64) @ m + 5.0  # correlated, off-centre
    fd = frechet_distance_features(f, f)
    assert 0.0 <= fd <= _rounding(f)
    assert frechet_distance_features(f, f[torch.randperm(3000, generator=g)]) <= _rounding(f)


def test_shifted_samples_give_the_squared_shift():
    # covariance unchanged by a shift: FD = |c|^2 exactly, up to the rounding of the covariance terms
    g = torch.Generator().manual_seed(4)
    f = torch.randn(2000, 8, generator=g, dtype=torch.float64) @ torch.randn(8, 8, generator=g, dtype=torch.float64)
    c = torch.randn(8, generator=g, dtype=torch.float64)
    expected = float(c.square().sum())
    assert frechet_distance_features(f, f + c) == pytest.approx(expected, abs=_rounding(f) + 1e-12 * expected)


def test_scaled_samples_give_the_closed_form_of_their_statistics():
    # x -> a x + c: FD = |(a - 1) mu + c|^2 + (a - 1)^2 tr(S), with mu and S the fitted statistics
    g = torch.Generator().manual_seed(5)
    f = torch.randn(2000, 6, generator=g, dtype=torch.float64) * torch.arange(1, 7, dtype=torch.float64) + 1.0
    a, c = 1.5, torch.full((6,), 0.25, dtype=torch.float64)
    mu, sigma = feature_statistics(f)
    expected = float(((a - 1) * mu + c).square().sum() + (a - 1) ** 2 * sigma.trace())
    assert frechet_distance_features(f, a * f + c) == pytest.approx(expected, rel=1e-9)
