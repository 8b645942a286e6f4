"""Classifier-free guidance (sidfast/guidance.py; docs/math.md, "Guidance (SiD-LSG)"): the combine formula,
one stacked forward, the named settings, and the condition dropout of the fake-score step."""
import math

import pytest
import torch
from torch import nn

from sidfast import conditions, guidance, reference
from sidfast import predictions as P
from sidfast import reference as R
from sidfast.guidance import CONDITION_DROPOUT, PRESETS, GuidanceScales, drop_condition, guided, null_labels
from sidfast.schedules import VPSchedule

NUM_CLASSES = 5


class LabelNet(nn.Module):
    """x0_hat = x * tanh(embedding of the labels) + sigma * bias: nonlinear in the condition, so that the
    conditional and unconditional outputs differ. Records every call's (batch, labels, keywords)."""

    def __init__(self, dtype=torch.float64):
        super().__init__()
        g = torch.Generator().manual_seed(0)
        self.embed = nn.Parameter(torch.randn(NUM_CLASSES, 3, generator=g, dtype=dtype))
        self.bias = nn.Parameter(torch.randn(3, 1, 1, generator=g, dtype=dtype))
        self.calls = []

    def forward(self, x, sigma, class_labels=None, **kw):
        self.calls.append((x.shape[0], None if class_labels is None else class_labels.clone(), dict(kw)))
        h = torch.zeros(x.shape[0], 3, dtype=x.dtype) if class_labels is None else class_labels @ self.embed
        s = sigma.reshape(-1, 1, 1, 1) if isinstance(sigma, torch.Tensor) and sigma.dim() else sigma
        return x * torch.tanh(h + 0.3)[:, :, None, None] + s * self.bias


class TextNet(nn.Module):
    """A text-conditioned network: keyword ``encoder_hidden_states`` (B, L, D) and ``pooled`` (B, D)."""

    def __init__(self):
        super().__init__()
        self.calls = []

    def forward(self, x, sigma, encoder_hidden_states=None, pooled=None, flag=None):
        self.calls.append((x.shape[0], flag))
        h = encoder_hidden_states.mean(1) + torch.sin(pooled)  # (B, D), D = channels
        return x * torch.tanh(h)[:, :, None, None] + sigma.reshape(-1, 1, 1, 1)


def _data(batch=6, seed=1):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(batch, 3, 4, 4, generator=g, dtype=torch.float64)
    sigma = torch.rand(batch, generator=g, dtype=torch.float64) * 3 + 0.1
    labels = nn.functional.one_hot(torch.randint(NUM_CLASSES, (batch,), generator=g), NUM_CLASSES).double()
    return x, sigma, labels


# ---- the formula ----

@pytest.mark.parametrize("k", [-1.0, 0.5, 1.5, 2.0, 4.5])
def test_guided_equals_the_two_call_formula(k):
    net = LabelNet()
    x, sigma, labels = _data()
    null = torch.zeros(1, NUM_CLASSES, dtype=torch.float64)
    f_u = net(x, sigma, null.expand(6, -1))
    f_c = net(x, sigma, labels)
    expected = f_u + k * (f_c - f_u)
    torch.testing.assert_close(guided(net, x, sigma, labels, null, k), expected)
    torch.testing.assert_close(R.cfg_combine(f_u, f_c, k), expected, rtol=0, atol=0)


@pytest.mark.parametrize("space", ["eps", "v", "flow"])
def test_guidance_commutes_with_the_prediction_conversions(space):
    """docs/math.md, "Guidance (SiD-LSG)": x0_hat is affine in any prediction with coefficients of x_t and
    sigma only, so guiding x0 estimates equals converting the guided prediction."""
    g = torch.Generator().manual_seed(2)
    a, s = VPSchedule.linear(1000).coefficients(torch.tensor([30.0, 400.0, 900.0], dtype=torch.float64))
    x_t = torch.randn(3, 2, 5, generator=g, dtype=torch.float64)
    pred_u = torch.randn(3, 2, 5, generator=g, dtype=torch.float64)
    pred_c = torch.randn(3, 2, 5, generator=g, dtype=torch.float64)
    k = 3.0
    guided_x0 = R.cfg_combine(P.to_x0(pred_u, x_t, a, s, space), P.to_x0(pred_c, x_t, a, s, space), k)
    torch.testing.assert_close(guided_x0, P.to_x0(R.cfg_combine(pred_u, pred_c, k), x_t, a, s, space))


