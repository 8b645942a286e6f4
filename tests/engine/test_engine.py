"""sidfast.engine.scores.ScoreEngine against plain eager evaluation of the same networks (values and gradients).

CPU tests run the eager engine (and torch.compile once, marked slow), and the graph cache with stand-ins for
the CUDA calls; the CUDA-graph tests at the end need a GPU.
"""
import copy
import gc

import pytest
import torch
from torch import nn

import sidfast
from sidfast import reference as R
from sidfast.models.denoiser import EDMDenoiser
from sidfast.engine.scores import ScoreEngine
from sidfast.models.lora import LoRAFakeScore, LoRALayer, merge_lora
from sidfast.ops.noise import draw_seed, regenerate_noise
from utils import (SmallUNet, StandInGraphs, StaticGradGraphs, assert_float64_close as _close,
                   graphs_on_cpu, randomize_lora, requires_cuda, rounding_bound, tiny_diffusers_unet)

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



def _stand_in_pair(mode, monkeypatch):
    """(engine with graphs through the stand-in capture that has CUDA graphs' replay semantics, an eager copy
    of it, G, z, noise, sigma), batch 4."""
    graphs_on_cpu(monkeypatch, StaticGradGraphs())
    graphed, G, z, noise, sigma = _setup(mode, batch=4)
    eager = copy.deepcopy(graphed)
    eager.graphs = False
    eager.refresh()
    return graphed, eager, G, z, noise, sigma


@pytest.mark.parametrize("mode", ["full", "lora"])
def test_replayed_gradients_accumulate_like_eager(mode, monkeypatch):
    """A replay's gradients live in static buffers: fake-score gradients accumulated over micro-batches, and
    an input's .grad, must not alias them (the next replay would overwrite them)."""
    graphed, eager, G, z, noise, sigma = _stand_in_pair(mode, monkeypatch)
    x = G(z).detach()
    for eng in (graphed, eager):  # two micro-batches with different inputs, gradients accumulated
        _fake_loss(eng, x, sigma, noise).backward()
        _fake_loss(eng, x.flip(0), sigma, noise).backward()
    assert len(graphed._graphs) and not len(eager._graphs)
    for a, b in zip(graphed.fake_parameters(), eager.fake_parameters()):
        _close(a.grad, b.grad)
    x_t = [(x + sigma.reshape(-1, 1, 1, 1) * noise * k).requires_grad_() for k in (1.0, 0.5)]
    for xt in x_t:  # generator_terms at x_g = x_t, noise 0: autograd reaches the leaf x_t
        y_real, y_fake = graphed.generator_terms(xt, sigma, None, torch.zeros_like(xt))
        sidfast.sid_generator_loss(y_real, y_fake, xt.detach()).backward()
    xe = x_t[0].detach().requires_grad_()
    y_real, y_fake = eager.generator_terms(xe, sigma, None, torch.zeros_like(xe))
    sidfast.sid_generator_loss(y_real, y_fake, xe.detach()).backward()
    # not overwritten by the second replay
    _close(x_t[0].grad, xe.grad)


@pytest.mark.parametrize("mode", ["full", "lora"])
def test_graph_replays_see_fresh_kernel_noise(mode, monkeypatch):
    """The noise is drawn before the captured graph, from a new seed on every call: consecutive replays of one
    graph evaluate different noise, each equal to the eager engine given that call's eps explicitly."""
    graphed, eager, G, z, _, sigma = _stand_in_pair(mode, monkeypatch)
    x = G(z).detach()
    seeds = _seeds(5, 3)
    torch.manual_seed(5)
    replays = []
    for _ in seeds:
        xg = x.clone().requires_grad_()
        y_real, y_fake = graphed.generator_terms(xg, sigma)
        sidfast.sid_generator_loss(y_real, y_fake, xg).backward()  # before the next replay, as the rules ask
        replays.append((y_real, y_fake, xg.grad))
    assert len(graphed._graphs) == 1  # one capture, three replays
    for (y_real, y_fake, grad), seed in zip(replays, seeds):
        xe = x.clone().requires_grad_()
        want = eager.generator_terms(xe, sigma, None, regenerate_noise(seed, x.shape).to(F64))
        sidfast.sid_generator_loss(*want, xe).backward()
        for got, ref in zip((y_real, y_fake, grad), (*want, xe.grad)):
            _close(got, ref)
    for first, second in zip(replays, replays[1:]):
        assert not torch.allclose(first[0], second[0])


