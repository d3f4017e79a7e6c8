"""LoHa against the float64 formula and against Hugging Face PEFT on identical weights."""

from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F

import deltatune as dt
from deltatune.core.records import adapted_layers
from tests.methods.lycoris_parity import check_against_peft
from tests.models import ZOO, one_layer

CASES = {
    "linear": ("mlp", ["fc1", "fc2"], False),
    "conv": ("cnn", ["conv1", "conv2", "conv3"], False),
    "conv-effective": ("cnn", ["conv1", "conv2", "conv3"], True),
}


def _peft_loha(model, targets, rank, alpha, effective):
    from peft import LoHaConfig, get_peft_model

    cfg = LoHaConfig(r=rank, alpha=alpha, target_modules=targets, use_effective_conv2d=effective, init_weights=False)
    return get_peft_model(copy.deepcopy(model), cfg)  # init_weights=False: every factor random


def _copy_peft_into_ours(peft_model, model, prefix="hada_"):
    for layer_name, layer in adapted_layers(model):
        theirs = peft_model.base_model.model.get_submodule(layer_name)
        with torch.no_grad():
            for pname, p in layer.adapters["default"].named_parameters():
                p.copy_(getattr(theirs, prefix + pname)["default"].view_as(p))




@pytest.mark.parametrize("kind", list(CASES))
def test_matches_peft_outputs_gradients_and_merge(kind):
    zoo_name, targets, effective = CASES[kind]
    zoo = ZOO[zoo_name]
    model = zoo.build()
    peft_model = _peft_loha(model, targets, rank=4, alpha=6, effective=effective)
    dt.attach(model, dt.LohaConfig(target=targets, rank=4, alpha=6.0, effective_conv=effective))
    shapes = {n: tuple(p.shape) for n, p in model.named_parameters() if ".adapters." in n}
    peft_shapes = {n: tuple(p.shape) for n, p in peft_model.named_parameters() if ".hada_" in n}
    assert len(shapes) == len(peft_shapes)
    if effective:  # the CP cores are where the layouts differ: (r, r, 3, 3) for Conv2d
        assert shapes["conv1.adapters.default.t1"] == peft_shapes["base_model.model.conv1.hada_t1.default"]
    _copy_peft_into_ours(peft_model, model)
    # PEFT's hand-written backward for the CP form (HadaWeightCP) builds the gradients of W1a and
    # W2a from the other factor's core; ours is autograd's, checked by gradcheck below.
    check_against_peft(zoo, model, peft_model, "hada_", skip_grads=("w1_a", "w2_a") if effective else ())


def _loha_layer(base: torch.nn.Module, **kw):
    return one_layer(base, dt.LohaConfig(target=["0"], **kw))


