"""Weighted combination of adapters: each rule against a float64 formula, and against HF PEFT."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from torch import nn

import deltatune as dt
from deltatune.core.combine import combine, merge_tensors
from deltatune.core.layer import AdaptedLayer
from tests.models import ZOO

SOURCES = {
    "a": dict(rank=4, alpha=8.0, target=["fc1", "fc2"]),
    "b": dict(rank=4, alpha=2.0, rslora=True, target=["fc1", "fc2"]),
    "c": dict(rank=2, alpha=3.0, target=["fc1"]),
}


def _model(dtype: torch.dtype = torch.float64) -> nn.Module:
    model = ZOO["mlp"].build().to(dtype)
    g = torch.Generator().manual_seed(0)
    for name, kw in SOURCES.items():
        dt.attach(model, dt.LoraConfig(**kw), name, activate=False)
        with torch.no_grad():
            for layer in (m for m in model.modules() if isinstance(m, AdaptedLayer) and name in m.adapters):
                for p in layer.adapters[name].parameters():
                    p.copy_(torch.randn(p.shape, generator=g, dtype=torch.float64))
    return model


def _factors(model: nn.Module, layer: str, name: str) -> tuple[np.ndarray, np.ndarray, float]:
    adapter = model.get_submodule(layer).adapters[name]
    return adapter.A.detach().numpy().astype(np.float64), adapter.B.detach().numpy().astype(np.float64), adapter.scaling


def _delta(model: nn.Module, layer: str, name: str) -> np.ndarray:
    module = model.get_submodule(layer)
    return module.adapters[name].delta_weight(module.base).detach().numpy()


# --- the rules, written elementwise in float64 ------------------------------------------------------


def _trim(t: np.ndarray, density: float) -> np.ndarray:
    k = int(density * t.size)
    order = np.argsort(-np.abs(t).ravel(), kind="stable")
    out = np.zeros(t.size)
    out[order[:k]] = t.ravel()[order[:k]]
    return out.reshape(t.shape)


def _rule(rule: str, tensors: list[np.ndarray], weights: list[float], density: float, sign: str = "total",
          masks: list[np.ndarray] | None = None) -> np.ndarray:
    if rule in ("ties", "magnitude_prune"):
        tensors = [_trim(t, density) for t in tensors]
    if rule in ("dare_linear", "dare_ties"):
        tensors = [t * m / density for t, m in zip(tensors, masks)]
    out = np.zeros(tensors[0].shape)
    for j in np.ndindex(out.shape):
        values = [t[j] for t in tensors]
        if rule in ("ties", "dare_ties"):
            votes = sum(values) if sign == "total" else sum(np.sign(v) for v in values)
            elected = 1.0 if votes >= 0 else -1.0
            agree = [i for i, v in enumerate(values) if np.sign(v) == elected]
            out[j] = sum(weights[i] * values[i] for i in agree) / max(1, len(agree))
        else:
            out[j] = sum(w * v for w, v in zip(weights, values))
    return out


@pytest.mark.parametrize("rule", ["linear", "ties", "magnitude_prune", "dare_linear", "dare_ties"])
@pytest.mark.parametrize("sign", ["total", "frequency"])
def test_merge_rules_match_the_formula(rule, sign):
    g = torch.Generator().manual_seed(1)
    tensors = [torch.randn(5, 6, generator=g, dtype=torch.float64) for _ in range(3)]
    weights = [0.7, -0.3, 1.2]
    seed = torch.Generator().manual_seed(7)
    got = merge_tensors(rule, tensors, torch.tensor(weights, dtype=torch.float64), density=0.4,
                        majority_sign=sign, generator=seed)
    replay = torch.Generator().manual_seed(7)  # masks in tensor order, as documented
    masks = [torch.bernoulli(torch.full_like(t, 0.4), generator=replay).numpy() for t in tensors]
    expected = _rule(rule, [t.numpy() for t in tensors], weights, 0.4, sign, masks)
    np.testing.assert_allclose(got.numpy(), expected, atol=1e-12)


# --- combining adapters ---------------------------------------------------------------------------


def _combined(model: nn.Module, how: str, names: list[str], weights: list[float], **kw) -> dict[str, np.ndarray]:
    combine(model, names, weights, "m", how=how, **kw)
    return {layer: _delta(model, layer, "m") for layer in ("fc1", "fc2")}


def test_cat_is_the_exact_weighted_sum():
    model = _model()
    got = _combined(model, "cat", ["a", "b", "c"], [0.5, -1.5, 2.0])
    for layer in ("fc1", "fc2"):
        expected = 0.5 * _delta(model, layer, "a") - 1.5 * _delta(model, layer, "b")
        if layer == "fc1":
            expected = expected + 2.0 * _delta(model, layer, "c")
        np.testing.assert_allclose(got[layer], expected, atol=1e-12)
    assert model.fc1.adapters["m"].A.shape[0] == 10  # 4 + 4 + 2, padded on fc2


@pytest.mark.parametrize("clamp", [None, 0.8])
def test_svd_is_the_best_low_rank_approximation(clamp):
    model = _model()
    got = _combined(model, "svd", ["a", "c"], [0.8, -0.6], rank=3, svd_clamp=clamp)
    for layer in ("fc1", "fc2"):
        total = 0.8 * _delta(model, layer, "a") + (-0.6 * _delta(model, layer, "c") if layer == "fc1" else 0)
        U, S, Vh = np.linalg.svd(total, full_matrices=False)
        B, A = U[:, :3] * S[:3], Vh[:3]
        if clamp is not None:
            high = np.quantile(np.concatenate([B.ravel(), A.ravel()]), clamp)
            B, A = np.clip(B, -high, high), np.clip(A, -high, high)
        np.testing.assert_allclose(got[layer], B @ A, atol=1e-10)
    assert model.fc1.adapters["m"].A.shape[0] == 3


@pytest.mark.parametrize("how", ["linear", "ties", "magnitude_prune", "dare_linear", "dare_ties"])
def test_factor_rules_match_the_formula(how):
    model = _model()
    weights = [0.9, -0.4]
    density = 0.5
    got = _combined(model, how, ["a", "b"], weights, density=density, majority_sign="frequency",
                    generator=torch.Generator().manual_seed(3))
    replay = torch.Generator().manual_seed(3)
    for layer in ("fc1", "fc2"):
        (Aa, Ba, sa), (Ab, Bb, sb) = _factors(model, layer, "a"), _factors(model, layer, "b")
        ws = [w * s for w, s in zip(weights, (sa, sb))]
        wA = [np.sign(w) * np.sqrt(abs(w)) for w in ws]
        wB = [np.sqrt(abs(w)) for w in ws]
        mA = [torch.bernoulli(torch.full(a.shape, density, dtype=torch.float64), generator=replay).numpy()
              for a in (Aa, Ab)] if how.startswith("dare") else None
        mB = [torch.bernoulli(torch.full(b.shape, density, dtype=torch.float64), generator=replay).numpy()
              for b in (Ba, Bb)] if how.startswith("dare") else None
        A = _rule(how, [Aa, Ab], wA, density, "frequency", mA)
        B = _rule(how, [Ba, Bb], wB, density, "frequency", mB)
        np.testing.assert_allclose(got[layer], B @ A, atol=1e-10)


@pytest.mark.parametrize("how", ["ties_svd", "magnitude_prune_svd"])
def test_rules_on_full_deltas_then_svd(how):
    model = _model()
    got = _combined(model, how, ["a", "b", "c"], [1.0, 0.5, -0.7], density=0.3, rank=4)
    for layer in ("fc1", "fc2"):
        names = ["a", "b", "c"] if layer == "fc1" else ["a", "b"]
        weights = [1.0, 0.5, -0.7][: len(names)]
        total = _rule(how.removesuffix("_svd"), [_delta(model, layer, n) for n in names], weights, 0.3)
        U, S, Vh = np.linalg.svd(total, full_matrices=False)
        np.testing.assert_allclose(got[layer], (U[:, :4] * S[:4]) @ Vh[:4], atol=1e-10)


@pytest.mark.parametrize(
    "how, kw",
    [
        ("linear", {}),
        ("cat", {}),
        ("svd", dict(rank=3, svd_clamp=0.9)),
        ("ties", dict(density=0.5)),
        ("ties", dict(density=0.3, majority_sign="frequency")),
        ("magnitude_prune", dict(density=0.6)),
        ("ties_svd", dict(density=0.5, rank=5)),
        ("magnitude_prune_svd", dict(density=0.4)),
    ],
)
def test_parity_with_peft_add_weighted_adapter(how, kw):
    import peft

    model = _model(torch.float32)
    theirs_name = {"a": "first", "b": "second"}  # PEFT warns on names contained in its "lora_" prefix
    reference = peft.get_peft_model(ZOO["mlp"].build(), peft.LoraConfig(r=4, lora_alpha=8.0,
                                    target_modules=["fc1", "fc2"]), "first")
    reference.add_adapter("second", peft.LoraConfig(r=4, lora_alpha=2.0, use_rslora=True,
                                                    target_modules=["fc1", "fc2"]))
    with torch.no_grad():
        for layer in ("fc1", "fc2"):
            theirs = reference.base_model.model.get_submodule(layer)
            for name in ("a", "b"):
                ours, t = model.get_submodule(layer).adapters[name], theirs_name[name]
                assert theirs.scaling[t] == pytest.approx(ours.scaling)
                theirs.lora_A[t].weight.copy_(ours.A)
                theirs.lora_B[t].weight.copy_(ours.B)
    renamed = {"rank": "svd_rank", "majority_sign": "majority_sign_method"}
    reference.add_weighted_adapter(["first", "second"], [0.7, -1.3], "m", combination_type=how,
                                   **{renamed.get(k, k): v for k, v in kw.items()})
    got = _combined(model, how, ["a", "b"], [0.7, -1.3], **kw)
    for layer in ("fc1", "fc2"):
        expected = reference.base_model.model.get_submodule(layer).get_delta_weight("m").detach().numpy()
        np.testing.assert_allclose(got[layer], expected, atol=2e-5, rtol=1e-4)


def test_combined_adapter_saves_loads_and_copies_heads(tmp_path):
    model = ZOO["bert"].build()
    for i, name in enumerate(["x", "y"]):
        dt.attach(model, dt.LoraConfig(rank=4, target=["query", "value"], modules_to_save=("classifier",)),
                  name, activate=False)
        with torch.no_grad():
            for p in (p for n, p in model.named_parameters() if f"adapters.{name}." in n):
                p.copy_(torch.randn_like(p) * 0.2)
    with pytest.raises(ValueError, match="heads_from"):
        combine(model, ["x", "y"], [0.5, 0.5], "m", how="cat")
    report = combine(model, ["x", "y"], [0.5, 0.5], "m", how="cat", heads_from="y")
    assert report.modules_to_save == ["classifier"] and len(report.targets) == 4
    head = model.classifier.adapters
    assert torch.equal(head["m"].module.weight, head["y"].module.weight)
    with dt.using(model, "m"):
        expected = ZOO["bert"].run(model)
    dt.save_adapter(model, tmp_path / "m", "m")
    fresh = ZOO["bert"].build()
    dt.load_adapter(fresh, tmp_path / "m")
    torch.testing.assert_close(ZOO["bert"].run(fresh), expected, atol=0, rtol=0)


@pytest.mark.parametrize(
    "args, kw, match",
    [
        ((["a", "zz"], [1, 1]), dict(how="cat"), "no adapter named 'zz'"),
        ((["a", "b"], [1]), dict(how="cat"), "one weight per adapter"),
        ((["a", "a"], [1, 1]), dict(how="cat"), "distinct"),
        ((["a", "b"], [1, 1]), dict(how="mean"), "how must be one of"),
        ((["a", "b"], [1, 1]), dict(how="ties", density=0.0), "density in"),
        ((["a", "b"], [1, 1]), dict(how="linear", rank=2), "svd combinations only"),
        ((["a", "b"], [1, 1]), dict(how="ties", density=0.5, majority_sign="mode"), "majority_sign"),
    ],
)
def test_bad_arguments_fail_before_any_work(args, kw, match):
    model = _model()
    with pytest.raises(ValueError, match=match):
        combine(model, *args, "m", **kw)
    assert "m" not in dt.configs(model)
    with pytest.raises(ValueError, match="already attached"):
        combine(model, ["a", "b"], [1, 1], "c", how="cat")
