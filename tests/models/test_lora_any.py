"""sidfast.models.lora on every teacher family: EDM-style layer classes that are not nn.Conv2d / nn.Linear, diffusers
U-Nets and DiT transformers. For each, the split evaluation (one call of the shared network over
[teacher half; fake half]) equals the untouched teacher on the first half and a separate network with the
merged weights W + scale * B A on the second, in values and input gradients (float64, so the tolerance
does not depend on the CPU's kernels); gradients reach only the LoRA factors."""
import math

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from utils import assert_float64_close as _close, randomize_lora
from sidfast.models.denoiser import DiffusersDenoiser, EDMDenoiser, FlowDenoiser
from sidfast.engine.scores import ScoreEngine
from sidfast.models.lora import (LoRAConv2d, LoRAGenerator, LoRALayer, LoRALinear, LoRAWeight, add_lora,
    default_target, lora_layers, lora_parameters, lora_state_dict, merge_lora, set_lora_mode)
from sidfast.schedules import VPSchedule
from sidfast.models.views import frozen_view

# split, merged and compiled evaluations are different computations: compared in float64, within
# float64_network_tolerance
DTYPE = torch.float64


# ---------- stand-ins of EDM's own layer classes (plain nn.Module, not nn.Conv2d / nn.Linear) ----------

class ResampleConv(nn.Module):
    """A convolution layer holding ``weight`` and ``bias`` itself, optionally upsampling its input (a
    transposed grouped convolution with a fixed [1, 1] x [1, 1] filter) before the convolution or
    downsampling after it (a strided grouped convolution with the same filter, fused with the convolution's
    padding when ``fused``), the weight cast to the input's dtype and the bias added in place."""

    def __init__(self, cin, cout, kernel, up=False, down=False, fused=False):
        super().__init__()
        self.cin = cin
        self.cout = cout
        self.up = up
        self.down = down
        self.fused = fused
        self.weight = nn.Parameter(torch.randn(cout, cin, kernel, kernel) / math.sqrt(cin * kernel * kernel))
        self.bias = nn.Parameter(torch.randn(cout) * 0.1)
        self.register_buffer("resample", torch.full((1, 1, 2, 2), 0.25))

    def forward(self, x):
        w = self.weight.to(x.dtype)
        f = self.resample.to(x.dtype)
        pad = w.shape[-1] // 2
        f_pad = (f.shape[-1] - 1) // 2
        if self.up:
            x = F.conv_transpose2d(x, (4 * f).tile(self.cin, 1, 1, 1), groups=self.cin, stride=2)
        if self.down and self.fused:
            x = F.conv2d(x, w, padding=pad + f_pad)
            x = F.conv2d(x, f.tile(self.cout, 1, 1, 1), groups=self.cout, stride=2, padding=f_pad)
        else:
            x = F.conv2d(x, w, padding=pad)
            if self.down:
                x = F.conv2d(x, f.tile(self.cout, 1, 1, 1), groups=self.cout, stride=2, padding=f_pad)
        return x.add_(self.bias.to(x.dtype).reshape(1, -1, 1, 1))


class MatmulLinear(nn.Module):
    """A linear layer holding ``weight`` (out, in) and ``bias``, applied as ``x @ weight.t()``."""

    def __init__(self, cin, cout):
        super().__init__()
        self.in_features = cin
        self.weight = nn.Parameter(torch.randn(cout, cin) / math.sqrt(cin))
        self.bias = nn.Parameter(torch.randn(cout) * 0.1)

    def forward(self, x):
        return (x @ self.weight.to(x.dtype).t()).add_(self.bias.to(x.dtype))


class UpsampleConv(nn.Conv2d):
    """An nn.Conv2d subclass that upsamples before convolving: its input is not the convolution's input."""

    def forward(self, x):
        return super().forward(F.interpolate(x, scale_factor=2.0))


