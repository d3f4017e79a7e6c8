"""Many adapters on one base: mixed-batch routing equals running each example with its adapter."""

from __future__ import annotations

import dataclasses
import gc
import weakref
from typing import Any, ClassVar

import pytest
import torch
from torch import nn

import deltatune as dt
from deltatune.config import AdapterConfig
from deltatune.core import routing as routing_module
from deltatune.core.records import records
from deltatune.core.layer import Adapter, AdaptedLayer
from deltatune.core.composition import composed, set_composition
from deltatune.core.routing import delete_adapter, routing, run_grouped
from deltatune.formats import load_adapters
from tests.models import ZOO

ATOL = 1e-5


def _randomise(model: nn.Module, name: str, seed: int) -> None:
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for layer in (m for m in model.modules() if isinstance(m, AdaptedLayer)):
            if name in layer.adapters:
                for p in layer.adapters[name].parameters():
                    p.copy_(torch.randn(p.shape, generator=g) * 0.3)


def _with_adapters(zoo: str, specs: dict[str, dict[str, Any]]) -> nn.Module:
    model = ZOO[zoo].build()
    for i, (name, kw) in enumerate(specs.items()):
        dt.attach(model, dt.LoraConfig(**kw), name, activate=False)
        _randomise(model, name, seed=10 + i)
    return model


SPECS = {
    "a": dict(rank=4, alpha=8.0),
    "b": dict(rank=8, alpha=4.0),            # another rank: the stack pads it
    "c": dict(rank=2, alpha=2.0, rslora=True),
}


def _alone(zoo: str, model: nn.Module, choice: Any, inputs: Any) -> torch.Tensor:
    if choice is None:
        with dt.disabled(model):
            return ZOO[zoo].run(model, inputs)
    with dt.using(model, choice):
        return ZOO[zoo].run(model, inputs)


@pytest.fixture
def batched_calls(monkeypatch) -> list[int]:
    """Counts the calls of the batched low-rank path (the alternative, grouping, is exact too)."""
    calls: list[int] = []
    real = routing_module.batched

    def spy(*args: Any) -> torch.Tensor:
        calls.append(1)
        return real(*args)

    monkeypatch.setattr(routing_module, "batched", spy)
    return calls


@pytest.mark.parametrize("zoo", ["mlp", "bert", "llama", "gpt2"])
@pytest.mark.parametrize("grad", [False, True])
@pytest.mark.parametrize("engine", ["aten", "onednn"])
def test_mixed_batch_equals_each_example_with_its_adapter(zoo, grad, engine, batched_calls, monkeypatch):
    """On either CPU engine (oneDNN forced on for these small shapes): the base product of a
    mixed batch runs on the same engine as a single adapter's kernel."""
    from deltatune.core import products

    monkeypatch.setattr(products, "_ONEDNN_MIN_WORK", 0)
    monkeypatch.setattr(products, "_ENGINE", engine)
    model = _with_adapters(zoo, SPECS)
    inputs = ZOO[zoo].inputs()
    rows = ZOO[zoo].run(model, inputs).shape[0]
    names = (["b", None, "a", "c"] * 2)[:rows]
    layers = [m for m in model.modules() if isinstance(m, AdaptedLayer)]
    with routing(model, names), torch.set_grad_enabled(grad):
        mixed = ZOO[zoo].run(model, inputs)
    assert len(batched_calls) == len(layers), "every LoRA layer should take the batched path"
    for i, choice in enumerate(names):
        expected = _alone(zoo, model, choice, inputs)[i]
        torch.testing.assert_close(mixed[i], expected, atol=ATOL, rtol=0)
    assert all(m.router is None for m in model.modules() if isinstance(m, AdaptedLayer))


def test_single_examples_alone_match_the_mixed_batch():
    model = _with_adapters("bert", SPECS)
    inputs = ZOO["bert"].inputs()
    names = ["c", "a", None]
    with routing(model, names):
        mixed = ZOO["bert"].run(model, inputs)
    for i, choice in enumerate(names):
        one = {k: v[i : i + 1] for k, v in inputs.items()}
        torch.testing.assert_close(mixed[i : i + 1], _alone("bert", model, choice, one), atol=ATOL, rtol=0)


def test_same_adapter_everywhere_uses_the_plain_forward():
    model = _with_adapters("bert", SPECS)
    inputs = ZOO["bert"].inputs()
    with routing(model, ["a", "a", "a"]):
        assert all(m.router.uniform == ("a",) for m in model.modules() if isinstance(m, AdaptedLayer))
        routed = ZOO["bert"].run(model, inputs)
    torch.testing.assert_close(routed, _alone("bert", model, "a", inputs), atol=0, rtol=0)


