"""A quantized frozen base on every device present (CPU always, CUDA where there is one).

Each backend quantizes on the device itself (``deltatune.quantize(..., device=...)``): torchao's NF4
tensor, bitsandbytes' NF4 and int8. On top, LoRA, DoRA and (IA)³ are checked against their formula in
float64 on the dequantized weight; one training step changes the adapter only (the quantized storage
and its scales bit-identical); a saved adapter loaded onto a freshly quantized base gives identical
outputs; a merged model re-quantized reports its rounding error as it is; LoftQ runs on the device;
and a missing library or device is one line naming the fix.

bitsandbytes 0.50's CPU kernels are exact only for rows that are a multiple of the 64-value block,
so the model here is 128 -> 256 -> 128. bitsandbytes' int8 layer also rounds the activations to int8
(LLM.int8's int8 product; on this CPU too, in eval), so its outputs follow the float64 formula to
about 1 % (0.3-0.9 % here), not to float32 rounding; the adapter's own contribution is checked to be
far larger than that tolerance.
"""

from __future__ import annotations

import sys
import warnings

import pytest
import torch
from torch import nn

import deltatune as dt
from deltatune.core.layers import base_weight, describe
from deltatune.integrations.quantize import requantize

pytest.importorskip("bitsandbytes")
pytest.importorskip("torchao")
warnings.filterwarnings("ignore", message="MatMul8bitLt")

#: (storage format, backend)
KINDS = [("nf4", "torchao"), ("nf4", "bitsandbytes"), ("int8", "bitsandbytes")]
METHODS = {"lora": lambda: dt.LoraConfig(target=["0", "2"], rank=4, alpha=8),
           "dora": lambda: dt.DoraConfig(target=["0", "2"], rank=4, alpha=8),
           "ia3": lambda: dt.IA3Config(target=["0", "2"], feedforward=["2"])}


def _model(fmt: str, backend: str, device: torch.device) -> nn.Sequential:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(128, 256), nn.ReLU(), nn.Linear(256, 128, bias=False))
    return dt.quantize(model, fmt, backend=backend, device=device).eval()


def _randomise(model: nn.Module, seed: int = 1) -> None:
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            if p.requires_grad:
                p.add_(0.2 * torch.randn(p.shape, generator=g, dtype=p.dtype).to(p.device))


def _frozen(model: nn.Module) -> dict[str, list[torch.Tensor]]:
    """Copies of every stored tensor outside the adapters (quantized codes, scales, biases), a tensor
    subclass (torchao's NF4Tensor) taken apart into the plain tensors it holds."""
    def parts(t: torch.Tensor) -> list[torch.Tensor]:
        if type(t) is not torch.Tensor and hasattr(t, "__tensor_flatten__"):
            return [x for n in t.__tensor_flatten__()[0] for x in parts(getattr(t, n))]
        return [t.detach().clone()]
    return {k: parts(v) for k, v in model.state_dict().items() if ".adapters." not in k and isinstance(v, torch.Tensor)}


def _formula(model: nn.Module, method: str, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """The adapted model's output in float64 from the dequantized weights, and the base's alone."""
    h = b = x.double()
    for i in (0, 2):
        layer = model[i]
        W = base_weight(layer.base).double()  # (d_out, d_in)
        bias = 0 if layer.base.bias is None else layer.base.bias.double()
        a = layer.adapters["default"]
        if method == "lora":
            y = h @ W.T + bias + a.scaling * (h @ a.A.double().T) @ a.B.double().T
        elif method == "dora":
            A, B, s = a.lora.A.double(), a.lora.B.double(), a.lora.scaling
            norm = (W + s * B @ A).norm(dim=1)  # (d_out,) one norm per output unit
            y = a.magnitude.double() / norm * (h @ W.T + s * (h @ A.T) @ B.T) + bias
        elif i == 0:  # (IA)³ on the output
            y = a.scale.double() * (h @ W.T + bias)
        else:         # (IA)³ on the input (feed-forward)
            y = (a.scale.double() * h) @ W.T + bias
        h = torch.relu(y) if i == 0 else y
        plain = b @ W.T + bias
        b = torch.relu(plain) if i == 0 else plain
    return h, b


def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a.double() - b.double()).norm() / b.double().norm()).item()


@pytest.mark.parametrize("method", list(METHODS))
@pytest.mark.parametrize("fmt,backend", KINDS)
def test_quantized_on_the_device_and_the_formula_holds(device, fmt, backend, method):
    model = _model(fmt, backend, device)
    for i in (0, 2):
        assert describe(model[i]).quantized == fmt  # quantized there, not left floating point
    # codes and scales on the device (bitsandbytes' state_dict adds small metadata tensors on the CPU:
    # its packed quant_state description and int8's weight_format flag)
    meta = ("quant_state.bitsandbytes__", "weight_format")
    stored = [t for k, ts in _frozen(model).items() if not any(m in k for m in meta) for t in ts]
    assert stored and all(t.device.type == device.type for t in stored)
    dt.attach(model, METHODS[method]())
    assert all(p.device.type == device.type for p in model.parameters() if p.requires_grad)
    _randomise(model)
    x = torch.randn(6, 128, generator=torch.Generator().manual_seed(2)).to(device)
    with torch.no_grad():
        y = model(x)
    expected, base_only = _formula(model, method, x)
    tol = 1e-5 if fmt == "nf4" else 3e-2  # int8: the activations are rounded to int8 too
    assert _rel(y, expected) < tol
    assert _rel(base_only, expected) > 5 * tol  # the adapter's part is far above the tolerance


