"""Per-family recipes: each teacher family trains with its paper's noise levels, weightings and defaults.

The trainer's two phases, for identical draws, equal the published SiD-LSG (DDPM-table teachers) and SiD-DiT
(flow teachers) losses and gradients in float64 (tests/published.py), and each family's defaults equal its
published launch script.
"""
import math

import pytest
import torch
from torch import nn

import published
from sidfast.models.denoiser import EDMDenoiser
from sidfast.models.diffusers import DiffusersDenoiser
from sidfast.models.flow import FlowDenoiser
from sidfast.schedules import VPSchedule
from sidfast.training.config import TrainConfig
from sidfast.training.loop import Distiller, distill
from sidfast.training.recipe import RECIPES, resolve
from nets import tiny_teacher
from runs import quiet

SHAPE = (2, 4, 4)


def sd_schedule() -> VPSchedule:
    """Stable Diffusion's table as diffusers builds it: scaled-linear betas 0.00085 .. 0.012 over 1000 steps,
    in float32."""
    betas = torch.linspace(0.00085 ** 0.5, 0.012 ** 0.5, 1000, dtype=torch.float32) ** 2
    return VPSchedule(torch.cumprod(1 - betas, 0))


class TinyTimeNet(nn.Module):
    """A small network in diffusers' convention, ``net(x, t) -> out`` of x's shape, smooth in t."""

    image_shape = SHAPE

    def __init__(self, seed: int, t_scale: float = 1000.0):
        super().__init__()
        g = torch.Generator().manual_seed(seed)
        n = math.prod(SHAPE)
        self.w1 = nn.Parameter(torch.randn(n + 4, 32, generator=g) / n ** 0.5)
        self.w2 = nn.Parameter(torch.randn(32, n, generator=g) / 32 ** 0.5)
        self.t_scale = t_scale

    def forward(self, x, t, **kw):
        t = torch.as_tensor(t, dtype=x.dtype).reshape(-1).expand(x.shape[0]) / self.t_scale
        emb = torch.stack([torch.sin(3 * t), torch.cos(3 * t), t, t * t], 1).to(x.dtype)
        h = torch.tanh(torch.cat([x.flatten(1), emb], 1) @ self.w1.to(x.dtype))
        return (h @ self.w2.to(x.dtype)).reshape(x.shape)


@pytest.fixture
def float64():
    old = torch.get_default_dtype()
    torch.set_default_dtype(torch.float64)
    yield
    torch.set_default_dtype(old)


class Draws:
    """Records torch.randn / randn_like / randint results in call order (the trainer's draws)."""

    def __init__(self, monkeypatch):
        self.log = []
        for name in ("randn", "randn_like", "randint"):
            real = getattr(torch, name)
            monkeypatch.setattr(torch, name, self._recorder(name, real))

    def _recorder(self, name, real):
        def draw(*args, **kw):
            out = real(*args, **kw)
            self.log.append((name, out.clone()))
            return out
        return draw

    def take(self):
        out, self.log = self.log, []
        return out


def _close(got, want, rtol=1e-10):
    got, want = got.detach(), want.detach()
    torch.testing.assert_close(got, want, rtol=rtol, atol=rtol * float(want.abs().max()))


def _grads(net):
    return [p.grad.clone() for p in net.parameters()]


def _phases(tmp_path, teacher, generator, fake, **kw):
    cfg = quiet(run_dir=str(tmp_path / "r"), iterations=1, batch=4, noise="torch", engine="eager", **kw)
    return Distiller(cfg, teacher, generator=generator, fake=fake)


# ---------------- DDPM tables: SiD-LSG ----------------

