"""``Router.route(names, lengths)``: several examples packed one after another in one row (a
server's prefill without padding); each run of tokens equals its example run alone, the per-run
products equal the float64 formula, and a layer that needs grouping refuses before re-routing."""

from __future__ import annotations

import pytest
import torch
from torch import nn

import deltatune as dt
from deltatune.core.layer import AdaptedLayer
from deltatune.core.routing import Router, Unpackable
from deltatune.core.stacking import segments, spans, stack_of
from tests.core.test_routing import ScaleConfig, _randomise

D = 12


def _mlp(specs: dict[str, dict]) -> nn.Module:
    """A per-token model (the same function of each token), with LoRA adapters of several ranks."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(D, 16), nn.Tanh(), nn.Linear(16, 16), nn.Tanh(), nn.Linear(16, 5)).eval()
    for p in model.parameters():
        p.requires_grad_(False)
    for i, (name, kw) in enumerate(specs.items()):
        dt.attach(model, dt.LoraConfig(**{"target": ["0", "2", "4"], **kw}), name, activate=False)
        _randomise(model, name, seed=20 + i)
    for p in model.parameters():
        p.requires_grad_(False)
    return model


SPECS = {"a": dict(rank=4, alpha=8.0), "b": dict(rank=2, alpha=2.0), "c": dict(target=["2"], rank=3, alpha=3.0)}


def _alone(model: nn.Module, name: str | None, x: torch.Tensor) -> torch.Tensor:
    if name is None:
        with dt.disabled(model):
            return model(x)
    with dt.using(model, name):
        return model(x)


@pytest.mark.parametrize("names", [["a", "a", "b", None, "c", "a"], ["b", "b", "b"], [None, None], ["c", None, "c"]])
def test_each_run_of_a_packed_row_equals_its_example_alone(names):
    """Mixed runs (segments), one adapter everywhere (the single path), the bare base, and an
    adapter absent from some layers; each run as its example computed alone."""
    model = _mlp(SPECS)
    g = torch.Generator().manual_seed(1)
    lengths = [3, 1, 5, 2, 4, 2][: len(names)]
    examples = [torch.randn(1, n, D, generator=g) for n in lengths]
    with Router(model, stack_uniform=True) as router, torch.inference_mode():
        router.route(names, lengths)
        packed = model(torch.cat(examples, 1))                    # (1, N, 5)
        assert router.names is None  # the next route() re-plans, whatever its names
    start = 0
    for name, x, n in zip(names, examples, lengths):
        torch.testing.assert_close(packed[:, start:start + n], _alone(model, name, x), atol=1e-6, rtol=0)
        start += n


def test_runs_merge_neighbours_and_leave_the_base_out():
    assert spans([0, 0, 1, 3, 3, 0], [2, 1, 4, 2, 2, 3], zero=3) == [(0, 0, 3), (1, 3, 7), (0, 11, 14)]
    assert spans([3, 3], [2, 2], zero=3) == []


@pytest.mark.parametrize("grad", [False, True])
def test_segments_equal_the_float64_formula(grad):
    model = _mlp(SPECS).double()
    layer = model[0]
    assert isinstance(layer, AdaptedLayer)
    stack = stack_of(model, layer)
    x = torch.randn(1, 9, D, dtype=torch.float64)
    runs = [(stack.index["a"], 0, 4), (stack.index["b"], 6, 9)]  # tokens 4-5 on the bare base
    expected = x @ layer.base.weight.T + layer.base.bias
    for name, (_, a, b) in zip(["a", "b"], runs):
        lora = layer.adapters[name]
        expected[:, a:b] += lora.scaling * (x[:, a:b] @ lora.A.T) @ lora.B.T
    with torch.set_grad_enabled(grad):
        base = layer.base(x)
        got = segments(base, x, stack, runs)
    torch.testing.assert_close(got, expected, atol=1e-12, rtol=0)
    assert (got is base) == (not grad)  # in place when no gradient is wanted


def test_a_layer_that_needs_grouping_refuses_a_packed_row_and_keeps_its_route():
    model = _mlp({"a": SPECS["a"]})
    dt.attach(model, ScaleConfig(target=["0"]), "s", activate=False)
    with Router(model) as router:
        router.route(["a", "s"])
        before = model[0].router
        with pytest.raises(Unpackable, match="grouping"):
            router.route(["a", "s"], [2, 3])
        assert model[0].router is before and router.names == ["a", "s"]
        router.route(["s", "s"], [2, 3])  # one adapter everywhere: its ordinary forward, per token
        with pytest.raises(ValueError, match="lengths"):
            router.route(["a", "s"], [2])
