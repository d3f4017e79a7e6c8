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


def _opened(model, names, inputs, previous=None, changed=None):
    router = Router(model, previous=previous, changed=changed)
    router.route(names)
    out = ZOO["bert"].run(model, inputs)
    router.close()
    return router, out


def test_a_swap_takes_the_previous_stack_over_and_rewrites_only_changed_slots():
    """Swap one adapter for another (a cache eviction) and edit another in place: the next router
    takes the previous stack tensor over, keeps the untouched rows in their slots and rewrites the
    rest; outputs stay exact, and plain ``routing`` agrees afterwards."""
    model = _with_adapters("bert", SPECS)
    inputs = ZOO["bert"].inputs()
    query = model.bert.encoder.layer[0].attention.self.query
    first, _ = _opened(model, ["a", "b", "c"], inputs)
    old = first._stacks[query]
    tensor, slots = old.AB, dict(old.index)
    delete_adapter(model, "b")
    dt.attach(model, dt.LoraConfig(rank=8, alpha=4.0), "d", activate=False)
    _randomise(model, "d", seed=42)
    _randomise(model, "c", seed=43)  # in place: the previous row of c is stale
    second, mixed = _opened(model, ["d", "c", "a"], inputs, previous=first)
    stack = second._stacks[query]
    assert stack.AB is tensor and stack.index["a"] == slots["a"]  # a kept its row; c and d took the other two
    assert {stack.index["c"], stack.index["d"]} == {slots["b"], slots["c"]} and stack.zero == old.zero == 3
    assert old.index == {} and old.names == [] and old.zero == 3  # retired: it can be neither matched nor reused
    _check(model, ["d", "c", "a"], inputs, mixed)
    with routing(model, ["d", "c", "a"]):
        torch.testing.assert_close(ZOO["bert"].run(model, inputs), mixed, atol=0, rtol=0)


def test_a_new_adapter_beside_the_old_ones_copies_their_rows():
    model = _with_adapters("bert", {"a": SPECS["a"], "b": SPECS["b"]})
    inputs = ZOO["bert"].inputs()
    first, _ = _opened(model, ["a", "b", None], inputs)
    dt.attach(model, dt.LoraConfig(**SPECS["c"]), "c", activate=False)
    _randomise(model, "c", seed=7)
    second, mixed = _opened(model, ["c", "b", "a"], inputs, previous=first)
    query = model.bert.encoder.layer[0].attention.self.query
    assert second._stacks[query].AB is not first._stacks[query].AB
    _check(model, ["c", "b", "a"], inputs, mixed)


def test_changed_names_are_the_only_ones_walked_again(monkeypatch):
    """With ``changed``, a router checks only those adapters' tensors; the others are vouched for."""
    from deltatune.core import stacking

    model = _with_adapters("bert", SPECS)
    inputs = ZOO["bert"].inputs()
    first, _ = _opened(model, ["a", "b", "c"], inputs)
    delete_adapter(model, "b")
    dt.attach(model, dt.LoraConfig(rank=8, alpha=4.0), "d", activate=False)
    _randomise(model, "d", seed=42)
    walked: list[object] = []
    real = stacking._refs
    monkeypatch.setattr(stacking, "_refs", lambda module: walked.append(module) or real(module))
    _, mixed = _opened(model, ["d", "c", "a"], inputs, previous=first, changed={"d"})
    layers = [m for m in model.modules() if isinstance(m, AdaptedLayer)]
    assert walked and all(any(module is layer.adapters["d"] for layer in layers) for module in walked)
    _check(model, ["d", "c", "a"], inputs, mixed)


