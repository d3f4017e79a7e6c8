"""The fused LoRA linear equals the plain formula, forward and gradients, on both of its paths."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from deltatune.core import products
from deltatune.methods import lora_kernels
from deltatune.methods.lora_kernels import dropout_mask, lora_linear, merge_pays

D_IN, D_OUT, R, S = 12, 10, 3, 1.7


def plain(x, weight, bias, A, B, s, mask=None, keep=1.0):
    xd = x if mask is None else x * mask / keep
    return F.linear(x, weight, bias) + s * F.linear(F.linear(xd, A), B)


def leaves(dtype, *, bias: bool, lead: tuple[int, ...], seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    rand = lambda *shape: torch.randn(*shape, generator=g, dtype=dtype)
    x = rand(*lead, D_IN).requires_grad_()
    weight = rand(D_OUT, D_IN)                       # frozen
    b = rand(D_OUT).requires_grad_() if bias else None
    A, B = rand(R, D_IN).requires_grad_(), rand(D_OUT, R).requires_grad_()
    return x, weight, b, A, B


def grads_of(fn, inputs, out_grad):
    out = fn()
    got = torch.autograd.grad(out, [t for t in inputs if t is not None], out_grad)
    return out, got


@pytest.fixture(params=["merged", "low-rank"])
def path(request, monkeypatch):
    """Force each of the two code paths, whatever the row count."""
    monkeypatch.setattr(lora_kernels, "merge_pays", lambda *a: request.param == "merged")
    return request.param


def check_against_plain(dtype, tol, bias, lead, mask=None, keep=1.0):
    x, weight, b, A, B = leaves(dtype, bias=bias, lead=lead)
    out_grad = torch.randn(*lead, D_OUT, dtype=dtype)
    inputs = (x, b, A, B)
    want, want_g = grads_of(lambda: plain(x, weight, b, A, B, S, mask, keep), inputs, out_grad)
    got, got_g = grads_of(lambda: lora_linear(x, weight, b, A, B, S, mask, keep), inputs, out_grad)
    assert got.shape == want.shape and got.dtype == dtype
    torch.testing.assert_close(got, want, rtol=tol, atol=tol)
    for g_got, g_want in zip(got_g, want_g):
        assert g_got.shape == g_want.shape and g_got.dtype == dtype
        torch.testing.assert_close(g_got, g_want, rtol=tol, atol=tol)


DTYPES = pytest.mark.parametrize("dtype,tol", [(torch.float64, 1e-12), (torch.float32, 2e-5)])
BIAS = pytest.mark.parametrize("bias", [False, True])
LEAD = pytest.mark.parametrize("lead", [(7,), (2, 5)], ids=["2d", "3d"])


@DTYPES
@BIAS
@LEAD
def test_matches_plain_formula(path, dtype, tol, bias, lead):
    check_against_plain(dtype, tol, bias, lead)


@DTYPES
@BIAS
@LEAD
def test_matches_plain_formula_with_dropout(dtype, tol, bias, lead):
    torch.manual_seed(3)
    mask = dropout_mask(torch.empty(*lead, D_IN), 0.3)
    assert not mask.all() and mask.any()
    check_against_plain(dtype, tol, bias, lead, mask, 0.7)


def test_gradcheck_float64(path):
    x, weight, b, A, B = leaves(torch.float64, bias=True, lead=(2, 4))
    assert torch.autograd.gradcheck(lambda x, b, A, B: lora_linear(x, weight, b, A, B, S), (x, b, A, B))


def test_gradcheck_with_dropout_mask():
    x, weight, b, A, B = leaves(torch.float64, bias=False, lead=(6,))
    mask = dropout_mask(x, 0.5)
    assert torch.autograd.gradcheck(lambda x, A, B: lora_linear(x, weight, None, A, B, S, mask, 0.5), (x, A, B))


def test_transposed_weight_like_gpt2_conv1d(path):
    """GPT-2's Conv1D stores W as (d_in, d_out); the kernel takes its transpose, a strided view."""
    x, weight, b, A, B = leaves(torch.float64, bias=True, lead=(3, 4))
    stored = weight.t().contiguous()                       # (d_in, d_out), as Conv1D keeps it
    want = torch.addmm(b, x.reshape(-1, D_IN), stored).view(3, 4, D_OUT) + S * F.linear(F.linear(x, A), B)
    got = lora_linear(x, stored.t(), b, A, B, S)
    torch.testing.assert_close(got, want)
    gw = torch.autograd.grad(want.square().sum(), (x, A, B))
    gg = torch.autograd.grad(got.square().sum(), (x, A, B))
    for a, c in zip(gg, gw):
        torch.testing.assert_close(a, c)


