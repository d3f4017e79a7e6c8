"""VeRA against the float64 formula and against Hugging Face PEFT on identical weights."""

from __future__ import annotations

import copy

import pytest
import torch
from safetensors.torch import load_file

import deltatune as dt
from deltatune.config import HybridConfig
from deltatune.core.records import adapted_layers
from tests.models import ZOO

CASES = {
    "linear": ("mlp", ["fc1", "fc2"]),                           # (32, 16) and (32, 32)
    "gpt2-conv1d": ("gpt2", ["c_attn", "c_fc"]),                 # weights stored transposed
    "bert-odd-sizes": ("bert", ["query", "output.dense"]),       # (32, 32) and (32, 37)
}


def _adapters(model, name="default"):
    return {n: layer.adapters[name] for n, layer in adapted_layers(model) if name in layer.adapters}


@pytest.mark.parametrize("kind", list(CASES))
def test_matches_peft_merged_and_unmerged(kind):
    from peft import VeraConfig, get_peft_model

    zoo_name, targets = CASES[kind]
    zoo = ZOO[zoo_name]
    model = zoo.build()
    peft_model = get_peft_model(copy.deepcopy(model), VeraConfig(
        r=8, target_modules=targets, projection_prng_key=7, fan_in_fan_out=kind == "gpt2-conv1d")).eval()
    dt.attach(model, dt.VeraConfig(target=targets, rank=8, projection_seed=7))
    with torch.no_grad():
        for n, p in peft_model.named_parameters():
            if "vera_lambda" in n:
                p.normal_(0, 0.5)
    for layer_name, ours in _adapters(model).items():
        theirs = peft_model.base_model.model.get_submodule(layer_name)
        # The shared random pair is drawn exactly as PEFT draws it from the same key.
        assert torch.equal(ours.projection.A, theirs.vera_A["default"])
        assert torch.equal(ours.projection.B, theirs.vera_B["default"])
        with torch.no_grad():
            ours.d.copy_(theirs.vera_lambda_d["default"])
            ours.b.copy_(theirs.vera_lambda_b["default"])
    expected = zoo.run(peft_model)
    assert not torch.allclose(expected, zoo.run(zoo.build()), atol=1e-4)  # the adapters do something
    torch.testing.assert_close(zoo.run(model), expected, rtol=1e-6, atol=1e-6)
    dt.merge(model)
    peft_model.merge_adapter()
    torch.testing.assert_close(zoo.run(model), zoo.run(peft_model), rtol=1e-6, atol=1e-6)


