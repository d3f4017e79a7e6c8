"""The fused LoRA, DoRA and (IA)³ kernels on every device, in float32 and under bf16 autocast.

Run on the CPU always and on CUDA where there is a GPU (the ``device`` fixture), with the same
assertions: each adapted layer's output, input gradient and every trainable gradient within
float32 (1e-4) or bf16 (3 %) tolerance of a float64 formula written out here and computed on the
CPU; under autocast also with the frozen weights held in bf16 (``FrozenInDtype``, as ``frozen_dtype:
bfloat16`` does); the fused kernel checked to have run (not the formula fallback); gradients in
their parameter's dtype and on its device; the frozen base bit-identical afterwards. And one whole
transformers model trained a step with LoRA on the device, its base bit-identical after the step.
"""

from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import deltatune as dt
from deltatune.core.frozen_dtype import FrozenInDtype
from deltatune.methods.lora_kernels import dropout_mask, lora_linear

MODES = ["fp32", "bf16", "bf16+frozen16"]
TOL = {"fp32": 1e-4, "bf16": 3e-2, "bf16+frozen16": 3e-2}
KERNEL = {"lora": "_LoraLinearBackward", "dora": "_DoraLinearBackward", "ia3": "_IA3LinearBackward"}


@pytest.fixture(autouse=True)
def ieee_float32():
    """float32 products in IEEE float32 (not TF32) while a test runs, whatever the process set."""
    previous = torch.get_float32_matmul_precision()
    torch.set_float32_matmul_precision("highest")
    yield
    torch.set_float32_matmul_precision(previous)


def _close(got: torch.Tensor, want: torch.Tensor, tol: float, what: str) -> None:
    """Max error within ``tol`` of the reference's largest magnitude (want is float64, on the CPU)."""
    assert torch.isfinite(got).all(), f"{what}: not finite"
    err = (got.detach().double().cpu() - want).abs().max().item()
    scale = want.abs().max().item()
    assert err <= tol * scale, f"{what}: max error {err:.3g} vs largest value {scale:.3g} (tolerance {tol:g})"


def _grad_fns(out: torch.Tensor) -> set[str]:
    names, stack, seen = set(), [out.grad_fn], 0
    while stack and seen < 100:
        fn = stack.pop()
        seen += 1
        if fn is not None:
            names.add(type(fn).__name__)
            stack.extend(f for f, _ in fn.next_functions)
    return names


# --- one adapted two-layer block, against the float64 formula ----------------------------------------


def _block(method: str, device: torch.device) -> nn.Module:
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
    return model.to(device)


def _formula64(model: nn.Module, method: str, x: torch.Tensor) -> torch.Tensor:
    """The block in float64 from the adapted layers' tensors, each method's equation written out."""
    layers = [m for m in model.modules() if isinstance(m, dt.AdaptedLayer)]
    assert len(layers) == 2

    def layer(i: int, h: torch.Tensor) -> torch.Tensor:
        a = layers[i]
        W, b = a.base.weight, a.base.bias                       # (d_out, d_in), (d_out,)
        ad = next(iter(a.adapters.values()))
        if method == "lora":
            return h @ W.t() + b + ad.scaling * (h @ ad.A.t()) @ ad.B.t()
        if method == "dora":
            V = W + ad.lora.scaling * ad.lora.B @ ad.lora.A     # W + s·B A
            c = ad.magnitude / V.detach().norm(dim=1)           # m / ‖V‖ per output, the norm a constant
            return c * (h @ V.t()) + b
        l = ad.scale
        return (h * l) @ W.t() + b if i == 1 else l * (h @ W.t() + b)   # layer 2 scales its input

    return layer(1, F.gelu(layer(0, x)))


def _run(model: nn.Module, x: torch.Tensor, mode: str, device: torch.device) -> torch.Tensor:
    frozen = FrozenInDtype(torch.bfloat16) if mode == "bf16+frozen16" else None
    with torch.autocast(device.type, dtype=torch.bfloat16, enabled=mode != "fp32"):
        if frozen is None:
            return model(x)
        with frozen(model) as swapped:
            assert swapped == 4  # both frozen linears' weight and bias
            out = model(x)
            assert model[0].base.weight.dtype == torch.bfloat16
        return out


@pytest.mark.parametrize("rows", [8, 300], ids=["low-rank-update", "merged-weight"])
@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("method", ["lora", "dora", "ia3"])
def test_fused_kernels_match_float64(device, method: str, mode: str, rows: int):
    model = _block(method, device)
    x = torch.randn(rows, 64, generator=torch.Generator().manual_seed(3))
    ref_model = copy.deepcopy(model).cpu().double()
    x64 = x.double().requires_grad_()
    ref = _formula64(ref_model, method, x64)
    ref.square().sum().backward()

    trainable = [p for p in model.parameters() if p.requires_grad]
    frozen_before = {n: p.detach().clone() for n, p in model.named_parameters() if not p.requires_grad}
    xd = x.to(device).requires_grad_()
    out = _run(model, xd, mode, device)
    assert KERNEL[method] in _grad_fns(out), f"{method} did not take its fused kernel: {_grad_fns(out)}"
    assert out.device.type == device.type and out.dtype == (torch.float32 if mode == "fp32" else torch.bfloat16)
    out.float().square().sum().backward()

    tol = TOL[mode]
    _close(out, ref, tol, f"{method} {mode} output")
    _close(xd.grad, x64.grad, tol, f"{method} {mode} input gradient")
    for p, q in zip(trainable, [p for p in ref_model.parameters() if p.requires_grad]):
        assert p.grad is not None and p.grad.dtype == p.dtype and p.grad.device == p.device
        _close(p.grad, q.grad, tol, f"{method} {mode} gradient of {tuple(p.shape)}")
    for n, p in model.named_parameters():  # the frozen base: the same float32 numbers, on the device
        if not p.requires_grad:
            assert p.dtype == torch.float32 and p.device.type == device.type
            assert torch.equal(p, frozen_before[n]), n


