"""DoRA against the float64 formula and against Hugging Face PEFT on identical weights."""

from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F

import deltatune as dt
from deltatune.core.records import adapted_layers
from deltatune.methods.dora import Dora
from tests.models import ZOO

CASES = {
    "linear": ("mlp", ["fc1", "fc2"]),
    "conv": ("cnn", ["conv1", "conv2", "conv3"]),
    "embedding": ("bert", ["word_embeddings", "query"]),
    "gpt2-conv1d": ("gpt2", ["c_attn", "c_fc"]),
}


def _peft_dora(model, targets, *, fan_in_fan_out=False):
    from peft import LoraConfig, get_peft_model

    cfg = LoraConfig(r=4, lora_alpha=8, target_modules=targets, use_dora=True, fan_in_fan_out=fan_in_fan_out)
    peft_model = get_peft_model(copy.deepcopy(model), cfg)
    g = torch.Generator().manual_seed(5)
    with torch.no_grad():  # move every factor and the magnitude away from the identity
        for n, p in peft_model.named_parameters():
            if "magnitude" in n:
                p.mul_(0.5 + torch.rand(p.shape, generator=g))
            elif "lora_" in n:
                p.copy_(0.2 * torch.randn(p.shape, generator=g))
    return peft_model


def _copy_peft_into_ours(peft_model, model):
    for layer_name, layer in adapted_layers(model):
        theirs = peft_model.base_model.model.get_submodule(layer_name)
        ours = layer.adapters["default"]
        with torch.no_grad():
            if "default" in theirs.lora_embedding_A:
                ours.lora.A.copy_(theirs.lora_embedding_A["default"])
                ours.lora.B.copy_(theirs.lora_embedding_B["default"])
            else:
                ours.lora.A.copy_(theirs.lora_A["default"].weight)
                ours.lora.B.copy_(theirs.lora_B["default"].weight)
            ours.magnitude.copy_(theirs.lora_magnitude_vector["default"].weight.flatten())


def _grads(model, run):
    model.zero_grad()
    run(model).pow(2).mean().backward()
    return {n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad}


@pytest.mark.parametrize("kind", list(CASES))
def test_matches_peft_outputs_gradients_and_merge(kind):
    zoo_name, targets = CASES[kind]
    zoo = ZOO[zoo_name]
    model = zoo.build()
    peft_model = _peft_dora(model, targets, fan_in_fan_out=kind == "gpt2-conv1d").eval()
    dt.attach(model, dt.DoraConfig(target=targets, rank=4, alpha=8.0))
    _copy_peft_into_ours(peft_model, model)
    expected = zoo.run(peft_model)
    assert not torch.allclose(expected, zoo.run(zoo.build()), atol=1e-3)  # the adapters do something
    torch.testing.assert_close(zoo.run(model), expected, rtol=1e-5, atol=1e-5)

    theirs = _grads(peft_model.train(), zoo.run)
    ours = _grads(model.train(), zoo.run)
    for layer_name, layer in adapted_layers(model):
        prefix = f"base_model.model.{layer_name}"
        emb = f"{prefix}.lora_embedding_A.default" in theirs
        pairs = {
            "lora.A": f"{prefix}.lora_embedding_A.default" if emb else f"{prefix}.lora_A.default.weight",
            "lora.B": f"{prefix}.lora_embedding_B.default" if emb else f"{prefix}.lora_B.default.weight",
            "magnitude": f"{prefix}.lora_magnitude_vector.default.weight",
        }
        for mine, peft_name in pairs.items():
            got = ours[f"{layer_name}.adapters.default.{mine}"]
            torch.testing.assert_close(got, theirs[peft_name].view_as(got), rtol=1e-4, atol=1e-6)

    model.eval(), peft_model.eval()
    dt.merge(model)
    peft_model.merge_adapter()
    torch.testing.assert_close(zoo.run(model), zoo.run(peft_model), rtol=1e-5, atol=1e-5)


def _dora_layer(base: torch.nn.Module, rank: int = 3, alpha: float = 6.0, **kw) -> tuple[torch.nn.Module, Dora]:
    """``base`` (as ``model[0]``) with a DoRA adapter whose factors and magnitude are non-trivial (float64)."""
    model = torch.nn.Sequential(base.double())
    dt.attach(model, dt.DoraConfig(target=["0"], rank=rank, alpha=alpha, **kw))
    ad = model[0].adapters["default"]
    with torch.no_grad():
        ad.lora.A.normal_()
        ad.lora.B.normal_()
        ad.magnitude.mul_(torch.rand_like(ad.magnitude) + 0.5)
    return model, ad


def _formula_weight(W: torch.Tensor, delta: torch.Tensor, m: torch.Tensor, dim) -> torch.Tensor:
    """m · V / ‖V‖ with V = W + delta, the norm over ``dim`` (all but the output axis)."""
    V = W + delta
    shape = [1] * V.dim()
    out_axis = next(i for i in range(V.dim()) if i not in dim)
    shape[out_axis] = -1
    return m.view(shape) * V / torch.linalg.vector_norm(V, dim=dim, keepdim=True)


