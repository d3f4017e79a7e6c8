"""bf16 path: frozen linear weights in bf16 once (core/frozen_dtype.py) and the fused kernels under autocast.

The specification: a plain frozen ``nn.Linear`` computes bit for bit what autocast computed before;
the float32 base is back in place (same objects, same bits) outside the block; the fused LoRA, DoRA
and (IA)³ kernels under bf16 autocast (with and without the bf16 frozen weights) stay within bf16
tolerance of the float64 formula, outputs and every gradient.
"""

from __future__ import annotations

import pytest
import torch
from torch import nn

import deltatune as dt
from deltatune.core.frozen_dtype import FrozenInDtype
from deltatune.train.frozen import applies, frozen_runner
from deltatune.train.loop import make_runner

BF16 = torch.bfloat16


def _mlp() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(64, 96), nn.GELU(), nn.Linear(96, 48), nn.LayerNorm(48), nn.Linear(48, 5))


def _frozen_but_head(model: nn.Module) -> nn.Module:
    for name, p in model.named_parameters():
        p.requires_grad_(name.startswith("4."))
    return model


def _run(model: nn.Module, x: torch.Tensor, frozen: FrozenInDtype | None):
    x = x.clone().requires_grad_()
    with torch.autocast("cpu", dtype=BF16):
        if frozen is None:
            out = model(x)
        else:
            with frozen(model) as n:
                assert n == 4  # two frozen linears, weight and bias each
                out = model(x)
    out.float().square().sum().backward()
    return out, x.grad, [p.grad.clone() for p in model.parameters() if p.requires_grad]


def test_plain_linears_bit_identical_and_base_restored():
    model = _frozen_but_head(_mlp())
    before = {n: (p, p.detach().clone()) for n, p in model.named_parameters()}
    x = torch.randn(8, 64)
    ref = _run(model, x, None)
    for p in model.parameters():
        p.grad = None
    frozen = FrozenInDtype(BF16)
    got = _run(model, x, frozen)
    assert torch.equal(got[0], ref[0]) and torch.equal(got[1], ref[1])
    assert all(torch.equal(a, b) for a, b in zip(got[2], ref[2]))
    for name, p in model.named_parameters():  # the same float32 Parameter objects, bit for bit
        assert p is before[name][0] and p.dtype == torch.float32 and torch.equal(p, before[name][1])
    assert frozen.copies_bytes() == 2 * (64 * 96 + 96 + 96 * 48 + 48)


def test_copies_made_once_and_remade_after_an_in_place_change():
    model = _frozen_but_head(_mlp())
    frozen = FrozenInDtype(BF16)
    with frozen(model):
        first = model[0].weight
        assert first.dtype == BF16 and not first.requires_grad
    with frozen(model):
        assert model[0].weight is first  # reused, not cast again
        with frozen(model) as inner:      # re-entrant: the inner block swaps nothing
            assert inner == 0 and model[0].weight is first
    with torch.no_grad():
        model[0].weight.add_(1.0)         # e.g. a merge: the copy must follow
    with frozen(model):
        assert model[0].weight is not first
        assert torch.equal(model[0].weight, (model[0]._parameters["weight"]).to(BF16))
    assert model[0].weight.dtype == torch.float32


def test_trainable_and_hooked_layers_are_left_alone():
    model = _mlp()  # everything trains: nothing is swapped
    with FrozenInDtype(BF16)(model) as n:
        assert n == 0
    model = _frozen_but_head(_mlp())
    model[2].register_forward_hook(lambda *a: None)
    with FrozenInDtype(BF16)(model) as n:
        assert n == 2 and model[2].weight.dtype == torch.float32


def test_base_restored_after_an_exception():
    model = _frozen_but_head(_mlp())
    w = model[0].weight
    with pytest.raises(RuntimeError):
        with FrozenInDtype(BF16)(model):
            raise RuntimeError("boom")
    assert model[0].weight is w


# The fused LoRA/DoRA/(IA)³ kernels under bf16 autocast, with and without the frozen weights held in
# bf16 here, against the float64 formula: tests/gpu/test_kernels_cuda.py (every device, CPU included).


