"""One denoiser interface for teacher, fake score and generator, with adapters for what users have.

Every denoiser is an ``nn.Module`` called as ``forward(x, sigma, class_labels=None, **cond) -> x0_hat``
in EDM / variance-exploding coordinates (``docs/math.md``, "Forward process and schedules": a = 1, s = sigma): ``x = x0 + sigma * eps``,
``sigma`` a ``(B,)`` tensor (a number, a 0-d tensor or ``(B, 1, ..., 1)`` also accepted), the output
the denoised estimate with the shape, dtype and device of ``x``.

Adapters (the conversions of ``docs/math.md``, "Predictions", via ``sidfast.predictions``):

- ``EDMDenoiser(net)``: any EDM-style module ``net(x, sigma, class_labels) -> x0`` (the published SiD
  teachers), called unchanged.
- ``DiffusersDenoiser(unet, schedule, prediction)``: diffusers ``UNet2DModel`` / ``UNet2DConditionModel``
  (any ``unet(x_vp, timesteps, **kw).sample``) trained on a VP schedule with eps, v or x0 targets.
- ``FlowDenoiser(model)``: flow-matching models predicting ``eps - x0`` at ``(1 - t) x0 + t eps``.

Class labels are passed in the network's own format (``Denoiser.label_format``: one-hot for EDM networks,
indices for diffusers); ``Denoiser.labels(idx)`` makes them from class indices and ``null_condition(batch)``
gives the keywords of the unconditional (null-label) call that classifier-free guidance needs. Text-conditioned
teachers take their prompt embeddings through ``**cond`` (``sidfast.models.text.TextConditioner`` computes them and
their null, empty-prompt, condition).
No adapter syncs with the host in ``forward``, so all of them can be compiled and captured in CUDA graphs.
"""
from __future__ import annotations

import inspect
import json
import numbers
from pathlib import Path

import torch
from torch import nn

from sidfast import predictions
from sidfast._checks import per_sample
from sidfast.models.io import import_entry_point
from sidfast.schedules import VPSchedule, broadcast


def _name_of(net) -> str:
    return type(net).__name__ if not isinstance(net, str) else net


def sigma_per_sample(sigma, x: torch.Tensor) -> torch.Tensor:
    """``sigma`` as a ``(B,)`` tensor on ``x``'s device in float32 (float64 for float64 ``x``).

    Accepts a real number, a 0-d tensor, a ``(B,)`` tensor or one of shape ``(B, 1, ..., 1)``.
    """
    return per_sample("sigma", sigma, x, dtype=torch.promote_types(x.dtype, torch.float32))


def _autocast_dtype(device: torch.device):
    """The autocast dtype active for ``device``'s type, or None when autocast is off there."""
    kind = device.type
    try:
        if torch.is_autocast_enabled(kind):
            return torch.get_autocast_dtype(kind)
    except (TypeError, RuntimeError):  # a device type autocast does not know
        return None
    return None


def check_output(name: str, out, x: torch.Tensor) -> torch.Tensor:
    """Return ``out`` (in ``x``'s dtype) or raise naming the network when it does not match its input.

    Under autocast a lower-precision output in the autocast dtype is accepted and cast back to ``x``'s dtype;
    any other dtype, shape or device difference is a ValueError (a TypeError if ``out`` is not a tensor).
    """
    if not isinstance(out, torch.Tensor):
        raise TypeError(f"network {name} returned {type(out).__name__}, expected a tensor")
    if out.shape != x.shape:
        raise ValueError(f"network {name} returned shape {tuple(out.shape)} for an input of shape {tuple(x.shape)}")
    if out.device != x.device:
        raise ValueError(f"network {name} returned a tensor on {out.device} for an input on {x.device}")
    if out.dtype != x.dtype:
        if out.dtype != _autocast_dtype(x.device):
            raise ValueError(f"network {name} returned dtype {out.dtype} for an input of dtype {x.dtype}")
        out = out.to(x.dtype)
    return out


