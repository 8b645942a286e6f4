"""sidfast.models.discriminator: SiDA's logits from the fake score's encoder, per network family."""
import pytest
import torch
import torch.nn.functional as F
from torch import nn

from sidfast.models.denoiser import DiffusersDenoiser, EDMDenoiser, FlowDenoiser
from sidfast.models.discriminator import DiscriminatorPass, DiscriminatorTap, default_layer
from sidfast.models.lora import LoRAFakeScore, lora_layers, set_lora_mode
from sidfast.schedules import VPSchedule
from sidfast.models.views import frozen_view
from utils import assert_float64_close

# The networks and inputs are float64 wherever the adapter allows it (the logits keep the activation's dtype
# when it is at least float32, sidfast/discriminator.py: logits_of): the tap's logits and a hand computation
# of the same activation run different kernels and batchings, and agree within float64_network_tolerance on
# any CPU.
F64 = torch.float64

# ---- stand-ins ----


class Block(nn.Module):
    """conv + SiLU, optionally strided, with a noise embedding added; counts its calls."""

    def __init__(self, cin, cout, emb_dim, stride=1):
        super().__init__()
        self.conv = nn.Conv2d(cin, cout, 3, stride, 1)
        self.emb = nn.Linear(emb_dim, cout)
        self.calls = 0

    def forward(self, x, emb):
        self.calls += 1
        return F.silu(self.conv(x) + self.emb(emb)[:, :, None, None])


