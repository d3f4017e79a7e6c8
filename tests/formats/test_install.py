"""One install path: a StoredAdapter is checked once (keys, shapes, modules) and rolled back on any
error; both formats and hot swap go through the same check."""

from __future__ import annotations

import pytest
import torch
from torch import nn

import deltatune as dt
from deltatune import formats
from deltatune.core.stored import StoredAdapter, capture, install
from deltatune.formats import hotswap_adapter, native, peft
from tests.models import ZOO

MLP = ZOO["mlp"]


def _trained(config: dt.AdapterConfig | None = None) -> nn.Module:
    model = MLP.build()
    dt.attach(model, config or dt.LoraConfig(rank=2, target=["fc1", "fc2"]))
    g = torch.Generator().manual_seed(3)
    with torch.no_grad():
        for p in model.parameters():
            if p.requires_grad:
                p.copy_(torch.randn(p.shape, generator=g) * 0.3)
    return model


def _tree(model: nn.Module) -> tuple[list[tuple[str, type]], list[str]]:
    return [(n, type(m)) for n, m in model.named_modules()], list(model.state_dict())


def _damaged(value: StoredAdapter, how: str) -> StoredAdapter:
    tensors = dict(value.tensors)
    key = next(k for k in tensors if k.startswith("fc2."))
    if how == "wrong shape":
        tensors[key] = torch.zeros(tensors[key].shape[0] + 1, *tensors[key].shape[1:])
    elif how == "missing key":
        del tensors[key]
    else:
        tensors["fc2.C"] = torch.zeros(2, 2)
    return value.replace(tensors=tensors)


@pytest.mark.parametrize("how, message", [("wrong shape", r"tensor 'fc2\.\w+' has shape"),
                                          ("missing key", r"tensor 'fc2\.\w+' is missing"),
                                          ("extra key", "unexpected tensor 'fc2.C'")])
def test_install_rolls_back_on_a_bad_tensor(how: str, message: str) -> None:
    value = _damaged(capture(_trained(), "default"), how)
    model = MLP.build()
    dt.attach(model, dt.IA3Config(target=["fc1"]), "other")  # an adapter already there stays as it was
    before = _tree(model)
    with pytest.raises(ValueError, match=message):
        install(model, value, "new")
    assert _tree(model) == before
    assert list(dt.configs(model)) == ["other"]


def test_install_refuses_a_module_the_model_lacks_naming_the_tensor() -> None:
    value = capture(_trained(), "default")
    value = value.replace(parts=[["fc1", "fc9"]], tensors={**value.tensors, "fc9.A": torch.zeros(2, 16)})
    model = MLP.build()
    before = _tree(model)
    with pytest.raises(ValueError, match=r"needs module 'fc9', which this model does not have \(tensor 'fc9.A'"):
        install(model, value)
    assert _tree(model) == before


def test_the_same_value_through_either_format_gives_the_same_outputs(tmp_path) -> None:
    trained = _trained()
    value = capture(trained, "default")
    native.write(value, tmp_path / "ours")
    peft.write(value, tmp_path / "peft")
    assert formats.detect(tmp_path / "ours") == "deltatune" and formats.detect(tmp_path / "peft") == "peft"
    assert native.detect(tmp_path / "ours") and peft.detect(tmp_path / "peft")
    outputs = []
    for directory in ("ours", "peft"):
        model = MLP.build()
        install(model, formats.read(tmp_path / directory, model))
        with torch.no_grad():
            outputs.append(MLP.run(model))
    with torch.no_grad():
        expected = MLP.run(trained)
    torch.testing.assert_close(outputs[0], expected, rtol=0, atol=0)
    torch.testing.assert_close(outputs[1], outputs[0], rtol=0, atol=0)
    for directory in ("ours", "peft"):  # and the public verbs agree with install
        model = MLP.build()
        dt.load_adapter(model, tmp_path / directory)
        with torch.no_grad():
            torch.testing.assert_close(MLP.run(model), expected, rtol=0, atol=0)


def test_hotswap_uses_the_same_check_naming_the_key(tmp_path) -> None:
    value = _damaged(capture(_trained(), "default"), "wrong shape")
    native.write(value, tmp_path / "bad")
    model = _trained(dt.LoraConfig(rank=2, target=["fc1", "fc2"]))
    before = {k: t.clone() for k, t in model.state_dict().items()}
    with pytest.raises(ValueError, match=r"tensor 'fc2\.\w+' has shape .* but this model needs"):
        hotswap_adapter(model, tmp_path / "bad", "default")
    assert all(torch.equal(model.state_dict()[k], t) for k, t in before.items())


def test_hotswap_reads_either_format(tmp_path) -> None:
    trained = _trained()
    with torch.no_grad():
        expected = MLP.run(trained)
    for fmt in ("deltatune", "peft"):
        dt.save_adapter(trained, tmp_path / fmt, format=fmt)
        slot = MLP.build()
        dt.attach(slot, dt.LoraConfig(rank=4, target=["fc1", "fc2"]), "slot")
        hotswap_adapter(slot, tmp_path / fmt, "slot")
        with torch.no_grad():
            torch.testing.assert_close(MLP.run(slot), expected, rtol=0, atol=1e-5)
