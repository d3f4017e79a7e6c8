"""``Router``: routing for a server that changes its rows every step; equal to ``routing``."""

from __future__ import annotations

import pytest
import torch

import deltatune as dt
from deltatune.core.layer import AdaptedLayer
from deltatune.core.routing import Router, delete_adapter, routing
from tests.core.test_routing import ATOL, SPECS, ScaleConfig, _alone, _randomise, _with_adapters
from tests.models import ZOO


def _check(model, names, inputs, mixed) -> None:
    for i, choice in enumerate(names):
        torch.testing.assert_close(mixed[i], _alone("bert", model, choice, inputs)[i], atol=ATOL, rtol=0)


def test_rerouting_an_open_router_equals_routing_each_time():
    model = _with_adapters("bert", SPECS)
    inputs = ZOO["bert"].inputs()
    layers = [m for m in model.modules() if isinstance(m, AdaptedLayer)]
    with Router(model) as router:
        for names in (["b", None, "a"], ["a", "a", "a"], [None, "c", "b"], [None, None, None]):
            router.route(names)
            mixed = ZOO["bert"].run(model, inputs)
            with routing(model, names):
                reference = ZOO["bert"].run(model, inputs)
            torch.testing.assert_close(mixed, reference, atol=0, rtol=0)
            _check(model, names, inputs, mixed)
    assert all(m.router is None for m in layers)
    with pytest.raises(RuntimeError, match="closed"):
        router.route(["a", "b", "c"])


def test_other_methods_fall_back_to_grouping_through_a_router():
    model = _with_adapters("bert", {"a": SPECS["a"], "b": SPECS["b"]})
    dt.attach(model, ScaleConfig(target=["query", "value", "dense"]), "s", activate=False)
    _randomise(model, "s", seed=3)
    inputs = ZOO["bert"].inputs()
    names = ["s", ["a", "b"], "a"]
    with Router(model) as router:
        router.route(names)
        assert model.bert.encoder.layer[0].attention.self.query.router.stack is None
        mixed = ZOO["bert"].run(model, inputs)
    _check(model, names, inputs, mixed)


def test_a_new_router_reuses_the_rows_of_unchanged_adapters_only():
    """Swap one adapter for another (a cache eviction), edit another in place: the next router
    copies the untouched rows from the previous one and rebuilds the rest; outputs stay exact."""
    model = _with_adapters("bert", SPECS)
    inputs = ZOO["bert"].inputs()
    first = Router(model)
    first.route(["a", "b", "c"])
    ZOO["bert"].run(model, inputs)
    first.close()
    delete_adapter(model, "b")
    dt.attach(model, dt.LoraConfig(rank=8, alpha=4.0), "d", activate=False)
    _randomise(model, "d", seed=42)
    _randomise(model, "c", seed=43)  # in place: the previous row of c is stale
    query = model.bert.encoder.layer[0].attention.self.query
    old = first._stacks[query]
    with Router(model, previous=first) as second:
        second.route(["d", "c", "a"])
        mixed = ZOO["bert"].run(model, inputs)
        stack = second._stacks[query]
    assert stack is not old and list(stack.index) == ["a", "c", "d"]
    assert stack._holds("a", old._by_name["a"]) and not old._holds("c", stack._by_name["c"])
    _check(model, ["d", "c", "a"], inputs, mixed)
    # And the plain routing block still agrees (its cache is the router's stack).
    with routing(model, ["d", "c", "a"]):
        torch.testing.assert_close(ZOO["bert"].run(model, inputs), mixed, atol=0, rtol=0)
