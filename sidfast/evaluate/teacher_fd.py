"""The teacher-feature distance (``--eval teacher-fd``): a Frechet distance between the student's samples and
the teacher's own samples, in features of the teacher network itself. Needs no download and works for any
teacher sidfast loads.

Features of a sample x (``TeacherFeatures``): the teacher looks at x_t = x + SIGMA eps at the fixed noise
level SIGMA (eps drawn per sample index, the same for every set measured); the activation at the end of its
encoder (the SiDA discriminator tap, ``sidfast.models.discriminator``: EDM's last lowest-resolution block,
a diffusers UNet's last down block, a DiT's input to its output projection) is averaged over positions, one
number per channel, and channels beyond DIM are projected to DIM dimensions by a fixed orthonormal matrix. A
teacher without an encoder the tap knows (a network of non-image data) is looked at through its denoised
output D(x_t; SIGMA), flattened and projected the same way. The reference: NUM samples of the teacher with
the Heun sampler of the run's teacher grid, drawn once and cached in the run directory. Manual:
docs/runs.md, "The teacher-feature distance".
"""
from __future__ import annotations

from pathlib import Path

import torch
from torch import nn

from sidfast import guidance
from sidfast.evaluate.frechet import feature_statistics, frechet_from_root, sqrt_psd
from sidfast.evaluate.shards import per_sample_normal, sharded
from sidfast.generator import generator_sigmas, sample
from sidfast.labels import format_labels
from sidfast.models.discriminator import DiscriminatorTap
from sidfast.samplers import edm_sample, one_step_sample
from sidfast.training.evaluation import EvalRun, Metric
from sidfast.utils import runtime
from sidfast.utils.files import atomic_save

NUM = 2048           # samples per evaluation and in the reference (default)
DIM = 64             # feature dimensions at most: NUM / DIM = 32 samples per dimension for the covariance
SIGMA = 0.5          # the noise level at which the teacher looks at samples (EDM's sigma_data)
PROJECTION_SEED = 20261206
REFERENCE_NAME = "teacher_fd_reference.pt"
FORMAT = "sidfast.teacher-fd-reference"
VERSION = 1
# roles of the per-sample draws (``shards.sample_seed``): fixed, so that every run of a teacher measures
# against the same reference, at the same latents and noise
REFERENCE, STUDENT, NOISE, RENOISE = 1, 2, 3, 4


def channel_means(activation: torch.Tensor) -> torch.Tensor:
    """(B, C, ...) -> (B, C): the mean over positions of each channel (a (B, C) activation as it is)."""
    a = activation.float()
    return a.flatten(2).mean(2) if a.dim() > 2 else a


def token_means(activation: torch.Tensor) -> torch.Tensor:
    """(B, T, C) -> (B, C): a token sequence's mean over its tokens (the features of a linear layer are its
    last dimension)."""
    a = activation.float()
    return a.flatten(1, -2).mean(1) if a.dim() > 2 else a


def projection(raw: int, dim: int) -> torch.Tensor | None:
    """A fixed (raw, dim) matrix of orthonormal columns (QR of seeded Gaussian draws), or None when ``raw``
    <= ``dim``: the same matrix in every run, so that values stay comparable across runs and resumes."""
    if raw <= dim:
        return None
    g = torch.Generator().manual_seed(PROJECTION_SEED + raw)
    q, _ = torch.linalg.qr(torch.randn(raw, dim, generator=g, dtype=torch.float64))
    return q.float()


def sample_labels(run: EvalRun, start: int, n: int):
    """The class labels of samples start .. start + n - 1 of an evaluation: sample i has class i mod the
    classes (None for an unconditional run)."""
    if not run.num_classes:
        return None
    idx = torch.arange(start, start + n, device=run.device) % run.num_classes
    return format_labels(idx, run.num_classes, run.label_format, check=False)


def sample_cond(run: EvalRun, start: int, n: int) -> dict:
    """The text conditions of samples start .. start + n - 1: sample i has prompt i mod the prompts ({} for
    a run without text)."""
    conditioning = run.conditioning
    if conditioning is None or getattr(conditioning, "conditioner", None) is None:
        return {}
    prompts = conditioning.prompts
    return conditioning.conditioner.condition([prompts[(start + i) % len(prompts)] for i in range(n)])


