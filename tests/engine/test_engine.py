"""sidfast.engine.scores.ScoreEngine against plain eager evaluation of the same networks (values and gradients).

CPU tests run the eager engine (and torch.compile once, marked slow); the graph cache, with stand-ins for the
CUDA calls and with real CUDA graphs, is tested in test_graphs.py.
"""
import copy

import pytest
import torch
from torch import nn

import sidfast
from sidfast import reference as R
from sidfast.models.denoiser import EDMDenoiser
from sidfast.engine.scores import ScoreEngine
from sidfast.models.lora import LoRAFakeScore, LoRALayer, merge_lora
from sidfast.ops.noise import draw_seed, regenerate_noise
from utils import (SmallUNet, StaticGradGraphs, assert_float64_close as _close,
                   graphs_on_cpu, randomize_lora, rounding_bound, tiny_diffusers_unet)

# The engine evaluates other batches than plain eager calls ([x_t; x_t] through one network, the teacher
# and the fake score stacked), which changes matmul and convolution blocking: engine and eager results are
# compared in float64 (networks and inputs) within float64_network_tolerance, whatever the CPU's or GPU's kernels.
F64 = torch.float64


class Generator(nn.Module):
    """A one-step generator stand-in: x_g = G(z) with trainable parameters."""

    def __init__(self, channels=3):
        super().__init__()
        self.conv = nn.Conv2d(channels, channels, 3, padding=1)

    def forward(self, z):
        return z + 0.1 * torch.tanh(self.conv(z))


def _setup(mode="full", seed=0, batch=3, device="cpu", label_dim=0, dropout=0.0, dtype=F64, **kw):
    torch.manual_seed(seed)
    teacher = EDMDenoiser(SmallUNet(label_dim=label_dim, dropout=dropout)).to(device, dtype)
    fake = None
    if mode == "full":
        fake = copy.deepcopy(teacher)
        with torch.no_grad():  # a fake score that differs from the teacher
            for p in fake.parameters():
                p.add_(0.05 * torch.randn_like(p))
    engine = ScoreEngine(teacher, fake, mode=mode, **kw)
    if mode == "lora":
        randomize_lora(engine.fake.net)
    g = torch.Generator().manual_seed(seed + 1)
    z = torch.randn(batch, 3, 8, 8, generator=g).to(device, dtype)
    noise = torch.randn(batch, 3, 8, 8, generator=g).to(device, dtype)
    sigma = R.generator_sigma(batch, generator=g).to(device, dtype)
    G = Generator().to(device, dtype)
    return engine, G, z, noise, sigma


def _fake_loss(engine, x0, sigma, noise):
    """The fake-score loss of the published recipe through ``fake_score_forward``: EDM weighting at
    ``x_t = sg(x0) + sigma * noise``."""
    x0 = x0.detach()
    x_t = x0 + sigma.reshape(-1, 1, 1, 1) * noise
    pred = engine.fake_score_forward(x_t, sigma)
    return sidfast.fake_score_loss(pred, x0, noise, 1.0, sigma, prediction="x0", weighting="edm")


def _plain_fake(engine):
    """The fake score as an ordinary network: itself in 'full' mode, the merged LoRA network in 'lora'
    mode."""
    return merge_lora(engine.fake.net) if engine.mode == "lora" else engine.fake


def _eager_generator_step(engine, G, z, sigma, noise, labels=None, alpha=1.2):
    """The published generator update in plain eager PyTorch: loss and G's gradients."""
    teacher, fake = copy.deepcopy(engine.teacher), copy.deepcopy(_plain_fake(engine))
    G = copy.deepcopy(G)
    x_g = G(z)
    x_t = x_g + sigma.reshape(-1, 1, 1, 1) * noise
    y_real, y_fake = teacher(x_t, sigma, labels), fake(x_t, sigma, labels)
    loss = sidfast.sid_generator_loss(y_real, y_fake, x_g, alpha)
    loss.backward()
    return y_real.detach(), y_fake.detach(), loss.detach(), [p.grad for p in G.parameters()]