@pytest.mark.parametrize("bias", [True, False])
@pytest.mark.parametrize("shape", [(2, 3, 6), (4, 7, 6)])  # fewer / more rows than inputs: both kernel branches
def test_linear_matches_float64_formula_and_gradients(shape, bias):
    model, ad = _dora_layer(torch.nn.Linear(6, 5, bias=bias))
    layer = model[0]
    W, b, s = layer.base.weight, layer.base.bias, ad.lora.scaling
    x = torch.randn(*shape, dtype=torch.float64, requires_grad=True)
    out = layer(x)
    W_prime = _formula_weight(W, s * ad.lora.B @ ad.lora.A, ad.magnitude, dim=(1,))
    expected = x @ W_prime.T + (b if bias else 0)
    torch.testing.assert_close(out, expected, rtol=1e-12, atol=1e-12)

    # Gradients: the norm is a constant (detached), as in the paper and PEFT.
    g = torch.randn_like(out)
    params = [x, ad.lora.A, ad.lora.B, ad.magnitude]
    mine = torch.autograd.grad(out, params, g, retain_graph=True)
    again = torch.autograd.grad(out, params, g)  # the kernel keeps what it saved intact
    V = W + s * ad.lora.B @ ad.lora.A
    ref = x @ (ad.magnitude[:, None] * V / V.norm(dim=1, keepdim=True).detach()).T + (b if bias else 0)
    theirs = torch.autograd.grad(ref, params, g)
    for a, a2, t in zip(mine, again, theirs):
        torch.testing.assert_close(a, t, rtol=1e-10, atol=1e-12)
        torch.testing.assert_close(a2, t, rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize("engine", ["aten", "thin", "onednn"])
@pytest.mark.parametrize("rows", [3, 40])  # fewer / more rows than inputs: both kernel branches
def test_float32_on_every_cpu_engine_matches_float64(engine, rows, monkeypatch):
    """The kernel's products go through the LoRA kernel's engine (oneDNN forced on for small shapes)."""
    from deltatune.core import products

    monkeypatch.setattr(products, "_ONEDNN_MIN_WORK", 0)
    model, ad = _dora_layer(torch.nn.Linear(24, 20))
    layer = model.float()[0]
    with torch.no_grad():
        ad.lora.B.normal_()
    x = torch.randn(rows, 24, requires_grad=True)
    params = [x, ad.lora.A, ad.lora.B, ad.magnitude]
    with products.cpu_engine(engine):
        out = layer(x)
        g = torch.randn_like(out)
        mine = torch.autograd.grad(out, params, g)
    W, b, s = layer.base.weight.double(), layer.base.bias.double(), ad.lora.scaling
    ref_params = [p.detach().double().requires_grad_() for p in params]
    x64, A64, B64, m64 = ref_params
    V = W + s * B64 @ A64
    ref = x64 @ (m64[:, None] * V / V.norm(dim=1, keepdim=True).detach()).T + b
    torch.testing.assert_close(out.double(), ref, rtol=1e-5, atol=1e-5)
    for a, t in zip(mine, torch.autograd.grad(ref, ref_params, g.double())):
        torch.testing.assert_close(a.double(), t, rtol=1e-4, atol=1e-4)


def test_fused_linear_equals_the_composed_path():
    model, ad = _dora_layer(torch.nn.Linear(6, 5))
    layer, x = model[0], torch.randn(9, 6, dtype=torch.float64)
    params = [ad.lora.A, ad.lora.B, ad.magnitude]
    fused = layer(x)
    fused_grads = torch.autograd.grad(fused.sum(), params)
    layer.base.weight.requires_grad_(True)  # a trainable base weight takes the plain autograd path
    plain = layer(x)
    plain_grads = torch.autograd.grad(plain.sum(), params)
    torch.testing.assert_close(plain, fused, rtol=1e-12, atol=1e-12)
    for a, b in zip(plain_grads, fused_grads):
        torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-12)


def test_conv_embedding_and_gpt2_conv1d_match_float64_formula():
    from transformers.pytorch_utils import Conv1D

    model, ad = _dora_layer(torch.nn.Conv2d(3, 4, 3, padding=1))
    conv = model[0]
    x = torch.randn(2, 3, 5, 5, dtype=torch.float64)
    delta = ad.lora.delta_weight(conv.base)
    W_prime = _formula_weight(conv.base.weight, delta, ad.magnitude, dim=(1, 2, 3))
    torch.testing.assert_close(conv(x), F.conv2d(x, W_prime, conv.base.bias, padding=1), rtol=1e-12, atol=1e-12)

    model, ad = _dora_layer(torch.nn.Embedding(11, 5))
    emb = model[0]
    ids = torch.randint(0, 11, (3, 4))
    W_prime = _formula_weight(emb.base.weight, ad.lora.delta_weight(emb.base), ad.magnitude, dim=(0,))
    torch.testing.assert_close(emb(ids), W_prime[ids], rtol=1e-12, atol=1e-12)

    model, ad = _dora_layer(Conv1D(5, 6))  # weight (d_in=6, d_out=5)
    gpt = model[0]
    x = torch.randn(2, 6, dtype=torch.float64)
    W_prime = _formula_weight(gpt.base.weight, ad.lora.delta_weight(gpt.base), ad.magnitude, dim=(0,))
    torch.testing.assert_close(gpt(x), x @ W_prime + gpt.base.bias, rtol=1e-12, atol=1e-12)