@pytest.mark.parametrize("need", ["x", "A", "B", "AB"])
def test_only_requested_gradients(path, need):
    """Layer 0 of a frozen model gets inputs without grad; A or B may be frozen too."""
    x, weight, _, A, B = leaves(torch.float64, bias=False, lead=(5,))
    x.requires_grad_("x" in need)
    A.requires_grad_("A" in need or need == "x")
    B.requires_grad_("B" in need)
    wanted = [t for t in (x, A, B) if t.requires_grad]
    gw = torch.autograd.grad(plain(x, weight, None, A, B, S).sum(), wanted)
    gg = torch.autograd.grad(lora_linear(x, weight, None, A, B, S).sum(), wanted)
    for a, c in zip(gg, gw):
        torch.testing.assert_close(a, c)


def test_no_grad_and_inference_mode_match(path):
    x, weight, b, A, B = leaves(torch.float32, bias=True, lead=(2, 3))
    want = plain(x, weight, b, A, B, S).detach()
    with torch.no_grad():
        torch.testing.assert_close(lora_linear(x, weight, b, A, B, S), want)
    with torch.inference_mode():
        torch.testing.assert_close(lora_linear(x, weight, b, A, B, S), want)


def test_backward_twice_with_retain_graph(path):
    """Nothing saved for backward is modified in place."""
    x, weight, b, A, B = leaves(torch.float64, bias=True, lead=(4,))
    out = lora_linear(x, weight, b, A, B, S).square().sum()
    first = torch.autograd.grad(out, (x, A, B), retain_graph=True)
    second = torch.autograd.grad(out, (x, A, B))
    for a, c in zip(first, second):
        torch.testing.assert_close(a, c)


def test_zero_B_gives_the_base_output_exactly():
    """At initialisation (B = 0) the fused output is bit-identical to the base layer."""
    x, weight, b, A, B = leaves(torch.float32, bias=True, lead=(64,))
    with torch.no_grad():
        B.zero_()
    for rows in (1, 64):
        torch.testing.assert_close(lora_linear(x[:rows], weight, b, A, B, S), F.linear(x[:rows], weight, b),
                                   rtol=0, atol=0)


def test_dropout_mask_keeps_the_right_share():
    x = torch.empty(200_000)
    assert abs(dropout_mask(x, 0.25).float().mean().item() - 0.75) < 0.01
    assert dropout_mask(x, 0.25).dtype == torch.bool


def test_merge_pays_for_long_batches_only():
    assert merge_pays(4096, 384, 384)        # a training batch: form W' once
    assert not merge_pays(1, 576, 1536)      # one token (generation): update the output instead


def test_only_x_is_saved_without_dropout(path):
    """Backward keeps x itself (no copy), the frozen weight and the factors; at most an (N, r) extra."""
    x, weight, b, A, B = leaves(torch.float32, bias=True, lead=(50,))
    saved: list[torch.Tensor] = []
    with torch.autograd.graph.saved_tensors_hooks(lambda t: saved.append(t) or t, lambda t: t):
        lora_linear(x, weight, b, A, B, S)
    big = [t for t in saved if t.numel() >= x.numel()]
    assert len(big) == 1 and big[0].data_ptr() == x.data_ptr()
    assert sum(t.numel() for t in saved if t.data_ptr() != x.data_ptr()) <= (
        weight.numel() + A.numel() + B.numel() + 50 * R)


def test_dropout_saves_a_boolean_mask_not_a_copy():
    x, weight, _, A, B = leaves(torch.float32, bias=False, lead=(50,))
    mask = dropout_mask(x, 0.1)
    saved: list[torch.Tensor] = []
    with torch.autograd.graph.saved_tensors_hooks(lambda t: saved.append(t) or t, lambda t: t):
        lora_linear(x, weight, None, A, B, S, mask, 0.9)
    floats = [t for t in saved if t.numel() >= x.numel() and t.is_floating_point()]
    assert len(floats) == 1 and floats[0].data_ptr() == x.data_ptr()
    assert any(t.dtype == torch.bool for t in saved)


