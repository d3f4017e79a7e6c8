"""Hybrids: several method configs under one adapter name."""

from __future__ import annotations

import pytest
import torch

import deltatune as dt
from deltatune.config import HybridConfig
from deltatune.core.layer import Composite
from tests.models import ZOO

BERT = ZOO["bert"]


def hybrid() -> HybridConfig:
    return HybridConfig(parts=(dt.LoraConfig(target=["query", "value"], rank=4),
                               dt.LoraConfig(target=["query", "output.dense"], rank=2, alpha=2.0)),
                        modules_to_save=("classifier",))


def _randomise(model):
    with torch.no_grad():
        for n, p in model.named_parameters():
            if p.requires_grad:
                p.add_(0.1 * torch.randn_like(p))


def test_parts_meet_on_a_module_in_declared_order():
    model = BERT.build()
    report = dt.attach(model, hybrid())
    query = model.bert.encoder.layer[0].attention.self.query
    assert isinstance(query.adapters["default"], Composite)
    assert [a.rank for a in query.adapters["default"].parts] == [4, 2]
    assert report.modules_to_save == ["classifier"]
    assert "bert.encoder.layer.0.output.dense" in report.targets
    _randomise(model)
    a, b = query.adapters["default"].parts
    x = torch.randn(2, 5, 32)
    expected = query.base(x) + a.scaling * x @ a.A.T @ a.B.T + b.scaling * x @ b.A.T @ b.B.T
    torch.testing.assert_close(query(x), expected)


def test_hybrid_saves_loads_merges_and_detaches(tmp_path):
    model = BERT.build()
    keys = list(model.state_dict())
    dt.attach(model, hybrid())
    _randomise(model)
    expected = BERT.run(model)
    dt.save_adapter(model, tmp_path / "h")
    meta = dt.read_adapter_config(tmp_path / "h")
    assert meta["config"]["method"] == "hybrid" and len(meta["part_targets"]) == 2

    fresh = BERT.build()
    dt.load_adapter(fresh, tmp_path / "h")
    torch.testing.assert_close(BERT.run(fresh), expected, rtol=0, atol=0)
    dt.merge(fresh)
    torch.testing.assert_close(BERT.run(fresh), expected, rtol=0, atol=1e-5)
    dt.unmerge(fresh)
    dt.detach(model)
    assert list(model.state_dict()) == keys


def test_hybrid_trains_only_its_parts():
    model = BERT.build()
    dt.attach(model, hybrid())
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert "bert.encoder.layer.0.attention.self.query.adapters.default.parts.1.B" in trainable
    assert all(".adapters.default." in n for n in trainable)


def test_hybrid_config_validation_and_dicts():
    config = hybrid()
    assert dt.config_from_dict(config.to_dict()).to_dict() == config.to_dict()
    with pytest.raises(ValueError, match="at least one part"):
        HybridConfig()
    with pytest.raises(ValueError, match="no target of its own"):
        HybridConfig(parts=(dt.LoraConfig(),), target=["query"])
    with pytest.raises(ValueError, match="modules_to_save on the hybrid"):
        HybridConfig(parts=(dt.LoraConfig(modules_to_save=("classifier",)),))
    with pytest.raises(ValueError, match="'parts': a list of method configs"):
        dt.config_from_dict({"method": "hybrid", "parts": "lora"})
    with pytest.raises(dt.NoMatchError, match="matched 0"):
        dt.attach(BERT.build(), HybridConfig(parts=(dt.LoraConfig(target=["query"]), dt.LoraConfig(target=["nope"]))))


def test_the_issue_example_trains_saves_and_loads(tmp_path):
    """LoRA on attention, a bottleneck after the feed-forward block and BitFit everywhere."""
    model = BERT.build()
    config = HybridConfig(parts=(dt.LoraConfig(target=["query", "value"]), dt.BottleneckConfig(variant="pfeiffer"),
                                 dt.BitFitConfig()), modules_to_save=("classifier",))
    dt.attach(model, config)
    base = {k: v.clone() for k, v in model.state_dict().items() if ".adapters." not in k}
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    model.train()
    for _ in range(3):
        BERT.run(model).pow(2).mean().backward()
        opt.step()
        opt.zero_grad()
    model.eval()
    assert all(torch.equal(v, base[k]) for k, v in model.state_dict().items() if ".adapters." not in k)
    expected = BERT.run(model)
    dt.save_adapter(model, tmp_path / "h")
    fresh = BERT.build()
    dt.load_adapter(fresh, tmp_path / "h")
    torch.testing.assert_close(BERT.run(fresh), expected, rtol=0, atol=0)
    with pytest.raises(ValueError, match="cannot be merged"):  # a bottleneck has no weight form
        dt.merge(fresh)


def test_a_mergeable_hybrid_merges_as_one():
    model = BERT.build()
    dt.attach(model, HybridConfig(parts=(dt.LoraConfig(target=["query", "value", "output.dense"]),
                                         dt.IA3Config(), dt.BitFitConfig())))
    _randomise(model)
    expected = BERT.run(model)
    dt.merge(model)
    torch.testing.assert_close(BERT.run(model), expected, rtol=0, atol=1e-5)
    plain = dt.merge_and_unload(model)
    torch.testing.assert_close(BERT.run(plain), expected, rtol=0, atol=1e-5)
