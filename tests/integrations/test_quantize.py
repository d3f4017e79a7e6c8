"""A quantized frozen base (QLoRA-style): deltatune.quantize, methods on NF4 / int8 bases, save and
reload onto a freshly quantized base, merging, a transformers bitsandbytes model, missing libraries.

The conformance suite runs every applicable method on the ``bert-nf4`` zoo model; this file covers
int8, the torchao backend and what the conformance suite does not check.
"""

from __future__ import annotations

import sys
import warnings

import pytest
import torch

import deltatune as dt
from deltatune.core.layers import base_weight, describe, quantized_format
from deltatune.integrations.quantize import resident_bytes
from tests.models import ZOO

pytest.importorskip("bitsandbytes")

warnings.filterwarnings("ignore", message="MatMul8bitLt")

# The methods the issue names, each with its default config: all must train on a quantized base
# (BitFit too, on bert-nf4 in the conformance suite: the tiny Llama has no biases).
METHODS = ["lora", "dora", "ia3", "loha", "lokr", "vera", "oft", "bottleneck"]
LLAMA = ZOO["llama"]


def _llama(fmt: str, backend: str = "bitsandbytes") -> torch.nn.Module:
    return dt.quantize(LLAMA.build(), fmt, backend=backend)


def _randomise(model: torch.nn.Module, seed: int = 1) -> None:
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for n, p in model.named_parameters():
            if p.requires_grad:
                p.add_(0.1 * torch.randn(p.shape, generator=g, dtype=p.dtype))


@pytest.mark.parametrize("fmt", ["nf4", "int8"])
def test_quantize_replaces_the_linear_layers_and_keeps_the_head(fmt):
    fp = LLAMA.build()
    model = _llama(fmt)
    spec = describe(model.model.layers[0].self_attn.q_proj)
    assert spec is not None and spec.kind == "linear" and spec.quantized == fmt and (spec.d_in, spec.d_out) == (32, 32)
    assert describe(model.lm_head).quantized is None  # the output head stays in full precision
    assert resident_bytes(model) < resident_bytes(fp)
    assert torch.isfinite(LLAMA.run(model)).all()
    # The dequantized weight is the rounding of the original one. On a 256-wide layer: bitsandbytes
    # 0.50's AVX-512 CPU dequantization is off for rows narrower than (or not a multiple of) the
    # 64-value block, such as the tiny Llama's 32 (see README).
    torch.manual_seed(0)
    linear = torch.nn.Linear(256, 128)
    W = linear.weight.detach().clone()
    Wq = base_weight(dt.quantize(torch.nn.Sequential(linear), fmt)[0])
    assert Wq.shape == W.shape
    relative = ((Wq - W).norm() / W.norm()).item()  # NF4: ~0.09 (16 levels); int8: ~0.005
    assert relative < (0.15 if fmt == "nf4" else 0.01), relative


@pytest.mark.parametrize("fmt", ["nf4", "int8"])
@pytest.mark.parametrize("method", METHODS)
def test_every_method_trains_on_a_quantized_base_and_reloads(method, fmt, tmp_path):
    model = _llama(fmt)
    dt.attach(model, dt.METHODS[method]())
    _randomise(model)
    model.train()
    base = {k: v.clone() for k, v in model.state_dict().items() if ".adapters." not in k}
    opt = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.1)
    LLAMA.run(model).pow(2).mean().backward()
    opt.step()
    assert all(torch.equal(v, base[k]) for k, v in model.state_dict().items() if ".adapters." not in k)
    model.eval()
    expected = LLAMA.run(model)
    dt.save_adapter(model, tmp_path / "a")
    fresh = _llama(fmt)
    dt.load_adapter(fresh, tmp_path / "a")
    torch.testing.assert_close(LLAMA.run(fresh), expected, rtol=0, atol=0)


def test_dora_on_nf4_reads_the_dequantized_weight():
    """DoRA's column norm uses the dequantized base weight: the same as DoRA on that weight in fp32."""
    q = _llama("nf4")
    fp = dt.dequantize(_llama("nf4"))
    for m in (q, fp):
        torch.manual_seed(0)
        dt.attach(m, dt.DoraConfig(target=["q_proj", "v_proj"]))
        _randomise(m)
    torch.testing.assert_close(LLAMA.run(q), LLAMA.run(fp), rtol=0, atol=1e-4)