@pytest.mark.parametrize("mode", ["full", "lora"])
def test_graph_bookkeeping_with_a_stand_in_capture(mode, monkeypatch):
    stand_in = StandInGraphs()
    graphs_on_cpu(monkeypatch, stand_in)
    engine, G, z, noise, sigma = _setup(mode, batch=4)
    x = G(z).detach()
    # x needs no grad: eager, no capture
    ref = [t.detach() for t in engine.generator_terms(x, sigma, None, noise)]
    xg = x.clone().requires_grad_()
    y_real, y_fake = engine.generator_terms(xg, sigma, None, noise)
    assert len(stand_in.captures) == 1  # the same key replays
    fn, sample = stand_in.captures[0]
    assert not isinstance(fn, nn.Module) and sample[0] == (x.shape, True) and sample[1] == ((4,), False)
    torch.testing.assert_close(y_real, ref[0], rtol=0, atol=0)
    sidfast.sid_generator_loss(y_real, y_fake, xg).backward()
    assert xg.grad is not None and all(p.grad is None for p in engine.teacher.parameters())
    engine.generator_terms(xg[:2], sigma[:2], None, noise[:2])  # new batch size: a new capture
    assert len(stand_in.captures) == 2
    _fake_loss(engine, x, sigma, noise).backward()
    surface, sample = stand_in.captures[2]
    assert isinstance(surface, nn.Module) and surface.training == engine.fake.training
    assert {id(p) for p in surface.parameters()} == {id(p) for p in engine.fake.parameters()}
    assert all(p.grad is not None for p in engine.fake_parameters())
    engine.fake.eval()
    _fake_loss(engine, x, sigma, noise)
    assert len(stand_in.captures) == 4  # train/eval state is part of the key
    p = engine.fake_parameters()[0]
    p.data = p.data.clone()
    with pytest.raises(ValueError, match="refresh"):
        _fake_loss(engine, x, sigma, noise)
    engine.refresh()
    _fake_loss(engine, x, sigma, noise)
    strict, G, z, noise, sigma = _setup(mode, batch=4, recapture=False)
    strict.generator_terms(G(z), sigma, None, noise)
    with pytest.raises(ValueError, match="captured graph"):
        strict.generator_terms(G(z)[:2], sigma[:2], None, noise[:2])
    strict.reset_graphs()
    strict.generator_terms(G(z)[:2], sigma[:2], None, noise[:2])


def test_capture_and_replay_run_under_the_inputs_device(monkeypatch):
    """make_graphed_callables captures on the current CUDA device: networks on cuda:1 while cuda:0 is current
    would be captured empty. Capture and replay must run under the inputs' device."""
    seen = []
    static = StaticGradGraphs()

    def capture(callable_, sample, **kw):
        seen.append(("capture", guard.current))
        replay = static(callable_, sample, **kw)

        def recorded(*args):
            seen.append(("replay", guard.current))
            return replay(*args)

        return recorded

    guard = graphs_on_cpu(monkeypatch, capture)
    engine, G, z, noise, sigma = _setup("full", batch=2)
    x = G(z).detach()
    for _ in range(2):
        xg = x.clone().requires_grad_()
        sidfast.sid_generator_loss(*engine.generator_terms(xg, sigma, None, noise), xg).backward()
        _fake_loss(engine, x, sigma, noise).backward()
    assert [kind for kind, _ in seen] == ["capture", "replay", "capture", "replay", "replay", "replay"]
    assert all(device == x.device for _, device in seen)


