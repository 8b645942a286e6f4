"""sidfast.loss against the float64 reference on every route, and its argument checking.

Every check runs on each route the public losses take: the native C++ op on CPU tensors, the Triton kernels
under Triton's interpreter on CPU tensors (a CPU test session, tests/conftest.py) and the compiled Triton
kernels on CUDA tensors. tests/test_ops_*.py test the ops themselves (plans, tracing, launches).

Tolerances come from the computation (``_assert_within``): the ops work in float32 (float64 for float64
inputs) whatever the input dtype, so their error against the float64 reference is a float32 rounding bound
on the magnitudes of the terms, plus the roundings of gradients stored in the input dtype.
"""
import pytest
import torch
from utils import cuda_marks, rounding_bound, sid_loss_magnitudes

import sidfast
from sidfast import reference as R
from sidfast.ops import backend

DTYPES = [torch.float32, torch.float16, torch.bfloat16, torch.float64]
LARGE = (64, 3, 32, 32)
SHAPES = [(1, 1), (2, 3), (5, 1, 1, 1), (3, 5, 7), (4, 3, 8, 8), (2, 3, 4, 5, 6), LARGE]
LAYOUTS = ["contiguous", "channels_last", "transposed", "strided"]
ROUTES = ["native", "interpreter", pytest.param("cuda", marks=cuda_marks())]

# Roundings per element term besides the normalizer: alpha in the working dtype, d, e, alpha d, the difference,
# the product, the division by w, loss_scale / B and the product with it (gradients: 1 - 2 alpha, its product,
# the sum, the scale), with room to spare. The normalizer w = mean |x_g - y_real| is a sum of N positive terms
# after one rounding each, divided by N: within a factor (1 + theta_{N+1}) of the exact w, and its reciprocal
# within gamma_{2N+2} (Higham lemma 3.3), plus one rounding for the reciprocal.
ELEMENT_ROUNDINGS = 16
# A gradient is stored in the input dtype, multiplied by grad_output and cast back: three more roundings there,
# each counted twice: Triton's interpreter converts float32 to bfloat16 by truncation, an error up to one ulp.
STORE_ROUNDINGS = 2 * 3
# The Triton kernels take Python floats (alpha, loss_scale / B) as float32 scalars: for float64 inputs, float32
# roundings of the factors alpha, 1 - 2 alpha and the scale of every term.
TRITON_FLOAT32_SCALARS = 3


def _normalizer_roundings(N):
    return 2 * N + 3


def _assert_within(actual, expected, magnitude, roundings, stored=0, reference_dtype=torch.float64):
    """|actual - expected| <= the rounding error of both evaluations, elementwise.

    ``actual`` comes from an op that works in float32 (float64 for float64 results) with at most ``roundings``
    roundings on terms of size ``magnitude`` (``rounding_bound``'s convention: for a sum, the sum of the
    |terms|, which bounds the error of every summation order and blocking), then ``stored`` roundings in its
    own dtype, each with relative error u and, in the subnormal range, an absolute error up to u times the
    smallest normal number (Higham eq. 2.8), and on the Triton route float32 scalars. ``expected`` is the reference on the same inputs, with at most as many roundings
    in ``reference_dtype``."""
    work = torch.float64 if actual.dtype == torch.float64 else torch.float32
    expected = expected.to(actual.device, torch.float64)
    magnitude = torch.as_tensor(magnitude, dtype=torch.float64, device=actual.device)
    bound = rounding_bound(work, magnitude, roundings) + rounding_bound(reference_dtype, magnitude, roundings)
    if work == torch.float64 and backend.use_triton(actual):
        bound = bound + rounding_bound(torch.float32, magnitude, TRITON_FLOAT32_SCALARS)
    if stored:
        tiny = torch.finfo(actual.dtype).tiny
        bound = bound + rounding_bound(actual.dtype, expected.abs() + bound + tiny, stored)
    err = (actual.double() - expected).abs()
    assert not torch.isnan(actual).any() and torch.all(err <= bound), (
        f"max error {err.max().item():.3e} where the bound is {bound.flatten()[err.argmax()].item():.3e}")


