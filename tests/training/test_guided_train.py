"""The trainer with SiD-LSG guidance, class and text conditioning, a few-step generator and flow teachers."""
import copy
import math

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from sidfast import guidance, reference
from sidfast.models.denoiser import DiffusersDenoiser, EDMDenoiser, FlowDenoiser
from sidfast.engine.scores import ScoreEngine
from sidfast.generator import draw_k_star
from sidfast.models.lora import LoRAFakeScore
from sidfast.reference import weighted_sid_loss
from sidfast.samplers import sample_images
from sidfast.schedules import VPSchedule
from sidfast.training.loop import TrainConfig, distill
from nets import (CLASSES, CondMLP, cond_unet, conditional_nets, conditioner, require_text_components, sd3_transformer,
                  tiny_teacher)
from runs import assert_same_run, quiet, stopped_and_resumed
from utils import assert_float64_close, cuda_marks, float64_network_tolerance, randomize_lora



# ---------------- k = 1 and K = 1 are plain SiD ----------------

@pytest.mark.parametrize("engine,fake_score", [("eager", "full"), ("fused", "full"), ("fused", "lora")])
def test_unit_guidance_and_one_generator_step_train_bitwise_like_plain_sid(tmp_path, engine, fake_score):
    kw = dict(iterations=3, lr=1e-3, engine=engine, fake_score=fake_score, lora_rank=4)
    plain = distill(quiet(run_dir=str(tmp_path / "plain"), **kw), tiny_teacher(CLASSES), log=None)
    unit = distill(quiet(run_dir=str(tmp_path / "unit"), guidance="lsg", cfg=1, cfg_teacher=1, gen_steps=1,
                         step_spacing="flow", renoise="ddim", **kw), tiny_teacher(CLASSES), log=None)
    assert_same_run(plain, unit)


# ---------------- guidance in both phases ----------------

def _record_calls(module, name, calls):
    module.register_forward_pre_hook(lambda m, args: calls.append((name, [a.detach().clone() for a in args])))


@pytest.mark.parametrize("engine", ["eager", "fused"])
def test_lsg_evaluations_are_the_guided_two_call_formula(tmp_path, monkeypatch, engine):
    """At LSG k = 2 the fake score in its step (k1) and teacher (k4) and fake score (k2) in the generator step
    are guidance.guided: one stacked forward over [null; cond] that equals f(none) + k (f(c) - f(none))."""
    import sidfast.training.sid as phases

    teacher, G, fake = conditional_nets()
    calls = []
    _record_calls(teacher, "teacher", calls)
    _record_calls(fake, "fake", calls)
    checked = {"fake step": 0, "generator step": 0}
    null = torch.zeros(1, CLASSES)

    def expect(net, name):
        x2, sigma2, labels2 = next(args for who, args in reversed(calls) if who == name)
        batch = x2.shape[0] // 2
        assert torch.equal(x2[:batch], x2[batch:]) and torch.equal(labels2[:batch], null.expand(batch, -1))
        x_t, sigma, labels = x2[:batch], sigma2[:batch], labels2[batch:]
        with torch.no_grad():
            stacked = guidance.guided(EDMDenoiser(net), x_t, sigma, labels, null, 2.0)
        # one stacked forward against two calls: other batches, so compared in float64 (a hook-free copy, so
        # that its calls are not recorded)
        net64 = copy.deepcopy(net).double()
        net64._forward_pre_hooks.clear()
        x64, sigma64, labels64, null64 = (t.double() for t in (x_t, sigma, labels, null.expand(batch, -1)))
        with torch.no_grad():
            stacked64 = guidance.guided(EDMDenoiser(net64), x64, sigma64, labels64, null64[:1], 2.0)
            two_calls = reference.cfg_combine(net64(x64, sigma64, null64), net64(x64, sigma64, labels64), 2.0)
        assert_float64_close(stacked64, two_calls)
        return stacked, labels

    real_fake_loss = phases.fake_score_loss
    real_sid_loss = phases.sid_generator_loss
    dropped = []

    def fake_loss(pred, *args, **kw):
        expected, labels = expect(fake, "fake")
        assert torch.equal(pred.detach(), expected)
        dropped.append(int((labels.sum(1) == 0).sum()))
        checked["fake step"] += 1
        return real_fake_loss(pred, *args, **kw)

    def sid_loss(y_real, y_fake, x_g, *args, **kw):
        expected_real, labels = expect(teacher, "teacher")
        expected_fake, _ = expect(fake, "fake")
        assert torch.equal(y_real.detach(), expected_real) and torch.equal(y_fake.detach(), expected_fake)
        assert bool((labels.sum(1) == 1).all())  # the generator step keeps every condition
        checked["generator step"] += 1
        return real_sid_loss(y_real, y_fake, x_g, *args, **kw)

    monkeypatch.setattr(phases, "fake_score_loss", fake_loss)
    monkeypatch.setattr(phases, "sid_generator_loss", sid_loss)
    distill(quiet(run_dir=str(tmp_path / "r"), iterations=4, lr=1e-3, engine=engine, guidance="lsg", cfg=2),
            teacher, G, fake, log=None)
    assert checked == {"fake step": 4, "generator step": 4}
    assert sum(dropped) > 0  # condition dropout (p = 0.1) in the fake step, over 32 samples


