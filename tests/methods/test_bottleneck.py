"""Bottleneck adapters against the float64 formula, and their placement on real architectures.

Hugging Face PEFT has no bottleneck adapter; the references are the equations of Houlsby et al.
(sequential) and He et al. (parallel), computed here by hand.
"""

from __future__ import annotations

import pytest
import torch

import deltatune as dt
from tests.models import ZOO


def _randomise(model):
    with torch.no_grad():
        for p in model.parameters():
            if p.requires_grad:
                p.normal_(0, 0.5)


def _by_hand(ad, z, act):
    return ad.scaling * (act(z @ ad.down.weight.T + ad.down.bias) @ ad.up.weight.T + ad.up.bias)


@pytest.mark.parametrize("variant", ["pfeiffer", "parallel"])
@pytest.mark.parametrize("activation", ["relu", "tanh"])
def test_formula_in_float64(variant, activation):
    layer = torch.nn.Linear(12, 8).double()
    model = torch.nn.Sequential(layer)
    dt.attach(model, dt.BottleneckConfig(target=["0"], variant=variant, bottleneck_size=3,
                                         activation=activation, scaling=2.5))
    _randomise(model)
    ad = model[0].adapters["default"]
    x = torch.randn(4, 5, 12, dtype=torch.float64)
    h = x @ layer.weight.T + layer.bias
    act = torch.relu if activation == "relu" else torch.tanh
    expected = h + _by_hand(ad, x if variant == "parallel" else h, act)
    torch.testing.assert_close(model(x), expected, rtol=1e-12, atol=1e-12)
    assert ad.down.weight.shape == ((3, 12) if variant == "parallel" else (3, 8))


def _suffixes(report, block: str) -> list[str]:
    return sorted(t.split(block)[-1] for t in report.targets if block in t)


def test_default_placement_per_variant():
    bert = dt.attach(ZOO["bert"].build(), dt.BottleneckConfig(variant="houlsby"))
    assert _suffixes(bert, "layer.0.") == ["attention.output.dense", "output.dense"]
    bert = dt.attach(ZOO["bert"].build(), dt.BottleneckConfig())  # pfeiffer: after the FFN only
    assert _suffixes(bert, "layer.0.") == ["output.dense"]
    llama = dt.attach(ZOO["llama"].build(), dt.BottleneckConfig(variant="houlsby"))
    assert _suffixes(llama, "layers.1.") == ["mlp.down_proj", "self_attn.o_proj"]
    gpt2 = dt.attach(ZOO["gpt2"].build(), dt.BottleneckConfig(variant="parallel"))
    assert _suffixes(gpt2, "h.0.") == ["mlp.c_proj"]


def test_sizes_from_reduction_factor_and_bottleneck_size():
    model = ZOO["llama"].build()
    dt.attach(model, dt.BottleneckConfig(reduction_factor=8, variant="parallel"))
    ad = model.model.layers[0].mlp.down_proj.adapters["default"]
    assert ad.down.weight.shape == (4, 48) and ad.up.weight.shape == (32, 4)  # d_ff=48 -> 32/8 -> d=32
    model = ZOO["gpt2"].build()
    dt.attach(model, dt.BottleneckConfig(bottleneck_size=5))
    ad = model.transformer.h[0].mlp.c_proj.adapters["default"]
    assert ad.down.weight.shape == (5, 32) and ad.up.weight.shape == (32, 5)


def test_parallel_beside_the_whole_mlp_follows_he_et_al():
    model = ZOO["llama"].build()
    mlp = model.model.layers[0].mlp
    report = dt.attach(model, dt.BottleneckConfig(target=["mlp"], variant="parallel", bottleneck_size=4, scaling=4.0))
    assert len(report.targets) == 2
    _randomise(model)
    wrapped = model.model.layers[0].mlp
    ad = wrapped.adapters["default"]
    x = torch.randn(2, 3, 32)
    expected = mlp(x) + _by_hand(ad, x, torch.relu)  # fed with the sublayer's own input
    torch.testing.assert_close(wrapped(x), expected, rtol=1e-5, atol=1e-5)


def test_near_identity_start_then_both_projections_learn():
    zoo = ZOO["bert"]
    model = zoo.build().train()
    expected = zoo.run(model)
    dt.attach(model, dt.BottleneckConfig(variant="houlsby"))
    torch.testing.assert_close(zoo.run(model), expected, rtol=0, atol=0)
    ad = model.bert.encoder.layer[0].output.dense.adapters["default"]
    opt = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=1.0)
    grads = []
    for _ in range(2):
        opt.zero_grad()
        zoo.run(model).pow(2).sum().backward()
        grads.append((ad.up.weight.grad.abs().sum().item(), ad.down.weight.grad.abs().sum().item()))
        opt.step()
    # Step 1: the zero up-projection gets a gradient, the down-projection none (it feeds zeros);
    # once the up-projection has moved, the down-projection learns too.
    assert grads[0][0] > 0 and grads[0][1] == 0
    assert grads[1][1] > 0


def test_cannot_merge_and_bad_config():
    model = ZOO["gpt2"].build()
    dt.attach(model, dt.BottleneckConfig())
    with pytest.raises(ValueError, match="cannot be merged"):
        dt.merge(model)
    for bad in (dict(variant="serial"), dict(activation="softmax"), dict(reduction_factor=0),
                dict(bottleneck_size=0)):
        with pytest.raises(ValueError):
            dt.BottleneckConfig(**bad)
    with pytest.raises(dt.NoMatchError):
        dt.attach(ZOO["mlp"].build(), dt.BottleneckConfig())
    with pytest.raises(dt.NoMatchError, match="cannot adapt"):  # an embedding has no input to run beside
        dt.attach(ZOO["bert"].build(), dt.BottleneckConfig(target=["word_embeddings"], variant="parallel"))


def test_bottleneck_on_conv_features_is_a_pair_of_1x1_convolutions():
    """Conv-Adapter placement: after a conv block, acting on the channel axis of (N, C, H, W)."""
    import torch.nn.functional as F

    from deltatune.train.image_models import TinyResNet

    torch.manual_seed(0)
    model = TinyResNet(3).double().eval()
    report = dt.attach(model, dt.BottleneckConfig(target=["layers.1", "re:conv1"], reduction_factor=4))
    assert report.targets == ["conv1", "layers.1"]
    adapter = model.layers[1].adapters["default"]
    with torch.no_grad():
        for p in adapter.parameters():
            p.normal_()
    x = torch.randn(2, 8, 16, 16, dtype=torch.float64)
    block = model.layers[1].base
    h = block(x)
    down = adapter.down.weight[:, :, None, None]  # the Linear as a 1×1 convolution
    up = adapter.up.weight[:, :, None, None]
    want = h + F.conv2d(F.relu(F.conv2d(h, down, adapter.down.bias)), up, adapter.up.bias)
    torch.testing.assert_close(model.layers[1](x), want, rtol=0, atol=1e-12)