@pytest.fixture(params=ROUTES)
def device(request):
    """The device of a test's tensors, and with it the route the losses take (asserted): "native", the C++ op
    on CPU; "interpreter", the Triton kernels in Triton's interpreter on CPU; "cuda", the Triton kernels."""
    route = request.param
    if route == "native":
        request.getfixturevalue("native_cpu_route")
    elif route == "interpreter" and not backend.INTERPRET:
        pytest.skip("Triton's interpreter runs only when TRITON_INTERPRET=1 is set before sidfast is imported "
                    "(a CPU test session)")
    dev = "cuda" if route == "cuda" else "cpu"
    assert backend.use_triton(torch.empty(0, device=dev)) == (route != "native")
    return dev


def _inputs(shape, dtype, layout="contiguous", seed=0, device="cpu"):
    g = torch.Generator().manual_seed(seed)
    out = []
    for _ in range(3):
        if layout == "transposed":  # same logical shape, last two dims swapped in memory
            t = torch.randn(*shape[:-2], shape[-1], shape[-2], generator=g).to(device, dtype).transpose(-1, -2)
        elif layout == "strided":
            t = torch.randn(*shape[:-1], 2 * shape[-1], generator=g).to(device, dtype)[..., ::2]
        else:
            t = torch.randn(*shape, generator=g).to(device, dtype)
        if layout == "channels_last":
            t = t.contiguous(memory_format=torch.channels_last)
        out.append(t.requires_grad_())
    return out


def _check(inputs, reduction, normalize=True, alpha=1.2, loss_scale=1.0):
    """Loss and gradients of the public loss against the float64 reference times loss_scale, within the
    rounding bounds of the two evaluations; returns the loss and the gradients."""
    B = inputs[0].shape[0]
    N = inputs[0][0].numel()
    if normalize:
        out = sidfast.sid_generator_loss(*inputs, alpha=alpha, reduction=reduction, loss_scale=loss_scale)
    else:
        out = sidfast.sid_generator_loss_eps(*inputs, lam=alpha, reduction=reduction, loss_scale=loss_scale)
    assert out.dtype == (torch.float64 if inputs[0].dtype == torch.float64 else torch.float32)
    ins64 = [t.detach().to(torch.float64).requires_grad_() for t in inputs]
    ref_fn = R.sid_generator_loss if normalize else R.sid_generator_loss_eps
    ref = loss_scale * ref_fn(*ins64, alpha, reduction)
    assert out.shape == ref.shape
    loss_mag, grad_mag = sid_loss_magnitudes(*ins64, alpha, normalize)
    per_element = ELEMENT_ROUNDINGS + (_normalizer_roundings(N) if normalize else 0)
    scale = abs(loss_scale) / (B if reduction == "batchmean" else 1)
    if reduction == "none":
        _assert_within(out, ref, abs(loss_scale) * loss_mag, per_element)
    else:  # a sum of B N computed terms, the per-sample partials stored, scaled
        _assert_within(out, ref, scale * loss_mag.sum(), per_element + B * N + 4)
    # a grad_output that float32 holds exactly, so that both evaluations get the same one
    g = torch.Generator().manual_seed(1)
    grad_out = torch.randn(ref.shape, generator=g) if reduction == "none" else torch.tensor(0.7)
    grad_out = grad_out.to(out.device, out.dtype)
    grads = torch.autograd.grad(out, inputs, grad_out)
    ref_grads = torch.autograd.grad(ref, ins64, grad_out.double())
    for got, want, x in zip(grads, ref_grads, inputs):
        assert got.dtype == x.dtype and got.shape == x.shape
        _assert_within(got, want, scale * grad_out.double().abs() * grad_mag, per_element, STORE_ROUNDINGS)
    return out, grads


# the interpreter runs small tensors only; the large shape exercises the CPU op's threads and the GPU plans
ROUTE_SHAPES = [(route, shape) for route in ROUTES for shape in SHAPES if not (route == "interpreter"
                                                                              and shape == LARGE)]