class TinyEDMUNet(nn.Module):
    """An EDM-style U-Net written from the layout of NVlabs/edm's SongUNet: an ``enc`` ModuleDict of blocks
    named ``{r}x{r}_conv`` / ``_down`` / ``_block{i}``, every encoder output kept as a skip, a ``dec``
    ModuleDict that concatenates the skips (32x32 input: 32 -> 16 -> 8)."""

    def __init__(self, ch=3, width=8, emb_dim=8, label_dim=0):
        super().__init__()
        self.emb_dim = emb_dim
        self.label = nn.Linear(label_dim, emb_dim) if label_dim else None
        self.enc = nn.ModuleDict()
        self.enc["32x32_conv"] = nn.Conv2d(ch, width, 3, 1, 1)
        self.enc["32x32_block0"] = Block(width, width, emb_dim)
        self.enc["16x16_down"] = Block(width, 2 * width, emb_dim, stride=2)
        self.enc["16x16_block0"] = Block(2 * width, 2 * width, emb_dim)
        self.enc["8x8_down"] = Block(2 * width, 2 * width, emb_dim, stride=2)
        self.enc["8x8_block0"] = Block(2 * width, 2 * width, emb_dim)
        self.enc["8x8_block1"] = Block(2 * width, 2 * width, emb_dim)
        self.dec = nn.ModuleDict()
        self.dec["8x8_in"] = Block(2 * width, 2 * width, emb_dim)
        for idx in range(3):
            self.dec[f"8x8_block{idx}"] = Block(4 * width, 2 * width, emb_dim)
        self.dec["16x16_up"] = Block(2 * width, 2 * width, emb_dim)
        for idx in range(2):
            self.dec[f"16x16_block{idx}"] = Block(4 * width, 2 * width, emb_dim)
        self.dec["32x32_up"] = Block(2 * width, 2 * width, emb_dim)
        self.dec["32x32_block0"] = Block(3 * width, width, emb_dim)
        self.dec["32x32_block1"] = Block(2 * width, width, emb_dim)
        self.out = nn.Conv2d(width, ch, 3, 1, 1)

    def embed(self, c_noise, labels):
        freqs = torch.arange(1, self.emb_dim // 2 + 1, dtype=c_noise.dtype)
        emb = torch.cat([torch.cos(c_noise[:, None] * freqs), torch.sin(c_noise[:, None] * freqs)], 1)
        return emb + self.label(labels) if self.label is not None else emb

    def encode(self, x, emb):
        skips = []
        for name, block in self.enc.items():
            x = block(x) if name.endswith("_conv") else block(x, emb)
            skips.append(x)
        return x, skips

    def forward(self, x, c_noise, labels=None):
        emb = self.embed(c_noise, labels)
        x, skips = self.encode(x, emb)
        for name, block in self.dec.items():
            if name.endswith("_up"):
                x = F.interpolate(x, scale_factor=2.0)
            if "_block" in name:
                x = torch.cat([x, skips.pop()], 1)
            x = block(x, emb)
        return self.out(x)

    def decoder_calls(self):
        return sum(b.calls for b in self.dec.values())


class TinyPrecond(nn.Module):
    """EDMPrecond's shape: ``model`` inside, D(x) = c_skip x + c_out F(c_in x, ln(sigma)/4) (Karras et al.
    2022, Table 1)."""

    def __init__(self, sigma_data=0.5, **kw):
        super().__init__()
        self.sigma_data = sigma_data
        self.model = TinyEDMUNet(**kw)

    def inputs(self, x, sigma):
        s = sigma.reshape(-1, 1, 1, 1)
        sd = self.sigma_data
        return x / (sd ** 2 + s ** 2).sqrt(), sigma.log() / 4

    def forward(self, x, sigma, class_labels=None):
        s = sigma.reshape(-1, 1, 1, 1)
        sd = self.sigma_data
        x_in, c_noise = self.inputs(x, sigma)
        f = self.model(x_in, c_noise, class_labels)
        return sd ** 2 / (s ** 2 + sd ** 2) * x + s * sd / (s ** 2 + sd ** 2).sqrt() * f


def edm_denoiser(seed=0, dtype=F64, **kw):
    torch.manual_seed(seed)
    return EDMDenoiser(TinyPrecond(**kw).to(dtype))


def edm_encoder_by_hand(net: TinyPrecond, x, sigma, labels=None, upto=None):
    """The activation of ``net.model.enc[upto]`` (default: the last entry), computed without hooks."""
    x_in, c_noise = net.inputs(x, sigma)
    emb = net.model.embed(c_noise, labels)
    h = x_in
    for name, block in net.model.enc.items():
        h = block(h) if name.endswith("_conv") else block(h, emb)
        if name == upto:
            break
    return h


def channel_mean(a):
    return a.mean(dim=1, keepdim=True)


def randn(*shape, requires_grad=False):
    return torch.randn(*shape, dtype=F64, requires_grad=requires_grad)


def count_calls(modules):
    counter = {"calls": 0}

    def hook(*_):
        counter["calls"] += 1

    handles = [m.register_forward_pre_hook(hook) for m in modules]
    return counter, handles


# ---- EDM family ----


def test_edm_default_tap_is_last_lowest_resolution_entry():
    den = edm_denoiser()
    tap = DiscriminatorTap(den)
    assert tap.layer == "net.model.enc.8x8_block1"
    assert default_layer(den) == tap.layer
    x = randn(3, 3, 32, 32)
    sigma = torch.tensor([0.5, 2.0, 10.0], dtype=F64)
    y, logits = tap.forward_with_logits(x, sigma)
    assert logits.shape == (3, 1, 8, 8)
    assert logits.dtype == F64  # "at least float32": a float64 activation keeps its precision
    assert torch.equal(y, den(x, sigma))
    assert_float64_close(logits, channel_mean(edm_encoder_by_hand(den.net, x, sigma)))
    # a float32 network's logits are float32
    tap32 = DiscriminatorTap(edm_denoiser(dtype=torch.float32))
    assert tap32.encoder_logits(x.float(), sigma.float()).dtype == torch.float32


def test_edm_encoder_only_runs_no_decoder_and_matches_full_forward():
    den = edm_denoiser()
    tap = DiscriminatorTap(den)
    x = randn(2, 3, 32, 32)
    sigma = torch.tensor([1.0, 3.0], dtype=F64)
    _, full = tap.forward_with_logits(x, sigma)
    calls = den.net.model.decoder_calls()
    out_calls, handles = count_calls([den.net.model.out])
    enc_only = tap.encoder_logits(x, sigma)
    assert den.net.model.decoder_calls() == calls
    assert out_calls["calls"] == 0
    assert torch.equal(enc_only, full)
    # the tap is idle again: a plain forward runs the decoder and records nothing
    den(x, sigma)
    assert den.net.model.decoder_calls() == calls + len(den.net.model.dec)
    assert out_calls["calls"] == 1
    for h in handles:
        h.remove()


def test_edm_gradients_reach_encoder_parameters_and_input():
    den = edm_denoiser()
    tap = DiscriminatorTap(den)
    x = randn(2, 3, 32, 32, requires_grad=True)
    sigma = torch.tensor([1.0, 3.0], dtype=F64)
    tap.encoder_logits(x, sigma).square().sum().backward()
    enc = den.net.model.enc
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in enc.parameters())
    assert all(p.grad is None for p in den.net.model.dec.parameters())
    assert x.grad is not None and x.grad.abs().sum() > 0
    # the full forward's logits are in the graph as well, next to the x0 estimate
    x.grad = None
    y, logits = tap.forward_with_logits(x, sigma)
    g = torch.autograd.grad(logits.sum(), x)[0]
    assert g.abs().sum() > 0