@pytest.mark.parametrize("mode", ["full", "lora"])
def test_a_replay_before_the_previous_backward_raises(mode, monkeypatch):
    """A replay overwrites the activations that the previous replay saved for its backward (the stand-in's
    backward, like a graph's, reads the latest replay's): evaluating a phase twice before the first backward
    must raise, not return wrong gradients."""
    engine, eager, G, z, noise, sigma = _stand_in_pair(mode, monkeypatch)
    x = G(z).detach()
    grads = []
    for eng in (engine, eager):
        xg = x.clone().requires_grad_()
        y_real, y_fake = eng.generator_terms(xg, sigma, None, noise)
        if eng is engine:  # a second noise level before the first backward
            with pytest.raises(RuntimeError, match="generator phase.*before the backward"):
                eng.generator_terms(x.clone().requires_grad_(), sigma, None, 0.5 * noise)
        sidfast.sid_generator_loss(y_real, y_fake, xg).backward()
        grads.append(xg.grad)
    _close(grads[0], grads[1])  # the first backward is intact
    xg = x.clone().requires_grad_()
    engine.generator_terms(xg, sigma, None, noise)  # outputs dropped unused: no backward pending
    y = engine.generator_terms(xg, sigma, None, noise)
    x_t = x + sigma.reshape(-1, 1, 1, 1) * noise
    pred = engine.fake_score_forward(x_t, sigma)  # another graph, its own memory: no wait for y's backward
    with pytest.raises(RuntimeError, match="fake phase.*before the backward"):
        engine.fake_score_forward(x_t, sigma)
    pred.sum().backward()
    engine.fake_score_forward(x_t, sigma)
    with pytest.raises(RuntimeError, match="generator phase"):
        engine.generator_terms(xg, sigma, None, noise)
    del y
    engine.generator_terms(xg, sigma, None, noise)


def test_a_shared_pool_waits_for_every_pending_backward(monkeypatch):
    capture = StaticGradGraphs()
    graphs_on_cpu(monkeypatch, capture)
    monkeypatch.setattr(torch.cuda, "graph_pool_handle", lambda: "the shared pool")
    for share_pool in (False, True):
        engine, G, z, noise, sigma = _setup("full", batch=4, share_pool=share_pool)
        x = G(z).detach()
        pred = engine.fake_score_forward(x + sigma.reshape(-1, 1, 1, 1) * noise, sigma)
        xg = x.clone().requires_grad_()
        if share_pool:  # the generator graph would reuse memory the fake graph's backward still needs
            with pytest.raises(RuntimeError, match="shared pool"):
                engine.generator_terms(xg, sigma, None, noise)
            pred.sum().backward()
        sidfast.sid_generator_loss(*engine.generator_terms(xg, sigma, None, noise), xg).backward()
    assert capture.pools == [None, None, "the shared pool", "the shared pool"]


def test_the_graph_cache_keeps_the_most_recently_used_graphs(monkeypatch):
    capture = StaticGradGraphs()
    graphs_on_cpu(monkeypatch, capture)
    engine, G, z, noise, sigma = _setup("full", batch=4, max_graphs=2)
    x = G(z).detach()

    def call(b):
        xg = x[:b].clone().requires_grad_()
        sidfast.sid_generator_loss(*engine.generator_terms(xg, sigma[:b], None, noise[:b]), xg).backward()

    def held():  # batch sizes of the graphs held, least recently used first
        return [key[2][0][0][0] for key in engine._graphs]

    call(4)
    call(3)
    call(4)  # a replay: 4 becomes the most recently used
    assert len(capture.made) == 2 and held() == [3, 4]
    # the cache itself frees a dropped graph's state (held by a class, which only the cycle collector frees)
    gc.disable()
    try:
        call(2)  # a third variant: 3 is dropped, and its graph freed
    finally:
        gc.enable()
    assert held() == [4, 2]
    assert capture.made[1]() is None and capture.made[0]() is not None
    call(3)  # captured anew
    assert len(capture.made) == 4 and held() == [2, 3]
    with pytest.raises(ValueError, match="max_graphs"):
        ScoreEngine(engine.teacher, max_graphs=0)


