"""Parity checks shared by the LyCORIS-family tests (LoHa, LoKr) against Hugging Face PEFT."""

from __future__ import annotations

import torch

import deltatune as dt
from deltatune.core.records import adapted_layers


def _grads(model, run):
    model.zero_grad()
    run(model).pow(2).mean().backward()
    return {n: p.grad for n, p in model.named_parameters() if p.requires_grad}


def check_against_peft(zoo, model, peft_model, prefix, skip_grads=()):
    """Outputs (unmerged and merged), gradients and delta weights equal PEFT's on identical weights."""
    expected = zoo.run(peft_model.eval())
    assert not torch.allclose(expected, zoo.run(zoo.build()), atol=1e-3)  # the adapters do something
    torch.testing.assert_close(zoo.run(model.eval()), expected, rtol=1e-5, atol=1e-5)
    theirs, ours = _grads(peft_model.train(), zoo.run), _grads(model.train(), zoo.run)
    for layer_name, layer in adapted_layers(model):
        peft_layer = peft_model.base_model.model.get_submodule(layer_name)
        torch.testing.assert_close(layer.adapters["default"].delta_weight(layer.base),
                                   peft_layer.get_delta_weight("default"), rtol=1e-5, atol=1e-6)
        for pname, g in layer.adapters["default"].named_parameters():
            if pname in skip_grads:
                continue
            peft_grad = theirs[f"base_model.model.{layer_name}.{prefix}{pname}.default"]
            torch.testing.assert_close(ours[f"{layer_name}.adapters.default.{pname}"], peft_grad.view_as(g),
                                       rtol=1e-4, atol=1e-6)
    dt.merge(model.eval())
    peft_model.eval().merge_adapter()
    torch.testing.assert_close(zoo.run(model), zoo.run(peft_model), rtol=1e-5, atol=1e-5)