def test_capture_context_records_and_rejects_a_missing_tap():
    den = edm_denoiser()
    tap = DiscriminatorTap(den)
    x = randn(2, 3, 32, 32)
    sigma = torch.tensor([1.0, 3.0], dtype=F64)
    with tap.capture() as out:
        y = den(x, sigma)
    assert torch.equal(y, den(x, sigma))
    assert_float64_close(out.logits, channel_mean(edm_encoder_by_hand(den.net, x, sigma)))
    with pytest.raises(RuntimeError, match="did not run"):
        with tap.capture():
            pass


def test_user_named_layer_output_and_input():
    den = edm_denoiser()
    x = randn(2, 3, 32, 32)
    sigma = torch.tensor([1.0, 3.0], dtype=F64)
    tap = DiscriminatorTap(den, "model.enc.16x16_block0")  # relative to the EDMPrecond inside
    assert tap.layer == "net.model.enc.16x16_block0"
    logits = tap.encoder_logits(x, sigma)
    assert logits.shape == (2, 1, 16, 16)
    assert_float64_close(logits, channel_mean(edm_encoder_by_hand(den.net, x, sigma, upto="16x16_block0")))
    # ":input" taps what goes into the module: the previous entry's output
    tap_in = DiscriminatorTap(den, "net.model.enc.8x8_down:input")
    assert_float64_close(tap_in.encoder_logits(x, sigma), logits)


@pytest.mark.parametrize("layer, hint", [("model.enc.8x8_blok1", "model.enc.8x8_block1"),
                                         ("nothing.here", "candidates: net.model"),
                                         ("model.enc.8x8_block1:outptu", "'input' or 'output'")])
def test_bad_layer_names_say_what_exists(layer, hint):
    with pytest.raises(ValueError, match="--disc-layer") as info:
        DiscriminatorTap(edm_denoiser(), layer)
    assert hint in str(info.value)


def test_unknown_family_asks_for_a_layer():
    net = nn.Sequential(nn.Conv2d(3, 4, 3, padding=1), nn.Conv2d(4, 3, 3, padding=1))
    with pytest.raises(ValueError, match=r"--disc-layer \(one of net\.net\.0, net\.net\.1\)"):
        DiscriminatorTap(EDMDenoiser(_Plain(net)))


class _Plain(nn.Module):
    def __init__(self, net):
        super().__init__()
        self.net = net

    def forward(self, x, sigma):
        return self.net(x)