# ---------- CUDA graphs (GPU only) ----------

def _gpu_pair(mode, device="cuda", dtype=F64, **kw):
    engine, G, z, noise, sigma = _setup(mode, device=device, dtype=dtype, **kw)
    eager, *_ = _setup(mode, device=device, dtype=dtype, graphs=False)
    return engine, eager, G, z, noise, sigma


@requires_cuda
@torch_compile_warnings
@pytest.mark.parametrize("compile_", [False, True])
@pytest.mark.parametrize("mode", ["full", "lora"])
def test_graphs_equal_eager_and_replay_sees_weight_updates(mode, compile_):
    torch.backends.cuda.matmul.allow_tf32 = False
    torch.backends.cudnn.allow_tf32 = False
    engine, eager, G, z, noise, sigma = _gpu_pair(mode, compile=compile_)
    opts = [torch.optim.Adam(e.fake_parameters(), lr=1e-3) for e in (engine, eager)]
    x0 = G(z).detach()
    for step in range(3):
        results = []
        for eng, opt in zip((engine, eager), opts):
            xg = x0.clone().requires_grad_()
            y_real, y_fake = eng.generator_terms(xg, sigma, None, noise)
            (g,) = torch.autograd.grad(sidfast.sid_generator_loss(y_real, y_fake, xg), xg)
            opt.zero_grad(set_to_none=True)
            _fake_loss(eng, x0, sigma, noise).backward()
            grads = [p.grad.clone() for p in eng.fake_parameters()]
            opt.step()  # in place: the captured graphs must see the new weights at the next replay
            results.append((y_real.detach(), y_fake.detach(), g, grads))
        (a_real, a_fake, a_g, a_grads), (b_real, b_fake, b_g, b_grads) = results
        _close(a_real, b_real)
        _close(a_fake, b_fake)
        _close(a_g, b_g)
        for ga, gb in zip(a_grads, b_grads):
            _close(ga, gb)
    assert any(k[0] == "generator" for k in engine._graphs) and any(k[0] == "fake" for k in engine._graphs)


@requires_cuda
def test_graphs_batch_size_change_recaptures_or_raises():
    engine, G, z, noise, sigma = _setup("full", device="cuda", batch=4)
    x = G(z).detach().requires_grad_()
    engine.generator_terms(x, sigma, None, noise)
    engine.generator_terms(x[:2], sigma[:2], None, noise[:2])
    assert len([k for k in engine._graphs if k[0] == "generator"]) == 2
    strict, *_ = _setup("full", device="cuda", batch=4, recapture=False)
    strict.generator_terms(x, sigma, None, noise)
    with pytest.raises(ValueError, match="captured graph"):
        strict.generator_terms(x[:2], sigma[:2], None, noise[:2])


@requires_cuda
def test_graphs_with_bf16_autocast_and_channels_last():
    engine, eager, G, z, noise, sigma = _gpu_pair("lora", dtype=torch.float32, amp_dtype=torch.bfloat16,
                                                  channels_last=True)
    eager.amp_dtype = torch.bfloat16
    x = G(z).detach()
    exact = _float64_generator_terms(eager, x, sigma, noise)
    for eng in (engine, eager):
        xg = x.clone().requires_grad_()
        y_real, y_fake = eng.generator_terms(xg, sigma, None, noise)
        assert y_real.dtype == torch.float32
        (g,) = torch.autograd.grad(sidfast.sid_generator_loss(y_real, y_fake, xg), xg)
        for got, want, roundings in zip((y_real, y_fake, g), exact, BF16_ROUNDINGS):
            _assert_bf16_close(got, want, roundings)


