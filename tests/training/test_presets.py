"""Presets: each one is its published launch script in sidfast's options.

Three records are held against each other: the preset module (``sidfast.training.presets``), the table in
docs/presets.md, and the launch scripts transcribed flag by flag in tests/published.py (``SCRIPTS``, with the
training scripts' defaults in ``TRAIN_DEFAULTS``). The mapping from a script's flags to sidfast's options is
written out here, apart from the module, so that a wrong value in either shows. Then the order in which
presets, ``--config`` files and flags override each other, resuming, the family check, and a command-line run.
"""
import json
import math
import re
import shlex
from pathlib import Path

import pytest
import yaml

import published
from sidfast import cli
from sidfast.models.denoiser import EDMDenoiser
from sidfast.models.diffusers import DiffusersDenoiser
from sidfast.models.flow import FlowDenoiser
from sidfast.training import presets
from sidfast.training.config import TrainConfig
from sidfast.training.loop import Distiller
from sidfast.training.options import config_from_args
from sidfast.training.recipe import resolve
from nets import tiny_teacher
from test_recipes import TinyTimeNet, sd_schedule
from utils import run_main

DOCS = Path(__file__).parents[2] / "docs" / "presets.md"
NAMES = list(presets.PRESETS)
FAMILY = {"sid_train.py": "edm", "sida_train.py": "edm", "SiD-LSG sid_train.py": "ddpm", "sid_dit_train.py": "flow"}
DIT_WEIGHTINGS = {"1_minus_sigma": "1-t", "1_minus_sigma_squared": "(1-t)^2", "1_over_sigma": "1/t",
                  "1_over_sigma2": "1/t^2", "snr": "snr", "snr_sqrt": "sqrt-snr", "sid_legacy": "sid"}
SMALL = ["--iterations", "2", "--batch", "4", "--log-every", "1", "--grid-size", "0", "--teacher-steps", "0",
         "--no-progress", "--device", "cpu"]


def script_flags(name: str) -> tuple[str, dict]:
    """(the teacher family, every flag of the script: its own over its training script's defaults)."""
    trainer, flags = published.SCRIPTS[name]
    return FAMILY[trainer], {**published.TRAIN_DEFAULTS[trainer], **flags}


def from_script(name: str) -> dict:
    """The sidfast options of the launch script ``name``, worked out from its flags."""
    family, f = script_flags(name)
    own = published.SCRIPTS[name][1]
    out = {"batch": f["batch"], "batch_gpu": f["batch-gpu"], "lr": f["glr"], "alpha": f["alpha"],
           "loss_scale_fake": f["ls"], "loss_scale_g": f["lsg"],
           "ema_halflife_kimg": int(f["ema"] * 1000),  # the scripts' c.ema_halflife_kimg = int(opts.ema * 1000)
           "precision": "fp16" if f["fp16"] else ("bf16" if f.get("autocast_bf16") and not f["bf16"] else "fp32")}
    if f["lr"] != f["glr"]:  # --lr is the fake score's, --glr the generator's
        out["fake_lr"] = f["lr"]
    # the loops run until cur_nimg >= total_kimg * 1000, total_kimg = int(duration * 1000), cur_nimg += batch
    out["iterations"] = math.ceil(int(f["duration"] * 1000) * 1000 / f["batch"])
    if family == "edm":
        out.update(tmax=f["tmax"], t_init=f["init_sigma"])
        out["method"] = "sid" if not f.get("use_gan") else ("sid2a" if f.get("sid_model") else "sida")
        if "g_beta1" in own:
            out["generator_beta1"] = f["g_beta1"]
        out["augment_p"] = f["augment"]  # SiD's fake-score step and SiDA's augment alike
        if out["method"] != "sid":
            out.update(loss_scale_d=f["lsd"], loss_scale_gan=f["lsg_gan"], **published.SIDA_LOOP)
        return out
    out["method"] = "sid"
    kappas = {f["cfg_train_fake"], f["cfg_eval_fake"], f["cfg_eval_real"]}
    assert len(kappas) == 1  # every published T2I script guides with k1 = k2 = k4: LSG
    out.update(guidance="lsg", cfg=kappas.pop(), gen_steps=f["num_steps"],
               activation_checkpointing=bool(f["gradient_checkpointing"]))
    if family == "ddpm":
        out.update(t_init=f["init_timestep"], timesteps=(f["tmin"], f["tmax"] - 1))  # randint excludes tmax
    else:  # SiD-DiT: t = init_timestep / 999 (t_i = (init/999)(1 - i/K))
        out.update(t_init=f["init_timestep"] / 999, renoise=f["noise_type"],
                   generator_weighting=DIT_WEIGHTINGS[f["weighting_scheme"]])
    return out