@pytest.mark.parametrize("prediction,alpha", [("eps", None), ("v", None), ("eps", 1.2)])
def test_ddpm_phases_equal_the_published_sid_lsg_losses(tmp_path, monkeypatch, float64, prediction, alpha):
    schedule = sd_schedule()
    ac = schedule.alphas_cumprod
    T, G, F = (TinyTimeNet(s) for s in (0, 1, 2))
    teacher = DiffusersDenoiser(T, schedule, prediction)
    d = _phases(tmp_path, teacher, DiffusersDenoiser(G, schedule, prediction),
                DiffusersDenoiser(F, schedule, prediction), **({"alpha": alpha} if alpha else {}))
    cfg = d.cfg
    assert (cfg.recipe, cfg.fake_levels, cfg.gen_levels, cfg.fake_weighting, cfg.t_init) == \
        ("ddpm", "timesteps", "timesteps", "eps", 625)
    draws = Draws(monkeypatch)
    B = cfg.batch

    # the fake-score step: z, then t, then the noise
    loss, scaled = d.phases.fake_score_loss(d.scores, d.generator_sample, 1.0)
    (_, z), (_, t), (_, noise) = draws.take()
    assert t.dtype == torch.long and int(t.min()) >= 20 and int(t.max()) <= 979
    with torch.no_grad():
        images = published.lsg_generate(G, z, 625, ac, prediction)
    F.zero_grad()
    scaled.backward()
    got = _grads(F)
    F.zero_grad()
    want = published.lsg_fake_loss(F, images, noise, t, ac, prediction)
    want.backward()
    _close(loss, want)
    for a, b in zip(got, _grads(F)):
        _close(a, b)

    # the generator step: z, t, noise; gradients into the generator through x_g, f_psi and f_phi
    G.zero_grad()
    loss, scaled = d.phases.generator_loss(d.scores, d.generator_train, d.generator_sample, cfg.loss_scale_g)
    scaled.backward()
    got = _grads(G)
    (_, z), (_, t), (_, noise) = draws.take()
    G.zero_grad()
    images = published.lsg_generate(G, z, 625, ac, prediction)
    want = published.lsg_generator_loss(T, F, images, noise, t, ac, prediction, alpha=cfg.sid_alpha,
                                        lsg=cfg.loss_scale_g)
    want.backward()
    _close(loss, want / cfg.loss_scale_g * 1.0)
    for a, b in zip(got, _grads(G)):
        _close(a, b)


def test_sd_t_init_625_is_sigma_2_5017():
    teacher = DiffusersDenoiser(TinyTimeNet(0), sd_schedule(), "eps")
    rec = resolve(TrainConfig(), teacher)
    assert rec.cfg.sigma_init == pytest.approx(2.501705607, rel=1e-9)
    assert rec.gen_sigmas == [rec.cfg.sigma_init]


# ---------------- flow teachers: SiD-DiT ----------------

@pytest.mark.parametrize("weighting", ["1-t", "(1-t)^2", "1/t", "1/t^2", "snr", "sqrt-snr"])
def test_flow_phases_equal_the_published_sid_dit_losses(tmp_path, monkeypatch, float64, weighting):
    T, G, F = (TinyTimeNet(s) for s in (0, 1, 2))
    d = _phases(tmp_path, FlowDenoiser(T), FlowDenoiser(G), FlowDenoiser(F), gen_steps=1,
                generator_weighting=weighting)
    cfg = d.cfg
    assert (cfg.recipe, cfg.t_init, cfg.sigma_init, cfg.fake_weighting) == ("flow", 1.0, math.inf, "flow")
    published_name = {"1-t": "1_minus_sigma", "(1-t)^2": "1_minus_sigma_squared", "1/t": "1_over_sigma",
                      "1/t^2": "1_over_sigma2", "snr": "snr", "sqrt-snr": "snr_sqrt"}[weighting]
    draws = Draws(monkeypatch)

    def t_of(u):  # the law's standard normals -> SiD-DiT's t = sigmoid(N(ln 2, 1.6^2))
        return torch.sigmoid(u * 1.6 + math.log(2))

    loss, scaled = d.phases.fake_score_loss(d.scores, d.generator_sample, 1.0)
    (_, z), (_, u), (_, noise) = draws.take()
    with torch.no_grad():
        images = published.dit_generate(G, z)
    F.zero_grad()
    scaled.backward()
    got = _grads(F)
    F.zero_grad()
    want = published.dit_fake_loss(F, images, noise, t_of(u))
    want.backward()
    _close(loss, want)
    for a, b in zip(got, _grads(F)):
        _close(a, b)

    G.zero_grad()
    F.requires_grad_(False)
    loss, scaled = d.phases.generator_loss(d.scores, d.generator_train, d.generator_sample, cfg.loss_scale_g)
    scaled.backward()
    got = _grads(G)
    (_, z), (_, u), (_, noise) = draws.take()
    G.zero_grad()
    images = published.dit_generate(G, z)
    want = published.dit_generator_loss(T, F, images, noise, t_of(u), alpha=cfg.sid_alpha, lsg=cfg.loss_scale_g,
                                        weighting=published_name)
    want.backward()
    _close(loss * cfg.loss_scale_g, want)
    for a, b in zip(got, _grads(G)):
        _close(a, b)


def test_flow_recipe_grid_is_the_published_four_step_grid():
    rec = resolve(TrainConfig(), FlowDenoiser(TinyTimeNet(0)))
    t = [1.0 if math.isinf(s) else s / (1 + s) for s in rec.gen_sigmas]
    assert t == pytest.approx([1.0, 0.75, 0.5, 0.25], abs=1e-15)  # t_i = (999/999)(1 - i/4)


# ---------------- defaults: the launch scripts ----------------

