"""LoRA against the float64 formula and against Hugging Face PEFT on identical weights."""

from __future__ import annotations

import copy
import math

import pytest
import torch
import torch.nn.functional as F

import deltatune as dt
from deltatune.core.records import adapted_layers
from tests.models import ZOO


def _peft_copy(model, targets, *, rank=4, alpha=8.0, rslora=False, init=False, fan_in_fan_out=False):
    """A PEFT-wrapped deep copy of ``model`` with the same LoRA placement."""
    from peft import LoraConfig, get_peft_model

    cfg = LoraConfig(r=rank, lora_alpha=alpha, target_modules=targets, use_rslora=rslora,
                     init_lora_weights=init, fan_in_fan_out=fan_in_fan_out)
    return get_peft_model(copy.deepcopy(model), cfg)


def _copy_peft_into_ours(peft_model, model, name="default"):
    """Copy PEFT's lora factors into our adapters (same shapes, same meaning)."""
    for layer_name, layer in adapted_layers(model):
        theirs = peft_model.base_model.model.get_submodule(layer_name)
        ours = layer.adapters[name]
        with torch.no_grad():
            if hasattr(theirs, "lora_embedding_A") and "default" in theirs.lora_embedding_A:
                ours.A.copy_(theirs.lora_embedding_A["default"])
                ours.B.copy_(theirs.lora_embedding_B["default"])
            else:
                ours.A.copy_(theirs.lora_A["default"].weight)
                ours.B.copy_(theirs.lora_B["default"].weight)


CASES = {
    "linear": ("mlp", ["fc1", "fc2"]),
    "conv": ("cnn", ["conv1", "conv2", "conv3"]),
    "embedding": ("bert", ["word_embeddings", "query"]),
    "gpt2-conv1d": ("gpt2", ["c_attn", "c_fc"]),
}


@pytest.mark.parametrize("rslora", [False, True])
@pytest.mark.parametrize("kind", list(CASES))
def test_matches_peft_merged_and_unmerged(kind, rslora):
    zoo_name, targets = CASES[kind]
    zoo = ZOO[zoo_name]
    model = zoo.build()
    peft_model = _peft_copy(model, targets, rslora=rslora, fan_in_fan_out=kind == "gpt2-conv1d").eval()
    dt.attach(model, dt.LoraConfig(target=targets, rank=4, alpha=8.0, rslora=rslora))
    # PEFT's embedding A starts at zero: make every factor non-zero so the comparison means something.
    with torch.no_grad():
        for n, p in peft_model.named_parameters():
            if "lora_" in n:
                p.normal_(0, 0.2)
    _copy_peft_into_ours(peft_model, model)
    expected = zoo.run(peft_model)
    assert not torch.allclose(expected, zoo.run(zoo.build()), atol=1e-3)  # the adapters do something
    torch.testing.assert_close(zoo.run(model), expected, rtol=1e-5, atol=1e-5)
    dt.merge(model)
    peft_model.merge_adapter()
    torch.testing.assert_close(zoo.run(model), zoo.run(peft_model), rtol=1e-5, atol=1e-5)