@pytest.mark.parametrize("mode", ["full", "lora"])
def test_generator_terms_equal_eager_values_and_gradients(mode):
    engine, G, z, noise, sigma = _setup(mode)
    y_real_ref, y_fake_ref, loss_ref, grads_ref = _eager_generator_step(engine, G, z, sigma, noise)
    x_g = G(z)
    y_real, y_fake = engine.generator_terms(x_g, sigma, None, noise)
    loss = sidfast.sid_generator_loss(y_real, y_fake, x_g)
    loss.backward()
    _close(y_real, y_real_ref)
    _close(y_fake, y_fake_ref)
    assert not torch.allclose(y_real, y_fake, atol=1e-4)  # the two networks really differ
    _close(loss, loss_ref)
    for g, g_ref in zip((p.grad for p in G.parameters()), grads_ref):
        _close(g, g_ref)
    # input gradients only: neither score network got a parameter gradient
    assert all(p.grad is None for p in engine.teacher.parameters())
    assert all(p.grad is None for p in engine.fake.parameters())


@pytest.mark.parametrize("mode", ["full", "lora"])
def test_generator_loss_and_input_gradient_equal_the_reference(mode):
    engine, G, z, noise, sigma = _setup(mode, batch=4)
    teacher, fake = engine.teacher, _plain_fake(engine)
    x_g = G(z).detach().requires_grad_()
    loss = sidfast.sid_generator_loss(*engine.generator_terms(x_g, sigma, None, noise), x_g, 1.0)
    (g,) = torch.autograd.grad(loss, x_g)
    x_ref = x_g.detach().clone().requires_grad_()
    x_t = x_ref + sigma.reshape(-1, 1, 1, 1) * noise
    loss_ref = R.sid_generator_loss(teacher(x_t, sigma), fake(x_t, sigma), x_ref, 1.0)
    (g_ref,) = torch.autograd.grad(loss_ref, x_ref)
    _close(loss, loss_ref)
    _close(g, g_ref)


@pytest.mark.parametrize("mode", ["full", "lora"])
def test_fake_score_forward_and_loss_equal_eager_with_parameter_gradients(mode):
    engine, G, z, noise, sigma = _setup(mode)
    x0 = G(z).detach()
    sig = R.edm_training_sigma(3, generator=torch.Generator().manual_seed(5)).to(F64)
    loss = _fake_loss(engine, x0, sig, noise)
    loss.backward()
    grads = {n: p.grad for n, p in engine.fake.named_parameters() if p.grad is not None}
    trainable = {id(p) for p in engine.fake_parameters()}
    assert {id(p) for p in engine.fake.parameters() if p.grad is not None} == trainable
    if mode == "lora":
        assert all(n.endswith(("lora_A", "lora_B")) for n in grads)
        with torch.no_grad():
            _close(engine.fake_score_forward(x0 + sig.reshape(-1, 1, 1, 1) * noise, sig),
                   merge_lora(engine.fake.net)(x0 + sig.reshape(-1, 1, 1, 1) * noise, sig))
        return
    ref = copy.deepcopy(engine.fake)
    ref.zero_grad(set_to_none=True)
    x_t = x0 + sig.reshape(-1, 1, 1, 1) * noise
    loss_ref = sidfast.fake_score_loss(ref(x_t, sig), x0, noise, 1.0, sig, prediction="x0", weighting="edm")
    loss_ref.backward()
    _close(loss, loss_ref)
    for n, p in ref.named_parameters():
        _close(grads[n], p.grad)


def test_default_fake_is_a_trainable_copy_and_lora_fake_starts_at_the_teacher():
    torch.manual_seed(0)
    teacher = SmallUNet().to(F64)
    for p in teacher.parameters():
        p.requires_grad_(False)
    full = ScoreEngine(teacher)
    assert full.fake is not full.teacher and full.fake.training and not full.teacher.training
    assert all(p.requires_grad for p in full.fake.parameters())
    assert full.teacher.network is teacher  # wrapped, not copied
    lora = ScoreEngine(teacher, mode="lora", lora_rank=2)
    x = torch.randn(2, 3, 8, 8, dtype=F64)
    sigma = torch.tensor([0.5, 2.0], dtype=F64)
    y_real, y_fake = lora.generator_terms(x, sigma, None, torch.zeros_like(x))
    _close(y_fake, y_real)  # zero-initialized B; the two halves of one batched call may round differently
    assert len(lora.fake_parameters()) == 2 * sum(isinstance(m, LoRALayer) for m in lora.fake.modules())