def script_file(name: str) -> str:
    """The launch script a preset's transcription comes from."""
    trainer = published.SCRIPTS[name][0]
    if trainer == "sida_train.py":
        return "run_sid_sida.sh" if name.startswith("sid2a") else "run_sida.sh"
    return {"sid_train.py": "run_sid.sh", "SiD-LSG sid_train.py": "run_sid.sh"}.get(
        trainer, "run_sid_dit.sh" if name == "sana" else "sid_dit_sd3_train.py")


def same(a, b) -> bool:
    if isinstance(a, (int, float)) and not isinstance(a, bool) and isinstance(b, (int, float)):
        return math.isclose(a, b, rel_tol=1e-12) and not isinstance(b, bool)
    if isinstance(a, (tuple, list)) and isinstance(b, (tuple, list)):
        return len(a) == len(b) and all(same(x, y) for x, y in zip(a, b))
    return a == b


# ---------------- the three records ----------------

def test_every_published_script_has_a_preset():
    assert set(published.SCRIPTS) == set(NAMES)
    assert {"cifar10-uncond", "sida-afhq64", "sid2a-imagenet64", "sd15", "sd21", "sd3", "sana"} <= set(NAMES)


@pytest.mark.parametrize("name", NAMES)
def test_each_preset_is_its_launch_script(name):
    want, got = from_script(name), presets.PRESETS[name].values
    assert set(got) == set(want), (set(got) ^ set(want))
    bad = {k: (got[k], want[k]) for k in want if not same(got[k], want[k])}
    assert not bad, bad
    assert presets.PRESETS[name].family == script_flags(name)[0]


@pytest.mark.parametrize("name", NAMES)
def test_what_no_option_holds_is_named_in_the_notes(name):
    """Every script flag that bears on training but has no sidfast option is printed, with its value."""
    family, f = script_flags(name)
    notes = " ".join(presets.PRESETS[name].notes) + " " + presets.PRESETS[name].expects
    if family == "edm":
        assert f"--dropout {f['dropout']:g}" in notes and f"--arch {f['arch']}" in notes
        if "cres" in f:
            assert f"--cres {f['cres']}" in notes
        if f["cond"]:
            assert "--cond 1" in notes
        if f.get("sid_model"):
            assert "--sid_model" in notes and "--init-generator" in notes
    if family == "ddpm":
        assert "--enable_xformers 1" in notes and "--resolution 512" in notes
    if family == "flow":
        assert "FSDP" in notes and "--train_diffusiongan 0" in notes and "--resolution 512" in notes
    assert "--prompts" in notes or family == "edm"


def _docs_rows() -> dict:
    """preset -> (its --duration cell, its options as {name: [tokens]}, its source cell), from the md table."""
    rows = {}
    for line in DOCS.read_text().splitlines():
        m = re.match(r"\| `([\w-]+)` \| ([^|]+) \| ([\d.]+) \| `([^`]+)` \| ([^|]+) \|$", line)
        if not m:
            continue
        options, name = {}, None
        for token in shlex.split(m[4]):
            if token.startswith("--"):
                name = token[2:].replace("-", "_")
                options[name] = []
            else:
                options[name].append(token)
        rows[m[1]] = (float(m[3]), options, m[5])
    return rows


def _docs_value(name: str, tokens: list):
    if not tokens:  # a switch: --x or --no-x
        return (False, name[3:]) if name.startswith("no_") else (True, name)
    if len(tokens) > 1:
        return tuple(int(t) for t in tokens)
    try:
        return float(tokens[0])
    except ValueError:
        return tokens[0]


