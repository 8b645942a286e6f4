"""SiDA losses: sidfast.reference and the drop-ins (Triton route, interpreted on CPU; native CPU route)
against a plain-PyTorch transcription of the published arithmetic: values and gradients, NaN rows, dtypes,
bad inputs.

Tolerances come from the computation: a float sum of n terms is within about n * eps * sum|terms| of the
exact sum, and a per-sample normalizer w = mean|x_g - f_phi| over N features carries a relative error of
about N * eps. Every comparison is against the transcription evaluated in float64 on the same inputs.
"""
import pytest
import torch

import sidfast
from sidfast import reference
from sidfast.ops import backend
from sidfast.ops import sid_loss as S
from published import published_discriminator, published_generator

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
TRITON = backend.use_triton(torch.empty(0, device=DEVICE))
PLANS = {"tile": None, "loop": dict(kind="loop", BLOCK=16, PROGRAMS=2), "split": dict(kind="split", BLOCK=16)}
SHAPES = [((4, 3, 4, 4), (4, 1, 2, 2)), ((5, 7), (5,)), ((3, 2, 5, 3), (3, 1, 3, 3)), ((1, 1, 1, 1), (1, 4))]


# ---- helpers

def _data(shape, lshape, dtype, seed=0, nan=()):
    """y_real, y_fake, x_g, logits (spread past the +-10 clamp); ``nan``: (tensor index, sample) pairs."""
    g = torch.Generator().manual_seed(seed)
    ts = [torch.randn(shape, generator=g, dtype=torch.float64) for _ in range(3)]
    ts.append(torch.randn(lshape, generator=g, dtype=torch.float64) * 8)
    for which, row in nan:
        ts[which][row].view(-1)[0] = float("nan")
    return [t.to(DEVICE, dtype) for t in ts]


def _grads(fn, ins, weights=(1.0, 1.0)):
    """Values and gradients of weights[0] * out[0] + weights[1] * out[1] with respect to ``ins``."""
    ins = [t.detach().clone().requires_grad_() for t in ins]
    out = fn(*ins)
    total = weights[0] * out[0] + weights[1] * out[1] if isinstance(out, tuple) else out
    return out, torch.autograd.grad(total, ins)


def _within(got, want, scale, n, dtype):
    """|got - want| <= n * eps(dtype) * scale, elementwise (the error bound of an n-term float sum)."""
    bound = n * torch.finfo(dtype).eps * scale + torch.finfo(dtype).tiny
    err = (got.double() - want).abs()
    assert torch.all(err <= bound), f"max error {err.max().item():.3e}, bound {bound.min().item():.3e}"


def _check_generator(fn, ins, alpha, dtype):
    """Values and gradients of ``fn`` against the published transcription in float64, within float bounds."""
    wts = (0.7, 1.3)
    (sid, gan), grads = _grads(lambda *a: fn(*a, alpha), ins, wts)
    ins64 = [t.double() for t in ins]
    (ref_sid, ref_gan), ref_grads = _grads(lambda *a: published_generator(*a, alpha), ins64, wts)
    assert sid.dtype == gan.dtype == (torch.float64 if dtype == torch.float64 else torch.float32)
    assert sid.shape == gan.shape == ()
    B = ins[0].shape[0]
    N = ins[0][0].numel()
    P = ins[3][0].numel()
    keep = ~reference.nan_rows(*ins64)
    K = int(keep.sum())
    # magnitudes: sum |l| / B for L_sid, elementwise |e| + |d| scaled by 1/w and the weights for the gradients
    terms = reference.sid_generator_loss(*ins64[:3], alpha, "none").abs().sum() / B
    _within(sid, ref_sid, terms, B * N + N + 16, dtype)
    _within(gan, ref_gan, ref_gan.abs(), P * K + K + N + 16, dtype)
    r, f, x = (torch.where(reference.broadcast(keep, t), t, 0.0) for t in ins64[:3])
    w = reference.broadcast(reference.sid_normalizer(r, x), x)
    mag = wts[0] * ((r - x).abs() + (1 + 2 * abs(alpha)) * (r - f).abs()) / w / B
    for got, want in zip(grads[:3], ref_grads[:3]):
        assert got.dtype == dtype
        assert not torch.isnan(got).any()
        _within(got, want, mag, N + 16, dtype)
    # the logits' gradient is c * sigmoid(-l) with c = N * sum_i(1/w_i) / (B P K); sigmoid(-l) =
    # 1 - sigmoid(l) comes out of a float subtraction, so its absolute error is about eps * c
    c = wts[1] * N * torch.where(keep, 1 / w.flatten(), 0.0).sum() / (B * P * max(K, 1))
    assert not torch.isnan(grads[3]).any()
    _within(grads[3], ref_grads[3], ref_grads[3].abs() + c, K + N + 16, dtype)
    return sid, gan