@pytest.mark.parametrize("mode", ["full", "lora"])
def test_in_place_optimizer_steps_are_seen_by_the_generator_phase(mode):
    engine, G, z, noise, sigma = _setup(mode)
    opt = torch.optim.Adam(engine.fake_parameters(), lr=1e-2)
    x0 = G(z).detach()
    before = engine.generator_terms(x0, sigma, None, noise)[1].detach()
    _fake_loss(engine, x0, sigma, noise).backward()
    opt.step()
    after = engine.generator_terms(x0, sigma, None, noise)[1].detach()
    assert not torch.allclose(before, after, atol=1e-5)
    with torch.no_grad():
        _close(after, _plain_fake(engine)(x0 + sigma.reshape(-1, 1, 1, 1) * noise, sigma))


def test_replaced_parameters_are_detected_and_refresh_rebuilds():
    engine, G, z, noise, sigma = _setup("full")
    x = G(z).detach()
    p = next(engine.fake.parameters())
    p.data = p.data.clone()
    with pytest.raises(ValueError, match="fake score.*refresh"):
        engine.generator_terms(x, sigma, None, noise)
    engine.refresh()
    engine.generator_terms(x, sigma, None, noise)
    lora, *_ = _setup("lora")
    q = next(lora.teacher.parameters())
    q.data = q.data.clone()
    with pytest.raises(ValueError, match="teacher.*refresh"):
        lora.generator_terms(x, sigma, None, noise)


@pytest.mark.parametrize("mode", ["full", "lora"])
def test_replacement_by_assignment_and_of_buffers_is_detected(mode):
    engine, G, z, noise, sigma = _setup(mode)
    x = G(z).detach()
    engine.generator_terms(x, sigma, None, noise)
    # a new Parameter on the same storage still shares it: not an error
    conv = next(m for m in engine.teacher.modules() if isinstance(m, nn.Conv2d))
    conv.weight = nn.Parameter(conv.weight.data, requires_grad=conv.weight.requires_grad)
    engine.generator_terms(x, sigma, None, noise)
    # load_state_dict(assign=True) puts new tensors in the slots: the views would run on the old ones
    state = {k: v.clone() for k, v in engine.teacher.state_dict().items()}
    engine.teacher.load_state_dict(state, assign=True)
    with pytest.raises(ValueError, match="teacher.*refresh"):
        engine.generator_terms(x, sigma, None, noise)
    engine.refresh()
    engine.generator_terms(x, sigma, None, noise)
    # a replaced buffer is caught as well
    engine.teacher.register_buffer("extra", torch.zeros(2))
    engine.refresh()
    engine.teacher.extra = torch.ones(2)
    with pytest.raises(ValueError, match="refresh"):
        engine.generator_terms(x, sigma, None, noise)


def test_train_state_follows_the_fake_score_dropout():
    engine, G, z, noise, sigma = _setup("full", dropout=0.5)
    engine.fake.train()
    x = G(z).detach()
    torch.manual_seed(7)
    y_real, y_fake = engine.generator_terms(x, sigma, None, noise)
    x_t = x + sigma.reshape(-1, 1, 1, 1) * noise
    torch.manual_seed(7)  # same RNG order as the engine: teacher (eval, no dropout) then fake (train)
    with torch.no_grad():
        ref_real, ref_fake = engine.teacher(x_t, sigma), engine.fake(x_t, sigma)
    _close(y_real, ref_real)
    _close(y_fake, ref_fake)
    engine.fake.eval()
    a = engine.generator_terms(x, sigma, None, noise)[1]
    b = engine.generator_terms(x, sigma, None, noise)[1]
    torch.testing.assert_close(a, b, rtol=0, atol=0)
    with torch.no_grad():
        _close(a, engine.fake(x_t, sigma))