def test_reinstall_renames_an_adapter_and_copies_new_tensors_in():
    """``reinstall`` = detach + install for an adapter of the same config and modules; else it
    refuses and leaves the model untouched."""
    from deltatune.core.records import records
    from deltatune.core.stored import capture, reinstall

    model = _with_adapters("bert", {"a": SPECS["a"], "b": SPECS["b"], "a2": SPECS["a"]})
    value = capture(model, "a2")
    reference = _alone("bert", model, "a2", ZOO["bert"].inputs())
    delete_adapter(model, "a2")
    query = model.bert.encoder.layer[0].attention.self.query
    module = query.adapters["a"]
    assert not reinstall(model, value, "new", "b")  # rank 8 vs 4: another config
    assert list(records(model)) == ["a", "b"] and "new" not in query.adapters
    assert reinstall(model, value, "new", "a")
    assert list(records(model)) == ["b", "new"] and query.adapters["new"] is module and "a" not in query.adapters
    torch.testing.assert_close(_alone("bert", model, "new", ZOO["bert"].inputs()), reference, atol=0, rtol=0)
    with pytest.raises(ValueError, match="already attached"):
        reinstall(model, value, "b", "new")


def test_a_name_swapped_out_and_back_in_within_one_change_is_rebuilt():
    """A server's cache can evict ``b`` and bring it back into another adapter's slot before the
    next router opens: ``b`` is among the changed names, so its row is not taken from the previous
    stack (where it is the old ``b``'s, whose modules now hold ``d``)."""
    from deltatune.core.stored import capture, reinstall

    model = _with_adapters("bert", {"a": SPECS["a"], "b": SPECS["a"], "c": SPECS["c"], "x": SPECS["a"], "y": SPECS["a"]})
    inputs = ZOO["bert"].inputs()
    d_value, b_value = capture(model, "x"), capture(model, "y")
    delete_adapter(model, "x")
    delete_adapter(model, "y")
    b_before = _alone("bert", model, "b", inputs)
    first, _ = _opened(model, ["a", "b", "c"], inputs)
    assert reinstall(model, d_value, "d", "b") and reinstall(model, b_value, "b", "a")
    second, mixed = _opened(model, ["b", "c", "d"], inputs, previous=first, changed={"d", "b"})
    _check(model, ["b", "c", "d"], inputs, mixed)
    assert not torch.allclose(mixed[0], b_before[0])


def test_stack_uniform_routes_one_adapter_everywhere_through_the_stack():
    model = _with_adapters("bert", SPECS)
    inputs = ZOO["bert"].inputs()
    with Router(model, stack_uniform=True) as router:
        router.route(["b", "b", "b"])
        query = model.bert.encoder.layer[0].attention.self.query
        assert query.router.uniform is None and query.router.stack is not None
        routed = ZOO["bert"].run(model, inputs)
        router.route([None, None, None])  # the bare base stays the plain forward
        assert query.router.uniform == ()
    torch.testing.assert_close(routed, _alone("bert", model, "b", inputs), atol=ATOL, rtol=0)


@pytest.fixture
def paths(monkeypatch) -> list[str]:
    """Which stacked path each routed layer call took: ``single`` (homogeneous) or ``batched``."""
    from deltatune.core import routing as routing_module

    taken: list[str] = []
    for name in ("single", "batched"):
        real = getattr(routing_module, name)
        monkeypatch.setattr(routing_module, name, lambda *a, real=real, name=name: taken.append(name) or real(*a))
    return taken