def test_docs_table_holds_each_preset_and_its_source():
    rows = _docs_rows()
    assert list(rows) == NAMES  # every preset, in the module's order
    for name, (duration, options, source) in rows.items():
        values = {}
        for key, tokens in options.items():
            value = _docs_value(key, tokens)
            if isinstance(value, tuple) and isinstance(value[0], bool):
                value, key = value
            values[key] = value
        got = presets.PRESETS[name].values
        assert set(values) == set(got), (name, set(values) ^ set(got))
        bad = {k: (values[k], got[k]) for k in got if not same(values[k], got[k])}
        assert not bad, (name, bad)
        # the table's source is the script the transcription cites, and its length is the script's
        trainer, flags = published.SCRIPTS[name]
        assert duration == {**published.TRAIN_DEFAULTS[trainer], **flags}["duration"], name
        assert source.strip() == presets.PRESETS[name].source
        assert script_file(name) in source and re.search(r"\b[0-9a-f]{7,8}\b", source), (name, source)


def test_iterations_are_the_published_loops_count():
    """The published loop's count, run: cur_nimg grows by batch until it reaches total_kimg * 1000."""
    for mimg, batch in ((0.001, 256), (0.002, 512), (0.0025, 300), (0.003, 8192)):
        total, nimg, steps = int(mimg * 1000) * 1000, 0, 0
        while nimg < total:
            nimg += batch
            steps += 1
        assert presets.images_to_iterations(mimg, batch) == steps


# ---------------- what the presets make ----------------

@pytest.mark.parametrize("name", NAMES)
def test_each_preset_makes_a_valid_config_with_the_published_adam(name):
    cfg = presets.config(name)
    assert cfg.preset == name
    assert cfg.optimizer_eps == (1e-6 if cfg.precision == "fp16" else 1e-8)  # eps 1e-6 under --fp16, as published
    family, f = script_flags(name)
    if family != "edm":  # the scripts' kappa1, kappa2 = kappa3, kappa4
        k = cfg.guidance_scales()
        assert (k.k1, k.k2, k.k4) == (f["cfg_train_fake"], f["cfg_eval_fake"], f["cfg_eval_real"])


def test_ddpm_and_flow_presets_complete_with_their_recipe():
    rec = resolve(presets.config("sd15"), DiffusersDenoiser(TinyTimeNet(0), sd_schedule(), "eps"), text=True)
    assert (rec.cfg.fake_levels, rec.cfg.fake_weighting, rec.cfg.timesteps) == ("timesteps", "eps", (20, 979))
    assert rec.cfg.sigma_init == pytest.approx(2.501705607) and "lr" not in rec.chosen
    rec = resolve(presets.config("sana"), FlowDenoiser(TinyTimeNet(0)), text=True)
    t = [1.0 if math.isinf(s) else s / (1 + s) for s in rec.gen_sigmas]
    assert t == pytest.approx([1.0, 0.75, 0.5, 0.25], abs=1e-15) and rec.cfg.condition_dropout == 0.0


def test_ffhq_generator_adam_beta1_is_the_scripts(tmp_path):
    cfg = presets.config("ffhq64", iterations=1, batch=2, batch_gpu=None, precision="fp32", device="cpu",
                         augment_p=0,
                         run_dir=str(tmp_path), progress=False)
    trainer = Distiller(cfg, tiny_teacher())
    assert trainer.opt_g.param_groups[0]["betas"] == (0.9, 0.999)  # --g_beta1 0.9
    assert trainer.opt_fake.param_groups[0]["betas"] == (0.0, 0.999)


def test_a_preset_of_another_family_is_refused_by_the_trainer_too():
    with pytest.raises(ValueError, match="option preset sd3 is SiD-DiT's .* this teacher is an EDM network"):
        resolve(TrainConfig(preset="sd3"), EDMDenoiser(tiny_teacher()))
    with pytest.raises(ValueError, match="option preset 'nope' is not a preset; choose one of cifar10-uncond"):
        resolve(TrainConfig(preset="nope"), EDMDenoiser(tiny_teacher()))


# ---------------- which option wins ----------------

def _args(argv):
    return cli.build_parser().parse_args(["distill", *map(str, argv)])


