"""sidfast.models.lora and sidfast.models.views: LoRA layers over shared weights, the split (teacher half / fake half)
evaluation, frozen views."""
import pytest
import torch
from torch import nn
from torch.func import functional_call

from sidfast.models.denoiser import EDMDenoiser
from sidfast.models.lora import (LoRAConv2d, LoRAFakeScore, LoRALayer, LoRALinear, add_lora, lora_layers,
    lora_parameters, lora_state_dict, merge_lora, set_lora_mode)
from sidfast.models.views import frozen_view
from utils import SmallUNet, assert_float64_close as _close, randomize_lora, tiny_diffusers_unet

# The LoRA branch, the merged weight W + scale B A and the split batch [teacher half; fake half] are different
# computations of the same function (other summation orders, other blocking of a doubled batch): they are
# compared in float64 (layers, networks and inputs) within float64_network_tolerance.
F64 = torch.float64


# ---------- layers ----------

CONVS = [dict(kernel_size=1), dict(kernel_size=3, padding=1), dict(kernel_size=3, stride=2, padding=1),
         dict(kernel_size=3, padding="same", dilation=2),
         dict(kernel_size=(3, 1), padding=(1, 0), bias=False)]


@pytest.mark.parametrize("conv", CONVS, ids=str)
@pytest.mark.parametrize("rank", [1, 4, 100])
def test_conv_layer_modes_equal_merged_and_base(conv, rank):
    torch.manual_seed(0)
    base = nn.Conv2d(5, 6, **conv).to(F64)
    layer = randomize_lora(LoRAConv2d(base, rank=rank, alpha=3.0))
    assert layer.lora_A.shape[0] == min(rank, 5 * base.kernel_size[0] * base.kernel_size[1], 6)
    merged = merge_lora(nn.Sequential(layer))[0]
    assert type(merged) is nn.Conv2d
    x = torch.randn(4, 5, 7, 9, dtype=F64)
    _close(layer(x), merged(x))
    layer.mode = "off"
    torch.testing.assert_close(layer(x), base(x), rtol=0, atol=0)
    layer.mode = "split"
    _close(layer(torch.cat([x, x])), torch.cat([base(x), merged(x)]))


@pytest.mark.parametrize("shape", [(4, 5), (2, 7, 5), (2, 3, 4, 5)])
@pytest.mark.parametrize("rank", [2, 64])
def test_linear_layer_modes_equal_merged_and_base(shape, rank):
    torch.manual_seed(0)
    base = nn.Linear(5, 3).to(F64)
    layer = randomize_lora(LoRALinear(base, rank=rank))
    merged = merge_lora(nn.Sequential(layer))[0]
    assert type(merged) is nn.Linear
    x = torch.randn(*shape, dtype=F64)
    _close(layer(x), merged(x))
    layer.mode = "split"
    xx = torch.cat([x, 2 * x])
    _close(layer(xx), torch.cat([base(x), merged(2 * x)]))


def test_zero_init_starts_equal_to_the_base():
    base = nn.Conv2d(3, 4, 3, padding=1)
    layer = LoRAConv2d(base, rank=2)
    x = torch.randn(2, 3, 5, 5)
    torch.testing.assert_close(layer(x), base(x), rtol=0, atol=0)
    assert layer.lora_A.abs().sum() > 0 and layer.lora_B.abs().sum() == 0


def test_layer_errors():
    with pytest.raises(ValueError, match="rank"):
        LoRALinear(nn.Linear(2, 2), rank=0)
    with pytest.raises(ValueError, match="dropout"):
        LoRALinear(nn.Linear(2, 2), dropout=1.0)
    with pytest.raises(ValueError, match="mode"):
        LoRALinear(nn.Linear(2, 2), mode="both")
    with pytest.raises(ValueError, match="groups"):
        LoRAConv2d(nn.Conv2d(4, 4, 3, groups=2))
    with pytest.raises(ValueError, match="padding_mode"):
        LoRAConv2d(nn.Conv2d(4, 4, 3, padding_mode="reflect"))
    layer = LoRALinear(nn.Linear(2, 2), mode="split")
    with pytest.raises(ValueError, match="doubled batch"):
        layer(torch.randn(3, 2))


