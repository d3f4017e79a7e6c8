"""The conformance suite: every registered method, with its default config, on every zoo model.

A method joins by adding one line to ``deltatune.methods.METHODS``; nothing here names a method.
A (method, model, target) combination where the method finds nothing to adapt (``NoMatchError``,
e.g. prompt tuning on the plain MLP) is not applicable: it is left out when the cases are
collected, not skipped at run time. ``test_every_method_runs_somewhere`` makes sure each method
is really exercised on at least two zoo models.
"""

from __future__ import annotations

import copy
import dataclasses

import pytest
import torch

import deltatune as dt
from deltatune.core.layer import AdaptedLayer
from deltatune.core.layers import quantized_format
from tests.models import ZOO

def _config(method: str, target):
    cls = dt.METHODS[method]
    return cls() if target is None else cls(target=target)


def _applicable(method: str, model: str, target) -> bool:
    try:
        dt.attach(ZOO[model].build(), _config(method, target))
    except dt.NoMatchError:
        return False
    except ValueError as e:  # trains a quantized weight in full (partial): not applicable to that base
        if ZOO[model].quantized and "quantized" in str(e):
            return False
        raise
    return True


CASES = [
    (method, model, target)
    for method in sorted(dt.METHODS)
    for model, zoo in ZOO.items()
    for target in [None, *zoo.extra_targets]
    if _applicable(method, model, target)
]
IDENTITY_CASES = [c for c in CASES if dt.METHODS[c[0]].identity_at_init]


def _id(case: tuple) -> str:
    method, model, target = case
    return f"{method}-{model}" + ("" if target is None else "-" + "+".join(target))


def _attach(model, method, target, name="default"):
    return dt.attach(model, _config(method, target), name)