def _unwrap(out):
    """A diffusers output object (``.sample``) or a ``return_dict=False`` tuple, reduced to its tensor."""
    if isinstance(out, torch.Tensor):
        return out
    sample = getattr(out, "sample", None)
    if isinstance(sample, torch.Tensor):
        return sample
    if isinstance(out, (tuple, list)) and out and isinstance(out[0], torch.Tensor):
        return out[0]
    return out


class Denoiser(nn.Module):
    """Base class: ``forward(x, sigma, class_labels=None, **cond) -> x0_hat`` in EDM (VE) coordinates.

    ``name`` labels the network in error messages (the engine sets "teacher", "fake score", ...).
    """

    def __init__(self, name: str | None = None):
        super().__init__()
        self.name = name

    @property
    def network(self) -> nn.Module:  # pragma: no cover - overridden
        raise NotImplementedError

    def label(self) -> str:
        inner = _name_of(self.network)
        return f"{self.name} ({inner})" if self.name else inner

    label_format = "onehot"

    @property
    def num_classes(self) -> int:
        """Classes a label may name (0 for an unconditional or text-conditioned network)."""
        return infer_num_classes(self.network)

    def labels(self, idx: torch.Tensor) -> torch.Tensor:
        """Class indices ``idx`` (B,) in this network's label format; a ValueError for an index out of range."""
        if not self.num_classes:
            raise ValueError(f"{self.label()} is not class-conditional: it takes no class labels")
        return format_labels(idx, self.num_classes, self.label_format)

    def null_labels(self, batch: int, device=None) -> torch.Tensor:
        """The labels that mean "no class" (B of them), for the unconditional call of guidance."""
        raise ValueError(self._no_guidance())

    def null_condition(self, batch: int, device=None) -> dict:
        """Keywords of the unconditional call: ``den(x, sigma, **den.null_condition(B))``."""
        return {"class_labels": self.null_labels(batch, device)}

    def _no_guidance(self) -> str:
        config = getattr(self.network, "config", None)
        if getattr(config, "cross_attention_dim", None) or getattr(config, "joint_attention_dim", None):
            return (f"{self.label()} is text-conditioned: its null condition is the empty prompt's embedding "
                    "(sidfast.models.text.TextConditioner.null_condition)")
        return f"{self.label()} is unconditional: classifier-free guidance needs a conditional teacher"

    def forward(self, x: torch.Tensor, sigma, class_labels=None, **cond) -> torch.Tensor:  # pragma: no cover
        raise NotImplementedError


def _accepts_third_argument(fn) -> bool:
    """Whether ``fn(x, sigma, labels)`` is a valid call (a third positional parameter or ``*args``)."""
    try:
        params = list(inspect.signature(fn).parameters.values())
    except (TypeError, ValueError):
        return True
    positional = [p for p in params if p.kind in (p.POSITIONAL_ONLY, p.POSITIONAL_OR_KEYWORD)]
    return len(positional) >= 3 or any(p.kind == p.VAR_POSITIONAL for p in params)


