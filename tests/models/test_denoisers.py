"""sidfast.models.denoiser: the one denoiser interface and its adapters (EDM, diffusers VP, flow matching)."""
import json

import pytest
import torch
from torch import nn

from sidfast import predictions
from sidfast.models.denoiser import (Denoiser, DiffusersDenoiser, EDMDenoiser, FlowDenoiser, as_denoiser,
    check_output, load_entry_point, sigma_per_sample)
from sidfast.schedules import VPSchedule

from utils import float64_network_tolerance, rounding_bound, tiny_diffusers_unet

diffusers = pytest.importorskip("diffusers")
from diffusers.models.unets.unet_2d import UNet2DOutput  # noqa: E402


# ---------- helpers ----------

class OneConvEDM(nn.Module):
    """EDM-style x0 predictor: D(x; sigma, labels) = c_skip x + c_out F(c_in x) with a 1x1 conv F."""

    def __init__(self, channels=3, label_dim=0):
        super().__init__()
        self.f = nn.Conv2d(channels, channels, 1)
        self.emb = nn.Linear(label_dim, channels) if label_dim else None
        self.label_dim = label_dim

    def forward(self, x, sigma, class_labels=None):
        sigma = sigma.reshape(-1, 1, 1, 1).to(x.dtype)
        norm = (sigma ** 2 + 0.25).sqrt()
        c_skip, c_out, c_in = 0.25 / norm ** 2, sigma * 0.5 / norm, 1 / norm
        h = self.f(c_in * x)
        if self.emb is not None and class_labels is not None:
            h = h + self.emb(class_labels).reshape(x.shape[0], -1, 1, 1)
        return c_skip * x + c_out * h


class TwoArgNet(nn.Module):
    def forward(self, x, sigma):
        return x / (1 + sigma.reshape(-1, 1, 1, 1) ** 2)


class VPOracle(nn.Module):
    """Returns the exact target (eps, v or x0) for the (x0, eps) it was given, and records its inputs."""

    def __init__(self, x0, eps, scheduler, prediction):
        super().__init__()
        self.x0, self.eps, self.scheduler, self.prediction = x0, eps, scheduler, prediction
        self.seen = None

    def forward(self, sample, timestep, class_labels=None):
        self.seen = (sample, timestep, class_labels)
        t = timestep.round().long()
        if self.prediction == "epsilon":
            out = self.eps
        elif self.prediction == "v_prediction":
            out = self.scheduler.get_velocity(self.x0, self.eps, t)
        else:
            out = self.x0
        return UNet2DOutput(sample=out)


def ddpm(prediction="epsilon", **kw):
    return diffusers.DDPMScheduler(num_train_timesteps=1000, beta_schedule="linear", prediction_type=prediction, **kw)


def sigmas_of(scheduler, t):
    abar = scheduler.alphas_cumprod[t].double()
    return ((1 - abar) / abar).sqrt().float()


# ---------- sigma handling and output checks ----------

def test_sigma_per_sample_forms():
    x = torch.zeros(3, 2)
    for sigma in (0.5, torch.tensor(0.5), torch.full((3,), 0.5), torch.full((3, 1), 0.5)):
        out = sigma_per_sample(sigma, x)
        assert out.shape == (3,) and out.dtype == torch.float32
        torch.testing.assert_close(out, torch.full((3,), 0.5))
    assert sigma_per_sample(0.5, x.double()).dtype == torch.float64


@pytest.mark.parametrize("sigma,err", [(torch.ones(4), ValueError), (torch.ones(3, 2), ValueError),
                                       (torch.ones(3, dtype=torch.long), TypeError), ("a", TypeError),
                                       (torch.ones(3, device="meta"), ValueError)])
def test_sigma_per_sample_errors(sigma, err):
    with pytest.raises(err, match="sigma"):
        sigma_per_sample(sigma, torch.zeros(3, 2))


def test_check_output_errors_name_the_network():
    x = torch.zeros(2, 3)
    with pytest.raises(ValueError, match="teacher.*shape"):
        check_output("teacher", torch.zeros(2, 4), x)
    with pytest.raises(ValueError, match="teacher.*dtype"):
        check_output("teacher", torch.zeros(2, 3, dtype=torch.float64), x)
    with pytest.raises(ValueError, match="teacher.*meta"):
        check_output("teacher", torch.zeros(2, 3, device="meta"), x)
    with pytest.raises(TypeError, match="teacher"):
        check_output("teacher", (torch.zeros(2, 3), 1), x)


