from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import load_file

import deltatune as dt
from deltatune.formats import native as io
from tests.models import ZOO

BERT = ZOO["bert"]


def _trained(config=None, name="default"):
    model = BERT.build()
    dt.attach(model, config or dt.LoraConfig(target=["query", "value"], modules_to_save=["classifier"]), name)
    with torch.no_grad():
        for n, p in model.named_parameters():
            if p.requires_grad:
                p.add_(0.1 * torch.randn_like(p))
    return model


def test_saved_directory_holds_only_adapter_tensors(tmp_path):
    model = _trained()
    dt.save_adapter(model, tmp_path / "a")
    assert sorted(p.name for p in (tmp_path / "a").iterdir()) == [".deltatune-files.json", "adapter_config.json",
                                                                 "adapter_model.safetensors"]
    tensors = load_file(tmp_path / "a" / "adapter_model.safetensors")
    assert "bert.encoder.layer.0.attention.self.query.A" in tensors
    assert "classifier.module.weight" in tensors  # modules_to_save travels with the adapter
    assert not any(k.startswith("bert.embeddings") for k in tensors)
    meta = json.loads((tmp_path / "a" / "adapter_config.json").read_text())
    assert meta["config"]["method"] == "lora" and meta["modules_to_save"] == ["classifier"]


def test_load_onto_fresh_base_is_exact_and_frozen(tmp_path):
    model = _trained()
    expected = BERT.run(model)
    dt.save_adapter(model, tmp_path / "a")
    fresh = BERT.build()
    assert dt.load_adapter(fresh, tmp_path / "a") == "default"
    torch.testing.assert_close(BERT.run(fresh), expected, rtol=0, atol=0)
    assert not any(p.requires_grad for p in fresh.parameters())
    other = BERT.build()
    dt.load_adapter(other, tmp_path / "a", name="sentiment", trainable=True)
    assert any(p.requires_grad for p in other.parameters())
    assert list(dt.configs(other)) == ["sentiment"]


def test_load_onto_a_different_base_names_the_mismatch(tmp_path):
    from transformers import BertConfig, BertForSequenceClassification

    model = _trained()
    dt.save_adapter(model, tmp_path / "a")
    wider = BertForSequenceClassification(BertConfig(vocab_size=100, hidden_size=48, num_hidden_layers=2,
                                                     num_attention_heads=2, intermediate_size=37, num_labels=3))
    keys = list(wider.state_dict())
    with pytest.raises(ValueError, match=r"tensor 'bert.encoder.layer.0.attention.self.query.A' has shape \(8, 32\) "
                                         r"but this model needs \(8, 48\)"):
        dt.load_adapter(wider, tmp_path / "a")
    assert list(wider.state_dict()) == keys  # nothing left attached after the failure
    shallow = BertForSequenceClassification(BertConfig(vocab_size=100, hidden_size=32, num_hidden_layers=1,
                                                       num_attention_heads=2, intermediate_size=37, num_labels=3))
    with pytest.raises(ValueError, match="needs module 'bert.encoder.layer.1.attention.self.query'"):
        dt.load_adapter(shallow, tmp_path / "a")


def test_tensor_file_must_match_config(tmp_path):
    from safetensors.torch import save_file

    model = _trained()
    dt.save_adapter(model, tmp_path / "a")
    tensors = load_file(tmp_path / "a" / "adapter_model.safetensors")
    del tensors["bert.encoder.layer.1.attention.self.value.B"]
    save_file(tensors, tmp_path / "a" / "adapter_model.safetensors")
    with pytest.raises(ValueError, match="'bert.encoder.layer.1.attention.self.value.B' is missing"):
        dt.load_adapter(BERT.build(), tmp_path / "a")


def test_crash_mid_save_leaves_previous_save_intact(tmp_path, monkeypatch):
    model = _trained()
    dt.save_adapter(model, tmp_path / "a")
    before = {p.name: p.read_bytes() for p in (tmp_path / "a").iterdir()}
    with torch.no_grad():
        model.bert.encoder.layer[0].attention.self.query.adapters["default"].B.add_(1.0)

    def crash(*args, **kwargs):
        raise OSError("disk full")

    monkeypatch.setattr(io, "write_json", crash)  # tensors written, config write fails
    with pytest.raises(OSError, match="disk full"):
        dt.save_adapter(model, tmp_path / "a")
    assert {p.name: p.read_bytes() for p in (tmp_path / "a").iterdir()} == before
    assert [p.name for p in tmp_path.iterdir()] == ["a"]  # no temporary directory left behind


def test_saving_merged_or_unknown_adapter_is_refused(tmp_path):
    model = _trained()
    with pytest.raises(ValueError, match="no adapter named 'x'"):
        dt.save_adapter(model, tmp_path / "a", name="x")
    dt.merge(model)
    with pytest.raises(RuntimeError, match="unmerge"):
        dt.save_adapter(model, tmp_path / "a")


def test_not_a_deltatune_directory(tmp_path):
    with pytest.raises(FileNotFoundError, match="adapter_config.json"):
        dt.load_adapter(BERT.build(), tmp_path)
    (tmp_path / "adapter_config.json").write_text(json.dumps({"format": "deltatune", "format_version": 99}))
    with pytest.raises(ValueError, match="newer deltatune"):
        dt.load_adapter(BERT.build(), tmp_path)