def test_merge_writes_the_formula_and_unmerge_restores_the_base():
    model, ad = _dora_layer(torch.nn.Linear(6, 5))
    layer = model[0]
    W0 = layer.base.weight.detach().clone()
    x = torch.randn(3, 6, dtype=torch.float64)
    expected = layer(x)
    W_prime = _formula_weight(W0, ad.lora.delta_weight(layer.base), ad.magnitude, dim=(1,))
    torch.testing.assert_close(ad.delta_weight(layer.base), W_prime - W0, rtol=1e-12, atol=1e-12)
    dt.merge(model)
    torch.testing.assert_close(layer.base.weight, W_prime, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(layer(x), expected, rtol=1e-12, atol=1e-12)
    dt.unmerge(model)
    torch.testing.assert_close(layer.base.weight, W0, rtol=0, atol=1e-14)
    with pytest.raises(RuntimeError, match="not merged"):
        ad.unmerge_from(layer.base)


def test_dropout_applies_to_the_low_rank_path_only():
    model, ad = _dora_layer(torch.nn.Linear(6, 5), dropout=0.5)
    layer = model[0]
    x = torch.randn(8, 6, dtype=torch.float64)
    layer.train()
    torch.manual_seed(3)
    out = layer(x)
    torch.manual_seed(3)
    xd = F.dropout(x, 0.5, training=True)
    W, s = layer.base.weight, ad.lora.scaling
    V = W + s * ad.lora.B @ ad.lora.A
    scale = ad.magnitude / V.norm(dim=1)
    expected = scale * (x @ W.T + s * xd @ ad.lora.A.T @ ad.lora.B.T) + layer.base.bias
    torch.testing.assert_close(out, expected, rtol=1e-12, atol=1e-12)


def test_norm_is_cached_until_a_weight_changes(monkeypatch):
    model, ad = _dora_layer(torch.nn.Linear(6, 5))
    layer = model[0]
    calls = []
    compute = ad._compute_norm
    monkeypatch.setattr(ad, "_compute_norm", lambda w: calls.append(1) or compute(w))
    x = torch.randn(3, 6, dtype=torch.float64)
    first = layer(x)
    torch.testing.assert_close(layer(x), first, rtol=0, atol=0)
    assert len(calls) == 1
    opt = torch.optim.SGD(ad.parameters(), lr=0.1)
    layer(x).sum().backward()
    opt.step()  # A and B change in place: the cached norm must not be reused
    W, s = layer.base.weight, ad.lora.scaling
    W_prime = _formula_weight(W, s * ad.lora.B @ ad.lora.A, ad.magnitude, dim=(1,))
    torch.testing.assert_close(layer(x), x @ W_prime.T + layer.base.bias, rtol=1e-12, atol=1e-12)
    assert len(calls) == 2
    with torch.inference_mode():  # a norm made in inference mode is not reused by autograd later
        layer(x)
    layer(x).sum().backward()


def test_identity_at_init_is_exact_and_parameters_are_counted():
    zoo = ZOO["bert"]
    model = zoo.build()
    expected = zoo.run(model)
    report = dt.attach(model, dt.DoraConfig(target=["query", "word_embeddings"], rank=2))
    assert torch.equal(zoo.run(model), expected)
    # query: A (2, 32), B (32, 2), m (32) on 2 layers; word_embeddings: A (2, 100), B (32, 2), m (32)
    assert report.adapter_parameters == 2 * (64 + 64 + 32) + (200 + 64 + 32)


def test_pissa_init_starts_at_the_base():
    zoo = ZOO["mlp"]
    model = zoo.build()
    expected = zoo.run(model)
    dt.attach(model, dt.DoraConfig(target=["fc1", "fc2"], rank=4, init="pissa"))
    torch.testing.assert_close(zoo.run(model), expected, rtol=0, atol=1e-5)
    assert model.fc1.adapters["default"].lora.B.abs().sum() > 0


def test_config_is_lora_hyperparameters_with_its_own_name():
    config = dt.DoraConfig(rank=4, rank_pattern={"query": 2})
    assert config.to_dict()["method"] == "dora" and dt.METHODS["dora"] is dt.DoraConfig
    assert dt.config_from_dict(config.to_dict()) == config
    hash(config)
    with pytest.raises(ValueError, match="rank must be >= 1"):
        dt.DoraConfig(rank=0)
    with pytest.raises(ValueError, match="config is for method 'lora'"):
        dt.DoraConfig.from_dict(dt.LoraConfig().to_dict())
