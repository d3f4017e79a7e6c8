"""Partial fine-tuning: equal to unfreezing the chosen blocks, with the base left bit-identical."""

from __future__ import annotations

import copy

import pytest
import torch
from safetensors.torch import load_file

import deltatune as dt
from tests.models import ZOO


def _block_params(model, prefix: str) -> dict[str, torch.Tensor]:
    return {n: p for n, p in model.named_parameters() if n.startswith(prefix)}


def test_last_n_selects_every_weight_of_the_last_blocks():
    model = ZOO["bert"].build()
    report = dt.attach(model, dt.PartialConfig())  # default: the last block
    owners = {n.rsplit(".", 1)[0] for n in _block_params(ZOO["bert"].build(), "bert.encoder.layer.1.")}
    assert sorted(report.targets) == sorted(owners)
    assert report.trainable_parameters == sum(
        p.numel() for p in _block_params(ZOO["bert"].build(), "bert.encoder.layer.1.").values())
    model = ZOO["llama"].build()
    report = dt.attach(model, dt.PartialConfig(last_n=2))
    blocks = _block_params(ZOO["llama"].build(), "model.layers.")
    assert report.trainable_parameters == sum(p.numel() for p in blocks.values())


def test_layers_target_and_exclude_combine():
    model = ZOO["bert"].build()
    report = dt.attach(model, dt.PartialConfig(layers=[0], target=["classifier"], exclude=["LayerNorm"]))
    assert "classifier" in report.targets
    assert all(t.startswith("bert.encoder.layer.0.") or t == "classifier" for t in report.targets)
    assert not any(t.endswith("LayerNorm") for t in report.targets)
    only_named = dt.attach(ZOO["bert"].build(), dt.PartialConfig(target=["bert.pooler"]))
    assert only_named.targets == ["bert.pooler.dense"]


def test_equals_training_the_unfrozen_blocks_directly(tmp_path):
    zoo = ZOO["llama"]
    reference = zoo.build().train()
    for n, p in reference.named_parameters():
        p.requires_grad_(n.startswith("model.layers.1."))
    model = zoo.build().train()
    dt.attach(model, dt.PartialConfig(last_n=1))
    ref_opt = torch.optim.AdamW([p for p in reference.parameters() if p.requires_grad], lr=1e-2)
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    for _ in range(3):
        for m, o in ((reference, ref_opt), (model, opt)):
            o.zero_grad()
            zoo.run(m).pow(2).mean().backward()
            o.step()
    out = zoo.run(model)
    torch.testing.assert_close(out, zoo.run(reference), rtol=0, atol=1e-6)
    # The base model is untouched; merging puts exactly the trained weights in place.
    fresh = zoo.build().state_dict()
    for k, v in model.state_dict().items():
        if ".adapters." not in k:
            assert torch.equal(v, fresh[k.replace(".base.", ".")]), k
    merged = dt.merge_and_unload(copy.deepcopy(model))
    for k, v in merged.state_dict().items():
        torch.testing.assert_close(v, reference.state_dict()[k], rtol=0, atol=1e-6, msg=k)
    # The saved file holds just the last block's weights, under adapter keys.
    dt.save_adapter(model, tmp_path / "a")
    saved = load_file(str(tmp_path / "a" / "adapter_model.safetensors"))
    block = _block_params(reference, "model.layers.1.")
    assert sorted(saved) == sorted(k.rsplit(".", 1)[0] + ".tuned." + k.rsplit(".", 1)[1] for k in block)
    assert sum(t.numel() for t in saved.values()) == sum(p.numel() for p in block.values())


def test_merge_is_an_exact_swap():
    zoo = ZOO["gpt2"]
    model = zoo.build()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    dt.attach(model, dt.PartialConfig(last_n=1))
    with torch.no_grad():
        for p in model.parameters():
            if p.requires_grad:
                p.add_(0.1 * torch.randn_like(p))
    out = zoo.run(model)
    dt.merge(model)
    assert torch.equal(zoo.run(model), out)
    dt.unmerge(model)
    dt.detach(model)
    assert all(torch.equal(v, before[k]) for k, v in model.state_dict().items())


@pytest.mark.parametrize("order", [("partial", "lora"), ("lora", "partial")])
def test_stacked_adapter_sees_the_trained_copy(order):
    model = ZOO["bert"].build()
    dt.attach(model, dt.PartialConfig(last_n=1), "partial")
    dt.attach(model, dt.LoraConfig(target=["query"], layers=[1], rank=2), "lora")
    layer = model.bert.encoder.layer[1].attention.self.query
    with torch.no_grad():
        layer.adapters["partial"].tuned["weight"].normal_()
        layer.adapters["lora"].B.normal_()
    dt.set_active(model, list(order))
    x = torch.randn(2, 5, 32)
    lora = layer.adapters["lora"]
    tuned = layer.adapters["partial"].tuned
    expected = x @ tuned["weight"].T + tuned["bias"] + lora.scaling * x @ lora.A.T @ lora.B.T
    torch.testing.assert_close(layer(x), expected, rtol=1e-5, atol=1e-5)


def test_errors_name_the_fix():
    with pytest.raises(ValueError, match="not both"):
        dt.PartialConfig(last_n=1, layers=[0])
    with pytest.raises(ValueError, match="0 or more"):
        dt.PartialConfig(last_n=-1)
    with pytest.raises(dt.NoMatchError, match="modules_to_save"):
        dt.attach(ZOO["bert"].build(), dt.PartialConfig(last_n=0))
    with pytest.raises(ValueError, match="only 2 blocks"):
        dt.attach(ZOO["bert"].build(), dt.PartialConfig(last_n=3))
    with pytest.raises(ValueError, match="do not exist"):
        dt.attach(ZOO["bert"].build(), dt.PartialConfig(layers=[5]))
    with pytest.raises(dt.NoMatchError, match="block stack"):
        dt.attach(ZOO["mlp"].build(), dt.PartialConfig())
    with pytest.raises(ValueError, match="tied"):
        dt.attach(ZOO["gpt2"].build(), dt.PartialConfig(target=["wte"]))
    # Named modules work on a model without blocks.
    assert dt.attach(ZOO["mlp"].build(), dt.PartialConfig(target=["fc2"])).targets == ["fc2"]


def test_last_n_zero_is_a_linear_probe():
    """``last_n=0`` trains no block: only the modules_to_save (a new head) train."""
    model = ZOO["bert"].build()
    report = dt.attach(model, dt.PartialConfig(last_n=0, modules_to_save=["classifier"]))
    assert report.targets == [] and report.modules_to_save == ["classifier"]
    trainable = [n for n, p in model.named_parameters() if p.requires_grad]
    assert trainable and all("classifier" in n for n in trainable)