@dataclasses.dataclass(frozen=True)
class ScaleConfig(AdapterConfig):
    """A non-low-rank test method: ``base(x) · (1 + l)``, one learnable scale per output."""

    method: ClassVar[str] = "test-scale"
    default_target: ClassVar[Any] = "all-linear"

    def build(self, name: str, base: nn.Module) -> Adapter | None:
        return _Scale(base.out_features) if isinstance(base, nn.Linear) else None


class _Scale(Adapter):
    def __init__(self, d: int) -> None:
        super().__init__()
        self.l = nn.Parameter(torch.zeros(d))

    def forward(self, x: torch.Tensor, base: Any) -> torch.Tensor:
        return base(x) * (1 + self.l)


def test_other_methods_and_stacks_fall_back_to_grouping():
    model = _with_adapters("bert", {"a": SPECS["a"], "b": SPECS["b"]})
    dt.attach(model, ScaleConfig(target=["query", "value", "dense"]), "s", activate=False)
    _randomise(model, "s", seed=3)
    inputs = ZOO["bert"].inputs()
    names = ["s", ["a", "b"], "a"]
    with routing(model, names):
        query = model.bert.encoder.layer[0].attention.self.query
        assert query.router.stack is None and len(query.router.keys) == 3
        mixed = ZOO["bert"].run(model, inputs)
    for i, choice in enumerate(names):
        torch.testing.assert_close(mixed[i], _alone("bert", model, choice, inputs)[i], atol=ATOL, rtol=0)


def test_classification_heads_that_differ_per_adapter():
    model = ZOO["bert"].build()
    for i, name in enumerate(["pos", "neg"]):
        dt.attach(model, dt.LoraConfig(rank=4, target=["query", "value"], modules_to_save=("classifier",)),
                  name, activate=False)
        _randomise(model, name, seed=20 + i)
    inputs = ZOO["bert"].inputs()
    names = ["neg", "pos", None]
    with routing(model, names):
        mixed = ZOO["bert"].run(model, inputs)
    for i, choice in enumerate(names):
        torch.testing.assert_close(mixed[i], _alone("bert", model, choice, inputs)[i], atol=ATOL, rtol=0)


def _generate(model: nn.Module, ids: torch.Tensor, **kw: Any) -> torch.Tensor:
    return model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=6, pad_token_id=0, **kw)


@pytest.mark.parametrize("beams", [1, 2])
def test_generate_follows_the_rows(beams):
    model = _with_adapters("llama", SPECS)
    ids = ZOO["llama"].inputs()["input_ids"][:, :5]
    names = ["c", None, "b"]
    with torch.no_grad(), routing(model, names):
        mixed = _generate(model, ids, num_beams=beams, do_sample=False)
    for i, choice in enumerate(names):
        with torch.no_grad():
            if choice is None:
                with dt.disabled(model):
                    alone = _generate(model, ids[i : i + 1], num_beams=beams, do_sample=False)
            else:
                with dt.using(model, choice):
                    alone = _generate(model, ids[i : i + 1], num_beams=beams, do_sample=False)
        assert torch.equal(mixed[i], alone[0])


def test_gradients_flow_per_group_when_training():
    model = _with_adapters("mlp", {"a": SPECS["a"], "b": SPECS["b"]})
    dt.mark_trainable(model, ["a", "b"])
    model.train()
    x = ZOO["mlp"].inputs()
    names = ["a", "b", "a", None]
    with routing(model, names):
        model(x).pow(2).sum().backward()
    routed = {n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad}
    model.zero_grad()
    for choice in ("a", "b", None):
        rows = [i for i, c in enumerate(names) if c == choice]
        if choice is None:
            continue  # the bare base trains nothing
        with dt.using(model, choice):
            model(x[rows]).pow(2).sum().backward()
    for n, p in model.named_parameters():
        if p.requires_grad:
            torch.testing.assert_close(routed[n], p.grad, atol=1e-6, rtol=1e-5)


def _stack_of(model: nn.Module, layer: AdaptedLayer) -> Any:
    """The routing stack of ``layer`` held in any adapter record, or None."""
    found = [v for r in records(model).values() for k, v in r.caches.items() if layer in k]
    return found[0] if found else None


