"""The published recipe of each teacher family, and the run configuration it completes.

Every option a run leaves unset (None or "auto" in ``TrainConfig``) takes its family's published value:
EDM networks SiD/SiDA's, DDPM-table teachers (Stable Diffusion) SiD-LSG's, flow-matching teachers (SD3, FLUX,
SANA) SiD-DiT's. ``resolve`` then checks that every noise level the run will ask the teacher about lies in the
teacher's own range, so nothing is clamped behind the user's back. The table with its sources:
docs/recipes.md.
"""
from __future__ import annotations

import dataclasses
import math

from sidfast.models.family import FAMILY_WORDS, TeacherClock, teacher_family
from sidfast.noise_levels import LogitNormal, LogNormal, RhoSchedule, Timesteps
from sidfast.reference import generator_step_sigmas
from sidfast.training import presets
from sidfast.training.config import TrainConfig

# name -> value per family, with the published file each value comes from (docs/recipes.md shows this table)
RECIPES = {
    "edm": {
        "source": "SiD / SiDA (mingyuanzhou/SiD: run_sid.sh, sida/run_sida.sh; CIFAR-10)",
        "values": {"batch": 256, "lr": 1e-5, "alpha": None, "t_init": 2.5, "loss_scale_g": 100.0,
                   "ema_halflife_kimg": 500.0, "fake_levels": "lognormal", "gen_levels": "rho",
                   "fake_weighting": "edm", "generator_weighting": "sid", "gen_steps": 1, "step_spacing": "linear",
                   "guided_cfg": None, "dropout_rule": True},
    },
    "ddpm": {
        "source": "SiD-LSG (mingyuanzhou/SiD-LSG: run_sid.sh sd1.5 / sd2.1_base, sid_train.py, "
                  "training/sid_training_loop.py)",
        "values": {"batch": 512, "lr": 1e-6, "alpha": 1.0, "t_init": 625, "loss_scale_g": 1.0,
                   "ema_halflife_kimg": 50.0, "fake_levels": "timesteps", "gen_levels": "timesteps",
                   "fake_weighting": "eps", "generator_weighting": "sid", "gen_steps": 1, "step_spacing": "linear",
                   "guided_cfg": 2.0, "dropout_rule": True},
    },
    "flow": {
        "source": "SiD-DiT (apple/ml-sid-dit: run_sid_dit.sh, sid_dit_sd3_train.py, "
                  "training/sid_dit_sd3_training_loop.py)",
        "values": {"batch": 256, "lr": 5e-6, "alpha": 1.0, "t_init": 1.0, "loss_scale_g": 100.0,
                   "ema_halflife_kimg": 0.0, "fake_levels": "logit-normal", "gen_levels": "logit-normal",
                   "fake_weighting": "flow", "generator_weighting": "1-t", "gen_steps": 4, "step_spacing": "flow",
                   "guided_cfg": 4.5, "dropout_rule": False},
    },
}
CONDITION_DROPOUT = 0.1  # SiD-LSG: prompts dropped in the fake-score step while k1 or k2 is not 1


@dataclasses.dataclass
class Recipe:
    """A run's completed configuration: ``cfg`` with every recipe option set, the family and its clock, the
    two noise-level laws, the generator's K levels (EDM sigmas; the first may be inf) and which options the
    recipe filled (``chosen``: option -> value)."""

    family: str
    cfg: TrainConfig
    clock: TeacherClock
    fake_law: object
    gen_law: object
    gen_sigmas: list
    chosen: dict
    from_teacher: bool = True  # the family came from the teacher (option recipe auto)

    def lines(self) -> list[str]:
        """What ``sidfast distill`` prints at the start: the recipe, why, and what it filled."""
        src = RECIPES[self.family]["source"]
        why = f" (the teacher is {FAMILY_WORDS[self.family]})" if self.from_teacher else " (option --recipe)"
        out = presets.lines(self.cfg) if self.cfg.preset else []  # the launch script, then what the recipe filled
        out.append(f"sidfast distill: recipe {self.family}{why}: {src}")
        if self.chosen:
            out.append("  from the recipe: " + ", ".join(f"{TrainConfig.option(k)} {_show(v)}"
                                                         for k, v in self.chosen.items()))
        out.append(f"  fake-score noise levels: {self.fake_law.describe()}; generator loss: "
                   f"{self.gen_law.describe()}")
        return out


def _show(v) -> str:
    if isinstance(v, tuple):
        return " ".join(map(str, v))
    return f"{v:g}" if isinstance(v, float) else str(v)


def family_of(cfg: TrainConfig, teacher) -> str:
    """The recipe's family: ``cfg.recipe``, or the teacher's (``auto``)."""
    return teacher_family(teacher) if cfg.recipe == "auto" else cfg.recipe


