"""LoRA on an NF4 base (and an int8 one, training on CPU) runs in the fused kernel
(methods/lora_kernels.py) with the weight dequantized inside it, in forward and again in backward: equal to the float64 formula on the dequantized weight,
equal to the unfused path (calling the quantized layer), and no dequantized weight kept for backward.
"""

from __future__ import annotations

import warnings

import pytest
import torch
from torch import nn

import deltatune as dt
from deltatune.core.layers import base_weight, dequantized_weight_fn

pytest.importorskip("bitsandbytes")
warnings.filterwarnings("ignore", message="MatMul8bitLt")


def _adapted(backend: str = "bitsandbytes", dropout: float = 0.0, bias: bool = True,
             compute: torch.dtype = torch.float32) -> nn.Module:
    """LoRA on one quantized layer: ``backend`` bitsandbytes / torchao (NF4) or int8 (bitsandbytes)."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(128, 192, bias=bias))  # whole 64-value blocks (see README's bnb note)
    if backend == "int8":
        dt.quantize(model, "int8")
    else:
        dt.quantize(model, "nf4", backend=backend, compute_dtype=compute)
    dt.attach(model, dt.LoraConfig(target=["0"], rank=4, alpha=8, dropout=dropout))
    with torch.no_grad():
        for p in model.parameters():
            if p.requires_grad:
                p.normal_(0, 0.2)
    return model


def _formula(model: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """``x Wᵀ + b + s · (x Aᵀ) Bᵀ`` in float64 with W the dequantized NF4 weight."""
    layer = model[0]
    lora = layer.adapters["default"]
    W = base_weight(layer.base).double()
    b = layer.base.bias
    y = x.double() @ W.t() + lora.scaling * (x.double() @ lora.A.double().t()) @ lora.B.double().t()
    return y if b is None else y + b.double()


@pytest.mark.parametrize("backend", ["bitsandbytes", "torchao", "int8"])
@pytest.mark.parametrize("rows", [3, 2048])  # low-rank update / merged product (merge_pays)
def test_fused_nf4_lora_equals_the_float64_formula(backend, rows):
    model = _adapted(backend, bias=backend != "torchao")
    model.train()
    x = torch.randn(rows, 128, requires_grad=True)
    y = model(x)
    assert type(y.grad_fn).__name__ == "_LoraLinearBackward"  # the fused path, not base(x) + branch
    x64 = x.detach().double().requires_grad_(True)
    lora = model[0].adapters["default"]
    A64, B64 = (t.detach().double().requires_grad_(True) for t in (lora.A, lora.B))
    W = base_weight(model[0].base).double()
    b = model[0].base.bias
    ref = x64 @ W.t() + lora.scaling * (x64 @ A64.t()) @ B64.t() + (0 if b is None else b.double())
    torch.testing.assert_close(y.double(), ref, rtol=1e-5, atol=1e-5)
    g = torch.randn_like(ref)
    y.backward(g.float())
    ref.backward(g)
    for got, want in [(x.grad, x64.grad), (lora.A.grad, A64.grad), (lora.B.grad, B64.grad)]:
        # float32 sums over up to 2,048 rows: error relative to the gradient's scale
        assert (got.double() - want).abs().max() <= 1e-5 * want.abs().max()


@pytest.mark.parametrize("backend", ["bitsandbytes", "int8"])
def test_fused_lora_equals_the_unfused_path_and_keeps_no_dequantized_weight(backend):
    model = _adapted(backend)
    model.train()
    layer, lora = model[0], model[0].adapters["default"]
    x = torch.randn(2, 512, 128, requires_grad=True)
    shapes = []
    with torch.autograd.graph.saved_tensors_hooks(lambda t: shapes.append(tuple(t.shape)) or t, lambda t: t):
        y = model(x)
    assert (192, 128) not in shapes and (128, 192) not in shapes  # dequantized again in backward
    y.pow(2).mean().backward()
    grads = [t.grad.clone() for t in (x, lora.A, lora.B)]
    for t in (x, lora.A, lora.B):
        t.grad = None
    # before: the quantized layer called by itself (bitsandbytes' matmul_4bit), the branch added
    unfused = layer.base(x) + lora.scaling * (x @ lora.A.t()) @ lora.B.t()
    torch.testing.assert_close(y, unfused, rtol=1e-5, atol=1e-5)
    unfused.pow(2).mean().backward()
    for got, t in zip(grads, (x, lora.A, lora.B)):
        torch.testing.assert_close(got, t.grad, rtol=1e-4, atol=1e-6)


def test_fused_nf4_lora_with_dropout_and_in_eval():
    model = _adapted(dropout=0.5)
    x = torch.randn(64, 128, requires_grad=True)
    torch.manual_seed(3)
    y = model(x)
    y.sum().backward()
    assert torch.isfinite(x.grad).all() and model[0].adapters["default"].A.grad.abs().sum() > 0
    model.eval()
    with torch.no_grad():
        torch.testing.assert_close(model(x).double(), _formula(model, x), rtol=1e-5, atol=1e-5)


def test_identity_at_init_and_base_untouched_by_the_fused_path():
    torch.manual_seed(0)
    model = dt.quantize(nn.Sequential(nn.Linear(128, 192)), "nf4")
    x = torch.randn(1024, 128)
    before = model(x)
    layer = model[0]
    state = {k: v.clone() for k, v in layer.state_dict().items()}
    dt.attach(model, dt.LoraConfig(target=["0"], rank=4))
    model.train()
    out = model(x.requires_grad_(True))
    assert type(out.grad_fn).__name__ == "_LoraLinearBackward"
    torch.testing.assert_close(out, before, rtol=1e-6, atol=1e-6)  # B = 0: W + s·B A = W exactly
    out.sum().backward()
    assert all(torch.equal(v, state[k]) for k, v in layer.state_dict().items())


def test_the_layer_is_called_where_the_kernel_would_compute_differently():
    model = _adapted()
    base = model[0].base
    x = torch.randn(4, 128)
    assert dequantized_weight_fn(base, x) is not None
    assert dequantized_weight_fn(base, x.double()) is None        # it computes in float32, not x's dtype
    with torch.autocast("cpu", dtype=torch.bfloat16):
        assert dequantized_weight_fn(base, x) is None             # autocast: its own rules
    base.register_forward_hook(lambda *a: None)
    assert dequantized_weight_fn(base, x) is None                 # hooks run: the layer is called
    int8 = dt.quantize(nn.Sequential(nn.Linear(128, 64)), "int8")[0].eval()
    assert dequantized_weight_fn(int8, x) is None                 # int8 in eval: float16 products
    assert dequantized_weight_fn(int8.train(), x) is not None     # training on CPU: dequantize + F.linear
    assert dequantized_weight_fn(nn.Linear(128, 64), x) is None   # not quantized


def test_fused_nf4_lora_in_bfloat16():
    """QLoRA practice (bf16 compute, bf16 activations): the kernel runs in bf16, the factors stay fp32."""
    model = _adapted(compute=torch.bfloat16)
    layer, lora = model[0], model[0].adapters["default"]
    x = torch.randn(256, 128, dtype=torch.bfloat16, requires_grad=True)
    y = model(x)
    assert y.dtype == torch.bfloat16 and type(y.grad_fn).__name__ == "_LoraLinearBackward"
    y.float().pow(2).mean().backward()
    assert lora.A.grad.dtype == torch.float32 and torch.isfinite(lora.A.grad).all()
    with torch.no_grad():
        ref = _formula(model, x.float())
    assert ((y.double() - ref).abs().max() / ref.abs().max()).item() < 2e-2  # bf16 rounding