def test_a_layer_that_runs_twice_is_refused():
    class Twice(nn.Module):
        def __init__(self):
            super().__init__()
            self.conv = nn.Conv2d(3, 3, 3, padding=1)

        def forward(self, x, sigma):
            return self.conv(self.conv(x))

    tap = DiscriminatorTap(EDMDenoiser(Twice()), "conv")
    with pytest.raises(RuntimeError, match="ran twice"):
        tap.forward_with_logits(torch.randn(1, 3, 4, 4), 1.0)


def test_a_swallowed_early_exit_is_an_error():
    class Swallows(nn.Module):
        def __init__(self):
            super().__init__()
            self.enc = nn.Conv2d(3, 3, 3, padding=1)
            self.dec = nn.Conv2d(3, 3, 3, padding=1)

        def forward(self, x, sigma):
            try:
                h = self.enc(x)
            except Exception:
                h = x
            return self.dec(h)

    tap = DiscriminatorTap(EDMDenoiser(Swallows()), "enc")
    with pytest.raises(RuntimeError, match="went on past"):
        tap.encoder_logits(torch.randn(1, 3, 4, 4), 1.0)


def test_discriminator_pass_is_one_call_for_the_fake_step():
    den = edm_denoiser()
    tap = DiscriminatorTap(den)
    step = DiscriminatorPass(tap)
    assert {id(p) for p in step.parameters()} == {id(p) for p in den.parameters()}
    x_t = randn(2, 3, 32, 32)
    x_real_t = randn(2, 3, 32, 32)
    sigma = torch.tensor([1.0, 3.0], dtype=F64)
    calls = den.net.model.decoder_calls()
    y, d_fake, d_real = step(x_t, sigma, None, x_real_t)
    assert den.net.model.decoder_calls() == calls + len(den.net.model.dec)  # the decoder ran once, for x_t
    assert torch.equal(y, den(x_t, sigma))
    assert_float64_close(d_fake, channel_mean(edm_encoder_by_hand(den.net, x_t, sigma)))
    assert_float64_close(d_real, channel_mean(edm_encoder_by_hand(den.net, x_real_t, sigma)))
    (y.sum() + d_fake.sum() + d_real.sum()).backward()
    assert all(p.grad is not None for p in den.parameters())
    with pytest.raises(ValueError, match="split-mode"):
        DiscriminatorPass(DiscriminatorTap(den, split=True))


# ---- LoRA fake score, frozen views, split batch ----


def lora_fake(seed=0):
    teacher = edm_denoiser(seed).eval()
    fake = LoRAFakeScore(teacher, rank=2)
    g = torch.Generator().manual_seed(seed + 1)
    with torch.no_grad():
        for m in lora_layers(fake.net):
            m.lora_B.copy_(torch.randn(m.lora_B.shape, generator=g) * 0.1)
    return teacher, fake


def test_lora_split_batch_returns_the_fake_half():
    teacher, fake = lora_fake()
    fake_tap = DiscriminatorTap(fake)
    assert not fake_tap.split and fake_tap.layer == "net.net.model.enc.8x8_block1"
    split = set_lora_mode(frozen_view(fake.net), "split")
    split_tap = fake_tap.on(split)
    assert split_tap.split and split_tap.layer == "net.model.enc.8x8_block1"
    x = randn(2, 3, 32, 32, requires_grad=True)
    sigma = torch.tensor([1.0, 3.0], dtype=F64)
    y, logits = split_tap.forward_with_logits(torch.cat([x, x]), torch.cat([sigma, sigma]))
    assert logits.shape == (2, 1, 8, 8)
    _, fake_logits = fake_tap.forward_with_logits(x, sigma)
    teacher_logits = DiscriminatorTap(teacher).encoder_logits(x, sigma)
    assert_float64_close(logits, fake_logits)
    # the halves differ, so the test can tell them apart
    assert (fake_logits - teacher_logits).abs().max() > 1e-3
    # the generator step: gradients to the input only, none to the shared or LoRA weights
    logits.sum().backward()
    assert x.grad.abs().sum() > 0
    assert all(p.grad is None for p in fake.parameters())
    with pytest.raises(ValueError, match="doubled batch"):
        split_tap.encoder_logits(randn(3, 3, 32, 32), torch.ones(3))


