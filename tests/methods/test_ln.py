"""LayerNorm tuning against Hugging Face PEFT on identical weights and against the float64 formula."""

from __future__ import annotations

import copy

import pytest
import torch

import deltatune as dt
from deltatune.core.records import adapted_layers
from tests.models import ZOO

# zoo model -> PEFT target_modules naming the same norm layers our default finds
CASES = {
    "llama": ["input_layernorm", "post_attention_layernorm", "norm"],
    "bert": ["LayerNorm"],
    "gpt2": ["ln_1", "ln_2", "ln_f"],
}


@pytest.mark.parametrize("zoo_name", list(CASES))
def test_default_matches_peft_merged_and_unmerged(zoo_name):
    from peft import LNTuningConfig, get_peft_model

    zoo = ZOO[zoo_name]
    model = zoo.build()
    peft_model = get_peft_model(copy.deepcopy(model), LNTuningConfig(target_modules=CASES[zoo_name])).eval()
    report = dt.attach(model, dt.LNTuningConfig())
    theirs_names = [n for n, m in peft_model.base_model.model.named_modules() if hasattr(m, "ln_tuning_layers")]
    assert report.targets == theirs_names
    with torch.no_grad():
        for n, p in peft_model.named_parameters():
            if "ln_tuning_layers" in n:
                p.add_(0.3 * torch.randn_like(p))
    for layer_name, layer in adapted_layers(model):
        theirs = peft_model.base_model.model.get_submodule(layer_name).ln_tuning_layers["default"]
        with torch.no_grad():
            for n, p in layer.adapters["default"].tuned.items():
                p.copy_(getattr(theirs, n))
    expected = zoo.run(peft_model)
    assert not torch.allclose(expected, zoo.run(zoo.build()), rtol=1e-2, atol=1e-5)
    torch.testing.assert_close(zoo.run(model), expected, rtol=1e-6, atol=1e-6)
    dt.merge(model)
    peft_model.merge_adapter()
    torch.testing.assert_close(zoo.run(model), zoo.run(peft_model), rtol=1e-6, atol=1e-6)


def test_layernorm_formula_in_float64():
    norm = torch.nn.LayerNorm(8).double()
    model = torch.nn.Sequential(torch.nn.Linear(8, 8).double(), norm)
    dt.attach(model, dt.LNTuningConfig())
    tuned = model[1].adapters["default"].tuned
    with torch.no_grad():
        tuned["weight"].normal_()
        tuned["bias"].normal_()
    x = torch.randn(3, 8, dtype=torch.float64)
    h = model[0](x)
    mu, var = h.mean(-1, keepdim=True), h.var(-1, unbiased=False, keepdim=True)
    expected = tuned["weight"] * (h - mu) / torch.sqrt(var + norm.eps) + tuned["bias"]
    torch.testing.assert_close(model(x), expected, rtol=1e-12, atol=1e-12)
    assert torch.equal(norm.weight, torch.ones(8, dtype=torch.float64))  # the base is untouched


def test_trains_only_norms_and_merges_exactly():
    model = ZOO["llama"].build()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    report = dt.attach(model, dt.LNTuningConfig())
    assert report.trainable_parameters == 5 * 32  # 2 norms per block x 2 blocks + final norm, no biases
    with torch.no_grad():
        for p in model.parameters():
            if p.requires_grad:
                p.add_(torch.randn_like(p))
    out = ZOO["llama"].run(model)
    dt.merge(model)
    assert torch.equal(ZOO["llama"].run(model), out)  # a swap: bit-identical
    dt.unmerge(model)
    dt.detach(model)
    assert all(torch.equal(v, before[k]) for k, v in model.state_dict().items())


def test_explicit_target_and_no_norm():
    model = ZOO["llama"].build()
    report = dt.attach(model, dt.LNTuningConfig(target=["norm"]))
    assert report.targets == ["model.norm"]
    with pytest.raises(dt.NoMatchError):
        dt.attach(ZOO["mlp"].build(), dt.LNTuningConfig())
    with pytest.raises(dt.NoMatchError, match="cannot adapt"):
        dt.attach(ZOO["llama"].build(), dt.LNTuningConfig(target=["q_proj"]))