def test_flags_override_the_config_file_which_overrides_the_preset(tmp_path):
    path = tmp_path / "options.yaml"
    path.write_text(yaml.safe_dump({"batch": 64, "lr": 2e-5, "seed": 3}))
    cfg = config_from_args(_args(["--preset", "cifar10-uncond", "--config", path, "--lr", "3e-5"]))
    assert (cfg.batch, cfg.lr, cfg.seed) == (64, 3e-5, 3)  # file over preset, flag over file
    assert (cfg.alpha, cfg.tmax, cfg.batch_gpu, cfg.iterations) == (1.2, 800, 16, 1953125)  # the preset's
    assert cfg.preset == "cifar10-uncond"
    assert TrainConfig().alpha is None and TrainConfig().batch is None  # below the preset: the defaults


def test_a_config_file_may_name_the_preset_and_the_flag_wins(tmp_path):
    path = tmp_path / "options.json"
    path.write_text(json.dumps({"preset": "sd15", "cfg": 3}))
    cfg = config_from_args(_args(["--config", path]))
    assert (cfg.preset, cfg.lr, cfg.cfg, cfg.guidance) == ("sd15", 1e-6, 3.0, "lsg")
    cfg = config_from_args(_args(["--config", path, "--preset", "sd21"]))
    assert (cfg.preset, cfg.cfg) == ("sd21", 3.0)
    path.write_text(json.dumps({"guidance": "long"}))  # valid over the preset only: its scale stays
    cfg = config_from_args(_args(["--config", path, "--preset", "sd15"]))
    assert (cfg.guidance, cfg.cfg) == ("long", 2.0)


def test_a_preset_value_yields_to_the_same_thing_said_another_way():
    cfg = config_from_args(_args(["--preset", "cifar10-uncond", "--sigma-init", "2"]))
    assert (cfg.sigma_init, cfg.t_init) == (2.0, None)
    cfg = config_from_args(_args(["--preset", "sd15", "--guidance", "none"]))
    assert (cfg.guidance, cfg.cfg) == ("none", None)
    cfg = config_from_args(_args(["--preset", "sd15", "--guidance", "long"]))  # takes the preset's scale
    assert (cfg.guidance, cfg.cfg) == ("long", 2.0)


def test_a_resumed_run_keeps_its_checkpoints_options(tmp_path, capsys):
    run = tmp_path / "run"
    code, _, err = run_main(["distill", "--preset", "cifar10-uncond", "--teacher", "nets:tiny_teacher",
                             "--run-dir", run, "--augment-p", "0", *SMALL], capsys)  # the tiny teacher: no
    assert code == 0, err                                                             # augment_labels
    cfg = config_from_args(_args(["--resume", run, "--iterations", "3"]))
    assert (cfg.preset, cfg.alpha, cfg.batch, cfg.iterations) == ("cifar10-uncond", 1.2, 4, 3)
    cfg = config_from_args(_args(["--resume", run, "--preset", "cifar10-uncond"]))  # the same: nothing changes
    assert (cfg.batch, cfg.iterations) == (4, 2)
    with pytest.raises(ValueError, match="option preset sida-cifar10-uncond: a resumed run keeps"):
        config_from_args(_args(["--resume", run, "--preset", "sida-cifar10-uncond"]))


# ---------------- the command line ----------------

def test_distill_with_a_preset_prints_it_and_records_it(tmp_path, capsys):
    run = tmp_path / "run"
    argv = ["distill", "--preset", "cifar10-uncond", "--teacher", "nets:tiny_teacher", "--run-dir", run, *SMALL]
    code, out, err = run_main(argv, capsys)  # the tiny teacher takes no augment_labels: SiD's augmentation
    assert code == 2 and "--augment-p 0.12: the fake score takes no augment_labels" in err
    code, out, err = run_main([*argv, "--augment-p", "0"], capsys)
    assert code == 0, err
    assert "preset cifar10-uncond (SiD: mingyuanzhou/SiD main 01fbb13c, run_sid.sh cifar10-uncond" in out
    assert "overridden by your options: --batch 4 (preset 256), --iterations 2 (preset 1953125), --augment-p 0" \
        in out
    assert "not set by sidfast: --dropout 0.13" in out
    saved = json.loads((run / "config.json").read_text())
    assert saved["preset"] == "cifar10-uncond"
    for name, value in presets.PRESETS["cifar10-uncond"].values.items():
        if name not in ("batch", "iterations", "augment_p"):  # given on the command line
            assert same(saved[name], value), (name, saved[name], value)
    assert (saved["batch"], saved["iterations"], saved["fake_levels"]) == (4, 2, "lognormal")  # + the recipe


