"""The SiD training configuration: every option with the published default (``docs/math.md``, "Published
recipe") and a one-line help; filled from the command line and from YAML/JSON files (``sidfast.cli``)."""
from __future__ import annotations

import dataclasses
import json
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional

import yaml

from sidfast.generator import RENOISE, SPACINGS
from sidfast.guidance import PRESETS, GuidanceScales
from sidfast.models.lora import NETWORK_KINDS

PRECISIONS = ("fp32", "bf16", "fp16")
GUIDANCE_NAMES = tuple(PRESETS)  # the guidance settings of --guidance, as sidfast.guidance defines them
LABEL_FORMATS = ("auto", "onehot", "index")
ENGINES = ("eager", "fused")
NOISES = ("auto", "kernel", "torch")
METHODS = ("sid", "sida", "sid2a")
ADVERSARIAL = ("sida", "sid2a")
GEN_LABELS = ("data", "uniform")  # where SiDA's generator step takes its class labels  # the methods that train on real images with the fake score's encoder as D
# per-sample weights of the SiD generator loss: sid (1/w), then SiD-DiT's schemes in the flow time t =
# sigma / (1 + sigma) (published names: 1_minus_sigma, 1_minus_sigma_squared, 1_over_sigma, 1_over_sigma2,
# snr, snr_sqrt)
GENERATOR_WEIGHTINGS = ("auto", "sid", "1-t", "(1-t)^2", "1/t", "1/t^2", "snr", "sqrt-snr")
FAKE_WEIGHTINGS = ("auto", "edm", "eps", "v", "x0", "flow", "min_snr_eps", "min_snr_v")
LEVEL_LAWS = ("auto", "lognormal", "rho", "timesteps", "logit-normal")
RECIPE_NAMES = ("auto", "edm", "ddpm", "flow")
FSDP_PRECISIONS = ("fp32", "bf16")
EVAL_METRICS = ("teacher-fd", "fid")  # --eval: what sidfast.evaluate.loop_metrics may measure in the loop
CHECKPOINT_NAME = "checkpoint.pt"
SHARDED_CHECKPOINT_NAME = "checkpoint.dcp"  # a directory: torch.distributed.checkpoint shards + meta.pt


def _f(default, help: str, trajectory: bool = False, choices: tuple | None = None):
    """A field with its help line; ``trajectory``: changing it on resume makes the run differ from an
    uninterrupted one (the trainer warns); ``choices``: the values the command line shows as {a,b}."""
    return field(default=default, metadata={"help": help, "trajectory": trajectory, "choices": choices})


def _t(default, help: str, choices: tuple | None = None):
    return _f(default, help, trajectory=True, choices=choices)