def test_check_output_accepts_the_autocast_dtype_only_under_autocast():
    x = torch.zeros(2, 3)
    with pytest.raises(ValueError, match="dtype"):
        check_output("n", torch.zeros(2, 3, dtype=torch.bfloat16), x)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = check_output("n", torch.zeros(2, 3, dtype=torch.bfloat16), x)
        with pytest.raises(ValueError, match="dtype"):
            check_output("n", torch.zeros(2, 3, dtype=torch.float16), x)
    assert out.dtype == torch.float32


# ---------- EDM pass-through ----------

def test_edm_denoiser_is_a_pass_through():
    net = OneConvEDM(3, label_dim=4)
    den = EDMDenoiser(net)
    x, sigma = torch.randn(2, 3, 4, 4), torch.tensor([0.3, 7.0])
    labels = torch.eye(4)[[1, 3]]
    assert isinstance(den, Denoiser) and isinstance(den, nn.Module)
    torch.testing.assert_close(den(x, sigma, labels), net(x, sigma, labels), rtol=0, atol=0)
    torch.testing.assert_close(den(x, sigma), net(x, sigma, None), rtol=0, atol=0)
    assert list(den.parameters()) == list(net.parameters())  # no copy: the wrapper shares the module


def test_edm_denoiser_two_argument_net_and_plain_function():
    x, sigma = torch.randn(2, 3, 4, 4), torch.tensor([0.3, 7.0])
    torch.testing.assert_close(EDMDenoiser(TwoArgNet())(x, sigma), TwoArgNet()(x, sigma))
    fn = lambda x, sigma, labels=None: 2 * x  # noqa: E731
    torch.testing.assert_close(EDMDenoiser(fn)(x, sigma), 2 * x)
    with pytest.raises(TypeError):
        EDMDenoiser(TwoArgNet())(x, sigma, torch.zeros(2, 1))  # labels given to a net that takes none: its own error


def test_edm_denoiser_errors():
    x, sigma = torch.randn(2, 3, 4, 4), torch.ones(2)
    with pytest.raises(ValueError, match="fake score.*shape"):
        EDMDenoiser(lambda x, s, c=None: x[:, :2], name="fake score")(x, sigma)
    with pytest.raises(ValueError, match="TwoArg|dtype"):
        EDMDenoiser(lambda x, s, c=None: x.double())(x, sigma)
    with pytest.raises(TypeError, match="callable"):
        EDMDenoiser(3)
    with pytest.raises(TypeError, match="already"):
        EDMDenoiser(EDMDenoiser(TwoArgNet()))


def test_edm_denoiser_under_autocast_returns_the_input_dtype():
    net = OneConvEDM(3)
    x, sigma = torch.randn(2, 3, 4, 4), torch.tensor([0.3, 7.0])
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = EDMDenoiser(net)(x, sigma)
    assert out.dtype == torch.float32
    # bf16 conv: c_in x, the weight, the bias and the output each rounded once (4 u_bf16), one more for the
    # float32 skip sum; bounded relative to c_out (|W| |c_in x| + |b|) + c_skip |x| (all in float64)
    x64, s64 = x.double(), sigma.double().reshape(-1, 1, 1, 1)
    norm = (s64 ** 2 + 0.25).sqrt()
    conv_terms = nn.functional.conv2d(x64.abs() / norm, net.f.weight.double().abs(), net.f.bias.double().abs())
    magnitude = 0.5 * s64 / norm * conv_terms + 0.25 / norm ** 2 * x64.abs()
    error = (out.double() - net.double()(x64, sigma.double())).abs()
    assert bool((error <= rounding_bound(torch.bfloat16, magnitude, 5)).all())


# ---------- diffusers VP adapter ----------