def test_stack_is_rebuilt_when_weights_change_and_freed_on_delete():
    model = _with_adapters("bert", SPECS)
    inputs = ZOO["bert"].inputs()
    names = ["a", "b", "c"]
    with routing(model, names):
        ZOO["bert"].run(model, inputs)
    _randomise(model, "b", seed=99)  # in place: version counters move
    with routing(model, names):
        mixed = ZOO["bert"].run(model, inputs)
    torch.testing.assert_close(mixed[1], _alone("bert", model, "b", inputs)[1], atol=ATOL, rtol=0)

    query = model.bert.encoder.layer[0].attention.self.query
    gone = weakref.ref(query.adapters["b"].B)
    stack = _stack_of(model, query)
    assert stack is not None
    stacked = weakref.ref(stack.AB)  # the cache's copy of b's factors
    del stack
    delete_adapter(model, "b")
    gc.collect()
    assert gone() is None and stacked() is None and "b" not in dt.configs(model)
    assert _stack_of(model, query) is None
    with routing(model, ["c", "a", None]):
        mixed = ZOO["bert"].run(model, inputs)
    torch.testing.assert_close(mixed[0], _alone("bert", model, "c", inputs)[0], atol=ATOL, rtol=0)


def test_bad_routing_fails_before_running():
    model = _with_adapters("bert", {"a": SPECS["a"]})
    inputs = ZOO["bert"].inputs()
    with pytest.raises(ValueError, match="no adapter named 'zz'"):
        with routing(model, ["a", "zz", None]):
            pass
    with pytest.raises(ValueError, match="one entry per example"):
        with routing(model, []):
            pass
    with pytest.raises(ValueError, match="batch first"):
        with routing(model, ["a", None]):
            ZOO["bert"].run(model, inputs)  # 3 rows, 2 names
    assert all(m.router is None for m in model.modules() if isinstance(m, AdaptedLayer))
    dt.merge(model, "a")
    with pytest.raises(RuntimeError, match="unmerge"):
        with routing(model, ["a", None, None]):
            pass


def test_switching_adapters_keeps_the_modules():
    model = _with_adapters("bert", SPECS)
    modules = {n: id(m) for n, m in model.named_modules()}
    inputs = ZOO["bert"].inputs()
    for name in ["c", "a", "b"]:
        dt.set_active(model, name)
        assert {n: id(m) for n, m in model.named_modules()} == modules
        with routing(model, [name] * 3):
            expected = ZOO["bert"].run(model, inputs)
        torch.testing.assert_close(ZOO["bert"].run(model, inputs), expected, atol=0, rtol=0)


def test_load_many_adapters_by_name(tmp_path):
    model = _with_adapters("gpt2", SPECS)
    dirs = {name: dt.save_adapter(model, tmp_path / name, name) for name in SPECS}
    fresh = ZOO["gpt2"].build()
    assert load_adapters(fresh, dirs) == list(SPECS)
    assert dt.active_adapters(fresh) == ()
    inputs = ZOO["gpt2"].inputs()
    with routing(model, ["c", "a", "b"]):
        expected = ZOO["gpt2"].run(model, inputs)
    with routing(fresh, ["c", "a", "b"]):
        torch.testing.assert_close(ZOO["gpt2"].run(fresh, inputs), expected, atol=0, rtol=0)


def test_average_composition_is_the_mean_of_outputs():
    model = _with_adapters("mlp", {"a": dict(rank=4, target=["fc1"]), "b": dict(rank=2, target=["fc1"])})
    x = ZOO["mlp"].inputs()
    outs = []
    for name in ("a", "b"):
        with dt.using(model, name):
            outs.append(model.fc1(x))
    with composed(model, ["a", "b"], "average"):
        torch.testing.assert_close(model.fc1(x), (outs[0] + outs[1]) / 2, atol=1e-6, rtol=0)
    assert model.fc1.composition == "stack" and model.fc1.active == ()
    with composed(model, ["a", "b"], "stack"), dt.using(model, ["a", "b"]):
        stacked = model.fc1(x)
    with dt.using(model, ["a", "b"]):
        torch.testing.assert_close(model.fc1(x), stacked, atol=0, rtol=0)
    with pytest.raises(ValueError, match="composition must be one of"):
        set_composition(model, "sum")


def test_run_grouped_puts_results_back_in_order():
    model = _with_adapters("bert", SPECS)
    inputs = ZOO["bert"].inputs()
    names = ["c", None, "c"]
    calls = []

    def fn(indices: list[int]) -> list[torch.Tensor]:
        calls.append(indices)
        return list(ZOO["bert"].run(model, {k: v[indices] for k, v in inputs.items()}))

    rows = run_grouped(model, names, fn)
    assert calls == [[0, 2], [1]]
    with routing(model, names):
        torch.testing.assert_close(torch.stack(rows), ZOO["bert"].run(model, inputs), atol=ATOL, rtol=0)
    with pytest.raises(ValueError, match="no adapter named 'x'"):
        run_grouped(model, ["x"], fn)
