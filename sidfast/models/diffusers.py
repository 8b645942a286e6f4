"""diffusers' VP (DDPM) UNets as EDM denoisers, and the scheduler-config discovery that reads their schedule and
prediction type from a ``save_pretrained`` directory."""
from __future__ import annotations

import json
from pathlib import Path

import torch

from sidfast import predictions
from sidfast.models.interface import Denoiser, _name_of, _unwrap, check_output, sigma_per_sample
from sidfast.models.introspect import infer_num_classes
from sidfast.schedules import VPSchedule, broadcast


def load_options(torch_dtype: torch.dtype | None = None) -> dict:
    """Keyword arguments of a diffusers ``from_pretrained``: ``torch_dtype`` when given, and without
    ``accelerate`` installed ``low_cpu_mem_usage=False`` (the default diffusers falls back to anyway), which
    keeps diffusers from printing its "pip install accelerate" notice on every load."""
    import importlib.util

    kw = {} if torch_dtype is None else {"torch_dtype": torch_dtype}
    if importlib.util.find_spec("accelerate") is None:
        kw["low_cpu_mem_usage"] = False
    return kw


def scheduler_config_candidates(root: Path, model_dir: Path) -> list[Path]:
    """Where the scheduler config of the model in ``model_dir`` of the diffusers directory ``root`` may be, in
    the order looked at, each once: a pipeline's ``scheduler/``, beside the model, beside a pipeline's model."""
    candidates = [root / "scheduler" / "scheduler_config.json", root / "scheduler_config.json",
                  model_dir / "scheduler_config.json", model_dir.parent / "scheduler" / "scheduler_config.json"]
    return list(dict.fromkeys(candidates))  # a model directory at the root names some twice


class MissingSchedulerConfig(FileNotFoundError):
    """A diffusers directory without a scheduler config; ``looked_for`` lists the paths tried, once each."""

    def __init__(self, looked_for: list[str]):
        self.looked_for = looked_for
        super().__init__("no scheduler config to read the schedule and prediction type from (looked for "
                         f"{', '.join(map(repr, looked_for))}); save the model's scheduler there or pass "
                         "schedule= and prediction=")


