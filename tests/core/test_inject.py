from __future__ import annotations

import pytest
import torch

import deltatune as dt
from deltatune.core.layer import AdaptedLayer
from tests.models import ZOO

BERT = ZOO["bert"]


def _randomise(model):
    with torch.no_grad():
        for n, p in model.named_parameters():
            if ".adapters." in n:
                p.normal_(0, 0.1)


def test_attach_report_counts_parameters():
    model = BERT.build()
    total_before = sum(p.numel() for p in model.parameters())
    report = dt.attach(model, dt.LoraConfig(target=["query", "value"], rank=4))
    assert report.targets == [f"bert.encoder.layer.{i}.attention.self.{m}" for i in (0, 1) for m in ("query", "value")]
    # A: (4, 32), B: (32, 4) on 4 layers
    assert report.adapter_parameters == 4 * (4 * 32 + 32 * 4)
    assert report.trainable_parameters == report.adapter_parameters
    assert report.total_parameters == total_before + report.adapter_parameters
    assert "adapter 'default' (lora) on 4 modules" in str(report)
    pr = dt.parameter_report(model)
    assert pr.trainable == report.adapter_parameters and pr.trainable_bytes == 4 * pr.trainable


def test_modules_to_save_trains_a_copy_of_the_head():
    model = BERT.build()
    head = model.classifier
    report = dt.attach(model, dt.LoraConfig(target=["query"], modules_to_save=["classifier"]))
    assert report.modules_to_save == ["classifier"]
    assert isinstance(model.classifier, AdaptedLayer) and model.classifier.base is head
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert "classifier.adapters.default.module.weight" in trainable
    assert not head.weight.requires_grad
    with pytest.raises(ValueError, match="both a target and in modules_to_save"):
        dt.attach(BERT.build(), dt.LoraConfig(target=["classifier"], modules_to_save=["classifier"]))


def test_named_adapters_switch_and_restore():
    model = BERT.build()
    dt.attach(model, dt.LoraConfig(target=["query"]), "a")
    dt.attach(model, dt.LoraConfig(target=["query", "value"]), "b")
    _randomise(model)
    assert dt.active_adapters(model) == ("b",)
    out_b = BERT.run(model)
    with dt.using(model, "a"):
        out_a = BERT.run(model)
    assert dt.active_adapters(model) == ("b",)
    with pytest.raises(RuntimeError), dt.using(model, "a"):
        raise RuntimeError("boom")
    assert dt.active_adapters(model) == ("b",)  # restored in finally
    assert not torch.allclose(out_a, out_b)
    dt.set_active(model, ["a", "b"])  # both, stacked in that order
    assert dt.active_adapters(model) == ("a", "b")
    assert {n for n, p in model.named_parameters() if p.requires_grad} >= {
        "bert.encoder.layer.0.attention.self.query.adapters.a.A",
        "bert.encoder.layer.0.attention.self.query.adapters.b.A",
    }
    with pytest.raises(ValueError, match="no adapter named 'c'"):
        dt.set_active(model, "c")


def test_stacked_adapters_compose_like_functions():
    model = ZOO["mlp"].build()
    dt.attach(model, dt.LoraConfig(target=["fc1"]), "a")
    dt.attach(model, dt.LoraConfig(target=["fc1"]), "b")
    _randomise(model)
    dt.set_active(model, ["a", "b"])
    x = torch.randn(3, 16)
    layer = model.fc1
    a, b = layer.adapters["a"], layer.adapters["b"]
    expected = layer.base(x) + a.scaling * x @ a.A.T @ a.B.T + b.scaling * x @ b.A.T @ b.B.T
    torch.testing.assert_close(layer(x), expected)


def test_detach_one_adapter_keeps_the_other():
    model = BERT.build()
    keys = list(model.state_dict())
    dt.attach(model, dt.LoraConfig(target=["query"]), "a")
    dt.attach(model, dt.LoraConfig(target=["value"]), "b")
    dt.detach(model, "a")
    assert list(dt.configs(model)) == ["b"]
    assert not isinstance(model.bert.encoder.layer[0].attention.self.query, AdaptedLayer)
    assert isinstance(model.bert.encoder.layer[0].attention.self.value, AdaptedLayer)
    dt.detach(model)
    assert list(model.state_dict()) == keys
    with pytest.raises(ValueError, match="no adapter named 'b'"):
        dt.detach(model, "b")


def test_bad_names_and_duplicates():
    model = BERT.build()
    with pytest.raises(ValueError, match="must be an identifier"):
        dt.attach(model, dt.LoraConfig(target=["query"]), "a.b")
    dt.attach(model, dt.LoraConfig(target=["query"]), "a")
    with pytest.raises(ValueError, match="already attached"):
        dt.attach(model, dt.LoraConfig(target=["query"]), "a")


def test_unsupported_module_in_explicit_target_names_it():
    with pytest.raises(ValueError, match="cannot adapt .*BertSelfAttention"):
        dt.attach(BERT.build(), dt.LoraConfig(target=["attention.self", "query"]))


def test_disabled_runs_the_bare_base_and_refuses_when_merged():
    model = BERT.build()
    base = BERT.run(model)
    dt.attach(model, dt.LoraConfig(target=["query"]))
    _randomise(model)
    with dt.disabled(model):
        torch.testing.assert_close(BERT.run(model), base, rtol=0, atol=0)
    assert dt.active_adapters(model) == ("default",)
    dt.merge(model)
    with pytest.raises(RuntimeError, match="unmerge"), dt.disabled(model):
        pass


def test_layer_reads_base_attributes():
    model = ZOO["mlp"].build()
    dt.attach(model, dt.LoraConfig(target=["fc1"]))
    assert model.fc1.in_features == 16 and model.fc1.weight is model.fc1.base.weight
    with pytest.raises(AttributeError):
        model.fc1.no_such_attribute  # noqa: B018


def test_config_errors_name_the_fix():
    with pytest.raises(ValueError, match="rank must be >= 1"):
        dt.LoraConfig(rank=0)
    with pytest.raises(ValueError, match="did you mean 'rank'"):
        dt.config_from_dict({"method": "lora", "rnak": 4})
    with pytest.raises(ValueError, match="unknown method 'lorax'; available: .*lora"):
        dt.config_from_dict({"method": "lorax"})


def test_modules_inside_an_adapted_parent_can_be_adapted():
    model = ZOO["llama"].build()
    dt.attach(model, dt.METHODS["bottleneck"](target=["mlp"], variant="parallel"), "outer")
    dt.attach(model, dt.LoraConfig(target=["down_proj"]), "inner")
    layer = model.model.layers[0].mlp
    assert isinstance(layer, AdaptedLayer) and isinstance(layer.base.down_proj, AdaptedLayer)
    names = [n for n, _ in dt.core.records.adapted_layers(model)]
    assert "model.layers.0.mlp" in names and "model.layers.0.mlp.down_proj" in names
    keys = list(ZOO["llama"].build().state_dict())
    dt.detach(model)
    assert list(model.state_dict()) == keys