@pytest.mark.parametrize("mode", ["full", "lora"])
@pytest.mark.parametrize("scale_real,scale_fake",
                         [(2.0, 2.0), (1.0, 0.0), (3.0, 1.0), (1.0, -1.0), (0.0, 1.5)])
def test_engine_guided_terms_equal_the_eager_guided_computation(mode, scale_real, scale_fake):
    torch.manual_seed(0)
    teacher = EDMDenoiser(CondMLP(seed=1).double())
    if mode == "lora":
        fake = randomize_lora(LoRAFakeScore(teacher, rank=4).double())
    else:
        fake = EDMDenoiser(CondMLP(seed=2).double())
    engine = ScoreEngine.over(teacher, fake)
    batch = 5
    x_g = torch.randn(batch, *CondMLP.image_shape, dtype=torch.float64, requires_grad=True)
    sigma = torch.rand(batch, dtype=torch.float64) + 0.5
    noise = torch.randn_like(x_g)
    labels = F.one_hot(torch.arange(batch) % CLASSES, CLASSES).double()
    null = torch.zeros(1, CLASSES, dtype=torch.float64)
    forwards = []
    inner = engine._mirrors[0].view  # the generator phase runs frozen views of the networks
    inner.register_forward_pre_hook(lambda m, args: forwards.append(args[0].shape[0]))
    y_real, y_fake = engine.generator_terms(x_g, sigma, labels, noise=noise, scale_real=scale_real,
                                            scale_fake=scale_fake, null_labels=null)
    if mode == "lora":  # one forward of the shared network, teacher and fake halves of equal size
        rows = 2 if {scale_real, scale_fake} - {0.0, 1.0} else 1
        assert forwards == [2 * rows * batch]
    x_t = x_g + sigma.reshape(-1, 1, 1, 1) * noise
    want_real = guidance.guided(teacher, x_t, sigma, labels, null, scale_real)
    want_fake = guidance.guided(fake, x_t, sigma, labels, null, scale_fake)
    for got, want in ((y_real, want_real), (y_fake, want_fake)):
        torch.testing.assert_close(got, want, **float64_network_tolerance(want))
    grads = torch.autograd.grad((y_real * y_fake).sum(), x_g)[0]
    want_grads = torch.autograd.grad((want_real * want_fake).sum(), x_g)[0]
    torch.testing.assert_close(grads, want_grads, **float64_network_tolerance(want_grads))
    assert all(p.grad is None for p in list(teacher.parameters()) + list(fake.parameters()))
    # the fake score's own step, guided at k1
    x = x_t.detach()
    got = engine.fake_score_forward(x, sigma, labels, scale=scale_fake, null_labels=null)
    want = guidance.guided(fake, x, sigma, labels, null, scale_fake)
    torch.testing.assert_close(got, want, **float64_network_tolerance(want))


def test_engine_guidance_errors():
    teacher = EDMDenoiser(CondMLP().double())
    engine = ScoreEngine(teacher)
    x = torch.randn(2, *CondMLP.image_shape, dtype=torch.float64)
    with pytest.raises(ValueError, match="unconditional"):
        engine.generator_terms(x, 1.0, None, noise=torch.randn_like(x), scale_real=2.0)
    with pytest.raises(ValueError, match="null_labels"):
        engine.fake_score_forward(x, 1.0, torch.eye(CLASSES, dtype=torch.float64)[:2], scale=2.0)