@pytest.mark.parametrize("prediction", ["epsilon", "v_prediction", "sample"])
@pytest.mark.parametrize("beta_schedule", ["linear", "squaredcos_cap_v2"])
def test_vp_adapter_matches_ddpm_add_noise_and_get_velocity(prediction, beta_schedule):
    sched = diffusers.DDPMScheduler(num_train_timesteps=1000, beta_schedule=beta_schedule, prediction_type=prediction)
    g = torch.Generator().manual_seed(0)
    # float64: at t = 999 of the cosine schedule sigma ~ 1e4, and x0 + sigma eps in float32 would lose x0 itself
    x0, eps = (torch.randn(5, 3, 4, 4, generator=g, dtype=torch.float64) for _ in range(2))
    t = torch.tensor([0, 1, 250, 731, 999])
    oracle = VPOracle(x0, eps, sched, prediction)
    den = DiffusersDenoiser(oracle, VPSchedule.from_diffusers(sched), prediction)
    abar = sched.alphas_cumprod[t].double()
    sigma = ((1 - abar) / abar).sqrt()
    x = x0 + sigma.reshape(-1, 1, 1, 1) * eps  # VE coordinates
    out = den(x, sigma)
    sample, timestep, _ = oracle.seen
    torch.testing.assert_close(sample, sched.add_noise(x0, eps, t), atol=1e-6, rtol=1e-6)  # x_vp = a x
    torch.testing.assert_close(timestep, t.float(), atol=2e-3, rtol=0)  # exact table sigmas -> integer timesteps
    assert timestep.dtype == torch.float32 and timestep.shape == (5,)
    assert out.shape == x.shape and out.dtype == x.dtype
    torch.testing.assert_close(out, x0, atol=1e-6, rtol=1e-6)


def test_vp_timesteps_interpolate_in_log_sigma_and_clamp():
    sched = ddpm()
    den = DiffusersDenoiser(VPOracle(None, None, sched, "sample"), VPSchedule.from_diffusers(sched), "sample")
    s10, s11 = sigmas_of(sched, torch.tensor([10, 11])).double()
    mid = torch.exp((s10.log() + s11.log()) / 2).float().reshape(1)
    torch.testing.assert_close(den.timesteps(mid), torch.tensor([10.5]), atol=1e-4, rtol=0)
    lo_hi = den.timesteps(torch.tensor([1e-6, 0.0, 1e6, float("inf")]))
    torch.testing.assert_close(lo_hi, torch.tensor([0.0, 0.0, 999.0, 999.0]))
    ts = den.timesteps(torch.logspace(-3, 3, 200))
    assert bool((ts[1:] >= ts[:-1]).all())


def test_vp_adapter_table_stays_float64_and_follows_the_device():
    sched = ddpm()
    den = DiffusersDenoiser(tiny_diffusers_unet(), VPSchedule.from_diffusers(sched), "epsilon")
    den.to(torch.bfloat16)
    assert den.log_sigma_table.dtype == torch.float64
    assert den.unet.dtype == torch.bfloat16
    den.float()
    torch.testing.assert_close(den.log_sigma_table, 0.5 * (torch.log1p(-sched.alphas_cumprod.double())
                                                           - sched.alphas_cumprod.double().log()))


@pytest.mark.parametrize("prediction", ["epsilon", "v_prediction", "sample"])
def test_vp_adapter_on_a_tiny_unet_equals_the_manual_conversion(prediction):
    sched, unet = ddpm(prediction), tiny_diffusers_unet()
    den = DiffusersDenoiser(unet, VPSchedule.from_diffusers(sched), prediction)
    x, sigma = torch.randn(3, 3, 8, 8), torch.tensor([0.01, 1.0, 40.0])
    with torch.no_grad():
        out32 = den(x, sigma)
    assert out32.dtype == torch.float32 and out32.shape == x.shape
    # Float64 on both sides: here a = sqrt(abar), in the adapter rsqrt(1 + sigma^2), which may differ in the
    # last bit; the network grows that and its own rounding (NETWORK_ERROR_GROWTH), the eps -> x0 conversion
    # multiplies it by 1/a = 40 at sigma = 40: all within float64_network_tolerance of the scaled output.
    den.double()
    x, sigma = x.double(), sigma.double()
    a = (1 / (1 + sigma ** 2)).sqrt()
    s = (1 - a ** 2).sqrt()
    x_vp = a.reshape(-1, 1, 1, 1) * x
    with torch.no_grad():
        ref = predictions.to_x0(unet(x_vp, den.timesteps(sigma)).sample, x_vp, a, s, prediction)
        out = den(x, sigma)
    torch.testing.assert_close(out, ref, **float64_network_tolerance(ref))