def test_encoder_only_pass_trains_the_lora_factors():
    _, fake = lora_fake()
    tap = DiscriminatorTap(fake)
    tap.encoder_logits(randn(2, 3, 32, 32), torch.tensor([1.0, 3.0], dtype=F64)).sum().backward()
    enc_factors = [p for n, p in fake.named_parameters() if ".enc." in n and n.endswith("lora_A")]
    dec_factors = [p for n, p in fake.named_parameters() if ".dec." in n and n.endswith("lora_A")]
    assert enc_factors and all(p.grad is not None and p.grad.abs().sum() > 0 for p in enc_factors)
    assert dec_factors and all(p.grad is None for p in dec_factors)


def test_a_frozen_view_copied_after_the_tap_does_not_record_into_it():
    den = edm_denoiser()
    tap = DiscriminatorTap(den)
    view = frozen_view(den)  # deepcopy: the hook is copied along, and must stay inert on the copy
    x = randn(2, 3, 32, 32)
    sigma = torch.tensor([1.0, 3.0], dtype=F64)
    with pytest.raises(RuntimeError, match="did not run"):
        with tap.capture():
            view(x, sigma)
    view_tap = tap.on(view)
    assert view_tap.layer == tap.layer
    assert torch.equal(view_tap.encoder_logits(x, sigma), tap.encoder_logits(x, sigma))


# ---- diffusers families ----


def tiny_unet2d(seed=0):
    diffusers = pytest.importorskip("diffusers")
    torch.manual_seed(seed)
    return diffusers.UNet2DModel(sample_size=16, in_channels=3, out_channels=3,
                                 block_out_channels=(8, 16, 16), layers_per_block=1, norm_num_groups=4,
                                 attention_head_dim=4,
                                 down_block_types=("DownBlock2D", "DownBlock2D", "AttnDownBlock2D"),
                                 up_block_types=("AttnUpBlock2D", "UpBlock2D", "UpBlock2D")).to(F64)


def tiny_unet2d_condition(seed=0):
    diffusers = pytest.importorskip("diffusers")
    torch.manual_seed(seed)
    return diffusers.UNet2DConditionModel(sample_size=16, in_channels=3, out_channels=3,
                                          block_out_channels=(8, 16), layers_per_block=1, norm_num_groups=4,
                                          cross_attention_dim=8, attention_head_dim=2,
                                          down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
                                          up_block_types=("UpBlock2D", "CrossAttnUpBlock2D")).to(F64)


def unet_encoder_by_hand(den: DiffusersDenoiser, x, sigma, **cond):
    """``down_blocks[-1]``'s hidden states, running the U-Net's embedding and down blocks by hand."""
    unet = den.unet
    a = torch.rsqrt(1 + sigma * sigma)
    temb = unet.time_embedding(unet.time_proj(den.timesteps(sigma)).to(x.dtype))
    h = unet.conv_in(x * a.reshape(-1, 1, 1, 1))
    for block in unet.down_blocks:
        if getattr(block, "has_cross_attention", False):
            h, _ = block(hidden_states=h, temb=temb, **cond)
        else:
            h, _ = block(hidden_states=h, temb=temb)
    return h


