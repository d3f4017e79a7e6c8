"""``python -m bench.lora_layers``: the four forms it times compute the same layer, and it reports them all."""

from __future__ import annotations

import json

import torch

from bench import lora_layers


def test_every_form_is_the_lora_layer_within_bf16_tolerance_of_float64():
    g = torch.Generator().manual_seed(1)
    W, b = torch.randn(24, 40, generator=g), torch.randn(24, generator=g)
    A0, B0 = torch.randn(8, 40, generator=g) / 6, torch.randn(24, 8, generator=g) / 3
    x0, grad = torch.randn(3, 70, 40, generator=g), torch.randn(3, 70, 24, generator=g)
    # float64 reference: output, and the gradients of x, A and B
    x64, A64, B64 = (t.double().requires_grad_() for t in (x0, A0, B0))
    y64 = x64 @ W.double().t() + b.double() + lora_layers.SCALING * (x64 @ A64.t()) @ B64.t()
    y64.backward(grad.double())
    for name, form in lora_layers.FORMS.items():
        x, A, B = (t.clone().requires_grad_() for t in (x0, A0, B0))
        with torch.autocast("cpu", dtype=torch.bfloat16):
            y = form(x, W, b, A, B)
        y.backward(grad.to(y.dtype))
        y_ref = y64 if name != "floor" else (x64 @ W.double().t() + b.double())
        assert (y.double() - y_ref).abs().max() <= 0.03 * y_ref.abs().max(), name
        assert (x.grad.double() - (x64.grad if name != "floor" else grad.double() @ W.double())).abs().max() \
            <= 0.03 * x64.grad.abs().max(), name
        if name != "floor":  # the floor trains nothing
            for got, want in ((A.grad, A64.grad), (B.grad, B64.grad)):
                assert got.dtype == torch.float32
                assert (got.double() - want).abs().max() <= 0.03 * want.abs().max(), name


def test_bench_times_every_form_at_every_shape(tmp_path, monkeypatch, capsys):
    monkeypatch.setattr(lora_layers, "SHAPES", [("tiny f32", 64, 16, 24, torch.float32),
                                                ("tiny bf16", 64, 24, 16, torch.bfloat16)])
    out = tmp_path / "layers.json"
    lora_layers.main(["--reps", "1", "--out", str(out)])
    saved = json.loads(out.read_text())
    assert set(saved["shapes"]) == {"tiny f32", "tiny bf16"}
    for r in saved["shapes"].values():
        assert set(lora_layers.FORMS) <= set(r)
        assert all(r[k]["forward_ms"] > 0 and r[k]["backward_ms"] > 0 for k in lora_layers.FORMS)
    assert "wrote" in capsys.readouterr().out