@pytest.mark.parametrize("family", ["edm", "ddpm", "flow"])
def test_each_family_default_is_its_launch_script(family):
    teacher = {"edm": lambda: EDMDenoiser(tiny_teacher()), "ddpm": lambda: DiffusersDenoiser(TinyTimeNet(0),
               sd_schedule(), "eps"), "flow": lambda: FlowDenoiser(TinyTimeNet(0))}[family]()
    # a text-conditioned run guides as the scripts do (the teacher family decides the recipe)
    rec = resolve(TrainConfig(), teacher, text=family != "edm")
    for name, want in published.LAUNCH[family].items():
        got = getattr(rec.cfg, name)
        assert got == (pytest.approx(want) if isinstance(want, float) else want), (family, name, got, want)
    if family != "edm":
        assert rec.cfg.guidance == "lsg"
    assert rec.family == family


def test_recipe_table_in_docs_lists_every_value():
    from pathlib import Path

    text = (Path(__file__).parents[2] / "docs" / "recipes.md").read_text()
    for family, recipe in RECIPES.items():
        assert f"`{family}`" in text
        for name, value in recipe["values"].items():
            if name in ("guided_cfg", "dropout_rule", "alpha") or value is None:
                continue
            assert TrainConfig.option(name) in text, name


def test_explicit_options_override_the_recipe_and_are_not_reported_as_chosen():
    rec = resolve(TrainConfig(lr=3e-4, gen_steps=2), FlowDenoiser(TinyTimeNet(0)))
    assert rec.cfg.lr == 3e-4 and rec.cfg.gen_steps == 2
    assert "lr" not in rec.chosen and "gen_steps" not in rec.chosen and rec.chosen["batch"] == 256


# ---------------- no silent clamping ----------------

def test_a_law_beyond_the_table_is_an_error_naming_the_option():
    ddpm = DiffusersDenoiser(TinyTimeNet(0), sd_schedule(), "eps")
    with pytest.raises(ValueError, match="option fake_levels lognormal draws sigmas in .* use fake_levels timesteps"):
        resolve(TrainConfig(fake_levels="lognormal"), ddpm)
    with pytest.raises(ValueError, match="option gen_levels rho .* beyond what the teacher"):
        resolve(TrainConfig(gen_levels="rho"), ddpm)
    with pytest.raises(ValueError, match="option timesteps 20 1000 goes beyond"):
        resolve(TrainConfig(timesteps=(20, 1000)), ddpm)
    with pytest.raises(ValueError, match="option fake_levels timesteps .* without one"):
        resolve(TrainConfig(fake_levels="timesteps"), EDMDenoiser(tiny_teacher()))
    with pytest.raises(ValueError, match="option t_init must be an integer timestep"):
        resolve(TrainConfig(t_init=625.5), ddpm)
    with pytest.raises(ValueError, match="option t_init must be a flow time"):
        resolve(TrainConfig(t_init=2.5), FlowDenoiser(TinyTimeNet(0)))
    with pytest.raises(ValueError, match="leave the teacher's range"):
        resolve(TrainConfig(sigma_init=40.0), ddpm)
    with pytest.raises(ValueError, match="only for flow teachers"):
        resolve(TrainConfig(sigma_init=math.inf), EDMDenoiser(tiny_teacher()))
    # the rho law with a tmax and sigmas inside the table is allowed
    rec = resolve(TrainConfig(gen_levels="rho", sigma_min=0.03, sigma_max=14.0), ddpm)
    lo, hi = rec.gen_law.support()
    assert lo >= rec.clock.range[0] and hi <= rec.clock.range[1]


def test_ddpm_draws_stay_on_the_table(float64):
    ddpm = DiffusersDenoiser(TinyTimeNet(0), sd_schedule(), "eps")
    rec = resolve(TrainConfig(), ddpm)
    sigma = rec.fake_law.draw(4096)
    t = ddpm.timesteps(sigma)
    assert float(t.min()) >= 20 - 1e-9 and float(t.max()) <= 979 + 1e-9
    assert torch.allclose(t, t.round(), atol=1e-6)  # whole timesteps, as published


# ---------------- what a user sees ----------------

def test_distill_prints_the_recipe_and_config_json_records_it(tmp_path):
    import json

    lines = []
    teacher = DiffusersDenoiser(TinyTimeNet(0), sd_schedule(), "eps")
    res = distill(quiet(run_dir=str(tmp_path / "r"), iterations=1, batch=2), teacher, log=lines.append)
    text = "\n".join(lines)
    assert "recipe ddpm (the teacher is a DDPM-table" in text and "SiD-LSG" in text
    assert "--lr 1e-06" in text and "--t-init 625" in text and "integer t ~ U{20..979}" in text
    saved = json.loads((tmp_path / "r" / "config.json").read_text())
    assert saved["recipe"] == "ddpm" and saved["lr"] == 1e-6 and saved["fake_levels"] == "timesteps"
    assert saved["t_init"] == 625 and saved["sigma_init"] == pytest.approx(2.501705607)
    assert res.config.fake_weighting == "eps"