def test_guidance_errors_name_the_options(tmp_path):
    with pytest.raises(ValueError, match="--guidance lsg with --cfg 2 needs a conditional teacher"):
        distill(quiet(run_dir=str(tmp_path / "a"), guidance="lsg", cfg=2), tiny_teacher(0), log=None)
    with pytest.raises(ValueError, match="cfg"):
        quiet(guidance="lsg").validate()
    with pytest.raises(ValueError, match="takes none"):
        quiet(guidance="zero", cfg=2).validate()
    with pytest.raises(ValueError, match="k > 1"):
        quiet(guidance="long", cfg=0.5).validate()
    with pytest.raises(ValueError, match="out of range"):
        distill(quiet(run_dir=str(tmp_path / "b"), num_classes=5), tiny_teacher(CLASSES), log=None)
    with pytest.raises(ValueError, match="--null-class.*diffusers"):
        distill(quiet(run_dir=str(tmp_path / "c"), null_class=2), tiny_teacher(CLASSES), log=None)
    scales = quiet(guidance="lsg", cfg=2, cfg_fake=-1).guidance_scales()
    assert scales == guidance.GuidanceScales(2, -1, -1, 2)


def test_guidance_of_a_teacher_without_label_dropout_is_refused(tmp_path):
    teacher = CondMLP()
    teacher.label_dropout = 0
    with pytest.raises(ValueError, match="--guidance.*label dropout"):
        distill(quiet(run_dir=str(tmp_path / "r"), guidance="long", cfg=2), teacher, log=None)


def test_diffusers_index_labels_guide_with_the_null_class(tmp_path):
    from utils import tiny_diffusers_unet

    unet = tiny_diffusers_unet(channels=1, num_class_embeds=CLASSES + 1)
    teacher = DiffusersDenoiser(unet, VPSchedule.linear(), "eps")
    pristine = copy.deepcopy(teacher)
    cfg = dict(run_dir=str(tmp_path / "r"), iterations=1, batch=2, guidance="lsg", cfg=2)
    with pytest.raises(ValueError, match="null class"):
        distill(quiet(**cfg), copy.deepcopy(teacher), log=None)
    res = distill(quiet(null_class=CLASSES, overwrite=True, **cfg), teacher, log=None)
    assert math.isfinite(res.last["loss_g"]) and math.isfinite(res.last["loss_fake"])
    with pytest.raises(ValueError, match="last class embedding"):
        distill(quiet(null_class=0, overwrite=True, **cfg), pristine, log=None)


# ---------------- few-step generator ----------------

def test_few_step_training_draws_k_star_and_backpropagates_through_the_last_step_only(tmp_path):
    steps = 4
    teacher, G, fake = conditional_nets()
    calls = []
    G.register_forward_pre_hook(lambda m, args: calls.append((torch.is_grad_enabled(), args[0].requires_grad,
                                                              float(args[1][0]))))
    iterations = 6
    seen = []
    res = distill(quiet(run_dir=str(tmp_path / "r"), iterations=iterations, lr=1e-3, gen_steps=steps,
                        checkpoint_every=iterations), teacher, G, fake,
                  callbacks=[lambda s: seen.append(len(calls))], log=None)
    k_stars = [draw_k_star(steps, i, 0) for i in range(iterations)]
    assert len(set(k_stars)) > 1
    levels = [2.5 * (steps - k) / steps for k in range(steps)]
    start = 0
    for k_star, end in zip(k_stars, seen):
        it = calls[start:end]
        start = end
        # fake step: k* calls without gradient; generator step: k* - 1 without, the last one with gradient
        assert [g for g, _, _ in it] == [False] * k_star + [False] * (k_star - 1) + [True]
        assert not any(requires for _, requires, _ in it)  # the last step's input is detached
        assert [s for _, _, s in it] == pytest.approx(levels[:k_star] * 2)
    assert torch.load(res.checkpoint, weights_only=True)["gen_steps"] == steps