def test_vp_adapter_gradients_reach_the_input():
    sched, unet = ddpm(), tiny_diffusers_unet()
    den = DiffusersDenoiser(unet, VPSchedule.from_diffusers(sched), "epsilon")
    x = torch.randn(2, 3, 8, 8, requires_grad=True)
    (g,) = torch.autograd.grad(den(x, torch.tensor([0.5, 2.0])).square().sum(), x)
    assert g.shape == x.shape and bool(torch.isfinite(g).all()) and g.abs().sum() > 0


def test_vp_adapter_class_labels_and_conditioning():
    sched = ddpm()
    unet = tiny_diffusers_unet(num_class_embeds=4).double()
    den = DiffusersDenoiser(unet, VPSchedule.from_diffusers(sched), "epsilon")
    x = torch.randn(2, 3, 8, 8, dtype=torch.float64)
    sigma = torch.tensor([0.5, 2.0], dtype=torch.float64)
    with torch.no_grad():
        out0 = den(x, sigma, torch.tensor([0, 0]))
        out1 = den(x, sigma, torch.tensor([3, 1]))
        a = torch.rsqrt(1 + sigma ** 2)
        x_vp = a.reshape(-1, 1, 1, 1) * x
        out = unet(x_vp, den.timesteps(sigma), class_labels=torch.tensor([3, 1])).sample
        ref = predictions.to_x0(out, x_vp, a, a * sigma, "eps")
    torch.testing.assert_close(out1, ref, **float64_network_tolerance(ref))
    assert not torch.allclose(out0, out1)


def test_vp_adapter_unet2d_condition_model_with_encoder_states():
    torch.manual_seed(0)
    unet = diffusers.UNet2DConditionModel(sample_size=8, in_channels=4, out_channels=4, block_out_channels=(8, 16),
                                          layers_per_block=1, norm_num_groups=4, cross_attention_dim=8,
                                          attention_head_dim=4,
                                          down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
                                          up_block_types=("UpBlock2D", "CrossAttnUpBlock2D")).double()
    den = DiffusersDenoiser(unet, VPSchedule.linear(), "v")
    x = torch.randn(2, 4, 8, 8, dtype=torch.float64)
    sigma = torch.tensor([0.5, 2.0], dtype=torch.float64)
    ctx = torch.randn(2, 5, 8, dtype=torch.float64)
    with torch.no_grad():
        out = den(x, sigma, encoder_hidden_states=ctx)
        a = torch.rsqrt(1 + sigma ** 2)
        x_vp = a.reshape(-1, 1, 1, 1) * x
        raw = unet(x_vp, den.timesteps(sigma), encoder_hidden_states=ctx).sample
        ref = predictions.to_x0(raw, x_vp, a, a * sigma, "v")
    torch.testing.assert_close(out, ref, **float64_network_tolerance(ref))


def test_vp_adapter_learned_variance_keeps_the_mean_half():
    unet = tiny_diffusers_unet(out_channels=6).double()
    den = DiffusersDenoiser(unet, VPSchedule.linear(), "eps", learned_variance=True)
    x = torch.randn(2, 3, 8, 8, dtype=torch.float64)
    sigma = torch.tensor([0.5, 2.0], dtype=torch.float64)
    with torch.no_grad():
        out = den(x, sigma)
        a = torch.rsqrt(1 + sigma ** 2)
        x_vp = a.reshape(-1, 1, 1, 1) * x
        ref = predictions.to_x0(unet(x_vp, den.timesteps(sigma)).sample[:, :3], x_vp, a, a * sigma, "eps")
    torch.testing.assert_close(out, ref, **float64_network_tolerance(ref))
    with pytest.raises(ValueError, match="shape"):
        DiffusersDenoiser(unet, VPSchedule.linear(), "eps")(x, sigma)


