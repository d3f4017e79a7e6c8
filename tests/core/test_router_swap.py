"""``Router.swap``: an open router follows an adapter swapped in place (``reinstall``) without
re-opening; every pass afterwards equals ``routing`` freshly entered and each row alone."""

from __future__ import annotations

import pytest
import torch

from deltatune.core.layer import AdaptedLayer
from deltatune.core.routing import Router, delete_adapter, routing
from deltatune.core.stored import capture, reinstall
from tests.core.test_router import _check
from tests.core.test_routing import ATOL, SPECS, _with_adapters
from tests.models import ZOO

SAME = SPECS["a"]  # one config for the adapters that swap into each other's modules


def _model_and_values():
    """Adapters a, b (one config) and c (another) attached; d and b2 captured to swap in."""
    model = _with_adapters("bert", {"a": SAME, "b": SAME, "c": SPECS["c"], "x": SAME, "y": SAME})
    d_value, b2_value = capture(model, "x"), capture(model, "y")
    delete_adapter(model, "x")
    delete_adapter(model, "y")
    return model, d_value, b2_value


def _same_as_fresh(model, names, inputs, out) -> None:
    with routing(model, names):
        torch.testing.assert_close(out, ZOO["bert"].run(model, inputs), atol=ATOL, rtol=0)
    _check(model, names, inputs, out)


@pytest.mark.parametrize("stack_uniform", [False, True])
def test_an_open_router_follows_a_swap_in_place(stack_uniform):
    """The stacks keep their tensor; the new adapter's factors are written into the evicted one's
    slot, the other slots are untouched, and the stack is the records' cache again (a router
    opened next finds it current)."""
    model, d_value, _ = _model_and_values()
    inputs = ZOO["bert"].inputs()
    query = model.bert.encoder.layer[0].attention.self.query
    with Router(model, stack_uniform=stack_uniform) as router, torch.inference_mode():
        router.route(["a", "b", "c"])
        ZOO["bert"].run(model, inputs)
        stack = router._stacks[query]
        tensor, slots, before = stack.AB, dict(stack.index), stack.AB.clone()
        with torch.inference_mode(False), torch.no_grad():
            assert reinstall(model, d_value, "d", "b")
        assert router.swap("b", "d") and router.names is None
        assert router._stacks[query] is stack and stack.AB is tensor and stack.index["d"] == slots["b"]
        assert "b" not in stack.index and stack.index["a"] == slots["a"] and stack.index["c"] == slots["c"]
        kept = [i for i in range(tensor.shape[0]) if i != slots["b"]]
        assert torch.equal(tensor[kept], before[kept]) and not torch.equal(tensor[slots["b"]], before[slots["b"]])
        for names in (["d", "c", "a"], ["d", "d", "d"], [None, "d", None]):
            router.route(names)
            _check(model, names, inputs, ZOO["bert"].run(model, inputs))
        assert router._low[query] == list(query.adapters._modules)  # attach order: d last, as rename leaves it
        slots = dict(stack.index)
    with Router(model, previous=router, changed={"d"}) as after:  # the next router takes the tensor over
        after.route(["d", "a", "c"])
        assert after._stacks[query].AB is tensor and after._stacks[query].index == slots
        out = ZOO["bert"].run(model, inputs)
    _same_as_fresh(model, ["d", "a", "c"], inputs, out)


def test_a_name_swapped_out_and_back_in_is_followed_in_order():
    """b's modules go to d, then a's to a new b (a server's cache evicting b and bringing it back
    before the next pass): both swaps, applied in order, give each row its own adapter."""
    model, d_value, b2_value = _model_and_values()
    inputs = ZOO["bert"].inputs()
    with Router(model) as router, torch.inference_mode():
        router.route(["a", "b", "c"])
        ZOO["bert"].run(model, inputs)
        with torch.inference_mode(False), torch.no_grad():
            assert reinstall(model, d_value, "d", "b") and reinstall(model, b2_value, "b", "a")
        assert router.swap("b", "d") and router.swap("a", "b")
        router.route(["b", "c", "d"])
        _same_as_fresh(model, ["b", "c", "d"], inputs, ZOO["bert"].run(model, inputs))


def test_stacks_lent_by_the_previous_router_follow_the_swap_too():
    """A layer this router has not stacked yet builds from the previous router's stack, which was
    swapped as well, so the new adapter's row is taken over rather than rebuilt wrongly."""
    model, d_value, _ = _model_and_values()
    inputs = ZOO["bert"].inputs()
    first = Router(model)
    first.route(["a", "b", "c"])
    ZOO["bert"].run(model, inputs)
    first.close()
    with Router(model, previous=first, changed=set()) as router, torch.inference_mode():
        assert not router._stacks and router._reuse
        with torch.inference_mode(False), torch.no_grad():
            assert reinstall(model, d_value, "d", "b")
        assert router.swap("b", "d")
        router.route(["d", "a", None])
        _same_as_fresh(model, ["d", "a", None], inputs, ZOO["bert"].run(model, inputs))


def test_a_swap_that_did_not_happen_is_refused():
    """``new`` is not where ``old`` was (no reinstall): False, so the caller re-opens."""
    model, _, _ = _model_and_values()
    with Router(model) as router:
        router.route(["a", "b", "c"])
        assert not router.swap("b", "zzz")
    router.close()
    with pytest.raises(RuntimeError, match="closed"):
        router.swap("a", "b")


def test_every_layer_that_held_the_old_name_is_renamed():
    model, d_value, _ = _model_and_values()
    layers = [m for m in model.modules() if isinstance(m, AdaptedLayer)]
    with Router(model) as router:
        with torch.no_grad():
            assert reinstall(model, d_value, "d", "b")
        assert router.swap("b", "d")
        for layer in layers:
            have, low = router._signature[layer]
            assert have == set(layer.adapters._modules) and set(low) == set(router._low[layer])
            assert router._low[layer] == [n for n in layer.adapters._modules if n in low]  # attach order