def test_merge_refuses_a_quantized_base_and_works_after_dequantize():
    model = _llama("nf4")
    dt.attach(model, dt.LoraConfig(target=["q_proj", "v_proj"]))
    _randomise(model)
    expected = LLAMA.run(model)
    with pytest.raises(ValueError, match=r"quantized \(nf4\) base.*dequantize"):
        dt.merge(model)
    plain = dt.merge_and_unload(dt.dequantize(model))
    assert quantized_format(plain.model.layers[0].self_attn.q_proj) is None
    torch.testing.assert_close(LLAMA.run(plain), expected, rtol=0, atol=1e-4)


@pytest.mark.parametrize("compute", ["float32", "bfloat16"])
def test_rest_dtype_stores_the_unquantized_parameters_in_bf16(compute, tmp_path):
    """rest_dtype (QLoRA practice: load_in_4bit with torch_dtype=bfloat16): embeddings, norms and head
    in bf16, outputs close to the fp32-rest model, the base bit-identical after training, save ->
    load onto a freshly quantized base exact."""
    def build():
        return dt.quantize(LLAMA.build(), "nf4", compute_dtype=compute, rest_dtype=torch.bfloat16)

    plain = dt.quantize(LLAMA.build(), "nf4", compute_dtype=compute)
    model = build()
    assert model.model.embed_tokens.weight.dtype == torch.bfloat16 and model.lm_head.weight.dtype == torch.bfloat16
    assert model.model.norm.weight.dtype == torch.bfloat16
    assert describe(model.model.layers[0].self_attn.q_proj).quantized == "nf4"
    assert resident_bytes(model) < resident_bytes(plain)
    # the same NF4 codes; only the rest is rounded to bf16 (8 mantissa bits): outputs close
    torch.testing.assert_close(LLAMA.run(model).float(), LLAMA.run(plain).float(), rtol=0.05, atol=0.05)
    dt.attach(model, dt.LoraConfig(target=["q_proj", "v_proj"]))
    assert all(p.dtype == torch.float32 for p in model.parameters() if p.requires_grad)  # the adapter: fp32
    _randomise(model)
    model.train()
    base = {k: v.clone() for k, v in model.state_dict().items() if ".adapters." not in k}
    opt = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.1)
    LLAMA.run(model).float().pow(2).mean().backward()
    opt.step()
    assert all(torch.equal(v, base[k]) for k, v in model.state_dict().items() if ".adapters." not in k)
    model.eval()
    expected = LLAMA.run(model)
    dt.save_adapter(model, tmp_path / "a")
    fresh = build()
    dt.load_adapter(fresh, tmp_path / "a")
    torch.testing.assert_close(LLAMA.run(fresh), expected, rtol=0, atol=0)


def test_partial_refuses_a_quantized_layer():
    with pytest.raises(ValueError, match="stored quantized"):
        dt.attach(_llama("nf4"), dt.PartialConfig())


def test_a_quantized_module_to_save_is_refused_before_anything_is_attached():
    model = _llama("nf4")
    before = {n: type(m) for n, m in model.named_modules()}
    with pytest.raises(ValueError, match=r"'model\.layers\.0\.self_attn\.o_proj' is stored quantized.*skip=\['o_proj'\]"):
        dt.attach(model, dt.LoraConfig(target=["q_proj", "v_proj"], modules_to_save=["model.layers.0.self_attn.o_proj"]))
    assert {n: type(m) for n, m in model.named_modules()} == before  # no half-attached adapter left behind
    assert not dt.configs(model)


def test_quantize_checks_its_input():
    with pytest.raises(ValueError, match="nf4, int8, none"):
        dt.quantize(LLAMA.build(), "nf3")
    with pytest.raises(ValueError, match="torchao backend quantizes to nf4 only"):
        dt.quantize(LLAMA.build(), "int8", backend="torchao")
    model = LLAMA.build()
    dt.attach(model, dt.LoraConfig())
    with pytest.raises(ValueError, match="before attaching adapters"):
        dt.quantize(model, "nf4")
    fp = LLAMA.build()
    assert dt.quantize(fp, "none") is fp and quantized_format(fp.model.layers[0].self_attn.q_proj) is None