class DiffusersDenoiser(Denoiser):
    """A VP (DDPM) network in diffusers' calling convention, seen as an EDM denoiser.

    VE -> VP (``docs/math.md``, "Forward process and schedules"): ``abar = 1 / (1 + sigma^2)``, ``a = sqrt(abar)``, ``s = a * sigma``,
    ``x_vp = a * x``; the timestep is the continuous ``t`` with ``alphas_cumprod[t] = abar``, found by
    linear interpolation in log-sigma between table entries (exact at the table's sigmas) and clamped to
    the table's range. The output (eps, v or x0) becomes ``x0_hat`` through ``predictions.to_x0``.

    Args:
        unet: ``UNet2DModel`` / ``UNet2DConditionModel`` or anything called as
            ``unet(x_vp, timesteps, class_labels=..., **cond)`` returning a tensor or an object with
            ``.sample`` (``UNet2DConditionModel`` needs ``encoder_hidden_states=...`` in ``cond``).
        schedule: the ``VPSchedule`` the network was trained on.
        prediction: "eps", "v" or "x0" (diffusers' "epsilon", "v_prediction", "sample" accepted).
        learned_variance: the network outputs ``2 * C`` channels (mean, variance); keep the first ``C``.
        null_class: for a class-conditional network (``num_class_embeds``) trained with label dropout, the
            index it was given for a dropped label; it must be the last embedding, so the network has
            ``num_class_embeds - 1`` classes. Without it all ``num_class_embeds`` are classes and guidance is
            impossible.
    """

    label_format = "index"

    def __init__(self, unet, schedule: VPSchedule, prediction: str, learned_variance: bool = False,
                 null_class: int | None = None, name: str | None = None):
        super().__init__(name)
        if not callable(unet):
            raise TypeError(f"unet must be an nn.Module or a callable, got {type(unet).__name__}")
        if not isinstance(schedule, VPSchedule):
            raise TypeError(f"schedule must be a sidfast.schedules.VPSchedule, got {type(schedule).__name__}")
        self.prediction = predictions.canonical(prediction)
        if self.prediction == "flow":
            raise ValueError("prediction 'flow' is not a VP prediction; wrap flow-matching models with FlowDenoiser")
        config = getattr(unet, "config", None)
        if getattr(config, "time_embedding_type", "positional") == "fourier":
            raise ValueError(f"{_name_of(unet)} uses a Fourier (score-SDE, sigma-conditioned) time embedding; "
                             "it is not a VP network: wrap it with EDMDenoiser")
        self.unet = unet
        self.schedule = schedule
        self.learned_variance = bool(learned_variance)
        embeds = getattr(config, "num_class_embeds", None)
        if null_class is not None:
            if not embeds:
                raise ValueError(f"null_class={null_class!r} for {_name_of(unet)}, which has no class embedding "
                                 "(num_class_embeds is not set)")
            if isinstance(null_class, bool) or not isinstance(null_class, int) or null_class != embeds - 1:
                raise ValueError(f"null_class must be the last class embedding, {embeds - 1} (num_class_embeds "
                                 f"{embeds} = classes + the null class), got {null_class!r}")
        self.null_class = null_class
        ac = schedule.alphas_cumprod
        log_sigma = 0.5 * (torch.log1p(-ac) - torch.log(ac))  # log sqrt((1 - abar) / abar), rising in t
        if not bool((log_sigma[1:] > log_sigma[:-1]).all()):
            raise ValueError("alphas_cumprod must be strictly decreasing to map sigma to a timestep")
        self._log_sigma64 = log_sigma
        self.register_buffer("log_sigma_table", log_sigma.clone(), persistent=False)

    def _apply(self, fn, recurse=True):
        super()._apply(fn, recurse)
        # the sigma -> timestep table stays float64 whatever .to(dtype) did (only its device follows)
        self.log_sigma_table = self._log_sigma64.to(self.log_sigma_table.device)
        return self

    @property
    def network(self):
        return self.unet

    @property
    def num_classes(self) -> int:
        embeds = infer_num_classes(self.unet)
        return embeds - 1 if self.null_class is not None else embeds

    def null_labels(self, batch: int, device=None) -> torch.Tensor:
        """``null_class`` for every sample (the index the network was trained with for a dropped label)."""
        if self.null_class is None:
            if infer_num_classes(self.unet):
                raise ValueError(f"{self.label()} has no null class: classifier-free guidance needs a network "
                                 "trained with label dropout; pass null_class= (its index for a dropped label, "
                                 "the last class embedding) if it was, otherwise guidance is impossible with it")
            raise ValueError(self._no_guidance())
        return torch.full((batch,), self.null_class, dtype=torch.long, device=device)

    @classmethod
    def from_pretrained(cls, path, prediction: str | None = None, schedule: VPSchedule | None = None,
                        subfolder: str | None = None, torch_dtype: torch.dtype | None = None,
                        null_class: int | None = None, name: str | None = None) -> "DiffusersDenoiser":
        """Load a local directory written by diffusers' ``save_pretrained``.

        Accepted layouts: a pipeline directory (``model_index.json``, ``unet/``, ``scheduler/``), or a model
        directory (``config.json`` + weights) with ``scheduler_config.json`` beside it or in ``scheduler/``.
        ``prediction`` and ``schedule`` override what the scheduler config says; without a scheduler config
        both are required.
        """
        import diffusers  # diffusers stays optional: only loading a pretrained model needs it

        root = Path(path)
        if not root.is_dir():
            raise FileNotFoundError(f"pretrained path {str(root)!r} is not a directory")
        model_dir = root / subfolder if subfolder else root
        if subfolder is None and not (root / "config.json").is_file():
            index = root / "model_index.json"
            if (root / "unet").is_dir():
                model_dir = root / "unet"
            elif index.is_file():
                entries = json.loads(index.read_text())
                names = [k for k, v in entries.items() if isinstance(v, list) and k in ("unet", "transformer")]
                if names:
                    model_dir = root / names[0]
        model_config = model_dir / "config.json"
        if not model_config.is_file():
            raise FileNotFoundError(f"no model config: {str(model_config)!r} does not exist (looked for a model "
                                    f"directory or a pipeline with unet/ under {str(root)!r})")
        class_name = json.loads(model_config.read_text()).get("_class_name")
        model_cls = getattr(diffusers, class_name, None) if isinstance(class_name, str) else None
        if model_cls is None or not hasattr(model_cls, "from_pretrained"):
            raise ValueError(f"{str(model_config)!r} names model class {class_name!r}, which diffusers does not have")

        scheduler = None
        if schedule is None or prediction is None:
            candidates = scheduler_config_candidates(root, model_dir)
            found = next((c for c in candidates if c.is_file()), None)
            if found is None:
                raise MissingSchedulerConfig([str(c) for c in candidates])
            sconf = json.loads(found.read_text())
            sched_name = sconf.get("_class_name")
            sched_cls = getattr(diffusers, sched_name, None) if isinstance(sched_name, str) else None
            if sched_cls is None:
                raise ValueError(f"{str(found)!r} names scheduler class {sched_name!r}, which diffusers does not have")
            scheduler = sched_cls.from_config(sconf)
            if schedule is None:
                if getattr(scheduler, "alphas_cumprod", None) is None:
                    raise ValueError(f"cannot determine a VP schedule: {sched_name} in {str(found)!r} has no "
                                     "alphas_cumprod (flow-matching and EDM schedulers are not VP); pass schedule=")
                schedule = VPSchedule.from_diffusers(scheduler)
            if prediction is None:
                prediction = getattr(scheduler.config, "prediction_type", None)
                if prediction is None:
                    raise ValueError(f"cannot determine the prediction type: {sched_name} in {str(found)!r} has no "
                                     "prediction_type; pass prediction=")
        try:
            prediction = predictions.canonical(prediction)
        except ValueError as exc:
            raise ValueError(f"unsupported prediction type {prediction!r} for a VP network: {exc}") from None
        variance = getattr(getattr(scheduler, "config", None), "variance_type", None)
        unet = model_cls.from_pretrained(str(model_dir), **load_options(torch_dtype))
        return cls(unet, schedule, prediction, learned_variance=variance in ("learned", "learned_range"),
                   null_class=null_class, name=name)

    def timesteps(self, sigma: torch.Tensor) -> torch.Tensor:
        """Continuous timesteps ``t`` (B,) float32 with ``sigma_t = sigma``, clamped to the table's range."""
        table = self.log_sigma_table
        ls = torch.log(sigma.to(torch.float64).clamp(min=1e-30))
        n = table.shape[0]
        hi = torch.searchsorted(table, ls).clamp(1, n - 1)
        lo = hi - 1
        w = (ls - table[lo]) / (table[hi] - table[lo])
        return (lo.to(torch.float64) + w).clamp(0, n - 1).to(torch.float32)

    def forward(self, x: torch.Tensor, sigma, class_labels=None, **cond) -> torch.Tensor:
        sig = sigma_per_sample(sigma, x)
        a = torch.rsqrt(1 + sig * sig)  # sqrt(abar), abar = 1 / (1 + sigma^2)
        s = a * sig  # sqrt(1 - abar)
        x_vp = x * broadcast(a, x).to(x.dtype)
        if class_labels is not None:
            cond = dict(cond, class_labels=class_labels)
        out = _unwrap(self.unet(x_vp, self.timesteps(sig), **cond))
        if self.learned_variance and isinstance(out, torch.Tensor) and out.dim() >= 2 \
                and out.shape[1] == 2 * x.shape[1]:
            out = out[:, : x.shape[1]]
        out = check_output(self.label(), out, x)
        return predictions.to_x0(out, x_vp, a, s, self.prediction).to(x.dtype)



__all__ = ["DiffusersDenoiser", "MissingSchedulerConfig", "scheduler_config_candidates"]
