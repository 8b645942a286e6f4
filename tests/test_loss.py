"""sidfast.loss (native CPU op) against the reference, and its argument checking."""
import pytest
import torch

import sidfast
from sidfast import reference as R

pytestmark = pytest.mark.usefixtures("native_cpu_route")  # the native C++ route; tests/test_ops_*.py: Triton

# (dtype, atol, rtol) relative to the loss scale: the op works in float32 (float64) whatever the input
TOLERANCES = [(torch.float32, 1e-6, 1e-6), (torch.float16, 2e-3, 2e-3), (torch.bfloat16, 1.6e-2, 1.6e-2),
              (torch.float64, 1e-12, 1e-12)]
SHAPES = [(1, 1), (2, 3), (5, 1, 1, 1), (3, 5, 7), (4, 3, 8, 8), (2, 3, 4, 5, 6), (64, 3, 32, 32)]
LAYOUTS = ["contiguous", "channels_last", "transposed", "strided"]


def _inputs(shape, dtype, layout="contiguous", seed=0):
    g = torch.Generator().manual_seed(seed)
    out = []
    for _ in range(3):
        if layout == "transposed":  # same logical shape, last two dims swapped in memory
            t = torch.randn(*shape[:-2], shape[-1], shape[-2], generator=g).transpose(-1, -2)
        elif layout == "strided":
            t = torch.randn(*shape[:-1], 2 * shape[-1], generator=g)[..., ::2]
        else:
            t = torch.randn(*shape, generator=g)
        t = t.to(dtype)
        if layout == "channels_last":
            t = t.contiguous(memory_format=torch.channels_last)
        out.append(t.requires_grad_())
    return out


def _close(actual, expected, atol, rtol):
    scale = expected.abs().max().clamp(min=1).item()
    torch.testing.assert_close(actual.to(expected.dtype), expected, atol=atol * scale, rtol=rtol, equal_nan=False)


def _check_against_reference(fast_fn, ref_fn, inputs, reduction, atol, rtol):
    out = fast_fn(*inputs, reduction=reduction)
    upcast = [t.detach().to(torch.float64 if t.dtype == torch.float64 else torch.float32).requires_grad_() for t in inputs]
    ref = ref_fn(*upcast, reduction=reduction)
    assert out.dtype == (torch.float64 if inputs[0].dtype == torch.float64 else torch.float32)
    assert out.shape == ref.shape
    _close(out, ref, atol, rtol)
    grad_out = torch.randn_like(ref) if reduction == "none" else torch.tensor(0.7, dtype=ref.dtype)
    grads = torch.autograd.grad(out, inputs, grad_out.to(out.dtype))
    ref_grads = torch.autograd.grad(ref, upcast, grad_out)
    for g, rg, x in zip(grads, ref_grads, inputs):
        assert g.dtype == x.dtype and g.shape == x.shape
        _close(g, rg, atol, rtol)


@pytest.mark.parametrize("dtype, atol, rtol", TOLERANCES)
@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("reduction", ["none", "sum", "batchmean"])
def test_generator_loss_matches_reference(dtype, atol, rtol, shape, reduction):
    _check_against_reference(sidfast.sid_generator_loss, R.sid_generator_loss, _inputs(shape, dtype), reduction,
                             atol, rtol)


@pytest.mark.parametrize("dtype, atol, rtol", TOLERANCES[:2])
@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("reduction", ["none", "batchmean"])
def test_generator_loss_any_layout(dtype, atol, rtol, layout, reduction):
    inputs = _inputs((4, 3, 6, 5), dtype, layout)
    _check_against_reference(sidfast.sid_generator_loss, R.sid_generator_loss, inputs, reduction, atol, rtol)


def test_channels_last_stays_channels_last():
    inputs = _inputs((2, 3, 4, 4), torch.float32, "channels_last")
    loss = sidfast.sid_generator_loss(*inputs, reduction="none")
    assert loss.is_contiguous(memory_format=torch.channels_last)
    loss.sum().backward()
    assert inputs[0].grad is not None