class SelfAttention(nn.Module):
    """Holds its own qkv ``weight`` (3C, C) (a 1x1 convolution's, as a matrix) applied by einsum."""

    def __init__(self, c):
        super().__init__()
        self.weight = nn.Parameter(torch.randn(3 * c, c) / math.sqrt(c))

    def forward(self, x):
        b, c, h, w = x.shape
        q, k, v = torch.einsum("oc,bchw->bohw", self.weight.to(x.dtype), x).reshape(b, 3, c, h * w).unbind(1)
        a = torch.softmax(q.transpose(1, 2) @ k / math.sqrt(c), -1)
        return (a @ v.transpose(1, 2)).transpose(1, 2).reshape(b, c, h, w)


class EDMStyleNet(nn.Module):
    """``net(x, sigma, class_labels) -> x0`` with EDM preconditioning, built from the layer classes above; it
    reads a layer's attribute (``label.in_features``) as EDM's networks do."""

    def __init__(self, channels=3, hidden=6, label_dim=4):
        super().__init__()
        self.emb = MatmulLinear(1, hidden)
        self.label = MatmulLinear(label_dim, hidden)
        self.conv_in = ResampleConv(channels, hidden, 3)
        self.down = ResampleConv(hidden, hidden, 3, down=True)
        self.down_fused = ResampleConv(hidden, hidden, 3, down=True, fused=True)
        self.attn = SelfAttention(hidden)
        self.proj = nn.Linear(hidden, hidden)
        self.up = ResampleConv(hidden, hidden, 3, up=True)
        self.up_sub = UpsampleConv(hidden, hidden, 3, padding=1)
        self.conv_out = ResampleConv(hidden, channels, 1)

    def forward(self, x, sigma, class_labels=None):
        sigma = sigma.reshape(-1, 1).to(x.dtype)
        c_in = 1 / (sigma ** 2 + 0.25).sqrt()
        c_skip = 0.25 / (sigma ** 2 + 0.25)
        c_out = sigma * 0.5 / (sigma ** 2 + 0.25).sqrt()
        e = F.silu(self.emb(sigma.log() / 4) + self.label(class_labels.to(x.dtype) * math.sqrt(self.label.in_features)))
        h = F.silu(self.conv_in(x * c_in.reshape(-1, 1, 1, 1)) + e[:, :, None, None])
        d = F.silu(self.down_fused(F.silu(self.down(h))))
        d = d + self.proj(self.attn(d).flatten(2).transpose(1, 2)).transpose(1, 2).reshape(d.shape)
        u = F.silu(self.up_sub(F.silu(self.up(d)))) + h
        return c_skip.reshape(-1, 1, 1, 1) * x + c_out.reshape(-1, 1, 1, 1) * self.conv_out(u)


# ---------- the families ----------

def _edm():
    net = EDMStyleNet()
    x = torch.randn(2, 3, 8, 8)
    return EDMDenoiser(net), x, dict(class_labels=torch.eye(4)[[1, 3]])


def _unet2d():
    diffusers = pytest.importorskip("diffusers")
    unet = diffusers.UNet2DModel(sample_size=8, in_channels=3, out_channels=3, block_out_channels=(8, 16),
                                 layers_per_block=1, norm_num_groups=4, attention_head_dim=4,
                                 down_block_types=("DownBlock2D", "AttnDownBlock2D"),
                                 up_block_types=("AttnUpBlock2D", "UpBlock2D"))
    return DiffusersDenoiser(unet, VPSchedule.linear(), "eps"), torch.randn(2, 3, 8, 8), {}