@pytest.mark.parametrize("mode", ["full", "lora"])
def test_labels_and_keyword_conditioning(mode):
    torch.manual_seed(0)
    teacher = EDMDenoiser(SmallUNet(label_dim=4, cond_dim=5)).to(F64)
    engine = ScoreEngine(teacher, mode=mode, lora_rank=2)
    if mode == "lora":
        randomize_lora(engine.fake.net)
    else:
        with torch.no_grad():
            for p in engine.fake.parameters():
                p.add_(0.05)
    fake = _plain_fake(engine)
    x = torch.randn(3, 3, 8, 8, dtype=F64)
    noise = torch.randn(3, 3, 8, 8, dtype=F64)
    sigma = torch.tensor([0.1, 1.0, 10.0], dtype=F64)
    labels = torch.eye(4, dtype=F64)[[0, 1, 3]]
    ctx = torch.randn(3, 5, dtype=F64)
    y_real, y_fake = engine.generator_terms(x, sigma, labels, noise, context=ctx)
    x_t = x + sigma.reshape(-1, 1, 1, 1) * noise
    with torch.no_grad():
        _close(y_real, teacher(x_t, sigma, labels, context=ctx))
        _close(y_fake, fake(x_t, sigma, labels, context=ctx))
        y_fake_only = engine.fake_score_forward(x_t, sigma, labels, context=ctx)
        _close(y_fake_only, fake(x_t, sigma, labels, context=ctx))
    other = engine.generator_terms(x, sigma, torch.eye(4, dtype=F64)[[2, 2, 2]], noise, context=ctx)[0]
    assert not torch.allclose(y_real, other)


# Autocast leaves float64 alone, so bf16 results are measured against the float64 evaluation of the same
# networks. SmallUNet has six autocast layers (emb, conv_in, down, mid, proj, conv_out) from input to output:
# each rounds its inputs and its output to bfloat16 (12 roundings of values of the output's size, EDM
# preconditioning keeping the activations O(1)); the input gradient goes back through the same six layers and
# the SiD loss's gradient (another 12), and that gradient is driven by y_real - y_fake, a fraction of either,
# so relative to its own largest value it counts those 24 roundings with a cancellation factor up to ~3 (64).
# Per generator term: y_real, y_fake, d loss / d x_g. A wrong network or formula is off at O(1) of the value.
BF16_ROUNDINGS = (12, 12, 64)


def _float64_generator_terms(engine, x, sigma, noise):
    """(y_real, y_fake, d loss / d x) of float64 copies of the engine's networks: the exact values that a bf16
    evaluation is compared with."""
    teacher = copy.deepcopy(engine.teacher).to(F64)
    fake = copy.deepcopy(_plain_fake(engine)).to(F64)
    x = x.detach().to(F64).requires_grad_()
    sigma = sigma.to(F64)
    x_t = x + sigma.reshape(-1, 1, 1, 1) * noise.to(F64)
    y_real, y_fake = teacher(x_t, sigma), fake(x_t, sigma)
    (g,) = torch.autograd.grad(sidfast.sid_generator_loss(y_real, y_fake, x), x)
    return y_real.detach(), y_fake.detach(), g


def _assert_bf16_close(got, exact, roundings):
    """``got`` (a bf16 autocast evaluation) within ``roundings`` bfloat16 roundings of the largest exact
    value."""
    bound = rounding_bound(torch.bfloat16, exact.abs().max().item(), roundings)
    assert (got.to(F64) - exact).abs().max().item() <= bound