def test_preset_list_prints_every_preset_without_a_teacher(capsys):
    code, out, err = run_main(["distill", "--preset", "list"], capsys)
    assert code == 0, err
    for name, preset in presets.PRESETS.items():
        assert f"{name}  ({preset.paper}" in out and presets.flags(preset.values) in out
    assert "not set by sidfast: --dropout 0.05" in out


def test_help_names_the_preset_option(capsys):
    with pytest.raises(SystemExit):
        cli.main(["distill", "--help"])
    assert "--preset" in capsys.readouterr().out


@pytest.mark.slow
@pytest.mark.parametrize("name,kind", [("sd15", "sd"), ("sd3", "flux")])
def test_a_text_preset_trains_a_pipeline_teacher_from_the_command_line(tmp_path, capsys, name, kind):
    """The SiD-LSG and SiD-DiT presets as given (batch-gpu 1 or 16, fp32 or bf16 autocast, activation
    checkpointing) on tiny pipelines; only the length and the batch are the test's."""
    from test_recipes import _text_pipelines

    pipelines = _text_pipelines()
    pipe = tmp_path / "pipe"
    (pipelines.save_sd_pipeline if kind == "sd" else pipelines.save_flux_pipeline)(pipe)
    prompts = tmp_path / "p.txt"
    prompts.write_text("a cat\na dog\n")
    run = tmp_path / "run"
    code, out, err = run_main(["distill", "--preset", name, "--teacher", pipe, "--prompts", prompts, "--run-dir", run,
                               *SMALL, *(["--image-shape", "4", "4", "4"] if kind == "flux" else [])], capsys)
    assert code == 0, err
    assert f"preset {name} (" in out and "not set by sidfast: " in out
    saved = json.loads((run / "config.json").read_text())
    for option, value in presets.PRESETS[name].values.items():
        if option not in ("batch", "iterations"):
            assert same(saved[option], value), (option, saved[option], value)
    k = TrainConfig.from_dict({n: v for n, v in saved.items() if n in {f.name for f in TrainConfig.fields()}})
    assert k.guidance_scales().k4 == presets.PRESETS[name].values["cfg"]


def test_sid_then_sid2a_from_their_presets(tmp_path, capsys):
    """SiD's preset, then SiD²A's from its checkpoint with real images: the SiDA options arrive, the tiny
    teacher's missing augmentation input is refused until --augment-p 0, and the GAN gates are the script's."""
    import numpy as np

    data = tmp_path / "digits.npz"
    np.savez(data, images=np.random.default_rng(0).integers(0, 256, (16, 4, 4, 1), dtype=np.uint8))
    sid = tmp_path / "sid"
    assert run_main(["distill", "--preset", "cifar10-uncond", "--teacher", "nets:tiny_teacher", "--augment-p", "0",
                     "--run-dir", sid,
                     *SMALL], capsys)[0] == 0
    argv = ["distill", "--preset", "sid2a-cifar10-uncond", "--teacher", "nets:tiny_teacher", "--data", data,
            "--init-generator", sid / "checkpoint.pt", "--disc-layer", "inp", "--run-dir", tmp_path / "sid2a", *SMALL]
    code, _, err = run_main(argv, capsys)
    assert code == 2 and "--augment-p 0.12: the fake score takes no augment_labels" in err
    code, out, err = run_main([*argv, "--augment-p", "0"], capsys)
    assert code == 0, err
    assert "overridden by your options: --batch 4 (preset 256), --iterations 2 (preset 390625), --augment-p 0 " \
           "(preset 0.12)" in out
    saved = json.loads((tmp_path / "sid2a" / "config.json").read_text())
    assert (saved["method"], saved["alpha"], saved["gan_start_kimg"], saved["g_start_kimg"], saved["loss_scale_gan"],
            saved["batch_gpu"]) == ("sid2a", 1.0, 200.0, 100.0, 0.01, 32)
