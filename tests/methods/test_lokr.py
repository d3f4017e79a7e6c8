"""LoKr against the float64 formula and against Hugging Face PEFT on identical weights."""

from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F

import deltatune as dt
from deltatune.core.records import adapted_layers
from deltatune.methods.lokr import factorize
from tests.methods.lycoris_parity import check_against_peft
from tests.models import ZOO, one_layer

# (zoo model, targets, LokrConfig keywords); the comments say which factors end up full or low-rank.
CASES = {
    "linear-lowrank": ("mlp", ["fc1", "fc2"], dict(rank=2)),           # W1 full, W2 = W2a W2b
    "linear-full": ("mlp", ["fc1", "fc2"], dict(rank=8)),              # W1, W2 full
    "linear-both": ("mlp", ["fc1", "fc2"], dict(rank=1, decompose_both=True, decompose_factor=4)),
    "conv": ("cnn", ["conv1", "conv2", "conv3"], dict(rank=1)),        # W2 = W2a W2b over (C_in·k·k)
    "conv-effective": ("cnn", ["conv1", "conv2", "conv3"], dict(rank=1, effective_conv=True)),
    "conv-full": ("cnn", ["conv1", "conv2"], dict(rank=4)),            # W2 full (b, d, 3, 3)
}


def _peft_lokr(model, targets, rank=8, alpha=8.0, effective_conv=False, decompose_both=False, decompose_factor=-1):
    from peft import LoKrConfig, get_peft_model

    cfg = LoKrConfig(r=rank, alpha=alpha, target_modules=targets, use_effective_conv2d=effective_conv,
                     decompose_both=decompose_both, decompose_factor=decompose_factor, init_weights=False)
    return get_peft_model(copy.deepcopy(model), cfg)  # init_weights=False: every factor random


@pytest.mark.parametrize("kind", list(CASES))
def test_matches_peft_shapes_outputs_gradients_and_merge(kind):
    zoo_name, targets, kw = CASES[kind]
    zoo = ZOO[zoo_name]
    model = zoo.build()
    peft_model = _peft_lokr(model, targets, alpha=3.0, **kw)
    dt.attach(model, dt.LokrConfig(target=targets, alpha=3.0, **kw))
    peft_params = dict(peft_model.named_parameters())
    for layer_name, layer in adapted_layers(model):
        names = {f"{layer_name}.lokr_{n}.default" for n, _ in layer.adapters["default"].named_parameters()}
        prefix = f"base_model.model.{layer_name}.lokr_"
        assert names == {n[len("base_model.model."):] for n in peft_params if n.startswith(prefix)}
        for pname, p in layer.adapters["default"].named_parameters():
            theirs = peft_params[f"base_model.model.{layer_name}.lokr_{pname}.default"]
            assert p.shape == theirs.shape, (layer_name, pname)
            with torch.no_grad():
                p.copy_(theirs)

    check_against_peft(zoo, model, peft_model, "lokr_")


def test_factorize_matches_peft():
    from peft.tuners.lokr.layer import factorization

    for dim in range(1, 300):
        for factor in (-1, 1, 2, 3, 4, 5, 8, 16, 32, 100):
            assert factorize(dim, factor) == factorization(dim, factor), (dim, factor)
    assert factorize(768) == (24, 32) and factorize(37) == (1, 37) and factorize(128, 4) == (4, 32)


def _lokr_layer(base: torch.nn.Module, **kw):
    return one_layer(base, dt.LokrConfig(target=["0"], **kw))


def test_linear_matches_the_kronecker_formula_in_float64():
    model, ad = _lokr_layer(torch.nn.Linear(16, 12), rank=1, alpha=2.0, decompose_both=True)
    # d_out 12 = 3·4, d_in 16 = 4·4; W1 (3, 4) = W1a W1b and W2 (4, 4) = W2a W2b with r = 1
    assert (ad.w1_a.shape, ad.w1_b.shape, ad.w2_a.shape, ad.w2_b.shape) == ((3, 1), (1, 4), (4, 1), (1, 4))
    w1, w2 = ad.w1_a @ ad.w1_b, ad.w2_a @ ad.w2_b
    delta = torch.empty(12, 16, dtype=torch.float64)
    for i in range(3):
        for k in range(4):
            delta[4 * i:4 * i + 4, 4 * k:4 * k + 4] = 2.0 * w1[i, k] * w2  # block (i, k) = s · W1[i, k] W2
    base, x = model[0].base, torch.randn(5, 16, dtype=torch.float64)
    torch.testing.assert_close(model[0](x), x @ (base.weight + delta).T + base.bias, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(ad.delta_weight(base), delta, rtol=1e-12, atol=1e-12)


def test_conv1d_with_full_w2_is_the_kronecker_product_per_kernel_position():
    # The documented difference from PEFT, whose kron of a 2-D W1 and a 3-D W2 mixes the axes.
    model, ad = _lokr_layer(torch.nn.Conv1d(4, 6, 3, padding=1), rank=8)
    assert ad.full_w2 and ad.w1.shape == (2, 2) and ad.w2.shape == (3, 2, 3)
    delta = torch.stack([torch.kron(ad.w1, ad.w2[..., j]) for j in range(3)], dim=-1) * ad.scaling
    conv, x = model[0].base, torch.randn(2, 4, 9, dtype=torch.float64)
    torch.testing.assert_close(model[0](x), F.conv1d(x, conv.weight + delta, conv.bias, padding=1),
                               rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("init", ["default", "lycoris"])
def test_init_is_identity(init):
    zoo = ZOO["llama"]
    model = zoo.build()
    expected = zoo.run(model)
    dt.attach(model, dt.LokrConfig(init=init))  # default target: all-linear
    assert torch.equal(zoo.run(model), expected)
    ad = model.model.layers[0].self_attn.q_proj.adapters["default"]  # 32 -> 32: W1 (4, 4), W2 (8, 8) full
    zero, random = (ad.w1, ad.w2) if init == "default" else (ad.w2, ad.w1)
    assert torch.count_nonzero(zero) == 0 and torch.count_nonzero(random) == random.numel()


def test_rank_dropout_rescales_only_when_asked():
    for rescale in (False, True):
        model, ad = _lokr_layer(torch.nn.Linear(6, 8), rank=2, rank_dropout=0.5, rescale_rank_dropout=rescale)
        layer, x = model[0].train(), torch.randn(3, 6, dtype=torch.float64)
        torch.manual_seed(0)
        out = layer(x)
        torch.manual_seed(0)
        keep = (torch.rand(8) >= 0.5).double()
        keep = keep / keep.mean() if rescale else keep
        expected = layer.base(x) + x @ (ad.make_delta() * keep[:, None]).T
        torch.testing.assert_close(out, expected, rtol=1e-12, atol=1e-12)


def test_bad_values_and_round_trip():
    with pytest.raises(ValueError, match="decompose_factor must be -1"):
        dt.LokrConfig(decompose_factor=0)
    with pytest.raises(ValueError, match="init must be 'default' or 'lycoris'"):
        dt.LokrConfig(init="zeros")
    with pytest.raises(ValueError, match="rank_dropout must be in"):
        dt.LokrConfig(rank_dropout=-0.1)
    config = dt.LokrConfig(rank=4, decompose_both=True, alpha_pattern={"fc1": 1.0})
    assert dt.config_from_dict(config.to_dict()) == config and config.to_dict()["method"] == "lokr"
    model = ZOO["mlp"].build()
    dt.attach(model, config)
    assert model.fc1.adapters["default"].scaling == 1.0 / 4 and model.fc2.adapters["default"].scaling == 8.0 / 4