class EDMDenoiser(Denoiser):
    """An EDM-style network ``net(x, sigma, class_labels) -> x0`` called unchanged.

    ``class_labels`` is passed (positionally, as EDM's ``EDMPrecond``) when it is not None or when the
    network takes a third argument; networks ``net(x, sigma)`` work too. ``cond`` goes through as keywords.
    """

    def __init__(self, net, name: str | None = None):
        super().__init__(name)
        if isinstance(net, Denoiser):
            raise TypeError("net is already a Denoiser; use it directly (or as_denoiser)")
        if not callable(net):
            raise TypeError(f"net must be an nn.Module or a callable, got {type(net).__name__}")
        if isinstance(net, nn.Module):
            self.net = net
        else:
            self._fn = net
        self._takes_labels = _accepts_third_argument(net.forward if isinstance(net, nn.Module) else net)

    @property
    def network(self):
        return self.net if "net" in self._modules else self._fn

    def null_labels(self, batch: int, device=None) -> torch.Tensor:
        """All-zero one-hot labels: what EDM's label dropout feeds the network for a dropped label.

        A network that says it was trained without label dropout (``label_dropout == 0``) has never seen them,
        so it has no unconditional model to guide with: that is a ValueError.
        """
        classes = self.num_classes
        if not classes:
            raise ValueError(self._no_guidance())
        for module in _modules_of(self.network):
            dropout = getattr(module, "label_dropout", None)
            if isinstance(dropout, numbers.Real) and not isinstance(dropout, bool) and dropout == 0:
                raise ValueError(f"{self.label()} was trained without label dropout (label_dropout=0): its "
                                 "all-zero label is no unconditional model, so classifier-free guidance is "
                                 "impossible with it")
        return torch.zeros(batch, classes, device=device)

    def forward(self, x: torch.Tensor, sigma, class_labels=None, **cond) -> torch.Tensor:
        net = self.network
        if class_labels is not None or self._takes_labels:
            out = net(x, sigma, class_labels, **cond)
        else:
            out = net(x, sigma, **cond)
        return check_output(self.label(), out, x)


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
        import diffusers

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
            candidates = [root / "scheduler" / "scheduler_config.json", root / "scheduler_config.json",
                          model_dir / "scheduler_config.json", model_dir.parent / "scheduler" / "scheduler_config.json"]
            candidates = list(dict.fromkeys(candidates))  # a model directory at the root names some twice
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
        kw = {} if torch_dtype is None else {"torch_dtype": torch_dtype}
        unet = model_cls.from_pretrained(str(model_dir), **kw)
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


# How diffusers' flow-matching transformers are called: the time keyword, the scale of the time they take (SD3's
# pipeline passes sigma * 1000; FLUX's passes sigma and the model multiplies by 1000 inside), and whether the
# latents are packed into 2x2 patches outside the model (FLUX's pipeline does that in ``_pack_latents``).
FLOW_MODELS = {
    "SD3Transformer2DModel": {"time_arg": "timestep", "time_scale": 1000.0, "pack": False},
    "FluxTransformer2DModel": {"time_arg": "timestep", "time_scale": 1.0, "pack": True},
}