@pytest.mark.parametrize("zoo", ["bert", "llama"])
@pytest.mark.parametrize("grad", [False, True])
def test_a_homogeneous_batch_takes_the_single_path_and_equals_the_routed_one(zoo, grad, paths):
    """All rows on one adapter: two 2-D products from its slot (no gather), equal to the gathered
    ``bmm`` path of the same rows and to each row alone (in place without gradients, as a server
    runs, and out of place with them)."""
    from deltatune.core.stacking import batched, single, stack_of

    model = _with_adapters(zoo, SPECS)
    inputs = ZOO[zoo].inputs()
    rows = ZOO[zoo].run(model, inputs).shape[0]
    with Router(model, stack_uniform=True) as router, torch.set_grad_enabled(grad):
        router.route(["b"] * rows)
        routed = ZOO[zoo].run(model, inputs)
    layers = [m for m in model.modules() if isinstance(m, AdaptedLayer)]
    assert paths == ["single"] * len(layers)
    torch.testing.assert_close(routed, _alone(zoo, model, "b", inputs), atol=ATOL, rtol=0)
    layer = layers[0]
    stack = stack_of(model, layer)
    x = torch.randn(rows, 5, stack.d_in)
    with torch.no_grad():
        base = layer.base(x)
        gathered = batched(base.clone(), x, stack, torch.full((rows,), stack.index["b"]))
        torch.testing.assert_close(single(base.clone(), x, stack, stack.index["b"]), gathered, atol=1e-6, rtol=0)


def test_the_single_path_equals_the_float64_formula():
    """``base(x) + s·(x Aᵀ) Bᵀ`` computed in float64 from the layer's own tensors."""
    from torch import nn

    model = nn.Sequential(nn.Linear(12, 7), nn.Tanh(), nn.Linear(7, 5)).double().eval()
    for p in model.parameters():
        p.requires_grad_(False)
    dt.attach(model, dt.LoraConfig(target=["0", "2"], rank=3, alpha=6.0), "a", activate=False)
    _randomise(model, "a", seed=5)
    for p in model.parameters():
        p.requires_grad_(False)
    x = torch.randn(4, 3, 12, dtype=torch.float64)
    h = x
    for module in model:
        if isinstance(module, AdaptedLayer):
            lora = module.adapters["a"]
            h = h @ module.base.weight.T + module.base.bias + lora.scaling * (h @ lora.A.T) @ lora.B.T
        else:
            h = module(h)
    with Router(model, stack_uniform=True) as router, torch.no_grad():
        router.route(["a"] * 4)
        assert model[0].router.slot is not None
        torch.testing.assert_close(model(x), h, atol=1e-12, rtol=0)


def test_switching_between_homogeneous_mixed_and_base_rows_mid_stream(paths):
    """One open router, rows re-routed every pass the way a server's batch changes: each pass
    equals ``routing`` with those names and each row alone, whichever path it took."""
    model = _with_adapters("bert", SPECS)
    inputs = ZOO["bert"].inputs()
    n_layers = sum(isinstance(m, AdaptedLayer) for m in model.modules())
    plan = [(["a", "a", "a"], "single"), (["a", "b", "a"], "batched"), (["c", "c", "c"], "single"),
            ([None, None, None], None), (["b", None, "b"], "batched"), (["b", "b", "b"], "single")]
    with Router(model, stack_uniform=True) as router, torch.inference_mode():  # as the server runs
        for names, path in plan:
            paths.clear()
            router.route(names)
            mixed = ZOO["bert"].run(model, inputs)
            assert paths == ([path] * n_layers if path else [])
            _check(model, names, inputs, mixed)
            with routing(model, names):
                torch.testing.assert_close(mixed, ZOO["bert"].run(model, inputs), atol=ATOL, rtol=0)


def test_a_homogeneous_batch_on_an_adapter_absent_from_a_layer_runs_the_base_there():
    model = ZOO["bert"].build()
    dt.attach(model, dt.LoraConfig(target=["query", "value"], rank=4), "qv", activate=False)
    dt.attach(model, dt.LoraConfig(target=["query"], rank=4), "q", activate=False)
    _randomise(model, "qv", seed=1)
    _randomise(model, "q", seed=2)
    inputs = ZOO["bert"].inputs()
    with Router(model, stack_uniform=True) as router:
        router.route(["q"] * 3)
        value = model.bert.encoder.layer[0].attention.self.value
        assert value.router.uniform == () and value.router.slot is None
        assert model.bert.encoder.layer[0].attention.self.query.router.slot is not None
        routed = ZOO["bert"].run(model, inputs)
    _check(model, ["q"] * 3, inputs, routed)