@pytest.mark.parametrize("kind", ["UNet2DModel", "UNet2DConditionModel"])
def test_diffusers_unets(kind):
    unet = tiny_unet2d() if kind == "UNet2DModel" else tiny_unet2d_condition()
    cond = {} if kind == "UNet2DModel" else {"encoder_hidden_states": randn(2, 3, 8)}
    den = DiffusersDenoiser(unet, VPSchedule.linear(), "eps")
    tap = DiscriminatorTap(den)
    assert tap.layer == f"unet.down_blocks.{len(unet.down_blocks) - 1}"
    x = randn(2, 3, 16, 16, requires_grad=True)
    sigma = torch.tensor([0.7, 4.0], dtype=F64)
    y, logits = tap.forward_with_logits(x, sigma, **cond)
    lowest = 16 // 2 ** (len(unet.down_blocks) - 1)
    assert logits.shape == (2, 1, lowest, lowest)
    assert torch.equal(y, den(x, sigma, **cond))
    assert_float64_close(logits, channel_mean(unet_encoder_by_hand(den, x, sigma, **cond)))

    counter, handles = count_calls([unet.mid_block, *unet.up_blocks, unet.conv_out])
    enc_only = tap.encoder_logits(x, sigma, **cond)
    assert counter["calls"] == 0
    assert torch.equal(enc_only, logits)
    for h in handles:
        h.remove()
    enc_only.sum().backward()
    assert x.grad.abs().sum() > 0
    assert all(p.grad is not None for p in unet.down_blocks[-1].parameters())
    assert all(p.grad is None for p in unet.mid_block.parameters())


def proj_input(module, run):
    """What ``module`` receives during ``run()``, captured by a plain pre-hook independent of the tap."""
    seen = []
    handle = module.register_forward_pre_hook(lambda m, args: seen.append(args[0]))
    run()
    handle.remove()
    return seen[0]