def test_a_missing_library_names_what_to_install(monkeypatch):
    monkeypatch.setitem(sys.modules, "bitsandbytes", None)
    with pytest.raises(ImportError, match=r"pip install 'deltatune\[quant\]'"):
        dt.quantize(LLAMA.build(), "nf4")


def test_torchao_backend(tmp_path):
    pytest.importorskip("torchao")

    class Wide(torch.nn.Module):  # torchao's NF4 needs weight sizes divisible by its 64-value blocks
        def __init__(self) -> None:
            super().__init__()
            self.fc1, self.fc2 = torch.nn.Linear(64, 128), torch.nn.Linear(128, 64)

        def forward(self, x):
            return self.fc2(torch.relu(self.fc1(x)))

    x = torch.randn(4, 64, generator=torch.Generator().manual_seed(0))

    def build():
        torch.manual_seed(0)
        return dt.quantize(Wide(), "nf4", backend="torchao")

    model = build()
    assert describe(model.fc1).quantized == "nf4"
    dt.attach(model, dt.LoraConfig(target=["fc1", "fc2"]))
    _randomise(model)
    model(x).pow(2).mean().backward()
    assert model.fc1.adapters["default"].A.grad is not None
    expected = model(x).detach()
    dt.save_adapter(model, tmp_path / "a")
    fresh = build()
    dt.load_adapter(fresh, tmp_path / "a")
    torch.testing.assert_close(fresh(x), expected, rtol=0, atol=0)


@pytest.mark.parametrize("bits", [4, 8])
def test_a_transformers_bitsandbytes_model_takes_adapters(bits, tmp_path):
    """A model transformers loaded with BitsAndBytesConfig holds bitsandbytes' own layers."""
    from transformers import AutoModelForCausalLM, BitsAndBytesConfig

    LLAMA.build().save_pretrained(tmp_path / "base")
    qc = (BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_compute_dtype=torch.float32)
          if bits == 4 else BitsAndBytesConfig(load_in_8bit=True))
    model = AutoModelForCausalLM.from_pretrained(tmp_path / "base", quantization_config=qc, device_map="cpu")
    assert describe(model.model.layers[0].self_attn.q_proj).quantized == ("nf4" if bits == 4 else "int8")
    dt.attach(model, dt.LoraConfig(target=["q_proj", "v_proj"]))
    _randomise(model)
    model.train()
    LLAMA.run(model).pow(2).mean().backward()
    assert model.model.layers[0].self_attn.q_proj.adapters["default"].A.grad is not None


class _Wide(torch.nn.Module):
    """Rows of 128 and 256 values: whole 64-value NF4 blocks (see the accuracy note above)."""

    def __init__(self) -> None:
        super().__init__()
        self.fc1, self.fc2 = torch.nn.Linear(128, 256), torch.nn.Linear(256, 128)

    def forward(self, x):
        return self.fc2(torch.relu(self.fc1(x)))


@pytest.mark.parametrize("iterations", [1, 3])
def test_loftq_starts_closer_to_the_full_precision_weights(iterations):
    torch.manual_seed(0)
    fp = _Wide()
    x = torch.randn(8, 128, generator=torch.Generator().manual_seed(1))
    want = fp(x).detach()
    plain = dt.quantize(_copy(fp), "nf4")
    model = _copy(fp)
    report = dt.loftq(model, dt.LoraConfig(target=["fc1", "fc2"], rank=16), "nf4", iterations=iterations)
    # random weights have a flat spectrum: rank 16 of 128 carries ~15 % of the error energy
    assert report.layers == 2 and report.after < 0.9 * report.before, report
    assert describe(model.fc1.base).quantized == "nf4" and describe(model.fc2.base).quantized == "nf4"
    assert (model(x) - want).norm() < (plain(x) - want).norm()
    model(x).pow(2).mean().backward()
    assert model.fc1.adapters["default"].A.grad is not None
    with pytest.raises(ValueError, match="full-precision model with no adapter"):
        dt.loftq(model, dt.LoraConfig(target=["fc1"]))