def test_frozen_runner_in_training_setup():
    model = _frozen_but_head(_mlp())

    class Wrapped(nn.Module):  # the runner calls model(**batch)
        def __init__(self) -> None:
            super().__init__()
            self.net = model

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return self.net(x)

    wrapped = Wrapped()
    plain = make_runner(torch.device("cpu"), "bf16")
    fast = frozen_runner(plain)
    batch = {"x": torch.randn(4, 64)}
    assert torch.equal(fast(wrapped, batch), plain(wrapped, batch))
    assert model[0].weight.dtype == torch.float32  # restored when the runner returns
    assert fast.frozen.copies_bytes() > 0

    class Config:
        frozen_dtype = "bfloat16"
        gradient_checkpointing = False

    c = Config()
    assert applies(c, "bf16", distributed=False)
    assert not applies(c, "fp32", distributed=False)
    assert not applies(c, "bf16", distributed=True)
    c.gradient_checkpointing = True
    assert not applies(c, "bf16", distributed=False)
    c.gradient_checkpointing, c.frozen_dtype = False, "float32"
    assert not applies(c, "bf16", distributed=False)


def test_chunked_loss_under_bf16_with_bf16_frozen_weights_never_makes_full_float32_logits():
    """``loss_chunk`` + bf16 precision + ``frozen_dtype: bfloat16``: the loss and the adapter's gradients
    within bf16 tolerance of the float32 run, and no float32 tensor as large as the (B, T, V) logits."""
    pytest.importorskip("transformers")
    from torch.utils._python_dispatch import TorchDispatchMode
    from transformers import LlamaConfig, LlamaForCausalLM

    from deltatune.train.memory import chunked_runner

    torch.manual_seed(0)
    vocab, B, T = 512, 4, 32  # (B, T, V) logits: 65,536 numbers; the (V, d) head weight: 16,384
    model = LlamaForCausalLM(LlamaConfig(vocab_size=vocab, hidden_size=32, intermediate_size=48, num_hidden_layers=2,
                                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64))
    dt.attach(model, dt.METHODS["lora"](target=("q_proj", "v_proj", "down_proj"), rank=4))
    with torch.no_grad():
        for p in model.parameters():
            if p.requires_grad:
                p.normal_(0, 0.05)
    ids = torch.randint(1, vocab, (B, T), generator=torch.Generator().manual_seed(3))
    batch = {"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": ids}
    trainable = [p for p in model.parameters() if p.requires_grad]

    def loss_and_grads(run):
        for p in trainable:
            p.grad = None
        loss = run(model, batch).loss
        loss.backward()
        return loss.detach().float(), [p.grad.clone() for p in trainable]

    ref_loss, ref_grads = loss_and_grads(make_runner(torch.device("cpu"), "fp32"))

    class Largest(TorchDispatchMode):
        biggest = 0

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            out = func(*args, **(kwargs or {}))
            for t in out if isinstance(out, (tuple, list)) else (out,):
                if isinstance(t, torch.Tensor) and t.dtype == torch.float32:
                    Largest.biggest = max(Largest.biggest, t.numel())
            return out

    run = chunked_runner(frozen_runner(make_runner(torch.device("cpu"), "bf16")), 8)
    with Largest():
        loss, grads = loss_and_grads(run)
    assert Largest.biggest < B * T * vocab // 2  # chunks of 8 targets: (8, V) float32 logits at most
    assert abs(loss.item() - ref_loss.item()) <= 2e-2 * abs(ref_loss.item())
    for g, r in zip(grads, ref_grads):
        assert (g - r).abs().max() <= 5e-2 * r.abs().max() + 1e-6
    assert all(p.dtype == torch.float32 for p in model.parameters())


def test_copies_first_made_under_inference_mode_still_train():
    model = _frozen_but_head(_mlp())
    frozen = FrozenInDtype(BF16)
    x = torch.randn(4, 64)
    with torch.inference_mode(), torch.autocast("cpu", dtype=BF16), frozen(model):
        model(x)  # an evaluation before the first step makes the copies
    with torch.autocast("cpu", dtype=BF16), frozen(model):
        out = model(x.requires_grad_())
    out.float().sum().backward()  # the copies can be saved for backward
    assert x.grad is not None and model[4].weight.grad is not None