def _unet2d_condition():
    diffusers = pytest.importorskip("diffusers")
    unet = diffusers.UNet2DConditionModel(sample_size=8, in_channels=4, out_channels=4,
                                          block_out_channels=(8, 16), layers_per_block=1, norm_num_groups=4,
                                          cross_attention_dim=12, attention_head_dim=4,
                                          down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
                                          up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"))
    cond = dict(encoder_hidden_states=torch.randn(2, 5, 12))
    return DiffusersDenoiser(unet, VPSchedule.linear(), "eps"), torch.randn(2, 4, 8, 8), cond


def _dit():
    diffusers = pytest.importorskip("diffusers")
    dit = diffusers.DiTTransformer2DModel(num_attention_heads=2, attention_head_dim=4, in_channels=4,
                                          out_channels=4, num_layers=1, sample_size=8, patch_size=2,
                                          num_embeds_ada_norm=10, norm_num_groups=4)
    cond = dict(class_labels=torch.tensor([3, 7]))
    return DiffusersDenoiser(dit, VPSchedule.linear(), "eps"), torch.randn(2, 4, 8, 8), cond


def _sd3():
    diffusers = pytest.importorskip("diffusers")
    sd3 = diffusers.SD3Transformer2DModel(sample_size=8, patch_size=2, in_channels=4, out_channels=4,
                                          num_layers=2, attention_head_dim=4, num_attention_heads=2,
                                          joint_attention_dim=12, caption_projection_dim=8,
                                          pooled_projection_dim=6, pos_embed_max_size=8)
    cond = dict(encoder_hidden_states=torch.randn(2, 5, 12), pooled_projections=torch.randn(2, 6))
    return FlowDenoiser(sd3, time_arg="timestep"), torch.randn(2, 4, 8, 8), cond


def _flux():
    diffusers = pytest.importorskip("diffusers")
    flux = diffusers.FluxTransformer2DModel(patch_size=1, in_channels=4, num_layers=1, num_single_layers=1,
                                            attention_head_dim=8, num_attention_heads=2,
                                            joint_attention_dim=12, pooled_projection_dim=6,
                                            axes_dims_rope=(2, 2, 4))
    # the adapter packs (B, 1, 8, 8) latents into 16 tokens of 2x2 patches and supplies the per-token ids
    cond = dict(encoder_hidden_states=torch.randn(2, 5, 12), pooled_projections=torch.randn(2, 6))
    return FlowDenoiser(flux, time_scale=1.0, time_arg="timestep"), torch.randn(2, 1, 8, 8), cond


FAMILIES = {"edm": _edm, "unet2d": _unet2d, "unet2d_condition": _unet2d_condition, "dit": _dit, "sd3": _sd3,
            "flux": _flux}


def _build(family, seed=0):
    torch.manual_seed(seed)
    teacher, x, cond = FAMILIES[family]()
    teacher = teacher.to(DTYPE).eval()
    x = x.to(DTYPE)
    cond = {k: v.to(DTYPE) if v.is_floating_point() else v for k, v in cond.items()}
    fake = add_lora(teacher, rank=3, alpha=5.0)
    randomize_lora(fake, std=0.2)
    return teacher, fake, x, cond


def _double(v, n):
    return torch.cat([v, v]) if isinstance(v, torch.Tensor) and v.dim() > 0 and v.shape[0] == n else v


def _sigma(n):
    return torch.tensor([0.4, 3.0][:n], dtype=DTYPE)


@pytest.mark.parametrize("family", list(FAMILIES))
def test_split_equals_teacher_and_merged_network_values_and_input_gradients(family):
    teacher, fake, x, cond = _build(family)
    n = x.shape[0]
    targeted = [m for name, m in teacher.named_modules() if name and default_target(name, m)]
    assert len(list(lora_layers(fake))) == len(targeted) > 0
    if family == "edm":  # the layer classes that are not nn.Linear / nn.Conv2d get the weight-swap wrapper
        kinds = {type(m.base).__name__: type(m) for m in lora_layers(fake)}
        assert kinds == {"MatmulLinear": LoRAWeight, "ResampleConv": LoRAWeight, "SelfAttention": LoRAWeight,
                         "UpsampleConv": LoRAWeight, "Linear": LoRALinear}
    merged = merge_lora(fake)
    assert not any(isinstance(m, LoRALayer) for m in merged.modules())
    split = set_lora_mode(frozen_view(fake), "split")
    sigma = _sigma(n)

    xs = x.clone().requires_grad_()
    y = split(torch.cat([xs, xs]), torch.cat([sigma, sigma]), **{k: _double(v, n) for k, v in cond.items()})
    w = torch.randn(y.shape, dtype=DTYPE, generator=torch.Generator().manual_seed(1))
    (g_split,) = torch.autograd.grad((w * y).sum(), xs)

    xr = x.clone().requires_grad_()
    y_teacher = teacher(xr, sigma, **cond)
    y_merged = merged(xr, sigma, **cond)
    (g_ref,) = torch.autograd.grad((w[:n] * y_teacher).sum() + (w[n:] * y_merged).sum(), xr)
    _close(y[:n], y_teacher)
    _close(y[n:], y_merged)
    assert (y_teacher - y_merged).abs().max() > 1e-3 * y_teacher.abs().max()  # the update is not a no-op
    _close(g_split, g_ref)


@pytest.mark.parametrize("family", list(FAMILIES))
def test_only_the_factors_train_and_their_gradients_equal_the_merged_weights(family):
    teacher, fake, x, cond = _build(family)
    sigma = _sigma(x.shape[0])
    layers = {n: m for n, m in fake.named_modules() if isinstance(m, LoRALayer)}
    w = torch.randn(x.shape, dtype=DTYPE, generator=torch.Generator().manual_seed(2))
    (w * fake(x, sigma, **cond)).sum().backward()
    assert {id(p) for p in fake.parameters() if p.grad is not None} == {id(p) for p in lora_parameters(fake)}
    assert all(p.grad is None for p in teacher.parameters())
    assert set(lora_state_dict(fake)) == {n for n, _ in fake.named_parameters() if n.endswith(("lora_A",
                                                                                                 "lora_B"))}
    assert len(lora_state_dict(fake)) == 2 * len(layers)
    # the same loss through a plain network whose weights are W + scale * B A of leaf copies of the factors
    factors = {n: (m.lora_A.detach().clone().requires_grad_(), m.lora_B.detach().clone().requires_grad_())
               for n, m in layers.items()}
    params = {}
    for n, m in layers.items():
        a, b = factors[n]
        weight = m.base.weight.detach()
        if a.dim() == 2 and b.dim() == 2:
            delta = (b @ a).reshape(weight.shape)
        else:  # LoRAConv2d: B (out, r, 1, 1), A (r, in, kh, kw)
            delta = torch.einsum("or,rikl->oikl", b[:, :, 0, 0], a)
        params[n + ".weight"] = weight + m.scale * delta
    merged = merge_lora(fake)
    (w * torch.func.functional_call(merged, params, (x, sigma), cond)).sum().backward()
    for n, m in layers.items():
        _close(m.lora_A.grad, factors[n][0].grad)
        _close(m.lora_B.grad, factors[n][1].grad)


def test_split_view_under_torch_compile_equals_eager():
    teacher, fake, x, cond = _build("edm")
    split = set_lora_mode(frozen_view(fake), "split")
    sigma = _sigma(2)
    args = (torch.cat([x, x]), torch.cat([sigma, sigma]), torch.cat([cond["class_labels"]] * 2))
    compiled = torch.compile(split, backend="aot_eager", fullgraph=True)
    xe = args[0].clone().requires_grad_()
    xc = args[0].clone().requires_grad_()
    ye = split(xe, *args[1:])
    yc = compiled(xc, *args[1:])
    _close(yc, ye)
    (ge,) = torch.autograd.grad(ye.square().sum(), xe)
    (gc,) = torch.autograd.grad(yc.square().sum(), xc)
    _close(gc, ge)


def test_engine_lora_mode_on_edm_style_layers():
    """ScoreEngine(teacher, mode="lora") over layer classes that are not nn.Linear / nn.Conv2d."""
    torch.manual_seed(0)
    teacher = EDMDenoiser(EDMStyleNet()).to(DTYPE).eval()
    engine = ScoreEngine(teacher, mode="lora", lora_rank=2)
    randomize_lora(engine.fake.net, std=0.2)
    x_g = torch.randn(2, 3, 8, 8, dtype=DTYPE, requires_grad=True)
    noise = torch.randn(2, 3, 8, 8, dtype=DTYPE)
    sigma = _sigma(2)
    labels = torch.eye(4, dtype=DTYPE)[[0, 2]]
    y_real, y_fake = engine.generator_terms(x_g, sigma, labels, noise)
    x_t = x_g.detach() + sigma.reshape(-1, 1, 1, 1) * noise
    _close(y_real, teacher(x_t, sigma, labels))
    _close(y_fake, merge_lora(engine.fake.net)(x_t, sigma, labels))
    y_real.sum().backward()
    assert x_g.grad is not None
    assert all(p.grad is None for p in engine.fake_parameters())


def test_weight_swap_layer_errors_and_modes():
    conv = ResampleConv(2, 3, 3, down=True).to(DTYPE)
    with pytest.raises(ValueError, match="dropout must be 0 for a ResampleConv"):
        LoRAWeight(conv, rank=2, dropout=0.1)
    with pytest.raises(TypeError, match="weight parameter"):
        LoRAWeight(nn.GroupNorm(1, 4))
    with pytest.raises(TypeError, match="net.norm is a GroupNorm"):
        add_lora(nn.ModuleDict(dict(net=nn.ModuleDict(dict(norm=nn.GroupNorm(1, 2))))),
                 targets=lambda name, m: isinstance(m, nn.GroupNorm))
    layer = LoRAWeight(conv, rank=100, alpha=2.0)
    assert layer.lora_A.shape == (min(100, 2 * 9, 3), 2 * 9) and layer.lora_B.shape == (3, 3)
    x = torch.randn(4, 2, 6, 6, dtype=DTYPE)
    torch.testing.assert_close(layer(x), conv(x), rtol=0, atol=0)  # B = 0 starts at the base layer
    randomize_lora(layer, std=0.3)
    merged = merge_lora(nn.Sequential(layer))[0]
    assert type(merged) is ResampleConv
    _close(layer(x), merged(x))
    layer.mode = "off"
    torch.testing.assert_close(layer(x), conv(x), rtol=0, atol=0)
    layer.mode = "split"
    _close(layer(torch.cat([x, 2 * x])), torch.cat([conv(x), merged(2 * x)]))
    with pytest.raises(ValueError, match="doubled batch"):
        layer(x[:3])


def test_nested_targets_are_refused():
    outer = nn.Linear(2, 2)
    outer.inner = nn.Linear(2, 2)
    with pytest.raises(ValueError, match="targets outer and outer.inner are nested"):
        add_lora(nn.ModuleDict(dict(outer=outer)))


def test_default_targets_and_fast_layers():
    assert default_target("a", nn.Linear(2, 3)) and default_target("a", nn.Conv1d(2, 3, 3))
    assert default_target("a", MatmulLinear(2, 3))
    assert not default_target("a", nn.Embedding(4, 3)) and not default_target("a", nn.LayerNorm(3))
    assert not default_target("a", nn.Sequential(nn.Linear(2, 3)))  # holds no weight of its own
    wrapped = add_lora(nn.Sequential(nn.Linear(2, 3), nn.Conv2d(3, 3, 3, groups=3), nn.Conv2d(3, 3, 1),
                                     UpsampleConv(3, 3, 1)), rank=1)
    assert [type(m) for m in wrapped] == [LoRALinear, LoRAWeight, LoRAConv2d, LoRAWeight]


def test_lora_generator_trains_only_its_factors_over_the_teachers_weights():
    torch.manual_seed(0)
    teacher = EDMDenoiser(EDMStyleNet()).to(DTYPE).eval()
    before = [p.detach().clone() for p in teacher.parameters()]
    gen = LoRAGenerator(teacher, rank=2)
    assert gen.name == "generator" and gen.training and gen.net.network.conv_in.training
    gen.requires_grad_(True)  # reaches the factors only: the shared weights stay frozen
    assert {id(p) for p in gen.parameters() if p.requires_grad} == {id(p) for p in gen.lora_parameters()}
    x, sigma, labels = torch.randn(2, 3, 8, 8, dtype=DTYPE), _sigma(2), torch.eye(4, dtype=DTYPE)[[0, 1]]
    torch.testing.assert_close(gen(x, sigma, labels), teacher(x, sigma, labels), rtol=0, atol=0)
    opt = torch.optim.SGD(gen.lora_parameters(), lr=0.1)
    gen(x, sigma, labels).square().mean().backward()
    opt.step()
    assert all(torch.equal(p, q) for p, q in zip(teacher.parameters(), before))
    assert not torch.allclose(gen(x, sigma, labels), teacher(x, sigma, labels))
    gen.eval()
    assert not any(m.training for m in gen.modules())