def test_loftq_factors_are_the_float64_best_fit_and_the_report_its_formula():
    """One alternation: Q = quant(W) (B A = 0), s·B A = the rank-r truncated SVD of W − deq(Q), and
    the report is ‖W − Ŵ‖_F / ‖W‖_F over both layers, all recomputed in float64."""
    from deltatune.integrations.loftq import loftq_quantize

    torch.manual_seed(0)
    fp = _Wide()
    weights = {n: getattr(fp, n).weight.detach().double() for n in ("fc1", "fc2")}
    config = dt.LoraConfig(target=["fc1", "fc2"], rank=8, alpha=32)       # s = 4
    model = _copy(fp)
    report, inits = loftq_quantize(model, config, "nf4", iterations=1)
    plain = dt.quantize(_copy(fp), "nf4")
    before = after = norm = 0.0
    for n, W in weights.items():
        Q = base_weight(getattr(model, n)).double()
        assert torch.equal(Q, base_weight(getattr(plain, n)).double())    # first pass: quant(W) itself
        U, S, Vh = torch.linalg.svd(W - Q, full_matrices=False)
        best = U[:, :8] @ torch.diag(S[:8]) @ Vh[:8]                        # float64 rank-8 fit
        A, B = inits[n]
        assert A.shape == (8, W.shape[1]) and B.shape == (W.shape[0], 8)
        torch.testing.assert_close(4 * B.double() @ A.double(), best, rtol=0, atol=1e-5)
        before += (W - Q).pow(2).sum().item()
        after += (W - Q - best).pow(2).sum().item()
        norm += W.pow(2).sum().item()
    assert report.layers == 2
    assert report.before == pytest.approx((before / norm) ** 0.5, rel=1e-5)
    assert report.after == pytest.approx((after / norm) ** 0.5, rel=1e-4)


def test_loftq_in_two_steps_equals_loftq_and_is_deterministic():
    """loftq_quantize → attach → apply_loftq_init is loftq; the same model gives the same Q and
    factors again (how a trained adapter is reloaded), and the caller's RNG is left alone."""
    from deltatune.integrations.loftq import apply_loftq_init, loftq_quantize

    torch.manual_seed(0)
    fp = _Wide()
    x = torch.randn(8, 128, generator=torch.Generator().manual_seed(1))
    config = dt.LoraConfig(target=["fc1", "fc2"], rank=8)
    one = _copy(fp)
    dt.loftq(one, config, "nf4", iterations=2)
    two = _copy(fp)
    torch.manual_seed(5)
    expected = torch.rand(3)
    torch.manual_seed(5)
    report, inits = loftq_quantize(two, config, "nf4", iterations=2)
    assert torch.equal(torch.rand(3), expected)  # the caller's RNG is untouched
    assert not any(isinstance(m, dt.AdaptedLayer) for m in two.modules())     # the probe is gone
    dt.attach(two, config)
    assert apply_loftq_init(two, inits) == 2
    torch.testing.assert_close(two(x), one(x), rtol=0, atol=0)
    for n in ("fc1", "fc2"):
        assert torch.equal(getattr(two, n).base.weight.data, getattr(one, n).base.weight.data)  # packed Q bytes
    with pytest.raises(ValueError, match="not attached to 'fc1'"):
        apply_loftq_init(_copy(fp), inits)


def _copy(module):
    import copy

    return copy.deepcopy(module)