def test_linear_matches_float64_formula():
    torch.manual_seed(0)
    layer = torch.nn.Linear(6, 5).double()
    model = torch.nn.Sequential(layer, torch.nn.Linear(5, 2).double())
    dt.attach(model, dt.LoraConfig(target=["0"], rank=3, alpha=6.0))
    ad = model[0].adapters["default"]
    with torch.no_grad():
        ad.B.normal_()
    x = torch.randn(4, 7, 6, dtype=torch.float64)
    expected = x @ layer.weight.T + layer.bias + (6.0 / 3) * x @ ad.A.T @ ad.B.T
    torch.testing.assert_close(model[0](x), expected, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(ad.delta_weight(layer), 2.0 * ad.B @ ad.A)


def test_conv_delta_weight_is_the_conv_of_the_factors():
    conv = torch.nn.Conv2d(3, 4, 3, padding=1).double()
    model = torch.nn.Sequential(conv, torch.nn.Flatten(), torch.nn.Linear(4, 1).double())
    dt.attach(model, dt.LoraConfig(target=["0"], rank=2, alpha=2.0))
    ad = model[0].adapters["default"]
    with torch.no_grad():
        ad.B.normal_()
    x = torch.randn(2, 3, 5, 5, dtype=torch.float64)
    expected = F.conv2d(x, conv.weight + ad.delta_weight(conv), conv.bias, padding=1)
    torch.testing.assert_close(model[0](x), expected, rtol=1e-12, atol=1e-12)


def test_rank_and_alpha_patterns():
    model = ZOO["bert"].build()
    dt.attach(model, dt.LoraConfig(target=["query", "value"], rank=8, alpha=16,
                                   rank_pattern={"value": 2}, alpha_pattern={r"re:.*layer\.1\..*query": 4.0}))
    layers = dict(adapted_layers(model))
    assert layers["bert.encoder.layer.0.attention.self.value"].adapters["default"].rank == 2
    assert layers["bert.encoder.layer.0.attention.self.query"].adapters["default"].rank == 8
    assert layers["bert.encoder.layer.1.attention.self.query"].adapters["default"].scaling == 4.0 / 8
    assert layers["bert.encoder.layer.0.attention.self.query"].adapters["default"].scaling == 16 / 8


@pytest.mark.parametrize("init", ["pissa", "olora"])
def test_pissa_olora_match_peft_and_keep_the_base_bit_identical(init):
    zoo = ZOO["mlp"]
    model = zoo.build()
    weights = {k: v.clone() for k, v in model.state_dict().items()}
    base_out = zoo.run(model)
    peft_model = _peft_copy(model, ["fc1", "fc2"], init=init).eval()
    dt.attach(model, dt.LoraConfig(target=["fc1", "fc2"], rank=4, alpha=8.0, init=init))
    torch.testing.assert_close(zoo.run(model), base_out, rtol=0, atol=1e-6)  # starts at the base
    for layer_name, layer in adapted_layers(model):
        theirs = peft_model.base_model.model.get_submodule(layer_name)
        ours = layer.adapters["default"]
        torch.testing.assert_close(ours.A, theirs.lora_A["default"].weight, rtol=1e-4, atol=1e-5)
        torch.testing.assert_close(ours.B, theirs.lora_B["default"].weight, rtol=1e-4, atol=1e-5)
    # After "training" (new factor values) both give the same function of the original weights.
    with torch.no_grad():
        for n, p in peft_model.named_parameters():
            if "lora_" in n:
                p.add_(0.1 * torch.randn_like(p))
    _copy_peft_into_ours(peft_model, model)
    torch.testing.assert_close(zoo.run(model), zoo.run(peft_model), rtol=1e-4, atol=1e-4)
    assert all(torch.equal(model.state_dict()[k.replace("fc1.", "fc1.base.").replace("fc2.", "fc2.base.")], v)
               for k, v in weights.items())


def test_gaussian_init_and_defaults():
    model = ZOO["mlp"].build()
    dt.attach(model, dt.LoraConfig(target=["fc2"], rank=16, init="gaussian"))
    ad = model.fc2.adapters["default"]
    assert abs(ad.A.std().item() - 1 / 16) < 0.02 and torch.count_nonzero(ad.B) == 0
    default = dt.LoraConfig()
    assert (default.rank, default.alpha, default.dropout, default.init) == (8, 16.0, 0.0, "default")
    bound = 1 / math.sqrt(32)  # kaiming_uniform(a=sqrt(5)) on fan_in 32
    dt.attach(model, dt.LoraConfig(target=["fc2"]), "k")
    assert model.fc2.adapters["k"].A.abs().max() <= bound


def test_pissa_on_a_conv_is_refused():
    with pytest.raises(ValueError, match="init 'pissa' supports Linear layers only"):
        dt.attach(ZOO["cnn"].build(), dt.LoraConfig(target=["conv1"], init="pissa"))


def test_dropout_applies_to_the_adapter_path_only():
    model = ZOO["mlp"].build()
    dt.attach(model, dt.LoraConfig(target=["fc1"], dropout=0.5))
    layer = model.fc1
    with torch.no_grad():
        layer.adapters["default"].B.normal_()
    x = torch.randn(8, 16)
    layer.eval()
    eval_out = layer(x)
    layer.train()
    torch.manual_seed(3)
    train_out = layer(x)
    torch.manual_seed(3)
    ad = layer.adapters["default"]
    xd = F.dropout(x, 0.5, training=True)
    torch.testing.assert_close(train_out, layer.base(x) + ad.scaling * xd @ ad.A.T @ ad.B.T)
    assert not torch.allclose(eval_out, train_out)
