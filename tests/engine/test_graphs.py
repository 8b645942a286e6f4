"""sidfast.engine.graphs: the engine's CUDA-graph cache (capture, replay, bookkeeping, a shared memory pool,
the most-recently-used bound) with stand-ins for the CUDA calls on CPU, and real CUDA graphs on a GPU.
The engine set-up is test_engine's (same folder; pytest's default import mode puts it on sys.path)."""
import copy
import gc

import pytest
import torch
from torch import nn

import sidfast
from sidfast.engine.scores import ScoreEngine
from sidfast.ops.noise import regenerate_noise
from test_engine import (BF16_ROUNDINGS, F64, _assert_bf16_close, _fake_loss, _float64_generator_terms, _seeds,
                         _setup, torch_compile_warnings)
from utils import (StandInGraphs, StaticGradGraphs, assert_float64_close as _close, graphs_on_cpu, requires_cuda,
                   requires_gpus)


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


@requires_gpus(2)
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