def test_dit_transformer():
    diffusers = pytest.importorskip("diffusers")
    torch.manual_seed(0)
    dit = diffusers.DiTTransformer2DModel(num_attention_heads=2, attention_head_dim=8, in_channels=4,
                                          out_channels=4, num_layers=2, sample_size=8, patch_size=2,
                                          num_embeds_ada_norm=10).eval().to(F64)
    den = DiffusersDenoiser(dit, VPSchedule.linear(), "eps")
    tap = DiscriminatorTap(den)
    assert tap.layer == "unet.proj_out_2:input"
    x = randn(2, 4, 8, 8, requires_grad=True)
    sigma = torch.tensor([0.7, 4.0], dtype=F64)
    labels = torch.tensor([1, 7])
    y, logits = tap.forward_with_logits(x, sigma, labels)
    tokens = (8 // 2) ** 2
    assert logits.shape == (2, 1, 16)  # pooled over the tokens: one logit per hidden feature
    hidden = proj_input(dit.proj_out_2, lambda: den(x, sigma, labels))
    assert hidden.shape == (2, tokens, 16)
    assert_float64_close(logits, channel_mean(hidden))
    counter, handles = count_calls([dit.proj_out_2])
    enc_only = tap.encoder_logits(x, sigma, labels)
    assert counter["calls"] == 0 and torch.equal(enc_only, logits)
    for h in handles:
        h.remove()
    enc_only.sum().backward()
    assert x.grad.abs().sum() > 0
    assert dit.transformer_blocks[-1].ff.net[0].proj.weight.grad is not None
    assert dit.proj_out_2.weight.grad is None


def test_sd3_transformer():
    diffusers = pytest.importorskip("diffusers")
    torch.manual_seed(0)
    sd3 = diffusers.SD3Transformer2DModel(sample_size=8, patch_size=2, in_channels=4, num_layers=2,
                                          attention_head_dim=8, num_attention_heads=2, joint_attention_dim=16,
                                          caption_projection_dim=16, pooled_projection_dim=8, out_channels=4,
                                          pos_embed_max_size=8).eval().to(F64)
    den = FlowDenoiser(sd3, time_arg="timestep")
    cond = {"encoder_hidden_states": randn(2, 3, 16), "pooled_projections": randn(2, 8)}
    tap = DiscriminatorTap(den)
    assert tap.layer == "model.proj_out:input"
    x = randn(2, 4, 8, 8)
    sigma = torch.tensor([0.7, 4.0], dtype=F64)
    y, logits = tap.forward_with_logits(x, sigma, **cond)
    assert logits.shape == (2, 1, 16)
    # the input of proj_out is norm_out's output: the last block's hidden states after the final norm
    hidden = proj_input(sd3.proj_out, lambda: den(x, sigma, **cond))
    assert_float64_close(logits, channel_mean(hidden))
    counter, handles = count_calls([sd3.proj_out])
    assert torch.equal(tap.encoder_logits(x, sigma, **cond), logits)
    assert counter["calls"] == 0
    for h in handles:
        h.remove()


# ---- the demo's network ----


def test_demo_digits_mlp():
    from sidfast.demo.nets import DigitsDenoiser

    torch.manual_seed(0)
    den = EDMDenoiser(DigitsDenoiser(width=32, depth=2, emb_dim=16, num_classes=10))
    tap = DiscriminatorTap(den)
    assert tap.layer == "net.net.blocks.1"
    x = torch.randn(3, 1, 8, 8, requires_grad=True)
    sigma = torch.tensor([0.2, 1.0, 5.0])
    labels = F.one_hot(torch.tensor([0, 4, 9]), 10).float()
    y, logits = tap.forward_with_logits(x, sigma, labels)
    assert logits.shape == (3, 1) and logits.dtype == torch.float32
    mlp = den.net.net
    counter, handles = count_calls([mlp.norm_out, mlp.fc_out])
    enc_only = tap.encoder_logits(x, sigma, labels)
    assert counter["calls"] == 0 and torch.equal(enc_only, logits)
    for hd in handles:
        hd.remove()
    enc_only.sum().backward()
    assert x.grad.abs().sum() > 0 and mlp.fc_in.weight.grad is not None and mlp.fc_out.weight.grad is None

    # The values: DigitsDenoiser computes in float32 whatever its weights' dtype (sidfast/demo/nets.py casts
    # the MLP's input), so the tap records a float64 copy of its MLP, called on the preconditioned input, and
    # the last block's output computed by hand must match it.
    mlp = mlp.double()
    x_in = (x.detach().double() / (den.net.sigma_data ** 2 + sigma.double() ** 2).sqrt()[:, None, None, None])
    c_noise = sigma.double().log() / 4
    with torch.no_grad():
        with tap.capture() as out:
            mlp(x_in, c_noise, labels.double())
        emb = F.silu(mlp.embed_noise(c_noise) + mlp.embed_label(labels.double()))
        h = mlp.fc_in(x_in.flatten(1))
        for block in mlp.blocks:
            h = block(h, emb)
    assert_float64_close(out.logits, channel_mean(h))


# ---- torch.compile ----


def test_compiled_callers_match_eager():
    den = edm_denoiser()
    tap = DiscriminatorTap(den)
    x = randn(2, 3, 32, 32)
    sigma = torch.tensor([1.0, 3.0], dtype=F64)
    y_ref, full_ref = tap.forward_with_logits(x, sigma)
    enc_ref = tap.encoder_logits(x, sigma)
    torch._dynamo.reset()
    # fullgraph: the hook, its flags and the early exit trace into one graph, with no break
    full = torch.compile(tap.forward_with_logits, backend="aot_eager", dynamic=False, fullgraph=True)
    enc = torch.compile(tap.encoder_logits, backend="aot_eager", dynamic=False, fullgraph=True)
    calls = den.net.model.decoder_calls()
    y, logits = full(x, sigma)
    assert den.net.model.decoder_calls() == calls + len(den.net.model.dec)
    assert_float64_close(y, y_ref)
    assert_float64_close(logits, full_ref)
    assert_float64_close(enc(x, sigma), enc_ref)
    assert den.net.model.decoder_calls() == calls + len(den.net.model.dec)
    # alternating the two compiled callers keeps each one's behaviour (the hook's flags are guarded)
    assert full(x, sigma)[0].shape == x.shape
    assert_float64_close(enc(x, sigma), enc_ref)
    torch._dynamo.reset()