def test_sampling_runs_all_generator_steps():
    calls = []

    def net(x, sigma, labels=None):
        calls.append(float(sigma[0]))
        return 0.5 * x

    out = sample_images(net, 3, (1, 2, 2), sigma_init=2.0, gen_steps=4, batch=3, step_spacing="linear")
    assert calls == pytest.approx([2.0, 1.5, 1.0, 0.5]) and out.shape == (3, 1, 2, 2)
    calls.clear()
    sample_images(net, 3, (1, 2, 2), sigma_init=2.0, batch=3)
    assert calls == [2.0]


def test_grid_of_a_few_step_student_uses_its_steps(tmp_path, monkeypatch):
    import sidfast.samplers as samplers

    seen = []
    real = samplers.sample_images
    def recorded(*a, **kw):
        seen.append(kw["gen_steps"])
        return real(*a, **kw)

    monkeypatch.setattr(samplers, "sample_images", recorded)
    distill(quiet(run_dir=str(tmp_path / "r"), iterations=1, gen_steps=3, grid_size=4), tiny_teacher(),
            log=None)
    assert seen and set(seen) == {3}


# ---------------- text-conditioned and flow-matching teachers ----------------

def _prompt_file(tmp_path):
    path = tmp_path / "prompts.txt"
    path.write_text("a red cat\na blue dog\n\nthe sea\n", encoding="utf-8")
    return path


def test_text_teacher_trains_with_prompts_guidance_and_few_steps(tmp_path):
    pytest.importorskip("diffusers")
    pytest.importorskip("transformers")
    require_text_components()

    def teacher():
        return DiffusersDenoiser(cond_unet().float(), VPSchedule.linear(), "eps")

    text = conditioner("sd", dtype=torch.float32)
    prompts = _prompt_file(tmp_path)
    kw = dict(iterations=2, batch=2, lr=1e-4, guidance="lsg", cfg=2, gen_steps=2)
    res = distill(quiet(run_dir=str(tmp_path / "r"), prompts=str(prompts), **kw), teacher(), conditioner=text,
                  log=None)
    assert math.isfinite(res.last["loss_g"]) and math.isfinite(res.last["loss_fake"])
    assert text.encoded <= 4  # three prompts and the empty one, each encoded once
    with pytest.raises(ValueError, match="--prompts FILE"):
        distill(quiet(run_dir=str(tmp_path / "a"), **kw), teacher(), conditioner=text, log=None)
    with pytest.raises(ValueError, match="no text encoder"):
        distill(quiet(run_dir=str(tmp_path / "b"), prompts=str(prompts), **kw), teacher(), log=None)
    with pytest.raises(ValueError, match="--prompts is for text-to-image"):
        distill(quiet(run_dir=str(tmp_path / "c"), prompts=str(prompts)), tiny_teacher(), log=None)


def test_flow_teacher_trains_with_the_velocity_loss_and_one_minus_t_weighting(tmp_path, monkeypatch):
    pytest.importorskip("diffusers")
    pytest.importorskip("transformers")
    import sidfast.training.sid as phases
    require_text_components()

    seen = {}
    real_loss = phases.fake_score_loss

    def fake_loss(pred, x0, noise, a, s, **kw):
        seen.update(kw)
        torch.testing.assert_close(a + s, torch.ones_like(a))  # flow coordinates: a = 1 - t, s = t
        return real_loss(pred, x0, noise, a, s, **kw)

    monkeypatch.setattr(phases, "fake_score_loss", fake_loss)
    monkeypatch.setattr(phases, "sid_generator_loss", lambda *a, **k: pytest.fail("the 1/w loss was used"))
    teacher = FlowDenoiser(sd3_transformer().float())
    res = distill(quiet(run_dir=str(tmp_path / "r"), iterations=2, batch=2, lr=1e-4, guidance="lsg", cfg=1.5,
                        prompts=str(_prompt_file(tmp_path)), step_spacing="flow"), teacher,
                  conditioner=conditioner("sd3", dtype=torch.float32), log=None)
    assert seen["prediction"] == "x0" and seen["weighting"] == "flow"
    assert math.isfinite(res.last["loss_g"]) and math.isfinite(res.last["loss_fake"])