def test_vp_adapter_errors():
    with pytest.raises(TypeError, match="schedule"):
        DiffusersDenoiser(tiny_diffusers_unet(), "linear", "eps")
    with pytest.raises(ValueError, match="prediction"):
        DiffusersDenoiser(tiny_diffusers_unet(), VPSchedule.linear(), "score")
    with pytest.raises(ValueError, match="FlowDenoiser"):
        DiffusersDenoiser(tiny_diffusers_unet(), VPSchedule.linear(), "flow")
    with pytest.raises(ValueError, match="Fourier"):
        DiffusersDenoiser(tiny_diffusers_unet(time_embedding_type="fourier"), VPSchedule.linear(), "eps")
    with pytest.raises(ValueError, match="decreasing"):
        DiffusersDenoiser(tiny_diffusers_unet(), VPSchedule(torch.tensor([0.5, 0.5, 0.1])), "eps")


# ---------- from_pretrained ----------

@pytest.mark.parametrize("layout", ["pipeline", "model+scheduler_config"])
@pytest.mark.parametrize("prediction", ["epsilon", "v_prediction", "sample"])
def test_from_pretrained_reads_schedule_and_prediction(tmp_path, layout, prediction):
    unet, sched = tiny_diffusers_unet(), diffusers.DDPMScheduler(num_train_timesteps=500, beta_schedule="squaredcos_cap_v2",
                                                       prediction_type=prediction)
    if layout == "pipeline":
        diffusers.DDPMPipeline(unet=unet, scheduler=sched).save_pretrained(tmp_path)
        assert (tmp_path / "model_index.json").is_file()
    else:
        unet.save_pretrained(tmp_path)
        sched.save_config(tmp_path)
    den = DiffusersDenoiser.from_pretrained(tmp_path, name="teacher")
    assert den.prediction == predictions.canonical(prediction) and den.name == "teacher"
    torch.testing.assert_close(den.schedule.alphas_cumprod, sched.alphas_cumprod.double())
    x, sigma = torch.randn(2, 3, 8, 8), torch.tensor([0.2, 3.0])
    with torch.no_grad():
        direct = DiffusersDenoiser(unet, VPSchedule.from_diffusers(sched), prediction)
        torch.testing.assert_close(den(x, sigma), direct(x, sigma))


def test_from_pretrained_old_config_without_prediction_type_defaults_like_diffusers(tmp_path):
    tiny_diffusers_unet().save_pretrained(tmp_path)
    conf = {"_class_name": "DDPMScheduler", "beta_end": 0.02, "beta_schedule": "linear", "beta_start": 0.0001,
            "num_train_timesteps": 1000, "trained_betas": None, "variance_type": "fixed_small"}
    (tmp_path / "scheduler_config.json").write_text(json.dumps(conf))
    assert DiffusersDenoiser.from_pretrained(tmp_path).prediction == "eps"


def test_from_pretrained_overrides_and_errors(tmp_path):
    with pytest.raises(FileNotFoundError, match="nowhere"):
        DiffusersDenoiser.from_pretrained(tmp_path / "nowhere")
    with pytest.raises(FileNotFoundError, match="config.json"):
        DiffusersDenoiser.from_pretrained(tmp_path)
    tiny_diffusers_unet().save_pretrained(tmp_path)
    with pytest.raises(FileNotFoundError, match="scheduler_config.json"):
        DiffusersDenoiser.from_pretrained(tmp_path)
    den = DiffusersDenoiser.from_pretrained(tmp_path, prediction="v", schedule=VPSchedule.linear(100))
    assert den.prediction == "v" and den.schedule.num_timesteps == 100
    diffusers.FlowMatchEulerDiscreteScheduler().save_config(tmp_path)
    with pytest.raises(ValueError, match="VP schedule"):
        DiffusersDenoiser.from_pretrained(tmp_path)
    ddpm("epsilon").save_config(tmp_path)
    with pytest.raises(ValueError, match="prediction"):
        DiffusersDenoiser.from_pretrained(tmp_path, prediction="flow")
    conf = json.loads((tmp_path / "config.json").read_text())
    (tmp_path / "config.json").write_text(json.dumps(dict(conf, _class_name="NoSuchModel")))
    with pytest.raises(ValueError, match="NoSuchModel"):
        DiffusersDenoiser.from_pretrained(tmp_path)


# ---------- flow matching ----------

class FlowOracle(nn.Module):
    def __init__(self, x0, eps):
        super().__init__()
        self.x0, self.eps, self.seen = x0, eps, None

    def forward(self, x_flow, timestep, class_labels=None):
        self.seen = (x_flow, timestep, class_labels)
        return self.eps - self.x0