@pytest.mark.parametrize("engine", ["auto", "aten", "thin", "onednn"])
def test_cpu_engines_agree_with_the_formula(path, engine, monkeypatch):
    """Both CPU engines give the plain formula's numbers (oneDNN forced on for small shapes)."""
    monkeypatch.setattr(products, "_ONEDNN_MIN_WORK", 0)
    with products.cpu_engine(engine):
        check_against_plain(torch.float32, 2e-5, True, (2, 5))
    assert products.current_engine() == "auto"  # the default comes back


def test_unknown_engine_is_rejected():
    with pytest.raises(ValueError, match="'auto', 'aten', 'thin' or 'onednn'"):
        products.set_cpu_engine("mkl")


@pytest.mark.parametrize("vendor, engine", [("AuthenticAMD", "onednn"), ("GenuineIntel", "aten"), ("", "aten")])
def test_auto_engine_is_onednn_on_amd_only(vendor, engine, monkeypatch):
    """``"auto"`` takes oneDNN where MKL is slow (AMD) and torch's products elsewhere, read once."""
    monkeypatch.setattr(products, "_AUTO", None)
    monkeypatch.setattr(products, "_cpu_vendor", lambda: vendor)
    assert products.auto_engine() == engine
    monkeypatch.setattr(products, "_cpu_vendor", lambda: "changed")
    assert products.auto_engine() == engine
    calls = []
    monkeypatch.setattr(products, "onednn_linear", lambda *a: calls.append(1) or F.linear(*a))
    x, weight = torch.randn(4096, 320), torch.randn(64, 320)   # above _ONEDNN_MIN_WORK
    with products.cpu_engine("auto"):
        products.linear(x, weight)
    assert len(calls) == (engine == "onednn")


def test_adapted_layer_uses_the_kernel_only_where_it_equals_calling_the_base(monkeypatch):
    """A plain frozen Linear runs fused; a Linear with a forward hook is called, so the hook runs."""
    import deltatune as dt

    calls = []
    real = lora_kernels._LoraLinear.apply
    monkeypatch.setattr(lora_kernels._LoraLinear, "apply", lambda *a: calls.append(1) or real(*a))
    model = torch.nn.Sequential(torch.nn.Linear(D_IN, D_OUT), torch.nn.Linear(D_OUT, D_OUT))
    dt.attach(model, dt.LoraConfig(target=["0", "1"], rank=R))
    with torch.no_grad():  # B starts at zero: make the adapters change the outputs
        for p in model.parameters():
            if p.requires_grad:
                p.add_(torch.randn_like(p))
    model[1].base.register_forward_hook(lambda module, args, out: out * 0)
    x = torch.randn(4, D_IN, requires_grad=True)
    out = model(x)
    assert len(calls) == 1                       # layer 0 fused; layer 1 called its base
    base_part = model[1].base(model[0](x)).detach()
    assert torch.equal(base_part, torch.zeros_like(base_part))
    lora = model[1].adapters["default"]
    want = lora.scaling * F.linear(F.linear(model[0](x), lora.A), lora.B)  # hook zeroed the base output
    torch.testing.assert_close(out, want)


@pytest.mark.parametrize("engine", ["thin", "onednn"])
def test_engines_at_a_size_that_takes_the_onednn_path(engine):
    """With B = 0 and a batch big enough for oneDNN: ``"thin"`` (rank-r products only) still gives
    exactly ``nn.Linear``'s output; ``"onednn"`` gives it to float32 rounding. Both give the
    formula's gradients."""
    assert products.current_engine() == "auto"
    x = torch.randn(4096, 320, requires_grad=True)          # products above _ONEDNN_MIN_WORK
    weight, A = torch.randn(64, 320), torch.randn(R, 320, requires_grad=True)
    B = torch.zeros(64, R, requires_grad=True)
    with products.cpu_engine(engine):
        out = lora_linear(x, weight, None, A, B, S)
        tolerance = {"rtol": 0, "atol": 0} if engine == "thin" else {"rtol": 1e-5, "atol": 1e-4}
        torch.testing.assert_close(out, F.linear(x, weight), **tolerance)
        g = torch.randn_like(out)
        got = torch.autograd.grad(out, (x, A, B), g)
    want = torch.autograd.grad(plain(x, weight, None, A, B, S), (x, A, B), g)
    for a, c in zip(got, want):
        torch.testing.assert_close(a, c, rtol=1e-4, atol=1e-3)