@pytest.mark.parametrize("device, shape", ROUTE_SHAPES, indirect=["device"])
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("reduction", ["none", "sum", "batchmean"])
def test_generator_loss_matches_reference(device, dtype, shape, reduction):
    _check(_inputs(shape, dtype, device=device), reduction)


@pytest.mark.parametrize("dtype", DTYPES[:2])
@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("reduction", ["none", "batchmean"])
def test_generator_loss_any_layout(device, dtype, layout, reduction):
    _check(_inputs((4, 3, 6, 5), dtype, layout, device=device), reduction)


def test_channels_last_stays_channels_last(device):
    inputs = _inputs((2, 3, 4, 4), torch.float32, "channels_last", device=device)
    loss = sidfast.sid_generator_loss(*inputs, reduction="none")
    assert loss.is_contiguous(memory_format=torch.channels_last)
    loss.sum().backward()
    assert inputs[0].grad is not None


def test_mixed_layouts_agree(device):
    """One channels_last input among contiguous ones: the values of the all-contiguous call, within the
    rounding of each against the float64 reference."""
    a, b, c = _inputs((3, 2, 4, 4), torch.float32, device=device)
    a_cl = a.detach().contiguous(memory_format=torch.channels_last).requires_grad_()
    for inputs in ((a_cl, b, c), (a, b, c)):
        _check(list(inputs), "none")


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("reduction", ["none", "sum", "batchmean"])
def test_noise_space_loss_matches_reference(device, dtype, reduction):
    _check(_inputs((3, 4, 5), dtype, device=device), reduction, normalize=False, alpha=0.8)


@pytest.mark.parametrize("reduction", ["none", "sum", "batchmean"])
def test_nan_samples_dropped(device, reduction):
    y_real, y_fake, x_g = _inputs((5, 2, 3, 3), torch.float32, device=device)
    with torch.no_grad():
        y_fake[1, 1, 2, 2] = float("nan")
        x_g[3, 0, 0, 0] = float("nan")
    loss, grads = _check([y_real, y_fake, x_g], reduction)
    assert torch.isfinite(loss).all()
    for g in grads:
        assert torch.isfinite(g).all() and not g[1].any() and not g[3].any()


def test_all_nan_batch_gives_zero(device):
    y = [torch.full((2, 3), float("nan"), device=device) for _ in range(3)]
    assert sidfast.sid_generator_loss(*y).item() == 0.0


def test_published_drop_in(device):
    """The published arithmetic (tests/published.py) evaluated on the float64 inputs: its normalizer is float32
    even there, so it carries float32 rounding like the op."""
    from published import published_batchmean

    y_real, y_fake, x_g = (t.detach() for t in _inputs((8, 3, 4, 4), torch.float32, device=device))
    y_real[2, 0, 1, 1] = float("nan")
    B = x_g.shape[0]
    N = x_g[0].numel()
    loss_mag, _ = sid_loss_magnitudes(y_real, y_fake, x_g, 1.2)
    _assert_within(sidfast.sid_generator_loss(y_real, y_fake, x_g),
                   published_batchmean(*(t.double() for t in (y_real, y_fake, x_g))), loss_mag.sum() / B,
                   ELEMENT_ROUNDINGS + _normalizer_roundings(N) + B * N + 4, reference_dtype=torch.float32)


def test_loss_objects(device):
    y = _inputs((3, 4), torch.float32, device=device)
    y64 = [t.detach().double() for t in y]
    loss_mag, _ = sid_loss_magnitudes(*y64, 1.0)
    _assert_within(sidfast.SiDGeneratorLoss(alpha=1.0, reduction="sum")(*y),
                   R.sid_generator_loss(*y64, alpha=1.0, reduction="sum"), loss_mag.sum(),
                   ELEMENT_ROUNDINGS + _normalizer_roundings(4) + 3 * 4 + 4)
    g = torch.Generator().manual_seed(2)
    x0, noise, pred = (torch.randn(3, 4, generator=g).to(device) for _ in range(3))
    sigma = torch.tensor([0.5, 1.0, 2.0], device=device)
    a = torch.ones(3, dtype=torch.float64, device=device)
    ref = R.fake_score_loss(pred.double(), x0.double(), noise.double(), a, sigma.double())
    # nonnegative terms lambda(sigma) (pred - x0)^2 (sidfast/reference.py: fake_score_loss): the weight
    # (sigma / a, its square, sigma_data^2, the sum, sigma sigma_data, its square, the quotient), the difference,
    # the square and the product take ELEMENT_ROUNDINGS, then a sum of 12 terms and the division by B
    terms = R.fake_score_loss(pred.double(), x0.double(), noise.double(), a, sigma.double(), reduction="sum")
    _assert_within(sidfast.FakeScoreLoss()(pred, x0, noise, 1.0, sigma), ref, terms / 3, ELEMENT_ROUNDINGS + 12 + 1)