@pytest.mark.parametrize("method", list(METHODS))
@pytest.mark.parametrize("fmt,backend", KINDS)
def test_a_step_trains_the_adapter_only_and_the_saved_adapter_reloads(device, fmt, backend, method, tmp_path):
    model = _model(fmt, backend, device)
    dt.attach(model, METHODS[method]())
    _randomise(model)
    frozen = _frozen(model)
    trained = {n: p.detach().clone() for n, p in model.named_parameters() if p.requires_grad}
    x = torch.randn(6, 128, generator=torch.Generator().manual_seed(3)).to(device)
    opt = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.1)
    model.train()
    model(x).pow(2).mean().backward()
    opt.step()
    after = _frozen(model)
    assert after.keys() == frozen.keys()
    assert all(torch.equal(a, b) for k in frozen for a, b in zip(after[k], frozen[k], strict=True))
    assert any(not torch.equal(p, trained[n]) for n, p in model.named_parameters() if p.requires_grad)
    model.eval()
    with torch.no_grad():
        expected = model(x)
    dt.save_adapter(model, tmp_path / "a")
    fresh = _model(fmt, backend, device)
    dt.load_adapter(fresh, tmp_path / "a")
    with torch.no_grad():
        torch.testing.assert_close(fresh(x), expected, rtol=0, atol=0)


@pytest.mark.parametrize("fmt,backend", KINDS)
def test_a_requantized_merge_reports_its_rounding_error(device, fmt, backend):
    model = _model(fmt, backend, device)
    dt.attach(model, METHODS["lora"]())
    _randomise(model)
    x = torch.randn(6, 128, generator=torch.Generator().manual_seed(4)).to(device)
    with torch.no_grad():
        adapted = model(x)
    merged = dt.merge_and_unload(dt.dequantize(model))  # full precision, the update folded in
    with torch.no_grad():
        assert _rel(merged(x), adapted) < (1e-5 if fmt == "nf4" else 2e-2)
    W = {i: merged[i].weight.detach().double().clone() for i in (0, 2)}
    report = requantize(merged, fmt, backend=backend, device=device)
    diffs = [(base_weight(merged[i]).double() - W[i]).abs() for i in (0, 2)]  # (d_out, d_in) each
    assert report["layers"] == 2 and describe(merged[0]).quantized == fmt
    assert report["max_abs_error"] == pytest.approx(max(d.max().item() for d in diffs), rel=1e-6)
    count = sum(d.numel() for d in diffs)
    assert report["mean_abs_error"] == pytest.approx(sum(d.sum().item() for d in diffs) / count, rel=1e-6)
    assert 0 < report["mean_abs_error"] < report["max_abs_error"]


def test_loftq_runs_on_the_device(device):
    from deltatune.integrations.loftq import loftq

    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(128, 256), nn.ReLU(), nn.Linear(256, 128, bias=False))
    report = loftq(model, dt.LoraConfig(target=["0", "2"], rank=8, alpha=8), "nf4", iterations=2, device=device)
    assert report.layers == 2 and report.after < report.before
    assert all(p.device.type == device.type for p in model.parameters())
    assert describe(model[2].base).quantized == "nf4"


@pytest.mark.parametrize("backend,module", [("bitsandbytes", "bitsandbytes"), ("torchao", "torchao")])
def test_a_missing_library_is_one_line_naming_what_to_install(device, backend, module, monkeypatch):
    monkeypatch.setitem(sys.modules, module, None)
    monkeypatch.setitem(sys.modules, module + ".quantization", None)
    with pytest.raises(ImportError, match=r"pip install 'deltatune\[quant\]'") as e:
        _model("nf4", backend, device)
    assert "\n" not in str(e.value)


def test_a_device_the_library_cannot_run_on_is_one_line(device, monkeypatch):
    import bitsandbytes.functional as F

    def refuse(*args, **kwargs):
        raise NotImplementedError(f"no quantize_4bit kernel for {device.type} in this build")
    monkeypatch.setattr(F, "quantize_4bit", refuse)
    with pytest.raises(RuntimeError, match=f"bitsandbytes cannot quantize to nf4 on {device.type}.*other backend") as e:
        _model("nf4", "bitsandbytes", device)
    assert "\n" not in str(e.value)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    with pytest.raises(RuntimeError, match="no CUDA device here.*device='cpu'") as e:
        _model("nf4", "torchao", torch.device("cuda"))
    assert "\n" not in str(e.value)
