"""sidfast/augment.py: each transform against its definition, on small float64 images.

The resampler's errors are derived from its filter: with h the symlet-6 low-pass normalized to sum 1,
an axis read forwards passes through e_fwd[d] = 2 sum_k h[k] h[k - 2d] (the identity up to the rounding of
the published coefficients), an axis read backwards (a rotation by 90 or 180 degrees) through
e_rev[d] = 2 sum_k h[k] h[TAPS - 1 - k - 2d], and a linear ramp comes out shifted by the distance between
the filter's nominal centre and its centre of mass.
"""
import math

import numpy as np
import pytest
import torch

from sidfast.training.augment import COLOR, GEOMETRIC, SPREADS, SYM6, TAPS, AugmentPipe

ROUNDING = 1e-12  # float64 rounding over a few hundred multiply-adds of terms below 1 in size
H = np.array(SYM6) / sum(SYM6)


def _fwd() -> dict:
    return {d: 2 * sum(H[k] * H[k - 2 * d] for k in range(TAPS) if 0 <= k - 2 * d < TAPS)
            for d in range(-6, 7)}


def _rev() -> dict:
    return {d: 2 * sum(H[k] * H[TAPS - 1 - k - 2 * d] for k in range(TAPS)
                       if 0 <= TAPS - 1 - k - 2 * d < TAPS)
            for d in range(-6, 7)}


def _identity_bound(x: torch.Tensor) -> float:
    """max|x| * ||e_fwd (x) e_fwd - delta (x) delta||_1, plus rounding."""
    e = _fwd()
    l1 = sum(abs(v) for v in e.values())
    off = sum(abs(v - (d == 0)) for d, v in e.items())
    return x.abs().max().item() * (off * l1 + off) + ROUNDING


def _mirror(i: int, size: int) -> int:
    period = 2 * (size - 1)
    i %= period
    return period - i if i >= size else i