def test_mixed_layouts_agree():
    a, b, c = _inputs((3, 2, 4, 4), torch.float32)
    a_cl = a.detach().contiguous(memory_format=torch.channels_last)
    torch.testing.assert_close(sidfast.sid_generator_loss(a_cl, b, c, reduction="none"),
                               sidfast.sid_generator_loss(a, b, c, reduction="none"))


@pytest.mark.parametrize("dtype, atol, rtol", TOLERANCES)
@pytest.mark.parametrize("reduction", ["none", "sum", "batchmean"])
def test_noise_space_loss_matches_reference(dtype, atol, rtol, reduction):
    _check_against_reference(lambda *x, reduction: sidfast.sid_generator_loss_eps(*x, lam=0.8, reduction=reduction),
                             lambda *x, reduction: R.sid_generator_loss_eps(*x, lam=0.8, reduction=reduction),
                             _inputs((3, 4, 5), dtype), reduction, atol, rtol)


@pytest.mark.parametrize("reduction", ["none", "sum", "batchmean"])
def test_nan_samples_dropped(reduction):
    y_real, y_fake, x_g = _inputs((5, 2, 3, 3), torch.float32)
    with torch.no_grad():
        y_fake[1, 1, 2, 2] = float("nan")
        x_g[3, 0, 0, 0] = float("nan")
    loss = sidfast.sid_generator_loss(y_real, y_fake, x_g, reduction=reduction)
    ref = R.sid_generator_loss(*(t.detach() for t in (y_real, y_fake, x_g)), reduction=reduction)
    assert torch.isfinite(loss).all()
    torch.testing.assert_close(loss, ref)
    grads = torch.autograd.grad(loss.sum(), (y_real, y_fake, x_g))
    for g in grads:
        assert torch.isfinite(g).all() and not g[1].any() and not g[3].any()


def test_all_nan_batch_gives_zero():
    y = [torch.full((2, 3), float("nan")) for _ in range(3)]
    assert sidfast.sid_generator_loss(*y).item() == 0.0


def test_published_drop_in():
    from published import published_batchmean

    y_real, y_fake, x_g = (t.detach() for t in _inputs((8, 3, 4, 4), torch.float32))
    y_real[2, 0, 1, 1] = float("nan")
    torch.testing.assert_close(sidfast.sid_generator_loss(y_real, y_fake, x_g), published_batchmean(y_real, y_fake, x_g))


def test_loss_objects():
    y = _inputs((3, 4), torch.float32)
    torch.testing.assert_close(sidfast.SiDGeneratorLoss(alpha=1.0, reduction="sum")(*y),
                               R.sid_generator_loss(*y, alpha=1.0, reduction="sum"))
    x0, noise, pred = (torch.randn(3, 4) for _ in range(3))
    sigma = torch.tensor([0.5, 1.0, 2.0])
    torch.testing.assert_close(sidfast.FakeScoreLoss()(pred, x0, noise, 1.0, sigma),
                               R.fake_score_loss(pred, x0, noise, torch.ones(3), sigma))


# ---- bad input: every error names the argument ----

def _ok():
    return [torch.randn(2, 3) for _ in range(3)]


@pytest.mark.parametrize("mutate, err, name", [
    (lambda y: (y[0], y[1][:, :2], y[2]), ValueError, "y_fake"),
    (lambda y: (y[0], y[1], y[2].double()), TypeError, "x_g"),
    (lambda y: (y[0].long(), y[1], y[2]), TypeError, "y_real"),
    (lambda y: (y[0].flatten(), y[1].flatten(), y[2].flatten()), ValueError, "y_real"),
    (lambda y: (y[0], y[1].to("meta"), y[2]), ValueError, "y_fake"),
    (lambda y: (y[0], y[1].numpy(), y[2]), TypeError, "y_fake"),
    (lambda y: (y[0][:0], y[1][:0], y[2][:0]), ValueError, "y_real"),
    (lambda y: (y[0].to(torch.complex64), y[1], y[2]), TypeError, "y_real"),
])
def test_bad_tensors(mutate, err, name):
    with pytest.raises(err, match=name):
        sidfast.sid_generator_loss(*mutate(_ok()))