def test_weighted_sid_loss_with_one_over_w_is_the_sid_loss():
    torch.manual_seed(0)
    y_real, y_fake, x_g = (torch.randn(4, 2, 3, 3, dtype=torch.float64) for _ in range(3))
    x_g[1, 0, 0, 0] = float("nan")
    w = reference.sid_normalizer(y_real, x_g)
    got = weighted_sid_loss(y_real, y_fake, x_g, 1.2, torch.nan_to_num(1 / w), 100.0)
    want = 100.0 * reference.sid_generator_loss(y_real, y_fake, x_g, 1.2)
    torch.testing.assert_close(got, want, rtol=1e-12, atol=0)
    sigma = torch.rand(4, dtype=torch.float64)
    got = weighted_sid_loss(y_real, y_fake, x_g, 1.0, 1 / (1 + sigma), 1.0)
    keep = torch.tensor([True, False, True, True])
    d = y_real - y_fake
    # SiD-DiT's generator term at alpha = 1: d (f_psi - x_g) (1 - t)
    per = (d * (y_fake - x_g)).flatten(1).sum(1) / (1 + sigma)
    torch.testing.assert_close(got, per[keep].sum() / 4, rtol=1e-12, atol=0)


def test_new_options_are_trajectory_options_with_command_line_names():
    names = {"guidance", "cfg", "cfg_fake_train", "cfg_fake", "cfg_teacher", "gen_steps", "prompts"}
    assert names <= set(TrainConfig.trajectory_options())
    assert [TrainConfig.option(n) for n in ("cfg_fake_train", "cfg_fake", "cfg_teacher", "gen_steps")] == \
        ["--cfg-fake-train", "--cfg-fake", "--cfg-teacher", "--gen-steps"]
    with pytest.raises(ValueError, match="gen_steps"):
        quiet(gen_steps=0).validate()
    with pytest.raises(ValueError, match="renoise"):
        quiet(renoise="sometimes").validate()


def test_guided_few_step_run_resumes_bitwise(tmp_path):
    """k* is a function of (seed, iteration) and condition dropout draws from the saved RNG streams."""
    kw = dict(iterations=5, lr=1e-3, guidance="lsg", cfg=2, gen_steps=3, checkpoint_every=2)
    assert_same_run(*stopped_and_resumed(tmp_path, CondMLP, **kw))


class NestedCondMLP(nn.Module):
    """An EDM-preconditioned MLP conditioned like SDXL's UNet: ``encoder_hidden_states`` and the nested
    ``added_cond_kwargs`` (``text_embeds``, ``time_ids``), in its input's dtype."""

    image_shape = (1, 4, 4)

    def __init__(self, hidden=16, seed=0):
        super().__init__()
        torch.manual_seed(seed)
        d = math.prod(self.image_shape)
        self.inp = nn.Linear(d + 1 + 3 + 2 + 2, hidden)
        self.out = nn.Linear(hidden, d)

    def forward(self, x, sigma, class_labels=None, encoder_hidden_states=None, added_cond_kwargs=None):
        s = sigma.reshape(-1, 1).to(x.dtype)
        c_in, c_skip, c_out = 1 / (s ** 2 + 0.25).sqrt(), 0.25 / (s ** 2 + 0.25), 0.5 * s / (s ** 2 + 0.25).sqrt()
        text = [encoder_hidden_states.mean(1), added_cond_kwargs["text_embeds"], added_cond_kwargs["time_ids"]]
        h = self.out(F.silu(self.inp(torch.cat([x.flatten(1) * c_in, s.log() / 4, *text], 1))))
        return (c_skip * x.flatten(1) + c_out * h).view(x.shape)