def _images(n=2, c=3, h=8, w=8, seed=0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.rand(n, c, h, w, generator=g, dtype=torch.float64) * 2 - 1


def _only(name: str, **spreads) -> AugmentPipe:
    return AugmentPipe(1.0, strengths={name: 1.0}, spreads=spreads or None)


def _zero_params(pipe: AugmentPipe, n: int) -> dict:
    return {k: torch.zeros_like(v, dtype=torch.float64) for k, v in pipe.sample(n).items()}


def test_p0_is_the_identity_with_zero_labels():
    x = _images(n=4)
    pipe = AugmentPipe(0.0)
    y, labels = pipe(x, torch.Generator().manual_seed(1))
    assert torch.equal(y, x)
    assert labels.shape == (4, 9) and labels.dtype == x.dtype and not labels.any()


def test_label_layout_is_edm_nine_then_colour():
    assert AugmentPipe(0.12).label_dim == 9
    assert AugmentPipe(0.12).enabled == GEOMETRIC
    everything = AugmentPipe(0.5, strengths={n: 1.0 for n in GEOMETRIC + COLOR})
    assert everything.label_dim == 15
    assert AugmentPipe(0.0, strengths={n: 1.0 for n in COLOR}).label_dim == 6


def test_zero_parameters_leave_images_unchanged_through_the_resampler():
    x = _images(n=3, h=8, w=11)
    pipe = AugmentPipe(1.0)
    y, labels = pipe.apply(x, _zero_params(pipe, 3))
    assert (y - x).abs().max().item() <= _identity_bound(x)
    assert not labels.any()


@pytest.mark.parametrize("name,axis", [("xflip", 3), ("yflip", 2)])
def test_flips_move_pixels(name, axis):
    x = _images()
    y, labels = _only(name).apply(x, {name: torch.tensor([1.0, 0.0])})
    assert torch.equal(y[0], x[0].flip(axis - 1)) and torch.equal(y[1], x[1])
    assert labels.tolist() == [[1.0], [0.0]]


def test_integer_translation_moves_pixels_and_mirrors_at_the_border():
    x = _images(h=8, w=8)
    pipe = _only("translate_frac")  # one standard deviation is 0.125 * 8 = 1 pixel
    shift = torch.tensor([[1.0, 0.0], [-2.0, 3.0]])
    y, labels = pipe.apply(x, {"translate_frac": shift})
    for b, (tx, ty) in enumerate(shift.int().tolist()):
        rows = [_mirror(i - ty, 8) for i in range(8)]
        cols = [_mirror(j - tx, 8) for j in range(8)]
        expected = x[b][:, rows][:, :, cols]
        assert (y[b] - expected).abs().max().item() <= _identity_bound(x)
    assert torch.equal(labels, shift.double())


@pytest.mark.parametrize("quarter_turns", [1, 2])
def test_rotation_by_quarter_turns_moves_pixels_through_the_filter(quarter_turns):
    """out(p) = in(R(theta) p): at theta = 90 degrees, out[i, j] reads in[j, W-1-i] along a reversed axis."""
    x = _images(n=1, h=12, w=12)
    theta = quarter_turns * math.pi / 2
    y, labels = _only("rotate_frac").apply(x, {"rotate_frac": torch.tensor([theta], dtype=torch.float64)})
    rev = _rev()
    fwd = _fwd()
    w = 12
    expected = torch.zeros_like(x)
    for i in range(w):
        for j in range(w):
            if quarter_turns == 1:  # rows of the output come from reversed columns of the input
                taps = [(e_r * e_f, _mirror(j + f, w), _mirror(w - 1 - i + d, w))
                        for d, e_r in rev.items() for f, e_f in fwd.items()]
            else:  # both axes reversed
                taps = [(e_a * e_b, _mirror(w - 1 - i + a, w), _mirror(w - 1 - j + b, w))
                        for a, e_a in rev.items() for b, e_b in rev.items()]
            expected[0, :, i, j] = sum(e * x[0, :, r, c] for e, r, c in taps)
    assert (y - expected).abs().max().item() <= 1e-10
    assert torch.allclose(labels, torch.tensor([[math.cos(theta) - 1, math.sin(theta)]], dtype=torch.float64),
                          atol=1e-15)


def _ramp(a: float, b: float, size: int = 24) -> torch.Tensor:
    u = torch.arange(size, dtype=torch.float64) - (size - 1) / 2
    return (a * u.view(1, -1) + b * u.view(-1, 1)).expand(1, 3, size, size).contiguous()


def test_scale_and_aniso_map_a_linear_ramp_exactly():
    """A ramp a x + b y under x_in = A x_out becomes (a, b) A, shifted by (5.5 - centre of mass) / 2 input
    pixels per axis times (1 - the axis's inverse scale): the filter's offset, applied before and undone
    after the resampling at different scales."""
    a = 0.05
    b = -0.03
    offset = (TAPS - 1) / 2 - float((np.arange(TAPS) * H).sum())
    ramp = _ramp(a, b)
    # Far enough from the border that no filter tap reaches the mirrored (non-linear) extension.
    inner = (slice(None), slice(None), slice(9, 15), slice(9, 15))

    y, labels = _only("scale").apply(ramp, {"scale": torch.tensor([2.5])})
    s = 2 ** (SPREADS["scale_std"] * 2.5)
    expected = ramp / s + (a + b) * offset / 2 * (1 - 1 / s)
    assert (y - expected)[inner].abs().max().item() <= 1e-10
    assert labels.tolist() == [[2.5]]

    y, labels = _only("aniso").apply(ramp, {"aniso": torch.tensor([[-2.0, 0.0]])})
    s = 2 ** (SPREADS["aniso_std"] * -2.0)  # x_in = x_out / s, y_in = y_out * s
    u = torch.arange(24, dtype=torch.float64) - 11.5
    expected = (a * u.view(1, -1) / s + a * offset / 2 * (1 - 1 / s)
                + b * u.view(-1, 1) * s + b * offset / 2 * (1 - s)).expand_as(ramp)
    assert (y - expected)[inner].abs().max().item() <= 1e-10
    assert labels.tolist() == [[-2.0, 0.0]]


def _colour(name: str, value: float, c: int = 3):
    x = _images(n=1, c=c, h=4, w=4)
    y, labels = _only(name).apply(x, {name: torch.tensor([value], dtype=torch.float64)})
    return x, y, labels


def test_colour_transforms_match_their_definitions():
    x, y, labels = _colour("brightness", 1.5)
    assert torch.allclose(y, x + 1.5 * SPREADS["brightness_std"], atol=ROUNDING)
    assert labels.tolist() == [[1.5]]
    x, y, _ = _colour("contrast", -1.0)
    assert torch.allclose(y, x * 2 ** (-SPREADS["contrast_std"]), atol=ROUNDING)
    x, y, _ = _colour("lumaflip", 1.0)  # reflect about the plane orthogonal to grey: luma negated
    assert torch.allclose(y, x - 2 * x.mean(dim=1, keepdim=True), atol=ROUNDING)
    x, y, labels = _colour("hue", 2 * math.pi / 3)  # a third of a turn about grey cycles R -> G -> B
    assert torch.allclose(y, x.roll(1, dims=1), atol=ROUNDING)
    assert torch.allclose(labels, torch.tensor([[-1.5, math.sqrt(3) / 2]], dtype=torch.float64), atol=1e-15)
    x, y, _ = _colour("saturation", 0.5)
    grey = x.mean(dim=1, keepdim=True)
    assert torch.allclose(y, grey + (x - grey) * 2 ** (0.5 * SPREADS["saturation_std"]), atol=ROUNDING)


def test_colour_transforms_on_grey_images():
    for name, value, expected in [("brightness", 1.0, lambda x: x + 0.2), ("contrast", 2.0, lambda x: x * 2),
                                  ("lumaflip", 1.0, lambda x: -x), ("hue", 1.0, lambda x: x),
                                  ("saturation", 1.0, lambda x: x)]:
        x, y, _ = _colour(name, value, c=1)
        assert torch.allclose(y, expected(x), atol=ROUNDING), name


def test_colour_batch_statistics_at_p1():
    """At p = 1 every image is transformed; each per-image statistic is the drawn parameter exactly,
    and its batch average stays within 6 standard errors of the parameter's zero mean."""
    n = 400
    x = _images(n=n, h=4, w=4)
    grey = x.mean(dim=1, keepdim=True)
    chroma = (x - grey).flatten(1).norm(dim=1)
    g = torch.Generator().manual_seed(3)
    pipe = AugmentPipe(1.0, strengths={n: 1.0 for n in COLOR})
    y, labels = pipe(x, g)
    assert labels.shape == (n, 6)
    assert labels[:, 0].abs().min() > 0  # every image got a brightness draw
    luma_in = x.mean(dim=(1, 2, 3))
    luma_out = y.mean(dim=(1, 2, 3))
    out_grey = y.mean(dim=1, keepdim=True)
    chroma_out = (y - out_grey).flatten(1).norm(dim=1)
    # Hue keeps luma and chroma; brightness, contrast and luma flip set luma; saturation and contrast chroma.
    b = labels[:, 0] * SPREADS["brightness_std"]
    c = torch.exp2(labels[:, 1] * SPREADS["contrast_std"])
    flip = 1 - 2 * labels[:, 2]
    s = torch.exp2(labels[:, 5] * SPREADS["saturation_std"])
    assert torch.allclose(luma_out, flip * c * (luma_in + b), atol=1e-10)
    assert torch.allclose(chroma_out, c * s * chroma, atol=1e-10)
    bound = 6 / math.sqrt(n)
    assert abs(labels[:, 0].mean().item()) < bound  # standardized brightness
    assert abs(labels[:, 1].mean().item()) < bound  # standardized log2 contrast
    assert abs(labels[:, 2].mean().item() - 0.5) < bound * 0.5  # luma flips: Bernoulli(1/2)
    assert abs(labels[:, 5].mean().item()) < bound  # standardized log2 saturation


def test_transforms_fire_with_probability_strength_times_p():
    n = 4000
    p = 0.12
    params = AugmentPipe(p).sample(n, torch.Generator().manual_seed(0))
    bound = 6 * math.sqrt(p * (1 - p) / n)
    for name in ("yflip", "scale", "rotate_frac", "aniso", "translate_frac"):
        value = params[name][:, 0] if params[name].dim() == 2 else params[name]
        fired = (value != 0).double().mean().item()
        if name == "yflip":  # a coin that lands 1 half the time when the transform fires
            fired *= 2
        assert abs(fired - p) < 2 * bound, name
    flips = params["xflip"].mean().item()  # EDM's x-flip fires whenever p > 0
    assert abs(flips - 0.5) < 6 * math.sqrt(0.25 / n)


def test_seeded_generator_is_deterministic():
    x = _images(n=4, h=8, w=8).float()
    pipe = AugmentPipe(0.5, strengths={n: 1.0 for n in GEOMETRIC + COLOR})
    y1, l1 = pipe(x, torch.Generator().manual_seed(7))
    y2, l2 = pipe(x, torch.Generator().manual_seed(7))
    y3, l3 = pipe(x, torch.Generator().manual_seed(8))
    assert torch.equal(y1, y2) and torch.equal(l1, l2)
    assert not torch.equal(l1, l3)


def test_shared_parameters_transform_two_batches_alike():
    pipe = AugmentPipe(1.0)
    params = pipe.sample(3, torch.Generator().manual_seed(0))
    a = _images(n=3, seed=1)
    both, labels = pipe.apply(torch.cat([a, a]), {k: torch.cat([v, v]) for k, v in params.items()})
    one, one_labels = pipe.apply(a, params)
    assert torch.allclose(both[:3], one, atol=ROUNDING) and torch.allclose(both[3:], one, atol=ROUNDING)
    assert torch.equal(labels[:3], one_labels)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.bfloat16])