@pytest.mark.parametrize("alpha, err", [(float("nan"), ValueError), (float("inf"), ValueError), ("1.2", TypeError),
                                        (True, TypeError), (None, TypeError)])
def test_bad_alpha(alpha, err):
    with pytest.raises(err, match="alpha"):
        sidfast.sid_generator_loss(*_ok(), alpha=alpha)
    with pytest.raises(err, match="lam"):
        sidfast.sid_generator_loss_eps(*_ok(), lam=alpha)


@pytest.mark.parametrize("loss_scale", [100.0, -0.5])
@pytest.mark.parametrize("reduction", ["none", "sum", "batchmean"])
@pytest.mark.parametrize("normalize", [True, False])
def test_loss_scale_is_applied_to_values_and_gradients(loss_scale, reduction, normalize):
    """The native route: loss_scale * L and its gradients, against the float64 reference times the scale."""
    fast_fn = sidfast.sid_generator_loss if normalize else sidfast.sid_generator_loss_eps
    ref_fn = R.sid_generator_loss if normalize else R.sid_generator_loss_eps
    _check_against_reference(lambda *x, reduction: fast_fn(*x, reduction=reduction, loss_scale=loss_scale),
                             lambda *x, reduction: loss_scale * ref_fn(*x, reduction=reduction),
                             [t.double().detach().requires_grad_() for t in _inputs((3, 2, 4, 4), torch.float32)],
                             reduction, 1e-12, 1e-12)


@pytest.mark.parametrize("loss_scale, err", [(float("nan"), ValueError), (float("inf"), ValueError),
                                             ("100", TypeError), (True, TypeError)])
def test_bad_loss_scale(loss_scale, err):
    with pytest.raises(err, match="loss_scale"):
        sidfast.sid_generator_loss(*_ok(), loss_scale=loss_scale)
    with pytest.raises(err, match="loss_scale"):
        sidfast.sid_generator_loss_eps(*_ok(), loss_scale=loss_scale)
    with pytest.raises(err, match="loss_scale"):
        sidfast.SiDGeneratorLoss(loss_scale=loss_scale)


@pytest.mark.parametrize("reduction", ["mean", None, "Sum"])
def test_bad_reduction(reduction):
    with pytest.raises(ValueError, match="reduction"):
        sidfast.sid_generator_loss(*_ok(), reduction=reduction)


def test_fake_score_loss_bad_arguments():
    pred, x0, noise = _ok()
    sigma = torch.ones(2)
    with pytest.raises(ValueError, match="a "):
        sidfast.fake_score_loss(pred, x0, noise, torch.ones(3), sigma)
    with pytest.raises(TypeError, match="s "):
        sidfast.fake_score_loss(pred, x0, noise, 1.0, "sigma")
    with pytest.raises(ValueError, match="weighting"):
        sidfast.fake_score_loss(pred, x0, noise, 1.0, sigma, weighting="snr")
    with pytest.raises(ValueError, match="prediction"):
        sidfast.fake_score_loss(pred, x0, noise, 1.0, sigma, prediction="score")
    with pytest.raises(ValueError, match="noise"):
        sidfast.fake_score_loss(pred, x0, noise[:1], 1.0, sigma)
    with pytest.raises(ValueError, match="sigma_data"):
        sidfast.fake_score_loss(pred, x0, noise, 1.0, sigma, sigma_data=0.0)
    with pytest.raises(ValueError, match="reduction"):
        sidfast.fake_score_loss(pred, x0, noise, 1.0, sigma, reduction="mean")
