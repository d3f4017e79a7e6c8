"""(IA)³ against Hugging Face PEFT on identical weights and against the float64 formula."""

from __future__ import annotations

import copy

import pytest
import torch

import deltatune as dt
from deltatune.core.records import adapted_layers
from deltatune.methods.ia3 import IA3
from tests.models import ZOO

BERT_FF = r".*\.layer\.\d+\.output\.dense"

# zoo model -> (our config, PEFT target_modules, PEFT feedforward_modules, fan_in_fan_out)
CASES = {
    "llama": (dt.IA3Config(), ["k_proj", "v_proj", "down_proj"], ["down_proj"], False),
    "gpt2": (dt.IA3Config(), ["c_attn", "mlp.c_proj"], ["mlp.c_proj"], True),
    "bert": (dt.IA3Config(), rf".*\.attention\.self\.(key|value)|{BERT_FF}", BERT_FF, False),
    "cnn": (dt.IA3Config(target=["conv1", "conv2", "fc"], feedforward=["conv2", "fc"]),
            ["conv1", "conv2", "fc"], ["conv2", "fc"], False),
}


def _peft_copy(model, targets, feedforward, fan_in_fan_out):
    from peft import IA3Config, get_peft_model

    cfg = IA3Config(target_modules=targets, feedforward_modules=feedforward, fan_in_fan_out=fan_in_fan_out)
    return get_peft_model(copy.deepcopy(model), cfg)


@pytest.mark.parametrize("zoo_name", list(CASES))
def test_matches_peft_merged_and_unmerged(zoo_name):
    config, targets, feedforward, fan_in_fan_out = CASES[zoo_name]
    zoo = ZOO[zoo_name]
    model = zoo.build()
    peft_model = _peft_copy(model, targets, feedforward, fan_in_fan_out).eval()
    report = dt.attach(model, config)
    with torch.no_grad():
        for n, p in peft_model.named_parameters():
            if "ia3_l" in n:
                p.uniform_(0.5, 1.5)
    assert len(report.targets) == sum("ia3_l" in n for n, _ in peft_model.named_parameters())
    for layer_name, layer in adapted_layers(model):
        theirs = peft_model.base_model.model.get_submodule(layer_name)
        ours = layer.adapters["default"]
        assert ours.feedforward == theirs.is_feedforward, layer_name
        with torch.no_grad():
            ours.scale.copy_(theirs.ia3_l["default"].flatten())
    expected = zoo.run(peft_model)
    assert not torch.allclose(expected, zoo.run(zoo.build()), rtol=1e-2, atol=1e-5)  # the vectors do something
    torch.testing.assert_close(zoo.run(model), expected, rtol=1e-5, atol=1e-5)
    dt.merge(model)
    peft_model.merge_adapter()
    torch.testing.assert_close(zoo.run(model), zoo.run(peft_model), rtol=1e-5, atol=1e-5)


def test_bert_default_scales_keys_values_and_the_ffn_down_projection():
    model = ZOO["bert"].build()
    report = dt.attach(model, dt.IA3Config())
    ends = sorted({t.split("layer.0.")[-1] for t in report.targets if ".layer.0." in t})
    assert ends == ["attention.self.key", "attention.self.value", "output.dense"]
    ff = {n: layer.adapters["default"].feedforward for n, layer in adapted_layers(model)}
    assert ff["bert.encoder.layer.1.output.dense"] and not ff["bert.encoder.layer.1.attention.self.key"]
    assert model.bert.encoder.layer[0].output.dense.adapters["default"].scale.shape == (37,)  # d_ff, input side


def _layer(kind: str) -> torch.nn.Module:
    if kind == "linear":
        return torch.nn.Linear(6, 5).double()
    from transformers.pytorch_utils import Conv1D

    layer = Conv1D(5, 6).double()  # weight (d_in=6, d_out=5)
    torch.nn.init.normal_(layer.bias)
    return layer


@pytest.mark.parametrize("kind", ["linear", "conv1d"])
@pytest.mark.parametrize("feedforward", [False, True])
def test_formula_and_exact_unmerge_in_float64(kind, feedforward):
    layer = _layer(kind)
    model = torch.nn.Sequential(layer)
    w0, b0 = layer.weight.detach().clone(), layer.bias.detach().clone()
    dt.attach(model, dt.IA3Config(target=["0"], feedforward=["0"] if feedforward else []))
    ad = model[0].adapters["default"]
    with torch.no_grad():
        ad.scale.uniform_(0.5, 2.0)
    l = ad.scale.detach()
    x = torch.randn(3, 4, 6, dtype=torch.float64)
    W = w0 if kind == "linear" else w0.t()  # (d_out, d_in)
    expected = (x * l) @ W.T + b0 if feedforward else (x @ W.T + b0) * l
    torch.testing.assert_close(model(x), expected, rtol=1e-12, atol=1e-12)
    dt.merge(model)
    torch.testing.assert_close(model(x), expected, rtol=1e-12, atol=1e-12)
    dt.unmerge(model)
    torch.testing.assert_close(layer.weight, w0, rtol=0, atol=1e-14)
    torch.testing.assert_close(layer.bias, b0, rtol=0, atol=1e-14)