@pytest.fixture(params=["triton-tile", "triton-loop", "triton-split", "native"])
def route(request, monkeypatch):
    """The drop-in's route: the Triton kernels under each plan, or the native CPU op."""
    if request.param == "native":
        if DEVICE != "cpu":
            pytest.skip("the native route is the CPU route")
        request.getfixturevalue("native_cpu_route")
        return request.param
    if not TRITON:
        pytest.skip("Triton kernels need CUDA, or TRITON_INTERPRET=1 before sidfast is imported")
    plan = PLANS[request.param.split("-")[1]]
    if plan is None:
        monkeypatch.setattr(S, "TILE_ELEMS", 16)  # one sample per program
    else:
        monkeypatch.setattr(S, "PLAN_OVERRIDE", plan)
    return request.param


# ---- generator

@pytest.mark.parametrize("shape, lshape", SHAPES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_reference_generator_matches_published(shape, lshape, dtype):
    ins = _data(shape, lshape, dtype, seed=1)
    _check_generator(reference.sida_generator_loss, ins, 1.0, dtype)


@pytest.mark.parametrize("shape, lshape", SHAPES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_drop_in_generator_matches_published(route, shape, lshape, dtype):
    ins = _data(shape, lshape, dtype, seed=2)
    _check_generator(sidfast.sida_generator_loss, ins, 1.0, dtype)


@pytest.mark.parametrize("nan", [((0, 1),), ((1, 0), (3, 2)), ((3, 1),), ((2, 3), (3, 3))])
def test_nan_samples_are_dropped(route, nan):
    """A NaN in any of y_real, y_fake, x_g or the logits drops that sample from both losses, alone."""
    ins = _data((4, 3, 4, 4), (4, 1, 2, 2), torch.float32, seed=3, nan=nan)
    sid, gan = _check_generator(sidfast.sida_generator_loss, ins, 1.2, torch.float32)
    assert torch.isfinite(sid) and torch.isfinite(gan) and gan > 0


def test_nan_in_logits_only_changes_the_sid_loss_too(route):
    """The logits' NaN row drops the sample from L_sid as well (sida_loss_edm2.py's mask), so L_sid differs
    from the plain SiD loss exactly by that sample's term."""
    ins = _data((4, 6), (4, 3), torch.float64, seed=4, nan=((3, 2),))
    sid, _ = sidfast.sida_generator_loss(*ins)
    plain = reference.sid_generator_loss(*ins[:3], 1.0, "none").sum(1)
    torch.testing.assert_close(sid, (plain.sum() - plain[2]) / 4, rtol=1e-12, atol=1e-12)


def test_all_samples_dropped_gives_zero_losses(route):
    ins = _data((2, 5), (2, 2), torch.float32, seed=5, nan=((0, 0), (3, 1)))
    (sid, gan), grads = _grads(sidfast.sida_generator_loss, ins)
    assert sid.item() == 0 and gan.item() == 0
    assert all(torch.all(g == 0) for g in grads)


def test_gan_gradient_reaches_only_the_logits(route):
    ins = _data((3, 2, 4), (3, 2), torch.float64, seed=6)
    (_, gan), grads = _grads(sidfast.sida_generator_loss, ins, weights=(0.0, 1.0))
    assert all(torch.all(g == 0) for g in grads[:3])
    assert torch.any(grads[3] != 0)
    # clamped logits (|l| > 10) get no gradient, as torch.clamp gives none outside its range
    assert torch.all(grads[3][ins[3].abs() > 10] == 0)


def test_gan_term_is_n_b_times_mean_inverse_normalizer():
    """L_gan = N * b * mean_i(1/w_i) written out by hand (docs/math.md, "SiDA losses")."""
    y_real = torch.tensor([[0.0, 2.0], [1.0, 1.0]], dtype=torch.float64)
    x_g = torch.tensor([[1.0, 0.0], [0.0, 1.0]], dtype=torch.float64)
    logits = torch.tensor([[0.0], [20.0]], dtype=torch.float64)
    _, gan = sidfast.sida_generator_loss(y_real, y_real, x_g, logits)
    softplus = torch.nn.functional.softplus
    b = (softplus(torch.tensor(0.0)) + softplus(torch.tensor(-10.0))) / 2
    w = torch.tensor([1.5, 0.5])  # mean |x_g - y_real| per sample
    torch.testing.assert_close(gan.float(), (2 * b * (1 / w).sum() / 2).float(), rtol=1e-6, atol=0)


def test_half_precision_inputs_give_float32_losses(route):
    ins = _data((3, 4, 4), (3, 1), torch.float16, seed=7)
    sid, gan = sidfast.sida_generator_loss(*ins)
    ins64 = [t.double() for t in ins]
    ref_sid, ref_gan = published_generator(*ins64, 1.0)
    assert sid.dtype == gan.dtype == torch.float32
    # float32 sums over 3 x 16 terms, plus up to a few float16 roundings per term where a route (like the
    # published code) subtracts in float16 before widening
    eps = 8 * torch.finfo(torch.float16).eps + 3 * 16 * torch.finfo(torch.float32).eps
    terms = reference.sid_generator_loss(*ins64[:3], 1.0, "none").abs().sum() / 3
    assert abs(sid.double() - ref_sid) <= eps * terms
    assert abs(gan.double() - ref_gan) <= eps * ref_gan


# ---- discriminator

@pytest.mark.parametrize("lshape", [(4, 1, 3, 3), (4,), (4, 5)])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("nan", [(), ((0, 1),), ((1, 2), (0, 3))])
@pytest.mark.parametrize("api", ["reference", "drop-in"])
def test_discriminator_matches_published(lshape, dtype, nan, api):
    g = torch.Generator().manual_seed(8)
    real = torch.randn(lshape, generator=g, dtype=torch.float64) * 3
    fake = torch.randn(lshape, generator=g, dtype=torch.float64) * 3
    sigma = torch.exp(torch.randn(4, generator=g, dtype=torch.float64) * 1.2 - 1.2)
    for which, row in nan:
        (real, fake)[which][row].view(-1)[0] = float("nan")
    ins = [t.to(DEVICE, dtype) for t in (real, fake, sigma)]
    fn = reference.sida_discriminator_loss if api == "reference" else sidfast.sida_discriminator_loss
    loss, grads = _grads(lambda r, f: fn(r, f, ins[2]), ins[:2])
    want, want_grads = _grads(lambda r, f: published_discriminator(r, f, ins[2].double()),
                              [t.double() for t in ins[:2]])
    assert loss.dtype == (torch.float64 if dtype == torch.float64 else torch.float32) and loss.shape == ()
    K = int((~reference.nan_rows(*ins[:2])).sum())
    P = ins[0][0].numel()
    _within(loss, want, want.abs(), P * K + K + 16, dtype)
    # each logit's gradient is c * (sigmoid(l) - target) with c = sum_i(lambda_i) / (2 B P K); the
    # subtraction leaves an absolute error of about eps * c
    keep = ~reference.nan_rows(*ins[:2])
    lam = (sigma ** 2 + 0.25) / (0.5 * sigma) ** 2
    c = lam[keep.cpu()].sum() / (2 * 4 * P * max(K, 1))
    for got, ref in zip(grads, want_grads):
        assert not torch.isnan(got).any()
        _within(got, ref, ref.abs() + c.to(ref.device), K + 16, dtype)


def test_discriminator_drops_samples_with_nan_in_the_fake_step_tensors():
    g = torch.Generator().manual_seed(9)
    real, fake = (torch.randn(3, 1, 2, 2, generator=g, dtype=torch.float64) for _ in range(2))
    sigma = torch.rand(3, generator=g, dtype=torch.float64) + 0.1
    x_g, y_fake = (torch.randn(3, 2, 4, generator=g, dtype=torch.float64) for _ in range(2))
    y_fake[1, 0, 0] = float("nan")
    want = published_discriminator(real, fake, sigma, y=x_g, y_fake=y_fake)
    got = sidfast.sida_discriminator_loss(real, fake, sigma.view(3, 1, 1, 1), x_g=x_g, y_fake=y_fake)
    torch.testing.assert_close(got, want, rtol=1e-12, atol=0)
    assert got != sidfast.sida_discriminator_loss(real, fake, sigma)


# ---- bad inputs

def test_generator_bad_inputs_name_the_argument():
    y = torch.randn(2, 3)
    with pytest.raises(ValueError, match="logits has batch size 3"):
        sidfast.sida_generator_loss(y, y, y, torch.randn(3, 1))
    with pytest.raises(TypeError, match="logits must be float16"):
        sidfast.sida_generator_loss(y, y, y, torch.zeros(2, 1, dtype=torch.long))
    with pytest.raises(TypeError, match="logits must be a torch.Tensor"):
        sidfast.sida_generator_loss(y, y, y, [0.0, 1.0])
    with pytest.raises(ValueError, match="logits is empty"):
        sidfast.sida_generator_loss(y, y, y, torch.randn(2, 0))
    with pytest.raises(ValueError, match="x_g has shape"):
        sidfast.sida_generator_loss(y, y, torch.randn(2, 4), torch.randn(2))
    with pytest.raises(ValueError, match="alpha must be finite"):
        sidfast.sida_generator_loss(y, y, y, torch.randn(2), alpha=float("nan"))


def test_discriminator_bad_inputs_name_the_argument():
    d = torch.randn(2, 1, 2, 2)
    with pytest.raises(ValueError, match="logits_fake has shape"):
        sidfast.sida_discriminator_loss(d, torch.randn(3, 1, 2, 2), torch.ones(2))
    with pytest.raises(ValueError, match="sigma must have one entry per sample"):
        sidfast.sida_discriminator_loss(d, d, torch.ones(3))
    with pytest.raises(TypeError, match="sigma must be floating point"):
        sidfast.sida_discriminator_loss(d, d, torch.ones(2, dtype=torch.long))
    with pytest.raises(ValueError, match="sigma_data must be finite and positive"):
        sidfast.sida_discriminator_loss(d, d, torch.ones(2), sigma_data=0.0)
    with pytest.raises(ValueError, match="logits_real has batch size 2"):
        sidfast.sida_discriminator_loss(d, d, torch.ones(2), x_g=torch.randn(3, 4))
    with pytest.raises(ValueError, match="y_fake has shape"):
        sidfast.sida_discriminator_loss(d, d, 1.0, x_g=torch.randn(2, 4), y_fake=torch.randn(2, 5))