@pytest.mark.parametrize("device", ["cpu", pytest.param("cuda", marks=cuda_marks())])
@pytest.mark.parametrize("mode", ["full", "lora"])
def test_nested_keyword_conditioning_goes_through_captured_graphs(mode, device, monkeypatch):
    """SDXL-style nested keywords (``added_cond_kwargs``) are flattened into tensor arguments of the captured
    graphs (on CPU a stand-in capture with CUDA graphs' replay semantics, on a GPU real ones) and nested again
    inside: guided and plain phases equal the eager ``guidance.guided`` computation, each phase captured
    once."""
    from utils import StaticGradGraphs, graphs_on_cpu

    if device == "cpu":
        graphs_on_cpu(monkeypatch, StaticGradGraphs())
    teacher = EDMDenoiser(NestedCondMLP(seed=1).double()).to(device)
    fake = (randomize_lora(LoRAFakeScore(teacher, rank=4).double()) if mode == "lora"
            else EDMDenoiser(NestedCondMLP(seed=2).double())).to(device)
    engine = ScoreEngine.over(teacher, fake, graphs=True)
    g = torch.Generator().manual_seed(0)
    batch = 4

    def rand(*shape):
        return torch.randn(*shape, generator=g, dtype=torch.float64).to(device)

    cond = {"encoder_hidden_states": rand(batch, 5, 3),
            "added_cond_kwargs": {"text_embeds": rand(batch, 2), "time_ids": rand(batch, 2)}}
    null = {"encoder_hidden_states": torch.zeros(1, 5, 3, dtype=torch.float64, device=device),
            "added_cond_kwargs": {"text_embeds": torch.zeros(1, 2, dtype=torch.float64, device=device),
                                  "time_ids": cond["added_cond_kwargs"]["time_ids"][:1]}}
    sigma = torch.rand(batch, generator=g, dtype=torch.float64).to(device) + 0.5
    x_g = rand(batch, *NestedCondMLP.image_shape)
    noise = rand(batch, *NestedCondMLP.image_shape)
    x_t = x_g + sigma.reshape(-1, 1, 1, 1) * noise
    for scales in ((1.0, 1.0), (2.0, 1.5)):
        guided = scales != (1.0, 1.0)
        kw = dict(scale_real=scales[0], scale_fake=scales[1], null_cond=null) if guided else {}
        for step in range(2):  # a capture, then a replay
            xg = x_g.clone().requires_grad_()
            y_real, y_fake = engine.generator_terms(xg, sigma, None, noise=noise, **kw, **cond)
            grad = torch.autograd.grad((y_real * y_fake).sum(), xg)[0]
            xe = x_t.clone().requires_grad_()
            want_real = guidance.guided(teacher, xe, sigma, cond, null, scales[0])
            want_fake = guidance.guided(fake, xe, sigma, cond, null, scales[1])
            want_grad = torch.autograd.grad((want_real * want_fake).sum(), xe)[0]
            for got, want in ((y_real, want_real), (y_fake, want_fake), (grad, want_grad)):
                torch.testing.assert_close(got, want.detach(), **float64_network_tolerance(want))
            # the fake score's own step, guided at k1 = scales[1], gradients into its trainable parameters
            params = [p for p in fake.parameters() if p.requires_grad]
            got = engine.fake_score_forward(x_t, sigma, None, scale=scales[1],
                                            null_cond=null if guided else None, **cond)
            got_grads = torch.autograd.grad(got.square().sum(), params)
            want = guidance.guided(fake, x_t, sigma, cond, null, scales[1])
            want_grads = torch.autograd.grad(want.square().sum(), params)
            torch.testing.assert_close(got, want.detach(), **float64_network_tolerance(want))
            for a, b in zip(got_grads, want_grads):
                torch.testing.assert_close(a, b, **float64_network_tolerance(b))
    assert len(engine._graphs) == 4  # generator and fake phases, plain and guided: one capture each


def test_sdxl_teacher_trains_through_the_fused_engine_as_eagerly(tmp_path):
    """An SDXL-style teacher (nested ``added_cond_kwargs``) with LSG guidance: the fused engine trains it as
    the eager path does (full fake score: the same evaluations, bit for bit on CPU), and its LoRA fake score
    runs teacher and fake halves, nested keywords doubled, in one forward."""
    pytest.importorskip("diffusers")
    pytest.importorskip("transformers")
    require_text_components()

    def teacher():
        return DiffusersDenoiser(cond_unet(sdxl=True).float(), VPSchedule.linear(), "eps")

    kw = dict(iterations=2, batch=2, lr=1e-4, guidance="lsg", cfg=2, prompts=str(_prompt_file(tmp_path)))
    eager, fused = (distill(quiet(run_dir=str(tmp_path / engine), engine=engine, **kw), teacher(),
                            conditioner=conditioner("sdxl", dtype=torch.float32), log=None)
                    for engine in ("eager", "fused"))
    assert_same_run(eager, fused)
    res = distill(quiet(run_dir=str(tmp_path / "lora"), engine="fused", fake_score="lora", lora_rank=2, **kw),
                  teacher(), conditioner=conditioner("sdxl", dtype=torch.float32), log=None)
    assert math.isfinite(res.last["loss_g"]) and math.isfinite(res.last["loss_fake"])