def _randomise(model, name: str, seed: int = 1) -> None:
    """Move the adapter away from its (often identity) initialisation."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for _, layer in dt.core.records.adapted_layers(model):
            if name in layer.adapters:
                for p in layer.adapters[name].parameters():
                    if p.is_floating_point():
                        p.add_(0.1 * torch.randn(p.shape, generator=g, dtype=p.dtype))


def _base_state(model) -> dict[str, torch.Tensor]:
    return {k: v.clone() for k, v in model.state_dict().items() if ".adapters." not in k}


@pytest.fixture(params=CASES, ids=[_id(c) for c in CASES])
def case(request):
    method, model_name, target = request.param
    zoo = ZOO[model_name]
    return method, zoo, target


@pytest.mark.parametrize("identity_case", IDENTITY_CASES, ids=[_id(c) for c in IDENTITY_CASES])
def test_identity_at_init(identity_case):
    method, model_name, target = identity_case
    zoo = ZOO[model_name]
    model = zoo.build()
    expected = zoo.run(model)
    _attach(model, method, target)
    torch.testing.assert_close(zoo.run(model), expected, rtol=0, atol=1e-6)


def test_training_changes_only_the_adapter(case):
    method, zoo, target = case
    model = zoo.build()
    _attach(model, method, target)
    _randomise(model, "default")
    model.train()
    base_before = _base_state(model)
    trainable = {n: p.detach().clone() for n, p in model.named_parameters() if p.requires_grad}
    assert trainable, "the adapter has no trainable parameters"
    opt = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.1)
    loss = zoo.run(model).float().pow(2).mean()
    loss.backward()
    opt.step()
    for k, v in _base_state(model).items():
        assert torch.equal(v, base_before[k]), f"base tensor {k} changed"
    changed = [n for n, p in model.named_parameters() if n in trainable and not torch.equal(p, trainable[n])]
    assert changed, "no adapter parameter changed after an optimizer step"
    assert all(".adapters." in n for n in trainable), "a non-adapter parameter is trainable"


def test_save_load_reproduces_outputs(case, tmp_path):
    method, zoo, target = case
    model = zoo.build()
    _attach(model, method, target)
    _randomise(model, "default")
    expected = zoo.run(model)
    dt.save_adapter(model, tmp_path / "adapter")
    tensors, targets, saved = dt.core.stored.adapter_state(model, "default")
    assert all(k.split(".")[0] for k in tensors)
    base_keys = set(zoo.build().state_dict())
    assert not (set(tensors) & base_keys), "the adapter file holds base tensors"

    fresh = zoo.build()
    dt.load_adapter(fresh, tmp_path / "adapter")
    torch.testing.assert_close(zoo.run(fresh), expected, rtol=0, atol=0)


def test_merge_matches_unmerged(case):
    method, zoo, target = case
    model = zoo.build()
    _attach(model, method, target)
    _randomise(model, "default")
    adapters = [layer.adapters["default"] for _, layer in dt.core.records.adapted_layers(model)]
    if not all(a.mergeable for a in adapters):
        with pytest.raises(ValueError, match="cannot be merged"):
            dt.merge(model)
        return
    atol = max(a.merge_atol for a in adapters)
    keys = set(zoo.build().state_dict())
    quantized = [l for _, l in dt.core.records.adapted_layers(model) if quantized_format(l.base)]
    if quantized:  # merging into 4-bit storage would round the update away: dequantize first
        with pytest.raises(ValueError, match="quantized.*dequantize"):
            dt.merge(model)
        dt.dequantize(model)
        keys = set(dt.dequantize(zoo.build()).state_dict())
    base_before = _base_state(model)
    expected = zoo.run(model)
    dt.merge(model)
    torch.testing.assert_close(zoo.run(model), expected, rtol=0, atol=atol)
    dt.unmerge(model)
    torch.testing.assert_close(zoo.run(model), expected, rtol=0, atol=atol)
    for k, v in _base_state(model).items():
        torch.testing.assert_close(v, base_before[k], rtol=0, atol=atol, msg=f"unmerge did not restore {k}")
    plain = dt.merge_and_unload(model)
    assert not any(isinstance(m, AdaptedLayer) for m in plain.modules())
    assert set(plain.state_dict()) == keys
    torch.testing.assert_close(zoo.run(plain), expected, rtol=0, atol=atol)


def test_detach_restores_the_model(case):
    method, zoo, target = case
    model = zoo.build()
    keys = list(model.state_dict())
    modules = {n: m for n, m in model.named_modules()}
    expected = zoo.run(model)
    _attach(model, method, target)
    _randomise(model, "default")
    dt.detach(model)
    assert list(model.state_dict()) == keys
    assert all(m is modules[n] for n, m in model.named_modules())
    torch.testing.assert_close(zoo.run(model), expected, rtol=0, atol=0)


def test_selecting_one_of_two_adapters(case):
    method, zoo, target = case
    model = zoo.build()
    _attach(model, method, target, "one")
    _attach(model, method, target, "two")
    _randomise(model, "one", seed=1)
    _randomise(model, "two", seed=2)
    only = zoo.build()
    _attach(only, method, target, "two")
    tensors, _, _ = dt.core.stored.adapter_state(model, "two")
    dt.core.stored.copy_in(only, "two", tensors)
    dt.set_active(model, "two")
    torch.testing.assert_close(zoo.run(model), zoo.run(only), rtol=0, atol=1e-6)
    with dt.disabled(model):
        torch.testing.assert_close(zoo.run(model), zoo.run(zoo.build()), rtol=0, atol=0)
    assert dt.active_adapters(model) == ("two",)


def test_config_round_trips_through_a_dict():
    for method, cls in dt.METHODS.items():
        config = cls()
        again = dt.config_from_dict(copy.deepcopy(config.to_dict()))
        assert dataclasses.asdict(again) == dataclasses.asdict(config), method
        with pytest.raises(ValueError, match="unknown key"):
            dt.config_from_dict({**config.to_dict(), "no_such_key": 1})


def test_every_method_runs_somewhere():
    for method in dt.METHODS:
        applicable = 0
        for name in ZOO:
            applicable += _applicable(method, name, None)
        assert applicable >= 2, f"{method} applies to only {applicable} zoo models with its defaults"


@pytest.mark.parametrize("name", sorted(dt.METHODS))
def test_every_method_declares_its_family_and_learning_rate_advice(name):
    """The method's config describes itself; ``deltatune compare`` keeps no table of methods."""
    config = dt.METHODS[name]
    assert config.family in ("addition", "specification", "reparameterization"), name
    assert config.suggested_lr is None or 0 < config.suggested_lr < 1, name