def test_layer_lora_dropout_acts_in_training_only():
    torch.manual_seed(0)
    layer = randomize_lora(LoRALinear(nn.Linear(16, 16), rank=4, dropout=0.5), std=1.0)
    x = torch.randn(8, 16)
    layer.eval()
    ref = layer(x)
    layer.train()
    assert not torch.allclose(layer(x), ref)


# ---------- frozen views ----------


# ---------- whole networks ----------

def _lora_net(seed=0, **kw):
    torch.manual_seed(seed)
    teacher = EDMDenoiser(SmallUNet(**kw)).to(F64).eval()
    return teacher, randomize_lora(add_lora(teacher, rank=4, alpha=8.0))


def test_add_lora_leaves_the_teacher_alone_and_trains_only_lora_factors():
    teacher, fake = _lora_net()
    assert not any(isinstance(m, LoRALayer) for m in teacher.modules())
    n_layers = sum(isinstance(m, (nn.Linear, nn.Conv2d)) for m in teacher.modules())
    assert len(list(lora_layers(fake))) == n_layers
    trainable = [p for p in fake.parameters() if p.requires_grad]
    assert {id(p) for p in trainable} == {id(p) for p in lora_parameters(fake)}
    assert len(trainable) == 2 * n_layers
    base = [p for n, p in fake.named_parameters() if not n.endswith(("lora_A", "lora_B"))]
    assert [p.data_ptr() for p in base] == [p.data_ptr() for p in teacher.parameters()]  # shared, not copied
    factors = {n for n, _ in fake.named_parameters() if n.endswith(("lora_A", "lora_B"))}
    assert set(lora_state_dict(fake)) == factors


def test_split_network_equals_teacher_and_merged_network_with_input_gradients():
    teacher, fake = _lora_net(label_dim=4)
    merged = merge_lora(fake)
    assert not any(isinstance(m, LoRALayer) for m in merged.modules())
    split = set_lora_mode(frozen_view(fake), "split")
    g = torch.Generator().manual_seed(1)
    x = torch.randn(3, 3, 8, 8, generator=g, dtype=F64)
    sigma = torch.tensor([0.05, 1.0, 20.0], dtype=F64)
    labels = torch.eye(4, dtype=F64)[[0, 2, 3]]
    xs = x.clone().requires_grad_()
    y = split(torch.cat([xs, xs]), torch.cat([sigma, sigma]), torch.cat([labels, labels]))
    w = torch.randn(y.shape, generator=g, dtype=F64)
    (gs,) = torch.autograd.grad((w * y).sum(), xs)
    xr = x.clone().requires_grad_()
    y_t, y_f = teacher(xr, sigma, labels), merged(xr, sigma, labels)
    (gr,) = torch.autograd.grad((w[:3] * y_t).sum() + (w[3:] * y_f).sum(), xr)
    _close(y[:3], y_t)
    _close(y[3:], y_f)
    assert not torch.allclose(y_t, y_f, atol=1e-3)  # the fake really differs from the teacher
    _close(gs, gr)


def test_lora_factor_gradients_equal_the_merged_weight_function():
    """d/dA, d/dB through the LoRA branch equal autograd through W + scale * B A in a plain network."""
    teacher, fake = _lora_net()
    merged = merge_lora(fake)
    layers = dict((n, m) for n, m in fake.named_modules() if isinstance(m, LoRALayer))
    x = torch.randn(2, 3, 8, 8, dtype=F64)
    sigma = torch.tensor([0.3, 4.0], dtype=F64)
    w = torch.randn(2, 3, 8, 8, dtype=F64)
    (w * fake(x, sigma)).sum().backward()
    factors = {n: (m.lora_A.detach().clone().requires_grad_(), m.lora_B.detach().clone().requires_grad_())
               for n, m in layers.items()}
    params = {}
    for n, m in layers.items():
        a, b = factors[n]
        delta = (b @ a) if a.dim() == 2 else torch.einsum("or,rikl->oikl", b[:, :, 0, 0], a)
        params[n + ".weight"] = m.base.weight.detach() + m.scale * delta
    (w * functional_call(merged, params, (x, sigma))).sum().backward()
    for n, m in layers.items():
        _close(m.lora_A.grad, factors[n][0].grad)
        _close(m.lora_B.grad, factors[n][1].grad)


