"""core/saved.py: a kernel keeps its input's producer's inputs instead of the input itself, and
gets the input back bit for bit; and everywhere that trick is not safe, it keeps the input."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch.utils.checkpoint import checkpoint

import deltatune as dt
from bench.measure import tensor_peak
from deltatune.core import saved


def _producers():
    h = torch.randn(6, 40, requires_grad=True)
    g, u = torch.randn(6, 40, requires_grad=True), torch.randn(6, 40, requires_grad=True)
    return {
        "gelu": (F.gelu(h), [h]),
        "gelu-tanh": (F.gelu(h, approximate="tanh"), [h]),
        "silu": (F.silu(h), [h]),
        "gated": (F.silu(g) * u, [u]),                     # the product keeps silu(g) and u
        "scaled": (h * torch.rand(40, requires_grad=True), [h]),  # a broadcast vector
    }


@pytest.mark.parametrize("kind", list(_producers()))
def test_the_input_is_rebuilt_bit_for_bit_from_what_its_producer_keeps(kind):
    x, kept_by_producer = _producers()[kind]
    tensors, rebuild = saved.pack(x)
    assert rebuild is not None
    assert all(t.data_ptr() != x.data_ptr() for t in tensors)
    assert any(t.data_ptr() == k.data_ptr() for t in tensors for k in kept_by_producer)
    assert torch.equal(saved.unpack(tensors, rebuild), x)


def test_the_input_itself_is_kept_wherever_rebuilding_is_not_safe():
    h = torch.randn(6, 40, requires_grad=True)
    cases = {
        "leaf": h,
        "no gradient": F.gelu(h.detach()),
        "a view of the output": F.gelu(h)[:, :20],
        "modified in place": F.gelu(h).add_(1.0),
        "an op not listed": torch.tanh(h),
        "producer kept nothing": h * torch.randn(40),       # the constant factor needs no gradient
    }
    for name, x in cases.items():
        tensors, rebuild = saved.pack(x)
        assert rebuild is None and tensors[0] is x, name
    x = F.gelu(h)
    with torch.autograd.graph.saved_tensors_hooks(lambda t: t, lambda t: t):  # checkpointing, offloading
        tensors, rebuild = saved.pack(x)
    assert rebuild is None and tensors[0] is x


def _ffn(method: str) -> torch.nn.Module:
    """Four feed-forward blocks (64 -> 256 -> GELU -> 64), the method on each down-projection."""
    torch.manual_seed(0)
    blocks = [[torch.nn.Linear(64, 256), torch.nn.GELU(), torch.nn.Linear(256, 64)] for _ in range(4)]
    model = torch.nn.Sequential(*(m for block in blocks for m in block))
    down = [str(3 * i + 2) for i in range(4)]
    config = {"lora": dt.LoraConfig(target=down, rank=4), "dora": dt.DoraConfig(target=down, rank=4),
              "ia3": dt.IA3Config(target=down, feedforward=down)}[method]
    dt.attach(model, config)
    with torch.no_grad():
        for p in model.parameters():
            if p.requires_grad:
                p.add_(0.1 * torch.randn_like(p))
    return model


@pytest.mark.parametrize("method", ["lora", "dora", "ia3"])
def test_kernels_keep_less_and_train_to_the_same_bits(method, monkeypatch):
    """After a GELU, the LoRA, DoRA and (IA)³ kernels keep its input, not its (N, 4d) output: the
    training step's tensor peak (at the start of backward, with every block's tensors kept) falls
    by about one such tensor per block but the one rebuilt, and the gradients are bit-identical."""
    x = torch.randn(512, 64, requires_grad=True)

    def step(model):
        model(x).square().sum().backward()
        return [p.grad.clone() for p in model.parameters() if p.requires_grad] + [x.grad.clone()]

    def measured():
        model = _ffn(method)
        x.grad = None
        peak = tensor_peak(lambda: model(x).square().sum().backward(), steps=1)["peak"]
        x.grad = None
        return peak, step(model)

    peak, grads = measured()
    monkeypatch.setattr(saved, "PRODUCERS", {})             # keep x itself, as before
    peak_plain, grads_plain = measured()
    assert peak_plain - peak >= 2.9 * 512 * 256 * 4        # 4 blocks' GELU outputs, less 1 rebuilt
    assert all(torch.equal(a, b) for a, b in zip(grads, grads_plain))


def test_under_checkpointing_the_kernel_keeps_its_input_and_gradients_agree():
    model = _ffn("lora")
    x = torch.randn(32, 64, requires_grad=True)
    plain = torch.autograd.grad(model(x).sum(), [x, *[p for p in model.parameters() if p.requires_grad]])
    out = checkpoint(model, x, use_reentrant=False)
    again = torch.autograd.grad(out.sum(), [x, *[p for p in model.parameters() if p.requires_grad]])
    for a, b in zip(plain, again):
        torch.testing.assert_close(a, b, rtol=0, atol=0)