@dataclass
class TrainConfig:
    """SiD distillation options; defaults are the published CIFAR-10 recipe (``docs/math.md``, "Published
    recipe")."""

    # recipe
    method: str = _t("sid", "sid (data-free SiD), sida (SiD plus a GAN on real images, the fake score's encoder "
                            "as discriminator; needs --data) or sid2a (sida from a SiD generator; needs "
                            "--init-generator)", choices=METHODS)
    recipe: str = _t("auto", "the published recipe whose values fill every option left unset: edm (SiD/SiDA on "
                             "EDM networks), ddpm (SiD-LSG: Stable Diffusion and other DDPM-table teachers), "
                             "flow (SiD-DiT: SD3, FLUX, SANA); auto: the teacher's family (docs/recipes.md)",
                     choices=RECIPE_NAMES)
    preset: Optional[str] = _f(None, "a published launch script (SiD, SiDA, SiD2A, SiD-LSG, SiD-DiT) whose options "
                                     "fill those you do not give; list: print the presets (docs/presets.md)")
    iterations: int = _f(1_580_000, "SiD iterations to run (published CIFAR-10: ~1.58M at batch 256, "
                                    "~400M images)")
    batch: Optional[int] = _t(None, "generator samples per update, summed over all processes (default: the "
                                    "recipe's: edm 256, ddpm 512, flow 256)")
    lr: Optional[float] = _t(None, "Adam learning rate of the generator (default: the recipe's: edm 1e-5 "
                                   "(published 4e-6 on ImageNet 64), ddpm 1e-6, flow 5e-6)")
    fake_lr: Optional[float] = _t(None, "Adam learning rate of the fake score (default: same as lr)")
    lr_cooldown: float = _t(0.0, "fraction of the run's iterations, at its end, over which both learning rates "
                                 "fall linearly towards 0 (0: constant, as published)")
    betas: tuple = _t((0.0, 0.999), "Adam betas of both optimizers (published: 0 0.999)")
    generator_beta1: Optional[float] = _t(None, "Adam beta1 of the generator's optimizer (default: the first of "
                                                "--betas; published SiD FFHQ 64: 0.9)")
    adam_eps: Optional[float] = _t(None, "Adam epsilon (default: 1e-8, or 1e-6 with fp16 as published)")
    alpha: Optional[float] = _t(None, "SiD alpha, weight of the ||f_phi - f_psi||^2 term (default: the "
                                      "recipe's: edm 1.2 for sid (1.0 on AFHQ), 1.0 for sida and sid2a; ddpm "
                                      "and flow 1.0)")
    t_init: Optional[float] = _t(None, "the generator's first noise level in the teacher's own time: sigma (edm), "
                                       "an integer timestep (ddpm) or t in (0, 1] (flow; 1 is pure noise) "
                                       "(default: the recipe's: edm 2.5, ddpm 625, flow 1)")
    sigma_init: Optional[float] = _t(None, "the generator's first noise level as an EDM sigma, x_g = G(sigma_init z, "
                                           "sigma_init), for any teacher (default: from --t-init)")
    tmax: int = _t(800, "generator-loss noise levels use t ~ U(0, tmax/1000) on EDM's rho schedule (1..1000)")
    sigma_min: float = _t(0.002, "smallest sigma of the rho schedule")
    sigma_max: float = _t(80.0, "largest sigma of the rho schedule")
    rho: float = _t(7.0, "rho of EDM's sigma schedule")
    fake_levels: str = _t("auto", "noise levels of the fake-score loss: lognormal (ln sigma ~ N(p_mean, "
                                  "p_std^2)), rho (EDM's rho schedule up to tmax), timesteps (integer t of a ddpm "
                                  "teacher's table in --timesteps), logit-normal (flow t = sigmoid(N(mean, std^2))) "
                                  "(default: the recipe's: edm lognormal, ddpm timesteps, flow logit-normal)",
                          choices=LEVEL_LAWS)
    gen_levels: str = _t("auto", "noise levels of the generator loss, one of the laws of --fake-levels (default: "
                                 "the recipe's: edm rho, ddpm timesteps, flow logit-normal)", choices=LEVEL_LAWS)
    timesteps: tuple = _t((20, 979), "the timesteps law: integer t ~ U{LO..HI}, both included (published SiD-LSG: "
                                     "20 979, i.e. randint(20, 980))")
    p_mean: float = _t(-1.2, "the lognormal law: ln sigma ~ N(p_mean, p_std^2)")
    p_std: float = _t(1.2, "the lognormal law: standard deviation of ln sigma")
    fake_weighting: str = _t("auto", "weighting of the fake-score loss: edm (EDM's lambda on the x0 error), eps "
                                     "(unweighted eps MSE; equal to the v MSE times snr/(snr+1)), v, x0, flow "
                                     "(velocity MSE), min_snr_eps, min_snr_v (default: the recipe's: edm edm, ddpm "
                                     "eps, flow flow)", choices=FAKE_WEIGHTINGS)
    condition_dropout: Optional[float] = _t(None, "probability of the null condition per sample in the "
                                                  "fake-score step (default: the recipe's: edm and ddpm 0.1 while "
                                                  "guidance k1 or k2 is not 1, else 0; flow 0)")
    sigma_data: float = _t(0.5, "data standard deviation in EDM's loss weighting")
    loss_scale_g: Optional[float] = _t(None, "generator loss scale (default: the recipe's: edm 100, ddpm 1, "
                                             "flow 100)")
    loss_scale_fake: float = _t(1.0, "fake-score loss scale (published loss_scaling = 1)")
    ema_halflife_kimg: Optional[float] = _t(None, "EMA half-life of the generator in thousands of images; 0: "
                                                  "no EMA (default: the recipe's: edm 500, ddpm 50, flow 0)")
    ema_rampup_ratio: Optional[float] = _t(0.05, "EMA ramp-up: half-life <= ratio * images seen (none: off)")
    seed: int = _t(0, "random seed; rank r of w processes seeds with seed * w + r as published")

    # SiDA and SiD2A (Zhou et al., ICLR 2025, "Adversarial Score identity Distillation")
    data: Optional[str] = _t(None, "sida/sid2a: real images: a folder, dataset.zip (EDM/StyleGAN layout), "
                                   ".npz/.npy or .pt file (docs/data.md)")
    augment_p: float = _t(0.0, "EDM augmentation probability of the fake-score step's images, generated (and "
                               "sida/sid2a's real ones) (published: 0.12 CIFAR-10, 0.15 FFHQ/AFHQ, 0 ImageNet "
                               "64); needs a fake score that takes augment_labels (EDM's augment_dim=9)")
    disc_layer: Optional[str] = _t(None, "sida/sid2a: the fake score's module whose output gives the "
                                         "discriminator logits, dotted path (path:input for its input) (default: "
                                         "the family's encoder end, e.g. EDM's last lowest-resolution enc block)")
    init_generator: Optional[str] = _t(None, "sid2a: a sidfast distill checkpoint of a SiD run; its EMA "
                                             "generator initialises G and G's EMA (published SiD2A)")
    gan_start_kimg: float = _t(200.0, "sida/sid2a: the GAN term joins the generator loss once more than this "
                                      "many thousand images were seen (published: 200)")
    g_start_kimg: float = _t(100.0, "sida/sid2a: the generator optimizer steps only once more than this many "
                                    "thousand images were seen (published: 100)")
    loss_scale_gan: float = _t(0.01, "sida/sid2a: scale of the generator's GAN loss (published "
                                     "loss_scaling_G_gan = 0.01)")
    loss_scale_d: float = _t(1.0, "sida/sid2a: scale of the discriminator loss (published: 1 for EDM networks, "
                                  "100 for EDM2)")
    gen_labels: str = _t("data", "sida/sid2a: class labels of the generator step: data (those of the next real "
                                 "batch, so the student trains on the data's class frequencies, as published) or "
                                 "uniform (drawn uniformly; the real-data stream then advances once per "
                                 "iteration)", choices=GEN_LABELS)

    # guidance, conditioning and the few-step generator (docs/math.md, "Guidance (SiD-LSG)", "Few-step
    # generator")
    guidance: str = _t("auto", "SiD-LSG guidance: none, lsg (k1=k2=k4=K), long (teacher only, K > 1), short "
                               "(fake score while trained only, K < 1), zero (Zero-CFG), anti (fake score in "
                               "the generator loss, K < 0); K is --cfg; auto: lsg when --cfg is given or the "
                               "recipe guides (ddpm and flow teachers with --prompts), else none",
                       choices=("auto",) + GUIDANCE_NAMES)
    cfg: Optional[float] = _t(None, "the guidance scale K of --guidance (default: the recipe's: ddpm 2, flow 4.5; "
                                    "published LSG: 1.5, 2, 3, 4.5)")
    cfg_fake_train: Optional[float] = _t(None, "k1: guidance of the fake score while it is trained (default: "
                                               "from --guidance)")
    cfg_fake: Optional[float] = _t(None, "k2 = k3: guidance of the fake score inside the generator loss "
                                         "(default: from --guidance)")
    cfg_teacher: Optional[float] = _t(None, "k4: guidance of the teacher inside the generator loss (default: "
                                            "from --guidance)")
    null_class: Optional[int] = _t(None, "index-label (diffusers) teachers: the class index trained as 'no "
                                         "label', needed for guidance (default: none)")
    prompts: Optional[str] = _t(None, "text file of prompts, one per line, for a text-to-image teacher "
                                      "(default: none)")
    gen_steps: Optional[int] = _t(None, "generator steps K: each iteration trains k* ~ U{1..K} steps, sampling runs "
                                        "K (default: the recipe's: edm 1, ddpm 1, flow 4)")
    step_spacing: str = _t("auto", "noise levels of the K generator steps: linear in sigma, or flow (linear in "
                                   "t = sigma / (1 + sigma)) (default: the recipe's: edm and ddpm linear, flow "
                                   "flow)", choices=("auto",) + SPACINGS)
    renoise: str = _t("fresh", "noise that re-noises each generator step's input: fresh, fixed (the first "
                               "z) or ddim", choices=RENOISE)
    generator_weighting: str = _t("auto", "per-sample weight of the SiD loss: sid (1/w, published SiD), or in "
                                          "t = sigma/(1+sigma) as SiD-DiT offers them: 1-t, (1-t)^2, 1/t, 1/t^2, "
                                          "snr ((1-t)^2/t^2), sqrt-snr ((1-t)/t) (default: the recipe's: edm and "
                                          "ddpm sid, flow 1-t)", choices=GENERATOR_WEIGHTINGS)
    flow_logit_mean: float = _t(math.log(2), "the logit-normal law: logit(t) = ln sigma ~ N(mean, std^2) "
                                             "(published SiD-DiT: ln 2 = 0.693; SD3's own training: 0)")
    flow_logit_std: float = _t(1.6, "the logit-normal law: standard deviation of logit(t) (published SiD-DiT: "
                                    "1.6; SD3's own training: 1)")

    # networks & performance
    teacher: Optional[str] = _f(None, "teacher: sidfast checkpoint, local diffusers directory, or "
                                      "module:function")
    num_classes: Optional[int] = _t(None, "classes of a conditional teacher (default: read from the network)")
    label_format: str = _t("auto", "class labels as onehot (EDM) or index (diffusers); auto picks by network",
                           choices=LABEL_FORMATS)
    image_shape: Optional[tuple] = _t(None, "generator output shape C H W (default: read from the network)")
    batch_gpu: Optional[int] = _t(None, "samples per process per forward pass; smaller than batch/world "
                                        "accumulates")
    precision: str = _t("fp32", "network precision: fp32, bf16 (autocast) or fp16 (autocast); fp32 losses",
                        choices=PRECISIONS)
    device: str = _f("auto", "device: auto, cpu, cuda or cuda:N (auto picks cuda when available)")
    engine: str = _t("eager", "score networks: eager (plain calls) or fused (sidfast.engine.scores: one batched "
                              "call, CUDA graphs)", choices=ENGINES)
    fake_score: str = _t("full", "fake score: full (published: a trainable copy of the teacher) or lora "
                                 "(a low-rank update over the teacher's frozen, shared weights: no copy)",
                         choices=NETWORK_KINDS)
    generator: str = _t("full", "generator: full (published: a trainable copy of the teacher) or lora (a "
                                "low-rank update over the teacher's frozen, shared weights; its EMA and "
                                "checkpoints hold the factors only)", choices=NETWORK_KINDS)
    lora_rank: int = _t(64, "rank of the LoRA updates (with fake_score lora and/or generator lora: one rank "
                            "for both)")
    noise: str = _t("auto", "eps of both updates: kernel (drawn inside the fused noising kernel from a seed "
                            "of torch's RNG; the fake-score loss regenerates it, nothing stored), torch "
                            "(torch.randn, the published draw) or auto (kernel where sidfast's Triton "
                            "kernels run, e.g. CUDA; torch elsewhere)", choices=NOISES)
    compile: bool = _f(False, "torch.compile the generator and, with engine fused, the score networks")
    fsdp: bool = _f(False, "shard the generator, its EMA, the fake score and the teacher over the processes "
                           "with FSDP2 (per block); checkpoints become checkpoint.dcp directories that "
                           "resume at any number of processes (default: DDP, a full copy per process)")
    fsdp_precision: str = _t("fp32", "with fsdp: bf16 all-gathers and computes in bf16 parameters and "
                                     "reduces gradients in fp32 (MixedPrecisionPolicy); fp32 keeps fp32",
                             choices=FSDP_PRECISIONS)
    activation_checkpointing: bool = _f(False, "recompute each network block's activations in backward "
                                               "instead of keeping them (less memory, one more forward)")

    # outputs
    run_dir: str = _f("runs/sid", "output directory: checkpoint.pt, metrics.jsonl, PNG grids, losses.png")
    checkpoint_every: int = _f(1000, "write checkpoint.pt every N iterations (0: only at the end and on "
                                     "signals)")
    log_every: int = _f(10, "append averaged losses to metrics.jsonl and refresh the progress display every "
                            "N")
    sample_every: int = _f(1000, "write a student sample grid every N iterations (0: start and end only)")
    grid_size: int = _f(64, "images in each sample grid (0: no grids)")
    teacher_steps: int = _f(18, "Heun steps for the teacher's sample grid (0: no teacher grid)")
    progress: bool = _f(True, "show a progress bar on a terminal (elsewhere, and without it: periodic log "
                              "lines)")
    eval: Optional[str] = _f(None, "a metric measured in the loop, logged to metrics.jsonl and losses.png, best.pt "
                                   "kept by it: teacher-fd (Frechet distance to the teacher's own samples in its "
                                   "encoder's features; no download) or fid (docs/runs.md) (default: none)",
                             choices=EVAL_METRICS)
    eval_every: float = _f(0.0, "with eval: measure every N thousand images (kimg), besides the run's start "
                                "and end (0: start and end only)")
    eval_ref: Optional[str] = _f(None, "with eval: the reference; teacher-fd: a teacher_fd_reference.pt written "
                                       "by a run of the same teacher (default: the teacher sampled once into "
                                       "run_dir), fid: reference statistics (.npz)")
    eval_num: Optional[int] = _f(None, "with eval: samples per evaluation (default: the metric's; teacher-fd "
                                       "2048, fid 10000)")
    eval_inception: Optional[str] = _f(None, "with eval fid: the Inception detector file (default: the one in "
                                             "$SIDFAST_CACHE or ~/.cache/sidfast, as sidfast eval finds it)")
    resume: Optional[str] = _f(None, "continue from this checkpoint ('auto': run_dir/checkpoint.pt)")
    overwrite: bool = _f(False, "start afresh even if run_dir already holds a checkpoint")

    # ---- construction ----
    @classmethod
    def fields(cls) -> list[dataclasses.Field]:
        return list(dataclasses.fields(cls))

    @classmethod
    def help(cls, name: str) -> str:
        return {f.name: f.metadata["help"] for f in cls.fields()}[name]

    @classmethod
    def option(cls, name: str) -> str:
        """The command-line spelling of field ``name``: ``option("batch_gpu") -> "--batch-gpu"``."""
        if name not in {f.name for f in cls.fields()}:
            raise ValueError(f"TrainConfig has no field {name!r}")
        return "--" + name.replace("_", "-")

    @classmethod
    def trajectory_options(cls) -> tuple[str, ...]:
        """Fields that change the random draws or the arithmetic of the run (resuming with another value
        gives another run than the uninterrupted one)."""
        return tuple(f.name for f in cls.fields() if f.metadata["trajectory"])

    @classmethod
    def from_dict(cls, values: dict, base: "TrainConfig | None" = None) -> "TrainConfig":
        """A config from a mapping of option names (dashes or underscores) to values, over ``base``."""
        if not isinstance(values, dict):
            raise ValueError(f"a config must be a mapping of option names to values, got {type(values).__name__}")
        known = {f.name for f in cls.fields()}
        clean = {}
        for key, value in values.items():
            name = str(key).replace("-", "_")
            if name not in known:
                raise ValueError(f"unknown option {key!r}; valid options: {', '.join(sorted(known))}")
            clean[name] = value
        cfg = dataclasses.replace(base, **clean) if base is not None else cls(**clean)
        return cfg.validate()

    @classmethod
    def from_file(cls, path, base: "TrainConfig | None" = None) -> "TrainConfig":
        """A config from a YAML (.yaml/.yml) or JSON (.json) file of option names to values."""
        path = Path(path)
        if not path.is_file():
            raise FileNotFoundError(f"config file {str(path)!r} does not exist")
        try:
            text = path.read_text(encoding="utf-8")
        except OSError as exc:
            raise OSError(f"config file {str(path)!r} cannot be read: {exc.strerror or exc}") from None
        suffix = path.suffix.lower()
        try:
            if suffix == ".json":
                data = json.loads(text)
            elif suffix in (".yaml", ".yml"):
                data = yaml.safe_load(text)
            else:
                raise ValueError(f"config file {str(path)!r} must end in .yaml, .yml or .json")
        except (json.JSONDecodeError, ImportError) as exc:
            raise ValueError(f"config file {str(path)!r} is not valid {suffix[1:].upper()}: {exc}") from None
        except Exception as exc:  # yaml.YAMLError
            if type(exc).__module__.startswith("yaml"):
                raise ValueError(f"config file {str(path)!r} is not valid YAML: {exc}") from None
            raise
        if data is None:
            data = {}
        try:
            return cls.from_dict(data, base)
        except ValueError as exc:
            raise ValueError(f"config file {str(path)!r}: {exc}") from None

    def replace(self, **changes) -> "TrainConfig":
        return dataclasses.replace(self, **changes).validate()

    def to_dict(self) -> dict:
        d = dataclasses.asdict(self)
        return {k: (list(v) if isinstance(v, tuple) else v) for k, v in d.items()}

    def split_batch(self, world: int) -> tuple[int, int, int]:
        """(samples per process, samples per forward pass, micro-batches per update) over ``world`` processes."""
        if self.batch % world:
            raise ValueError(f"{self.option('batch')} ({self.batch}) must be divisible by the number of "
                             f"processes ({world})")
        per_process = self.batch // world
        per_pass = min(self.batch_gpu or per_process, per_process)
        if per_process % per_pass:
            raise ValueError(f"{self.option('batch_gpu')} ({per_pass}) must divide the per-process batch "
                             f"({per_process} = {self.option('batch')} {self.batch} / {world} processes)")
        return per_process, per_pass, per_process // per_pass

    # ---- validation ----
    def validate(self) -> "TrainConfig":
        """Coerce types and check ranges; raises TypeError/ValueError naming the option. Returns self."""
        def num(name, kind=float, lo=None, hi=None, lo_open=False, optional=False):
            v = getattr(self, name)
            if v is None and optional:
                return
            if isinstance(v, str) and optional and v.strip().lower() in ("none", "null", "off"):
                setattr(self, name, None)
                return
            if isinstance(v, bool) or not isinstance(v, (int, float, str)):
                raise TypeError(f"option {name} must be a number, got {v!r}")
            what = "an integer" if kind is int else "a number"
            try:
                v = float(v)
            except ValueError:
                raise ValueError(f"option {name} must be {what}, got {getattr(self, name)!r}") from None
            if kind is int:
                if not v.is_integer():
                    raise ValueError(f"option {name} must be {what}, got {getattr(self, name)!r}")
                v = int(v)
            if kind is float and not math.isfinite(v):
                raise ValueError(f"option {name} must be finite, got {v}")
            if lo is not None and (v <= lo if lo_open else v < lo):
                raise ValueError(f"option {name} must be {'>' if lo_open else '>='} {lo}, got {v}")
            if hi is not None and v > hi:
                raise ValueError(f"option {name} must be <= {hi}, got {v}")
            setattr(self, name, v)

        num("iterations", int, 0)
        num("batch", int, 1, optional=True)
        num("batch_gpu", int, 1, optional=True)
        num("lr", float, 0, lo_open=True, optional=True)
        num("fake_lr", float, 0, lo_open=True, optional=True)
        num("lr_cooldown", float, 0, 1)
        num("adam_eps", float, 0, lo_open=True, optional=True)
        num("generator_beta1", float, 0, optional=True)
        if self.generator_beta1 is not None and self.generator_beta1 >= 1:
            raise ValueError(f"option generator_beta1 must be in [0, 1), got {self.generator_beta1}")
        num("alpha", float, optional=True)
        if isinstance(self.sigma_init, str) and self.sigma_init.strip().lower() in ("inf", "infinity"):
            self.sigma_init = math.inf  # t = 1 of a flow teacher: pure noise
        if not (isinstance(self.sigma_init, float) and self.sigma_init == math.inf):
            num("sigma_init", float, 0, lo_open=True, optional=True)
        if self.t_init is not None and not (isinstance(self.t_init, str) and
                                            self.t_init.strip().lower() in ("none", "null", "off")):
            v = self.t_init
            try:
                v = float(v) if not isinstance(v, bool) else None
            except (TypeError, ValueError):
                v = None
            if v is None or not math.isfinite(v) or v <= 0:
                raise ValueError(f"option t_init must be a positive number in the teacher's own time, got "
                                 f"{self.t_init!r}")
            self.t_init = v
        else:
            self.t_init = None

        num("tmax", int, 1, 1000)
        num("sigma_min", float, 0, lo_open=True)
        num("sigma_max", float, 0, lo_open=True)
        if self.sigma_min >= self.sigma_max:
            raise ValueError(f"option sigma_min ({self.sigma_min}) must be below option sigma_max "
                             f"({self.sigma_max})")
        num("rho", float, 0, lo_open=True)
        num("p_mean", float)
        num("p_std", float, 0, lo_open=True)
        num("sigma_data", float, 0, lo_open=True)
        num("loss_scale_g", float, 0, lo_open=True, optional=True)
        num("condition_dropout", float, 0, 1, optional=True)
        num("loss_scale_fake", float, 0, lo_open=True)
        num("ema_halflife_kimg", float, 0, optional=True)
        num("ema_rampup_ratio", float, 0, lo_open=True, optional=True)
        num("seed", int, 0)
        num("num_classes", int, 0, optional=True)
        num("lora_rank", int, 1)
        num("augment_p", float, 0, 1)
        num("gan_start_kimg", float, 0)
        num("g_start_kimg", float, 0)
        num("loss_scale_gan", float, 0, lo_open=True)
        num("loss_scale_d", float, 0, lo_open=True)
        for name in ("cfg", "cfg_fake_train", "cfg_fake", "cfg_teacher"):
            num(name, float, optional=True)
        num("null_class", int, 0, optional=True)
        num("gen_steps", int, 1, optional=True)
        num("flow_logit_mean", float)
        num("flow_logit_std", float, 0, lo_open=True)
        for name in ("checkpoint_every", "log_every", "sample_every", "grid_size", "teacher_steps"):
            num(name, int, 0)
        if self.log_every < 1:
            raise ValueError(f"option log_every must be >= 1, got {self.log_every}")
        betas = self.betas
        if isinstance(betas, str):
            betas = betas.replace(",", " ").split()
        try:
            betas = tuple(float(b) for b in betas)
        except (TypeError, ValueError):
            raise ValueError(f"option betas must be two numbers, got {self.betas!r}") from None
        if len(betas) != 2 or not all(0 <= b < 1 for b in betas):
            raise ValueError(f"option betas must be two numbers in [0, 1), got {self.betas!r}")
        self.betas = betas
        steps = self.timesteps
        if isinstance(steps, str):
            steps = steps.replace(",", " ").split()
        try:
            steps = tuple(int(t) for t in steps)
        except (TypeError, ValueError):
            raise ValueError(f"option timesteps must be two integers LO HI, got {self.timesteps!r}") from None
        if len(steps) != 2 or not 0 <= steps[0] <= steps[1]:
            raise ValueError(f"option timesteps must be two integers 0 <= LO <= HI, got {self.timesteps!r}")
        self.timesteps = steps
        if self.image_shape is not None:
            shape = self.image_shape
            if isinstance(shape, str):
                shape = shape.replace(",", " ").replace("x", " ").split()
            try:
                shape = tuple(int(s) for s in shape)
            except (TypeError, ValueError):
                raise ValueError(f"option image_shape must be integers C H W, got {self.image_shape!r}") from None
            if not shape or any(s < 1 for s in shape):
                raise ValueError(f"option image_shape must be positive integers, got {self.image_shape!r}")
            self.image_shape = shape
        for name, choices in (("precision", PRECISIONS), ("label_format", LABEL_FORMATS), ("engine", ENGINES),
                              ("fake_score", NETWORK_KINDS), ("generator", NETWORK_KINDS), ("noise", NOISES),
                              ("method", METHODS), ("guidance", ("auto",) + GUIDANCE_NAMES),
                              ("step_spacing", ("auto",) + SPACINGS), ("renoise", RENOISE),
                              ("recipe", RECIPE_NAMES), ("fake_levels", LEVEL_LAWS), ("gen_levels", LEVEL_LAWS),
                              ("fake_weighting", FAKE_WEIGHTINGS),
                              ("generator_weighting", GENERATOR_WEIGHTINGS),
                              ("fsdp_precision", FSDP_PRECISIONS), ("gen_labels", GEN_LABELS)):
            if getattr(self, name) not in choices:
                raise ValueError(f"option {name} must be one of {', '.join(choices)}, got {getattr(self, name)!r}")
        for name in ("run_dir", "device"):
            if not isinstance(getattr(self, name), str) or not getattr(self, name):
                raise ValueError(f"option {name} must be a non-empty string, got {getattr(self, name)!r}")
        self.guidance_scales()
        for name in ("teacher", "resume", "data", "disc_layer", "init_generator", "prompts", "preset"):
            v = getattr(self, name)
            if v is not None and not isinstance(v, str):
                raise ValueError(f"option {name} must be a string, got {v!r}")
        for name in ("progress", "overwrite", "compile", "fsdp", "activation_checkpointing"):
            v = getattr(self, name)
            if isinstance(v, str) and v.lower() in ("true", "false", "yes", "no", "1", "0"):
                v = v.lower() in ("true", "yes", "1")
            if not isinstance(v, bool):
                raise ValueError(f"option {name} must be true or false, got {v!r}")
            setattr(self, name, v)
        self._validate_eval(num)
        if self.fsdp and self.engine != "eager":
            raise ValueError(f"{self.option('engine')} {self.engine} evaluates the score networks over "
                             f"frozen views of unsharded weights; with {self.option('fsdp')} use "
                             f"{self.option('engine')} eager")
        if self.fsdp and self.generator == "lora":
            raise ValueError(f"{self.option('generator')} lora shares the teacher's weights, which "
                             f"{self.option('fsdp')} shards as the teacher's (or the LoRA fake score's) own; "
                             f"with {self.option('fsdp')} use {self.option('generator')} full")
        if self.fsdp_precision != "fp32" and not self.fsdp:
            raise ValueError(f"{self.option('fsdp_precision')} {self.fsdp_precision} needs "
                             f"{self.option('fsdp')}; without it use {self.option('precision')}")
        return self

    def _validate_eval(self, num) -> None:
        """The in-loop metric's options (``eval``, ``eval_every``, ``eval_ref``, ``eval_num``,
        ``eval_inception``)."""
        if isinstance(self.eval, str) and self.eval.strip().lower() in ("none", "null", "off"):
            self.eval = None
        if self.eval is not None and self.eval not in EVAL_METRICS:
            raise ValueError(f"option eval must be one of {', '.join(EVAL_METRICS)}, got {self.eval!r}")
        num("eval_every", float, 0)
        num("eval_num", int, 2, optional=True)
        if self.eval_ref is not None and (not isinstance(self.eval_ref, str) or not self.eval_ref):
            raise ValueError(f"option eval_ref must be a file name, got {self.eval_ref!r}")
        if self.eval_inception is not None and (not isinstance(self.eval_inception, str) or not self.eval_inception):
            raise ValueError(f"option eval_inception must be a file name, got {self.eval_inception!r}")
        given = [self.option(n) for n in ("eval_ref", "eval_num", "eval_inception") if getattr(self, n) is not None]
        given += [self.option("eval_every")] if self.eval_every else []
        if given and self.eval is None:
            raise ValueError(f"{', '.join(given)} {'belongs' if len(given) == 1 else 'belong'} to the in-loop "
                             f"metric, which is off: choose it with {self.option('eval')} "
                             f"{' or '.join(EVAL_METRICS)}, or leave {'it' if len(given) == 1 else 'them'} out")

    def check_method(self) -> None:
        """Options that belong to one method, checked when a run starts (not in ``validate``, so that a config
        file and the command line may each give part of them); whether sida has real images is checked by
        the trainer, since ``distill(data=...)`` may give them instead of ``data``."""
        if self.method == "sid2a" and self.init_generator is None:
            raise ValueError(f"{self.option('method')} sid2a starts from a SiD generator: pass "
                             f"{self.option('init_generator')} CKPT (a sidfast distill checkpoint)")
        if self.init_generator is not None and self.method != "sid2a":
            raise ValueError(f"{self.option('init_generator')} initialises the generator of "
                             f"{self.option('method')} sid2a; this run is {self.option('method')} {self.method}")
        if self.method == "sid":
            given = [self.option(n) for n in ("data", "disc_layer") if getattr(self, n) is not None]
            given += [self.option("gen_labels")] if self.gen_labels != "data" else []
            if given:
                raise ValueError(f"{', '.join(given)} belong to {self.option('method')} sida or sid2a "
                                 "(SiD is data-free)")

    @property
    def adversarial(self) -> bool:
        """Whether the method trains on real images with the fake score's encoder as discriminator."""
        return self.method in ADVERSARIAL

    @property
    def sid_alpha(self) -> float:
        """alpha of the SiD loss: the option, else the method's published value (SiD 1.2, SiDA 1.0)."""
        if self.alpha is not None:
            return self.alpha
        return 1.0 if self.adversarial else 1.2

    def guidance_scales(self):
        """SiD-LSG's (k1, k2 = k3, k4) from ``guidance`` at scale ``cfg``, then the explicit
        ``cfg_fake_train``, ``cfg_fake`` and ``cfg_teacher`` over them
        (``sidfast.guidance.GuidanceScales``)."""
        name = self.guidance
        if name == "auto":  # before the recipe decides: lsg when a scale is given
            name = "lsg" if self.cfg is not None else "none"
        takes_scale = name not in ("none", "zero")
        if takes_scale and self.cfg is None:
            raise ValueError(f"option guidance {name} needs its scale: option cfg K")
        if not takes_scale and self.cfg is not None:
            raise ValueError(f"option cfg is the scale of option guidance lsg, long, short or anti; guidance "
                             f"{name} takes none")
        if name not in PRESETS:
            raise ValueError(f"option guidance must be one of {', '.join(GUIDANCE_NAMES)}, got {name!r}")
        try:
            base = GuidanceScales.preset(name, self.cfg if takes_scale else None)
        except ValueError as exc:
            raise ValueError(f"option guidance {name} with option cfg {self.cfg}: {exc}") from None
        k1 = base.k1 if self.cfg_fake_train is None else self.cfg_fake_train
        k2 = base.k2 if self.cfg_fake is None else self.cfg_fake
        k4 = base.k4 if self.cfg_teacher is None else self.cfg_teacher
        return GuidanceScales(k1=k1, k2=k2, k4=k4)

    @property
    def optimizer_eps(self) -> float:
        return self.adam_eps if self.adam_eps is not None else (1e-6 if self.precision == "fp16" else 1e-8)