def test_conv_scales_channels():
    conv = torch.nn.Conv2d(3, 4, 3).double()
    ad_out = IA3(4, feedforward=False, layout="conv", spatial=2)
    ad_in = IA3(3, feedforward=True, layout="conv", spatial=2)
    ad_out.double(), ad_in.double()
    with torch.no_grad():
        ad_out.scale.uniform_(0.5, 2.0)
        ad_in.scale.uniform_(0.5, 2.0)
    x = torch.randn(2, 3, 6, 6, dtype=torch.float64)
    torch.testing.assert_close(ad_out(x, conv), conv(x) * ad_out.scale.view(1, 4, 1, 1))
    torch.testing.assert_close(ad_in(x, conv), conv(x * ad_in.scale.view(1, 3, 1, 1)))


def test_zero_entry_refuses_to_merge():
    model = torch.nn.Sequential(torch.nn.Linear(4, 4))
    dt.attach(model, dt.IA3Config(target=["0"]))
    with torch.no_grad():
        model[0].adapters["default"].scale[1] = 0.0
    w0 = model[0].weight.detach().clone()
    with pytest.raises(ValueError, match="zero entry"):
        dt.merge(model)
    assert torch.equal(model[0].weight, w0)


def test_bad_config_and_grouped_conv_input_side():
    with pytest.raises(ValueError, match="feedforward"):
        dt.IA3Config(feedforward=[3])
    model = torch.nn.Sequential(torch.nn.Conv2d(4, 4, 1, groups=2))
    with pytest.raises(ValueError, match="grouped"):
        dt.attach(model, dt.IA3Config(target=["0"], feedforward=["0"]))
    assert dt.IA3Config(feedforward="down_proj").feedforward == ("down_proj",)


def _scaled_linear(feedforward, bias, dtype=torch.float64):
    model = torch.nn.Sequential(torch.nn.Linear(24, 20, bias=bias)).to(dtype)
    dt.attach(model, dt.IA3Config(target=["0"], feedforward=["0"] if feedforward else []))
    with torch.no_grad():
        model[0].adapters["default"].scale.uniform_(0.5, 2.0)
    return model


def _formula(x, W, b, l, feedforward):
    out = (x * l) @ W.T if feedforward else (x @ W.T) * l
    return out if b is None else out + (b if feedforward else b * l)


@pytest.mark.parametrize("rows", [3, 50])  # fewer / more rows than inputs: both backward branches
@pytest.mark.parametrize("bias", [True, False])
@pytest.mark.parametrize("feedforward", [False, True])
def test_fused_linear_matches_the_float64_formula_and_its_gradients(feedforward, bias, rows):
    model = _scaled_linear(feedforward, bias)
    base, ad = model[0].base, model[0].adapters["default"]
    x = torch.randn(2, rows, 24, dtype=torch.float64, requires_grad=True)
    params = [x, ad.scale] + ([base.bias.requires_grad_()] if bias else [])  # a trained bias (BitFit-like)
    out = model(x)
    g = torch.randn_like(out)
    mine = torch.autograd.grad(out, params, g, retain_graph=True)
    again = torch.autograd.grad(out, params, g)            # nothing saved was modified
    ref = _formula(x, base.weight, base.bias, ad.scale, feedforward)
    torch.testing.assert_close(out, ref, rtol=1e-12, atol=1e-12)
    for a, a2, t in zip(mine, again, torch.autograd.grad(ref, params, g)):
        torch.testing.assert_close(a, t, rtol=1e-10, atol=1e-12)
        torch.testing.assert_close(a2, t, rtol=1e-10, atol=1e-12)
    with torch.no_grad():                                  # inference: the folded single product
        torch.testing.assert_close(model(x), ref, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("engine", ["aten", "thin", "onednn"])
@pytest.mark.parametrize("feedforward", [False, True])
def test_float32_on_every_cpu_engine(feedforward, engine, monkeypatch):
    from deltatune.core import products

    monkeypatch.setattr(products, "_ONEDNN_MIN_WORK", 0)       # oneDNN even for small shapes
    model = _scaled_linear(feedforward, True, torch.float32)
    base, ad = model[0].base, model[0].adapters["default"]
    x = torch.randn(40, 24, requires_grad=True)
    with products.cpu_engine(engine):
        out = model(x)
        g = torch.randn_like(out)
        mine = torch.autograd.grad(out, [x, ad.scale], g)
    ref_x, ref_l = x.detach().double().requires_grad_(), ad.scale.detach().double().requires_grad_()
    ref = _formula(ref_x, base.weight.double(), base.bias.double(), ref_l, feedforward)
    torch.testing.assert_close(out.double(), ref, rtol=1e-5, atol=1e-5)
    for a, t in zip(mine, torch.autograd.grad(ref, [ref_x, ref_l], g.double())):
        torch.testing.assert_close(a.double(), t, rtol=1e-4, atol=1e-4)


def test_hooked_or_trainable_base_is_called_not_fused():
    """A forward hook on the base still runs (the formula calls the layer), and a base weight that
    trains gets its gradient."""
    model = _scaled_linear(False, True)
    base = model[0].base
    base.register_forward_hook(lambda module, args, out: out * 0)
    assert torch.equal(model(torch.randn(4, 24, dtype=torch.float64)), torch.zeros(4, 20, dtype=torch.float64))
    model = _scaled_linear(True, True)
    model[0].base.weight.requires_grad_(True)
    model(torch.randn(4, 24, dtype=torch.float64)).sum().backward()
    assert model[0].base.weight.grad is not None