# ---- one forward ----

def test_guidance_is_one_forward_over_the_stacked_batch():
    net = LabelNet()
    x, sigma, labels = _data()
    null = torch.zeros(1, NUM_CLASSES, dtype=torch.float64)
    guided(net, x, sigma, labels, null, 2.0)
    assert len(net.calls) == 1
    batch, seen, _ = net.calls[0]
    assert batch == 12
    assert torch.equal(seen[:6], null.expand(6, -1)) and torch.equal(seen[6:], labels)  # [uncond; cond]


def test_scale_one_is_the_plain_conditional_call_and_zero_the_unconditional_one():
    net = LabelNet()
    x, sigma, labels = _data()
    null = torch.zeros(1, NUM_CLASSES, dtype=torch.float64)
    assert torch.equal(guided(net, x, sigma, labels, null, 1.0), net(x, sigma, labels))
    assert torch.equal(guided(net, x, sigma, labels, null, 0.0), net(x, sigma, null.expand(6, -1)))
    assert [c[0] for c in net.calls] == [6, 6, 6, 6]
    # an unconditional network at scale 1: no condition needed
    assert torch.equal(guided(net, x, sigma, None, None, 1), net(x, sigma))


def test_index_labels_and_per_sample_null_rows():
    class IndexNet(LabelNet):
        def forward(self, x, sigma, class_labels=None, **kw):
            return super().forward(x, sigma, nn.functional.one_hot(class_labels, NUM_CLASSES).double())

    net = IndexNet()
    x, sigma, _ = _data()
    idx = torch.tensor([0, 1, 2, 3, 1, 0])
    null = torch.full((6,), NUM_CLASSES - 1)
    f_u = net(x, sigma, null)
    f_c = net(x, sigma, idx)
    torch.testing.assert_close(guided(net, x, sigma, idx, null, 1.5), f_u + 1.5 * (f_c - f_u))


def test_text_embedding_dicts():
    net = TextNet()
    g = torch.Generator().manual_seed(3)
    x = torch.randn(4, 3, 2, 2, generator=g, dtype=torch.float64)
    sigma = torch.rand(4, generator=g, dtype=torch.float64)
    cond = {"encoder_hidden_states": torch.randn(4, 7, 3, generator=g, dtype=torch.float64),
            "pooled": torch.randn(4, 3, generator=g, dtype=torch.float64), "flag": "kept"}
    null = {"encoder_hidden_states": torch.randn(1, 7, 3, generator=g, dtype=torch.float64),
            "pooled": torch.zeros(1, 3, dtype=torch.float64)}
    out = guided(net, x, sigma, cond, null, 4.5)
    assert net.calls == [(8, "kept")]
    null_rows = {k: v.expand(4, *v.shape[1:]) for k, v in null.items()}
    f_u = net(x, sigma, flag="kept", **null_rows)
    f_c = net(x, sigma, **cond)
    torch.testing.assert_close(out, f_u + 4.5 * (f_c - f_u))