def student_samples(run: EvalRun, start: int, n: int, labels, cond) -> torch.Tensor:
    """Samples start .. start + n - 1 of the run's EMA generator: all of its K steps, at the latents of
    those sample indices (fresh noise of a K-step generator seeded by the chunk's first index)."""
    cfg = run.cfg
    z = per_sample_normal(run.image_shape, start, n, STUDENT).to(run.device)
    if cfg.gen_steps == 1:
        return one_step_sample(run.generator, z, cfg.sigma_init, labels, cond=cond)
    fresh = torch.Generator(device=run.device).manual_seed(start + (RENOISE << 48))
    levels = generator_sigmas(cfg.gen_steps, cfg.sigma_init, cfg.step_spacing)
    return sample(run.generator, z, labels, levels, cfg.renoise, fresh, cond=cond)


class TeacherFeatures:
    """The teacher's features of samples (module docstring): ``features(x, start, labels, cond)`` -> (n, dim)
    on the CPU for samples start .. start + n - 1. ``layer``: the tap (``--disc-layer`` syntax), None: the
    family default, or the denoised output when the teacher has none (``self.layer`` is then "output")."""

    def __init__(self, teacher: nn.Module, sigma: float = SIGMA, dim: int = DIM, layer: str | None = None):
        self.teacher = teacher
        self.sigma = float(sigma)
        self.dim_cap = int(dim)
        self.spec_layer = layer
        try:
            tap = DiscriminatorTap(teacher, layer, split=False)
        except ValueError:
            if layer is not None:
                raise
            self.layer, self.pool = "output", None
        else:
            tap.remove()
            self.layer = tap.layer
            self.pool = token_means if isinstance(tap.module, nn.Linear) else channel_means
        self.raw_dim = None
        self.matrix = None

    def probe(self, x: torch.Tensor, labels, cond: dict) -> None:
        """Fix the raw dimension (and the projection) from one forward of a few samples."""
        self.raw_dim = self._raw(x, labels, cond).shape[1]
        self.matrix = projection(self.raw_dim, self.dim_cap)

    @property
    def dim(self) -> int:
        return min(self.raw_dim, self.dim_cap)

    def spec(self) -> dict:
        """What the features depend on: a reference computed with another spec is recomputed."""
        return {"layer": self.layer, "sigma": self.sigma, "raw_dim": self.raw_dim, "dim": self.dim,
                "projection_seed": PROJECTION_SEED if self.matrix is not None else None}

    def _raw(self, x: torch.Tensor, labels, cond: dict, start: int = 0) -> torch.Tensor:
        n = x.shape[0]
        eps = per_sample_normal(x.shape[1:], start, n, NOISE).to(x.device)
        x_t = x.float() + self.sigma * eps
        sigma = torch.full((n,), self.sigma, device=x.device)
        if self.pool is None:
            return self.teacher(x_t, sigma, labels, **cond).float().flatten(1)
        tap = DiscriminatorTap(self.teacher, self.layer, split=False, reduce=self.pool)
        try:
            return tap.encoder_logits(x_t, sigma, labels, **cond)
        finally:
            tap.remove()

    def __call__(self, x: torch.Tensor, start: int, labels, cond: dict) -> torch.Tensor:
        f = self._raw(x, labels, cond, start)
        if self.matrix is not None:
            f = f @ self.matrix.to(f.device)
        return f.float().cpu()


class _GuidedTeacher(nn.Module):
    """The teacher under classifier-free guidance at scale k (the run's k4), for the reference samples."""

    def __init__(self, teacher: nn.Module, null, scale: float):
        super().__init__()
        self.teacher, self.null, self.scale = teacher, null, float(scale)

    def forward(self, x, sigma, class_labels=None, **cond):
        condition = class_labels if class_labels is not None else cond
        return guidance.guided(self.teacher, x, sigma, condition, self.null, self.scale)