@pytest.mark.parametrize("mode", ["full", "lora"])
def test_bf16_autocast_matches_eager_autocast_and_returns_fp32(mode):
    engine, G, z, noise, sigma = _setup(mode, dtype=torch.float32, amp_dtype=torch.bfloat16)
    x = G(z).detach().requires_grad_()
    y_real, y_fake = engine.generator_terms(x, sigma, None, noise)
    assert y_real.dtype == y_fake.dtype == torch.float32
    (g,) = torch.autograd.grad(sidfast.sid_generator_loss(y_real, y_fake, x), x)
    x_ref = x.detach().clone().requires_grad_()
    x_t = x_ref + sigma.reshape(-1, 1, 1, 1) * noise
    with torch.autocast("cpu", dtype=torch.bfloat16):
        r, f = engine.teacher(x_t, sigma), _plain_fake(engine)(x_t, sigma)
    (g_ref,) = torch.autograd.grad(sidfast.sid_generator_loss(r.float(), f.float(), x_ref), x_ref)
    exact = _float64_generator_terms(engine, x, sigma, noise)
    # the engine and eager autocast (which batches otherwise) both within bf16 accuracy of the exact values
    for results in ((y_real, y_fake, g), (r, f, g_ref)):
        for got, want, roundings in zip(results, exact, BF16_ROUNDINGS):
            _assert_bf16_close(got, want, roundings)
    # autocast really ran: an fp32 evaluation would be within a few fp32 roundings of the exact values
    assert (y_real.to(F64) - exact[0]).abs().max() > rounding_bound(torch.float32, exact[0].abs().max(), 1000)


@pytest.mark.parametrize("mode", ["full", "lora"])
def test_channels_last_gives_the_same_result(mode):
    engine, G, z, noise, sigma = _setup(mode, channels_last=True)
    assert engine.teacher.network.conv_in.weight.is_contiguous(memory_format=torch.channels_last)
    x = G(z).detach().requires_grad_()
    y_real, y_fake = engine.generator_terms(x, sigma, None, noise)
    (g,) = torch.autograd.grad((y_real - y_fake).square().sum(), x)
    x_ref = x.detach().clone().requires_grad_()
    x_t = x_ref + sigma.reshape(-1, 1, 1, 1) * noise
    r, f = engine.teacher(x_t.contiguous(), sigma), _plain_fake(engine)(x_t.contiguous(), sigma)
    (g_ref,) = torch.autograd.grad((r - f).square().sum(), x_ref)
    _close(y_real, r)
    _close(y_fake, f)
    _close(g, g_ref)


def test_diffusers_teacher_in_both_modes():
    from sidfast.models.denoiser import DiffusersDenoiser
    from sidfast.schedules import VPSchedule

    unet = tiny_diffusers_unet().to(F64)
    teacher = DiffusersDenoiser(unet, VPSchedule.linear(), "eps")
    x = torch.randn(2, 3, 8, 8, dtype=F64)
    noise = torch.randn(2, 3, 8, 8, dtype=F64)
    sigma = torch.tensor([0.3, 3.0], dtype=F64)
    for mode in ("full", "lora"):
        engine = ScoreEngine(teacher, mode=mode, lora_rank=4)
        if mode == "lora":
            randomize_lora(engine.fake.net)
        else:  # a fake score equal to the teacher would leave a gradient of rounding errors only
            with torch.no_grad():
                for p in engine.fake.parameters():
                    p.add_(0.05 * torch.randn_like(p))
        xg = x.clone().requires_grad_()
        y_real, y_fake = engine.generator_terms(xg, sigma, None, noise)
        (g,) = torch.autograd.grad(sidfast.sid_generator_loss(y_real, y_fake, xg), xg)
        xr = x.clone().requires_grad_()
        x_t = xr + sigma.reshape(-1, 1, 1, 1) * noise
        r, f = teacher(x_t, sigma), _plain_fake(engine)(x_t, sigma)
        (g_ref,) = torch.autograd.grad(sidfast.sid_generator_loss(r, f, xr), xr)
        _close(y_real, r)
        _close(y_fake, f)
        _close(g, g_ref)