def test_matches_the_float64_formula_with_slices_of_the_largest_layer():
    model = torch.nn.Sequential(torch.nn.Linear(6, 5), torch.nn.ReLU(), torch.nn.Linear(5, 9)).double()
    dt.attach(model, dt.VeraConfig(target=["0", "2"], rank=4))
    first, second = model[0].adapters["default"], model[2].adapters["default"]
    shared = first.projection
    assert second.projection is shared  # one pair for the whole adapter ...
    assert shared.A.shape == (4, 6) and shared.B.shape == (9, 4)  # ... sized to the largest layer
    with torch.no_grad():
        for p in model.parameters():
            if p.requires_grad:
                p.normal_()
    x = torch.randn(3, 7, 6, dtype=torch.float64)
    W, bias = model[0].base.weight, model[0].base.bias
    A, B = shared.A[:, :6], shared.B[:5, :]
    delta = torch.diag(first.b) @ B @ torch.diag(first.d) @ A  # Λ_b B Λ_d A
    torch.testing.assert_close(model[0](x), x @ (W + delta).T + bias, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(first.delta_weight(model[0].base), delta, rtol=1e-12, atol=1e-12)
    A2, B2 = shared.A[:, :5], shared.B[:9, :]
    h = torch.randn(2, 5, dtype=torch.float64)
    expected = model[2].base(h) + (h @ A2.T * second.d) @ B2.T * second.b
    torch.testing.assert_close(model[2](h), expected, rtol=1e-12, atol=1e-12)


def test_starts_from_the_base_and_trains_only_the_vectors():
    model = ZOO["mlp"].build()
    report = dt.attach(model, dt.VeraConfig(target=["fc1", "fc2"], rank=16))
    ad = model.fc1.adapters["default"]
    assert torch.count_nonzero(ad.b) == 0 and torch.all(ad.d == 0.1)
    assert report.adapter_parameters == (16 + 32) * 2  # r + d_out per layer, the projection is frozen
    assert {n.rsplit(".", 1)[-1] for n, p in model.named_parameters() if p.requires_grad} == {"d", "b"}


def test_the_projection_is_drawn_again_on_load_not_saved(tmp_path):
    zoo = ZOO["llama"]
    model = zoo.build()
    dt.attach(model, dt.VeraConfig(projection_seed=3))
    with torch.no_grad():
        for p in model.parameters():
            if p.requires_grad:
                p.normal_(0, 0.2)
    expected = zoo.run(model)
    assert not any("projection" in k for k in model.state_dict())
    dt.save_adapter(model, tmp_path / "v")
    saved = load_file(str(tmp_path / "v" / "adapter_model.safetensors"))
    assert {k.rsplit(".", 1)[-1] for k in saved} == {"d", "b"}
    projection = next(iter(_adapters(model).values())).projection
    projection_bytes = 4 * (projection.A.numel() + projection.B.numel())
    assert (tmp_path / "v" / "adapter_model.safetensors").stat().st_size < projection_bytes / 4

    fresh = zoo.build()
    dt.load_adapter(fresh, tmp_path / "v")
    torch.testing.assert_close(zoo.run(fresh), expected, rtol=0, atol=0)
    again = next(iter(_adapters(fresh).values())).projection
    assert torch.equal(projection.A, again.A) and torch.equal(projection.B, again.B)


def test_seed_and_shape_decide_the_projection():
    def projection(seed):
        model = ZOO["mlp"].build()
        dt.attach(model, dt.VeraConfig(target=["fc1", "fc2"], rank=8, projection_seed=seed))
        return model.fc1.adapters["default"].projection

    assert torch.equal(projection(1).A, projection(1).A)
    assert not torch.equal(projection(1).A, projection(2).A)


def test_dtype_conversion_keeps_one_shared_pair():
    model = ZOO["mlp"].build()
    dt.attach(model, dt.VeraConfig(target=["fc1", "fc2"], rank=8))
    model.double()
    one, two = model.fc1.adapters["default"].projection, model.fc2.adapters["default"].projection
    assert one is two and one.A.dtype == torch.float64
    out = model(torch.randn(2, 16, dtype=torch.float64))
    assert out.dtype == torch.float64


def test_inside_a_hybrid_each_vera_part_gets_its_own_pair():
    zoo = ZOO["bert"]
    model = zoo.build()
    config = HybridConfig(parts=(dt.VeraConfig(target=["query"], rank=8),
                                 dt.VeraConfig(target=["query", "value"], rank=4, projection_seed=5)))
    dt.attach(model, config)
    query = model.bert.encoder.layer[0].attention.self.query.adapters["default"]
    value = model.bert.encoder.layer[0].attention.self.value.adapters["default"]
    assert [p.projection.A.shape[0] for p in query.parts] == [8, 4]
    assert query.parts[1].projection is value.projection
    twins = HybridConfig(parts=(dt.VeraConfig(target=["query"], rank=4), dt.VeraConfig(target=["query"], rank=4)))
    dt.attach(model, twins, "twins")  # equal parts share one pair
    one, two = model.bert.encoder.layer[0].attention.self.query.adapters["twins"].parts
    assert one.projection is two.projection


def test_bad_config_is_refused_with_the_fix():
    with pytest.raises(ValueError, match="rank must be >= 1"):
        dt.VeraConfig(rank=0)
    with pytest.raises(ValueError, match="dropout"):
        dt.VeraConfig(dropout=1.0)
    with pytest.raises(dt.NoMatchError):
        dt.attach(ZOO["cnn"].build(), dt.VeraConfig(target=["conv1", "conv2"]))
