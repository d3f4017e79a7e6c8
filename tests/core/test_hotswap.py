"""Hot swap: new weights in place, equal to loading the new adapter, and no recompilation."""

from __future__ import annotations

from typing import Any

import pytest
import torch
from torch import nn

import deltatune as dt
from deltatune.formats import hotswap_adapter
from deltatune.core.layer import AdaptedLayer
from tests.models import ZOO


def _randomise(model: nn.Module, name: str, seed: int) -> None:
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for layer in (m for m in model.modules() if isinstance(m, AdaptedLayer)):
            if name in layer.adapters:
                for p in layer.adapters[name].parameters():
                    p.copy_(torch.randn(p.shape, generator=g) * 0.3)


def _saved(tmp_path, zoo: str, config: dt.LoraConfig, seed: int) -> tuple[Any, torch.Tensor]:
    """Save a random adapter trained on ``zoo``; return its directory and the model's output with it."""
    model = ZOO[zoo].build()
    dt.attach(model, config, "new")
    _randomise(model, "new", seed)
    with torch.no_grad():
        expected = ZOO[zoo].run(model)
    return dt.save_adapter(model, tmp_path / f"new-{seed}", "new"), expected


def _slot(zoo: str, config: dt.LoraConfig) -> nn.Module:
    model = ZOO[zoo].build()
    dt.attach(model, config, "slot")
    _randomise(model, "slot", seed=1)
    return model


def _tensors(model: nn.Module) -> dict[str, tuple[int, torch.Tensor]]:
    return {n: (t.data_ptr(), t.detach().clone()) for n, t in model.state_dict(keep_vars=True).items()}


@pytest.mark.parametrize("zoo", ["bert", "gpt2"])
def test_same_config_swap_copies_in_place(tmp_path, zoo):
    config = dt.LoraConfig(rank=4, alpha=8.0)
    directory, expected = _saved(tmp_path, zoo, config, seed=5)
    model = _slot(zoo, config)
    before = _tensors(model)
    hotswap_adapter(model, directory, "slot")
    after = _tensors(model)
    assert {n: p for n, (p, _) in before.items()} == {n: p for n, (p, _) in after.items()}  # same storage
    for n, (_, t) in before.items():
        if ".adapters." not in n:
            assert torch.equal(after[n][1], t), f"base tensor {n} changed"
    with torch.no_grad():
        torch.testing.assert_close(ZOO[zoo].run(model), expected, atol=1e-5, rtol=0)


def test_smaller_rank_other_scaling_and_fewer_targets(tmp_path):
    directory, expected = _saved(tmp_path, "bert", dt.LoraConfig(rank=2, alpha=7.0, rslora=True, target=["query"]),
                                 seed=6)
    model = _slot("bert", dt.LoraConfig(rank=8, alpha=16.0, target=["query", "value"]))
    hotswap_adapter(model, directory, "slot")
    with torch.no_grad():
        torch.testing.assert_close(ZOO["bert"].run(model), expected, atol=1e-5, rtol=0)
    value = model.bert.encoder.layer[0].attention.self.value.adapters["slot"]
    assert value.A.abs().sum() == 0 and value.B.abs().sum() == 0  # not in the new adapter: zero update


def test_classifier_head_is_swapped_too(tmp_path):
    config = dt.LoraConfig(rank=4, target=["query", "value"], modules_to_save=("classifier",))
    directory, expected = _saved(tmp_path, "bert", config, seed=7)
    model = _slot("bert", dt.LoraConfig(rank=8, alpha=3.0, target=["query", "value"],
                                        modules_to_save=("classifier",)))
    hotswap_adapter(model, directory, "slot")
    with torch.no_grad():
        torch.testing.assert_close(ZOO["bert"].run(model), expected, atol=1e-5, rtol=0)


@pytest.mark.parametrize(
    "new, match",
    [
        (dt.LoraConfig(rank=16, target=["query"]), "rank >= 16"),             # rank does not fit
        (dt.LoraConfig(rank=4, target=["query", "key"]), "among the slot's"),  # a module the slot lacks
    ],
)
def test_incompatible_swap_changes_nothing(tmp_path, new, match):
    directory, _ = _saved(tmp_path, "bert", new, seed=8)
    model = _slot("bert", dt.LoraConfig(rank=8, target=["query", "value"]))
    before = _tensors(model)
    with pytest.raises(ValueError, match=match):
        hotswap_adapter(model, directory, "slot")
    for n, (_, t) in before.items():
        assert torch.equal(model.state_dict()[n], t)


def test_compiled_model_does_not_recompile(tmp_path):
    import torch._dynamo as dynamo

    compiled_graphs = []

    def backend(gm: torch.fx.GraphModule, example_inputs: list) -> Any:
        compiled_graphs.append(gm)
        return gm.forward

    slot = dt.LoraConfig(rank=8, alpha=16.0, target=["fc1", "fc2"])
    directory, expected = _saved(tmp_path, "mlp", dt.LoraConfig(rank=4, alpha=2.0, target=["fc1", "fc2"]), seed=9)
    model = _slot("mlp", slot)
    x = ZOO["mlp"].inputs()
    dynamo.reset()
    compiled = torch.compile(model, backend=backend)
    with torch.no_grad():
        before = compiled(x)
        torch.testing.assert_close(before, model(x), atol=1e-6, rtol=0)
        hotswap_adapter(model, directory, "slot")
        with dynamo.config.patch(error_on_recompile=True):
            after = compiled(x)
    assert len(compiled_graphs) == 1
    torch.testing.assert_close(after, expected, atol=1e-5, rtol=0)
    assert not torch.allclose(before, after)
    dynamo.reset()


def test_merged_or_unknown_slot_is_refused(tmp_path):
    config = dt.LoraConfig(rank=4, target=["query"])
    directory, _ = _saved(tmp_path, "bert", config, seed=10)
    model = _slot("bert", config)
    with pytest.raises(ValueError, match="no adapter named 'other'"):
        hotswap_adapter(model, directory, "other")
    dt.merge(model, "slot")
    with pytest.raises(ValueError, match="unmerge"):
        hotswap_adapter(model, directory, "slot")