def test_add_lora_targets_and_errors():
    teacher = EDMDenoiser(SmallUNet())
    only_linear = add_lora(teacher, rank=2, targets=lambda name, m: isinstance(m, nn.Linear))
    assert all(isinstance(m.base, nn.Linear) for m in lora_layers(only_linear))
    with pytest.raises(ValueError, match="no layer"):
        add_lora(teacher, targets=lambda name, m: False)
    with pytest.raises(ValueError, match="already"):
        add_lora(only_linear)
    with pytest.raises(TypeError, match="net.drop is a Dropout, which holds no weight"):
        add_lora(teacher, targets=lambda name, m: isinstance(m, nn.Dropout))
    with pytest.raises(ValueError, match="mode"):
        set_lora_mode(only_linear, "half")


def test_lora_fake_score_keeps_the_shared_base_in_eval():
    torch.manual_seed(0)
    teacher = EDMDenoiser(SmallUNet(dropout=0.5)).to(F64).eval()
    fake = LoRAFakeScore(teacher, rank=2, dropout=0.1)
    assert fake.training and fake.name == "fake score"
    assert all(m.training for m in lora_layers(fake)) and not fake.net.network.drop.training
    x = torch.randn(2, 3, 8, 8, dtype=F64)
    sigma = torch.ones(2, dtype=F64)
    # B = 0: equal to the teacher, no base dropout (a LoRA convolution may evaluate the base in another kernel)
    _close(fake(x, sigma), teacher(x, sigma))
    fake.eval()
    assert not any(m.training for m in fake.modules())
    with pytest.raises(TypeError, match="Denoiser"):
        LoRAFakeScore(SmallUNet())

    class Bad(nn.Module):
        def __init__(self):
            super().__init__()
            self.lin = nn.Linear(8, 8)

        def forward(self, x, sigma, class_labels=None):
            return x[:1]

    with pytest.raises(ValueError, match="fake score.*shape"):
        LoRAFakeScore(EDMDenoiser(Bad()))(x, sigma)


def test_lora_on_a_diffusers_unet_split_equals_teacher_and_merged():
    """diffusers' U-Net layers are batch-first, so the split evaluation is exact there too."""
    from sidfast.models.denoiser import DiffusersDenoiser
    from sidfast.schedules import VPSchedule

    unet = tiny_diffusers_unet().to(F64)
    teacher = DiffusersDenoiser(unet, VPSchedule.linear(), "eps").eval()
    fake = randomize_lora(add_lora(teacher, rank=4))
    split = set_lora_mode(frozen_view(fake), "split")
    x = torch.randn(2, 3, 8, 8, dtype=F64)
    sigma = torch.tensor([0.5, 5.0], dtype=F64)
    with torch.no_grad():
        y = split(torch.cat([x, x]), torch.cat([sigma, sigma]))
        _close(y[:2], teacher(x, sigma))
        _close(y[2:], merge_lora(fake)(x, sigma))


def test_lora_fake_score_requires_grad_reaches_only_the_factors():
    """An optimizer over ``parameters()`` after ``requires_grad_(True)`` must not step the teacher's weights."""
    teacher = EDMDenoiser(SmallUNet()).eval()
    fake = LoRAFakeScore(teacher, rank=2)
    fake.requires_grad_(True)
    assert {id(p) for p in fake.parameters() if p.requires_grad} == {id(p) for p in fake.lora_parameters()}
    fake.requires_grad_(False)
    assert not any(p.requires_grad for p in fake.parameters())