def test_flow_adapter_recovers_x0_and_calls_with_flow_coordinates():
    g = torch.Generator().manual_seed(1)
    x0, eps = torch.randn(4, 2, 3, generator=g), torch.randn(4, 2, 3, generator=g)
    sigma = torch.tensor([0.01, 0.5, 3.0, 100.0])
    oracle = FlowOracle(x0, eps)
    out = FlowDenoiser(oracle)(x0 + sigma.reshape(-1, 1, 1) * eps, sigma, torch.arange(4))
    t = sigma / (1 + sigma)
    x_flow, time, labels = oracle.seen
    torch.testing.assert_close(x_flow, (1 - t).reshape(-1, 1, 1) * x0 + t.reshape(-1, 1, 1) * eps)
    torch.testing.assert_close(time, 1000 * t)
    assert torch.equal(labels, torch.arange(4))
    torch.testing.assert_close(out, x0, atol=1e-5, rtol=1e-5)


def test_flow_adapter_time_keyword_scale_and_sample_unwrapping():
    class KwModel(nn.Module):
        def forward(self, hidden_states, encoder_hidden_states=None, timestep=None):
            self.t = timestep
            return UNet2DOutput(sample=hidden_states * 0)

    m = KwModel()
    x, sigma = torch.randn(2, 3), torch.tensor([1.0, 3.0])
    out = FlowDenoiser(m, time_scale=1.0, time_arg="timestep")(x, sigma, encoder_hidden_states=None)
    torch.testing.assert_close(m.t, torch.tensor([0.5, 0.75]))
    torch.testing.assert_close(out, x / (1 + sigma).reshape(-1, 1))  # pred = 0 -> x0_hat = x_flow
    with pytest.raises(ValueError, match="time_scale"):
        FlowDenoiser(m, time_scale=0)
    with pytest.raises(ValueError, match="shape"):
        FlowDenoiser(lambda x, t: x[:, :1])(x, sigma)


# ---------- as_denoiser and entry points ----------

def test_as_denoiser():
    den = EDMDenoiser(TwoArgNet())
    assert as_denoiser(den) is den
    assert isinstance(as_denoiser(TwoArgNet()), EDMDenoiser)
    assert as_denoiser(TwoArgNet(), name="teacher").name == "teacher"
    wrapped = as_denoiser(tiny_diffusers_unet(), schedule=VPSchedule.linear(), prediction="epsilon")
    assert isinstance(wrapped, DiffusersDenoiser)
    with pytest.raises(ValueError, match="schedule"):
        as_denoiser(tiny_diffusers_unet())
    with pytest.raises(TypeError, match="not callable"):
        as_denoiser(3)
    with pytest.raises(TypeError, match="already"):
        as_denoiser(den, schedule=VPSchedule.linear())


