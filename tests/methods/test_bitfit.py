"""BitFit: bias deltas against the float64 formula and against training the biases themselves.

Hugging Face PEFT has no BitFit method, so the reference is the definition: a model whose biases
(and only its biases) are trained directly must end where BitFit's merged model ends.
"""

from __future__ import annotations

import copy

import pytest
import torch

import deltatune as dt
from deltatune.core.records import adapted_layers
from tests.models import ZOO


def _layers() -> dict[str, torch.nn.Module]:
    from transformers.pytorch_utils import Conv1D

    return {
        "linear": torch.nn.Linear(6, 5),
        "conv1d-gpt2": Conv1D(5, 6),
        "conv2d": torch.nn.Conv2d(6, 5, 3),
        "layernorm": torch.nn.LayerNorm(6),
    }


@pytest.mark.parametrize("kind", list(_layers()))
def test_formula_in_float64_and_merge(kind):
    layer = _layers()[kind].double()
    model = torch.nn.Sequential(layer)
    b0 = layer.bias.detach().clone()
    dt.attach(model, dt.BitFitConfig(target=["0"]))
    delta = model[0].adapters["default"].bias_delta
    with torch.no_grad():
        delta.normal_()
    x = torch.randn(2, 6, 7, 7, dtype=torch.float64) if kind == "conv2d" else torch.randn(3, 4, 6, dtype=torch.float64)
    channel = delta.view(-1, 1, 1) if kind == "conv2d" else delta
    expected = layer(x) + channel
    torch.testing.assert_close(model(x), expected, rtol=1e-12, atol=1e-12)
    dt.merge(model)
    torch.testing.assert_close(layer.bias, b0 + delta, rtol=0, atol=1e-15)
    torch.testing.assert_close(model(x), expected, rtol=1e-12, atol=1e-12)
    dt.unmerge(model)
    torch.testing.assert_close(layer.bias, b0, rtol=0, atol=1e-15)


def test_default_is_every_bias_but_the_head():
    model = ZOO["bert"].build()
    report = dt.attach(model, dt.BitFitConfig())
    plain = ZOO["bert"].build()
    biases = [n for n, p in plain.named_parameters() if n.endswith(".bias") and not n.startswith("classifier")]
    assert sorted(t + ".bias" for t in report.targets) == sorted(biases)
    assert report.trainable_parameters == sum(p.numel() for n, p in plain.named_parameters() if n in biases)
    with pytest.raises(dt.NoMatchError):  # Llama has no biases at all
        dt.attach(ZOO["llama"].build(), dt.BitFitConfig())
    with pytest.raises(dt.NoMatchError, match="cannot adapt"):
        dt.attach(ZOO["bert"].build(), dt.BitFitConfig(target=["word_embeddings"]))


def test_equals_training_the_biases_directly():
    zoo = ZOO["gpt2"]
    reference = zoo.build().train()
    for n, p in reference.named_parameters():
        p.requires_grad_(n.endswith(".bias"))
    model = zoo.build().train()
    dt.attach(model, dt.BitFitConfig())
    ref_opt = torch.optim.SGD([p for p in reference.parameters() if p.requires_grad], lr=0.5)
    opt = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.5)
    for _ in range(3):
        for m, o in ((reference, ref_opt), (model, opt)):
            o.zero_grad()
            zoo.run(m).pow(2).mean().backward()
            o.step()
    torch.testing.assert_close(zoo.run(model), zoo.run(reference), rtol=1e-5, atol=1e-6)
    merged = dt.merge_and_unload(copy.deepcopy(model))
    ref_state = reference.state_dict()
    for k, v in merged.state_dict().items():
        torch.testing.assert_close(v, ref_state[k], rtol=1e-6, atol=1e-7, msg=k)


def test_saved_file_holds_only_bias_deltas(tmp_path):
    model = ZOO["cnn"].build()
    dt.attach(model, dt.BitFitConfig())
    for _, layer in adapted_layers(model):
        with torch.no_grad():
            layer.adapters["default"].bias_delta.normal_()
    dt.save_adapter(model, tmp_path / "a")
    from safetensors.torch import load_file

    keys = sorted(load_file(str(tmp_path / "a" / "adapter_model.safetensors")))
    assert keys == ["conv1.bias_delta", "conv2.bias_delta", "conv3.bias_delta", "fc.bias_delta"]


def test_batchnorm_shift_trains_as_a_delta_and_merges_exactly() -> None:
    """Conv nets (MobileNet, ResNet) have bias-free convolutions: BitFit trains BatchNorm's β."""
    import deltatune as dt
    from deltatune.train.image_models import TinyResNet

    torch.manual_seed(0)
    model = TinyResNet(3).double().eval()
    report = dt.attach(model, dt.BitFitConfig())
    assert "bn1" in report.targets and "layers.0.bn2" in report.targets and "fc" not in report.targets
    x = torch.randn(2, 3, 16, 16, dtype=torch.float64)
    with torch.no_grad():
        base = model(x).logits
        for _, layer in dt.core.records.adapted_layers(model):
            layer.adapters["default"].bias_delta.normal_()
        adapted = model(x).logits
        dt.merge_and_unload(model)
        merged = model(x).logits
    assert not torch.allclose(base, adapted)
    torch.testing.assert_close(merged, adapted, rtol=0, atol=1e-12)