def test_clear_errors():
    net = LabelNet()
    x, sigma, labels = _data()
    null = torch.zeros(1, NUM_CLASSES, dtype=torch.float64)
    with pytest.raises(ValueError, match="needs a conditional network: cond is None"):
        guided(net, x, sigma, None, None, 2.0)
    with pytest.raises(ValueError, match="needs null_cond"):
        guided(net, x, sigma, labels, None, 2.0)
    with pytest.raises(ValueError, match=r"null_cond must have shape \(1 or 6, 5\)"):
        guided(net, x, sigma, labels, torch.zeros(2, NUM_CLASSES, dtype=torch.float64), 2.0)
    with pytest.raises(TypeError, match="null_cond has dtype"):
        guided(net, x, sigma, labels, torch.zeros(1, NUM_CLASSES), 2.0)
    with pytest.raises(ValueError, match="cond has 5 rows but x has 6"):
        guided(net, x, sigma, labels[:5], null, 2.0)
    with pytest.raises(ValueError, match="lacks the keys"):
        guided(TextNet(), x, sigma, {"pooled": torch.zeros(6, 3)}, {"other": torch.zeros(1, 3)}, 2.0)
    with pytest.raises(ValueError, match="scale must be finite"):
        guided(net, x, sigma, labels, null, math.inf)


# ---- the named settings ----

@pytest.mark.parametrize("name, k, expected", [
    ("none", None, (1, 1, 1, 1)),
    ("lsg", 1.5, (1.5, 1.5, 1.5, 1.5)),
    ("lsg", 4.5, (4.5, 4.5, 4.5, 4.5)),
    ("long", 2.0, (1, 1, 1, 2.0)),
    ("short", 0.5, (0.5, 1, 1, 1)),
    ("zero", None, (0, 0, 0, 1)),
    ("anti", -1.0, (1, -1.0, -1.0, 1)),
])
def test_presets_give_the_documented_scales(name, k, expected):
    scales = GuidanceScales.preset(name, k)
    assert (scales.k1, scales.k2, scales.k3, scales.k4) == expected
    assert set(PRESETS) == {"none", "lsg", "long", "short", "zero", "anti"}


def test_preset_ranges_and_the_tied_fake_scales():
    for name, k in (("long", 1.0), ("short", 1.0), ("anti", 0.0), ("anti", 0.5)):
        with pytest.raises(ValueError, match=f"preset '{name}' needs k"):
            GuidanceScales.preset(name, k)
    with pytest.raises(ValueError, match="needs a scale k"):
        GuidanceScales.preset("lsg")
    with pytest.raises(ValueError, match="takes no scale"):
        GuidanceScales.preset("zero", 0.0)
    with pytest.raises(ValueError, match=r"k3 \(3.0\) must equal k2 \(2.0\)"):
        GuidanceScales(1, 2, 3, 1)
    assert GuidanceScales(1, 2, None, 1).k3 == 2.0
    with pytest.raises(ValueError, match="guidance preset must be one of"):
        GuidanceScales.preset("cfg", 2.0)


def test_dropout_rule_and_activity():
    """0.1 while k1 or k2 is not 1 (SiD-LSG); only the teacher guided (long) keeps every condition."""
    cases = {("none", None): (0.0, False), ("long", 2.0): (0.0, True), ("short", 0.5): (CONDITION_DROPOUT, True),
             ("lsg", 2.0): (CONDITION_DROPOUT, True), ("zero", None): (CONDITION_DROPOUT, True),
             ("anti", -1.0): (CONDITION_DROPOUT, True)}
    for (name, k), (p, active) in cases.items():
        scales = GuidanceScales.preset(name, k)
        assert scales.condition_dropout == p and scales.active is active, name
    assert CONDITION_DROPOUT == 0.1


# ---- condition dropout ----

def test_dropout_rate_and_untouched_rows():
    n = 200_000
    labels = nn.functional.one_hot(torch.arange(n) % NUM_CLASSES, NUM_CLASSES).float()
    null = torch.zeros(1, NUM_CLASSES)
    out = drop_condition(labels, null, 0.1, torch.Generator().manual_seed(0))
    dropped = (out == 0).all(1)
    # Binomial(n, 0.1): mean n p, standard deviation sqrt(n p (1 - p)); 6 deviations
    assert abs(dropped.sum().item() - n * 0.1) < 6 * math.sqrt(n * 0.1 * 0.9)
    assert torch.equal(out[~dropped], labels[~dropped])