def test_load_entry_point(tmp_path, monkeypatch):
    (tmp_path / "my_nets.py").write_text(
        "import torch\n"
        "class Net(torch.nn.Module):\n"
        "    def __init__(self, scale=1.0):\n"
        "        super().__init__(); self.scale = scale\n"
        "    def forward(self, x, sigma, class_labels=None):\n"
        "        return self.scale * x\n"
        "def build(scale=1.0):\n"
        "    return Net(scale)\n"
        "class Factories:\n"
        "    build = staticmethod(build)\n"
        "NOT_CALLABLE = 3\n"
        "def nothing():\n"
        "    return None\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    den = load_entry_point("my_nets:build", scale=2.0, name="teacher")
    assert isinstance(den, EDMDenoiser) and den.name == "teacher"
    torch.testing.assert_close(den(torch.ones(2, 3), torch.ones(2)), torch.full((2, 3), 2.0))
    assert isinstance(load_entry_point("my_nets:Factories.build"), EDMDenoiser)
    with pytest.raises(ValueError, match="module:function"):
        load_entry_point("my_nets.build")
    with pytest.raises(ImportError, match="no_such_module"):
        load_entry_point("no_such_module:build")
    with pytest.raises(ValueError, match="no attribute"):
        load_entry_point("my_nets:missing")
    with pytest.raises(TypeError, match="not callable"):
        load_entry_point("my_nets:NOT_CALLABLE")
    with pytest.raises(ValueError, match="None"):
        load_entry_point("my_nets:nothing")


# ---------- class labels and the null condition of guidance ----------

def test_edm_labels_and_null_labels_are_one_hot_and_zeros():
    den = EDMDenoiser(OneConvEDM(3, label_dim=4))
    assert den.num_classes == 4 and den.label_format == "onehot"
    torch.testing.assert_close(den.labels(torch.tensor([1, 3])), torch.eye(4)[[1, 3]])
    null = den.null_condition(2)
    assert set(null) == {"class_labels"} and torch.equal(null["class_labels"], torch.zeros(2, 4))
    x, sigma = torch.randn(2, 3, 4, 4), torch.tensor([0.3, 7.0])
    # the null label is what EDM's label dropout feeds for a dropped label: an all-zero one-hot vector
    torch.testing.assert_close(den(x, sigma, **null), den.net(x, sigma, torch.zeros(2, 4)), rtol=0, atol=0)
    assert not torch.allclose(den(x, sigma, **null), den(x, sigma, den.labels(torch.tensor([1, 3]))))
    with pytest.raises(ValueError, match="class label 4 is out of range.*4 classes"):
        den.labels(torch.tensor([0, 4]))
    with pytest.raises(ValueError, match="class label -1"):
        den.labels(torch.tensor([-1]))
    with pytest.raises(TypeError, match="integer"):
        den.labels(torch.tensor([1.0]))


def test_edm_null_labels_refused_without_label_dropout_and_on_unconditional_networks():
    net = OneConvEDM(3, label_dim=4)
    net.label_dropout = 0
    with pytest.raises(ValueError, match="without label dropout.*impossible"):
        EDMDenoiser(net).null_condition(2)
    net.label_dropout = 0.1
    assert EDMDenoiser(net).null_labels(2).shape == (2, 4)
    with pytest.raises(ValueError, match="unconditional.*conditional teacher"):
        EDMDenoiser(OneConvEDM(3)).null_condition(2)
    with pytest.raises(ValueError, match="not class-conditional"):
        EDMDenoiser(OneConvEDM(3)).labels(torch.tensor([0]))


def test_diffusers_null_class_is_the_last_embedding():
    unet = tiny_diffusers_unet(num_class_embeds=5).double()
    den = DiffusersDenoiser(unet, VPSchedule.linear(), "eps", null_class=4)
    assert den.num_classes == 4 and den.label_format == "index"
    assert torch.equal(den.null_labels(3), torch.full((3,), 4))
    assert torch.equal(den.labels(torch.tensor([0, 3])), torch.tensor([0, 3]))
    with pytest.raises(ValueError, match="class label 4 is out of range"):
        den.labels(torch.tensor([4]))  # the null class is no class a sample may be drawn from
    x = torch.randn(3, 3, 8, 8, dtype=torch.float64)
    sigma = torch.tensor([0.5, 2.0, 9.0], dtype=torch.float64)
    with torch.no_grad():
        out = den(x, sigma, **den.null_condition(3))
        ref = den(x, sigma, torch.full((3,), 4))
        cond = den(x, sigma, den.labels(torch.tensor([0, 1, 2])))
    torch.testing.assert_close(out, ref, rtol=0, atol=0)
    assert not torch.allclose(out, cond)


def test_diffusers_null_class_errors():
    unet = tiny_diffusers_unet(num_class_embeds=5)
    with pytest.raises(ValueError, match="no null class.*label dropout.*impossible"):
        DiffusersDenoiser(unet, VPSchedule.linear(), "eps").null_condition(2)
    assert DiffusersDenoiser(unet, VPSchedule.linear(), "eps").num_classes == 5
    with pytest.raises(ValueError, match="last class embedding, 4"):
        DiffusersDenoiser(unet, VPSchedule.linear(), "eps", null_class=0)
    with pytest.raises(ValueError, match="no class embedding"):
        DiffusersDenoiser(tiny_diffusers_unet(), VPSchedule.linear(), "eps", null_class=0)
    with pytest.raises(ValueError, match="unconditional"):
        DiffusersDenoiser(tiny_diffusers_unet(), VPSchedule.linear(), "eps").null_condition(2)
