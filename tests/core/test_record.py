"""One record per adapter name: detach, delete_adapter and unwrap leave nothing of the adapter behind."""

from __future__ import annotations

import gc
import weakref
from collections.abc import Callable

import pytest
import torch
from torch import nn

import deltatune as dt
from deltatune.core.inject import unwrap
from deltatune.core.records import records
from deltatune.core.routing import delete_adapter, routing
from tests.models import ZOO


def _model_with_routed_stacks() -> tuple[nn.Module, list[weakref.ref]]:
    """A tiny BERT with low-rank adapters a and b, after a mixed batch built the routing stacks;
    weak references to b's parameters and to every cache that b's record holds."""
    model = ZOO["bert"].build()
    for name, rank in (("a", 4), ("b", 8)):
        dt.attach(model, dt.LoraConfig(rank=rank), name, activate=False)
    with torch.no_grad():
        for p in model.parameters():
            if p.requires_grad or p.dim() == 2 and p.shape[0] <= 8:
                p.normal_()
    with torch.inference_mode(), routing(model, ["a", "b", None]):
        ZOO["bert"].run(model, ZOO["bert"].inputs())
    caches = list(records(model)["b"].caches.values())
    assert caches, "routing cached no stack in the adapter's record"
    refs = [weakref.ref(c.AB) for c in caches]
    refs += [weakref.ref(p) for layer in model.modules() if isinstance(layer, dt.AdaptedLayer)
             if "b" in layer.adapters for p in layer.adapters["b"].parameters()]
    return model, refs


@pytest.mark.parametrize("remove", [
    lambda m: dt.detach(m, "b"),
    lambda m: delete_adapter(m, "b"),
    lambda m: unwrap(m),
    lambda m: dt.detach(m),
], ids=["detach", "delete_adapter", "unwrap", "detach-all"])
def test_removing_an_adapter_frees_its_tensors_and_caches(remove: Callable[[nn.Module], object]):
    model, refs = _model_with_routed_stacks()
    remove(model)
    gc.collect()
    assert all(r() is None for r in refs), "a cache or record still holds the removed adapter's tensors"
    assert "b" not in dt.configs(model)
    for rec in records(model).values():  # the other adapter keeps no stack that held b's factors
        assert not rec.caches


def test_record_holds_config_placement_per_part_and_hooks():
    model = ZOO["bert"].build()
    config = dt.LoraConfig(target=["query"], rank=2)
    dt.attach(model, config, "one")
    rec = records(model)["one"]
    assert rec.config is config and config.parts == (config,)
    assert rec.placement == [[n for n, _ in dt.core.records.adapted_layers(model)]]
    assert dt.core.records.placement(model, "one") == rec.placement
    with pytest.raises(TypeError):
        dt.configs(model)["two"] = config  # type: ignore[index]  # a read accessor


def test_a_refused_attach_leaves_no_record():
    class Refuses(dt.LoraConfig):
        def on_attach(self, model, name):
            raise ValueError("no")

    model = ZOO["mlp"].build()
    keys = list(model.state_dict())
    with pytest.raises(ValueError, match="no"):
        dt.attach(model, Refuses(), "x")
    assert records(model) == {} and list(model.state_dict()) == keys


def test_holding_finds_an_adapters_layers_from_its_record_as_a_walk_does():
    """``holding`` (the layers that hold an adapter, found from its record: how a server's swap
    avoids walking the model) equals a walk for plain, hybrid and ``modules_to_save`` adapters,
    and falls back to the walk when the record does not account for every layer."""
    from deltatune.config import HybridConfig
    from deltatune.core.stored import holding

    model = ZOO["bert"].build()
    dt.attach(model, dt.LoraConfig(rank=4), "plain", activate=False)
    dt.attach(model, HybridConfig(parts=(dt.LoraConfig(target=["query"], rank=4), dt.IA3Config(target=["value", "dense"]))),
              "hybrid", activate=False)
    dt.attach(model, dt.LoraConfig(target=["value"], rank=2, modules_to_save=("classifier",)), "head", activate=False)

    def walked(name: str) -> set[int]:
        return {id(m) for m in model.modules() if isinstance(m, dt.AdaptedLayer) and name in m.adapters}

    for name in ("plain", "hybrid", "head"):
        assert {id(m) for m in holding(model, name)} == walked(name) and walked(name)
    record = records(model)["plain"]
    record.placement, record.layer_count = [record.placement[0][:1]], None  # an account that misses layers
    assert {id(m) for m in holding(model, "plain")} == walked("plain")
    record.placement = [["no.such.module"]]
    assert {id(m) for m in holding(model, "plain")} == walked("plain")