# --- the LoRA kernel called directly: dropout mask, bf16 weight, a weight given as a function ---------


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("rows", [8, 300], ids=["low-rank-update", "merged-weight"])
def test_lora_kernel_with_dropout_mask_and_weight_function(device, mode: str, rows: int):
    g = torch.Generator().manual_seed(4)
    rand = lambda *shape: torch.randn(*shape, generator=g)  # noqa: E731
    x, W, b, A, B = rand(rows, 48), rand(40, 48) * 0.2, rand(40), rand(6, 48) * 0.2, rand(40, 6) * 0.2
    s, p = 1.5, 0.25
    for with_mask in (False, True):
        leaves64 = [t.detach().double().requires_grad_() for t in (x, b, A, B)]
        x64, b64, A64, B64 = leaves64
        mask = dropout_mask(x.to(device), p) if with_mask else None
        m64 = None if mask is None else mask.cpu().double()
        xd64 = x64 if m64 is None else x64 * m64 / (1 - p)
        ref = x64 @ W.double().t() + b64 + s * (xd64 @ A64.t()) @ B64.t()
        ref.square().sum().backward()

        leaves = [t.detach().to(device).requires_grad_() for t in (x, b, A, B)]
        xd, bd, Ad, Bd = leaves
        weight = W.to(device, torch.bfloat16 if mode == "bf16+frozen16" else torch.float32)
        for as_function in (False, True):
            for t in leaves:
                t.grad = None
            # a function returns a fresh weight in the compute dtype each call (a dequantized base)
            low = torch.bfloat16 if mode != "fp32" else torch.float32
            w = (lambda: weight.to(low, copy=True)) if as_function else weight
            with torch.autocast(device.type, dtype=torch.bfloat16, enabled=mode != "fp32"):
                out = lora_linear(xd, w, bd, Ad, Bd, s, mask, 1 - p)
            assert "_LoraLinearBackward" in _grad_fns(out)
            out.float().square().sum().backward()
            what = f"lora {mode} mask={with_mask} function={as_function}"
            _close(out, ref, TOL[mode], f"{what} output")
            for got, want, name in zip(leaves, leaves64, ("x", "bias", "A", "B")):
                assert got.grad.dtype == torch.float32 and got.grad.device.type == device.type
                _close(got.grad, want.grad, TOL[mode], f"{what} gradient of {name}")


# --- a whole model's LoRA training step on the device --------------------------------------------------


def _tiny_bert() -> nn.Module:
    from transformers import BertConfig, BertForSequenceClassification

    torch.manual_seed(0)
    cfg = BertConfig(vocab_size=100, hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
                     intermediate_size=37, max_position_embeddings=64, num_labels=3)  # dropout 0.1 on
    return BertForSequenceClassification(cfg)


@pytest.mark.parametrize("mode", MODES)
def test_lora_training_step_keeps_the_base_bit_identical(device, mode: str):
    pytest.importorskip("transformers")
    model = _tiny_bert()
    dt.attach(model, dt.METHODS["lora"](target=("query", "key", "value", "dense"), rank=4, dropout=0.1,
                                        modules_to_save=("classifier",)))
    model.to(device).train()
    g = torch.Generator().manual_seed(5)
    batch = {"input_ids": torch.randint(1, 100, (4, 24), generator=g), "labels": torch.randint(0, 3, (4,), generator=g)}
    batch = {k: v.to(device) for k, v in batch.items()}
    base = {n: p.detach().clone() for n, p in model.named_parameters() if not p.requires_grad}
    trainable = {n: p for n, p in model.named_parameters() if p.requires_grad}
    before = {n: p.detach().clone() for n, p in trainable.items()}
    assert base and any(".A" in n or n.endswith("A") for n in trainable)
    opt = torch.optim.AdamW(trainable.values(), lr=1e-2)
    out = _run_model(model, batch, mode, device)
    assert "_LoraLinearBackward" in _grad_fns(out.loss)
    out.loss.backward()
    opt.step()
    assert torch.isfinite(out.loss)
    for n, p in model.named_parameters():
        assert p.device.type == device.type, n
        if n in base:
            assert p.dtype == torch.float32 and torch.equal(p, base[n]), f"frozen {n} changed"
    changed = [n for n, p in trainable.items() if not torch.equal(p, before[n])]
    assert len(changed) == len(trainable), sorted(set(trainable) - set(changed))


def _run_model(model: nn.Module, batch: dict[str, torch.Tensor], mode: str, device: torch.device):
    frozen = FrozenInDtype(torch.bfloat16) if mode == "bf16+frozen16" else None
    with torch.autocast(device.type, dtype=torch.bfloat16, enabled=mode != "fp32"):
        if frozen is None:
            return model(**batch)
        with frozen(model) as swapped:
            assert swapped > 0
            return model(**batch)