@requires_cuda
@pytest.mark.parametrize("mode", ["full", "lora"])
def test_shared_pool_iterations_equal_eager(mode):
    torch.backends.cuda.matmul.allow_tf32 = False
    torch.backends.cudnn.allow_tf32 = False
    engine, eager, G, z, noise, sigma = _gpu_pair(mode, share_pool=True)
    for it in range(2):  # the SiD order: fake forward + backward, then generator forward + backward
        # other inputs in the second iteration: fake gradients accumulate g1 + g2 (a replay's static gradient
        # buffer kept as p.grad would give 2 g2, which equal inputs could not tell apart)
        x0 = G(z).detach().flip(0) if it else G(z).detach()
        outs = []
        for eng in (engine, eager):
            _fake_loss(eng, x0, sigma, noise).backward()
            xg = x0.clone().requires_grad_()
            y_real, y_fake = eng.generator_terms(xg, sigma, None, noise)
            (g,) = torch.autograd.grad(sidfast.sid_generator_loss(y_real, y_fake, xg), xg)
            outs.append((y_real, y_fake, g, [p.grad.clone() for p in eng.fake_parameters()]))
        for a, b in zip(outs[0][:3], outs[1][:3]):
            _close(a, b)
        for a, b in zip(outs[0][3], outs[1][3]):
            _close(a, b)


@requires_cuda
def test_graph_replays_draw_fresh_dropout_masks():
    engine, G, z, noise, sigma = _setup("full", device="cuda", dropout=0.3)
    engine.fake.train()
    x = G(z).detach()
    outs = [engine.generator_terms(x.clone().requires_grad_(), sigma, None, noise)[1].detach()
            for _ in range(3)]
    assert any(k[0] == "generator" for k in engine._graphs)
    assert not torch.allclose(outs[1], outs[2])


@requires_cuda(condition=torch.cuda.device_count() >= 2, reason="needs a second CUDA device")
@pytest.mark.parametrize("mode", ["full", "lora"])
def test_graphs_on_a_device_that_is_not_the_current_one(mode):
    torch.backends.cuda.matmul.allow_tf32 = False
    torch.backends.cudnn.allow_tf32 = False
    torch.cuda.set_device(0)
    engine, eager, G, z, noise, sigma = _gpu_pair(mode, device="cuda:1")
    for it in range(2):  # capture, then replay with other inputs
        x0 = G(z).detach().flip(0) if it else G(z).detach()
        outs = []
        for eng in (engine, eager):
            _fake_loss(eng, x0, sigma, noise).backward()
            xg = x0.clone().requires_grad_()
            y_real, y_fake = eng.generator_terms(xg, sigma, None, noise)
            (g,) = torch.autograd.grad(sidfast.sid_generator_loss(y_real, y_fake, xg), xg)
            outs.append((y_real, y_fake, g, [p.grad.clone() for p in eng.fake_parameters()]))
        for a, b in zip(outs[0][:3], outs[1][:3]):
            _close(a, b)
        for a, b in zip(outs[0][3], outs[1][3]):
            _close(a, b)
    assert torch.cuda.current_device() == 0
    assert len(engine._graphs) == 2 and all(key[2][0][2] == torch.device("cuda:1") for key in engine._graphs)


@requires_cuda
def test_real_graphs_refuse_a_replay_before_the_backward_and_stay_bounded():
    engine, G, z, noise, sigma = _setup("full", device="cuda", batch=4, max_graphs=1)
    x = G(z).detach()
    xg = x.clone().requires_grad_()
    y_real, y_fake = engine.generator_terms(xg, sigma, None, noise)
    with pytest.raises(RuntimeError, match="before the backward"):
        engine.generator_terms(x.clone().requires_grad_(), sigma, None, noise)
    sidfast.sid_generator_loss(y_real, y_fake, xg).backward()
    engine.generator_terms(x.clone().requires_grad_(), sigma, None, noise)  # dropped unused: nothing pending
    engine.generator_terms(x.clone().requires_grad_(), sigma, None, noise)
    _fake_loss(engine, x, sigma, noise).backward()
    assert [key[0] for key in engine._graphs] == ["fake"]


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