# ---- bad input: every error names the argument ----

def _ok(device="cpu"):
    return [torch.randn(2, 3, device=device) for _ in range(3)]


@pytest.mark.parametrize("mutate, err, name", [
    (lambda y: (y[0], y[1][:, :2], y[2]), ValueError, "y_fake"),
    (lambda y: (y[0], y[1], y[2].double()), TypeError, "x_g"),
    (lambda y: (y[0].long(), y[1], y[2]), TypeError, "y_real"),
    (lambda y: (y[0].flatten(), y[1].flatten(), y[2].flatten()), ValueError, "y_real"),
    (lambda y: (y[0], y[1].to("meta"), y[2]), ValueError, "y_fake"),
    (lambda y: (y[0], y[1].cpu().numpy(), y[2]), TypeError, "y_fake"),
    (lambda y: (y[0][:0], y[1][:0], y[2][:0]), ValueError, "y_real"),
    (lambda y: (y[0].to(torch.complex64), y[1], y[2]), TypeError, "y_real"),
])
def test_bad_tensors(device, mutate, err, name):
    with pytest.raises(err, match=name):
        sidfast.sid_generator_loss(*mutate(_ok(device)))


@pytest.mark.parametrize("alpha, err", [(float("nan"), ValueError), (float("inf"), ValueError), ("1.2", TypeError),
                                        (True, TypeError), (None, TypeError)])
def test_bad_alpha(device, alpha, err):
    with pytest.raises(err, match="alpha"):
        sidfast.sid_generator_loss(*_ok(device), alpha=alpha)
    with pytest.raises(err, match="lam"):
        sidfast.sid_generator_loss_eps(*_ok(device), lam=alpha)


@pytest.mark.parametrize("loss_scale", [100.0, -0.5])
@pytest.mark.parametrize("reduction", ["none", "sum", "batchmean"])
@pytest.mark.parametrize("normalize", [True, False])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_loss_scale_is_applied_to_values_and_gradients(device, dtype, loss_scale, reduction, normalize):
    """loss_scale * L and its gradients, against the float64 reference times the scale."""
    _check(_inputs((3, 2, 4, 4), dtype, device=device), reduction, normalize, loss_scale=loss_scale)


@pytest.mark.parametrize("loss_scale, err", [(float("nan"), ValueError), (float("inf"), ValueError),
                                             ("100", TypeError), (True, TypeError)])
def test_bad_loss_scale(device, loss_scale, err):
    with pytest.raises(err, match="loss_scale"):
        sidfast.sid_generator_loss(*_ok(device), loss_scale=loss_scale)
    with pytest.raises(err, match="loss_scale"):
        sidfast.sid_generator_loss_eps(*_ok(device), loss_scale=loss_scale)
    with pytest.raises(err, match="loss_scale"):
        sidfast.SiDGeneratorLoss(loss_scale=loss_scale)


@pytest.mark.parametrize("reduction", ["mean", None, "Sum"])
def test_bad_reduction(device, reduction):
    with pytest.raises(ValueError, match="reduction"):
        sidfast.sid_generator_loss(*_ok(device), reduction=reduction)


def test_fake_score_loss_bad_arguments(device):
    pred, x0, noise = _ok(device)
    sigma = torch.ones(2, device=device)
    with pytest.raises(ValueError, match="a "):
        sidfast.fake_score_loss(pred, x0, noise, torch.ones(3, device=device), sigma)
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