def test_linear_and_gpt2_conv1d_match_float64_formula():
    from transformers.pytorch_utils import Conv1D

    model, ad = _loha_layer(torch.nn.Linear(6, 5), rank=3, alpha=4.0)
    delta = (4.0 / 3) * (ad.w1_a @ ad.w1_b) * (ad.w2_a @ ad.w2_b)  # (5, 6)
    x = torch.randn(4, 7, 6, dtype=torch.float64)
    base = model[0].base
    torch.testing.assert_close(model[0](x), x @ (base.weight + delta).T + base.bias, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(ad.delta_weight(base), delta, rtol=1e-12, atol=1e-12)

    model, ad = _loha_layer(Conv1D(5, 6), rank=2, alpha=2.0)  # weight (d_in=6, d_out=5)
    delta = (ad.w1_a @ ad.w1_b) * (ad.w2_a @ ad.w2_b)  # (5, 6)
    base = model[0].base
    torch.testing.assert_close(model[0](x), x @ (base.weight + delta.T) + base.bias, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(ad.delta_weight(base), delta.T)


def test_effective_conv_matches_the_cp_formula():
    model, ad = _loha_layer(torch.nn.Conv2d(3, 4, 3, padding=1, stride=2), rank=2, alpha=2.0, effective_conv=True)
    assert ad.t1.shape == (2, 2, 3, 3) and ad.w1_a.shape == (2, 4) and ad.w1_b.shape == (2, 3)

    def kernel(t, wa, wb):  # K[o, i, u, v] = Σ_p Σ_q t[p, q, u, v] wa[p, o] wb[q, i]
        return torch.tensordot(wa.T, torch.tensordot(wb.T, t, dims=([1], [1])), dims=([1], [1]))

    delta = kernel(ad.t1, ad.w1_a, ad.w1_b) * kernel(ad.t2, ad.w2_a, ad.w2_b)
    conv = model[0].base
    x = torch.randn(2, 3, 7, 7, dtype=torch.float64)
    expected = F.conv2d(x, conv.weight + delta, conv.bias, stride=2, padding=1)
    torch.testing.assert_close(model[0](x), expected, rtol=1e-12, atol=1e-12)
    # gradcheck perturbs the parameters in place and compares with autograd's gradients.
    assert torch.autograd.gradcheck(lambda *_: ad.make_delta(), tuple(ad.parameters()))
    # A 1x1 kernel has nothing to decompose: the plain (C_out, C_in) factors are used.
    _, ad = _loha_layer(torch.nn.Conv1d(3, 4, 1), rank=2, effective_conv=True)
    assert not hasattr(ad, "t1") and ad.w1_a.shape == (4, 2)


def test_init_is_identity_with_peft_distributions():
    zoo = ZOO["bert"]
    model = zoo.build()
    expected = zoo.run(model)
    report = dt.attach(model, dt.LohaConfig())  # default: all-linear
    assert torch.equal(zoo.run(model), expected)
    ad = model.bert.encoder.layer[0].attention.self.query.adapters["default"]
    assert torch.count_nonzero(ad.w2_b) == 0 and torch.count_nonzero(ad.w2_a) > 0
    assert ad.w1_b.abs().max() <= 1 / 32 ** 0.5  # kaiming_uniform(a=√5) on fan_in 32
    assert report.adapter_parameters == sum(p.numel() for n, p in model.named_parameters() if ".adapters." in n)


def test_rank_dropout_and_module_dropout_act_in_training_only():
    model, ad = _loha_layer(torch.nn.Linear(6, 5), rank=2, rank_dropout=0.5)
    layer, x = model[0], torch.randn(3, 6, dtype=torch.float64)
    torch.manual_seed(0)
    layer.train()
    out = layer(x)
    torch.manual_seed(0)
    keep = (torch.rand(5) >= 0.5).double()
    delta = ad.make_delta() * (keep / keep.mean())[:, None]
    torch.testing.assert_close(out, layer.base(x) + x @ delta.T, rtol=1e-12, atol=1e-12)
    layer.eval()
    torch.testing.assert_close(layer(x), layer.base(x) + x @ ad.make_delta().T)

    model, ad = _loha_layer(torch.nn.Linear(6, 5), rank=2, module_dropout=0.5)
    layer = model[0].train()
    skipped = sum(torch.equal(layer(x), layer.base(x)) for _ in range(200))
    assert 60 < skipped < 140
    layer.eval()
    assert not any(torch.equal(layer(x), layer.base(x)) for _ in range(20))


def test_unsupported_layers_and_bad_values():
    with pytest.raises(dt.NoMatchError, match="loha cannot adapt"):
        dt.attach(ZOO["bert"].build(), dt.LohaConfig(target=["word_embeddings"]))
    with pytest.raises(ValueError, match="cannot adapt .*Embedding.*remove it from the target"):
        dt.attach(ZOO["bert"].build(), dt.LohaConfig(target=["word_embeddings", "query"]))
    with pytest.raises(ValueError, match="rank must be >= 1"):
        dt.LohaConfig(rank=0)
    with pytest.raises(ValueError, match="module_dropout must be in"):
        dt.LohaConfig(module_dropout=1.0)
    with pytest.raises(ValueError, match="padding_mode='zeros'"):
        dt.attach(torch.nn.Sequential(torch.nn.Conv2d(2, 2, 3, padding_mode="reflect")), dt.LohaConfig(target=["0"]))


def test_config_round_trip_and_patterns():
    config = dt.LohaConfig(rank=4, alpha=2.0, effective_conv=True, rank_pattern={"fc2": 2})
    assert dt.config_from_dict(config.to_dict()) == config and config.to_dict()["method"] == "loha"
    model = ZOO["mlp"].build()
    dt.attach(model, config)
    assert model.fc1.adapters["default"].w1_a.shape == (32, 4)
    assert model.fc2.adapters["default"].w1_a.shape == (32, 2)
    assert model.fc2.adapters["default"].scaling == 2.0 / 2
