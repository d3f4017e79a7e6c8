"""bf16 path: frozen linear weights in bf16 once (core/frozen_dtype.py) and the fused kernels under autocast.

The specification: a plain frozen ``nn.Linear`` computes bit for bit what autocast computed before;
the float32 base is back in place (same objects, same bits) outside the block; the fused LoRA, DoRA
and (IA)³ kernels under bf16 autocast (with and without the bf16 frozen weights) stay within bf16
tolerance of the float64 formula, outputs and every gradient.
"""

from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F
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


# --- fused kernels under bf16 autocast against the float64 formula ----------------------------------


def _attached(method: str) -> nn.Module:
    torch.manual_seed(1)
    model = nn.Sequential(nn.Linear(64, 96), nn.GELU(), nn.Linear(96, 48))
    if method == "ia3":
        config = dt.METHODS["ia3"](target=("0", "2"), feedforward=("2",))
    else:
        config = dt.METHODS[method](target=("0", "2"), rank=4, alpha=8.0)
    dt.attach(model, config)
    g = torch.Generator().manual_seed(2)
    with torch.no_grad():  # every trainable tensor away from its identity start
        for p in model.parameters():
            if p.requires_grad:
                p.add_(torch.randn(p.shape, generator=g) * 0.3)
    return model


def _formula64(model: nn.Module, method: str, x: torch.Tensor) -> nn.Module:
    """The float64 formula for the two adapted linears, written out (not the library's code)."""
    adapted = [m for m in model.modules() if isinstance(m, dt.AdaptedLayer)]
    assert len(adapted) == 2

    def layer(i: int, h: torch.Tensor) -> torch.Tensor:
        a = adapted[i]
        W, b = a.base.weight.double(), a.base.bias.double()
        ad = next(iter(a.adapters.values()))
        if method == "lora":
            A, B = ad.A.double(), ad.B.double()
            return h @ W.t() + b + ad.scaling * (h @ A.t()) @ B.t()
        if method == "dora":
            A, B = ad.lora.A.double(), ad.lora.B.double()
            V = W + ad.lora.scaling * B @ A
            c = ad.magnitude.double() / V.detach().norm(dim=1)
            return c * (h @ V.t()) + b
        l = ad.scale.double()
        return (h * l) @ W.t() + b if i == 1 else l * (h @ W.t() + b)

    return layer(1, F.gelu(layer(0, x)))


@pytest.mark.parametrize("frozen_bf16", [False, True])
@pytest.mark.parametrize("method", ["lora", "dora", "ia3"])
def test_kernels_under_bf16_autocast_match_float64(method: str, frozen_bf16: bool):
    model = _attached(method)
    x = torch.randn(300, 64)  # 300 rows: LoRA and DoRA take their merged-weight path
    trainable = [p for p in model.parameters() if p.requires_grad]
    ref_params = [p.detach().double().requires_grad_() for p in trainable]
    # float64 reference: the same tensors, in float64, through the written-out formula
    ref_model = copy.deepcopy(model).double()
    ref_trainable = [p for p in ref_model.parameters() if p.requires_grad]
    x64 = x.double().requires_grad_()
    ref = _formula64(ref_model, method, x64)
    ref.square().sum().backward()
    del ref_params

    xb = x.clone().requires_grad_()
    base_before = {n: p.detach().clone() for n, p in model.named_parameters() if not p.requires_grad}
    frozen = FrozenInDtype(BF16)
    with torch.autocast("cpu", dtype=BF16):
        if frozen_bf16:
            with frozen(model):
                out = model(xb)
        else:
            out = model(xb)
    names = set()
    fn, seen = out.grad_fn, 0
    stack = [out.grad_fn]
    while stack and seen < 50:  # the fused kernel ran (not the formula fallback)
        fn = stack.pop()
        seen += 1
        if fn is not None:
            names.add(type(fn).__name__)
            stack.extend(f for f, _ in fn.next_functions)
    kernel = {"lora": "_LoraLinearBackward", "dora": "_DoraLinearBackward", "ia3": "_IA3LinearBackward"}[method]
    assert kernel in names, names
    out.float().square().sum().backward()

    def close(got: torch.Tensor, want: torch.Tensor, what: str) -> None:
        err = (got.double() - want).abs().max().item()
        scale = want.abs().max().item()
        assert err <= 3e-2 * scale, f"{method} {what}: max error {err:.3g} vs max {scale:.3g}"

    close(out, ref, "output")
    close(xb.grad, x64.grad, "input gradient")
    for p, q in zip(trainable, ref_trainable):
        assert p.grad.dtype == p.dtype
        close(p.grad, q.grad, f"gradient of {tuple(p.shape)}")
    for n, p in model.named_parameters():  # the frozen base: float32 and unchanged
        if not p.requires_grad:
            assert p.dtype == torch.float32 and torch.equal(p, base_before[n])


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