class TeacherFD(Metric):
    """``--eval teacher-fd``: the Frechet distance, in ``TeacherFeatures``, between ``num`` samples of the
    run's EMA generator and the teacher's reference samples (lower is better; the teacher's own fresh
    samples measure near the floor set by ``num``)."""

    name = "teacher-fd"
    lower_is_better = True

    def __init__(self, num: int | None = None, ref: str | None = None, sigma: float = SIGMA, dim: int = DIM):
        self.num = int(num) if num is not None else NUM
        self.ref = ref
        self.sigma = sigma
        self.dim_cap = dim
        self.features = None
        self.reference = None  # {"mu", "sigma", "root" (of sigma), "path"}

    # ---- what a sample is: latents, labels, prompts (module functions, shared with in-loop FID) ----
    def _labels(self, run: EvalRun, start: int, n: int):
        return sample_labels(run, start, n)

    def _cond(self, run: EvalRun, start: int, n: int) -> dict:
        return sample_cond(run, start, n)

    def _features(self, run: EvalRun, num: int, make) -> torch.Tensor:
        """Features (num, dim) of the samples ``make(start, n, labels, cond)`` gives chunk by chunk, sample i
        with its label (prompt) i mod the classes (prompts), over all ranks."""
        def chunk(start, n):
            labels, cond = self._labels(run, start, n), self._cond(run, start, n)
            return self.features(make(start, n, labels, cond), start, labels, cond)
        return sharded(run.dist, num, run.batch, chunk)

    def features_of_samples(self, run: EvalRun, samples: torch.Tensor) -> torch.Tensor:
        """Features (N, dim) of given samples (N, *image_shape)."""
        with torch.no_grad():
            return self._features(run, samples.shape[0],
                                  lambda start, n, labels, cond: samples[start:start + n].to(run.device))

    # ---- the reference ----
    def _sampling_spec(self, run: EvalRun, num: int) -> dict:
        cfg = run.cfg
        return {"teacher": cfg.teacher, "image_shape": list(run.image_shape), "num_classes": run.num_classes,
                "label_format": run.label_format, "prompts": cfg.prompts, "num": num,
                "steps": cfg.teacher_steps or 18, "sigma_min": cfg.sigma_min, "sigma_max": cfg.sigma_max,
                "rho": cfg.rho, "guidance": cfg.guidance_scales().k4}

    def _teacher_sampler(self, run: EvalRun) -> nn.Module:
        k4 = run.cfg.guidance_scales().k4
        null = getattr(run.conditioning, "null", None)
        return _GuidedTeacher(run.teacher, null, k4) if k4 != 1 and null is not None else run.teacher

    def _teacher_samples(self, run: EvalRun, num: int) -> torch.Tensor:
        cfg = run.cfg
        net = self._teacher_sampler(run)

        def chunk(start, n):
            z = per_sample_normal(run.image_shape, start, n, REFERENCE).to(run.device)
            labels, cond = self._labels(run, start, n), self._cond(run, start, n)
            return edm_sample(net, z, cfg.teacher_steps or 18, cfg.sigma_min, cfg.sigma_max, cfg.rho,
                              class_labels=labels, cond=cond)
        return sharded(run.dist, num, run.batch, chunk)

    def _read_reference(self, path: Path, given: bool) -> dict | None:
        if not path.is_file():
            if given:
                raise ValueError(f"option eval_ref {str(path)!r} does not exist; give a {REFERENCE_NAME} "
                                 f"written by a teacher-fd run of this teacher, or leave it out")
            return None
        try:
            data = torch.load(path, map_location="cpu", weights_only=True)
        except Exception as exc:  # torch raises many kinds for a file that is not a torch file
            if given:
                raise ValueError(f"option eval_ref {str(path)!r} is not a teacher-fd reference (not a torch "
                                 f"file: {type(exc).__name__})") from None
            return None
        if not isinstance(data, dict) or data.get("format") != FORMAT or data.get("version") != VERSION:
            if given:
                raise ValueError(f"option eval_ref {str(path)!r} is not a teacher-fd reference (format "
                                 f"{data.get('format') if isinstance(data, dict) else type(data).__name__!r}; "
                                 f"expected {FORMAT!r} version {VERSION}, a {REFERENCE_NAME} of a run)")
            return None
        return data

    def setup(self, run: EvalRun) -> None:
        """The features (their dimension from one probe forward) and the reference statistics: read from the
        cache (``--eval-ref`` or run_dir/teacher_fd_reference.pt) when it matches, else the teacher sampled
        once over all ranks, rank 0 writing the cache."""
        cfg = run.cfg
        self.features = TeacherFeatures(run.teacher, self.sigma, self.dim_cap,
                                        layer=cfg.disc_layer if cfg.adversarial else None)
        probe = torch.zeros((2, *run.image_shape), device=run.device)
        self.features.probe(probe, self._labels(run, 0, 2), self._cond(run, 0, 2))
        dim = self.features.dim
        if self.num <= dim:
            raise ValueError(f"option eval_num ({self.num}) must exceed the teacher-fd feature dimension "
                             f"({dim}): the covariance of {self.num} samples in {dim} dimensions is singular")
        given = self.ref is not None
        path = Path(self.ref) if given else Path(run.run_dir) / REFERENCE_NAME
        data = self._read_reference(path, given)
        wanted = self._sampling_spec(run, self.num)
        if given:  # another run's reference of this teacher: its own count and sampler
            held = data["sampling"]
            for key in ("image_shape", "num_classes", "label_format"):
                if held.get(key) != wanted[key]:
                    raise ValueError(f"option eval_ref {str(path)!r} holds samples of {key} {held.get(key)}, "
                                     f"this run's teacher makes {wanted[key]}")
            if int(held["num"]) <= dim:
                raise ValueError(f"option eval_ref {str(path)!r} holds {held['num']} samples, not more than "
                                 f"the feature dimension {dim}: their covariance is singular")
        elif data is not None and data.get("sampling") != wanted:
            data = None  # another teacher, sampler or count: sampled again
        if data is not None and data.get("features") == self.features.spec():
            mu, sigma = data["mu"], data["sigma"]
        else:
            samples = data["samples"] if data is not None else self._teacher_samples(run, self.num)
            mu, sigma = feature_statistics(self.features_of_samples(run, samples))
            if not given and run.dist.rank == 0:
                atomic_save({"format": FORMAT, "version": VERSION, "sampling": wanted,
                             "features": self.features.spec(), "samples": samples, "mu": mu, "sigma": sigma},
                            path, keep_previous=False)
            runtime.barrier(run.dist)  # every rank reads rank 0's file from here on
        self.reference = {"mu": mu, "sigma": sigma, "root": sqrt_psd(sigma), "path": str(path)}

    # ---- the measurement ----
    def student_samples(self, run: EvalRun, start: int, n: int, labels, cond) -> torch.Tensor:
        return student_samples(run, start, n, labels, cond)

    def compute(self, run: EvalRun) -> float:
        return self.distance_of_features(self._features(run, self.num, lambda start, n, labels, cond:
                                                        self.student_samples(run, start, n, labels, cond)))

    def distance_of_features(self, feats: torch.Tensor) -> float:
        """FD of features (N, dim) (``self.features`` of samples) to the reference."""
        if self.reference is None:
            raise RuntimeError("TeacherFD.setup(run) must run before a distance is measured")
        mu, sigma = feature_statistics(feats)
        ref = self.reference
        return frechet_from_root(ref["mu"], ref["sigma"], ref["root"], mu, sigma)

    def distance(self, run: EvalRun, samples: torch.Tensor) -> float:
        """FD of given samples (N, *image_shape) to the reference, sample i taken with the label (or
        prompt) i mod the classes (prompts) and noise eps_i, as ``compute`` takes the student's: the demo's
        teacher and initial generator measured beside its students."""
        return self.distance_of_features(self.features_of_samples(run, samples))


__all__ = ["TeacherFD", "TeacherFeatures", "student_samples", "sample_labels", "sample_cond", "channel_means",
           "token_means", "projection", "NUM", "DIM", "SIGMA", "REFERENCE_NAME"]