def resolve(cfg: TrainConfig, teacher, text: bool = False) -> Recipe:
    """Complete ``cfg`` with the recipe of ``teacher``'s family (or ``cfg.recipe``) and check its noise levels
    against the teacher; ``text``: the run conditions on prompts (SiD-LSG and SiD-DiT guide them)."""
    family = family_of(cfg, teacher)
    clock = TeacherClock(teacher)
    if cfg.preset is not None:
        presets.check_family(cfg.preset, clock.family)
    values = RECIPES[family]["values"]
    chosen = {}
    changes = {}

    def fill(name, value):
        changes[name] = value
        chosen[name] = value

    for name in ("batch", "lr", "loss_scale_g", "ema_halflife_kimg", "gen_steps"):
        if getattr(cfg, name) is None:
            fill(name, values[name])
    if cfg.alpha is None and values["alpha"] is not None:
        fill("alpha", values["alpha"])
    for name in ("fake_levels", "gen_levels", "fake_weighting", "generator_weighting", "step_spacing"):
        if getattr(cfg, name) == "auto":
            fill(name, values[name])
    if cfg.guidance == "auto":
        if cfg.cfg is not None:
            fill("guidance", "lsg")
        elif values["guided_cfg"] is not None and text:
            fill("guidance", "lsg")
            fill("cfg", values["guided_cfg"])
        else:
            fill("guidance", "none")
    out = dataclasses.replace(cfg, **changes)
    if out.recipe == "auto":
        out.recipe = family
    scales = out.guidance_scales()
    if out.condition_dropout is None:
        rule = values["dropout_rule"] and (scales.k1 != 1 or scales.k2 != 1)
        fill("condition_dropout", CONDITION_DROPOUT if rule else 0.0)
        out.condition_dropout = changes["condition_dropout"]

    # the generator's first level: --sigma-init (EDM sigma) or --t-init (the teacher's own time)
    if out.sigma_init is not None and math.isinf(out.sigma_init) and clock.family != "flow":
        raise ValueError("option sigma_init inf (pure noise, t = 1) exists only for flow teachers; give a finite "
                         "option sigma_init or option t_init")
    if out.sigma_init is None:
        t_init = out.t_init if out.t_init is not None else values["t_init"]
        try:
            sigma_init = clock.sigma(t_init)
        except ValueError as exc:
            raise ValueError(f"option t_init {exc}") from None
        if out.t_init is None:
            chosen["t_init"] = t_init
        out.t_init, out.sigma_init = t_init, sigma_init
    elif out.t_init is not None:
        try:
            want = clock.sigma(out.t_init)
        except ValueError as exc:
            raise ValueError(f"option t_init {exc}") from None
        if not math.isclose(want, out.sigma_init, rel_tol=1e-9):
            raise ValueError(f"option t_init {_show(out.t_init)} is sigma {want:.6g} for this teacher, but option "
                             f"sigma_init is {out.sigma_init:g}; give one of them")
    else:
        out.t_init = clock.time(out.sigma_init)
    out.validate()

    fake_law = _law(out, out.fake_levels, clock, "fake_levels")
    gen_law = _law(out, out.gen_levels, clock, "gen_levels")
    gen_sigmas = _generator_levels(out, clock)
    return Recipe(family, out, clock, fake_law, gen_law, gen_sigmas, chosen, from_teacher=cfg.recipe == "auto")


def _law(cfg: TrainConfig, kind: str, clock: TeacherClock, option: str):
    """The noise-level law ``kind`` with its parameters; an error naming ``option`` when the teacher's range
    does not hold everything it draws."""
    if kind == "lognormal":
        law = LogNormal(cfg.p_mean, cfg.p_std)
    elif kind == "logit-normal":
        law = LogitNormal(cfg.flow_logit_mean, cfg.flow_logit_std)
    elif kind == "rho":
        law = RhoSchedule(cfg.tmax, cfg.sigma_min, cfg.sigma_max, cfg.rho)
    else:
        if clock.table is None:
            raise ValueError(f"option {option} timesteps draws integer timesteps of a DDPM table; this teacher is "
                             f"{FAMILY_WORDS[clock.family]} without one: use {_native_law(clock.family)}")
        lo, hi = cfg.timesteps
        if hi >= clock.table.numel():
            raise ValueError(f"option timesteps {lo} {hi} goes beyond the teacher's table (timesteps 0.."
                             f"{clock.table.numel() - 1}); lower HI")
        law = Timesteps(lo, hi, clock.table)
    lo, hi = law.support()
    if not clock.contains(lo, hi):
        a, b = clock.range
        raise ValueError(f"option {option} {kind} draws sigmas in [{lo:.4g}, {hi:.4g}], beyond what the teacher "
                         f"was trained on ([{a:.4g}, {b:.4g}], its table's ends); the teacher would be asked about "
                         f"noise levels it does not know: use {option} {_native_law(clock.family)}")
    return law


def _native_law(family: str) -> str:
    return {"edm": "lognormal or rho", "ddpm": "timesteps", "flow": "logit-normal"}[family]


def _generator_levels(cfg: TrainConfig, clock: TeacherClock) -> list[float]:
    """The K generator levels, each within the teacher's range; an infinite first level only for flow."""
    if math.isinf(cfg.sigma_init) and cfg.gen_steps > 1 and cfg.step_spacing != "flow":
        raise ValueError(f"option t_init 1 (pure noise) with option gen_steps {cfg.gen_steps} needs option "
                         f"step_spacing flow (levels linear in t)")
    levels = generator_step_sigmas(cfg.gen_steps, cfg.sigma_init, cfg.step_spacing)
    finite = [s for s in levels if math.isfinite(s)]
    if finite and not clock.contains(min(finite), max(finite)):
        a, b = clock.range
        raise ValueError(f"the generator's noise levels {', '.join(f'{s:.4g}' for s in levels)} (option t_init "
                         f"{_show(cfg.t_init)}, option gen_steps {cfg.gen_steps}) leave the teacher's range "
                         f"[{a:.4g}, {b:.4g}]; choose option t_init within it")
    return levels


__all__ = ["RECIPES", "Recipe", "resolve", "family_of", "CONDITION_DROPOUT"]