def test_torchao_nf4_layers_deepcopy_exactly():
    """torchao's NF4Tensor.clone re-quantizes with a scaler block of 256 and fails when that does not
    divide the number of blocks (128 here; SmolLM2's 576 x 576 has 5,184); the copy clones the codes."""
    pytest.importorskip("torchao")
    import copy

    torch.manual_seed(0)
    model = dt.quantize(torch.nn.Sequential(torch.nn.Linear(64, 128), torch.nn.ReLU(), torch.nn.Linear(128, 64)),
                        "nf4", backend="torchao")
    dt.attach(model, dt.LoraConfig(target=["0", "2"]))
    _randomise(model)
    model.eval()  # no dropout
    twin = copy.deepcopy(model)
    x = torch.randn(3, 64)
    torch.testing.assert_close(twin(x), model(x), rtol=0, atol=0)
    for i in (0, 2):
        w, v = model[i].base.weight, twin[i].base.weight
        assert type(v) is type(w) and not v.requires_grad and v.scaler_block_size == w.scaler_block_size
        for name in w.__tensor_flatten__()[0]:
            a, b = getattr(w, name), getattr(v, name)
            assert torch.equal(a, b) and a.untyped_storage().data_ptr() != b.untyped_storage().data_ptr()


@pytest.mark.parametrize("backend", ["bitsandbytes", "torchao"])
def test_a_smaller_nf4_block_rounds_closer_and_costs_its_scales(backend):
    """blocksize 32: one scale per 32 values instead of 64, so less rounding error and more bytes."""
    if backend == "torchao":
        pytest.importorskip("torchao")
    W = torch.randn(256, 256, generator=torch.Generator().manual_seed(0))  # Gaussian, as NF4 assumes
    errors, sizes = {}, {}
    for blocksize in (64, 32):
        linear = torch.nn.Linear(256, 256, bias=False)
        with torch.no_grad():
            linear.weight.copy_(W)
        q = dt.quantize(torch.nn.Sequential(linear), "nf4", backend=backend, blocksize=blocksize)
        errors[blocksize] = ((base_weight(q[0]) - W).norm() / W.norm()).item()
        sizes[blocksize] = resident_bytes(q)
    assert 0.05 < errors[32] < 0.97 * errors[64] < 0.1  # 0.088 vs 0.092 here; SmolLM2's weights 0.089 vs 0.095
    assert sizes[64] < sizes[32] < 0.16 * W.numel() * 4  # codes 0.125x, plus the scales


@pytest.mark.parametrize("fmt,backend", [("nf4", "bitsandbytes"), ("nf4", "torchao"), ("int8", "bitsandbytes")])
def test_training_on_a_quantized_base_equals_training_on_its_dequantized_copy(fmt, backend):
    """The quantized path adds no error of its own: LoRA (with dropout) trained on the quantized
    base and on a float32 model holding its dequantized weights follow the same losses and end with
    the same adapter, so any quality gap against the fp32 base is the rounding of the weights."""
    import copy

    quantized = _llama(fmt, backend)
    plain = dt.dequantize(copy.deepcopy(quantized))
    assert all(quantized_format(m) is None for m in plain.modules())
    g = torch.Generator().manual_seed(3)
    batches = [torch.randint(0, 100, (4, 12), generator=g)] * 5  # one batch, fitted
    losses, adapters = [], []
    for model in (quantized, plain):
        torch.manual_seed(0)
        dt.attach(model, dt.LoraConfig(target=["q_proj", "v_proj", "gate_proj", "down_proj"], dropout=0.1))
        model.train()
        trainable = [p for p in model.parameters() if p.requires_grad]
        opt = torch.optim.AdamW(trainable, lr=1e-2)
        run = []
        for step, ids in enumerate(batches):
            torch.manual_seed(100 + step)  # the same dropout masks in both runs
            loss = model(input_ids=ids, labels=ids).loss
            loss.backward()
            opt.step()
            opt.zero_grad()
            run.append(loss.item())
        losses.append(run)
        adapters.append([p.detach().clone() for p in trainable])
    torch.testing.assert_close(losses[0], losses[1], rtol=1e-6, atol=0)
    assert losses[0][-1] < losses[0][0] - 0.1  # it trained
    # NF4 dequantizes then multiplies, as the copy does: the same adapter to float32 rounding. int8
    # scales after its product (another summation order), which Adam's normalisation of near-zero
    # gradients turns into ~1e-5 differences; a wrong formula would differ by orders more.
    tol = {"rtol": 1e-5, "atol": 1e-6} if fmt == "nf4" else {"rtol": 1e-3, "atol": 1e-4}
    for a, b in zip(*adapters, strict=True):
        torch.testing.assert_close(a, b, **tol)