def test_argument_errors():
    torch.manual_seed(0)
    net = SmallUNet()
    with pytest.raises(ValueError, match="mode"):
        ScoreEngine(net, mode="half")
    with pytest.raises(ValueError, match="fake=None"):
        ScoreEngine(net, SmallUNet(), mode="lora")
    teacher = EDMDenoiser(net)
    with pytest.raises(ValueError, match="another network"):
        ScoreEngine(teacher, LoRAFakeScore(EDMDenoiser(SmallUNet()), rank=2), mode="lora")
    own = LoRAFakeScore(teacher, rank=2)
    engine = ScoreEngine.over(teacher, own)
    assert engine.mode == "lora" and engine.fake is own and ScoreEngine.over(teacher, None).mode == "full"
    with pytest.raises(ValueError, match="separate"):
        ScoreEngine(teacher, teacher)
    with pytest.raises(ValueError, match="amp_dtype"):
        ScoreEngine(net, amp_dtype=torch.float64)
    with pytest.raises(ValueError, match="graphs"):
        ScoreEngine(net, graphs="yes")
    engine = ScoreEngine(net)
    x, sigma = torch.randn(2, 3, 8, 8), torch.ones(2)
    with pytest.raises(TypeError, match="noise must be a torch.Tensor"):
        engine.generator_terms(x, sigma, None, 0.5)
    with pytest.raises(ValueError, match="shape"):
        engine.generator_terms(x, sigma, None, torch.randn(2, 3, 8, 4))
    with pytest.raises(ValueError, match="sigma"):
        engine.generator_terms(x, torch.ones(3), None, torch.randn_like(x))
    with pytest.raises(ValueError, match="labels"):
        engine.generator_terms(x, sigma, torch.ones(3, 4), torch.randn_like(x))
    with pytest.raises(ValueError, match="CUDA"):
        ScoreEngine(net, graphs=True).generator_terms(x.requires_grad_(), sigma, None, torch.randn_like(x))
    lora = ScoreEngine(SmallUNet(cond_dim=5), mode="lora", lora_rank=2)
    with pytest.raises(ValueError, match="context.*doubled"):
        lora.generator_terms(x, sigma, None, torch.randn_like(x), context=torch.randn(1, 5))


def test_network_output_mismatch_names_the_network():
    class Wrong(nn.Module):
        def __init__(self):
            super().__init__()
            self.lin = nn.Linear(2, 2)

        def forward(self, x, sigma, class_labels=None):
            return x[:, :2]

    engine = ScoreEngine(SmallUNet(), Wrong())
    x = torch.randn(2, 3, 8, 8)
    with pytest.raises(ValueError, match="fake score.*shape"):
        engine.generator_terms(x, torch.ones(2), None, torch.randn_like(x))
    engine = ScoreEngine(Wrong(), mode="lora", lora_rank=1)
    with pytest.raises(ValueError, match="fake score.*shape"):
        engine.generator_terms(x, torch.ones(2), None, torch.randn_like(x))


# torch.compile's default backend imports torch.utils.mkldnn, whose ScriptModules use torch's own deprecated
# torch.jit.script_method: 14 DeprecationWarnings from torch, not from sidfast
torch_compile_warnings = pytest.mark.filterwarnings(
    "ignore:`torch.jit.script_method` is deprecated:DeprecationWarning")


@pytest.mark.slow
@torch_compile_warnings
@pytest.mark.parametrize("mode", ["full", "lora"])
def test_compiled_engine_equals_eager(mode):
    engine, G, z, noise, sigma = _setup(mode, compile=True, batch=2)
    eager, *_ = _setup(mode, batch=2)
    for pe, pc in zip(eager.fake_parameters(), engine.fake_parameters()):
        assert torch.equal(pe, pc)
    x = G(z).detach()
    for eng in (engine, eager):
        xg = x.clone().requires_grad_()
        y_real, y_fake = eng.generator_terms(xg, sigma, None, noise)
        (g,) = torch.autograd.grad(sidfast.sid_generator_loss(y_real, y_fake, xg), xg)
        eng.result = (y_real.detach(), y_fake.detach(), g)
        _fake_loss(eng, x, sigma, noise).backward()
    for a, b in zip(engine.result, eager.result):
        _close(a, b)
    for pe, pc in zip(eager.fake_parameters(), engine.fake_parameters()):
        _close(pc.grad, pe.grad)


def test_generator_terms_evaluate_at_x_g_plus_sigma_noise():
    engine, G, z, noise, sigma = _setup("lora")
    x = G(z).detach()
    a = engine.generator_terms(x, sigma, None, noise)
    b = engine.generator_terms(x + sigma.reshape(-1, 1, 1, 1) * noise, sigma, None, torch.zeros_like(x))
    for u, v in zip(a, b):
        torch.testing.assert_close(u, v, rtol=0, atol=0)