# ---------------- the command a user types, grids and checkpoints on ----------------

def _text_pipelines():
    import importlib.util
    from pathlib import Path

    pytest.importorskip("diffusers")
    pytest.importorskip("transformers")
    spec = importlib.util.spec_from_file_location("text_pipelines",
                                                  Path(__file__).parents[1] / "models" / "test_text.py")
    pipelines = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(pipelines)  # its pipeline builders, not its tests
    return pipelines


@pytest.mark.slow
@pytest.mark.parametrize("kind", ["sd", "flux"])
def test_a_pipeline_teacher_trains_by_its_family_recipe_from_the_command_line(tmp_path, capsys, kind):
    import json

    from utils import run_main

    pipelines = _text_pipelines()
    pipe = tmp_path / "pipe"
    (pipelines.save_sd_pipeline if kind == "sd" else pipelines.save_flux_pipeline)(pipe)
    prompts = tmp_path / "p.txt"
    prompts.write_text("a cat\na dog\n")
    run = tmp_path / "run"
    code, out, err = run_main(["distill", "--teacher", pipe, "--prompts", prompts, "--run-dir", run, "--iterations",
                               "2", "--batch", "2", "--grid-size", "2", "--teacher-steps", "2", "--sample-every",
                               "1", "--checkpoint-every", "1", "--no-progress", "--device", "cpu",
                               *(["--image-shape", "4", "4", "4"] if kind == "flux" else [])], capsys)
    assert code == 0, err
    saved = json.loads((run / "config.json").read_text())
    if kind == "sd":  # SiD-LSG: timesteps, eps loss, t_init 625, lr 1e-6, LSG 2 with prompts
        assert "recipe ddpm (the teacher is a DDPM-table" in out
        want = {"recipe": "ddpm", "fake_levels": "timesteps", "gen_levels": "timesteps", "fake_weighting": "eps",
                "t_init": 625, "lr": 1e-6, "guidance": "lsg", "cfg": 2.0, "condition_dropout": 0.1, "gen_steps": 1}
    else:  # SiD-DiT: logit-normal t, velocity loss, 4 steps from t = 1, LSG 4.5, no dropout
        assert "recipe flow (the teacher is a flow-matching" in out
        want = {"recipe": "flow", "fake_levels": "logit-normal", "gen_levels": "logit-normal",
                "fake_weighting": "flow", "generator_weighting": "1-t", "t_init": 1.0, "gen_steps": 4,
                "step_spacing": "flow", "guidance": "lsg", "cfg": 4.5, "condition_dropout": 0.0, "lr": 5e-6}
    assert {k: saved[k] for k in want} == want
    assert (run / "teacher.png").is_file() and (run / "checkpoint.pt").is_file()
    code, _, err = run_main(["sample", run, "--out", tmp_path / "s.png", "--num", "2", "--prompts", prompts,
                             "--device", "cpu"], capsys)
    assert code == 0, err


# ---------------- SiD's augmentation of the fake-score step (published SiD: --augment 0.12) ----------------

def test_sid_augments_the_fake_score_step_in_the_published_order(tmp_path):
    """EDM's loss as SiD's fake-score step calls it: sigma, then the augmentation of x_g, then the noise; the
    fake score sees y + sigma n with the augmentation labels (sid_loss.py, SiDLoss.__call__)."""
    from nets import SHAPE as TINY, TinyEDM
    from sidfast.training.augment import AugmentPipe

    class AugEDM(TinyEDM):
        def forward(self, x, sigma, class_labels=None, augment_labels=None):
            out = super().forward(x, sigma, class_labels)
            return out if augment_labels is None else out + 0.01 * augment_labels.sum(1).view(-1, 1, 1, 1)

    torch.manual_seed(0)
    d = Distiller(quiet(run_dir=str(tmp_path / "r"), iterations=1, batch=4, noise="torch", augment_p=0.5),
                  AugEDM(dropout=0.0))
    seen = []
    d.fake.network.register_forward_pre_hook(lambda m, args, kw: seen.append((args[0].clone(), kw)),
                                             with_kwargs=True)
    torch.manual_seed(5)
    d.phases.fake_score_loss(d.scores, d.generator_sample, 1.0)
    torch.manual_seed(5)
    z = torch.randn(4, *TINY)
    with torch.no_grad():
        x_g = d.generator(2.5 * z, torch.full((4,), 2.5))
    sigma = torch.exp(torch.randn(4) * 1.2 - 1.2)
    y, labels = AugmentPipe(0.5)(x_g)
    n = torch.randn_like(y)
    (x_in, kw), = seen
    torch.testing.assert_close(x_in, y + sigma.view(-1, 1, 1, 1) * n, rtol=0, atol=0)
    assert torch.equal(kw["augment_labels"], labels) and bool((labels != 0).any())