def test_dropout_is_deterministic_per_generator_and_shared_across_dict_entries():
    cond = {"encoder_hidden_states": torch.randn(64, 7, 3), "pooled": torch.randn(64, 3), "flag": 1}
    null = {"encoder_hidden_states": torch.zeros(1, 7, 3), "pooled": torch.zeros(1, 3)}
    a = drop_condition(cond, null, 0.5, torch.Generator().manual_seed(7))
    b = drop_condition(cond, null, 0.5, torch.Generator().manual_seed(7))
    c = drop_condition(cond, null, 0.5, torch.Generator().manual_seed(8))
    assert all(torch.equal(a[k], b[k]) for k in null) and a["flag"] == 1
    assert not torch.equal(a["pooled"], c["pooled"])
    rows_h = (a["encoder_hidden_states"] == 0).flatten(1).all(1)
    rows_p = (a["pooled"] == 0).all(1)
    assert torch.equal(rows_h, rows_p) and 0 < rows_h.sum() < 64


def test_dropout_edge_probabilities():
    labels = torch.tensor([0, 1, 2, 3])
    null = torch.tensor([4])
    state = torch.get_rng_state()
    assert drop_condition(labels, null, 0.0) is labels
    assert torch.equal(torch.get_rng_state(), state)  # p = 0 draws nothing
    assert torch.equal(drop_condition(labels, null, 1.0), torch.full((4,), 4))
    with pytest.raises(ValueError, match=r"p must be in \[0, 1\]"):
        drop_condition(labels, null, 1.5)
    with pytest.raises(ValueError, match="unconditional network has none"):
        drop_condition(None, None, 0.1)


def test_null_labels():
    assert torch.equal(null_labels(10, "onehot"), torch.zeros(1, 10))
    assert torch.equal(null_labels(10, "index", null_index=10), torch.tensor([10]))
    with pytest.raises(ValueError, match="index labels need null_index"):
        null_labels(10, "index")
    with pytest.raises(ValueError, match="needs a conditional network"):
        null_labels(0, "onehot")


class NestedKeywords(torch.nn.Module):
    """A text denoiser taking SDXL-style nested keywords: encoder_hidden_states and added_cond_kwargs."""

    def forward(self, x, sigma, encoder_hidden_states, added_cond_kwargs):
        text = encoder_hidden_states.mean(dim=(1, 2)) + added_cond_kwargs["text_embeds"].sum(1)
        return x * (1 + added_cond_kwargs["time_ids"][:, :1]) + text[:, None]


def test_guidance_and_dropout_reach_nested_keyword_tensors():
    g = torch.Generator().manual_seed(0)
    x = torch.randn(3, 4, generator=g, dtype=torch.float64)
    cond = {"encoder_hidden_states": torch.randn(3, 2, 5, generator=g, dtype=torch.float64),
            "added_cond_kwargs": {"text_embeds": torch.randn(3, 6, generator=g, dtype=torch.float64),
                                  "time_ids": torch.rand(3, 6, generator=g, dtype=torch.float64)}}
    null = {"encoder_hidden_states": torch.zeros(1, 2, 5, dtype=torch.float64),
            "added_cond_kwargs": {"text_embeds": torch.zeros(1, 6, dtype=torch.float64),
                                  "time_ids": cond["added_cond_kwargs"]["time_ids"][:1]}}
    net = NestedKeywords()
    expanded = conditions.expand_null(cond, null, 3)
    want = reference.cfg_combine(conditions.call(net, x, 1.0, expanded), conditions.call(net, x, 1.0, cond), 2.0)
    torch.testing.assert_close(guidance.guided(net, x, 1.0, cond, null, 2.0), want, rtol=0, atol=1e-12)
    dropped = guidance.drop_condition(cond, null, 1.0)
    assert torch.equal(dropped["added_cond_kwargs"]["text_embeds"], torch.zeros(3, 6, dtype=torch.float64))
    assert torch.equal(dropped["encoder_hidden_states"], torch.zeros(3, 2, 5, dtype=torch.float64))
    with pytest.raises(ValueError, match="lacks the keys"):
        guidance.guided(net, x, 1.0, cond, {"encoder_hidden_states": null["encoder_hidden_states"]}, 2.0)