@pytest.mark.parametrize("shape", [(2, 3, 8, 8), (3, 1, 6, 10)])
def test_shapes_and_dtypes(dtype, shape):
    x = torch.rand(shape).to(dtype) * 2 - 1
    pipe = AugmentPipe(0.9, strengths={n: 1.0 for n in GEOMETRIC + COLOR})
    y, labels = pipe(x, torch.Generator().manual_seed(0))
    assert y.shape == x.shape and y.dtype == dtype
    assert labels.shape == (shape[0], 15) and labels.dtype == dtype
    assert torch.isfinite(y.float()).all()


def test_gradients_flow_to_the_images():
    x = _images(n=2).float().requires_grad_()
    pipe = AugmentPipe(1.0, strengths={n: 1.0 for n in GEOMETRIC + COLOR})
    y, _ = pipe(x, torch.Generator().manual_seed(0))
    y.square().sum().backward()
    assert x.grad is not None and x.grad.abs().sum() > 0


def test_bad_arguments_are_named():
    with pytest.raises(ValueError, match="probability p"):
        AugmentPipe(1.5)
    with pytest.raises(ValueError, match="unknown augmentation 'blur'"):
        AugmentPipe(0.1, strengths={"blur": 1.0})
    with pytest.raises(ValueError, match="strength of hue"):
        AugmentPipe(0.1, strengths={"hue": -1})
    with pytest.raises(ValueError, match="unknown spread"):
        AugmentPipe(0.1, spreads={"scale_sd": 0.1})
    with pytest.raises(ValueError, match="images must be a float tensor"):
        AugmentPipe(0.1)(torch.zeros(2, 3, 4, 4, dtype=torch.uint8))
    with pytest.raises(ValueError, match="1 or 3 channels"):
        _only("hue")(torch.zeros(2, 4, 4, 4))
    with pytest.raises(ValueError, match="exactly the enabled transforms"):
        AugmentPipe(0.1).apply(torch.zeros(1, 3, 4, 4), {"xflip": torch.zeros(1)})