def pack_latents(x: torch.Tensor) -> torch.Tensor:
    """(B, C, H, W) -> (B, H/2 * W/2, 4C): FLUX's 2x2 patch tokens, in ``FluxPipeline._pack_latents``'s order."""
    b, c, h, w = x.shape
    if h % 2 or w % 2:
        raise ValueError(f"FLUX latents need an even height and width to pack into 2x2 patches, got {h}x{w}")
    x = x.reshape(b, c, h // 2, 2, w // 2, 2).permute(0, 2, 4, 1, 3, 5)
    return x.reshape(b, (h // 2) * (w // 2), c * 4)


def unpack_latents(tokens: torch.Tensor, height: int, width: int) -> torch.Tensor:
    """The inverse of ``pack_latents``: (B, H/2 * W/2, 4C) -> (B, C, H, W)."""
    b, n, d = tokens.shape
    if n != (height // 2) * (width // 2) or d % 4:
        raise ValueError(f"cannot unpack {n} tokens of width {d} into a {height}x{width} latent")
    x = tokens.reshape(b, height // 2, width // 2, d // 4, 2, 2).permute(0, 3, 1, 4, 2, 5)
    return x.reshape(b, d // 4, height, width)


def latent_image_ids(height: int, width: int, device, dtype) -> torch.Tensor:
    """FLUX's (H/2 * W/2, 3) rotary position ids of the packed tokens: (0, row, column) per token."""
    rows = torch.arange(height // 2, device=device, dtype=dtype)
    cols = torch.arange(width // 2, device=device, dtype=dtype)
    ids = torch.stack([torch.zeros(height // 2, width // 2, device=device, dtype=dtype),
                       rows[:, None].expand(-1, width // 2), cols[None, :].expand(height // 2, -1)], dim=-1)
    return ids.reshape(-1, 3)


class FlowDenoiser(Denoiser):
    """A flow-matching network (predicts ``eps - x0`` at ``x_flow = (1 - t) x0 + t eps``) as an EDM denoiser.

    VE -> flow: ``t = sigma / (1 + sigma)``, ``x_flow = x / (1 + sigma)``; the model is called as
    ``model(x_flow, t * time_scale, **cond)`` (``time_arg`` names the time keyword for models whose second
    positional parameter is not the time, e.g. SD3's ``timestep``), ``.sample`` unwrapped if present, and
    ``x0_hat = x_flow - t * pred`` (``docs/math.md``, "Predictions", flow row).

    diffusers' ``SD3Transformer2DModel`` and ``FluxTransformer2DModel`` get their calling convention from
    ``FLOW_MODELS`` (explicit arguments override it). SD3 takes ``encoder_hidden_states`` and
    ``pooled_projections`` in ``cond``. FLUX takes the same; the adapter packs ``x_flow`` into 2x2 patch tokens
    and unpacks the output, so callers see (B, C, H, W) latents, and supplies ``img_ids`` and ``txt_ids``
    (all zeros, one row per text token) unless ``cond`` has them. A guidance-distilled FLUX
    (``guidance_embeds``) also embeds a guidance scale: ``guidance`` here, or a (B,) ``guidance`` in ``cond``.
    """

    def __init__(self, model, time_scale: float | None = None, time_arg: str | None = None,
                 guidance: float | None = None, pack: bool | None = None, name: str | None = None):
        super().__init__(name)
        if not callable(model):
            raise TypeError(f"model must be an nn.Module or a callable, got {type(model).__name__}")
        known = FLOW_MODELS.get(type(model).__name__, {}) if _is_diffusers_model(model) else {}
        time_scale = known.get("time_scale", 1000.0) if time_scale is None else time_scale
        if isinstance(time_scale, bool) or not isinstance(time_scale, numbers.Real) or not time_scale > 0:
            raise ValueError(f"time_scale must be a positive number, got {time_scale!r}")
        if isinstance(model, nn.Module):
            self.model = model
        else:
            self._fn = model
        self.time_scale = float(time_scale)
        self.time_arg = known.get("time_arg") if time_arg is None else time_arg
        self.pack = bool(known.get("pack", False) if pack is None else pack)
        self.embeds_guidance = bool(getattr(getattr(model, "config", None), "guidance_embeds", False))
        if guidance is not None:
            if not self.embeds_guidance:
                raise ValueError(f"guidance={guidance!r} for {_name_of(model)}, which embeds no guidance scale "
                                 "(config.guidance_embeds is not set)")
            if isinstance(guidance, bool) or not isinstance(guidance, numbers.Real):
                raise ValueError(f"guidance must be a number, got {guidance!r}")
        self.guidance = None if guidance is None else float(guidance)

    @property
    def network(self):
        return self.model if "model" in self._modules else self._fn

    @classmethod
    def from_pretrained(cls, path, subfolder: str | None = None, torch_dtype: torch.dtype | None = None,
                        guidance: float | None = None, name: str | None = None) -> "FlowDenoiser":
        """Load a diffusers flow-matching model saved with ``save_pretrained``: a model directory, or a pipeline
        directory whose ``transformer/`` (or ``subfolder``) holds it."""
        import diffusers

        root = Path(path)
        model_dir = root / subfolder if subfolder else root
        if subfolder is None and not (root / "config.json").is_file():
            model_dir = root / "transformer"
        config = model_dir / "config.json"
        if not config.is_file():
            raise FileNotFoundError(f"no model config: {str(config)!r} does not exist")
        class_name = json.loads(config.read_text()).get("_class_name")
        model_cls = getattr(diffusers, class_name, None) if isinstance(class_name, str) else None
        if model_cls is None or not hasattr(model_cls, "from_pretrained"):
            raise ValueError(f"{str(config)!r} names model class {class_name!r}, which diffusers does not have")
        kw = {} if torch_dtype is None else {"torch_dtype": torch_dtype}
        return cls(model_cls.from_pretrained(str(model_dir), **kw), guidance=guidance, name=name)

    def _packed_inputs(self, x_flow: torch.Tensor, cond: dict) -> tuple[torch.Tensor, dict]:
        """FLUX's token inputs: the packed latents, and the position ids and guidance ``cond`` lacks."""
        channels = getattr(getattr(self.network, "config", None), "in_channels", None)
        if channels is not None and 4 * x_flow.shape[1] != channels:
            raise ValueError(f"{self.label()} takes {channels} channels per packed 2x2 token, i.e. latents of "
                             f"{channels // 4} channels; got {x_flow.shape[1]}")
        cond = dict(cond)
        if "img_ids" not in cond:
            cond["img_ids"] = latent_image_ids(x_flow.shape[2], x_flow.shape[3], x_flow.device, x_flow.dtype)
        if "txt_ids" not in cond:
            context = cond.get("encoder_hidden_states")
            if context is None:
                raise ValueError(f"{self.label()} needs encoder_hidden_states (the prompt embeddings)")
            cond["txt_ids"] = torch.zeros(context.shape[1], 3, device=x_flow.device, dtype=x_flow.dtype)
        if self.embeds_guidance and "guidance" not in cond:
            if self.guidance is None:
                raise ValueError(f"{self.label()} is guidance-distilled (guidance_embeds): give the guidance "
                                 "scale it embeds, FlowDenoiser(..., guidance=3.5) or guidance= in the call")
            cond["guidance"] = torch.full((x_flow.shape[0],), self.guidance, device=x_flow.device,
                                          dtype=torch.float32)
        return pack_latents(x_flow), cond

    def forward(self, x: torch.Tensor, sigma, class_labels=None, **cond) -> torch.Tensor:
        sig = sigma_per_sample(sigma, x)
        t = sig / (1 + sig)
        x_flow = x / broadcast(1 + sig, x).to(x.dtype)
        if class_labels is not None:
            cond = dict(cond, class_labels=class_labels)
        time = t * self.time_scale
        hidden = x_flow
        if self.pack:
            hidden, cond = self._packed_inputs(x_flow, cond)
        if self.time_arg is None:
            out = self.network(hidden, time, **cond)
        else:
            out = self.network(hidden, **{self.time_arg: time}, **cond)
        out = _unwrap(out)
        if self.pack and isinstance(out, torch.Tensor) and out.dim() == 3:
            out = unpack_latents(out, x.shape[2], x.shape[3])
        out = check_output(self.label(), out, x)
        return predictions.to_x0(out, x_flow, 1 - t, t, "flow").to(x.dtype)


def _is_diffusers_model(obj) -> bool:
    return any(c.__module__.startswith("diffusers.") for c in type(obj).__mro__) and hasattr(obj, "config")


def as_denoiser(obj, name: str | None = None, **kw) -> Denoiser:
    """``obj`` if it is already a Denoiser; a diffusers model wrapped in ``DiffusersDenoiser`` (``schedule=`` and
    ``prediction=`` required in ``kw``); anything else callable wrapped in ``EDMDenoiser``."""
    if isinstance(obj, Denoiser):
        if kw:
            raise TypeError(f"{type(obj).__name__} is already a Denoiser; unexpected options {sorted(kw)}")
        if name is not None and obj.name is None:
            obj.name = name
        return obj
    if _is_diffusers_model(obj):
        missing = [k for k in ("schedule", "prediction") if k not in kw]
        if missing:
            raise ValueError(f"{type(obj).__name__} is a diffusers model: pass {' and '.join(missing)} "
                             "(or wrap it yourself with DiffusersDenoiser / FlowDenoiser)")
        return DiffusersDenoiser(obj, name=name, **kw)
    if kw:
        raise TypeError(f"unexpected options {sorted(kw)} for an EDM-style network")
    if not callable(obj):
        raise TypeError(f"cannot make a denoiser from {type(obj).__name__}: not callable")
    return EDMDenoiser(obj, name=name)


def load_entry_point(spec: str, *args, name: str | None = None, **kwargs) -> Denoiser:
    """Import ``"package.module:function"`` (the attribute may be dotted), call it with ``args``/``kwargs``
    and return its network as a Denoiser (``as_denoiser``)."""
    if not isinstance(spec, str):
        raise TypeError(f"entry point must be a string 'module:function', got {type(spec).__name__}")
    try:
        target = import_entry_point(spec)
    except ImportError as exc:
        raise ImportError(f"entry point {spec!r}: cannot import module ({exc})") from exc
    except AttributeError as exc:
        raise ValueError(f"entry point {spec!r}: {exc}") from None
    if not callable(target):
        raise TypeError(f"entry point {spec!r} is a {type(target).__name__}, not callable")
    net = target(*args, **kwargs)
    if net is None:
        raise ValueError(f"entry point {spec!r} returned None, expected a network")
    return as_denoiser(net, name=name)


# ---- what a network looks like: image shape, classes, labels ----

def _modules_of(net) -> list:
    """``net`` and the modules it wraps (``network``, ``module``, ``net``, ``unet``, ``model``), outermost
    first."""
    seen, stack = [], [net]
    while stack:
        module = stack.pop(0)
        if module is None or any(module is s for s in seen):
            continue
        seen.append(module)
        for attr in ("network", "module", "net", "unet", "model"):
            try:
                inner = getattr(module, attr, None)
            except Exception:  # properties that raise
                inner = None
            if inner is not None and not isinstance(inner, (str, int, float)):
                stack.append(inner)
    return seen


def infer_image_shape(net) -> tuple | None:
    """(C, H, W) from ``image_shape``, EDM's ``img_channels``/``img_resolution`` or a diffusers config."""
    for module in _modules_of(net):
        shape = getattr(module, "image_shape", None)
        if shape is not None:
            return tuple(int(s) for s in shape)
        if hasattr(module, "img_channels") and hasattr(module, "img_resolution"):
            resolution = int(module.img_resolution)
            return (int(module.img_channels), resolution, resolution)
        config = getattr(module, "config", None)
        size = getattr(config, "sample_size", None)
        channels = getattr(config, "in_channels", None)
        if size is not None and channels is not None:
            hw = (int(size), int(size)) if isinstance(size, int) else tuple(int(s) for s in size)
            return (int(channels), *hw)
    return None


def infer_num_classes(net) -> int:
    """Classes of a conditional network (``num_classes``, EDM's ``label_dim``, diffusers'
    ``num_class_embeds``)."""
    for module in _modules_of(net):
        for attr in ("num_classes", "label_dim"):
            value = getattr(module, attr, None)
            if isinstance(value, int) and not isinstance(value, bool):
                return value
        value = getattr(getattr(module, "config", None), "num_class_embeds", None)
        if isinstance(value, int):
            return value
    return 0


def format_labels(idx: torch.Tensor, num_classes: int, fmt: str, check: bool = True) -> torch.Tensor:
    """Class indices ``idx`` (n,) as the network takes them: (n, K) one-hot float (EDM) or the indices.

    ``check`` raises a ValueError for an index outside ``[0, num_classes)`` (a host sync on a GPU tensor).
    """
    if check:
        if not isinstance(idx, torch.Tensor) or idx.dtype.is_floating_point or idx.dtype.is_complex:
            raise TypeError(f"class labels must be an integer tensor of class indices, got {idx!r}")
        if idx.numel() and (int(idx.min()) < 0 or int(idx.max()) >= num_classes):
            bad = idx[(idx < 0) | (idx >= num_classes)].flatten()[0].item()
            raise ValueError(f"class label {bad} is out of range: the network has {num_classes} classes "
                             f"(0 to {num_classes - 1})")
    if fmt == "onehot":
        return nn.functional.one_hot(idx, num_classes).float()
    if fmt == "index":
        return idx
    raise ValueError(f"label_format must be 'onehot' or 'index', got {fmt!r}")


def draw_labels(n: int, num_classes: int, fmt: str, device, generator: torch.Generator | None = None):
    """Uniform random class labels in ``format_labels``'s form; None for an unconditional network."""
    if not num_classes:
        return None
    idx = torch.randint(num_classes, (n,), device=device, generator=generator)
    return format_labels(idx, num_classes, fmt, check=False)  # in range by construction, no host sync


__all__ = ["Denoiser", "EDMDenoiser", "DiffusersDenoiser", "FlowDenoiser", "MissingSchedulerConfig", "FLOW_MODELS",
           "pack_latents", "unpack_latents", "latent_image_ids",
           "as_denoiser", "load_entry_point", "check_output", "sigma_per_sample", "infer_image_shape",
           "infer_num_classes", "format_labels", "draw_labels"]
