"""Mixed precision and gradient checkpointing with adapted transformers models.

- bf16 autocast on CPU runs the fused LoRA kernel in bf16 and stays close to float32, outputs and
  adapter gradients alike (gradients arrive in the parameters' float32);
- a base model stored in bf16 works with float32 adapters;
- ``model.gradient_checkpointing_enable()`` recomputes activations and gives the same gradients
  as training without it, with LoRA dropout too (checkpointing replays the random state).
"""

from __future__ import annotations

import pytest
import torch

import deltatune as dt
from deltatune.methods import lora_kernels
from deltatune.methods.lora import LoraLinear
from tests.models import ZOO


def adapted(name: str, dropout: float = 0.0, seed: int = 0) -> torch.nn.Module:
    model = ZOO[name].build(seed)
    torch.manual_seed(seed)
    dt.attach(model, dt.LoraConfig(rank=4, dropout=dropout))
    with torch.no_grad():  # make the adapters matter: B starts at zero
        for layer in model.modules():
            if isinstance(layer, dt.AdaptedLayer):
                for p in layer.adapters.parameters():
                    p.add_(torch.randn_like(p) * 0.2)
    return model.train()


def loss_and_grads(model, name: str) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    model.zero_grad(set_to_none=True)
    out = ZOO[name].run(model)
    loss = out.float().square().mean()
    loss.backward()
    return out.detach(), {n: p.grad.detach().clone() for n, p in model.named_parameters() if p.requires_grad}


def relative_error(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a.float() - b.float()).norm() / b.float().norm().clamp_min(1e-12))


def flat(grads: dict[str, torch.Tensor]) -> torch.Tensor:
    return torch.cat([g.float().flatten() for _, g in sorted(grads.items())])


@pytest.mark.parametrize("name", ["bert", "llama", "gpt2"])
def test_bf16_autocast_close_to_float32(name, monkeypatch):
    """The fused kernel under bf16 autocast is as close to float32 as the plain formula is."""
    model = adapted(name)
    want, want_grads = loss_and_grads(model, name)
    calls = []
    real = lora_kernels._LoraLinear.apply
    monkeypatch.setattr(lora_kernels._LoraLinear, "apply", lambda *a: calls.append(a[-2]) or real(*a))
    with torch.autocast("cpu", dtype=torch.bfloat16):
        got, got_grads = loss_and_grads(model, name)
    assert calls and all(dtype == torch.bfloat16 for dtype in calls)  # the fused kernel ran, in bf16
    assert all(g.dtype == torch.float32 for g in got_grads.values())

    monkeypatch.setattr(LoraLinear, "_fusable", lambda self, base: False)  # the plain formula
    with torch.autocast("cpu", dtype=torch.bfloat16):
        plain, plain_grads = loss_and_grads(model, name)
    assert relative_error(got, want) < 3e-2
    assert relative_error(got, want) <= 1.5 * relative_error(plain, want) + 5e-3
    fused_err = relative_error(flat(got_grads), flat(want_grads))
    assert fused_err < 0.1
    assert fused_err <= 1.5 * relative_error(flat(plain_grads), flat(want_grads)) + 1e-2


def test_bf16_base_model_with_float32_adapters():
    """A model stored in bf16 (no autocast) with float32 adapters: the kernel runs in the input's
    dtype and hands each parameter its gradient in its own dtype."""
    want = ZOO["llama"].run(adapted("llama").eval()).detach()
    model = adapted("llama").eval().to(torch.bfloat16)
    for layer in model.modules():
        if isinstance(layer, dt.AdaptedLayer):
            layer.adapters.float()
    got, grads = loss_and_grads(model, "llama")
    assert got.dtype == torch.bfloat16 and relative_error(got, want) < 3e-2
    assert grads and all(g.dtype == torch.float32 and torch.isfinite(g).all() for g in grads.values())


@pytest.mark.parametrize("name", ["bert", "llama"])
@pytest.mark.parametrize("reentrant", [False, True])
@pytest.mark.parametrize("dropout", [0.0, 0.2])
def test_gradient_checkpointing_gives_the_same_gradients(name, reentrant, dropout):
    plain = adapted(name, dropout)
    torch.manual_seed(1)
    want, want_grads = loss_and_grads(plain, name)

    model = adapted(name, dropout)
    model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": reentrant})
    if reentrant:  # the frozen embeddings give no grad to recompute through otherwise
        model.enable_input_require_grads()
    torch.manual_seed(1)
    got, got_grads = loss_and_grads(model, name)
    torch.testing.assert_close(got, want)
    assert want_grads.keys() == got_grads.keys() and want_grads
    for key in want_grads:
        torch.testing.assert_close(got_grads[key], want_grads[key], rtol=1e-5, atol=1e-7)