def _seeds(seed, n, device="cpu"):
    """The seeds that the next ``n`` in-kernel noise draws take after ``torch.manual_seed(seed)``."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        return [draw_seed(device) for _ in range(n)]


@pytest.mark.parametrize("mode", ["full", "lora"])
def test_generator_terms_without_noise_draw_it_in_the_kernel(mode):
    """noise=None: x_t = x_g + sigma * eps with eps drawn inside add_noise's kernel; equal (values and G's
    gradients) to passing that eps (``regenerate_noise`` of the seed drawn), since both round sigma * eps and
    the sum once and a = 1 passes x_g and its gradient through exactly: bitwise, in the training dtype."""
    engine, G, z, _, sigma = _setup(mode, dtype=torch.float32)
    (seed,) = _seeds(11, 1)
    eps = regenerate_noise(seed, z.shape)
    results = []
    for noise in (None, eps):
        G.zero_grad(set_to_none=True)
        torch.manual_seed(11)
        x_g = G(z)
        y_real, y_fake = engine.generator_terms(x_g, sigma, None, noise)
        sidfast.sid_generator_loss(y_real, y_fake, x_g).backward()
        results.append((y_real, y_fake, *[p.grad for p in G.parameters()]))
    for a, b in zip(*results):
        torch.testing.assert_close(a, b, rtol=0, atol=0)


# ---------- CUDA graphs (GPU only) ----------


# ---- SiDA: the discriminator logits with f_psi, in both phases ----

def _tap_layer(engine):
    return "down"  # SmallUNet's strided convolution: the end of its encoder


@pytest.mark.parametrize("mode", ["full", "lora"])
@pytest.mark.parametrize("graphed", [False, True])
def test_logits_come_with_f_psi_in_both_phases(mode, graphed, monkeypatch):
    from sidfast.models.discriminator import DiscriminatorPass, DiscriminatorTap

    if graphed:
        graphs_on_cpu(monkeypatch, StaticGradGraphs())
    engine, G, z, noise, sigma = _setup(mode, batch=4)
    engine.attach_discriminator(_tap_layer(engine))
    plain = copy.deepcopy(_plain_fake(engine))
    tap = DiscriminatorTap(plain, _tap_layer(engine))
    x = G(z).detach()
    # generator phase: (y_real, y_fake, D) at x_t, gradients to x_g only
    xg = x.clone().requires_grad_()
    y_real, y_fake, logits = engine.generator_terms_with_logits(xg, sigma, None, noise)
    (logits.sum() + y_fake.sum()).backward()
    xe = x.clone().requires_grad_()
    x_t = xe + sigma.reshape(-1, 1, 1, 1) * noise
    want_y, want_d = tap.forward_with_logits(x_t, sigma)
    (want_d.sum() + want_y.sum()).backward()
    assert logits.shape == (4, 1, 4, 4)
    _close(y_real, engine.teacher(x_t, sigma).detach())
    _close(y_fake, want_y.detach())
    _close(logits, want_d.detach())
    _close(xg.grad, xe.grad)
    assert all(p.grad is None for p in engine.fake.parameters())
    # fake phase: (f_psi, D_fake, D_real) with gradients into the fake score's trainable parameters
    plain.zero_grad(set_to_none=True)
    real_t = torch.randn_like(x)
    got = engine.fake_score_with_logits(x_t.detach(), real_t, sigma)
    sum(t.square().sum() for t in got).backward()
    want = DiscriminatorPass(tap)(x_t.detach(), sigma, None, real_t)
    for a, b in zip(got, want):
        _close(a, b.detach())
    if mode == "full":  # the merged LoRA network has no trainable factors to compare with
        sum(t.square().sum() for t in want).backward()
        for p, q in zip(engine.fake_parameters(), plain.parameters()):
            _close(p.grad, q.grad)
    else:
        assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in engine.fake_parameters())
    if graphed:
        assert any(k[1][-2] == "logits" for k in engine._graphs)


def test_logits_need_an_attached_discriminator():
    engine, G, z, noise, sigma = _setup("full")
    with pytest.raises(RuntimeError, match="attach_discriminator"):
        engine.generator_terms_with_logits(G(z), sigma, None, noise)
